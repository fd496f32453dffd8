"""Orbax checkpoints, written by orbax-checkpoint itself, read back bit-exactly through this
library (restore, inspect) and after `ckpt convert`, on every backend; and clear errors for
what cannot be read."""

import contextlib
import json
import os
import pathlib
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import ckpt
from ckpt.cli import main as cli
from ckpt.errors import (
    CheckpointExistsError,
    CorruptCheckpointError,
    MeshMismatchError,
    MissingLeafError,
    NotACheckpointError,
    UncommittedCheckpointError,
    UnshardedTargetWarning,
    UnsupportedFormatError,
)
from ckpt.storage import open_store
from tests.conftest import RSS_OVERHEAD, backend_url, cli_extra_rss, make_mesh

LAYOUTS = [(True, False), (True, True), (False, False), (False, True)]  # (OCDBT, zarr v3)
SPECS = {"w": P("data", "model"), "rows": P("data"), "b": P()}


def _host():
    rng = np.random.default_rng(7)
    return {
        "params": {
            "w": rng.standard_normal((64, 48)).astype(np.float32),                # sharded
            "rows": rng.standard_normal((32, 8)).astype(jnp.bfloat16),           # sharded
            "b": rng.standard_normal(24).astype(jnp.bfloat16),                   # replicated
        },
        "layers": [{"k": rng.integers(-9, 9, (5, 3)).astype(np.int32)}, None,
                   [rng.standard_normal(4).astype(np.float64), None]],
        "step": 41, "lr": 0.25, "name": "run-7", "none": None,
    }


def _device(host, mesh):
    tree = jax.tree.map(lambda x: x, host, is_leaf=lambda x: x is None)
    for k, spec in SPECS.items():
        tree["params"][k] = jax.device_put(host["params"][k], NamedSharding(mesh, spec))
    return tree


def _orbax_save(path, tree, ocdbt=True, zarr3=False):
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=ocdbt, use_zarr3=zarr3)
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(path, args=ocp.args.PyTreeSave(tree))
    return path


def _same(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert got.tobytes() == want.tobytes()


def _check_tree(out, host):
    for k in SPECS:
        _same(out["params"][k], host["params"][k])
    _same(out["layers"][0]["k"], host["layers"][0]["k"])
    assert out["layers"][1] is None
    assert out["layers"][2][1] is None
    _same(out["layers"][2][0], host["layers"][2][0])
    assert (out["step"], out["lr"], out["name"], out["none"]) == (41, 0.25, "run-7", None)
    assert type(out["step"]) is int
    assert type(out["lr"]) is float


@pytest.fixture(scope="module", params=LAYOUTS, ids=["ocdbt-zarr2", "ocdbt-zarr3",
                                                     "folders-zarr2", "folders-zarr3"])
def orbax_ckpt(request, tmp_path_factory):
    host = _host()
    path = str(tmp_path_factory.mktemp("orbax") / "item")
    _orbax_save(path, _device(host, make_mesh((2, 4))), *request.param)
    return path, host, request.param


def test_restore_without_target_is_bit_exact(orbax_ckpt):
    path, host, _ = orbax_ckpt
    _check_tree(ckpt.restore(path), host)


@pytest.mark.parametrize("kind", ["2x4", "4x2", "1dev"])
def test_restore_onto_any_mesh(orbax_ckpt, kind, devices):
    path, host, _ = orbax_ckpt
    if kind == "1dev":
        def place(spec):
            return SingleDeviceSharding(devices[3])
    else:
        mesh = make_mesh((2, 4) if kind == "2x4" else (4, 2))

        def place(spec):
            return NamedSharding(mesh, spec)
    target = {"params": {k: jax.ShapeDtypeStruct(host["params"][k].shape,
                                                 host["params"][k].dtype, sharding=place(s))
                         for k, s in SPECS.items()}}
    out = ckpt.restore(path, target)
    for k in SPECS:
        got = out["params"][k]
        assert got.sharding == target["params"][k].sharding
        for shard in got.addressable_shards:
            _same(shard.data, host["params"][k][shard.index])


def test_restore_onto_an_eval_shape_target(orbax_ckpt, mesh24):
    path, host, _ = orbax_ckpt
    state = {k: v for k, v in _device(host, mesh24).items() if k != "name"}  # str: not JAX
    abstract = jax.eval_shape(lambda: state)  # Python scalars become 0-d int32/float32
    out = ckpt.restore(path, abstract)
    assert out["step"].dtype == jnp.int32
    assert int(out["step"]) == 41
    assert out["lr"].dtype == jnp.float32
    assert float(out["lr"]) == 0.25
    for k in SPECS:
        _same(out["params"][k], host["params"][k])


def test_restore_with_mesh_uses_the_saved_partition_specs(orbax_ckpt, mesh24):
    path, host, _ = orbax_ckpt
    out = ckpt.restore(path, mesh=mesh24)
    for k, spec in SPECS.items():
        assert out["params"][k].sharding.spec == spec
        _same(out["params"][k], host["params"][k])
    assert isinstance(out["layers"][0]["k"], np.ndarray)  # saved as numpy: stays numpy


def test_inspect_names_the_layout_and_leaves(orbax_ckpt, capsys):
    path, host, (ocdbt, zarr3) = orbax_ckpt
    assert cli(["inspect", "--json", path]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["layout"] == ("orbax-checkpoint (" + ("OCDBT" if ocdbt else "one folder per "
                             "array") + f", zarr v{3 if zarr3 else 2})")
    leaves = {leaf["path"]: leaf for leaf in doc["leaves"]}
    assert leaves["params/w"]["spec"] == ["data", "model"]
    assert leaves["params/w"]["mesh"] == {"data": 2, "model": 4}
    assert leaves["params/rows"]["dtype"] == "bfloat16"
    assert leaves["layers/0/k"]["shape"] == [5, 3]
    assert leaves["step"]["kind"] == "value"
    assert leaves["none"]["kind"] == "none"
    assert doc["nbytes"] == sum(v.nbytes for v in jax.tree.leaves(host)
                                if isinstance(v, np.ndarray))
    info = ckpt.metadata(path)
    assert info.tree["params"]["w"].shape == (64, 48)
    assert info.tree["step"] == 41


def test_convert_keeps_the_saved_layout_and_verifies(orbax_ckpt, tmp_path, mesh24, capsys):
    path, host, _ = orbax_ckpt
    dst = str(tmp_path / "ours")
    assert cli(["convert", "-q", path, dst]) == 0
    assert "verified" in capsys.readouterr().out
    info = ckpt.metadata(dst)
    assert info.layout == "ckpt format 1"
    w = next(leaf for leaf in info.leaves if leaf.name == "params/w")
    assert w.spec == P("data", "model")
    assert w.mesh == {"data": 2, "model": 4}
    assert w.chunk_shape == (32, 12)  # one chunk per 2x4 shard
    _check_tree(ckpt.restore(dst), host)
    out = ckpt.restore(dst, mesh=mesh24)
    assert out["params"]["w"].sharding.spec == P("data", "model")
    assert cli(["verify", "-q", dst]) == 0
    with pytest.raises(CheckpointExistsError):
        ckpt.convert(path, dst)


def test_convert_onto_another_mesh_and_spec(orbax_ckpt, tmp_path):
    path, host, _ = orbax_ckpt
    dst = str(tmp_path / "ours")
    assert cli(["convert", "-q", path, dst, "--mesh", "data=4,model=2",
                "--spec", "params/w=model,data"]) == 0
    w = next(leaf for leaf in ckpt.metadata(dst).leaves if leaf.name == "params/w")
    assert w.spec == P("model", "data")
    assert w.chunk_shape == (32, 12)
    _check_tree(ckpt.restore(dst), host)


# -- other Orbax entry points --------------------------------------------------------------

def test_standard_checkpointer_and_manager_folders_with_an_optax_target(tmp_path, mesh24):
    params = {"w": jax.device_put(np.arange(32 * 16, dtype=np.float32).reshape(32, 16),
                                  NamedSharding(mesh24, P("data", "model")))}
    opt = optax.adam(1e-2)
    state = {"params": params, "opt_state": opt.init(params), "step": jnp.array(5)}
    std = str(tmp_path / "std")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(std, state)
    root = str(tmp_path / "mgr")
    with ocp.CheckpointManager(root) as manager:
        manager.save(5, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
    # The optax state's namedtuple fields come back by name (Orbax stores them as dict keys).
    for url in (std, os.path.join(root, "5"), os.path.join(root, "5", "default")):
        out = ckpt.restore(url, state)
        # jaxlib has no stubs, so mypy cannot resolve jax's PyTreeDef and refuses its ==.
        assert jax.tree.structure(out) == jax.tree.structure(state)  # type: ignore[operator]
        for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(state), strict=True):
            assert got.sharding == want.sharding
            _same(got, want)
    assert ckpt.metadata(os.path.join(root, "5")).url.endswith(os.path.join("5", "default"))
    with pytest.raises(NotACheckpointError, match="Orbax CheckpointManager root"):
        ckpt.restore(root)
    # A converted step folder is a step of this library's CheckpointManager.
    ours = str(tmp_path / "ours")
    assert cli(["convert", "-q", os.path.join(root, "5"), os.path.join(ours, "5")]) == 0
    with ckpt.CheckpointManager(ours) as manager:
        assert manager.latest_step() == 5
        out = manager.restore(target=state)
    for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(state), strict=True):
        _same(got, want)


@pytest.mark.slow  # starts processes
def test_two_process_orbax_saves_restore_and_convert(tmp_path):
    from tests.children import mp_jobs
    from tools.launch import launch

    expected = mp_jobs.host_tree(1)
    for ocdbt, zarr3 in ((True, False), (False, True)):
        path = str(tmp_path / f"mp-{ocdbt}-{zarr3}")
        assert launch("tests.children.mp_jobs:orbax_save", 2, args=[path, ocdbt, zarr3],
                      timeout=180) == [0, 1]
        assert ckpt.metadata(path).process_count == 2
        mesh = make_mesh((2, 4))
        restored = ckpt.restore(path, mesh=mesh)
        mp_jobs.exact(restored, 1)
        assert restored["w"].sharding.spec == mp_jobs.SPECS["w"]
        # Restored by two processes too, each reading only the chunks its devices need (and
        # the small numpy leaf, which Orbax stores as an array and each process restores).
        small = expected["small"].nbytes
        for counts in launch("tests.children.mp_jobs:restore_on", 2, args=[path, 1, [2, 4]],
                             timeout=180):
            assert counts["read"] == counts["needed"] + small, counts
        dst = str(tmp_path / f"ours-{ocdbt}-{zarr3}")
        ckpt.convert(path, dst, mesh={"data": 4, "model": 2})
        out = ckpt.restore(dst)
        for k, v in expected.items():
            assert out[k] == v if k == "step" else out[k].tobytes() == v.tobytes(), k


# -- backends -------------------------------------------------------------------------------

def _upload(folder, url):
    """Copies an Orbax checkpoint folder, file by file, to ``url`` on any backend."""
    store = open_store(url)
    for dirpath, _, files in os.walk(folder):
        for name in files:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                store.write(os.path.relpath(full, folder).replace(os.sep, "/"), f.read())


@pytest.mark.parametrize("ocdbt", [True, False], ids=["ocdbt", "folders"])
def test_orbax_checkpoints_on_every_backend_and_convert_between_them(
        root_url, tmp_path, mesh24, ocdbt, request):
    host = _host()
    local = _orbax_save(str(tmp_path / "item"), _device(host, mesh24), ocdbt)
    src = root_url + "/orbax"
    _upload(local, src)
    _check_tree(ckpt.restore(src), host)
    # To another backend than the source's (local disk when the source is remote).
    other = "memory" if root_url.startswith(("s3://", "gs://")) else "local"
    dst = backend_url(request, tmp_path, other) + "/ours"
    ckpt.convert(src, dst)
    _check_tree(ckpt.restore(dst), host)
    back = root_url + "/ours-again"
    ckpt.convert(dst, back, mesh={"data": 1, "model": 8})
    _check_tree(ckpt.restore(back), host)


# -- what cannot be read --------------------------------------------------------------------

@pytest.fixture
def small_orbax(tmp_path, mesh24):
    host = _host()
    return _orbax_save(str(tmp_path / "item"), _device(host, mesh24), ocdbt=False), host


def _listing(folder):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)


def test_unsupported_value_type_names_the_leaf_and_file(small_orbax, tmp_path):
    path, _ = small_orbax
    meta_file = os.path.join(path, "_METADATA")
    with open(meta_file) as f:
        meta = json.load(f)
    entry = meta["tree_metadata"]["('lr',)"]
    entry["value_metadata"]["value_type"] = "my.CustomThing"
    with open(meta_file, "w") as f:
        json.dump(meta, f)
    before = _listing(str(tmp_path))
    with pytest.raises(UnsupportedFormatError, match=r"lr.*my.CustomThing") as err:
        ckpt.restore(path)
    assert meta_file in str(err.value)
    with pytest.raises(UnsupportedFormatError):
        ckpt.convert(path, str(tmp_path / "dst"))
    assert _listing(str(tmp_path)) == before  # nothing written, by restore or convert


def test_verify_explains_that_orbax_checkpoints_carry_no_checksums(small_orbax, capsys):
    path, _ = small_orbax
    assert cli(["verify", path]) == 3  # not damaged: a failure of another kind
    assert "Orbax checkpoint" in capsys.readouterr().err


def _edit_json(path, edit):
    with open(path) as f:
        doc = json.load(f)
    edit(doc)
    with open(path, "w") as f:
        json.dump(doc, f)


def _dup(meta):
    tree = meta["tree_metadata"]
    tree["('lr', 'again')"] = tree["('lr',)"]


def _bad_key(meta):
    meta["tree_metadata"]["('lr',)"]["key_metadata"][0]["key_type"] = 7


def _bad_spec(sharding):
    key = next(iter(sharding))
    entry = json.loads(sharding[key])
    entry["partition_spec"] = ["no_such_axis"]
    sharding[key] = json.dumps(entry)


@pytest.mark.parametrize(("file", "edit", "error", "named"), [
    ("_METADATA", _dup, CorruptCheckpointError, r"lr appears twice"),
    ("_METADATA", _bad_key, CorruptCheckpointError, "malformed key entry"),
    ("_sharding", _bad_spec, CorruptCheckpointError, "malformed NamedSharding"),
    ("_strings.json", lambda d: d.clear(), CorruptCheckpointError, r"no string .*name"),
    ("layers.0.k/.zarray", lambda d: d.update(dtype="int4"), UnsupportedFormatError,
     r"layers/0/k of .* has dtype int4"),
])
def test_malformed_orbax_files_are_named(small_orbax, tmp_path, file, edit, error, named):
    path, _ = small_orbax
    _edit_json(os.path.join(path, file), edit)
    before = _listing(str(tmp_path))
    with pytest.raises(error, match=named) as err:
        ckpt.restore(path)
    assert os.path.join(path, file.split("/")[0]) in str(err.value)
    assert _listing(str(tmp_path)) == before


def test_convert_without_a_mesh_refuses_leaves_saved_on_several_meshes(tmp_path, devices):
    a = jax.device_put(np.ones((8, 8), np.float32), NamedSharding(make_mesh((2, 4)), P("data")))
    b = jax.device_put(np.ones(8, np.float32),
                       NamedSharding(make_mesh((8,), ("x",)), P("x")))
    src = str(tmp_path / "src")
    ckpt.save(src, {"a": a, "b": b})
    with pytest.raises(MeshMismatchError, match="several meshes") as err:
        ckpt.convert(src, str(tmp_path / "dst"))
    assert src in str(err.value)
    assert not os.path.exists(tmp_path / "dst")
    ckpt.convert(src, str(tmp_path / "dst"), mesh={"x": 8}, rules=[("a", ())])
    _same(ckpt.restore(str(tmp_path / "dst"))["b"], np.ones(8, np.float32))


def test_legacy_msgpack_orbax_layout_is_refused_naming_the_file(tmp_path):
    folder = tmp_path / "legacy"
    folder.mkdir()
    (folder / "checkpoint").write_bytes(b"\x81\xa1a\x01")
    with pytest.raises(UnsupportedFormatError, match="legacy msgpack") as err:
        ckpt.restore(str(folder))
    assert str(folder / "checkpoint") in str(err.value)


def test_an_uncommitted_orbax_save_is_not_restored(small_orbax, tmp_path):
    path, _ = small_orbax
    tmp = str(tmp_path / "item.orbax-checkpoint-tmp-1795550000")
    shutil.copytree(path, tmp)
    with pytest.raises(UncommittedCheckpointError, match="orbax-checkpoint-tmp"):
        ckpt.restore(tmp)


def test_corrupt_metadata_and_missing_arrays_are_named(small_orbax):
    path, _ = small_orbax
    shutil.rmtree(os.path.join(path, "params.w"))
    with pytest.raises(CorruptCheckpointError, match=r"params/w"):
        ckpt.restore(path)
    with open(os.path.join(path, "_METADATA"), "w") as f:
        f.write("{not json")
    with pytest.raises(CorruptCheckpointError, match="_METADATA"):
        ckpt.metadata(path)


def test_a_step_of_several_items_restores_whole_or_one_item(tmp_path, mesh24):
    root = str(tmp_path / "mgr")
    state = {"w": jax.device_put(np.ones((8, 8), np.float32), NamedSharding(mesh24, P()))}
    with ocp.CheckpointManager(root, item_names=("state", "extra")) as manager:
        manager.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                extra=ocp.args.StandardSave({"v": 7})))
        manager.wait_until_finished()
    step = os.path.join(root, "2")
    whole = ckpt.restore(step)
    assert sorted(whole) == ["extra", "state"]
    assert whole["extra"] == {"v": 7}
    _same(whole["state"]["w"], np.ones((8, 8), np.float32))
    _same(ckpt.restore(step, item="state")["w"], np.ones((8, 8), np.float32))
    _same(ckpt.restore(os.path.join(step, "state"))["w"], np.ones((8, 8), np.float32))
    with pytest.raises(MissingLeafError, match=r"no item 'nope' \(its items: extra, state\)"):
        ckpt.restore(step, item="nope")
    # A whole-step target names the items; the manager reads Orbax steps the same way.
    with ckpt.CheckpointManager(root, read_only=True) as mgr:
        assert mgr.restore(target={"extra": {"v": 0}}) == {"extra": {"v": 7}}
        assert mgr.restore(2, item="extra") == {"v": 7}


def test_target_leaves_missing_from_an_orbax_checkpoint_are_named(small_orbax):
    path, _ = small_orbax
    with pytest.raises(MissingLeafError, match=r"params/nope"):
        ckpt.restore(path, {"params": {"nope": np.zeros(3)}})


@pytest.mark.slow  # starts processes
def test_convert_memory_stays_within_the_budget(tmp_path, mesh24):
    rng = np.random.default_rng(3)
    tree = {f"w{i}": jax.device_put(rng.standard_normal((1024, 4096), dtype=np.float32),
                                    NamedSharding(mesh24, P("data", "model"))) for i in range(8)}
    src = _orbax_save(str(tmp_path / "item"), tree)
    budget = 32 << 20
    extra = cli_extra_rss(["convert", "-q", src, str(tmp_path / "dst"), "--mesh", "data=8",
                           "--spec", "*=-,data", "--memory-budget", "32M"])
    assert sum(v.nbytes for v in tree.values()) >= 4 * budget
    assert extra <= budget + RSS_OVERHEAD, f"resident memory rose {extra / 2**20:.0f} MiB"
    out = ckpt.restore(str(tmp_path / "dst"))
    for k, v in tree.items():
        _same(out[k], v)


def test_deeply_nested_metadata_json_is_a_clean_error(small_orbax):
    path, _ = small_orbax
    with open(os.path.join(path, "_METADATA"), "w") as f:
        f.write("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CorruptCheckpointError, match="_METADATA.*too deeply"):
        ckpt.metadata(path)


def test_a_fifo_in_an_orbax_checkpoint_fails_instead_of_blocking(orbax_ckpt, tmp_path):
    import os
    import shutil

    path, _, _ = orbax_ckpt
    copy = tmp_path / "ck"
    shutil.copytree(path, copy)
    files = sorted(p for p in copy.rglob("*") if p.is_file() and p.name != "_METADATA")
    victim = files[-1]  # an array or OCDBT data file: TensorStore would open it
    victim.unlink()
    os.mkfifo(victim)
    with pytest.raises(CorruptCheckpointError, match="not a regular file"):
        ckpt.restore(str(copy))


def test_typed_prng_keys_written_by_orbax_restore_as_keys_and_survive_convert(tmp_path, mesh24):
    """Orbax saves a typed key array as its key data and names the implementation in
    array_metadatas/ (every MaxText checkpoint has such leaves): it restores as keys of
    that implementation, on the target's sharding, and `ckpt convert` keeps it a key."""
    keys = jax.device_put(jax.random.split(jax.random.key(3, impl="unsafe_rbg"), 8),
                          NamedSharding(mesh24, P(("data", "model"))))
    state = {"rngs": {"aqt": {"key": keys}, "params": {"key": jax.random.key(4)}},
             "w": jax.device_put(jnp.arange(16.0), NamedSharding(mesh24, P("model")))}
    root = str(tmp_path / "orbax")
    with ocp.CheckpointManager(root) as manager:
        manager.save(7, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
    converted = str(tmp_path / "ours" / "7")
    assert cli(["convert", "-q", os.path.join(root, "7"), converted]) == 0
    for url in (os.path.join(root, "7"), converted):
        for target in (state, jax.eval_shape(lambda: state)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UnshardedTargetWarning)
                out = ckpt.restore(url, target)
            for path in (("aqt", "key"), ("params", "key")):
                got, want = out["rngs"][path[0]][path[1]], state["rngs"][path[0]][path[1]]
                assert jax.random.key_impl(got) == jax.random.key_impl(want), (url, path)
                assert (jax.random.key_data(got) == jax.random.key_data(want)).all()
            if target is state:
                assert out["rngs"]["aqt"]["key"].sharding == keys.sharding
        # Without a target, a key is its key data (as this library's own checkpoints give it).
        raw = ckpt.restore(url)["rngs"]["aqt"]["key"]
        assert raw.dtype == np.uint32
        assert raw.shape == jax.random.key_data(keys).shape
        # Onto a mesh with the saved specs: Orbax recorded the key data's spec, the key
        # array's own applies (the reading and the conversion both).
        placed = ckpt.restore(url, mesh=mesh24)["rngs"]["aqt"]["key"]
        assert jax.random.key_impl(placed) == jax.random.key_impl(keys)
        assert (jax.random.key_data(placed) == jax.random.key_data(keys)).all()
        assert placed.sharding.spec == P(("data", "model")), (url, placed.sharding)


def test_a_managers_custom_metadata_and_metrics_are_read_and_converted(tmp_path, mesh24):
    """A step's custom_metadata (MaxText checks {"scan_layers": true} on load), the metrics
    given to CheckpointManager.save and a JSON item show in metadata and survive convert."""
    state = {"w": jax.device_put(jnp.arange(32.0).reshape(4, 8),
                                 NamedSharding(mesh24, P("data", "model")))}
    root = str(tmp_path / "orbax")
    options = ocp.CheckpointManagerOptions(best_fn=lambda m: m["loss"])
    with ocp.CheckpointManager(root, options=options) as manager:
        manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                extra=ocp.args.JsonSave({"note": "hi"})),
                     metrics={"loss": 0.25}, custom_metadata={"scan_layers": True})
        manager.wait_until_finished()
    step = os.path.join(root, "3")
    info = ckpt.metadata(step)
    assert info.metadata == {"scan_layers": True}
    assert info.metrics == {"loss": 0.25}
    assert info.tree["extra"] == {"note": "hi"}
    converted = str(tmp_path / "ours" / "3")
    assert cli(["convert", "-q", step, converted]) == 0
    again = ckpt.metadata(converted)
    assert again.metadata == {"scan_layers": True}
    assert again.metrics == {"loss": 0.25}
    assert ckpt.restore(converted, item="extra") == {"note": "hi"}
    with ckpt.CheckpointManager(str(tmp_path / "ours"), best_metric="loss") as mgr:
        assert mgr.metrics(3) == {"loss": 0.25}
        assert mgr.best_step() == 3


def _run_state(step, mesh):
    return {"w": jax.device_put(jnp.full((8, 16), float(step)),
                                NamedSharding(mesh, P("data", "model"))),
            "step": jnp.array(step)}


def test_an_orbax_run_directory_continues_in_place(tmp_path, mesh24, capsys):
    """A run Orbax's CheckpointManager wrote goes on under this library's manager, in place:
    its steps are listed, restored and ranked; new steps are written beside them; retention
    and rewind treat them as steps of the run; an Orbax folder is never written into."""
    from ckpt.errors import CheckpointExistsError, StepOrderError

    root = str(tmp_path / "run")
    # (Orbax records a save's metrics only when its manager has a best_fn.)
    options = ocp.CheckpointManagerOptions(best_fn=lambda m: m["loss"], best_mode="min")
    with ocp.CheckpointManager(root, options=options) as manager:
        for step in (1, 2, 3):
            manager.save(step, args=ocp.args.StandardSave(_run_state(step, mesh24)),
                         metrics={"loss": 1.0 / step})
        manager.wait_until_finished()
    mgr = ckpt.CheckpointManager(root, keep_last=3, best_metric="loss")
    assert mgr.steps() == [1, 2, 3]
    assert mgr.latest_step() == 3
    out = mgr.restore(target=_run_state(0, mesh24))
    assert float(out["w"][0, 0]) == 3.0
    assert int(out["step"]) == 3
    assert mgr.metrics(2) == {"loss": 0.5}
    assert mgr.best_step() == 3
    with pytest.raises(StepOrderError):
        mgr.save(2, _run_state(2, mesh24))
    with pytest.raises(CheckpointExistsError):
        mgr.save(3, _run_state(3, mesh24))
    for step in (4, 5):  # the loop goes on in this library's format
        mgr.save(step, _run_state(step, mesh24), metrics={"loss": 1.0 / step})
    mgr.wait()
    assert mgr.steps() == [3, 4, 5]  # keep_last=3: Orbax's steps 1 and 2 went, whole
    # Beside the steps, the record of what retention removed (docs/format.md, LINEAGE).
    assert sorted(os.listdir(root)) == ["3", "4", "5", "LINEAGE"]
    assert os.path.exists(os.path.join(root, "3", "_CHECKPOINT_METADATA"))  # untouched
    assert not os.path.exists(os.path.join(root, "3", "COMMIT"))
    assert cli(["list", root]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert "(orbax-checkpoint)" in listed[2]
    assert sum("committed" in x for x in listed[:3]) == 3
    # The switch is one way, and the list says how to go back.
    assert listed[3].startswith("note: steps [4, 5] were written by this library into an "
                                "Orbax run")
    assert ".rewind(3)" in listed[3]
    mgr.close()
    # Rewinding to the Orbax step removes this library's steps; restarting reads Orbax's.
    with ckpt.CheckpointManager(root) as mgr:
        mgr.rewind(3)
        assert mgr.steps() == [3]
    assert int(ckpt.CheckpointManager(root, read_only=True).restore()["step"]) == 3
    # An Orbax folder that never committed is never written into.
    shutil.copytree(os.path.join(root, "3", "default"), os.path.join(root, "9"))
    with ckpt.CheckpointManager(root) as mgr:
        with pytest.raises(CheckpointExistsError, match="never writes into an Orbax folder"):
            mgr.save(9, _run_state(9, mesh24))
        assert mgr.steps() == [3]


@pytest.mark.parametrize(("naming", "folder"), [
    ({"step_prefix": "ckpt"}, "ckpt_{}"),
    ({"step_format_fixed_length": 8}, "{:08d}"),
    ({"step_prefix": "run_a", "step_format_fixed_length": 5}, "run_a_{:05d}"),
])
def test_an_orbax_run_with_named_steps_continues(tmp_path, mesh24, capsys, naming, folder):
    """An Orbax run saved with ``step_prefix`` or ``step_format_fixed_length`` (Orbax
    records neither in its files) is continued from its newest step, not restarted from
    scratch: its steps are listed, restored, ranked, retained, rewound to and deleted under
    their own names; new steps are written as ``<step>``."""
    root = str(tmp_path / "run")
    options = ocp.CheckpointManagerOptions(best_fn=lambda m: m["loss"], best_mode="min",
                                           **naming)
    with ocp.CheckpointManager(root, options=options) as manager:
        for step in (10, 20, 30):
            manager.save(step, args=ocp.args.StandardSave(_run_state(step, mesh24)),
                         metrics={"loss": 1.0 / step})
        manager.wait_until_finished()
    assert sorted(os.listdir(root)) == sorted(folder.format(s) for s in (10, 20, 30))
    mgr = ckpt.CheckpointManager(root, keep_last=3, best_metric="loss")
    assert mgr.steps() == [10, 20, 30]
    assert mgr.latest_step() == 30
    assert int(mgr.restore(target=_run_state(0, mesh24))["step"]) == 30
    assert int(mgr.restore(20, target=_run_state(0, mesh24))["step"]) == 20
    assert mgr.metrics(20) == {"loss": 0.05}
    assert mgr.best_step() == 30
    mgr.save(40, _run_state(40, mesh24), metrics={"loss": 0.025})
    mgr.wait()
    assert mgr.steps() == [20, 30, 40]  # keep_last=3: Orbax's step 10 went, whole
    assert sorted(os.listdir(root)) == sorted(
        [folder.format(20), folder.format(30), "40", "LINEAGE"])
    assert cli(["list", root, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["step"], r["folder"], r["layout"]) for r in rows] == [
        (40, "40", "ckpt"), (30, folder.format(30), "orbax-checkpoint"),
        (20, folder.format(20), "orbax-checkpoint")]
    assert cli(["inspect", os.path.join(root, folder.format(30))]) == 0
    assert "step        30" in capsys.readouterr().out
    mgr.rewind(30)
    assert mgr.steps() == [20, 30]
    mgr.delete(20)
    mgr.close()
    assert sorted(os.listdir(root)) == sorted([folder.format(30), "LINEAGE"])
    with ckpt.CheckpointManager(root, read_only=True) as reader:
        assert reader.steps() == [30]
        assert int(reader.restore(target=_run_state(0, mesh24))["step"]) == 30
    with pytest.raises(ckpt.errors.NotACheckpointError, match=folder.format(30)):
        ckpt.restore(root)


def test_an_orbax_run_that_cannot_be_understood_is_refused(tmp_path, mesh24):
    """Two namings in one root (two runs), or one step under two folders: no order of
    steps can be trusted, so every manager call that needs one fails naming the folders,
    instead of continuing from the wrong step or from none."""
    from ckpt.errors import UnsupportedFormatError

    root = str(tmp_path / "run")
    for prefix, step in (("ckpt", 10), ("best", 20)):
        options = ocp.CheckpointManagerOptions(step_prefix=prefix)
        with ocp.CheckpointManager(root, options=options) as manager:
            manager.save(step, args=ocp.args.StandardSave(_run_state(step, mesh24)))
            manager.wait_until_finished()
    with ckpt.CheckpointManager(root) as mgr:
        with pytest.raises(UnsupportedFormatError, match="best_20.*ckpt_10|ckpt_10.*best_20"):
            mgr.latest_step()
        with pytest.raises(UnsupportedFormatError, match="named two ways"):
            mgr.save(30, _run_state(30, mesh24))
    shutil.rmtree(os.path.join(root, "best_20"))
    shutil.copytree(os.path.join(root, "ckpt_10"), os.path.join(root, "ckpt_0010"))
    with (ckpt.CheckpointManager(root, read_only=True) as mgr,
          pytest.raises(UnsupportedFormatError, match="step 10 twice .*ckpt_0010, ckpt_10")):
        mgr.steps()


def test_folders_named_like_steps_that_are_none_are_left_alone(tmp_path, mesh24, capsys):
    """A user's ``logs_2024`` or ``backup_0003`` beside a run's steps looks like an Orbax
    step name, but is no committed Orbax step: it is never a step, never read, never
    removed, and two such namings are not taken for two runs."""
    root = tmp_path / "run"
    with ckpt.CheckpointManager(str(root), keep_last=2) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, _run_state(step, mesh24))
        mgr.wait()
        for stray in ("logs_2024", "backup_0003", "0002"):
            (root / stray).mkdir()
            (root / stray / "notes.txt").write_text("mine")
        assert mgr.steps() == [2, 3]
        assert mgr.latest_step() == 3
        mgr.save(4, _run_state(4, mesh24))
        mgr.wait()
        mgr.rewind(3)
        assert mgr.steps() == [3]
    assert cli(["list", str(root), "--json"]) == 0
    assert [r["folder"] for r in json.loads(capsys.readouterr().out)] == ["3"]
    assert all((root / s / "notes.txt").read_text() == "mine"
               for s in ("logs_2024", "backup_0003", "0002"))


def test_a_rewind_across_orbax_steps_of_the_v1_api(tmp_path, mesh24):
    from orbax.checkpoint.experimental import v1 as ocp1

    root = str(tmp_path / "run")
    with ocp1.training.Checkpointer(root) as checkpointer:
        for step in (1, 2, 3):
            checkpointer.save_pytree(step, _run_state(step, mesh24))
    with ckpt.CheckpointManager(root) as mgr:
        assert mgr.steps() == [1, 2, 3]
        mgr.save(4, _run_state(4, mesh24))
        mgr.wait()
        mgr.rewind(1)  # Orbax steps 2, 3 and this library's 4 leave the run
        assert mgr.steps() == [1]
        assert sorted(os.listdir(root)) == ["1", "LINEAGE"]
        out = mgr.restore(target=_run_state(0, mesh24))
        assert float(out["w"][0, 0]) == 1.0
        mgr.save(2, _run_state(22, mesh24))  # the new branch
    with ckpt.CheckpointManager(root) as mgr:
        assert mgr.steps() == [1, 2]
        assert int(mgr.restore(2, target=_run_state(0, mesh24))["step"]) == 22


def test_inspect_names_an_orbax_steps_number_and_its_commit_time(tmp_path, capsys):
    root = str(tmp_path / "run")
    with ocp.CheckpointManager(root) as manager:
        manager.save(12, args=ocp.args.StandardSave({"w": jnp.ones(4)}))
        manager.wait_until_finished()
    assert cli(["inspect", os.path.join(root, "12")]) == 0
    out = capsys.readouterr().out
    assert "step        12" in out
    assert "1970" not in out
    assert "not recorded" not in out
    assert cli(["inspect", os.path.join(root, "12", "default")]) == 0
    out = capsys.readouterr().out  # the item alone: its step is its folder's; no time there
    assert "step        12" in out
    assert "committed   - (not recorded)" in out


def test_orbax_steps_of_several_items_rank_by_their_managers_metrics(tmp_path, mesh24):
    """Ranking an Orbax step reads only what its manager recorded: a step of several
    items (which restore cannot take whole) is still the best step, and retention keeps it."""
    root = str(tmp_path / "run")
    options = ocp.CheckpointManagerOptions(best_fn=lambda m: m["loss"], best_mode="min")
    with ocp.CheckpointManager(root, options=options) as manager:
        for step, loss in ((1, 0.1), (2, 5.0)):
            state = _run_state(step, mesh24)
            manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(state),
                                                       opt=ocp.args.StandardSave(state)),
                         metrics={"loss": loss})
        manager.wait_until_finished()
    with ckpt.CheckpointManager(root, keep_last=1, keep_best=1, best_metric="loss") as mgr:
        assert mgr.metrics(1) == {"loss": 0.1}
        assert mgr.best_step() == 1
        mgr.save(3, _run_state(3, mesh24), metrics={"loss": 9.0})
        mgr.wait()
        assert mgr.steps() == [1, 3]  # the best (Orbax's step 1) and the newest


def test_what_a_crashed_rewind_left_of_an_orbax_step_is_finished_and_never_written_into(
        tmp_path, mesh24):
    from ckpt._format import REWIND, pack
    from ckpt.errors import CheckpointExistsError

    root = str(tmp_path / "run")
    with ocp.CheckpointManager(root) as manager:
        for step in (1, 2):
            manager.save(step, args=ocp.args.StandardSave(_run_state(step, mesh24)))
        manager.wait_until_finished()
    # A rewind to 1 died after removing step 2's commit marker and step metadata.
    store = open_store(root)
    store.write(REWIND, pack({"to": 1, "abandoned": [[2, "orbax-step"]], "at": 0.0}))
    for name in ("commit_success.txt", "_CHECKPOINT_METADATA"):  # (older Orbax: no marker)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(root, "2", name))
    assert ckpt.CheckpointManager(root, read_only=True).steps() == [1]
    with ckpt.CheckpointManager(root) as mgr:  # finishes the rewind first
        assert sorted(os.listdir(root)) == ["1"]
        mgr.save(2, _run_state(22, mesh24))
    # What a crashed deletion left without a record is never written into.
    os.makedirs(os.path.join(root, "5", "default"))
    with (ckpt.CheckpointManager(root) as mgr,
          pytest.raises(CheckpointExistsError, match="holds files this library did not")):
        mgr.save(5, _run_state(5, mesh24))


def test_a_prng_key_of_an_unknown_implementation_is_named(tmp_path):
    item = str(tmp_path / "item")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(item, {"rng": jax.random.key(0), "w": jnp.ones(2)})
    path = os.path.join(item, "array_metadatas", "process_0")
    doc = json.loads(pathlib.Path(path).read_text())
    for entry in doc["array_metadatas"]:
        if entry["array_metadata"]["param_name"] == "rng":
            entry["array_metadata"]["ext_metadata"]["random_key_impl"] = "philox9"
    pathlib.Path(path).write_text(json.dumps(doc))
    with pytest.raises(UnsupportedFormatError, match=r"'rng'.*'philox9'"):
        ckpt.restore(item)


def test_a_save_never_shadows_another_checkpoint_or_a_run(tmp_path):
    """`ckpt.save` into a folder that holds an Orbax checkpoint (a StandardCheckpointer
    folder, a step of an Orbax run), safetensors or a manager root is refused, with
    overwrite too, and writes nothing there; overwriting a checkpoint of this library's
    stays as it is."""
    tree = {"w": np.ones(4, np.float32)}
    single = tmp_path / "single"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(single, {"w": jnp.zeros(4)})
    run = tmp_path / "run"
    with ocp.CheckpointManager(run) as manager:
        manager.save(3, args=ocp.args.StandardSave({"w": jnp.zeros(4)}))
        manager.wait_until_finished()
    files = tmp_path / "hf"  # an export (what the safetensors package writes, too)
    ckpt.save(tmp_path / "src", {"w": np.zeros(4, np.float32)})
    ckpt.export_safetensors(tmp_path / "src", files)
    ours = tmp_path / "ours"
    with ckpt.CheckpointManager(ours) as mgr:
        mgr.save(1, tree)
    cases = {single: "in Orbax format", run / "3": "in Orbax format",
             files: "in safetensors format", ours: "root of a CheckpointManager run",
             run: "root of a CheckpointManager run"}
    for folder, why in cases.items():
        before = sorted(os.listdir(folder))
        for overwrite in (False, True):
            with pytest.raises(CheckpointExistsError, match=why) as err:
                ckpt.save(folder, tree, overwrite=overwrite)
            assert str(folder) in str(err.value)
        assert sorted(os.listdir(folder)) == before, folder
    assert not os.path.exists(ours / "COMMIT")  # still a run, not a checkpoint
    with ckpt.CheckpointManager(ours) as mgr:
        assert mgr.steps() == [1]
    with ckpt.CheckpointManager(run) as mgr:
        assert mgr.steps() == [3]
    ckpt.save(ours / "1", {"w": np.zeros(4, np.float32)}, overwrite=True)
    assert ckpt.restore(ours / "1")["w"].tolist() == [0.0] * 4
