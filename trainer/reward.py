"""The reward model: build, loss, fit, score, normalise, save and load.

The reward model is the policy's base model (same `--model`, same `--quantize`) with
its own LoRA adapter and a scalar head on the last hidden state, all built through
`assistant.model`:

    text = apply_chat_template(prompt + [{"role": "assistant", "content": reply}])
    r(prompt, reply) = head(h_last)     h_last: hidden state of the text's last token

Long texts are cut from the left, so the end of the reply is always scored. It is
fitted with the Bradley-Terry loss on preference pairs plus a logistic loss on
pointwise (thumbs) labels; after fitting, scores are normalised to mean 0 and std 1
over the training replies, so PPO sees the same scale from one refit to the next.

Each example's loss is weighed by its `weight`: the reliability of the people who
judged it and how far they agree (assistant/annotators.py, pairs.build_examples;
imported pairs weigh 1). Weights are rescaled to mean 1 over the examples fitted on,
so they shift the fit towards reliable judges without changing the learning rate's
scale: when everyone weighs the same, the fit is the unweighted one.

Optionally (`--reward-condition-on-profile`) the model also reads who is judging:
people's preferences differ by profile group (a physician and a novice may prefer
different replies), and a model that cannot tell them apart learns their average, or
nothing where they disagree. A conditioned model reads one extra leading system message:

    text = apply_chat_template([{"role": "system", "content": "Rater profile: <group>"}]
                               + prompt + [{"role": "assistant", "content": reply}])

with <group> the example's profile group (pairs.build_examples(by_profile=True)), or
"any" when it has none (imported pairs, scoring for everyone). Each example is trained
twice, with its group and with "any", so the "any" score stays the reward of the
feedback as a whole: PPO, GRPO/RLOO and the gate's judge score with "any", and
`score(..., profiles=[...])` asks a group's view. When a text is too long, the profile
message is kept and the rest is cut from the left as usual. Without the flag the input
is the plain text above, exactly.

On disk, one directory per fit, numbered like adapters:

    data/reward/r000001/
        adapter_config.json, adapter_model.safetensors   the peft LoRA adapter
        head.safetensors                                  the scalar head: weight (1, H), bias (1,)
        normalizer.json                                   {"mean", "std", "n"} of raw scores on the reference set
        manifest.json                                     base model, quantisation, condition_on_profile, feedback ids, counts, metrics, args, times

What it does not do: read the feedback store or split data (data.py), run PPO
(ppo.py), or decide when to refit (schedule.py).

Run its tests: python -m pytest tests/test_reward.py -q
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoConfig

from assistant import cycles
from assistant.adapters import fsync_dir
from assistant.config import ModelArgs
from assistant.model import backbone, lora_config, resolve_device, resolve_model_path, resolve_quantize, scalar_head
from trainer import distributed, shared
from trainer.config import RewardArgs
from trainer.data import Examples, Pair, Pointwise, prompt_messages
from trainer.packing import can_pack, model_mask, pack
from trainer.gate import wilson

log = logging.getLogger(__name__)

ADAPTER = "reward"  # peft name of the reward model's adapter
HEAD_FILE = "head.safetensors"
NORMALIZER_FILE = "normalizer.json"
MANIFEST_FILE = "manifest.json"
REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors", HEAD_FILE, NORMALIZER_FILE, MANIFEST_FILE)
VERSION_RE = cycles.REWARD_VERSION_RE
STD_FLOOR = 1e-6  # a reference set that scores all alike is centred, not blown up
PROFILE_PREFIX = "Rater profile: "  # a conditioned model reads "Rater profile: <group>" as a leading system message
ANY_PROFILE = "any"  # the group a conditioned model scores for when none is given


# -- pure math -------------------------------------------------------------------


def _weighted_mean(losses: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """mean(w · loss): a weight of 1 everywhere is the plain mean."""
    if weights is None:
        return losses.mean()
    return (weights.to(losses) * losses).mean()


def pairwise_loss(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley-Terry: mean over pairs of w · −log σ(r_chosen − r_rejected).

    rewards_chosen, rewards_rejected, weights: (B,) → scalar."""
    losses = -F.logsigmoid(rewards_chosen - rewards_rejected)  # (B,)
    return _weighted_mean(losses, weights)


def pointwise_loss(rewards: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Logistic (binary cross-entropy with logits): the reward is the log-odds that a
    reply is good. Mean over examples of w · BCE(r, label).

    rewards, labels (0 or 1), weights: (B,) → scalar."""
    losses = F.binary_cross_entropy_with_logits(rewards, labels.to(rewards.dtype), reduction="none")  # (B,)
    return _weighted_mean(losses, weights)


def agreement(example: Pair | Pointwise) -> float:
    """support / (support + against), the share of judgements that agree with an
    example: 1 for a unanimous judgement, 0.75 for three-to-one, 0.5 for a tie. It is
    the `weight` build_examples gives when every judge weighs 1."""
    total = example.support + example.against
    return example.support / total if total > 0 else 1.0


def relative_weights(examples: list[Pair | Pointwise]) -> list[float]:
    """The examples' `weight`s rescaled to mean 1, so a weighted mean of losses stays on
    the unweighted scale; equal weights give 1 each. All zero stays all zero."""
    raw = [float(x.weight) for x in examples]
    bad = [w for w in raw if not (math.isfinite(w) and w >= 0)]
    if bad:
        raise ValueError(f"example weights must be finite and >= 0, got {bad[0]!r}")
    total = sum(raw)
    if total == 0:
        return raw
    return [w * len(raw) / total for w in raw]


accuracy_ci = wilson  # (accuracy, lo, hi): the accuracy and its 95% Wilson interval; n = 0 gives (nan, 0, 1)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each row's last real token, for right- or left-padded batches.

    attention_mask: (B, T) of 0/1 → (B,) long."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # (T,)
    return (positions * attention_mask.long()).amax(dim=1)  # (B,)


def pad_right(seqs: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into (input_ids, attention_mask), both (B, T)."""
    longest = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(seqs), longest), dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, : len(s)] = 1
    return input_ids.to(device), attention_mask.to(device)


# -- the model -------------------------------------------------------------------


@dataclass
class RewardModel:
    """Base + reward LoRA adapter + scalar head, with the normalisation of its scores.

    `mean`/`std` are those of raw scores over the reference set (`n` replies; n = 0
    means not yet normalised, i.e. mean 0 and std 1)."""

    model: PeftModel
    head: torch.nn.Linear
    tokenizer: object
    model_name: str
    quantize: str
    max_length: int
    mean: float = 0.0
    std: float = 1.0
    n: int = 0
    condition_on_profile: bool = False  # reads a "Rater profile: <group>" system message first
    adapter: str = ADAPTER  # its peft adapter's name; on a shared base (trainer/shared.py) others sit beside it

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def encode(self, prompt: list[dict], reply: str, profile: str | None = None) -> list[int]:
        """Token ids of the chat-templated prompt + reply, cut from the left to max_length.

        A conditioned model reads the profile message first (`profile` None or "" =
        "any"), and keeps it whole when the text is cut. An unconditioned model reads no
        profile and refuses one."""
        messages = list(prompt) + [{"role": "assistant", "content": reply}]
        if not self.condition_on_profile:
            if profile:
                raise ValueError(f"this reward model was fitted without --reward-condition-on-profile and reads no profile, got {profile!r}")
            text = self.tokenizer.apply_chat_template(messages, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return ids[-self.max_length :]
        lead = [{"role": "system", "content": PROFILE_PREFIX + (profile or ANY_PROFILE)}]
        lead_text = self.tokenizer.apply_chat_template(lead, tokenize=False)
        text = self.tokenizer.apply_chat_template(lead + messages, tokenize=False)
        if not text.startswith(lead_text):
            raise ValueError(f"the chat template of {self.model_name} does not render a leading system message as a prefix of the "
                             "conversation, so the profile message cannot be kept when a text is cut; fit without --reward-condition-on-profile")
        lead_ids = self.tokenizer(lead_text, add_special_tokens=False)["input_ids"]
        keep = self.max_length - len(lead_ids)
        if keep < 1:
            raise ValueError(f"--reward-max-length {self.max_length} leaves no room after the {len(lead_ids)}-token profile message; raise it")
        return lead_ids + self.tokenizer(text[len(lead_text):], add_special_tokens=False)["input_ids"][-keep:]

    def rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Raw scores of a padded batch, differentiable: (B, T), (B, T) → (B,) float32."""
        with shared.using(self.model, self.adapter):
            hidden = backbone(self.model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # (B, T, H)
        last = last_token_index(attention_mask)  # (B,)
        h_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
        return self.head(h_last.float()).squeeze(-1)  # (B,)

    def score_ids(self, seqs: list[list[int]], batch_size: int = 16) -> torch.Tensor:
        """Raw scores of token lists, batched longest-first to waste little padding: (B,) on CPU.

        Puts the model in eval mode (dropout off) and leaves it there."""
        self.model.eval()
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        out = torch.empty(len(seqs), dtype=torch.float32)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                input_ids, attention_mask = pad_right([seqs[i] for i in idx], self.tokenizer.pad_token_id, self.device)
                out[idx] = self.rewards(input_ids, attention_mask).float().cpu()
        return out

    def score(self, prompts: list[list[dict]], replies: list[str], profiles: list[str] | None = None, batch_size: int = 16,
              raw: bool = False) -> torch.Tensor:
        """Score each (prompt, reply): (B,) float32 on CPU.

        `prompts[i]` is the conversation before the reply, as [{role, content}, ...].
        `profiles[i]`: the profile group to score for (conditioned models only; None,
        or "" in the list, = "any"). Normalised (mean 0, std 1 on the reference set,
        scored as "any") unless raw=True."""
        if len(prompts) != len(replies):
            raise ValueError(f"score: {len(prompts)} prompts but {len(replies)} replies")
        if profiles is not None and len(profiles) != len(replies):
            raise ValueError(f"score: {len(profiles)} profiles but {len(replies)} replies")
        if not replies:
            return torch.empty(0)
        profiles = profiles if profiles is not None else [None] * len(replies)
        scores = self.score_ids([self.encode(p, r, g) for p, r, g in zip(prompts, replies, profiles)], batch_size)  # (B,)
        return scores if raw else (scores - self.mean) / self.std


def _reward_lora(model_args: ModelArgs, reward_args: RewardArgs, num_layers: int):
    """The policy's LoRA recipe (target modules, dropout) at the reward model's rank and
    alpha, on the top `reward_lora_layers` transformer layers (all when 0 or more than
    there are): below them nothing is trained, so the backward pass stops there."""
    top = reward_args.reward_lora_layers
    layers = list(range(num_layers - top, num_layers)) if 0 < top < num_layers else None
    return dataclasses.replace(lora_config(dataclasses.replace(model_args, lora_r=reward_args.reward_lora_r, lora_alpha=reward_args.reward_lora_alpha)),
                               layers_to_transform=layers, layers_pattern="layers" if layers else None)


def build(model_args: ModelArgs, reward_args: RewardArgs) -> RewardModel:
    """A fresh, untrained reward model (seeded): base + new LoRA adapter + new head.

    A quantised base goes through peft's `prepare_model_for_kbit_training` (freezes it
    and casts its non-quantised weights to float32 for stable LoRA gradients), without
    gradient checkpointing, which would recompute every layer during the backward pass
    to save activation memory that reward-model batches rarely need.

    Inside a `trainer.shared.sharing` block the adapter (named reward_N) goes on the
    block's shared base and is made the active, trainable one."""
    quantize = resolve_quantize(model_args.quantize, resolve_device(model_args.device))
    before = (lambda base: shared.prepare_kbit(model_args, base)) if quantize in ("nf4", "int8") else None
    name = shared.unique_name(model_args, ADAPTER)
    num_layers = AutoConfig.from_pretrained(resolve_model_path(model_args)).get_text_config().num_hidden_layers
    torch.manual_seed(reward_args.seed)
    tokenizer, model = shared.adapter_model(model_args, name, config=_reward_lora(model_args, reward_args, num_layers), before=before)
    model.set_adapter(name)  # active and trainable; other adapters on a shared base frozen
    head = scalar_head(model)
    model.eval()
    return RewardModel(model, head, tokenizer, model_args.model, quantize, reward_args.reward_max_length,
                       condition_on_profile=reward_args.reward_condition_on_profile, adapter=name)


# -- evaluation ------------------------------------------------------------------


def _profile(rm: RewardModel, example: Pair | Pointwise, with_profile: bool) -> str | None:
    """The group `example` is scored for: its own with `with_profile` on a conditioned
    model, else none ("any"; an unconditioned model reads none)."""
    return example.profile if with_profile and rm.condition_on_profile else None


def _pair_scores(rm: RewardModel, pairs: list[Pair], batch_size: int, with_profile: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (rewards_chosen, rewards_rejected), each (P,), from one longest-first scoring pass."""
    seqs = [rm.encode(prompt_messages(p.prompt), p.chosen, _profile(rm, p, with_profile)) for p in pairs]
    seqs += [rm.encode(prompt_messages(p.prompt), p.rejected, _profile(rm, p, with_profile)) for p in pairs]
    scores = rm.score_ids(seqs, batch_size)  # (2P,)
    return scores[: len(pairs)], scores[len(pairs) :]


def evaluate_pairs(reward_model: RewardModel, pairs: list[Pair], batch_size: int = 16, with_profile: bool = False) -> dict:
    """Pairwise accuracy (r_chosen > r_rejected) with its 95% Wilson interval, and the
    weighted Bradley-Terry loss (`relative_weights`), on raw scores. No pairs → accuracy and loss None.

    with_profile: a conditioned model scores each pair for its own `profile` group
    (else for "any", the way PPO and the gate score); an unconditioned one reads none."""
    if not pairs:
        return {"accuracy": None, "lo": 0.0, "hi": 1.0, "n": 0, "loss": None}
    rewards_chosen, rewards_rejected = _pair_scores(reward_model, pairs, batch_size, with_profile)
    weights = torch.tensor(relative_weights(pairs))
    correct = int((rewards_chosen > rewards_rejected).sum())
    acc, lo, hi = accuracy_ci(correct, len(pairs))
    loss = pairwise_loss(rewards_chosen, rewards_rejected, weights)
    return {"accuracy": acc, "lo": lo, "hi": hi, "n": len(pairs), "loss": float(loss)}


def evaluate_pointwise(reward_model: RewardModel, items: list[Pointwise], batch_size: int = 16, with_profile: bool = False) -> dict:
    """Accuracy of sign(r) against the labels and the weighted logistic loss (`relative_weights`), on raw scores.
    with_profile: as in evaluate_pairs."""
    if not items:
        return {"accuracy": None, "n": 0, "loss": None}
    rewards = reward_model.score_ids([reward_model.encode(prompt_messages(x.prompt), x.completion, _profile(reward_model, x, with_profile))
                                      for x in items], batch_size)  # (N,)
    labels = torch.tensor([float(x.label) for x in items])  # (N,)
    weights = torch.tensor(relative_weights(items))
    correct = int(((rewards > 0).float() == labels).sum())
    return {"accuracy": correct / len(items), "n": len(items), "loss": float(pointwise_loss(rewards, labels, weights))}


def reference_set(examples: Examples, cap: int = 512, seed: int = 0) -> tuple[list[list[dict]], list[str]]:
    """The replies the normalisation is measured on: every distinct (prompt, reply) among
    the chosen, rejected and pointwise replies, a seeded sample of `cap` when there are more."""
    seen: dict[tuple, None] = {}
    for p in examples.pairs:
        seen[(p.prompt, p.chosen)] = None
        seen[(p.prompt, p.rejected)] = None
    for x in examples.pointwise:
        seen[(x.prompt, x.completion)] = None
    keys = list(seen)
    if len(keys) > cap:
        keys = [keys[i] for i in sorted(random.Random(seed).sample(range(len(keys)), cap))]
    return [prompt_messages(prompt) for prompt, _ in keys], [reply for _, reply in keys]


def normalize(reward_model: RewardModel, prompts: list[list[dict]], replies: list[str], batch_size: int = 16) -> None:
    """Set the model's mean/std to those of its raw scores on (prompts, replies), scored
    for "any" when the model is conditioned on profiles (the way PPO scores)."""
    raw = reward_model.score(prompts, replies, batch_size=batch_size, raw=True)  # (N,)
    reward_model.mean = float(raw.mean())
    reward_model.std = max(float(raw.std(correction=0)), STD_FLOOR)
    reward_model.n = len(replies)


# -- fitting ---------------------------------------------------------------------


def _batch_rewards(rm: RewardModel, pairs: list, points: list, packing: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Differentiable raw rewards of encoded items in one forward pass: (chosen (P,),
    rejected (P,), pointwise (Q,)). Items as in `_batch_loss`.

    Packed (trainer/packing.py, `--reward-packing`): each pair's shared prompt is
    encoded once, as [prompt][chosen rest][rejected rest] with a mask that keeps the
    two rests apart, and units share rows of up to `packing.ROW_TOKENS` tokens, so
    little padding is computed; the rewards are the padded batch's to float rounding.
    Without packing, or on a model whose attention cannot take the packed mask
    (`can_pack` says so once in the log), every sequence is a right-padded row of its own."""
    body = backbone(rm.model)
    if not (packing and can_pack(body, rm.max_length)):
        seqs = [b[1] for b in pairs] + [b[2] for b in pairs] + [b[1] for b in points]
        input_ids, attention_mask = pad_right(seqs, rm.tokenizer.pad_token_id, rm.device)  # (2P + Q, T)
        rewards = rm.rewards(input_ids, attention_mask)  # (2P + Q,)
        return tuple(rewards.split([len(pairs), len(pairs), len(points)]))
    packed = pack([(b[1], b[2]) for b in pairs], [b[1] for b in points], rm.tokenizer.pad_token_id, device=rm.device)
    with shared.using(rm.model, rm.adapter):
        hidden = body(input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=model_mask(packed, body),
                      use_cache=False).last_hidden_state  # (R, T, H)
    rewards = rm.head(hidden[packed.rows, packed.cols].float()).squeeze(-1)  # (2P + Q,)
    return tuple(rewards.split([len(pairs), len(pairs), len(points)]))


def _batch_loss(rm: RewardModel, batch: list, pointwise_weight: float, total: int, packing: bool = True) -> tuple[torch.Tensor, int, int]:
    """This part's share of an optimiser step's loss, in one forward pass over its
    chosen, rejected and pointwise sequences (packed or padded: `_batch_rewards`).

    (Σ_pairs w · −log σ(r_chosen − r_rejected) + pointwise_weight · Σ_points w · BCE(r, label)) / total,
    with `total` the number of examples in the step's global batch: a sum over examples,
    so the parts' losses (micro-batches, processes) add up to the step's loss whatever the
    split. Items are ("pair", ids_chosen, ids_rejected, weight) or ("point", ids, label, weight).
    Returns (loss, correct pairs, pairs)."""
    pairs = [b for b in batch if b[0] == "pair"]
    points = [b for b in batch if b[0] == "point"]
    rewards_chosen, rewards_rejected, rewards_point = _batch_rewards(rm, pairs, points, packing)
    loss = rewards_chosen.new_zeros(()) if pairs else rewards_point.new_zeros(())
    correct = 0
    if pairs:
        weights = torch.tensor([b[3] for b in pairs], device=rm.device)
        loss = loss + pairwise_loss(rewards_chosen, rewards_rejected, weights) * len(pairs)  # the sum over pairs
        correct = int((rewards_chosen > rewards_rejected).sum())
    if points:
        labels = torch.tensor([float(b[2]) for b in points], device=rm.device)
        weights = torch.tensor([b[3] for b in points], device=rm.device)
        loss = loss + pointwise_weight * pointwise_loss(rewards_point, labels, weights) * len(points)  # the sum over labels
    return loss / total, correct, len(pairs)


def _reads(example: Pair | Pointwise) -> tuple[str | None, ...]:
    """The profiles a conditioned fit reads `example` with: its group and "any" (None)."""
    return (example.profile, None) if example.profile else (None,)


def _spread(values: list[float]) -> dict:
    return {"min": min(values), "mean": sum(values) / len(values), "max": max(values)} if values else {}


def check_enough(train: Examples, min_pairs: int) -> None:
    """Refuse to fit on fewer than `min_pairs` training examples (pairs + pointwise labels)."""
    have = len(train.pairs) + len(train.pointwise)
    if have < min_pairs:
        raise ValueError(
            f"need at least {min_pairs} training pairs or pointwise labels to fit a reward model (--min-pairs), "
            f"have {have} ({len(train.pairs)} pairs, {len(train.pointwise)} pointwise); "
            "collect more feedback or import a preference file with `python -m trainer import FILE`"
        )


def epoch_count(examples: int, reward_args: RewardArgs) -> int:
    """Passes over `examples` training items: --reward-epochs, or more when that many
    would take fewer than --reward-min-steps optimiser steps (a small snapshot, such as
    one fold of a cycle's first few dozen pairs, would otherwise stop after a handful of
    steps, before the head has moved far from its initialisation)."""
    steps_per_epoch = max(1, math.ceil(examples / reward_args.reward_batch_size))
    return max(reward_args.reward_epochs, math.ceil(reward_args.reward_min_steps / steps_per_epoch))


def fit(model_args: ModelArgs, reward_args: RewardArgs, train: Examples, val: Examples, progress: bool = True,
        on_step=None) -> tuple[RewardModel, dict]:
    """Fit a fresh reward model on `train`, normalise it, evaluate it on `val`.

    AdamW on the LoRA and head parameters only (the base stays frozen), seeded
    shuffling, one optimiser step per `reward_batch_size` examples (a pair or a
    pointwise label each), dropout off. A step's loss is a sum over its examples,
    divided by their number:

        (Σ_pairs w · −log σ(r_chosen − r_rejected) + pointwise_weight · Σ_points w · BCE(r, label)) / examples

    with w each example's `relative_weights` (its judges' reliability). A batch of only
    pairs or only labels gives their plain weighted mean; in a mixed batch each sort
    counts in proportion to its examples (a batch of 6 pairs and 2 labels weighs the
    pairwise loss 6/8 and the pointwise 2/8 × pointwise_weight), whatever the split
    into micro-batches, so that parts of a batch add up to its loss.
    Launched data-parallel (trainer/distributed.py), every process shuffles alike and
    fits its contiguous share of each global batch; gradients are summed across
    processes before clipping, so each takes the optimiser step of the whole batch,
    and the loss and accuracy figures are those of all processes. Normalisation and
    validation run on every process alike; saving is the caller's (rank 0's) business.
    A model conditioned on profiles (`reward_condition_on_profile`) reads each example
    twice, with its profile group and with "any" (once when it has no group), at the
    example's weight each time.
    Memory is bounded whatever the data: each forward/backward pass holds at most
    `reward_micro_batch_size` examples of at most `reward_max_length` tokens (gradients
    accumulate to the step), and only the top `reward_lora_layers` layers, the ones
    with LoRA weights, keep activations for the backward pass (the frozen layers below
    need no gradient). `reward_gradient_checkpointing` recomputes even those, with
    dropout on.
    `on_step(step, loss)`, if given, is called after every optimiser step.
    Returns (model in eval mode, metrics):

    train_pairs, train_pointwise, val_pairs, val_pointwise   examples of each sort
    train_examples_by_kind   training examples by feedback kind (comparison, thumbs, ...)
    train_weights            {min, mean, max} of the training examples' weights before rescaling
    train_loss               mean step loss (above) over the last epoch's steps, measured while training
    train_accuracy           share of the last epoch's pairs with r_chosen > r_rejected, while training
                             (a conditioned model: over both reads of each pair)
    val_loss                 on `val` after fitting, dropout off: mean weighted pairwise loss + pointwise_weight
                             × mean weighted pointwise loss (None without val data)
    val_accuracy, _lo, _hi   validation pairwise accuracy and its 95% Wilson interval
    val_pointwise_accuracy   share of validation labels whose reward sign matches the label
                             (validation of a conditioned model scores "any", as PPO and the
                             gate do; the same figures read for each example's own group:)
    val_accuracy_by_profile, _lo, _hi, val_pointwise_accuracy_by_profile, train_examples_by_profile
                             conditioned models only
    steps                    optimiser steps
    pairs_per_s              training examples (a pair or a label each) per second of the optimiser loop
    train_seconds, seconds   the optimiser loop; the whole fit with loading, normalising, validating
    normalizer               {mean, std, n} of raw scores on the reference set
    """
    check_enough(train, reward_args.min_pairs)
    started = time.perf_counter()
    rm = build(model_args, reward_args)
    params = [p for p in rm.model.parameters() if p.requires_grad] + list(rm.head.parameters())
    optimizer = torch.optim.AdamW(params, lr=reward_args.reward_lr)

    weights = relative_weights([*train.pairs, *train.pointwise])  # each example's loss weight, mean 1
    if not rm.condition_on_profile:
        items = [("pair", rm.encode(prompt_messages(p.prompt), p.chosen), rm.encode(prompt_messages(p.prompt), p.rejected), w)
                 for p, w in zip(train.pairs, weights)]
        items += [("point", rm.encode(prompt_messages(x.prompt), x.completion), x.label, w)
                  for x, w in zip(train.pointwise, weights[len(train.pairs):])]
    else:  # each example read for its group and for "any" (once when it has no group)
        items = [("pair", rm.encode(prompt_messages(p.prompt), p.chosen, g), rm.encode(prompt_messages(p.prompt), p.rejected, g), w)
                 for p, w in zip(train.pairs, weights) for g in _reads(p)]
        items += [("point", rm.encode(prompt_messages(x.prompt), x.completion, g), x.label, w)
                  for x, w in zip(train.pointwise, weights[len(train.pairs):]) for g in _reads(x)]
    bs = reward_args.reward_batch_size
    mbs = min(reward_args.reward_micro_batch_size, bs)
    steps_per_epoch = math.ceil(len(items) / bs)
    epochs = epoch_count(len(items), reward_args)
    rng = random.Random(reward_args.seed)

    if reward_args.reward_gradient_checkpointing:  # transformers checkpoints only in train mode (dropout on)
        rm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        rm.model.train()
    else:
        rm.model.eval()  # dropout off, as in PPO and TRL's disable_dropout; about 2x faster forward passes on CPU
    loop_started = time.perf_counter()
    bar = tqdm(total=steps_per_epoch * epochs, desc="reward model", unit="step", disable=not progress)
    distributed.broadcast_params(params)  # launched data-parallel: every process starts from rank 0's weights
    for epoch in range(epochs):
        rng.shuffle(items)  # seeded alike on every process: they all see the same global batches
        epoch_loss, epoch_correct, epoch_pairs = 0.0, 0, 0
        for start in range(0, len(items), bs):
            batch = items[start : start + bs]
            optimizer.zero_grad(set_to_none=True)
            step_loss, step_correct, step_pairs, bad = 0.0, 0, 0, None
            mine = distributed.shard(batch)  # this process's share of the global batch (all of it in one process)
            for micro in range(0, len(mine), mbs):  # gradients accumulate over micro-batches
                part = mine[micro : micro + mbs]
                loss, correct, n_pairs = _batch_loss(rm, part, reward_args.pointwise_weight, len(batch), reward_args.reward_packing)
                if not torch.isfinite(loss):
                    bad = loss.item()
                    break
                loss.backward()
                step_loss += loss.detach().item()
                step_correct += correct
                step_pairs += n_pairs
            # the step's loss and counts over every process; a non-finite loss anywhere stops them all
            totals = distributed.all_reduce_sum(torch.tensor([step_loss, step_correct, step_pairs, bad is not None], dtype=torch.float64))
            if totals[3] > 0:
                raise FloatingPointError(f"reward-model loss is {bad if bad is not None else 'not finite on another process'} "
                                         f"at epoch {epoch + 1}, step {start // bs + 1}; lower --reward-lr")
            step_loss = float(totals[0])
            epoch_correct += int(totals[1])
            epoch_pairs += int(totals[2])
            distributed.all_reduce_grads(params)  # the global batch's gradient, the same on every process
            torch.nn.utils.clip_grad_norm_(params, reward_args.reward_max_grad_norm)
            optimizer.step()
            epoch_loss += step_loss
            if on_step is not None:
                on_step(bar.n + 1, step_loss)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{step_loss:.3f}", acc=f"{epoch_correct / max(epoch_pairs, 1):.2f}")
    bar.close()
    train_seconds = time.perf_counter() - loop_started
    if reward_args.reward_gradient_checkpointing:
        rm.model.gradient_checkpointing_disable()
    rm.model.eval()

    normalize(rm, *reference_set(train, reward_args.normalizer_size, reward_args.seed), reward_args.reward_eval_batch_size)
    val_pairs = evaluate_pairs(rm, val.pairs, reward_args.reward_eval_batch_size)
    val_points = evaluate_pointwise(rm, val.pointwise, reward_args.reward_eval_batch_size)
    val_loss = None
    if val_pairs["n"] or val_points["n"]:
        val_loss = (val_pairs["loss"] or 0.0) + reward_args.pointwise_weight * (val_points["loss"] or 0.0)
    metrics = {
        "train_pairs": len(train.pairs),
        "train_pointwise": len(train.pointwise),
        "val_pairs": len(val.pairs),
        "val_pointwise": len(val.pointwise),
        "train_examples_by_kind": dict(Counter(x.kind for x in [*train.pairs, *train.pointwise])),
        "train_weights": _spread([x.weight for x in [*train.pairs, *train.pointwise]]),
        "train_loss": epoch_loss / steps_per_epoch,
        "train_accuracy": epoch_correct / epoch_pairs if epoch_pairs else None,
        "val_loss": val_loss,
        "val_accuracy": val_pairs["accuracy"],
        "val_accuracy_lo": val_pairs["lo"],
        "val_accuracy_hi": val_pairs["hi"],
        "val_pointwise_accuracy": val_points["accuracy"],
        "epochs": epochs,
        "steps": steps_per_epoch * epochs,
        "pairs_per_s": len(items) * epochs / train_seconds,
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - started,
        "normalizer": {"mean": rm.mean, "std": rm.std, "n": rm.n},
    }
    if rm.condition_on_profile:
        by_profile = evaluate_pairs(rm, val.pairs, reward_args.reward_eval_batch_size, with_profile=True)
        metrics.update({
            "val_accuracy_by_profile": by_profile["accuracy"],
            "val_accuracy_by_profile_lo": by_profile["lo"],
            "val_accuracy_by_profile_hi": by_profile["hi"],
            "val_pointwise_accuracy_by_profile": evaluate_pointwise(rm, val.pointwise, reward_args.reward_eval_batch_size, with_profile=True)["accuracy"],
            "train_examples_by_profile": dict(Counter(x.profile or ANY_PROFILE for x in [*train.pairs, *train.pointwise])),
        })
        metrics["seconds"] = time.perf_counter() - started
    return rm, metrics


# -- on disk ---------------------------------------------------------------------


versions = cycles.reward_versions  # saved versions, oldest first (the data/ contract, shared with the dashboard)
read_manifest = cycles.reward_manifest


def save(reward_dir: str | Path, reward_model: RewardModel, manifest: dict) -> str:
    """Write `reward_model` as the next version rNNNNNN under `reward_dir`; returns it.

    The caller's `manifest` should carry what only it knows: `feedback_ids` (the id
    range per feedback table used), `counts` (feedback rows by kind), `metrics` (from
    fit) and `reward_args`. This adds version, created_at, base_model, quantize,
    max_length, condition_on_profile (how the model reads its input) and the normaliser. Written under a temporary name, fsynced, renamed."""
    d = Path(reward_dir)
    d.mkdir(parents=True, exist_ok=True)
    existing = versions(d)
    version = f"r{int(existing[-1][1:]) + 1 if existing else 1:06d}"
    tmp = Path(tempfile.mkdtemp(dir=d, prefix=f".{version}."))
    try:
        reward_model.model.save_pretrained(str(tmp), selected_adapters=[reward_model.adapter])
        nested = tmp / reward_model.adapter  # peft nests adapters not named 'default'
        if nested.is_dir():
            for f in nested.iterdir():
                os.replace(f, tmp / f.name)
            nested.rmdir()
        head = reward_model.head
        save_file({"weight": head.weight.detach().float().cpu().contiguous(), "bias": head.bias.detach().float().cpu().contiguous()}, str(tmp / HEAD_FILE))
        normalizer = {"mean": reward_model.mean, "std": reward_model.std, "n": reward_model.n}
        (tmp / NORMALIZER_FILE).write_text(json.dumps(normalizer, indent=2))
        full = {
            **manifest,
            "version": version,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "base_model": reward_model.model_name,
            "quantize": reward_model.quantize,
            "max_length": reward_model.max_length,
            "condition_on_profile": reward_model.condition_on_profile,
            "normalizer": normalizer,
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(full, indent=2, default=str))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        os.rename(tmp, d / version)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(d)
    return version




def _same_model(a: str, b: str) -> bool:
    """Model names are equal, or both are paths to the same directory."""
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def load(reward_dir: str | Path, model_args: ModelArgs, version: str | None = None) -> RewardModel:
    """Load a saved reward model (None = the latest) on the base `model_args` names.

    Refuses, before loading any weights, a version that is incomplete or was trained
    on a different base model. The manifest's `condition_on_profile` says whether the
    model reads a profile message before the conversation (absent: it does not)."""
    d = Path(reward_dir)
    if version is None:
        saved = versions(d)
        if not saved:
            raise FileNotFoundError(f"no reward model under {d}; fit one first")
        version = saved[-1]
    path = d / version
    if not VERSION_RE.match(version) or not path.is_dir():
        raise FileNotFoundError(f"no reward model {version!r} under {d} (have: {', '.join(versions(d)) or 'none'})")
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise ValueError(f"reward model {version} is incomplete: missing {', '.join(missing)}")
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    if not _same_model(manifest["base_model"], model_args.model):
        raise ValueError(f"reward model {version} was trained on base {manifest['base_model']!r}, but --model is {model_args.model!r}; refit the reward model on this base")
    quantize = resolve_quantize(model_args.quantize, resolve_device(model_args.device))
    if quantize != manifest["quantize"]:
        log.warning("reward model %s was fitted on a %s base and is loaded on a %s one; scores shift slightly", version, manifest["quantize"], quantize)
    name = shared.unique_name(model_args, ADAPTER)
    tokenizer, model = shared.adapter_model(model_args, name, path=path)
    head = scalar_head(model)
    state = load_file(str(path / HEAD_FILE))
    if tuple(state["weight"].shape) != tuple(head.weight.shape):
        raise ValueError(f"reward model {version}: head shape {tuple(state['weight'].shape)} does not fit the base's {tuple(head.weight.shape)}")
    head.load_state_dict({k: v.to(head.weight) for k, v in state.items()})
    head.requires_grad_(False)
    normalizer = json.loads((path / NORMALIZER_FILE).read_text())
    model.eval()
    return RewardModel(model, head, tokenizer, model_args.model, quantize, manifest["max_length"], normalizer["mean"], normalizer["std"], normalizer["n"],
                       condition_on_profile=bool(manifest.get("condition_on_profile", False)),  # absent: fitted before profiles existed
                       adapter=name)
