"""Tests for trainer/packing.py and the packed forward pass of trainer/reward.py's fit.

The layout and mask of a packed pair against a hand-written one; packed rewards equal
to padded rewards (sdpa and eager attention) for pairs sharing a long prompt, pairs
where one side is all prefix, pairs with no common prefix, pointwise items and a mix
of all, one row or several; equal gradients of the LoRA and head parameters under the
Bradley-Terry loss; the token counts `pack` reports; the fallback to padding (with one
log line) for attention that cannot take a 4D mask; `--no-reward-packing` on the CLI
and through `fit`.

Everything runs on the tiny seeded model from tests/tiny.py (weights sharpened by
conftest's tiny_dir, so attention depends on which tokens a token may see and at
which positions), offline, on CPU.
Run: python -m pytest tests/test_packing.py -q
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import random

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from assistant.config import ModelArgs, add_args, from_args
from assistant.model import backbone
from trainer import packing, reward
from trainer.config import RewardArgs
from trainer.data import Examples, Pair, prompt_messages

ATOL = 1e-5
LONG_PROMPT = (
    ("system", "You are a careful assistant who answers in full sentences and never in lists."),
    ("user", "My garden has three apple trees, a pear tree and a row of raspberry canes along the fence."),
    ("assistant", "That sounds like a lovely garden. What would you like to know about it?"),
    ("user", "Which of them should I prune first this winter, and how hard?"),
)
CUSTOM_ATTENTION = "sdpa_without_custom_masks"  # an attention the packer does not know: it must pad


@pytest.fixture(scope="module")
def rm(tiny_dir):
    """A reward model on the tiny base whose LoRA B weights are random, so the adapter
    changes the output and its A weights get gradients."""
    model = reward.build(ModelArgs(model=str(tiny_dir), quantize="none", device="cpu"), RewardArgs(reward_max_length=512, seed=3))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


@pytest.fixture
def attention(rm):
    """attention(name) switches the model's attention implementation for one test."""
    config = backbone(rm.model).config
    before = config._attn_implementation

    def use(name: str):
        config._attn_implementation = name

    yield use
    config._attn_implementation = before


def encoded_pair(rm, prompt, chosen: str, rejected: str, max_length: int | None = None):
    cut = dataclasses.replace(rm, max_length=max_length) if max_length else rm
    messages = prompt_messages(prompt)
    return ("pair", cut.encode(messages, chosen), cut.encode(messages, rejected), 1.0)


def encoded_point(rm, prompt, reply: str, label: int):
    return ("point", rm.encode(prompt_messages(prompt), reply), label, 1.0)


def shared_prompt_pairs(rm) -> list:
    return [
        encoded_pair(rm, LONG_PROMPT, "Prune the apple trees first, by about a third.", "Start with the raspberries; cut them to the ground."),
        encoded_pair(rm, LONG_PROMPT, "The pear tree.", "Leave them all alone until spring, then prune lightly."),
    ]


def one_side_all_prefix(rm) -> list:
    """Pairs where one sequence is a prefix of the other, and one of identical sides."""
    _, ids, _, _ = encoded_pair(rm, LONG_PROMPT, "Prune the apple trees first, by about a third.", "")
    return [("pair", ids, ids[:-9], 1.0), ("pair", ids[:-5], ids, 1.0), ("pair", ids, list(ids), 1.0)]


def no_common_prefix(rm) -> list:
    """Cut from the left to 40 tokens, replies of different lengths start at different tokens."""
    item = encoded_pair(rm, LONG_PROMPT, "Apples first.", "Raspberries first, then the pear tree, and the apples last of all.", max_length=40)
    assert packing.shared_prefix_length(item[1], item[2]) == 0, "the case must have no common prefix"
    return [item]


def pointwise(rm) -> list:
    return [encoded_point(rm, LONG_PROMPT, "Prune the apples in late winter.", 1),
            encoded_point(rm, (("user", "Hi"),), "Hello! How can I help?", 0)]


CASES = {
    "shared prompt": lambda rm: shared_prompt_pairs(rm),
    "one side all prefix": lambda rm: one_side_all_prefix(rm),
    "no common prefix": lambda rm: no_common_prefix(rm),
    "pointwise": lambda rm: pointwise(rm),
    "mix of all": lambda rm: shared_prompt_pairs(rm)[:1] + pointwise(rm)[:1] + one_side_all_prefix(rm) + no_common_prefix(rm) + pointwise(rm)[1:],
}


def split(items: list) -> tuple[list, list]:
    return [b for b in items if b[0] == "pair"], [b for b in items if b[0] == "point"]


def rewards_and_grads(rm, items: list, packed: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """All rewards (chosen, rejected, pointwise) of one `_batch_rewards` call, and the
    gradients of the trainable parameters under Bradley-Terry + logistic loss."""
    pairs, points = split(items)
    params = {n: p for n, p in rm.model.named_parameters() if p.requires_grad}
    params.update({f"head.{n}": p for n, p in rm.head.named_parameters()})
    for p in params.values():
        p.grad = None
    chosen, rejected, point = reward._batch_rewards(rm, pairs, points, packing=packed)
    loss = chosen.new_zeros(())
    if pairs:
        loss = loss + reward.pairwise_loss(chosen, rejected)
    if points:
        loss = loss + reward.pointwise_loss(point, torch.tensor([float(b[2]) for b in points]))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None
    return torch.cat([chosen, rejected, point]).detach(), grads


# -- the layout -------------------------------------------------------------------


def test_shared_prefix_length():
    assert packing.shared_prefix_length([1, 2, 3, 4], [1, 2, 5]) == 2
    assert packing.shared_prefix_length([1, 2], [1, 2, 3]) == 2
    assert packing.shared_prefix_length([1, 2, 3], [1, 2, 3]) == 3
    assert packing.shared_prefix_length([7, 2], [1, 2]) == 0
    assert packing.shared_prefix_length([], [1]) == 0


def test_a_pair_is_prefix_chosen_rest_rejected_rest_with_the_rests_kept_apart():
    packed = packing.pack([([5, 6, 7, 8], [5, 6, 9])], [[4, 3]], pad_id=0)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 4, 3]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1]]
    expected = [  # query (row) may attend key (column)
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],  # chosen rest: prefix + itself
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],  # rejected rest: prefix + itself, not the chosen rest
        [0, 0, 0, 0, 0, 1, 0],  # the pointwise item: only itself
        [0, 0, 0, 0, 0, 1, 1],
    ]
    assert packed.attention_mask.shape == (1, 1, 7, 7)
    assert packed.attention_mask[0, 0].int().tolist() == expected
    assert packed.rows.tolist() == [0, 0, 0] and packed.cols.tolist() == [3, 4, 6]  # chosen, rejected, pointwise last tokens


def test_a_side_that_is_all_prefix_is_read_at_the_prefix_end():
    packed = packing.pack([([5, 6, 7], [5, 6]), ([5, 6], [5, 6, 7]), ([5, 6], [5, 6])], [], pad_id=0)
    assert packed.input_ids.tolist() == [[5, 6, 7, 5, 6, 7, 5, 6]]
    # chosen of pairs 0..2, then rejected of pairs 0..2
    assert packed.cols.tolist() == [2, 4, 7, 1, 5, 7]


def test_rows_respect_the_token_budget_and_pads_see_only_themselves():
    rng = random.Random(0)
    pairs = [([9] * 6 + [rng.randrange(10, 99) for _ in range(rng.randrange(1, 6))], [9] * 6 + [rng.randrange(10, 99) for _ in range(rng.randrange(1, 6))])
             for _ in range(5)]
    points = [[rng.randrange(10, 99) for _ in range(n)] for n in (3, 25)]  # 25: longer than the budget, a row of its own
    packed = packing.pack(pairs, points, pad_id=0, max_tokens=20)
    real = packed.input_ids != 0
    assert all(int(n) <= 20 for n in real.sum(1)[:-1]) and packed.input_ids.shape[0] > 1
    assert packed.attention_mask.any(-1).all(), "every query attends to something (no empty softmax row)"
    pads = ~real
    diagonal = torch.eye(packed.input_ids.shape[1], dtype=torch.bool)
    assert (packed.attention_mask[:, 0][pads] == diagonal[None].expand(len(real), -1, -1)[pads]).all()
    seqs = [c for c, _ in pairs] + [r for _, r in pairs] + points
    assert packed.input_ids[packed.rows, packed.cols].tolist() == [s[-1] for s in seqs]
    for s, seq in enumerate(seqs):  # each sequence's last token sits at its own last position
        assert int(packed.position_ids[packed.rows[s], packed.cols[s]]) == len(seq) - 1


def test_pack_refuses_empty_input():
    with pytest.raises(ValueError, match="nothing to pack"):
        packing.pack([], [], pad_id=0)
    with pytest.raises(ValueError, match="pair 0 has an empty sequence"):
        packing.pack([([], [1])], [], pad_id=0)
    with pytest.raises(ValueError, match="max_tokens"):
        packing.pack([([1], [1])], [], pad_id=0, max_tokens=0)


def test_packing_a_long_shared_prompt_computes_fewer_tokens(rm):
    pairs, _ = split(shared_prompt_pairs(rm))
    seqs = [(b[1], b[2]) for b in pairs]
    packed = packing.pack(seqs, [], rm.tokenizer.pad_token_id)
    prefixes = [packing.shared_prefix_length(c, r) for c, r in seqs]
    assert min(prefixes) > 100  # the case: most of each sequence is the prompt
    assert packed.tokens == sum(len(c) + len(r) - p for (c, r), p in zip(seqs, prefixes))
    longest = max(len(s) for pair in seqs for s in pair)
    assert packed.padded_tokens == 4 * longest
    assert packed.tokens < 0.7 * packed.padded_tokens


# -- the same rewards and gradients as padding ---------------------------------------


@pytest.mark.parametrize("rows", ["rows of ROW_TOKENS", "rows of 64 tokens"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("case", list(CASES))
def test_packed_rewards_and_gradients_equal_padded_ones(rm, attention, monkeypatch, impl, case, rows):
    attention(impl)
    if rows == "rows of 64 tokens":  # several rows, some holding one unit longer than the budget
        monkeypatch.setattr(reward, "pack", functools.partial(packing.pack, max_tokens=64))
    items = CASES[case](rm)
    padded, padded_grads = rewards_and_grads(rm, items, packed=False)
    packed, packed_grads = rewards_and_grads(rm, items, packed=True)
    assert torch.allclose(packed, padded, atol=ATOL), (packed - padded).abs().max()
    assert padded.std() > 1e-3, "the items' rewards differ, so a mix-up would show"
    assert any(g.abs().max() > 0 for n, g in padded_grads.items() if "lora_A" in n), "LoRA A weights get gradients"
    for name, g in padded_grads.items():  # relative to each gradient's size (the sharpened model's are O(1)); the
        # head's bias gets none from the pairwise loss, which reads r_chosen − r_rejected, hence the absolute floor
        err = float((packed_grads[name] - g).norm())
        assert err < 1e-4 * float(g.norm()) + ATOL, f"{name}: error {err:.2e} on a gradient of norm {float(g.norm()):.2e}"


def test_a_rejected_reply_cannot_see_the_chosen_one(rm):
    """The check above can fail: the same pair packed without the mask that keeps the two
    rests apart (as one plain sequence) gives the rejected reply a different reward."""
    pairs, _ = split(shared_prompt_pairs(rm)[:1])
    with torch.no_grad():
        chosen, rejected, _ = reward._batch_rewards(rm, pairs, [], packing=True)
    leaky = packing.pack([(pairs[0][1], pairs[0][2])], [], rm.tokenizer.pad_token_id)
    T = leaky.input_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None, None]  # (1, 1, T, T): the rejected rest sees the chosen rest
    body = backbone(rm.model)
    with torch.no_grad():
        hidden = body(input_ids=leaky.input_ids, position_ids=leaky.position_ids, attention_mask=causal, use_cache=False).last_hidden_state
        seen = rm.head(hidden[leaky.rows, leaky.cols]).squeeze(-1)
    assert torch.allclose(seen[0], chosen[0], atol=ATOL)  # the chosen reply reads the same context either way
    assert not torch.allclose(seen[1], rejected[0], atol=1e-3)


# -- the fallback -------------------------------------------------------------------


def test_a_model_that_cannot_take_the_mask_is_padded_with_one_log_line(rm, attention, caplog):
    items = CASES["mix of all"](rm)
    pairs, points = split(items)
    attention("sdpa")
    expected = torch.cat(reward._batch_rewards(rm, pairs, points, packing=True)).detach()
    AttentionInterface.register(CUSTOM_ATTENTION, sdpa_attention_forward)
    AttentionMaskInterface.register(CUSTOM_ATTENTION, sdpa_mask)
    try:
        attention(CUSTOM_ATTENTION)
        assert "does not read a custom 4D mask" in packing.packing_refusal(backbone(rm.model), rm.max_length)
        packing._told.discard(backbone(rm.model))
        with caplog.at_level(logging.INFO, logger="trainer.packing"):
            first = torch.cat(reward._batch_rewards(rm, pairs, points, packing=True)).detach()
            again = torch.cat(reward._batch_rewards(rm, pairs, points, packing=True)).detach()
    finally:
        del AttentionInterface._global_mapping[CUSTOM_ATTENTION]
        del AttentionMaskInterface._global_mapping[CUSTOM_ATTENTION]
    assert torch.allclose(first, expected, atol=ATOL) and torch.equal(first, again)
    lines = [r.getMessage() for r in caplog.records if "instead of packing" in r.getMessage()]
    assert len(lines) == 1 and CUSTOM_ATTENTION in lines[0]


def test_a_sliding_window_shorter_than_a_sequence_refuses_packing(rm):
    config = backbone(rm.model).config
    assert packing.packing_refusal(backbone(rm.model), 512) is None
    config.sliding_window = 64
    try:
        assert "sliding attention window (64 tokens)" in packing.packing_refusal(backbone(rm.model), 512)
        assert packing.packing_refusal(backbone(rm.model), 64) is None
    finally:
        del config.sliding_window


# -- the setting ---------------------------------------------------------------------


def test_reward_packing_is_on_by_default_and_off_with_its_flag():
    parser = argparse.ArgumentParser()
    add_args(parser, RewardArgs, "reward")
    assert from_args(RewardArgs, parser.parse_args([])).reward_packing is True
    assert from_args(RewardArgs, parser.parse_args(["--no-reward-packing"])).reward_packing is False
    with pytest.raises(ValueError, match="--reward-packing"):
        RewardArgs(reward_packing="no").validate()


def test_fit_packed_and_padded_learn_the_same_model(tiny_dir, monkeypatch):
    """A short fit either way ends at the same scores (float rounding apart), and
    `reward_packing` decides which way it goes."""
    calls = []
    monkeypatch.setattr(reward, "pack", lambda *a, **kw: calls.append(1) or packing.pack(*a, **kw))
    model_args = ModelArgs(model=str(tiny_dir), quantize="none", device="cpu")
    rng = random.Random(0)
    pairs = [Pair(LONG_PROMPT + (("user", f"And question {i}?"),), f"Answer {rng.randrange(100)} with banana.", f"Answer {rng.randrange(100)}.",
                  f"conv-{i}", "comparison") for i in range(8)]
    args = RewardArgs(reward_lr=3e-3, reward_epochs=1, reward_min_steps=0, reward_batch_size=4, reward_micro_batch_size=2, reward_max_length=256,
                      min_pairs=1)
    train = Examples(pairs=pairs)
    on, metrics_on = reward.fit(model_args, args, train, Examples(), progress=False)
    assert len(calls) == 4  # 8 pairs, 2 per micro-batch
    off, metrics_off = reward.fit(model_args, dataclasses.replace(args, reward_packing=False), train, Examples(), progress=False)
    assert len(calls) == 4
    prompts, replies = [prompt_messages(p.prompt) for p in pairs], [p.chosen for p in pairs]
    # normalised: Adam's first step moves a parameter by ±lr whatever its gradient's size, and the head's bias
    # gets none from the pairwise loss, only rounding, so raw scores may shift alike by up to 2·lr (the mean takes that out)
    assert torch.allclose(on.score(prompts, replies), off.score(prompts, replies), atol=1e-4)
    assert metrics_on["train_loss"] == pytest.approx(metrics_off["train_loss"], abs=1e-5)
