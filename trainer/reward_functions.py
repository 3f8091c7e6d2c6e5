"""Example reward functions (`--reward-functions trainer/reward_functions.py`).

Each `reward_*` function takes the prompts (lists of {"role", "content"}) and the
reply texts and returns one number per reply; `WEIGHTS` scales them before they are
added to the reward model's score (see trainer/rewards.py). Copy this file, keep the
functions your users want, and tune the weights: a weight of 0.5 on a 0/1 function
moves a reply by half a standard deviation of the (normalised) reward model.
"""

from __future__ import annotations

import json
import re

WEIGHTS = {
    "reward_valid_json": 0.5,
    "reward_under_100_words": 0.25,
    "reward_no_apology": 0.25,
}

_APOLOGY = re.compile(r"\b(sorry|apologi[sz]e|apologies|as an ai)\b", re.IGNORECASE)


def _asks_for_json(prompt: list[dict]) -> bool:
    return bool(prompt) and "json" in prompt[-1]["content"].lower()


def reward_valid_json(prompts, completions, **kwargs) -> list[float]:
    """1 when a prompt asks for JSON and the reply parses as JSON (a ``` fence is
    allowed), -1 when it asked and the reply does not parse, 0 when JSON was not asked."""
    out = []
    for prompt, text in zip(prompts, completions):
        if not _asks_for_json(prompt):
            out.append(0.0)
            continue
        body = text.strip()
        fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, re.DOTALL)
        try:
            json.loads(fenced.group(1) if fenced else body)
            out.append(1.0)
        except ValueError:
            out.append(-1.0)
    return out


def reward_under_100_words(prompts, completions, **kwargs) -> list[float]:
    """1 for a reply under 100 words, else 0."""
    return [1.0 if len(text.split()) < 100 else 0.0 for text in completions]


def reward_no_apology(prompts, completions, **kwargs) -> list[float]:
    """-1 for a reply that apologises or says "as an AI", else 0."""
    return [-1.0 if _APOLOGY.search(text) else 0.0 for text in completions]
