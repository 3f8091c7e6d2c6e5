"""The retraining cycle (trainer/schedule.py) on the tiny model, for real: feedback in
through the app's own handlers, a cycle, promotion, and the hot-swap into a running
engine; the cross-process lock; SIGKILL at random points of `python -m trainer once`;
the tidy-up after a killed cycle; the gate, the schedule and live comparison.

The tiny model's replies are random-looking bytes, and a few PPO iterations on it do
not reliably raise a learned reward on held-out prompts (measured: judge win rates
0.41-0.59 over 64 replies across settings), so tests of the machinery around a
promotion open the gate (`PLUMBING`) and say so in their names. Tests that can fail on
learning keep the default gate: coin-flip feedback never promotes, a candidate that
held-out judgements say is worse is refused, too little signal waits. Learning itself
is measured on the default model by bench/loop.py.

Run: python -m pytest tests/test_schedule.py -q
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import random
import signal
import string
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from assistant import adapters, cycles, ui
from assistant.adapters import CurrentWatcher
from assistant.chat import Engine, GenParams
from assistant.config import BASE_VERSION, ServeArgs
from assistant.feedback import FeedbackStore
from assistant.model import build_policy
from trainer import schedule
from trainer.config import DataArgs, PPOArgs, RewardArgs, ScheduleArgs
from trainer.data import default_prompts, import_preferences

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 30
# Plumbing only: a gate that trains on any reward model with some held-out skill and
# passes any finite candidate, for tests of what happens around a promotion. A test
# using it cannot fail on learning.
PLUMBING = {"min_val_accuracy": 0.0, "min_win_rate": 0.0, "min_human_agreement": 0.0, "kl_budget": 1e6, "kl_total_budget": 1e6,
            "max_degenerate": 10**6}


def lowercase_share(text: str) -> float:
    """The simulated users' hidden preference: more ASCII lowercase letters is better."""
    return sum(c in string.ascii_lowercase for c in text) / max(len(text), 1)


@dataclasses.dataclass
class Loop:
    """A running 'server' (engine + watcher + handlers) on the tiny model, with its files."""

    root: Path
    model_args: object
    engine: Engine
    store: FeedbackStore
    watcher: CurrentWatcher
    deps: ui.Deps

    @property
    def adapters_dir(self) -> Path:
        return self.root / "adapters"

    def settings(self, **schedule_overrides):
        """Settings of one cycle sized for the tiny model, with the default gate.

        Only sizes change (8-token replies, a larger PPO batch and learning rate that
        move a 2-layer model within a few iterations); every promotion check (the
        signal minimums, the judge's win rate above 0.5, the KL budgets, no degenerate
        replies) is at its default unless a test says otherwise."""
        ppo_args = PPOArgs(adapters_dir=str(self.adapters_dir), ppo_iterations=6, ppo_batch_size=32, mini_batch_size=16,
                           ppo_epochs=4, ppo_lr=1e-2, max_new_tokens=8, temperature=1.0, top_p=1.0, init_kl_coef=0.01)
        return (self.model_args, DataArgs(db=str(self.root / "feedback.db")),
                RewardArgs(reward_dir=str(self.root / "reward"), min_pairs=8, reward_epochs=3, reward_lr=3e-3, reward_max_length=96,
                           reward_gradient_checkpointing=False),
                ppo_args,
                ScheduleArgs(lock_file=str(self.root / "trainer.lock"), cycles_log=str(self.root / "cycles.jsonl"),
                             backup_dir=str(self.root / "backups"),
                             **{"eval_max_new_tokens": 8, **schedule_overrides}))

    def chat(self, user: str, text: str, compare: bool) -> ui.Session:
        session = ui.Session()
        ui.set_user(self.deps, session, user, "")
        for _ in ui.send(self.deps, session, text, "", 1.0, 1.0, 8, compare):
            pass
        return session

    def wait_serving(self, version: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while self.engine.policy.current != version:
            assert time.monotonic() < deadline, f"server still serves {self.engine.policy.current}, not {version}"
            time.sleep(0.05)


@pytest.fixture
def loop(tmp_path, tiny_args):
    model_args = tiny_args()
    engine = Engine(build_policy(model_args), max_batch=8)
    store = FeedbackStore(tmp_path / "feedback.db")
    watcher = CurrentWatcher(engine, tmp_path / "adapters", interval=0.1).start()
    deps = ui.Deps(engine=engine, store=store, args=ServeArgs(db=str(tmp_path / "feedback.db"), adapters_dir=str(tmp_path / "adapters")),
                   model_name="tiny", watcher=watcher)
    yield Loop(tmp_path, model_args, engine, store, watcher, deps)
    watcher.stop()
    engine.close()
    store.close()


def give_feedback(loop: Loop, rounds: int = 2) -> int:
    """Simulated users compare two replies per prompt and pick by their hidden preference.

    One chat at a time from a fixed seed, so the feedback (and the cycle after it) is
    the same on every run."""
    torch.manual_seed(0)
    texts = [p[0]["content"] for p in default_prompts()]
    texts = (texts + [f"{t} Answer in one line." for t in texts])[: 30 * rounds]
    for i, text in enumerate(texts):
        session = loop.chat(f"user{i % 3}", text, compare=True)
        a, b = session.pending
        ui.decide(loop.deps, session, "a" if lowercase_share(a["text"]) >= lowercase_share(b["text"]) else "b")
        kept = session.turns[-1].content  # then they correct the reply they kept into what they wanted
        ui.on_edit(loop.deps, session, types.SimpleNamespace(index=len(session.turns) - 1, value=to_lowercase(kept), previous_value=kept))
    return len(texts)


def to_lowercase(text: str) -> str:
    """What a simulated user corrects a reply into: every character a lowercase letter."""
    return "".join(c if c in string.ascii_lowercase else chr(ord("a") + ord(c) % 26) for c in text) or "ok"


# -- the closed loop -------------------------------------------------------------------


def test_plumbing_feedback_to_a_promoted_adapter_that_the_running_server_swaps_in(loop):
    """Plumbing (gate opened, PLUMBING): feedback through the handlers -> a cycle -> promotion -> hot-swap."""
    n = give_feedback(loop)
    assert loop.store.counts()["comparisons"] == n and loop.store.counts()["corrections"] == n

    result = schedule.run_cycle(*loop.settings(**PLUMBING), progress=False)

    assert result.decision == "promoted", result.summary()
    assert result.version == "v000001" and result.parent == BASE_VERSION
    assert (result.reward_version, result.judge_version) == ("r000001", "r000002")  # PPO's reward model and the judge
    e = result.evaluation
    assert e["replies"] == 64 and e["wins"] + e["ties"] + e["losses"] == 64 and 0 <= e["win_rate_lo"] <= e["win_rate"] <= e["win_rate_hi"]
    assert e["kl_parent"] == e["kl_base"]  # the parent is the base
    assert e["human_agreement"]["n"] > 0 and 0 <= e["degenerate"] <= e["replies"]
    assert result.signal["decisive_pairs"] == 2 * n and result.signal["val_pairs"] == 2 * n  # every pair validated once, cross-fitted
    assert adapters.read_current(loop.adapters_dir) == "v000001"
    manifest = adapters.read_manifest(loop.adapters_dir, "v000001")
    assert manifest["status"] == "active" and manifest["reward_model"] == "r000001" and manifest["judge_model"] == "r000002"
    assert manifest["feedback_ids"]["comparisons"] == [1, n] and manifest["evaluation"]["win_rate"] == e["win_rate"]
    assert (loop.adapters_dir / "v000001" / "ppo_state.safetensors").is_file() and not manifest["ppo_state"]["resumed_from_parent"]
    assert [h["status"] for h in manifest["history"]] == ["active"]

    loop.wait_serving("v000001")  # the watcher hot-swapped it, no restart
    session = loop.chat("after", "hello again", compare=False)
    assert loop.store.get_reply(session.turns[-1].reply_id)["adapter_version"] == "v000001"
    logged = cycles.read(loop.root / "cycles.jsonl")
    assert [c["decision"] for c in logged] == ["promoted"] and logged[0]["rows"] == 2 * n


@pytest.mark.parametrize("step", ["ppo", "dpo"])
def test_coin_flip_feedback_never_promotes(loop, step):
    """Users whose choices are coin flips: nothing to learn, so no cycle may promote (default gate)."""
    from trainer.config import PolicyArgs

    rng = random.Random(5)
    torch.manual_seed(0)
    texts = [p[0]["content"] for p in default_prompts()]
    decisions = []
    for round_ in range(2):
        for i, text in enumerate(texts):
            session = loop.chat(f"coin{i % 3}", f"{text} ({round_})", compare=True)
            ui.decide(loop.deps, session, rng.choice("ab"))
        decisions.append(schedule.run_cycle(*loop.settings(), progress=False, policy_args=PolicyArgs(policy_step=step)))
    assert all(r.decision in ("waiting", "rejected") for r in decisions), [r.summary() for r in decisions]
    assert adapters.read_current(loop.adapters_dir) == BASE_VERSION
    waited = [r for r in decisions if r.decision == "waiting"]
    assert all("waiting for more feedback" in r.reasons[0] and r.version is None for r in waited)


def test_a_cycle_with_too_little_signal_waits_before_training_and_says_why(loop):
    give_feedback(loop, rounds=1)  # 30 choices, 30 corrections...
    *args, sched = loop.settings()
    result = schedule.run_cycle(*args, dataclasses.replace(sched, min_decisive_pairs=100), progress=False)
    assert result.decision == "waiting" and result.version is None and result.reward_version is None
    assert result.reasons[0].startswith("waiting for more feedback: 60 decisive pairs of the 100 needed")
    assert adapters.versions(loop.adapters_dir) == [] and not (loop.root / "reward").exists()  # nothing was trained
    logged = cycles.read(loop.root / "cycles.jsonl")[-1]
    assert logged["decision"] == "waiting" and logged["reasons"] == result.reasons and logged["signal"]["decisive_pairs"] == 60

    loop.chat("ada", "hi", compare=False)  # a reply with no feedback adds no signal
    assert schedule.run_cycle(*args, dataclasses.replace(sched, min_decisive_pairs=61), progress=False).decision == "waiting"


def test_plumbing_live_comparison_puts_the_candidate_against_current_and_votes_decide(loop):
    """Plumbing (gate opened, PLUMBING) up to the live stage; the votes then decide by the sequential rule."""
    give_feedback(loop, rounds=2)
    args = loop.settings(live_compare=True, live_min_votes=4, live_confidence=0.95, **PLUMBING)
    result = schedule.run_cycle(*args, progress=False)
    assert result.decision == "live", result.summary()
    assert adapters.read_live(loop.adapters_dir) == result.version
    assert adapters.read_current(loop.adapters_dir) == BASE_VERSION

    deadline = time.monotonic() + WAIT_S
    while loop.watcher.live != result.version:
        assert time.monotonic() < deadline, "the server never loaded the live candidate"
        time.sleep(0.05)
    for i in range(4):  # users prefer the candidate's side, whichever letter it has
        session = loop.chat(f"voter{i}", f"question {i}", compare=True)
        a, b = session.pending
        assert {a["version"], b["version"]} == {BASE_VERSION, result.version}
        ui.decide(loop.deps, session, "a" if a["version"] == result.version else "b")

    second = schedule.run_cycle(*args, progress=False)  # decides the votes first, then trains on from the winner
    settled = second.settled
    assert settled["decision"] == "promoted" and settled["votes"] == 4 and settled["win_rate"] == 1.0  # P(better) = 1 - 0.5**5
    assert adapters.read_current(loop.adapters_dir) == result.version
    assert adapters.read_manifest(loop.adapters_dir, result.version)["status"] == "active"
    assert second.decision != "failed", second.summary()  # it went on from the winner: trained, or waited for signal
    if second.version:
        assert second.parent == result.version


def test_plumbing_a_second_run_continues_the_value_head_and_beta_and_kl_is_measured_to_the_parent(loop):
    """Plumbing (a scripted reward, no gate): PPO state carries over from a parent, and
    the KL a cycle is budgeted on is to its parent."""
    from trainer import gate, steps

    model_args, data_args, reward_args, ppo_args, sched = loop.settings()
    reward_fn = lambda prompts, texts: torch.tensor([lowercase_share(t) for t in texts])  # noqa: E731
    v1, m1 = steps.run_ppo(model_args, data_args, reward_args, ppo_args, progress=False, reward_fn=reward_fn, prompts=default_prompts())
    assert not m1["ppo_state"]["resumed_from_parent"] and m1["ppo_state"]["kl_coef_start"] == ppo_args.init_kl_coef
    assert m1["ppo_state"]["kl_ctl"]["value"] != ppo_args.init_kl_coef  # the controller moved
    adapters.promote(loop.adapters_dir, v1)

    v2, m2 = steps.run_ppo(model_args, data_args, reward_args, ppo_args, progress=False, reward_fn=reward_fn, prompts=default_prompts())
    assert m2["parent"] == v1 and m2["ppo_state"]["resumed_from_parent"]
    assert m2["ppo_state"]["kl_coef_start"] == m1["ppo_state"]["kl_ctl"]["value"]  # β went on from where v1 left it
    assert m2["metrics"][0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)  # PPO's reference is the parent

    e = gate.evaluate(model_args, loop.adapters_dir, v1, v1, default_prompts()[:4], lambda p, t: torch.zeros(len(t)),
                      dataclasses.replace(sched, eval_replies=8), ppo_args)
    assert e["kl_parent"] == pytest.approx(0.0, abs=1e-4) and e["kl_base"] > 0.1  # against itself: nothing; against the base: v1's drift


def test_live_votes_count_only_decisive_choices_between_the_two_versions(tmp_path):
    store = FeedbackStore(tmp_path / "f.db")
    uid = store.ensure_user("u", "")
    conv = store.new_conversation(uid, "")

    def reply_to(version, prompt):
        return store.add_reply(conversation_id=conv, context=[{"role": "user", "content": prompt}], text="t", params={}, model="m",
                               adapter_version=version, prompt_tokens=1, completion_tokens=1, latency_ms=1.0, ttft_ms=1.0, finish_reason="eos")

    for i, (a, b, choice) in enumerate((("v2", "v1", "a"), ("v1", "v2", "a"), ("v1", "v2", "b"), ("v1", "v2", "tie"), ("v1", "v1", "a"), ("v3", "v2", "b"))):
        store.add_comparison(reply_to(a, f"q{i}"), reply_to(b, f"q{i}"), choice, uid)
    assert schedule.live_votes(tmp_path / "f.db", "v2", "v1") == {"votes": 3, "wins": 2, "win_rate": 2 / 3, "choices": 3}
    for _ in range(5):  # the same user asking the same thing again and again counts once, with the latest choice
        store.add_comparison(reply_to("v1", "q0"), reply_to("v2", "q0"), "a", uid)
    other = store.ensure_user("w", "")
    store.add_comparison(reply_to("v1", "q0"), reply_to("v2", "q0"), "b", other)  # another user on that prompt counts
    assert schedule.live_votes(tmp_path / "f.db", "v2", "v1") == {"votes": 4, "wins": 2, "win_rate": 0.5, "choices": 9}


# -- one cycle at a time ----------------------------------------------------------------


def test_a_second_cycle_while_one_runs_is_refused_and_says_why(loop):
    args = loop.settings()
    with cycles.CycleLock(args[-1].lock_file) as lock:
        lock.phase("ppo")
        with pytest.raises(cycles.Busy, match=rf"another cycle is running \(pid {os.getpid()}, .* phase ppo\)"):
            schedule.run_cycle(*args, progress=False)
        assert cycles.holder(args[-1].lock_file)["phase"] == "ppo"
    assert cycles.holder(args[-1].lock_file) is None


def test_two_cycles_started_at_once_one_runs_and_the_other_says_why(tmp_path, tiny_dir):
    db = banana_db(tmp_path)
    procs = [subprocess.Popen(once_cmd(tmp_path, tiny_dir, db), cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 3], outs
    refused = next(err for p, (out, err) in zip(procs, outs) if p.returncode == 3)
    assert "not started: another cycle is running (pid" in refused
    ran = next(out for p, (out, err) in zip(procs, outs) if p.returncode == 0)
    assert "cycle promoted" in ran or "cycle rejected" in ran


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path):
    lock_file = tmp_path / "trainer.lock"
    code = f"from assistant.cycles import CycleLock; import time\nwith CycleLock({str(lock_file)!r}): print('held', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    assert cycles.holder(lock_file)["pid"] == proc.pid
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert cycles.holder(lock_file) is None
    with cycles.CycleLock(lock_file):
        pass


# -- SIGKILL at random points --------------------------------------------------------------


BANANA = "I suggest {} and banana."


def banana_db(root: Path) -> Path:
    """A feedback store with 40 imported pairs whose chosen reply mentions banana."""
    rng = random.Random(0)
    fruit = "apple cherry grape lemon mango melon peach plum kiwi fig".split()
    lines = [json.dumps({"prompt": f"What should I eat, take {i}?", "chosen": BANANA.format(rng.choice(fruit)),
                         "rejected": f"I suggest {rng.choice(fruit)}."}) for i in range(40)]
    path = root / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    db = root / "feedback.db"
    with FeedbackStore(db) as store:
        import_preferences(store, path, progress=False)
    return db


def cli_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def once_cmd(root: Path, model_dir: Path, db: Path) -> list[str]:
    return [sys.executable, "-m", "trainer", "once", "--model", str(model_dir), "--quantize", "none", "--device", "cpu",
            "--db", str(db), "--adapters-dir", str(root / "adapters"), "--reward-dir", str(root / "reward"),
            "--lock-file", str(root / "trainer.lock"), "--cycles-log", str(root / "cycles.jsonl"),
            "--min-pairs", "8", "--reward-epochs", "3", "--reward-lr", "3e-3", "--reward-max-length", "64", "--ppo-iterations", "2",
            "--ppo-batch-size", "8", "--max-new-tokens", "8", "--eval-max-new-tokens", "8", "--eval-replies", "8",
            # plumbing only (these tests kill and race cycles): the gate passes any finite candidate
            "--min-win-rate", "0", "--min-human-agreement", "0", "--kl-budget", "1e6", "--kl-total-budget", "1e6", "--max-degenerate", "1000"]


def assert_nothing_partial_in_use(adapters_dir: Path, lora) -> None:
    current = adapters.read_current(adapters_dir)
    if current != BASE_VERSION:
        adapters.validate(adapters_dir / current, lora)
    for v in adapters.versions(adapters_dir):  # every visible version is complete
        adapters.validate(adapters_dir / v, lora)


def test_sigkill_at_random_points_never_leaves_a_partial_adapter_in_use_and_the_next_cycle_succeeds(tmp_path, tiny_args, tiny_dir):
    db = banana_db(tmp_path)
    adapters_dir = tmp_path / "adapters"
    engine = Engine(build_policy(tiny_args()), max_batch=4)
    watcher = CurrentWatcher(engine, adapters_dir, interval=0.05).start()
    cmd = once_cmd(tmp_path, tiny_dir, db)
    try:
        started = time.monotonic()  # one uninterrupted cycle first, to know how long one takes
        full = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
        duration = time.monotonic() - started
        assert full.returncode == 0 and "cycle promoted" in full.stdout, full.stderr[-3000:]
        rng = random.Random(7)
        kills = 0
        for _ in range(5):
            proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.3, 1.0) * duration)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait()
            time.sleep(0.3)  # let the watcher look at whatever the pointer says now
            assert_nothing_partial_in_use(adapters_dir, engine.policy.lora)
            assert engine.policy.current == adapters.read_current(adapters_dir)
            stream = engine.submit([{"role": "user", "content": "still there?"}], GenParams(temperature=0.0, top_p=1.0, max_new_tokens=4))
            list(stream)  # the server keeps serving
            assert stream.reply.finish_reason in ("length", "eos") and stream.reply.adapter_version == engine.policy.current
            assert cycles.holder(tmp_path / "trainer.lock") is None  # a killed cycle never keeps the lock
        assert kills >= 3

        after = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
        assert after.returncode == 0 and "cycle promoted" in after.stdout, after.stderr[-3000:]
        leftovers = [p.name for d in (adapters_dir, tmp_path / "reward") for p in d.iterdir() if p.name.startswith((".v", ".r"))]
        assert leftovers == []
        statuses = {m["version"]: m["status"] for m in adapters.manifests(adapters_dir)}
        current = adapters.read_current(adapters_dir)
        assert statuses[current] == "active"
        assert all(s in ("retired", "rejected") for v, s in statuses.items() if v != current), statuses
        deadline = time.monotonic() + WAIT_S
        while engine.policy.current != current:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        watcher.stop()
        engine.close()


# -- tidying up after a killed cycle --------------------------------------------------------


def test_tidy_removes_unfinished_directories_and_makes_statuses_agree_with_current(tmp_path, trained_peft):
    adir, rdir = tmp_path / "adapters", tmp_path / "reward"
    rdir.mkdir()
    for _ in range(3):  # published by cycles (a cycle records its judge)
        adapters.publish(adir, trained_peft(), "default", {"parent": BASE_VERSION, "judge_model": "r000002"})
    adapters.publish(adir, trained_peft(), "default", {"parent": BASE_VERSION})  # by hand (`python -m trainer ppo`)
    adapters.update_manifest(adir, "v000001", status="active")  # CURRENT moved on but the status did not
    adapters.set_current(adir, "v000002")  # status still 'candidate'
    (adir / ".v000005.abc").mkdir()
    (rdir / ".r000002.xyz").mkdir()
    (adir / ".v000001.pruned-1234abcd").mkdir()  # a prune that died between renaming and deleting

    done = schedule.tidy(adir, rdir)

    assert not (adir / ".v000005.abc").exists() and not (rdir / ".r000002.xyz").exists() and not (adir / ".v000001.pruned-1234abcd").exists()
    statuses = {m["version"]: m["status"] for m in adapters.manifests(adir)}
    assert statuses == {"v000001": "retired", "v000002": "active", "v000003": "rejected", "v000004": "candidate"}  # v000004 waits for `evaluate`
    assert len(done) == 6
    assert schedule.tidy(adir, rdir) == []


@pytest.mark.parametrize("pointer", ["CURRENT", "LIVE"])
def test_tidy_leaves_statuses_alone_on_a_garbled_pointer_and_says_why(tmp_path, trained_peft, pointer):
    adir = tmp_path / "adapters"
    adapters.publish(adir, trained_peft(), "default", {"parent": BASE_VERSION, "judge_model": "r000002"})
    (adir / ".v000002.abc").mkdir()
    (adir / pointer).write_text("garbage\n")
    done = schedule.tidy(adir, tmp_path / "reward")
    assert done[0].startswith("removed unfinished") and not (adir / ".v000002.abc").exists()
    assert done[1].startswith("statuses left as they are: ") and "holds 'garbage'" in done[1]
    assert adapters.read_manifest(adir, "v000001")["status"] == "candidate"


def test_tidy_leaves_the_live_candidate_alone(tmp_path, trained_peft):
    adir = tmp_path / "adapters"
    adapters.publish(adir, trained_peft(), "default", {"parent": BASE_VERSION})
    adapters.set_live(adir, "v000001")
    assert schedule.tidy(adir, tmp_path / "reward") == []
    assert adapters.read_manifest(adir, "v000001")["status"] == "candidate"


# -- the gate and the schedule ----------------------------------------------------------------


def test_due_needs_enough_new_rows_and_the_interval_or_the_daily_time():
    s = ScheduleArgs(every_min=10, min_new_rows=5, at="03:00")
    now = dt.datetime(2026, 1, 2, 12, 0)
    assert schedule.due(s, 4, now, None, None) is None
    assert "5 new feedback rows" in schedule.due(s, 5, now, None, None)
    assert schedule.due(s, 50, now, now - dt.timedelta(minutes=9), None) is None
    assert schedule.due(s, 50, now, now - dt.timedelta(minutes=10), None) is not None
    daily = dt.datetime(2026, 1, 2, 3, 0)
    assert "daily run at 03:00" in schedule.due(s, 1, now, now, daily)
    assert schedule.due(s, 0, now, now, daily) is None
    assert schedule._next_daily("03:00", now) == dt.datetime(2026, 1, 3, 3, 0)


def test_new_rows_counts_feedback_since_the_last_cycle_that_did_not_fail(tmp_path):
    db = banana_db(tmp_path)
    log_file = tmp_path / "cycles.jsonl"
    assert schedule.new_rows(db, log_file) == 40
    log_file.write_text(json.dumps({"decision": "rejected", "feedback_ids": {"comparisons": [1, 30]}}) + "\n"
                        + json.dumps({"decision": "failed", "feedback_ids": {"comparisons": [1, 40]}}) + "\n")
    assert schedule.new_rows(db, log_file) == 10


def test_split_prompts_is_deterministic_and_disjoint():
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(200)]
    train, held = schedule.split_prompts(prompts, 0.25)
    assert schedule.split_prompts(list(reversed(prompts)), 0.25)[1] == list(reversed(held))
    assert not {json.dumps(p) for p in train} & {json.dumps(p) for p in held}
    assert 30 < len(held) < 70


def test_run_schedule_starts_a_cycle_when_due_and_stops(loop, monkeypatch):
    give_feedback(loop, rounds=1)
    calls = []

    def fake_cycle(*args, **kwargs):  # logs a cycle that read every row so far
        calls.append(args)
        schedule._log_cycle(args[-1], schedule.CycleResult(decision="rejected", feedback_ids={"comparisons": [1, 10 ** 6]}))

    monkeypatch.setattr(schedule, "run_cycle", fake_cycle)
    ticks = iter(range(3))
    *args, sched = loop.settings()
    sched = dataclasses.replace(sched, every_min=1, min_new_rows=5)
    schedule.run_schedule(*args, sched, stop=lambda: next(ticks, None) is None, sleep=lambda s: None)
    assert len(calls) == 1  # the second tick sees no new rows



@pytest.mark.parametrize("step", ["dpo", "kto"])
def test_plumbing_a_cycle_with_another_policy_step_trains_on_fold_a_and_the_server_swaps_it_in(loop, step):
    """Plumbing (gate opened, PLUMBING): --policy-step dpo/kto in a cycle: same snapshot,
    folds, gate and hot-swap; the step is recorded in the manifest and the cycles log."""
    from trainer.config import PolicyArgs
    from trainer.steps import folds

    n = give_feedback(loop, rounds=1)
    result = schedule.run_cycle(*loop.settings(**PLUMBING), progress=False, policy_args=PolicyArgs(policy_step=step))
    assert result.decision == "promoted" and result.policy_step == f"{step} after sft", result.summary()  # corrections: SFT first
    manifest = adapters.read_manifest(loop.adapters_dir, result.version)
    assert manifest["policy_step"] == step and manifest["kind"] == step and manifest["judge_model"] == result.judge_version
    assert manifest["sft_first"] and manifest["rows"]["sft"] > 0
    assert manifest["feedback_ids"]["comparisons"] == [1, n] and manifest["reward_model"] is None  # DPO/KTO need no reward model
    from trainer.data import build_examples, read_snapshot
    fold_a, fold_b = folds(build_examples(read_snapshot(loop.root / "feedback.db")))
    expected = len(fold_a.pairs) if step == "dpo" else None
    if expected is not None:
        assert manifest["rows"]["dpo"] == expected and 0 < expected < 2 * n  # fold A only: fold B judges
    assert result.evaluation["human_agreement"]["n"] == len(fold_b.pairs)
    loop.wait_serving(result.version)
    assert cycles.read(loop.root / "cycles.jsonl")[-1]["policy_step"] == f"{step} after sft"


def test_dpo_moves_towards_held_out_human_choices(loop):
    """Can fail on learning: a DPO cycle (default gate) trained on fold A must point the
    way people chose on fold B, which it never saw (held-out human agreement, 95% lower
    bound above 0.5). The preference is the lowercase one the corrections teach."""
    from trainer.config import PolicyArgs

    give_feedback(loop, rounds=2)
    result = schedule.run_cycle(*loop.settings(), progress=False, policy_args=PolicyArgs(policy_step="dpo"))
    h = result.evaluation.get("human_agreement") or {}
    assert result.version and h.get("n", 0) >= 30, result.summary()
    assert h["lo"] > 0.5, result.summary()


# -- pruning, a garbled CURRENT, backups ----------------------------------------------------------


def fake_versions(adir: Path, rdir: Path, parents: dict[str, str], reward_models: dict[str, str]) -> None:
    """Version directories with a manifest each (all pruning and statuses read), and reward-model directories."""
    for version, parent in parents.items():
        (adir / version).mkdir(parents=True)
        (adir / version / "manifest.json").write_text(json.dumps({"version": version, "parent": parent, "status": "retired",
                                                                   "reward_model": reward_models.get(version)}))
    for r in sorted(set(reward_models.values()) | {"r000009"}):
        (rdir / r).mkdir(parents=True)


def test_a_cycle_ends_by_pruning_old_versions_and_their_reward_models(tmp_path, tiny_args):
    db = banana_db(tmp_path)
    adir, rdir = tmp_path / "adapters", tmp_path / "reward"
    fake_versions(adir, rdir, {"v000001": "base", "v000002": "v000001", "v000003": "base", "v000004": "base"},
                  {"v000001": "r000001", "v000002": "r000002", "v000003": "r000003", "v000004": "r000004"})
    adapters.set_current(adir, "v000002")
    sched = ScheduleArgs(lock_file=str(tmp_path / "trainer.lock"), cycles_log=str(tmp_path / "cycles.jsonl"), min_decisive_pairs=1000, keep=1)
    result = schedule.run_cycle(tiny_args(), DataArgs(db=str(db)), RewardArgs(reward_dir=str(rdir)), PPOArgs(adapters_dir=str(adir)), sched,
                                progress=False)
    assert result.decision == "waiting"  # the cycle's own result; the pruning came after it
    assert result.pruned == ["v000003", "r000003"]
    assert adapters.versions(adir) == ["v000001", "v000002", "v000004"]  # newest, CURRENT and its parent
    assert sorted(p.name for p in rdir.iterdir()) == ["r000001", "r000002", "r000004", "r000009"]  # named by a kept adapter, or the newest
    assert cycles.read(tmp_path / "cycles.jsonl")[-1]["pruned"] == result.pruned

    result = schedule.run_cycle(tiny_args(), DataArgs(db=str(db)), RewardArgs(reward_dir=str(rdir)), PPOArgs(adapters_dir=str(adir)),
                                dataclasses.replace(sched, keep=0), progress=False)
    assert result.pruned == [] and adapters.versions(adir) == ["v000001", "v000002", "v000004"]  # --keep 0: never


def test_a_garbled_current_skips_the_cycle_with_the_repair_and_does_not_fail_it(tmp_path, tiny_args, caplog):
    db = banana_db(tmp_path)
    adir, rdir = tmp_path / "adapters", tmp_path / "reward"
    fake_versions(adir, rdir, {"v000001": "base", "v000002": "v000001", "v000003": "base"}, {})
    (adir / "CURRENT").write_text("v000002/\n")
    sched = ScheduleArgs(lock_file=str(tmp_path / "trainer.lock"), cycles_log=str(tmp_path / "cycles.jsonl"), keep=1)
    with caplog.at_level("WARNING", logger="trainer.schedule"):
        result = schedule.run_cycle(tiny_args(), DataArgs(db=str(db)), RewardArgs(reward_dir=str(rdir)), PPOArgs(adapters_dir=str(adir)),
                                    sched, progress=False)
    assert result.decision == "skipped", result.summary()
    assert "holds 'v000002/'" in result.reasons[0] and "python -m trainer rollback VERSION" in result.reasons[0]
    assert "tidy: statuses left as they are" in caplog.text and "pruning skipped" in caplog.text
    assert adapters.versions(adir) == ["v000001", "v000002", "v000003"]  # nothing deleted while what serves is unknown
    assert cycles.read(tmp_path / "cycles.jsonl")[-1]["decision"] == "skipped"


def test_pruning_that_meets_a_pointer_garbled_during_the_cycle_keeps_the_cycles_result(tmp_path, tiny_args, caplog, monkeypatch):
    db = banana_db(tmp_path)
    adir, rdir = tmp_path / "adapters", tmp_path / "reward"
    fake_versions(adir, rdir, {"v000001": "base", "v000002": "base"}, {})

    def garble_then_wait(examples, sched):  # someone writes garbage into CURRENT while the cycle runs
        (adir / "CURRENT").write_text("garbage\n")
        return ["waiting for more feedback: test"]

    monkeypatch.setattr(schedule.gate, "signal_reasons", garble_then_wait)
    sched = ScheduleArgs(lock_file=str(tmp_path / "trainer.lock"), cycles_log=str(tmp_path / "cycles.jsonl"), keep=1)
    with caplog.at_level("WARNING", logger="trainer.schedule"):
        result = schedule.run_cycle(tiny_args(), DataArgs(db=str(db)), RewardArgs(reward_dir=str(rdir)), PPOArgs(adapters_dir=str(adir)),
                                    sched, progress=False)
    assert result.decision == "waiting" and result.reasons == ["waiting for more feedback: test"]
    assert "pruning skipped" in caplog.text and "holds 'garbage'" in caplog.text
    assert adapters.versions(adir) == ["v000001", "v000002"]


def test_run_schedule_backs_up_the_feedback_database_when_it_starts_and_then_every_n_hours(tmp_path):
    from assistant import backup

    db = banana_db(tmp_path)
    sched = ScheduleArgs(lock_file=str(tmp_path / "trainer.lock"), cycles_log=str(tmp_path / "cycles.jsonl"), every_min=1,
                         min_new_rows=10**6, backup_every_hours=1, backup_keep=5)  # into backups/ beside the database
    start = dt.datetime(2026, 1, 2, 12, 0)
    times = iter([start + dt.timedelta(minutes=m) for m in (0, 0, 30, 59, 60, 90, 125)])  # when it starts, then one per tick
    ticks = iter(range(6))
    schedule.run_schedule(None, DataArgs(db=str(db)), RewardArgs(reward_dir=str(tmp_path / "reward")), PPOArgs(adapters_dir=str(tmp_path / "adapters")),
                          sched, stop=lambda: next(ticks, None) is None, clock=lambda: next(times), sleep=lambda s: None)
    made = backup.backups(tmp_path / "backups")
    assert len(made) == 3  # at 12:00, 13:00 and 14:05
    assert all(backup.integrity(p) == "ok" for p in made)


def test_the_cycles_step_label_says_after_sft_only_when_sft_ran_before_another_step():
    """The label in the cycles log and on the dashboard follows what the step reported it ran."""
    assert schedule.step_label("ppo", {"sft": {"rows": 9}, "sft_first": True}) == "ppo after sft"
    assert schedule.step_label("dpo", {"rows": {"sft": 9, "dpo": 12}, "sft_first": True}) == "dpo after sft"
    assert schedule.step_label("sft", {"rows": {"sft": 9}, "sft_first": True}) == "sft"
    assert schedule.step_label("kto", {"rows": {"kto": 30}, "sft_first": True, "sft_skipped": "2 demonstrations"}) == "kto"
    assert schedule.step_label("ppo", {"sft_first": False}) == "ppo"


def test_a_cycles_summary_line_names_the_kl_the_gate_budgeted():
    e = {"win_rate": 0.8, "win_rate_lo": 0.68, "win_rate_hi": 0.88, "replies": 64, "margin": 0.1, "kl_parent": 64.2, "kl_base": 64.2,
         "degenerate": 0}
    assert "budgeted" not in schedule.describe(e)  # an evaluation from before the lineage was counted
    line = schedule.describe({**e, "kl_optimised": 0.0, "kl_optimised_total": 0.0, "optimised_from": "sft"})
    assert "KL to parent 64.20, to base 64.20" in line and "budgeted KL 0.00 (optimised from its SFT result), 0.00 over the lineage" in line
    assert "(optimised from none: SFT alone)" in schedule.describe({**e, "kl_optimised": 0.0, "kl_optimised_total": 3.0, "optimised_from": None})
