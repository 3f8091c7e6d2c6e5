"""`python app.py` as a user starts it: the scheduled trainer comes up with it as a
separate process, on the app's files, and goes away with it, even when the app is
SIGKILLed. Runs the real app on the tiny model.

Run: python -m pytest tests/test_app.py -q
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.server import free_port

REPO = Path(__file__).resolve().parents[1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] if Path(f"/proc/{pid}/stat").exists() else "X"
    return state != "Z"


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def test_app_starts_the_scheduled_trainer_on_its_files_and_takes_it_down_when_killed(tmp_path, tiny_dir):
    port, log_path = free_port(), tmp_path / "app.log"
    args = [sys.executable, str(REPO / "app.py"), "--port", str(port), "--model", str(tiny_dir), "--quantize", "none",
            "--device", "cpu", "--db", str(tmp_path / "feedback.db"), "--adapters-dir", str(tmp_path / "adapters"),
            "--reward-dir", str(tmp_path / "reward"), "--lock-file", str(tmp_path / "trainer.lock"),
            "--cycles-log", str(tmp_path / "cycles.jsonl"), "--trainer-args", "--every-min 1 --min-new-rows 1000"]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    with open(log_path, "w") as log:
        app = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        found = wait_for(lambda: re.search(r"scheduled trainer started \(pid (\d+)\)", log_path.read_text()), 120, "the trainer to start")
        trainer_pid = int(found.group(1))
        def up() -> bool:
            assert app.poll() is None, log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(up, 120, "the app")
        cmdline = Path(f"/proc/{trainer_pid}/cmdline").read_text().split("\0")
        assert cmdline[1:4] == ["-m", "trainer", "run"]
        assert str(tmp_path / "feedback.db") in cmdline and "--min-new-rows" in cmdline
        wait_for(lambda: "schedule: every 1.0 min when >= 1000 new feedback rows" in log_path.read_text(), 120, "the trainer's schedule line")
        assert alive(trainer_pid)

        app.send_signal(signal.SIGKILL)
        app.wait()
        wait_for(lambda: not alive(trainer_pid), 30, "the trainer to stop with the app")
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()
