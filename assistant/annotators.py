"""Annotator quality: how well each person judges, and how much their feedback weighs in training.

The model retrains on whatever feedback arrives, so a careless or random voter moves
it as much as a careful one unless their feedback is weighed. As RLHF data collection
does with paid annotators, people are audited with known-answer items and repeats:

    gold item    a comparison whose better reply is known, written by an administrator
                 on the dashboard or imported (`import-gold` below); Compare mode shows
                 one now and then instead of two new replies, unmarked, in random order
    repeat       one of the person's own earlier comparisons shown to them again, later,
                 sides swapped

and each person gets these figures (`read_annotators`, the dashboard's *Annotators* view):

    volume            judgements given: votes, comparisons, rankings, corrections
    gold accuracy     share of gold items answered with the better reply (a tie or
                      "both bad" is a wrong answer), with its 95% Wilson interval
    self-consistency  share of repeats answered as the first time (the same one of
                      a / b / tie / both bad)
    agreement         share of their A/B choices, on reply pairs that other people
                      compared too, that agree with the others' majority (imported
                      pairs left out; shown only: agreeing with the crowd is not the
                      same as being right)
    weight            the reliability weight, in [0, 1], below

How the weight is computed. A person's skill q is the chance that a judgement of theirs
is informed rather than a coin flip. Under that model a gold item is answered right
with probability (1 + q) / 2 and a repeat is answered the same way with (1 + q²) / 2,
so each kind of check estimates q:

    q_gold   = max(0, 2·acc − 1)            acc  = posterior mean of the gold accuracy
    q_repeat = sqrt(max(0, 2·cons − 1))     cons = posterior mean of the self-consistency

Both posteriors are Beta distributions whose prior is worth PRIOR_STRENGTH answers and
sits where a skill of PRIOR_SKILL puts it (accuracy 0.75, consistency 0.625), so
someone with few checks is pulled towards the neutral weight PRIOR_SKILL: a newcomer is
neither trusted fully nor excluded. The weight averages the two estimates by the
evidence behind each:

    weight = (q_gold·(n_gold + k) + q_repeat·(n_repeat + k)) / (n_gold + n_repeat + 2k),   k = PRIOR_STRENGTH

Chance-level answers drive it towards 0, consistent right answers towards 1. Below the
floor (`--annotator-floor`, DEFAULT_FLOOR) a person is excluded from training and the
reason is shown. The "import" user (pairs from public data sets) always weighs 1.

How the weights are used: `assistant.feedback.pairs.build_examples` leaves out the
judgements of excluded people and gives every pair (and pointwise label) the sum of
its supporters' weights over the number of judgements on it; the reward model's loss
weighs each pair by that; DPO and KTO, whose TRL trainers take no per-row weights,
train on the same pairs unweighted, the excluded people's rows left out.

What it is not: storage (assistant/feedback/store.py keeps gold items and answers) or
the Compare-mode wiring (assistant/ui.py calls `draw`). Stdlib only, with the store
imported inside the CLI, so the server and the trainer both import it in milliseconds.

    python -m assistant.annotators import-gold gold.jsonl [--db data/feedback.db]
    python -m assistant.annotators show [--db data/feedback.db] [--floor 0.2]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRIOR_SKILL = 0.5  # a newcomer's skill, and so their weight, before any check
PRIOR_STRENGTH = 4.0  # answers the prior is worth
DEFAULT_FLOOR = 0.2  # below this weight a person's feedback is left out of training
IMPORT_USER = "import"  # the user imported preference pairs are stored under (FeedbackStore.import_pair)
NO_PROFILE = "(no profile)"  # the profile group of people who gave none
GOLD, REPEAT = "gold", "repeat"  # what Compare mode may show instead of new replies


# ---------------------------------------------------------------- the figures, pure
@dataclass(frozen=True)
class Checks:
    """A person's answers to checks: gold items (and how many were right), repeats
    (and how many were answered as the first time)."""

    gold_n: int = 0
    gold_correct: int = 0
    repeat_n: int = 0
    repeat_consistent: int = 0


@dataclass(frozen=True)
class Weight:
    weight: float  # in [0, 1]
    excluded: bool  # below the floor: left out of training
    reason: str = ""  # why, when excluded


def posterior_mean(successes: int, n: int, prior_mean: float, strength: float = PRIOR_STRENGTH) -> float:
    """Mean of the Beta posterior of a rate after `successes` of `n`, from a Beta prior
    with mean `prior_mean` worth `strength` observations."""
    return (successes + strength * prior_mean) / (n + strength)


def gold_skill(correct: int, n: int, prior_skill: float = PRIOR_SKILL, strength: float = PRIOR_STRENGTH) -> float:
    """Skill q from gold answers: P(right) = (1 + q) / 2."""
    acc = posterior_mean(correct, n, (1 + prior_skill) / 2, strength)
    return min(1.0, max(0.0, 2 * acc - 1))


def repeat_skill(consistent: int, n: int, prior_skill: float = PRIOR_SKILL, strength: float = PRIOR_STRENGTH) -> float:
    """Skill q from repeats: P(the same answer twice) = (1 + q²) / 2."""
    cons = posterior_mean(consistent, n, (1 + prior_skill ** 2) / 2, strength)
    return min(1.0, math.sqrt(max(0.0, 2 * cons - 1)))


def reliability(checks: Checks, prior_skill: float = PRIOR_SKILL, strength: float = PRIOR_STRENGTH) -> float:
    """The weight in [0, 1]: the gold and repeat skill estimates averaged by the evidence
    behind each (module docstring). No checks at all gives `prior_skill`."""
    g = gold_skill(checks.gold_correct, checks.gold_n, prior_skill, strength)
    r = repeat_skill(checks.repeat_consistent, checks.repeat_n, prior_skill, strength)
    wg, wr = checks.gold_n + strength, checks.repeat_n + strength
    return (g * wg + r * wr) / (wg + wr)


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% for z = 1.96) of successes / n; (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def weigh(checks: Checks, floor: float = DEFAULT_FLOOR, name: str = "") -> Weight:
    """The weight of a person with `checks`, and whether the floor excludes them (why)."""
    if name == IMPORT_USER:
        return Weight(1.0, False)
    w = reliability(checks)
    if w >= floor:
        return Weight(w, False)
    seen = []
    if checks.gold_n:
        seen.append(f"gold items {checks.gold_correct}/{checks.gold_n} right")
    if checks.repeat_n:
        seen.append(f"repeats {checks.repeat_consistent}/{checks.repeat_n} answered the same")
    return Weight(w, True, f"weight {w:.2f} is below the floor {floor:g}" + (f" ({', '.join(seen)})" if seen else ""))


def weights(checks: dict[int, Checks], names: dict[int, str], floor: float = DEFAULT_FLOOR) -> dict[int, Weight]:
    """{user id: Weight} for every user in `names` (id -> name); no checks is no evidence."""
    return {uid: weigh(checks.get(uid, Checks()), floor, name) for uid, name in names.items()}


NEUTRAL = Weight(PRIOR_SKILL, False)  # someone the store knows nothing about


def check_floor(floor: float, flag: str = "--annotator-floor") -> float:
    """`floor` if it is a weight in [0, 1]. Above PRIOR_SKILL it excludes every newcomer
    until their checks lift them over it."""
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0.0 <= floor <= 1.0:
        raise ValueError(f"{flag} must be a weight in [0, 1], got {floor!r}")
    return float(floor)


def agreement(judgements: list[tuple[int, Any, Any]]) -> dict[int, tuple[int, int]]:
    """{user id: (agreeing, compared)} from A/B judgements (user id, item key, the
    chosen side's identity). Each person counts once per item, with their majority
    choice (ties: their first); an item counts for a person when the others who judged
    it have a majority (a tie among them says nothing)."""
    by_item: dict[Any, dict[int, list]] = {}
    for user_id, key, chosen in judgements:
        by_item.setdefault(key, {}).setdefault(user_id, []).append(chosen)
    out: dict[int, list[int]] = {}
    for per_user in by_item.values():
        if len(per_user) < 2:
            continue
        mine = {u: _majority(choices) for u, choices in per_user.items()}
        for u, choice in mine.items():
            others = collections.Counter(c for v, c in mine.items() if v != u).most_common()
            if len(others) > 1 and others[0][1] == others[1][1]:
                continue
            agree_n = out.setdefault(u, [0, 0])
            agree_n[0] += choice == others[0][0]
            agree_n[1] += 1
    return {u: (a, n) for u, (a, n) in out.items()}


def _majority(choices: list) -> Any:
    tally = collections.Counter(choices)
    return max(tally, key=lambda c: (tally[c], c == choices[0]))


def normalise_profile(profile: str | None) -> str:
    """The profile group of a profile as people type it: spaces collapsed, case folded,
    punctuation at the ends dropped ('Nurse.' and ' nurse' are one group)."""
    text = " ".join((profile or "").split()).casefold().strip(" .,;:!?-_/")
    return text or NO_PROFILE


def draw(rng: random.Random, gold_rate: float, repeat_rate: float) -> str | None:
    """What a comparison the person asks for shows: GOLD with probability `gold_rate`,
    REPEAT with `repeat_rate`, otherwise None (two new replies to their message)."""
    u = rng.random()
    if u < gold_rate:
        return GOLD
    if u < gold_rate + repeat_rate:
        return REPEAT
    return None


# ---------------------------------------------------------------- reading the store
# `db` below is anything with `.execute(sql, params)` returning a cursor: a
# sqlite3.Connection or a sqlite_utils.Database, inside the caller's read transaction.

_CHECKS_SQL = """
    SELECT user_id, SUM(kind = 'gold'), SUM(kind = 'gold' AND ok), SUM(kind = 'repeat'), SUM(kind = 'repeat' AND ok)
    FROM (SELECT user_id, 'gold' AS kind, choice = better_side AS ok FROM gold_answers WHERE id <= :gold_hi
          UNION ALL
          SELECT r.user_id, 'repeat', r.choice = c.choice FROM repeat_answers r
          JOIN comparisons c ON c.id = r.comparison_id WHERE r.id <= :repeat_hi)
    GROUP BY user_id"""


def check_bounds(db) -> dict[str, int]:
    """The highest gold_answers and repeat_answers ids now, so a snapshot's weights can be read again alike."""
    return {table: db.execute(f"SELECT COALESCE(MAX(id), 0) FROM {table}").fetchone()[0]
            for table in ("gold_answers", "repeat_answers")}


def read_checks(db, bounds: dict[str, int] | None = None) -> dict[int, Checks]:
    """{user id: Checks} over the answers up to `bounds` (default: all of them)."""
    bounds = bounds or check_bounds(db)
    rows = db.execute(_CHECKS_SQL, {"gold_hi": bounds["gold_answers"], "repeat_hi": bounds["repeat_answers"]}).fetchall()
    return {uid: Checks(int(gn), int(gc), int(rn), int(rc)) for uid, gn, gc, rn, rc in rows}


def read_names(db) -> dict[int, str]:
    """{user id: name} of every user."""
    return {uid: name for uid, name in db.execute("SELECT id, name FROM users ORDER BY id").fetchall()}


_SHARED_SQL = """
    WITH judged AS (
      SELECT c.user_id, ra.context AS context, MIN(ra.text, rb.text) AS t1, MAX(ra.text, rb.text) AS t2,
             CASE WHEN c.choice = 'a' THEN ra.text ELSE rb.text END AS chosen
      FROM comparisons c JOIN replies ra ON ra.id = c.reply_a_id JOIN replies rb ON rb.id = c.reply_b_id
      WHERE c.choice IN ('a', 'b') AND ra.text != rb.text AND c.id NOT IN (SELECT comparison_id FROM imports)),
    shared AS (SELECT context, t1, t2 FROM judged GROUP BY context, t1, t2 HAVING COUNT(DISTINCT user_id) > 1)
    SELECT j.user_id, j.context, j.t1, j.t2, j.chosen FROM judged j JOIN shared s USING (context, t1, t2)"""

_VOLUME_SQL = """
    SELECT u.id, u.name, u.profile,
           (SELECT COUNT(*) FROM votes v WHERE v.user_id = u.id AND v.value != 0)
           + (SELECT COUNT(*) FROM comparisons c WHERE c.user_id = u.id)
           + (SELECT COUNT(*) FROM rankings k WHERE k.user_id = u.id)
           + (SELECT COUNT(*) FROM corrections k WHERE k.user_id = u.id)
    FROM users u ORDER BY u.id"""


@dataclass(frozen=True)
class Annotator:
    """One person's figures (module docstring)."""

    user_id: int
    name: str
    profile: str
    volume: int
    checks: Checks = field(default_factory=Checks)
    agree: int = 0  # A/B choices on shared reply pairs that agree with the others' majority
    shared: int = 0  # A/B choices on shared reply pairs where the others have a majority
    weight: float = PRIOR_SKILL
    excluded: bool = False
    reason: str = ""

    @property
    def gold_accuracy(self) -> float | None:
        return self.checks.gold_correct / self.checks.gold_n if self.checks.gold_n else None

    @property
    def gold_interval(self) -> tuple[float, float]:
        return wilson(self.checks.gold_correct, self.checks.gold_n)

    @property
    def consistency(self) -> float | None:
        return self.checks.repeat_consistent / self.checks.repeat_n if self.checks.repeat_n else None

    @property
    def agreement(self) -> float | None:
        return self.agree / self.shared if self.shared else None


def read_annotators(db, floor: float = DEFAULT_FLOOR) -> list[Annotator]:
    """Every user's figures, by user id."""
    checks = read_checks(db)
    agreed = agreement([(uid, (ctx, t1, t2), chosen) for uid, ctx, t1, t2, chosen in db.execute(_SHARED_SQL).fetchall()])
    out = []
    for uid, name, profile, volume in db.execute(_VOLUME_SQL).fetchall():
        c = checks.get(uid, Checks())
        w = weigh(c, floor, name)
        agree, shared = agreed.get(uid, (0, 0))
        out.append(Annotator(uid, name, profile or "", int(volume), c, agree, shared, w.weight, w.excluded, w.reason))
    return out


# ---------------------------------------------------------------- gold items from a file
@dataclass
class GoldReport:
    added: int = 0
    skipped: int = 0  # already stored
    errors: list[tuple[int, str]] = field(default_factory=list)  # (line number, what is wrong); nothing stored


def import_gold(store, path: str | os.PathLike) -> GoldReport:
    """Store every pair of a JSONL preference file as a gold item, `chosen` the better
    reply. The formats are those `python -m trainer import` reads (TRL preference
    {"prompt", "chosen", "rejected"} with strings or messages, TRL conversations without
    a prompt, HH-RLHF), see assistant/feedback/preferences.py. A bad line is reported
    with its number and stores nothing; a pair stored before is skipped."""
    from assistant.feedback.preferences import BadRecord, parse_record
    from assistant.feedback.store import FeedbackError

    path = Path(path)
    report = GoldReport()
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                prompt, better, worse = parse_record(json.loads(raw))
                _, added = store.add_gold_item(prompt, better, worse, source=path.name)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                report.errors.append((line_no, f"not valid JSON: {e}"))
            except (BadRecord, FeedbackError) as e:
                report.errors.append((line_no, str(e)))
            else:
                report.added += added
                report.skipped += not added
    return report


def format_table(rows: list[Annotator]) -> str:
    """The figures as a plain-text table, for the terminal."""
    def share(k: int, n: int) -> str:
        return f"{k}/{n}" if n else "-"

    lines = [f"{'name':<20} {'volume':>6} {'gold':>7} {'95% CI':>13} {'repeats':>8} {'agree':>7} {'weight':>6}  excluded"]
    for a in rows:
        lo, hi = a.gold_interval
        ci = f"[{lo:.2f}, {hi:.2f}]" if a.checks.gold_n else "-"
        lines.append(f"{a.name[:20]:<20} {a.volume:>6} {share(a.checks.gold_correct, a.checks.gold_n):>7} {ci:>13} "
                     f"{share(a.checks.repeat_consistent, a.checks.repeat_n):>8} {share(a.agree, a.shared):>7} "
                     f"{a.weight:>6.2f}  {a.reason if a.excluded else ''}")
    return "\n".join(lines)


# ---------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    from assistant.feedback.store import DEFAULT_PATH, FeedbackError, FeedbackStore, StoreUnavailable

    parser = argparse.ArgumentParser(prog="python -m assistant.annotators",
                                     description="Gold items and the figures of the people who give feedback.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gold = commands.add_parser(
        "import-gold", help="store the pairs of a JSONL preference file as gold items (chosen = the better reply)",
        description="Store every pair of a JSONL preference file as a gold item: Compare mode shows it now and then, "
                    "and the answers measure who judges well. Formats: TRL preference {prompt, chosen, rejected} "
                    "(strings or messages), TRL conversations, HH-RLHF. Importing a file again adds nothing new.")
    gold.add_argument("file", metavar="FILE.jsonl")
    show = commands.add_parser("show", help="print every person's figures and weight",
                               description="Print volume, gold accuracy, self-consistency, agreement and weight per person.")
    show.add_argument("--floor", type=float, default=DEFAULT_FLOOR, help=f"annotator floor (default: {DEFAULT_FLOOR})")
    for sub in (gold, show):
        sub.add_argument("--db", default=DEFAULT_PATH, help=f"feedback database (default: {DEFAULT_PATH})")
    args = parser.parse_args(argv)
    try:
        if args.command == "import-gold":
            if not Path(args.file).is_file():
                print(f"error: no such file {args.file}", file=sys.stderr)
                return 2
            with FeedbackStore(args.db) as store:
                report = import_gold(store, args.file)
            for line_no, error in report.errors[:20]:
                print(f"{args.file}:{line_no}: {error}", file=sys.stderr)
            if len(report.errors) > 20:
                print(f"... and {len(report.errors) - 20} more bad lines", file=sys.stderr)
            print(f"gold items: {report.added} added, {report.skipped} already stored, {len(report.errors)} bad lines")
            return 1 if report.errors else 0
        check_floor(args.floor, "--floor")
        if not Path(args.db).is_file():
            print(f"error: no feedback database at {args.db}", file=sys.stderr)
            return 2
        with FeedbackStore(args.db, readonly=True) as store:
            print(format_table(read_annotators(store.db(), args.floor)))
        return 0
    except (StoreUnavailable, FeedbackError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
