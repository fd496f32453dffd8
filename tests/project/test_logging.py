"""The library logs through `logging.getLogger("ckpt")` and prints nothing by itself; a
save's timings are on its handle; `ckpt -v` shows the INFO lines."""

import logging
import os
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

import ckpt
from ckpt.cli import main
from tests.helpers.saves import started


def _messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name.startswith("ckpt")]


def test_save_restore_retention_and_clean_up_are_logged_with_timings(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ckpt")
    root = str(tmp_path / "run")
    tree = {"w": np.arange(100_000, dtype=np.float32), "step": 1}
    with ckpt.CheckpointManager(root, keep_last=1, watch_preemption=False) as mgr:
        first = started(mgr.save(1, tree))
        first.wait()
        started(mgr.save(2, tree)).wait()
        mgr.restore(2)
    t = first.timings
    assert isinstance(t, ckpt.SaveTimings)
    assert t.nbytes == 400_000 + 0 and t.written_bytes == 400_000 and t.leaves == 2, t
    assert 0 <= t.blocked_s <= t.total_s and t.write_s >= 0 and t.commit_s >= 0, t
    assert abs(t.blocked_s + t.write_s + t.commit_s - t.total_s) < 1e-6, t
    assert t.mib_per_s > 0
    text = "\n".join(_messages(caplog))
    assert f"saving step 1 ({root}/1): 2 leaves" in text, text
    committed = next(m for m in _messages(caplog) if m.startswith("committed step 1"))
    for word in ("MiB", "2 leaves", "blocked", "write", "commit", "total", "MiB/s"):
        assert word in committed, committed
    assert f"retention: deleted step 1 under {root}" in text, text
    assert "restored" in text and "read 0.4 MiB" in text, text


def test_orbax_detection_and_start_up_clean_up_are_logged(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ckpt")
    item = str(tmp_path / "orbax")
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as c:
        c.save(item, args=ocp.args.PyTreeSave({"a": np.arange(8.0)}))
    ckpt.restore(item)
    assert any("orbax-checkpoint checkpoint" in m for m in _messages(caplog))
    root = tmp_path / "run"
    debris = root / "3" / "attempt-20260101T000000-000000000000"
    debris.mkdir(parents=True)
    (debris / "x").write_bytes(b"1")
    with ckpt.CheckpointManager(str(root), watch_preemption=False):
        pass  # close() waits for the start-up clean-up
    assert any(m.startswith("clean-up: removed uncommitted attempts") and "step 3" in m
               for m in _messages(caplog)), _messages(caplog)


QUIET = """
import numpy as np
import ckpt
with ckpt.CheckpointManager("run", keep_last=1, watch_preemption=False) as mgr:
    for step in (1, 2):
        mgr.save(step, {"w": np.arange(10.0)})
    mgr.restore()
"""


@pytest.mark.slow  # starts processes
def test_nothing_is_printed_unless_the_application_configures_logging(tmp_path):
    run = subprocess.run([sys.executable, "-c", QUIET], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout == "" and "ckpt" not in run.stderr, run.stderr


def test_verbose_flag_before_or_after_the_subcommand(tmp_path, capsys):
    item = str(tmp_path / "orbax")
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as c:
        c.save(item, args=ocp.args.PyTreeSave({"a": np.arange(8.0)}))
    assert main(["-v", "convert", "-q", item, str(tmp_path / "a")]) == 0
    assert "orbax-checkpoint checkpoint" in capsys.readouterr().err
    assert main(["convert", "-q", item, str(tmp_path / "b"), "-v"]) == 0
    assert "orbax-checkpoint checkpoint" in capsys.readouterr().err
    assert main(["convert", "-q", item, str(tmp_path / "c")]) == 0
    assert "orbax-checkpoint" not in capsys.readouterr().err
    assert not logging.getLogger("ckpt").handlers[1:]  # -v's handler was removed again


def test_the_cli_shows_the_librarys_warnings_without_verbose(tmp_path, capsys):
    """A warning of the library (here: an unreadable claim, treated as a commit claim) is
    shown by the command line without -v; its INFO lines are not."""
    root = tmp_path / "run"
    with ckpt.CheckpointManager(str(root)) as mgr:
        mgr.save(1, {"w": np.arange(8.0)})
    attempt = "attempt-20260101T000000-000000000000"
    (root / "2" / attempt).mkdir(parents=True)
    (root / "2" / attempt / "x").write_bytes(b"1")
    (root / "2" / "claims").mkdir()
    (root / "2" / "claims" / attempt).write_bytes(b"\xc1 not msgpack")
    assert main(["list", str(root)]) == 0
    err = capsys.readouterr().err
    assert "cannot read the claim" in err and "treating it as a commit claim" in err, err
    assert "clean-up" not in err  # INFO lines need -v
