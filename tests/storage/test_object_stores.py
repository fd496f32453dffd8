"""What only object stores need: commit races, a faulty network, a vanished server, request
counts, bad credentials and buckets. Servers are real (moto, fake-gcs-server) over HTTP."""

import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse

import numpy as np
import pytest

import ckpt
import ckpt.storage as storage
from ckpt.storage import (
    AccessDeniedError,
    BucketNotFoundError,
    ObjectStore,
    StorageError,
    open_store,
)
from tests.children import script
from tests.conftest import BUCKET, backend_url
from tests.helpers.faultproxy import FaultProxy
from tests.helpers.saves import started

REMOTES = ["s3", "gcs"]
SCHEME = {"s3": "s3", "gcs": "gs"}


def _object_store(url: str) -> ObjectStore:
    """The store of an s3:// or gs:// ``url``, whose settings a test reads."""
    store = open_store(url)
    assert isinstance(store, ObjectStore), store
    return store


def _server(request, backend):
    return request.getfixturevalue("s3_server" if backend == "s3" else "gcs_server")


@pytest.fixture
def proxied(request):
    """Yields (backend, proxy, url maker) with the library pointed at a fault proxy."""
    made = []

    def make(backend, **kwargs):
        server = _server(request, backend)
        proxy = FaultProxy(server.endpoint, **kwargs)
        made.append((backend, proxy))
        storage.configure(SCHEME[backend], endpoint_url=proxy.endpoint, max_retries=6)
        return proxy

    yield make
    for backend, proxy in made:
        proxy.down()
        storage.configure(SCHEME[backend], endpoint_url=None, max_retries=None)


_TS_VARS = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING")


def test_each_store_keeps_the_settings_it_was_opened_with(monkeypatch):
    """Settings are resolved into the store when it is opened: a later `configure` or a
    changed environment does not reach it, opening writes no environment variable, and what
    TensorStore can only read from the environment is published for the store about to use
    it, the user's own values coming back for a store without an emulator."""
    for name in _TS_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-the-environment")
    try:
        storage.configure("gs", endpoint_url="http://127.0.0.1:1")
        storage.configure("s3", endpoint_url="http://127.0.0.1:3", region="eu-west-3")
        before = dict(os.environ)
        emulated, s3 = _object_store("gs://bucket-a/run"), _object_store("s3://bucket-s/run")
        storage.configure("gs", endpoint_url="http://127.0.0.1:2")
        other = _object_store("gs://bucket-b/run")
        assert dict(os.environ) == before
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        assert (emulated.settings.endpoint_url, other.settings.endpoint_url) == (
            "http://127.0.0.1:1", "http://127.0.0.1:2")
        assert s3.settings.credentials == "environment"
        assert s3.settings.region == "eu-west-3"
        assert s3.kvstore_spec("x")["aws_credentials"] == {"type": "environment"}
        assert s3.kvstore_spec("x")["endpoint"] == "http://127.0.0.1:3"

        emulated.kvstore_spec("x")
        assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == "http://127.0.0.1:1"
        assert os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] == "emulator"
        storage.configure("gs", endpoint_url=None, anonymous=True)
        real = _object_store("gs://bucket-c/run")
        assert real.settings.endpoint_url is None
        assert real.settings.anonymous
        real.kvstore_spec("x")
        assert not {"TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING"} & set(os.environ)

        monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", "http://users-own:9")
        assert _object_store("gs://bucket-d/run").settings.endpoint_url == "http://users-own:9"
        storage.configure("gs", endpoint_url="http://127.0.0.1:1", anonymous=None)
        open_store("gs://bucket-a/run").kvstore_spec("x")
        assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == "http://127.0.0.1:1"
        storage.configure("gs", endpoint_url=None)
        open_store("gs://bucket-d/run").kvstore_spec("x")
        assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == "http://users-own:9"
        assert "GOOGLE_AUTH_TOKEN_FOR_TESTING" in os.environ  # an endpoint: the emulator's
    finally:
        storage.configure("gs", endpoint_url=None, anonymous=None)
        storage.configure("s3", endpoint_url=None, region=None)


def _tree(i, n=200_000):
    rng = np.random.default_rng(i)
    return {"who": i, "x": rng.standard_normal(n).astype(np.float32),
            "y": {"z": np.full((64, 1024), i, np.int32)}}


def _assert_is(out, i, n=200_000):
    expected = _tree(i, n)
    assert out["who"] == i
    assert out["x"].tobytes() == expected["x"].tobytes()
    assert out["y"]["z"].tobytes() == expected["y"]["z"].tobytes()


@pytest.mark.parametrize("backend", ["local", "memory", "s3", "gcs"])
def test_commit_race_threads_one_winner_restored_whole(request, tmp_path, backend):
    url = backend_url(request, tmp_path, backend) + "/step"
    barrier = threading.Barrier(6)
    outcome = {}

    def attempt(i):
        barrier.wait()
        try:
            ckpt.save(url, _tree(i))
            outcome[i] = "won"
        except (ckpt.errors.CommitConflictError, ckpt.CheckpointExistsError) as exc:
            outcome[i] = type(exc).__name__

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, o in outcome.items() if o == "won"]
    assert len(outcome) == 6 and len(winners) == 1, outcome
    _assert_is(ckpt.restore(url), winners[0])
    assert ckpt.metadata(url).attempt in open_store(url).list_children()


@pytest.mark.parametrize("backend", ["local", "s3", "gcs"])
def test_commit_race_processes_one_winner_restored_whole(request, tmp_path, backend):
    url = backend_url(request, tmp_path, backend) + "/step"
    child = script("race_child")
    procs = [subprocess.Popen([sys.executable, child, url, str(i)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(4)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stderr is not None  # PIPE
            assert p.stdout.readline().strip() == "READY", p.stderr.read()
        for p in procs:
            assert p.stdin is not None  # PIPE
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [p.communicate(timeout=120)[0].split() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    winners = [i for i, r in enumerate(results) if r == ["WON"]]
    assert len(winners) == 1, results
    assert all(r[0] == "LOST" for i, r in enumerate(results) if i != winners[0]), results
    out = ckpt.restore(url)
    assert out["who"] == winners[0]
    assert (out["x"] == winners[0]).all()


@pytest.mark.parametrize("backend", REMOTES)
def test_save_commits_whole_through_a_faulty_network(request, tmp_path, proxied, backend):
    proxy = proxied(backend, fault_rate=0.05, seed=7)
    root = backend_url(request, tmp_path, backend)
    with ckpt.CheckpointManager(root, keep_last=2) as mgr:
        for step in range(3):
            mgr.save(step, _tree(step, 400_000))
    assert sum(proxy.faults.values()) > 0, "the proxy injected no fault"
    mgr = ckpt.CheckpointManager(root, keep_last=2)
    assert mgr.steps() == [1, 2]
    for step in (1, 2):
        _assert_is(mgr.restore(step), step, 400_000)
    mgr.close()


def test_s3_conditional_create_conflicts_and_bare_412(request, tmp_path, proxied):
    """409 ConditionalRequestConflict (a concurrent conditional write) is retried; a 412
    without its Condition element still means "exists"; neither is a bare storage error."""
    proxy = proxied("s3")
    store = open_store(backend_url(request, tmp_path, "s3"))
    proxy.conflicts = 3
    assert store.write_if_absent("claims/a", b"mine")
    assert proxy.conflicts == 0
    assert store.read("claims/a") == b"mine"
    proxy.bare_412 = 1
    assert not store.write_if_absent("claims/a", b"theirs")
    assert proxy.bare_412 == 0
    assert store.read("claims/a") == b"mine"
    proxy.conflicts = 100  # never settles: an error naming the object, nothing created
    with pytest.raises(StorageError, match="claims/b"):
        store.write_if_absent("claims/b", b"x")
    assert not store.exists("claims/b")


@pytest.mark.parametrize("backend", REMOTES)
def test_server_gone_fails_clearly_and_keeps_previous(request, tmp_path, proxied, backend):
    proxy = proxied(backend)
    storage.configure(SCHEME[backend], max_retries=2)
    root = backend_url(request, tmp_path, backend)
    mgr = ckpt.CheckpointManager(root, keep_last=None)
    started(mgr.save(1, _tree(1))).wait()
    proxy.down()
    with pytest.raises(StorageError) as err:
        started(mgr.save(2, _tree(2))).wait()
    assert BUCKET in str(err.value)
    proxy.up()
    # Now the server goes away while the background writes are in flight (each request is
    # held for half a second, so none can finish before the server is gone).
    proxy.kinds, proxy.delay_s, proxy.fault_rate = ("delay",), 0.5, 1.0
    handle = started(mgr.save(3, _tree(3)))
    proxy.down()
    with pytest.raises(ckpt.CkptError) as gone:
        handle.wait()
    assert f"{BUCKET}" in str(gone.value)
    proxy.fault_rate = 0.0
    proxy.up()
    assert mgr.steps() == [1]
    _assert_is(mgr.restore(), 1)
    mgr.close()


@pytest.mark.parametrize("backend", REMOTES)
def test_latest_step_over_1000_steps_makes_few_requests(request, tmp_path, proxied, backend):
    root = backend_url(request, tmp_path, backend)
    store = open_store(root)
    with __import__("concurrent.futures").futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda s: store.write(f"{s}/COMMIT", b"c"), range(1000)))
    store.delete("999/COMMIT")
    store.write("999/attempt-x/manifest.msgpack", b"m")  # the newest step is uncommitted
    proxy = proxied(backend)
    mgr = ckpt.CheckpointManager(root)
    assert mgr._gc is not None  # a writable manager's start-up clean-up
    mgr._gc.join()
    proxy.requests.clear()
    assert mgr.latest_step() == 998
    # One listing of the root, then the newest folders only (999: uncommitted, 998: the
    # answer): no step below is looked at. How many requests each look takes is the
    # client's (gcsfs's object look races a listing that is cancelled once the object
    # answers, and reaches the server or not), so the count is bounded, not exact.
    paths = [urllib.parse.unquote(path) for _, path in proxy.requests]
    steps = {int(m) for path in paths for m in re.findall(r"/(\d+)/", path.split("?")[0]
                                                          + "/" + path.partition("prefix=")[2])
             if int(m) < 1000}  # step folders, not an all-digit random prefix
    assert steps <= {999, 998}, proxy.requests
    assert len(proxy.requests) <= 10, proxy.requests


@pytest.mark.parametrize("backend", REMOTES)
def test_missing_bucket_is_named_before_training(request, backend):
    _server(request, backend)
    url = f"{SCHEME[backend]}://no-such-bucket-here/run"
    with pytest.raises(BucketNotFoundError, match="no-such-bucket-here"):
        ckpt.CheckpointManager(url)
    with pytest.raises(BucketNotFoundError, match="no-such-bucket-here"):
        ckpt.save_async(url + "/1", {"x": 1})


def test_wrong_s3_credentials_are_named_before_training():
    # A moto server that authenticates every request: the test's keys are unknown to it.
    from tools.servers import s3_server

    with s3_server(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as server:
        storage.configure("s3", endpoint_url=server.endpoint)
        try:
            with pytest.raises(AccessDeniedError, match="guarded-bucket") as err:
                ckpt.CheckpointManager("s3://guarded-bucket/run")
            assert isinstance(err.value, PermissionError)
        finally:
            storage.configure("s3", endpoint_url=None)


@pytest.mark.parametrize("status", [401, 403])
def test_a_gcs_server_that_rejects_the_credentials_is_named_before_training(proxied, status):
    """gcsfs re-raises a 403 as a bare OSError and a 401 as its HttpError: both are
    `AccessDeniedError` naming the bucket, before anything is written."""
    proxied("gcs", deny=status)
    with pytest.raises(AccessDeniedError, match="guarded-bucket") as err:
        ckpt.CheckpointManager("gs://guarded-bucket/run")
    assert isinstance(err.value, PermissionError)


STALLED_SAVE = """
import sys, time
import numpy as np
import ckpt
ckpt.configure_storage("s3", endpoint_url=sys.argv[2], max_retries=1, request_timeout_s=2)
t = time.monotonic()
try:
    ckpt.save(sys.argv[1], {"x": np.zeros(100_000, np.float32)})
    print("SAVED")
except ckpt.CkptError as exc:
    print("FAILED", round(time.monotonic() - t), type(exc).__name__, str(exc)[:300])
"""


def test_a_server_that_never_answers_fails_the_save_in_bounded_time(request, tmp_path, proxied):
    """The store accepts TensorStore's chunk requests and never answers them (the others
    go through): the save fails within the request deadline and its retries, naming the
    checkpoint, instead of waiting forever; nothing is committed."""
    proxy = proxied("s3", hang=("/arrays/",))
    url = backend_url(request, tmp_path, "s3")
    env = {**os.environ, "TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS": "2"}
    run = subprocess.run([sys.executable, "-c", STALLED_SAVE, f"{url}/ck", proxy.endpoint],
                         capture_output=True, text=True, timeout=240, env=env)
    out = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    assert out.startswith("FAILED"), out
    assert int(out.split()[1]) < 120 and "ck" in out, out
    assert not open_store(f"{url}/ck").exists("COMMIT")


DEADLINE_RUN = """
import json, sys, time
import numpy as np
import ckpt
scheme, endpoint, url, op, request_timeout_s = sys.argv[1:6]
# By default each request may take 60 s: only the end-to-end timeout_s can end these.
ckpt.configure_storage(scheme, endpoint_url=endpoint, max_retries=1,
                       request_timeout_s=float(request_timeout_s))
t = time.monotonic()
try:
    if op == "save":
        ckpt.save(url, {"x": np.arange(300_000, dtype=np.float32)}, timeout_s=4)
    elif op == "save-host":
        # Direct device-to-host copies, eight shards through a budget of about one: the
        # caller's thread waits for the stalled writes to make room.
        import jax
        tree = {f"x{i}": jax.numpy.full(300_000, i, "float32") for i in range(8)}
        ckpt.save(url, tree, timeout_s=4, snapshot="host", memory_budget=1_500_000)
    else:
        ckpt.restore(url, timeout_s=4)
    out = {"error": None}
except ckpt.CkptError as exc:
    out = {"after": time.monotonic() - t, "type": type(exc).__name__, "error": str(exc)}
print(json.dumps(out), flush=True)
"""


@pytest.mark.parametrize(("backend", "op", "stalled", "doing"), [
    ("s3", "save", "arrays", "arrays/x/zarr.json"),  # the store's batch of zarr.json
    ("s3", "save", "/c/", "writing chunks"),
    ("s3", "save-host", "/c/", "writing chunks"),  # the caller's thread waits for room
    ("gcs", "save", "hosts", "hosts/0.msgpack"),         # fsspec's requests
    ("gcs", "restore", "arrays", "leaf"),
    ("s3", "restore", "manifest", "reading"),
])
def test_timeout_s_bounds_a_save_and_a_restore_end_to_end(request, tmp_path, proxied, backend,
                                                          op, stalled, doing):
    """A server that accepts requests and never answers them, with each request allowed its
    default 60 s: ``timeout_s=4`` still ends the save or restore in about 4 s, with an error
    naming the checkpoint and what was under way; a stalled save commits nothing."""
    import json

    proxy = proxied(backend)
    url = f"{backend_url(request, tmp_path, backend)}/ck"
    if op == "restore":
        ckpt.save(url, {"x": np.arange(300_000, dtype=np.float32)})
    proxy.hang = (stalled,)
    env = {**os.environ, "TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS": "600"}
    began = time.monotonic()
    run = subprocess.run([sys.executable, "-c", DEADLINE_RUN, SCHEME[backend], proxy.endpoint,
                          url, op, "60"], capture_output=True, text=True, timeout=240, env=env)
    # The process exits too, though what it abandoned still waits on the server (for up to
    # 60 s a request): nothing left behind may be a thread the interpreter joins at exit.
    assert time.monotonic() - began < 45, run.stderr[-2000:]
    assert run.stdout.strip(), run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["type"] == "DeadlineExceededError", out
    assert out["after"] < 4 + 6, out
    assert url in out["error"] and "timeout_s=4" in out["error"] and doing in out["error"], out
    proxy.hang = ()
    if op.startswith("save"):
        assert not open_store(url).exists("COMMIT")


@pytest.mark.parametrize("backend", ["s3", "gcs"])
def test_a_read_without_timeout_s_is_bounded_by_the_request_settings(request, tmp_path,
                                                                     proxied, backend):
    """A server that accepts requests and never answers, with ``request_timeout_s=2`` and
    ``max_retries=0``: `ckpt.metadata` and `ckpt.restore` fail after about one request's
    deadline, each request tried once, and so does a manager's start-up. (The clients' own
    retry layers used to stack on ours: s3fs ran botocore's four tries five times over, and a
    metadata read waited minutes.) The error names the object and the settings that ended it."""
    import time

    proxy = proxied(backend)
    url = f"{backend_url(request, tmp_path, backend)}/ck"
    ckpt.save(url, {"x": np.arange(1000, dtype=np.float32)})
    storage.configure(SCHEME[backend], request_timeout_s=2, max_retries=0)
    try:
        proxy.hang = ("/",)
        root = url.rsplit("/", 1)[0]
        for read in (ckpt.metadata, ckpt.restore,
                     lambda _: ckpt.CheckpointManager(root, read_only=True)):
            before, t = sum(proxy.counts.values()), time.monotonic()
            with pytest.raises(StorageError) as err:
                read(url)
            assert time.monotonic() - t < 15, read
            assert "request_timeout_s=2" in str(err.value)
            assert "max_retries=0" in str(err.value)
            assert (root if read not in (ckpt.metadata, ckpt.restore) else f"{url}/COMMIT") \
                in str(err.value)
            assert sum(proxy.counts.values()) - before <= 2, dict(proxy.counts)
    finally:
        proxy.hang = ()
        storage.configure(SCHEME[backend], request_timeout_s=None)


@pytest.mark.parametrize("backend", ["s3", "gcs"])
def test_an_answer_that_breaks_off_is_read_again(request, tmp_path, proxied, backend):
    """A connection dropped halfway through an answer's body: no client retries a body
    (botocore retries requests; s3fs's loop that did is off, it stacked on botocore's), so
    the store reads again, as often as ``max_retries`` allows, and fails naming the object
    once that is spent."""
    proxy = proxied(backend)
    store = open_store(backend_url(request, tmp_path, backend))
    data = np.random.default_rng(0).bytes(100_000)
    store.write("blob", data)
    proxy.cut_bodies = 2
    assert store.read("blob") == data
    assert proxy.cut_bodies == 0
    storage.configure(SCHEME[backend], max_retries=0)
    try:
        store = open_store(store.url)
        proxy.cut_bodies = 1
        with pytest.raises(StorageError, match="blob"):
            store.read("blob")
    finally:
        storage.configure(SCHEME[backend], max_retries=6)


def test_storage_settings_are_checked(request):
    for option, value in [("max_retries", -1), ("max_retries", 1.5), ("max_retries", True),
                          ("request_timeout_s", 0), ("request_timeout_s", "2")]:
        with pytest.raises(ckpt.errors.InvalidArgumentError, match=option):
            storage.configure("s3", **{option: value})


@pytest.mark.parametrize("entry", ["metadata", "verify", "inspect", "list", "verify-cli",
                                   "orbax-metadata"])
def test_read_only_entry_points_take_a_timeout(request, tmp_path, proxied, capsys, entry):
    """Each request may take its default 60 s against a server that never answers: the
    read-only entry points' ``timeout_s`` (the CLI's ``--timeout``) still ends them in
    about that long, with a `DeadlineExceededError` naming the URL and the option."""
    import time

    from ckpt.cli import EXIT_FAILED, main

    proxy = proxied("s3")
    root = backend_url(request, tmp_path, "s3")
    url = f"{root}/7"
    if entry == "orbax-metadata":
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as saver:
            saver.save(str(tmp_path / "orbax"), {"x": np.arange(1000, dtype=np.float32)})
        fs = open_store(url)
        for path in (tmp_path / "orbax").rglob("*"):
            if path.is_file():
                fs.write(str(path.relative_to(tmp_path / "orbax")), path.read_bytes())
    else:
        ckpt.save(url, {"x": np.arange(1000, dtype=np.float32)})
    proxy.hang = ("/",)
    t = time.monotonic()
    try:
        if entry in ("metadata", "verify", "orbax-metadata"):
            with pytest.raises(ckpt.errors.DeadlineExceededError) as err:
                (ckpt.verify if entry == "verify" else ckpt.metadata)(url, timeout_s=3)
            message = str(err.value)
            assert "timeout_s=3" in message and url in message, message
        else:
            argv = {"inspect": ["inspect", url], "list": ["list", root],
                    "verify-cli": ["verify", "-q", url]}[entry]
            assert main([*argv, "--timeout", "3"]) == EXIT_FAILED
            message = capsys.readouterr().err
            assert "--timeout=3" in message and (root if entry == "list" else url) in message, \
                message
        assert time.monotonic() - t < 3 + 6
    finally:
        proxy.hang = ()


def _creates_commit(method, path, body):
    # S3: a PUT of <ckpt>/COMMIT; GCS: an upload with ifGenerationMatch=0 naming it in its
    # multipart body.
    return (method == "PUT" and path.split("?")[0].endswith("/COMMIT")) or (
        "ifGenerationMatch=0" in path and b"/COMMIT" in body)


@pytest.mark.parametrize("backend", ["s3", "gcs"])
def test_a_commit_create_that_never_answers_is_reported_as_unknown(request, tmp_path, proxied,
                                                                   backend):
    """COMMIT's create is accepted and never answered. It is not abandoned at ``timeout_s``
    (a COMMIT write left running could land after a later save); it ends with its own
    request deadline, and then the save cannot know whether it will land: it says so, and
    COMMIT decides."""
    import json

    proxy = proxied(backend, stall=_creates_commit)
    url = f"{backend_url(request, tmp_path, backend)}/ck"
    env = {**os.environ, "TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS": "600"}
    run = subprocess.run([sys.executable, "-c", DEADLINE_RUN, SCHEME[backend], proxy.endpoint,
                          url, "save", "2"], capture_output=True, text=True, timeout=240, env=env)
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["type"] == "CommitOutcomeUnknownError", out
    assert "COMMIT decides" in out["error"] and "COMMIT" in out["error"], out
    # Bounded by the request deadline times the retries of botocore and s3fs (which
    # multiply), never by the server.
    assert out["after"] < 150, out


def test_a_gcs_server_that_never_answers_fails_in_bounded_time(request, tmp_path, proxied):
    proxy = proxied("gcs", hang=("/o",))  # every object request stalls
    # One try a request: how retries multiply the bound is tested above.
    storage.configure("gs", request_timeout_s=2, max_retries=0)
    try:
        with pytest.raises(StorageError, match="ck"):
            ckpt.restore(f"{backend_url(request, tmp_path, 'gcs')}/ck")
    finally:
        storage.configure("gs", request_timeout_s=None, max_retries=None)
    assert proxy.counts["GET"] >= 1


UNRESOLVED = """
import time
import ckpt
ckpt.configure_storage("gs", endpoint_url="http://no-such-host.invalid:9")
began = time.monotonic()
try:
    ckpt.metadata("gs://bucket/ck")
except ckpt.StorageError as exc:
    print(f"{time.monotonic() - began:.1f}", exc)
"""


def test_a_host_name_that_does_not_resolve_fails_soon_and_quietly():
    """gcsfs retries a name that does not resolve as any connection error (about 4.5 min at
    the default max_retries, each failure logged with its traceback). It is tried three
    times (1 s and 2 s apart), and said once: in the error, not on stderr."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
    run = subprocess.run([sys.executable, "-c", UNRESOLVED], capture_output=True, text=True,
                         timeout=120, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    took, message = run.stdout.strip().split(" ", 1)
    assert "gs://bucket/ck/COMMIT" in message and "no-such-host.invalid" in message, message
    assert "did not resolve 3 times" in message, message
    assert float(took) < 30, took
    assert run.stderr == "", run.stderr[-2000:]


NO_CREDENTIALS = """
import time
import ckpt
began = time.monotonic()
try:
    ckpt.metadata("gs://ckpt-no-such-bucket-7f3a/ck")
except ckpt.CkptError as exc:
    print(f"{time.monotonic() - began:.1f}", type(exc).__name__, exc)
"""


def test_gcs_without_credentials_goes_anonymous_at_once_and_quietly(tmp_path):
    """No Application Default Credentials and not on GCE: gcsfs alone would ask the
    metadata server for a token five times with back-off (~16 s, each failure logged),
    then warn at every request that the bucket's type is unknown. The store decides
    "anonymous" in one look, so the error comes in a few seconds with nothing on stderr
    (offline: the host name does not resolve; online: the bucket does not exist)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                        "GOOGLE_APPLICATION_CREDENTIALS")}
    refused = "127.0.0.1:9"  # nothing listens there: not a GCE machine, no token
    env.update(HOME=str(tmp_path), CLOUDSDK_CONFIG=str(tmp_path / "gcloud"),
               GCE_METADATA_IP=refused, GCE_METADATA_HOST=refused)
    run = subprocess.run([sys.executable, "-c", NO_CREDENTIALS], capture_output=True,
                         text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    took, message = run.stdout.strip().split(" ", 1)
    assert "gs://ckpt-no-such-bucket-7f3a/ck" in message, message
    assert float(took) < 12, (took, message)
    assert run.stderr == "", run.stderr[-2000:]


GCS_INSPECT = """
import sys
import numpy as np
import ckpt
ckpt.configure_storage("gs", endpoint_url=sys.argv[2])
ckpt.save(sys.argv[1], {"w": np.arange(50_000, dtype=np.float32)})
print(ckpt.restore(sys.argv[1])["w"][-1])
"""


def test_no_credential_lookup_noise_against_a_gcs_emulator(request, tmp_path, gcs_server):
    """TensorStore logs "Could not find the credentials file" on stderr when it looks for
    Google credentials; against an emulator none are needed, and nothing is printed."""
    url = f"{backend_url(request, tmp_path, 'gcs')}/quiet"
    env = {k: v for k, v in os.environ.items() if k != "GOOGLE_AUTH_TOKEN_FOR_TESTING"}
    run = subprocess.run([sys.executable, "-c", GCS_INSPECT, url, gcs_server.endpoint],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0 and run.stdout.strip() == "49999.0", run.stderr[-2000:]
    assert "credentials" not in run.stderr, run.stderr


SETTLED_READ = """
import os, sys
import tensorstore as ts
from ckpt.storage import parse_url, settle_google_credentials
if sys.argv[1] == "settle":
    settle_google_credentials()
assert "TENSORSTORE_GCS_HTTP_URL" not in os.environ
os.environ["TENSORSTORE_GCS_HTTP_URL"] = sys.argv[3]  # the server, once the lookup is done
kv = ts.KvStore.open({"driver": "gcs", "bucket": parse_url(sys.argv[2]).bucket}).result()
kv.write("settled/probe", b"anonymous").result()
print(kv.read("settled/probe").result().value.decode())
"""


def test_the_cli_looks_up_missing_google_credentials_quietly(request, tmp_path, gcs_server):
    """With no Google credentials anywhere (a public bucket read anonymously), TensorStore's
    first GCS request logs "Could not find the credentials file" and goes on without; the
    `ckpt` command has that lookup done first, quietly, and TensorStore then reads as usual."""
    url = backend_url(request, tmp_path, "gcs")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "CLOUDSDK_"))
           and k not in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
    env["HOME"] = str(tmp_path)  # no gcloud folder there
    runs = {how: subprocess.run([sys.executable, "-c", SETTLED_READ, how, url,
                                 gcs_server.endpoint], capture_output=True, text=True,
                                timeout=120, env=env) for how in ("plain", "settle")}
    for run in runs.values():
        assert run.returncode == 0 and run.stdout.strip() == "anonymous", run.stderr[-2000:]
    assert "Could not find the credentials file" in runs["plain"].stderr
    assert "credentials" not in runs["settle"].stderr, runs["settle"].stderr


def test_tensorstores_request_deadline_is_set_on_import():
    """TensorStore reads its curl deadline once, when its HTTP transport starts, which may
    come before any store of ours (Orbax, a data pipeline): importing ckpt sets it, and a
    value the user set wins."""
    code = "import os, ckpt; print(os.environ['TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS'])"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORSTORE_CURL_")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.stdout.strip() == "60", run.stderr[-2000:]
    env["TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS"] = "7"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.stdout.strip() == "7", run.stderr[-2000:]


@pytest.mark.parametrize("backend", REMOTES)
def test_an_array_created_with_its_answer_lost_is_opened_on_the_retry(request, tmp_path,
                                                                      proxied, backend):
    """Process 0 writes each array's zarr.json through the store; the server applies the
    request and the answer is lost (500 after the write); the client's retry writes the same
    bytes again over the object it made. The save must go on (the attempt folder is new:
    that zarr.json can only be its own)."""
    proxy = proxied(backend)
    proxy.lose_answer = ("zarr.json", 1)
    url = backend_url(request, tmp_path, backend) + "/lost"
    ckpt.save(url, {"x": np.arange(300_000, dtype=np.float32)})
    assert proxy.lose_answer[1] == 0  # the fault happened
    assert np.array_equal(ckpt.restore(url)["x"], np.arange(300_000, dtype=np.float32))


def test_no_credentials_is_looked_for_again_and_a_named_file_is_never_dropped(monkeypatch):
    """"No credentials" stands for a minute (a credentials file mounted late, a metadata
    server slow at start-up must not leave a run anonymous); "found" for the process; a file
    named by GOOGLE_APPLICATION_CREDENTIALS is left to the client, never replaced by
    anonymous access, even when it cannot be read."""
    import google.auth

    from ckpt.storage import _object

    looks = []

    def default():
        looks.append(1)
        raise google.auth.exceptions.DefaultCredentialsError("none")

    monkeypatch.setattr(google.auth, "default", default)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setattr(_object, "_looked", {})
    assert not _object._google_credentials_found()
    assert not _object._google_credentials_found()
    assert len(looks) == 1  # remembered for a while
    _object._looked["adc"] = (False, time.monotonic() - _object._ANONYMOUS_FOR_S - 1)
    assert not _object._google_credentials_found()
    assert len(looks) == 2  # and looked for again after it
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/no/such/credentials.json")
    assert _object._google_credentials_found()
    assert len(looks) == 2
