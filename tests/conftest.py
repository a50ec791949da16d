"""Shared test helpers: starting the real app on a free local port."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(args: list[str], cwd: Path, env: dict, log: Path, timeout_s: float = 120.0):
    """`python app.py ARGS --host 127.0.0.1 --port P` in `cwd`; yields (url, seconds until it answered HTTP), stops it
    after, and prints the end of its log (fails the test with the log when it does not start)."""
    port = free_port()
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "app.py", *args, "--host", "127.0.0.1", "--port", str(port)], cwd=cwd,
                                env=env, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.perf_counter() - t0 > timeout_s:
                    pytest.fail(f"the app did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url, time.perf_counter() - t0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        print(log.read_text()[-3000:])
