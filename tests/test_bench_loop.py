"""The pure parts of bench/loop.py: hidden preferences, prompt split, feedback picks, summary."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

LOOP_PATH = Path(__file__).resolve().parents[1] / "bench" / "loop.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_loop", LOOP_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


loop = _load()

LONG = ("The capital of France is Paris. It has been the capital for centuries and is home to the Louvre, "
        "the Eiffel Tower and many cafes. Millions of visitors come every year to see its museums, walk "
        "along the Seine and enjoy the food. The city is also a centre of fashion and business in Europe.")
TASK = {"instruction": "Tell me about Paris.", "prompt": "Tell me about Paris.",
        "instances": [{"input": "", "output": "Paris is the capital and largest city of France. It lies on the Seine "
                                              "and is known for its art, fashion and food."}]}


def words(text: str) -> int:
    return len(text.split())


# -- shorter ----------------------------------------------------------------------------


def test_shorter_scores_fewer_words_higher_and_empty_worst():
    pref = loop.Shorter(30)
    assert pref.score("one two") > pref.score("one two three")
    assert pref.score("") == float("-inf") < pref.score(LONG)
    assert pref.thumb("A short reply.") == (1, "")
    assert pref.thumb(LONG)[0] == -1
    assert pref.thumb("")[0] == -1


@pytest.mark.parametrize("max_words", [5, 12, 30])
def test_shorter_rewrite_fits_and_scores_at_least_as_well(max_words):
    pref = loop.Shorter(max_words)
    new = pref.rewrite(LONG, TASK)
    assert new and 1 <= words(new) <= max_words
    assert pref.score(new) >= pref.score(LONG)
    assert LONG.startswith(new)


def test_shorter_rewrite_keeps_whole_sentences_when_they_fit():
    two = "The capital of France is Paris. It has been the capital for centuries and is home to the Louvre, the Eiffel Tower and many cafes."
    assert loop.Shorter(30).rewrite(LONG, TASK) == two  # 25 words; the third sentence would pass 30
    assert loop.Shorter(10).rewrite(LONG, TASK) == "The capital of France is Paris."


def test_shorter_rewrite_of_a_short_reply_is_no_correction():
    pref = loop.Shorter(30)
    assert pref.rewrite("Paris.", TASK) == "Paris."
    assert loop.correction(pref, "Paris.", TASK) is None


def test_shorter_rewrite_of_an_empty_reply_is_the_reference_first_sentence():
    new = loop.Shorter(30).rewrite("   ", TASK)
    assert new == "Paris is the capital and largest city of France."


# -- fuller -----------------------------------------------------------------------------


def test_fuller_scores_words_up_to_the_cap_and_degenerate_zero():
    pref = loop.Fuller(20)
    assert pref.score("one two three") == 3
    assert pref.score(LONG) == 20
    assert pref.score("yes " * 40) == 0
    assert pref.score("Same line.\nSame line.\nSame line.\nOther.") == 0
    assert pref.thumb(LONG) == (1, "")
    assert pref.thumb("Too few words here.")[0] == -1


def test_fuller_rewrite_appends_the_reference_and_scores_higher():
    pref = loop.Fuller(150)
    short = "Paris is in France."
    new = pref.rewrite(short, TASK)
    assert new == short + "\n\n" + loop.reference(TASK)
    assert pref.score(new) > pref.score(short)


def test_fuller_rewrite_replaces_a_degenerate_reply_and_needs_a_reference():
    pref = loop.Fuller(150)
    assert pref.rewrite("no " * 30, TASK) == loop.reference(TASK)
    empty_ref = {**TASK, "instances": [{"input": "", "output": "  "}]}
    assert pref.rewrite("Paris is in France.", empty_ref) is None


# -- listy ------------------------------------------------------------------------------


def test_listy_counts_list_lines_up_to_five():
    pref = loop.Listy()
    assert pref.score("- a\n* b\n• c\n1. d\n2) e\n3. f\n- g") == 5
    assert pref.score("Plain prose. No list here.") == 0
    assert pref.score("1.5 kg of flour\n-dash without space") == 0
    assert pref.thumb("- a\n- b") == (1, "")
    assert pref.thumb("- only one")[0] == -1


def test_listy_rewrite_of_three_sentences_is_a_list():
    pref = loop.Listy()
    text = "First, preheat the oven. Then mix the flour and eggs! Bake for twenty minutes?"
    new = pref.rewrite(text, TASK)
    assert new.splitlines() == ["- First, preheat the oven.", "- Then mix the flour and eggs!", "- Bake for twenty minutes?"]
    assert pref.score(new) >= 2 > pref.score(text)


def test_listy_rewrite_needs_two_sentences():
    assert loop.Listy().rewrite("Just one sentence here.", TASK) is None
    assert loop.Listy().rewrite("", TASK) is None


# -- summary ----------------------------------------------------------------------------


def test_summary_wants_a_short_in_short_line_first():
    pref = loop.Summary()
    assert pref.score("In short: Paris.\n\nParis is the capital of France.") == 2
    assert pref.score("**In short:** Paris.") == 2 and pref.score("  in SHORT: yes") == 2
    assert pref.score("In short: " + "word " * 40) == 1  # a summary line, but not a one-liner
    assert pref.score("Paris is the capital.\nIn short: Paris.") == 1
    assert pref.score("Paris is the capital of France.") == 0 and pref.score("  \n") == -1
    assert pref.thumb("In short: Paris.") == (1, "") and pref.thumb("Paris.")[0] == -1


def test_summary_rewrite_leads_with_the_first_sentence_and_keeps_the_reply():
    pref = loop.Summary()
    text = "Paris is the capital of France. It is on the Seine."
    new = pref.rewrite(text, TASK)
    assert new == "In short: Paris is the capital of France.\n\n" + text and pref.score(new) == 2 > pref.score(text)
    assert pref.rewrite(new, TASK) is None  # already what they want
    lead = pref.rewrite("", TASK)
    assert lead.startswith("In short: ") and "\n" not in lead and pref.score(lead) == 2
    long_first = pref.rewrite("word " * 60 + "end.", TASK)
    assert pref.score(long_first) == 2


# -- coin -------------------------------------------------------------------------------


def test_coin_never_rewrites_and_is_seeded_per_user():
    coin = loop.Coin(seed=3)
    assert all(coin.rewrite(t, TASK) is None for t in ("", "a", LONG))
    a, b = coin.seeded("user-01"), coin.seeded("user-01")
    assert [a.thumb("x") for _ in range(20)] == [b.thumb("x") for _ in range(20)]
    user = coin.seeded("user-02")
    flips = [loop.judge(user, "x", "x") for _ in range(50)]
    assert set(flips) <= {"a", "b"} and len(set(flips)) == 2
    assert loop.Coin(seed=4).seeded("user-01").rng.random() != loop.Coin(seed=3).seeded("user-01").rng.random()


def test_deterministic_preferences_are_their_own_seeded_copy():
    for pref in (loop.Shorter(), loop.Fuller(), loop.Listy(), loop.Summary()):
        assert pref.seeded("anyone") is pref and not pref.control
    assert loop.Coin().control


# -- judge ------------------------------------------------------------------------------


def test_judge_ties_on_equal_scores():
    assert loop.judge(loop.Shorter(), "one two", "three four") == "tie"
    assert loop.judge(loop.Shorter(), "one", "two three") == "a"
    assert loop.judge(loop.Listy(), "no list", "also none") == "tie"
    assert loop.judge(loop.Fuller(), "one", "two three") == "b"


def test_make_preference_passes_the_cli_params():
    ns = argparse.Namespace(preference="shorter", short_words=7, full_words=99, seed=5)
    assert loop.make_preference(ns).max_words == 7
    assert loop.make_preference(argparse.Namespace(**{**vars(ns), "preference": "fuller"})).full_words == 99
    assert loop.make_preference(argparse.Namespace(**{**vars(ns), "preference": "coin"})).seed == 5
    assert sorted(loop.PREFERENCES) == ["coin", "fuller", "listy", "shorter", "summary"]


# -- prompts and feedback picks -------------------------------------------------------------


def test_split_prompts_gives_disjoint_heldout_and_cycle_slices():
    heldout, slices = loop.split_prompts(400, 64, 24, 3, seed=0)
    assert len(heldout) == 64 and [len(s) for s in slices] == [24, 24, 24]
    groups = [{t["prompt"] for t in heldout}] + [{t["prompt"] for t in s} for s in slices]
    assert sum(map(len, groups)) == len(set().union(*groups)) == 64 + 72
    task = slices[0][0]
    assert task["prompt"] == loop.task_prompt(task) and loop.reference(task)
    again, again_slices = loop.split_prompts(400, 64, 24, 3, seed=0)
    assert [t["prompt"] for t in again] == [t["prompt"] for t in heldout]
    assert [t["prompt"] for t in loop.split_prompts(400, 64, 24, 3, seed=1)[0]] != [t["prompt"] for t in heldout]


def test_split_prompts_errors_when_the_pool_is_too_small():
    with pytest.raises(SystemExit, match="--cycles"):
        loop.split_prompts(400, 64, 24, 100, seed=0)


def test_feedback_work_picks_kinds_and_corrections_from_the_seed():
    tasks = [{"prompt": str(i)} for i in range(24)]
    work = loop.feedback_work(tasks, 0.25, 0.25, seed=0, cycle=1)
    assert [w[1] for w in work] == tasks
    assert sum(w[0] == "chat" for w in work) == 6 and sum(w[2] for w in work) == 6
    assert work == loop.feedback_work(tasks, 0.25, 0.25, seed=0, cycle=1)
    assert work != loop.feedback_work(tasks, 0.25, 0.25, seed=0, cycle=2)


def test_parse_args_defaults_and_refused_trainer_flags():
    args = loop.parse_args([])
    assert (args.cycles, args.feedback_prompts, args.heldout_prompts, args.correct_share) == (3, 30, 64, 0.25)
    assert args.trainer_args == "" and args.max_new_tokens is None and loop.settings_labels(args) == []
    step = loop.parse_args(["--policy-step", "kto"])
    assert loop.settings_labels(step) == ["policy step kto (the trainer's default is ppo)"]
    over = loop.parse_args(["--trainer-args", "--ppo-iterations 2", "--temperature", "0.8"])
    assert loop.settings_labels(over) == ["trainer settings overridden: --ppo-iterations 2", "sampling overridden: --temperature 0.8"]
    with pytest.raises(SystemExit):
        loop.parse_args(["--trainer-args", "--db=x.db"])


# -- the cycles log and the summary ----------------------------------------------------------


def test_cycle_figures_reads_what_is_there():
    figures = loop.cycle_figures({"decision": "rejected", "version": "v000002", "signal": {"val_accuracy": 0.7, "val_accuracy_lo": 0.5,
                                  "val_accuracy_hi": 0.85, "val_pairs": 20}, "evaluation": {"kl_parent": 0.1}})
    assert figures["decision"] == "rejected" and figures["reward_val_accuracy_hi"] == 0.85 and figures["kl_parent"] == 0.1
    assert figures["kl_base"] is None and figures["gate_win_rate"] is None and figures["reasons"] == []
    assert loop.cycle_figures({})["decision"] == "failed"
    assert loop.promoted_version({"decision": "promoted", "version": "v000001"}) == "v000001"
    assert loop.promoted_version({"decision": "rejected", "version": "v000001"}) is None


def _measured(k, version, previous_hi, base_rate=0.6):
    vs_base = {"pairs": 64, "win_rate": base_rate, "win_rate_lo": base_rate - 0.1, "win_rate_hi": base_rate + 0.1}
    return {"cycle": k, "decision": "promoted", "version": version, "promoted": version, "vs_base": vs_base,
            "vs_previous": {"pairs": 64, "win_rate": previous_hi - 0.1, "win_rate_lo": previous_hi - 0.2, "win_rate_hi": previous_hi},
            "served": {"version": version, "vs_base": vs_base}}


def test_summary_counts_regressions_and_carries_the_served_adapter_over():
    rejected = {"cycle": 3, "decision": "rejected", "version": "v000003", "promoted": None,
                "served": {"version": "v000002", "vs_base": {"pairs": 64, "win_rate": 0.55, "win_rate_lo": 0.45, "win_rate_hi": 0.65}}}
    cycles = [_measured(1, "v000001", 0.8), _measured(2, "v000002", 0.45, 0.55), rejected, _measured(4, "v000004", 0.5)]
    cycles[3]["served"]["vs_base"] = cycles[3]["vs_base"]
    s = loop.summarize(cycles, [])
    assert s["promotions"] == 3 and s["regressions"] == 1 and s["regression_cycles"] == [2]  # hi 0.5 is not wholly below
    assert s["served_version"] == "v000004" and s["win_rate_vs_base"] == 0.6
    assert s["decisions"] == {"promoted": 3, "rejected": 1}
    carried = loop.summarize(cycles[:3], ["trainer settings overridden: --ppo-iterations 2"])
    assert carried["served_version"] == "v000002" and carried["win_rate_vs_base"] == 0.55
    assert "overridden" in carried["headline"]


def test_summary_without_promotions_and_for_the_control():
    cycles = [{"cycle": 1, "decision": "rejected", "promoted": None, "served": {"version": "base", "vs_base": None}}]
    s = loop.summarize(cycles, [])
    assert s["promotions"] == 0 and s["regressions"] == 0 and s["served_version"] == "base" and s["win_rate_vs_base"] is None
    assert loop.summarize(cycles, [], control=True)["headline"] == "control (coin-flip users): promotions: 0 of 1 cycles"
    table = loop.cycle_table({"replies": {"mean_words": 50.0, "ended": 0.8}, "seconds": 12.0}, cycles)
    assert len(table) == 4 and "| 1 | rejected | – | base | – | – |" in table[3]
    assert loop.summary_table(s, "shorter")[2].startswith("| shorter | 1 |")


def test_the_gates_pairs_judged_again_by_the_hidden_preference():
    pref = loop.make_preference(loop.parse_args(["--preference", "shorter"]))
    short, long = "Paris.", LONG
    judged = [  # candidate shorter and the judge agrees; candidate longer and the judge agrees; shorter, judge disagrees; a tie
        {"prompt": "p", "candidate": short, "current": long, "candidate_score": 1.0, "current_score": 0.0},
        {"prompt": "p", "candidate": long, "current": short, "candidate_score": -1.0, "current_score": 0.5},
        {"prompt": "p", "candidate": short, "current": long, "candidate_score": 0.0, "current_score": 2.0},
        {"prompt": "p", "candidate": short, "current": short, "candidate_score": 0.3, "current_score": 0.3},
    ]
    gh = loop.judged_by_hidden(pref, "c1-gate", judged)
    assert (gh["pairs"], gh["wins"], gh["ties"], gh["losses"]) == (4, 2, 1, 1) and gh["win_rate"] == pytest.approx(2.5 / 4)
    assert gh["judge_agreement_n"] == 3 and gh["judge_agreement"] == pytest.approx(2 / 3)
    assert gh["judge_agreement_lo"] < 2 / 3 < gh["judge_agreement_hi"]
    assert loop.judged_by_hidden(pref, "c1-gate", []) is None
    row = loop.cycle_table({}, [{"cycle": 1, "decision": "rejected", "promoted": None, "gate_pairs_hidden": gh,
                                 "served": {"version": "base"}}])[2]
    assert "0.625 [" in row and "(n=3)" in row
