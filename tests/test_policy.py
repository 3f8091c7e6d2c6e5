"""The policy steps besides PPO (trainer/policy.py on TRL's trainers) and the reward
functions (trainer/rewards.py), on the tiny model.

Each learning test measures what the step is meant to change, with the step's own
objective, before and after: SFT raises the likelihood of a corrected reply; DPO's
loss on its pairs falls below log 2 (its value when the policy equals the reference);
KTO's desirable replies gain log-ratio and its undesirable ones lose it. Every step
leaves the base weights bit-for-bit alone, and its adapter passes the server's
validator and hot-swaps into a running engine.

Run: python -m pytest tests/test_policy.py -q
"""

from __future__ import annotations

import dataclasses
import json
import math
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from assistant import adapters
from assistant.chat import Engine, GenParams, build_prompt
from assistant.config import BASE_VERSION
from assistant.model import build_policy as build_serving_policy
from assistant.model import lora_config
from trainer import policy, rewards, steps
from trainer.config import DataArgs, PolicyArgs, PPOArgs, RewardArgs
from trainer.data import Examples, Pair, Pointwise, to_prompt

PROMPTS = [f"Question {i}: what is {i} plus {i}?" for i in range(8)]


def _prompt(text: str) -> tuple:
    return to_prompt([{"role": "user", "content": text}])


def preference() -> Examples:
    """Users who prefer the reply 'yes' to 'no, never' on every prompt."""
    return Examples(pairs=[Pair(_prompt(p), "yes", "no, never", f"c{i}", "comparison") for i, p in enumerate(PROMPTS)])


def thumbs() -> Examples:
    """3 👍 against 9 👎: the imbalance KTO is weighted for."""
    good = [Pointwise(_prompt(p), "yes", 1, f"g{i}", "thumbs") for i, p in enumerate(PROMPTS[:3])]
    bad = [Pointwise(_prompt(p), "no, never", 0, f"b{i}", "thumbs") for i, p in enumerate(PROMPTS)]
    bad += [Pointwise(_prompt(p), "maybe not", 0, f"m{i}", "thumbs") for i, p in enumerate(PROMPTS[:1])]
    return Examples(pointwise=good + bad)


def corrections() -> Examples:
    return Examples(pairs=[Pair(_prompt(p), "the answer is small", "zzzz", f"k{i}", "correction") for i, p in enumerate(PROMPTS)])


def reply_logprob(model, tokenizer, prompt: tuple, reply: str) -> torch.Tensor:
    """log p(reply | prompt) under `model`'s active adapter, summed over the reply's tokens."""
    messages = [{"role": r, "content": c} for r, c in prompt]
    q = build_prompt(tokenizer, messages)
    a = tokenizer(reply, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([q + a])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(q) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(a)[:, None]).sum()


def log_ratio(model, tokenizer, prompt: tuple, reply: str) -> float:
    """log π(reply)/π_ref(reply), the reference being the base (a run from the base)."""
    pol = reply_logprob(model, tokenizer, prompt, reply)
    with model.disable_adapter():
        ref = reply_logprob(model, tokenizer, prompt, reply)
    return float(pol - ref)


def frozen_copy(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def assert_base_untouched(model, before: dict) -> None:
    after = {n: p for n, p in model.named_parameters() if "lora_" not in n}
    assert after.keys() == before.keys()
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert not changed, f"base weights changed: {changed[:3]}"


def settings(tmp_path, **policy_overrides):
    ppo_args = PPOArgs(adapters_dir=str(tmp_path / "adapters"), max_new_tokens=8, temperature=1.0, top_p=1.0)
    return PolicyArgs(**policy_overrides), ppo_args


# -- each step learns what it is meant to ----------------------------------------------------------


def test_sft_on_corrections_raises_their_likelihood_and_leaves_the_base_weights_alone(tiny_args, tmp_path):
    model, tok = policy.build_policy(tiny_args(), None)
    pa, ppo_args = settings(tmp_path, sft_epochs=3)
    ex = corrections()
    before_lp = [float(reply_logprob(model, tok, p.prompt, p.chosen)) for p in ex.pairs]
    before = frozen_copy(model)
    out = policy.train_step("sft", model, tok, pa, ppo_args, examples=ex, progress=False)
    after_lp = [float(reply_logprob(model, tok, p.prompt, p.chosen)) for p in ex.pairs]
    assert out["rows"] == len(ex.pairs)
    gains = [a - b for a, b in zip(after_lp, before_lp)]
    assert min(gains) > 1.0, gains  # every corrected reply, by more than e× in probability
    assert_base_untouched(model, before)


@pytest.mark.parametrize("original, edited, marked", [
    ([1, 2, 3, 4], [9, 9, 1, 2, 3, 4], [1, 1, 0, 0, 0, 0]),  # a lead put in front: only the lead
    ([1, 2, 3, 4, 5, 0], [1, 2, 0], [0, 0, 1]),  # cut short: the end, where the cut reply stops
    ([1, 2, 3, 4], [1, 7, 3, 4], [0, 1, 0, 0]),  # one word replaced
    ([1, 2, 3], [1, 2, 3], [0, 0, 0]),  # unchanged
])
def test_edited_tokens_marks_what_the_person_wrote_and_where_they_cut(original, edited, marked):
    assert policy.edited_tokens(original, edited) == marked


def test_the_sft_loss_of_a_correction_is_on_its_edit_and_of_a_demonstration_on_the_whole_reply(tiny_args):
    _, tok = policy.build_policy(tiny_args(), None)
    body = "Paris is the capital of France and its largest city."
    lead = "In short: Paris."
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    correction = {"prompt": prompt, "completion": policy._assistant(f"{lead}\n\n{body}"), "original": body}
    thumb = {"prompt": prompt, "completion": policy._assistant(body)}

    def target(row, mode):
        [out] = policy.sft_dataset_rows([row], tok, 512, mode)
        assert len(out["input_ids"]) == len(out["labels"])
        return tok.decode([t for t in out["labels"] if t != -100])

    edit = target(correction, "edits")
    assert lead in edit and "capital" not in edit, edit  # the lead alone, not the copied body
    assert f"{lead}\n\n{body}" in target(correction, "whole")
    assert body in target(thumb, "edits")  # a 👍 reply has no original: all of it
    prompt_text = tok.decode(policy.sft_dataset_rows([thumb], tok, 512, "edits")[0]["input_ids"])
    assert "capital of France?" in prompt_text and "capital of France?" not in target(thumb, "edits")
    with pytest.raises(ValueError, match="sft-corrections"):
        policy.sft_dataset_rows([thumb], tok, 512, "most")


def test_sft_on_the_edit_alone_raises_the_likelihood_of_the_edit(tiny_args, tmp_path):
    """A correction that puts a lead in front of the model's reply: SFT on the edit
    makes the lead likelier after the prompt."""
    model, tok = policy.build_policy(tiny_args(), None)
    pa, ppo_args = settings(tmp_path, sft_epochs=3, sft_corrections="edits")
    body = "it depends on many things"
    ex = Examples(pairs=[Pair(_prompt(p), f"Short: yes.\n\n{body}", body, f"k{i}", "correction") for i, p in enumerate(PROMPTS)])
    before = [float(reply_logprob(model, tok, p.prompt, "Short: yes.")) for p in ex.pairs]
    policy.train_step("sft", model, tok, pa, ppo_args, examples=ex, progress=False)
    after = [float(reply_logprob(model, tok, p.prompt, "Short: yes.")) for p in ex.pairs]
    gains = [a - b for a, b in zip(after, before)]
    assert min(gains) > 1.0, gains


def dpo_loss(model, tok, ex: Examples, beta: float) -> float:
    margins = [log_ratio(model, tok, p.prompt, p.chosen) - log_ratio(model, tok, p.prompt, p.rejected) for p in ex.pairs]
    return float(-F.logsigmoid(beta * torch.tensor(margins)).mean())


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "robust"])
def test_dpo_lowers_its_loss_on_a_synthetic_preference_and_keeps_the_base_frozen(tiny_args, tmp_path, loss):
    model, tok = policy.build_policy(tiny_args(), None)
    pa, ppo_args = settings(tmp_path, dpo_loss=loss, policy_epochs=3)
    ex = preference()
    start = dpo_loss(model, tok, ex, pa.beta)
    assert start == pytest.approx(math.log(2), abs=1e-4)  # a fresh adapter is the reference
    before = frozen_copy(model)
    out = policy.train_step("dpo", model, tok, pa, ppo_args, examples=ex, progress=False)
    end = dpo_loss(model, tok, ex, pa.beta)
    assert end < start - 0.05, (start, end, out["history"][-1])
    assert_base_untouched(model, before)
    assert list(model.peft_config) == [policy.ADAPTER]  # TRL's "ref" copy is gone before saving


def test_kto_moves_desirable_replies_up_and_undesirable_down_with_3_up_against_9_down(tiny_args, tmp_path):
    model, tok = policy.build_policy(tiny_args(), None)
    pa, ppo_args = settings(tmp_path, policy_epochs=3)
    ex = thumbs()
    rows = policy.kto_rows(ex)
    good_w, bad_w = policy.kto_weights(rows)
    assert (good_w, bad_w) == (3.0, 1.0)  # 9 👎 (one reply twice is one row) against 3 👍
    before = frozen_copy(model)
    policy.train_step("kto", model, tok, pa, ppo_args, examples=ex, progress=False)
    # KTO's loss with the reference point at 0: 1 − σ(β r) for desirable, 1 − σ(−β r) for undesirable
    loss = []
    for x in ex.pointwise:
        r = log_ratio(model, tok, x.prompt, x.completion)
        loss.append(1 - torch.sigmoid(torch.tensor(pa.beta * (r if x.label else -r))).item())
    assert sum(loss) / len(loss) < 0.5 - 0.01, loss  # 0.5 before training: every log-ratio is 0
    good = [log_ratio(model, tok, x.prompt, x.completion) for x in ex.pointwise if x.label]
    bad = [log_ratio(model, tok, x.prompt, x.completion) for x in ex.pointwise if not x.label]
    assert min(good) > 0 and max(bad) < 0, (good, bad)
    assert_base_untouched(model, before)


def test_a_step_with_too_few_rows_is_refused_before_training(tiny_args, tmp_path):
    model, tok = policy.build_policy(tiny_args(), None)
    pa, ppo_args = settings(tmp_path, min_policy_rows=20)
    with pytest.raises(ValueError, match="--policy-step dpo needs at least 20 preference pairs, the feedback has 8"):
        policy.train_step("dpo", model, tok, pa, ppo_args, examples=preference(), progress=False)


def test_dpo_and_kto_rows_leave_out_excluded_annotators_and_weightless_examples(tmp_path):
    """TRL's DPO and KTO take no weight per row: the annotator weights reach them as the
    rows of people under the floor left out (build_examples) and rows of weight 0 dropped."""
    from assistant.feedback import FeedbackStore
    from trainer.data import build_examples, read_snapshot

    with FeedbackStore(tmp_path / "feedback.db") as store:
        ada, coin = store.ensure_user("ada"), store.ensure_user("coin")
        for i in range(16):  # coin gets 2 of 16 gold items right: under the floor
            gid, _ = store.add_gold_item([{"role": "user", "content": f"q{i}"}], "good", "bad", "test")
            store.add_gold_answer(gid, coin, "a", "a" if i < 2 else "b")
        conv = store.new_conversation(ada)
        for i, (text, user) in enumerate([(PROMPTS[0], ada), (PROMPTS[1], coin)]):
            ids = [store.add_reply(conversation_id=conv, context=[{"role": "user", "content": text}], text=reply, params={},
                                   model="tiny", adapter_version="base", prompt_tokens=1, completion_tokens=1, latency_ms=1.0,
                                   ttft_ms=None, finish_reason="stop", source="compare") for reply in ("yes", "no, never")]
            store.add_comparison(*ids, "a", user)
            store.set_vote(ids[0], user, 1)
    examples = build_examples(read_snapshot(tmp_path / "feedback.db"))
    assert [r["prompt"][0]["content"] for r in policy.dpo_rows(examples)] == [PROMPTS[0]]
    assert {r["prompt"][0]["content"] for r in policy.kto_rows(examples)} == {PROMPTS[0]}
    weightless = Examples(pairs=[dataclasses.replace(p, weight=0.0) for p in preference().pairs[:3]] + preference().pairs[3:],
                          pointwise=[dataclasses.replace(thumbs().pointwise[0], weight=0.0)])
    assert len(policy.dpo_rows(weightless)) == len(PROMPTS) - 3
    assert {(r["prompt"][0]["content"], r["label"]) for r in policy.kto_rows(weightless)} == {
        (p, label) for p in PROMPTS[3:] for label in (True, False)}


# -- reward functions ---------------------------------------------------------------------------


def test_the_example_reward_functions_load_and_add_their_weighted_scores():
    funcs = rewards.load("trainer/reward_functions.py")
    assert {f.name.split(":")[1]: f.weight for f in funcs} == {"reward_no_apology": 0.25, "reward_under_100_words": 0.25, "reward_valid_json": 0.5}
    prompts = [[{"role": "user", "content": "Give me JSON with a key a."}], [{"role": "user", "content": "Hi"}]]
    texts = ['```json\n{"a": 1}\n```', "Sorry, as an AI I cannot. " + "word " * 120]
    combined = rewards.combine(lambda p, t: torch.tensor([1.0, 2.0]), funcs)(prompts, texts)
    # reply 1: valid JSON (+0.5), short (+0.25), no apology; reply 2: not asked for JSON, long, apologises (−0.25)
    assert combined.tolist() == pytest.approx([1.0 + 0.5 + 0.25, 2.0 - 0.25])


BROKEN = {
    "syntax": ("def reward_x(prompts, completions, **kw)\n    return []\n", "importing it failed: SyntaxError"),
    "raises": ("def reward_x(prompts, completions, **kw):\n    return [1 / 0 for _ in completions]\n",
               "reward_x failed on a probe batch: ZeroDivisionError"),
    "length": ("def reward_x(prompts, completions, **kw):\n    return [1.0]\n", "returned 1 scores for 2 completions"),
    "nan": ("def reward_x(prompts, completions, **kw):\n    return [float('nan')] * len(completions)\n", "every score must be a finite number"),
    "none": ("def helper(prompts, completions):\n    return []\n", "no function named reward_*"),
    "weights": ("WEIGHTS = {'reward_y': 1.0}\ndef reward_x(prompts, completions, **kw):\n    return [0.0] * len(completions)\n",
                "WEIGHTS names ['reward_y']"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_reward_function_is_refused_with_a_clear_error_before_any_training(tmp_path, monkeypatch, case):
    source, message = BROKEN[case]
    path = tmp_path / "rf.py"
    path.write_text(textwrap.dedent(source))
    monkeypatch.setattr(policy, "build_policy", lambda *a, **k: pytest.fail("a model was loaded before the reward functions were checked"))
    pa, ppo_args = settings(tmp_path, policy_step="grpo", reward_functions=str(path))
    with pytest.raises(rewards.RewardFunctionError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        steps.run_policy(None, DataArgs(db=str(tmp_path / "none.db")), RewardArgs(), ppo_args, pa, progress=False,
                         reward_fn=lambda p, t: torch.zeros(len(t)), reward_version="scripted", prompts=[[{"role": "user", "content": "hi"}]])
    assert str(path) in str(info.value)
    assert not (tmp_path / "adapters").exists()


# -- every step's adapter serves -----------------------------------------------------------------


def length_reward(prompts, texts):
    return torch.tensor([float(len(t)) for t in texts])


@pytest.mark.parametrize("step", ["sft", "dpo", "kto", "grpo", "rloo", "ppo"])
def test_each_policy_step_publishes_an_adapter_the_server_validates_and_hot_swaps(tiny_args, tmp_path, drain, step):
    model_args = tiny_args()
    pa, ppo_args = settings(tmp_path, policy_step=step, policy_iterations=2, num_generations=2)
    ppo_args = dataclasses.replace(ppo_args, ppo_iterations=1, ppo_batch_size=4, mini_batch_size=2)
    ex = Examples(pairs=preference().pairs + corrections().pairs, pointwise=thumbs().pointwise)
    version, manifest = steps.run_policy(model_args, DataArgs(db=str(tmp_path / "none.db")), RewardArgs(), ppo_args, pa, progress=False,
                                         reward_fn=length_reward, reward_version="scripted", examples=ex,
                                         prompts=[[{"role": "user", "content": p}] for p in PROMPTS])
    saved = json.loads((tmp_path / "adapters" / version / "manifest.json").read_text())
    assert saved["policy_step"] == step and saved["parent"] == BASE_VERSION and saved["status"] == "candidate"
    if step != "ppo":
        assert saved["rows"][step] > 0 and saved["metrics"][step]
    ran_sft = step != "sft" and ("sft" in saved or "sft" in (saved.get("rows") or {}))  # --sft-first, on the corrections
    assert saved["optimised_from"] == (None if step == "sft" else "sft" if ran_sft else "parent")  # SFT alone only imitates
    assert (tmp_path / "adapters" / version / adapters.REFERENCE_FILE).exists() == ran_sft
    adapters.validate(tmp_path / "adapters" / version, lora_config(model_args))

    engine = Engine(build_serving_policy(model_args))
    try:
        adapters.activate(engine, tmp_path / "adapters", version)
        assert engine.policy.current == version
        stream = engine.submit([{"role": "user", "content": "hi"}], GenParams(max_new_tokens=4, temperature=0.0))
        drain(stream)
        assert stream.reply.adapter_version == version
    finally:
        engine.close()


def test_sft_first_then_dpo_records_both_stages_and_starts_from_the_parent(tiny_args, make_adapter, tmp_path):
    model_args = tiny_args()
    adir = tmp_path / "adapters"
    make_adapter(adir / "v000001")
    adapters.set_current(adir, "v000001")
    pa, ppo_args = settings(tmp_path, policy_step="dpo", sft_first=True)
    ex = Examples(pairs=preference().pairs + corrections().pairs)
    version, manifest = steps.run_policy(model_args, DataArgs(db=str(tmp_path / "none.db")), RewardArgs(), ppo_args, pa, progress=False, examples=ex)
    assert version == "v000002" and manifest["parent"] == "v000001" and manifest["sft_first"] is True
    assert manifest["rows"] == {"sft": len(corrections().pairs), "dpo": len(ex.pairs)}
    assert manifest["optimised_from"] == "sft" and (adir / version / adapters.REFERENCE_FILE).exists()  # DPO is budgeted from the SFT result


def test_sft_first_then_ppo_starts_ppo_from_the_sft_result_and_records_both(tiny_args, tmp_path):
    model_args = tiny_args()
    pa, ppo_args = settings(tmp_path, policy_step="ppo", sft_first=True)
    ppo_args = dataclasses.replace(ppo_args, ppo_iterations=1, ppo_batch_size=4, mini_batch_size=2)
    version, manifest = steps.run_policy(model_args, DataArgs(db=str(tmp_path / "none.db")), RewardArgs(), ppo_args, pa, progress=False,
                                         reward_fn=length_reward, reward_version="scripted", examples=corrections(),
                                         prompts=[[{"role": "user", "content": p}] for p in PROMPTS])
    assert manifest["policy_step"] == "ppo" and manifest["sft"]["rows"] == len(PROMPTS) and len(manifest["metrics"]) == 1
    d = tmp_path / "adapters" / version
    adapters.validate(d, lora_config(model_args))
    # the SFT result PPO was held to is saved beside the candidate: PPO's update moved away from it
    assert manifest["optimised_from"] == "sft"
    reference, candidate = load_file(str(d / adapters.REFERENCE_FILE)), load_file(str(d / "adapter_model.safetensors"))
    assert reference.keys() == candidate.keys() and any(not torch.equal(reference[k], candidate[k]) for k in reference)


def test_sft_first_without_enough_demonstrations_is_skipped_and_says_so(tiny_args, tmp_path):
    pa, ppo_args = settings(tmp_path, policy_step="dpo", sft_first=True)
    version, manifest = steps.run_policy(tiny_args(), DataArgs(db=str(tmp_path / "none.db")), RewardArgs(), ppo_args, pa, progress=False,
                                         examples=preference())
    assert manifest["rows"] == {"dpo": len(PROMPTS)} and manifest["sft_skipped"].startswith("0 demonstrations")
