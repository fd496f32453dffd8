"""Bad input: clear errors named for what went wrong, and nothing written."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

import ckpt
from ckpt.errors import (
    CheckpointNotFoundError,
    CkptError,
    CorruptCheckpointError,
    NotACheckpointError,
    UncommittedCheckpointError,
    UnsupportedURLError,
)


def _tree(root):
    out: list[str] = []
    for folder, dirs, files in os.walk(root):
        out.extend(os.path.join(folder, f) for f in files)
        out.extend(os.path.join(folder, d) + "/" for d in dirs)
    return sorted(out)


def test_missing_url(tmp_path):
    url = tmp_path / "nope"
    for call in (ckpt.restore, ckpt.metadata):
        with pytest.raises(CheckpointNotFoundError, match=str(url)) as err:
            call(url)
        assert isinstance(err.value, FileNotFoundError)
        assert isinstance(err.value, CkptError)
    assert not url.exists()


def test_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("hello")
    before = _tree(tmp_path)
    with pytest.raises(NotACheckpointError, match="notes.txt"):
        ckpt.restore(tmp_path / "data")
    with pytest.raises(NotACheckpointError):
        ckpt.metadata(tmp_path / "data")
    assert _tree(tmp_path) == before


def test_uncommitted_checkpoint(tmp_path):
    ckpt.save(tmp_path / "c", {"x": np.arange(10000)})
    os.unlink(tmp_path / "c" / "COMMIT")
    before = _tree(tmp_path)
    with pytest.raises(UncommittedCheckpointError, match="uncommitted"):
        ckpt.restore(tmp_path / "c")
    assert _tree(tmp_path) == before


def test_manager_root_as_checkpoint_is_not_a_checkpoint(tmp_path):
    with ckpt.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, {"x": 1})
    with pytest.raises(NotACheckpointError, match="run"):
        ckpt.restore(tmp_path / "run")


@pytest.mark.parametrize("url", ["ftp://host/ckpt", "hdfs://nn/ckpt", "azure://c/x"])
def test_unknown_scheme(url):
    for call in (lambda: ckpt.restore(url), lambda: ckpt.save_async(url, {"x": 1}),
                 lambda: ckpt.CheckpointManager(url)):
        with pytest.raises(UnsupportedURLError, match=url.split("://")[0]):
            call()


def test_edited_manifest_is_detected_before_reading(tmp_path):
    ckpt.save(tmp_path / "c", {"x": jnp.arange(10000.0)})
    manifest = next((tmp_path / "c").glob("attempt-*/manifest.msgpack"))
    data = bytearray(manifest.read_bytes())
    data[-1] ^= 1
    manifest.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="manifest.msgpack.*sha256"):
        ckpt.restore(tmp_path / "c")


def test_flipped_chunk_byte_is_detected_naming_leaf_and_chunk(tmp_path):
    ckpt.save(tmp_path / "c", {"layer": {"w": np.arange(100000, dtype=np.float32)}})
    chunk = next((tmp_path / "c").glob("attempt-*/arrays/*/c/0"))
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0x10
    chunk.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=r"layer/w chunk \(0,\)"):
        ckpt.restore(tmp_path / "c")


def test_missing_chunk_is_detected(tmp_path):
    ckpt.save(tmp_path / "c", {"w": np.zeros(100000, dtype=np.float32)})
    next((tmp_path / "c").glob("attempt-*/arrays/*/c/0")).unlink()
    with pytest.raises(CorruptCheckpointError, match=r"leaf w chunk \(0,\)"):
        ckpt.restore(tmp_path / "c")


def test_every_error_class_is_at_the_top_level_and_usage_errors_are_library_errors(tmp_path):
    for name in ckpt.errors.__all__:
        assert getattr(ckpt, name) is getattr(ckpt.errors, name), name
    root = str(tmp_path / "root")
    calls = [lambda: ckpt.CheckpointManager(root, keep_last=0),
             lambda: ckpt.CheckpointManager(root, save_every=0),
             lambda: ckpt.save_async(tmp_path / "c", {"x": np.zeros(2)}, snapshot="nope"),
             lambda: ckpt.save(tmp_path / "c", {"x": np.zeros(2)}, timeout_s=-1)]
    for call in calls:
        with pytest.raises(ckpt.InvalidArgumentError) as err:
            call()
        assert isinstance(err.value, CkptError)
        assert isinstance(err.value, ValueError)
    assert not os.path.exists(tmp_path / "c")


def test_the_top_level_holds_only_the_library_s_names():
    public = {n for n in dir(ckpt) if not n.startswith("_")}
    assert "annotations" not in public
    assert public <= set(ckpt.__all__) | {"cli", "errors", "restore", "storage"}, \
        public - set(ckpt.__all__)


def test_saving_inside_traced_code_says_to_save_outside_it(tmp_path):
    import jax

    @jax.jit
    def step(x):
        ckpt.save(str(tmp_path / "c"), {"params": {"w": x}})
        return x

    with pytest.raises(ckpt.UnsupportedLeafError, match=r"leaf params/w is a traced "
                       r"value .*jax.jit.*save outside traced code"):
        step(jnp.ones(3))
    assert not os.path.exists(tmp_path / "c")


def test_a_changed_optimizer_names_what_the_checkpoint_holds_in_its_place(tmp_path):
    import optax

    params = {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}
    url = str(tmp_path / "c")
    ckpt.save(url, {"params": params, "opt_state": optax.adam(1e-3).init(params)})
    chained = optax.chain(optax.clip(1.0), optax.adam(1e-3))  # the optimizer changed
    with pytest.raises(ckpt.MissingLeafError) as err:
        ckpt.restore(url, {"params": params, "opt_state": chained.init(params)})
    text = str(err.value)
    absent, held = text.split("; the checkpoint holds ")
    assert "opt_state/1/0/mu/dense/kernel" in absent, text
    assert held.startswith("under opt_state: opt_state/0/count, "
                           "opt_state/0/mu/dense/bias, "), text


def test_a_bare_array_checkpoint_is_named_at_the_top_for_a_tree_target(tmp_path):
    url = str(tmp_path / "c")
    ckpt.save(url, np.arange(4))
    with pytest.raises(ckpt.MissingLeafError,
                       match=r"absent from .*: a/b; the checkpoint holds at the "
                             r"top: <root>$"):
        ckpt.restore(url, {"a": {"b": np.zeros(4)}})
