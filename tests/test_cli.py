"""The ckpt console script (inspect and list)."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ckpt
from ckpt.cli import main


def test_inspect_prints_tree_and_json(tmp_path, mesh24, capsys):
    w = jax.device_put(jnp.ones((64, 256)), NamedSharding(mesh24, P("data", "model")))
    ckpt.save(tmp_path / "c", {"params": {"w": w}, "step": 3}, metadata={"run": "a"})
    assert main(["inspect", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "['params']['w']" in out and "64x256" in out and "('data', 'model')" in out
    assert main(["inspect", "--json", str(tmp_path / "c")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["format_version"] == 1 and doc["metadata"] == {"run": "a"}
    leaf = next(x for x in doc["leaves"] if x["path"] == "['params']['w']")
    assert leaf["shape"] == [64, 256] and leaf["spec"] == ["data", "model"]
    assert leaf["mesh"] == {"data": 2, "model": 4} and leaf["nbytes"] == 64 * 256 * 4


def test_list_and_errors_are_one_line(tmp_path, capsys):
    with ckpt.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, {"x": 1})
        mgr.save(2, {"x": 2})
    assert main(["list", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out.split() == ["2", "committed", "1", "committed"]
    assert main(["inspect", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing" in err and "Traceback" not in err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "ckpt.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "inspect" in out and "list" in out
