"""Tests for importing preference data sets (trainer/data.py import_preferences and
FeedbackStore.import_pair): HH-RLHF and TRL formats, idempotence, bad lines.

The HH-RLHF test file lives outside the project, in ../shared/data/; the tests that
need it skip when it is missing, except under CI=true, where they fail.
Run: python -m pytest tests/test_import.py -q
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from assistant.feedback import FeedbackStore
from trainer.data import build_examples, import_preferences, read_snapshot, split

HH = Path(__file__).resolve().parents[2] / "shared/data/hh-harmless-dev.jsonl"
HH_LINES = 1156


def require_hh() -> Path:
    if not HH.is_file():
        message = f"HH-RLHF test data not found at {HH} (the shared reference data sets are not checked out)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return HH


@pytest.fixture(scope="module")
def hh(tmp_path_factory):
    """The HH file imported once into a fresh store: (db path, report)."""
    path = require_hh()
    db = tmp_path_factory.mktemp("hh") / "feedback.db"
    with FeedbackStore(db) as store:
        report = import_preferences(store, path, progress=False)
    return db, report


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def pairs_in(db: Path) -> set[tuple[tuple, str, str]]:
    return {(p.prompt, p.chosen, p.rejected) for p in build_examples(read_snapshot(db)).pairs}


def rows(db: Path, table: str) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    finally:
        conn.close()


@pytest.fixture
def store(tmp_path):
    s = FeedbackStore(tmp_path / "feedback.db")
    yield s
    s.close()


# -- HH-RLHF ----------------------------------------------------------------------


def test_hh_file_adds_one_comparison_per_well_formed_line(hh):
    db, report = hh
    assert report.added + len(report.errors) == HH_LINES
    assert report.skipped == 0
    assert len(report.errors) < 10, f"{len(report.errors)} malformed lines: {report.errors}"
    assert rows(db, "comparisons") == rows(db, "imports") == report.added


def test_hh_malformed_lines_are_reported_with_their_line_numbers(hh):
    _, report = hh
    assert all(1 <= line <= HH_LINES and message for line, message in report.errors)


def test_importing_the_hh_file_twice_adds_nothing(hh):
    db, first = hh
    with FeedbackStore(db) as store:
        before = store.counts()
        again = import_preferences(store, HH, progress=False)
        assert store.counts() == before
    assert (again.added, again.skipped, len(again.errors)) == (0, first.added, len(first.errors))


def test_hh_pairs_come_back_as_pairs_with_the_right_chosen_and_rejected(hh):
    db, report = hh
    bad = {line for line, _ in report.errors}
    expected = set()
    for line_no, line in enumerate(HH.read_text(encoding="utf-8").splitlines(), start=1):
        if line_no not in bad:
            record = json.loads(line)
            expected.add(tuple(record[k].rsplit("\n\nAssistant:", 1)[1].strip() for k in ("chosen", "rejected")))
    assert {(chosen, rejected) for _, chosen, rejected in pairs_in(db)} == expected


def test_hh_prompt_holds_every_turn_before_the_last_reply(store, tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [{
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: How tall is Everest?\n\nAssistant: 8,849 m.",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: How tall is Everest?\n\nAssistant: Tall.",
    }])
    import_preferences(store, path, progress=False)
    prompt = (("user", "Hi"), ("assistant", "Hello."), ("user", "How tall is Everest?"))
    assert pairs_in(store.path) == {(prompt, "8,849 m.", "Tall.")}


def test_hh_split_puts_no_prompt_on_both_sides(hh):
    db, _ = hh
    train, val = split(build_examples(read_snapshot(db)), 0.2, "split-v1")
    assert train.pairs and val.pairs
    assert not {p.prompt for p in train.pairs} & {p.prompt for p in val.pairs}


def test_the_same_file_imported_into_a_fresh_store_splits_the_same_way(hh, tmp_path):
    db, _ = hh
    again = tmp_path / "again.db"
    with FeedbackStore(again) as store:
        import_preferences(store, HH, progress=False)

    def sides(path):
        train, val = split(build_examples(read_snapshot(path)), 0.2, "split-v1")
        return {(p.prompt, p.chosen) for p in train.pairs}, {(p.prompt, p.chosen) for p in val.pairs}

    assert sides(again) == sides(db)


# -- TRL preference format -----------------------------------------------------------


def test_trl_string_format_is_imported(store, tmp_path):
    path = write_jsonl(tmp_path / "trl.jsonl", [{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."}])
    report = import_preferences(store, path, progress=False)
    assert (report.added, report.errors) == (1, [])
    assert pairs_in(store.path) == {((("user", "Capital of France?"),), "Paris.", "Lyon.")}


def test_trl_conversational_format_is_imported(store, tmp_path):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    path = write_jsonl(tmp_path / "trl.jsonl", [{
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "Paris."}],
        "rejected": [{"role": "assistant", "content": "Lyon."}],
    }])
    import_preferences(store, path, progress=False)
    assert pairs_in(store.path) == {((("system", "Be brief."), ("user", "Capital of France?")), "Paris.", "Lyon.")}


def test_trl_implicit_prompt_format_is_imported(store, tmp_path):
    question = {"role": "user", "content": "Capital of France?"}
    path = write_jsonl(tmp_path / "trl.jsonl", [{
        "chosen": [question, {"role": "assistant", "content": "Paris."}],
        "rejected": [question, {"role": "assistant", "content": "Lyon."}],
    }])
    import_preferences(store, path, progress=False)
    assert pairs_in(store.path) == {((("user", "Capital of France?"),), "Paris.", "Lyon.")}


def test_the_same_pair_from_another_file_is_skipped(store, tmp_path):
    record = {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."}
    import_preferences(store, write_jsonl(tmp_path / "one.jsonl", [record]), progress=False)
    report = import_preferences(store, write_jsonl(tmp_path / "two.jsonl", [record, record]), progress=False)
    assert (report.added, report.skipped) == (0, 2)
    assert store.counts()["comparisons"] == 1


def test_import_pair_stores_a_comparison_by_the_import_user(store):
    prompt = [{"role": "user", "content": "Capital of France?"}]
    assert store.import_pair(prompt, "Paris.", "Lyon.", source_file="geo.jsonl") is True
    assert store.import_pair(prompt, "Paris.", "Lyon.", source_file="geo.jsonl") is False
    conn = sqlite3.connect(store.path)
    try:
        user = conn.execute("SELECT u.name, u.profile FROM comparisons c JOIN users u ON u.id = c.user_id").fetchall()
        winner = conn.execute("SELECT r.text, c.choice FROM comparisons c JOIN replies r ON r.id = c.reply_a_id").fetchall()
    finally:
        conn.close()
    assert (user, winner) == ([("import", "geo.jsonl")], [("Paris.", "a")])


# -- bad lines -------------------------------------------------------------------


def test_malformed_lines_are_reported_with_line_numbers_and_store_nothing(store, tmp_path):
    good = {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."}
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        good,                                                                    # 1
        "{not json",                                                             # 2
        {"prompt": "Capital of Italy?", "chosen": "Rome."},                      # 3: no rejected
        {"prompt": "Capital of Spain?", "chosen": "  ", "rejected": "Porto."},   # 4: empty chosen
        {"chosen": "\n\nHuman: A?\n\nAssistant: a", "rejected": "\n\nHuman: B?\n\nAssistant: b"},  # 5
        "[1, 2]",                                                                # 6: not an object
        {"chosen": "Paris.", "rejected": "Lyon."},                               # 7: no prompt anywhere
        "",                                                                      # 8: blank, ignored
        {"prompt": "Capital of Peru?", "chosen": "Lima.", "rejected": "Cusco."},  # 9
    ])
    report = import_preferences(store, path, progress=False)
    assert [line for line, _ in report.errors] == [2, 3, 4, 5, 6, 7]
    assert report.added == 2
    counts = store.counts()
    assert (counts["conversations"], counts["replies"], counts["comparisons"]) == (2, 4, 2)


def test_a_pair_the_database_refuses_leaves_no_trace(store, tmp_path):
    conn = sqlite3.connect(store.path)
    conn.execute("CREATE TRIGGER no_comparisons BEFORE INSERT ON comparisons "
                 "BEGIN SELECT RAISE(ABORT, 'comparisons are off'); END")
    conn.commit()
    conn.close()
    path = write_jsonl(tmp_path / "trl.jsonl", [{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."}])
    report = import_preferences(store, path, progress=False)
    assert report.added == 0 and [line for line, _ in report.errors] == [1]
    assert "comparisons are off" in report.errors[0][1]
    assert all(n == 0 for n in store.counts().values())
