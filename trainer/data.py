"""Feedback rows → training examples (pure Python, no torch).

What it does:
- `read_snapshot(db)` and `build_examples(snapshot)`: what a preference pair is
  (`Pair`, `Pointwise`, `Examples`, `Snapshot`, ...). They live in
  assistant/feedback/pairs.py, so the store's export writes the same pairs the trainer
  trains on, and are re-exported here for the trainer's code.
- `split(examples, val_fraction, seed)` splits deterministically by conversation:
  no conversation, and no prompt, ends up on both sides.
- `import_preferences(store, path)` reads a preference data set (HH-RLHF or TRL
  JSONL, parsed by assistant/feedback/preferences.py) into the store as comparisons,
  once, however often it is run.

What it does not do: tokenise or train (trainer/reward.py). The one write is
`import_preferences`, through `FeedbackStore.import_pair`; everything else only reads.

How to run it:

    snapshot = read_snapshot("data/feedback.db")
    examples = build_examples(snapshot)
    train, val = split(examples, val_fraction=0.2, seed="split-v1")
    manifest["feedback_id_range"] = snapshot.id_range()

    with FeedbackStore("data/feedback.db") as store:
        report = import_preferences(store, "hh-rlhf/harmless-base-train.jsonl")
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from assistant.feedback.pairs import (
    COUNT_KINDS, FEEDBACK_TABLES, Examples, Pair, Pointwise, Snapshot, build_examples, prompt_messages,
    read_snapshot, snapshot_in, to_prompt,
)
from assistant.feedback.preferences import BadRecord as _BadRecord
from assistant.feedback.preferences import parse_record as _parse_record
from assistant.feedback.preferences import read_preference_file
from assistant.feedback.store import FeedbackError, FeedbackStore

__all__ = [
    # what a preference pair is, from assistant/feedback/pairs.py
    "COUNT_KINDS", "FEEDBACK_TABLES", "Examples", "Pair", "Pointwise", "Snapshot", "build_examples",
    "prompt_messages", "read_snapshot", "snapshot_in", "to_prompt",
    # this module's own
    "split", "ImportReport", "read_preference_file", "import_preferences", "DEFAULT_PROMPTS",
    "default_prompts", "snapshot_prompts",
]


# ---------------------------------------------------------------------------
# Train / validation split.


def _unit(seed: str, key: str) -> float:
    """sha256(seed, key) → a number in [0, 1), the same on every machine and run."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split(examples: Examples, val_fraction: float, seed: str) -> tuple[Examples, Examples]:
    """Deterministic train/validation split by conversation.

    Conversations are grouped with every conversation they share a prompt with (an
    example's prompt joins all its conversations), so no conversation and no prompt
    lands on both sides. A group goes to validation when sha256(seed, its smallest
    conversation id) falls below `val_fraction`: the same examples give the same split
    in any order. Both parts keep the input order; their `counts` are empty (the rows
    used describe the whole set) and `contradictions` counts their examples with
    judgements both ways.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    parent: dict[tuple, tuple] = {}

    def find(node: tuple) -> tuple:
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    everything = [*examples.pairs, *examples.pointwise]
    for ex in everything:
        root = find(("prompt", ex.prompt))
        for conversation_id in ex.conversation_ids or (ex.conversation_id,):
            other = find(("conversation", conversation_id))
            if other != root:
                parent[other] = root
    group_key: dict[tuple, str] = {}
    for node in list(parent):
        if node[0] == "conversation":
            root = find(node)
            group_key[root] = min(group_key.get(root, node[1]), node[1])
    in_val = {root: _unit(seed, key) < val_fraction for root, key in group_key.items()}

    train, val = Examples(), Examples()
    for ex in everything:
        part = val if in_val[find(("prompt", ex.prompt))] else train
        (part.pairs if isinstance(ex, Pair) else part.pointwise).append(ex)
        part.contradictions += ex.against > 0
    return train, val


# ---------------------------------------------------------------------------
# Import of preference data sets.


@dataclass
class ImportReport:
    added: int = 0  # pairs stored
    skipped: int = 0  # pairs already in the store (imported before, or twice in the file)
    errors: list[tuple[int, str]] = field(default_factory=list)  # (line number, what is wrong); nothing stored


def import_preferences(store: FeedbackStore, path: str | os.PathLike, *, progress: bool = True) -> ImportReport:
    """Store every preference pair of a JSONL file as a comparison; returns what happened.

    Each line is one of, detected line by line:
      HH-RLHF: {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}, two
        whole dialogues that differ only in the last assistant turn;
      TRL preference: {"prompt", "chosen", "rejected"}, each a string or messages
        (conversational chosen/rejected: one assistant message), or without "prompt",
        chosen/rejected as whole conversations that share all but the last turn.
    A pair is stored in one transaction (`FeedbackStore.import_pair`), and skipped when
    it is already in the store. A bad line (not JSON, not a pair, an empty reply) is
    reported with its line number and stores nothing; blank lines are ignored.
    """
    path = Path(path)
    report = ImportReport()
    with path.open("rb") as f:
        total = sum(1 for _ in f)
    with path.open("rb") as f:
        lines = tqdm(f, total=total, desc=f"import {path.name}", unit="line", disable=not progress)
        for line_no, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                prompt, chosen, rejected = _parse_record(json.loads(raw))
                added = store.import_pair(prompt, chosen, rejected, source_file=path.name)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                report.errors.append((line_no, f"not valid JSON: {e}"))
            except (_BadRecord, FeedbackError) as e:
                report.errors.append((line_no, str(e)))
            else:
                if added:
                    report.added += 1
                else:
                    report.skipped += 1
    return report


# -- prompts for PPO rollouts ------------------------------------------------------

DEFAULT_PROMPTS = Path(__file__).with_name("prompts.txt")


def default_prompts() -> list[list[dict]]:
    """The project's own small cold-start prompt set (one user message each)."""
    lines = [line.strip() for line in DEFAULT_PROMPTS.read_text().splitlines()]
    return [[{"role": "user", "content": line}] for line in lines if line]


def snapshot_prompts(snapshot: Snapshot, max_prompts: int) -> list[list[dict]]:
    """The contexts people sent and then gave feedback on: the prompt of every reply a
    feedback row of `snapshot` names, deduplicated, most recent reply first, at most
    `max_prompts`. Prompts come from the snapshot, so a reply written while a cycle runs
    never becomes one of its prompts. Imported pairs are skipped: they are not how this
    assistant is used."""
    seen, prompts = set(), []
    for reply_id in sorted(snapshot.replies, reverse=True):
        reply = snapshot.replies[reply_id]
        key = reply["prompt"]
        if reply.get("model") == "import" or key in seen or not key or key[-1][0] != "user":
            continue
        seen.add(key)
        prompts.append(prompt_messages(key))
        if len(prompts) >= max_prompts:
            break
    return prompts
