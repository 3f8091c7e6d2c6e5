"""Tests for trainer/reward.py: the losses and the Wilson interval against hand
computations, last-token scoring under padding and truncation, fitting a preference
with an obvious rule, which parameters a fit trains, refusing too little data,
the on-disk round trip and its manifest, normalisation, the nf4 path on CPU,
annotator weights beating an unweighted fit when a random voter casts a third of the
votes, and a model conditioned on the rater's profile learning two groups' opposite
tastes that an unconditioned one cannot tell apart.

Everything runs on the tiny seeded model from tests/tiny.py, offline, on CPU.
Run: python -m pytest tests/test_reward.py -q
"""

from __future__ import annotations

import dataclasses
import math
import random

import bitsandbytes as bnb
import pytest
import torch

from assistant import annotators
from assistant.config import ModelArgs
from assistant.feedback import FeedbackStore
from trainer import reward
from trainer.config import RewardArgs
from trainer.data import Examples, Pair, Pointwise, build_examples, prompt_messages, read_snapshot

FRUIT = "apple cherry grape lemon mango melon peach plum kiwi fig lime pear".split()
TOPICS = "fruit snacks lunch breakfast dessert shopping garden market recipe picnic".split()
FIT_ARGS = RewardArgs(reward_lr=3e-3, reward_epochs=2, reward_max_length=128, min_pairs=16)
FEEDBACK_IDS = {"feedback": [1, 120], "comparisons": [1, 48]}


def banana_pairs(n: int, seed: int) -> list[Pair]:
    """Pairs whose chosen reply mentions banana and whose rejected reply does not."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        prompt = (("user", f"What should I pick for {rng.choice(TOPICS)}, take {seed}-{i}?"),)
        if i % 3 == 0:
            prompt = (("system", "You are a helpful assistant."),) + prompt
        chosen = f"I suggest {' and '.join(rng.sample(FRUIT, 2))} and banana."
        rejected = f"I suggest {' and '.join(rng.sample(FRUIT, 3))}."
        pairs.append(Pair(prompt, chosen, rejected, f"conv-{seed}-{i}", "comparison"))
    return pairs


@pytest.fixture(scope="module")
def model_args(tiny_dir) -> ModelArgs:
    return ModelArgs(model=str(tiny_dir), quantize="none", device="cpu")


@pytest.fixture(scope="module")
def train() -> Examples:
    return Examples(pairs=banana_pairs(64, seed=1), counts={"comparison": 64})


@pytest.fixture(scope="module")
def fitted(model_args, train):
    """(reward model, metrics) of one fit on 64 banana pairs, validated on 32 others."""
    return reward.fit(model_args, FIT_ARGS, train, Examples(pairs=banana_pairs(32, seed=2)), progress=False)


def manifest_for(metrics: dict, train: Examples) -> dict:
    return {"feedback_ids": FEEDBACK_IDS, "counts": train.counts, "metrics": metrics, "reward_args": dataclasses.asdict(FIT_ARGS)}


# -- pure math ---------------------------------------------------------------------


def test_pairwise_loss_matches_hand_computation():
    loss = reward.pairwise_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(2))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_pairwise_loss_applies_weights():
    loss = reward.pairwise_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.5]))
    expected = (math.log(1 + math.exp(-1)) + 0.5 * math.log(1 + math.exp(2))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_pointwise_loss_matches_hand_computation():
    loss = reward.pointwise_loss(torch.tensor([2.0, -1.0]), torch.tensor([1, 1]))
    expected = (-math.log(1 / (1 + math.exp(-2))) - math.log(1 / (1 + math.exp(1)))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_pointwise_loss_applies_weights():
    loss = reward.pointwise_loss(torch.tensor([2.0, 0.5]), torch.tensor([0, 1]), torch.tensor([0.25, 1.0]))
    expected = (0.25 * -math.log(1 - 1 / (1 + math.exp(-2))) - math.log(1 / (1 + math.exp(-0.5)))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_agreement_is_the_share_of_supporting_judgements():
    pair = Pair((("user", "q"),), "a", "b", "c1", "comparison", support=3, against=1)
    assert reward.agreement(pair) == 0.75
    assert reward.agreement(dataclasses.replace(pair, support=1, against=0)) == 1.0


def test_accuracy_ci_matches_known_wilson_values():
    acc, lo, hi = reward.accuracy_ci(80, 100)
    assert acc == 0.8
    assert lo == pytest.approx(0.7112, abs=1e-4)
    assert hi == pytest.approx(0.8666, abs=1e-4)


def test_accuracy_ci_stays_inside_zero_one_when_perfect():
    acc, lo, hi = reward.accuracy_ci(10, 10)
    assert (acc, hi) == (1.0, 1.0)
    assert lo == pytest.approx(0.7225, abs=1e-4)


def test_accuracy_ci_with_no_examples_is_the_whole_interval():
    acc, lo, hi = reward.accuracy_ci(0, 0)
    assert math.isnan(acc)
    assert (lo, hi) == (0.0, 1.0)


@pytest.mark.parametrize(
    "mask, expected",
    [
        ([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], [2, 4]),  # right padding
        ([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]], [4, 4]),  # left padding
    ],
)
def test_last_token_index_finds_the_last_real_token(mask, expected):
    assert reward.last_token_index(torch.tensor(mask)).tolist() == expected


# -- scoring -----------------------------------------------------------------------


def test_scores_do_not_depend_on_batching(model_args):
    rm = reward.build(model_args, FIT_ARGS)
    pairs = banana_pairs(5, seed=3)
    prompts = [prompt_messages(p.prompt) for p in pairs]
    replies = [p.chosen + " extra words" * i for i, p in enumerate(pairs)]  # different lengths → padding
    batched = rm.score(prompts, replies, batch_size=5, raw=True)
    one_by_one = torch.cat([rm.score([p], [r], batch_size=1, raw=True) for p, r in zip(prompts, replies)])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-4, atol=1e-4)


def test_long_inputs_are_cut_from_the_left_keeping_the_reply_end(model_args):
    rm = reward.build(model_args, dataclasses.replace(FIT_ARGS, reward_max_length=32))
    prompt = [{"role": "user", "content": "a very long question " * 20}]
    ids = rm.encode(prompt, "the reply ends here")
    full = rm.tokenizer(rm.tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": "the reply ends here"}], tokenize=False), add_special_tokens=False)["input_ids"]
    assert ids == full[-32:]
    assert "the reply ends here" in rm.tokenizer.decode(ids)


# -- fitting -----------------------------------------------------------------------


def test_fit_learns_an_obvious_preference(fitted):
    _, metrics = fitted
    assert metrics["val_pairs"] == 32
    assert metrics["val_accuracy"] >= 0.9
    assert metrics["val_accuracy_lo"] <= metrics["val_accuracy"] <= metrics["val_accuracy_hi"]


def test_fit_trains_lora_and_head_but_not_the_base(model_args, fitted):
    fresh = reward.build(model_args, FIT_ARGS)  # same seed: the fit's starting point
    before = fresh.model.state_dict()
    after = fitted[0].model.state_dict()
    lora = [n for n in after if "lora_" in n]
    base = [n for n in after if "lora_" not in n]
    assert lora and base
    assert not [n for n in lora if torch.equal(before[n], after[n])]
    assert not [n for n in base if not torch.equal(before[n], after[n])]
    assert not torch.equal(fresh.head.weight, fitted[0].head.weight)


def test_fit_is_seeded(model_args):
    args, data = dataclasses.replace(FIT_ARGS, reward_epochs=1), Examples(pairs=banana_pairs(16, seed=9))
    first, _ = reward.fit(model_args, args, data, Examples(), progress=False)
    second, _ = reward.fit(model_args, args, data, Examples(), progress=False)
    assert torch.equal(first.head.weight, second.head.weight)
    after = second.model.state_dict()
    assert all(torch.equal(t, after[n]) for n, t in first.model.state_dict().items() if "lora_" in n)


def test_epoch_count_adds_passes_only_when_the_data_would_take_fewer_steps_than_the_minimum():
    args = RewardArgs(reward_epochs=2, reward_batch_size=8, reward_min_steps=32)
    assert reward.epoch_count(28, args) == 8  # 4 steps a pass: 8 passes reach 32 steps
    assert reward.epoch_count(200, args) == 2  # 25 steps a pass: the epochs alone give 50
    assert reward.epoch_count(130, args) == 2  # 17 steps a pass: 34 steps
    assert reward.epoch_count(120, args) == 3  # 15 steps a pass: 30 steps would fall short
    assert reward.epoch_count(28, dataclasses.replace(args, reward_min_steps=0)) == 2


def test_a_small_fit_takes_at_least_the_minimum_steps(model_args):
    data = Examples(pairs=banana_pairs(16, seed=9))
    args = dataclasses.replace(FIT_ARGS, reward_epochs=1, reward_batch_size=8, reward_min_steps=6)
    _, metrics = reward.fit(model_args, args, data, Examples(), progress=False)
    assert (metrics["epochs"], metrics["steps"]) == (3, 6)
    _, metrics = reward.fit(model_args, dataclasses.replace(args, reward_min_steps=0), data, Examples(), progress=False)
    assert (metrics["epochs"], metrics["steps"]) == (1, 2)


def test_fit_refuses_too_few_examples(model_args):
    small = Examples(pairs=banana_pairs(10, seed=4), pointwise=[Pointwise((("user", "q"),), "a", 1, "c", "thumbs")])
    with pytest.raises(ValueError, match=r"need at least 16 .*have 11 .*python -m trainer import FILE"):
        reward.fit(model_args, FIT_ARGS, small, Examples(), progress=False)


def test_evaluate_pairs_counts_pairs_scored_in_the_right_order(fitted):
    rm, _ = fitted
    pairs = banana_pairs(8, seed=5)
    flipped = [dataclasses.replace(p, chosen=p.rejected, rejected=p.chosen) for p in pairs]
    result = reward.evaluate_pairs(rm, pairs + flipped, batch_size=4)
    prompts = [prompt_messages(p.prompt) for p in pairs]
    r_banana = rm.score(prompts, [p.chosen for p in pairs], raw=True)
    r_plain = rm.score(prompts, [p.rejected for p in pairs], raw=True)
    correct = int((r_banana > r_plain).sum()) + int((r_plain > r_banana).sum())
    assert result["n"] == 16
    assert result["accuracy"] == correct / 16
    assert (result["lo"], result["hi"]) == pytest.approx(reward.accuracy_ci(correct, 16)[1:])


# -- normalisation and the on-disk format -----------------------------------------------


def test_normalised_scores_on_the_reference_set_have_mean_0_and_std_1(fitted, train):
    rm, _ = fitted
    scores = rm.score(*reward.reference_set(train, FIT_ARGS.normalizer_size, FIT_ARGS.seed))
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert scores.std(correction=0).item() == pytest.approx(1.0, abs=1e-4)


def test_save_load_round_trip_gives_the_same_scores(fitted, model_args, tmp_path):
    rm, metrics = fitted
    version = reward.save(tmp_path, rm, manifest_for(metrics, Examples()))
    loaded = reward.load(tmp_path, model_args, version)
    pairs = banana_pairs(6, seed=6)
    prompts, replies = [prompt_messages(p.prompt) for p in pairs], [p.chosen for p in pairs]
    torch.testing.assert_close(loaded.score(prompts, replies), rm.score(prompts, replies))
    assert (loaded.mean, loaded.std, loaded.n) == (rm.mean, rm.std, rm.n)


def test_manifest_records_base_feedback_ids_counts_and_metrics(fitted, train, tmp_path, tiny_dir):
    rm, metrics = fitted
    version = reward.save(tmp_path, rm, manifest_for(metrics, train))
    manifest = reward.read_manifest(tmp_path, version)
    assert manifest["version"] == version
    assert manifest["base_model"] == str(tiny_dir)
    assert manifest["quantize"] == "none"
    assert manifest["feedback_ids"] == FEEDBACK_IDS
    assert manifest["counts"] == {"comparison": 64}
    assert manifest["metrics"]["train_pairs"] == 64
    assert manifest["metrics"]["val_accuracy"] == metrics["val_accuracy"]
    assert manifest["reward_args"]["reward_lora_r"] == FIT_ARGS.reward_lora_r
    assert manifest["normalizer"] == {"mean": rm.mean, "std": rm.std, "n": rm.n}
    assert manifest["created_at"].endswith("Z")


def test_versions_increment_and_no_temporary_directory_is_left(fitted, model_args, tmp_path):
    rm, metrics = fitted
    first = reward.save(tmp_path, rm, manifest_for(metrics, Examples()))
    second = reward.save(tmp_path, rm, manifest_for(metrics, Examples()))
    assert (first, second) == ("r000001", "r000002")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r000001", "r000002"]
    assert reward.read_manifest(tmp_path, reward.versions(tmp_path)[-1])["version"] == "r000002"


def test_load_without_a_version_takes_the_latest(fitted, model_args, tmp_path):
    rm, metrics = fitted
    reward.save(tmp_path, rm, manifest_for(metrics, Examples()))
    reward.save(tmp_path, rm, manifest_for(metrics, Examples()))
    assert reward.load(tmp_path, model_args).n == rm.n
    assert reward.versions(tmp_path)[-1] == "r000002"


def test_load_refuses_a_different_base_model(fitted, model_args, tmp_path):
    rm, metrics = fitted
    version = reward.save(tmp_path, rm, manifest_for(metrics, Examples()))
    with pytest.raises(ValueError, match=r"trained on base .*--model is 'other/model'"):
        reward.load(tmp_path, dataclasses.replace(model_args, model="other/model"), version)


def test_load_refuses_an_incomplete_version(fitted, model_args, tmp_path):
    rm, metrics = fitted
    version = reward.save(tmp_path, rm, manifest_for(metrics, Examples()))
    (tmp_path / version / reward.HEAD_FILE).unlink()
    with pytest.raises(ValueError, match=r"incomplete: missing head.safetensors"):
        reward.load(tmp_path, model_args, version)


# -- nf4 on CPU -------------------------------------------------------------------------


def test_nf4_fit_trains_and_scores(model_args):
    args = dataclasses.replace(FIT_ARGS, reward_epochs=1, reward_min_steps=0)
    rm, metrics = reward.fit(dataclasses.replace(model_args, quantize="nf4"), args, Examples(pairs=banana_pairs(16, seed=7)), Examples(), progress=False)
    assert rm.quantize == "nf4"
    assert isinstance(rm.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    assert metrics["steps"] == 2 and math.isfinite(metrics["train_loss"])
    lora_b = [p for n, p in rm.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # lora_B starts at zero
    pairs = banana_pairs(4, seed=8)
    scores = rm.score([prompt_messages(p.prompt) for p in pairs], [p.chosen for p in pairs])
    assert scores.shape == (4,) and torch.isfinite(scores).all()


# -- annotator weights ------------------------------------------------------------------


def test_relative_weights_have_mean_1_and_keep_their_ratios():
    pairs = [Pair((("user", "q"),), "a", "b", "c", "comparison", weight=w) for w in (0.9, 0.3, 0.0)]
    assert reward.relative_weights(pairs) == pytest.approx([2.25, 0.75, 0.0])
    assert reward.relative_weights(pairs[:1] * 3) == pytest.approx([1.0, 1.0, 1.0])  # equal weights: the unweighted fit
    with pytest.raises(ValueError, match="finite and >= 0"):
        reward.relative_weights([dataclasses.replace(pairs[0], weight=float("nan"))])


def voted_examples(path, seed: int) -> tuple[Examples, dict]:
    """96 banana pairs, each judged once: a third by each of two careful people (the
    banana reply, 20/20 gold items right) and a third by a coin flipper (either reply,
    and about half of 20 gold items). Read back through the store with the floor at 0,
    so the coin flipper is weighed down, not left out. Returns (examples, weight by name)."""
    rng = random.Random(seed)
    with FeedbackStore(path) as store:
        ada, bob, coin = (store.ensure_user(name) for name in ("ada", "bob", "coin"))
        for i in range(20):
            gid, _ = store.add_gold_item([{"role": "user", "content": f"Gold question {i}?"}], f"right {i}", f"wrong {i}", "test")
            for uid, choice in ((ada, "a"), (bob, "a"), (coin, rng.choice("ab"))):
                store.add_gold_answer(gid, uid, "a", choice)
        for i, p in enumerate(banana_pairs(96, seed)):
            voter = (ada, bob, coin)[i % 3]
            conv = store.new_conversation(voter)
            ids = [store.add_reply(conversation_id=conv, context=prompt_messages(p.prompt), text=text, params={}, model="tiny",
                                   adapter_version="base", prompt_tokens=1, completion_tokens=1, latency_ms=1.0, ttft_ms=None,
                                   finish_reason="stop", source="compare") for text in (p.chosen, p.rejected)]
            store.add_comparison(*ids, rng.choice("ab") if voter == coin else "a", voter)
    snapshot = read_snapshot(path)
    people = annotators.weights(snapshot.checks, snapshot.users, floor=0.0)
    return build_examples(snapshot, annotator_floor=0.0), {snapshot.users[uid]: w.weight for uid, w in people.items()}


def test_annotator_weights_beat_an_unweighted_fit_when_a_third_of_the_votes_are_random(model_args, tmp_path):
    held_out = banana_pairs(128, seed=77)
    weighted_correct = unweighted_correct = wins = 0
    for seed in (1, 2, 3):
        examples, weights = voted_examples(tmp_path / f"feedback-{seed}.db", seed)
        assert len(examples.pairs) == 96
        assert weights["ada"] == weights["bob"] > 0.8 > 0.3 > weights["coin"]  # the coin flipper counts, a little
        assert sorted({round(p.weight, 6) for p in examples.pairs}) == sorted({round(w, 6) for w in weights.values()})
        args = dataclasses.replace(FIT_ARGS, seed=seed)
        scores = []
        for train in (examples, Examples(pairs=[dataclasses.replace(p, weight=1.0) for p in examples.pairs])):
            rm, _ = reward.fit(model_args, args, train, Examples(), progress=False)
            scores.append(reward.evaluate_pairs(rm, held_out)["accuracy"])
        weighted_correct += round(scores[0] * 128)
        unweighted_correct += round(scores[1] * 128)
        wins += scores[0] > scores[1]
    assert wins >= 2, (weighted_correct, unweighted_correct)
    assert weighted_correct / 384 > unweighted_correct / 384 + 0.04, (weighted_correct, unweighted_correct)


# -- conditioning on the rater's profile ------------------------------------------------

COND_ARGS = dataclasses.replace(FIT_ARGS, reward_condition_on_profile=True)


def profile_lead(rm: reward.RewardModel, group: str) -> list[int]:
    text = rm.tokenizer.apply_chat_template([{"role": "system", "content": f"Rater profile: {group}"}], tokenize=False)
    return rm.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_conditioned_model_reads_the_profile_first_and_keeps_it_when_cutting(model_args):
    rm = reward.build(model_args, dataclasses.replace(COND_ARGS, reward_max_length=64))
    assert rm.condition_on_profile
    ids = rm.encode([{"role": "user", "content": "a very long question " * 20}], "the reply ends here", "nurse")
    lead = profile_lead(rm, "nurse")
    assert len(ids) == 64 and ids[: len(lead)] == lead
    assert rm.tokenizer.decode(ids).endswith("the reply ends here<|im_end|>\n")
    short = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    uncut = dataclasses.replace(rm, max_length=512)
    for profile in (None, ""):  # no profile: scored for "any"
        assert uncut.tokenizer.decode(uncut.encode(short, "hello", profile)) == rm.tokenizer.apply_chat_template(
            [{"role": "system", "content": "Rater profile: any"}, *short, {"role": "assistant", "content": "hello"}], tokenize=False)
    with pytest.raises(ValueError, match="no room after the"):
        reward.build(model_args, dataclasses.replace(COND_ARGS, reward_max_length=8)).encode(short, "hello", "nurse")


def test_an_unconditioned_model_refuses_a_profile(model_args):
    rm = reward.build(model_args, FIT_ARGS)
    prompts, replies = [[{"role": "user", "content": "q"}]], ["a"]
    assert not rm.condition_on_profile
    torch.testing.assert_close(rm.score(prompts, replies, profiles=[""]), rm.score(prompts, replies))
    with pytest.raises(ValueError, match="reads no profile"):
        rm.score(prompts, replies, profiles=["nurse"])
    with pytest.raises(ValueError, match="1 profiles but 2 replies"):
        rm.score(prompts * 2, replies * 2, profiles=["nurse"])


def taste_texts(rng: random.Random) -> tuple[str, str]:
    """(a reply that ends with the marker word banana, one that does not)."""
    fruit = rng.sample(FRUIT, 3)
    return f"{fruit[0]}, {fruit[1]} and banana.", f"{fruit[0]}, {fruit[1]} and {fruit[2]}."


def opposite_tastes_db(path, n: int, seed: int):
    """n prompts, each with a banana reply and a plain one that an expert and a novice
    both compared: the expert always chose banana, the novice never (who judged first
    alternates). Returns the database's path."""
    rng = random.Random(seed)
    with FeedbackStore(path) as store:
        expert, novice = store.ensure_user("ada", profile="Expert"), store.ensure_user("bob", profile="novice")
        for i in range(n):
            conv = store.new_conversation(expert)
            context = [{"role": "user", "content": f"Fruit for {rng.choice(TOPICS)} {seed}-{i}?"}]
            banana, plain = (store.add_reply(conversation_id=conv, context=context, text=text, params={}, model="tiny",
                                             adapter_version="base", prompt_tokens=1, completion_tokens=1, latency_ms=1.0,
                                             ttft_ms=None, finish_reason="stop", source="compare") for text in taste_texts(rng))
            judges = [(expert, "a"), (novice, "b")]
            for user, choice in judges if i % 2 == 0 else judges[::-1]:
                store.add_comparison(banana, plain, choice, user)
    return path


def taste_pairs(n: int, seed: int) -> list[Pair]:
    """Held-out pairs: for each of n prompts, the expert's (banana chosen) and the novice's (banana rejected)."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        prompt = (("user", f"Fruit for {rng.choice(TOPICS)} {seed}-{i}?"),)
        banana, plain = taste_texts(rng)
        pairs.append(Pair(prompt, banana, plain, f"held-{seed}-{i}", "comparison", profile="expert"))
        pairs.append(Pair(prompt, plain, banana, f"held-{seed}-{i}", "comparison", profile="novice"))
    return pairs


def test_a_profile_conditioned_model_learns_opposite_tastes_an_unconditioned_one_cannot(model_args, tmp_path):
    args = dataclasses.replace(COND_ARGS, reward_epochs=3)
    conditioned_correct = unconditioned_correct = n = 0
    for seed in (11, 21, 31):
        snapshot = read_snapshot(opposite_tastes_db(tmp_path / f"feedback-{seed}.db", 48, seed=seed))
        grouped, merged = build_examples(snapshot, by_profile=True), build_examples(snapshot)
        assert len(grouped.pairs) == 96 and grouped.contradictions == 0
        assert len(merged.pairs) == 48 and merged.contradictions == 48  # merged over everyone, the groups cancel out
        held_out = taste_pairs(24, seed=seed + 1)
        conditioned, metrics = reward.fit(model_args, args, grouped, Examples(pairs=held_out), progress=False)
        plain, _ = reward.fit(model_args, FIT_ARGS, merged, Examples(), progress=False)
        with_group = reward.evaluate_pairs(conditioned, held_out, with_profile=True)["accuracy"]
        unconditioned = reward.evaluate_pairs(plain, held_out, with_profile=True)["accuracy"]  # reads no profile
        assert with_group > 0.6, (seed, with_group, unconditioned)
        assert metrics["val_accuracy_by_profile"] == with_group
        assert metrics["val_accuracy"] == reward.evaluate_pairs(conditioned, held_out)["accuracy"]  # scored for "any", as PPO scores
        assert metrics["train_examples_by_profile"] == {"expert": 48, "novice": 48}
        conditioned_correct += round(with_group * len(held_out))
        unconditioned_correct += round(unconditioned * len(held_out))
        n += len(held_out)
    assert conditioned_correct / n >= 0.75, (conditioned_correct, unconditioned_correct, n)
    assert abs(unconditioned_correct / n - 0.5) <= 0.1, (conditioned_correct, unconditioned_correct, n)

    # Saved and loaded, the model still reads the profile: its manifest says so.
    version = reward.save(tmp_path / "reward", conditioned, manifest_for(metrics, grouped))
    assert reward.read_manifest(tmp_path / "reward", version)["condition_on_profile"] is True
    loaded = reward.load(tmp_path / "reward", model_args, version)
    assert loaded.condition_on_profile
    prompts, replies = [prompt_messages(p.prompt) for p in held_out[:6]], [p.chosen for p in held_out[:6]]
    groups = [p.profile for p in held_out[:6]]
    torch.testing.assert_close(loaded.score(prompts, replies, profiles=groups), conditioned.score(prompts, replies, profiles=groups))
    torch.testing.assert_close(loaded.score(prompts, replies), conditioned.score(prompts, replies, profiles=[""] * 6))
    assert not torch.equal(conditioned.score(prompts, replies, profiles=groups), conditioned.score(prompts, replies))
