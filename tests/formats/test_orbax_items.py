"""The items of an Orbax step beside its pytree: JSON items and Grain iterator items, written
by orbax-checkpoint's own managers (v0 and v1 APIs) and Grain's own checkpoint handler, read
whole or one at a time, resumed bit for bit, carried by convert; and ``item=`` on this
library's checkpoints."""

import os
import pathlib

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ckpt
from ckpt.cli import main as cli
from ckpt.errors import CorruptCheckpointError, MissingLeafError, UnsupportedFormatError
from tests.helpers.saves import started

flags.FLAGS.mark_as_parsed()  # grain reads absl flags


def _dataset_iter():
    return iter(grain.MapDataset.range(500).shuffle(seed=3).map(lambda x: x * 5).batch(4))


def _loader_iter():
    sampler = grain.samplers.IndexSampler(num_records=200, shuffle=True, seed=9, num_epochs=1,
                                          shard_options=grain.sharding.NoSharding())
    return iter(grain.DataLoader(data_source=list(range(200)), sampler=sampler,
                                 operations=[grain.transforms.Batch(batch_size=4)],
                                 worker_count=0))


def _advanced(make, n):
    it = make()
    for _ in range(n):
        next(it)
    return it


def _next(it, n=3):
    return [np.asarray(next(it)).tolist() for _ in range(n)]


def _save_step(root, api, mesh):
    """An Orbax step of four items: a pytree, a JSON config, a dataset iterator and a
    DataLoader iterator (each iterator a few batches in). Returns the step folder and the
    batches each iterator gives next."""
    state = {"w": jax.device_put(jnp.arange(64.0).reshape(8, 8),
                                 NamedSharding(mesh, P("data", "model")))}
    data, loader = _advanced(_dataset_iter, 3), _advanced(_loader_iter, 2)
    config = {"lr": 0.5, "layers": [4, 8], "name": "tiny"}
    if api == "v0":
        with ocp.CheckpointManager(root, item_names=("state", "config", "data", "loader")) as m:
            m.save(7, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config),
                data=grain.checkpoint.CheckpointSave(data),
                loader=grain.checkpoint.CheckpointSave(loader)))
            m.wait_until_finished()
    else:
        from orbax.checkpoint import v1

        with v1.training.Checkpointer(root) as c:
            c.save_checkpointables(7, dict(state=state, config=config, data=data,
                                           loader=loader), metrics={"loss": 1.25})
    return os.path.join(root, "7"), {"data": _next(data), "loader": _next(loader)}


@pytest.mark.parametrize("api", ["v0", "v1"])
def test_json_and_grain_items_resume_bit_for_bit_and_survive_convert(tmp_path, mesh24, api,
                                                                    capsys):
    step, expected = _save_step(str(tmp_path / "orbax"), api, mesh24)
    # A whole-step restore returns every item under its name; iterators in the target get
    # their state back and continue where the saved ones would have.
    data, loader = _dataset_iter(), _loader_iter()
    out = ckpt.restore(step, {"state": {"w": np.zeros((8, 8), np.float32)}, "data": data,
                              "loader": loader, "config": {"lr": 0.0, "layers": [0, 0],
                                                           "name": ""}})
    assert out["data"] is data
    assert out["loader"] is loader
    assert out["config"] == {"lr": 0.5, "layers": [4, 8], "name": "tiny"}
    assert out["state"]["w"].tobytes() == np.arange(64.0, dtype=np.float32).tobytes()
    assert {"data": _next(data), "loader": _next(loader)} == expected
    # Without a target: each iterator's state as Grain wrote it (parsed JSON).
    bare = ckpt.restore(step)
    assert sorted(bare) == ["config", "data", "loader", "state"]
    assert bare["data"] == _advanced(_dataset_iter, 3).get_state()
    # One item, by name; the others are not opened.
    data = _dataset_iter()
    assert ckpt.restore(step, data, item="data") is data
    assert _next(data) == expected["data"]
    with pytest.raises(MissingLeafError, match=r"its items: config, data, loader, state"):
        ckpt.restore(step, item="metrics" if api == "v0" else "nope")
    # inspect lists every item; convert carries them all into this library's format.
    assert cli(["inspect", step]) == 0
    shown = capsys.readouterr().out
    assert "data  " in shown
    assert "per_process" in shown
    assert "config/layers/1" in shown
    converted = str(tmp_path / "ours")
    assert cli(["convert", "-q", step, converted]) == 0
    data, loader = _dataset_iter(), _loader_iter()
    again = ckpt.restore(converted, {"data": data, "loader": loader})
    assert again["data"] is data
    assert {"data": _next(data), "loader": _next(loader)} == expected
    assert ckpt.restore(converted, item="config") == out["config"]
    if api == "v1":  # the manager's metrics item is the step's metrics, not an item
        assert ckpt.metadata(step).metrics == {"loss": 1.25}
        assert ckpt.metadata(converted).metrics == {"loss": 1.25}
        assert ckpt.restore(step, item="metrics") == {"loss": 1.25}


def test_a_manager_resumes_an_orbax_runs_items_then_saves_its_own(tmp_path, mesh24):
    """The switch, with a data iterator: an Orbax run's step of several items resumes
    through this library's manager, whose own next step restores the same way."""
    root = str(tmp_path / "run")
    _, expected = _save_step(root, "v0", mesh24)
    with ckpt.CheckpointManager(root) as mgr:
        data = _dataset_iter()
        state = mgr.restore(target={"state": {"w": jax.ShapeDtypeStruct(
            (8, 8), jnp.float32, sharding=NamedSharding(mesh24, P("data", "model")))},
            "data": data})
        assert _next(data) == expected["data"]
        started(mgr.save(8, state)).wait()
        assert mgr.steps() == [7, 8]
    fresh = _dataset_iter()
    ckpt.CheckpointManager(root, read_only=True).restore(8, {"data": fresh})
    assert _next(fresh, 1) == _next(_advanced(_dataset_iter, 6), 1)


def test_an_item_this_library_cannot_read_is_named_and_the_others_still_restore(tmp_path,
                                                                                 mesh24):
    step, expected = _save_step(str(tmp_path / "orbax"), "v0", mesh24)
    with open(os.path.join(step, "config", "more.bin"), "wb") as f:
        f.write(b"\0\1")  # two files: neither a JSON item nor a Grain item
    for read in (lambda: ckpt.restore(step), lambda: ckpt.metadata(step),
                 lambda: ckpt.restore(step, item="config")):
        with pytest.raises(UnsupportedFormatError, match=r"item 'config' of the Orbax step .*"
                                                         r"JsonCheckpointHandler.*more\.bin"):
            read()
    assert ckpt.restore(step, item="data") == _advanced(_dataset_iter, 3).get_state()
    # A target that leaves the item out does not open it.
    data = _dataset_iter()
    out = ckpt.restore(step, {"data": data, "state": {"w": np.zeros((8, 8), np.float32)}})
    assert sorted(out) == ["data", "state"]
    assert _next(data) == expected["data"]


def test_two_items_holding_the_same_keys_convert_to_separate_arrays(tmp_path, mesh24):
    """params and ema_params of one shape: after convert each is its own array."""
    w = jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh24, P("data")))
    root = str(tmp_path / "orbax")
    with ocp.CheckpointManager(root, item_names=("params", "ema")) as m:
        m.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave({"w": w}),
                                          ema=ocp.args.StandardSave({"w": w * 2})))
        m.wait_until_finished()
    converted = str(tmp_path / "ours")
    assert cli(["convert", "-q", os.path.join(root, "1"), converted]) == 0
    for url in (os.path.join(root, "1"), converted):
        out = ckpt.restore(url)
        assert out["params"]["w"].tobytes() == np.arange(64.0, dtype=np.float32).tobytes()
        assert out["ema"]["w"].tobytes() == (2 * np.arange(64.0, dtype=np.float32)).tobytes()


def test_a_step_whose_metadata_names_no_items_is_read_from_its_folders(tmp_path, mesh24):
    import json

    step, _ = _save_step(str(tmp_path / "orbax"), "v0", mesh24)
    meta_file = os.path.join(step, "_CHECKPOINT_METADATA")
    with open(meta_file) as f:
        meta = json.load(f)
    meta.pop("item_handlers")
    with open(meta_file, "w") as f:
        json.dump(meta, f)
    assert sorted(ckpt.restore(step)) == ["config", "data", "loader", "state"]


def _rename_state(step, name):
    data = os.path.join(step, "data")
    os.rename(os.path.join(data, "process_0-of-1.json"), os.path.join(data, name))


@pytest.mark.parametrize(("edit", "error", "named"), [
    # a job of two processes whose second file is gone
    (lambda s: _rename_state(s, "process_0-of-2.json"), CorruptCheckpointError,
     r"missing processes: \[1\]"),
    # a name claiming a billion processes is refused before anything of that size is built
    (lambda s: _rename_state(s, "process_0-of-999999999.json"), CorruptCheckpointError,
     "do not make one whole job"),
    (lambda s: _rename_state(s, "process_00-of-1.json"), CorruptCheckpointError,
     "not every file is named"),
    (lambda s: pathlib.Path(s, "data", "process_0-of-1.json").write_text("{not json"),
     CorruptCheckpointError, "saved state is not JSON"),
    (lambda s: pathlib.Path(s, "config", "metadata").write_text("[1, 2"),
     UnsupportedFormatError, "config/metadata is not a JSON item"),
    (lambda s: pathlib.Path(s, "config", "metadata").write_text("[" * 150 + "]" * 150),
     UnsupportedFormatError, "nests deeper than 100 levels"),
    (lambda s: pathlib.Path(s, "config", "metadata").write_text('{"\\ud800": 1}'),
     UnsupportedFormatError, "config/metadata: dict key"),
], ids=["missing", "huge-count", "leading-zero", "state-not-json", "item-not-json",
        "too-deep", "lone-surrogate"])
def test_damaged_item_files_are_named(tmp_path, mesh24, edit, error, named):
    step, _ = _save_step(str(tmp_path / "orbax"), "v0", mesh24)
    edit(step)
    with pytest.raises(error, match=named):
        ckpt.restore(step, {"data": _dataset_iter(), "config": {}})
    # Left out of the target, the damaged item is not read.
    assert ckpt.restore(step, {"state": {"w": np.zeros((8, 8), np.float32)}})["state"]["w"][
        0, 1] == 1


def test_an_edited_list_of_items_is_named(tmp_path, mesh24):
    """Item names come from _CHECKPOINT_METADATA: one naming a file of the step, or a
    listed item whose folder holds nothing, is a corrupt step naming the item."""
    import json
    import re
    import shutil

    step, _ = _save_step(str(tmp_path / "orbax"), "v0", mesh24)
    meta_file = os.path.join(step, "_CHECKPOINT_METADATA")
    with open(meta_file) as f:
        meta = json.load(f)
    for name in ("_CHECKPOINT_METADATA", "../state"):
        with open(meta_file, "w") as f:
            json.dump({**meta, "item_handlers": {**meta["item_handlers"], name: "x"}}, f)
        with pytest.raises(CorruptCheckpointError, match=f"names an item {re.escape(repr(name))}"):
            ckpt.restore(step)
    with open(meta_file, "w") as f:
        json.dump(meta, f)
    shutil.rmtree(os.path.join(step, "config"))
    with pytest.raises(CorruptCheckpointError, match=r"item 'config' of the Orbax step .* "
                                                     r"its folder holds nothing"):
        ckpt.restore(step)


def test_an_orbax_metric_beyond_any_float_is_left_out(tmp_path, mesh24):
    import json

    step, _ = _save_step(str(tmp_path / "orbax"), "v0", mesh24)
    meta_file = os.path.join(step, "_CHECKPOINT_METADATA")
    with open(meta_file) as f:
        meta = json.load(f)
    meta["metrics"] = {"loss": 10 ** 400, "acc": 0.5}
    with open(meta_file, "w") as f:
        json.dump(meta, f)
    assert ckpt.metadata(step).metrics == {"acc": 0.5}


def test_item_picks_one_top_level_key_of_this_librarys_checkpoints(tmp_path, mesh24):
    w = jax.device_put(jnp.arange(32.0).reshape(4, 8), NamedSharding(mesh24, P("data")))
    tree = {"params": {"w": w, "b": np.arange(3)}, "step": 4, "data": ckpt.PerProcess(7)}
    with ckpt.CheckpointManager(str(tmp_path / "run")) as mgr:
        started(mgr.save(4, tree)).wait()
        params = mgr.restore(item="params", target={"w": w})
        assert params["w"].sharding == w.sharding
        assert params["w"].tobytes() == w.tobytes()
        assert mgr.restore(item="data") == ckpt.PerProcess(7)
        with pytest.raises(MissingLeafError, match=r"top-level keys: data, params, step"):
            mgr.restore(item="opt")
    assert ckpt.restore(str(tmp_path / "run" / "4"), item="step") == 4


# -- a MaxText-shaped checkpoint --------------------------------------------------------------

def _maxtext_like_state(mesh):
    """What MaxText checkpoints: the NNX state of a model whose nnx.Rngs hold typed keys
    (an ``unsafe_rbg`` stream, as MaxText's AQT one) and whose params carry logical
    partitioning; returns the state and the abstract state MaxText restores onto (an
    ``eval_shape`` of the jitted init with the state's shardings)."""
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model"))
            self.dense = nnx.Linear(16, 32, kernel_init=init, rngs=rngs)
            self.drop = nnx.Dropout(0.1, rngs=rngs)

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(64, 16, rngs=rngs)
            self.block = Block(rngs)
            self.rngs = rngs

    def create():
        rngs = nnx.Rngs(params=0, dropout=1, aqt=jax.random.key(2, impl="unsafe_rbg"))
        return nnx.state(Model(rngs))

    with jax.set_mesh(mesh):  # flax places annotated params on the mesh in context
        shardings = nnx.get_named_sharding(jax.eval_shape(create), mesh)
        init = jax.jit(create, out_shardings=shardings)
        return init(), init.eval_shape()


def _leaf_bytes(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return str(jax.random.key_impl(x)), np.asarray(jax.random.key_data(x)).tobytes()
    return str(x.dtype), np.asarray(x).tobytes()


def test_a_maxtext_shaped_checkpoint_restores_onto_its_abstract_state_and_converts(tmp_path,
                                                                                   mesh24):
    """Orbax's v1 training.Checkpointer writes the step as MaxText does
    (``<run>/checkpoints/<step>/items/``, custom_metadata ``{"scan_layers": true}``); this
    library's manager resumes it onto MaxText's own abstract state bit for bit (typed keys as
    keys of their implementation, every leaf on the target's sharding), and so does the
    converted step."""
    from orbax.checkpoint import v1

    state, abstract = _maxtext_like_state(mesh24)
    run = str(tmp_path / "run" / "checkpoints")
    with v1.training.Checkpointer(run) as checkpointer:
        checkpointer.save_checkpointables(12, {"items": state},
                                          custom_metadata={"scan_layers": True})
    want = jax.tree.leaves(state)
    assert sum(_leaf_bytes(x)[0] == "unsafe_rbg" for x in want) == 1  # the aqt stream's key
    converted = str(tmp_path / "ours")
    assert cli(["convert", "-q", os.path.join(run, "12"), os.path.join(converted, "12")]) == 0
    for root in (run, converted):
        with ckpt.CheckpointManager(root, read_only=True) as mgr:
            assert mgr.latest_step() == 12
            got = mgr.restore(target=abstract)
            assert ckpt.metadata(os.path.join(root, "12")).metadata == {"scan_layers": True}
        leaves = jax.tree.leaves(got)
        assert len(leaves) == len(want)
        # jaxlib has no stubs, so mypy cannot resolve jax's PyTreeDef and refuses its ==.
        assert jax.tree.structure(got) == jax.tree.structure(state)  # type: ignore[operator]
        for g, w, a in zip(leaves, want, jax.tree.leaves(abstract), strict=True):
            assert _leaf_bytes(g) == _leaf_bytes(w), root
            assert g.sharding == a.sharding, root
