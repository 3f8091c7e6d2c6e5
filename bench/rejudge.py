"""Judge a candidate adapter of a `bench/loop.py --keep` run again, by that run's hidden preference.

    .venv/bin/python bench/rejudge.py --results bench/results/loop-fuller-minsteps.json --version v000002
    .venv/bin/python bench/rejudge.py --results R.json --version v000002 --against v000001 --replies 64

A candidate the gate refused is never served, so bench/loop.py cannot measure it
through the app; and a run older than the adapters' evaluation.jsonl kept only three
of the gate's pairs. This script answers "would these users have preferred it?": it
runs the gate's own evaluation (trainer.gate.evaluate: candidate and `--against`, by
default the candidate's parent, sample from the same seeds at the served temperature,
top-p and reply cap, --replies a side) on the run's own held-out prompts (the ones
bench/loop.py measures with, rebuilt from the results file's arguments), and judges
every pair it sampled by the simulated users' hidden preference instead of a reward
model (bench/loop.py `win_rate`, a seeded coin for the coin control). It prints the win rate with its 95% Wilson
interval, the words and share of replies that end on each side, and the KL to the
parent and to the base, and writes them to `--out`. The run's work directory (its
`adapters/`) must still exist; nothing in it is changed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench import loop  # noqa: E402
from bench.common import RESULTS, SYSTEM, machine, write_results  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, required=True, help="the results JSON of a `bench/loop.py --keep` run")
    ap.add_argument("--version", required=True, help="the candidate to judge (a version under the run's adapters/)")
    ap.add_argument("--against", help="the other side (default: the candidate's parent)")
    ap.add_argument("--replies", type=int, default=64, help="replies a side (the held-out prompts repeat with new samples)")
    ap.add_argument("--max-new-tokens", type=int, help="reply cap (default: the gate's, --eval-max-new-tokens)")
    ap.add_argument("--prompts", type=int, help="only the first N of the run's held-out prompts (a smoke run; default: all)")
    ap.add_argument("--out", type=Path, help="default: bench/results/rejudge-PREFERENCE-VERSION.json")
    args = ap.parse_args(argv)

    try:
        result = json.loads(args.results.read_text())
    except (OSError, ValueError) as exc:
        sys.exit(f"error: cannot read the loop results {args.results}: {exc}")
    work = result.get("work_dir")
    if not work or not (Path(work) / "adapters" / args.version / "manifest.json").is_file():
        sys.exit(f"error: {args.results} names no kept work directory holding adapters/{args.version} "
                 f"(work_dir: {work!r}); run bench/loop.py with --keep")
    adapters_dir = Path(work) / "adapters"
    run = argparse.Namespace(**result["args"])
    pref = loop.make_preference(run)
    manifest = json.loads((adapters_dir / args.version / "manifest.json").read_text())
    against = args.against or manifest.get("parent") or "base"
    heldout, _ = loop.split_prompts(run.max_prompt_chars, run.heldout_prompts, run.feedback_prompts, run.cycles, run.seed)
    heldout = heldout[: args.prompts or len(heldout)]
    prompts = [([{"role": "system", "content": SYSTEM}] if SYSTEM else []) + [{"role": "user", "content": t["prompt"]}] for t in heldout]

    import torch

    from assistant.config import ModelArgs
    from trainer import gate
    from trainer.config import PPOArgs, ScheduleArgs

    model_args = ModelArgs(model=run.model, quantize=run.quantize, device=run.device, models_dir=str(ROOT / "data" / "models"))
    sched = dataclasses.replace(ScheduleArgs(), eval_replies=args.replies,
                                **({"eval_max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}))
    print(f"bench/rejudge.py: {args.version} against {against} ({manifest.get('status')}), judged by the hidden preference "
          f"'{pref.name}'; {len(prompts)} held-out prompts, {args.replies} replies a side\n{machine()}", flush=True)
    started = time.perf_counter()
    no_judge = lambda ps, texts: torch.zeros(len(texts))  # noqa: E731  (the hidden preference judges below)
    ev = gate.evaluate(model_args, adapters_dir, args.version, against, prompts, no_judge, sched, PPOArgs())
    judged = ev.pop("judged")
    wr = loop.win_rate(pref, f"rejudge-{args.version}", [j["candidate"] for j in judged], [j["current"] for j in judged])
    winners = wr.pop("winners")
    ev.update(wr)
    keys = ("pairs", "wins", "ties", "losses", "win_rate", "win_rate_lo", "win_rate_hi", "candidate_words", "current_words",
            "candidate_ended", "current_ended", "kl_parent", "kl_base", "degenerate", "current_degenerate", "sampling")
    out = {"results": str(args.results), "version": args.version, "against": against, "status": manifest.get("status"),
           "reasons": manifest.get("reasons"), "preference": pref.name, "machine": machine(),
           "seconds": time.perf_counter() - started, **{k: ev.get(k) for k in keys},
           "judged": [{"prompt": j["prompt"][:200], "candidate": j["candidate"], "current": j["current"], "winner": w}
                      for j, w in zip(judged, winners)]}
    path = args.out or RESULTS / f"rejudge-{pref.name}-{args.version}.json"
    write_results(path, out)
    print(f"\n| candidate | against | hidden win rate [95% CI] | wins / ties / losses | words cand / other | ended cand / other | "
          f"KL parent / base | seconds |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n"
          f"| {args.version} ({out['status']}) | {against} | {out['win_rate']:.3f} [{out['win_rate_lo']:.3f}, {out['win_rate_hi']:.3f}] "
          f"({out['pairs']}) | {out['wins']} / {out['ties']} / {out['losses']} | {out['candidate_words']:.1f} / {out['current_words']:.1f} | "
          f"{out['candidate_ended']:.2f} / {out['current_ended']:.2f} | {out['kl_parent']:.2f} / {out['kl_base']:.2f} | {out['seconds']:.0f} |")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
