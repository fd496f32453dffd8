"""Every Python example in README.md and docs/ runs, as written, against a local root.

Each example is executed with the names it leaves to the reader (``params``,
``train_step``, ...) bound to small real values, its bucket URL replaced by a temporary
folder, and its outcome checked. A new example must be added to RUN (with a check) or to
ILLUSTRATIVE (with the test that covers it instead).
"""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ckpt

REPO = pathlib.Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _blocks(doc):
    return BLOCK.findall((REPO / doc).read_text())


ILLUSTRATIVE = {
    # Orbax paths in a bucket: the same calls run on real Orbax output in tests/test_orbax.py.
    ("README.md", 1),
}


def _loop_names(tmp_path):
    params = {"w": jnp.ones((8, 4)), "b": jnp.zeros(4)}
    optimizer = optax.adam(1e-3)

    def guide_train_step(state, batch):
        return {**state, "params": jax.tree.map(lambda p: p + batch, state["params"])}

    def readme_train_step(p, opt, batch):
        return jax.tree.map(lambda x: x + batch, p), opt, 0.0

    return {"params": params, "optimizer": optimizer, "opt_state": optimizer.init(params),
            "num_steps": 2_000, "eval_loss": 0.5, "next_batch": lambda loader: 1.0,
            "batch": lambda step: 1.0, "guide_train_step": guide_train_step,
            "readme_train_step": readme_train_step}


def _run(doc, index, names, urls):
    code = _blocks(doc)[index]
    for url, path in urls.items():
        assert url in code, (doc, index, url)
        code = code.replace(url, str(path))
    names.setdefault("ckpt", ckpt)  # later examples of a page continue the first one
    exec(compile(code, f"{doc} example {index}", "exec"), names)  # noqa: S102
    return names


def test_every_example_is_run_or_covered_elsewhere():
    found = {(doc, i) for doc in ("README.md", *(f"docs/{p.name}" for p in
                                                 sorted((REPO / "docs").glob("*.md"))))
             for i in range(len(_blocks(doc)))}
    assert found == set(RUN) | ILLUSTRATIVE


def readme_loop(tmp_path):
    names = _loop_names(tmp_path)
    names["train_step"] = names["readme_train_step"]
    root = tmp_path / "run-7"
    _run("README.md", 0, names, {"gs://my-bucket/run-7": root})
    mgr = ckpt.CheckpointManager(str(root), read_only=True)
    assert mgr.steps() == [1000, 2000]
    out = mgr.restore(2000)
    assert out["step"] == 2000 and np.all(out["params"]["w"] == 2001.0)


def guide_loop(tmp_path):
    names = _loop_names(tmp_path)
    names["train_step"] = names["guide_train_step"]
    root = tmp_path / "exp7"
    _run("docs/guide.md", 0, names, {"gs://my-bucket/runs/exp7": root})
    mgr = ckpt.CheckpointManager(str(root), read_only=True)
    assert mgr.steps() == [1000, 2000]
    assert mgr.restore(2000)["params"]["b"][0] == 2000.0


def guide_rewind(tmp_path):
    root = str(tmp_path / "run")
    state = {"params": {"w": np.zeros(4)}, "loader": {"position": 0}, "step": 0}
    with ckpt.CheckpointManager(root) as mgr:
        for step in (8_000, 9_000, 9_100, 9_400):
            mgr.save(step, {**state, "step": step, "loader": {"position": step}})
    names = {"root": root, "state": state, "skip_batches": 600, "num_steps": 9_002}
    names = _run("docs/guide.md", 1, names, {})
    assert names["mgr"].steps() == [8_000, 9_000]
    assert names["state"]["loader"]["position"] == 9_600
    names["mgr"].save(9_001, names["state"])  # the new branch is accepted
    names["mgr"].close()
    assert ckpt.CheckpointManager(root, read_only=True).steps() == [8_000, 9_000, 9_001]


def guide_read_only(tmp_path):
    root = str(tmp_path / "trainer")
    with ckpt.CheckpointManager(root) as mgr:
        mgr.save(3, {"params": {"w": np.arange(4.0)}, "opt": {"mu": np.zeros(4)}})
    abstract = {"params": {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}}
    names = _run("docs/guide.md", 2, {"trainer_root": root, "abstract_state": abstract}, {})
    assert np.array_equal(names["params"]["w"], np.arange(4.0))
    with pytest.raises(ckpt.errors.ReadOnlyError):
        names["evaluator"].delete(3)


def readme_logging(tmp_path):
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        names = _run("README.md", 2, {}, {"/tmp/ckpt-logging-example": tmp_path / "ex"})
    finally:  # basicConfig in the example must not leak into other tests
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
    t = names["handle"].timings
    assert isinstance(t, ckpt.SaveTimings) and t.nbytes == 8000 and t.total_s >= t.blocked_s


RUN = {("README.md", 0): readme_loop, ("README.md", 2): readme_logging,
       ("docs/guide.md", 0): guide_loop, ("docs/guide.md", 1): guide_rewind,
       ("docs/guide.md", 2): guide_read_only}


@pytest.mark.parametrize("example", sorted(RUN), ids=lambda e: f"{e[0]}#{e[1]}")
def test_example_runs(example, tmp_path):
    RUN[example](tmp_path)
