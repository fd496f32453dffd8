"""The ckpt command line: inspect, list, verify, reshard, gc, and their errors."""

import collections
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ckpt
from ckpt._housekeeping import committed_steps
from ckpt._reshard import MeshLike, SpecLike
from ckpt.cli import main
from ckpt.storage import open_store
from tests.conftest import RSS_OVERHEAD, backend_url, cli_extra_rss, make_mesh
from tests.helpers import REPO


@pytest.fixture
def saved(tmp_path, mesh24):
    rng = np.random.default_rng(0)
    host = {"w": rng.standard_normal((256, 1024)).astype(np.float32),
            "e": rng.standard_normal((512, 64)).astype(jnp.bfloat16)}
    specs = {"w": P("data", "model"), "e": P("model")}
    tree = {"params": {k: jax.device_put(v, NamedSharding(mesh24, specs[k]))
                       for k, v in host.items()}, "step": 4}
    url = str(tmp_path / "run" / "4")
    ckpt.save(url, tree, metadata={"lr": 0.1})
    return url, host


def _chunks(url, leaf):
    attempt = ckpt.metadata(url).attempt
    return sorted(p for p in open_store(url).list(f"{attempt}/arrays/{leaf}/c"))


def test_inspect_reports_everything(saved, capsys):
    url, _ = saved
    assert main(["inspect", url]) == 0
    out = capsys.readouterr().out
    for text in ("step        4", "format      v1", "written by 1 process", "'data': 2",
                 "{'lr': 0.1}", "params/w ", "256x1024", "float32", "('data', 'model')",
                 "128x256", "total       3 leaves"):
        assert text in out, text
    assert main(["inspect", "--json", url]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) >= {"url", "format_version", "attempt", "committed_at", "process_count",
                        "metadata", "leaves", "nbytes"}
    assert doc["nbytes"] == 256 * 1024 * 4 + 512 * 64 * 2
    leaf = next(x for x in doc["leaves"] if x["path"] == "params/w")
    assert leaf["keys"] == [["key", "params"], ["key", "w"]]
    assert leaf["shape"] == [256, 1024]
    assert leaf["spec"] == ["data", "model"]
    assert leaf["mesh"] == {"data": 2, "model": 4}
    assert leaf["chunk_shape"] == [128, 256]


def test_list_shows_committed_and_incomplete_with_age_and_size(saved, capsys):
    url, _ = saved
    root = os.path.dirname(url)
    store = open_store(root)
    store.write("9/attempt-20200101T000000-aaaaaaaaaaaa/arrays/x/c/0", b"x" * 1000)
    assert main(["list", root]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["9", "incomplete"]
    assert "1000 B" in lines[0]
    assert " d old" in lines[0]
    assert lines[1].split()[:2] == ["4", "committed"]
    assert main(["list", "--json", root]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(e["step"], e["state"]) for e in doc] == [(9, "incomplete"), (4, "committed")]
    assert doc[0]["bytes"] == 1000
    assert doc[0]["age_s"] > 86400 * 365


def _damage(url, leaf, how):
    store = open_store(url)
    keys = _chunks(url, leaf)
    if how == "flip":
        data = bytearray(store.read(keys[1]))
        data[10] ^= 0x40
        store.write(keys[1], bytes(data))
    elif how == "truncate":
        store.write(keys[1], store.read(keys[1])[:-7])
    elif how == "missing":
        store.delete(keys[1])
    elif how == "swap":
        a, b = store.read(keys[0]), store.read(keys[1])
        store.write(keys[0], b)
        store.write(keys[1], a)
    return keys


def test_every_command_and_error_writes_a_key_path_one_way(tmp_path, mesh24, capsys):
    """inspect's rows, verify's BAD lines, reshard's errors, export's list and restore's
    errors all write ``opt/0/mu/w`` for the same leaf: what ``--spec`` takes."""
    from ckpt._tree import leaf_name

    adam = collections.namedtuple("adam", ["mu"])
    w = jax.device_put(np.ones((256, 1024), np.float32), NamedSharding(mesh24, P("data")))
    url = str(tmp_path / "c")
    ckpt.save(url, {"opt": [adam(mu={"w": w})]})
    assert main(["inspect", url]) == 0
    assert any(line.startswith("opt/0/mu/w ") for line in capsys.readouterr().out.splitlines())
    assert main(["reshard", "-q", url, str(tmp_path / "r"), "--mesh", "data=3"]) == 2
    assert "opt/0/mu/w [256, 1024]: " in capsys.readouterr().err
    assert main(["-v", "export", "-q", url, str(tmp_path / "hf"), "--names", "drop opt"]) == 0
    assert "  left out opt/0/mu/w: name rule 'drop opt'" in capsys.readouterr().out
    with pytest.raises(ckpt.MissingLeafError, match=r"absent from .*: opt/0/mu/v; the "
                       r"checkpoint holds under opt/0/mu: opt/0/mu/w"):
        ckpt.restore(url, {"opt": [adam(mu={"v": w})]})
    _damage(url, leaf_name((("key", "opt"), ("index", 0), ("attr", "mu"), ("key", "w"))),
            "flip")
    assert main(["verify", "-q", url]) == 1
    bad = [line for line in capsys.readouterr().out.splitlines() if line.startswith("BAD")]
    assert bad and all(line.startswith("BAD opt/0/mu/w chunk (1, 0): ") for line in bad), bad


@pytest.mark.parametrize("how", ["flip", "truncate", "missing", "swap"])
def test_verify_names_each_bad_chunk(saved, capsys, how):
    url, _ = saved
    assert main(["verify", "-q", url]) == 0
    assert capsys.readouterr().out.startswith("OK: ")
    _damage(url, "params.w", how)
    assert main(["verify", "-q", url]) == 1
    bad = [line for line in capsys.readouterr().out.splitlines() if line.startswith("BAD")]
    assert bad and all("params/w chunk (0, " in line for line in bad), bad
    assert len(bad) == (2 if how == "swap" else 1)


def test_the_tools_from_python_return_what_they_did(saved, tmp_path):
    """`ckpt.reshard`, `ckpt.convert` and `ckpt.verify`, what the CLI calls: a mesh as a
    mapping, a string or a `jax.sharding.Mesh`; rules as a mapping with string,
    `PartitionSpec` or tuple specs; results returned, not printed."""
    url, host = saved
    mesh = make_mesh((4, 2))
    forms: list[tuple[MeshLike, SpecLike]] = [({"data": 4, "model": 2}, "model,data"),
                                              ("data=4,model=2", P("model", "data")),
                                              (mesh, ("model", "data"))]
    for i, (as_mesh, spec) in enumerate(forms):
        dst = str(tmp_path / f"r{i}")
        result = ckpt.reshard(url, dst, mesh=as_mesh, rules={"params/w": spec})
        assert isinstance(result, ckpt.ReshardResult)
        assert result.url == dst
        assert result.mesh == {"data": 4, "model": 2}
        assert result.chunks > 0
        assert result.nbytes > 0
        out = ckpt.restore(dst, mesh=mesh)
        assert out["params"]["w"].sharding.spec == P("model", "data")
        assert np.asarray(out["params"]["w"]).tobytes() == host["w"].tobytes()
    report = ckpt.verify(dst)
    assert isinstance(report, ckpt.VerifyReport)
    assert report.ok
    assert report.chunks > 0
    # The annotations of rules (pairs as tuples) and mesh (int sizes) leave out the JSON
    # lists and numpy integers convert documents.
    converted = ckpt.convert(url, str(tmp_path / "c"),
                             rules=[["params/w", "-,-"]],  # type: ignore[list-item]
                             mesh={"data": np.int64(4), "model": 2})  # type: ignore[dict-item]
    assert converted.url == str(tmp_path / "c")
    assert ckpt.verify(converted.url).ok
    # What is refused is passed on purpose.
    for bad in ({"data": 0}, "data=two", {"data": True}, {"data": 2.0}, {}):
        with pytest.raises(ckpt.InvalidArgumentError, match="mesh"):
            ckpt.reshard(url, str(tmp_path / "bad"), mesh=bad)  # type: ignore[arg-type]
    with pytest.raises(ckpt.InvalidArgumentError, match="spec"):
        ckpt.reshard(url, str(tmp_path / "bad"),
                     rules={"params/w": ("model", 3)})  # type: ignore[dict-item]
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(("src_backend", "dst_backend"), [("local", "local"), ("local", "memory"),
                                                      ("s3", "gcs")])
def test_reshard_to_new_mesh_restores_reading_each_chunk_once(
        request, tmp_path, saved, src_backend, dst_backend):
    url, host = saved
    if src_backend != "local":
        src = backend_url(request, tmp_path, src_backend) + "/4"
        ckpt.save(src, ckpt.restore(url, mesh=make_mesh((2, 4))))
        url = src
    dst = backend_url(request, tmp_path, dst_backend) + "/new"
    assert main(["reshard", "-q", url, dst, "--mesh", "data=4,model=2",
                 "--spec", "params/w=model,data"]) == 0
    from tests.helpers.faults import ChunkReads

    seen = ChunkReads()
    mesh = make_mesh((4, 2))
    out = ckpt.restore(seen.store(dst), mesh=mesh)
    assert out["params"]["w"].sharding.spec == P("model", "data")
    assert out["params"]["e"].sharding.spec == P("model")
    for k, v in host.items():
        assert np.asarray(out["params"][k]).tobytes() == v.tobytes()
    assert out["step"] == 4
    from ckpt.restore.boxes import box_of_index, chunk_box

    layout = {leaf.name: leaf for leaf in ckpt.metadata(dst).leaves}
    for leaf in ("w", "e"):
        name, arr = f"params/{leaf}", out["params"][leaf]
        coords = seen.reads[name]
        assert len(coords) == len(set(coords))  # each chunk read exactly once
        # Each chunk is one device's shard, whole: the chunks read are the shards' boxes.
        shards = {box_of_index(s.index, arr.shape) for s in arr.addressable_shards}
        assert {chunk_box(c, layout[name].chunk_shape, arr.shape) for c in coords} == shards


@pytest.mark.slow  # starts processes
def test_reshard_memory_stays_within_budget(tmp_path):
    tree = {f"w{i}": np.random.default_rng(i).standard_normal((2048, 4096)).astype(np.float32)
            for i in range(8)}  # 256 MiB: 4x the budget below
    src = str(tmp_path / "src")
    ckpt.save(src, tree)
    budget = 64 << 20
    extra = cli_extra_rss(["reshard", "-q", src, str(tmp_path / "dst"), "--mesh", "a=4,b=2",
                           "--spec", "*=b,a", "--memory-budget", "64M"])
    assert sum(v.nbytes for v in tree.values()) >= 4 * budget
    assert extra <= budget + RSS_OVERHEAD, f"resident memory rose {extra / 2**20:.0f} MiB"
    out = ckpt.restore(str(tmp_path / "dst"), target={"w3": np.zeros((2048, 4096), np.float32)})
    assert out["w3"].tobytes() == tree["w3"].tobytes()


@pytest.mark.slow  # starts processes
def test_reshard_progress_only_on_a_terminal(saved, tmp_path):
    import pty

    url, _ = saved
    run = subprocess.run([sys.executable, "-m", "ckpt", "reshard", url,
                          str(tmp_path / "dst"), "--mesh", "data=2,model=4"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stderr == "", run.stderr  # off a terminal: nothing
    assert "wrote" in run.stdout
    leader, follower = pty.openpty()
    on_tty = subprocess.run([sys.executable, "-m", "ckpt", "reshard", url,
                             str(tmp_path / "dst2"), "--mesh", "data=2,model=4"],
                            stdout=subprocess.PIPE, stderr=follower, timeout=120)
    os.close(follower)
    err = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal's other end closed: all read
            break
        if not chunk:
            break
        err += chunk
    os.close(leader)
    text = err.decode()
    assert on_tty.returncode == 0, text
    last = text.rstrip().split("\r")[-1]
    assert "resharding [" in last and "100%" in last and "/s" in last and "left" in last, text
    assert "\x1b[K" in text  # each redraw clears what a longer line left behind


@pytest.mark.parametrize(("args", "message"), [
    (["--mesh", "data2,model=4"], "cannot parse 'data2'"),
    (["--mesh", "data=2,model=4", "--spec", "params/w=data,batch"],
     "axis 'batch' is not in the mesh"),
    (["--mesh", "data=3,model=4"], "dimension 0 of size 256 is not divisible by 3"),
    (["--mesh", "data=2,model=4", "--spec", "nonsense"], "expected PATTERN=SPEC"),
])
def test_reshard_bad_input_is_one_line_and_writes_nothing(saved, tmp_path, capsys, args,
                                                          message):
    url, _ = saved
    dst = tmp_path / "dst"
    assert main(["reshard", "-q", url, str(dst), *args]) == 2  # usage
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1
    assert "Traceback" not in err
    assert not dst.exists()


def test_reshard_refuses_committed_destination_unless_overwrite(saved, tmp_path, capsys):
    url, host = saved
    dst = str(tmp_path / "dst")
    assert main(["reshard", "-q", url, dst, "--mesh", "data=2,model=4"]) == 0
    first = ckpt.metadata(dst).attempt
    assert main(["reshard", "-q", url, dst, "--mesh", "data=2,model=4"]) == 3
    assert "already holds a committed checkpoint" in capsys.readouterr().err
    assert ckpt.metadata(dst).attempt == first
    assert main(["reshard", "-q", url, dst, "--mesh", "data=4,model=2", "--overwrite"]) == 0
    info = ckpt.metadata(dst)
    assert info.attempt != first
    assert first not in open_store(dst).list_children()
    assert info.leaves[1].mesh == {"data": 4, "model": 2}
    out = ckpt.restore(dst)
    assert out["params"]["w"].tobytes() == host["w"].tobytes()


def test_not_a_checkpoint_is_one_line(tmp_path, capsys):
    for argv in (["inspect", str(tmp_path)], ["verify", str(tmp_path / "x")],
                 ["reshard", str(tmp_path / "x"), str(tmp_path / "y"), "--mesh", "a=1"]):
        assert main(argv) == 3
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert ("no checkpoint" in err or "not a checkpoint" in err)
    assert not (tmp_path / "y").exists()


def test_gc_dry_run_then_removes_debris_and_applies_retention(tmp_path, capsys):
    root = str(tmp_path / "run")
    with ckpt.CheckpointManager(root, keep_last=None) as mgr:
        for step in range(4):
            mgr.save(step, {"x": np.full(10000, step)})
    store = open_store(root)
    old = "5/attempt-20200101T000000-aaaaaaaaaaaa"
    young = "6/" + time.strftime("attempt-%Y%m%dT%H%M%S-bbbbbbbbbbbb", time.gmtime())
    store.write(f"{old}/hosts/0.msgpack", b"x")
    store.write(f"{young}/hosts/0.msgpack", b"x")
    assert main(["gc", root, "--dry-run", "--keep-last", "2"]) == 0
    out = capsys.readouterr().out
    assert f"would remove incomplete attempt {old}" in out
    assert "would remove committed step 0" in out
    assert "would remove committed step 1" in out
    assert young.split("/")[1] not in out
    # (no CheckpointManager here: its start-up clean-up would remove the debris itself)
    assert store.list(old)
    assert committed_steps(store) == [0, 1, 2, 3]
    assert main(["gc", root, "--keep-last", "2"]) == 0
    assert "removing incomplete attempt" in capsys.readouterr().out
    assert store.list(old) == []
    assert store.list(young)
    assert committed_steps(store) == [2, 3]


@pytest.mark.parametrize("command", ["inspect", "list", "verify", "diff", "reshard", "gc"])
@pytest.mark.slow  # starts processes
def test_help_reads_well(command):
    run = subprocess.run([sys.executable, "-m", "ckpt.cli", command, "--help"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0
    assert "usage: ckpt " + command in run.stdout
    assert "URLs:" in run.stdout


def test_spec_patterns_match_whole_segments_and_a_rule_matching_nothing_is_an_error(
        tmp_path, capsys):
    from ckpt._reshard import path_matches

    assert path_matches("params/*", "params/w")
    assert not path_matches("params/*", "params/d/b")
    assert path_matches("params/**/b", "params/d/e/b")
    assert path_matches("params/**/b", "params/b")
    assert path_matches("**", "a/b/c")
    assert not path_matches("params/w?", "params/w/x")
    src = str(tmp_path / "src")
    ckpt.save(src, {"params": {"w": np.ones((64, 128), np.float32),
                               "dense": {"bias": np.ones(4096 * 2, np.float32)}}})
    # The README's rule: `*` no longer reaches the 1-d bias, which could not take it.
    assert main(["reshard", "-q", src, str(tmp_path / "a"), "--mesh", "data=2,model=4",
                 "--spec", "params/*=-,model"]) == 0
    leaves = {leaf.name: leaf for leaf in ckpt.metadata(str(tmp_path / "a")).leaves}
    assert leaves["params/w"].chunk_shape == (64, 32)  # as (-, model)
    assert main(["reshard", "-q", src, str(tmp_path / "b"), "--mesh", "data=2,model=4",
                 "--spec", "params/**/bias=model"]) == 0
    leaves = {leaf.name: leaf for leaf in ckpt.metadata(str(tmp_path / "b")).leaves}
    assert leaves["params/dense/bias"].chunk_shape == (2048,)  # as (model,)
    capsys.readouterr()
    assert main(["reshard", "-q", src, str(tmp_path / "c"), "--mesh", "data=2,model=4",
                 "--spec", "parms/*=-,model"]) == 2
    err = capsys.readouterr().err
    assert "parms/*" in err and "match no array leaf" in err and "params/w" in err, err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_a_run_root_or_a_missing_step_is_named_the_same_way_by_each_command(
        tmp_path, capsys, command):
    root = tmp_path / "run"
    with ckpt.CheckpointManager(str(root), watch_preemption=False) as mgr:
        for step in (100, 200, 300, 400):
            mgr.save(step, {"x": np.arange(4)})
    assert main([command, str(root)]) == 3
    err = capsys.readouterr().err
    assert "a run with steps 100, 200, 300, 400, not one checkpoint" in err, err
    assert f"`ckpt {command} {root}/400` for the newest" in err, err
    assert main([command, str(root / "250")]) == 3
    err = capsys.readouterr().err
    assert f"the run at {root} has no committed step 250" in err, err
    assert "committed steps near it: 100, 200, 300, 400; 4 in all, the newest 400" in err
    assert main([command, str(root / "nope")]) == 3  # not a step: the plain answer
    assert "nothing is there" in capsys.readouterr().err


def test_list_of_one_checkpoint_says_so(saved, capsys):
    url, _ = saved
    for argv in (["list", url], ["list", "--json", url]):
        assert main(argv) == 2
        assert f"{url} is one checkpoint, not a run's root of steps: `ckpt inspect {url}`" \
            in capsys.readouterr().err


def test_list_shows_a_step_left_holding_only_a_removal_record(tmp_path, capsys):
    root = tmp_path / "run"
    with ckpt.CheckpointManager(str(root), watch_preemption=False) as mgr:
        mgr.save(1, {"x": np.arange(4)})
    debris = root / "5" / "attempt-20260101T000000-000000000000"
    debris.mkdir(parents=True)
    (debris / "x").write_bytes(b"1")
    assert main(["gc", str(root), "--grace", "0"]) == 0
    capsys.readouterr()
    assert sorted(os.listdir(root / "5")) == ["claims"]  # the removal record stays
    assert main(["list", str(root)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert re.match(r" +5 +removed .* attempt-20260101T000000-000000000000$", rows[0]), rows
    assert main(["list", "--json", str(root)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(e["step"], e["state"]) for e in doc] == [(5, "removed"), (1, "committed")]


def test_verify_says_what_it_checked(saved, tmp_path, capsys):
    url, _ = saved
    assert main(["verify", "-q", url]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"OK: {url}: checked COMMIT, the manifest and 1 host report; "), line
    assert re.search(r"; \d+ chunks of 2 array leaves \(1\.1 MiB read\)$", line), line
    small = str(tmp_path / "small")
    ckpt.save(small, {"a": np.arange(3), "b": 1.5})
    assert main(["verify", "-q", small]) == 0
    assert capsys.readouterr().out.strip().endswith("; 1 leaf held in the manifest")
    assert main(["verify", "--json", small]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["arrays"], doc["inline"], doc["reports"], doc["chunks"]) == (0, 1, 1, 0)


def test_a_memory_budget_below_a_chunk_is_refused(saved, tmp_path, capsys):
    url, _ = saved
    for argv in (["verify", url], ["reshard", url, str(tmp_path / "r"), "--mesh", "data=8"],
                 ["export", url, str(tmp_path / "e")]):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--memory-budget", "1K"])
        assert exit_.value.code == 2
        assert "'1K' is below 1M" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "e").exists()


def test_rewrites_say_how_the_result_is_laid_out_and_when_to_use_which(
        saved, tmp_path, capsys):
    plain = str(tmp_path / "plain")
    ckpt.save(plain, {"w": np.arange(50_000, dtype=np.float32)})
    assert main(["convert", "-q", plain, str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "unsharded (saved with no mesh)" in out and "mesh no mesh" not in out, out
    for command, other in (("reshard", "convert"), ("convert", "reshard")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert f"use {other}" in text or f"{other} is the same rewrite" in text, text
        assert "Orbax" in text and "this library" in text, text


def test_export_summarises_what_it_left_out_and_names_the_flag(tmp_path, capsys):
    import optax

    params = {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}
    src = str(tmp_path / "ck")
    ckpt.save(src, {"params": params, "opt_state": optax.adam(1e-3).init(params),
                    "rng": jax.random.key(0)})
    dst = str(tmp_path / "hf")
    assert main(["export", "-q", src, dst]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"wrote {dst}: 2 tensors, ")
    assert lines[1].startswith("  left out 5 leaves: name rule 'drop (^|\\.)(opt_state"), lines
    assert sorted(lines[2:]) == ["  (-v lists each leaf left out)",
                                 "  left out 1 leaf: a PRNG key",
                                 "  left out 1 leaf: not an array (empty)"], lines
    assert main(["-v", "export", "-q", src, dst, "--overwrite"]) == 0
    listed = [ln for ln in capsys.readouterr().out.splitlines()
              if re.match(r"  left out (opt_state|rng)\b", ln)]
    assert len(listed) == 7, listed  # each leaf: the 5 Adam leaves, the empty state, the key
    assert "  left out rng: a PRNG key" in listed, listed
    assert main(["export", "-q", src, dst]) == 3
    err = capsys.readouterr().err
    assert "add --overwrite" in err and "overwrite=True" not in err, err


def test_inspect_of_safetensors_shows_only_what_the_file_holds(tmp_path, capsys):
    from safetensors.numpy import save_file

    path = str(tmp_path / "model.safetensors")
    save_file({"w": np.ones((2, 3), np.float32)}, path, metadata={"format": "pt"})
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "process" not in out and "format_version" not in out, out
    assert "committed   - (safetensors records no commit, writer or mesh)" in out
    assert "metadata    {'format': 'pt'}  (the files' __metadata__)" in out
    assert main(["inspect", "--json", path]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert all(doc[k] is None for k in ("format_version", "attempt", "created_at",
                                        "committed_at", "process_count", "versions")), doc
    assert doc["metadata"] == {"format": "pt"}


@pytest.mark.slow  # a server
@pytest.mark.parametrize("command", ["list", "gc"])
def test_list_and_gc_fail_on_a_missing_root(request, tmp_path, capsys, command):
    assert main([command, str(tmp_path / "no-such-run")]) == 3
    assert "no-such-run" in capsys.readouterr().err
    missing_bucket = backend_url(request, tmp_path, "s3").replace("ckpt-tests", "no-bucket")
    assert main([command, missing_bucket]) == 3
    assert "no-bucket" in capsys.readouterr().err


def _documented_json():
    """The --json documents of docs/tools.md, in order: inspect, verify, diff, gc."""
    text = (REPO / "docs" / "tools.md").read_text()
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)```", text, re.S)]


def test_verify_and_gc_json(saved, tmp_path, capsys):
    """--json documents hold the fields docs/tools.md shows, and no others."""
    inspect_doc, verify_doc, _, gc_doc = _documented_json()
    url, _ = saved
    assert main(["inspect", "--json", url]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == set(inspect_doc), set(doc) ^ set(inspect_doc)
    assert set(doc["leaves"][0]) == set(inspect_doc["leaves"][0])
    assert main(["verify", "--json", url]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["problems"] == [] and doc["chunks"] > 0, doc
    _damage(url, "params.w", "flip")
    assert main(["verify", "--json", url]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False
    assert doc["problems"][0]["leaf"] == "params/w"
    assert isinstance(doc["problems"][0]["chunk"], list)
    assert set(doc) == set(verify_doc) and set(doc["problems"][0]) == set(
        verify_doc["problems"][0]), doc
    root = os.path.dirname(url)
    debris = os.path.join(root, "5", "attempt-20260101T000000-000000000000")
    os.makedirs(debris)
    pathlib.Path(debris, "x").write_bytes(b"1")
    assert main(["gc", root, "--grace", "0", "--dry-run", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["dry_run"] is True
    assert doc["root"] == root
    assert set(doc) == set(gc_doc) and all(set(a) == set(gc_doc["actions"][0])
                                           for a in doc["actions"]), doc
    assert {"action": "remove", "what": "incomplete attempt",
            "target": "5/attempt-20260101T000000-000000000000"} in doc["actions"], doc


def test_exit_status_by_kind_of_failure_also_with_debug(saved, tmp_path, capsys):
    url, _ = saved
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"x")
    # A storage failure (TensorStore cannot make a folder under a file): 3, not "usage".
    argv = ["reshard", "-q", url, str(blocker / "dst"), "--mesh", "data=2,model=4"]
    assert main(argv) == 3
    assert main([*argv, "--debug"]) == 3
    assert "Traceback" in capsys.readouterr().err
    assert main(["list", str(tmp_path / "nope"), "--debug"]) == 3
    with pytest.raises(SystemExit) as exit_:
        main(["gc", str(tmp_path), "--d"])  # never abbreviated: --debug or --dry-run?
    assert exit_.value.code == 2


def test_progress_line_fits_one_terminal_row(monkeypatch):
    from ckpt.cli import _Progress

    monkeypatch.setenv("COLUMNS", "60")
    bar = _Progress("resharding")
    line = bar.line(500 << 30, 1000 << 30, bar.started + 3000)
    assert len(line) <= 59
    assert line.startswith("resharding [")
    monkeypatch.setenv("COLUMNS", "200")
    assert "- left" in bar.line(1, 1000, bar.started + 0.01)  # no estimate from 10 ms


def test_inspect_shows_the_metrics_saved_with_a_step(tmp_path, capsys):
    with ckpt.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(3, {"x": np.arange(4)}, metrics={"loss": 0.25, "grad_norm": float("inf")})
        mgr.save(4, {"x": np.arange(4)})
    assert main(["inspect", str(tmp_path / "run" / "3")]) == 0
    assert "metrics     grad_norm=inf, loss=0.25" in capsys.readouterr().out
    assert main(["inspect", "--json", str(tmp_path / "run" / "3")]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == {"loss": 0.25, "grad_norm": "inf"}
    assert main(["inspect", "--json", str(tmp_path / "run" / "4")]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == {}
