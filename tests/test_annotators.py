"""Tests for assistant/annotators.py and what builds on it: the reliability weight and
its figures, gold items and repeats in the store, the gold-item import, Compare mode
mixing checks in (through the real UI handlers on the tiny model), and the weights
`build_examples` gives pairs.

Feedback is written through FeedbackStore's own methods under tmp_path; the UI tests
stream real replies from the tiny seeded model on CPU.
Run: python -m pytest tests/test_annotators.py -q
"""

from __future__ import annotations

import json
import math
import random

import pytest

from assistant import annotators, ui
from assistant.annotators import Checks
from assistant.chat import Engine
from assistant.config import ModelArgs, ServeArgs
from assistant.feedback import FeedbackError, FeedbackStore
from assistant.model import build_policy
from trainer.data import build_examples, read_snapshot

CTX = [{"role": "user", "content": "What is 2+2?"}]


def add_reply(store: FeedbackStore, conversation_id: str, text: str, context=CTX, source: str = "compare") -> int:
    return store.add_reply(
        conversation_id=conversation_id, context=context, text=text, params={"temperature": 0.7}, model="tiny",
        adapter_version="base", prompt_tokens=3, completion_tokens=4, latency_ms=5.0, ttft_ms=1.0,
        finish_reason="stop", source=source,
    )


@pytest.fixture
def store(tmp_path):
    s = FeedbackStore(tmp_path / "feedback.db")
    yield s
    s.close()


def audited(store: FeedbackStore, name: str, *, gold: tuple[int, int] = (0, 0), repeats: tuple[int, int] = (0, 0)) -> int:
    """A user with `gold` = (right, wrong) answers to gold items and `repeats` = (same,
    different) answers to repeats of their own comparisons; returns the user id."""
    uid = store.ensure_user(name)
    right, wrong = gold
    for i in range(right + wrong):
        gid, _ = store.add_gold_item([{"role": "user", "content": f"gold question {i}"}], f"good {i}", f"bad {i}", "test")
        store.add_gold_answer(gid, uid, "a", "a" if i < right else "b")
    same, different = repeats
    conv = store.new_conversation(uid)
    for i in range(same + different):
        context = [{"role": "user", "content": f"{name} asks {i}"}]
        ra, rb = (add_reply(store, conv, f"{name} reply {i}{x}", context) for x in "ab")
        cid = store.add_comparison(ra, rb, "a", uid)
        store.add_repeat_answer(cid, uid, "a" if i < same else "b")
    return uid


def figures(store: FeedbackStore, floor: float = annotators.DEFAULT_FLOOR) -> dict[str, annotators.Annotator]:
    return {a.name: a for a in annotators.read_annotators(store.db(), floor)}


# -- the weight, pure ----------------------------------------------------------------------


def test_a_newcomer_has_the_neutral_weight_neither_trusted_nor_excluded():
    w = annotators.weigh(Checks())
    assert w.weight == annotators.PRIOR_SKILL == 0.5
    assert not w.excluded and annotators.DEFAULT_FLOOR < w.weight < 1


def test_the_weight_follows_the_beta_posterior_formula():
    c = Checks(gold_n=10, gold_correct=9, repeat_n=4, repeat_consistent=3)
    k = annotators.PRIOR_STRENGTH
    acc = (9 + k * 0.75) / (10 + k)
    cons = (3 + k * 0.625) / (4 + k)
    q_gold, q_repeat = 2 * acc - 1, math.sqrt(2 * cons - 1)
    expected = (q_gold * (10 + k) + q_repeat * (4 + k)) / (10 + 4 + 2 * k)
    assert annotators.reliability(c) == pytest.approx(expected)


def test_evidence_moves_the_weight_away_from_neutral_and_more_evidence_moves_it_further():
    assert annotators.reliability(Checks(5, 5, 0, 0)) > 0.5
    assert annotators.reliability(Checks(20, 20, 0, 0)) > annotators.reliability(Checks(5, 5, 0, 0))
    assert annotators.reliability(Checks(5, 2, 0, 0)) < 0.5
    assert annotators.reliability(Checks(20, 8, 0, 0)) < annotators.reliability(Checks(5, 2, 0, 0))
    assert annotators.reliability(Checks(0, 0, 10, 10)) > 0.5  # consistent alone earns trust too
    assert 0 <= annotators.reliability(Checks(30, 0, 30, 0)) <= annotators.reliability(Checks(30, 30, 30, 30)) <= 1


def test_a_random_answerer_falls_to_the_floor_and_is_excluded_with_the_reason():
    rng = random.Random(3)
    right = sum(rng.random() < 0.5 for _ in range(40))
    same = sum(rng.random() < 0.5 for _ in range(20))
    w = annotators.weigh(Checks(40, right, 20, same))
    assert w.weight < annotators.DEFAULT_FLOOR and w.excluded
    assert f"gold items {right}/40 right" in w.reason and f"repeats {same}/20" in w.reason and "below the floor 0.2" in w.reason
    assert annotators.weigh(Checks(40, right, 20, same), floor=0.0).excluded is False


def test_the_import_user_always_weighs_1():
    assert annotators.weigh(Checks(10, 0, 10, 0), name=annotators.IMPORT_USER) == annotators.Weight(1.0, False)


def test_wilson_interval_matches_known_values():
    assert annotators.wilson(80, 100) == pytest.approx((0.7112, 0.8666), abs=1e-4)
    assert annotators.wilson(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("gold_rate, repeat_rate", [(0.05, 0.05), (0.2, 0.1), (0.0, 0.3)])
def test_draw_gives_gold_and_repeats_at_their_rates(gold_rate, repeat_rate):
    rng, n = random.Random(7), 20_000
    drawn = [annotators.draw(rng, gold_rate, repeat_rate) for _ in range(n)]
    for kind, p in ((annotators.GOLD, gold_rate), (annotators.REPEAT, repeat_rate)):
        k = drawn.count(kind)
        assert abs(k - n * p) <= 4 * math.sqrt(n * p * (1 - p)) + 1, (kind, k, n * p)


def test_agreement_compares_each_persons_choice_with_the_others_majority():
    judged = [(1, "x", "A"), (2, "x", "A"), (3, "x", "A"), (4, "x", "B"),  # 4 is against the three others
              (1, "y", "A"), (2, "y", "B"),  # two people, one each way: each against the other
              (1, "z", "A"), (1, "z", "B"), (1, "z", "A"), (2, "z", "A"),  # 1 counts once, with their majority A
              (1, "w", "A"), (2, "w", "B"), (3, "w", "A"),  # for 1 and 3 the others split: no majority, not counted
              (5, "solo", "A")]  # nobody else judged it
    got = annotators.agreement(judged)
    assert got == {1: (2, 3), 2: (2, 4), 3: (1, 1), 4: (0, 1)}


@pytest.mark.parametrize("typed, group", [(" Nurse. ", "nurse"), ("nurse", "nurse"), ("Python  Developer", "python developer"),
                                          ("", annotators.NO_PROFILE), (None, annotators.NO_PROFILE), ("  ", annotators.NO_PROFILE)])
def test_profiles_are_grouped_by_their_normalised_text(typed, group):
    assert annotators.normalise_profile(typed) == group


def test_the_floor_must_be_a_weight():
    for bad in (-0.1, 1.5, "0.2", True):
        with pytest.raises(ValueError, match="--annotator-floor"):
            annotators.check_floor(bad)
    with pytest.raises(ValueError, match="--annotator-floor must be a weight in 0..1"):
        ServeArgs(annotator_floor=2.0).validate()


# -- gold items and repeats in the store --------------------------------------------------------


def test_a_gold_item_is_stored_once_and_must_have_a_question_and_two_different_replies(store):
    gid, added = store.add_gold_item(CTX, "4", "5", "dashboard")
    assert added and store.add_gold_item(CTX, "4", "5", "again") == (gid, False)
    assert store.gold_item(gid) | {"created_at": None} == {"id": gid, "prompt": CTX, "better": "4", "worse": "5",
                                                           "source": "dashboard", "created_at": None}
    with pytest.raises(FeedbackError, match="same text"):
        store.add_gold_item(CTX, "4", " 4 ", "dashboard")
    with pytest.raises(FeedbackError, match="end with a non-empty user message"):
        store.add_gold_item(CTX + [{"role": "assistant", "content": "4"}], "a", "b", "dashboard")
    with pytest.raises(FeedbackError, match="better reply is empty"):
        store.add_gold_item(CTX, "  ", "5", "dashboard")
    assert len(store.gold_items()) == 1


def test_gold_answers_are_scored_against_the_side_the_better_reply_was_shown_on(store):
    ada = store.ensure_user("ada")
    gids = [store.add_gold_item([{"role": "user", "content": f"q{i}"}], "good", "bad", "t")[0] for i in range(3)]
    store.add_gold_answer(gids[0], ada, "a", "a")  # right
    store.add_gold_answer(gids[1], ada, "b", "a")  # wrong
    store.add_gold_answer(gids[2], ada, "b", "tie")  # a tie on a known answer is wrong
    assert store.unanswered_gold(ada) == []
    assert store.unanswered_gold(store.ensure_user("bob")) == gids
    assert figures(store)["ada"].checks == Checks(gold_n=3, gold_correct=1)
    with pytest.raises(FeedbackError, match="better_side"):
        store.add_gold_answer(gids[0], ada, "c", "a")
    with pytest.raises(FeedbackError, match="unknown gold item id"):
        store.add_gold_answer(999, ada, "a", "a")


def test_repeat_candidates_are_own_older_compare_mode_comparisons_not_repeated_yet(store):
    import datetime

    ada, bob = store.ensure_user("ada"), store.ensure_user("bob")
    conv = store.new_conversation(ada)
    mine = store.add_comparison(add_reply(store, conv, "4"), add_reply(store, conv, "Four."), "a", ada)
    store.add_comparison(add_reply(store, conv, "x"), add_reply(store, conv, "y"), "b", bob)  # bob's
    ranked = [add_reply(store, conv, t, source="rank") for t in ("1", "2", "3")]
    store.add_ties(ranked, ada)  # a ranking's ties are no Compare-mode comparison
    store.import_pair(CTX, "four", "five", "pairs.jsonl")  # imported
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1)
    assert store.repeat_candidates(ada, before=later) == [mine]
    assert store.repeat_candidates(ada, before=later - datetime.timedelta(hours=1)) == []  # too recent
    store.add_repeat_answer(mine, ada, "b")
    assert store.repeat_candidates(ada, before=later) == []
    with pytest.raises(FeedbackError, match="repeated already"):
        store.add_repeat_answer(mine, ada, "a")
    bobs = store.repeat_candidates(bob, before=later)
    with pytest.raises(FeedbackError, match="only its author"):
        store.add_repeat_answer(bobs[0], ada, "a")
    assert figures(store)["ada"].checks == Checks(repeat_n=1, repeat_consistent=0)


def test_annotator_figures_count_volume_checks_and_agreement_on_shared_pairs(store):
    ada, bob, cy, dee = (store.ensure_user(n, p) for n, p in (("ada", "Nurse"), ("bob", ""), ("cy", ""), ("dee", "")))
    conv = store.new_conversation(ada)
    r1, r2 = add_reply(store, conv, "4"), add_reply(store, conv, "Four.")
    store.add_comparison(r1, r2, "a", ada)  # "4"
    store.add_comparison(r2, r1, "b", bob)  # the same pair shown the other way round: "4" too
    store.add_comparison(r1, r2, "a", dee)  # "4"
    store.add_comparison(r1, r2, "b", cy)  # "Four.": against everyone else
    store.set_vote(r1, ada, 1)
    store.set_vote(r2, ada, 1)
    store.set_vote(r2, ada, 0)  # removed: no volume
    got = figures(store)
    assert got["ada"].volume == 2 and got["bob"].volume == 1 and got["ada"].profile == "Nurse"
    assert (got["ada"].agree, got["ada"].shared) == (1, 1)  # the others: "4" twice, "Four." once
    assert (got["cy"].agree, got["cy"].shared) == (0, 1)
    assert got["cy"].agreement == 0.0 and got["ada"].agreement == 1.0
    assert got["ada"].gold_accuracy is None and got["ada"].weight == 0.5


def test_a_careful_annotator_is_trusted_and_a_random_one_falls_to_the_floor(store):
    rng = random.Random(11)
    audited(store, "careful", gold=(30, 0), repeats=(15, 0))
    right = sum(rng.random() < 0.5 for _ in range(30))
    same = sum(rng.random() < 0.5 for _ in range(15))
    audited(store, "coin", gold=(right, 30 - right), repeats=(same, 15 - same))
    got = figures(store)
    assert got["careful"].weight > 0.85 and not got["careful"].excluded
    assert got["coin"].weight < annotators.DEFAULT_FLOOR + 0.05 and got["coin"].excluded
    assert "below the floor" in got["coin"].reason
    lo, hi = got["careful"].gold_interval
    assert got["careful"].gold_accuracy == 1.0 and lo == pytest.approx(annotators.wilson(30, 30)[0]) and hi == 1.0
    assert got["careful"].consistency == 1.0
    table = annotators.format_table(list(got.values()))
    assert "careful" in table and "30/30" in table and "below the floor" in table


# -- the gold-item import ---------------------------------------------------------------------


def test_import_gold_reads_trl_preference_and_messages_formats_once(tmp_path):
    path = tmp_path / "gold.jsonl"
    rows = [
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": [{"role": "user", "content": "Capital of France?"}],
         "chosen": [{"role": "assistant", "content": "Paris."}], "rejected": [{"role": "assistant", "content": "Lyon."}]},
        {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]},
        {"prompt": "same", "chosen": "x", "rejected": "x"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    db = tmp_path / "feedback.db"
    assert annotators.main(["import-gold", str(path), "--db", str(db)]) == 1  # two bad lines
    with FeedbackStore(db) as store:
        items = store.gold_items()
        assert [(i["prompt"][-1]["content"], i["better"], i["worse"], i["source"]) for i in items] == [
            ("What is 2+2?", "4", "5", "gold.jsonl"), ("Capital of France?", "Paris.", "Lyon.", "gold.jsonl"),
            ("Hi", "Hello!", "Go away.", "gold.jsonl")]
        report = annotators.import_gold(store, path)
        assert (report.added, report.skipped) == (0, 3)
        assert [n for n, _ in report.errors] == [4, 5]
        assert "same text" in report.errors[0][1] and "not valid JSON" in report.errors[1][1]
        assert store.counts()["comparisons"] == 0  # gold items are not feedback


def test_show_prints_the_table_and_refuses_a_missing_database(tmp_path, capsys, store):
    audited(store, "ada", gold=(3, 1))
    assert annotators.main(["show", "--db", str(store.path)]) == 0
    assert "ada" in capsys.readouterr().out
    assert annotators.main(["show", "--db", str(tmp_path / "none.db")]) == 2
    assert annotators.main(["show", "--db", str(store.path), "--floor", "3"]) == 2


# -- weights in the pairs ---------------------------------------------------------------------


def test_gold_answers_and_repeats_never_become_pairs_and_a_repeat_does_not_count_twice(store):
    ada = audited(store, "ada", gold=(4, 0))
    conv = store.new_conversation(ada)
    r1, r2 = add_reply(store, conv, "4"), add_reply(store, conv, "Four.")
    cid = store.add_comparison(r1, r2, "a", ada)
    store.add_repeat_answer(cid, ada, "a")
    examples = build_examples(read_snapshot(store.path))
    assert [(p.chosen, p.rejected, p.support) for p in examples.pairs] == [("4", "Four.", 1)]
    assert examples.counts["comparison"] == 1 and not examples.pointwise


def test_an_excluded_annotators_feedback_is_left_out_and_counted(store):
    coin = audited(store, "coin", gold=(2, 14))
    ada = store.ensure_user("ada")
    conv = store.new_conversation(ada)
    r1, r2, r3 = add_reply(store, conv, "4"), add_reply(store, conv, "Four."), add_reply(store, conv, "Five.")
    store.add_comparison(r1, r3, "a", ada)
    store.add_comparison(r2, r3, "b", coin)
    store.set_vote(r2, coin, 1)
    store.add_correction(r3, "Four!", coin)
    snapshot = read_snapshot(store.path)
    examples = build_examples(snapshot)
    assert [(p.chosen, p.rejected) for p in examples.pairs] == [("4", "Five.")]
    assert examples.counts["excluded"] == 3 and examples.counts["comparison"] == 1 and examples.counts["thumbs_up"] == 0
    assert "coin" in examples.excluded_users and "gold items 2/16 right" in examples.excluded_users["coin"]
    everyone = build_examples(snapshot, annotator_floor=0.0)
    assert len(everyone.pairs) == 3 and everyone.counts["excluded"] == 0
    with pytest.raises(ValueError, match="--annotator-floor"):
        build_examples(snapshot, annotator_floor=1.5)


def test_pair_weights_combine_the_judges_reliability(store):
    careful = audited(store, "careful", gold=(20, 0))
    new = store.ensure_user("new")
    conv = store.new_conversation(new)
    r1, r2 = add_reply(store, conv, "4"), add_reply(store, conv, "Four.")
    r3, r4 = (add_reply(store, conv, t, [{"role": "user", "content": "Name a colour."}]) for t in ("Blue.", "Loud."))
    store.add_comparison(r1, r2, "a", careful)
    store.add_comparison(r1, r2, "b", new)  # against: the careful one outweighs the newcomer
    store.add_comparison(r3, r4, "a", new)
    store.import_pair(CTX, "four", "five", "pairs.jsonl")
    snapshot = read_snapshot(store.path)
    w_careful = annotators.reliability(snapshot.checks[careful])
    pairs = {(p.chosen, p.rejected): p for p in build_examples(snapshot).pairs}
    contested = pairs[("4", "Four.")]
    assert (contested.support, contested.against) == (1, 1)
    assert contested.weight == pytest.approx(w_careful / 2)  # the supporters' weight over the judgements
    assert pairs[("Blue.", "Loud.")].weight == pytest.approx(0.5)  # one newcomer
    assert pairs[("four", "five")].weight == 1.0  # imported
    assert snapshot.check_bounds == {"gold_answers": 20, "repeat_answers": 0}


def test_a_snapshot_reads_every_check_whatever_its_since(store):
    ada = audited(store, "ada", gold=(3, 1), repeats=(2, 0))
    first = read_snapshot(store.path)
    later = read_snapshot(store.path, since={t: last for t, (_, last) in first.id_range().items()})
    assert later.comparisons == [] and later.checks[ada] == Checks(4, 3, 2, 2) == first.checks[ada]


# -- Compare mode mixes the checks in ------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_dir):
    eng = Engine(build_policy(ModelArgs(model=str(tiny_dir), device="cpu", quantize="none")), max_batch=4)
    yield eng
    eng.close()


@pytest.fixture
def deps(engine, store):
    args = ServeArgs(max_message_chars=200, gold_rate=0.2, repeat_rate=0.2, repeat_after_minutes=0,
                     messages_per_minute=0, feedback_per_minute=0)
    return ui.Deps(engine=engine, store=store, args=args, model_name="tiny", rng=random.Random(1), check_rng=random.Random(2))


def compare(deps, session, text="pick one"):
    last = None
    for last in ui.send_in_mode(deps, session, text, "", 0.7, 1.0, 2, "compare"):
        pass
    return last


def named(deps, name="ada") -> ui.Session:
    session = ui.Session()
    ui.set_user(deps, session, name, "tester")
    return session


def test_checks_are_mixed_into_compare_mode_at_the_configured_rates_and_scored(deps, store):
    """What Compare mode shows for a message (`ui._check_instead`, called by `send`),
    drawn 400 times: gold items and repeats at their rates (binomial tolerance), never
    two checks in a row, and every pick scored."""
    session = named(deps)
    for i in range(150):
        store.add_gold_item([{"role": "user", "content": f"gold {i}?"}], f"right answer {i}", f"wrong answer {i}", "test")
    conv = store.new_conversation(session.user_id)
    for i in range(150):  # the person's earlier comparisons, for repeats to show
        context = [{"role": "user", "content": f"question {i}"}]
        store.add_comparison(add_reply(store, conv, f"first {i}", context), add_reply(store, conv, f"second {i}", context),
                             "ab"[i % 2], session.user_id)
    drawn = {"gold": 0, "repeat": 0, None: 0}
    for _ in range(400):
        check = ui._check_instead(deps, session, "my own question")
        drawn[check[0]["check"]["kind"] if check else None] += 1
        if check is None:
            continue
        session.pending = check
        info = check[0]["check"]
        if info["kind"] == "gold":  # answer right: the better reply's side
            choice = info["better_side"]
        else:  # answer as the first time, on the swapped sides
            choice = {"a": "b", "b": "a"}[store.comparison(info["comparison_id"])["choice"]]
        ui.decide(deps, session, choice)
        assert session.pending is None and session.turns == []
        assert ui._check_instead(deps, session, "my own question") is None  # then the person's own replies, always
    n = sum(drawn.values())
    for kind, p in (("gold", 0.2), ("repeat", 0.2)):
        assert abs(drawn[kind] - n * p) <= 4 * math.sqrt(n * p * (1 - p)), (drawn, kind)
    ada = figures(store)["ada"]
    assert ada.checks == Checks(drawn["gold"], drawn["gold"], drawn["repeat"], drawn["repeat"])  # scored: all right
    assert ada.weight > 0.9
    assert store.counts()["comparisons"] == 150  # a check is never a comparison
    assert len(store.unanswered_gold(session.user_id)) == 150 - drawn["gold"]  # each gold item shown once


def test_a_gold_item_is_its_own_exchange_the_message_waits_and_the_chat_is_untouched(deps, store):
    deps.args.gold_rate, deps.args.repeat_rate = 0.5, 0.0
    gid, _ = store.add_gold_item([{"role": "user", "content": "Is <b>water</b> wet?"}], "Yes.", "No.", "dashboard")
    session = named(deps)
    for _ in range(20):  # until the draw shows the gold item
        out = compare(deps, session, "my own question")
        if session.pending[0].get("check"):
            break
        ui.decide(deps, session, "a")
        ui.clear(deps, session)
    else:
        pytest.fail("no gold item in 20 comparisons at gold rate 0.5")
    turns_before = list(session.turns)
    chatbot, box, panel_a, panel_b, row, *_, status = out
    assert box["__type__"] == "update" and "value" not in box  # the message stays in the box
    assert panel_a[0] == {"role": "user", "content": "Is &lt;b&gt;water&lt;/b&gt; wet?"}  # the question, made safe
    assert {panel_a[1]["content"], panel_b[1]["content"]} == {"Yes.", "No."}
    assert "another question" in status and "gold" not in status.lower()  # unmarked
    a, b = session.pending
    better_side = "a" if a["text"] == "Yes." else "b"
    assert a["check"] == {"kind": "gold", "gold_id": gid, "better_side": better_side}
    wrong = "b" if better_side == "a" else "a"
    _, _, _, row, status = ui.decide(deps, session, wrong)
    assert session.turns == turns_before and session.pending is None and "send your message" in status
    answers = store.db().execute("SELECT gold_item_id, user_id, better_side, choice FROM gold_answers").fetchall()
    assert [tuple(r) for r in answers] == [(gid, session.user_id, better_side, wrong)]
    assert figures(store)["ada"].checks == Checks(gold_n=1, gold_correct=0)
    assert store.unanswered_gold(session.user_id) == []  # never shown to them again


def test_a_repeat_shows_the_sides_swapped_and_stores_the_answer_in_the_originals_terms(deps, store):
    deps.args.gold_rate, deps.args.repeat_rate = 0.0, 0.5
    session = named(deps)
    compare(deps, session, "first question")
    first_a, first_b = session.pending
    ui.decide(deps, session, "a")
    original = store.db().execute("SELECT id, choice FROM comparisons").fetchone()
    for _ in range(20):
        compare(deps, session, "another question")
        if session.pending[0].get("check"):
            break
        ui.decide(deps, session, "tie")
    else:
        pytest.fail("no repeat in 20 comparisons at repeat rate 0.5")
    a, b = session.pending
    check = a["check"]
    repeated = store.comparison(check["comparison_id"])
    assert (a["text"], b["text"]) == (repeated["reply_b"]["text"], repeated["reply_a"]["text"])  # swapped
    assert a["question"] == repeated["reply_a"]["context"][-1]["content"]
    ui.decide(deps, session, "b")  # B shows the original's A
    row = store.db().execute("SELECT comparison_id, choice FROM repeat_answers").fetchone()
    assert tuple(row) == (repeated["id"], "a")
    if repeated["id"] == original[0]:
        assert (first_a["text"], first_b["text"]) == (b["text"], a["text"])
    assert figures(store)["ada"].checks.repeat_n == 1


def test_no_checks_without_a_name_or_with_the_rates_at_zero(deps, store):
    store.add_gold_item(CTX, "4", "5", "dashboard")
    anonymous = ui.Session()
    for _ in range(10):
        compare(deps, anonymous)
        assert not anonymous.pending[0].get("check")
        anonymous.pending = None
    deps.args.gold_rate = deps.args.repeat_rate = 0.0
    session = named(deps)
    for _ in range(10):
        compare(deps, session)
        assert not session.pending[0].get("check")
        ui.decide(deps, session, "a")


def test_the_kto_export_leaves_out_an_excluded_annotators_votes_too(store, tmp_path):
    import json

    coin = audited(store, "coin", gold=(2, 14))
    ada = store.ensure_user("ada")
    conv = store.new_conversation(ada)
    r1, r2 = add_reply(store, conv, "4"), add_reply(store, conv, "Four.")
    store.set_vote(r1, ada, 1, "right")
    store.set_vote(r2, coin, -1, "random")
    out = tmp_path / "kto.jsonl"
    assert store.export("kto", out) == 1
    assert [json.loads(line)["reason"] for line in out.read_text().splitlines()] == ["right"]
