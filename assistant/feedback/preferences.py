"""Preference pairs in the files people share: HH-RLHF and TRL's JSONL formats, parsed.

What it is: `parse_record(record)` turns one JSON record into (prompt messages, chosen,
rejected), and `read_preference_file(path)` does it for every line of a JSONL file,
collecting each bad line's number and what is wrong with it. The trainer's import
(`trainer.data.import_preferences`), `trainer reward-eval` and the gold-item import
(`python -m assistant.annotators import-gold`) read files through it, so a file one of
them accepts, the others accept too.

What it is not: storage (store.py) or a reader of the feedback database.

Formats, detected line by line:
  HH-RLHF: {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}, two
    whole dialogues that differ only in the last assistant turn;
  TRL preference: {"prompt", "chosen", "rejected"}, each a string or messages
    (conversational chosen/rejected: one assistant message), or without "prompt",
    chosen/rejected as whole conversations that share all but the last turn.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from assistant.feedback.schema import ROLES


class BadRecord(ValueError):
    """A line that is valid JSON but not a preference pair."""


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _hh_dialogue(text: str, what: str) -> list[dict]:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' → [{role, content}, ...], contents stripped."""
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise BadRecord(f"{what} is not an HH-RLHF dialogue (expected it to start with '\\n\\nHuman:')")
    return [{"role": _HH_ROLES[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]


def _messages(value: Any, what: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise BadRecord(f"{what} must be a string or a non-empty list of {{role, content}} messages")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise BadRecord(f"{what}[{i}] is not a message with role ({'/'.join(ROLES)}) and string content")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _split_last_reply(dialogue: list[dict], what: str) -> tuple[list[dict], str]:
    if dialogue[-1]["role"] != "assistant":
        raise BadRecord(f"{what} does not end with an assistant turn")
    return dialogue[:-1], dialogue[-1]["content"]


def _completion(value: Any, what: str) -> str:
    """TRL's chosen/rejected next to an explicit prompt: a string, or one assistant message."""
    if isinstance(value, str):
        return value
    messages = _messages(value, what)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise BadRecord(f"{what} must be a string or a list holding one assistant message")
    return messages[0]["content"]


def parse_record(record: Any) -> tuple[list[dict], str, str]:
    """One JSONL record in HH-RLHF or TRL preference form → (prompt messages, chosen, rejected)."""
    if not isinstance(record, dict):
        raise BadRecord(f"expected a JSON object, got {type(record).__name__}")
    for key in ("chosen", "rejected"):
        if key not in record:
            raise BadRecord(f"missing key {key!r}")
    chosen, rejected = record["chosen"], record["rejected"]
    if "prompt" in record:  # TRL, explicit prompt
        prompt = record["prompt"]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise BadRecord("prompt is empty")
            prompt = [{"role": "user", "content": prompt}]
        else:
            prompt = _messages(prompt, "prompt")
        chosen, rejected = _completion(chosen, "chosen"), _completion(rejected, "rejected")
    elif isinstance(chosen, str) and isinstance(rejected, str):  # HH-RLHF
        prompt, chosen = _split_last_reply(_hh_dialogue(chosen, "chosen"), "chosen")
        rejected_prompt, rejected = _split_last_reply(_hh_dialogue(rejected, "rejected"), "rejected")
        if prompt != rejected_prompt:
            raise BadRecord("the chosen and rejected dialogues differ before their last assistant turn")
    else:  # TRL, implicit prompt: two whole conversations sharing all but the last turn
        prompt, chosen = _split_last_reply(_messages(chosen, "chosen"), "chosen")
        rejected_prompt, rejected = _split_last_reply(_messages(rejected, "rejected"), "rejected")
        if prompt != rejected_prompt:
            raise BadRecord("the chosen and rejected conversations differ before their last assistant turn")
    if not prompt:
        raise BadRecord("there is no prompt before the replies")
    for what, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise BadRecord(f"{what} reply is empty")
    return prompt, chosen, rejected


def read_preference_file(path: str | os.PathLike) -> tuple[list[tuple[list[dict], str, str]], list[tuple[int, str]]]:
    """Parse a JSONL preference file (HH-RLHF or TRL, as `import_preferences` reads it)
    without storing it: returns ([(prompt messages, chosen, rejected)...], [(line, error)...])."""
    pairs, errors = [], []
    with Path(path).open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                pairs.append(parse_record(json.loads(raw)))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                errors.append((line_no, f"not valid JSON: {e}"))
            except BadRecord as e:
                errors.append((line_no, str(e)))
    return pairs, errors
