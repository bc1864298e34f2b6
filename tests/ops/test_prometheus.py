"""The Prometheus side of voxbus: scrape config, rules and the Grafana dashboard, against real processes.

- `promtool check rules` / `promtool check config` accept ops/prometheus/.
- Every metric that a rule or a dashboard panel names is defined in the code
  (a typo would otherwise show as an empty panel, never as an error).
- End to end: a real Prometheus (1 s scrape and evaluation intervals, temporary
  storage, a free loopback port) runs the repository's scrape config with its
  targets pointed at a real `voxbus exporter` and a real `voxbus worker`
  (synthetic LLM engine). Redis holds a constructed backlog on a pool with no
  worker (lag and pending > 0) and a pool whose worker processed three jobs
  and dead-lettered one. Every PromQL expression of the dashboard and of the
  rules is then evaluated through /api/v1/query: none may fail, and the core
  panels (queue depth, lag, pending, workers, slots, jobs, DLQ) must return
  data. The exporter's figures must equal what Redis says (XLEN, lag, pending).

Skipped only when Debian's `prometheus` package is not installed
(`apt-get install -y --no-install-recommends prometheus`).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from redis.exceptions import ResponseError

from shared.jobs import enqueue
from shared.protocol import ChatMessage, Keys, LlmJob, encode

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "ops" / "prometheus"
CONFIG = PROM_DIR / "prometheus.yml"
RULES = PROM_DIR / "rules.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "dashboards" / "voxbus.json"
PROVISIONING = ROOT / "ops" / "grafana" / "provisioning"
PROMETHEUS = Path("/usr/bin/prometheus")
PROMTOOL = Path("/usr/bin/promtool")
JOBS = ("voxbus-exporter", "voxbus-workers", "voxbus-bridges")

needs_prometheus = pytest.mark.skipif(
    not PROMETHEUS.exists(),
    reason="/usr/bin/prometheus is absent: install Debian's package "
    "(apt-get install -y --no-install-recommends prometheus)",
)

# Panels that must show data for the constructed backlog (every one of their queries).
CORE_PANELS = (
    "Jobs queued (lag)",
    "Live workers",
    "Dead-lettered jobs (DLQ)",
    "Exporter reading Redis",
    "Queue depth (stream length) per pool",
    "Lag per pool (jobs not yet delivered)",
    "Pending per pool (delivered, not acked)",
    "Oldest pending and head-of-line wait",
    "DLQ sizes",
    "Live workers per pool",
    "Slots busy / total per GPU type",
    "Slot utilisation per pool",
    "Jobs by outcome",
)
RATE_INTERVAL = "15s"  # what Grafana's $__rate_interval would be at a 1 s scrape interval, with margin
GOOD_JOBS, BAD_JOBS, BACKLOG_JOBS, GHOST_READS = 3, 1, 5, 2


# ------------------------------------------------------------------ static checks


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel, rows and nested panels included."""
    out: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            walk(p.get("panels", []))
            for t in p.get("targets", []):
                out.append((p["title"], t["expr"]))

    walk(_dashboard()["panels"])
    return out


def rule_queries() -> list[tuple[str, str]]:
    """(rule name, expr) for every recording and alerting rule."""
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [(r.get("alert") or r["record"], r["expr"]) for g in doc["groups"] for r in g["rules"]]


def _defined_metric_names() -> set[str]:
    for module in ("shared.metrics", "shared.admin.exporter", "shared.routing"):  # every module that defines metrics
        importlib.import_module(module)

    names: set[str] = set()
    for family in REGISTRY.collect():  # a labelled metric with no child yet still yields its family
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_count", "_sum"))
    return names


@needs_prometheus
def test_promtool_accepts_rules_and_config() -> None:
    assert PROMTOOL.exists(), "/usr/bin/prometheus is installed but /usr/bin/promtool (same package) is not"
    for args in (["check", "rules", str(RULES)], ["check", "config", str(CONFIG)]):
        res = subprocess.run([str(PROMTOOL), *args], check=False, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, f"promtool {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"
        assert "SUCCESS" in res.stdout


def test_every_metric_named_in_rules_and_dashboard_is_defined() -> None:
    defined = _defined_metric_names()
    named: dict[str, str] = {}
    for where, expr in [*dashboard_queries(), *rule_queries()]:
        for name in re.findall(r"(?<![:\w])voxbus_[a-z0-9_]+", expr):
            named.setdefault(name, where)
    assert named, "no voxbus metric named in the dashboard or the rules"
    missing = {name: where for name, where in named.items() if name not in defined}
    assert not missing, f"metrics named but defined nowhere (name: first panel/rule): {missing}"


def test_dashboard_and_provisioning_fit_together() -> None:
    dash = _dashboard()
    variables = {v["name"] for v in dash["templating"]["list"]}
    builtin = {"__rate_interval", "__interval", "__range"}
    for title, expr in dashboard_queries():
        used = set(re.findall(r"\$\{?(\w+)", expr))
        assert used <= variables | builtin, f"{title!r} uses unknown variables {used - variables - builtin}"
    titles = [t for t, _ in dashboard_queries()]
    for core in CORE_PANELS:
        assert core in titles, f"core panel {core!r} is missing from the dashboard"

    ds = yaml.safe_load((PROVISIONING / "datasources" / "voxbus.yml").read_text(encoding="utf-8"))
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus"
    ds_var = next(v for v in dash["templating"]["list"] if v["type"] == "datasource")
    assert ds_var["current"]["value"] == source["uid"], "the dashboard's default datasource is not the provisioned one"
    prov = yaml.safe_load((PROVISIONING / "dashboards" / "voxbus.yml").read_text(encoding="utf-8"))
    (provider,) = prov["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


# ------------------------------------------------------------------ end to end


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _voxbus_command() -> list[str]:
    script = Path(sys.executable).with_name("voxbus")
    return [str(script)] if script.exists() else [sys.executable, "-m", "shared.cli"]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")[-n:]
        except OSError:
            return ""


class Procs:
    """Processes this test started; stopped (TERM, then KILL) at teardown, each by its own pid."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log = self.tmp / f"{name}.log"
        with log.open("wb") as fh:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                     cwd=ROOT, env=env)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def check_alive(self) -> None:
        for p in self.procs:
            if p.popen.poll() is not None:
                pytest.fail(f"{p.name} exited with {p.popen.returncode}:\n{p.tail()}")

    def stop(self) -> None:
        for p in self.procs:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(timeout=5)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    ps = Procs(tmp_path)
    try:
        yield ps
    finally:
        ps.stop()


class PromApi:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> dict[str, Any]:
        url = f"{self.base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:  # 400 / 422 carry the PromQL error as JSON
            return json.loads(exc.read() or b"{}") or {"status": "error", "error": str(exc)}

    def query(self, expr: str) -> dict[str, Any]:
        return self.get("/api/v1/query", query=expr)

    def vector(self, expr: str) -> list[dict[str, Any]]:
        res = self.query(expr)
        assert res.get("status") == "success", f"{expr}: {res}"
        return res["data"]["result"]

    def value(self, expr: str) -> float | None:
        """The single value of `expr` (None when the result is empty)."""
        result = self.vector(expr)
        assert len(result) <= 1, f"{expr}: expected at most one series, got {result}"
        return float(result[0]["value"][1]) if result else None

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False


def _test_config(tmp: Path, exporter_port: int, worker_port: int) -> Path:
    """The repository's scrape config at 1 s intervals, its targets replaced by this test's processes."""
    cfg = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    jobs = {sc["job_name"]: sc for sc in cfg["scrape_configs"]}
    assert set(JOBS) <= set(jobs), f"ops/prometheus/prometheus.yml lacks jobs {set(JOBS) - set(jobs)}"
    assert [str((CONFIG.parent / f).resolve()) for f in cfg["rule_files"]] == [str(RULES.resolve())]
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(RULES)]
    targets = {"voxbus-exporter": [f"127.0.0.1:{exporter_port}"], "voxbus-workers": [f"127.0.0.1:{worker_port}"],
               "voxbus-bridges": []}
    for name, sc in jobs.items():
        sc.pop("file_sd_configs", None)
        sc["static_configs"] = [{"targets": targets.get(name, [])}]
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def _pools_file(tmp: Path, work: str, backlog: str) -> Path:
    path = tmp / "pools.toml"
    path.write_text(
        f'[pools."{work}"]\nstage = "llm"\nengine = "synthetic"\ngpu_type = "cpu"\nslots = 2\nmax_deliveries = 1\n'
        'options = { step_ms = 1.0, tokens = 5 }\n\n'
        f'[pools."{backlog}"]\nstage = "llm"\nengine = "synthetic"\ngpu_type = "h100"\nslots = 4\n',
        encoding="utf-8",
    )
    return path


async def _group_info(redis: aioredis.Redis, pool: str) -> dict[str, int] | None:
    """What Redis itself says about a pool's stream: XLEN, the group's lag and pending, DLQ XLEN.

    None while the pool's consumer group does not exist yet.
    """
    try:
        groups = await redis.xinfo_groups(Keys.pool_jobs(pool))
    except ResponseError:  # no stream yet
        return None
    info = next((g for g in groups if (g["name"].decode() if isinstance(g["name"], bytes) else g["name"]) == pool), None)
    if info is None:
        return None
    lag = info.get("lag")
    if lag is None:  # Redis 6.2 has no `lag` in XINFO GROUPS: count what follows the last delivered id
        last = info["last-delivered-id"]
        last = last.decode() if isinstance(last, bytes) else last
        lag = len(await redis.xrange(Keys.pool_jobs(pool), f"({last}", "+"))
    return {"length": await redis.xlen(Keys.pool_jobs(pool)), "lag": int(lag),
            "pending": int(info["pending"]), "dlq": await redis.xlen(Keys.pool_dlq(pool))}


async def _wait_for(
    what: str, check: Callable[[], Any], procs: Procs, deadline: float, describe: Callable[[], Any] | None = None
) -> None:
    """Poll `check()` (sync or async) until true; at the deadline fail with `describe()` and the logs."""
    while True:
        procs.check_alive()
        ok = check()
        if asyncio.iscoroutine(ok):
            ok = await ok
        if ok:
            return
        if time.monotonic() > deadline:
            seen = describe() if describe else ""
            if asyncio.iscoroutine(seen):
                seen = await seen
            logs = "\n".join(f"--- {p.name}:\n{p.tail(1500)}" for p in procs.procs)
            pytest.fail(f"gave up waiting for {what}. Seen: {seen}\n{logs}")
        await asyncio.sleep(0.3)


def _exporter_samples(port: int) -> dict[tuple[str, str], float]:
    """(metric name, pool) -> value, read from the exporter's own /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if "pool" in s.labels and "state" not in s.labels:
                out[(s.name, s.labels["pool"])] = s.value
    return out


def _substitute(expr: str, pools: list[str]) -> str:
    """Grafana's variables as the dashboard would send them with this test's pools selected."""
    values = {"pool": "|".join(pools), "gpu_type": ".*", "__rate_interval": RATE_INTERVAL, "__interval": "1s",
              "__range": "1m"}
    out = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], expr)
    assert "$" not in out, out
    return out


@needs_prometheus
async def test_real_prometheus_scrapes_exporter_and_worker(
    tmp_path: Path, procs: Procs, redis: aioredis.Redis, redis_url: str, uid: str
) -> None:
    deadline = time.monotonic() + 45
    work, backlog = f"obs-work-{uid}", f"obs-backlog-{uid}"
    pools = [work, backlog]
    exporter_port, worker_port, prom_port = _free_port(), _free_port(), _free_port()
    pools_file = _pools_file(tmp_path, work, backlog)
    prom_cfg = _test_config(tmp_path, exporter_port, worker_port)
    check = await asyncio.create_subprocess_exec(str(PROMTOOL), "check", "config", str(prom_cfg),
                                                 stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await check.communicate()
    assert check.returncode == 0, out.decode()

    env = {**os.environ, "REDIS_URL": redis_url}
    voxbus = _voxbus_command()
    try:
        procs.start("prometheus", [
            str(PROMETHEUS), f"--config.file={prom_cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn",
        ])
        procs.start("exporter", [*voxbus, "exporter", "--pools", str(pools_file), "--port", str(exporter_port),
                                 "--interval", "0.5"], env)
        procs.start("worker", [*voxbus, "worker", "--pool", work, "--pools", str(pools_file),
                               "--metrics-port", str(worker_port), "--drain-timeout", "2"], env)

        # The backlog: jobs on a pool with no worker; a ghost consumer holds two of them unacked.
        for i in range(BACKLOG_JOBS):
            await enqueue(redis, backlog, LlmJob(session=f"obs-{uid}-b{i}", turn=0))
        await redis.xgroup_create(Keys.pool_jobs(backlog), Keys.pool_group(backlog), id="0", mkstream=True)
        await redis.xreadgroup(Keys.pool_group(backlog), f"ghost-{uid}", {Keys.pool_jobs(backlog): ">"},
                               count=GHOST_READS)
        # Work for the live worker: three replies, and one job with no context that fails at once
        # (max_deliveries = 1: dead-lettered on its first failure).
        for i in range(GOOD_JOBS):
            sid = f"obs-{uid}-w{i}"
            await redis.rpush(Keys.ctx(sid), encode(ChatMessage(session=sid, role="user", text="hi", turn=0)))
            await enqueue(redis, work, LlmJob(session=sid, turn=0, max_tokens=5))
        for i in range(BAD_JOBS):  # a real session whose context has no user message: the LLM stage fails it
            bad = f"obs-{uid}-x{i}"
            await redis.rpush(Keys.ctx(bad), encode(ChatMessage(session=bad, role="system", text="be brief", turn=0)))
            await enqueue(redis, work, LlmJob(session=bad, turn=0))

        async def work_done() -> bool:
            g = await _group_info(redis, work)
            return g is not None and g["lag"] == 0 and g["pending"] == 0 and g["dlq"] == BAD_JOBS

        await _wait_for("the worker to process its jobs", work_done, procs, deadline,
                        lambda: _group_info(redis, work))

        prom = PromApi(prom_port)
        await _wait_for("Prometheus to be ready", prom.ready, procs, deadline)
        done_sel = f'voxbus_jobs_total{{pool="{work}", outcome="done"}}'
        lag_sel = f'voxbus_pool_lag{{pool="{backlog}"}}'
        ready_checks = {
            "exporter target up": 'up{job="voxbus-exporter"} == 1',
            "worker target up": 'up{job="voxbus-workers"} == 1',
            "3+ exporter scrapes with the backlog": f"count_over_time({lag_sel}[1m]) >= 3",
            "3+ worker scrapes with the done jobs": f"count_over_time({done_sel}[1m]) >= 3",
            "the final backlog lag scraped": f"{lag_sel} == {BACKLOG_JOBS - GHOST_READS}",
            "the final DLQ length scraped": f'voxbus_pool_dlq_length{{pool="{work}"}} == {BAD_JOBS}',
            "the live worker counted": f'voxbus_pool_workers{{pool="{work}"}} == 1',
            "the done jobs scraped": f"{done_sel} == {GOOD_JOBS}",
        }
        for what, expr in ready_checks.items():
            await _wait_for(what, lambda e=expr: bool(prom.vector(e)), procs, deadline,
                            lambda: prom.get("/api/v1/targets")["data"]["activeTargets"])

        # --- the exporter's figures are Redis's figures, in the exporter and in Prometheus
        exported = _exporter_samples(exporter_port)
        for pool in pools:
            truth = await _group_info(redis, pool)
            assert truth is not None
            for key, metric in (("length", "voxbus_pool_stream_length"), ("lag", "voxbus_pool_lag"),
                                ("pending", "voxbus_pool_pending"), ("dlq", "voxbus_pool_dlq_length")):
                assert exported[(metric, pool)] == truth[key], f"{metric}{{pool={pool}}} vs Redis {truth}"
                assert prom.value(f'{metric}{{pool="{pool}"}}') == truth[key], f"{metric} in Prometheus vs {truth}"
        assert await _group_info(redis, backlog) == {
            "length": BACKLOG_JOBS, "lag": BACKLOG_JOBS - GHOST_READS, "pending": GHOST_READS, "dlq": 0}
        assert prom.value(f'voxbus_pool_oldest_pending_seconds{{pool="{backlog}"}}') > 0
        assert prom.value(f'voxbus_pool_workers{{pool="{backlog}"}}') == 0
        assert prom.value(f'voxbus_pool_slots{{pool="{work}", state="total"}}') == 2
        assert prom.value(f'voxbus_pool_slots{{pool="{backlog}", gpu_type="h100", state="total"}}') == 0
        # the worker's own process metrics
        assert prom.value(f'voxbus_worker_slots_total{{pool="{work}"}}') == 2
        assert prom.value(f'voxbus_jobs_total{{pool="{work}", outcome="failed"}}') == BAD_JOBS
        assert prom.value(f'voxbus_jobs_total{{pool="{work}", outcome="dead_lettered"}}') == BAD_JOBS

        # --- every dashboard query runs; the core panels show this test's pools
        errors: list[str] = []
        empty: list[str] = []
        for title, raw in dashboard_queries():
            expr = _substitute(raw, pools)
            res = prom.query(expr)
            if res.get("status") != "success":
                errors.append(f"{title}: {expr}: {res.get('error')}")
            elif title in CORE_PANELS and not res["data"]["result"]:
                empty.append(f"{title}: {expr}")
        assert not errors, "dashboard queries failed:\n" + "\n".join(errors)
        assert not empty, "core panels without data:\n" + "\n".join(empty)
        lag_panel = prom.vector(_substitute(dict(dashboard_queries())["Lag per pool (jobs not yet delivered)"], pools))
        assert {r["metric"]["pool"]: float(r["value"][1]) for r in lag_panel} == {
            work: 0.0, backlog: float(BACKLOG_JOBS - GHOST_READS)}

        # --- every rule expression runs, and Prometheus evaluated each rule without error
        for name, expr in rule_queries():
            res = prom.query(expr)
            assert res.get("status") == "success", f"rule {name}: {expr}: {res.get('error')}"
        no_workers = dict(rule_queries())["VoxbusNoWorkers"]
        firing = {r["metric"]["pool"] for r in prom.vector(no_workers) if r["metric"]["pool"] in pools}
        assert firing == {backlog}, f"VoxbusNoWorkers should hold for the pool with work and no worker only: {firing}"

        def rules_evaluated() -> bool:
            groups = prom.get("/api/v1/rules")["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            return len(rules) == len(rule_queries()) and all(r.get("health") == "ok" for r in rules)

        await _wait_for("every rule evaluated", rules_evaluated, procs, deadline,
                        lambda: [(r["name"], r.get("health"), r.get("lastError"))
                                 for g in prom.get("/api/v1/rules")["data"]["groups"] for r in g["rules"]])
    finally:
        procs.stop()
        await redis.srem(Keys.POOLS, *pools)
        stale = [k async for k in redis.scan_iter(match=f"*{uid}*", count=1000)]
        if stale:
            await redis.delete(*stale)

