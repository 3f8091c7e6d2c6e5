"""How much signal the cycle's reward models find in a snapshot: cross-fitted accuracy per setting.

    .venv/bin/python bench/reward_signal.py --db WORK/feedback.db --cycles-log WORK/cycles.jsonl --upto-cycle 1 \\
        --setting reward_min_steps=0 --setting reward_min_steps=32
    .venv/bin/python bench/reward_signal.py --hh 48 --setting reward_min_steps=0 --setting reward_min_steps=32
    ... --labels coin        # the control: each pair's sides and each thumb's label set by a seeded coin

A cycle fits two reward models on disjoint folds of its snapshot (trainer/steps.py:
`folds`, `fit_reward_pair`) and trains only when their cross-fitted validation
accuracy (each pair scored by the model that did not see it) has a 95% lower bound
above 0.5 (trainer/gate.py). This script runs that very step (`fit_reward_pair`, into
a temporary directory), once per
--setting (RewardArgs fields, `name=value`, applied to the defaults), on the same
folds, and reports the pooled accuracy with its Wilson interval, the optimiser steps
and the seconds. Nothing is kept; the store is only read.

Data: a feedback store (`--db`, e.g. the work directory `bench/loop.py --keep`
leaves), optionally cut back to what a given cycle saw (`--cycles-log` and
`--upto-cycle K`: a copy of the store without the rows above cycle K's feedback-id
range), or `--hh N`: the first N pairs of ../shared/data/hh-harmless-dev.jsonl
imported into a fresh store. `--labels coin` replaces every judgement by a fair,
seeded coin: no setting should find signal there, so it is the control for any
setting that finds more in the real labels.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from assistant.config import ModelArgs, add_args, from_args  # noqa: E402
from bench.common import HH_HARMLESS, RESULTS, machine, write_results  # noqa: E402
from trainer.config import RewardArgs, ScheduleArgs  # noqa: E402

TABLES = ("votes", "vote_events", "comparisons", "corrections", "rankings")


def parse_setting(text: str) -> dict:
    """'a=1,b=2' -> {a: 1, b: 2}, each value cast to the RewardArgs field's type; '' or 'defaults' -> {}."""
    if text.strip() in ("", "defaults"):
        return {}
    fields = {f.name: f for f in dataclasses.fields(RewardArgs)}
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in fields:
            raise SystemExit(f"error: --setting {text!r}: {part!r} is not NAME=VALUE with NAME a RewardArgs field "
                             f"({', '.join(sorted(fields))})")
        kind = type(fields[name].default)
        out[name] = value.strip().lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return out


def store_upto(db: Path, cycles_log: Path, cycle: int, work: Path) -> Path:
    """A copy of `db` holding only the feedback rows cycle `cycle` (1-based line of the log) read."""
    lines = [json.loads(x) for x in cycles_log.read_text().splitlines() if x.strip()]
    if not 1 <= cycle <= len(lines):
        raise SystemExit(f"error: --upto-cycle {cycle}: {cycles_log} has {len(lines)} cycles")
    ids = lines[cycle - 1].get("feedback_ids") or {}
    out = work / "feedback.db"
    src = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    dst = sqlite3.connect(out)
    src.backup(dst)
    src.close()
    dst.execute("PRAGMA foreign_keys=OFF")
    for table in TABLES:
        if table in ids:
            dst.execute(f"DELETE FROM {table} WHERE id > ?", (ids[table][1],))
    dst.commit()
    dst.close()
    return out


def store_hh(n: int, work: Path) -> Path:
    from assistant.feedback import FeedbackStore
    from trainer.data import import_preferences

    lines = [x for x in HH_HARMLESS.read_text().splitlines() if x.strip()][:n]
    src = work / "hh.jsonl"
    src.write_text("\n".join(lines) + "\n")
    db = work / "feedback.db"
    with FeedbackStore(str(db)) as store:
        import_preferences(store, src, progress=False)
    return db


def coin_labels(examples, seed: int):
    """The same examples with every pair's sides swapped and every label drawn by a fair coin."""
    rng = random.Random(seed)
    pairs = [dataclasses.replace(p, chosen=p.rejected, rejected=p.chosen) if rng.random() < 0.5 else p for p in examples.pairs]
    points = [dataclasses.replace(x, label=rng.choice((0, 1))) for x in examples.pointwise]
    return dataclasses.replace(examples, pairs=pairs, pointwise=points)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--db", type=Path, help="feedback store to read")
    src.add_argument("--hh", type=int, help="import this many HH-RLHF pairs into a fresh store instead")
    ap.add_argument("--cycles-log", type=Path, help="with --db and --upto-cycle: the trainer's cycles.jsonl")
    ap.add_argument("--upto-cycle", type=int, default=0, help="with --db: only the rows this cycle (1-based) read")
    ap.add_argument("--setting", action="append", default=[], help="RewardArgs overrides NAME=VALUE[,NAME=VALUE] (repeat; 'defaults' = none)")
    ap.add_argument("--labels", choices=("as-given", "coin"), default="as-given", help="coin: replace every judgement by a seeded coin flip (the control)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the coin flips")
    ap.add_argument("--out", type=Path, default=RESULTS / "reward-signal.json")
    add_args(ap, ModelArgs, "base model")
    args = ap.parse_args()
    if args.upto_cycle and not (args.db and args.cycles_log):
        ap.error("--upto-cycle needs --db and --cycles-log")
    settings = [parse_setting(s) for s in (args.setting or ["defaults"])]
    model_args = from_args(ModelArgs, args)

    from trainer import gate, reward, steps
    from trainer.data import build_examples, read_snapshot

    with tempfile.TemporaryDirectory(prefix="reward-signal-") as tmp:
        work = Path(tmp)
        if args.hh:
            db = store_hh(args.hh, work)
            source = f"first {args.hh} lines of {HH_HARMLESS.name}"
        elif args.upto_cycle:
            db = store_upto(args.db, args.cycles_log, args.upto_cycle, work)
            source = f"{args.db} up to cycle {args.upto_cycle}"
        else:
            db, source = args.db, str(args.db)  # read_snapshot opens it read-only
        snapshot = read_snapshot(db)
    examples = build_examples(snapshot)
    if args.labels == "coin":
        examples = coin_labels(examples, args.seed)
    fold_a, fold_b = steps.folds(examples)
    print(f"bench/reward_signal.py: {source}; labels {args.labels}; {gate.decisive_pairs(examples)} decisive pairs, "
          f"{len(examples.pointwise)} pointwise labels; fold A {len(fold_a.pairs)} pairs + {len(fold_a.pointwise)} labels, "
          f"fold B {len(fold_b.pairs)} pairs + {len(fold_b.pointwise)} labels\n{machine()}", flush=True)

    rows = []
    for overrides in settings:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="reward-signal-models-") as reward_dir:
            base = dataclasses.replace(RewardArgs(), **overrides, reward_dir=reward_dir)
            base.validate()
            fit = steps.fit_reward_pair(model_args, base, snapshot, examples)
            per_fold = {role: {k: reward.read_manifest(reward_dir, version)["metrics"].get(k)
                               for k in ("val_accuracy", "val_pairs", "val_pointwise_accuracy", "train_accuracy", "train_loss",
                                         "val_loss", "steps", "epochs", "train_seconds", "seconds")}
                        for role, version in (("policy", fit.policy_version), ("judge", fit.judge_version))}
        sig = fit.signal
        n, acc, lo, hi = sig["val_pairs"], sig["val_accuracy"], sig["val_accuracy_lo"], sig["val_accuracy_hi"]
        row = {"setting": overrides or "defaults", "val_pairs": n, "val_correct": sig["val_correct"], "val_accuracy": acc,
               "val_accuracy_lo": lo, "val_accuracy_hi": hi, "folds": per_fold, "seconds": time.perf_counter() - started,
               "trusted": not gate.fit_reasons(sig, ScheduleArgs())}  # the gate's check at its defaults
        rows.append(row)
        print(f"  {json.dumps(row['setting'])}: cross-fitted accuracy {acc:.3f} [{lo:.3f}, {hi:.3f}] on {n} pairs; "
              f"steps {per_fold['policy']['steps']} + {per_fold['judge']['steps']}; {row['seconds']:.0f} s", flush=True)

    result = {"source": source, "labels": args.labels, "seed": args.seed, "machine": machine(), "model": vars(model_args),
              "decisive_pairs": gate.decisive_pairs(examples), "pointwise": len(examples.pointwise), "rows": rows}
    write_results(args.out, result)
    print("\n| setting | cross-fitted val accuracy [95% CI] (pairs) | trusted (lower bound > 0.5) | optimiser steps (A + B) | "
          "train accuracy A / B | seconds |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        f = r["folds"]
        tr = " / ".join("–" if f[k]["train_accuracy"] is None else f"{f[k]['train_accuracy']:.2f}" for k in ("policy", "judge"))
        print(f"| {json.dumps(r['setting'])} | {r['val_accuracy']:.3f} [{r['val_accuracy_lo']:.3f}, {r['val_accuracy_hi']:.3f}] ({r['val_pairs']}) | "
              f"{'yes' if r['trusted'] else 'no'} | {f['policy']['steps']} + {f['judge']['steps']} | {tr} | {r['seconds']:.0f} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
