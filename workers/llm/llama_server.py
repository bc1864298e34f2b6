"""`python -m workers.llm.llama_server ARGS`: llama-cpp-python's OpenAI-compatible server, with this CPU's kernels.

The same as `python -m llama_cpp.server ARGS`, except that on a build with
run-time kernel selection (ops/dev's default) the CPU variant is loaded first
(`workers.llm.ggml_cpu`); without that the server finds no backend. Used by
the OpenAI-engine tests and the latency benchmark's peer.
"""

from __future__ import annotations

import runpy
import sys

from workers.llm.ggml_cpu import load_cpu_backend

if __name__ == "__main__":
    load_cpu_backend()
    sys.argv[0] = "llama_cpp.server"
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
