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


def read_kept_run(path: Path, needs: str) -> tuple[dict, Path]:
    """(results, work directory) of a `bench/loop.py --keep` run whose work directory still
    holds `needs` (a path inside it); exits with a message saying what is missing otherwise."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        sys.exit(f"error: cannot read the loop results {path}: {exc}")
    work = result.get("work_dir")
    if not work or not (Path(work) / needs).exists():
        sys.exit(f"error: {path} names no kept work directory holding {needs} "
                 f"(work_dir: {work!r}); run bench/loop.py with --keep")
    return result, Path(work)


def hidden_judgement(run: argparse.Namespace, adapters_dir: Path, version: str, against: str, replies: int = 64,
                     max_new_tokens: int | None = None, prompts: int | None = None, progress: bool = True) -> dict:
    """`version` against `against` on the run's held-out prompts through the gate's own
    evaluation (trainer.gate.evaluate), every pair judged by the run's hidden preference.
    Returns the evaluation's figures with the hidden win rate and the judged pairs."""
    pref = loop.make_preference(run)
    heldout, _ = loop.split_prompts(run.max_prompt_chars, run.heldout_prompts, run.feedback_prompts, run.cycles, run.seed)
    heldout = heldout[: prompts or len(heldout)]
    messages = [([{"role": "system", "content": SYSTEM}] if SYSTEM else []) + [{"role": "user", "content": t["prompt"]}] for t in heldout]

    import torch

    from assistant.config import ModelArgs
    from trainer import gate
    from trainer.config import PPOArgs, ScheduleArgs

    model_args = ModelArgs(model=run.model, quantize=run.quantize, device=run.device, models_dir=str(ROOT / "data" / "models"))
    sched = dataclasses.replace(ScheduleArgs(), eval_replies=replies, **({"eval_max_new_tokens": max_new_tokens} if max_new_tokens else {}))
    started = time.perf_counter()
    no_judge = lambda ps, texts: torch.zeros(len(texts))  # noqa: E731  (the hidden preference judges below)
    ev = gate.evaluate(model_args, adapters_dir, version, against, messages, no_judge, sched, PPOArgs(), progress=progress)
    judged = ev.pop("judged")
    wr = loop.win_rate(pref, f"rejudge-{version}", [j["candidate"] for j in judged], [j["current"] for j in judged])
    winners = wr.pop("winners")
    keys = ("prompts", "candidate_words", "current_words", "candidate_ended", "current_ended", "kl_parent", "kl_base",
            "degenerate", "current_degenerate", "sampling")
    return {"version": version, "against": against, "preference": pref.name, **{k: ev.get(k) for k in keys}, **wr,
            "seconds": time.perf_counter() - started,
            "judged": [{"prompt": j["prompt"][:200], "candidate": j["candidate"], "current": j["current"], "winner": w}
                       for j, w in zip(judged, winners)]}


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

    result, work = read_kept_run(args.results, f"adapters/{args.version}/manifest.json")
    adapters_dir = work / "adapters"
    run = argparse.Namespace(**result["args"])
    manifest = json.loads((adapters_dir / args.version / "manifest.json").read_text())
    against = args.against or manifest.get("parent") or "base"
    print(f"bench/rejudge.py: {args.version} against {against} ({manifest.get('status')}), judged by the hidden preference "
          f"'{run.preference}'; {args.replies} replies a side\n{machine()}", flush=True)
    ev = hidden_judgement(run, adapters_dir, args.version, against, args.replies, args.max_new_tokens, args.prompts)
    out = {"results": str(args.results), "status": manifest.get("status"), "reasons": manifest.get("reasons"),
           "machine": machine(), **ev}
    path = args.out or RESULTS / f"rejudge-{ev['preference']}-{args.version}.json"
    write_results(path, out)
    label = f"{args.version} ({out['status']})"
    print(f"\n| candidate | against | hidden win rate [95% CI] | wins / ties / losses | words cand / other | ended cand / other | "
          f"KL parent / base | seconds |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n{table_row(out, label)}")
    print(f"\nwrote {path}")


def table_row(ev: dict, label: str) -> str:
    """One row of the table above for a hidden_judgement result."""
    return (f"| {label} | {ev['against']} | {ev['win_rate']:.3f} [{ev['win_rate_lo']:.3f}, {ev['win_rate_hi']:.3f}] "
            f"({ev['pairs']}) | {ev['wins']} / {ev['ties']} / {ev['losses']} | {ev['candidate_words']:.1f} / {ev['current_words']:.1f} | "
            f"{ev['candidate_ended']:.2f} / {ev['current_ended']:.2f} | {ev['kl_parent']:.2f} / {ev['kl_base']:.2f} | {ev['seconds']:.0f} |")


if __name__ == "__main__":
    main()
