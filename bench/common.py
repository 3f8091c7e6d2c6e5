"""What the benchmarks in bench/ share: where their data lives, how they describe the
machine, their statistics and how they write their results.

    from bench.common import SEED_TASKS, machine, percentile, seed_tasks, task_prompt, write_results

Each script runs as `python bench/NAME.py` and puts the repository root on sys.path
before it imports this module. Nothing here imports torch at import time, so
`bench/loop.py`, which drives the app from outside, stays free of it.

What it is not: a benchmark framework. Every script still builds its own table and
its own JSON; this module only keeps one copy of the pieces they all had.
The app launcher the end-to-end benchmarks use (`running_app`) is the one the tests
use, in tests/server.py.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import threading
import time
from pathlib import Path

from assistant.config import ServeArgs

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"  # the data sets beside the checkout
SEED_TASKS = SHARED_DATA / "seed-tasks.jsonl"  # instructions with reference answers: prompts
HH_HARMLESS = SHARED_DATA / "hh-harmless-dev.jsonl"  # HH-RLHF preference pairs
RESULTS = ROOT / "bench" / "results"  # git ignores it
SYSTEM = ServeArgs().system_prompt  # the app's default system prompt


# -- the machine ----------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(with_torch: bool = True) -> str:
    """One line on where a figure was measured: CPU, cores, GPU, OS, Python and torch.

    `with_torch=False` leaves out the GPU and torch (and does not import torch), for a
    script whose own process does no model work."""
    parts = [cpu_name(), f"{os.cpu_count()} cores"]
    if with_torch:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            parts.append(f"{props.name} ({props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda})")
        else:
            parts.append("no GPU")
    parts += [platform.platform(), f"Python {platform.python_version()}"]
    if with_torch:
        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    return ", ".join(parts)


def library_versions(*names: str) -> dict[str, str]:
    """Installed versions of `names` (default: torch, transformers, peft, trl), from
    package metadata, without importing them; a package that is not installed is left out."""
    out = {}
    for name in names or ("torch", "transformers", "peft", "trl"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def rss_mb() -> float:
    """This process's resident memory now (VmRSS), in MB; NaN where /proc is missing."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class RssSampler(threading.Thread):
    """Peak resident memory since the last `take()`, sampled every `every` seconds.

    `start()` it, call `take()` at each boundary (a step, a phase), `stop.set()` at the end."""

    def __init__(self, every: float = 0.05):
        super().__init__(daemon=True)
        self.every, self.peak, self.stop = every, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(self.every)

    def take(self) -> float:
        peak, self.peak = max(self.peak, rss_mb()), rss_mb()
        return peak


# -- statistics -----------------------------------------------------------------------


def percentile(xs: list[float], q: float) -> float:
    """The q-quantile (0..1) of `xs`, interpolated linearly between the two nearest ranks."""
    if not xs:
        raise ValueError("percentile of no values")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# -- prompts --------------------------------------------------------------------------


def seed_tasks(path: Path = SEED_TASKS) -> list[dict]:
    """Every task of a seed-tasks JSONL file (instruction, instances[0].input/output, id).

    Stops the script with an error naming the file when it is missing."""
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"error: {path} not found; the benchmark's prompts come from it")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def task_prompt(task: dict) -> str:
    """A seed task as one user message: the instruction, then the task's input when it has one."""
    text = task["instruction"].strip()
    extra = task["instances"][0]["input"].strip()
    return f"{text}\n\n{extra}" if extra else text


# -- results --------------------------------------------------------------------------


def write_results(path: str | Path, result: dict) -> Path:
    """Write `result` as indented JSON to `path` (folders created; values JSON cannot
    hold are written as their str()); returns the path. The file is replaced whole, so
    a script that rewrites it after every phase never leaves half a file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, path)
    return path
