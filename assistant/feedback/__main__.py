"""Command line of the feedback store: inspect and export the database, read-only.

    python -m assistant.feedback stats                        # rows per table
    python -m assistant.feedback export --format preference out/pref.jsonl
    python -m assistant.feedback export --format kto out/kto.jsonl --db data/feedback.db

It never creates a database: a missing file exits 2, an unusable one exits 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from assistant.feedback.export import EXPORT_FORMATS
from assistant.feedback.store import DEFAULT_PATH, FeedbackError, FeedbackStore, StoreUnavailable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m assistant.feedback",
        description="Inspect and export the feedback database. Opens it read-only; never creates one.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    export = commands.add_parser(
        "export", help="write feedback as TRL-style JSONL",
        description="Write feedback as JSONL in a format TRL's trainers read. "
                    "preference: prompt/chosen/rejected (DPO, reward models); "
                    "kto: prompt/completion/label/reason (KTO); sft: messages (SFT).",
    )
    export.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="which dataset to write")
    export.add_argument("out", metavar="OUT.jsonl", help="output file, replaced atomically")
    stats = commands.add_parser("stats", help="print rows per table", description="Print rows per table.")
    for sub in (export, stats):
        sub.add_argument("--db", default=DEFAULT_PATH, help=f"feedback database (default: {DEFAULT_PATH})")
    args = parser.parse_args(argv)

    if not Path(args.db).is_file():
        print(f"error: no feedback database at {args.db} (the chat app creates it; pass --db PATH "
              f"to read another)", file=sys.stderr)
        return 2
    try:
        with FeedbackStore(args.db, readonly=True) as store:
            if args.command == "export":
                n = store.export(args.format, args.out)
                print(f"wrote {n} {args.format} rows to {args.out}")
            else:
                for table, n in store.counts().items():
                    print(f"{table:<14} {n:>8}")
    except (StoreUnavailable, FeedbackError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())