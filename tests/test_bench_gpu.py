"""bench/gpu.py: its pieces (tokenizer padding, bytes per decode step) and its smallest CPU run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from assistant.config import ModelArgs
from assistant.model import lora_config
from bench import gpu
from tests.tiny import tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]


def test_padded_tokenizer_reaches_the_vocab_and_keeps_the_tiny_tokenizer():
    tiny, tok = tiny_tokenizer(), gpu.padded_tokenizer(1000)
    assert len(tok) == 1000
    text = "Hello, wörld"
    assert tok(text)["input_ids"] == tiny(text)["input_ids"]  # the padding adds no merges
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (2, 0, 1)
    assert tok.decode([999, 500], skip_special_tokens=True) == "<|pad999|><|pad500|>"
    with pytest.raises(ValueError, match="smaller"):
        gpu.padded_tokenizer(10)


def test_bytes_per_step_skip_an_untied_input_embedding_and_lora():
    model = tiny_model(300)  # untied: the LM head and the input embedding are two matrices
    every = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    expected = every - embedding.numel() * embedding.element_size()
    assert gpu.bytes_read_per_step(model) == expected
    peft_model = get_peft_model(model, lora_config(ModelArgs()))
    assert any("lora_" in n for n, _ in peft_model.named_parameters())
    assert gpu.bytes_read_per_step(peft_model) == expected


def test_bytes_per_step_count_a_tied_matrix_once():
    config = gpu.shape_config("smollm2-135m", 1)
    config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads = 64, 128, 4, 2
    config.head_dim = 16
    config.vocab_size = 512
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert gpu.bytes_read_per_step(model) == sum(p.numel() * 4 for p in model.parameters())  # parameters() lists it once


def test_kv_bytes_per_token_of_the_shapes():
    # keys and values, all layers: 2 × layers × kv heads × head_dim × bytes
    assert gpu.kv_bytes_per_token(gpu.shape_config("smollm2-135m", None), torch.bfloat16) == 2 * 30 * 3 * 64 * 2
    assert gpu.kv_bytes_per_token(gpu.shape_config("qwen2-1.5b", None), torch.bfloat16) == 2 * 28 * 2 * 128 * 2
    assert gpu.kv_bytes_per_token(gpu.shape_config("llama3-8b", None), torch.float32) == 2 * 32 * 8 * 128 * 4


def test_shape_configs_are_the_real_architectures():
    small, qwen, llama = (gpu.shape_config(s, None) for s in ("smollm2-135m", "qwen2-1.5b", "llama3-8b"))
    assert (small.model_type, small.hidden_size, small.num_hidden_layers, small.vocab_size, small.tie_word_embeddings) == ("llama", 576, 30, 49152, True)
    assert (qwen.model_type, qwen.hidden_size, qwen.num_hidden_layers, qwen.intermediate_size, qwen.vocab_size) == ("qwen2", 1536, 28, 8960, 151936)
    assert (llama.num_attention_heads, llama.num_key_value_heads, llama.intermediate_size, llama.tie_word_embeddings) == (32, 8, 14336, False)
    assert gpu.shape_config("smollm2-135m", 2).num_hidden_layers == 2


def test_tiny_cpu_run_writes_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "bench/gpu.py", "--tiny", "--budget-s", "600", "--threads", "1", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert (r["setting"], r["device"]["type"], r["dtype"]) == ("tiny", "cpu", "float32")
    assert r["bandwidth"]["hbm_gbps"] == 4800 and "default" in r["bandwidth"]["source"]
    assert set(r["models"]) == set(gpu.SHAPES)
    for entry in r["models"].values():
        assert set(entry) == {"build", "engine", "swap", "ppo", "reward"} and set(entry["engine"]) == {"none", "nf4"}

    m = r["models"]["smollm2-135m"]
    assert m["build"]["status"] == "ok" and m["build"]["layers"] == 1 and m["build"]["config"]["vocab_size"] == 49152
    engine = m["engine"]["none"]
    assert engine["status"] == "ok" and engine["peak_memory_mb"] > 0 and engine["weight_bytes_per_step"] > 0
    assert set(engine["streams"]) == {"1", "2"}
    for n, rnd in engine["streams"].items():
        assert rnd["streams"] == int(n) and 0 < rnd["tokens"] <= int(n) * 4 and not rnd["cut_short"]
        assert rnd["tokens_per_s"] > 0 and rnd["bound_tokens_per_s"] > 0 and 0 < rnd["share_of_bandwidth_bound"] < 1
    assert m["engine"]["nf4"]["status"] == "skipped" and "CPU" in m["engine"]["nf4"]["reason"]
    swap = m["swap"]
    assert swap["status"] == "ok" and swap["swaps"] == 2 and swap["swaps_failed"] == 0 and swap["replies_failed"] == 0
    assert 0 < swap["swap_ms_p50"] <= swap["swap_ms_p99"] <= swap["swap_ms_max"] and swap["swaps_that_loaded"] >= 1
    assert m["ppo"]["status"] == "ok" and m["ppo"]["seconds"] > 0 and m["ppo"]["peak_memory_mb"] > 0 and m["ppo"]["response/length"] > 0
    assert m["reward"]["status"] == "ok" and m["reward"]["steps"] == 1 and m["reward"]["step_s"] > 0 and m["reward"]["peak_memory_mb"] > 0

    for shape in ("qwen2-1.5b", "llama3-8b"):
        assert r["models"][shape]["build"] == {"status": "skipped", "reason": "not in the tiny setting"}
    assert [i["status"] for i in r["items"]] == ["ok"] * 5 and r["elapsed_s"] > 0
