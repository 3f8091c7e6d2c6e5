"""Tests for the assistant/feedback/ package: schema, writes, errors, exports, CLI, concurrency.

Every test builds its own database under tmp_path; nothing needs a model or a network.
Run: python -m pytest tests/test_feedback.py -q
"""

from __future__ import annotations

import datetime
import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

import assistant.feedback as feedback
from assistant.feedback import MIGRATIONS, FeedbackError, FeedbackStore, StoreUnavailable

REPO = Path(__file__).resolve().parents[1]
CTX = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
OTHER_CTX = [{"role": "user", "content": "Name a colour."}]
PARAMS = {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 64, "seed": 1}


def add_reply(store: FeedbackStore, conversation_id: str, text: str, context=CTX, **overrides) -> int:
    kwargs = dict(
        conversation_id=conversation_id, context=context, text=text, params=PARAMS,
        model="SmolLM2-135M-Instruct", adapter_version="base", prompt_tokens=12,
        completion_tokens=3, latency_ms=41.5, ttft_ms=9.25, finish_reason="stop",
    )
    kwargs.update(overrides)
    return store.add_reply(**kwargs)


def query(path: Path, sql: str, params=()) -> list[tuple]:
    """Read through a separate connection: what is really on disk."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def store(tmp_path):
    s = FeedbackStore(tmp_path / "feedback.db")
    yield s
    s.close()


@pytest.fixture
def chat(store):
    """One user, one conversation, two replies to CTX and one to OTHER_CTX."""
    user = store.ensure_user("ada")
    conv = store.new_conversation(user, system_prompt="Be brief.")
    return SimpleNamespace(
        user=user, conv=conv,
        r1=add_reply(store, conv, "4"),
        r2=add_reply(store, conv, "Four.", source="regenerate"),
        r3=add_reply(store, conv, "Blue.", context=OTHER_CTX),
    )


# -- schema and connection settings --------------------------------------------


def test_new_database_is_migrated_to_the_latest_version(store):
    assert store.schema_version() == len(MIGRATIONS)
    versions = [v for (v,) in query(store.path, "SELECT version FROM schema_version ORDER BY version")]
    assert versions == list(range(1, len(MIGRATIONS) + 1))


def test_reopening_applies_no_migration_twice(tmp_path):
    path = tmp_path / "feedback.db"
    FeedbackStore(path).close()
    with FeedbackStore(path) as again:
        assert again.schema_version() == len(MIGRATIONS)
    assert query(path, "SELECT COUNT(*) FROM schema_version") == [(len(MIGRATIONS),)]


def test_reopening_applies_only_missing_migrations(tmp_path, monkeypatch):
    path = tmp_path / "feedback.db"
    FeedbackStore(path).close()
    calls = []

    def add_tags(db):
        calls.append(1)
        db.execute("CREATE TABLE tags (id INTEGER PRIMARY KEY, name TEXT)")

    monkeypatch.setattr(feedback.schema, "MIGRATIONS", MIGRATIONS + [add_tags])
    FeedbackStore(path).close()
    FeedbackStore(path).close()
    assert calls == [1]
    assert query(path, "SELECT MAX(version) FROM schema_version") == [(len(MIGRATIONS) + 1,)]


def test_failed_migration_changes_nothing(tmp_path, monkeypatch):
    path = tmp_path / "feedback.db"
    FeedbackStore(path).close()

    def broken(db):
        db.execute("CREATE TABLE half_done (id INTEGER PRIMARY KEY)")
        raise RuntimeError("migration bug")

    monkeypatch.setattr(feedback.schema, "MIGRATIONS", MIGRATIONS + [broken])
    with pytest.raises(RuntimeError, match="migration bug"):
        FeedbackStore(path)
    assert query(path, "SELECT name FROM sqlite_master WHERE name = 'half_done'") == []
    assert query(path, "SELECT MAX(version) FROM schema_version") == [(len(MIGRATIONS),)]


def dump(path: Path) -> dict[str, list[tuple]]:
    """Every row of every feedback table, by table."""
    return {table: query(path, f"SELECT * FROM {table} ORDER BY id") for table in feedback.TABLES + ("imports",)}


def test_v3_migration_keeps_every_row_and_id_and_allows_rank_replies(tmp_path, monkeypatch):
    path = tmp_path / "feedback.db"
    with monkeypatch.context() as m:  # a database written by the code of schema version 2
        m.setattr(feedback.schema, "MIGRATIONS", MIGRATIONS[:2])
        with FeedbackStore(path) as old:
            user = old.ensure_user("ada", profile="physician")
            conv = old.new_conversation(user, system_prompt="Be brief.")
            old.add_message(conv, "user", "What is 2+2?")
            r1, r2, r3 = (add_reply(old, conv, text) for text in ("4", "Four.", "It is four."))
            old.set_vote(r1, user, -1, reason="Too short")
            old.add_comparison(r1, r2, "b", user)
            old.add_correction(r1, "2 + 2 = 4.", user)
            old.add_ranking([r3, r2, r1], user)
            old.import_pair([{"role": "user", "content": "Hi"}], "Hello!", "Go away.", "pairs.jsonl")
            with pytest.raises(FeedbackError, match="CHECK"):
                add_reply(old, conv, "Four!", source="rank")  # the old schema refuses it
            assert old.schema_version() == 2
    before = dump(path)
    with FeedbackStore(path) as store:
        assert store.schema_version() == len(MIGRATIONS) >= 3
        assert dump(path) == before  # every row, every id, every value
        r4 = add_reply(store, conv, "Four!", source="rank")
        assert r4 == max(r for (r, *_) in before["replies"]) + 1
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            store.db().execute("UPDATE replies SET source = 'magic' WHERE id = ?", [r4])
        assert store.db().execute("PRAGMA foreign_keys").fetchone() == (1,)  # back on after the migration
        with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
            store.db().execute("INSERT INTO votes (reply_id, user_id, value, created_at, updated_at) VALUES (999, ?, 1, 'x', 'x')", [user])
        store.set_vote(r2, user, 1)  # the references still resolve through the rebuilt table
        out = tmp_path / "pref.jsonl"
        # comparison, correction, the ranking's 3 pairs, import; the comparison, the ranking
        # and the votes (4 down, Four. up) agree on Four. ≻ 4: one pair
        assert store.export("preference", out) == 1 + 3 + 1
    assert query(path, "PRAGMA foreign_key_check") == []
    assert query(path, "PRAGMA integrity_check") == [("ok",)]
    assert query(path, "SELECT name FROM sqlite_master WHERE tbl_name = 'replies' AND type = 'index'") == [("idx_replies_conversation_id",)]


def test_migration_that_would_leave_broken_references_changes_nothing(tmp_path, monkeypatch):
    path = tmp_path / "feedback.db"
    with monkeypatch.context() as m:
        m.setattr(feedback.schema, "MIGRATIONS", MIGRATIONS[:2])
        FeedbackStore(path).close()
    conn = sqlite3.connect(path)  # foreign keys off, as any other program opens it
    conn.execute("INSERT INTO users (id, name, created_at) VALUES (1, 'ada', 'x')")
    conn.execute("INSERT INTO votes (reply_id, user_id, value, created_at, updated_at) VALUES (999, 1, 1, 'x', 'x')")
    conn.commit()
    conn.close()
    with pytest.raises(StoreUnavailable, match="broken reference"):
        FeedbackStore(path)
    assert query(path, "SELECT MAX(version) FROM schema_version") == [(2,)]
    assert "'rank'" not in query(path, "SELECT sql FROM sqlite_master WHERE name = 'replies'")[0][0]


def test_database_newer_than_the_code_is_refused(tmp_path):
    path = tmp_path / "feedback.db"
    FeedbackStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO schema_version VALUES (99, '2030-01-01T00:00:00+00:00')")
    conn.commit()
    conn.close()
    with pytest.raises(StoreUnavailable, match="newer than this code"):
        FeedbackStore(path)


def test_connection_uses_wal_and_explicit_busy_timeout(tmp_path):
    with FeedbackStore(tmp_path / "feedback.db", busy_timeout_ms=1234) as store:
        db = store.db()
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA busy_timeout").fetchone()[0] == 1234
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert query(tmp_path / "feedback.db", "PRAGMA journal_mode") == [("wal",)]


def test_each_thread_gets_its_own_connection(store):
    seen = []
    thread = threading.Thread(target=lambda: seen.append(store.db()))
    thread.start()
    thread.join()
    assert seen[0] is not store.db()


def test_closed_store_refuses_to_work(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.db")
    store.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        store.ensure_user("ada")


# -- writes store the right rows --------------------------------------------------


def test_ensure_user_strips_the_name_and_upserts_by_it(store):
    first = store.ensure_user("  ada ", profile="physician")
    assert store.ensure_user("ada") == first
    assert query(store.path, "SELECT name, profile FROM users") == [("ada", "physician")]
    assert store.ensure_user("ada", profile="nurse") == first
    assert query(store.path, "SELECT name, profile FROM users") == [("ada", "nurse")]


@pytest.mark.parametrize("name", ["", "   ", "x" * 101])
def test_ensure_user_rejects_empty_or_overlong_names(store, name):
    with pytest.raises(FeedbackError, match="user name"):
        store.ensure_user(name)
    assert store.counts()["users"] == 0


def test_new_conversation_and_add_message_store_rows(store):
    user = store.ensure_user("ada")
    conv = store.new_conversation(user, system_prompt="Be brief.")
    message = store.add_message(conv, "user", "What is 2+2?")
    assert len(conv) == 32 and int(conv, 16) >= 0
    assert query(store.path, "SELECT id, user_id, system_prompt FROM conversations") == [(conv, user, "Be brief.")]
    assert query(store.path, "SELECT id, conversation_id, role, content FROM messages") == [
        (message, conv, "user", "What is 2+2?")]


def test_new_conversation_may_be_anonymous(store):
    conv = store.new_conversation(None)
    assert query(store.path, "SELECT user_id FROM conversations WHERE id = ?", [conv]) == [(None,)]


def test_add_message_to_unknown_conversation_is_rejected(store):
    with pytest.raises(FeedbackError, match="unknown conversation id"):
        store.add_message("nope", "user", "hello")
    assert store.counts()["messages"] == 0


def test_add_reply_stores_everything_training_needs(store, chat):
    reply = store.get_reply(chat.r2)
    created_at = reply.pop("created_at")
    assert reply == {
        "id": chat.r2, "conversation_id": chat.conv, "context": CTX, "text": "Four.", "params": PARAMS,
        "model": "SmolLM2-135M-Instruct", "adapter_version": "base", "prompt_tokens": 12,
        "completion_tokens": 3, "latency_ms": 41.5, "ttft_ms": 9.25, "finish_reason": "stop",
        "source": "regenerate",
    }
    assert datetime.datetime.fromisoformat(created_at).utcoffset() == datetime.timedelta(0)


@pytest.mark.parametrize("overrides, message", [
    ({"source": "magic"}, "source"),
    ({"context": []}, "context"),
    ({"context": [{"role": "robot", "content": "hi"}]}, "role"),
    ({"params": {"bad": object()}}, "params"),
    ({"prompt_tokens": -1}, "prompt_tokens"),
    ({"latency_ms": float("nan")}, "latency_ms"),
])
def test_add_reply_rejects_bad_input(store, chat, overrides, message):
    with pytest.raises(FeedbackError, match=message):
        add_reply(store, chat.conv, "x", **overrides)
    assert store.counts()["replies"] == 3


def test_get_reply_of_unknown_id_raises(store):
    with pytest.raises(FeedbackError, match="unknown reply id 42"):
        store.get_reply(42)


def test_changing_and_removing_a_vote_updates_one_row_and_appends_events(store, chat):
    vote = store.set_vote(chat.r1, chat.user, 1)
    assert store.set_vote(chat.r1, chat.user, -1, reason="wrong maths") == vote
    assert store.set_vote(chat.r1, chat.user, 0) == vote
    assert query(store.path, "SELECT id, reply_id, user_id, value, reason FROM votes") == [
        (vote, chat.r1, chat.user, 0, "")]
    assert query(store.path, "SELECT vote_id, value, reason FROM vote_events ORDER BY id") == [
        (vote, 1, ""), (vote, -1, "wrong maths"), (vote, 0, "")]


def test_repeating_the_current_vote_records_no_event(store, chat):
    store.set_vote(chat.r1, chat.user, 1, reason="right")
    store.set_vote(chat.r1, chat.user, 1, reason="right")
    assert store.counts()["vote_events"] == 1


@pytest.mark.parametrize("value", [2, -2, True, "1", 1.0])
def test_vote_value_must_be_up_down_or_removed(store, chat, value):
    with pytest.raises(FeedbackError, match="vote value"):
        store.set_vote(chat.r1, chat.user, value)
    assert store.counts()["votes"] == 0


@pytest.mark.parametrize("write", [
    lambda s, c: s.set_vote(999, c.user, 1),
    lambda s, c: s.add_comparison(c.r1, 999, "a", c.user),
    lambda s, c: s.add_correction(999, "better", c.user),
    lambda s, c: s.add_ranking([c.r1, 999], c.user),
], ids=["vote", "comparison", "correction", "ranking"])
def test_unknown_reply_id_raises_and_stores_nothing(store, chat, write):
    before = store.counts()
    with pytest.raises(FeedbackError, match="unknown reply id 999"):
        write(store, chat)
    assert store.counts() == before


def test_unknown_user_id_raises_and_stores_nothing(store, chat):
    with pytest.raises(FeedbackError, match="unknown user id 77"):
        store.set_vote(chat.r1, 77, 1)
    assert store.counts()["votes"] == 0


def test_add_comparison_stores_the_choice(store, chat):
    comparison = store.add_comparison(chat.r1, chat.r2, "both_bad", chat.user)
    assert query(store.path, "SELECT id, reply_a_id, reply_b_id, choice, user_id FROM comparisons") == [
        (comparison, chat.r1, chat.r2, "both_bad", chat.user)]


def test_comparison_of_replies_to_different_contexts_is_rejected(store, chat):
    with pytest.raises(FeedbackError, match="different contexts"):
        store.add_comparison(chat.r1, chat.r3, "a", chat.user)
    assert store.counts()["comparisons"] == 0


@pytest.mark.parametrize("choice", ["A", "left", "", None])
def test_comparison_choice_must_be_a_b_tie_or_both_bad(store, chat, choice):
    with pytest.raises(FeedbackError, match="choice"):
        store.add_comparison(chat.r1, chat.r2, choice, chat.user)


def test_comparison_of_a_reply_with_itself_is_rejected(store, chat):
    with pytest.raises(FeedbackError, match="two different replies"):
        store.add_comparison(chat.r1, chat.r1, "a", chat.user)


def test_add_correction_stores_the_edit_and_leaves_the_original(store, chat):
    correction = store.add_correction(chat.r1, "2 + 2 = 4.", chat.user)
    assert query(store.path, "SELECT id, reply_id, text, user_id FROM corrections") == [
        (correction, chat.r1, "2 + 2 = 4.", chat.user)]
    assert store.get_reply(chat.r1)["text"] == "4"


@pytest.mark.parametrize("text, message", [("", "empty"), ("  \n", "empty"), (" 4 ", "identical")])
def test_correction_must_change_the_reply(store, chat, text, message):
    with pytest.raises(FeedbackError, match=message):
        store.add_correction(chat.r1, text, chat.user)
    assert store.counts()["corrections"] == 0


def test_replies_may_come_from_a_ranking(store, chat):
    assert store.get_reply(add_reply(store, chat.conv, "Four!", source="rank"))["source"] == "rank"


def test_add_ties_stores_every_pair_as_a_tie_in_one_write(store, chat, tmp_path):
    r4 = add_reply(store, chat.conv, "It is four.", source="rank")
    ids = store.add_ties([chat.r1, chat.r2, r4], chat.user)
    assert query(store.path, "SELECT id, reply_a_id, reply_b_id, choice FROM comparisons ORDER BY id") == [
        (ids[0], chat.r1, chat.r2, "tie"), (ids[1], chat.r1, r4, "tie"), (ids[2], chat.r2, r4, "tie")]
    assert store.export("preference", tmp_path / "pref.jsonl") == 0  # a tie prefers nothing


def test_bad_tie_stores_nothing(store, chat):
    with pytest.raises(FeedbackError, match="different contexts"):
        store.add_ties([chat.r1, chat.r2, chat.r3], chat.user)  # r3's context differs: not even the first pair is kept
    with pytest.raises(FeedbackError, match="at least 2"):
        store.add_ties([chat.r1], chat.user)
    assert store.counts()["comparisons"] == 0


def test_add_ranking_stores_ids_best_first(store, chat):
    r4 = add_reply(store, chat.conv, "It is four.")
    ranking = store.add_ranking([r4, chat.r1, chat.r2], chat.user)
    [(stored_id, reply_ids, user)] = query(store.path, "SELECT id, reply_ids, user_id FROM rankings")
    assert (stored_id, json.loads(reply_ids), user) == (ranking, [r4, chat.r1, chat.r2], chat.user)


@pytest.mark.parametrize("pick, message", [
    (lambda c: [c.r1], "at least 2"),
    (lambda c: [c.r1, c.r2, c.r1], "each reply once"),
    (lambda c: [c.r1, c.r3], "different contexts"),
], ids=["k<2", "duplicate", "contexts"])
def test_bad_ranking_is_rejected(store, chat, pick, message):
    with pytest.raises(FeedbackError, match=message):
        store.add_ranking(pick(chat), chat.user)
    assert store.counts()["rankings"] == 0


def test_failed_write_leaves_no_partial_rows(store, chat):
    # The vote row is inserted before its event; make the event insert fail.
    store.db().execute("CREATE TRIGGER no_events BEFORE INSERT ON vote_events "
                       "BEGIN SELECT RAISE(ABORT, 'events are off'); END")
    with pytest.raises(FeedbackError, match="events are off"):
        store.set_vote(chat.r1, chat.user, 1)
    assert query(store.path, "SELECT COUNT(*) FROM votes") == [(0,)]


def test_counts_reports_rows_per_table(store, chat):
    store.set_vote(chat.r1, chat.user, 1)
    assert store.counts() == {
        "users": 1, "conversations": 1, "messages": 0, "replies": 3, "votes": 1, "vote_events": 1,
        "comparisons": 0, "corrections": 0, "rankings": 0,
    }


# -- export ---------------------------------------------------------------------


def test_export_preference_pairs(store, chat, tmp_path):
    r4 = add_reply(store, chat.conv, "It is four.")
    store.add_comparison(chat.r1, chat.r2, "b", chat.user)      # Four. > 4
    store.add_comparison(chat.r1, chat.r2, "tie", chat.user)    # no pair
    store.add_comparison(chat.r1, chat.r2, "both_bad", chat.user)  # no pair
    store.add_correction(chat.r3, "Blue, like the sky.", chat.user)
    store.add_ranking([r4, chat.r1, chat.r2], chat.user)  # its 4 > Four. contradicts the comparison
    out = tmp_path / "pref.jsonl"
    assert store.export("preference", out) == 4
    assert read_jsonl(out) == [
        {"prompt": CTX, "chosen": assistant("Four."), "rejected": assistant("4")},  # 1 to 1: the first judgement
        {"prompt": OTHER_CTX, "chosen": assistant("Blue, like the sky."), "rejected": assistant("Blue.")},
        {"prompt": CTX, "chosen": assistant("It is four."), "rejected": assistant("4")},
        {"prompt": CTX, "chosen": assistant("It is four."), "rejected": assistant("Four.")},
    ]


def test_export_preference_merges_repeated_judgements_into_the_majority(store, chat, tmp_path):
    bob, eve = store.ensure_user("bob"), store.ensure_user("eve")
    store.add_comparison(chat.r1, chat.r2, "a", chat.user)  # 4 > Four.
    store.add_comparison(chat.r2, chat.r1, "a", bob)        # Four. > 4
    store.add_comparison(chat.r1, chat.r2, "b", eve)        # Four. > 4
    out = tmp_path / "pref.jsonl"
    assert store.export("preference", out) == 1
    assert read_jsonl(out) == [{"prompt": CTX, "chosen": assistant("Four."), "rejected": assistant("4")}]


def test_export_preference_holds_the_pairs_the_trainer_trains_on(store, chat, tmp_path):
    from assistant.feedback import build_examples, prompt_messages, read_snapshot
    r4 = add_reply(store, chat.conv, "It is four.")
    store.set_vote(chat.r1, chat.user, 1)
    store.set_vote(chat.r2, chat.user, -1)                # up vs down on one prompt: a pair
    store.add_comparison(r4, chat.r1, "b", chat.user)
    store.add_ranking([chat.r2, r4], chat.user)
    store.add_correction(chat.r3, "Blue, like the sky.", chat.user)
    out = tmp_path / "pref.jsonl"
    store.export("preference", out)
    pairs = build_examples(read_snapshot(store.path)).pairs
    assert read_jsonl(out) == [
        {"prompt": prompt_messages(p.prompt), "chosen": assistant(p.chosen), "rejected": assistant(p.rejected)}
        for p in pairs]
    assert {(row["chosen"][0]["content"], row["rejected"][0]["content"]) for row in read_jsonl(out)} == {
        ("4", "It is four."), ("Four.", "It is four."), ("Blue, like the sky.", "Blue."), ("4", "Four.")}


def test_export_kto_labels_from_current_votes(store, chat, tmp_path):
    bob = store.ensure_user("bob")
    store.set_vote(chat.r1, chat.user, 1)
    store.set_vote(chat.r2, chat.user, -1, reason="verbose")
    store.set_vote(chat.r3, bob, 1)
    store.set_vote(chat.r3, bob, 0)  # removed: skipped
    out = tmp_path / "kto.jsonl"
    assert store.export("kto", out) == 2
    assert read_jsonl(out) == [
        {"prompt": CTX, "completion": assistant("4"), "label": True, "reason": ""},
        {"prompt": CTX, "completion": assistant("Four."), "label": False, "reason": "verbose"},
    ]


def test_export_kto_carries_the_reason_of_the_current_vote_only(store, chat, tmp_path):
    store.set_vote(chat.r1, chat.user, -1, reason="Too long; rambles")
    store.set_vote(chat.r1, chat.user, 1)  # changed without a reason: the old reason does not stay
    store.set_vote(chat.r2, chat.user, -1, reason="Incorrect")
    out = tmp_path / "kto.jsonl"
    store.export("kto", out)
    assert [(row["label"], row["reason"]) for row in read_jsonl(out)] == [(True, ""), (False, "Incorrect")]
    assert query(store.path, "SELECT value, reason FROM vote_events ORDER BY id") == [
        (-1, "Too long; rambles"), (1, ""), (-1, "Incorrect")]


def test_export_sft_from_upvotes_winners_and_corrections(store, chat, tmp_path):
    bob = store.ensure_user("bob")
    store.set_vote(chat.r1, chat.user, 1)
    store.set_vote(chat.r1, bob, 1)                       # same reply again: one row
    store.set_vote(chat.r3, chat.user, -1)                # down votes never become SFT data
    store.add_comparison(chat.r1, chat.r2, "b", chat.user)
    store.add_correction(chat.r3, "Blue, like the sky.", chat.user)
    out = tmp_path / "sft.jsonl"
    assert store.export("sft", out) == 3
    assert read_jsonl(out) == [
        {"messages": CTX + assistant("4")},
        {"messages": CTX + assistant("Four.")},
        {"messages": OTHER_CTX + assistant("Blue, like the sky.")},
    ]


def test_export_sft_leaves_out_a_reply_most_people_voted_down(store, chat, tmp_path):
    bob, eve = store.ensure_user("bob"), store.ensure_user("eve")
    store.set_vote(chat.r1, chat.user, 1)
    store.set_vote(chat.r1, bob, -1)
    store.set_vote(chat.r1, eve, -1)
    store.set_vote(chat.r2, chat.user, 1)
    out = tmp_path / "sft.jsonl"
    assert store.export("sft", out) == 1
    assert read_jsonl(out) == [{"messages": CTX + assistant("Four.")}]


def test_failed_export_leaves_the_old_file_and_no_temp_file(store, chat, tmp_path, monkeypatch):
    store.set_vote(chat.r1, chat.user, 1)
    out = tmp_path / "exports" / "kto.jsonl"
    out.parent.mkdir()
    out.write_text("previous export\n")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(feedback.export.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        store.export("kto", out)
    assert out.read_text() == "previous export\n"
    assert [p.name for p in out.parent.iterdir()] == ["kto.jsonl"]


def test_export_rejects_unknown_format(store, tmp_path):
    with pytest.raises(FeedbackError, match="preference, kto, sft"):
        store.export("csv", tmp_path / "x.csv")
    assert not (tmp_path / "x.csv").exists()


# -- command line -------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "assistant.feedback", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def test_cli_export_writes_jsonl_and_reports_the_count(store, chat, tmp_path):
    store.add_comparison(chat.r1, chat.r2, "a", chat.user)
    out = tmp_path / "pref.jsonl"
    done = run_cli("export", "--format", "preference", str(out), "--db", str(store.path))
    assert done.returncode == 0, done.stderr
    assert "wrote 1 preference rows" in done.stdout
    assert read_jsonl(out) == [{"prompt": CTX, "chosen": assistant("4"), "rejected": assistant("Four.")}]


def test_cli_stats_prints_rows_per_table(store, chat):
    done = run_cli("stats", "--db", str(store.path))
    assert done.returncode == 0, done.stderr
    counts = dict(line.split() for line in done.stdout.splitlines())
    assert counts["replies"] == "3" and counts["votes"] == "0"


@pytest.mark.parametrize("command", [["stats"], ["export", "--format", "kto", "out.jsonl"]])
def test_cli_with_missing_database_exits_2_without_creating_one(tmp_path, command):
    missing = tmp_path / "nowhere" / "feedback.db"
    done = run_cli(*command, "--db", str(missing))
    assert done.returncode == 2
    assert "no feedback database" in done.stderr
    assert not missing.parent.exists()


def test_cli_help_lists_the_commands():
    done = run_cli("--help")
    assert done.returncode == 0
    assert "export" in done.stdout and "stats" in done.stdout


# -- an unavailable database ----------------------------------------------------------


def test_write_to_read_only_database_raises_and_loses_nothing(tmp_path):
    path = tmp_path / "feedback.db"
    with FeedbackStore(path) as store:
        user = store.ensure_user("ada")
        reply = add_reply(store, store.new_conversation(user), "4")
        store.set_vote(reply, user, 1)
        before = store.counts()
    with FeedbackStore(path, readonly=True) as readonly:
        with pytest.raises(StoreUnavailable, match="read-only; your feedback was not saved"):
            readonly.set_vote(reply, user, -1)
        assert readonly.counts() == before
    with FeedbackStore(path) as store:
        assert store.counts() == before
        assert query(path, "SELECT value FROM votes") == [(1,)]


def test_read_only_store_needs_an_existing_file(tmp_path):
    with pytest.raises(StoreUnavailable, match="no feedback database"):
        FeedbackStore(tmp_path / "missing.db", readonly=True)
    assert not (tmp_path / "missing.db").exists()


def test_write_while_another_process_holds_the_lock_raises(tmp_path):
    path = tmp_path / "feedback.db"
    with FeedbackStore(path, busy_timeout_ms=50) as store:
        user = store.ensure_user("ada")
        reply = add_reply(store, store.new_conversation(user), "4")
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(StoreUnavailable, match="locked .*your feedback was not saved"):
                store.set_vote(reply, user, 1)
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert store.counts()["votes"] == 0
        store.set_vote(reply, user, 1)  # works again once the lock is gone
        assert store.counts()["votes"] == 1


def test_file_that_is_not_a_database_raises(tmp_path):
    path = tmp_path / "feedback.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreUnavailable, match="not a usable feedback database"):
        FeedbackStore(path)


def test_path_that_cannot_be_opened_raises(tmp_path):
    (tmp_path / "a_directory").mkdir()
    with pytest.raises(StoreUnavailable, match="cannot open feedback database"):
        FeedbackStore(tmp_path / "a_directory")


# -- concurrency ----------------------------------------------------------------------


def test_32_threads_voting_at_once_store_every_vote_exactly_once(store, chat):
    users = [store.ensure_user(f"user{i}") for i in range(32)]
    replies = [add_reply(store, chat.conv, f"answer {i}") for i in range(10)]
    errors = []
    start = threading.Barrier(len(users))

    def vote(user):
        try:
            start.wait()
            for value in (1, -1, 1):
                for reply in replies:
                    store.set_vote(reply, user, value)
        except Exception as e:  # collected and asserted on below
            errors.append(e)

    threads = [threading.Thread(target=vote, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert query(store.path, "SELECT COUNT(*), COUNT(DISTINCT reply_id || '-' || user_id), MIN(value), MAX(value) "
                             "FROM votes WHERE user_id != ?", [chat.user]) == [(320, 320, 1, 1)]
    assert store.counts()["vote_events"] == 320 * 3
