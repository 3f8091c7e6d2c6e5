"""What a preference pair is: feedback rows of one snapshot → pairs and pointwise labels.

The one definition the trainer (reward model, DPO, KTO, SFT steps) and the export
(export.py) share, so a file written by `python -m assistant.feedback export` holds the
pairs the trainer trains on. Pure Python over SQLite: no torch, no model; the chat
server may import it.

- `read_snapshot(db)` reads the feedback store read-only, in one transaction, up to
  the highest id of each feedback table at that moment. The snapshot's `id_range()`
  goes into manifests ("feedback id range used"); rows written later never leak in.
- `build_examples(snapshot)` turns every kind of feedback into reward-model examples:
  comparisons won by a or b, corrections (edited ≻ original), rankings (every implied
  pair) and up- vs down-voted replies to the same prompt become `Pair`s; thumbs and
  "both bad" become `Pointwise` labels. Judgements on the same (prompt, reply pair)
  or (prompt, reply) are merged into one example that counts how many agree
  (`support`) and disagree (`against`); contradictions are kept and counted.
- Who judged weighs in (assistant/annotators.py): each person has a reliability
  weight from their answers to gold items and repeats. A person below the floor
  (`annotator_floor`) is left out, counted as "excluded"; every example gets a
  `weight`, the sum of its supporters' weights over the number of judgements on it
  (the agreement share when everyone weighs 1). Gold answers and repeats measure
  people and are never examples themselves; a repeat does not count twice.
- Who judged can also tell whose taste it is: with `by_profile=True`, judgements are
  merged per rater profile group as well (the profile people give at sign-up,
  normalised as the dashboard groups it: `annotators.normalise_profile`), so a
  physician's and a novice's opposite choices on the same replies stay two examples,
  each carrying its `profile`, instead of cancelling out in one. The reward model can
  be conditioned on it (trainer/reward.py, `--reward-condition-on-profile`).

What it is not: the train/validation split, imports of public data sets and prompt
sets (trainer/data.py), tokenising or training (trainer/). It only reads.

    snapshot = read_snapshot("data/feedback.db")
    examples = build_examples(snapshot)
    manifest["feedback_id_range"] = snapshot.id_range()
"""

from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

from assistant import annotators
from assistant.feedback.store import FeedbackStore

FEEDBACK_TABLES = ("votes", "vote_events", "comparisons", "corrections", "rankings")
COUNT_KINDS = ("comparison", "tie", "both_bad", "correction", "thumbs_up", "thumbs_down", "ranking", "same_text", "excluded")


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
    # Training weight: the supporters' reliability weights summed, over the judgements.
    # Not part of ==: two pairs that say the same thing are equal, whoever said it.
    weight: float = field(default=1.0, compare=False)
    # The raters' profile group when merged per group (build_examples(by_profile=True));
    # "" when merged over everyone, and for imported pairs.
    profile: str = ""


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
    weight: float = field(default=1.0, compare=False)  # as Pair.weight
    profile: str = ""  # as Pair.profile


@dataclass
class Examples:
    pairs: list[Pair] = field(default_factory=list)
    pointwise: list[Pointwise] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # feedback rows used, by kind ("excluded": left out)
    contradictions: int = 0  # (prompt, reply pair[, profile group]) keys with judgements both ways
    excluded_users: dict[str, str] = field(default_factory=dict)  # name -> why their feedback was left out


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
    (votes.id) or changed in it (one of its vote_events ids). Its reason comes from the
    same vote_events row as its value.

    The answers to gold items and repeats (`checks`, per user) are read in full up to
    their highest ids (`check_bounds`), whatever `since` says: a person's weight
    depends on all of their answers so far.
    """

    path: str
    bounds: dict[str, tuple[int, int]]
    replies: dict[int, dict]  # id -> {id, conversation_id, prompt, text, model}, every reply the rows name
    votes: list[dict]  # {id, reply_id, user_id, value, reason}: 1 up, -1 down, 0 removed
    comparisons: list[dict]  # {id, reply_a_id, reply_b_id, choice, user_id}
    corrections: list[dict]  # {id, reply_id, text, user_id}: text is the edited reply
    rankings: list[dict]  # {id, reply_ids, user_id}: reply_ids best first
    users: dict[int, str] = field(default_factory=dict)  # id -> name, every user
    profiles: dict[int, str] = field(default_factory=dict)  # id -> profile as stored ("" for none), every user
    checks: dict[int, Any] = field(default_factory=dict)  # user id -> annotators.Checks, answers up to check_bounds
    check_bounds: dict[str, int] = field(default_factory=dict)  # highest gold_answers / repeat_answers ids read

    def id_range(self) -> dict[str, list[int]]:
        """{table: [first, last]}: the ids this snapshot covers, inclusive ([1, 0] is empty).
        The next incremental read: `read_snapshot(db, since={t: last for t, (_, last) in r.items()})`."""
        return {table: [lo + 1, hi] for table, (lo, hi) in self.bounds.items()}

    def total_rows(self) -> int:
        """Feedback rows in the snapshot: votes (removed ones included), comparisons,
        corrections and rankings."""
        return len(self.votes) + len(self.comparisons) + len(self.corrections) + len(self.rankings)


_VOTES_SQL = """
    SELECT v.id, v.reply_id, v.user_id, e.value, e.reason
    FROM votes v
    JOIN vote_events e ON e.id = (SELECT MAX(newest.id) FROM vote_events newest
                                  WHERE newest.vote_id = v.id AND newest.id <= :events_hi)
    WHERE v.id <= :votes_hi
      AND (v.id > :votes_lo OR EXISTS (SELECT 1 FROM vote_events changed
                                       WHERE changed.vote_id = v.id AND changed.id > :events_lo
                                         AND changed.id <= :events_hi))
    ORDER BY v.id"""


def read_snapshot(db_path: str | os.PathLike, since: dict[str, int] | None = None) -> Snapshot:
    """Read the feedback at `db_path` (opened read-only) up to each table's highest id now.

    since: {table: id} lower bounds (exclusive) for an incremental read, e.g. the
        `last` ids of an earlier snapshot's id_range(); a table left out starts at 0.
    """
    with FeedbackStore(db_path, readonly=True) as store:
        db = store.db()
        db.execute("BEGIN")  # every query below sees the same database
        try:
            return snapshot_in(db, db_path, since)
        finally:
            if db.conn.in_transaction:
                db.conn.execute("COMMIT")


def snapshot_in(db: Any, db_path: str | os.PathLike, since: dict[str, int] | None = None) -> Snapshot:
    """`read_snapshot` through a connection that is already inside a read transaction
    (the export reads this way, through the store it was called on)."""
    since = dict(since or {})
    unknown = sorted(set(since) - set(FEEDBACK_TABLES))
    if unknown:
        raise ValueError(f"since names unknown tables {unknown}; expected some of {', '.join(FEEDBACK_TABLES)}")
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
    votes = list(db.query(_VOTES_SQL, {
        "votes_lo": bounds["votes"][0], "votes_hi": bounds["votes"][1],
        "events_lo": bounds["vote_events"][0], "events_hi": bounds["vote_events"][1],
    }))
    reply_ids = {v["reply_id"] for v in votes} | {c["reply_id"] for c in corrections}
    reply_ids |= {c["reply_a_id"] for c in comparisons} | {c["reply_b_id"] for c in comparisons}
    reply_ids |= {rid for r in rankings for rid in r["reply_ids"]}
    replies = _read_replies(db, sorted(reply_ids))
    check_bounds = annotators.check_bounds(db)
    return Snapshot(path=str(db_path), bounds=bounds, replies=replies, votes=votes,
                    comparisons=comparisons, corrections=corrections, rankings=rankings,
                    users=annotators.read_names(db),
                    profiles={uid: profile or "" for uid, profile in db.execute("SELECT id, profile FROM users ORDER BY id").fetchall()},
                    checks=annotators.read_checks(db, check_bounds),
                    check_bounds=check_bounds)


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


def _merge(judgements: list[tuple]) -> tuple[Any, int, int, str, tuple, float]:
    """Judgements (direction, kind, conversation ids, weight), oldest first → the
    direction with the most weight (a tie keeps the first one), support, against, the
    kind of the first judgement that chose it, every conversation id involved
    (first-seen order), and the example's weight: the supporters' weights summed over
    the number of judgements."""
    tally: dict[Any, float] = collections.defaultdict(float)
    for direction, _, _, w in judgements:
        tally[direction] += w
    first = judgements[0][0]
    direction = max(tally, key=lambda d: (round(tally[d], 9), d == first))
    support = sum(d == direction for d, _, _, _ in judgements)
    kind, conversations = next((k, c) for d, k, c, _ in judgements if d == direction)
    every = tuple(dict.fromkeys(conversations + tuple(c for _, _, cs, _ in judgements for c in cs)))
    return direction, support, len(judgements) - support, kind, every, tally[direction] / len(judgements)


def build_examples(snapshot: Snapshot, annotator_floor: float = annotators.DEFAULT_FLOOR, by_profile: bool = False) -> Examples:
    """Every kind of feedback in `snapshot` → pairs and pointwise labels.

    comparison a/b → Pair (kind "comparison"); tie → nothing (counted as "tie");
    both_bad → Pointwise label 0 for each reply (kind "both_bad").
    correction → Pair(edited ≻ original), prompt = the original reply's context.
    ranking → a Pair for every (better, worse) it implies (kind "ranking").
    vote up/down → Pointwise label 1/0 (kind "thumbs"), and a Pair (kind "thumbs") for
    every up-voted vs down-voted reply to the same prompt; removed votes are skipped.

    Each judgement carries its author's reliability weight (assistant/annotators.py);
    the rows of people whose weight is below `annotator_floor` are left out (counted as
    "excluded", the reason in `excluded_users`). Judgements on the same (prompt, {reply
    texts}) or (prompt, reply text) are merged: the example takes the direction with
    the most weight (a tie keeps the first, in the order comparisons, corrections,
    rankings, votes, each by id), counts support and against, and weighs the
    supporters' weights summed over the number of judgements (for an up- vs down-vote
    pair: the smaller of its two replies' label weights). A judgement between two
    replies with the same text is skipped ("same_text").

    by_profile: merge per rater profile group too, i.e. per (prompt, {reply texts},
    group) and (prompt, reply text, group), and pair up- with down-voted replies within
    a group; every example's `profile` is its group (`annotators.normalise_profile` of
    the rater's current profile, "(no profile)" for people who gave none), "" for the
    pairs imported from data sets (their user's profile names a file, not a person).
    Without it every `profile` is "" and the examples are the merge over everyone.
    """
    annotators.check_floor(annotator_floor)
    counts = dict.fromkeys(COUNT_KINDS, 0)
    pair_judgements: dict[tuple, list] = {}  # (prompt, text, text sorted, group) -> [(chosen text, kind, convs, weight)]
    point_judgements: dict[tuple, list] = {}  # (prompt, text, group) -> [(label, kind, convs, weight)]
    replies = snapshot.replies
    people = annotators.weights(snapshot.checks, snapshot.users, annotator_floor)
    excluded_users: dict[str, str] = {}

    def weight_of(user_id: int) -> float | None:
        """The author's weight, or None (and counted) when the floor excludes them."""
        w = people.get(user_id, annotators.NEUTRAL)
        if w.excluded:
            counts["excluded"] += 1
            excluded_users[snapshot.users.get(user_id, str(user_id))] = w.reason
            return None
        return w.weight

    def group_of(user_id: int) -> str:
        """The profile group the author's judgements are merged in ("" = everyone's)."""
        if not by_profile or snapshot.users.get(user_id) == annotators.IMPORT_USER:
            return ""
        return annotators.normalise_profile(snapshot.profiles.get(user_id))

    def prefer(better: dict, worse: dict, kind: str, w: float, group: str) -> None:
        if better["text"] == worse["text"]:
            counts["same_text"] += 1
            return
        key = (better["prompt"], *sorted((better["text"], worse["text"])), group)
        convs = tuple(dict.fromkeys((better["conversation_id"], worse["conversation_id"])))
        pair_judgements.setdefault(key, []).append((better["text"], kind, convs, w))

    def label(reply: dict, value: int, kind: str, w: float, group: str) -> None:
        key = (reply["prompt"], reply["text"], group)
        point_judgements.setdefault(key, []).append((value, kind, (reply["conversation_id"],), w))

    both_bad = []
    for c in snapshot.comparisons:
        if (w := weight_of(c["user_id"])) is None:
            continue
        a, b = replies[c["reply_a_id"]], replies[c["reply_b_id"]]
        if c["choice"] in ("a", "b"):
            counts["comparison"] += 1
            prefer(*((a, b) if c["choice"] == "a" else (b, a)), "comparison", w, group_of(c["user_id"]))
        elif c["choice"] == "tie":
            counts["tie"] += 1
        else:
            counts["both_bad"] += 1
            both_bad += [(a, w, group_of(c["user_id"])), (b, w, group_of(c["user_id"]))]
    for c in snapshot.corrections:
        if (w := weight_of(c["user_id"])) is None:
            continue
        counts["correction"] += 1
        original = replies[c["reply_id"]]
        prefer({**original, "text": c["text"]}, original, "correction", w, group_of(c["user_id"]))
    for r in snapshot.rankings:
        if (w := weight_of(r["user_id"])) is None:
            continue
        counts["ranking"] += 1
        ranked = [replies[rid] for rid in r["reply_ids"]]
        for i, better in enumerate(ranked):
            for worse in ranked[i + 1:]:
                prefer(better, worse, "ranking", w, group_of(r["user_id"]))

    # Thumbs: pointwise labels, then up- vs down-voted replies to the same prompt (in one group).
    votes_on: dict[tuple, list] = {}  # (prompt, text, group) -> [(label, kind, convs, weight)], votes only
    first_reply: dict[tuple, dict] = {}
    for v in snapshot.votes:
        if v["value"] == 0 or (w := weight_of(v["user_id"])) is None:
            continue
        counts["thumbs_up" if v["value"] == 1 else "thumbs_down"] += 1
        reply = replies[v["reply_id"]]
        key = (reply["prompt"], reply["text"], group_of(v["user_id"]))
        votes_on.setdefault(key, []).append((int(v["value"] == 1), "thumbs", (reply["conversation_id"],), w))
        first_reply.setdefault(key, reply)
    by_prompt: dict[tuple, tuple[list, list]] = {}  # (prompt, group) -> (up-voted (reply, weight)s, down-voted ones)
    for key, judgements in votes_on.items():
        merged = _merge(judgements)
        by_prompt.setdefault((key[0], key[2]), ([], []))[0 if merged[0] else 1].append((first_reply[key], merged[5]))
    for (_, group), (ups, downs) in by_prompt.items():
        for better, w_up in ups:
            for worse, w_down in downs:
                prefer(better, worse, "thumbs", min(w_up, w_down), group)
    for reply, w, group in both_bad:
        label(reply, 0, "both_bad", w, group)
    for key, judgements in votes_on.items():
        point_judgements.setdefault(key, []).extend(judgements)

    examples = Examples(counts=counts, excluded_users=excluded_users)
    for (prompt, text_1, text_2, group), judgements in pair_judgements.items():
        chosen, support, against, kind, convs, weight = _merge(judgements)
        rejected = text_2 if chosen == text_1 else text_1
        examples.pairs.append(Pair(prompt, chosen, rejected, convs[0], kind, support, against, convs, weight, group))
        examples.contradictions += against > 0
    for (prompt, text, group), judgements in point_judgements.items():
        value, support, against, kind, convs, weight = _merge(judgements)
        examples.pointwise.append(Pointwise(prompt, text, value, convs[0], kind, support, against, convs, weight, group))
        examples.contradictions += against > 0
    return examples
