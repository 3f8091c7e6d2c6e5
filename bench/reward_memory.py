"""Memory of the reward-model fit on real data: peak resident memory step by step.

    .venv/bin/python bench/reward_memory.py                       # the defaults, on the 160 longest HH pairs
    .venv/bin/python bench/reward_memory.py --pairs 1149          # every pair (about 2 x 144 steps)
    .venv/bin/python bench/reward_memory.py --no-reward-gradient-checkpointing --reward-micro-batch-size 8   # the old settings
    .venv/bin/python bench/reward_memory.py --random-shape qwen2-1.5b --pairs 16 --reward-min-steps 0   # a 1.5B model of Qwen2's shape, random weights, 4 steps

The pairs are those `python -m trainer reward` fits on: ../shared/data/hh-harmless-dev.jsonl
imported into a fresh store (`import_preferences`), read back (`read_snapshot`,
`build_examples`), then the --pairs longest by tokens (longest first is the worst case
for memory: every micro-batch is as long as --reward-max-length allows). The fit is
`trainer.reward.fit` with the RewardArgs defaults unless flags override them (every
RewardArgs field is a flag). A thread samples the process's resident memory
(/proc/self/status VmRSS) every 50 ms; the table gives its peak within each optimiser
step, and the JSON (bench/results/reward-memory.json) every step. "Growth" compares the
peak of the last quarter of the steps with that of the second quarter: bounded memory
means about 0.

--random-shape builds a model of a real architecture with random weights (seed 0, float32,
the shapes of bench/gpu.py, with its byte-level tokenizer, so that nearly every text is
cut at --reward-max-length) in a temporary directory and fits that instead of --model:
memory depends on the shape, not on the weights.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from assistant.config import ModelArgs, add_args, from_args  # noqa: E402
from bench.common import HH_HARMLESS, RESULTS, RssSampler, machine, rss_mb, write_results  # noqa: E402
from bench.gpu import SHAPES, build_model_dir  # noqa: E402
from trainer.config import RewardArgs  # noqa: E402


def build_random_model(shape: str, path: Path) -> dict:
    """bench/gpu.py's `build_model_dir` for `shape` (float32, CPU) at `path`, in a process
    of its own, so that the memory of building it is not counted in this one's."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(build_model_dir, shape, None, torch.device("cpu"), torch.float32, path).result()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=160, help="fit on this many of the longest pairs")
    ap.add_argument("--out", default=str(RESULTS / "reward-memory.json"))
    ap.add_argument("--random-shape", default=None, help="fit a random-weight model of this bench/gpu.py shape (e.g. qwen2-1.5b) instead of --model")
    add_args(ap, ModelArgs, "base model")
    add_args(ap, RewardArgs, "reward model (defaults: what `python -m trainer reward` uses)")
    ns = ap.parse_args()
    model_args, reward_args = from_args(ModelArgs, ns), from_args(RewardArgs, ns)
    if ns.random_shape and ns.random_shape not in SHAPES:
        ap.error(f"--random-shape: unknown {ns.random_shape!r}; choose from {', '.join(SHAPES)}")
    if not HH_HARMLESS.exists():
        sys.exit(f"error: {HH_HARMLESS} not found")

    from assistant.feedback import FeedbackStore
    from trainer import reward
    from trainer.data import Examples, build_examples, import_preferences, read_snapshot

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "feedback.db"
        with FeedbackStore(db) as store:
            import_preferences(store, HH_HARMLESS, progress=False)
        examples = build_examples(read_snapshot(db))
    work = tempfile.TemporaryDirectory() if ns.random_shape else None
    built = None
    if ns.random_shape:
        print(f"building {ns.random_shape} with random weights...", flush=True)
        path = Path(work.name) / ns.random_shape
        built = build_random_model(ns.random_shape, path)
        model_args.model = str(path)
        print(f"built: {built['parameters']:,} parameters, {built['saved_gb']:.1f} GB on disk", flush=True)
    from transformers import AutoTokenizer

    from assistant.model import resolve_model_path
    from trainer.data import prompt_messages

    tokenizer_only = reward.RewardModel(None, None, AutoTokenizer.from_pretrained(resolve_model_path(model_args)), "", "", 10**9)
    lengths = {id(p): max(len(tokenizer_only.encode(prompt_messages(p.prompt), text)) for text in (p.chosen, p.rejected))
               for p in examples.pairs}
    pairs = sorted(examples.pairs, key=lambda p: -lengths[id(p)])[: ns.pairs]
    train = Examples(pairs=pairs)
    print(f"{len(pairs)} pairs of {len(examples.pairs)}, tokens per sequence (cut at {reward_args.reward_max_length}): "
          f"{min(lengths[id(p)] for p in pairs)}..{max(lengths[id(p)] for p in pairs)}; settings {vars(reward_args)}", flush=True)

    sampler = RssSampler()
    start_rss = rss_mb()
    sampler.start()
    steps: list[dict] = []
    t0 = time.perf_counter()

    def on_step(step: int, loss: float) -> None:
        steps.append({"step": step, "peak_rss_mb": sampler.take(), "seconds": time.perf_counter() - t0, "loss": loss})

    reward_args.min_pairs = min(reward_args.min_pairs, len(pairs))
    _, metrics = reward.fit(model_args, reward_args, train, Examples(), progress=True, on_step=on_step)
    sampler.stop.set()
    n = len(steps)
    q2 = max(s["peak_rss_mb"] for s in steps[n // 4 : n // 2] or steps)
    q4 = max(s["peak_rss_mb"] for s in steps[3 * n // 4 :] or steps)
    result = {
        "command": "python bench/reward_memory.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "random_shape": ns.random_shape, "random_model": built,
        "pairs": len(pairs), "reward_args": vars(reward_args), "rss_before_fit_mb": start_rss,
        "peak_rss_mb": max(s["peak_rss_mb"] for s in steps), "growth_mb": q4 - q2, "steps": steps,
        "seconds_per_step": steps[-1]["seconds"] / n, "pairs_per_s": metrics["pairs_per_s"],
    }
    write_results(ns.out, result)
    if work is not None:
        work.cleanup()
    print("\n| measure | value |\n| --- | --- |")
    print(f"| pairs, steps | {len(pairs)}, {n} |")
    print(f"| resident memory before the fit | {start_rss:,.0f} MB |")
    print(f"| peak resident memory during the fit | {result['peak_rss_mb']:,.0f} MB |")
    print(f"| growth: peak of the last quarter of steps minus the second quarter | {result['growth_mb']:+,.0f} MB |")
    print(f"| seconds per step (of {reward_args.reward_batch_size} pairs) | {result['seconds_per_step']:.1f} |")
    print(f"\nwrote {ns.out}")


if __name__ == "__main__":
    main()
