"""The compatibility stage of `tools/dev test`: the core tests at both ends of the supported
range, each in a virtual environment of its own.

- oldest: Python 3.11 with the oldest supported jax (`OLDEST_JAX`, Orbax's floor),
  numpy 1.26 and every other dependency at the floor pyproject.toml declares;
- newest: the newest Python this machine has (on PATH, or under pyenv's versions folder)
  with the newest jax pip resolves for it.

The environments live in ``.venv-compat/<name>`` and are rebuilt when pyproject.toml or this
file changes, and the newest one every week (so that it follows new jax releases). The core
tests are the round trips, resharded restores, the manager and the Orbax reader, offline
reshards, on local disk and memory (the object-store servers are the main stage's).
Prints one line per combination and a summary line naming what ran, what failed and what
could not run; exits non-zero if a combination failed or could not be set up.

Run by `tools/dev test` after the main suite; on its own: ``python tools/compat.py``.
"""

from __future__ import annotations

import concurrent.futures
import glob
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import time
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENVS = os.path.join(ROOT, ".venv-compat")
OLDEST_JAX = "0.6.0"
# orbax-checkpoint (the writer of the Orbax checkpoints the tests read) as of that jax: its
# newest releases call jax APIs jax 0.6 does not have.
OLDEST_ORBAX = "0.11.13"
OLDEST_NUMPY = "1.26.*"
CORE_TESTS = ["tests/formats/test_roundtrip.py", "tests/restore/test_reshard.py",
              "tests/runs/test_manager.py", "tests/formats/test_orbax.py"]
# Resident-memory budgets are the main stage's: allocators differ between versions.
CORE_FILTER = "not s3 and not gcs and not within_the_budget"
TEST_DEPS = ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "optax"]


def _version(python: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=60).stdout.split()
        return (int(out[0]), int(out[1]))
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def _interpreters() -> dict[tuple[int, int], str]:
    """Every Python 3.11+ found on PATH or under pyenv's versions folder, by version."""
    found: dict[tuple[int, int], str] = {}
    candidates = [shutil.which(f"python3.{minor}") for minor in range(11, 20)]
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates += sorted(glob.glob(os.path.join(pyenv_root, "versions", "3.*", "bin",
                                                "python3")))
    for python in candidates:
        if python and os.access(python, os.X_OK):
            version = _version(python)
            if version is not None and version >= (3, 11):
                found.setdefault(version, python)
    return found


def _environment(name: str, python: str, specs: list[str]) -> str:
    """The virtual environment ``name``, created or refreshed; returns its Python."""
    venv = os.path.join(VENVS, name)
    py = os.path.join(venv, "bin", "python")
    want = hashlib.sha256()
    for path in ("pyproject.toml", "tools/compat.py"):
        with open(os.path.join(ROOT, path), "rb") as f:
            want.update(f.read())
    want.update(" ".join([python, *specs]).encode())
    if any("==" not in spec for spec in specs):  # "the newest": look again every week
        want.update(time.strftime("%G-W%V").encode())
    stamp = os.path.join(venv, ".installed")
    if os.path.exists(stamp) and pathlib.Path(stamp).read_text() == want.hexdigest():
        return py
    shutil.rmtree(venv, ignore_errors=True)
    _quietly([python, "-m", "venv", venv])
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _quietly(pip + ["--upgrade", "pip"])
    _quietly(pip + [*specs, "-e", ROOT, *TEST_DEPS])
    with open(stamp, "w") as f:
        f.write(want.hexdigest())
    return py


def _quietly(command: list[str]) -> None:
    """Runs a set-up command, printing what it said only when it fails (then raises)."""
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        sys.stdout.write(run.stdout[-6000:] + run.stderr[-6000:])
        raise subprocess.CalledProcessError(run.returncode, command)


def _run(py: str) -> tuple[bool, str, str]:
    """Runs the core tests in the environment of ``py``: (passed, a summary line, what
    to show of the output: the tail of a failing run's, else nothing)."""
    versions = subprocess.run(
        [py, "-c", "import sys, jax, numpy; print(f'python {sys.version.split()[0]} jax "
                   "{jax.__version__} numpy {numpy.__version__}')"],
        capture_output=True, text=True, cwd=ROOT)
    label = versions.stdout.strip() or "python ? jax ?"
    run = subprocess.run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
                          CORE_FILTER, *CORE_TESTS], capture_output=True, text=True, cwd=ROOT)
    tail = (run.stdout.strip().splitlines() or ["no output"])[-1]
    shown = run.stdout[-6000:] + run.stderr[-3000:] if run.returncode != 0 else ""
    return run.returncode == 0, f"{label}: {tail}", shown


def _floors() -> list[str]:
    """Every other dependency pyproject.toml declares, pinned at its declared floor
    (``tensorstore>=0.1.86`` -> ``tensorstore==0.1.86``): the oldest stack is the oldest
    that the distribution admits, not whatever pip picks beside the old jax."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        declared = tomllib.load(f)["project"]["dependencies"]
    pins = []
    for dep in declared:
        name, sep, floor = dep.partition(">=")
        if name not in ("jax", "numpy"):  # pinned above, with their extras and patches
            if not sep or "," in floor:
                raise SystemExit(f"tools/compat.py: {dep!r} in pyproject.toml has no "
                                 "plain floor (>=X) to pin the oldest stack at")
            pins.append(f"{name}=={floor}")
    return pins


def main() -> int:
    pythons = _interpreters()
    plan: list[tuple[str, str | None, list[str], str]] = []
    plan.append(("oldest", pythons.get((3, 11)),
                 [f"jax[cpu]=={OLDEST_JAX}", f"orbax-checkpoint=={OLDEST_ORBAX}",
                  f"numpy=={OLDEST_NUMPY}", *_floors()], "Python 3.11"))
    newest = max(pythons) if pythons else None
    plan.append(("newest", pythons[newest] if newest else None,
                 ["jax[cpu]", "orbax-checkpoint"],
                 f"the newest Python ({'.'.join(map(str, newest)) if newest else 'none'})"))
    ran, failed, missing = [], [], []
    ready: list[tuple[str, str]] = []
    for name, python, specs, wanted in plan:
        jax_spec = specs[0]
        if python is None:
            missing.append(f"{name} ({wanted} with {jax_spec}: no such interpreter found)")
            print(f"compat {name}: not run: {wanted} not found", flush=True)
            continue
        try:
            ready.append((name, _environment(name, python, specs)))
        except subprocess.CalledProcessError as exc:
            missing.append(f"{name} ({wanted} with {jax_spec}: set-up failed: {exc})")
            print(f"compat {name}: not run: setting up {jax_spec} failed", flush=True)
    # The stacks' test runs side by side: each waits on its own processes' start-up.
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(len(ready) or 1) as pool:
        outcomes = list(pool.map(lambda r: _run(r[1]), ready))
    for (name, _), (ok, line, output) in zip(ready, outcomes, strict=True):
        sys.stdout.write(output)
        print(f"compat {name}: {line} ({time.monotonic() - t0:.0f} s)", flush=True)
        (ran if ok else failed).append(f"{name} [{line.split(':')[0]}]")
    print("compat summary: passed: " + (", ".join(ran) or "none")
          + "; failed: " + (", ".join(failed) or "none")
          + "; not run: " + (", ".join(missing) or "none"), flush=True)
    return 1 if failed or missing else 0


if __name__ == "__main__":
    sys.exit(main())
