"""The retraining cycle, and the schedule that runs it.

One cycle (`run_cycle`), under a lock that lets only one run at a time across processes:

    0. tidy up after a killed cycle: temporary directories, statuses that disagree with CURRENT
    1. snapshot the feedback (an id range per table)
    2. refit the reward model on it                      -> data/reward/rNNNNNN/
    3. PPO from the served adapter on the training prompts -> data/adapters/vNNNNNN/ (candidate)
    4. evaluate candidate and served adapter on held-out prompts: reward-model score,
       KL to the base, degenerate replies, finite weights
    5. promote (CURRENT -> candidate), reject (reasons in the manifest), or, with
       --live-compare, put it in front of users in Compare mode (LIVE) and decide on
       their votes in a later cycle

The chat server notices CURRENT change and hot-swaps (assistant.adapters.CurrentWatcher);
nothing here talks to it. `run_schedule` starts cycles every --every-min minutes when
--min-new-rows new feedback rows arrived, and/or daily at --at.

    python -m trainer once        # one cycle now (cron: nightly retraining)
    python -m trainer run         # cycles on the schedule, until stopped

What it is not: the training math (reward.py, ppo.py) or the adapter format (assistant/adapters.py).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from assistant import adapters
from assistant.config import BASE_VERSION, ModelArgs
from trainer.config import DataArgs, PPOArgs, RewardArgs, ScheduleArgs

log = logging.getLogger("trainer.schedule")

FEEDBACK_TABLES = ("votes", "vote_events", "comparisons", "corrections", "rankings")


class Busy(RuntimeError):
    """Another cycle holds the lock."""


# -- the cross-process lock ------------------------------------------------------


class CycleLock:
    """An exclusive, non-blocking flock on `path`; the holder writes who it is and what it does.

    The kernel drops a flock when its process dies, SIGKILL included, so a killed
    cycle never leaves the lock held."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f = None
        self._info: dict = {}

    def __enter__(self) -> "CycleLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            who = holder(self.path) or {}
            raise Busy(f"another cycle is running (pid {who.get('pid', '?')}, started {who.get('started_at', '?')}, "
                       f"phase {who.get('phase', '?')}); not starting a second one") from None
        self._f = f
        self._info = {"pid": os.getpid(), "started_at": _now(), "phase": "starting"}
        self._write()
        return self

    def phase(self, name: str) -> None:
        self._info["phase"] = name
        self._write()

    def _write(self) -> None:
        self._f.seek(0)
        self._f.truncate()
        self._f.write(json.dumps(self._info))
        self._f.flush()

    def __exit__(self, *exc) -> None:
        self._f.seek(0)
        self._f.truncate()
        fcntl.flock(self._f, fcntl.LOCK_UN)
        self._f.close()
        self._f = None


def holder(path: str | Path) -> dict | None:
    """{pid, started_at, phase} of the running cycle, or None when no cycle runs."""
    path = Path(path)
    if not path.exists():
        return None
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                return json.loads(f.read() or "{}")
            except json.JSONDecodeError:
                return {}
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# -- (0) tidy up after a killed cycle --------------------------------------------------

_TEMP_RE = re.compile(r"^\.[vr]\d{6}\.")


def tidy(adapters_dir: str | Path, reward_dir: str | Path, keep_live: bool = True) -> list[str]:
    """Remove what a killed cycle left behind and make statuses agree with CURRENT. Returns what it did.

    Call under the cycle lock. A candidate nobody decided on (the cycle died between
    publishing and the gate) is rejected; the LIVE candidate is left alone."""
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
        current = adapters.read_current(adapters_dir)
        live = adapters.read_live(adapters_dir) if keep_live else None
        for m in adapters.manifests(adapters_dir):
            v, status = m["version"], m.get("status")
            for tmp in (Path(adapters_dir) / v).glob(".manifest.*"):
                tmp.unlink(missing_ok=True)
            if v == current and status != "active":
                adapters.update_manifest(adapters_dir, v, status="active", reason="CURRENT points here")
                done.append(f"{v}: status active (CURRENT points here)")
            elif v != current and status == "active":
                adapters.update_manifest(adapters_dir, v, status="retired", reason=f"CURRENT points at {current}")
                done.append(f"{v}: status retired")
            elif status == "candidate" and v != live:
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


def cycles(cycles_log: str | Path) -> list[dict]:
    """Finished cycles, oldest first."""
    path = Path(cycles_log)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def new_rows(db_path: str | Path, cycles_log: str | Path) -> int:
    """Feedback rows added since the snapshot of the last cycle that read one and did not fail.

    Vote changes count through vote_events, so a user flipping a thumb counts once."""
    now = feedback_high_water(db_path)
    seen = next((c["feedback_ids"] for c in reversed(cycles(cycles_log)) if c.get("feedback_ids") and c.get("decision") != "failed"), {})
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


def cycle_prompts(db_path, ppo_args: PPOArgs, sched: ScheduleArgs) -> tuple[list, list]:
    """(PPO prompts, evaluation prompts): the store's recent contexts plus the default set, split."""
    from trainer.data import default_prompts, recent_prompts

    from_store = recent_prompts(db_path, ppo_args.max_prompts)
    train, held = split_prompts(from_store, sched.eval_fraction)
    d_train, d_held = split_prompts(default_prompts(), sched.eval_fraction)
    if len(train) < ppo_args.ppo_batch_size:
        train += d_train
    return _unique(train), _unique(held + d_held)[: sched.eval_prompts]


def _unique(prompts: list[list[dict]]) -> list[list[dict]]:
    seen, out = set(), []
    for p in prompts:
        key = json.dumps(p, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


# -- (4) evaluation ------------------------------------------------------------------------


def evaluate(model_args: ModelArgs, adapters_dir, candidate: str, current: str, prompts: list[list[dict]], score_fn,
             sched: ScheduleArgs, ppo_args: PPOArgs) -> dict:
    """Candidate vs current adapter on held-out prompts: sampled replies (same seed for both),
    scored with `score_fn`; the missing-EOS penalty applies as in training. Also the
    candidate's KL to the base (k1, nats per reply, on its own samples) and degenerate replies."""
    import torch
    from peft import PeftModel

    from assistant.model import load_base
    from trainer import ppo

    d = Path(adapters_dir)
    tok, base = load_base(model_args)
    model = PeftModel.from_pretrained(base, str(d / candidate), adapter_name="candidate")
    if current != BASE_VERSION:
        model.load_adapter(str(d / current), adapter_name="current")
    model.eval()
    prompts, queries = ppo.encode_prompts(tok, prompts, ppo_args.prompt_max_tokens)
    if not prompts:
        raise ValueError("no held-out prompts to evaluate on")
    cfg = ppo.PPOConfig(max_new_tokens=sched.eval_max_new_tokens, temperature=ppo_args.temperature,
                        missing_eos_penalty=ppo_args.missing_eos_penalty)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tok.eos_token_id is not None:
        eos_ids.add(tok.eos_token_id)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else min(eos_ids)

    def side(name: str):
        torch.manual_seed(sched.eval_seed)
        if name == BASE_VERSION:
            with model.disable_adapter(), torch.no_grad():
                ro = ppo.rollout(model, tok, queries, cfg, eos_ids, pad_id)
        else:
            model.set_adapter(name)
            with torch.no_grad():
                ro = ppo.rollout(model, tok, queries, cfg, eos_ids, pad_id)
        raw = score_fn(prompts, ro.texts).float()
        scored = torch.where(ro.ended, raw, torch.full_like(raw, cfg.missing_eos_penalty)) if cfg.missing_eos_penalty is not None else raw
        return ro, raw, scored

    with torch.no_grad():
        cand, cand_raw, cand_scores = side("candidate")
        cur, cur_raw, cur_scores = side("current" if current != BASE_VERSION else BASE_VERSION)
        model.set_adapter("candidate")
        device = next(model.parameters()).device
        responses, mask = cand.responses.to(device), cand.mask.to(device)
        logp, _, _ = ppo.forward_logprobs(model, None, cand.queries, responses, mask, pad_id, cfg.temperature, False)
        with model.disable_adapter():
            ref, _, _ = ppo.forward_logprobs(model, None, cand.queries, responses, mask, pad_id, cfg.temperature, False)
        kl = float((ppo.kl_k1(logp, ref) * mask.float()).sum(1).mean())
    wins = float((cand_scores > cur_scores).float().mean())
    return {
        "prompts": len(prompts),
        "candidate_score": float(cand_scores.mean()),
        "current_score": float(cur_scores.mean()),
        "margin": float(cand_scores.mean() - cur_scores.mean()),
        "candidate_raw_score": float(cand_raw.mean()),
        "current_raw_score": float(cur_raw.mean()),
        "win_rate": wins,
        "kl": kl,
        "degenerate": ppo.degenerate(cand.texts, cand.responses, cand.mask),
        "current_degenerate": ppo.degenerate(cur.texts, cur.responses, cur.mask),
        "candidate_ended": float(cand.ended.float().mean()),
        "current_ended": float(cur.ended.float().mean()),
        "candidate_length": float(cand.mask.sum(1).float().mean()),
        "current_length": float(cur.mask.sum(1).float().mean()),
        "samples": [{"prompt": p[-1]["content"][:200], "candidate": a, "current": b}
                    for p, a, b in list(zip(prompts, cand.texts, cur.texts))[:3]],
    }


def gate(evaluation: dict, finite_error: str | None, sched: ScheduleArgs) -> list[str]:
    """Reasons to reject (empty: promote)."""
    reasons = []
    if finite_error:
        reasons.append(f"invalid weights: {finite_error}")
    if evaluation.get("margin") is not None and evaluation["margin"] < sched.margin:
        reasons.append(f"reward margin {evaluation['margin']:+.3f} below the required {sched.margin:+.3f} "
                       f"(candidate {evaluation['candidate_score']:.3f} vs current {evaluation['current_score']:.3f})")
    if evaluation.get("kl") is not None and evaluation["kl"] > sched.kl_budget:
        reasons.append(f"KL to the base {evaluation['kl']:.2f} over the budget {sched.kl_budget:.2f}")
    if evaluation.get("degenerate", 0) > sched.max_degenerate:
        reasons.append(f"{evaluation['degenerate']} degenerate replies out of {evaluation['prompts']} (at most {sched.max_degenerate})")
    return reasons


# -- live comparison ---------------------------------------------------------------------


def live_votes(db_path: str | Path, candidate: str, current: str) -> dict:
    """Decisive A/B choices between replies of `candidate` and `current`: {votes, wins, win_rate}."""
    if not Path(db_path).exists():
        return {"votes": 0, "wins": 0, "win_rate": None}
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        rows = con.execute(
            """SELECT c.choice, ra.adapter_version, rb.adapter_version FROM comparisons c
               JOIN replies ra ON ra.id = c.reply_a_id JOIN replies rb ON rb.id = c.reply_b_id
               WHERE c.choice IN ('a', 'b')""").fetchall()
    finally:
        con.close()
    votes = wins = 0
    for choice, va, vb in rows:
        if {va, vb} != {candidate, current}:
            continue
        votes += 1
        wins += (va if choice == "a" else vb) == candidate
    return {"votes": votes, "wins": wins, "win_rate": wins / votes if votes else None}


def settle_live(adapters_dir, db_path, sched: ScheduleArgs) -> dict | None:
    """Decide the LIVE candidate when it has enough votes; returns what happened, or None."""
    live = adapters.read_live(adapters_dir)
    if live is None:
        return None
    current = adapters.read_current(adapters_dir)
    tally = live_votes(db_path, live, current)
    if tally["votes"] < sched.live_min_votes:
        return {"version": live, "decision": "awaiting votes", **tally}
    if tally["win_rate"] >= sched.live_win_rate:
        adapters.promote(adapters_dir, live, reason=f"won {tally['win_rate']:.0%} of {tally['votes']} live votes", live=tally)
        return {"version": live, "decision": "promoted", **tally}
    why = f"won {tally['win_rate']:.0%} of {tally['votes']} live votes, below {sched.live_win_rate:.0%}"
    adapters.reject(adapters_dir, live, [why], live=tally)
    return {"version": live, "decision": "rejected", "reasons": [why], **tally}


# -- the cycle -------------------------------------------------------------------------------


@dataclass
class CycleResult:
    decision: str  # promoted | rejected | live | skipped | failed
    version: str | None = None  # the candidate adapter
    parent: str | None = None
    reward_version: str | None = None
    reasons: list[str] = field(default_factory=list)
    evaluation: dict = field(default_factory=dict)
    feedback_ids: dict = field(default_factory=dict)
    rows: int = 0
    started_at: str = ""
    seconds: float = 0.0
    settled: dict | None = None  # a LIVE candidate decided at the start of this cycle

    def summary(self) -> str:
        head = f"cycle {self.decision}"
        if self.version:
            head += f": candidate {self.version} (parent {self.parent}, reward model {self.reward_version})"
        if self.evaluation.get("margin") is not None:
            e = self.evaluation
            head += f"; held-out reward {e['candidate_score']:.3f} vs {e['current_score']:.3f} (margin {e['margin']:+.3f}), KL {e['kl']:.2f}, degenerate {e['degenerate']}"
        if self.reasons:
            head += "; " + "; ".join(self.reasons)
        return head + f" [{self.seconds:.0f}s]"


def _log_cycle(sched: ScheduleArgs, result: CycleResult) -> None:
    path = Path(sched.cycles_log)
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = asdict(result)
    entry["evaluation"] = {k: v for k, v in entry["evaluation"].items() if k != "samples"}
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_cycle(model_args: ModelArgs, data_args: DataArgs, reward_args: RewardArgs, ppo_args: PPOArgs, sched: ScheduleArgs,
              progress: bool = True) -> CycleResult:
    """One cycle (steps 0–5 above). Raises Busy when another cycle holds the lock.

    A failure inside the cycle is logged and returned as decision 'failed'; what was
    already serving keeps serving."""
    from trainer.__main__ import fit_reward, run_ppo
    from trainer.data import build_examples, read_snapshot
    from trainer.ppo import NonFiniteError

    adir = ppo_args.adapters_dir
    with CycleLock(sched.lock_file) as lock:
        started, t0 = _now(), time.perf_counter()
        result = CycleResult(decision="failed", started_at=started)
        try:
            # (0) tidy up after a killed cycle; decide a LIVE candidate that has its votes
            for line in tidy(adir, reward_args.reward_dir):
                log.warning("tidy: %s", line)
            result.settled = settle_live(adir, data_args.db, sched)
            if result.settled and result.settled["decision"] == "awaiting votes":
                result.decision, result.version = "skipped", result.settled["version"]
                result.reasons = [f"{result.version} is in live comparison with {result.settled['votes']} of {sched.live_min_votes} votes"]
                return result
            # (1) snapshot
            lock.phase("snapshot")
            if not Path(data_args.db).exists():
                result.decision, result.reasons = "skipped", [f"no feedback database at {data_args.db}"]
                return result
            snapshot = read_snapshot(data_args.db)
            result.feedback_ids, result.rows = snapshot.id_range(), snapshot.total_rows()
            examples = build_examples(snapshot)
            usable = len(examples.pairs) + len(examples.pointwise)
            if usable < reward_args.min_pairs:
                result.decision = "skipped"
                result.reasons = [f"{usable} training examples from {result.rows} feedback rows; the reward model needs --min-pairs {reward_args.min_pairs}"]
                return result
            # (2) reward model
            lock.phase("reward")
            rv, rmanifest, rm = fit_reward(model_args, data_args, reward_args, progress=progress, snapshot=snapshot)
            result.reward_version = rv
            log.info("reward model %s: val accuracy %s", rv, rmanifest["metrics"].get("val_accuracy"))

            def score_fn(prompts, texts):
                return rm.score(prompts, texts, batch_size=reward_args.reward_eval_batch_size)

            # (3) PPO from the served adapter, on the training prompts only
            lock.phase("ppo")
            train_prompts, eval_prompts = cycle_prompts(data_args.db, ppo_args, sched)
            version, manifest = run_ppo(model_args, data_args, reward_args, ppo_args, progress=progress, reward_fn=score_fn,
                                        reward_version=rv, prompts=train_prompts,
                                        extra={"feedback_ids": result.feedback_ids, "eval_prompts": len(eval_prompts)})
            result.version, result.parent = version, manifest["parent"]
            # (4) evaluate
            lock.phase("evaluate")
            from assistant.model import lora_config
            try:
                adapters.validate(Path(adir) / version, lora_config(model_args))
                finite_error = None
            except adapters.InvalidAdapter as exc:
                finite_error = str(exc)
            result.evaluation = {} if finite_error else evaluate(model_args, adir, version, result.parent, eval_prompts, score_fn, sched, ppo_args)
            # (5) decide
            lock.phase("decide")
            result.reasons = gate(result.evaluation, finite_error, sched)
            if result.reasons:
                adapters.reject(adir, version, result.reasons, evaluation=result.evaluation)
                result.decision = "rejected"
            elif sched.live_compare:
                adapters.update_manifest(adir, version, evaluation=result.evaluation, awaiting="live votes")
                with adapters.pointer_lock(adir):
                    adapters.set_live(adir, version)
                result.decision = "live"
            else:
                adapters.promote(adir, version, reason=f"held-out reward margin {result.evaluation['margin']:+.3f}", evaluation=result.evaluation)
                result.decision = "promoted"
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
            result.seconds = time.perf_counter() - t0
            _log_cycle(sched, result)
            log.info(result.summary())


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


def run_schedule(model_args, data_args, reward_args, ppo_args, sched: ScheduleArgs, stop=None, progress: bool = False,
                 clock=dt.datetime.now, sleep=time.sleep) -> None:
    """Run cycles on the schedule until `stop()` returns True (or forever)."""
    log.info("schedule: every %s min when >= %d new feedback rows%s", sched.every_min or "-", sched.min_new_rows,
             f", and daily at {sched.at}" if sched.at else "")
    last_check = None
    next_daily = _next_daily(sched.at, clock()) if sched.at else None
    tick = 5.0 if sched.every_min == 0 else min(30.0, sched.every_min * 60 / 4)
    while not (stop and stop()):
        now = clock()
        try:
            rows = new_rows(data_args.db, sched.cycles_log)
            live = adapters.read_live(ppo_args.adapters_dir)
        except (sqlite3.Error, OSError, adapters.InvalidAdapter) as exc:
            log.error("schedule: cannot read the feedback store or pointers (%s); retrying", exc)
            rows, live = 0, None
        reason = due(sched, rows, now, last_check, next_daily)
        if reason is None and live is not None:
            tally = live_votes(data_args.db, live, adapters.read_current(ppo_args.adapters_dir))
            if tally["votes"] >= sched.live_min_votes:
                reason = f"{live} has {tally['votes']} live votes to decide on"
        if reason is not None:
            log.info("schedule: starting a cycle: %s", reason)
            try:
                run_cycle(model_args, data_args, reward_args, ppo_args, sched, progress=progress)
            except Busy as exc:
                log.info("schedule: %s", exc)
            last_check = clock()
            if next_daily is not None and now >= next_daily:
                next_daily = _next_daily(sched.at, clock())
        sleep(tick)
