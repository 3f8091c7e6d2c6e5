"""Peak memory of one training cycle: the models it holds at once, on one shared base or not.

    .venv/bin/python bench/trainer_memory.py                              # this tree
    git worktree add /tmp/before <commit> && \\
    .venv/bin/python bench/trainer_memory.py --tree /tmp/before           # and a tree before the change

A cycle holds, at once, the policy's reward model, the judge (two reward models fitted
on disjoint folds), the policy being trained with its reference, and at the end the
candidate beside the served adapter. Each run here is one `trainer.schedule.run_cycle`
in a fresh child process, with the code of `--tree` (default: this checkout), on the
default model, with the feedback store made from the first `--pairs` pairs of
../shared/data/hh-harmless-dev.jsonl. A thread samples the child's resident memory
(VmRSS) every 50 ms; the child reports the peak within each phase of the cycle (the
phase names the cycle lock records: snapshot, reward, ppo, evaluate, ...) and overall.

The cycle's size is cut so that it takes minutes, not hours (reward epochs, PPO
iterations and evaluation replies below; the gate opened, as in the plumbing tests, so
that every phase runs): memory is set by which models are in memory at once, which
these settings do not change. This is a memory measurement, not a learning one.

Writes bench/results/trainer-memory.json (runs appended per tree, keyed by --label).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import HH_HARMLESS, RESULTS, machine  # noqa: E402

CHILD = r'''
import json, os, sys, threading, time
tree, models_dir, work, pairs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sys.path.insert(0, tree)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0

peaks, phase, lock_ = {}, ["start"], threading.Lock()
def sample():
    while True:
        r = rss_mb()
        with lock_:
            peaks[phase[0]] = max(peaks.get(phase[0], 0.0), r)
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()

import torch
from assistant.config import ModelArgs
from assistant.feedback import FeedbackStore
from trainer import schedule
from trainer.config import DataArgs, PPOArgs, RewardArgs, ScheduleArgs
from trainer.data import import_preferences

real_phase = schedule.CycleLock.phase
def recording_phase(self, name):
    with lock_:
        phase[0] = name
    return real_phase(self, name)
schedule.CycleLock.phase = recording_phase

torch.manual_seed(0)
src = os.path.join(work, "pairs.jsonl")
db = os.path.join(work, "feedback.db")
with FeedbackStore(db) as store:
    import_preferences(store, src, progress=False)
model_args = ModelArgs(models_dir=models_dir)
data_args = DataArgs(db=db)
reward_args = RewardArgs(reward_dir=os.path.join(work, "reward"), reward_epochs=1, reward_min_steps=0, reward_max_length=256)
ppo_args = PPOArgs(adapters_dir=os.path.join(work, "adapters"), ppo_iterations=1, ppo_batch_size=4, mini_batch_size=4, max_new_tokens=32)
sched = ScheduleArgs(lock_file=os.path.join(work, "lock"), cycles_log=os.path.join(work, "cycles.jsonl"), min_decisive_pairs=4,
                     min_val_pairs=2, min_val_accuracy=0.0, min_win_rate=0.0, min_human_agreement=0.0, kl_budget=1e6,
                     kl_total_budget=1e6, max_degenerate=10**6, eval_replies=8, eval_max_new_tokens=32)
with lock_:
    peaks["start"] = rss_mb()
t0 = time.perf_counter()
result = schedule.run_cycle(model_args, data_args, reward_args, ppo_args, sched, progress=False)
seconds = time.perf_counter() - t0
time.sleep(0.1)
with lock_:
    out = {"peak_mb": max(peaks.values()), "by_phase_mb": dict(peaks), "decision": result.decision,
           "reasons": result.reasons, "seconds": seconds}
print("RESULT " + json.dumps(out))
'''


def git_commit(tree: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(tree: Path, pairs: int) -> dict:
    lines = [line for line in HH_HARMLESS.read_text().splitlines() if line.strip()][:pairs]
    with tempfile.TemporaryDirectory(prefix="trainer-memory-") as work:
        Path(work, "pairs.jsonl").write_text("\n".join(lines) + "\n")
        proc = subprocess.run([sys.executable, "-c", CHILD, str(tree), str(ROOT / "data" / "models"), work, str(pairs)],
                              capture_output=True, text=True, cwd=work)
    found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not found:
        sys.exit(f"the cycle in {tree} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(found[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", default=str(ROOT), help="checkout whose trainer code runs the cycle (default: this one)")
    ap.add_argument("--label", default=None, help="name of this run in the results (default: the tree's commit)")
    ap.add_argument("--pairs", type=int, default=64, help="HH pairs imported as the cycle's feedback")
    ap.add_argument("--out", default=str(RESULTS / "trainer-memory.json"))
    args = ap.parse_args()
    tree = Path(args.tree).resolve()
    label = args.label or git_commit(tree)
    print(f"one cycle with the trainer of {tree} ({label}), {args.pairs} HH pairs ...", flush=True)
    res = {**run(tree, args.pairs), "tree": str(tree), "commit": git_commit(tree), "pairs": args.pairs}
    print(f"peak {res['peak_mb']:.0f} MB over {res['seconds']:.0f} s, decision {res['decision']}")
    for name, mb in res["by_phase_mb"].items():
        print(f"  {name:<10} {mb:7.0f} MB")
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    data["machine"] = machine()
    data["runs"][label] = res
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
