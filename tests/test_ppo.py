"""Tests for trainer/ppo.py: the pure math (GAE, whitening, the clipped losses, the KL
estimators, per-token rewards, temperature-scaled log-probs, the adaptive KL controller)
against slow references and hand computations; then the loop on the tiny model: the
reference equals the policy before the first update, a NaN reward or loss aborts without an
update, a short run raises a simple reward while only the trainable parameters move,
the KL ceiling stops a run, and the degenerate-reply counter.

Everything runs on the tiny seeded model from tests/tiny.py, offline, on CPU.
Run: python -m pytest tests/test_ppo.py -q
"""

from __future__ import annotations

import math
import string

import pytest
import torch

from trainer import ppo
from trainer.data import default_prompts

# ------------------------------------------------------------------ pure math


def gae_reference(rewards, values, lengths, gamma, lam):
    """GAE row by row in plain Python over the first `lengths[b]` tokens of each row."""
    advantages, returns = [], []
    for r, v, n in zip(rewards, values, lengths):
        T = len(r)
        adv = [0.0] * T
        last = 0.0
        for t in reversed(range(n)):
            next_value = v[t + 1] if t + 1 < n else 0.0
            delta = r[t] + gamma * next_value - v[t]
            last = delta + gamma * lam * last
            adv[t] = last
        advantages.append(adv)
        returns.append([adv[t] + v[t] if t < n else 0.0 for t in range(T)])
    return advantages, returns


def right_padded_mask(lengths, T):
    return torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths], dtype=torch.float64)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_compute_gae_matches_slow_reference(gamma, lam):
    gen = torch.Generator().manual_seed(0)
    lengths, T = [7, 1, 4, 0, 5], 7
    rewards = torch.randn(len(lengths), T, generator=gen, dtype=torch.float64)
    values = torch.randn(len(lengths), T, generator=gen, dtype=torch.float64)
    mask = right_padded_mask(lengths, T)

    advantages, returns = ppo.compute_gae(rewards, values, mask, gamma, lam)

    ref_adv, ref_ret = gae_reference(rewards.tolist(), values.tolist(), lengths, gamma, lam)
    torch.testing.assert_close(advantages, torch.tensor(ref_adv, dtype=torch.float64))
    torch.testing.assert_close(returns, torch.tensor(ref_ret, dtype=torch.float64))
    assert (advantages[mask == 0] == 0).all() and (returns[mask == 0] == 0).all()
    torch.testing.assert_close(returns, (advantages + values) * mask)


def test_masked_whiten_normalises_masked_entries_and_zeroes_the_rest():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, generator=gen, dtype=torch.float64) * 3 + 5
    mask = right_padded_mask([6, 2, 4, 3], 6)

    w = ppo.masked_whiten(x, mask)

    kept = w[mask.bool()]
    assert abs(float(kept.mean())) < 1e-9
    assert float(kept.var(unbiased=True)) == pytest.approx(1.0, rel=1e-6)
    assert (w[mask == 0] == 0).all()


def test_masked_whiten_without_shift_keeps_the_mean():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64) * 2 + 4
    mask = right_padded_mask([5, 3, 1], 5)

    w = ppo.masked_whiten(x, mask, shift_mean=False)

    kept, orig = w[mask.bool()], x[mask.bool()]
    assert float(kept.mean()) == pytest.approx(float(orig.mean()), rel=1e-9)
    assert float(kept.var(unbiased=True)) == pytest.approx(1.0, rel=1e-6)
    assert (w[mask == 0] == 0).all()


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    gen = torch.Generator().manual_seed(3)
    logprobs = -torch.rand(3, 5, generator=gen, dtype=torch.float64) * 4
    advantages = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    mask = right_padded_mask([5, 2, 4], 5)

    loss, clipfrac, approxkl = ppo.policy_loss(logprobs, logprobs.clone(), advantages, mask, cliprange=0.2)

    assert float(loss) == pytest.approx(-float(advantages[mask.bool()].mean()), rel=1e-12)
    assert float(clipfrac) == 0.0
    assert float(approxkl) == 0.0


def test_policy_loss_takes_the_clipped_branch_outside_the_trust_region():
    # token 0: ratio 1.5, advantage +1 -> clipped at 1.2: loss -1.2
    # token 1: ratio 0.5, advantage -1 -> clipped at 0.8: loss +0.8
    # token 2: ratio 1.5, advantage -1 -> unclipped is the worse one: loss +1.5
    # token 3: masked out (wild values must not count)
    old = torch.zeros(1, 4, dtype=torch.float64)
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.5, 100.0]], dtype=torch.float64))
    advantages = torch.tensor([[1.0, -1.0, -1.0, 50.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)

    loss, clipfrac, approxkl = ppo.policy_loss(logprobs, old, advantages, mask, cliprange=0.2)

    assert float(loss) == pytest.approx((-1.2 + 0.8 + 1.5) / 3, rel=1e-12)
    assert float(clipfrac) == pytest.approx(2 / 3)
    expected_kl = 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2 + math.log(1.5) ** 2) / 3
    assert float(approxkl) == pytest.approx(expected_kl, rel=1e-12)


def test_value_loss_clips_values_far_from_the_old_ones():
    # token 0: value moved 0 -> 1.0 (clipped to 0.2), return 2: max(1.0, 3.24) = 3.24
    # token 1: value moved 0 -> 0.1 (inside the range), return 2: 3.61 either way
    # token 2: value moved 0 -> 3.0 (clipped to 0.2), return 2.5: max(0.25, 5.29) = 5.29
    # token 3: masked out
    old = torch.zeros(1, 4, dtype=torch.float64)
    values = torch.tensor([[1.0, 0.1, 3.0, 40.0]], dtype=torch.float64)
    returns = torch.tensor([[2.0, 2.0, 2.5, -40.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)

    loss, clipfrac = ppo.value_loss(values, old, returns, mask, cliprange_value=0.2)

    assert float(loss) == pytest.approx(0.5 * (3.24 + 3.61 + 5.29) / 3, rel=1e-12)
    assert float(clipfrac) == pytest.approx(2 / 3)


def test_kl_k3_is_non_negative_and_second_order_in_the_log_ratio():
    gen = torch.Generator().manual_seed(4)
    logprobs = -torch.rand(1000, generator=gen, dtype=torch.float64) * 5
    ref = logprobs + torch.randn(1000, generator=gen, dtype=torch.float64) * 3
    assert (ppo.kl_k3(logprobs, ref) >= 0).all()

    # per token, k3 ≈ ½·k1² when the policies are close; k1 itself is signed
    small = logprobs + torch.randn(1000, generator=gen, dtype=torch.float64) * 1e-3
    k1, k3 = ppo.kl_k1(logprobs, small), ppo.kl_k3(logprobs, small)
    torch.testing.assert_close(k3, 0.5 * k1**2, rtol=1e-2, atol=1e-12)
    assert (k1 < 0).any() and (k1 > 0).any()


def test_kl_k1_and_k3_both_estimate_the_true_kl_on_samples_from_the_policy():
    gen = torch.Generator().manual_seed(5)
    p_logits = torch.randn(12, generator=gen, dtype=torch.float64)
    q_logits = p_logits + 0.3 * torch.randn(12, generator=gen, dtype=torch.float64)
    log_p, log_q = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    true_kl = float((log_p.exp() * (log_p - log_q)).sum())

    tokens = torch.multinomial(log_p.exp(), 200_000, replacement=True, generator=gen)
    k1 = ppo.kl_k1(log_p[tokens], log_q[tokens])
    k3 = ppo.kl_k3(log_p[tokens], log_q[tokens])

    assert float(k1.mean()) == pytest.approx(true_kl, rel=0.1)
    assert float(k3.mean()) == pytest.approx(true_kl, rel=0.1)


def test_per_token_rewards_put_the_score_on_the_last_response_token():
    kl = torch.tensor([[0.5, 1.0, 2.0, 9.0], [3.0, 9.0, 9.0, 9.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    scores = torch.tensor([10.0, 20.0, 30.0])

    rewards = ppo.per_token_rewards(scores, kl, mask, kl_coef=0.1)

    expected = torch.tensor([
        [-0.05, -0.1, -0.2 + 10.0, 0.0],
        [-0.3 + 20.0, 0.0, 0.0, 0.0],
        [-0.1, -0.1, -0.1, -0.1 + 30.0],
    ])
    torch.testing.assert_close(rewards, expected)


def test_logprobs_from_logits_divides_by_the_temperature():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]])  # (1, 2, 3)
    tokens = torch.tensor([[0, 1]])
    T = 0.7

    def by_hand(row, tok):
        z = [v / T for v in row]
        return z[tok] - math.log(sum(math.exp(v) for v in z))

    out = ppo.logprobs_from_logits(logits, tokens, temperature=T)

    expected = [[by_hand([2.0, 0.0, -1.0], 0), by_hand([0.5, 0.5, 3.0], 1)]]
    torch.testing.assert_close(out, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out, ppo.logprobs_from_logits(logits, tokens, temperature=1.0))


def test_kl_controller_raises_the_coefficient_when_kl_is_above_target():
    ctl = ppo.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=6.6, n_steps=100)  # error +0.1, inside the clip
    assert ctl.value == pytest.approx(0.1 * (1 + 0.1 * 100 / 10000))


def test_kl_controller_lowers_the_coefficient_when_kl_is_below_target():
    ctl = ppo.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=5.4, n_steps=100)  # error −0.1
    assert ctl.value == pytest.approx(0.1 * (1 - 0.1 * 100 / 10000))


def test_kl_controller_clips_the_proportional_error_to_0_2():
    up = ppo.AdaptiveKLController(0.1, target=6.0, horizon=1000)
    up.update(current_kl=60.0, n_steps=50)  # error +9 -> +0.2
    down = ppo.AdaptiveKLController(0.1, target=6.0, horizon=1000)
    down.update(current_kl=0.0, n_steps=50)  # error −1 -> −0.2
    assert up.value == pytest.approx(0.1 * (1 + 0.2 * 50 / 1000))
    assert down.value == pytest.approx(0.1 * (1 - 0.2 * 50 / 1000))


def test_kl_controller_without_target_keeps_the_coefficient():
    ctl = ppo.AdaptiveKLController(0.1, target=None)
    for kl in (0.0, 100.0, float("nan")):
        ctl.update(current_kl=kl, n_steps=64)
    assert ctl.value == 0.1


def test_degenerate_counts_empty_and_single_token_replies():
    pad = 0
    rows = [
        ("", [2] + [pad] * 9, 1),  # empty (only EOS)
        ("   ", [5, 5, 5, 2] + [pad] * 6, 4),  # whitespace only
        ("x" * 10, [7] * 10, 10),  # one token repeated
        ("abcabcab", [7, 8, 9, 7, 8, 9, 7, 8] + [pad] * 2, 8),  # varied
        ("xxx", [7, 7, 7] + [pad] * 7, 3),  # repeated, but too short to call
        ("abcdefgh", [3, 4, 5, 6, 10, 11, 12, 13, pad, pad], 8),  # padding repeats, masked out
    ]
    texts = [r[0] for r in rows]
    responses = torch.tensor([r[1] for r in rows])
    mask = torch.tensor([[1] * n + [0] * (10 - n) for _, _, n in rows])

    assert ppo.degenerate(texts, responses, mask) == 3
    assert ppo.degenerate(texts[3:], responses[3:], mask[3:]) == 0


# ------------------------------------------------------------------ the loop on the tiny model


def lowercase_fraction(prompts, texts):
    """Reward: the fraction of a reply's characters that are ASCII lowercase letters."""
    return torch.tensor([sum(c in string.ascii_lowercase for c in t) / len(t) if t else 0.0 for t in texts])


def special_ids(model, tokenizer):
    eos = {tokenizer.eos_token_id, model.generation_config.eos_token_id}
    return {e for e in eos if e is not None}, tokenizer.pad_token_id


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def lora_names(model):
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    return names


@pytest.fixture
def fresh_policy(tiny_args):
    torch.manual_seed(0)  # lora_A's initialisation
    return ppo.build_trainable_policy(tiny_args(lora_dropout=0.0))


def test_reference_logprobs_equal_the_policy_before_the_first_update(fresh_policy):
    model, tokenizer = fresh_policy
    eos_ids, pad_id = special_ids(model, tokenizer)
    _, queries = ppo.encode_prompts(tokenizer, default_prompts()[:6], 256)
    torch.manual_seed(0)
    ro = ppo.rollout(model, tokenizer, queries, ppo.PPOConfig(max_new_tokens=6), eos_ids, pad_id)

    def both():
        with torch.no_grad():
            policy, _, _ = ppo.forward_logprobs(model, None, queries, ro.responses, ro.mask, pad_id, 1.0, False)
            with model.disable_adapter():
                reference, _, _ = ppo.forward_logprobs(model, None, queries, ro.responses, ro.mask, pad_id, 1.0, False)
        return policy, reference

    policy, reference = both()
    assert torch.isfinite(policy).all()
    torch.testing.assert_close(policy, reference)

    # the comparison can tell: once the adapter is non-zero, the reference differs
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    policy, reference = both()
    assert not torch.allclose(policy[ro.mask.bool()], reference[ro.mask.bool()], atol=1e-3)


def nan_at(i):
    def reward(prompts, texts):
        scores = torch.zeros(len(texts))
        scores[i] = float("nan")
        return scores

    return reward


def one_iteration(model, tokenizer, value_head, optimizer, reward_fn, ref_adapter=None, **cfg_overrides):
    eos_ids, pad_id = special_ids(model, tokenizer)
    prompts, queries = ppo.encode_prompts(tokenizer, default_prompts()[:4], 256)
    cfg = ppo.PPOConfig(**{"batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1, "max_new_tokens": 4, **cfg_overrides})
    torch.manual_seed(0)
    return ppo.ppo_iteration(model, value_head, optimizer, tokenizer, queries, prompts, reward_fn, cfg,
                             ppo.AdaptiveKLController(0.05, None), eos_ids, pad_id, ref_adapter)


def assert_unchanged(before: dict, after: dict, names):
    for name in names:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, equal_nan=True, msg=name)


# With the penalty on, replies that never emitted EOS (all of them here, at 4 tokens)
# lose the penalty from their score, which must not hide a NaN score.
@pytest.mark.parametrize("missing_eos_penalty", [None, 1.0])
def test_nan_reward_raises_and_leaves_the_parameters_untouched(fresh_policy, missing_eos_penalty):
    model, tokenizer = fresh_policy
    value_head = ppo.ValueHead(model.get_base_model().config.hidden_size)
    with torch.no_grad():
        value_head.summary.weight.normal_(0, 0.1)  # non-zero, so "unchanged" means something
    params = [p for p in model.parameters() if p.requires_grad] + list(value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    before, head_before = snapshot(model), snapshot(value_head)

    with pytest.raises(ppo.NonFiniteError):
        one_iteration(model, tokenizer, value_head, optimizer, nan_at(1), missing_eos_penalty=missing_eos_penalty)

    assert_unchanged(before, snapshot(model), lora_names(model))
    assert_unchanged(head_before, snapshot(value_head), head_before)
    assert not optimizer.state  # AdamW never stepped


def test_non_finite_loss_raises_before_the_optimizer_steps(fresh_policy):
    model, tokenizer = fresh_policy
    value_head = ppo.ValueHead(model.get_base_model().config.hidden_size)
    with torch.no_grad():
        value_head.summary.bias.fill_(float("nan"))  # NaN values -> NaN advantages -> NaN loss
    params = [p for p in model.parameters() if p.requires_grad] + list(value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    before, head_before = snapshot(model), snapshot(value_head)

    with pytest.raises(ppo.NonFiniteError, match="loss"):
        one_iteration(model, tokenizer, value_head, optimizer, lambda p, t: torch.zeros(len(t)), missing_eos_penalty=None)

    assert_unchanged(before, snapshot(model), lora_names(model))
    assert_unchanged(head_before, snapshot(value_head), head_before)
    assert not optimizer.state


def test_ppo_raises_a_simple_reward_and_trains_only_the_adapter_and_value_head(fresh_policy):
    model, tokenizer = fresh_policy
    before = snapshot(model)
    cfg = ppo.PPOConfig(batch_size=64, mini_batch_size=32, ppo_epochs=4, lr=1e-2, max_new_tokens=4,
                        missing_eos_penalty=None, init_kl_coef=0.01, target_kl=None)

    state, history, stop = ppo.train(model, tokenizer, default_prompts(), lowercase_fraction, cfg,
                                     iterations=8, seed=0, progress=False, log=lambda s: None)

    assert stop == "completed" and len(history) == 8
    scores = [m["objective/scores"] for m in history]
    first, last = sum(scores[:2]) / 2, sum(scores[-3:]) / 3
    assert last >= 1.5 * first and last > first + 0.05, scores
    kls = [m["objective/kl"] for m in history]
    assert all(math.isfinite(k) and k < cfg.kl_ceiling for k in kls), kls

    after = snapshot(model)
    trainable = set(lora_names(model))
    for name in trainable:
        assert not torch.equal(before[name], after[name]), f"{name} did not move"
    frozen = [n for n in before if n not in trainable]
    assert frozen
    for name in frozen:
        assert torch.equal(before[name], after[name]), f"{name} moved"
    assert any(p.abs().sum() > 0 for p in state.value_head.parameters())  # starts at zero


def test_train_stops_when_kl_exceeds_the_ceiling(fresh_policy):
    model, tokenizer = fresh_policy
    cfg = ppo.PPOConfig(batch_size=8, mini_batch_size=4, ppo_epochs=2, lr=1e-2, max_new_tokens=4,
                        missing_eos_penalty=None, target_kl=None, kl_ceiling=1e-6)

    before = {n: t.clone() for n, t in snapshot(model).items() if n in set(lora_names(model))}
    state, history, stop = ppo.train(model, tokenizer, default_prompts(), lowercase_fraction, cfg,
                                     iterations=4, seed=0, progress=False, log=lambda s: None)

    assert len(history) == 2 and history[0]["objective/kl"] == 0.0  # the first rollouts are the reference's own
    assert history[-1]["objective/kl"] > cfg.kl_ceiling
    assert stop.startswith(f"KL {history[-1]['objective/kl']:.2f} above the ceiling") and stop.endswith("restored to those of iteration 1")
    after = snapshot(model)
    for name, weight in before.items():  # two updates went past the ceiling; the adapter hands on the weights measured under it
        assert torch.equal(after[name], weight), f"{name} was not restored"
    assert all(torch.count_nonzero(p) == 0 for p in state.value_head.parameters())  # the value head too (it starts at zero)


# -- no built-in length bias; state and reference across cycles --------------------------------


def test_missing_eos_penalty_subtracts_from_the_score_and_can_be_turned_off():
    scores = torch.tensor([0.5, -0.2, 1.0])
    ended = torch.tensor([True, False, False])
    torch.testing.assert_close(ppo.eos_penalised(scores, ended, 0.3), torch.tensor([0.5, -0.5, 0.7]))
    for off in (None, 0.0):
        assert torch.equal(ppo.eos_penalised(scores, ended, off), scores)  # the score itself is never replaced


def test_the_kl_controller_moves_within_one_cycle_at_the_default_settings():
    from trainer.config import PPOArgs

    args = PPOArgs()
    cfg = ppo.config_from(args)
    high, low = (ppo.AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon) for _ in range(2))
    for _ in range(args.ppo_iterations):  # one cycle's iterations, each with one batch of rollouts
        high.update(2 * cfg.target_kl, cfg.batch_size)
        low.update(0.5 * cfg.target_kl, cfg.batch_size)
    assert high.value > 1.3 * cfg.init_kl_coef  # 1.05 ** 6
    assert low.value < 0.75 * cfg.init_kl_coef  # 0.95 ** 6


def test_a_run_from_a_parent_uses_the_parent_as_its_reference(tiny_args, make_adapter, tmp_path):
    parent = make_adapter(tmp_path / "v000001", seed=3)
    model, tokenizer = ppo.build_trainable_policy(tiny_args(lora_dropout=0.0), parent)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n in dict(model.named_parameters()) if ".policy." in n}
    eos_ids, pad_id = special_ids(model, tokenizer)
    _, queries = ppo.encode_prompts(tokenizer, default_prompts()[:6], 256)
    torch.manual_seed(0)
    ro = ppo.rollout(model, tokenizer, queries, ppo.PPOConfig(max_new_tokens=6), eos_ids, pad_id)
    with torch.no_grad():
        policy, _, _ = ppo.forward_logprobs(model, None, queries, ro.responses, ro.mask, pad_id, 1.0, False)
        with ppo.reference(model, ppo.REFERENCE_ADAPTER):
            to_parent, _, _ = ppo.forward_logprobs(model, None, queries, ro.responses, ro.mask, pad_id, 1.0, False)
        with ppo.reference(model, None):
            to_base, _, _ = ppo.forward_logprobs(model, None, queries, ro.responses, ro.mask, pad_id, 1.0, False)
    torch.testing.assert_close(policy, to_parent)  # this cycle has changed nothing yet: KL to the parent is 0
    assert not torch.allclose(policy[ro.mask.bool()], to_base[ro.mask.bool()], atol=1e-3)  # but the parent is not the base
    assert model.active_adapter == ppo.POLICY_ADAPTER
    assert all(not p.requires_grad for n, p in model.named_parameters() if f".{ppo.REFERENCE_ADAPTER}." in n)

    metrics = one_iteration(model, tokenizer, ppo.ValueHead(model.get_base_model().config.hidden_size),
                            torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3),
                            lambda p, t: torch.zeros(len(t)), ref_adapter=ppo.REFERENCE_ADAPTER)
    assert metrics["objective/kl"] == pytest.approx(0.0, abs=1e-4)  # objective/kl is the KL to the parent


def test_value_head_and_kl_controller_survive_a_save_and_load(tmp_path):
    cfg = ppo.PPOConfig(init_kl_coef=0.05)
    state = ppo.new_state(16, cfg)
    with torch.no_grad():
        state.value_head.summary.weight.normal_()
    state.kl_ctl.value = 0.123
    tensors, saved = ppo.save_state(state)
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / ppo.STATE_FILE))
    loaded, resumed = ppo.load_state(tmp_path, {ppo.STATE_KEY: saved}, 16, cfg)
    assert resumed and loaded.kl_ctl.value == 0.123
    torch.testing.assert_close(loaded.value_head.summary.weight, state.value_head.summary.weight)
    fresh, resumed = ppo.load_state(None, {}, 16, cfg)
    assert not resumed and fresh.kl_ctl.value == 0.05 and not fresh.value_head.summary.weight.any()
