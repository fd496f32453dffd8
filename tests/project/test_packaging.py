"""The library installs and imports like a library: its own names only (`ckpt`,
`ckpt.storage`, `ckpt.restore`), a version, typing information, a module entry point, and
extras for the object stores."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

import ckpt
from tests.helpers import REPO

ROOT = str(REPO)

ROUND_TRIP = """
import numpy as np
import ckpt
import ckpt.restore as R
import ckpt.storage as S
ckpt.save("ck", {"w": np.arange(10.0)})
out = ckpt.restore("ck")
assert out["w"].tolist() == list(np.arange(10.0)), out
assert R.plan_reads is not None and S.open_store is not None
import storage, restore  # the project's own modules, untouched
print(storage.MINE, restore.MINE, ckpt.__file__)
"""


def test_a_project_with_its_own_storage_and_restore_modules_can_use_ckpt(tmp_path):
    for name in ("storage", "restore"):
        (tmp_path / f"{name}.py").write_text(f"MINE = {name!r}\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", ROUND_TRIP], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[:2] == ["storage", "restore"], run.stdout


def test_restore_is_the_function_and_the_subpackage():
    import inspect

    import ckpt.restore

    assert callable(ckpt.restore)
    assert "target" in inspect.signature(ckpt.restore).parameters
    import ckpt.restore._read as rr
    from ckpt.restore import plan_reads  # noqa: F401

    # ckpt.restore is typed as the function; that it is the package too is what is tested.
    assert rr.read_arrays is ckpt.restore.read_arrays  # type: ignore[attr-defined]


def test_version_everywhere():
    from importlib.metadata import version

    assert ckpt.__version__ == version("shardckpt")
    for cmd in ([sys.executable, "-m", "ckpt", "--version"],
                [os.path.join(os.path.dirname(sys.executable), "ckpt"), "--version"]):
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and ckpt.__version__ in run.stdout, (cmd, run)


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """The sdist and the wheel, as README.md says to build them (``python -m build``).
    Built from a copy of the sources: a build writes build/ and *.egg-info beside them, and
    two test workers building in the checkout at once break each other's build."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for name in ("ckpt", "storage", "restore"):
        shutil.copytree(os.path.join(ROOT, name), src / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    # No isolation: the build backend (setuptools) is already here, and no index is needed.
    run = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--sdist",
                          "--wheel", "--outdir", str(out), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    [sdist] = list(out.glob("shardckpt-*.tar.gz"))
    [wheel] = list(out.glob("shardckpt-*.whl"))
    return sdist, wheel


@pytest.fixture(scope="module")
def wheel(dist):
    return dist[1]


def test_the_sdist_holds_the_sources_and_installs_and_imports(dist, tmp_path):
    sdist, _ = dist
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("pyproject.toml", "README.md", "ckpt/__init__.py", "ckpt/py.typed",
                   "storage/__init__.py", "restore/__init__.py"):
        assert needed in names, needed
    target = tmp_path / "site"
    run = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                          "--no-build-isolation", "--disable-pip-version-check",
                          "--target", str(target), str(sdist)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    installed = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info")}
    assert installed == {"ckpt", "bin"}, installed  # the package and the console script
    assert os.listdir(target / "bin") == ["ckpt"]
    work = tmp_path / "work"
    work.mkdir()
    run = subprocess.run([sys.executable, "-c", WHEEL_RUN], cwd=work,
                         env={**os.environ, "PYTHONPATH": str(target)},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["file"].startswith(str(target)) and out["storage"].startswith(str(target)), out
    assert out["w"] == [0, 1, 2, 3], out


def test_the_wheel_holds_the_ckpt_package_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"ckpt"}, tops
    for needed in ("ckpt/py.typed", "ckpt/storage/__init__.py", "ckpt/restore/__init__.py",
                   "ckpt/__main__.py", "ckpt/cli.py"):
        assert needed in names, needed
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    for extra in ("s3", "gcs", "all"):
        assert f"Provides-Extra: {extra}" in text, extra
    requires = [line for line in text.splitlines() if line.startswith("Requires-Dist:")]
    core = [r for r in requires if "extra ==" not in r]
    assert not any(dep in r for r in core for dep in ("s3fs", "gcsfs", "zarr")), core
    assert not any("<" in r for r in core if "jax" in r), core  # no upper caps on jax


WHEEL_RUN = """
import json, sys
import numpy as np
import ckpt, ckpt.storage, ckpt.restore
ckpt.save("ck", {"w": np.arange(4)})
print(json.dumps({"file": ckpt.__file__, "storage": ckpt.storage.__file__,
                  "w": ckpt.restore("ck")["w"].tolist(),
                  "top": [m for m in ("storage", "restore") if m in sys.modules]}))
"""


def test_pip_check_is_clean():
    run = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


MISSING_EXTRA = """
import sys
sys.modules["{module}"] = None  # as if the extra were not installed
import ckpt
try:
    ckpt.metadata("{url}")
except ckpt.CkptError as exc:
    print(type(exc).__name__, "|", exc)
"""


@pytest.mark.parametrize(("module", "url", "extra"), [("s3fs", "s3://b/ck", "s3"),
                                              ("gcsfs", "gs://b/ck", "gcs")])
def test_an_object_store_url_without_its_extra_names_the_extra(module, url, extra):
    run = subprocess.run([sys.executable, "-c", MISSING_EXTRA.format(module=module, url=url)],
                         capture_output=True, text=True, timeout=120)
    line = run.stdout.strip()
    assert line.startswith("MissingDependencyError |"), (line, run.stderr[-2000:])
    assert f"shardckpt[{extra}]" in line and "\n" not in line, line


def test_restore_pickles_by_name_and_the_main_module_imports_quietly():
    import copy
    import importlib
    import pickle

    assert pickle.loads(pickle.dumps(ckpt.restore)) is ckpt.restore
    assert copy.deepcopy({"f": ckpt.restore})["f"] is ckpt.restore
    assert "target" in ckpt.restore.__doc__
    assert "Raises" in ckpt.restore.__doc__
    importlib.import_module("ckpt.__main__")  # tools that import every module: no exit


TYPED_USE = """
import numpy as np

import ckpt

tree = ckpt.restore("ck", target={"w": np.zeros(3)}, timeout_s=5.0)
ckpt.save("ck2", tree, metadata={"step": 1})
with ckpt.CheckpointManager("run", keep_last=2) as manager:
    step: int | None = manager.latest_step()
info: ckpt.CheckpointInfo = ckpt.metadata("ck")
"""

def test_the_wheel_installs_into_a_clean_venv_with_what_it_needs(wheel, tmp_path):
    """What a user gets from `pip install shardckpt`: a fresh virtual environment, pip
    resolving the dependencies the wheel declares (no extras: local disk only), the console
    script, and a save and restore run from outside the repository."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    run = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                          str(wheel)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    run = subprocess.run([py, "-m", "pip", "check"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    run = subprocess.run([str(venv / "bin" / "ckpt"), "--version"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and ckpt.__version__ in run.stdout, run
    work = tmp_path / "work"
    work.mkdir()
    run = subprocess.run([py, "-c", WHEEL_RUN], cwd=work, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["file"].startswith(str(venv)) and out["storage"].startswith(str(venv)), out
    assert out["w"] == [0, 1, 2, 3] and out["top"] == [], out
    run = subprocess.run([py, "-c", "import ckpt; ckpt.metadata('s3://b/ck')"], cwd=work,
                         capture_output=True, text=True, timeout=120)
    assert "shardckpt[s3]" in run.stderr, run.stderr[-2000:]  # no extra: named, not crashed
    # The annotations reach a user's type checker (py.typed): a good call passes, a wrong
    # argument type is named.
    (work / "mypy.ini").write_text("[mypy]\nfollow_imports = silent\n"
                                   "[mypy-jax.*,jaxlib.*,numpy.*,tensorstore.*]\n"
                                   "follow_imports = skip\n")
    (work / "good.py").write_text(TYPED_USE)
    (work / "bad.py").write_text('import ckpt\nckpt.restore("ck", timeout_s="soon")\n')
    checks = {name: subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--cache-dir", os.devnull,
         "--python-executable", py, name], cwd=work, capture_output=True, text=True,
        timeout=300) for name in ("good.py", "bad.py")}
    assert checks["good.py"].returncode == 0, checks["good.py"].stdout
    assert checks["bad.py"].returncode == 1 and '"timeout_s" to "restore"' in \
        checks["bad.py"].stdout, checks["bad.py"].stdout
