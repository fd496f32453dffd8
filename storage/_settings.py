"""Object-store settings: one frozen `ObjectSettings` per store, resolved when it is opened.

Where a setting comes from, first match wins:

1. `configure` (``ckpt.configure_storage``): the application's defaults for the stores it
   opens later, per scheme;
2. the usual environment: for S3 ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``,
   ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID`` (and the rest of the AWS
   default chain: profile files, instance metadata); for GCS ``STORAGE_EMULATOR_HOST`` (or
   ``TENSORSTORE_GCS_HTTP_URL``) for an emulator, else Google application default
   credentials;
3. the defaults below.

A store keeps the settings it was opened with: a later `configure` changes later stores only.
Nothing here writes the environment while a store is built. TensorStore, which moves the
array chunks, reads a few settings from the environment alone (the GCS endpoint, its HTTP
request deadline); `publish_for_tensorstore` writes them, in this one place, just before a
store hands TensorStore a spec (`ObjectStore.kvstore_spec`).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

from ckpt.storage._errors import InvalidArgumentError, UnsupportedURLError

DEFAULT_MAX_RETRIES = 12
# A request that has moved no byte for this long is abandoned (then retried): a server that
# accepts a request and never answers must not hold a save or a restore forever.
DEFAULT_REQUEST_TIMEOUT_S = 60

_OPTIONS: dict[str, frozenset[str]] = {
    "s3": frozenset({"endpoint_url", "region", "anonymous", "profile", "max_retries",
                     "request_timeout_s"}),
    "gs": frozenset({"endpoint_url", "anonymous", "max_retries", "request_timeout_s"}),
}
_lock = threading.Lock()
_defaults: dict[str, dict[str, Any]] = {"s3": {}, "gs": {}}
# The variables `publish_for_tensorstore` wrote (the value written, None for removed), and
# the user's values they replaced: a process may talk to an emulator and then to real GCS,
# which must get the user's own settings back, not the emulator's.
_written: dict[str, str | None] = {}
_users: dict[str, str | None] = {}
_GCS_URL = "TENSORSTORE_GCS_HTTP_URL"
_TOKEN = "GOOGLE_AUTH_TOKEN_FOR_TESTING"

# TensorStore's HTTP transport has no request deadline of its own; its curl low-speed
# watchdog is read from the environment once, when the transport starts, which may be
# before any store of ours exists (Orbax, a TensorStore data pipeline): so it is set when
# this package is imported. The user's values win.
os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS", str(DEFAULT_REQUEST_TIMEOUT_S))
os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES", "1")


def _user_value(name: str) -> str | None:
    """The user's value of an environment variable this module may have replaced."""
    current = os.environ.get(name)
    if name in _written and _written[name] == current:
        return _users.get(name)
    return current


def _put(name: str, value: str | None) -> None:
    _users[name] = _user_value(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    _written[name] = value


@dataclasses.dataclass(frozen=True)
class ObjectSettings:
    """How one store reaches its bucket. Hashable: stores with equal settings share caches.

    ``credentials`` says where S3 credentials come from: ``anonymous``, ``profile``,
    ``environment`` (the ``AWS_*`` variables) or ``default`` (the AWS default chain); for
    GCS ``anonymous`` (an emulator, or asked for) or ``default``.
    """

    scheme: str
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    credentials: str = "default"
    max_retries: int = DEFAULT_MAX_RETRIES
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S

    @property
    def anonymous(self) -> bool:
        return self.credentials == "anonymous"


def configure(scheme: str, **options: Any) -> None:
    """Sets the application's defaults for every later ``s3://`` or ``gs://`` store.

    Call before creating stores (or managers), on every process. Stores already open keep
    the settings they were opened with.

    Args:
        scheme: ``"s3"`` or ``"gs"``.
        **options: for S3 ``endpoint_url``, ``region``, ``anonymous`` (bool), ``profile``;
            for GCS ``endpoint_url`` (an emulator) and ``anonymous``; for both
            ``max_retries`` (how often each client, TensorStore, botocore or gcsfs, tries
            a failed or unanswered request again; default 12) and ``request_timeout_s``
            (the deadline of a request that moves no byte, default 60: s3fs's and
            gcsfs's per store; TensorStore's is per process, the
            environment's ``TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS``, 60 unless set before
            this package is imported). None removes one.

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
    for key in ("max_retries", "request_timeout_s"):
        value = options.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not value >= (0 if key == "max_retries" else 1e-3)
                                  or (key == "max_retries" and value != int(value))):
            raise InvalidArgumentError(
                f"configure({scheme!r}): {key} must be a "
                f"{'whole number >= 0' if key == 'max_retries' else 'positive number'}, "
                f"not {value!r}")
    with _lock:
        for key, value in options.items():
            if value is None:
                _defaults[scheme].pop(key, None)
            else:
                _defaults[scheme][key] = value


def resolve(scheme: str) -> ObjectSettings:
    """The settings a store of ``scheme`` opened now gets. Called by `ObjectStore`'s
    constructor, on any thread; reads the environment, writes nothing."""
    env = os.environ
    with _lock:
        over = dict(_defaults[scheme])
    retries = int(over.get("max_retries", DEFAULT_MAX_RETRIES))
    timeout = float(over.get("request_timeout_s", DEFAULT_REQUEST_TIMEOUT_S))
    if scheme == "s3":
        profile = over.get("profile")
        credentials = ("anonymous" if over.get("anonymous") else "profile" if profile
                       else "environment" if env.get("AWS_ACCESS_KEY_ID") else "default")
        return ObjectSettings(
            scheme, endpoint_url=over.get("endpoint_url") or env.get("AWS_ENDPOINT_URL_S3")
            or env.get("AWS_ENDPOINT_URL"),
            region=over.get("region") or env.get("AWS_REGION")
            or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            profile=profile, credentials=credentials, max_retries=retries,
            request_timeout_s=timeout)
    with _lock:
        user_url = _user_value(_GCS_URL)
    endpoint = over.get("endpoint_url") or env.get("STORAGE_EMULATOR_HOST") or user_url
    if endpoint and "://" not in endpoint:
        endpoint = f"http://{endpoint}"
    return ObjectSettings(
        scheme, endpoint_url=endpoint,
        credentials="anonymous" if over.get("anonymous") or endpoint else "default",
        max_retries=retries, request_timeout_s=timeout)


def publish_for_tensorstore(settings: ObjectSettings) -> None:
    """Writes what TensorStore reads only from the environment, for a kvstore about to be
    opened with ``settings``. Called by `ObjectStore.kvstore_spec`, before the caller opens
    the spec; TensorStore reads the GCS endpoint when it opens a gcs kvstore. (Its HTTP
    deadline is set at import, above: TensorStore reads it once per process.)
    """
    if settings.scheme != "gs":
        return
    with _lock:
        if settings.endpoint_url:
            _put(_GCS_URL, settings.endpoint_url)
            # An emulator takes no credentials, but TensorStore looks for Google's and logs
            # an error line on stderr when there are none: a fixed token (its documented way
            # to skip the lookup) keeps the user's terminal clean. Never for real GCS.
            _put(_TOKEN, _user_value(_TOKEN) or "emulator")
        else:
            _put(_GCS_URL, _user_value(_GCS_URL))
            _put(_TOKEN, _user_value(_TOKEN))
