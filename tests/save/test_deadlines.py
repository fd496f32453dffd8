"""A deadline never abandons what changes COMMIT (docs/protocol.md, "Deadlines")."""

import threading
import time

import numpy as np

import ckpt
from ckpt.storage import Op
from tests.helpers.faults import FaultyStore


def test_an_overwrite_whose_commit_write_outlasts_the_deadline_is_finished(tmp_path):
    """The overwrite's COMMIT write is slower than ``timeout_s``. Abandoned, it could land
    after the next save and bring the older checkpoint back; it must run to its end."""
    url = str(tmp_path / "ck")
    ckpt.save(url, {"v": np.zeros(4)})
    started = {}

    def slow(doing, key, args):
        if doing == Op.WRITE and key == "COMMIT" and "t0" in started:
            started["slowed"] = time.monotonic()
            while time.monotonic() < started["t0"] + 1.5:  # past the save's deadline
                threading.Event().wait(0.05)

    started["t0"] = time.monotonic()
    ckpt.save(FaultyStore(url, before=slow), {"v": np.ones(4)}, timeout_s=1, overwrite=True)
    # The fault happened (the COMMIT write was held past the deadline) and was waited for.
    assert "slowed" in started
    assert time.monotonic() - started["t0"] >= 1.5
    assert ckpt.restore(url)["v"].tolist() == [1.0] * 4
    started.clear()
    ckpt.save(url, {"v": np.full(4, 2.0)}, overwrite=True)
    assert not [t for t in threading.enumerate() if t.name == "ckpt-deadline-call"]
    assert ckpt.restore(url)["v"].tolist() == [2.0] * 4
