"""The object-store backends: S3 (``s3://``) and GCS (``gs://``).

Small objects, listing, deletion and COMMIT go through fsspec (s3fs, gcsfs); array chunks go
through TensorStore's ``s3`` and ``gcs`` kvstore drivers with the spec from `kvstore_spec`,
on the very same objects. COMMIT uses a real precondition: S3 ``If-None-Match: *`` and GCS
``ifGenerationMatch=0`` (fsspec's ``mode="create"``), so exactly one creator wins.

Each store is opened with its own frozen `ObjectSettings` (endpoint, region, credentials,
retries, deadlines), resolved from `configure` and the usual environment
(``ckpt.storage._settings``).

Both libraries retry transient failures (5xx, resets, timeouts) with backoff, each request
``max_retries`` times at most: TensorStore through its retry policy, botocore through its
``max_attempts``, gcsfs through its request wrapper. s3fs's own retry loop, which would run
botocore's whole budget again for every try of its own, is turned off, so one request that
is never answered costs at most ``(max_retries + 1) * request_timeout_s`` plus the backoff.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import importlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

import tensorstore as ts

from ckpt.storage._base import Keys, Store, shared_context
from ckpt.storage._errors import (
    AccessDeniedError,
    BucketNotFoundError,
    MissingDependencyError,
    ObjectNotFoundError,
    StorageError,
    causes,
)
from ckpt.storage._settings import ObjectSettings, publish_for_tensorstore, resolve

_verified: set[tuple[ObjectSettings, str]] = set()
# Part size of streamed uploads (S3 allows 5 MiB to 5 GiB per part, 10000 parts).
STREAM_PART_BYTES = 16 << 20
CONFLICT_RETRIES = 6
log = logging.getLogger("ckpt.storage")


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status of a client error, from the structured response the client attached
    (botocore's ``response``, gcsfs's ``code``), following ``__cause__``; None if none."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 4:
        response = getattr(cur, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(status, int):
                return status
        code = getattr(cur, "code", None)
        if isinstance(code, int) and 100 <= code < 600:
            return code
        cur, seen = cur.__cause__, seen + 1
    return None


# The fsspec client each scheme needs, and the extra of this distribution that installs it.
_CLIENTS = {"s3": ("s3fs", "s3"), "gs": ("gcsfs", "gcs")}


def _client_module(scheme: str) -> Any:
    """The client package for ``scheme``, or one line saying which extra installs it."""
    module, extra = _CLIENTS[scheme]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{scheme}:// URLs need the {module} package, which is not installed: "
            f"pip install 'shardckpt[{extra}]'") from exc


def _filesystem(s: ObjectSettings) -> Any:
    """The fsspec filesystem for one store's settings (a new client per store)."""
    if s.scheme == "s3":
        s3fs = _client_module("s3")
        kwargs: dict[str, Any] = {
            "anon": s.anonymous, "use_listings_cache": False,
            "client_kwargs": {"region_name": s.region},
            "config_kwargs": {"retries": {"max_attempts": s.max_retries + 1,
                                          "mode": "standard"},
                              "connect_timeout": 10, "read_timeout": s.request_timeout_s},
        }
        if s.endpoint_url:
            kwargs["client_kwargs"]["endpoint_url"] = s.endpoint_url
        if s.profile:
            kwargs["profile"] = s.profile
        fs = s3fs.S3FileSystem(**kwargs)
        # One retry layer (botocore's): s3fs would otherwise repeat botocore's whole
        # budget five times over (a never-answering server: 20 timeouts per call).
        fs.retries = 1
        return fs
    gcsfs = _client_module("gs")
    import aiohttp

    # gcsfs has no deadline unless given one. A read deadline, not a total one: a large
    # upload on a slow link may take longer.
    options: dict[str, Any] = {"use_listings_cache": False, "requests_timeout":
                               aiohttp.ClientTimeout(total=None, sock_connect=10,
                                                     sock_read=s.request_timeout_s)}
    anonymous = s.anonymous or (not s.endpoint_url and not _google_credentials_found())
    if anonymous:
        options["token"] = "anon"
    if s.endpoint_url or anonymous:
        # The plain client: gcsfs's default one asks a gRPC API for each bucket's type (an
        # HTTP emulator has none: every first access would stall for a minute), and with
        # no credentials the answer is an error, logged as a warning at every request.
        plain = importlib.import_module("gcsfs.core").GCSFileSystem
        if s.endpoint_url:
            options["endpoint_url"] = s.endpoint_url
        return _bounded_gcs(plain, s.max_retries + 1)(**options)
    return _bounded_gcs(gcsfs.GCSFileSystem, s.max_retries + 1)(**options)


# How long "no credentials" stands before it is looked for again: a credentials file mounted
# late, or a metadata server slow to answer at start-up, must not leave a whole run anonymous.
_ANONYMOUS_FOR_S = 60.0
_looked: dict[str, tuple[bool, float]] = {}
_looked_lock = threading.Lock()


def _google_credentials_found() -> bool:
    """Whether Google's Application Default Credentials exist (found: remembered for the
    process; not found: for `_ANONYMOUS_FOR_S`), asked at the opening of a gs:// store
    without an endpoint. Without them gcsfs would ask the GCE metadata server for a token
    five times with back-off (about 16 s, each failure logged) before it went on
    anonymously, which is where it ends anyway: ``google.auth.default`` decides the same in
    one bounded look (an environment variable, gcloud's file, one ping of the metadata
    server). A credentials file named by ``GOOGLE_APPLICATION_CREDENTIALS`` is never
    replaced by anonymous access: the client reads it, and says what is wrong with it."""
    if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
        return True
    with _looked_lock:
        found, at = _looked.get("adc", (False, -_ANONYMOUS_FOR_S))
        if found or time.monotonic() - at < _ANONYMOUS_FOR_S:
            return found
        auth = importlib.import_module("google.auth")
        try:
            auth.default()
        except auth.exceptions.DefaultCredentialsError:
            log.info("no Google credentials found: gs:// stores read and write anonymously "
                     "(public buckets only); looked for again in %.0f s", _ANONYMOUS_FOR_S)
            _looked["adc"] = (False, time.monotonic())
            return False
        _looked["adc"] = (True, time.monotonic())
        return True


# Tries of a request whose host name does not resolve. gcsfs retries it as any connection
# error (with back-off, ~4.5 min at the default max_retries); a name that does not resolve
# is nearly always a machine without the network or a wrong endpoint, so it is said soon.
_UNRESOLVED_TRIES = 3


def _unresolved(exc: BaseException) -> bool:
    """Whether ``exc`` (an aiohttp error) is a host name that does not resolve, whichever
    resolver aiohttp uses (the system's raises gaierror, aiodns a plain OSError); not a
    temporary failure of the resolver (EAI_AGAIN: a DNS server restarting), which is
    retried as any connection error."""
    cause = getattr(exc, "os_error", None)
    if isinstance(cause, socket.gaierror):
        return cause.errno != socket.EAI_AGAIN
    return type(exc).__name__ == "ClientConnectorDNSError"


def _quiet_gcsfs_retries(record: logging.LogRecord) -> bool:
    """gcsfs logs, with its traceback, the error of a request that ran out of tries and
    then raises it; the store reports that error once, naming the object, so the log
    record (shown on stderr by logging's last resort when the application configured no
    logging) only repeats it."""
    return not (record.funcName == "retry_request" and record.levelno >= logging.ERROR)


@functools.cache
def _bounded_gcs(base: type, tries: int) -> type:
    """``base`` (a gcsfs filesystem class) making each request at most ``tries`` times
    (``_UNRESOLVED_TRIES`` when the host name does not resolve): gcsfs wraps its one request
    method in a fixed six tries, timeouts included, whatever ``max_retries`` says."""
    retry = importlib.import_module("gcsfs.retry").retry_request
    once = base._request.__wrapped__  # type: ignore[attr-defined]
    failed_lookups: contextvars.ContextVar[int] = contextvars.ContextVar("lookups", default=0)
    logging.getLogger("gcsfs").addFilter(_quiet_gcsfs_retries)

    async def attempt(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await once(self, *args, **kwargs)
        except Exception as exc:
            if not _unresolved(exc):
                raise
            failed_lookups.set(failed_lookups.get() + 1)
            if failed_lookups.get() < min(tries, _UNRESOLVED_TRIES):
                raise
            # Not an exception gcsfs retries: the request ends here.
            raise ConnectionError(f"{exc} (the host name did not resolve "
                                  f"{failed_lookups.get()} times)") from exc

    retried = retry(retries=tries)(attempt)

    async def request(self: Any, *args: Any, **kwargs: Any) -> Any:
        failed_lookups.set(0)  # each request counts its own (one task per request)
        return await retried(self, *args, **kwargs)

    return type(f"{base.__name__}Tries{tries}", (base,),
                {"_request": request, "__module__": __name__})


# S3 error codes for a credential the server rejects or a permission it lacks.
_S3_DENIED = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                        "InvalidToken", "ExpiredToken", "AllAccessDisabled", "Forbidden"})
# botocore's exceptions for no usable credentials at all (named: botocore is optional).
_NO_CREDENTIALS = frozenset({"NoCredentialsError", "PartialCredentialsError"})


# botocore's request deadlines, which are not `TimeoutError`s (named: botocore is optional).
_CLIENT_TIMEOUTS = frozenset({"ReadTimeoutError", "ConnectTimeoutError"})


# What the clients raise when an answer's body ends before its length (named: optional).
_BODY_BROKE = frozenset({"ClientPayloadError", "ContentLengthError", "IncompleteRead",
                         "IncompleteReadError", "ResponseStreamingError"})


def _body_broke(exc: BaseException) -> bool:
    """Whether a read failed because the answer's body broke off (a dropped connection
    mid-transfer), not because the request failed or went unanswered."""
    return any(type(c).__name__ in _BODY_BROKE for c in causes(exc))


def _timed_out(exc: BaseException) -> bool:
    """Whether a client's error, through its chain of causes, is a request deadline that
    passed (aiohttp's and fsspec's are `TimeoutError`s, botocore's are named above)."""
    return any(isinstance(c, TimeoutError) or type(c).__name__ in _CLIENT_TIMEOUTS
               for c in causes(exc))


def client_error_kind(exc: BaseException) -> str | None:
    """What an object-store client's error means: ``denied`` (credentials missing, wrong or
    without permission), ``no-bucket``, or None (any other failure). Decided by type and
    status, through the chain of causes, since s3fs and gcsfs re-raise the server's answer
    as a built-in error (s3fs keeps botocore's error, with its code, as the cause)."""
    for current in causes(exc):
        if isinstance(current, PermissionError) or type(current).__name__ in _NO_CREDENTIALS:
            return "denied"
        response = getattr(current, "response", None)  # botocore's ClientError
        if isinstance(response, dict):
            code = (response.get("Error") or {}).get("Code")
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                return "no-bucket"
            if code in _S3_DENIED or status in (401, 403):
                return "denied"
        if type(current).__name__ == "HttpError" and getattr(current, "code", None) in (401, 403):
            return "denied"  # gcsfs's error for a status it has no built-in for
        if type(current) is OSError and str(current).startswith("Forbidden:"):
            return "denied"  # gcsfs answers a 403 with a bare OSError so worded, nothing else
    return None


def _google_credentials_exist() -> bool:
    """Whether TensorStore's lookup would find a credentials file (the places it looks)."""
    named = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    folder = os.environ.get("CLOUDSDK_CONFIG") or os.path.join(
        os.path.expanduser("~"), ".config", "gcloud")
    return any(p and os.path.isfile(p) for p in
               (named, os.path.join(folder, "application_default_credentials.json")))


def settle_google_credentials() -> None:
    """Has TensorStore look for Google credentials now, with its stderr line discarded.

    Called by the ``ckpt`` command, once, before any other work and while it is the only
    thread, when a ``gs://`` URL is among its arguments; not for library use (fd 2 is pointed
    at /dev/null for the moment of the lookup, which would swallow other threads' output).
    TensorStore looks for credentials at the first GCS request of a process and keeps what it
    found; with none (a public bucket read anonymously) it logs an error line, "Could not find
    the credentials file ...", and then goes on without, which is what the user wanted. That
    first request is made here, to a local port that refuses it. Nothing is done when an
    emulator is set (no lookup happens then) or a credentials file exists (nothing is logged).
    """
    if (resolve("gs").endpoint_url or "GOOGLE_AUTH_TOKEN_FOR_TESTING" in os.environ
            or _google_credentials_exist()):
        return
    import socket

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: a connection is refused
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = f"http://127.0.0.1:{closed.getsockname()[1]}"
        saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, 2)
            once = ts.Context({"gcs_request_retries": {"max_retries": 0}})
            store = ts.KvStore.open({"driver": "gcs", "bucket": "credential-lookup"},
                                    context=once).result(timeout=10)
            store.read("key").exception(timeout=10)
        except (TimeoutError, ValueError):
            pass  # the lookup happened or never will; either way the command goes on
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(null)
            del os.environ["TENSORSTORE_GCS_HTTP_URL"]


class ObjectStore(Store):
    """A bucket prefix on S3 or GCS (which one: ``location.scheme``)."""

    def __init__(self, location: Any) -> None:
        super().__init__(location)
        self.settings = resolve(location.scheme)
        self._fs = _filesystem(self.settings)

    @property
    def bucket(self) -> str:
        return self.location.bucket

    def _path(self, key: str) -> str:
        return "/".join(p for p in (self.location.bucket, self.location.path, key) if p)

    def _error(self, exc: BaseException, key: str, what: str) -> StorageError:
        """Maps an fsspec/botocore/gcsfs error to ours (`client_error_kind`), naming the
        bucket and object."""
        text = f"{type(exc).__name__}: {exc}".strip()
        kind = client_error_kind(exc)
        if kind == "denied":
            return AccessDeniedError(
                errno.EACCES, f"access to bucket {self.bucket!r} denied while {what} "
                f"{self.describe(key)}: credentials are missing, wrong or lack permission "
                f"({text[:300]})")
        if kind == "no-bucket":
            return BucketNotFoundError(errno.ENOENT, f"bucket {self.bucket!r} does not exist "
                                                     f"({what} {self.describe(key)})")
        if _timed_out(exc):
            tries = self.settings.max_retries + 1
            return StorageError(
                errno.ETIMEDOUT, f"{what} {self.describe(key)} failed: timed out "
                f"(request_timeout_s={self.settings.request_timeout_s:g} s, up to {tries} "
                f"tr{'ies' if tries > 1 else 'y'}: max_retries={self.settings.max_retries}; "
                f"{type(exc).__name__})")
        return StorageError(errno.EIO, f"{what} {self.describe(key)} failed: {text[:500]}")

    def _call(self, what: str, key: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (FileNotFoundError, FileExistsError):
            raise
        except Exception as exc:  # the clients raise many unrelated types
            raise self._error(exc, key, what) from exc

    def verify_access(self) -> None:
        key = (self.settings, self.bucket)
        if key in _verified:
            return
        try:
            self._call("checking", "", self._fs.ls, self._path(""), detail=False)
        except FileNotFoundError:
            if not self._call("checking", "", self._fs.exists, self.bucket):
                raise BucketNotFoundError(
                    errno.ENOENT, f"bucket {self.bucket!r} of {self.url} does not exist") from None
        _verified.add(key)

    def _read(self, key: str, max_bytes: int | None) -> bytes:
        # With a limit, one ranged GET of at most max_bytes + 1 bytes: an object of any
        # size costs no more memory than that, and no extra request.
        bounds = {} if max_bytes is None else {"start": 0, "end": max_bytes + 1}
        tries = 0
        while True:
            try:
                return self._read_once(key, bounds)
            except StorageError as exc:
                # An answer whose body broke off: no client retries that (botocore retries
                # requests, not bodies; s3fs's loop that did is off), so it is done here,
                # as often as a request is.
                tries += 1
                if tries > self.settings.max_retries or not _body_broke(exc):
                    raise
                log.debug("reading %s: the answer broke off (%s); reading again",
                          self.describe(key), exc)
                time.sleep(min(0.1 * 2 ** (tries - 1), 8.0))

    def _read_once(self, key: str, bounds: dict[str, int]) -> bytes:
        try:
            return bytes(self._fs.cat_file(self._path(key), **bounds))
        except FileNotFoundError as exc:
            raise ObjectNotFoundError(errno.ENOENT, f"no object at {self.describe(key)}") from exc
        except Exception as exc:  # the clients raise many unrelated types
            if bounds and _http_status(exc) == 416:
                return b""  # a range of an empty object
            raise self._error(exc, key, "reading") from exc

    def _write(self, key: str, data: bytes) -> None:
        try:
            self._call("writing", key, self._fs.pipe_file, self._path(key), data)
        except FileNotFoundError as exc:
            raise self._error(exc, key, "writing") from exc

    def _write_stream(self, key: str, parts: Iterable[bytes | memoryview]) -> int:
        # An upload in parts (S3 multipart, GCS resumable): the object appears only when
        # the last part is sent and the upload completed; an error discards the upload.
        # Never `with`: its exit would complete the upload of what was written so far.
        f = self._call("writing", key, self._fs.open, self._path(key), "wb",
                       block_size=STREAM_PART_BYTES)
        written = 0
        try:
            for part in parts:
                written += self._call("writing", key, f.write, part)
            self._call("writing", key, f.close)
        except BaseException:
            try:
                f.discard()
            except Exception:
                log.warning("could not abort the upload of %s", self.describe(key))
            f.closed = True
            raise
        return written

    def _write_if_absent(self, key: str, data: bytes) -> bool:
        for attempt in range(CONFLICT_RETRIES + 1):
            try:
                self._fs.pipe_file(self._path(key), data, mode="create")
                return True
            except FileExistsError:
                break
            except Exception as exc:  # the clients raise many unrelated types
                status = _http_status(exc)
                if status == 412:
                    break  # a precondition failure s3fs did not recognise as one
                if status == 409 and attempt < CONFLICT_RETRIES:
                    # S3's ConditionalRequestConflict: another conditional write on the key
                    # was in progress; the answer is decided once it finishes.
                    time.sleep(0.05 * 2 ** attempt)
                    continue
                raise self._error(exc, key, "creating") from exc
        # A retried request whose first try succeeded unseen meets its own object: the
        # content (which is unique to each caller) tells whether this caller won.
        try:
            return self._read(key, len(data)) == data
        except ObjectNotFoundError:
            return False

    def _exists(self, key: str) -> bool:
        try:
            info = self._call("checking", key, self._fs.info, self._path(key))
        except FileNotFoundError:
            return False
        return bool(info.get("type") == "file")

    def _list(self, prefix: str) -> Keys:
        root = self._path("")
        try:
            found = self._call("listing", prefix, self._fs.find, self._path(prefix))
        except FileNotFoundError:
            return []
        cut = len(root) + 1 if self.location.path else len(self.bucket) + 1
        keys = [p[cut:] for p in found]
        if prefix:
            keys = [k for k in keys if k == prefix or k.startswith(prefix + "/")]
        return keys

    def _list_sizes(self, prefix: str) -> dict[str, int]:
        root = self._path("")
        try:
            found = self._call("listing", prefix, self._fs.find, self._path(prefix), detail=True)
        except FileNotFoundError:
            return {}
        cut = len(root) + 1
        out = {p[cut:]: int(info.get("size") or 0) for p, info in found.items()}
        if prefix:
            out = {k: v for k, v in out.items() if k == prefix or k.startswith(prefix + "/")}
        return out

    def _list_children(self, prefix: str) -> Keys:
        try:
            found = self._call("listing", prefix, self._fs.ls, self._path(prefix), detail=False)
        except FileNotFoundError:
            return []
        base = self._path(prefix).rstrip("/") + "/"
        return [p[len(base):].strip("/") for p in found if p.startswith(base) and p != base]

    def _delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._call("deleting", key, self._fs.rm_file, self._path(key))

    def _delete_prefix(self, prefix: str) -> None:
        keys = self._list(prefix)
        # s3fs's bulk delete drops the per-key errors of a DeleteObjects answer, so what is
        # still listed afterwards is deleted once more and then reported: a cleaner must
        # never believe it removed what is still there.
        for _ in range(2):
            if not keys:
                return
            with contextlib.suppress(FileNotFoundError):
                self._call("deleting", prefix, self._fs.rm, [self._path(k) for k in keys])
            keys = sorted(set(keys) & set(self._list(prefix)))
        if keys:
            raise StorageError(errno.EIO, f"{len(keys)} object(s) under {self.describe(prefix)} "
                                          f"were not deleted (first: {keys[0]})")

    def _kvstore_spec(self, prefix: str) -> dict[str, Any]:
        publish_for_tensorstore(self.settings)
        path = "/".join(p for p in (self.location.path, prefix) if p)
        path = path + "/" if path else ""
        if self.location.scheme == "gs":
            return {"driver": "gcs", "bucket": self.bucket, "path": path}
        s = self.settings
        spec: dict[str, Any] = {"driver": "s3", "bucket": self.bucket, "path": path,
                                "aws_region": s.region}
        if s.endpoint_url:
            spec["endpoint"] = s.endpoint_url
        if s.credentials == "profile":
            spec["aws_credentials"] = {"type": "profile", "profile": s.profile}
        elif s.credentials in ("anonymous", "environment"):
            spec["aws_credentials"] = {"type": s.credentials}
        return spec

    def tensorstore_context(self) -> ts.Context:
        """Shared per scheme and retry budget (`shared_context`)."""
        retries = self.settings.max_retries
        policy = {"max_retries": retries, "initial_delay": "0.1s", "max_delay": "8s"}
        resource = "s3_request_retries" if self.location.scheme == "s3" else \
            "gcs_request_retries"
        return shared_context(f"{self.location.scheme}:retries={retries}", {resource: policy})
