"""bench/replay.py: a kept loop run's feedback, cut to each cycle's snapshot, replayed through a policy step."""

from __future__ import annotations

import json
import sqlite3

import pytest

from assistant.feedback import FEEDBACK_TABLES, FeedbackStore
from bench import loop, replay

CTX = [{"role": "user", "content": "Name a colour."}]


def _reply(store, conv, text):
    return store.add_reply(conversation_id=conv, context=CTX, text=text, params={"temperature": 0.7}, model="tiny",
                           adapter_version="base", prompt_tokens=4, completion_tokens=2, latency_ms=1.0, ttft_ms=1.0,
                           finish_reason="stop")


def _kept_db(path):
    """Two cycles' worth of feedback: ids 1-2 of comparisons and votes in the first, 3-4 in the second."""
    store = FeedbackStore(path)
    try:
        users = [store.ensure_user(f"u{i}") for i in range(2)]
        conv = store.new_conversation(users[0])
        replies = [_reply(store, conv, t) for t in ("Blue.", "Red, a warm colour.", "Green.", "Teal, like the sea.")]
        store.add_comparison(replies[0], replies[1], "a", users[0])
        store.set_vote(replies[0], users[0], 1)
        store.add_comparison(replies[2], replies[3], "b", users[1])
        store.set_vote(replies[1], users[1], -1)
        first = {t: [1, int(store_max(path, t))] for t in FEEDBACK_TABLES}
        store.add_comparison(replies[0], replies[3], "tie", users[0])
        store.set_vote(replies[2], users[0], 1)
        store.set_vote(replies[0], users[0], -1)  # a changed vote: one more vote event, the same vote row
        store.add_comparison(replies[1], replies[2], "a", users[1])
        store.set_vote(replies[3], users[1], 1)
    finally:
        store.close()
    return first, {t: [1, int(store_max(path, t))] for t in FEEDBACK_TABLES}


def store_max(path, table):
    con = sqlite3.connect(path)
    try:
        return con.execute(f"SELECT COALESCE(MAX(id), 0) FROM {table}").fetchone()[0]  # noqa: S608
    finally:
        con.close()


def test_a_cut_copy_holds_exactly_the_rows_of_the_cycles_snapshot(tmp_path):
    from trainer.data import read_snapshot

    src = tmp_path / "kept" / "feedback.db"
    first, last = _kept_db(src)
    rows = replay.cut_copy(src, tmp_path / "c1.db", first)
    assert rows["comparisons"] == 2 and rows["votes"] == 2 and rows["vote_events"] == first["vote_events"][1]
    assert read_snapshot(tmp_path / "c1.db").id_range() == first
    replay.cut_copy(src, tmp_path / "c2.db", last)
    assert read_snapshot(tmp_path / "c2.db").id_range() == last
    assert read_snapshot(src).id_range() == last  # the kept database is only read
    with pytest.raises(ValueError, match="no range for rankings"):
        replay.cut_copy(src, tmp_path / "x.db", {t: r for t, r in first.items() if t != "rankings"})


def _kept_run(tmp_path, tiny_dir, work=True):
    args = loop.parse_args(["--preference", "shorter", "--model", str(tiny_dir), "--quantize", "none", "--device", "cpu",
                            "--heldout-prompts", "3", "--feedback-prompts", "2", "--cycles", "2"])
    cycles = []
    if work:
        first, last = _kept_db(tmp_path / "work" / "feedback.db")
        cycles = [{"cycle": 1, "decision": "waiting", "rows": 4, "feedback_ids": first},
                  {"cycle": 2, "decision": "waiting", "rows": 9, "feedback_ids": last}]
    results = tmp_path / "loop.json"
    results.write_text(json.dumps({"args": vars(args), "work_dir": str(tmp_path / "work"), "cycles": cycles}))
    return results, cycles


def test_plumbing_replay_gives_each_cycle_the_kept_snapshot_and_waits_on_too_little_signal(tmp_path, tiny_dir, capsys):
    """Plumbing: two comparisons a cycle are far below the gate's minimum of decisive pairs,
    so each replayed cycle waits; what is checked is the snapshot each cycle's trainer read."""
    results, kept = _kept_run(tmp_path, tiny_dir)
    out = tmp_path / "replay.json"
    replay.main(["--results", str(results), "--policy-step", "dpo", "--out", str(out)])
    r = json.loads(out.read_text())
    kept_row, step = r["steps"]
    assert kept_row["policy_step"] == "ppo (kept run)" and kept_row["served"] == "base" and kept_row["vs_base"] is None
    assert step["policy_step"] == "dpo" and step["served"] == "base" and step["vs_base"] is None
    assert [c["decision"] for c in step["cycles"]] == ["waiting", "waiting"]
    assert [c["feedback_ids"] for c in step["cycles"]] == [k["feedback_ids"] for k in kept]
    assert all(any("decisive pair" in why for why in c["reasons"]) for c in step["cycles"])
    assert "--policy-step dpo" in step["trainer_command"]
    printed = capsys.readouterr().out
    assert "| dpo | 1 | waiting" in printed and "| dpo | base (nothing promoted) |" in printed
    assert "| ppo (kept run) | 2 | waiting" in printed


def test_replay_needs_the_kept_work_directory(tmp_path, tiny_dir):
    results, _ = _kept_run(tmp_path, tiny_dir, work=False)
    with pytest.raises(SystemExit, match="run bench/loop.py with --keep"):
        replay.main(["--results", str(results), "--policy-step", "ppo"])


def test_the_kept_runs_served_adapter_is_judged_against_the_base_like_the_replayed_steps(tmp_path, tiny_dir, make_adapter):
    results, kept = _kept_run(tmp_path, tiny_dir)
    make_adapter(tmp_path / "work" / "adapters" / "v000001", seed=3)
    data = json.loads(results.read_text())
    data["cycles"][1].update(decision="promoted", version="v000001", promoted="v000001")
    results.write_text(json.dumps(data))
    out = tmp_path / "replay.json"
    replay.main(["--results", str(results), "--policy-step", "sft", "--cycles", "1", "--replies", "4", "--prompts", "2", "--out", str(out)])
    kept_row, step = json.loads(out.read_text())["steps"]
    assert len(kept_row["cycles"]) == 1 and kept_row["served"] == "base"  # --cycles 1: the promotion in cycle 2 is not reached
    assert len(step["cycles"]) == 1
    replay.main(["--results", str(results), "--policy-step", "sft", "--cycles", "2", "--replies", "4", "--prompts", "2", "--out", str(out)])
    kept_row = json.loads(out.read_text())["steps"][0]
    v = kept_row["vs_base"]
    assert kept_row["served"] == "v000001" and v["against"] == "base" and v["pairs"] == 4 == len(kept_row["pairs_detail"]["vs_base"])
    words = lambda t: len(t.split()) or 10**9  # noqa: E731  (shorter: fewer words wins, an empty reply is the worst)
    for j in kept_row["pairs_detail"]["vs_base"]:
        assert j["winner"] == ("new" if words(j["candidate"]) < words(j["current"]) else "old" if words(j["current"]) < words(j["candidate"]) else "tie")
