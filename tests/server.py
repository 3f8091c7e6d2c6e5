"""Start the real app (`python app.py ...`) in a subprocess for end-to-end tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(*args: str, port: int, timeout: float = 180, log_path: Path, append: bool = False) -> subprocess.Popen:
    """Start app.py with `args` on `port` and return once it serves (its output goes to
    `log_path`, appended to with `append`, e.g. for a restart); raises with the log's
    tail when it exits or does not come up in `timeout` s. The background trainer is
    off unless `args` says --trainer."""
    if not any(a in ("--trainer", "--no-trainer") for a in args):
        args = ("--no-trainer", *args)  # tests start trainer processes themselves, on their own files
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    with open(log_path, "a" if append else "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--port", str(port), *args],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_app(proc)
            raise RuntimeError(f"app did not come up in {timeout}s:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.5)


def stop_app(proc: subprocess.Popen) -> None:
    """Ask the app to stop; kill it after 15 s."""
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def running_app(*args: str, port: int | None = None, timeout: float = 180, log_path: str | Path | None = None):
    """Run app.py with `args` on a free port; yield its URL; stop it afterwards.

    The background trainer is off unless `args` says --trainer.

    The server's output goes to `log_path` (or a temp file) and is printed if it
    fails to come up, so a broken start shows its own traceback.
    """
    port = port or free_port()
    log_path = Path(log_path) if log_path else Path(os.environ.get("TMPDIR", "/tmp")) / f"app-{port}.log"
    proc = start_app(*args, port=port, timeout=timeout, log_path=log_path)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        stop_app(proc)
