"""Trainer command line: the same steps the scheduled cycle runs, one at a time.

    python -m trainer import FILE.jsonl          # HH-RLHF or TRL preference pairs -> comparisons (idempotent)
    python -m trainer reward                     # refit the reward model on the feedback store
    python -m trainer reward-eval FILE.jsonl [--reward r000001]   # accuracy on any preference file
    python -m trainer ppo                        # PPO on the served adapter -> a candidate adapter (not promoted)
    python -m trainer train --policy-step dpo    # one policy step (ppo, dpo, kto, sft, grpo, rloo) -> a candidate
    python -m trainer sft [--demonstrations F]   # SFT on corrections, 👍 replies and a demonstrations file -> a candidate
    python -m trainer once                       # one whole cycle: reward model, PPO, evaluate, promote or reject
    python -m trainer run                        # cycles on a schedule (every N minutes with K new rows, and/or daily)
    python -m trainer evaluate VERSION           # a candidate made by hand through the cycle's gate, against the served version
    python -m trainer promote VERSION            # serve a candidate whose evaluation passed against the version serving now
    python -m trainer rollback [VERSION]         # serve an earlier version again (default: the served one's parent)
    python -m trainer prune [--keep N]           # delete old adapter and reward-model versions (never what serves or its ancestors)
    python -m trainer backup [--to DIR]          # copy the feedback database, safely while the app writes to it
    python -m trainer restore BACKUP             # put a backup back (the app stopped; the replaced file is kept)
    python -m trainer status                     # versions, what is serving, whether a cycle is running
    python -m trainer <command> --help           # every setting of that command

Settings are flags (dataclasses in assistant/config.py and trainer/config.py);
errors name the flag to fix. Nothing here talks to the running chat server: the
trainer only reads the feedback database and writes versioned directories.

`reward` and `ppo` also run data-parallel, one process per GPU (trainer/distributed.py):

    torchrun --nproc-per-node 2 -m trainer reward ...     # batch sizes stay global; rank 0 saves and prints
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from assistant.config import ModelArgs, add_args, from_args
from assistant.cycles import Busy
from trainer.config import DataArgs, PolicyArgs, PPOArgs, RewardArgs, ScheduleArgs

log = logging.getLogger("trainer")
DATA_PARALLEL = ("reward", "ppo")  # the commands a torchrun launch may run, each process on its share of every batch


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def cmd_import(ns: argparse.Namespace) -> int:
    from assistant.feedback import FeedbackStore, StoreUnavailable
    from trainer.data import import_preferences

    path = Path(ns.file)
    if not path.is_file():
        print(f"error: {path}: no such file", file=sys.stderr)
        return 2
    try:
        with FeedbackStore(ns.db) as store:
            report = import_preferences(store, path)
    except StoreUnavailable as exc:
        print(f"error: --db: {exc}", file=sys.stderr)
        return 2
    print(f"{path.name}: {report.added} pairs added, {report.skipped} already present, {len(report.errors)} bad lines")
    for line_no, err in report.errors[:20]:
        print(f"  line {line_no}: {err}")
    if len(report.errors) > 20:
        print(f"  ... and {len(report.errors) - 20} more")
    return 0


def _manual_lock(ns: argparse.Namespace):
    """The cycle lock, for a step run by hand: a cycle's tidy-up never removes its files mid-write."""
    from assistant.cycles import CycleLock

    return CycleLock(ns.lock_file)


def _locked_step(ns: argparse.Namespace, run):
    """run() under the cycle lock -> (its result, None), or (None, exit code) with the
    reason printed: 3 another cycle holds the lock, 2 bad input or settings (a loss
    that diverges names the flag to change), 1 PPO aborted on a non-finite value."""
    def locked():
        with _launch_lock(ns) if getattr(ns, "launched", False) else _manual_lock(ns):
            return run()

    return _guarded(locked)


@contextlib.contextmanager
def _launch_lock(ns: argparse.Namespace):
    """The cycle lock for a data-parallel launch: rank 0 holds it for every process and
    tells the others whether it got it, so all of them start or none does (each sees
    Busy); at the end they wait for each other, so none leaves before rank 0 has saved."""
    from trainer import distributed

    with contextlib.ExitStack() as stack:
        busy = None
        if distributed.is_main():
            try:
                stack.enter_context(_manual_lock(ns))
            except Busy as exc:
                busy = str(exc)
        busy = distributed.broadcast_object(busy)
        if busy is not None:
            raise Busy(busy)
        yield
        distributed.barrier()


def _rank0(ns: argparse.Namespace) -> bool:
    """This process reports (progress bars, printed results): always, but in a data-parallel launch only rank 0."""
    if not getattr(ns, "launched", False):
        return True
    from trainer import distributed

    return distributed.is_main()


def _shared_snapshot(ns: argparse.Namespace):
    """In a data-parallel launch, the feedback snapshot read once, by rank 0, and sent to
    every process, so all of them train on the same rows (the app may write between two
    reads, and other nodes need no copy of the database); an error reading it is raised
    on every process alike. Outside a launch None: the step reads the snapshot itself."""
    if not getattr(ns, "launched", False):
        return None
    from trainer import distributed
    from trainer.data import read_snapshot

    snapshot = error = None
    if distributed.is_main() and Path(ns.data_args.db).exists():
        try:
            snapshot = read_snapshot(ns.data_args.db)
        except Exception as exc:  # handed to every process below, then raised there
            error = exc
    snapshot, error = distributed.broadcast_object((snapshot, error))
    if error is not None:
        raise error
    return snapshot


def _join_launch(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Under torchrun with more than one process: refuse a command that does not run
    data-parallel, put each process on its own GPU (--device auto or cuda), join the
    process group. Processes other than rank 0 log warnings only."""
    from trainer import distributed

    if not distributed.launched():
        return
    if ns.command not in DATA_PARALLEL:
        getattr(ns, "subparser", parser).error(f"`{ns.command}` runs as one process, not under torchrun; only "
                                               f"{' and '.join(DATA_PARALLEL)} run data-parallel (use `python -m trainer {ns.command}`)")
    ns.model_args = dataclasses.replace(ns.model_args, device=distributed.local_device(ns.model_args.device))
    distributed.init(ns.model_args.device)
    ns.launched = True
    if not distributed.is_main():
        logging.getLogger().setLevel(logging.WARNING)


def _guarded(run):
    """run() -> (its result, None), or (None, exit code) with the reason printed, as `_locked_step`."""
    from assistant.feedback import StoreUnavailable

    from trainer.ppo import NonFiniteError

    try:
        return run(), None
    except Busy as exc:
        print(f"not started: {exc}", file=sys.stderr)
        return None, 3
    except StoreUnavailable as exc:
        print(f"error: --db: {exc}", file=sys.stderr)
        return None, 2
    except NonFiniteError as exc:
        print(f"error: PPO aborted, no candidate written: {exc}", file=sys.stderr)
        return None, 1
    except (ValueError, FileNotFoundError, FloatingPointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None, 2


def cmd_reward(ns: argparse.Namespace) -> int:
    from trainer.steps import fit_reward

    reward_args = ns.reward_args
    out, rc = _locked_step(ns, lambda: fit_reward(ns.model_args, ns.data_args, reward_args, progress=_rank0(ns), snapshot=_shared_snapshot(ns)))
    if out is None:
        return rc
    version, manifest, _ = out
    if version is None:  # another process of a data-parallel launch: rank 0 saved and reports
        return 0
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
    from tqdm.auto import tqdm

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
    batch = ns.reward_args.reward_eval_batch_size
    correct = 0
    with tqdm(total=len(pairs), desc="reward-eval", unit="pair") as bar:  # on stderr, like the other commands' bars: pairs done, elapsed, ETA
        for start in range(0, len(pairs), batch):
            part = reward.evaluate_pairs(rm, pairs[start : start + batch], batch_size=batch)
            correct += round(part["accuracy"] * part["n"])
            bar.update(part["n"])
    acc, lo, hi = reward.accuracy_ci(correct, len(pairs))
    print(f"{path.name} with reward model {version}: pairwise accuracy {acc:.3f} "
          f"(95% CI {lo:.3f}-{hi:.3f}), {len(pairs)} pairs scored, {len(errors)} bad lines skipped")
    return 0


def cmd_ppo(ns: argparse.Namespace) -> int:
    from trainer.steps import run_ppo

    out, rc = _locked_step(ns, lambda: run_ppo(ns.model_args, ns.data_args, ns.reward_args, ns.ppo_args, progress=_rank0(ns),
                                               snapshot=_shared_snapshot(ns)))
    if out is None:
        return rc
    version, manifest = out
    if version is None:  # another process of a data-parallel launch: rank 0 published and reports
        return 0
    last = manifest["metrics"][-1]
    print(f"candidate adapter {version} written to {ns.ppo_args.adapters_dir} (parent {manifest['parent']}, reward model {manifest['reward_model']}); "
          f"not promoted. {len(manifest['metrics'])} iterations, stop: {manifest['stop_reason']}; "
          f"last objective/scores {last['objective/scores']:.3f}, objective/kl {last['objective/kl']:.3f}")
    return 0


def cmd_train(ns: argparse.Namespace) -> int:
    import dataclasses

    from trainer.steps import run_policy

    policy_args = ns.policy_args
    if ns.command == "sft":
        policy_args = dataclasses.replace(policy_args, policy_step="sft", sft_first=False)
    out, rc = _locked_step(ns, lambda: run_policy(ns.model_args, ns.data_args, ns.reward_args, ns.ppo_args, policy_args))
    if out is None:
        return rc
    version, manifest = out
    rows = manifest.get("rows") or {"ppo": manifest.get("prompts")}
    print(f"candidate adapter {version} written to {ns.ppo_args.adapters_dir} by {manifest['policy_step']} "
          f"(parent {manifest['parent']}; rows {json.dumps(rows)}); not promoted.")
    return 0


def cmd_once(ns: argparse.Namespace) -> int:
    from trainer import schedule

    try:
        result = schedule.run_cycle(ns.model_args, ns.data_args, ns.reward_args, ns.ppo_args, ns.schedule_args, policy_args=ns.policy_args)
    except Busy as exc:
        print(f"not started: {exc}", file=sys.stderr)
        return 3
    print(result.summary())
    return 1 if result.decision == "failed" else 0


def cmd_run(ns: argparse.Namespace) -> int:
    from trainer import schedule

    s = ns.schedule_args
    if s.every_min == 0 and not s.at:
        print("error: nothing scheduled; give --every-min > 0 and/or --at HH:MM", file=sys.stderr)
        return 2
    try:
        schedule.run_schedule(ns.model_args, ns.data_args, ns.reward_args, ns.ppo_args, s, policy_args=ns.policy_args)
    except KeyboardInterrupt:
        print("schedule stopped")
    return 0


def version_arg(text: str, adapters_dir: str | Path) -> str:
    """The version name a rollback argument means: 'base', a name like 'v000001' (a
    trailing slash from tab completion is dropped), or the path of a version directory
    under `adapters_dir` ('data/adapters/v000001/'). Anything else: ValueError."""
    from assistant.adapters import VERSION_RE
    from assistant.config import BASE_VERSION

    stripped = text.strip().rstrip("/")
    if stripped == BASE_VERSION or ("/" not in stripped and VERSION_RE.match(stripped)):
        return stripped
    path = Path(stripped)
    if not VERSION_RE.match(path.name):
        raise ValueError(f"{text!r} is not a version: give 'base', a version name like v000001, or its directory under {adapters_dir}")
    if path.parent.resolve() != Path(adapters_dir).resolve():
        raise ValueError(f"{text!r} is not a directory under --adapters-dir {adapters_dir}")
    return path.name


def cmd_rollback(ns: argparse.Namespace) -> int:
    from assistant import adapters
    from assistant.model import lora_config

    try:
        version = None if ns.version is None else version_arg(ns.version, ns.adapters_dir)
    except ValueError as exc:
        print(f"error: rollback VERSION: {exc}", file=sys.stderr)
        return 2
    try:
        old, new = adapters.rollback(ns.adapters_dir, version, lora=lora_config(ns.model_args))
    except adapters.InvalidAdapter as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"CURRENT: {old or 'unreadable'} -> {new}; a running server swaps within its --watch-interval")
    return 0


def _candidate_arg(command: str, text: str, adapters_dir: str) -> str | None:
    """The version a candidate argument names, or None with the reason printed."""
    from assistant.config import BASE_VERSION

    try:
        version = version_arg(text, adapters_dir)
    except ValueError as exc:
        print(f"error: {command} VERSION: {exc}", file=sys.stderr)
        return None
    if version == BASE_VERSION:
        print(f"error: {command} VERSION: the base model is not a candidate; give a version like v000003", file=sys.stderr)
        return None
    return version


def cmd_evaluate(ns: argparse.Namespace) -> int:
    from assistant import adapters
    from trainer import schedule

    version = _candidate_arg("evaluate", ns.version, ns.ppo_args.adapters_dir)
    if version is None:
        return 2
    result, rc = _guarded(lambda: schedule.evaluate_version(ns.model_args, ns.data_args, ns.reward_args, ns.ppo_args, ns.schedule_args, version))
    if result is None:
        return rc
    verdict = {"passed": "passed the gate", "rejected": "refused by the gate (status: rejected)"}.get(
        result.decision, f"not judged ({result.decision}); it stays a candidate")
    print(f"{version} ({result.policy_step or '?'}) against {result.parent}, the version serving now: {verdict}")
    if result.judge_version:
        print(f"  judge {result.judge_version} (fold B), policy's reward model {result.reward_version} (fold A), "
              f"feedback ids {json.dumps(result.feedback_ids)}")
    if result.evaluation.get("win_rate") is not None:
        print(f"  {schedule.describe(result.evaluation)}")
    for reason in result.reasons:
        print(f"  - {reason}")
    if result.judge_version and "judge_model" not in adapters.read_manifest(ns.ppo_args.adapters_dir, version):
        print("  note: unlike a cycle's candidate, one made by hand may have trained on the judge's fold (B) and on the held-out "
              "prompts too, which makes the judge's verdict and the held-out agreement weaker evidence")
    if result.decision == "passed":
        print(f"  promote it with: python -m trainer promote {version}")
    print(f"  recorded in {Path(ns.ppo_args.adapters_dir) / version / 'manifest.json'} (gate, evaluation) [{result.seconds:.0f}s]")
    return 0 if result.decision == "passed" else 1


class _Refused(Exception):
    """promote: the recorded evaluation does not allow it."""


def cmd_promote(ns: argparse.Namespace) -> int:
    from assistant import adapters
    from assistant.model import lora_config
    from trainer import schedule

    version = _candidate_arg("promote", ns.version, ns.adapters_dir)
    if version is None:
        return 2
    again = f"`python -m trainer evaluate {version}`"

    def promote():
        manifest = schedule.check_candidate(ns.adapters_dir, version)
        verdict = manifest.get("gate") or {}
        current = adapters.read_current(ns.adapters_dir)
        if not verdict:
            raise _Refused(f"{version} has not been evaluated; run {again} first")
        if not verdict.get("passed"):
            raise _Refused(f"{version}'s evaluation against {verdict.get('against')} did not pass: {'; '.join(verdict.get('reasons') or ['no reason recorded'])}")
        if verdict.get("against") != current:
            raise _Refused(f"CURRENT moved since {version} was evaluated: it passed against {verdict.get('against')}, "
                           f"but {current} serves now; re-run {again}")
        adapters.validate(Path(ns.adapters_dir) / version, lora_config(ns.model_args))
        return schedule.promote_evaluated(ns.adapters_dir, version, manifest["evaluation"], verdict["against"])

    try:
        old, rc = _locked_step(ns, promote)
    except _Refused as exc:
        print(f"not promoted: {exc}", file=sys.stderr)
        return 1
    if rc is not None:
        return rc
    print(f"CURRENT: {old} -> {version}; a running server swaps within its --watch-interval")
    return 0


def cmd_prune(ns: argparse.Namespace) -> int:
    from trainer import schedule

    if ns.keep < 1:
        ns.subparser.error(f"--keep must be at least 1, got {ns.keep}")
    def prune():
        from assistant.adapters import InvalidAdapter

        try:
            return schedule.prune(ns.adapters_dir, ns.reward_dir, ns.keep, dry_run=ns.dry_run)
        except InvalidAdapter as exc:
            raise ValueError(f"nothing pruned: {exc}; `python -m trainer status` shows what is wrong, "
                             "`python -m trainer rollback VERSION` repairs CURRENT") from exc

    out, rc = _locked_step(ns, prune)
    if out is None:
        return rc
    if not out["adapters"] and not out["reward"]:
        print(f"nothing to prune (--keep {ns.keep}; what serves, the live candidate, their ancestors and the reward models they name are always kept)")
        return 0
    verb = "would delete" if ns.dry_run else "deleted"
    print(f"{verb} adapters: {', '.join(out['adapters']) or 'none'}; reward models: {', '.join(out['reward']) or 'none'} (--keep {ns.keep})")
    return 0


def cmd_backup(ns: argparse.Namespace) -> int:
    from assistant import backup

    if ns.keep < 1:
        ns.subparser.error(f"--keep must be at least 1, got {ns.keep}")
    try:
        path, removed = backup.backup(ns.db, ns.to, ns.keep)
    except (backup.BackupError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"backed up {ns.db} to {path} ({path.stat().st_size} bytes, integrity ok)"
          + (f"; deleted {len(removed)} older backup{'s' if len(removed) != 1 else ''} (--keep {ns.keep})" if removed else ""))
    return 0


def cmd_restore(ns: argparse.Namespace) -> int:
    from assistant import backup

    try:
        with _manual_lock(ns):
            kept = backup.restore(ns.backup, ns.db)
    except Busy as exc:
        print(f"not started: {exc}", file=sys.stderr)
        return 3
    except (backup.BackupError, OSError) as exc:
        print(f"error: {exc}; nothing was changed", file=sys.stderr)
        return 2
    print(f"restored {ns.db} from {ns.backup}" + (f"; the database it replaced is kept as {kept}" if kept else ""))
    return 0


def _pointer(read, adapters_dir: str) -> tuple[str | None, str]:
    """(the version a pointer file names or None, what is wrong with it or '')."""
    from assistant.adapters import InvalidAdapter
    from assistant.config import BASE_VERSION

    try:
        version = read(adapters_dir)
    except InvalidAdapter as exc:
        return None, f"unreadable ({exc})"
    if version not in (None, BASE_VERSION) and not (Path(adapters_dir) / version).is_dir():
        return version, f"{version}, which is not under {adapters_dir}"
    return version, ""


def cmd_status(ns: argparse.Namespace) -> int:
    from assistant import adapters, cycles
    from trainer import schedule

    running = cycles.holder(ns.schedule_args.lock_file)
    current, current_problem = _pointer(adapters.read_current, ns.adapters_dir)
    live, live_problem = _pointer(adapters.read_live, ns.adapters_dir)
    print("serving: " + (f"unknown: CURRENT is {current_problem}; `python -m trainer rollback VERSION` repairs it" if current_problem else current)
          + (f", live comparison: unknown: LIVE is {live_problem}" if live_problem else f", live comparison: {live}" if live else ""))
    print("cycle: " + (f"running (pid {running.get('pid')}, since {running.get('started_at')}, phase {running.get('phase')})" if running is not None else "none running"))
    print(f"new feedback rows since the last cycle: {schedule.new_rows(ns.db, ns.schedule_args.cycles_log)}")
    last = cycles.read(ns.schedule_args.cycles_log)
    if last:
        print(f"last cycle: {last[-1].get('decision')} at {last[-1].get('started_at')}" + (f": {'; '.join(last[-1]['reasons'])}" if last[-1].get("reasons") else ""))
    for m in adapters.manifests(ns.adapters_dir):
        e = m.get("evaluation") or {}
        detail = (f"win rate {e['win_rate']:.2f} [{e['win_rate_lo']:.2f}, {e['win_rate_hi']:.2f}], KL {e['kl_parent']:.2f} to parent, {e['kl_base']:.2f} to base"
                  if all(isinstance(e.get(k), (int, float)) for k in ("win_rate", "win_rate_lo", "win_rate_hi", "kl_parent", "kl_base")) else "")
        if detail and isinstance(e.get("kl_optimised"), (int, float)):
            detail += f", {e['kl_optimised']:.2f} budgeted ({e['kl_optimised_total']:.2f} over the lineage)"
        g = m.get("gate") if isinstance(m.get("gate"), dict) and m.get("status") == "candidate" else None
        verdict = ("" if g is None else f"  evaluated against {g.get('against')}: " + ("passed; `promote` serves it" if g.get("passed") else
                   f"not passed: {'; '.join(g.get('reasons') or [])}"))
        print(f"  {m['version']}  {m.get('status') or '?':<9}  parent {m.get('parent') or '?':<8}  reward {m.get('reward_model') or '?':<8}  {m.get('created_at', '')}  {detail}"
              + (f"  rejected: {'; '.join(m['reasons'])}" if m.get("status") == "rejected" and m.get("reasons") else "") + verdict)
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
    p.add_argument("--lock-file", default=ScheduleArgs.lock_file, help=f"the cycle lock, held while fitting (default: {ScheduleArgs.lock_file})")
    p.set_defaults(func=cmd_reward, needs=(ModelArgs, DataArgs, RewardArgs), subparser=p)

    p = sub.add_parser("reward-eval", help="pairwise accuracy (95%% CI) of a reward model on a preference file")
    p.add_argument("file", help="JSONL file of preference pairs (HH-RLHF or TRL format)")
    p.add_argument("--reward", default=None, help="reward-model version, e.g. r000001 (default: the latest)")
    p.add_argument("--limit", type=_non_negative_int, default=0, help="score only the first N pairs (0 = all)")
    add_args(p, ModelArgs, "base model")
    add_args(p, RewardArgs, "reward model")
    p.set_defaults(func=cmd_reward_eval, needs=(ModelArgs, RewardArgs), subparser=p)

    for name, func, text, classes in (
            ("ppo", cmd_ppo, "PPO on the served adapter against the latest reward model; writes a candidate adapter", (PPOArgs,)),
            ("train", cmd_train, "one policy step (--policy-step) on the served adapter; writes a candidate adapter", (PPOArgs, PolicyArgs)),
            ("sft", cmd_train, "SFT on demonstrations (corrections, 👍 replies, --demonstrations); writes a candidate adapter", (PPOArgs, PolicyArgs))):
        p = sub.add_parser(name, help=text)
        add_args(p, ModelArgs, "base model")
        add_args(p, DataArgs, "data")
        add_args(p, RewardArgs, "reward model")
        for cls in classes:
            add_args(p, cls, {PPOArgs: "ppo", PolicyArgs: "policy step"}[cls])
        p.add_argument("--lock-file", default=ScheduleArgs.lock_file, help=f"the cycle lock, held while training (default: {ScheduleArgs.lock_file})")
        p.set_defaults(func=func, needs=(ModelArgs, DataArgs, RewardArgs, *classes), subparser=p)

    for name, func, text in (("once", cmd_once, "run one cycle now: refit reward model, PPO, evaluate, promote or reject"),
                             ("run", cmd_run, "run cycles on the schedule until stopped")):
        p = sub.add_parser(name, help=text)
        add_args(p, ModelArgs, "base model")
        add_args(p, DataArgs, "data")
        add_args(p, RewardArgs, "reward model")
        add_args(p, PPOArgs, "ppo")
        add_args(p, PolicyArgs, "policy step")
        add_args(p, ScheduleArgs, "schedule and promotion gate")
        p.set_defaults(func=func, needs=(ModelArgs, DataArgs, RewardArgs, PPOArgs, PolicyArgs, ScheduleArgs), subparser=p)

    p = sub.add_parser("evaluate", help="judge a candidate made by hand with the cycle's gate, against the version serving now")
    p.add_argument("version", help="candidate to evaluate: e.g. v000003 (or its directory, data/adapters/v000003/)")
    add_args(p, ModelArgs, "base model")
    add_args(p, DataArgs, "data")
    add_args(p, RewardArgs, "reward models (the cycle's two, fitted on its folds)")
    add_args(p, PPOArgs, "adapters and sampling")
    add_args(p, ScheduleArgs, "the gate")
    p.set_defaults(func=cmd_evaluate, needs=(ModelArgs, DataArgs, RewardArgs, PPOArgs, ScheduleArgs), subparser=p)

    p = sub.add_parser("promote", help="serve a candidate whose recorded evaluation passed against the version serving now")
    p.add_argument("version", help="candidate to promote: e.g. v000003 (or its directory, data/adapters/v000003/)")
    p.add_argument("--adapters-dir", default=PPOArgs.adapters_dir, help=f"adapter directory (default: {PPOArgs.adapters_dir})")
    p.add_argument("--lock-file", default=ScheduleArgs.lock_file, help=f"the cycle lock, held while promoting (default: {ScheduleArgs.lock_file})")
    add_args(p, ModelArgs, "base model (to validate the adapter against)")
    p.set_defaults(func=cmd_promote, needs=(ModelArgs,), subparser=p)

    p = sub.add_parser("prune", help="delete old adapter and reward-model versions (never what serves, the live one, or their ancestors)")
    p.add_argument("--keep", type=int, default=ScheduleArgs.keep, help=f"newest versions of each kind to keep besides those in use (default: {ScheduleArgs.keep})")
    p.add_argument("--dry-run", action="store_true", help="print what would be deleted, delete nothing")
    p.add_argument("--adapters-dir", default=PPOArgs.adapters_dir, help=f"adapter directory (default: {PPOArgs.adapters_dir})")
    p.add_argument("--reward-dir", default=RewardArgs.reward_dir, help=f"reward-model directory (default: {RewardArgs.reward_dir})")
    p.add_argument("--lock-file", default=ScheduleArgs.lock_file, help=f"the cycle lock, held while pruning (default: {ScheduleArgs.lock_file})")
    p.set_defaults(func=cmd_prune, subparser=p)

    p = sub.add_parser("backup", help="copy the feedback database (safe while the app writes to it), keeping the newest N copies")
    p.add_argument("--db", default=DataArgs.db, help=f"feedback database (default: {DataArgs.db})")
    p.add_argument("--to", default="", help="directory of backups (default: backups/ beside --db, e.g. data/backups)")
    p.add_argument("--keep", type=int, default=ScheduleArgs.backup_keep, help=f"backups to keep (default: {ScheduleArgs.backup_keep})")
    p.set_defaults(func=cmd_backup, subparser=p)

    p = sub.add_parser("restore", help="replace the feedback database with a backup (stop the app first; the replaced file is kept)")
    p.add_argument("backup", help="backup file, e.g. data/backups/feedback-20260102T030000.000000Z.db")
    p.add_argument("--db", default=DataArgs.db, help=f"feedback database to replace (default: {DataArgs.db})")
    p.add_argument("--lock-file", default=ScheduleArgs.lock_file, help=f"the cycle lock, held while restoring (default: {ScheduleArgs.lock_file})")
    p.set_defaults(func=cmd_restore, subparser=p)

    p = sub.add_parser("rollback", help="point CURRENT at an earlier version (default: the served version's parent)")
    p.add_argument("version", nargs="?", default=None, help="version to serve again: e.g. v000003 (or its directory, data/adapters/v000003/), or 'base'")
    p.add_argument("--adapters-dir", default=PPOArgs.adapters_dir, help=f"adapter directory (default: {PPOArgs.adapters_dir})")
    add_args(p, ModelArgs, "base model (to validate the adapter against)")
    p.set_defaults(func=cmd_rollback, needs=(ModelArgs,), subparser=p)

    p = sub.add_parser("status", help="adapter versions, what is serving, whether a cycle is running")
    p.add_argument("--adapters-dir", default=PPOArgs.adapters_dir, help=f"adapter directory (default: {PPOArgs.adapters_dir})")
    p.add_argument("--db", default=DataArgs.db, help=f"feedback database (default: {DataArgs.db})")
    add_args(p, ScheduleArgs, "schedule")
    p.set_defaults(func=cmd_status, needs=(ScheduleArgs,), subparser=p)
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    ns = parser.parse_args(argv)
    names = {ModelArgs: "model_args", DataArgs: "data_args", RewardArgs: "reward_args", PPOArgs: "ppo_args", PolicyArgs: "policy_args", ScheduleArgs: "schedule_args"}
    try:
        for cls in getattr(ns, "needs", ()):
            setattr(ns, names[cls], from_args(cls, ns))
    except ValueError as exc:
        getattr(ns, "subparser", parser).error(str(exc))  # usage of the subcommand, then exit 2
    if "WORLD_SIZE" in os.environ:  # started by torchrun (checked first: importing torch costs seconds)
        _join_launch(ns, parser)
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
