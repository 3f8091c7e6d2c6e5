"""The feedback of a kept `bench/loop.py` run, replayed through other policy steps: the same snapshot for each.

    .venv/bin/python bench/replay.py --results bench/results/loop-listy-minsteps.json --policy-step ppo --policy-step dpo
    .venv/bin/python bench/replay.py --results R.json --policy-step kto --cycles 2 --judge-refused

A loop run gathers feedback on the replies its own adapters give, so two runs with
different policy steps never train on the same feedback, and their difference mixes
the step with the users' noise. This script holds the feedback fixed. Each cycle of
the kept run recorded, in its cycles-log line, the id range of every feedback table
its trainer read (`feedback_ids`). For each `--policy-step` the replay starts from
the base in a fresh directory and, cycle after cycle, gives `python -m trainer once
--policy-step STEP` (the trainer's own defaults otherwise, the kept run's
`--trainer-args` included) a copy of the kept feedback.db cut to exactly that range:
every feedback table's rows with a higher id are deleted, so the trainer's snapshot
is the one the kept run's trainer took. The gate decides as it would in the app.

After the last cycle it judges the adapter the replay serves against the base by the
run's hidden preference (bench/rejudge.py `hidden_judgement`: the gate's own
sampling, at the served settings, on the run's held-out prompts, `--replies` a side);
with `--judge-refused` also every candidate the gate refused, since a refusal can be
wrong. Each cycle's gate pairs (candidate against its parent) are judged by the
hidden preference too, as bench/loop.py does. The kept run's own served adapter is
judged the same way first (its step's row, "kept"), so every row of the final table
is measured alike, by this script; `--no-kept` skips it.

What it does not replay: the kept run's later feedback was given on the replies of
the adapter that run served, not on the replayed step's; the replay answers "which
step makes the most of this feedback", not "which step gathers the best feedback".
The kept work directory is only read.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench import loop  # noqa: E402
from bench.common import RESULTS, machine, write_results  # noqa: E402
from bench.rejudge import hidden_judgement, read_kept_run  # noqa: E402


def cut_copy(src: Path, dst: Path, feedback_ids: dict) -> dict[str, int]:
    """A copy of the feedback database `src` at `dst` holding, of every feedback table, only
    the rows with id <= the last id `feedback_ids` ({table: [first, last]}) gives it.
    Returns {table: rows left}. Every feedback table must be named."""
    from assistant.feedback import FEEDBACK_TABLES

    missing = [t for t in FEEDBACK_TABLES if t not in feedback_ids]
    if missing:
        raise ValueError(f"feedback_ids names no range for {', '.join(missing)}; expected every one of {', '.join(FEEDBACK_TABLES)}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True)
    target = sqlite3.connect(dst)
    try:
        source.backup(target)
        with target:
            for table in FEEDBACK_TABLES:
                target.execute(f"DELETE FROM {table} WHERE id > ?", (int(feedback_ids[table][1]),))  # noqa: S608
        return {t: int(target.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]) for t in FEEDBACK_TABLES}  # noqa: S608
    finally:
        source.close()
        target.close()


def replay_step(step: str, run: argparse.Namespace, kept: dict, kept_db: Path, root: Path, cycles: int) -> dict:
    """Every kept cycle's snapshot through `python -m trainer once --policy-step step` in root/step."""
    from assistant.adapters import read_current, read_evaluation

    pref = loop.make_preference(run)
    work = root / step
    files = {"db": work / "feedback.db", "adapters_dir": work / "adapters", "reward_dir": work / "reward",
             "lock_file": work / "trainer.lock", "cycles_log": work / "cycles.jsonl"}
    file_flags = [x for k, v in files.items() for x in ("--" + k.replace("_", "-"), str(v))]
    model_flags = ["--model", run.model, "--quantize", run.quantize, "--device", run.device]
    cmd = [sys.executable, "-m", "trainer", "once", *file_flags, *model_flags, "--policy-step", step, *shlex.split(run.trainer_args or "")]
    out: dict = {"policy_step": step, "trainer_command": shlex.join(["python", *cmd[1:]]), "cycles": []}
    for k, kc in enumerate(kept["cycles"][:cycles], 1):
        ids = kc.get("feedback_ids")
        if not ids:
            raise SystemExit(f"error: cycle {k} of the kept run records no feedback_ids (decision {kc.get('decision')!r}); cannot replay it")
        rows = cut_copy(kept_db, files["db"], ids)
        print(f"\n[{step}: cycle {k}/{cycles}] the kept snapshot, {sum(rows.values())} feedback rows ({rows})", flush=True)
        before = len(loop.read_cycles(files["cycles_log"]))
        t = time.perf_counter()
        rc = loop.run_trainer(cmd, work / f"trainer-c{k}.log")
        seconds = time.perf_counter() - t
        lines = loop.read_cycles(files["cycles_log"])[before:]
        entry = lines[-1] if lines else {"decision": "failed", "reasons": [f"the trainer wrote no cycles-log line (exit code {rc})"]}
        c = {"cycle": k, **loop.cycle_figures(entry), "seconds": seconds, "exit_code": rc, "kept_decision": kc.get("decision"),
             "kept_feedback_ids": ids, "feedback_rows": rows}
        if c["feedback_ids"] and c["feedback_ids"] != ids:
            raise RuntimeError(f"cycle {k}: the trainer read {c['feedback_ids']}, not the kept snapshot {ids}")
        version = c["version"]
        manifest = loop.read_json(files["adapters_dir"] / version / "manifest.json") if version else {}
        c["policy"] = {key: manifest.get(key) for key in ("policy_step", "sft_first", "sft_skipped", "rows", "prompts", "stop_reason", "seconds")}
        c["gate_pairs_hidden"] = loop.judged_by_hidden(pref, f"replay-{step}-c{k}-gate", read_evaluation(files["adapters_dir"], version)) if version else None
        gh = c["gate_pairs_hidden"]
        print(f"  {step} cycle {k}: {c['decision']} {version or ''} ({'; '.join(c['reasons']) or 'passed the gate'}); "
              f"KL parent {loop.fmt(c['kl_parent'], '.2f')}, base {loop.fmt(c['kl_base'], '.2f')}; "
              f"gate pairs by the hidden preference {loop.ci(gh, 'win_rate') if gh else 'n/a'}; {seconds:.0f}s", flush=True)
        out["cycles"].append(c)
        if rc == 2:
            print("  the trainer refused its flags (exit code 2); stopping this step", flush=True)
            break
    out["served"] = read_current(files["adapters_dir"])
    out["work_dir"] = str(work)
    return out


def judge_step(out: dict, run: argparse.Namespace, replies: int, prompts: int | None, judge_refused: bool) -> None:
    """The served adapter (and with judge_refused every refused candidate) against the base, by the hidden preference."""
    adapters_dir = Path(out["work_dir"]) / "adapters"
    out["vs_base"] = None
    if out["served"] != "base":
        print(f"\n[{out['policy_step']}: judgement] {out['served']} against the base, by the hidden preference", flush=True)
        out["vs_base"] = hidden_judgement(run, adapters_dir, out["served"], "base", replies, prompts=prompts)
    if judge_refused:
        for c in out["cycles"]:
            if c["decision"] == "rejected" and c["version"]:
                print(f"\n[{out['policy_step']}: judgement] refused {c['version']} against the base, by the hidden preference", flush=True)
                c["refused_vs_base"] = hidden_judgement(run, adapters_dir, c["version"], "base", replies, prompts=prompts)


def kept_row(run: argparse.Namespace, kept: dict, work: Path, cycles: int, replies: int, prompts: int | None,
             judge_refused: bool) -> dict:
    """The kept run's own cycles, as a row of the tables: what its trainer decided, and the adapter
    it served after `cycles` cycles judged against the base exactly as the replayed steps are."""
    rows = []
    served = "base"
    for c in kept["cycles"][:cycles]:
        rows.append({key: c.get(key) for key in ("cycle", "decision", "version", "reasons", "rows", "feedback_ids", "kl_parent", "kl_base",
                                                  "gate_pairs_hidden")} | {"seconds": (c.get("phases_s") or {}).get("trainer") or 0.0})
        served = c.get("promoted") or served
    out = {"policy_step": f"{run.policy_step} (kept run)", "served": served, "work_dir": str(work), "cycles": rows}
    if served != "base" and not (work / "adapters" / served / "manifest.json").is_file():
        raise SystemExit(f"error: the kept run served {served}, but {work / 'adapters' / served} is gone")
    judge_step(out, run, replies, prompts, judge_refused)
    return detach_pairs(out)


def detach_pairs(s: dict) -> dict:
    """Move the judged pairs of a step's judgements into its `pairs_detail`."""
    s["pairs_detail"] = {"vs_base": (s.get("vs_base") or {}).get("judged"),
                         **{f"refused_c{c['cycle']}": c["refused_vs_base"]["judged"] for c in s["cycles"] if c.get("refused_vs_base")}}
    s["vs_base"] = brief(s["vs_base"])
    for c in s["cycles"]:
        c["refused_vs_base"] = brief(c.get("refused_vs_base"))
    return s


def brief(ev: dict | None) -> dict | None:
    """A hidden judgement without its pairs (they stay in `pairs_detail`)."""
    return None if ev is None else {k: v for k, v in ev.items() if k != "judged"}


def tables(result: dict) -> list[str]:
    """Markdown: one row per step and cycle, then one row per step after the last cycle."""
    ci = lambda d: f"{d['win_rate']:.3f} [{d['win_rate_lo']:.3f}, {d['win_rate_hi']:.3f}] ({d['pairs']})" if d else "n/a"  # noqa: E731
    lines = ["| step | cycle | decision | feedback rows | gate pairs by the hidden preference, candidate vs parent | "
             "refused candidate vs base (hidden) | KL parent / base | trainer s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in result["steps"]:
        for c in s["cycles"]:
            why = f" ({'; '.join(c['reasons'])})" if c["reasons"] else ""
            lines.append(f"| {s['policy_step']} | {c['cycle']} | {c['decision']} {c['version'] or ''}{why} | {c['rows']} | "
                         f"{ci(c.get('gate_pairs_hidden'))} | {ci(c.get('refused_vs_base'))} | "
                         f"{loop.fmt(c['kl_parent'], '.2f')} / {loop.fmt(c['kl_base'], '.2f')} | {c['seconds']:.0f} |")
    lines += ["", "| step | served after the last cycle | hidden win rate vs base [95% CI] (pairs) | wins / ties / losses | "
              "words served / base | ended served / base | KL to base | trainer s, all cycles |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in result["steps"]:
        v, total = s.get("vs_base"), sum(c["seconds"] for c in s["cycles"])
        if v:
            lines.append(f"| {s['policy_step']} | {s['served']} | {ci(v)} | {v['wins']} / {v['ties']} / {v['losses']} | "
                         f"{v['candidate_words']:.1f} / {v['current_words']:.1f} | {v['candidate_ended']:.2f} / {v['current_ended']:.2f} | "
                         f"{v['kl_base']:.2f} | {total:.0f} |")
        else:
            lines.append(f"| {s['policy_step']} | base (nothing promoted) | 0.5 by definition | n/a | n/a | n/a | 0 | {total:.0f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    from trainer.config import POLICY_STEPS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, required=True, help="the results JSON of a `bench/loop.py --keep` run")
    ap.add_argument("--policy-step", action="append", required=True, choices=POLICY_STEPS, help="a step to replay (repeat for several)")
    ap.add_argument("--cycles", type=int, help="replay only the first N cycles (default: all of the kept run's)")
    ap.add_argument("--replies", type=int, default=64, help="replies a side in the final judgement against the base")
    ap.add_argument("--prompts", type=int, help="judge on only the first N held-out prompts (a smoke run; default: all)")
    ap.add_argument("--judge-refused", action="store_true", help="also judge every refused candidate against the base")
    ap.add_argument("--no-kept", action="store_true", help="do not judge the kept run's own served adapter")
    ap.add_argument("--keep", action="store_true", help="keep the replay's work directories (adapters, reward models, logs)")
    ap.add_argument("--out", type=Path, help="default: bench/results/replay-PREFERENCE-STEP[-STEP...].json")
    args = ap.parse_args(argv)

    kept, work = read_kept_run(args.results, "feedback.db")
    run = argparse.Namespace(**kept["args"])
    cycles = min(args.cycles or len(kept["cycles"]), len(kept["cycles"]))
    if cycles < 1:
        sys.exit(f"error: {args.results} records no cycles to replay")
    root = Path(tempfile.mkdtemp(prefix="bench-replay-"))
    result = {"command": "python bench/replay.py " + shlex.join(sys.argv[1:] if argv is None else argv), "machine": machine(),
              "results": str(args.results), "preference": run.preference, "kept_policy_step": run.policy_step, "cycles": cycles,
              "kept": [{"cycle": c["cycle"], "decision": c.get("decision"), "rows": c.get("rows"), "feedback_ids": c.get("feedback_ids"),
                        "vs_base": c.get("vs_base")} for c in kept["cycles"][:cycles]],
              "work_dir": str(root) if args.keep else None, "steps": []}
    out = args.out or RESULTS / f"replay-{run.preference}-{'-'.join(args.policy_step)}.json"
    print(f"bench/replay.py: the '{run.preference}' feedback of {args.results} ({cycles} cycles, kept step {run.policy_step}) "
          f"through {', '.join(args.policy_step)}; work dir {root}\n{machine()}", flush=True)
    try:
        if not args.no_kept:
            s = kept_row(run, kept, work, cycles, args.replies, args.prompts, args.judge_refused)
            result["steps"].append(s)
            write_results(out, result)
        for step in args.policy_step:
            s = replay_step(step, run, kept, work / "feedback.db", root, cycles)
            judge_step(s, run, args.replies, args.prompts, args.judge_refused)
            result["steps"].append(detach_pairs(s))
            write_results(out, result)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print("\n" + "\n".join(tables(result)))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
