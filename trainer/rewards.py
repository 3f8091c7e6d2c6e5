"""Reward functions a team writes in Python, added to the reward model's score.

A reward-functions file is a plain Python module. Every top-level function whose
name starts with `reward_` is one reward function:

    def reward_under_100_words(prompts, completions, **kwargs) -> list[float]:
        return [1.0 if len(c.split()) < 100 else 0.0 for c in completions]

- `prompts`: the conversations replied to, each a list of {"role", "content"};
- `completions`: the reply texts, one per prompt (plain strings);
- return one finite number per completion (None is not accepted).

An optional module-level `WEIGHTS = {"reward_under_100_words": 0.5}` sets weights
(default 1.0 each). The combined reward of a reply is

    reward-model score + sum(weight_i * function_i(reply))

and it is what PPO, GRPO and RLOO optimise. `trainer/reward_functions.py` is a
documented example. `load(path)` imports the file and calls every function on a
probe batch, so a broken one (import error, exception, wrong length, non-number) is
refused with its name and the reason before any training starts.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

PREFIX = "reward_"
PROBE = (
    [[{"role": "user", "content": "Say hello."}], [{"role": "user", "content": "List two colours."}]],
    ["Hello!", "- red\n- blue"],
)


class RewardFunctionError(ValueError):
    """A reward-functions file that cannot be used; the message names the file and function."""


@dataclass
class RewardFunction:
    name: str
    fn: object
    weight: float

    def __call__(self, prompts: list[list[dict]], completions: list[str]) -> list[float]:
        out = self.fn(prompts=prompts, completions=completions)
        return _check_scores(self.name, out, len(completions))


def _check_scores(name: str, out, n: int) -> list[float]:
    if not isinstance(out, (list, tuple)):
        raise RewardFunctionError(f"{name} returned {type(out).__name__}; it must return a list of {n} numbers")
    if len(out) != n:
        raise RewardFunctionError(f"{name} returned {len(out)} scores for {n} completions")
    scores = []
    for i, x in enumerate(out):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise RewardFunctionError(f"{name} returned {x!r} for completion {i}; every score must be a finite number")
        scores.append(float(x))
    return scores


def load(path: str | Path) -> list[RewardFunction]:
    """Import the file, collect its reward_* functions with their weights, and check
    each on a probe batch. Raises RewardFunctionError with the reason."""
    path = Path(path)
    if not path.is_file():
        raise RewardFunctionError(f"--reward-functions {path}: no such file")
    spec = importlib.util.spec_from_file_location(f"_reward_functions_{abs(hash(str(path.resolve())))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # a user's file: any error is a refusal, with its cause
        raise RewardFunctionError(f"--reward-functions {path}: importing it failed: {type(exc).__name__}: {exc}") from exc
    sys.modules.pop(spec.name, None)
    names = sorted(n for n, v in vars(module).items() if n.startswith(PREFIX) and callable(v))
    if not names:
        raise RewardFunctionError(f"--reward-functions {path}: no function named {PREFIX}* in it")
    weights = getattr(module, "WEIGHTS", {})
    if not isinstance(weights, dict):
        raise RewardFunctionError(f"--reward-functions {path}: WEIGHTS must be a dict of function name -> number")
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise RewardFunctionError(f"--reward-functions {path}: WEIGHTS names {unknown}, which are not reward_* functions in the file")
    funcs = []
    for name in names:
        w = weights.get(name, 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise RewardFunctionError(f"--reward-functions {path}: WEIGHTS[{name!r}] = {w!r} is not a finite number")
        rf = RewardFunction(f"{path.name}:{name}", getattr(module, name), float(w))
        try:
            rf(*PROBE)
        except RewardFunctionError as exc:
            raise RewardFunctionError(f"--reward-functions {path}: {exc}") from exc
        except Exception as exc:
            raise RewardFunctionError(f"--reward-functions {path}: {name} failed on a probe batch: {type(exc).__name__}: {exc}") from exc
        funcs.append(rf)
    return funcs


def combine(score_fn, funcs: list[RewardFunction]):
    """`score_fn(prompts, texts) -> (B,) tensor` plus the weighted reward functions.
    With no functions, `score_fn` itself."""
    if not funcs:
        return score_fn

    def combined(prompts, texts):
        base = score_fn(prompts, texts)
        extra = torch.zeros(len(texts), dtype=torch.float32)
        for rf in funcs:
            extra += rf.weight * torch.tensor(rf(prompts, list(texts)), dtype=torch.float32)
        return base + extra.to(base.device, base.dtype)

    return combined


def describe(funcs: list[RewardFunction]) -> list[dict]:
    """[{name, weight}], for manifests."""
    return [{"name": rf.name, "weight": rf.weight} for rf in funcs]
