"""Where recordings go when calls end: one object per session, in a directory or in S3-compatible storage.

`open_archive(url)` picks the target by URL, one class per target behind one
small interface (`Archive`): named blobs that are written whole or not at all,
read by name, tested for existence and listed by prefix.

- `file:///abs/dir` or a plain path: `FileArchive`. A blob is written to a
  temporary file in the same directory, fsynced, then renamed over its name
  (and the directory fsynced), so a crash leaves the old blob or the new one,
  never half of one.
- `s3://bucket/prefix`: `S3Archive`, with boto3 (the `archive` extra). The
  credentials, the region and the endpoint come from the environment and the
  AWS config files as boto3 reads them (`AWS_ACCESS_KEY_ID`, `AWS_REGION`,
  `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` for MinIO, Ceph or any other
  S3-compatible server). A PUT is atomic by S3's own contract.

On top of the blobs `Archive` keeps this layout (under the prefix):

    <sid>.vbrec                  the recording (shared.admin.recording's format, compressed)
    index/<rank>-<sid>.json      its summary; rank = 10^13 - start time in ms, so names sort newest first

Finding a session by id is one GET (the name is the id), with no listing;
`list(n)` (for `voxbus sessions`) is one LIST of the index plus n small GETs.
Writing the same session again replaces both objects (same names), so a
re-run of an interrupted archiving never leaves two copies.

Every method blocks (disk, HTTP): call them through `asyncio.to_thread`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import unquote

from ..config import ARCHIVE_URL_ENV, ConfigError, archive_url_problem
from ..protocol import validate_session_id

RECORDING_SUFFIX = ".vbrec"
INDEX_DIR = "index"
_RANK_BASE = 10**13  # ms; start times up to the year 2286 keep 13 digits
T = TypeVar("T")


class ArchiveError(RuntimeError):
    """The archive could not be reached, written or read (the message says which and why)."""


class Archive:
    """A target: subclasses implement the four blob operations; names are relative to the target's root."""

    url: str = ""

    # ------------------------------------------------------------------ blobs (per target)
    def put_blob(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def get_blob(self, name: str) -> bytes | None:
        """The blob, or None when there is none of that name."""
        raise NotImplementedError

    def has_blob(self, name: str) -> bool:
        raise NotImplementedError

    def list_blobs(self, prefix: str, limit: int) -> list[str]:
        """Up to `limit` names that start with `prefix`, in ascending order."""
        raise NotImplementedError

    # ------------------------------------------------------------------ sessions
    def put(self, sid: str, data: bytes, summary: dict[str, Any] | None = None) -> None:
        """Store a session's recording (and its summary for `list`): the recording first, so an index
        entry never names a recording that is not there."""
        self.put_blob(recording_name(sid), data)
        if summary is not None:
            body = json.dumps({**summary, "session": sid, "bytes": len(data)}, sort_keys=True).encode()
            self.put_blob(index_name(sid, float(summary.get("started") or 0.0)), body)

    def get(self, sid: str) -> bytes | None:
        """The session's recording file (compressed), or None when the archive has none."""
        return self.get_blob(recording_name(sid))

    def exists(self, sid: str) -> bool:
        return self.has_blob(recording_name(sid))

    def list(self, limit: int) -> list[dict[str, Any]]:
        """Summaries of the `limit` newest archived sessions, newest first."""
        rows = []
        for name in self.list_blobs(f"{INDEX_DIR}/", limit):
            body = self.get_blob(name)
            if body is None:
                continue
            try:
                row = json.loads(body)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows


def recording_name(sid: str) -> str:
    return validate_session_id(sid) + RECORDING_SUFFIX


def index_name(sid: str, started: float) -> str:
    rank = max(0, _RANK_BASE - int(started * 1000))
    return f"{INDEX_DIR}/{rank:013d}-{validate_session_id(sid)}.json"


# ---------------------------------------------------------------------------------- local directory

class FileArchive(Archive):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self.url = self.root.as_uri()

    def _path(self, name: str) -> Path:
        return self.root / name

    def put_blob(self, name: str, data: bytes) -> None:
        path = self._path(name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            # The rename is durable only once the directory entry is on disk too.
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise ArchiveError(f"{self.url}: cannot write {name}: {exc.strerror or exc}") from None

    def get_blob(self, name: str) -> bytes | None:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ArchiveError(f"{self.url}: cannot read {name}: {exc.strerror or exc}") from None

    def has_blob(self, name: str) -> bool:
        return self._path(name).is_file()

    def list_blobs(self, prefix: str, limit: int) -> list[str]:
        folder, _, start = prefix.rpartition("/")
        try:
            names = sorted(e.name for e in os.scandir(self._path(folder))
                           if e.is_file() and e.name.startswith(start) and not e.name.startswith("."))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ArchiveError(f"{self.url}: cannot list {folder or '.'}: {exc.strerror or exc}") from None
        return [f"{folder}/{n}" if folder else n for n in names[:limit]]


# ---------------------------------------------------------------------------------- S3-compatible

class S3Archive(Archive):
    def __init__(self, bucket: str, prefix: str = "", client: Any | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                import boto3
                from botocore.config import Config as BotoConfig
            except ImportError:
                raise ArchiveError(f"{self.url}: S3 archives need boto3 (pip install 'voxbus[archive]')") from None
            # A session of its own: boto3's default session is not thread-safe, clients are.
            self._client = boto3.session.Session().client(
                "s3", config=BotoConfig(retries={"mode": "standard", "max_attempts": 5}))
        return self._client

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _fail(self, what: str, name: str, exc: Exception) -> ArchiveError:
        return ArchiveError(f"{self.url}: cannot {what} {name}: {type(exc).__name__}: {exc}")

    def put_blob(self, name: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)
        except ArchiveError:
            raise
        except Exception as exc:  # botocore's errors share no base class with its connection errors
            raise self._fail("write", name, exc) from None

    def _unless_missing(self, what: str, name: str, call: Callable[[], T], missing: T) -> T:
        """`call()`, or `missing` where S3 says there is no such object; any other failure is an ArchiveError."""
        try:
            return call()
        except ArchiveError:
            raise
        except Exception as exc:
            if _not_found(exc):
                return missing
            raise self._fail(what, name, exc) from None

    def get_blob(self, name: str) -> bytes | None:
        def read() -> bytes | None:
            return cast(bytes, self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read())

        return self._unless_missing("read", name, read, None)

    def has_blob(self, name: str) -> bool:
        def head() -> bool:
            self.client.head_object(Bucket=self.bucket, Key=self._key(name))
            return True

        return self._unless_missing("look up", name, head, False)

    def list_blobs(self, prefix: str, limit: int) -> list[str]:
        try:
            reply = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._key(prefix), MaxKeys=max(1, limit))
        except ArchiveError:
            raise
        except Exception as exc:
            raise self._fail("list", prefix, exc) from None
        cut = len(self.prefix) + 1 if self.prefix else 0
        return [str(item["Key"])[cut:] for item in reply.get("Contents", [])][:limit]


def _not_found(exc: Exception) -> bool:
    response = getattr(exc, "response", None)
    code = str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
    return code in ("404", "NoSuchKey", "NotFound")


# ---------------------------------------------------------------------------------- by URL

def open_archive(url: str) -> Archive:
    """The target an archive URL names (see the module docstring); ConfigError for a URL that names none."""
    if not url:
        raise ConfigError("no archive URL given")
    if problem := archive_url_problem(url):
        raise ConfigError(f"archive URL: {problem}")
    scheme, sep, rest = url.partition("://")
    if not sep:
        return FileArchive(Path(url).expanduser())
    if scheme == "file":
        return FileArchive(Path(unquote(rest)))
    bucket, _, prefix = rest.partition("/")
    return S3Archive(bucket, prefix)


def default_archive_url() -> str:
    """$VOXBUS_ARCHIVE_URL, else the pools file's [bridge] archive_url, else "" (no archive)."""
    if url := os.environ.get(ARCHIVE_URL_ENV):
        return url
    from ..config import load_config

    try:
        return load_config().bridge.archive_url
    except ConfigError:
        return ""
