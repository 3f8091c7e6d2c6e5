"""bench/sft_format.py: its settings are PolicyArgs fields, typed, and a wrong one is refused."""

from __future__ import annotations

import pytest

from bench import sft_format
from bench.common import SYSTEM


def test_a_setting_names_policy_args_fields_and_casts_their_values():
    assert sft_format.parse_setting("defaults:") == ("defaults", {})
    label, fields = sft_format.parse_setting("few steps: sft_min_steps=1, sft_corrections=whole, sft_lr=1e-4")
    assert label == "few steps"
    assert fields == {"sft_min_steps": 1, "sft_corrections": "whole", "sft_lr": 1e-4}
    assert isinstance(fields["sft_min_steps"], int) and isinstance(fields["sft_lr"], float)


@pytest.mark.parametrize("text", ["x:sft_steps=3", "x:sft_min_steps", "x:sft_min_steps=many"])
def test_a_setting_that_is_not_a_typed_policy_args_field_is_refused(text):
    with pytest.raises((SystemExit, ValueError)):
        sft_format.parse_setting(text)


def test_the_prompts_are_the_ones_the_app_sends():
    msgs = sft_format.messages("Name a colour.")
    assert msgs[-1] == {"role": "user", "content": "Name a colour."}
    assert (msgs[0]["content"] == SYSTEM) if SYSTEM.strip() else len(msgs) == 1
