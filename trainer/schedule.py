"""The retraining cycle, and the schedule that runs it.

One cycle (`run_cycle`), under a lock that lets only one run at a time across processes:

    0. tidy up after a killed cycle; decide a live candidate that has its votes (or withdraw it)
    1. snapshot the feedback (an id range per table; the prompts come from it too)
       and check there is enough signal to train on          -> else "waiting"
    2. fit two reward models on disjoint folds (steps.fit_reward_pair): the policy's
       reward and the judge; check their cross-fitted accuracy  -> else "waiting"
    3. the policy step (--policy-step: PPO, DPO, KTO, SFT, GRPO or RLOO; SFT first with
       --sft-first) from the served adapter, on fold A and training prompts only
                                                              -> data/adapters/vNNNNNN/ (candidate)
    4. evaluate candidate vs served adapter on held-out prompts and held-out pairs
       with evidence the policy step did not optimise against (gate.evaluate)
    5. promote (CURRENT -> candidate), reject (reasons in the manifest), or, with
       --live-compare, put it in front of users in Compare mode (LIVE) and decide on
       their votes in a later cycle
    6. prune: delete adapter and reward-model versions beyond the newest --keep, never
       CURRENT, LIVE, their ancestors or the reward models a kept adapter names

A candidate made by hand (`python -m trainer ppo`, `train`, `sft`) goes through the
same steps 1, 2, 4 and 5 with `evaluate_version` (`python -m trainer evaluate`), and
`promote_evaluated` (`python -m trainer promote`) promotes it only while the version
it was evaluated against still serves.

The chat server notices CURRENT change and hot-swaps (assistant.adapters.CurrentWatcher);
nothing here talks to it. `run_schedule` starts cycles every --every-min minutes when
--min-new-rows new feedback rows arrived, and/or daily at --at, and backs up the
feedback database every --backup-every-hours (assistant/backup.py).

    python -m trainer once        # one cycle now (cron: nightly retraining)
    python -m trainer run         # cycles on the schedule, until stopped

What it is not: the training steps (steps.py, reward.py, ppo.py), the decision rules
(gate.py), or the files the server reads (assistant/adapters.py, assistant/cycles.py).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import shutil
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from assistant import adapters, cycles
from assistant.config import ModelArgs
from assistant.cycles import Busy, CycleLock
from trainer import gate
from trainer.config import DataArgs, PolicyArgs, PPOArgs, RewardArgs, ScheduleArgs

log = logging.getLogger("trainer.schedule")

FEEDBACK_TABLES = ("votes", "vote_events", "comparisons", "corrections", "rankings")


# -- (0) tidy up after a killed cycle --------------------------------------------------

_TEMP_RE = re.compile(r"^\.[vr]\d{6}\.")


def tidy(adapters_dir: str | Path, reward_dir: str | Path, keep_live: bool = True) -> list[str]:
    """Remove what a killed cycle (or prune) left behind and make statuses agree with CURRENT. Returns what it did.

    Call under the cycle lock. A cycle's candidate nobody decided on (the cycle died
    between publishing and the gate) is rejected; a candidate made by hand (`python -m
    trainer ppo`, `train`, `sft`) waits for `evaluate`, and the LIVE candidate is left
    alone. With a garbled pointer the statuses are left as they are, and the line
    returned says why."""
    done = []
    for d in (Path(adapters_dir), Path(reward_dir)):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.is_dir() and _TEMP_RE.match(p.name):
                shutil.rmtree(p, ignore_errors=True)
                done.append(f"removed unfinished {p}")
    if not Path(adapters_dir).is_dir():
        return done
    with adapters.pointer_lock(adapters_dir):
        for v in adapters.versions(adapters_dir):
            for tmp in (Path(adapters_dir) / v).glob(".manifest.*"):
                tmp.unlink(missing_ok=True)
        try:
            current = adapters.read_current(adapters_dir)
            live = adapters.read_live(adapters_dir) if keep_live else None
        except adapters.InvalidAdapter as exc:
            done.append(f"statuses left as they are: {exc}")
            return done
        for m in adapters.manifests(adapters_dir):
            v, status = m["version"], m.get("status")
            if v == current and status != "active":
                adapters.update_manifest(adapters_dir, v, status="active", reason="CURRENT points here")
                done.append(f"{v}: status active (CURRENT points here)")
            elif v != current and status == "active":
                adapters.update_manifest(adapters_dir, v, status="retired", reason=f"CURRENT points at {current}")
                done.append(f"{v}: status retired")
            elif status == "candidate" and v != live and "judge_model" in m:  # a cycle's candidate: cycles record their judge
                adapters.update_manifest(adapters_dir, v, status="rejected", reason="the cycle that made it stopped before deciding",
                                         reasons=["the cycle that made it stopped before deciding"])
                done.append(f"{v}: undecided candidate rejected")
    return done


# -- (1) what changed since the last cycle ---------------------------------------------


def feedback_high_water(db_path: str | Path) -> dict[str, int]:
    """{table: highest id} of the feedback tables now (0 for an empty table or no database)."""
    if not Path(db_path).exists():
        return {t: 0 for t in FEEDBACK_TABLES}
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        return {t: int(con.execute(f"SELECT COALESCE(MAX(id), 0) FROM {t}").fetchone()[0]) for t in FEEDBACK_TABLES}  # noqa: S608
    finally:
        con.close()


def new_rows(db_path: str | Path, cycles_log: str | Path) -> int:
    """Feedback rows added since the snapshot of the last cycle that read one and did not fail.

    Vote changes count through vote_events, so a user flipping a thumb counts once."""
    now = feedback_high_water(db_path)
    seen = next((c["feedback_ids"] for c in reversed(cycles.read(cycles_log)) if c.get("feedback_ids") and c.get("decision") != "failed"), {})
    last = {t: (seen.get(t) or [1, 0])[1] for t in FEEDBACK_TABLES}
    return sum(max(0, now[t] - last[t]) for t in FEEDBACK_TABLES if t != "votes")


# -- prompts: training vs held out --------------------------------------------------------


def _held_out(prompt: list[dict], fraction: float) -> bool:
    key = json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode()
    return int.from_bytes(hashlib.sha256(b"eval-v1" + key).digest()[:8], "big") / 2**64 < fraction


def split_prompts(prompts: list[list[dict]], fraction: float) -> tuple[list[list[dict]], list[list[dict]]]:
    """Deterministic (training, held-out) split by prompt content: a prompt is always on the same side."""
    train, held = [], []
    for p in prompts:
        (held if _held_out(p, fraction) else train).append(p)
    return train, held


def cycle_prompts(snapshot, ppo_args: PPOArgs, sched: ScheduleArgs) -> tuple[list, list]:
    """(PPO prompts, evaluation prompts): the snapshot's prompts plus the default set, split.

    Training prompts are topped up with the default set's training half when the
    snapshot has fewer than a PPO batch; evaluation always has both held-out halves."""
    from trainer.data import default_prompts, snapshot_prompts

    train, held = split_prompts(snapshot_prompts(snapshot, ppo_args.max_prompts), sched.eval_fraction)
    d_train, d_held = split_prompts(default_prompts(), sched.eval_fraction)
    if len(train) < ppo_args.ppo_batch_size:
        train += d_train
    return _unique(train), _unique(held + d_held)


def _unique(prompts: list[list[dict]]) -> list[list[dict]]:
    seen, out = set(), []
    for p in prompts:
        key = json.dumps(p, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


# -- live comparison ---------------------------------------------------------------------


def live_votes(db_path: str | Path, candidate: str, current: str) -> dict:
    """Decisive A/B choices between replies of `candidate` and `current`, one per user
    and prompt (the latest counts; asking the same thing again does not vote twice):
    {votes, wins, win_rate, choices} where choices counts every decisive row."""
    if not Path(db_path).exists():
        return {"votes": 0, "wins": 0, "win_rate": None, "choices": 0}
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        rows = con.execute(
            """SELECT c.user_id, ra.context, c.choice, ra.adapter_version, rb.adapter_version FROM comparisons c
               JOIN replies ra ON ra.id = c.reply_a_id JOIN replies rb ON rb.id = c.reply_b_id
               WHERE c.choice IN ('a', 'b') ORDER BY c.id""").fetchall()
    finally:
        con.close()
    counted: dict[tuple, bool] = {}
    choices = 0
    for user, context, choice, va, vb in rows:
        if {va, vb} != {candidate, current}:
            continue
        choices += 1
        counted[(user, context)] = (va if choice == "a" else vb) == candidate
    votes, wins = len(counted), sum(counted.values())
    return {"votes": votes, "wins": wins, "win_rate": wins / votes if votes else None, "choices": choices}


def _hours_since(stamp: str | None) -> float:
    if not stamp:
        return 0.0
    then = dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    return (dt.datetime.now(dt.timezone.utc) - then).total_seconds() / 3600


def settle_live(adapters_dir, db_path, sched: ScheduleArgs) -> dict | None:
    """Decide the LIVE candidate by gate.live_decision; returns what happened, or None without one."""
    live = adapters.read_live(adapters_dir)
    if live is None:
        return None
    current = adapters.read_current(adapters_dir)
    tally = live_votes(db_path, live, current)
    hours = _hours_since(adapters.read_manifest(adapters_dir, live).get("live_since"))
    verdict, why = gate.live_decision(tally["wins"], tally["votes"] - tally["wins"], hours, sched)
    if verdict == "wait":
        return {"version": live, "decision": "awaiting votes", "reasons": [why], **tally}
    if verdict == "promote":
        adapters.promote(adapters_dir, live, reason=why, live=tally)
        return {"version": live, "decision": "promoted", "reasons": [why], **tally}
    adapters.reject(adapters_dir, live, [why], live=tally)
    return {"version": live, "decision": "withdrawn" if verdict == "withdraw" else "rejected", "reasons": [why], **tally}


# -- the cycle -------------------------------------------------------------------------------


@dataclass
class CycleResult:
    decision: str  # promoted | rejected | live | waiting | skipped | failed (`evaluate`: passed | rejected | waiting | skipped)
    version: str | None = None  # the candidate adapter
    parent: str | None = None  # the version it was evaluated against (a cycle: its parent, the served version)
    reward_version: str | None = None  # the reward model PPO trained against
    judge_version: str | None = None  # the reward model that judged the candidate (the policy step never saw it)
    policy_step: str | None = None  # ppo, dpo, kto, sft, grpo or rloo ("... after sft" with --sft-first)
    reasons: list[str] = field(default_factory=list)
    signal: dict = field(default_factory=dict)  # decisive pairs and cross-fitted reward-model accuracy
    evaluation: dict = field(default_factory=dict)
    feedback_ids: dict = field(default_factory=dict)
    rows: int = 0
    started_at: str = ""
    seconds: float = 0.0
    settled: dict | None = None  # a LIVE candidate decided at the start of this cycle
    pruned: list[str] = field(default_factory=list)  # versions deleted at the end of the cycle (--keep)

    def summary(self, what: str = "cycle") -> str:
        head = f"{what} {self.decision}"
        if self.version:
            head += f": {self.policy_step or 'ppo'} candidate {self.version} (parent {self.parent}, reward model {self.reward_version}, judge {self.judge_version})"
        if self.evaluation.get("win_rate") is not None:
            head += "; " + describe(self.evaluation)
        if self.reasons:
            head += "; " + "; ".join(self.reasons)
        return head + f" [{self.seconds:.0f}s]"


def describe(e: dict) -> str:
    """One line of a candidate's evaluation: the judge's win rate, margin, KL, degenerate replies, human agreement."""
    h = e.get("human_agreement") or {}
    line = (f"judge win rate {e['win_rate']:.2f} [{e['win_rate_lo']:.2f}, {e['win_rate_hi']:.2f}] over {e['replies']} replies, "
            f"margin {e['margin']:+.3f}, KL to parent {e['kl_parent']:.2f}, to base {e['kl_base']:.2f}, degenerate {e['degenerate']}")
    if isinstance(e.get("kl_optimised"), (int, float)):
        start = "its SFT result" if e.get("optimised_from") == "sft" else "the parent" if e.get("optimised_from") else "none: SFT alone"
        line += f", budgeted KL {e['kl_optimised']:.2f} (optimised from {start}), {e['kl_optimised_total']:.2f} over the lineage"
    if h.get("n"):
        line += f", human agreement {h['share']:.2f} [{h['lo']:.2f}, {h['hi']:.2f}] on {h['n']} pairs"
    return line


def _log_cycle(sched: ScheduleArgs, result: CycleResult) -> None:
    entry = asdict(result)
    entry["evaluation"] = {k: v for k, v in entry["evaluation"].items() if k != "samples"}
    cycles.append(sched.cycles_log, entry)


def _phase(lock, name: str) -> None:
    if lock is not None:
        lock.phase(name)


def step_label(step: str, manifest: dict) -> str:
    """The policy step as the cycle ran it: "ppo after sft" only when SFT ran before another step
    (not for `sft` itself, nor when --sft-first found too few demonstrations)."""
    ran_sft = "sft" in manifest or "sft" in (manifest.get("rows") or {})
    return f"{step} after sft" if step != "sft" and ran_sft else step


def gather(model_args: ModelArgs, data_args: DataArgs, reward_args: RewardArgs, sched: ScheduleArgs, result: CycleResult,
           lock=None, progress: bool = True):
    """Steps 1-2: snapshot the feedback, check the signal, fit the policy's reward model
    and the judge on disjoint folds, check them. Returns (snapshot, steps.CrossFit), or
    None when there is nothing to judge with yet (result.decision 'skipped' or
    'waiting', result.reasons say why). Fills result's feedback ids, rows, signal and
    reward-model versions."""
    from trainer import steps
    from trainer.data import build_examples, read_snapshot

    _phase(lock, "snapshot")
    if not Path(data_args.db).exists():
        result.decision, result.reasons = "skipped", [f"no feedback database at {data_args.db}"]
        return None
    snapshot = read_snapshot(data_args.db)
    result.feedback_ids, result.rows = snapshot.id_range(), snapshot.total_rows()
    examples = build_examples(snapshot, data_args.annotator_floor)
    result.signal = {"decisive_pairs": gate.decisive_pairs(examples), "min_decisive_pairs": sched.min_decisive_pairs,
                     "pointwise": len(examples.pointwise), "counts": examples.counts}
    fold_a, fold_b = steps.folds(examples)
    result.reasons = gate.signal_reasons(examples, sched) or gate.fold_reasons(fold_a, fold_b, reward_args.min_pairs)
    if result.reasons:
        result.decision = "waiting"
        return None
    _phase(lock, "reward")
    fit = steps.fit_reward_pair(model_args, reward_args, snapshot, examples, progress=progress, annotator_floor=data_args.annotator_floor)
    result.reward_version, result.judge_version = fit.policy_version, fit.judge_version
    result.signal.update(fit.signal)
    result.reasons = gate.fit_reasons(fit.signal, sched)
    if result.reasons:
        result.decision = "waiting"
        return None
    return snapshot, fit


def judge_candidate(model_args: ModelArgs, reward_args: RewardArgs, ppo_args: PPOArgs, sched: ScheduleArgs, version: str, against: str,
                    eval_prompts: list, fit, progress: bool = False) -> tuple[dict, list[str]]:
    """Step 4: `version` against `against` (the served version) on held-out prompts,
    judged by fit.judge_rm, with held-out human agreement on the judge's fold (fit.fold_b);
    then the gate. Returns (evaluation, reasons to refuse; empty: it passes)."""
    from assistant.model import lora_config

    adir = ppo_args.adapters_dir
    try:
        adapters.validate(Path(adir) / version, lora_config(model_args))
        finite_error = None
    except adapters.InvalidAdapter as exc:
        finite_error = str(exc)
    evaluation = {}
    if not finite_error:
        def judge_fn(prompts, texts):
            return fit.judge_rm.score(prompts, texts, batch_size=reward_args.reward_eval_batch_size)

        evaluation = gate.evaluate(model_args, adir, version, against, eval_prompts, judge_fn, sched, ppo_args, val_pairs=fit.fold_b.pairs,
                                   progress=progress)
        adapters.write_evaluation(adir, version, evaluation.pop("judged", []))
        evaluation["judged_file"] = adapters.EVALUATION_FILE
    return evaluation, gate.gate(evaluation, finite_error, sched)


def _verdict(reasons: list[str], against: str, judge_version: str | None) -> dict:
    """What the gate said, as recorded in the candidate's manifest (`promote` checks it)."""
    return {"passed": not reasons, "against": against, "judge_model": judge_version, "reasons": list(reasons), "at": cycles.now()}


def promote_evaluated(adapters_dir, version: str, evaluation: dict, against: str, **fields) -> str:
    """Promote a candidate that passed the gate against `against`, which must still be
    what CURRENT names (else InvalidAdapter, nothing changes). Returns the old version."""
    e = evaluation
    return adapters.promote(adapters_dir, version, reason=f"judge win rate {e['win_rate']:.2f} [{e['win_rate_lo']:.2f}, {e['win_rate_hi']:.2f}] "
                                                          f"over {e['replies']} held-out replies", expect_current=against, evaluation=e, **fields)


def decide(adapters_dir, version: str, evaluation: dict, reasons: list[str], against: str, judge_version: str | None,
           sched: ScheduleArgs, promote: bool = True) -> str:
    """Step 5: record the gate's verdict in the manifest and act on it. Returns the decision:
    'rejected' (reasons given), else 'live' (--live-compare) or 'promoted'; with
    promote=False (`python -m trainer evaluate`) a passing candidate stays a candidate: 'passed'."""
    verdict = _verdict(reasons, against, judge_version)
    if reasons:
        adapters.reject(adapters_dir, version, reasons, evaluation=evaluation, gate=verdict)
        return "rejected"
    if not promote:
        adapters.update_manifest(adapters_dir, version, evaluation=evaluation, gate=verdict, reasons=[])
        return "passed"
    if sched.live_compare:
        adapters.update_manifest(adapters_dir, version, evaluation=evaluation, gate=verdict, awaiting="live votes", live_since=cycles.now())
        with adapters.pointer_lock(adapters_dir):
            adapters.set_live(adapters_dir, version)
        return "live"
    promote_evaluated(adapters_dir, version, evaluation, against, gate=verdict)
    return "promoted"


def prune(adapters_dir, reward_dir, keep: int, dry_run: bool = False) -> dict[str, list[str]]:
    """Delete adapter versions beyond the newest `keep` (never CURRENT, LIVE or their
    ancestors: adapters.prune), then reward-model versions beyond the newest `keep`
    except those a remaining adapter's manifest names (reward_model, judge_model, the
    judge of its evaluation). Returns {"adapters": [...], "reward": [...]} deleted (or,
    with dry_run, to delete). Call under the cycle lock. InvalidAdapter when what is in
    use cannot be known (a garbled pointer): nothing is deleted."""
    removed = adapters.prune(adapters_dir, keep, dry_run=dry_run)
    kept = [m for m in adapters.manifests(adapters_dir) if m["version"] not in removed]
    broken = [m["version"] for m in kept if m.get("status") == "broken"]
    if broken:
        log.warning("reward models not pruned: the manifest of %s is unreadable, so which reward models it names is unknown", ", ".join(broken))
        return {"adapters": removed, "reward": []}
    named = {m.get(k) for m in kept for k in ("reward_model", "judge_model")} | {(m.get("gate") or {}).get("judge_model") for m in kept}
    doomed = [r for r in cycles.reward_versions(reward_dir)[:-keep] if r not in named]
    if not dry_run:
        for r in doomed:
            adapters.remove_dir(Path(reward_dir) / r)
    return {"adapters": removed, "reward": doomed}


def _prune_after(adir, reward_dir, sched: ScheduleArgs, result: CycleResult) -> None:
    """The end of a cycle: prune (--keep). Never changes the cycle's result: a garbled
    pointer skips pruning with a logged reason, any other failure is logged."""
    if not sched.keep:
        return
    try:
        done = prune(adir, reward_dir, sched.keep)
    except adapters.InvalidAdapter as exc:
        log.warning("pruning skipped: %s", exc)
        return
    except Exception:  # the cycle's result stands; old versions wait for the next cycle
        log.exception("pruning failed; nothing else changes")
        return
    result.pruned = done["adapters"] + done["reward"]
    if result.pruned:
        log.info("pruned %s (--keep %d)", ", ".join(result.pruned), sched.keep)


def run_cycle(model_args: ModelArgs, data_args: DataArgs, reward_args: RewardArgs, ppo_args: PPOArgs, sched: ScheduleArgs,
              progress: bool = True, policy_args: PolicyArgs | None = None) -> CycleResult:
    """One cycle (steps 0–5 above), then pruning (--keep). Raises Busy when another cycle holds the lock.

    A failure inside the cycle is logged and returned as decision 'failed'; what was
    already serving keeps serving."""
    from trainer import shared, steps
    from trainer.ppo import NonFiniteError

    policy_args = policy_args or PolicyArgs()
    adir = ppo_args.adapters_dir
    with CycleLock(sched.lock_file) as lock, shared.sharing(model_args):  # one base for every model of the cycle
        started, t0 = cycles.now(), time.perf_counter()
        result = CycleResult(decision="failed", started_at=started)
        try:
            # (0) tidy up after a killed cycle; decide a LIVE candidate that has its votes
            for line in tidy(adir, reward_args.reward_dir):
                log.warning("tidy: %s", line)
            try:
                adapters.read_current(adir)
            except adapters.InvalidAdapter as exc:  # what to train from is unknown until it is repaired
                result.decision, result.reasons = "skipped", [f"{exc}; `python -m trainer rollback VERSION` repairs it"]
                return result
            result.settled = settle_live(adir, data_args.db, sched)
            if result.settled and result.settled["decision"] == "awaiting votes":
                result.decision, result.version = "skipped", result.settled["version"]
                result.reasons = list(result.settled["reasons"])
                return result
            # (1) snapshot; enough signal?  (2) the policy's reward model and the judge, on disjoint folds
            got = gather(model_args, data_args, reward_args, sched, result, lock, progress)
            if got is None:
                return result
            snapshot, fit = got

            def score_fn(prompts, texts):
                return fit.policy_rm.score(prompts, texts, batch_size=reward_args.reward_eval_batch_size)

            # (3) the policy step from the served adapter, on fold A and the training prompts only
            lock.phase(policy_args.policy_step)
            result.policy_step = policy_args.policy_step  # made precise once the step reports what it ran
            train_prompts, eval_prompts = cycle_prompts(snapshot, ppo_args, sched)
            version, manifest = steps.run_policy(model_args, data_args, reward_args, ppo_args, policy_args, progress=progress,
                                                 reward_fn=score_fn, reward_version=fit.policy_version, prompts=train_prompts,
                                                 snapshot=snapshot, examples=fit.fold_a,
                                                 extra={"judge_model": fit.judge_version, "eval_prompts": len(eval_prompts)})
            result.version, result.parent = version, manifest["parent"]
            result.policy_step = step_label(policy_args.policy_step, manifest)
            # (4) evaluate on evidence PPO did not optimise against
            lock.phase("evaluate")
            result.evaluation, result.reasons = judge_candidate(model_args, reward_args, ppo_args, sched, version, result.parent, eval_prompts, fit,
                                                                progress)
            # (5) decide
            lock.phase("decide")
            result.decision = decide(adir, version, result.evaluation, result.reasons, result.parent, fit.judge_version, sched)
            return result
        except NonFiniteError as exc:
            result.reasons = [f"PPO aborted on a non-finite value: {exc}"]
            log.error("cycle failed, nothing published: %s", exc)
            return result
        except Exception as exc:  # the trainer loop logs, keeps the last good adapter, and tries again later
            result.reasons = [f"{type(exc).__name__}: {exc}"]
            log.exception("cycle failed; the served adapter is unchanged")
            if result.version and adapters.read_manifest(adir, result.version).get("status") == "candidate":
                adapters.reject(adir, result.version, result.reasons)
            return result
        finally:
            lock.phase("prune")
            _prune_after(adir, reward_args.reward_dir, sched, result)
            result.seconds = time.perf_counter() - t0
            _log_cycle(sched, result)
            log.info(result.summary())


# -- a candidate made by hand ----------------------------------------------------------------


def check_candidate(adapters_dir, version: str) -> dict:
    """The manifest of `version` if it is a candidate the gate can judge now; else InvalidAdapter saying why."""
    d = Path(adapters_dir)
    adapters.check_version(version, allow_base=False)
    if not (d / version).is_dir():
        raise adapters.InvalidAdapter(f"no adapter {version} under {d} (have: {', '.join(adapters.versions(d)) or 'none'})")
    try:
        manifest = adapters.read_manifest(d, version)
    except (OSError, json.JSONDecodeError) as exc:
        raise adapters.InvalidAdapter(f"{version}: manifest unreadable ({exc})") from exc
    status = manifest.get("status")
    if status == "active" and adapters.read_current(d) == version:
        raise adapters.InvalidAdapter(f"{version} is already serving")
    if status != "candidate":
        why = f" ({'; '.join(manifest['reasons'])})" if status == "rejected" and manifest.get("reasons") else ""
        raise adapters.InvalidAdapter(f"{version} is {status}{why}; only a candidate (written by `python -m trainer ppo`, `train` or `sft`) "
                                      "can be evaluated and promoted")
    if adapters.read_live(d) == version:
        raise adapters.InvalidAdapter(f"{version} is in live comparison (LIVE); the users' votes decide it at the start of a cycle")
    return manifest


def evaluate_version(model_args: ModelArgs, data_args: DataArgs, reward_args: RewardArgs, ppo_args: PPOArgs, sched: ScheduleArgs,
                     version: str, progress: bool = True) -> CycleResult:
    """`python -m trainer evaluate VERSION`: the gate of a cycle (steps 1, 2, 4 and 5
    without promoting) for a candidate made by hand, against the version serving now.

    Under the cycle lock (Busy when a cycle runs): snapshot, signal checks, the two
    reward models fitted on the cycle's folds, the judge's evaluation on held-out
    prompts and on its fold, the gate. The verdict goes into the manifest (`gate`:
    passed, against, judge_model, reasons; `evaluation`); a refused candidate is
    rejected like a cycle's, a passing one stays a candidate for `promote`. Returns a
    CycleResult whose decision is passed | rejected | waiting | skipped.
    InvalidAdapter when VERSION is not a candidate or CURRENT is unreadable."""
    from trainer import shared

    adir = ppo_args.adapters_dir
    with CycleLock(sched.lock_file) as lock, shared.sharing(model_args):
        t0 = time.perf_counter()
        manifest = check_candidate(adir, version)
        against = adapters.read_current(adir)
        result = CycleResult(decision="failed", version=version, parent=against, started_at=cycles.now(),
                             policy_step=manifest.get("policy_step") or manifest.get("kind"))
        got = gather(model_args, data_args, reward_args, sched, result, lock, progress)
        if got is None:
            adapters.update_manifest(adir, version, gate=_verdict(result.reasons, against, result.judge_version))
        else:
            snapshot, fit = got
            _, eval_prompts = cycle_prompts(snapshot, ppo_args, sched)
            lock.phase("evaluate")
            result.evaluation, result.reasons = judge_candidate(model_args, reward_args, ppo_args, sched, version, against, eval_prompts, fit,
                                                                progress)
            lock.phase("decide")
            result.decision = decide(adir, version, result.evaluation, result.reasons, against, fit.judge_version, sched, promote=False)
        result.seconds = time.perf_counter() - t0
        return result


# -- the schedule -------------------------------------------------------------------------------


def _next_daily(at: str, now: dt.datetime) -> dt.datetime:
    hh, mm = (int(x) for x in at.split(":"))
    t = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
    return t if t > now else t + dt.timedelta(days=1)


def due(sched: ScheduleArgs, rows: int, now: dt.datetime, last_check: dt.datetime | None, next_daily: dt.datetime | None) -> str | None:
    """Why a cycle should start now, or None."""
    if next_daily is not None and now >= next_daily and rows >= 1:
        return f"daily run at {sched.at} ({rows} new feedback rows)"
    if sched.every_min > 0 and rows >= sched.min_new_rows and (last_check is None or now - last_check >= dt.timedelta(minutes=sched.every_min)):
        return f"{rows} new feedback rows (>= {sched.min_new_rows})"
    return None


def backup_feedback(db_path, sched: ScheduleArgs) -> Path | None:
    """One backup of the feedback database into --backup-dir (default: backups/ beside it), keeping --backup-keep;
    returns it, or None (logged) when there is no database yet or the backup failed.
    Safe while the app writes (assistant/backup.py); a failure never stops the schedule."""
    from assistant import backup

    if not Path(db_path).exists():
        log.info("backup: no feedback database at %s yet", db_path)
        return None
    try:
        path, removed = backup.backup(db_path, sched.backup_dir, sched.backup_keep)
    except (backup.BackupError, OSError) as exc:
        log.error("backup failed, next try in %s h: %s", sched.backup_every_hours, exc)
        return None
    log.info("backup: %s (integrity ok)%s", path, f"; deleted {len(removed)} older" if removed else "")
    return path


def run_schedule(model_args, data_args, reward_args, ppo_args, sched: ScheduleArgs, stop=None, progress: bool = False,
                 clock=dt.datetime.now, sleep=time.sleep, policy_args: PolicyArgs | None = None) -> None:
    """Run cycles on the schedule until `stop()` returns True (or forever)."""
    log.info("schedule: every %s min when >= %d new feedback rows%s%s", sched.every_min or "-", sched.min_new_rows,
             f", and daily at {sched.at}" if sched.at else "",
             f"; a backup of the feedback database every {sched.backup_every_hours} h" if sched.backup_every_hours > 0 else "")
    last_check = None
    next_daily = _next_daily(sched.at, clock()) if sched.at else None
    next_backup = clock() if sched.backup_every_hours > 0 else None
    tick = 5.0 if sched.every_min == 0 else min(30.0, sched.every_min * 60 / 4)
    while not (stop and stop()):
        now = clock()
        if next_backup is not None and now >= next_backup:
            next_backup = now + dt.timedelta(hours=sched.backup_every_hours)
            backup_feedback(data_args.db, sched)
        try:
            rows = new_rows(data_args.db, sched.cycles_log)
            live = adapters.read_live(ppo_args.adapters_dir)
        except (sqlite3.Error, OSError, adapters.InvalidAdapter) as exc:
            log.error("schedule: cannot read the feedback store or pointers (%s); retrying", exc)
            rows, live = 0, None
        reason = due(sched, rows, now, last_check, next_daily)
        if reason is None and live is not None:
            tally = live_votes(data_args.db, live, adapters.read_current(ppo_args.adapters_dir))
            hours = _hours_since(adapters.read_manifest(ppo_args.adapters_dir, live).get("live_since"))
            verdict, why = gate.live_decision(tally["wins"], tally["votes"] - tally["wins"], hours, sched)
            if verdict != "wait":
                reason = f"{live}: {why}"
        if reason is not None:
            log.info("schedule: starting a cycle: %s", reason)
            try:
                run_cycle(model_args, data_args, reward_args, ppo_args, sched, progress=progress, policy_args=policy_args)
            except Busy as exc:
                log.info("schedule: %s", exc)
            last_check = clock()
            if next_daily is not None and now >= next_daily:
                next_daily = _next_daily(sched.at, clock())
        sleep(tick)
