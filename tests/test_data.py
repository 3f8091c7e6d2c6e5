"""Tests for assistant/feedback/pairs.py and trainer/data.py: snapshots, feedback → examples, merging, the split.

Every test builds its own feedback store under tmp_path through FeedbackStore's
public API; nothing needs a model or a network.
Run: python -m pytest tests/test_data.py -q
"""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest

from assistant.feedback import FeedbackStore, StoreUnavailable
from trainer.data import (
    Examples, Pair, Pointwise, build_examples, import_preferences, prompt_messages, read_preference_file, read_snapshot, split,
    to_prompt,
)

CTX = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
OTHER_CTX = [{"role": "user", "content": "Name a colour."}]
PROMPT = to_prompt(CTX)


def add_reply(store: FeedbackStore, conversation_id: str, text: str, context=CTX) -> int:
    return store.add_reply(
        conversation_id=conversation_id, context=context, text=text, params={"temperature": 0.7},
        model="SmolLM2-135M-Instruct", adapter_version="base", prompt_tokens=12, completion_tokens=3,
        latency_ms=41.5, ttft_ms=9.25, finish_reason="stop",
    )


@pytest.fixture
def store(tmp_path):
    s = FeedbackStore(tmp_path / "feedback.db")
    yield s
    s.close()


@pytest.fixture
def chat(store):
    """Three users, one conversation, three replies to CTX and one to OTHER_CTX."""
    users = [store.ensure_user(name) for name in ("ada", "bob", "cy")]
    conv = store.new_conversation(users[0], system_prompt="Be brief.")
    return SimpleNamespace(
        users=users, user=users[0], conv=conv,
        r1=add_reply(store, conv, "4"),
        r2=add_reply(store, conv, "Four."),
        r3=add_reply(store, conv, "Five."),
        other=add_reply(store, conv, "Blue.", context=OTHER_CTX),
    )


def examples_of(store: FeedbackStore) -> Examples:
    return build_examples(read_snapshot(store.path))


def directions(examples: Examples) -> set[tuple[str, str]]:
    return {(p.chosen, p.rejected) for p in examples.pairs}


# -- each kind of feedback -------------------------------------------------------


def test_comparison_choice_gives_a_pair_from_winner_to_loser(store, chat):
    store.add_comparison(chat.r1, chat.r2, "b", chat.user)
    examples = examples_of(store)
    assert examples.pairs == [Pair(PROMPT, "Four.", "4", chat.conv, "comparison", 1, 0, (chat.conv,))]
    assert examples.counts["comparison"] == 1


def test_tie_gives_no_pair_and_is_counted(store, chat):
    store.add_comparison(chat.r1, chat.r2, "tie", chat.user)
    examples = examples_of(store)
    assert (examples.pairs, examples.pointwise) == ([], [])
    assert examples.counts["tie"] == 1


def test_both_bad_gives_two_negative_labels(store, chat):
    store.add_comparison(chat.r1, chat.r2, "both_bad", chat.user)
    examples = examples_of(store)
    assert examples.pairs == []
    assert {(p.completion, p.label, p.kind) for p in examples.pointwise} == {("4", 0, "both_bad"), ("Four.", 0, "both_bad")}
    assert examples.counts["both_bad"] == 1


def test_correction_prefers_the_edited_text_to_the_original(store, chat):
    store.add_correction(chat.r1, "2 + 2 = 4.", chat.user)
    [pair] = examples_of(store).pairs
    assert (pair.prompt, pair.chosen, pair.rejected, pair.kind) == (PROMPT, "2 + 2 = 4.", "4", "correction")


def test_ranking_gives_every_implied_pair(store, chat):
    store.add_ranking([chat.r2, chat.r1, chat.r3], chat.user)
    examples = examples_of(store)
    assert directions(examples) == {("Four.", "4"), ("Four.", "Five."), ("4", "Five.")}
    assert {p.kind for p in examples.pairs} == {"ranking"}
    assert examples.counts["ranking"] == 1


def test_rank_mode_feedback_round_trips_through_the_exports(store, chat, tmp_path):
    ranked = [store.add_reply(conversation_id=chat.conv, context=CTX, text=text, params={"temperature": t, "variant": "temperature-spread"},
                              model="SmolLM2-135M-Instruct", adapter_version="base", prompt_tokens=12, completion_tokens=3,
                              latency_ms=41.5, ttft_ms=9.25, finish_reason="stop", source="rank")
              for text, t in (("Four.", 0.7), ("4", 1.0), ("Five.", 0.4))]
    store.add_ranking(ranked, chat.user)
    store.add_ties(ranked, chat.users[1])  # someone else could not tell them apart
    store.set_vote(ranked[0], chat.user, -1, reason="Too long")
    examples = examples_of(store)
    assert directions(examples) == {("Four.", "4"), ("Four.", "Five."), ("4", "Five.")}
    assert examples.counts["tie"] == 3
    pref, kto = tmp_path / "pref.jsonl", tmp_path / "kto.jsonl"
    assert store.export("preference", pref) == 3
    pairs, errors = read_preference_file(pref)  # the exported file is one the trainer's import reads
    assert errors == [] and [(chosen, rejected) for _, chosen, rejected in pairs] == [("Four.", "4"), ("Four.", "Five."), ("4", "Five.")]
    assert {json.dumps(prompt) for prompt, _, _ in pairs} == {json.dumps(CTX)}
    store.export("kto", kto)
    assert [json.loads(line) for line in kto.read_text().splitlines()] == [
        {"prompt": CTX, "completion": [{"role": "assistant", "content": "Four."}], "label": False, "reason": "Too long"}]


def test_votes_give_pointwise_labels(store, chat):
    store.set_vote(chat.r1, chat.user, 1)
    store.set_vote(chat.r3, chat.user, -1)
    examples = examples_of(store)
    assert {(p.completion, p.label, p.kind) for p in examples.pointwise} == {("4", 1, "thumbs"), ("Five.", 0, "thumbs")}
    assert (examples.counts["thumbs_up"], examples.counts["thumbs_down"]) == (1, 1)


def test_up_and_down_votes_on_one_prompt_give_a_pair(store, chat):
    store.set_vote(chat.r1, chat.users[0], 1)
    store.set_vote(chat.r3, chat.users[1], -1)
    store.set_vote(chat.other, chat.users[1], -1)  # another prompt: pairs with nothing
    examples = examples_of(store)
    assert [(p.prompt, p.chosen, p.rejected, p.kind) for p in examples.pairs] == [(PROMPT, "4", "Five.", "thumbs")]


def test_removed_votes_are_skipped(store, chat):
    store.set_vote(chat.r1, chat.user, 1)
    store.set_vote(chat.r1, chat.user, 0)
    examples = examples_of(store)
    assert examples.pointwise == []
    assert examples.counts["thumbs_up"] == 0


def test_comparison_between_identical_texts_is_skipped_and_counted(store, chat):
    same = add_reply(store, chat.conv, "4")
    store.add_comparison(chat.r1, same, "a", chat.user)
    examples = examples_of(store)
    assert examples.pairs == []
    assert examples.counts["same_text"] == 1


def test_prompt_is_hashable_and_converts_back_to_messages():
    assert hash(PROMPT) == hash(to_prompt(CTX))
    assert prompt_messages(PROMPT) == CTX


# -- merging judgements ------------------------------------------------------------


def test_agreeing_judgements_merge_into_one_example(store, chat):
    for user in chat.users[:2]:
        store.add_comparison(chat.r1, chat.r2, "a", user)
    examples = examples_of(store)
    assert [(p.chosen, p.support, p.against) for p in examples.pairs] == [("4", 2, 0)]
    assert examples.contradictions == 0


def test_judgements_of_different_kinds_on_one_pair_merge(store, chat):
    store.add_comparison(chat.r1, chat.r2, "a", chat.user)
    store.add_ranking([chat.r1, chat.r2], chat.users[1])
    [pair] = examples_of(store).pairs
    assert (pair.chosen, pair.kind, pair.support) == ("4", "comparison", 2)


def test_contradicting_judgements_are_kept_and_counted(store, chat):
    store.add_comparison(chat.r1, chat.r2, "b", chat.users[0])
    store.add_comparison(chat.r2, chat.r1, "a", chat.users[1])  # same pair, sides swapped
    store.add_comparison(chat.r1, chat.r2, "a", chat.users[2])
    examples = examples_of(store)
    assert [(p.chosen, p.rejected, p.support, p.against) for p in examples.pairs] == [("Four.", "4", 2, 1)]
    assert examples.contradictions == 1


def test_a_tie_in_count_keeps_the_first_direction(store, chat):
    store.add_comparison(chat.r1, chat.r2, "a", chat.users[0])
    store.add_comparison(chat.r1, chat.r2, "b", chat.users[1])
    examples = examples_of(store)
    assert [(p.chosen, p.support, p.against) for p in examples.pairs] == [("4", 1, 1)]
    assert examples.contradictions == 1


def test_contradicting_votes_on_one_reply_are_counted(store, chat):
    store.set_vote(chat.r1, chat.users[0], 1)
    store.set_vote(chat.r1, chat.users[1], 1)
    store.set_vote(chat.r1, chat.users[2], -1)
    examples = examples_of(store)
    assert [(p.completion, p.label, p.support, p.against) for p in examples.pointwise] == [("4", 1, 2, 1)]
    assert examples.contradictions == 1


# -- merging per rater profile group -------------------------------------------------


@pytest.fixture
def groups(store):
    """Replies to CTX and OTHER_CTX judged by two physicians (profiles typed two ways),
    a novice and someone without a profile, with every kind of feedback."""
    users = {name: store.ensure_user(name, profile=profile)
             for name, profile in (("ada", "Physician"), ("bob", " physician."), ("cy", "novice"), ("dee", ""))}
    conv = store.new_conversation(users["ada"])
    r1, r2, r3 = (add_reply(store, conv, text) for text in ("4", "Four.", "Five."))
    other = add_reply(store, conv, "Blue.", context=OTHER_CTX)
    other_2 = add_reply(store, conv, "Red.", context=OTHER_CTX)
    store.add_comparison(r1, r2, "a", users["ada"])
    store.add_comparison(r1, r2, "b", users["cy"])  # the novice prefers the other reply
    store.add_comparison(r2, r1, "b", users["bob"])  # the second physician agrees with the first, sides swapped
    store.add_comparison(r1, r3, "both_bad", users["dee"])
    store.add_ranking([r3, r2, r1], users["cy"])
    store.add_correction(r3, "2 + 2 = 4.", users["bob"])
    store.set_vote(r1, users["ada"], 1)
    store.set_vote(r3, users["cy"], -1)  # up and down, but by different groups
    store.set_vote(other, users["dee"], 1)
    store.set_vote(other_2, users["dee"], -1)
    store.import_pair(CTX, "Four, of course.", "Twenty-two.", source_file="hh.jsonl")
    return SimpleNamespace(store=store, users=users, conv=conv)


def test_by_profile_off_gives_the_merge_over_everyone_whatever_the_profiles(groups, tmp_path):
    examples = build_examples(read_snapshot(groups.store.path), by_profile=False)
    assert examples == examples_of(groups.store)
    assert {x.profile for x in [*examples.pairs, *examples.pointwise]} == {""}
    assert [(p.chosen, p.rejected, p.support, p.against) for p in examples.pairs if {p.chosen, p.rejected} == {"4", "Four."}] == [
        ("4", "Four.", 2, 2)]  # two physicians against the novice's two judgements (choice and ranking); the tie keeps the first
    # The novice's ranking (Five. over 4) against the pair a physician's up-vote and the novice's down-vote make.
    assert [(p.chosen, p.support, p.against) for p in examples.pairs if {p.chosen, p.rejected} == {"4", "Five."}] == [("Five.", 1, 1)]
    # The same feedback given by people without profiles: the very same examples, weights and order included.
    with FeedbackStore(tmp_path / "anonymous.db") as anonymous:
        for name in ("ada", "bob", "cy", "dee"):
            anonymous.ensure_user(name)
        conv = anonymous.new_conversation(1)
        ids = [add_reply(anonymous, conv, text) for text in ("4", "Four.", "Five.")] + [
            add_reply(anonymous, conv, text, context=OTHER_CTX) for text in ("Blue.", "Red.")]
        r1, r2, r3, other, other_2 = ids
        anonymous.add_comparison(r1, r2, "a", 1)
        anonymous.add_comparison(r1, r2, "b", 3)
        anonymous.add_comparison(r2, r1, "b", 2)
        anonymous.add_comparison(r1, r3, "both_bad", 4)
        anonymous.add_ranking([r3, r2, r1], 3)
        anonymous.add_correction(r3, "2 + 2 = 4.", 2)
        anonymous.set_vote(r1, 1, 1)
        anonymous.set_vote(r3, 3, -1)
        anonymous.set_vote(other, 4, 1)
        anonymous.set_vote(other_2, 4, -1)
        anonymous.import_pair(CTX, "Four, of course.", "Twenty-two.", source_file="hh.jsonl")
        plain = build_examples(read_snapshot(anonymous.path))

    def comparable(ex: Examples) -> tuple:  # conversation ids are random per store
        return ([(p.prompt, p.chosen, p.rejected, p.kind, p.support, p.against, p.weight) for p in ex.pairs],
                [(x.prompt, x.completion, x.label, x.kind, x.support, x.against, x.weight) for x in ex.pointwise],
                ex.counts, ex.contradictions)

    assert comparable(plain) == comparable(examples)


def test_by_profile_merges_each_groups_judgements_apart(groups):
    examples = build_examples(read_snapshot(groups.store.path), by_profile=True)
    r1_r2 = sorted((p.profile, p.chosen, p.support, p.against) for p in examples.pairs if {p.chosen, p.rejected} == {"4", "Four."})
    assert r1_r2 == [("novice", "Four.", 2, 0), ("physician", "4", 2, 0)]  # 'Physician' and ' physician.' are one group
    assert examples.contradictions == 0
    by_group = {(p.profile, p.chosen, p.rejected, p.kind) for p in examples.pairs}
    assert ("physician", "2 + 2 = 4.", "Five.", "correction") in by_group
    assert ("(no profile)", "Blue.", "Red.", "thumbs") in by_group  # up- and down-vote within one group pair up
    assert not any(p.kind == "thumbs" and p.profile in ("physician", "novice") for p in examples.pairs)  # across groups they do not
    assert [(p.profile, p.chosen, p.support, p.against) for p in examples.pairs if {p.chosen, p.rejected} == {"4", "Five."}] == [
        ("novice", "Five.", 1, 0)]
    assert {(x.profile, x.completion, x.label) for x in examples.pointwise} == {
        ("(no profile)", "4", 0), ("(no profile)", "Five.", 0), ("physician", "4", 1), ("novice", "Five.", 0),
        ("(no profile)", "Blue.", 1), ("(no profile)", "Red.", 0)}
    assert examples.counts == examples_of(groups.store).counts  # the same rows are used, only merged apart


def test_imported_pairs_have_no_profile_group(groups):
    examples = build_examples(read_snapshot(groups.store.path), by_profile=True)
    [imported] = [p for p in examples.pairs if p.chosen == "Four, of course."]
    assert imported.profile == "" and imported.rejected == "Twenty-two."


def test_profile_folds_keep_every_prompt_on_the_side_of_the_merged_folds(tmp_path):
    from trainer import steps

    with FeedbackStore(tmp_path / "feedback.db") as store:
        expert, novice = store.ensure_user("ada", profile="expert"), store.ensure_user("bob", profile="novice")
        for i in range(40):
            conv = store.new_conversation(expert)
            context = [{"role": "user", "content": f"question {i}"}]
            a, b = (add_reply(store, conv, f"{text} {i}", context=context) for text in ("good", "bad"))
            store.add_comparison(a, b, "a", expert)
            store.add_comparison(a, b, "b", novice)
        snapshot = read_snapshot(store.path)
    fold_a, fold_b = steps.folds(build_examples(snapshot))
    grouped_a, grouped_b, grouped = steps.profile_folds(snapshot, fold_a, fold_b)
    assert fold_a.pairs and fold_b.pairs
    for merged, per_group in ((fold_a, grouped_a), (fold_b, grouped_b)):
        assert {p.prompt for p in per_group.pairs} == {p.prompt for p in merged.pairs}
        assert len(per_group.pairs) == 2 * len(merged.pairs)
        assert {p.profile for p in per_group.pairs} == {"expert", "novice"}
    assert len(grouped.pairs) == 80
    with pytest.raises(ValueError, match="neither fold"):
        steps.profile_folds(snapshot, fold_a, Examples())


# -- snapshots --------------------------------------------------------------------


def test_snapshot_excludes_rows_written_after_it(store, chat):
    store.add_comparison(chat.r1, chat.r2, "a", chat.user)
    snapshot = read_snapshot(store.path)
    store.add_comparison(chat.r1, chat.r3, "a", chat.user)
    store.set_vote(chat.r1, chat.user, 1)
    assert directions(build_examples(snapshot)) == {("4", "Four.")}
    assert snapshot.total_rows() == 1


def test_id_range_covers_each_table_first_to_last(store, chat):
    for _ in range(3):
        store.add_comparison(chat.r1, chat.r2, "a", chat.user)
    store.set_vote(chat.r1, chat.user, 1)
    store.set_vote(chat.r1, chat.user, -1)
    assert read_snapshot(store.path).id_range() == {
        "votes": [1, 1], "vote_events": [1, 2], "comparisons": [1, 3], "corrections": [1, 0], "rankings": [1, 0],
    }


def test_since_reads_only_rows_after_an_earlier_snapshot(store, chat):
    store.add_comparison(chat.r1, chat.r2, "a", chat.user)
    first = read_snapshot(store.path)
    store.add_comparison(chat.r1, chat.r3, "a", chat.user)
    later = read_snapshot(store.path, since={t: last for t, (_, last) in first.id_range().items()})
    assert [c["id"] for c in later.comparisons] == [2]
    assert later.id_range()["comparisons"] == [2, 2]


def test_since_includes_a_vote_changed_after_it(store, chat):
    store.set_vote(chat.r1, chat.user, 1)
    first = read_snapshot(store.path)
    store.set_vote(chat.r1, chat.user, -1)
    later = read_snapshot(store.path, since={t: last for t, (_, last) in first.id_range().items()})
    assert [(v["reply_id"], v["value"]) for v in later.votes] == [(chat.r1, -1)]


def test_a_votes_value_and_reason_come_from_its_last_event(store, chat):
    store.set_vote(chat.r1, chat.user, 1, reason="Right")
    store.set_vote(chat.r1, chat.user, -1, reason="Wrong after all")
    store.set_vote(chat.r2, chat.users[1], -1)
    assert [(v["reply_id"], v["value"], v["reason"]) for v in read_snapshot(store.path).votes] == [
        (chat.r1, -1, "Wrong after all"), (chat.r2, -1, "")]


def test_the_trainer_and_the_store_share_one_definition_of_a_pair():
    import assistant.feedback.pairs as pairs
    import trainer.data as data
    for name in ("Pair", "Pointwise", "Examples", "Snapshot", "read_snapshot", "build_examples", "to_prompt",
                 "prompt_messages"):
        assert getattr(data, name) is getattr(pairs, name), name


def test_pairs_load_without_the_trainer():
    import subprocess
    import sys
    from pathlib import Path
    code = "import sys, assistant.feedback.pairs; print(sorted(m for m in sys.modules if m.split('.')[0] == 'trainer'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_since_beyond_the_database_is_refused(store, chat):
    with pytest.raises(ValueError, match="another database"):
        read_snapshot(store.path, since={"comparisons": 5})


def test_snapshot_of_a_missing_database_creates_nothing(tmp_path):
    with pytest.raises(StoreUnavailable):
        read_snapshot(tmp_path / "missing.db")
    assert not (tmp_path / "missing.db").exists()


# -- split ------------------------------------------------------------------------


def synthetic_examples(n_conversations: int = 200) -> Examples:
    pairs, pointwise = [], []
    for i in range(n_conversations):
        conv = f"conv{i:04d}"
        for turn in range(2):
            prompt = (("user", f"question {i}"),) + (("assistant", "ok"), ("user", "more")) * turn
            pairs.append(Pair(prompt, f"good {i}", f"bad {i}", conv, "comparison"))
            pointwise.append(Pointwise(prompt, f"meh {i}", 0, conv, "thumbs"))
    return Examples(pairs=pairs, pointwise=pointwise)


def test_split_is_the_same_every_time():
    examples = synthetic_examples()
    assert split(examples, 0.2, "s") == split(examples, 0.2, "s")


def test_split_does_not_depend_on_row_order():
    examples = synthetic_examples()
    shuffled = Examples(pairs=random.Random(0).sample(examples.pairs, len(examples.pairs)),
                        pointwise=random.Random(1).sample(examples.pointwise, len(examples.pointwise)))
    _, val = split(examples, 0.2, "s")
    _, val_shuffled = split(shuffled, 0.2, "s")
    assert set(val.pairs) == set(val_shuffled.pairs) and set(val.pointwise) == set(val_shuffled.pointwise)


def test_split_puts_no_conversation_on_both_sides():
    train, val = split(synthetic_examples(), 0.3, "s")
    on_train, on_val = ({e.conversation_id for e in [*part.pairs, *part.pointwise]} for part in (train, val))
    assert on_train and on_val
    assert not on_train & on_val


def test_split_sends_about_val_fraction_of_conversations_to_validation():
    train, val = split(synthetic_examples(1000), 0.2, "s")
    assert 0.15 < len(val.pairs) / (len(train.pairs) + len(val.pairs)) < 0.25


def test_split_keeps_conversations_that_share_a_prompt_together(tmp_path):
    lines = [{"chosen": f"\n\nHuman: question {i % 40}\n\nAssistant: good {i}",
              "rejected": f"\n\nHuman: question {i % 40}\n\nAssistant: bad {i}"} for i in range(80)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    with FeedbackStore(tmp_path / "feedback.db") as store:
        import_preferences(store, path, progress=False)
    train, val = split(build_examples(read_snapshot(tmp_path / "feedback.db")), 0.5, "s")
    assert val.pairs and train.pairs
    assert not {p.prompt for p in train.pairs} & {p.prompt for p in val.pairs}


def test_split_with_no_validation_keeps_everything_for_training():
    examples = synthetic_examples(20)
    train, val = split(examples, 0.0, "s")
    assert (train.pairs, val.pairs) == (examples.pairs, [])


def test_split_refuses_a_fraction_outside_0_1():
    with pytest.raises(ValueError, match="val_fraction"):
        split(synthetic_examples(5), 1.0, "s")
