"""Every Python example in README.md and docs/ runs, as written, against a local root.

Each example is executed with the names it leaves to the reader (``params``,
``train_step``, ...) bound to small real values, its bucket URL replaced by a temporary
folder, and its outcome checked. A new example must be added to RUN (with a check) or to
ILLUSTRATIVE (with the test that covers it instead).
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ckpt
from ckpt._names import DEFAULT_RULES
from tests.helpers import REPO

BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _blocks(doc):
    return BLOCK.findall((REPO / doc).read_text())


ILLUSTRATIVE = {
    # Orbax paths in a bucket: the same calls run on real Orbax output in
    # tests/formats/test_orbax.py.
    ("README.md", 1),
    # Peer replicas need several processes: tests/runs/test_peers.py saves with them and
    # restores after replaced hosts in real 2- and 4-process jobs.
    ("docs/guide.md", 8),
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
    assert out["step"] == 2000
    assert np.all(out["params"]["w"] == 2001.0)


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
    names = _run("docs/guide.md", 5, {"trainer_root": root, "abstract_state": abstract}, {})
    assert np.array_equal(names["params"]["w"], np.arange(4.0))
    with pytest.raises(ckpt.errors.ReadOnlyError):
        names["evaluator"].delete(3)


def guide_evaluators(tmp_path):
    root = str(tmp_path / "trainer")
    with ckpt.CheckpointManager(root, keep_last=2) as trainer:
        for step in (1, 2, 3):
            trainer.save(step, {"params": {"w": np.full(4, float(step))}})
    reported: list = []
    abstract = {"params": {"w": jax.ShapeDtypeStruct((4,), jnp.float64)}}
    names = {"trainer_root": root, "last_evaluated": 1, "abstract_state": abstract,
             "evaluate": lambda params: float(params["w"][0]),
             "report": lambda step, value: reported.append((step, value))}
    _run("docs/guide.md", 6, names, {"timeout_s=3_600, poll_s=30": "timeout_s=0"})
    assert reported == [(2, 2.0), (3, 3.0)]


def guide_per_host(tmp_path):
    names = _run("docs/guide.md", 2, {}, {})
    root = str(tmp_path / "run")
    params = {"w": jnp.ones(4)}
    first = names["run"](root, params)
    assert first["step"] == 3
    again = names["run"](root, params)  # resumes: the iterator continues where it was
    assert again["step"] == 6
    assert again["host_seed"] == ckpt.PerProcess(1234)
    straight = iter(__import__("grain").MapDataset.range(10_000).shuffle(seed=0).batch(32))
    expected = [next(straight) for _ in range(7)][-1]
    assert np.array_equal(next(again["loader"]), expected)


def guide_orbax_move(tmp_path):
    import orbax.checkpoint as ocp

    root = str(tmp_path / "orbax-run")
    state = {"params": {"w": jnp.zeros(4)}, "step": jnp.array(0)}
    with ocp.CheckpointManager(root) as manager:
        for step in (1, 2):
            manager.save(step, args=ocp.args.StandardSave(
                {"params": {"w": jnp.full(4, float(step))}, "step": jnp.array(step)}))
        manager.wait_until_finished()
    names = _run("docs/guide.md", 3, {}, {})
    mgr, resumed = names["resume"](root, state)
    assert int(resumed["step"]) == 2
    assert float(resumed["params"]["w"][0]) == 2.0
    assert mgr.save(1_000, resumed) is not None  # this library's step beside Orbax's
    mgr.close()
    assert ckpt.CheckpointManager(root, read_only=True).steps() == [1, 2, 1_000]


def _leaf_bytes(tree):
    def raw(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return str(jax.random.key_impl(x)), np.asarray(jax.random.key_data(x)).tobytes()
        return np.asarray(x).tobytes()
    return [raw(x) for x in jax.tree.leaves(tree)]


def guide_whole_run(tmp_path):
    """The whole run: interrupted and resumed, and moved over from an Orbax run of the same
    loop, it ends bit for bit where the uninterrupted run ends; a rewind starts a branch."""
    import grain
    import orbax.checkpoint as ocp
    from flax import nnx

    names = _run("docs/guide.md", 4, {}, {})
    train = names["train"]
    straight = _leaf_bytes(nnx.state(train(str(tmp_path / "straight"), 400)))
    root = str(tmp_path / "run")
    train(root, 250)  # ends at step 250, as a preempted job would
    assert _leaf_bytes(nnx.state(train(root, 400))) == straight
    mgr = ckpt.CheckpointManager(root, read_only=True, best_metric="loss")
    assert mgr.steps() == [250, 300, 400]
    assert mgr.best_step() in mgr.steps()
    train(root, 450, rewind_to=300, skip_batches=5)
    assert ckpt.CheckpointManager(root, read_only=True).steps() == [300, 400, 450]
    # Orbax ran the first 250 steps of the same loop; the guide's code takes over.
    config = {"lr": 1e-3, "batch_size": 8, "seed": 0}
    model = names["Model"](nnx.Rngs(params=0, dropout=1))
    optimizer = nnx.Optimizer(model, names["optax"].adamw(config["lr"]), wrt=nnx.Param)
    # As docs/guide.md's loader: np.float32 of a list makes an array, which numpy's stubs
    # do not allow for.
    loader = iter(grain.MapDataset.range(1_000_000).shuffle(seed=0)[0::1]
                  .map(lambda i: np.float32([i % 3, i % 5, i % 7, i % 11])  # type: ignore[arg-type]
                       / 10).batch(8))
    for _ in range(250):
        names["train_step"](model, optimizer, next(loader))
    orbax_root = str(tmp_path / "orbax-run")
    with ocp.CheckpointManager(orbax_root) as manager:
        manager.save(250, args=ocp.args.Composite(
            model=ocp.args.StandardSave(nnx.state(model)),
            opt=ocp.args.StandardSave(nnx.state(optimizer)),
            loader=grain.checkpoint.CheckpointSave(loader),
            config=ocp.args.JsonSave(config), step=ocp.args.JsonSave(250)))
        manager.wait_until_finished()
    assert _leaf_bytes(nnx.state(train(orbax_root, 400))) == straight
    assert ckpt.CheckpointManager(orbax_root, read_only=True).steps() == [250, 300, 400]


def readme_logging(tmp_path):
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        names = _run("README.md", 4, {}, {"/tmp/ckpt-logging-example": tmp_path / "ex"})
    finally:  # basicConfig in the example must not leak into other tests
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
    t = names["handle"].timings
    assert isinstance(t, ckpt.SaveTimings)
    assert t.nbytes == 8000
    assert t.total_s >= t.blocked_s


def _exported(tmp_path):
    """A run's step with params and optimizer state, exported by README's example."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    step = tmp_path / "runs" / "exp7" / "2000"
    ckpt.save(str(step), {"params": {"layers": [{"w": w}]}, "opt_state": {"mu": w}})
    urls = {"gs://my-bucket/runs/exp7/2000": step, "gs://my-bucket/deploy/exp7":
            tmp_path / "deploy"}
    names = _run("README.md", 2, {}, urls)
    assert names["result"].files == ["model.safetensors"]
    assert set(names["result"].tensors) == {"model.layers.0.w"}  # optimizer state left out
    return names, urls, w


def readme_export(tmp_path):
    from safetensors.numpy import load_file

    _, urls, w = _exported(tmp_path)
    loaded = load_file(str(urls["gs://my-bucket/deploy/exp7"] / "model.safetensors"))
    assert loaded["model.layers.0.w"].tobytes() == w.astype(jnp.bfloat16).tobytes()


def readme_import(tmp_path):
    names, urls, w = _exported(tmp_path)
    names["abstract_params"] = {"params": {"layers": [
        {"w": jax.ShapeDtypeStruct((8, 4), jnp.bfloat16)}]}}
    deploy = {"gs://my-bucket/deploy/exp7": urls["gs://my-bucket/deploy/exp7"]}
    with pytest.warns(ckpt.errors.UnshardedTargetWarning):
        _run("README.md", 3, names, deploy)
    got = names["params"]["params"]["layers"][0]["w"]
    assert np.asarray(got).tobytes() == w.astype(jnp.bfloat16).tobytes()


def safetensors_export(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    step = tmp_path / "2000"
    ckpt.save(str(step), {"params": {"w": w, "b": np.zeros(4, np.float32)},
                          "opt_state": {"mu": w}, "step": 2000})
    names = _run("docs/safetensors.md", 0, {}, {"gs://my-bucket/runs/exp7/2000": step,
                                                "gs://my-bucket/deploy/exp7": tmp_path / "d"})
    assert set(names["result"].tensors) == {"model.w", "model.b"}
    assert names["result"].left_out == {"opt_state/mu":
                                        f"name rule '{DEFAULT_RULES[0]}'",
                                        "step": "not an array (value)"}


def safetensors_import(tmp_path):
    from flax import nnx
    from safetensors.numpy import save_file

    from tests.conftest import make_mesh

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(8, 16, rngs=rngs)
            self.norm = nnx.LayerNorm(16, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)  # RNG state the file does not hold

        def __call__(self, x):
            return self.drop(self.norm(self.up(x)))

    def host(param: nnx.Param[jax.Array] | None) -> np.ndarray:
        assert param is not None  # made with flax's defaults: every bias and scale is there
        return np.asarray(param[...])

    published = Model(nnx.Rngs(5))
    weights = {"up.kernel": host(published.up.kernel),
               "up.bias": host(published.up.bias),
               "norm.scale": host(published.norm.scale),
               "norm.bias": host(published.norm.bias)}
    folder = tmp_path / "tiny-model"
    folder.mkdir()
    save_file(weights, str(folder / "model.safetensors"))
    names = _run("docs/safetensors.md", 1, {"Model": Model, "mesh": make_mesh((2, 4))},
                 {"s3://weights/tiny-model": folder})
    model = names["model"]
    assert model.up.kernel[...].sharding.spec == jax.sharding.PartitionSpec("data", "model")
    for name, value in weights.items():
        layer, field = name.split(".")
        assert np.asarray(getattr(getattr(model, layer), field)[...]).tobytes() == \
            value.tobytes(), name
    # The RNG state is real, the same as a model made with nnx.Rngs(0): the model runs.
    fresh = nnx.state(Model(nnx.Rngs(0)), nnx.RngState)
    got = nnx.state(model, nnx.RngState)
    assert jax.tree.all(jax.tree.map(
        lambda a, b: bool(np.array_equal(jax.random.key_data(a), jax.random.key_data(b)))
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else bool(np.array_equal(a, b)),
        fresh, got))
    assert model(jnp.ones((2, 8))).shape == (2, 16)


def guide_local_tier(tmp_path):
    names = _loop_names(tmp_path)
    names["train_step"] = names["guide_train_step"]
    names["state"] = {"params": names["params"], "step": 0}
    root, local = tmp_path / "exp8", tmp_path / "local-ssd"
    _run("docs/guide.md", 7, names, {"gs://my-bucket/runs/exp8": root,
                                     "/mnt/local-ssd/ckpt": local})
    assert sorted(os.listdir(root)) == ["10", "5", "LINEAGE"]  # LINEAGE: docs/format.md
    assert sorted(os.listdir(local)) == ["10", "9"]
    with ckpt.CheckpointManager(str(root), local_dir=str(local), persist_every=5) as mgr:
        assert mgr.steps() == [5, 9, 10]
        assert mgr.restore(9, target=names["state"])["params"]["b"][0] == 9.0


def tools_from_python(tmp_path):
    from tests.conftest import make_mesh

    step = tmp_path / "2000"
    kernel = np.arange(256 * 1024, dtype=np.float32).reshape(256, 1024)  # not inline
    sharding = jax.sharding.NamedSharding(make_mesh((2, 4)), jax.sharding.PartitionSpec(
        "data", "model"))
    ckpt.save(str(step), {"params": {"dense": {"kernel": jax.device_put(kernel, sharding)}},
                          "step": 2000})
    names = _run("docs/tools.md", 0, {"jax": jax},
                 {"gs://my-bucket/runs/exp7/2000": step,
                  "gs://my-bucket/serve/exp7": tmp_path / "serve"})
    assert names["report"].ok
    assert names["result"].mesh == {"data": 4, "model": 2}
    assert names["same"].equal and names["same"].bytes_read > 0  # another grid: read
    (leaf,) = [x for x in ckpt.metadata(str(tmp_path / "serve")).leaves if x.shape]
    assert leaf.spec is not None  # an array's
    assert tuple(leaf.spec) == (None, "model")
    assert np.array_equal(ckpt.restore(str(tmp_path / "serve"))["params"]["dense"]["kernel"],
                          kernel)
    assert ckpt.verify(str(tmp_path / "serve")).ok


def architecture_store_tests(tmp_path):
    """The example is a test module: pytest runs it, and so the whole conformance suite
    against the example's store; a store that loses writes fails it."""
    import subprocess
    import sys

    from ckpt.storage.testing import StoreConformance

    code = _blocks("docs/architecture.md")[0]
    suite = len([n for n in dir(StoreConformance) if n.startswith("test_")])
    for name, body, ok in [("good", code, True),
                           ("lossy", code.replace("super()._write(key, data)", "pass"), False)]:
        module = tmp_path / f"test_{name}_store.py"
        module.write_text(body)
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              str(module)], capture_output=True, text=True, cwd=tmp_path,
                             timeout=600)
        summary = run.stdout.strip().splitlines()[-1]
        if ok:
            assert run.returncode == 0 and " passed" in summary, run.stdout[-3000:]
            assert int(summary.split(" passed")[0].split()[-1]) >= suite, summary
        else:
            assert run.returncode == 1 and " failed" in summary, run.stdout[-3000:]


RUN = {("README.md", 0): readme_loop, ("README.md", 2): readme_export,
       ("README.md", 3): readme_import, ("README.md", 4): readme_logging,
       ("docs/safetensors.md", 0): safetensors_export,
       ("docs/safetensors.md", 1): safetensors_import,
       ("docs/guide.md", 0): guide_loop, ("docs/guide.md", 1): guide_rewind,
       ("docs/guide.md", 2): guide_per_host, ("docs/guide.md", 3): guide_orbax_move,
       ("docs/guide.md", 4): guide_whole_run, ("docs/guide.md", 5): guide_read_only,
       ("docs/guide.md", 6): guide_evaluators, ("docs/guide.md", 7): guide_local_tier,
       ("docs/tools.md", 0): tools_from_python,
       ("docs/architecture.md", 0): architecture_store_tests}


# Examples that start a process, or train a whole run three times over.
SLOW_EXAMPLES = {("docs/architecture.md", 0), ("docs/guide.md", 4)}


@pytest.mark.parametrize("example", [
    pytest.param(e, marks=[pytest.mark.slow] if e in SLOW_EXAMPLES else [],
                 id=f"{e[0]}#{e[1]}") for e in sorted(RUN)])
def test_example_runs(example, tmp_path):
    RUN[example](tmp_path)


CLI_BLOCK = re.compile(r"```bash\n(.*?)```", re.S)


def _cli_commands(doc):
    """Every `ckpt ...` line of the document's bash blocks, a `for` loop expanded, optional
    [parts] taken, placeholders left for the caller."""
    import shlex

    out = []
    for block in CLI_BLOCK.findall((REPO / doc).read_text()):
        for line in block.splitlines():
            loop = re.match(r"for (\w+) in ([^;]+); do (.*); done", line.strip())
            bodies = ([loop.group(3).replace(f"${loop.group(1)}", v)
                       for v in loop.group(2).split()] if loop else [line])
            for body in bodies:
                words = shlex.split(body.replace("[", "").replace("]", ""), comments=True)
                if words[:1] == ["ckpt"]:
                    out.append(words[1:])
    return out


def test_every_documented_cli_example_runs(tmp_path, capsys):
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from ckpt.cli import main
    from tests.conftest import make_mesh

    mesh = make_mesh((2, 4))
    # Flax-like: nested, and a 1-d bias that a rule for every leaf could not lay out.
    kernel = np.arange(64 * 128, dtype=np.float32).reshape(64, 128)
    tree = {"params": {"dense": {
        "kernel": jax.device_put(kernel, NamedSharding(mesh, P("data", "model"))),
        "bias": jax.device_put(np.ones(8192, np.float32), NamedSharding(mesh, P()))}},
        "step": 7}
    orbax_run = tmp_path / "orbax-run-6"
    with ocp.CheckpointManager(str(orbax_run)) as manager:
        for step in (40000, 41000):
            manager.save(step, args=ocp.args.StandardSave(tree))
        manager.wait_until_finished()
    places = {"gs://bucket/deploy": str(tmp_path / "deploy"),
              "HF_DIR": str(tmp_path / "hf"), "RULE": "drop bias$", "PATTERN": "kernel",
              "gs://bucket/run-6-ckpt": str(tmp_path / "run-6-ckpt"),
              "gs://bucket/run-6": str(orbax_run), "s3://new/run-6": str(tmp_path / "new-6"),
              "OLD": str(orbax_run / "41000"), "NEW": str(tmp_path / "new-relaid"),
              "URL": str(tmp_path / "run-6-ckpt" / "41000"),
              "ROOT": str(tmp_path / "run-6-ckpt"), "SRC": str(tmp_path / "run-6-ckpt" / "40000"),
              "DST": str(tmp_path / "resharded"), "N": "1"}
    ran = 0
    for doc in ("README.md",):
        for words in _cli_commands(doc):
            argv = []
            for w in words:
                for name, value in places.items():
                    w = value if w == name else w.replace(name, value)
                argv.append(w)
            assert main(argv) == 0, (doc, words, capsys.readouterr().err)
            ran += 1
    assert ran >= 9
    # The converted steps are a run of ours; `gc --dry-run --keep-last 1` removed nothing.
    assert ckpt.CheckpointManager(places["ROOT"], read_only=True).steps() == [40000, 41000]
    assert ckpt.metadata(places["DST"]).leaves  # reshard wrote a checkpoint
    assert sorted(ckpt.metadata(places["HF_DIR"]).tree["params"]["dense"]) == ["kernel"]
    assert os.path.exists(os.path.join(places["gs://bucket/deploy"], "run-6",
                                       "model.safetensors"))
