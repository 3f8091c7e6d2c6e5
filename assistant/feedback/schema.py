"""The feedback database's tables, and the ordered migrations that build them.

What it is: the CREATE statements of every table, as schema versions. `MIGRATIONS[i]`
takes a database from version i to version i + 1; `FeedbackStore` (store.py) runs the
missing ones when it opens a file, each inside the same `BEGIN IMMEDIATE` transaction
as the row recording it in `schema_version`, so a migration is applied completely or
not at all. The value sets the CHECK constraints allow (roles, reply sources, choices,
vote values) are named here too, so the store's validation and the schema agree.

What it is not: no connections, no transactions, no validation of user input (store.py).
Append new migrations at the end; never edit one that has shipped.
"""

from __future__ import annotations

from typing import Callable

import sqlite_utils

ROLES = ("system", "user", "assistant")
SOURCES = ("chat", "regenerate", "compare", "rank")
CHOICES = ("a", "b", "tie", "both_bad")
VOTE_VALUES = (1, -1, 0)  # up, down, removed
TABLES = (
    "users", "conversations", "messages", "replies", "votes", "vote_events",
    "comparisons", "corrections", "rankings",
)

def _replies_table(name: str, sources: tuple[str, ...]) -> str:
    """CREATE TABLE of the replies table under `name`; the schema versions differ only in
    the sources they allow."""
    allowed = ", ".join(f"'{x}'" for x in sources)
    return f"""CREATE TABLE {name} (
            id INTEGER PRIMARY KEY,
            conversation_id TEXT NOT NULL REFERENCES conversations(id),
            context TEXT NOT NULL,                  -- JSON [{{role, content}}...], system prompt included
            text TEXT NOT NULL,
            params TEXT NOT NULL,                   -- JSON {{temperature, top_p, max_new_tokens, variant...}}
            model TEXT NOT NULL,
            adapter_version TEXT NOT NULL,
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            latency_ms REAL NOT NULL,
            ttft_ms REAL,                           -- NULL when not streamed
            finish_reason TEXT NOT NULL,
            source TEXT NOT NULL CHECK (source IN ({allowed})),
            created_at TEXT NOT NULL
        )"""


def _v1_initial_schema(db: sqlite_utils.Database) -> None:
    statements = [
        """CREATE TABLE users (
            id INTEGER PRIMARY KEY,
            name TEXT UNIQUE NOT NULL,
            profile TEXT NOT NULL DEFAULT '',       -- free text: role, expertise...
            created_at TEXT NOT NULL
        )""",
        """CREATE TABLE conversations (
            id TEXT PRIMARY KEY,                    -- uuid4 hex
            user_id INTEGER REFERENCES users(id),   -- NULL: anonymous
            system_prompt TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL
        )""",
        """CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            conversation_id TEXT NOT NULL REFERENCES conversations(id),
            role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
            content TEXT NOT NULL,                  -- as sent
            created_at TEXT NOT NULL
        )""",
        _replies_table("replies", ("chat", "regenerate", "compare")),
        """CREATE TABLE votes (                     -- the current vote of one user on one reply
            id INTEGER PRIMARY KEY,
            reply_id INTEGER NOT NULL REFERENCES replies(id),
            user_id INTEGER NOT NULL REFERENCES users(id),
            value INTEGER NOT NULL CHECK (value IN (1, -1, 0)),
            reason TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            UNIQUE (reply_id, user_id)
        )""",
        """CREATE TABLE vote_events (               -- every change to a vote, oldest first
            id INTEGER PRIMARY KEY,
            vote_id INTEGER NOT NULL REFERENCES votes(id),
            value INTEGER NOT NULL CHECK (value IN (1, -1, 0)),
            reason TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL
        )""",
        """CREATE TABLE comparisons (
            id INTEGER PRIMARY KEY,
            reply_a_id INTEGER NOT NULL REFERENCES replies(id),
            reply_b_id INTEGER NOT NULL REFERENCES replies(id),
            choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad')),
            user_id INTEGER NOT NULL REFERENCES users(id),
            created_at TEXT NOT NULL,
            CHECK (reply_a_id <> reply_b_id)
        )""",
        """CREATE TABLE corrections (
            id INTEGER PRIMARY KEY,
            reply_id INTEGER NOT NULL REFERENCES replies(id),  -- the original, left untouched
            text TEXT NOT NULL,                                -- the edited, better reply
            user_id INTEGER NOT NULL REFERENCES users(id),
            created_at TEXT NOT NULL
        )""",
        """CREATE TABLE rankings (
            id INTEGER PRIMARY KEY,
            reply_ids TEXT NOT NULL,                -- JSON list of reply ids, best first
            user_id INTEGER NOT NULL REFERENCES users(id),
            created_at TEXT NOT NULL
        )""",
        # One index per foreign key. votes.reply_id is covered by the UNIQUE
        # (reply_id, user_id) index, whose first column it is.
        "CREATE INDEX idx_conversations_user_id ON conversations(user_id)",
        "CREATE INDEX idx_messages_conversation_id ON messages(conversation_id)",
        "CREATE INDEX idx_replies_conversation_id ON replies(conversation_id)",
        "CREATE INDEX idx_votes_user_id ON votes(user_id)",
        "CREATE INDEX idx_vote_events_vote_id ON vote_events(vote_id)",
        "CREATE INDEX idx_comparisons_reply_a_id ON comparisons(reply_a_id)",
        "CREATE INDEX idx_comparisons_reply_b_id ON comparisons(reply_b_id)",
        "CREATE INDEX idx_comparisons_user_id ON comparisons(user_id)",
        "CREATE INDEX idx_corrections_reply_id ON corrections(reply_id)",
        "CREATE INDEX idx_corrections_user_id ON corrections(user_id)",
        "CREATE INDEX idx_rankings_user_id ON rankings(user_id)",
    ]
    for sql in statements:
        db.execute(sql)


def _v2_imports(db: sqlite_utils.Database) -> None:
    """One row per preference pair imported from a file, so importing it again adds nothing."""
    db.execute("""CREATE TABLE imports (
        id INTEGER PRIMARY KEY,
        key TEXT UNIQUE NOT NULL,                           -- sha256 of the canonical JSON [prompt, chosen, rejected]
        comparison_id INTEGER NOT NULL REFERENCES comparisons(id),
        source_file TEXT NOT NULL,                          -- the file's name, as given to import_pair
        created_at TEXT NOT NULL
    )""")
    db.execute("CREATE INDEX idx_imports_comparison_id ON imports(comparison_id)")


def _v3_rank_source(db: sqlite_utils.Database) -> None:
    """Allow replies.source 'rank': the k replies generated for one ranking.

    SQLite cannot change a CHECK constraint in place, so `replies` is rebuilt the way
    SQLite documents it: create the new table, copy every row with its id, drop the old
    table, rename the new one into its place and recreate its index. `_migrate` runs
    migrations with foreign-key enforcement off (dropping `replies` must not touch the
    votes, comparisons and corrections that point at it) and checks every reference
    before it commits."""
    columns = ("id, conversation_id, context, text, params, model, adapter_version, prompt_tokens, "
               "completion_tokens, latency_ms, ttft_ms, finish_reason, source, created_at")
    db.execute(_replies_table("replies_v3", ("chat", "regenerate", "compare", "rank")))
    db.execute(f"INSERT INTO replies_v3 ({columns}) SELECT {columns} FROM replies")
    db.execute("DROP TABLE replies")
    db.execute("ALTER TABLE replies_v3 RENAME TO replies")
    db.execute("CREATE INDEX idx_replies_conversation_id ON replies(conversation_id)")


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _v1_initial_schema,
    _v2_imports,
    _v3_rank_source,
]
