"""Trainer command line: the same steps the scheduled cycle runs, one at a time.

    python -m trainer import FILE.jsonl          # HH-RLHF or TRL preference pairs -> comparisons (idempotent)
    python -m trainer reward                     # refit the reward model on the feedback store
    python -m trainer reward-eval FILE.jsonl [--reward r000001]   # accuracy on any preference file
    python -m trainer <command> --help           # every setting of that command

Settings are flags (dataclasses in assistant/config.py and trainer/config.py);
errors name the flag to fix. Nothing here talks to the running chat server: the
trainer only reads the feedback database and writes versioned directories.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from assistant.config import ModelArgs, add_args, from_args
from trainer.config import DataArgs, RewardArgs

log = logging.getLogger("trainer")


def cmd_import(ns: argparse.Namespace) -> int:
    from assistant.feedback import FeedbackStore
    from trainer.data import import_preferences

    path = Path(ns.file)
    if not path.is_file():
        print(f"error: {path}: no such file", file=sys.stderr)
        return 2
    store = FeedbackStore(ns.db)
    report = import_preferences(store, path)
    store.close()
    print(f"{path.name}: {report.added} pairs added, {report.skipped} already present, {len(report.errors)} bad lines")
    for line_no, err in report.errors[:20]:
        print(f"  line {line_no}: {err}")
    if len(report.errors) > 20:
        print(f"  ... and {len(report.errors) - 20} more")
    return 0


def fit_reward(model_args: ModelArgs, data_args: DataArgs, reward_args: RewardArgs, progress: bool = True) -> tuple[str, dict]:
    """Snapshot the store, build examples, split, fit, save. Returns (version, manifest)."""
    from trainer import reward
    from trainer.data import build_examples, read_snapshot, split

    if not Path(data_args.db).exists():
        raise ValueError(f"--db {data_args.db}: no feedback database yet; run the app and give feedback, or `python -m trainer import FILE`")
    snapshot = read_snapshot(data_args.db)
    examples = build_examples(snapshot)
    train, val = split(examples, data_args.val_fraction, data_args.split_seed)
    started = time.perf_counter()
    rm, metrics = reward.fit(model_args, reward_args, train, val, progress=progress)
    manifest = {
        "feedback_ids": snapshot.id_range(),
        "counts": examples.counts,
        "examples": {"train_pairs": len(train.pairs), "train_pointwise": len(train.pointwise),
                     "val_pairs": len(val.pairs), "val_pointwise": len(val.pointwise), "contradictions": examples.contradictions},
        "metrics": metrics,
        "reward_args": vars(reward_args),
        "seconds": time.perf_counter() - started,
    }
    version = reward.save(reward_args.reward_dir, rm, manifest)
    return version, manifest


def cmd_reward(ns: argparse.Namespace) -> int:
    model_args, data_args, reward_args = ns.model_args, ns.data_args, ns.reward_args
    try:
        version, manifest = fit_reward(model_args, data_args, reward_args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    m = manifest["metrics"]
    print(f"reward model {version} saved under {reward_args.reward_dir}")
    print(f"  feedback ids used: {json.dumps(manifest['feedback_ids'])}")
    print(f"  rows by kind:      {json.dumps(manifest['counts'])}")
    print(f"  examples:          {json.dumps(manifest['examples'])}")
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_accuracy_lo", "val_accuracy_hi", "val_pointwise_accuracy", "pairs_per_s", "seconds"):
        if key in m and m[key] is not None:
            print(f"  {key:<22} {m[key]:.4f}" if isinstance(m[key], float) else f"  {key:<22} {m[key]}")
    return 0


def cmd_reward_eval(ns: argparse.Namespace) -> int:
    from trainer import reward
    from trainer.data import Pair, read_preference_file, to_prompt

    path = Path(ns.file)
    if not path.is_file():
        print(f"error: {path}: no such file", file=sys.stderr)
        return 2
    rows, errors = read_preference_file(path)
    if ns.limit:
        rows = rows[: ns.limit]
    if not rows:
        print(f"error: {path}: no usable preference pairs ({len(errors)} bad lines)", file=sys.stderr)
        return 2
    saved = reward.versions(ns.reward_args.reward_dir)
    version = ns.reward or (saved[-1] if saved else None)
    try:
        if version is None:
            raise FileNotFoundError(f"no reward model under {ns.reward_args.reward_dir}; fit one with `python -m trainer reward`")
        rm = reward.load(ns.reward_args.reward_dir, ns.model_args, version)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pairs = [Pair(to_prompt(p), c, r, conversation_id=f"line{i}", kind="import") for i, (p, c, r) in enumerate(rows)]
    result = reward.evaluate_pairs(rm, pairs, batch_size=ns.reward_args.reward_eval_batch_size)
    print(f"{path.name} with reward model {version}: pairwise accuracy {result['accuracy']:.3f} "
          f"(95% CI {result['lo']:.3f}-{result['hi']:.3f}), {result['n']} pairs scored, {len(errors)} bad lines skipped")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import", help="import preference pairs (HH-RLHF or TRL JSONL) as comparisons by user 'import'")
    p.add_argument("file", help="JSONL file of preference pairs")
    p.add_argument("--db", default=DataArgs.db, help=f"feedback database (default: {DataArgs.db})")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("reward", help="refit the reward model on the feedback store and save a new version")
    add_args(p, ModelArgs, "base model")
    add_args(p, DataArgs, "data")
    add_args(p, RewardArgs, "reward model")
    p.set_defaults(func=cmd_reward, needs=(ModelArgs, DataArgs, RewardArgs))

    p = sub.add_parser("reward-eval", help="pairwise accuracy (95%% CI) of a reward model on a preference file")
    p.add_argument("file", help="JSONL file of preference pairs (HH-RLHF or TRL format)")
    p.add_argument("--reward", default=None, help="reward-model version, e.g. r000001 (default: the latest)")
    p.add_argument("--limit", type=int, default=0, help="score only the first N pairs (0 = all)")
    add_args(p, ModelArgs, "base model")
    add_args(p, RewardArgs, "reward model")
    p.set_defaults(func=cmd_reward_eval, needs=(ModelArgs, RewardArgs))
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    ns = parser.parse_args(argv)
    names = {ModelArgs: "model_args", DataArgs: "data_args", RewardArgs: "reward_args"}
    try:
        for cls in getattr(ns, "needs", ()):
            setattr(ns, names[cls], from_args(cls, ns))
    except ValueError as exc:
        parser.error(str(exc))
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
