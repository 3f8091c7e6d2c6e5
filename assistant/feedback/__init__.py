"""The feedback store: every reply the assistant gives, and everything users say about it, in SQLite.

One package, one module per idea:

    schema.py   the tables, their schema versions and the ordered migrations
    store.py    `FeedbackStore`: writes (users, replies, votes, comparisons,
                corrections, rankings, imported pairs, gold items and the answers to
                checks) and reads, input checks,
                `FeedbackError` / `StoreUnavailable`
    pairs.py    what a preference pair is: a snapshot of the store → `Pair`s and
                `Pointwise` labels (`read_snapshot`, `build_examples`), shared by the
                trainer and the export
    export.py   JSONL in TRL's formats: preference, KTO, SFT; written atomically
    preferences.py  preference files (HH-RLHF, TRL JSONL) parsed: the trainer's import,
                `trainer reward-eval` and the gold-item import read them alike
    __main__.py the CLI

Nothing here imports torch, transformers or the trainer: the chat server loads it in
milliseconds. The names below are the package's public face: `from assistant.feedback
import FeedbackStore` is how the rest of the project reaches it.

    python -m assistant.feedback stats                        # rows per table
    python -m assistant.feedback export --format preference out/pref.jsonl
    python -m assistant.feedback export --format kto out/kto.jsonl --db data/feedback.db
"""

from assistant.feedback.schema import CHOICES, MIGRATIONS, ROLES, SOURCES, TABLES, VOTE_VALUES
from assistant.feedback.store import (
    DEFAULT_PATH, MAX_NAME_CHARS, FeedbackError, FeedbackStore, StoreUnavailable, import_key,
)
from assistant.feedback.pairs import (
    COUNT_KINDS, FEEDBACK_TABLES, Examples, Pair, Pointwise, Snapshot, build_examples, prompt_messages,
    read_snapshot, snapshot_in, to_prompt,
)
from assistant.feedback.export import EXPORT_FORMATS

__all__ = [
    "CHOICES", "MIGRATIONS", "ROLES", "SOURCES", "TABLES", "VOTE_VALUES",
    "DEFAULT_PATH", "MAX_NAME_CHARS", "FeedbackError", "FeedbackStore", "StoreUnavailable", "import_key",
    "COUNT_KINDS", "FEEDBACK_TABLES", "Examples", "Pair", "Pointwise", "Snapshot", "build_examples",
    "prompt_messages", "read_snapshot", "snapshot_in", "to_prompt",
    "EXPORT_FORMATS",
]
