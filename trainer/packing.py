"""Packing a reward-model micro-batch so each pair's shared prompt is encoded once.

A preference pair is two token lists that begin alike: the chat-templated prompt
(usually most of the tokens; HH prompts are multi-turn) and then two different
replies. Right-padding them as two rows encodes the prompt twice and computes the
padding too. Packed, a pair is one unit

    [prefix][chosen rest][rejected rest]       prefix = longest common prefix of the two lists

where the rejected rest attends to the prefix and causally to itself but not to the
chosen rest, and the position ids of both rests continue from the prefix's end, so
every token sees exactly the context, at exactly the positions, it has in its own
padded row. A pointwise (thumbs) item is one plain segment. Units go side by side
into rows of at most `max_tokens` tokens, with a block-diagonal ("tree") attention
mask so nothing attends across units; each sequence's reward is read at its last
token, whose row and column `pack` returns. The prefix is computed on the encoded
ids, so it is exact whatever the chat template and wherever a long text was cut
from the left: when the cut makes the two lists differ from the start, the prefix is
simply shorter (or empty).

Why by hand: TRL's RewardTrainer pads chosen and rejected as separate rows. The
packing that exists (transformers' DataCollatorWithFlattening, the padding-free modes
of TRL's SFT and DPO trainers, and masking_utils' detection of packed sequences from
position ids that restart) lays out only independent sequences, made for
flash-attention's varlen kernels: none lets two continuations share a prompt, and a
rejected rest whose positions restart at the prefix's end would be read as a new
sequence. A custom 4D mask can say it, and transformers' masking_utils passes a 4D
mask to sdpa and eager attention (the CPU's kernels) as given; this builds one, with
explicit position ids.

What it does not do: run the model or compute rewards (trainer/reward.py
`_batch_rewards`), tokenise, or decide whether to pack (`RewardArgs.reward_packing`,
and `packing_refusal` for attention that cannot take a 4D mask).

Run its tests: python -m pytest tests/test_packing.py -q
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

MASK_ATTENTION = ("sdpa", "eager")  # transformers' attention implementations that read a custom 4D mask

# Tokens per packed row. The mask is dense, so a row's attention costs T² whatever it
# masks: one long row wastes the attention between units, many short rows waste padding
# at their ends. On CPU with the default 135M model, rows of about a thousand tokens
# (one or two HH pairs) beat both one row per micro-batch and one row per unit once a
# micro-batch holds more than a couple of pairs; at the default micro-batch of 2 pairs
# they are one row anyway.
ROW_TOKENS = 1024

PREFIX, CHOSEN, REJECTED = 0, 1, 2  # a token's segment in its unit (a pointwise item is all PREFIX)


@dataclass
class Packed:
    """A packed micro-batch, ready for the model.

    Sequences are numbered chosen (P), then rejected (P), then pointwise (Q); the
    reward of sequence s is read at hidden[rows[s], cols[s]]."""

    input_ids: torch.Tensor  # (R, T) long, pad_id after a row's last unit
    position_ids: torch.Tensor  # (R, T) long, each sequence's own positions
    attention_mask: torch.Tensor  # (R, 1, T, T) bool: True where a query (dim 2) may attend a key (dim 3); `model_mask` gives the model's form
    rows: torch.Tensor  # (2P + Q,) long: the row of each sequence's last token
    cols: torch.Tensor  # (2P + Q,) long: its column
    tokens: int  # R × T: positions the forward pass computes
    padded_tokens: int  # (2P + Q) × longest sequence: what right-padding the same sequences computes


def shared_prefix_length(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def packing_refusal(model, max_length: int) -> str | None:
    """Why `model` cannot run a packed batch, or None when it can.

    Reads only the config, so it is cheap to ask before every batch: the attention
    must be one that reads a custom 4D mask (sdpa, eager; flash-attention and flex
    attention take other mask formats), and a sliding attention window shorter than
    a sequence would be lost, since one 4D mask is given to every layer."""
    config = _config(model)
    attention = getattr(config, "_attn_implementation", None)
    if attention not in MASK_ATTENTION:
        return f"its attention implementation {attention!r} does not read a custom 4D mask (only {', '.join(MASK_ATTENTION)} do)"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < max_length:
        return f"its sliding attention window ({window} tokens) is shorter than a sequence (up to {max_length}) and one 4D mask would lose it"
    return None


_told: weakref.WeakSet = weakref.WeakSet()  # models whose refusal has been logged (once each)


def can_pack(model, max_length: int) -> bool:
    """True when `model` can run a packed batch (`packing_refusal`); when it cannot,
    says why in one log line per model, and the caller pads instead."""
    why = packing_refusal(model, max_length)
    if why is not None and model not in _told:
        _told.add(model)
        log.info("reward fit: padding each sequence instead of packing, since the model cannot take a packed batch: %s", why)
    return why is None


def model_mask(packed: Packed, model) -> torch.Tensor:
    """The packed mask in the form `model`'s attention reads: boolean for sdpa (which
    takes it as is, whatever the dtype of the queries), additive float32 for eager
    (0 where allowed, float32's min elsewhere; added to the scores, it promotes them
    to float32, where eager's softmax runs anyway)."""
    if _config(model)._attn_implementation == "eager":
        additive = torch.zeros(packed.attention_mask.shape, dtype=torch.float32, device=packed.attention_mask.device)
        return additive.masked_fill_(~packed.attention_mask, torch.finfo(torch.float32).min)  # (R, 1, T, T)
    return packed.attention_mask  # (R, 1, T, T)


def _config(model):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def _units(pairs: list[tuple[list[int], list[int]]], points: list[list[int]]):
    """Each unit as (tokens, positions, segments, [(sequence number, index of its last token in the unit)])."""
    units = []
    for k, (chosen, rejected) in enumerate(pairs):
        if not chosen or not rejected:
            raise ValueError(f"pack: pair {k} has an empty sequence (chosen {len(chosen)} tokens, rejected {len(rejected)})")
        p = shared_prefix_length(chosen, rejected)
        a, b = len(chosen) - p, len(rejected) - p
        tokens = chosen + rejected[p:]  # [prefix][chosen rest][rejected rest]
        positions = list(range(p + a)) + list(range(p, p + b))
        segments = [PREFIX] * p + [CHOSEN] * a + [REJECTED] * b
        # a side that is all prefix ends at the prefix's last token, which sees only the prefix: itself
        last_chosen = p + a - 1
        last_rejected = p + a + b - 1 if b else p - 1
        units.append((tokens, positions, segments, [(k, last_chosen), (len(pairs) + k, last_rejected)]))
    for k, ids in enumerate(points):
        if not ids:
            raise ValueError(f"pack: pointwise item {k} is an empty sequence")
        units.append((list(ids), list(range(len(ids))), [PREFIX] * len(ids), [(2 * len(pairs) + k, len(ids) - 1)]))
    return units


def pack(pairs: list[tuple[list[int], list[int]]], points: list[list[int]], pad_id: int, max_tokens: int | None = ROW_TOKENS,
         device: torch.device | str = "cpu") -> Packed:
    """Pack (chosen ids, rejected ids) pairs and pointwise id lists into rows.

    Units are placed in order, each in the first row it fits; a row holds at most
    `max_tokens` tokens (None: all units in one row), and a unit longer than that
    gets a row of its own. Rows are right-padded to the longest; a pad token attends
    only to itself, so no softmax row is empty (an empty one would be NaN, and NaN
    reaches the gradients of the keys and values it multiplies)."""
    if not pairs and not points:
        raise ValueError("pack: nothing to pack (no pairs and no pointwise items)")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"pack: max_tokens must be at least 1 or None, got {max_tokens}")
    units = _units(pairs, points)
    rows: list[list[int]] = []  # unit numbers per row
    lengths: list[int] = []
    for u, (tokens, *_rest) in enumerate(units):
        fits = [r for r, n in enumerate(lengths) if max_tokens is None or n + len(tokens) <= max_tokens]
        if fits:
            rows[fits[0]].append(u)
            lengths[fits[0]] += len(tokens)
        else:
            rows.append([u])
            lengths.append(len(tokens))
    R, T = len(rows), max(lengths)
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)  # (R, T)
    position_ids = torch.zeros((R, T), dtype=torch.long)  # (R, T)
    unit_of = -1 - torch.arange(R * T, dtype=torch.long).view(R, T)  # (R, T): every pad a unit of its own
    segment = torch.full((R, T), PREFIX, dtype=torch.long)  # (R, T)
    n_seqs = 2 * len(pairs) + len(points)
    seq_rows = torch.empty(n_seqs, dtype=torch.long)
    seq_cols = torch.empty(n_seqs, dtype=torch.long)
    for r, members in enumerate(rows):
        start = 0
        for u in members:
            tokens, positions, segments, lasts = units[u]
            end = start + len(tokens)
            input_ids[r, start:end] = torch.tensor(tokens, dtype=torch.long)
            position_ids[r, start:end] = torch.tensor(positions, dtype=torch.long)
            segment[r, start:end] = torch.tensor(segments, dtype=torch.long)
            unit_of[r, start:end] = u
            for s, last in lasts:
                seq_rows[s], seq_cols[s] = r, start + last
            start = end
    idx = torch.arange(T)
    causal = idx[None, :] <= idx[:, None]  # (T, T): key j <= query i
    same_unit = unit_of[:, :, None] == unit_of[:, None, :]  # (R, T, T)
    across = (segment[:, :, None] == REJECTED) & (segment[:, None, :] == CHOSEN)  # (R, T, T): rejected rest must not see chosen rest
    allowed = (same_unit & causal & ~across)[:, None]  # (R, 1, T, T)
    longest = max(max(len(c), len(r)) for c, r in pairs) if pairs else 0
    longest = max([longest, *(len(x) for x in points)])
    return Packed(input_ids.to(device), position_ids.to(device), allowed.to(device), seq_rows.to(device), seq_cols.to(device),
                  tokens=R * T, padded_tokens=n_seqs * longest)
