"""Tests for assistant/portable.py: the rules an adapter directory keeps so that vLLM
and SGLang can load it at run time, checked on adapters made the way this project
makes them and on adapters that break each rule.
Run: python -m pytest tests/test_portable.py -q
"""

from __future__ import annotations

import json

import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from assistant import portable
from assistant.config import ModelArgs
from assistant.model import lora_config


def _save(tmp_path, tiny_dir, **overrides):
    cfg = lora_config(ModelArgs(model=str(tiny_dir)))
    cfg = LoraConfig(**{**cfg.to_dict(), **overrides})
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir), cfg)
    out = tmp_path / "adapter"
    model.save_pretrained(out)
    return out


def test_the_projects_adapters_are_servable(tmp_path, make_adapter):
    assert portable.problems(make_adapter(tmp_path / "v000001")) == []
    wide = make_adapter(tmp_path / "v000002", lora_target_modules="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    assert portable.problems(wide) == []


@pytest.mark.parametrize("overrides, expected", [
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"use_dora": True}, "DoRA"),
    ({"bias": "lora_only"}, "biases"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "target_modules"),
    ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
])
def test_each_rule_is_checked(tmp_path, tiny_dir, overrides, expected):
    found = portable.problems(_save(tmp_path, tiny_dir, **overrides))
    assert any(expected in p for p in found), found


def test_a_rank_above_what_engines_accept_and_stray_tensors_are_refused(tmp_path, make_adapter):
    d = make_adapter(tmp_path / "v000001")
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "r": 1024}))
    found = portable.problems(d)
    assert any("1..512" in p for p in found) and any("lora_A must be (r=1024" in p for p in found), found

    from safetensors.torch import load_file, save_file
    import torch

    (d / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = load_file(d / "adapter_model.safetensors")
    save_file({**tensors, "base_model.model.lm_head.weight": torch.zeros(4, 4)}, d / "adapter_model.safetensors")
    assert any("not LoRA A/B" in p for p in portable.problems(d))


def test_a_missing_or_garbled_directory_says_what_is_wrong(tmp_path, make_adapter):
    assert "unreadable" in portable.problems(tmp_path)[0]
    d = make_adapter(tmp_path / "v000001")
    (d / "adapter_model.safetensors").write_bytes(b"\x01")
    assert "unreadable" in portable.problems(d)[-1]
    (d / "adapter_model.safetensors").unlink()
    assert "missing" in portable.problems(d)[-1]


def test_publishing_refuses_an_adapter_serving_engines_could_not_load(tmp_path, trained_peft):
    from assistant import adapters

    good = adapters.publish(tmp_path, trained_peft(seed=1), "default", {"parent": "base"})
    assert portable.problems(tmp_path / good) == []
    wide = trained_peft(seed=2, lora_target_modules="q_proj,embed_tokens")  # an embedding LoRA: not servable there
    with pytest.raises(adapters.InvalidAdapter, match="not publishing v000002: target_modules"):
        adapters.publish(tmp_path, wide, "default", {"parent": "base"})
    assert adapters.versions(tmp_path) == [good] and not [p for p in tmp_path.iterdir() if p.name.startswith(".v")]
