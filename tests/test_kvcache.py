"""Tests for assistant/kvcache.py: the engine's preallocated KV cache.

Against a reference built the way the engine used to (concatenating and left-padding
whole tensors), over decode steps, joins of wider and narrower prompts, retirements of
rows in the middle, and growth past the preallocated columns; and that a decode step
and a join with room to spare write into the same buffer instead of copying it.
Engine-level equality with transformers' generate is in tests/test_chat.py.

Run: python -m pytest tests/test_kvcache.py -q
"""

from __future__ import annotations

import torch

from assistant import kvcache
from assistant.kvcache import SlackLayer

H, D = 2, 4


def prefill(rows: int, width: int, seed: int) -> tuple[SlackLayer, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(rows, H, width, D, generator=g)
    layer = SlackLayer()
    layer.update(k, k + 100)
    return layer, k


def left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - t.shape[2]
    return torch.cat([t.new_zeros(t.shape[0], H, missing, D), t], dim=2) if missing else t


def check(layer: SlackLayer, ref: torch.Tensor) -> None:
    torch.testing.assert_close(layer.keys, ref, rtol=0, atol=0)
    torch.testing.assert_close(layer.values, ref + 100 * (ref != 0), rtol=0, atol=0)
    assert layer.get_seq_length() == ref.shape[2]


def step(layer: SlackLayer, ref: torch.Tensor, seed: int) -> torch.Tensor:
    new = torch.randn(layer.rows, H, 1, D, generator=torch.Generator().manual_seed(seed))
    keys, values = layer.update(new, new + 100)
    assert keys.shape[2] == ref.shape[2] + 1
    return torch.cat([ref, new], dim=2)


def test_decode_joins_and_retirements_match_the_concatenating_reference():
    layer, ref = prefill(2, 5, seed=0)
    for i in range(3):
        ref = step(layer, ref, 10 + i)
    check(layer, ref)

    other, k = prefill(2, 12, seed=1)  # wider than the running rows (8 columns): they get left padding
    layer.join(other, row_capacity=6)
    width = max(ref.shape[2], k.shape[2])
    ref = torch.cat([left_pad(ref, width), left_pad(k, width)], dim=0)
    check(layer, ref)
    ref = step(layer, ref, 20)

    other, k = prefill(1, 3, seed=2)  # narrower: the new row gets the padding
    layer.join(other, row_capacity=6)
    ref = torch.cat([ref, left_pad(k, ref.shape[2])], dim=0)
    check(layer, ref)
    ref = step(layer, ref, 21)

    keep = [0, 1, 4]  # retire rows 2 and 3, the wide prompts: row 4 moves down
    ref = ref[keep]
    drop = int((ref.abs().sum(dim=(0, 1, 3)) == 0).long().cumprod(0).sum())  # padding columns no kept row needs
    layer.keep(keep, drop)
    ref = ref[:, :, drop:]
    check(layer, ref)
    assert drop > 0, "the test must retire the row that needed the widest padding"

    for i in range(kvcache.RIGHT_SLACK + 5):  # past the preallocated columns: the buffer grows
        ref = step(layer, ref, 100 + i)
    check(layer, ref)


def test_a_decode_step_writes_into_the_buffer_instead_of_copying_it():
    layer, ref = prefill(3, 6, seed=3)
    buffer = layer.k_buf.data_ptr()
    for i in range(20):
        ref = step(layer, ref, 30 + i)
    assert layer.k_buf.data_ptr() == buffer
    check(layer, ref)


def test_a_join_with_room_copies_only_the_new_rows():
    layer, ref = prefill(1, 4, seed=4)
    layer.join(prefill(1, 4, seed=5)[0], row_capacity=8)  # the first join makes room for 8 rows
    buffer = layer.k_buf.data_ptr()
    before = layer.k_buf[:2].clone()
    other, k = prefill(2, 3, seed=6)
    layer.join(other, row_capacity=8)
    assert layer.k_buf.data_ptr() == buffer, "a join that fits must not reallocate"
    torch.testing.assert_close(layer.k_buf[:2], before, rtol=0, atol=0)  # running rows untouched
    assert layer.rows == 4


def test_a_retired_rows_stale_values_never_show_through_padding():
    layer, _ = prefill(4, 6, seed=7)
    layer.keep([0], 0)  # rows 1-3 retired; their values stay in the buffer
    buffer = layer.k_buf.data_ptr()
    other, k = prefill(1, 2, seed=8)  # joins into row 1, narrower than the batch
    layer.join(other, row_capacity=4)
    assert layer.k_buf.data_ptr() == buffer, "the join must reuse the buffer, or the test checks nothing"
    assert torch.count_nonzero(layer.keys[1, :, : 6 - 2]) == 0
    torch.testing.assert_close(layer.keys[1, :, 4:], k[0], rtol=0, atol=0)
