"""One way to reach a URI: a local path, ``file://`` or ``s3://`` (through s3fs), with per-section options.

Credentials come from the job file's ``storage_options`` or, when absent, from the usual AWS environment
variables (botocore reads them). They are held as ``SecretStr`` so that no repr, log line or error prints them.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from typing import Any

import fsspec
from pydantic import BaseModel, ConfigDict, Field, SecretStr

logger = logging.getLogger(__name__)


class StorageOptions(BaseModel):
    """Options for ``s3://`` URIs; ignored for local paths."""

    model_config = ConfigDict(extra="forbid")

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://127.0.0.1:8333")
    key: SecretStr | None = Field(None, description="access key id (default: AWS_ACCESS_KEY_ID)")
    secret: SecretStr | None = Field(None, description="secret access key (default: AWS_SECRET_ACCESS_KEY)")
    region: str | None = Field(None, description="region name (default: AWS_DEFAULT_REGION)")
    token: SecretStr | None = Field(None, description="session token (default: AWS_SESSION_TOKEN)")
    anon: bool = Field(False, description="anonymous access to a public bucket")

    def with_env_defaults(self) -> "StorageOptions":
        """Fill unset fields from the usual AWS env vars, on the driver, so remote workers need no env of their own."""
        env = os.environ
        updates: dict[str, Any] = {}
        if self.endpoint_url is None and (env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")):
            updates["endpoint_url"] = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        if self.region is None and (env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")):
            updates["region"] = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        if not self.anon:
            for name, var in (("key", "AWS_ACCESS_KEY_ID"), ("secret", "AWS_SECRET_ACCESS_KEY"), ("token", "AWS_SESSION_TOKEN")):
                if getattr(self, name) is None and env.get(var):
                    updates[name] = SecretStr(env[var])
        return self.model_copy(update=updates)

    def fsspec_kwargs(self, protocol: str) -> dict[str, Any]:
        if protocol not in ("s3", "s3a"):
            return {}
        _log_s3_retries()
        # Each request: a bounded, logged retry (botocore's standard mode: 3 attempts with jittered backoff and
        # a retry quota that stops retrying a store that keeps failing) and a connect timeout, so a store that
        # does not answer fails a step in seconds; the step's own retries (Prefect's, logged) ride out longer
        # outages, and a run whose store stays away stops with StorageUnavailable.
        kwargs: dict[str, Any] = {"config_kwargs": {"connect_timeout": S3_CONNECT_TIMEOUT_S, "read_timeout": 60,
                                                    "retries": {"mode": "standard", "total_max_attempts": S3_ATTEMPTS}}}
        client_kwargs: dict[str, Any] = {}
        if self.endpoint_url:
            client_kwargs["endpoint_url"] = self.endpoint_url
        if self.region:
            client_kwargs["region_name"] = self.region
        if client_kwargs:
            kwargs["client_kwargs"] = client_kwargs
        if self.key is not None:
            kwargs["key"] = self.key.get_secret_value()
        if self.secret is not None:
            kwargs["secret"] = self.secret.get_secret_value()
        if self.token is not None:
            kwargs["token"] = self.token.get_secret_value()
        if self.anon:
            kwargs["anon"] = True
        return kwargs


class StorageError(RuntimeError):
    """A URI could not be reached: bad scheme, missing bucket, wrong credentials."""


class StorageUnavailable(RuntimeError):
    """The object store did not answer (refused, timed out, reset) after every retry: not the job's fault and
    not fixed by waiting longer inside this run; a re-run once it is back resumes from what was written."""


S3_ATTEMPTS = 3
S3_CONNECT_TIMEOUT_S = 5
# What a store that did not answer raises, from botocore/aiobotocore/aiohttp and Python itself (by name, so
# that none of them has to be imported here); a store that answered "no" (403, 404) is not among them.
_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                "ClientConnectorError", "ServerDisconnectedError", "ServerTimeoutError"}


def unreachable(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) says the store did not answer at all."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current).__name__ in _UNREACHABLE or isinstance(current, (ConnectionError, TimeoutError)):
            return True
        current = current.__cause__ or current.__context__
    return False


def transient(uri: str, exc: BaseException) -> bool:
    """True when reading ``uri`` failed because of the store, not the file: it did not answer, or (an object
    store) answered with an I/O error other than "forbidden" or "not found". Such a read is retried, and
    never taken for a corrupt file (which would quarantine a shard's rows as one unreadable entry)."""
    if unreachable(exc):
        return True
    return (protocol_of(uri) in ("s3", "s3a") and isinstance(exc, OSError)
            and not isinstance(exc, (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError)))


class _RetryLog(logging.Handler):
    """botocore logs its retries at DEBUG, which nobody sees: they come out here as warnings instead."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Retry needed, retrying request after delay of"):
            logger.warning("an S3 request did not go through; retrying it in %s s (at most %d attempts, %d s connect "
                           "timeout)", message.rsplit(":", 1)[-1].strip()[:5], S3_ATTEMPTS, S3_CONNECT_TIMEOUT_S)
        elif message.startswith(("Max attempts", "Retry needed but retry quota reached")):
            logger.warning("an S3 request failed: %s", message)


def _log_s3_retries() -> None:
    """Route botocore's retry decisions (and only those) to this module's log, once per process."""
    retries = logging.getLogger("botocore.retries.standard")
    if not any(isinstance(h, _RetryLog) for h in retries.handlers):
        retries.addHandler(_RetryLog())
        retries.setLevel(logging.DEBUG)
        retries.propagate = False  # its other DEBUG lines stay out of the application's handlers


def protocol_of(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


def filesystem(uri: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it (no scheme)."""
    options = options or StorageOptions()
    protocol = protocol_of(uri)
    if protocol not in ("file", "local", "s3", "s3a"):
        raise StorageError(f"unsupported URI scheme {protocol!r} in {uri!r}: use a local path, file:// or s3://")
    try:
        fs, path = fsspec.core.url_to_fs(uri, **options.fsspec_kwargs(protocol))
    except Exception as exc:
        raise StorageError(f"cannot open {uri!r}: {type(exc).__name__}: {exc}") from None
    return fs, path


def join(uri: str, *parts: str) -> str:
    """Join URI parts with '/', keeping the scheme."""
    base = uri.rstrip("/")
    return "/".join([base, *(p.strip("/") for p in parts)])


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A URI for ``path`` inside ``fs`` that :func:`filesystem` can open again."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return path
    return f"{protocol}://{path}"


def write_local_atomic(path: str | os.PathLike[str], payload: bytes) -> None:
    """Replace a local file with ``payload`` so that a reader, or a power cut, sees the old content or the new,
    never a torn or empty file: a temporary file of this writer's own (two writers never share one), flushed
    and fsynced, renamed over the target, and the folder fsynced so the rename itself is on disk."""
    target = os.fspath(path)
    folder = os.path.dirname(target) or "."
    tmp = f"{target}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(uri: str, data: Any, options: StorageOptions | None = None) -> None:
    """Write a small JSON document in one PUT (atomic on S3) or with :func:`write_local_atomic` on local disks,
    so a manifest or marker is never left empty or half-written for the next run to trust."""
    fs, path = filesystem(uri, options)
    payload = json.dumps(data, indent=2, sort_keys=True, default=str).encode()
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    if protocol_of(uri) in ("file", "local"):
        write_local_atomic(path, payload)
    else:
        fs.pipe_file(path, payload)


def read_json(uri: str, options: StorageOptions | None = None) -> Any | None:
    """Read a JSON document, or ``None`` when it does not exist."""
    fs, path = filesystem(uri, options)
    try:
        # one GET (fs.open would HEAD first, then GET on that ETag: a document replaced in between, such as
        # a lease being renewed, would fail with FileExpired instead of reading the newer version)
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


# --- conditional writes on object stores (the job lease) ----------------------------------------------------

_PRECONDITION_CODES = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")
_CONDITIONAL: dict[tuple[str, str], bool] = {}  # (endpoint, bucket) -> whether the store honours If-Match


def _precondition_failed(exc: BaseException) -> bool:
    """Whether an s3fs error is a refused condition (If-Match / If-None-Match), not a real failure."""
    if isinstance(exc, FileExistsError):
        return True
    cause = getattr(exc, "__cause__", None)
    code = str(getattr(cause, "response", {}).get("Error", {}).get("Code", ""))
    return code in _PRECONDITION_CODES


def read_json_tagged(uri: str, options: StorageOptions | None = None) -> tuple[Any | None, str | None]:
    """An ``s3://`` JSON document and its ETag from one GET (``(None, None)`` when it does not exist), so a
    conditional write can name exactly the version that was read."""
    from fsspec.asyn import sync

    fs, path = filesystem(uri, options)
    bucket, key, _ = fs.split_path(path)

    async def get() -> tuple[Any | None, str | None]:
        try:
            answer = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return None, None
        body = await answer["Body"].read()
        return json.loads(body), answer["ETag"]

    return sync(fs.loop, get)


def put_json_if(uri: str, data: Any, etag: str | None, options: StorageOptions | None = None) -> str | None:
    """Write an ``s3://`` JSON document only if it still is the version ``etag`` names (``If-Match``), or, with
    ``etag=None``, only if it does not exist (``If-None-Match: *``). Returns the new ETag, or None when the
    store refused because someone else wrote first."""
    from fsspec.asyn import sync

    fs, path = filesystem(uri, options)
    bucket, key, _ = fs.split_path(path)
    condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
    payload = json.dumps(data, indent=2, sort_keys=True, default=str).encode()

    async def put() -> str | None:
        try:
            answer = await fs._call_s3("put_object", Bucket=bucket, Key=key, Body=payload, **condition)
        except Exception as exc:
            if _precondition_failed(exc):
                return None
            raise
        return answer["ETag"]

    try:
        return sync(fs.loop, put)
    finally:
        fs.invalidate_cache(path)


def conditional_writes(uri: str, options: StorageOptions | None = None) -> bool:
    """Whether the object store behind ``uri`` honours ``If-Match`` on PUT: probed once per endpoint and bucket
    with a write that must be refused (a store that ignores the header would accept it). Local paths: False
    (they use ``flock``)."""
    if protocol_of(uri) in ("file", "local"):
        return False
    fs, path = filesystem(uri, options)
    bucket = fs.split_path(path)[0]
    endpoint = (options or StorageOptions()).endpoint_url or ""
    if (endpoint, bucket) not in _CONDITIONAL:
        probe = f"s3://{bucket}/.reembed-conditional-write-probe"
        try:
            etag = put_json_if(probe, {"probe": uuid.uuid4().hex}, None, options) or read_json_tagged(probe, options)[1]
            never = '"00000000000000000000000000000000"'  # an ETag no write has: a store that honours If-Match refuses
            honoured = etag is not None and put_json_if(probe, {"probe": "must be refused"}, never, options) is None
        except Exception as exc:  # a store that rejects the headers outright: no conditional writes
            logger.info("conditional writes unavailable on %s (%s): the lease writes, settles and reads back",
                        bucket, exc)
            honoured = False
        _CONDITIONAL[(endpoint, bucket)] = honoured
        logger.info("conditional writes (If-Match) on %s%s: %s", endpoint and f"{endpoint}/", bucket,
                    "honoured" if honoured else "not honoured")
    return _CONDITIONAL[(endpoint, bucket)]
