"""One base model in memory for everything a training cycle holds at once.

A cycle needs, at the same time: the policy being trained, its reference policy, the
reward model it is trained against, the judge (a second reward model, fitted on the
other fold), and at the end the candidate and the served adapter side by side. Each of
these is the same frozen base plus a LoRA adapter (and, for the reward models, a
scalar head), so one base carries them all as named peft adapters, and one runs at a
time: `using(model, name)` activates an adapter for a block and restores the previous
one (and every parameter's `requires_grad`, which peft's `set_adapter` changes).

    with sharing(model_args):        # opened by a cycle, `trainer ppo`, ...
        rm = reward.fit(...)         # adds adapter "reward_1" (+ its head) to the base
        policy = ppo.build_trainable_policy(...)   # adds "policy" and "reference"
        ...                          # scoring switches to "reward_1" and back

Outside a `sharing` block, `adapter_model` loads a base of its own, exactly as before,
so a caller that needs an independent copy (the app, a test) gets one. Inside, every
call with the same model arguments gets the same peft model; callers release their
fixed-name adapters (`release`) when done, and the block drops the base when it ends.

Why by hand: peft holds many adapters on one model and switches between them, but
has no notion of a set of users sharing it, and TRL's trainers each load or wrap a
model of their own; this module is only that bookkeeping.

Memory: the base is loaded once instead of once per model (bench/trainer_memory.py
measures a cycle's peak with and without).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class _Shared:
    key: tuple
    model_args: object
    tokenizer: object = None
    base: object = None  # the transformers model, loaded by the first adapter; wrapped by `model`
    model: object = None  # the PeftModel, created by the first adapter
    kbit_prepared: bool = False
    counter: itertools.count = field(default_factory=lambda: itertools.count(1))


_open: list[_Shared] = []  # the innermost `sharing` block is last


def _key(model_args) -> tuple:
    return tuple(sorted(dataclasses.asdict(model_args).items()))


def current(model_args) -> _Shared | None:
    """The open shared base for `model_args`, or None outside a `sharing` block."""
    key = _key(model_args)
    for shared in reversed(_open):
        if shared.key == key:
            return shared
    return None


@contextlib.contextmanager
def sharing(model_args):
    """Within the block, models built for `model_args` share one base, loaded when the
    first one is built. Nested blocks for the same arguments reuse the outer one; the
    base is dropped when the block that opened it ends."""
    if current(model_args) is not None:
        yield current(model_args)
        return
    shared = _Shared(_key(model_args), model_args)
    _open.append(shared)
    try:
        yield shared
    finally:
        _open.remove(shared)
        shared.model = shared.base = None


def _loaded(shared: _Shared) -> _Shared:
    if shared.base is None:
        from assistant.model import load_base

        shared.tokenizer, shared.base = load_base(shared.model_args)
    return shared


def unique_name(model_args, stem: str) -> str:
    """`stem` if no shared base is open (a model of its own), else `stem_N`, N new in the block."""
    shared = current(model_args)
    return stem if shared is None else f"{stem}_{next(shared.counter)}"


def prepare_kbit(model_args, base):
    """peft's `prepare_model_for_kbit_training` on a quantised base (freezes it, casts its
    non-quantised weights to float32 for stable LoRA gradients): once per shared base,
    and without freezing adapters already on it."""
    from peft import prepare_model_for_kbit_training

    shared = current(model_args)
    if shared is not None:
        if shared.kbit_prepared:
            return base
        shared.kbit_prepared = True
        base = _loaded(shared).base
    trainable = {n: p.requires_grad for n, p in base.named_parameters() if "lora_" in n}
    prepared = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    for n, p in prepared.named_parameters():
        if n in trainable:
            p.requires_grad_(trainable[n])
    return prepared


def adapter_model(model_args, name: str, *, config=None, path: str | Path | None = None, trainable: bool = False,
                  before=None):
    """(tokenizer, peft model) carrying adapter `name`: a fresh one from `config`, or the
    one saved at `path` (frozen unless `trainable`). The model is the shared one inside a
    `sharing` block for `model_args` (other adapters may be on it; `name` must be free),
    else a new base of its own. `before(base)`, if given, runs on the base first
    (quantisation preparation; on a shared base it must be idempotent).

    The new adapter is not necessarily active on a shared model: activate it with
    `using` or `set_adapter`."""
    from peft import PeftModel, get_peft_model

    if (config is None) == (path is None):
        raise ValueError("adapter_model: give exactly one of config (a new adapter) or path (a saved one)")
    shared = current(model_args)
    if shared is None:
        from assistant.model import load_base

        tokenizer, base = load_base(model_args)
        base = before(base) if before is not None else base
        if config is not None:
            return tokenizer, get_peft_model(base, config, adapter_name=name)
        return tokenizer, PeftModel.from_pretrained(base, str(path), adapter_name=name, is_trainable=trainable)
    _loaded(shared)
    if before is not None:
        before(shared.base)
    if shared.model is None:
        if config is not None:
            shared.model = get_peft_model(shared.base, config, adapter_name=name)
        else:
            shared.model = PeftModel.from_pretrained(shared.base, str(path), adapter_name=name, is_trainable=trainable)
        return shared.tokenizer, shared.model
    model = shared.model
    if name in model.peft_config:
        raise ValueError(f"adapter {name!r} is already on the shared base; release it first")
    trainable_before = {n: p.requires_grad for n, p in model.named_parameters()}
    if config is not None:
        model.add_adapter(name, config)
    else:
        model.load_adapter(str(path), adapter_name=name, is_trainable=trainable)
    for n, p in model.named_parameters():  # adding must not unfreeze or freeze anyone else's weights
        p.requires_grad_(trainable_before[n] if n in trainable_before else (config is not None or trainable))
    return shared.tokenizer, model


def release(model, *names: str) -> None:
    """Delete adapters `names` from a shared model (no-op for a model of its own, which
    goes with its last reference). The active adapter becomes another one."""
    if not any(shared.model is model for shared in _open):
        return
    for name in names:
        if name in model.peft_config and len(model.peft_config) > 1:
            model.delete_adapter(name)


@contextlib.contextmanager
def using(model, name: str):
    """Run the block with adapter `name` active, then restore the previous active adapter
    and every parameter's requires_grad (peft's set_adapter marks the active adapter
    trainable and the others frozen)."""
    active = model.active_adapter
    if active == name:
        yield
        return
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    model.set_adapter(name)
    try:
        yield
    finally:
        if active in model.peft_config:
            model.set_adapter(active)
        for n, p in model.named_parameters():
            if n in trainable:
                p.requires_grad_(trainable[n])
