"""Helpers the tests share: import them as `tests.support.<module>` (pytest runs in importlib mode,
so no test directory is ever put on sys.path and no conftest is imported as a module).

- `polling`: wait until a condition holds; `pools`: pools files for tests; `prom`: Prometheus samples;
- `bridge`: worker processes of the CPU pools, a bridge with its WebRTC transport, a test caller;
- `chaos`: the chaos suite's private Redis, worker processes and whole-turn helpers;
- `workers`: per-test pools and `voxbus worker` processes, and reading what they wrote;
- `job_consumer`: a job consumer in its own process (crash tests run it as a script).
"""
