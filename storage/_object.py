"""The object-store backends: S3 (``s3://``) and GCS (``gs://``).

Small objects, listing, deletion and COMMIT go through fsspec (s3fs, gcsfs); array chunks go
through TensorStore's ``s3`` and ``gcs`` kvstore drivers with the spec from `kvstore_spec`,
on the very same objects. COMMIT uses a real precondition: S3 ``If-None-Match: *`` and GCS
``ifGenerationMatch=0`` (fsspec's ``mode="create"``), so exactly one creator wins.

Configuration comes from the usual environment, overridable per scheme with `configure`:

- S3: ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``,
  credentials from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
  else the AWS default chain (profile files, instance metadata).
- GCS: ``STORAGE_EMULATOR_HOST`` (or ``TENSORSTORE_GCS_HTTP_URL``) for an emulator, else
  Google application default credentials.

Both libraries retry transient failures (5xx, resets, timeouts) with backoff; TensorStore's
retry budget is set by ``max_retries``.
"""

from __future__ import annotations

import errno
import importlib
import os
import threading
import time
from typing import Any

import tensorstore as ts

from ckpt.storage._base import Keys, Store, shared_context
from ckpt.storage._errors import (
    AccessDeniedError,
    BucketNotFoundError,
    MissingDependencyError,
    ObjectNotFoundError,
    StorageError,
    UnsupportedURLError,
)

_OPTIONS: dict[str, frozenset[str]] = {
    "s3": frozenset({"endpoint_url", "region", "anonymous", "profile", "max_retries",
                     "request_timeout_s"}),
    "gs": frozenset({"endpoint_url", "anonymous", "max_retries", "request_timeout_s"}),
}
_overrides: dict[str, dict[str, Any]] = {"s3": {}, "gs": {}}
_lock = threading.Lock()
_verified: set[tuple[str, str]] = set()

DEFAULT_MAX_RETRIES = 12
# A request that has moved no byte for this long is abandoned (then retried): a server that
# accepts a request and never answers must not hold a save or a restore forever.
DEFAULT_REQUEST_TIMEOUT_S = 60

# TensorStore's HTTP transport has no request deadline of its own; its curl low-speed watchdog
# is set through the environment, read when the transport starts. The user's values win.
os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS", str(DEFAULT_REQUEST_TIMEOUT_S))
os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES", "1")
CONFLICT_RETRIES = 6


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


def configure(scheme: str, **options: Any) -> None:
    """Overrides the environment's settings for every later ``s3://`` or ``gs://`` store.

    Call before creating stores (or managers), on every process.

    Args:
        scheme: ``"s3"`` or ``"gs"``.
        **options: for S3 ``endpoint_url``, ``region``, ``anonymous`` (bool), ``profile``;
            for GCS ``endpoint_url`` (an emulator) and ``anonymous``; for both
            ``max_retries`` (TensorStore's retries of a failed request) and
            ``request_timeout_s`` (s3fs's and gcsfs's deadline per request, default 60;
            TensorStore's is the environment's ``TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS``,
            set to the same default). None removes one.

    Raises:
        UnsupportedURLError: an unknown scheme.
        TypeError: an unknown option.
    """
    if scheme not in _OPTIONS:
        raise UnsupportedURLError(f"configure: unknown scheme {scheme!r}; use 's3' or 'gs'")
    unknown = set(options) - _OPTIONS[scheme]
    if unknown:
        raise TypeError(f"configure({scheme!r}): unknown options {sorted(unknown)}; "
                        f"known: {sorted(_OPTIONS[scheme])}")
    with _lock:
        for key, value in options.items():
            if value is None:
                _overrides[scheme].pop(key, None)
            else:
                _overrides[scheme][key] = value
        _verified.clear()


def _settings(scheme: str) -> dict[str, Any]:
    env = os.environ
    with _lock:
        over = dict(_overrides[scheme])
    if scheme == "s3":
        return {
            "endpoint_url": over.get("endpoint_url") or env.get("AWS_ENDPOINT_URL_S3")
            or env.get("AWS_ENDPOINT_URL"),
            "region": over.get("region") or env.get("AWS_REGION")
            or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            "anonymous": bool(over.get("anonymous", False)),
            "profile": over.get("profile"),
            "max_retries": int(over.get("max_retries", DEFAULT_MAX_RETRIES)),
            "request_timeout_s": float(over.get("request_timeout_s",
                                                DEFAULT_REQUEST_TIMEOUT_S)),
        }
    endpoint = over.get("endpoint_url") or env.get("STORAGE_EMULATOR_HOST") \
        or env.get("TENSORSTORE_GCS_HTTP_URL")
    if endpoint and "://" not in endpoint:
        endpoint = f"http://{endpoint}"
    return {"endpoint_url": endpoint, "anonymous": bool(over.get("anonymous", False))
            or bool(endpoint), "max_retries": int(over.get("max_retries", DEFAULT_MAX_RETRIES)),
            "request_timeout_s": float(over.get("request_timeout_s", DEFAULT_REQUEST_TIMEOUT_S))}


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


def _filesystem(scheme: str, s: dict[str, Any]) -> Any:
    if scheme == "s3":
        s3fs = _client_module("s3")

        kwargs: dict[str, Any] = {
            "anon": s["anonymous"], "use_listings_cache": False,
            "client_kwargs": {"region_name": s["region"]},
            "config_kwargs": {"retries": {"max_attempts": 4, "mode": "standard"},
                              "connect_timeout": 10,
                              "read_timeout": s["request_timeout_s"]},
        }
        if s["endpoint_url"]:
            kwargs["client_kwargs"]["endpoint_url"] = s["endpoint_url"]
        if s["profile"]:
            kwargs["profile"] = s["profile"]
        return s3fs.S3FileSystem(**kwargs)
    if s["endpoint_url"]:
        # gcsfs probes a gRPC/TLS API per bucket unless told not to; an HTTP emulator
        # has none, and every first access would stall for a minute.
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        # TensorStore's gcs driver reads its endpoint from the environment only (when a
        # kvstore is opened), so the configured endpoint is published there.
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = s["endpoint_url"]
        # An emulator takes no credentials, but TensorStore looks for Google's and logs an
        # error line on stderr when there are none: a fixed token (its documented way to
        # skip the lookup) keeps the user's terminal clean. Never for real GCS.
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    gcsfs = _client_module("gs")
    import aiohttp

    # gcsfs has no deadline unless given one (and does not retry a timed-out request). A
    # read deadline, not a total one: a large upload on a slow link may take longer.
    options: dict[str, Any] = {"use_listings_cache": False, "requests_timeout":
                               aiohttp.ClientTimeout(total=None, sock_connect=10,
                                                     sock_read=s["request_timeout_s"])}
    if s["endpoint_url"]:
        options["endpoint_url"] = s["endpoint_url"]
    if s["anonymous"]:
        options["token"] = "anon"
    return gcsfs.GCSFileSystem(**options)


# S3 error codes for a credential the server rejects or a permission it lacks.
_S3_DENIED = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                        "InvalidToken", "ExpiredToken", "AllAccessDisabled", "Forbidden"})
# botocore's exceptions for no usable credentials at all (named: botocore is optional).
_NO_CREDENTIALS = frozenset({"NoCredentialsError", "PartialCredentialsError"})


def client_error_kind(exc: BaseException) -> str | None:
    """What an object-store client's error means: ``denied`` (credentials missing, wrong or
    without permission), ``no-bucket``, or None (any other failure). Decided by type and
    status, through the chain of causes, since s3fs and gcsfs re-raise the server's answer
    as a built-in error (s3fs keeps botocore's error, with its code, as the cause)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
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
        current = current.__cause__ or current.__context__
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
    if (_settings("gs")["endpoint_url"] or "GOOGLE_AUTH_TOKEN_FOR_TESTING" in os.environ
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
        self._settings = _settings(location.scheme)
        self._fs = _filesystem(location.scheme, self._settings)

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
        return StorageError(errno.EIO, f"{what} {self.describe(key)} failed: {text[:500]}")

    def _call(self, what: str, key: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (FileNotFoundError, FileExistsError):
            raise
        except Exception as exc:  # the clients raise many unrelated types
            raise self._error(exc, key, what) from exc

    def verify_access(self) -> None:
        key = (self.location.scheme, self.bucket)
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
        try:
            self._call("deleting", key, self._fs.rm_file, self._path(key))
        except FileNotFoundError:
            pass

    def _delete_prefix(self, prefix: str) -> None:
        keys = self._list(prefix)
        # s3fs's bulk delete drops the per-key errors of a DeleteObjects answer, so what is
        # still listed afterwards is deleted once more and then reported: a cleaner must
        # never believe it removed what is still there.
        for _ in range(2):
            if not keys:
                return
            try:
                self._call("deleting", prefix, self._fs.rm, [self._path(k) for k in keys])
            except FileNotFoundError:
                pass
            keys = sorted(set(keys) & set(self._list(prefix)))
        if keys:
            raise StorageError(errno.EIO, f"{len(keys)} object(s) under {self.describe(prefix)} "
                                          f"were not deleted (first: {keys[0]})")

    def _kvstore_spec(self, prefix: str) -> dict[str, Any]:
        path = "/".join(p for p in (self.location.path, prefix) if p)
        path = path + "/" if path else ""
        if self.location.scheme == "gs":
            return {"driver": "gcs", "bucket": self.bucket, "path": path}
        s = self._settings
        spec: dict[str, Any] = {"driver": "s3", "bucket": self.bucket, "path": path,
                                "aws_region": s["region"]}
        if s["endpoint_url"]:
            spec["endpoint"] = s["endpoint_url"]
        if s["anonymous"]:
            spec["aws_credentials"] = {"type": "anonymous"}
        elif s["profile"]:
            spec["aws_credentials"] = {"type": "profile", "profile": s["profile"]}
        elif os.environ.get("AWS_ACCESS_KEY_ID"):
            spec["aws_credentials"] = {"type": "environment"}
        return spec

    def tensorstore_context(self) -> ts.Context:
        """Shared per scheme and retry budget (`shared_context`)."""
        retries = self._settings["max_retries"]
        policy = {"max_retries": retries, "initial_delay": "0.1s", "max_delay": "8s"}
        resource = "s3_request_retries" if self.location.scheme == "s3" else \
            "gcs_request_retries"
        return shared_context(f"{self.location.scheme}:retries={retries}", {resource: policy})
