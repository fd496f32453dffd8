"""CheckpointManager: steps, retention, one save in flight, debris removal."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ckpt
from ckpt.errors import SaveError
from ckpt.storage import open_store
from tests.helpers.faults import FaultyStore, fail_background, is_background, is_chunk_write
from tests.helpers.saves import started


def _state(step, mesh):
    sharding = NamedSharding(mesh, P("data", "model"))
    return {"w": jax.device_put(jnp.full((64, 128), float(step)), sharding), "step": step}


def test_steps_latest_and_restore(root_url, mesh24):
    with ckpt.CheckpointManager(root_url, keep_last=None) as mgr:
        assert mgr.latest_step() is None
        assert mgr.steps() == []
        for step in (0, 5, 10):
            mgr.save(step, _state(step, mesh24))
        mgr.wait()
        assert mgr.steps() == [0, 5, 10]
        assert mgr.latest_step() == 10
        out = mgr.restore()
        assert out["step"] == 10
        assert float(out["w"][0, 0]) == 10.0
        out = mgr.restore(5, target=_state(0, mesh24))
        assert out["step"] == 5
        assert out["w"].sharding == NamedSharding(mesh24, P("data", "model"))
        assert float(out["w"][3, 3]) == 5.0


def test_keep_last_and_keep_every(root_url, mesh24):
    with ckpt.CheckpointManager(root_url, keep_last=2, keep_every=4) as mgr:
        for step in range(10):
            mgr.save(step, _state(step, mesh24))
    mgr = ckpt.CheckpointManager(root_url, keep_last=2, keep_every=4)
    assert mgr.steps() == [0, 4, 8, 9]
    # Beside the steps, the record of the steps retention removed (docs/format.md, LINEAGE).
    assert sorted(open_store(root_url).list_children()) == ["0", "4", "8", "9", "LINEAGE"]
    mgr.close()


def test_uncommitted_step_is_invisible_and_debris_removed_on_start(root_url, mesh24):
    store = open_store(root_url)
    with ckpt.CheckpointManager(root_url) as mgr:
        mgr.save(1, _state(1, mesh24))
        mgr.save(2, _state(2, mesh24))
    # Step 2 loses its COMMIT and commit claim (as if the crash came before both); step 1
    # gets a stray attempt.
    store.delete("2/COMMIT")
    for claim in store.list("2/claims"):
        store.delete(claim)
    stray = "1/attempt-19990101T000000-abcdefabcdef"
    store.write(f"{stray}/arrays/junk/c/0", b"x")
    mgr = ckpt.CheckpointManager(root_url)
    mgr.close()  # joins the start-up debris removal
    assert mgr.steps() == [1]
    assert mgr.latest_step() == 1
    assert store.list(stray) == []
    assert [p for p in store.list_children("2") if p.startswith("attempt-")] == []
    assert len([p for p in store.list_children("1") if p.startswith("attempt-")]) == 1
    assert float(mgr.restore()["w"][0, 0]) == 1.0


def test_one_save_in_flight_and_failed_save_surfaces_on_next(tmp_path, mesh24):
    attempts = []

    def flaky(doing, key, args):  # the second save fails before writing its chunks
        if is_background(doing, key) and key.split("/")[0] not in attempts:
            attempts.append(key.split("/")[0])
            if len(attempts) == 2:
                raise OSError(5, "injected I/O error")

    mgr = ckpt.CheckpointManager(FaultyStore(tmp_path / "run", before=flaky))
    mgr.save(1, _state(1, mesh24))
    mgr.save(2, _state(2, mesh24))
    with pytest.raises(SaveError, match="injected I/O error"):
        mgr.save(3, _state(3, mesh24))
    # The error was reported once; the manager goes on.
    mgr.save(4, _state(4, mesh24))
    mgr.close()
    assert mgr.steps() == [1, 4]


def test_wait_raises_failed_save(tmp_path):
    mgr = ckpt.CheckpointManager(FaultyStore(tmp_path / "run",
                                             before=fail_background(OSError(5, "boom"))))
    mgr.save(1, {"x": np.ones(100000)})
    with pytest.raises(SaveError, match="boom"):
        mgr.wait()


def test_same_step_twice_is_refused(tmp_path):
    with ckpt.CheckpointManager(tmp_path / "run") as mgr:
        started(mgr.save(1, {"x": 1})).wait()
        with pytest.raises(ckpt.CheckpointExistsError, match="1"):
            mgr.save(1, {"x": 2})
        assert mgr.restore(1) == {"x": 1}


def test_restore_with_no_steps_is_not_found(tmp_path):
    with (ckpt.CheckpointManager(tmp_path / "run") as mgr,
          pytest.raises(ckpt.CheckpointNotFoundError, match="run")):
        mgr.restore()


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_bad_step_numbers(tmp_path, bad):
    with (ckpt.CheckpointManager(tmp_path / "run") as mgr,
          pytest.raises(ValueError, match="step")):
        mgr.save(bad, {"x": 1})


def test_memory_backend_works_like_local(mesh24):
    with ckpt.CheckpointManager("memory://mgr-test/run", keep_last=1) as mgr:
        for s in range(3):
            mgr.save(s, _state(s, mesh24))
    mgr = ckpt.CheckpointManager("memory://mgr-test/run")
    assert mgr.steps() == [2]
    small = jax.sharding.Mesh(np.array(jax.devices()[:2]).reshape(1, 2), ("data", "model"))
    assert float(mgr.restore(mesh=small)["w"][1, 1]) == 2.0
    mgr.close()


def test_error_seen_through_handle_is_not_raised_again(tmp_path):
    mgr = ckpt.CheckpointManager(FaultyStore(tmp_path / "run",
                                             before=fail_background(OSError(5, "boom"))))
    with pytest.raises(SaveError, match="boom"):
        started(mgr.save(1, {"x": np.ones(100000)})).wait()
    mgr.close()  # already reported: closing does not raise it a second time


def test_bad_metrics_are_refused_before_anything_is_written(tmp_path):
    with ckpt.CheckpointManager(tmp_path / "run") as mgr:
        with pytest.raises(ValueError, match="metrics.*'loss'"):
            mgr.save(1, {"x": 1}, metrics={"loss": "low"})  # type: ignore[dict-item]  # on purpose
        assert mgr.steps() == []
        assert not (tmp_path / "run" / "1").exists()


def test_metrics_take_a_bfloat16_loss_and_refuse_what_is_no_real_number(tmp_path):
    with ckpt.CheckpointManager(tmp_path / "r", best_metric="loss") as mgr:
        # save's metrics annotation (dict[str, float]) leaves out the jax and numpy numbers
        # it documents.
        mgr.save(1, {"x": np.zeros(2)},
                 metrics={"loss": jnp.asarray(0.5, jnp.bfloat16),  # type: ignore[dict-item]
                          "acc": np.float16(0.25), "n": 7})  # type: ignore[dict-item]
        mgr.wait()
        assert mgr.metrics(1) == {"loss": 0.5, "acc": 0.25, "n": 7.0}
        with pytest.raises(ckpt.InvalidArgumentError, match=r"bad entries: \['big'\]") as err:
            mgr.save(2, {"x": np.zeros(2)}, metrics={"big": 10**400, "ok": 1.0})
        assert isinstance(err.value, ValueError)
        assert mgr.steps() == [1]


def test_a_closed_manager_refuses_to_save_delete_or_rewind(tmp_path):
    mgr = ckpt.CheckpointManager(tmp_path / "r")
    mgr.save(1, {"x": np.zeros(2)})
    mgr.close()
    for call in (lambda: mgr.save(2, {"x": np.zeros(2)}), lambda: mgr.delete(1),
                 lambda: mgr.rewind(1)):
        with pytest.raises(ckpt.ManagerClosedError, match="closed"):
            call()
    assert mgr.steps() == [1]
    assert mgr.latest_step() == 1


def test_a_save_whose_attempt_another_manager_removed_says_so_and_leaves_nothing(tmp_path):
    """A second writable manager opened on the root while a save writes cleans the
    in-flight attempt up: the save fails with `AttemptRemovedError` saying what happened
    (not a raw storage error), and by the time `wait` raises it has stopped writing and
    nothing of its attempt is left."""
    root = str(tmp_path / "r")
    with ckpt.CheckpointManager(root) as mgr:
        mgr.save(1, {"x": np.zeros(4)})
    second: list[None] = []

    def before(doing, key, args):
        if is_chunk_write(doing) and key == "5" and not second:
            second.append(None)
            with ckpt.CheckpointManager(root, watch_preemption=False):
                pass  # its start-up clean-up removes the attempt being written

    mgr = ckpt.CheckpointManager(FaultyStore(root, before=before))
    big = {f"w{i}": np.full((256, 256), i, np.float32) for i in range(8)}
    with pytest.raises(ckpt.AttemptRemovedError,
                       match="another writable CheckpointManager.*read_only=True") as err:
        started(mgr.save(5, big)).wait()
    assert "NOT_FOUND" not in str(err.value)
    folder = os.path.join(root, "5")
    left = os.listdir(folder) if os.path.isdir(folder) else []
    assert not [n for n in left if n.startswith("attempt-")], left
    mgr.close()
    with ckpt.CheckpointManager(root) as again:
        assert again.steps() == [1]
        started(again.save(5, {"x": np.ones(4)})).wait()
        assert again.restore(5)["x"].tolist() == [1.0] * 4


def test_a_failed_save_removes_its_own_attempt(tmp_path):
    """A save whose writes fail (a full disk) removes what it wrote before `wait` raises:
    no partial attempt stays until the next save or `close`."""
    root = str(tmp_path / "r")

    def before(doing, key, args):
        if is_chunk_write(doing) and key == "2":
            raise OSError(28, "No space left on device")

    with ckpt.CheckpointManager(FaultyStore(root, before=before)) as mgr:
        mgr.save(1, {"x": np.zeros(4)})
        with pytest.raises(SaveError, match="No space left"):
            started(mgr.save(2, {"w": np.ones((256, 256), np.float32)})).wait()
        names = os.listdir(os.path.join(root, "2"))
        assert not [n for n in names if n.startswith("attempt-")], names
        assert mgr.steps() == [1]


def test_a_step_that_is_not_there_names_the_steps_near_it(tmp_path):
    root = str(tmp_path / "run")
    with ckpt.CheckpointManager(root, watch_preemption=False) as mgr:
        for step in (100, 200, 300, 400, 500):
            mgr.save(step, {"x": step})
        mgr.wait()
        near = r"committed steps near it: 300, 400, 500; 5 in all, the newest 500"
        with pytest.raises(ckpt.CheckpointNotFoundError,
                           match=rf"no committed step 450 under .*run \({near}\)"):
            mgr.restore(450)
        with pytest.raises(ckpt.CheckpointNotFoundError,
                           match=rf"cannot rewind to step 450: .*\({near}\)"):
            mgr.rewind(450)
        assert mgr.steps() == [100, 200, 300, 400, 500]
        assert mgr.restore(100)["x"] == 100
