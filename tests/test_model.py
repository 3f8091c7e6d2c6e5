"""Tests for assistant/model.py: device and quantisation choice, config validation,
the policy build (none / nf4 / int8 on CPU), and generating through peft with a
trained adapter on a 4-bit base.

Everything runs on the tiny seeded model from tests/tiny.py, offline, on CPU.
Run: python -m pytest tests/test_model.py -q
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel

import assistant.model as model_mod
from assistant.chat import Engine, GenParams
from assistant.config import BASE_VERSION, ModelArgs
from assistant.model import INIT_ADAPTER, build_policy, resolve_device, resolve_quantize

GREEDY = GenParams(temperature=0.0, max_new_tokens=24)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
BNB_CLASS = {"nf4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}


def lora_wrapped(model) -> dict[str, torch.nn.Module]:
    """Modules that carry LoRA, by name."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")}


# -- device and quantisation choice -------------------------------------------------


def test_auto_quantize_is_none_on_cpu():
    assert resolve_quantize("auto", torch.device("cpu")) == "none"


def test_auto_quantize_is_nf4_on_cuda():
    assert resolve_quantize("auto", torch.device("cuda")) == "nf4"


@pytest.mark.parametrize("choice", ["nf4", "int8", "none"])
def test_explicit_quantize_is_kept(choice):
    assert resolve_quantize(choice, torch.device("cpu")) == choice


def test_auto_device_is_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_device_without_cuda_is_a_clear_error(monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=rf"--device {device}: CUDA is not available.*--device cpu"):
        resolve_device(device)


# -- ModelArgs.validate ------------------------------------------------------------


def test_default_model_args_are_valid():
    ModelArgs().validate()


@pytest.mark.parametrize(
    "overrides, flag",
    [
        ({"lora_r": 0}, "--lora-r"),
        ({"lora_r": -4}, "--lora-r"),
        ({"lora_alpha": 0}, "--lora-alpha"),
        ({"lora_dropout": 1.0}, "--lora-dropout"),
        ({"lora_dropout": -0.1}, "--lora-dropout"),
        ({"lora_target_modules": " , "}, "--lora-target-modules"),
        ({"lora_target_modules": ""}, "--lora-target-modules"),
        ({"device": "gpu"}, "--device"),
        ({"device": "mps"}, "--device"),
    ],
)
def test_model_args_reject_bad_values_naming_the_flag(overrides, flag):
    with pytest.raises(ValueError, match=flag):
        ModelArgs(**overrides).validate()


def test_target_modules_are_split_and_stripped():
    assert ModelArgs(lora_target_modules=" q_proj, v_proj ,").target_modules == ["q_proj", "v_proj"]


def test_unknown_quantize_is_refused_by_load_base(tiny_args):
    with pytest.raises(ValueError, match="--quantize"):
        model_mod.load_base(tiny_args(quantize="fp8"))


# -- build_policy -----------------------------------------------------------------


@pytest.mark.parametrize("quantize", ["none", "nf4", "int8"])
def test_build_policy_wraps_the_base_in_peft(tiny_args, quantize):
    policy = build_policy(tiny_args(quantize=quantize))
    assert isinstance(policy.model, PeftModel)
    assert policy.quantize == quantize
    assert policy.current == BASE_VERSION
    assert policy.loaded == {}
    assert policy.device == torch.device("cpu")
    assert not policy.model.training
    wrapped = lora_wrapped(policy.model)
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert INIT_ADAPTER in policy.model.peft_config


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_quantized_policy_uses_bitsandbytes_layers(tiny_args, quantize):
    policy = build_policy(tiny_args(quantize=quantize))
    wrapped = lora_wrapped(policy.model)
    assert wrapped
    for name, module in wrapped.items():
        assert isinstance(module.base_layer, BNB_CLASS[quantize]), name
    mlp = policy.model.base_model.model.model.layers[0].mlp
    assert isinstance(mlp.gate_proj, BNB_CLASS[quantize])  # layers without LoRA are quantised too


def test_unquantized_policy_uses_plain_linear_layers(tiny_args):
    policy = build_policy(tiny_args(quantize="none"))
    for name, module in lora_wrapped(policy.model).items():
        assert type(module.base_layer) is torch.nn.Linear, name


@pytest.mark.parametrize("quantize", ["none", "nf4", "int8"])
def test_base_parameters_are_frozen(tiny_args, quantize):
    policy = build_policy(tiny_args(quantize=quantize))
    base = [(n, p) for n, p in policy.model.named_parameters() if "lora_" not in n]
    assert base
    assert not [n for n, p in base if p.requires_grad]


def test_nf4_keeps_the_requested_compute_dtype(tiny_args):
    policy = build_policy(tiny_args(quantize="nf4"))
    for name, module in lora_wrapped(policy.model).items():
        assert module.base_layer.compute_dtype == torch.float32, name


# -- nf4 on CPU, generating through peft with a trained adapter ----------------------


@pytest.fixture
def nf4_with_adapter(tiny_args, make_adapter, tmp_path):
    """An nf4 policy on CPU with a trained-looking adapter loaded as v000001, and its engine."""
    policy = build_policy(tiny_args(quantize="nf4"))
    policy.load_adapter("v000001", make_adapter(tmp_path / "v000001", seed=3))
    policy.current = "v000001"
    engine = Engine(policy)
    yield policy, engine
    engine.close()


def test_nf4_adapter_reply_differs_from_base(nf4_with_adapter, drain):
    policy, engine = nf4_with_adapter
    tuned = engine.submit(QUESTION, GREEDY)
    base = engine.submit(QUESTION, GREEDY, version=BASE_VERSION)
    drain(tuned), drain(base)
    assert tuned.reply.adapter_version == "v000001"
    assert base.reply.adapter_version == BASE_VERSION
    assert tuned.reply.text != base.reply.text


def test_nf4_adapter_reply_equals_peft_generate(nf4_with_adapter, drain, hf_greedy):
    policy, engine = nf4_with_adapter
    stream = engine.submit(QUESTION, GREEDY)
    drain(stream)

    def peft_generate(p):
        p.model.set_adapter("v000001")
        return hf_greedy(p.model, p.tokenizer, QUESTION, GREEDY.max_new_tokens)

    assert stream.reply.completion_tokens == GREEDY.max_new_tokens
    assert stream.reply.text == engine.call(peft_generate).result()


def test_nf4_base_reply_equals_peft_generate_with_adapter_disabled(nf4_with_adapter, drain, hf_greedy):
    policy, engine = nf4_with_adapter
    stream = engine.submit(QUESTION, GREEDY, version=BASE_VERSION)
    drain(stream)

    def base_generate(p):
        with p.model.disable_adapter():
            return hf_greedy(p.model, p.tokenizer, QUESTION, GREEDY.max_new_tokens)

    assert stream.reply.text == engine.call(base_generate).result()


def test_unloading_an_adapter_removes_it_from_peft(nf4_with_adapter):
    policy, engine = nf4_with_adapter
    engine.call(lambda p: p.unload_adapter("v000001")).result()
    assert "v000001" not in policy.loaded
    assert "v000001" not in policy.model.peft_config


# -- adapter slots: staging off the engine thread ------------------------------------


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def _logits(policy, adapter: str):
    ids = policy.tokenizer("What is the capital of France?", return_tensors="pt")["input_ids"]
    policy.model.set_adapter(adapter)
    with torch.no_grad():
        return policy.model(input_ids=ids).logits


def test_a_staged_adapter_computes_what_peft_loading_computes(tiny_args, make_adapter, tmp_path):
    path = make_adapter(tmp_path / "v000001", seed=3)
    by_peft, by_slot = build_policy(tiny_args()), build_policy(tiny_args())
    by_peft.load_adapter("v000001", path)
    by_slot.add_slot()
    assert by_slot.stage("v000001", _weights(path)) and "v000001" not in by_slot.loaded
    by_slot.load_adapter("v000001", path)
    assert by_slot.loaded["v000001"] == "slot0" and "v000001" not in by_slot.model.peft_config
    assert by_peft.loaded["v000001"] == "v000001"
    torch.testing.assert_close(_logits(by_slot, "slot0"), _logits(by_peft, "v000001"))
    assert not torch.equal(_logits(by_slot, "slot0"), _logits(by_slot, INIT_ADAPTER))  # the weights really arrived


def test_slots_are_reused_and_a_misfit_adapter_falls_back_to_peft(tiny_args, make_adapter, tmp_path):
    policy = build_policy(tiny_args())
    policy.add_slot()
    adapters = set(policy.model.peft_config)
    for i in range(1, 4):  # one slot serves one version after another
        v = f"v00000{i}"
        path = make_adapter(tmp_path / v, seed=i)
        assert policy.stage(v, _weights(path))
        policy.load_adapter(v, path)
        policy.unload_adapter(v)
    assert set(policy.model.peft_config) == adapters and policy.loaded == {} and policy.staged == {}
    wide = make_adapter(tmp_path / "v000004", lora_r=4)  # another rank: does not fit the slot
    assert not policy.stage("v000004", _weights(wide))
    policy.load_adapter("v000004", wide)
    assert policy.loaded["v000004"] == "v000004"
    first = make_adapter(tmp_path / "v000005")
    assert policy.stage("v000005", _weights(first))
    assert not policy.stage("v000006", _weights(first))  # the only slot is taken
    policy.unstage("v000005")
    assert policy.staged == {} and policy.stage("v000006", _weights(first))


def test_staging_while_the_engine_generates_leaves_running_replies_alone(tiny_args, make_adapter, tmp_path, hf_greedy):
    policy = build_policy(tiny_args())
    engine = Engine(policy, adapter_slots=2)
    try:
        p1, p2 = make_adapter(tmp_path / "v000001", seed=1), make_adapter(tmp_path / "v000002", seed=2)
        assert policy.stage("v000001", _weights(p1))
        engine.call(lambda p: (p.load_adapter("v000001", p1), engine.switch("v000001"))).result()
        long = GenParams(temperature=0.0, max_new_tokens=64)
        streams = [engine.submit(QUESTION, long) for _ in range(4)]
        assert policy.stage("v000002", _weights(p2))  # copied into the free slot mid-generation
        engine.call(lambda p: (p.load_adapter("v000002", p2), engine.switch("v000002"))).result()
        after = engine.submit(QUESTION, long)
        texts = [s.text() for s in streams]

        def reference(path):  # the adapter loaded the ordinary way, into a policy of its own
            plain = build_policy(tiny_args())
            plain.load_adapter("x", path)
            plain.model.set_adapter("x")
            return hf_greedy(plain.model, plain.tokenizer, QUESTION, long.max_new_tokens)

        assert all(s.reply.adapter_version == "v000001" for s in streams)
        assert texts == [reference(p1)] * 4
        assert after.text() == reference(p2) != texts[0]
    finally:
        engine.close()


def test_a_mixed_batch_through_the_slot_bank_computes_what_peft_computes_row_by_row(tiny_args, make_adapter, tmp_path):
    policy = build_policy(tiny_args())
    engine = Engine(policy, adapter_slots=3)
    try:
        for i, v in enumerate(("v000001", "v000002"), start=1):
            assert policy.stage(v, _weights(make_adapter(tmp_path / v, seed=i))) and engine.load_staged(v)
        assert policy.bank is not None and policy.bank.modules > 0
        versions = ["v000001", "v000002", BASE_VERSION, "v000002"]
        ids = policy.tokenizer(["What is the capital of France?"] * 4, return_tensors="pt")["input_ids"]

        def bank_logits(p):
            engine._mode = None
            kwargs = engine._select_adapters(versions)
            assert kwargs == {} and p.bank.rows is not None  # the bank serves this batch, not adapter_names
            try:
                return p.model(input_ids=ids).logits
            finally:
                p.bank.use(None, 0)

        def peft_logits(p):
            names = ["__base__" if v == BASE_VERSION else p.loaded[v] for v in versions]
            return p.model(input_ids=ids, adapter_names=names).logits

        with torch.no_grad():
            got, want = engine.call(bank_logits).result(), engine.call(peft_logits).result()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(got[0], got[1]) and not torch.allclose(got[1], got[2])  # three different models
    finally:
        engine.close()


def test_replies_of_a_mixed_batch_on_slots_match_each_versions_reply_alone(tiny_args, make_adapter, tmp_path):
    policy = build_policy(tiny_args())
    engine = Engine(policy, adapter_slots=3)
    try:
        for i, v in enumerate(("v000001", "v000002"), start=1):
            assert policy.stage(v, _weights(make_adapter(tmp_path / v, seed=i))) and engine.load_staged(v)
        versions = ["v000001", "v000002", BASE_VERSION] * 2
        batched = [engine.submit(QUESTION, GREEDY, version=v) for v in versions]
        texts = [s.text() for s in batched]
        alone = {v: engine.submit(QUESTION, GREEDY, version=v).text() for v in set(versions)}
        assert texts == [alone[v] for v in versions]
        assert len(set(alone.values())) == 3
    finally:
        engine.close()
