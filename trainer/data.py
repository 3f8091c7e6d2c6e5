"""Feedback rows → training examples (pure Python, no torch).

What it does:
- `read_snapshot(db)` reads the feedback store read-only, in one transaction, up to
  the highest id of each feedback table at that moment. The snapshot's `id_range()`
  goes into manifests ("feedback id range used"); rows written later never leak in.
- `build_examples(snapshot)` turns every kind of feedback into reward-model examples:
  comparisons won by a or b, corrections (edited ≻ original), rankings (every implied
  pair) and up- vs down-voted replies to the same prompt become `Pair`s; thumbs and
  "both bad" become `Pointwise` labels. Judgements on the same (prompt, reply pair)
  or (prompt, reply) are merged into one example that counts how many agree
  (`support`) and disagree (`against`); contradictions are kept and counted.
- `split(examples, val_fraction, seed)` splits deterministically by conversation:
  no conversation, and no prompt, ends up on both sides.
- `import_preferences(store, path)` reads a preference data set (HH-RLHF or TRL
  JSONL) into the store as comparisons, once, however often it is run.

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

import collections
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from tqdm import tqdm

from assistant.feedback import ROLES, FeedbackError, FeedbackStore

FEEDBACK_TABLES = ("votes", "vote_events", "comparisons", "corrections", "rankings")
COUNT_KINDS = ("comparison", "tie", "both_bad", "correction", "thumbs_up", "thumbs_down", "ranking", "same_text")


@dataclass(frozen=True)
class Pair:
    """`chosen` is preferred to `rejected` as a reply to `prompt` (a list of {role, content})."""

    prompt: tuple  # tuple of (role, content) pairs, hashable
    chosen: str
    rejected: str
    conversation_id: str
    kind: str  # comparison | correction | thumbs | ranking
    support: int = 1  # judgements that agree with this direction
    against: int = 0  # judgements that say the opposite (kept, counted)
    conversation_ids: tuple = ()  # every conversation a merged judgement came from, first = conversation_id


@dataclass(frozen=True)
class Pointwise:
    """A single reply judged good (label 1) or bad (label 0)."""

    prompt: tuple
    completion: str
    label: int
    conversation_id: str
    kind: str  # thumbs | both_bad
    support: int = 1
    against: int = 0
    conversation_ids: tuple = ()


@dataclass
class Examples:
    pairs: list[Pair] = field(default_factory=list)
    pointwise: list[Pointwise] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # feedback rows used, by kind
    contradictions: int = 0  # (prompt, reply pair) keys with judgements both ways


def to_prompt(messages: Iterable[dict]) -> tuple:
    """[{role, content}, ...] → ((role, content), ...), hashable."""
    return tuple((m["role"], m["content"]) for m in messages)


def prompt_messages(prompt: tuple) -> list[dict]:
    """((role, content), ...) → [{role, content}, ...], the form chat templates take."""
    return [{"role": role, "content": content} for role, content in prompt]


# ---------------------------------------------------------------------------
# Snapshot: the feedback rows of one id range, read in one transaction.


@dataclass
class Snapshot:
    """Feedback rows with lo < id <= hi for each table's `bounds[table] = (lo, hi)`.

    hi is the table's highest id when the snapshot was read; lo comes from `since`
    (0 without it). Votes change in place, so each vote's value is the one its last
    vote_events row at or below the vote_events bound gives: reading the same range
    again gives the same values. A vote is in the range when it was created in it
    (votes.id) or changed in it (one of its vote_events ids).
    """

    path: str
    bounds: dict[str, tuple[int, int]]
    replies: dict[int, dict]  # id -> {id, conversation_id, prompt, text, model}, every reply the rows name
    votes: list[dict]  # {id, reply_id, user_id, value}: 1 up, -1 down, 0 removed
    comparisons: list[dict]  # {id, reply_a_id, reply_b_id, choice, user_id}
    corrections: list[dict]  # {id, reply_id, text, user_id}: text is the edited reply
    rankings: list[dict]  # {id, reply_ids, user_id}: reply_ids best first

    def id_range(self) -> dict[str, list[int]]:
        """{table: [first, last]}: the ids this snapshot covers, inclusive ([1, 0] is empty).
        The next incremental read: `read_snapshot(db, since={t: last for t, (_, last) in r.items()})`."""
        return {table: [lo + 1, hi] for table, (lo, hi) in self.bounds.items()}

    def total_rows(self) -> int:
        """Feedback rows in the snapshot: votes (removed ones included), comparisons,
        corrections and rankings."""
        return len(self.votes) + len(self.comparisons) + len(self.corrections) + len(self.rankings)


_VOTES_SQL = """
    SELECT v.id, v.reply_id, v.user_id,
           (SELECT e.value FROM vote_events e WHERE e.vote_id = v.id AND e.id <= :events_hi
            ORDER BY e.id DESC LIMIT 1) AS value
    FROM votes v
    WHERE v.id <= :votes_hi
      AND (v.id > :votes_lo OR EXISTS (SELECT 1 FROM vote_events e
                                       WHERE e.vote_id = v.id AND e.id > :events_lo AND e.id <= :events_hi))
    ORDER BY v.id"""


def read_snapshot(db_path: str | os.PathLike, since: dict[str, int] | None = None) -> Snapshot:
    """Read the feedback at `db_path` (opened read-only) up to each table's highest id now.

    since: {table: id} lower bounds (exclusive) for an incremental read, e.g. the
        `last` ids of an earlier snapshot's id_range(); a table left out starts at 0.
    """
    since = dict(since or {})
    unknown = sorted(set(since) - set(FEEDBACK_TABLES))
    if unknown:
        raise ValueError(f"since names unknown tables {unknown}; expected some of {', '.join(FEEDBACK_TABLES)}")
    with FeedbackStore(db_path, readonly=True) as store:
        db = store.db()
        db.execute("BEGIN")  # every query below sees the same database
        try:
            bounds = {}
            for table in FEEDBACK_TABLES:
                hi = db.execute(f"SELECT COALESCE(MAX(id), 0) FROM {table}").fetchone()[0]
                lo = since.get(table, 0)
                if isinstance(lo, bool) or not isinstance(lo, int) or not 0 <= lo <= hi:
                    raise ValueError(f"since[{table!r}] = {lo!r} is not an id in 0..{hi}, the ids {db_path} "
                                     f"holds; is it a range from another database?")
                bounds[table] = (lo, hi)

            def rows(table: str, columns: str) -> list[dict]:
                lo, hi = bounds[table]
                return list(db.query(f"SELECT {columns} FROM {table} WHERE id > ? AND id <= ? ORDER BY id", [lo, hi]))

            comparisons = rows("comparisons", "id, reply_a_id, reply_b_id, choice, user_id")
            corrections = rows("corrections", "id, reply_id, text, user_id")
            rankings = rows("rankings", "id, reply_ids, user_id")
            for ranking in rankings:
                ranking["reply_ids"] = json.loads(ranking["reply_ids"])
            votes = [v for v in db.query(_VOTES_SQL, {
                "votes_lo": bounds["votes"][0], "votes_hi": bounds["votes"][1],
                "events_lo": bounds["vote_events"][0], "events_hi": bounds["vote_events"][1],
            }) if v["value"] is not None]
            reply_ids = {v["reply_id"] for v in votes} | {c["reply_id"] for c in corrections}
            reply_ids |= {c["reply_a_id"] for c in comparisons} | {c["reply_b_id"] for c in comparisons}
            reply_ids |= {rid for r in rankings for rid in r["reply_ids"]}
            replies = _read_replies(db, sorted(reply_ids))
        finally:
            if db.conn.in_transaction:
                db.conn.execute("COMMIT")
    return Snapshot(path=str(db_path), bounds=bounds, replies=replies, votes=votes,
                    comparisons=comparisons, corrections=corrections, rankings=rankings)


def _read_replies(db: Any, reply_ids: list[int], chunk: int = 500) -> dict[int, dict]:
    prompts: dict[str, tuple] = {}  # one tuple per distinct context, shared by its replies
    replies = {}
    for start in range(0, len(reply_ids), chunk):
        ids = reply_ids[start:start + chunk]
        for row in db.query(f"SELECT id, conversation_id, context, text, model FROM replies "
                            f"WHERE id IN ({', '.join('?' * len(ids))})", ids):
            context = row.pop("context")
            if context not in prompts:
                prompts[context] = to_prompt(json.loads(context))
            row["prompt"] = prompts[context]
            replies[row["id"]] = row
    return replies


# ---------------------------------------------------------------------------
# Feedback → examples.


def _merge(judgements: list[tuple[Any, str, tuple]]) -> tuple[Any, int, int, str, tuple]:
    """Judgements (direction, kind, conversation ids), oldest first → the majority
    direction (a tie in count keeps the first one), support, against, the kind of the
    first judgement that chose it, and every conversation id involved, first-seen order."""
    tally = collections.Counter(direction for direction, _, _ in judgements)
    first = judgements[0][0]
    direction = max(tally, key=lambda d: (tally[d], d == first))
    support = tally[direction]
    kind, conversations = next((k, c) for d, k, c in judgements if d == direction)
    every = tuple(dict.fromkeys(conversations + tuple(c for _, _, cs in judgements for c in cs)))
    return direction, support, len(judgements) - support, kind, every


def build_examples(snapshot: Snapshot) -> Examples:
    """Every kind of feedback in `snapshot` → pairs and pointwise labels.

    comparison a/b → Pair (kind "comparison"); tie → nothing (counted as "tie");
    both_bad → Pointwise label 0 for each reply (kind "both_bad").
    correction → Pair(edited ≻ original), prompt = the original reply's context.
    ranking → a Pair for every (better, worse) it implies (kind "ranking").
    vote up/down → Pointwise label 1/0 (kind "thumbs"), and a Pair (kind "thumbs") for
    every up-voted vs down-voted reply to the same prompt; removed votes are skipped.

    Judgements on the same (prompt, {reply texts}) or (prompt, reply text) are merged:
    the example takes the majority direction (a tie in count keeps the first, in the
    order comparisons, corrections, rankings, votes, each by id) and counts support and
    against. A judgement between two replies with the same text is skipped ("same_text").
    """
    counts = dict.fromkeys(COUNT_KINDS, 0)
    pair_judgements: dict[tuple, list] = {}  # (prompt, text, text) sorted -> [(chosen text, kind, convs)]
    point_judgements: dict[tuple, list] = {}  # (prompt, text) -> [(label, kind, convs)]
    replies = snapshot.replies

    def prefer(better: dict, worse: dict, kind: str) -> None:
        if better["text"] == worse["text"]:
            counts["same_text"] += 1
            return
        key = (better["prompt"], *sorted((better["text"], worse["text"])))
        convs = tuple(dict.fromkeys((better["conversation_id"], worse["conversation_id"])))
        pair_judgements.setdefault(key, []).append((better["text"], kind, convs))

    def label(reply: dict, value: int, kind: str) -> None:
        key = (reply["prompt"], reply["text"])
        point_judgements.setdefault(key, []).append((value, kind, (reply["conversation_id"],)))

    both_bad = []
    for c in snapshot.comparisons:
        a, b = replies[c["reply_a_id"]], replies[c["reply_b_id"]]
        if c["choice"] in ("a", "b"):
            counts["comparison"] += 1
            prefer(*((a, b) if c["choice"] == "a" else (b, a)), "comparison")
        elif c["choice"] == "tie":
            counts["tie"] += 1
        else:
            counts["both_bad"] += 1
            both_bad += [a, b]
    for c in snapshot.corrections:
        counts["correction"] += 1
        original = replies[c["reply_id"]]
        prefer({**original, "text": c["text"]}, original, "correction")
    for r in snapshot.rankings:
        counts["ranking"] += 1
        ranked = [replies[rid] for rid in r["reply_ids"]]
        for i, better in enumerate(ranked):
            for worse in ranked[i + 1:]:
                prefer(better, worse, "ranking")

    # Thumbs: pointwise labels, then up- vs down-voted replies to the same prompt.
    votes_on: dict[tuple, list] = {}  # (prompt, text) -> [(label, kind, convs)], votes only
    first_reply: dict[tuple, dict] = {}
    for v in snapshot.votes:
        if v["value"] == 0:
            continue
        counts["thumbs_up" if v["value"] == 1 else "thumbs_down"] += 1
        reply = replies[v["reply_id"]]
        key = (reply["prompt"], reply["text"])
        votes_on.setdefault(key, []).append((int(v["value"] == 1), "thumbs", (reply["conversation_id"],)))
        first_reply.setdefault(key, reply)
    by_prompt: dict[tuple, tuple[list, list]] = {}  # prompt -> (up-voted replies, down-voted replies)
    for key, judgements in votes_on.items():
        up = _merge(judgements)[0]
        by_prompt.setdefault(key[0], ([], []))[0 if up else 1].append(first_reply[key])
    for ups, downs in by_prompt.values():
        for better in ups:
            for worse in downs:
                prefer(better, worse, "thumbs")
    for reply in both_bad:
        label(reply, 0, "both_bad")
    for key, judgements in votes_on.items():
        point_judgements.setdefault(key, []).extend(judgements)

    examples = Examples(counts=counts)
    for (prompt, text_1, text_2), judgements in pair_judgements.items():
        chosen, support, against, kind, convs = _merge(judgements)
        rejected = text_2 if chosen == text_1 else text_1
        examples.pairs.append(Pair(prompt, chosen, rejected, convs[0], kind, support, against, convs))
        examples.contradictions += against > 0
    for (prompt, text), judgements in point_judgements.items():
        value, support, against, kind, convs = _merge(judgements)
        examples.pointwise.append(Pointwise(prompt, text, value, convs[0], kind, support, against, convs))
        examples.contradictions += against > 0
    return examples


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


class _BadRecord(ValueError):
    """A line that is valid JSON but not a preference pair."""


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _hh_dialogue(text: str, what: str) -> list[dict]:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' → [{role, content}, ...], contents stripped."""
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise _BadRecord(f"{what} is not an HH-RLHF dialogue (expected it to start with '\\n\\nHuman:')")
    return [{"role": _HH_ROLES[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]


def _messages(value: Any, what: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _BadRecord(f"{what} must be a string or a non-empty list of {{role, content}} messages")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise _BadRecord(f"{what}[{i}] is not a message with role ({'/'.join(ROLES)}) and string content")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _split_last_reply(dialogue: list[dict], what: str) -> tuple[list[dict], str]:
    if dialogue[-1]["role"] != "assistant":
        raise _BadRecord(f"{what} does not end with an assistant turn")
    return dialogue[:-1], dialogue[-1]["content"]


def _completion(value: Any, what: str) -> str:
    """TRL's chosen/rejected next to an explicit prompt: a string, or one assistant message."""
    if isinstance(value, str):
        return value
    messages = _messages(value, what)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise _BadRecord(f"{what} must be a string or a list holding one assistant message")
    return messages[0]["content"]


def _parse_record(record: Any) -> tuple[list[dict], str, str]:
    """One JSONL record in HH-RLHF or TRL preference form → (prompt messages, chosen, rejected)."""
    if not isinstance(record, dict):
        raise _BadRecord(f"expected a JSON object, got {type(record).__name__}")
    for key in ("chosen", "rejected"):
        if key not in record:
            raise _BadRecord(f"missing key {key!r}")
    chosen, rejected = record["chosen"], record["rejected"]
    if "prompt" in record:  # TRL, explicit prompt
        prompt = record["prompt"]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise _BadRecord("prompt is empty")
            prompt = [{"role": "user", "content": prompt}]
        else:
            prompt = _messages(prompt, "prompt")
        chosen, rejected = _completion(chosen, "chosen"), _completion(rejected, "rejected")
    elif isinstance(chosen, str) and isinstance(rejected, str):  # HH-RLHF
        prompt, chosen = _split_last_reply(_hh_dialogue(chosen, "chosen"), "chosen")
        rejected_prompt, rejected = _split_last_reply(_hh_dialogue(rejected, "rejected"), "rejected")
        if prompt != rejected_prompt:
            raise _BadRecord("the chosen and rejected dialogues differ before their last assistant turn")
    else:  # TRL, implicit prompt: two whole conversations sharing all but the last turn
        prompt, chosen = _split_last_reply(_messages(chosen, "chosen"), "chosen")
        rejected_prompt, rejected = _split_last_reply(_messages(rejected, "rejected"), "rejected")
        if prompt != rejected_prompt:
            raise _BadRecord("the chosen and rejected conversations differ before their last assistant turn")
    if not prompt:
        raise _BadRecord("there is no prompt before the replies")
    for what, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise _BadRecord(f"{what} reply is empty")
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
                pairs.append(_parse_record(json.loads(raw)))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                errors.append((line_no, f"not valid JSON: {e}"))
            except _BadRecord as e:
                errors.append((line_no, str(e)))
    return pairs, errors


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
