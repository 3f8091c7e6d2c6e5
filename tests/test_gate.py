"""The promotion gate (trainer/gate.py): each check with explicit numbers, the live
rule, and the held-out evidence measured on real (tiny) adapters: a candidate trained
towards what people rejected is refused, one trained towards what they chose is not.

Run: python -m pytest tests/test_gate.py -q
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from assistant import adapters
from assistant.chat import build_prompt
from assistant.config import BASE_VERSION
from trainer import gate, ppo
from trainer.config import PPOArgs, ScheduleArgs
from trainer.data import Pair, default_prompts, to_prompt


GOOD = {"replies": 64, "win_rate": 0.7, "win_rate_lo": 0.58, "win_rate_hi": 0.8, "kl_parent": 3.0, "kl_base": 5.0, "degenerate": 0,
        "human_agreement": {"share": 0.6, "lo": 0.45, "hi": 0.73, "n": 40}}


@pytest.mark.parametrize("change, reason", [
    ({}, None),
    ({"win_rate": 0.56, "win_rate_lo": 0.44, "win_rate_hi": 0.68}, "judge win rate 0.56 (95% CI 0.44-0.68) over 64 held-out replies: the lower bound is not above 0.50"),
    ({"human_agreement": {"share": 0.3, "lo": 0.18, "hi": 0.45, "n": 40}}, "held-out human judgements say it is worse: it moved towards the chosen reply on 30% of 40"),
    ({"kl_parent": 13.0, "kl_base": 13.0}, "KL to the parent 13.00 over the per-cycle budget 12.00"),
    ({"kl_base": 41.0}, "KL to the base 41.00 over the total budget 40.00"),
    ({"degenerate": 2}, "2 degenerate replies out of 64 (at most 0)"),
    # with the lineage (optimised_kl), the budgets count what the optimising step added
    ({"optimised_from": "sft", "kl_optimised": 13.0, "kl_optimised_total": 13.0, "kl_parent": 60.0},
     "KL of this cycle's optimisation (to the SFT result it started from) 13.00 over the per-cycle budget 12.00"),
    ({"optimised_from": "parent", "kl_optimised": 3.0, "kl_optimised_total": 41.0}, "KL of the optimisation over all cycles 41.00 over the total budget 40.00"),
    ({"optimised_from": None, "kl_optimised": 0.0, "kl_optimised_total": 5.0, "kl_parent": 65.0, "kl_base": 65.0}, None),
    ({"optimised_from": "sft", "kl_optimised": 4.0, "kl_optimised_total": 9.0, "kl_parent": 65.0, "kl_base": 65.0}, None),
])
def test_gate_names_each_failed_check(change, reason):
    reasons = gate.gate({**GOOD, **change}, None, ScheduleArgs())
    assert reasons == ([] if reason is None else [reasons[0]]) and (reason is None or reason in reasons[0])


@pytest.mark.parametrize("manifest, spent", [
    ({"optimised_from": "parent"}, 3.0),  # the step started from the parent: its KL to the parent
    ({}, 3.0),  # written before the field: the same
    ({"optimised_from": "sft"}, 1.5),  # from this cycle's SFT result: the KL to it
    ({"optimised_from": None}, 0.0),  # SFT alone: imitation adds nothing
])
def test_the_budgeted_kl_is_what_the_optimising_step_added(manifest, spent):
    e = {"kl_parent": 3.0, "kl_base": 7.0, "kl_reference": 1.5}
    out = gate.optimised_kl(e, manifest, parent_spent=2.0)
    assert out == {"optimised_from": manifest.get("optimised_from", "parent"), "kl_optimised": spent, "kl_optimised_total": 2.0 + spent}
    assert gate.optimised_kl({"kl_parent": 3.0, "kl_reference": None}, {"optimised_from": "sft"}, 2.0)["kl_optimised"] is None


def test_the_kl_a_lineage_has_spent_comes_from_the_parents_evaluation(tmp_path):
    adir = tmp_path / "adapters"
    for version, evaluation in (("v000001", {"kl_optimised_total": 4.5, "kl_base": 30.0}), ("v000002", {"kl_base": 9.0}), ("v000003", None)):
        (adir / version).mkdir(parents=True)
        (adir / version / "manifest.json").write_text(json.dumps({"version": version, **({"evaluation": evaluation} if evaluation else {})}))
    assert gate.spent_kl(adir, BASE_VERSION) == 0.0 and gate.spent_kl(adir, None) == 0.0
    assert gate.spent_kl(adir, "v000001") == 4.5
    assert gate.spent_kl(adir, "v000002") == 9.0  # gated before the field: its KL to the base
    assert gate.spent_kl(adir, "v000003") == 0.0


def test_the_reward_margin_alone_never_promotes():
    assert gate.gate({**GOOD, "margin": 5.0, "win_rate": 0.5, "win_rate_lo": 0.38, "win_rate_hi": 0.62}, None, ScheduleArgs())


def test_gate_rejects_non_finite_weights_without_an_evaluation():
    assert gate.gate({}, "v000002: tensor x has NaN or infinite values", ScheduleArgs()) == [
        "invalid weights: v000002: tensor x has NaN or infinite values"]


def test_paired_outcomes_count_identical_replies_as_ties():
    out = gate.paired_outcomes([1.0, 0.0, 2.0, 0.5], [0.0, 1.0, 2.0, 0.1], [False, False, False, True])
    assert (out["wins"], out["ties"], out["losses"], out["win_rate"]) == (1, 2, 1, 0.5)


def test_the_live_rule_promotes_rejects_waits_and_withdraws():
    sched = ScheduleArgs(live_min_votes=10, live_confidence=0.95, live_max_hours=48)
    assert gate.prob_below_half(0, 0) == 0.5 and gate.prob_below_half(4, 0) == pytest.approx(0.5 ** 5)
    assert gate.live_decision(9, 1, 1.0, sched)[0] == "promote"
    assert gate.live_decision(1, 9, 1.0, sched)[0] == "reject"
    assert gate.live_decision(6, 4, 1.0, sched)[0] == "wait"
    assert gate.live_decision(5, 0, 1.0, sched)[0] == "wait"  # confident, but fewer than --live-min-votes
    verdict, why = gate.live_decision(6, 4, 49.0, sched)
    assert verdict == "withdraw" and why.startswith("withdrawn after 49.0 h")


def test_reward_models_that_cannot_tell_held_out_choices_apart_stop_the_cycle_before_ppo():
    sched = ScheduleArgs()
    assert gate.fit_reasons({"val_pairs": 40, "val_accuracy": 0.6, "val_accuracy_lo": 0.45, "val_accuracy_hi": 0.73}, sched) == [
        "waiting for more feedback: the reward models agree with held-out choices on 60% of 40 pairs (95% CI 0.45-0.73); "
        "the lower bound must be above 0.50 (--min-val-accuracy)"]
    assert "10 validation pairs of the 16 needed" in gate.fit_reasons({"val_pairs": 10, "val_accuracy": 1.0, "val_accuracy_lo": 0.72}, sched)[0]
    assert gate.fit_reasons({"val_pairs": 40, "val_accuracy": 0.8, "val_accuracy_lo": 0.65, "val_accuracy_hi": 0.9}, sched) == []
    stricter = ScheduleArgs(min_val_accuracy=0.7)
    assert "must be above 0.70" in gate.fit_reasons({"val_pairs": 40, "val_accuracy": 0.8, "val_accuracy_lo": 0.65, "val_accuracy_hi": 0.9}, stricter)[0]


# -- held-out human judgements on real adapters ---------------------------------------------


def pairs() -> list[Pair]:
    """Held-out judgements: people chose a lowercase word over a run of capitals."""
    words = "apple river stone cloud maple tiger ocean pencil garden window lemon forest candle rocket silver meadow planet spoon violet harbor".split()
    return [Pair(to_prompt([{"role": "user", "content": f"Say one word ({i})."}]), w, w.upper() * 2, f"c{i}", "comparison")
            for i, w in enumerate(words)]


def trained_towards(model_args, adir, texts_of) -> str:
    """Publish an adapter trained by a few likelihood steps towards `texts_of(pair)` of every pair."""
    torch.manual_seed(0)
    model, tok = ppo.build_trainable_policy(model_args)
    eos_ids, pad_id = ppo.special_ids(model, tok)
    queries, responses = [], []
    for p in pairs():
        q, r = build_prompt(tok, [{"role": p.prompt[0][0], "content": p.prompt[0][1]}]), tok(texts_of(p), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        queries.append(torch.tensor(q))
        responses.append(r)
    width = max(map(len, responses))
    resp = torch.tensor([r + [pad_id] * (width - len(r)) for r in responses])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in responses])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(15):
        logp, _, _ = ppo.forward_logprobs(model, None, queries, resp, mask, pad_id, 1.0, False)
        loss = -(logp * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return adapters.publish(adir, model, ppo.POLICY_ADAPTER, {"parent": BASE_VERSION})


def evaluate(model_args, adir, version):
    sched = ScheduleArgs(eval_replies=8, eval_max_new_tokens=4)
    return gate.evaluate(model_args, adir, version, BASE_VERSION, default_prompts()[:4], lambda p, t: torch.zeros(len(t)), sched,
                         PPOArgs(temperature=1.0, top_p=1.0), val_pairs=pairs())


def test_the_gate_refuses_a_candidate_that_held_out_judgements_say_is_worse(tiny_args, tmp_path):
    model_args = tiny_args(lora_dropout=0.0)
    worse = trained_towards(model_args, tmp_path, lambda p: p.rejected)
    e = evaluate(model_args, tmp_path, worse)
    h = e["human_agreement"]
    assert h["n"] == 20 and h["share"] < 0.2 and h["hi"] < 0.5, h
    reasons = gate.gate(e, None, ScheduleArgs())
    assert any(r.startswith("held-out human judgements say it is worse") for r in reasons), reasons
    assert e["kl_parent"] == e["kl_base"] > 0  # it did move away from the base


def test_the_gate_measures_kl_from_the_sft_result_saved_beside_a_candidate(tiny_args, tmp_path):
    model_args = tiny_args(lora_dropout=0.0)
    version = trained_towards(model_args, tmp_path, lambda p: p.chosen)
    # the candidate's own weights as its reference: its KL from there is exactly zero, to the base it is not
    shutil.copy(tmp_path / version / "adapter_model.safetensors", tmp_path / version / adapters.REFERENCE_FILE)
    adapters.update_manifest(tmp_path, version, optimised_from="sft")
    e = evaluate(model_args, tmp_path, version)
    assert e["kl_parent"] > 0.1 and abs(e["kl_reference"]) < 1e-4, e
    assert e["optimised_from"] == "sft" and e["kl_optimised"] == e["kl_reference"] and e["kl_optimised_total"] == e["kl_reference"]
    assert not gate.gate({**e, "win_rate_lo": 0.6}, None, ScheduleArgs(kl_budget=0.05, kl_total_budget=0.05))  # nothing over budget
    plain = trained_towards(model_args, tmp_path, lambda p: p.chosen)  # no reference file: budgeted from the parent
    e = evaluate(model_args, tmp_path, plain)
    assert e["kl_reference"] is None and e["kl_optimised"] == e["kl_parent"] > 0.1
    assert any("KL of this cycle's optimisation (to the parent)" in r for r in gate.gate(e, None, ScheduleArgs(kl_budget=0.05)))


def test_the_gates_evaluation_shows_its_progress_in_pairs(tiny_args, tmp_path, capsys):
    model_args = tiny_args(lora_dropout=0.0)
    version = trained_towards(model_args, tmp_path, lambda p: p.chosen)
    sched = ScheduleArgs(eval_replies=6, eval_max_new_tokens=2)
    gate.evaluate(model_args, tmp_path, version, BASE_VERSION, default_prompts()[:2], lambda p, t: torch.zeros(len(t)), sched,
                  PPOArgs(temperature=1.0, top_p=1.0), chunk=4, progress=True)
    err = capsys.readouterr().err
    assert f"gate {version} vs {BASE_VERSION}" in err and "6/6" in err and "pair" in err, err
    gate.evaluate(model_args, tmp_path, version, BASE_VERSION, default_prompts()[:2], lambda p, t: torch.zeros(len(t)), sched,
                  PPOArgs(temperature=1.0, top_p=1.0), chunk=4)
    assert "gate " not in capsys.readouterr().err  # quiet unless asked


def test_held_out_judgements_credit_a_candidate_that_moved_towards_what_people_chose(tiny_args, tmp_path):
    model_args = tiny_args(lora_dropout=0.0)
    better = trained_towards(model_args, tmp_path, lambda p: p.chosen)
    h = evaluate(model_args, tmp_path, better)["human_agreement"]
    assert h["share"] > 0.8 and h["lo"] > 0.5, h
