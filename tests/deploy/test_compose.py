"""The Docker Compose deployments (compose/), checked against the real CLI and pools files.

Each compose file is rendered by `docker compose config` with compose/.env.example
(every profile enabled), and the rendered services are checked:

- every command that runs `voxbus` names a subcommand of `shared.cli.COMMANDS`, and
  `shared.cli.build_parser()` accepts its arguments;
- every worker's `--pool` exists in the pools file the service mounts at its `--pools`
  path, and every pool of a mounted pools file has a worker (a pool nobody serves is
  a configuration mistake: its jobs wait forever, and a fallback never takes overflow);
- services that run a model on a GPU reserve GPUs (as many as tensor_parallel_size), and
  the others reserve none;
- an `openai` pool's base_url names a service of the stack that serves the pool's model;
- Prometheus' file_sd targets are exactly the services that serve /metrics there.

Without a compose binary (`docker compose` plugin, or a standalone `docker-compose`
v2+) the rendering tests skip with the reason. The .env.example and Dockerfile checks
need no Docker.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest

from shared.config import Config, load_config
from tests.support.deploy import gpus_needed, parse_voxbus

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "compose"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.cpu.yml"]
DOCKERFILES = sorted(COMPOSE_DIR.glob("Dockerfile*"))
# The browser / WebRTC stack, which the GPU worker image must not install.
# PyAV is not in it: every worker decodes the Opus caller audio of the streams (shared/opus.py).
BROWSER_STACK = {"aiortc", "aiohttp", "aioice", "livekit", "livekit-agents", "livekit-api", "playwright"}


# ---------------------------------------------------------------- helpers


def argv_of(service: dict) -> list[str]:
    return list(service.get("entrypoint") or []) + list(service.get("command") or [])


def runs_voxbus(service: dict) -> bool:
    argv = argv_of(service)
    return bool(argv) and argv[0] == "voxbus"


def built_from_project(service: dict) -> bool:
    dockerfile = (service.get("build") or {}).get("dockerfile", "")
    return Path(dockerfile).name.startswith("Dockerfile")


def host_path(service: dict, container_path: str) -> Path:
    """The host file behind `container_path`, through the service's bind mounts."""
    target = PurePosixPath(container_path)
    for volume in service.get("volumes") or []:
        if volume.get("type") != "bind":
            continue
        mount = PurePosixPath(volume["target"])
        if target == mount or mount in target.parents:
            return Path(volume["source"]) / target.relative_to(mount)
    raise AssertionError(f"{container_path} is not bind-mounted into the service (it would read the image's copy)")


@cache
def pools_file(path: Path) -> Config:
    return load_config(path)


def gpu_reservations(service: dict) -> list[dict]:
    devices = (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    return [d for d in devices if "gpu" in (d.get("capabilities") or [])]


def reserved_gpu_count(device: dict) -> int:
    ids = [part for entry in device.get("device_ids") or [] for part in str(entry).split(",") if part.strip()]
    return len(ids) if ids else int(device.get("count") or 0)


# ---------------------------------------------------------------- rendering


def _compose_binary() -> tuple[list[str] | None, str]:
    """`docker compose`, else a standalone `docker-compose` v2+ (the same program); else a skip reason."""
    docker = shutil.which("docker")
    reasons = []
    if docker is None:
        reasons.append("the docker CLI is not installed")
    else:
        try:
            probe = subprocess.run([docker, "compose", "version"], check=False, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as exc:
            probe = None
            reasons.append(f"`docker compose version` failed: {exc}")
        if probe is not None and probe.returncode == 0:
            return [docker, "compose"], ""
        if probe is not None:
            reasons.append(f"the docker compose plugin is missing ({(probe.stderr or probe.stdout).strip()[:120]})")
    candidates = [shutil.which("docker-compose"), str(Path(sys.executable).with_name("docker-compose"))]
    for candidate in filter(None, candidates):
        if not Path(candidate).is_file():
            continue
        try:
            out = subprocess.run([candidate, "version", "--short"], check=False, capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        major = re.match(r"v?(\d+)\.", out.strip())
        if major and int(major.group(1)) >= 2:  # 1.x is the old Python tool, a different program
            return [candidate], ""
    reasons.append("no standalone docker-compose v2+ either")
    return None, "; ".join(reasons)


@cache
def compose_binary() -> tuple[list[str] | None, str]:
    return _compose_binary()


@cache
def _render(name: str) -> dict:
    binary, reason = compose_binary()
    if binary is None:
        pytest.skip(f"cannot render compose files: {reason}")
    cmd = [*binary, "-f", str(COMPOSE_DIR / name), "--env-file", str(ENV_EXAMPLE), "--profile", "*",
           "config", "--format", "json"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, f"`{shlex.join(cmd)}` failed:\n{proc.stderr}"
    return json.loads(proc.stdout)


@pytest.fixture(params=COMPOSE_FILES)
def stack(request) -> tuple[str, dict]:
    return request.param, _render(request.param)


def test_compose_config_accepts_each_file(stack):
    name, rendered = stack
    assert rendered["services"], f"{name}: no services"


def test_voxbus_commands_are_real_subcommands_that_parse(stack):
    name, rendered = stack
    voxbus = {n: s for n, s in rendered["services"].items() if runs_voxbus(s)}
    assert voxbus, f"{name}: no service runs voxbus"
    for service_name, service in rendered["services"].items():
        if built_from_project(service):
            assert service_name in voxbus, (
                f"{name}: {service_name} runs an image built from compose/ but its command is not `voxbus ...` "
                f"({argv_of(service)})")
    for service in voxbus.values():
        parse_voxbus(argv_of(service))


def test_worker_pools_exist_in_the_mounted_pools_file(stack):
    name, rendered = stack
    served: dict[Path, set[str]] = {}
    for service_name, service in rendered["services"].items():
        if not runs_voxbus(service):
            continue
        args = parse_voxbus(argv_of(service))
        if not hasattr(args, "pools"):
            continue
        assert args.pools, f"{name}: {service_name} names no --pools file (it would use the image's default)"
        path = host_path(service, args.pools)
        assert path.is_file(), f"{name}: {service_name} mounts {path}, which does not exist"
        config = pools_file(path)
        served.setdefault(path, set())
        if args.command == "worker":
            assert args.pool in config.pools, (
                f"{name}: {service_name} runs pool {args.pool!r}, not in {path.name} (have: {', '.join(config.pools)})")
            served[path].add(args.pool)
    assert served, f"{name}: no service mounts a pools file"
    for path, pools in served.items():
        missing = set(pools_file(path).pools) - pools
        assert not missing, f"{name}: pools of {path.name} without a worker service: {', '.join(sorted(missing))}"


def _pool_of(service: dict):
    args = parse_voxbus(argv_of(service))
    if args.command != "worker":
        return None
    return pools_file(host_path(service, args.pools)).pool(args.pool)


def test_gpu_services_reserve_gpus(stack):
    name, rendered = stack
    for service_name, service in rendered["services"].items():
        pool = _pool_of(service) if runs_voxbus(service) else None
        image = service.get("image", "")
        if pool is not None:
            wanted = gpus_needed(pool)
        elif image.startswith("vllm/"):
            wanted = 1  # the OpenAI-compatible server: one GPU unless it says otherwise
            tp = next((a.split("=", 1)[1] for a in argv_of(service) if a.startswith("--tensor-parallel-size=")), None)
            wanted = int(tp) if tp else wanted
        else:
            wanted = 0
        devices = gpu_reservations(service)
        if wanted == 0:
            assert not devices, f"{name}: {service_name} needs no GPU but reserves {devices}"
            continue
        assert devices, f"{name}: {service_name} runs a model on a GPU but has no deploy.resources.reservations.devices"
        assert all(d.get("device_ids") or d.get("count") for d in devices), f"{name}: {service_name}: {devices}"
        got = sum(reserved_gpu_count(d) for d in devices)
        assert got == wanted, f"{name}: {service_name} reserves {got} GPU(s), its model needs {wanted}"


def test_openai_pools_point_at_a_service_of_the_stack(stack):
    name, rendered = stack
    services = rendered["services"]
    for service_name, service in services.items():
        pool = _pool_of(service) if runs_voxbus(service) else None
        if pool is None or pool.engine != "openai":
            continue
        url = urlsplit(pool.options["base_url"])
        server = services.get(url.hostname)
        assert server is not None, f"{name}: {service_name}: base_url host {url.hostname!r} is not a service"
        exposed = {str(p).split("/")[0] for p in server.get("expose") or []}
        assert str(url.port) in exposed, f"{name}: {url.hostname} does not expose port {url.port}"
        argv = argv_of(server)
        served = [a.split("=", 1)[1] for a in argv if a.startswith("--served-model-name=")]
        assert served == [pool.options["model"]], (
            f"{name}: {url.hostname} serves {served or argv[:1]}, pool {pool.name} asks for {pool.options['model']!r}")


def test_prometheus_targets_are_the_services_serving_metrics(stack):
    name, rendered = stack
    configs = rendered.get("configs") or {}
    targets: set[str] = set()
    for config in configs.values():
        if "content" in config and "targets" in config["content"]:
            targets |= {t for group in json.loads(config["content"]) for t in group["targets"]}
    expected = set()
    for service_name, service in rendered["services"].items():
        if not runs_voxbus(service) or service.get("network_mode"):
            continue  # host / shared network namespaces are scraped on loopback, not by name
        port = getattr(parse_voxbus(argv_of(service)), "metrics_port", 0)
        if port:
            expected.add(f"{service_name}:{port}")
    if not targets and "prometheus" not in rendered["services"]:
        pytest.skip(f"{name} has no Prometheus")
    assert targets == expected, f"{name}: file_sd targets {sorted(targets)} != services serving /metrics {sorted(expected)}"


def test_bind_mounts_exist(stack):
    name, rendered = stack
    for service_name, service in rendered["services"].items():
        for volume in service.get("volumes") or []:
            if volume.get("type") == "bind":
                assert Path(volume["source"]).exists(), f"{name}: {service_name} mounts missing {volume['source']}"


# ---------------------------------------------------------------- no Docker needed

_VAR = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)")


def _env_example_keys() -> set[str]:
    keys = set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, _ = line.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {line!r}"
            keys.add(key.strip())
    return keys


def test_env_example_lists_every_variable_and_only_those():
    used = {v for name in COMPOSE_FILES for v in _VAR.findall((COMPOSE_DIR / name).read_text())}
    listed = _env_example_keys()
    assert used, "no ${VAR} found in the compose files"
    assert not used - listed, f"used in compose/ but not in .env.example: {', '.join(sorted(used - listed))}"
    assert not listed - used, f"in .env.example but used by no compose file: {', '.join(sorted(listed - used))}"


def test_env_example_secrets_are_placeholders():
    text = ENV_EXAMPLE.read_text()
    for key in ("REDIS_PASSWORD", "LIVEKIT_API_SECRET", "TURN_PASSWORD", "GRAFANA_ADMIN_PASSWORD", "HF_TOKEN",
                "VOXBUS_BRIDGE_TOKEN"):
        value = re.search(rf"^{key}=(.*)$", text, re.MULTILINE)
        assert value and "change-me" in value.group(1), f"{key} in .env.example must be a change-me placeholder"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_existing_paths(dockerfile: Path):
    copies = re.findall(r"^COPY\s+(?!--from)(.+)$", dockerfile.read_text(), re.MULTILINE)
    assert copies, f"{dockerfile.name}: no COPY"
    for line in copies:
        *sources, _dest = line.split()
        for source in sources:
            if source.startswith("--"):
                continue
            assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source}: not in the repository"


def _requirements_of(dockerfile: Path) -> list[str]:
    """Run the Dockerfile's `python - <<'EOF' > /tmp/requirements.txt` script against pyproject.toml."""
    scripts = re.findall(r"RUN python - <<'EOF' > /tmp/requirements\.txt\n(.*?)\nEOF\n", dockerfile.read_text(), re.DOTALL)
    assert len(scripts) == 1, f"{dockerfile.name}: expected one requirements script, found {len(scripts)}"
    proc = subprocess.run([sys.executable, "-c", scripts[0]], check=False, capture_output=True, text=True, cwd=REPO, timeout=30)
    assert proc.returncode == 0, f"{dockerfile.name}: requirements script failed:\n{proc.stderr}"
    return [line for line in proc.stdout.splitlines() if line.strip()]


def _names(requirements: list[str]) -> set[str]:
    from packaging.requirements import Requirement

    return {Requirement(r).name.lower() for r in requirements}


def test_dockerfile_requirements_come_from_pyproject():
    bridge = _names(_requirements_of(COMPOSE_DIR / "Dockerfile.bridge"))
    gpu = _names(_requirements_of(COMPOSE_DIR / "Dockerfile.worker"))
    cpu = _names(_requirements_of(COMPOSE_DIR / "Dockerfile.worker-cpu"))
    assert {"redis", "msgspec", "aiortc", "livekit-agents", "onnxruntime"} <= bridge, bridge
    assert not {"vllm", "faster-whisper", "llama-cpp-python"} & bridge, "the bridge image installs model engines"
    assert {"redis", "vllm", "faster-whisper", "onnxruntime-gpu", "httpx", "kokoro-onnx"} <= gpu, gpu
    assert not BROWSER_STACK & gpu, f"the GPU worker image installs the browser stack: {BROWSER_STACK & gpu}"
    assert {"redis", "faster-whisper", "llama-cpp-python", "piper-tts", "onnxruntime"} <= cpu, cpu
    assert not BROWSER_STACK & cpu, f"the CPU worker image installs the browser stack: {BROWSER_STACK & cpu}"


def test_dockerfile_model_lines_exist():
    models = (REPO / "ops" / "requirements-models.txt").read_text()
    for dockerfile in DOCKERFILES:
        for pattern in re.findall(r"grep -E '([^']+)' ops/requirements-models\.txt", dockerfile.read_text()):
            assert re.search(pattern, models, re.MULTILINE), f"{dockerfile.name}: {pattern!r} matches nothing in requirements-models.txt"
