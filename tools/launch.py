"""Run a Python function in N processes x M CPU devices, coordinated by `jax.distributed`.

Used by the tests and the benchmarks to run real multi-process JAX jobs on one machine::

    from tools.launch import launch
    results = launch("tests.children.mp_jobs:save_and_check", 4, args=[url])  # one a process

A target is ``"module:function"``; it runs in each process after `jax.distributed.initialize`
and gets the ``args`` (JSON values); its JSON-serialisable return value comes back. `start`
gives a `Job` for tests that must act while it runs (wait for a line, kill a process). Every
process is in its own session and is killed, with its children, when the job ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RESULT = "@@launch-result@@ "


class LaunchError(RuntimeError):
    """Some process of a job failed or timed out; the message holds each one's stderr tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Job:
    """A running multi-process job. Use as a context manager: exiting kills what is left."""

    def __init__(self, target: str, nprocs: int, *, devices_per_process: int = 4,
                 args: list[Any] | None = None, env: dict[str, str] | None = None,
                 heartbeat_s: int = 10) -> None:
        self.nprocs = nprocs
        port = free_port()
        base = dict(os.environ)
        base.update(env or {})
        base["PYTHONPATH"] = ROOT + os.pathsep + base.get("PYTHONPATH", "")
        self.procs: list[subprocess.Popen[str]] = []
        self.lines: list[list[str]] = [[] for _ in range(nprocs)]
        self.stderr: list[list[str]] = [[] for _ in range(nprocs)]
        self._new_line = threading.Condition()
        self._pumps: list[threading.Thread] = []
        spec = json.dumps({"target": target, "args": args or [], "port": port,
                           "nprocs": nprocs, "devices": devices_per_process,
                           "heartbeat_s": heartbeat_s})
        for i in range(nprocs):
            proc = subprocess.Popen(
                [sys.executable, "-u", os.path.abspath(__file__), "--worker", str(i), spec],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=base, cwd=ROOT,
                start_new_session=True)
            self.procs.append(proc)
            for stream, sink in ((proc.stdout, self.lines[i]), (proc.stderr, self.stderr[i])):
                pump = threading.Thread(target=self._pump, args=(stream, sink), daemon=True)
                pump.start()
                self._pumps.append(pump)

    def _pump(self, stream: Any, sink: list[str]) -> None:
        for line in stream:
            with self._new_line:
                sink.append(line.rstrip("\n"))
                self._new_line.notify_all()

    def wait_for_line(self, process: int, text: str, timeout: float = 120) -> None:
        """Blocks until process ``process`` printed a line starting with ``text``."""
        def seen() -> bool:
            return any(line.startswith(text) for line in self.lines[process]) or \
                self.procs[process].poll() is not None
        with self._new_line:
            if not self._new_line.wait_for(seen, timeout=timeout):
                raise LaunchError(f"process {process} did not print {text!r} in {timeout} s")
        if not any(line.startswith(text) for line in self.lines[process]):
            raise LaunchError(f"process {process} exited before printing {text!r}:\n"
                              + self._tail(process))

    def kill(self, process: int, sig: int = signal.SIGKILL) -> None:
        """Sends ``sig`` to one process's whole session."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.procs[process].pid, sig)

    def kill_all(self) -> None:
        for i in range(self.nprocs):
            self.kill(i)
        for proc in self.procs:
            proc.wait()

    def _tail(self, process: int) -> str:
        return "\n".join(self.stderr[process][-25:])

    def wait(self, timeout: float = 300, check: bool = True) -> list[Any]:
        """Waits for every process; returns their results (None for one that failed).

        Raises:
            LaunchError: with ``check``, if any process failed or the job timed out.
        """
        deadline = time.monotonic() + timeout
        try:
            for proc in self.procs:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise LaunchError(f"job timed out after {timeout} s:\n"
                              + "\n".join(f"[{i}] {self._tail(i)}" for i in range(self.nprocs))
                              ) from None
        for pump in self._pumps:
            pump.join(timeout=10)  # each ends at EOF of its stream
        results: list[Any] = []
        failed = []
        for i, proc in enumerate(self.procs):
            found = [line[len(_RESULT):] for line in self.lines[i] if line.startswith(_RESULT)]
            results.append(json.loads(found[-1]) if found and proc.returncode == 0 else None)
            if proc.returncode != 0:
                failed.append(i)
        if check and failed:
            raise LaunchError("processes {} failed:\n{}".format(failed, "\n".join(
                f"[{i}] exit {self.procs[i].returncode}\n{self._tail(i)}" for i in failed)))
        return results

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.kill_all()


def start(target: str, nprocs: int, **kwargs: Any) -> Job:
    """Starts a job and returns at once; see `Job`."""
    return Job(target, nprocs, **kwargs)


def launch(target: str, nprocs: int, *, timeout: float = 300, **kwargs: Any) -> list[Any]:
    """Runs a job to completion and returns each process's result, in process order."""
    with Job(target, nprocs, **kwargs) as job:
        return job.wait(timeout=timeout)


def _worker(index: int, spec_text: str) -> None:
    spec = json.loads(spec_text)
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={spec['devices']}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import importlib
    import inspect

    import jax

    options = {}
    # Older jax (0.6) has no such option: it then takes longer to notice a dead process.
    if "heartbeat_timeout_seconds" in inspect.signature(jax.distributed.initialize).parameters:
        options["heartbeat_timeout_seconds"] = spec["heartbeat_s"]
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{spec['port']}",
        coordinator_bind_address=f"127.0.0.1:{spec['port']}",
        num_processes=spec["nprocs"], process_id=index, initialization_timeout=60, **options)
    module, _, name = spec["target"].partition(":")
    result = getattr(importlib.import_module(module), name)(*spec["args"])
    print(_RESULT + json.dumps(result), flush=True)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    sys.path.insert(0, ROOT)
    _worker(int(sys.argv[2]), sys.argv[3])
