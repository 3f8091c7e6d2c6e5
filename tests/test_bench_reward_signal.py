"""bench/reward_signal.py: its settings parser, the coin-flip control and the cut of a store back to one cycle's rows."""

from __future__ import annotations

import json

import pytest

from assistant.feedback import FeedbackStore
from bench import reward_signal
from trainer.data import Examples, Pair, Pointwise, build_examples, read_snapshot


def test_settings_are_cast_to_the_field_types_and_unknown_names_refused():
    assert reward_signal.parse_setting("reward_min_steps=32,reward_lr=1e-3") == {"reward_min_steps": 32, "reward_lr": 1e-3}
    assert reward_signal.parse_setting("reward-packing=false") == {"reward_packing": False}
    assert reward_signal.parse_setting("defaults") == {}
    with pytest.raises(SystemExit, match="not NAME=VALUE"):
        reward_signal.parse_setting("reward_min_step=3")
    with pytest.raises(SystemExit, match="not NAME=VALUE"):
        reward_signal.parse_setting("reward_min_steps")


def test_coin_labels_flip_about_half_and_keep_everything_else():
    pairs = [Pair((("user", f"q{i}"),), f"good {i}", f"bad {i}", f"c{i}", "comparison") for i in range(400)]
    points = [Pointwise((("user", f"q{i}"),), f"reply {i}", 1, f"c{i}", "thumbs") for i in range(400)]
    flipped = reward_signal.coin_labels(Examples(pairs=pairs, pointwise=points), seed=3)
    swapped = sum(p.chosen.startswith("bad") for p in flipped.pairs)
    assert 160 < swapped < 240  # a fair coin: 200 ± 4 sd
    assert all({p.chosen, p.rejected} == {q.chosen, q.rejected} and p.prompt == q.prompt for p, q in zip(flipped.pairs, pairs))
    assert 160 < sum(x.label == 0 for x in flipped.pointwise) < 240
    assert [x.completion for x in flipped.pointwise] == [x.completion for x in points]
    assert reward_signal.coin_labels(Examples(pairs=pairs, pointwise=points), seed=3) == flipped  # seeded


def test_store_upto_keeps_only_the_rows_a_cycle_read(tmp_path):
    db = tmp_path / "feedback.db"
    with FeedbackStore(str(db)) as store:
        for i in range(5):
            store.import_pair([{"role": "user", "content": f"question {i}"}], f"chosen {i}", f"rejected {i}", "test.jsonl")
    log = tmp_path / "cycles.jsonl"
    log.write_text(json.dumps({"feedback_ids": {"comparisons": [1, 3], "votes": [1, 0]}}) + "\n"
                   + json.dumps({"feedback_ids": {"comparisons": [4, 5], "votes": [1, 0]}}) + "\n")
    work = tmp_path / "work"
    work.mkdir()
    cut = reward_signal.store_upto(db, log, 1, work)
    assert [p.chosen for p in build_examples(read_snapshot(cut)).pairs] == ["chosen 0", "chosen 1", "chosen 2"]
    assert len(build_examples(read_snapshot(db)).pairs) == 5  # the original is left alone
    with pytest.raises(SystemExit, match="has 2 cycles"):
        reward_signal.store_upto(db, log, 3, work)
