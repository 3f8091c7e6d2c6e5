"""The administrators' dashboard: what was collected, what was trained, what is serving.

What it is: a tab of the chat app (`build_dashboard(deps)`, called from
`assistant.ui.build_demo`) for whoever holds the admin password. It shows

    feedback over time by kind, and per adapter version      (SQLite, read-only)
    thumbs-up rate and side-by-side win rate per version     (SQLite, read-only)
    the same two per profile group (the profile people type, normalised), 95% CI
    tie rate per version, mode and sampling variant, 95% CI  (SQLite, read-only)
    the annotators: volume, gold accuracy with its 95% CI, self-consistency,
    agreement with others, reliability weight, excluded and why (assistant/annotators.py)
    the gold items and how often they were answered right
    reward-model validation accuracy with its 95% CI         (data/reward/rNNNNNN/manifest.json)
    PPO curves: reward (objective/scores) and objective/kl   (data/adapters/vNNNNNN/manifest.json)
    KL per cycle (to the parent) and in total (to the base)  (each version's held-out evaluation)
    the table of adapter versions: status, lineage, the gate's evidence (judge win rate,
    held-out human agreement, KL), rejection reasons; a waiting cycle's reason
    what is serving, the live-comparison candidate, a running cycle and its phase, the last cycle

and has three actions: *Retrain now* (one training cycle in the background, through
`deps.retrain`), *Roll back* (CURRENT back to an older version through
`assistant.adapters.rollback`; the server swaps at once through its watcher) and *Add
gold item* (a comparison with a known better reply, written through the server's
store; Compare mode mixes such items in at --gold-rate).

The data side is small functions that take a connection or a path and return a
pandas DataFrame, a dict or a string, so they test without Gradio. The Gradio side is
wiring plus a few named handlers. The admin guard:
- `login` compares the password with `hmac.compare_digest` and, on success, puts an
  `AdminSession` in a per-browser-session `gr.State` (kept server-side) that expires
  after --admin-session-minutes; every admin handler re-checks it (`require_admin`)
  and refuses with `gr.Error` once it is missing or expired; the auto-refresh logs out.
- Failed logins back off (`LoginGuard`): after FREE_FAILURES_PER_CLIENT failures from
  one client address, or FREE_FAILURES_OVERALL from all of them together, each further
  failure doubles the wait before the next attempt is even checked (from
  BACKOFF_FIRST_S up to BACKOFF_MAX_S), and the message says how long. A success
  clears the count. Behind a reverse proxy every client has the proxy's address, so
  only the overall limit tells people apart from an attack.
Components are built empty, so the page config holds no dashboard data; values
arrive only through handlers after login. With no password configured (the
environment variable ASSISTANT_ADMIN_PASSWORD or --admin-password-file) the tab only
says how to set one and wires nothing.

What it is not: a writer of feedback (the database is read through a read-only
connection; the one write, a gold item, goes through the server's store), a trainer,
or a second adapter format: the trainer's files are read through `assistant.cycles`
and `assistant.adapters`, the `data/` contract; the server imports no trainer code.
Times are UTC.
"""

from __future__ import annotations

import hmac
import html
import json
import logging
import math
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import pandas as pd

from assistant import adapters, annotators, cycles
from assistant.config import BASE_VERSION
from assistant.feedback import FeedbackError, FeedbackStore, StoreUnavailable

log = logging.getLogger(__name__)

IMPORTED = "imported"  # kind of the comparisons that came from a preference file, not from users
IMPORT_VERSION = "import"  # adapter_version of imported replies; no model wrote them
HOURLY_UP_TO = pd.Timedelta(days=2)  # feedback spanning at most this is counted per hour, else per day
ROLLBACK_TARGETS = ("active", "retired")  # statuses of versions that served before
REFRESH_S = 30.0  # auto refresh while logged in
NO_PASSWORD = (
    "### Dashboard locked\nNo admin password is set, so the dashboard is off. Start the server with the environment "
    "variable `ASSISTANT_ADMIN_PASSWORD` set, or with `--admin-password-file PATH` (a file holding the password), "
    "then reload this page."
)
FREE_FAILURES_PER_CLIENT = 3  # failed logins from one address before each further one makes it wait
FREE_FAILURES_OVERALL = 10  # failed logins from all addresses together before each further one makes everyone wait
BACKOFF_FIRST_S = 1.0  # the first wait; it doubles with every further failure
BACKOFF_MAX_S = 900.0  # the longest wait
MAX_GOLD_CHARS = 4000  # longest prompt or reply of a gold item written on the dashboard


# ---------------------------------------------------------------- feedback queries (SQLite)
def feedback_events(con: sqlite3.Connection) -> pd.DataFrame:
    """One row per piece of feedback: `at` (UTC timestamp) and `kind` (votes, comparisons,
    corrections, rankings, or 'imported' for comparisons imported from a preference file).
    A vote counts once, when first given; a removed vote does not count."""
    df = pd.read_sql_query(
        """SELECT created_at AS at, 'votes' AS kind FROM votes WHERE value != 0
           UNION ALL
           SELECT created_at, CASE WHEN id IN (SELECT comparison_id FROM imports) THEN ? ELSE 'comparisons' END
             FROM comparisons
           UNION ALL SELECT created_at, 'corrections' FROM corrections
           UNION ALL SELECT created_at, 'rankings' FROM rankings""",
        con, params=[IMPORTED],
    )
    df["at"] = pd.to_datetime(df["at"], utc=True, format="ISO8601")
    return df


def bucket_freq(times: pd.Series) -> str:
    """'h' (hours) for feedback spanning at most HOURLY_UP_TO, else 'D' (days)."""
    if times.empty or times.max() - times.min() <= HOURLY_UP_TO:
        return "h"
    return "D"


def feedback_over_time(events: pd.DataFrame) -> pd.DataFrame:
    """Counts per time bucket and kind, zeros included, so a quiet hour or day shows as a gap:
    columns `time` (bucket start, text, UTC), `kind`, `count`; `.attrs['bucket']` is 'hour' or 'day'."""
    freq = bucket_freq(events["at"])
    fmt = "%Y-%m-%d %H:00" if freq == "h" else "%Y-%m-%d"
    if events.empty:
        out = pd.DataFrame({"time": pd.Series(dtype=str), "kind": pd.Series(dtype=str), "count": pd.Series(dtype=int)})
    else:
        buckets = events["at"].dt.floor(freq)
        counts = events.assign(bucket=buckets).groupby(["bucket", "kind"]).size()
        full = pd.MultiIndex.from_product(
            [pd.date_range(buckets.min(), buckets.max(), freq=freq), sorted(events["kind"].unique())], names=["bucket", "kind"])
        counts = counts.reindex(full, fill_value=0).reset_index(name="count")
        out = pd.DataFrame({"time": counts["bucket"].dt.strftime(fmt), "kind": counts["kind"], "count": counts["count"].astype(int)})
    out.attrs["bucket"] = "hour" if freq == "h" else "day"
    return out


def feedback_by_version(con: sqlite3.Connection) -> pd.DataFrame:
    """Feedback on the replies of each adapter version: columns `version`, `kind`, `count`.
    A comparison or ranking counts once for every distinct version among its replies."""
    return pd.read_sql_query(
        """SELECT version, kind, COUNT(*) AS count FROM (
             SELECT r.adapter_version AS version, 'votes' AS kind FROM votes v JOIN replies r ON r.id = v.reply_id WHERE v.value != 0
             UNION ALL
             SELECT version, 'comparisons' FROM (
               SELECT c.id, r.adapter_version AS version FROM comparisons c JOIN replies r ON r.id = c.reply_a_id
               UNION SELECT c.id, r.adapter_version FROM comparisons c JOIN replies r ON r.id = c.reply_b_id)
             UNION ALL
             SELECT r.adapter_version, 'corrections' FROM corrections k JOIN replies r ON r.id = k.reply_id
             UNION ALL
             SELECT version, 'rankings' FROM (
               SELECT DISTINCT k.id, r.adapter_version AS version
               FROM rankings k, json_each(k.reply_ids) j JOIN replies r ON r.id = j.value))
           WHERE version != ? GROUP BY version, kind ORDER BY version, kind""",
        con, params=[IMPORT_VERSION],
    )


def thumbs_up_rate(con: sqlite3.Connection) -> pd.DataFrame:
    """Per adapter version: `up`, `down` and `up_rate` = up / (up + down) over current votes."""
    df = pd.read_sql_query(
        """SELECT r.adapter_version AS version, SUM(v.value = 1) AS up, SUM(v.value = -1) AS down
           FROM votes v JOIN replies r ON r.id = v.reply_id
           WHERE v.value != 0 AND r.adapter_version != ? GROUP BY r.adapter_version ORDER BY r.adapter_version""",
        con, params=[IMPORT_VERSION],
    )
    df["up_rate"] = (df["up"] / (df["up"] + df["down"])).astype(float)
    return df


def win_rate(con: sqlite3.Connection) -> pd.DataFrame:
    """Side-by-side win rate per adapter version: `wins` / `decisive`, where `decisive` counts
    the A-or-B choices between a reply of that version and a reply of another version
    (ties, both-bad, and pairs of one version against itself say nothing about it)."""
    rows = con.execute(
        """SELECT c.choice, ra.adapter_version, rb.adapter_version FROM comparisons c
           JOIN replies ra ON ra.id = c.reply_a_id JOIN replies rb ON rb.id = c.reply_b_id
           WHERE c.choice IN ('a', 'b') AND ra.adapter_version != rb.adapter_version"""
    ).fetchall()
    wins, decisive = Counter(), Counter()
    for choice, va, vb in rows:
        decisive.update([va, vb])
        wins[va if choice == "a" else vb] += 1
    versions = sorted(decisive)
    return pd.DataFrame({
        "version": pd.Series(versions, dtype=str),
        "wins": pd.Series([wins[v] for v in versions], dtype=int),
        "decisive": pd.Series([decisive[v] for v in versions], dtype=int),
        "win_rate": pd.Series([wins[v] / decisive[v] for v in versions], dtype=float),
    })


def thumbs_by_profile(con: sqlite3.Connection) -> pd.DataFrame:
    """Thumbs-up rate per profile group (`annotators.normalise_profile` of the voter's
    current profile) and adapter version: `profile`, `version`, `up`, `down`, `up_rate`
    with its 95% Wilson interval (`ci_low`, `ci_high`). Imported replies are left out."""
    counts: Counter = Counter()
    for profile, version, value in con.execute(
            """SELECT u.profile, r.adapter_version, v.value FROM votes v JOIN users u ON u.id = v.user_id
               JOIN replies r ON r.id = v.reply_id WHERE v.value != 0 AND r.adapter_version != ?""", [IMPORT_VERSION]):
        counts[(annotators.normalise_profile(profile), version, value == 1)] += 1
    rows = []
    for group, version in sorted({(g, v) for g, v, _ in counts}):
        up, down = counts[(group, version, True)], counts[(group, version, False)]
        rows.append((group, version, up, down, up / (up + down), *wilson(up, up + down)))
    return pd.DataFrame(rows, columns=["profile", "version", "up", "down", "up_rate", "ci_low", "ci_high"]).astype(
        {"profile": str, "version": str, "up": int, "down": int, "up_rate": float, "ci_low": float, "ci_high": float})


def wins_by_profile(con: sqlite3.Connection) -> pd.DataFrame:
    """`win_rate` per profile group of the person who chose and adapter version:
    `profile`, `version`, `wins`, `decisive`, `win_rate` with its 95% Wilson interval."""
    wins, decisive = Counter(), Counter()
    for profile, choice, va, vb in con.execute(
            """SELECT u.profile, c.choice, ra.adapter_version, rb.adapter_version FROM comparisons c
               JOIN users u ON u.id = c.user_id JOIN replies ra ON ra.id = c.reply_a_id JOIN replies rb ON rb.id = c.reply_b_id
               WHERE c.choice IN ('a', 'b') AND ra.adapter_version != rb.adapter_version"""):
        group = annotators.normalise_profile(profile)
        decisive.update([(group, va), (group, vb)])
        wins[(group, va if choice == "a" else vb)] += 1
    rows = [(g, v, wins[(g, v)], n, wins[(g, v)] / n, *wilson(wins[(g, v)], n)) for (g, v), n in sorted(decisive.items())]
    return pd.DataFrame(rows, columns=["profile", "version", "wins", "decisive", "win_rate", "ci_low", "ci_high"]).astype(
        {"profile": str, "version": str, "wins": int, "decisive": int, "win_rate": float, "ci_low": float, "ci_high": float})


ANNOTATOR_COLUMNS = ["name", "profile", "volume", "gold accuracy (95% CI)", "self-consistency", "agreement", "weight", "excluded", "why"]


def annotators_table(con: sqlite3.Connection, floor: float) -> pd.DataFrame:
    """One row per person (the 'import' user of data sets included, at weight 1):
    volume, gold accuracy with its 95% Wilson interval and n, self-consistency on
    repeats, agreement with others on shared reply pairs, the reliability weight,
    and whether (and why) the floor leaves their feedback out of training."""
    rows = []
    for a in annotators.read_annotators(con, floor):
        lo, hi = a.gold_interval
        rows.append({
            "name": a.name, "profile": a.profile, "volume": a.volume,
            "gold accuracy (95% CI)": _interval(a.gold_accuracy, lo, hi, a.checks.gold_n),
            "self-consistency": _share(a.checks.repeat_consistent, a.checks.repeat_n),
            "agreement": _share(a.agree, a.shared),
            "weight": round(a.weight, 3), "excluded": "excluded" if a.excluded else "", "why": a.reason,
        })
    return pd.DataFrame(rows, columns=ANNOTATOR_COLUMNS).astype({"volume": int, "weight": float})


def _share(k: int, n: int) -> str:
    """'0.80 (8/10)', or '' when n = 0."""
    return f"{k / n:.2f} ({k}/{n})" if n else ""


GOLD_COLUMNS = ["id", "question", "better reply", "worse reply", "source", "answers", "answered right"]


def gold_table(con: sqlite3.Connection) -> pd.DataFrame:
    """The gold items, newest first: the question (the prompt's last user message), the
    two replies, where the item came from, answers and how many chose the better reply."""
    rows = [(gid, json.loads(prompt)[-1]["content"], better, worse, source, n, right) for gid, prompt, better, worse, source, n, right in con.execute(
        """SELECT g.id, g.prompt, g.better, g.worse, g.source, COUNT(a.id), COALESCE(SUM(a.choice = a.better_side), 0)
           FROM gold_items g LEFT JOIN gold_answers a ON a.gold_item_id = g.id GROUP BY g.id ORDER BY g.id DESC""")]
    return pd.DataFrame(rows, columns=GOLD_COLUMNS).astype({"id": int, "answers": int, "answered right": int})


wilson = annotators.wilson  # the dashboard's intervals are the Annotators view's


NOT_RECORDED = "(not recorded)"  # variant of replies stored before replies recorded how they were sampled


def tie_rates(con: sqlite3.Connection) -> pd.DataFrame:
    """How often people could not tell replies apart, per adapter version, mode and variant.

    The unit is a judged pair of replies: a comparison is one pair (mode 'compare'); a
    ranking of k replies is k(k-1)/2 decisive pairs and 'All about the same' is as many
    tied pairs (mode 'rank'). `ties` counts pairs judged a tie, `both_bad` pairs judged
    both bad; `tie_rate` = ties / pairs with its 95% Wilson interval (`ci_low`, `ci_high`).
    A pair counts once for every distinct version among its two replies; `variant` is how
    the replies were sampled (plain, temperature-spread, live-candidate). Imported pairs
    are left out."""
    judged = []  # (versions, mode, variant, choice)
    for choice, va, vb, source, variant in con.execute(
        """SELECT c.choice, ra.adapter_version, rb.adapter_version, ra.source, json_extract(ra.params, '$.variant')
           FROM comparisons c JOIN replies ra ON ra.id = c.reply_a_id JOIN replies rb ON rb.id = c.reply_b_id
           WHERE c.id NOT IN (SELECT comparison_id FROM imports)"""
    ):
        judged.append(({va, vb}, "rank" if source == "rank" else "compare", variant, choice))
    replies = {rid: (version, variant) for rid, version, variant in con.execute(
        """SELECT DISTINCT r.id, r.adapter_version, json_extract(r.params, '$.variant')
           FROM rankings k, json_each(k.reply_ids) j JOIN replies r ON r.id = j.value""")}
    for (reply_ids,) in con.execute("SELECT reply_ids FROM rankings"):
        ids = json.loads(reply_ids)
        for i, better in enumerate(ids):
            for worse in ids[i + 1:]:
                judged.append(({replies[better][0], replies[worse][0]}, "rank", replies[better][1], "ranked"))
    pairs, ties, both_bad = Counter(), Counter(), Counter()
    for versions, mode, variant, choice in judged:
        for version in versions - {IMPORT_VERSION}:
            key = (version, mode, variant or NOT_RECORDED)
            pairs[key] += 1
            ties[key] += choice == "tie"
            both_bad[key] += choice == "both_bad"
    rows = []
    for key in sorted(pairs):
        low, high = wilson(ties[key], pairs[key])
        rows.append((*key, pairs[key], ties[key], both_bad[key], ties[key] / pairs[key], low, high))
    columns = ["version", "mode", "variant", "pairs", "ties", "both_bad", "tie_rate", "ci_low", "ci_high"]
    return pd.DataFrame(rows, columns=columns).astype(
        {"version": str, "mode": str, "variant": str, "pairs": int, "ties": int, "both_bad": int,
         "tie_rate": float, "ci_low": float, "ci_high": float})


def read_feedback(db_path: str | Path, floor: float = annotators.DEFAULT_FLOOR) -> dict[str, pd.DataFrame]:
    """Every feedback frame the dashboard shows, from one read-only snapshot of the
    database; `floor`: the annotator floor the annotators table applies."""
    with FeedbackStore(db_path, readonly=True) as store:
        con = store.db().conn
        con.execute("BEGIN")
        try:
            return {
                "over_time": feedback_over_time(feedback_events(con)),
                "by_version": feedback_by_version(con),
                "thumbs_up": thumbs_up_rate(con),
                "win_rate": win_rate(con),
                "tie_rates": tie_rates(con),
                "thumbs_by_profile": thumbs_by_profile(con),
                "wins_by_profile": wins_by_profile(con),
                "annotators": annotators_table(con, floor),
                "gold": gold_table(con),
            }
        finally:
            con.execute("COMMIT")


# ---------------------------------------------------------------- trainer files
def reward_accuracy(reward_dir: str | Path) -> pd.DataFrame:
    """One row per reward-model version, oldest first: created, validation accuracy with its
    95% interval, training accuracy and the number of validation pairs (None where missing)."""
    rows = []
    for version in cycles.reward_versions(reward_dir):
        try:
            m = cycles.reward_manifest(reward_dir, version)
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("reward model %s: unreadable manifest (%s)", version, exc)
            m = {}
        metrics = m.get("metrics") or {}
        rows.append({
            "reward model": version, "created": m.get("created_at", ""),
            "val_accuracy": metrics.get("val_accuracy"), "ci_low": metrics.get("val_accuracy_lo"),
            "ci_high": metrics.get("val_accuracy_hi"), "train_accuracy": metrics.get("train_accuracy"),
            "val_pairs": metrics.get("val_pairs"),
        })
    columns = ["reward model", "created", "val_accuracy", "ci_low", "ci_high", "train_accuracy", "val_pairs"]
    df = pd.DataFrame(rows, columns=columns)
    for c in columns[2:]:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


def reward_accuracy_lines(acc: pd.DataFrame) -> pd.DataFrame:
    """`reward_accuracy` in long form for a plot of points: `reward model`, `series`, `accuracy`."""
    names = {"val_accuracy": "validation", "ci_low": "95% CI low", "ci_high": "95% CI high", "train_accuracy": "training"}
    long = acc.melt(id_vars=["reward model"], value_vars=list(names), var_name="series", value_name="accuracy")
    long["series"] = long["series"].map(names).astype(str)
    return long.dropna(subset=["accuracy"]).reset_index(drop=True)


def ppo_curve(manifests: list[dict], key: str) -> pd.DataFrame:
    """Per-iteration PPO metric `key` (e.g. 'objective/scores') of every run: `version`, `iteration`, `value`."""
    rows = []
    for m in manifests:
        history = m.get("metrics")
        if not isinstance(history, list):
            continue
        for i, it in enumerate(history, start=1):
            if isinstance(it, dict) and isinstance(it.get(key), (int, float)):
                rows.append({"version": m["version"], "iteration": int(it.get("iteration", i)), "value": float(it[key])})
    return pd.DataFrame(rows, columns=["version", "iteration", "value"]).astype({"version": str, "iteration": int, "value": float})


def _num(value, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else ""


def _interval(value, lo, hi, n) -> str:
    """'0.62 [0.51, 0.72] n=64', or '' when there is no value."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return ""
    return f"{value:.2f} [{_num(lo, '.2f')}, {_num(hi, '.2f')}] n={n}"


def kl_by_version(manifests: list[dict]) -> pd.DataFrame:
    """KL of each evaluated version to its parent (that cycle's change) and to the base
    (all cycles), and the two the gate budgets (what the optimising step added, this
    cycle and over the lineage; trainer/gate.py), in nats per reply: `version`, `series`, `kl`."""
    rows = []
    for m in manifests:
        e = m.get("evaluation") or {}
        for key, series in (("kl_parent", "to the parent (this cycle)"), ("kl_base", "to the base (in total)"),
                            ("kl_optimised", "budgeted: this cycle's optimisation"), ("kl_optimised_total", "budgeted: optimisation over the lineage")):
            if isinstance(e.get(key), (int, float)):
                rows.append({"version": m["version"], "series": series, "kl": float(e[key])})
    return pd.DataFrame(rows, columns=["version", "series", "kl"]).astype({"version": str, "series": str, "kl": float})


def _step(manifest: dict) -> str:
    """How a version was trained: its policy step, with "sft + " when SFT ran first."""
    step = manifest.get("policy_step") or manifest.get("kind") or ""
    if step == "sft":
        return step
    sft_ran = "sft" in (manifest.get("rows") or {}) or "sft" in manifest  # TRL steps' rows; PPO's "sft" stage
    return f"sft + {step}" if sft_ran else step


def versions_table(manifests: list[dict], serving: str, live: str | None) -> pd.DataFrame:
    """The adapter versions, newest first: status, lineage, evaluation and rejection reasons."""
    rows = []
    for m in reversed(manifests):
        v, e = m.get("version", "?"), m.get("evaluation") or {}
        h = e.get("human_agreement") or {}
        tally = m.get("live") or {}
        rows.append({
            "version": v,
            "status": m.get("status", ""),
            "serving": "serving" if v == serving else "live candidate" if v == live else "",
            "parent": m.get("parent") or "",
            "policy step": _step(m),
            "rows used": ", ".join(f"{k} {n}" for k, n in (m.get("rows") or ({"sft": m["sft"]["rows"]} if m.get("sft") else {})).items()),
            "reward model": m.get("reward_model") or "",
            "created": m.get("created_at", ""),
            "judge win rate": _interval(e.get("win_rate"), e.get("win_rate_lo"), e.get("win_rate_hi"), e.get("replies")),
            "human agreement": _interval(h.get("share"), h.get("lo"), h.get("hi"), h.get("n")),
            "KL to parent": _num(e.get("kl_parent"), ".2f"),
            "KL to base": _num(e.get("kl_base"), ".2f"),
            "budgeted KL": (f"{_num(e.get('kl_optimised'), '.2f')} / {_num(e.get('kl_optimised_total'), '.2f')}"
                            if isinstance(e.get("kl_optimised"), (int, float)) else ""),
            "margin": _num(e.get("margin"), "+.3f"),
            "degenerate": _num(e.get("degenerate"), "d"),
            "live votes": f"{tally['wins']}/{tally['votes']} won" if tally.get("votes") else "",
            "reasons": "; ".join(m.get("reasons") or []),
        })
    columns = ["version", "status", "serving", "parent", "policy step", "rows used", "reward model", "created", "judge win rate", "human agreement", "KL to parent",
               "KL to base", "budgeted KL", "margin", "degenerate", "live votes", "reasons"]
    return pd.DataFrame(rows, columns=columns).astype(str)


def rollback_choices(manifests: list[dict], serving: str) -> tuple[list[str], str | None]:
    """(versions one can roll back to, the default): 'base' and every version that served
    before, except the one serving; the default is the serving version's parent."""
    choices = [BASE_VERSION] + [m["version"] for m in manifests if m.get("status") in ROLLBACK_TARGETS]
    choices = [v for v in choices if v != serving]
    parent = next((m.get("parent") or BASE_VERSION for m in manifests if m.get("version") == serving), None)
    return choices, parent if parent in choices else None


def training_state(lock_file: str | Path, cycles_log: str | Path) -> dict:
    """{'running': {pid, started_at, phase} or None, 'last': the last finished cycle or None}."""
    finished = cycles.read(cycles_log)
    return {"running": cycles.holder(lock_file), "last": finished[-1] if finished else None}


def status_markdown(serving: str, pointer: str, live: str | None, training: dict, refused: dict | None = None) -> str:
    """What is serving and what the trainer is doing, as Markdown (file contents escaped)."""
    def code(text) -> str:
        return f"`{html.escape(str(text))}`"

    lines = [f"**Serving:** {code(serving)}"]
    if pointer != serving:
        why = (refused or {}).get(pointer)
        lines.append(f"**CURRENT points at** {code(pointer)}" + (f", refused: {html.escape(why)}" if why else ", not loaded yet"))
    lines.append(f"**Live comparison candidate:** {code(live) if live else 'none'}")
    running = training.get("running")
    if running is not None:
        lines.append(f"**Training cycle:** running, phase {code(running.get('phase', '?'))} "
                     f"(pid {html.escape(str(running.get('pid', '?')))}, since {html.escape(str(running.get('started_at', '?')))})")
    else:
        lines.append("**Training cycle:** none running")
    last = training.get("last")
    if last:
        text = f"**Last cycle:** {html.escape(str(last.get('decision', '?')))}"
        if last.get("version"):
            text += f" {code(last['version'])}"
        text += f", started {html.escape(str(last.get('started_at', '?')))}"
        if last.get("reasons"):
            text += " — " + html.escape("; ".join(map(str, last["reasons"])))
        lines.append(text)
    else:
        lines.append("**Last cycle:** none yet")
    return "  \n".join(lines)


# ---------------------------------------------------------------- the admin guard
def password_matches(expected: str, given: str | None) -> bool:
    """Constant-time comparison; an empty expected password matches nothing."""
    return bool(expected) and hmac.compare_digest((given or "").encode(), expected.encode())


@dataclass(frozen=True)
class AdminSession:
    """What a successful login puts in the browser session's state: when it ends."""

    expires_at: float  # time.monotonic() seconds
    minutes: float  # how long it lasts, for the message when it ends


def require_admin(admin: AdminSession | None, now: float | None = None) -> None:
    """Refuse (gr.Error) unless `admin` is a login that has not expired at `now`."""
    if not isinstance(admin, AdminSession):
        raise gr.Error("Log in as admin first.")
    if (time.monotonic() if now is None else now) >= admin.expires_at:
        raise gr.Error(f"Your admin session has ended (it lasts {admin.minutes:g} minutes); log in again.")


def _seconds(s: float) -> str:
    s = math.ceil(s)
    return f"{s} s" if s < 120 else f"{math.ceil(s / 60)} min"


class LoginGuard:
    """Failed admin logins per client address and overall, each failure past the free
    ones doubling the wait before the next attempt is checked at all.

    After n failures with f free ones, a key waits min(BACKOFF_FIRST_S · 2^(n − f − 1),
    BACKOFF_MAX_S) from its last failure. Keys: ("client", address) and ("all",). A
    login waits for the longer of its two keys; a success clears both. Thread-safe:
    one guard serves every session of the server."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, free_per_client: int = FREE_FAILURES_PER_CLIENT,
                 free_overall: int = FREE_FAILURES_OVERALL, first_s: float = BACKOFF_FIRST_S, max_s: float = BACKOFF_MAX_S):
        self._clock = clock
        self._free = {"client": free_per_client, "all": free_overall}
        self._first_s, self._max_s = first_s, max_s
        self._lock = threading.Lock()
        self._failures: dict[tuple, tuple[int, float]] = {}  # key -> (failures, time of the last one)

    def _keys(self, client: str) -> list[tuple]:
        return [("client", client or "?"), ("all",)]

    def _wait(self, key: tuple, now: float) -> float:
        n, last = self._failures.get(key, (0, now))
        extra = n - self._free[key[0]]
        if extra <= 0:
            return 0.0
        return max(0.0, last + min(self._first_s * 2 ** (extra - 1), self._max_s) - now)

    def wait_s(self, client: str) -> float:
        """Seconds before `client` may try again; 0 when it may now."""
        now = self._clock()
        with self._lock:
            return max(self._wait(key, now) for key in self._keys(client))

    def failed(self, client: str) -> float:
        """Count a failed login of `client`; returns the wait it now faces."""
        now = self._clock()
        with self._lock:
            if len(self._failures) > 10_000:  # forget addresses idle for long, so the table stays small
                self._failures = {k: v for k, v in self._failures.items() if k == ("all",) or now - v[1] < 2 * self._max_s}
            for key in self._keys(client):
                n, _ = self._failures.get(key, (0, now))
                self._failures[key] = (n + 1, now)
            return max(self._wait(key, now) for key in self._keys(client))

    def succeeded(self, client: str) -> None:
        with self._lock:
            for key in self._keys(client):
                self._failures.pop(key, None)


# ---------------------------------------------------------------- what the dashboard shows
# The order of the values every data handler returns; build_dashboard lists its components in it.
VIEW = ("status", "versions", "rollback", "reward_table", "tie_table",
        "plot_time", "plot_version", "plot_thumbs", "plot_wins", "plot_reward", "plot_ppo_reward", "plot_ppo_kl", "plot_kl",
        "annotators_table", "profile_thumbs", "profile_wins", "gold_table")


def _plot(df: pd.DataFrame | None, empty_note: str, note: str | None = None):
    """A plot's value and caption; None (data unreadable) shows the plot's empty box."""
    if df is None:
        return gr.update(value=None)
    return gr.update(value=df, caption=empty_note if df.empty else note)


def _read(what: str, fn, fallback, problems: list[str]):
    """fn(), or `fallback` with the failure added to `problems`: one unreadable part
    (a locked database, a garbled pointer) must not blank the whole dashboard."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the dashboard shows what it could not read
        log.exception("dashboard: reading the %s failed", what)
        problems.append(f"{what}: {exc}")
        return fallback


def view(deps) -> dict[str, Any]:
    """Everything the dashboard shows, by VIEW name."""
    a, problems = deps.args, []
    serving = deps.engine.policy.current
    live = deps.watcher.live if deps.watcher is not None else None
    refused = deps.watcher.refused if deps.watcher is not None else None
    fb = _read("feedback database", lambda: read_feedback(deps.store.path, a.annotator_floor), {}, problems)
    manifests = _read("adapter manifests", lambda: adapters.manifests(a.adapters_dir), [], problems)
    acc = _read("reward models", lambda: reward_accuracy(a.reward_dir), None, problems)
    pointer = _read("CURRENT pointer", lambda: adapters.read_current(a.adapters_dir), serving, problems)
    training = _read("trainer state", lambda: training_state(a.lock_file, a.cycles_log), {}, problems)
    status = status_markdown(serving, pointer, live, training, refused)
    if problems:
        status += "  \n**Could not read:** " + html.escape("; ".join(problems))
    choices, default = rollback_choices(manifests, serving)
    over_time = fb.get("over_time")
    per_bucket = f"Counted per {over_time.attrs['bucket']} (UTC)." if over_time is not None else None
    return {
        "status": status,
        "versions": versions_table(manifests, serving, live),
        "rollback": gr.update(choices=choices, value=default),
        "reward_table": acc.round(3) if acc is not None else None,
        "tie_table": fb["tie_rates"].round(3) if "tie_rates" in fb else None,
        "plot_time": _plot(over_time, "No feedback yet.", per_bucket),
        "plot_version": _plot(fb.get("by_version"), "No feedback on model replies yet."),
        "plot_thumbs": _plot(fb.get("thumbs_up"), "No 👍/👎 votes yet."),
        "plot_wins": _plot(fb.get("win_rate"), "No A/B choices between replies of different versions yet."),
        "plot_reward": _plot(reward_accuracy_lines(acc) if acc is not None else None, "No reward model trained yet."),
        "plot_ppo_reward": _plot(ppo_curve(manifests, "objective/scores"), "No PPO run yet."),
        "plot_ppo_kl": _plot(ppo_curve(manifests, "objective/kl"), "No PPO run yet."),
        "plot_kl": _plot(kl_by_version(manifests), "No candidate evaluated yet."),
        "annotators_table": fb.get("annotators"),
        "profile_thumbs": fb["thumbs_by_profile"].round(3) if "thumbs_by_profile" in fb else None,
        "profile_wins": fb["wins_by_profile"].round(3) if "wins_by_profile" in fb else None,
        "gold_table": fb.get("gold"),
    }


def blank() -> dict[str, Any]:
    """What the data components hold for someone who is not logged in: nothing."""
    out: dict[str, Any] = {name: gr.update(value=None) for name in VIEW}
    out["status"] = ""
    out["rollback"] = gr.update(choices=[], value=None)
    return out


def _values(d: dict[str, Any]) -> tuple:
    return tuple(d[name] for name in VIEW)


# ---------------------------------------------------------------- handlers
SHOW = gr.update(visible=True)
HIDE = gr.update(visible=False)


def login(deps, password: str, client: str = "", guard: LoginGuard | None = None):
    """Check the password, unless `client` must wait after failed logins (`guard`;
    None: a guard for this call alone). Returns (admin session or False, message,
    dashboard body, timer, *VIEW values)."""
    guard = guard or LoginGuard()
    refused = (False, HIDE, gr.update(active=False), *_values(blank()))
    wait = guard.wait_s(client)
    if wait > 0:
        log.warning("dashboard: admin login from %s refused, %.0f s of backoff left", client or "?", wait)
        return (refused[0], f"Too many failed logins. Wait {_seconds(wait)}, then try again.", *refused[1:])
    if not password_matches(deps.args.admin_password, password):
        wait = guard.failed(client)
        log.warning("dashboard: wrong admin password from %s", client or "?")
        msg = "Wrong password." + (f" Too many failed logins: the next try is possible in {_seconds(wait)}." if wait > 0 else "")
        return (refused[0], msg, *refused[1:])
    guard.succeeded(client)
    minutes = deps.args.admin_session_minutes
    session = AdminSession(time.monotonic() + minutes * 60, minutes)
    log.info("dashboard: admin logged in from %s", client or "?")
    return (session, f"Logged in as admin for {minutes:g} minutes.", SHOW, gr.update(active=True), *_values(view(deps)))


def refresh(deps, admin: AdminSession | None):
    """Returns the VIEW values."""
    require_admin(admin)
    return _values(view(deps))


def tick(deps, admin: AdminSession | None):
    """The auto-refresh. While the login is valid: (admin, no message change, the body
    shown, the timer on, *VIEW values); once it has expired: logged out, the body hidden
    and emptied, the timer off, and a message. Shaped like `login`'s return."""
    try:
        require_admin(admin)
    except gr.Error as exc:
        return (False, exc.message, HIDE, gr.update(active=False), *_values(blank()))
    return (admin, gr.update(), SHOW, gr.update(), *_values(view(deps)))


def add_gold(deps, admin: AdminSession | None, prompt: str, better: str, worse: str):
    """Store a gold item: a question (`prompt`, shown as the user's turn) whose `better`
    reply is known to beat `worse`. Returns (message, *VIEW values)."""
    require_admin(admin)
    prompt, better, worse = ((x or "").strip() for x in (prompt, better, worse))
    too_long = [what for what, text in (("question", prompt), ("better reply", better), ("worse reply", worse)) if len(text) > MAX_GOLD_CHARS]
    if not (prompt and better and worse):
        msg = "A gold item needs a question, a better reply and a worse reply."
    elif too_long:
        msg = f"The {' and '.join(too_long)} is longer than {MAX_GOLD_CHARS:,} characters."
    else:
        try:
            gold_id, added = deps.store.add_gold_item([{"role": "user", "content": prompt}], better, worse, source="dashboard")
            msg = f"Gold item {gold_id} added." if added else f"This gold item is stored already (item {gold_id})."
        except (FeedbackError, StoreUnavailable) as exc:
            msg = f"Not added: {exc}"
    return (html.escape(msg), *_values(view(deps)))


def roll_back(deps, admin: AdminSession | None, version: str | None):
    """Point CURRENT at `version` (None: the serving version's parent) and swap the server
    to it right away. Returns (message, *VIEW values)."""
    require_admin(admin)
    try:
        old, new = adapters.rollback(deps.args.adapters_dir, version or None, lora=deps.engine.policy.lora)
    except (adapters.InvalidAdapter, OSError) as exc:
        return (f"Rollback refused: {html.escape(str(exc))}", *_values(view(deps)))
    was = f"`{old}`" if old is not None else "an unreadable CURRENT"
    if deps.watcher is not None:
        serving = deps.watcher.poll()
        msg = f"Rolled back from {was} to `{new}`; now serving `{serving}`."
    else:
        msg = f"CURRENT now points at `{new}` (was {was}); the server switches at its next check."
    log.info("dashboard rollback %s -> %s", old, new)
    return (msg, *_values(view(deps)))


def retrain(deps, admin: AdminSession | None):
    """Start one training cycle in the background. Returns (message, *VIEW values)."""
    require_admin(admin)
    if deps.retrain is None:
        msg = "Retraining is not available in this server (it was started without a trainer command)."
    else:
        try:
            msg = deps.retrain() or "Retraining started."
        except Exception as exc:  # noqa: BLE001 - a UI handler shows the failure
            log.exception("dashboard: retrain failed")
            msg = f"Could not start a training cycle: {exc}"
    return (html.escape(msg), *_values(view(deps)))


# ---------------------------------------------------------------- layout
def build_dashboard(deps) -> None:
    """The dashboard tab's contents and events, inside the caller's Blocks (and Tab)."""
    if not deps.args.admin_password:
        gr.Markdown(NO_PASSWORD, elem_id="dashboard-locked")
        return
    admin = gr.State(False)
    guard = LoginGuard()  # one for the whole server: failed logins from any browser session count
    events = {"api_visibility": "private", "concurrency_id": "dashboard", "concurrency_limit": 2}
    with gr.Row():
        password = gr.Textbox(label="Admin password", type="password", max_length=200, scale=3, elem_id="admin-password")
        login_btn = gr.Button("Log in", scale=1, elem_id="admin-login")
    login_msg = gr.Markdown("", elem_id="admin-login-status")
    timer = gr.Timer(REFRESH_S, active=False)
    comps: dict[str, Any] = {}
    with gr.Column(visible=False, elem_id="dashboard-body") as body:
        comps["status"] = gr.Markdown("", elem_id="serving-version")
        with gr.Row():
            refresh_btn = gr.Button("Refresh", size="sm", elem_id="dashboard-refresh")
            retrain_btn = gr.Button("Retrain now", size="sm", elem_id="retrain")
        with gr.Row():
            comps["rollback"] = gr.Dropdown(choices=[], value=None, label="Roll back to", scale=3, elem_id="rollback-version")
            rollback_btn = gr.Button("Roll back", variant="stop", scale=1, elem_id="rollback")
        action_msg = gr.Markdown("", elem_id="admin-message")
        comps["versions"] = gr.Dataframe(label="Adapter versions (newest first)", interactive=False, wrap=True, elem_id="versions-table")
        with gr.Row():
            comps["plot_time"] = gr.BarPlot(x="time", y="count", color="kind", title="Feedback over time", x_title="time (UTC)",
                                            x_label_angle=-45, elem_id="plot-feedback-time")
            comps["plot_version"] = gr.BarPlot(x="version", y="count", color="kind", title="Feedback per adapter version",
                                               elem_id="plot-feedback-version")
        with gr.Row():
            comps["plot_thumbs"] = gr.BarPlot(x="version", y="up_rate", title="Thumbs-up rate per version", y_title="👍 / (👍 + 👎)",
                                              y_lim=[0, 1], tooltip="all", elem_id="plot-thumbs-up")
            comps["plot_wins"] = gr.BarPlot(x="version", y="win_rate", title="Side-by-side win rate per version",
                                            y_title="wins / decisive A-B choices", y_lim=[0, 1], tooltip="all", elem_id="plot-win-rate")
        comps["tie_table"] = gr.Dataframe(
            label="Tie rate per version, mode and sampling variant (judged pairs; tie_rate with its 95% Wilson interval)",
            interactive=False, elem_id="tie-table")
        with gr.Row():
            comps["plot_ppo_reward"] = gr.LinePlot(x="iteration", y="value", color="version", title="PPO reward (objective/scores)",
                                                   y_title="mean reward-model score", elem_id="plot-ppo-reward")
            comps["plot_ppo_kl"] = gr.LinePlot(x="iteration", y="value", color="version", title="PPO KL to the parent (objective/kl)",
                                               y_title="nats per reply", elem_id="plot-ppo-kl")
            comps["plot_kl"] = gr.BarPlot(x="version", y="kl", color="series", title="KL per cycle and in total (held-out evaluation)",
                                          y_title="nats per reply", elem_id="plot-kl")
        with gr.Row():
            comps["plot_reward"] = gr.ScatterPlot(x="reward model", y="accuracy", color="series", title="Reward-model accuracy",
                                                  y_lim=[0, 1], elem_id="plot-reward-accuracy")
            comps["reward_table"] = gr.Dataframe(label="Reward models", interactive=False, elem_id="reward-table")
        gr.Markdown(f"### Annotators\nGold accuracy: share of gold items answered with the better reply (95% Wilson interval). "
                    f"Self-consistency: share of repeated comparisons answered as the first time. Agreement: share of A/B "
                    f"choices agreeing with the other people who compared the same replies. Weight: reliability in 0..1 "
                    f"(a newcomer has {annotators.PRIOR_SKILL:g}); below the floor ({deps.args.annotator_floor:g}) a person's "
                    f"feedback is left out of training.", elem_id="annotators-help")
        comps["annotators_table"] = gr.Dataframe(label="Annotators", interactive=False, wrap=True, elem_id="annotators-table")
        with gr.Row():
            comps["profile_thumbs"] = gr.Dataframe(label="Thumbs-up rate per profile group and version (95% CI)",
                                                   interactive=False, elem_id="profile-thumbs-table")
            comps["profile_wins"] = gr.Dataframe(label="Side-by-side win rate per profile group and version (95% CI)",
                                                 interactive=False, elem_id="profile-wins-table")
        with gr.Accordion("Gold items: comparisons with a known better reply", open=False, elem_id="gold-items"):
            gr.Markdown(f"Compare mode shows a gold item instead of new replies in about {deps.args.gold_rate:.0%} of "
                        "comparisons, unmarked, its replies in random order; the answers measure who judges well and never "
                        "train the model. Import many with `python -m assistant.annotators import-gold FILE.jsonl`.")
            gold_prompt = gr.Textbox(label="Question (shown as the user's message)", lines=2, max_length=MAX_GOLD_CHARS, elem_id="gold-prompt")
            with gr.Row():
                gold_better = gr.Textbox(label="Better reply", lines=3, max_length=MAX_GOLD_CHARS, elem_id="gold-better")
                gold_worse = gr.Textbox(label="Worse reply", lines=3, max_length=MAX_GOLD_CHARS, elem_id="gold-worse")
            gold_btn = gr.Button("Add gold item", size="sm", elem_id="gold-add")
            gold_msg = gr.Markdown("", elem_id="gold-message")
            comps["gold_table"] = gr.Dataframe(label="Gold items (newest first)", interactive=False, wrap=True, elem_id="gold-table")
    outputs = [comps[name] for name in VIEW]

    def on_login(password: str, request: gr.Request):
        client = getattr(getattr(request, "client", None), "host", "") or ""
        return login(deps, password, client, guard)

    def on_refresh(admin: AdminSession | None):
        return refresh(deps, admin)

    def on_tick(admin: AdminSession | None):
        return tick(deps, admin)

    def on_roll_back(admin: AdminSession | None, version: str | None):
        return roll_back(deps, admin, version)

    def on_retrain(admin: AdminSession | None):
        return retrain(deps, admin)

    def on_add_gold(admin: AdminSession | None, prompt: str, better: str, worse: str):
        return add_gold(deps, admin, prompt, better, worse)

    login_outputs = [admin, login_msg, body, timer, *outputs]
    login_btn.click(on_login, [password], login_outputs, **events)
    password.submit(on_login, [password], login_outputs, **events)
    refresh_btn.click(on_refresh, [admin], outputs, **events)
    timer.tick(on_tick, [admin], login_outputs, show_progress="hidden", **events)
    rollback_btn.click(on_roll_back, [admin, comps["rollback"]], [action_msg, *outputs], **events)
    retrain_btn.click(on_retrain, [admin], [action_msg, *outputs], **events)
    gold_btn.click(on_add_gold, [admin, gold_prompt, gold_better, gold_worse], [gold_msg, *outputs], **events)
