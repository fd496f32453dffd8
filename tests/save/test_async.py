"""Asynchronous save: the snapshot is independent of the caller's arrays."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ckpt
from ckpt.errors import CheckpointExistsError, SaveError, UnsupportedLeafError
from ckpt.storage import Op
from tests.helpers import REPO
from tests.helpers.faults import FaultyStore, fail_background, hold_background, tamper_reports


@functools.partial(jax.jit, donate_argnums=0)
def _update(params):
    return jax.tree.map(lambda p: p * 3.0 + 1.0, params)


def test_donating_arrays_right_after_save_async_keeps_saved_values(tmp_path, mesh24):
    import threading

    # Hold the background writes until the arrays have been donated and overwritten, so the
    # snapshot is certainly still pending when the donation happens.
    gate = threading.Event()
    held = FaultyStore(tmp_path / "c", before=hold_background(gate))
    rng = np.random.default_rng(1)
    host = {f"w{i}": rng.standard_normal((256, 512)).astype(np.float32) for i in range(4)}
    params = {k: jax.device_put(v, NamedSharding(mesh24, P("data", "model")))
              for k, v in host.items()}
    handle = ckpt.save_async(held, params)
    params = _update(params)  # donates every saved buffer
    params = _update(params)
    jax.block_until_ready(params)
    gate.set()
    handle.wait()
    out = ckpt.restore(tmp_path / "c")
    for k, v in host.items():
        assert out[k].tobytes() == v.tobytes()
    np.testing.assert_allclose(np.asarray(params["w0"]), (host["w0"] * 3 + 1) * 3 + 1,
                               rtol=1e-5, atol=1e-5)


def test_deleting_arrays_and_mutating_numpy_after_save_async(tmp_path, mesh24):
    x = jax.device_put(jnp.arange(65536.0).reshape(256, 256), NamedSharding(mesh24, P("model")))
    expected = np.asarray(x).copy()
    n = np.arange(100000, dtype=np.int64)
    handle = ckpt.save_async(tmp_path / "c", {"x": x, "n": n})
    x.delete()
    n[:] = -1
    handle.wait()
    out = ckpt.restore(tmp_path / "c")
    assert out["x"].tobytes() == expected.tobytes()
    np.testing.assert_array_equal(out["n"], np.arange(100000))


def test_handle_reports_background_failure(tmp_path, mesh24):
    no_space = OSError(28, "No space left on device")
    full = FaultyStore(tmp_path / "c", before=fail_background(no_space))
    handle = ckpt.save_async(full, {"x": jnp.ones(10000)})
    exc = handle.exception()
    assert isinstance(exc, SaveError)
    assert "No space left" in str(exc)
    assert handle.done()
    with pytest.raises(SaveError, match="No space left"):
        handle.wait()
    assert not (tmp_path / "c" / "COMMIT").exists()
    with pytest.raises(ckpt.CheckpointNotFoundError):
        ckpt.restore(tmp_path / "c")


def test_wait_timeout_raises_timeout_error(tmp_path):
    import threading

    gate = threading.Event()
    slow = FaultyStore(tmp_path / "c", before=hold_background(gate))
    handle = ckpt.save_async(slow, {"x": np.ones(10000)})
    with pytest.raises(TimeoutError):
        handle.wait(timeout=0.05)
    assert not handle.done()
    gate.set()
    handle.wait()
    assert handle.done()
    assert handle.exception() is None


def test_save_over_committed_checkpoint_is_refused(tmp_path):
    ckpt.save(tmp_path / "c", {"a": 1})
    before = sorted(os.listdir(tmp_path / "c"))
    with pytest.raises(CheckpointExistsError, match=str(tmp_path / "c")):
        ckpt.save(tmp_path / "c", {"a": 2})
    assert sorted(os.listdir(tmp_path / "c")) == before
    assert ckpt.restore(tmp_path / "c") == {"a": 1}


@pytest.mark.parametrize(("leaf", "kind"), [(object(), "object"), ({1, 2}, "set"),
                                        (np.array(["a"], dtype=object), "object")])
def test_unsupported_leaf_names_key_path_and_writes_nothing(tmp_path, leaf, kind):
    with pytest.raises(UnsupportedLeafError) as err:
        ckpt.save_async(tmp_path / "c", {"good": 1, "deep": [0, {"bad": leaf}]})
    assert "deep/1/bad" in str(err.value)
    assert kind in str(err.value)
    assert isinstance(err.value, TypeError)
    assert not (tmp_path / "c").exists()


def test_metadata_must_be_plain_data(tmp_path):
    with pytest.raises(ckpt.errors.InvalidMetadataError):
        ckpt.save(tmp_path / "c", {"a": 1}, metadata={"obj": object()})
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(("tamper", "message"), [
    (lambda rows: rows[1:], r"chunk 0 of leaf x was not reported by its writer, process 0"),
    (lambda rows: rows + rows[:1], r"reports chunk 0 of x, which process 0 owns"),
    (lambda rows: [[r[0], r[1], r[2] + 1, r[3]] for r in rows], r"bytes for chunk 0 of x"),
    (lambda rows: [["nope", 0, 4, 0]], "unknown chunk 0 of 'nope'"),
])
def test_commit_checks_host_reports_against_plan(tmp_path, mesh24, tamper, message):
    x = jax.device_put(jnp.ones((64, 1024)), NamedSharding(mesh24, P("data", "model")))
    with pytest.raises(SaveError, match=message):
        ckpt.save(FaultyStore(tmp_path / "c", before=tamper_reports(tamper)), {"x": x})
    assert not (tmp_path / "c" / "COMMIT").exists()


def test_overwrite_is_atomic_old_readable_until_new_commits(tmp_path):
    import threading

    from ckpt.storage import open_store

    url = tmp_path / "c"
    ckpt.save(url, {"x": np.full(50000, 1.0)})
    old_attempt = ckpt.metadata(url).attempt
    reached, release = threading.Event(), threading.Event()

    def pause_commit(doing, key, args):
        if doing == Op.WRITE and key.endswith("/manifest.msgpack"):  # commit's first write
            reached.set()
            release.wait()

    paused = FaultyStore(url, before=pause_commit)
    handle = ckpt.save_async(paused, {"x": np.full(50000, 2.0)}, overwrite=True)
    reached.wait()
    # The new data is written, its COMMIT not yet: readers still get the old checkpoint.
    assert (ckpt.restore(url)["x"] == 1.0).all()
    release.set()
    handle.wait()
    assert (ckpt.restore(url)["x"] == 2.0).all()
    assert old_attempt not in open_store(url).list_children()


@pytest.mark.slow  # starts processes
def test_a_save_that_fails_at_exit_makes_the_process_exit_non_zero(tmp_path):
    """A script returns with a save in flight whose commit then fails (a full disk): one
    line on stderr names it, and the exit status is 1, not 0 (a scheduler must not record
    the lost last checkpoint as success). The same script with a save that commits exits
    0."""
    import subprocess
    import sys

    repo = str(REPO)
    script = (
        "import sys, numpy as np, ckpt\n"
        "from tests.helpers.faults import FaultyStore, fail_background\n"
        "fail = sys.argv[2] == 'fail'\n"
        "store = FaultyStore(sys.argv[1], before=fail_background(\n"
        "    OSError(28, 'No space left on device')) if fail else None)\n"
        "ckpt.save_async(store, {'x': np.arange(10)})\n"
        "print('returned', flush=True)\n")
    for how, status in (("fail", 1), ("commit", 0)):
        url = tmp_path / how
        run = subprocess.run([sys.executable, "-c", script, str(url), how], cwd=repo,
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert run.returncode == status, (how, run.stderr[-2000:])
        assert run.stdout.startswith("returned"), run.stdout
        lost = [line for line in run.stderr.splitlines() if line.startswith("ckpt:")]
        if how == "fail":
            assert len(lost) == 1
            assert "was not committed" in lost[0]
            assert str(url) in lost[0]
            assert "No space left" in lost[0]
        else:
            assert not lost
            assert os.path.exists(url / "COMMIT")
