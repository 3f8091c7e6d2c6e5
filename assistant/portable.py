"""What an adapter directory must keep so that production engines can serve it.

A team that outgrows one GPU serves the base model with vLLM or SGLang and loads
this project's adapter versions into them at run time (vLLM:
`POST /v1/load_lora_adapter {"lora_name": "v000007", "lora_path": ".../v000007"}`
with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`; SGLang: `POST /load_lora_adapter`).
Those engines read peft's `adapter_config.json` and `adapter_model.safetensors`
and refuse what their fused LoRA kernels do not implement. `problems(path)` lists
every rule a directory breaks, so publishing can refuse a version that would load
here but not there; docs/scaling.md explains each rule.

Stdlib only: the safetensors header is read directly (8-byte little-endian length,
then JSON), without loading any tensor.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

# Projections whose LoRA vLLM and SGLang apply in their fused kernels for Llama-,
# Qwen- and Mistral-shaped models (q/k/v are packed into qkv_proj, gate/up into
# gate_up_proj there; adapters name the unpacked modules, as peft saves them).
SERVABLE_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
# The largest --max-lora-rank vLLM accepts (its choices: 1, 8, 16, 32, 64, 128, 256, 320, 512);
# an adapter's rank must not exceed the value the server is started with.
MAX_RANK = 512
WEIGHT_DTYPES = frozenset({"F16", "BF16", "F32"})


def safetensors_header(path: str | Path) -> dict:
    """{tensor name: {"dtype", "shape", "data_offsets"}} of a safetensors file, without its data."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError(f"{path}: implausible safetensors header length {n}")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def problems(path: str | Path) -> list[str]:
    """Every way the adapter directory `path` would be refused by vLLM/SGLang (empty: servable)."""
    d = Path(path)
    out: list[str] = []
    try:
        cfg = json.loads((d / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        return [f"adapter_config.json unreadable: {exc}"]
    if cfg.get("peft_type") != "LORA":
        out.append(f"peft_type is {cfg.get('peft_type')!r}; only LORA is served")
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        out.append(f"task_type is {cfg.get('task_type')!r}; a causal LM adapter is expected")
    r = cfg.get("r")
    if not isinstance(r, int) or not 0 < r <= MAX_RANK:
        out.append(f"rank r={r!r}; it must be an integer in 1..{MAX_RANK} (and at most the server's --max-lora-rank)")
    for key, wrong in (("modules_to_save", "full copies of modules (modules_to_save) are not loaded by LoRA engines"),
                       ("rank_pattern", "per-module ranks (rank_pattern) are not supported everywhere"),
                       ("alpha_pattern", "per-module alphas (alpha_pattern) are not supported everywhere"),
                       ("layers_to_transform", "LoRA on some layers only (layers_to_transform) is not supported"),
                       ("trainable_token_indices", "trainable token embeddings are not supported")):
        if cfg.get(key):
            out.append(wrong)
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        out.append(f"bias={cfg.get('bias')!r}, lora_bias={cfg.get('lora_bias')!r}; LoRA engines serve adapters without biases")
    for key, what in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out (Conv1D-style) layers")):
        if cfg.get(key):
            out.append(f"{what} is not supported")
    targets = cfg.get("target_modules")
    names = [targets] if isinstance(targets, str) else list(targets or [])
    unknown = sorted(set(names) - SERVABLE_MODULES)
    if not names or unknown:
        out.append(f"target_modules {sorted(names)}: each must be one of {sorted(SERVABLE_MODULES)}")
    weights = d / "adapter_model.safetensors"
    if not weights.is_file():
        return out + ["adapter_model.safetensors is missing (LoRA engines load that file)"]
    try:
        header = safetensors_header(weights)
    except (OSError, ValueError) as exc:
        return out + [f"adapter_model.safetensors unreadable: {exc}"]
    stray = sorted(k for k in header if not (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight")))
    if stray:
        out.append(f"adapter_model.safetensors holds {len(stray)} tensor(s) that are not LoRA A/B matrices (first: {stray[0]})")
    dtypes = sorted({v.get("dtype") for v in header.values()} - WEIGHT_DTYPES)
    if dtypes:
        out.append(f"weights in {dtypes}; engines load float16, bfloat16 or float32")
    for name, meta in header.items():
        shape = meta.get("shape") or []
        if name.endswith(".lora_A.weight") and (len(shape) != 2 or shape[0] != r):
            out.append(f"{name} has shape {shape}; lora_A must be (r={r}, in_features)")
            break
        if name.endswith(".lora_B.weight") and (len(shape) != 2 or shape[1] != r):
            out.append(f"{name} has shape {shape}; lora_B must be (out_features, r={r})")
            break
    return out
