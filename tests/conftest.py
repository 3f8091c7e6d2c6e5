"""Shared fixtures: the tiny seeded model on disk, policies and engines built on it,
trained-looking adapters, and the default model for the few end-to-end tests.

Helpers that several test files need are handed out as fixtures that return a
function (`drain`, `stall`, `hf_greedy`, `make_adapter`), so no test imports this file.
Run: python -m pytest tests -q            (add -m "not e2e" to skip the default model)
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from assistant.chat import Engine, build_prompt
from assistant.config import ModelArgs
from assistant.model import build_policy, lora_config, prepare_default_model
from tests.tiny import save_tiny_model

REPO = Path(__file__).resolve().parents[1]
HANG_GUARD_S = 60  # a stream that has not finished by then is stuck, not slow


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: uses the real default model (SmolLM2-135M-Instruct); slower")


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, whichever tests ran before it."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


# -- the tiny model -------------------------------------------------------------


SHARPEN = 10.0  # weight scale-up of the tiny model (see tiny_dir)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny 2-layer Llama (byte-level tokenizer) saved once per run, with every
    projection scaled up. At its initial scale attention is nearly uniform, so greedy
    output hardly depends on positions or on which cached keys a token sees, and
    batching bugs (wrong position ids, misaligned padding) would go unnoticed."""
    path = save_tiny_model(tmp_path_factory.mktemp("tiny-model"))
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed_tokens" not in name:
                p.mul_(SHARPEN)
    model.save_pretrained(path)
    return path


@pytest.fixture
def tiny_args(tiny_dir):
    """ModelArgs for the tiny model on CPU: tiny_args(quantize='none', **overrides)."""

    def make(quantize: str = "none", **overrides) -> ModelArgs:
        return ModelArgs(model=str(tiny_dir), quantize=quantize, device="cpu", **overrides)

    return make


@pytest.fixture
def policy(tiny_args):
    """A fresh unquantised policy on the tiny model (tests load adapters into it)."""
    return build_policy(tiny_args())


@pytest.fixture
def engine(policy):
    eng = Engine(policy)
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def tiny_reference(tiny_dir):
    """The tiny model loaded plainly through transformers, for reference outputs."""
    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval()


# -- helpers handed out as fixtures ----------------------------------------------


def _drain(stream, timeout: float = HANG_GUARD_S) -> list[str]:
    """Iterate `stream` to the end in a helper thread; fail instead of hanging."""
    box: dict = {}

    def run():
        try:
            box["deltas"] = list(stream)
        except BaseException as exc:  # handed back to the test thread below
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"stream did not finish within {timeout}s (engine stuck)")
    if "error" in box:
        raise box["error"]
    return box["deltas"]


@pytest.fixture
def drain():
    return _drain


@pytest.fixture
def stall():
    """stall(engine) parks the engine thread between decode steps until the returned
    release() is called, so several submissions are admitted in one batch."""
    releases = []

    def park(engine):
        started, release = threading.Event(), threading.Event()

        def wait(_policy):
            started.set()
            release.wait(HANG_GUARD_S)

        engine.call(wait)
        assert started.wait(HANG_GUARD_S), "engine thread never picked up the job"
        releases.append(release)
        return release.set

    yield park
    for release in releases:  # never leave an engine parked after a failing test
        release.set()


def _hf_greedy(model, tokenizer, messages: list[dict], max_new_tokens: int) -> str:
    """Greedy reply from transformers' own `generate`, one prompt, no padding."""
    ids = torch.tensor([build_prompt(tokenizer, messages)])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.fixture
def hf_greedy():
    return _hf_greedy


# -- adapters -------------------------------------------------------------------


@pytest.fixture
def trained_peft(tiny_dir):
    """trained_peft(seed=1, adapter_name='default', **lora_overrides) -> a peft model on the
    tiny base whose LoRA B weights are random and non-zero, i.e. it changes the output."""

    def make(seed: int = 1, adapter_name: str = "default", scale: float = 0.5, **lora_overrides):
        base = AutoModelForCausalLM.from_pretrained(tiny_dir)
        cfg = lora_config(ModelArgs(model=str(tiny_dir), **lora_overrides))
        torch.manual_seed(seed)  # lora_A's initialisation: the same seed gives the same adapter
        model = get_peft_model(base, cfg, adapter_name=adapter_name)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * scale)
        return model.eval()

    return make


@pytest.fixture
def make_adapter(trained_peft):
    """make_adapter(path, seed=1, **lora_overrides) writes a complete adapter directory
    (peft save_pretrained + manifest.json) the way the trainer publishes one."""

    def make(path: str | Path, seed: int = 1, **lora_overrides) -> Path:
        path = Path(path)
        trained_peft(seed=seed, **lora_overrides).save_pretrained(path)
        manifest = {"version": path.name, "status": "candidate", "parent": "base", "metrics": {}}
        (path / "manifest.json").write_text(json.dumps(manifest))
        return path

    return make


# -- the default model (end-to-end tests only) -------------------------------------


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    return prepare_default_model(REPO / "data" / "models")


@pytest.fixture(scope="session")
def default_policy(default_model_dir):
    return build_policy(ModelArgs(model=str(default_model_dir), quantize="none", device="cpu"))


@pytest.fixture(scope="session")
def default_engine(default_policy):
    eng = Engine(default_policy)
    yield eng
    eng.close()
