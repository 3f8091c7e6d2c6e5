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


def _v4_accounts(db: sqlite_utils.Database) -> None:
    """Accounts and saved conversations (assistant/accounts.py, assistant/ui.py).

    credentials: one scrypt hash per user who has a password; the hash string carries
    its own parameters, so they can be raised later without a migration. Users from
    before accounts (open mode) have no row here until an administrator sets one.
    logins: one row per log-in, keyed by the sha256 of the session token (the token
    itself is only ever in the browser); `ended_at` is set on log-out, and
    `conversation_id` follows the conversation that log-in has open, so a page reload
    shows it again.
    conversation_states: the transcript of a signed-in user's conversation as the
    page shows it (turns with the reply id and adapter version behind each assistant
    message, and a comparison or ranking still waiting), rewritten after every change,
    so a conversation can be listed, reopened and continued."""
    statements = [
        """CREATE TABLE credentials (
            user_id INTEGER PRIMARY KEY REFERENCES users(id),
            hash TEXT NOT NULL,                     -- scrypt$n$r$p$salt$hash (base64)
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )""",
        """CREATE TABLE logins (
            token_sha256 TEXT PRIMARY KEY,          -- hex sha256 of the session token
            user_id INTEGER NOT NULL REFERENCES users(id),
            conversation_id TEXT REFERENCES conversations(id),  -- open in this log-in; NULL: none yet
            created_at TEXT NOT NULL,
            expires_at TEXT NOT NULL,
            ended_at TEXT                           -- set on log-out
        )""",
        """CREATE TABLE conversation_states (
            conversation_id TEXT PRIMARY KEY REFERENCES conversations(id),
            user_id INTEGER NOT NULL REFERENCES users(id),
            title TEXT NOT NULL,                    -- from the first user message
            state TEXT NOT NULL,                    -- JSON {turns: [{role, content, reply_id, version, note}], pending, ranking}
            updated_at TEXT NOT NULL
        )""",
        "CREATE INDEX idx_logins_user_id ON logins(user_id)",
        "CREATE INDEX idx_logins_conversation_id ON logins(conversation_id)",
        "CREATE INDEX idx_conversation_states_user_id ON conversation_states(user_id, updated_at)",
    ]
    for sql in statements:
        db.execute(sql)


def _v5_annotator_quality(db: sqlite_utils.Database) -> None:
    """Known-answer items, repeats and their answers (assistant/annotators.py).

    gold_items: comparisons an administrator wrote or imported with a known better
    reply; `key` (sha256 of the canonical JSON [prompt, better, worse]) makes an import
    idempotent. gold_answers: one row per time a person was shown a gold item in
    Compare mode, with the side the better reply was shown on and the choice made (both
    as shown), so correctness is `choice = better_side`. repeat_answers: a comparison
    shown again later to the person who made it, sides swapped; `choice` is stored in
    the original comparison's terms ('a' = the original's reply A), so it is consistent
    when it equals the original's choice. Neither table is a source of training pairs:
    they measure the people who judge."""
    statements = [
        """CREATE TABLE gold_items (
            id INTEGER PRIMARY KEY,
            key TEXT UNIQUE NOT NULL,               -- sha256 of the canonical JSON [prompt, better, worse]
            prompt TEXT NOT NULL,                   -- JSON [{role, content}...], ends with a user turn
            better TEXT NOT NULL,                   -- the reply known to be better
            worse TEXT NOT NULL,
            source TEXT NOT NULL,                   -- 'dashboard', or the name of the imported file
            created_at TEXT NOT NULL,
            CHECK (better <> worse)
        )""",
        """CREATE TABLE gold_answers (
            id INTEGER PRIMARY KEY,
            gold_item_id INTEGER NOT NULL REFERENCES gold_items(id),
            user_id INTEGER NOT NULL REFERENCES users(id),
            better_side TEXT NOT NULL CHECK (better_side IN ('a', 'b')),  -- where the better reply was shown
            choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad')),  -- as shown
            created_at TEXT NOT NULL
        )""",
        """CREATE TABLE repeat_answers (
            id INTEGER PRIMARY KEY,
            comparison_id INTEGER NOT NULL REFERENCES comparisons(id),  -- the original
            user_id INTEGER NOT NULL REFERENCES users(id),
            choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad')),  -- in the original's terms
            created_at TEXT NOT NULL,
            UNIQUE (comparison_id, user_id)
        )""",
        "CREATE INDEX idx_gold_answers_gold_item_id ON gold_answers(gold_item_id)",
        "CREATE INDEX idx_gold_answers_user_id ON gold_answers(user_id)",
        "CREATE INDEX idx_repeat_answers_user_id ON repeat_answers(user_id)",
    ]
    for sql in statements:
        db.execute(sql)


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _v1_initial_schema,
    _v2_imports,
    _v3_rank_source,
    _v4_accounts,
    _v5_annotator_quality,
]
