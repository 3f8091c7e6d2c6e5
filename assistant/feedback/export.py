"""Export: the feedback database as JSONL in the conversational formats TRL's trainers read.

What it is: `export(store, fmt, out_path)`, behind `FeedbackStore.export` and
`python -m assistant.feedback export`. Every row comes from one snapshot
(`pairs.snapshot_in`) and, for pairs, from `pairs.build_examples`: the file holds the
preference pairs the trainer trains on, merged the same way, so data collected here is
never locked in and never means something else outside.

    preference  {"prompt", "chosen", "rejected"}: one row per pair `build_examples`
                gives (comparisons won by a or b, corrections, every pair a ranking
                implies, up- vs down-voted replies to one prompt). Repeated judgements
                of one pair are one row, in the majority's direction; ties, both_bad
                and pairs of two identical texts give none.
    kto         {"prompt", "completion", "label", "reason"}: one row per current up
                (true) or down (false) vote, with the reason given with it ("" when
                none); removed votes are skipped, and so are the votes of people whose
                reliability weight is below the floor (as in every other format).
    sft         {"messages"}: replies the thumbs call good (majority up), comparison
                winners and corrections (the edited text), each (prompt, text) once.

The file appears complete or not at all (temp file, fsync, os.replace).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from assistant.feedback.pairs import Examples, Snapshot, build_examples, prompt_messages, snapshot_in
from assistant.feedback.store import FeedbackError, FeedbackStore

EXPORT_FORMATS = ("preference", "kto", "sft")


def export(store: FeedbackStore, fmt: str, out_path: str | os.PathLike) -> int:
    """Write one JSONL file in format `fmt` from one snapshot of `store`; returns the rows written."""
    if fmt not in EXPORT_FORMATS:
        raise FeedbackError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    with store._read() as db:
        snapshot = snapshot_in(db, store.path)
    examples = build_examples(snapshot)
    if fmt == "kto":
        excluded = {uid for uid, name in snapshot.users.items() if name in examples.excluded_users}
        rows = list(_kto_rows(snapshot, excluded))
    else:
        rows = list(_preference_rows(examples) if fmt == "preference" else _sft_rows(examples))
    _write_jsonl_atomic(Path(out_path), rows)
    return len(rows)


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _preference_rows(examples: Examples) -> Iterator[dict]:
    for p in examples.pairs:
        yield {"prompt": prompt_messages(p.prompt), "chosen": _assistant(p.chosen), "rejected": _assistant(p.rejected)}


def _kto_rows(snapshot: Snapshot, excluded: set = frozenset()) -> Iterator[dict]:
    """One row per vote, not per merged label: KTO takes unpaired judgements, and each
    vote carries its own reason. Votes by the `excluded` user ids are left out."""
    for v in snapshot.votes:
        if v["value"] != 0 and v["user_id"] not in excluded:
            reply = snapshot.replies[v["reply_id"]]
            yield {"prompt": prompt_messages(reply["prompt"]), "completion": _assistant(reply["text"]),
                   "label": v["value"] == 1, "reason": v["reason"]}


def _sft_rows(examples: Examples) -> Iterator[dict]:
    good = [(x.prompt, x.completion) for x in examples.pointwise if x.kind == "thumbs" and x.label == 1]
    good += [(p.prompt, p.chosen) for p in examples.pairs if p.kind in ("comparison", "correction")]
    for prompt, text in dict.fromkeys(good):
        yield {"messages": prompt_messages(prompt) + _assistant(text)}


def _write_jsonl_atomic(out_path: Path, rows: list[dict]) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; an export is meant to be shared
        os.replace(tmp, out_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
