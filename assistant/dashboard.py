"""The administrators' dashboard: what was collected, what was trained, what is serving.

What it is: a tab of the chat app (`build_dashboard(deps)`, called from
`assistant.ui.build_demo`) for whoever holds the admin password. It shows

    feedback over time by kind, and per adapter version      (SQLite, read-only)
    thumbs-up rate and side-by-side win rate per version     (SQLite, read-only)
    tie rate per version, mode and sampling variant, 95% CI  (SQLite, read-only)
    reward-model validation accuracy with its 95% CI         (data/reward/rNNNNNN/manifest.json)
    PPO curves: reward (objective/scores) and objective/kl   (data/adapters/vNNNNNN/manifest.json)
    KL per cycle (to the parent) and in total (to the base)  (each version's held-out evaluation)
    the table of adapter versions: status, lineage, the gate's evidence (judge win rate,
    held-out human agreement, KL), rejection reasons; a waiting cycle's reason
    what is serving, the live-comparison candidate, a running cycle and its phase, the last cycle

and has two actions: *Retrain now* (one training cycle in the background, through
`deps.retrain`) and *Roll back* (CURRENT back to an older version through
`assistant.adapters.rollback`; the server swaps at once through its watcher).

The data side is small functions that take a connection or a path and return a
pandas DataFrame, a dict or a string, so they test without Gradio. The Gradio side is
wiring plus a few named handlers. Every handler re-checks a per-session admin flag
(`gr.State`, kept server-side) that only `login` sets, with `hmac.compare_digest`;
without it a handler raises `gr.Error` and returns nothing. Components are built
empty, so the page config holds no dashboard data; values arrive only through
handlers after login. With no password configured (--admin-password or
ASSISTANT_ADMIN_PASSWORD) the tab only says how to set one and wires nothing.

What it is not: a writer of feedback (the database is opened read-only), a trainer,
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
from collections import Counter
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from assistant import adapters, cycles
from assistant.config import BASE_VERSION
from assistant.feedback import FeedbackStore

log = logging.getLogger(__name__)

IMPORTED = "imported"  # kind of the comparisons that came from a preference file, not from users
IMPORT_VERSION = "import"  # adapter_version of imported replies; no model wrote them
HOURLY_UP_TO = pd.Timedelta(days=2)  # feedback spanning at most this is counted per hour, else per day
ROLLBACK_TARGETS = ("active", "retired")  # statuses of versions that served before
REFRESH_S = 30.0  # auto refresh while logged in
NO_PASSWORD = (
    "### Dashboard locked\nNo admin password is set, so the dashboard is off. Start the server with "
    "`--admin-password SECRET`, or set the environment variable `ASSISTANT_ADMIN_PASSWORD`, then reload this page."
)


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


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% for z = 1.96) of the proportion successes / n; (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


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


def read_feedback(db_path: str | Path) -> dict[str, pd.DataFrame]:
    """Every feedback frame the dashboard plots, from one read-only snapshot of the database."""
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
    (all cycles), in nats per reply: `version`, `series`, `kl`."""
    rows = []
    for m in manifests:
        e = m.get("evaluation") or {}
        for key, series in (("kl_parent", "to the parent (this cycle)"), ("kl_base", "to the base (in total)")):
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
            "margin": _num(e.get("margin"), "+.3f"),
            "degenerate": _num(e.get("degenerate"), "d"),
            "live votes": f"{tally['wins']}/{tally['votes']} won" if tally.get("votes") else "",
            "reasons": "; ".join(m.get("reasons") or []),
        })
    columns = ["version", "status", "serving", "parent", "policy step", "rows used", "reward model", "created", "judge win rate", "human agreement", "KL to parent",
               "KL to base", "margin", "degenerate", "live votes", "reasons"]
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


def require_admin(admin: bool) -> None:
    if admin is not True:
        raise gr.Error("Log in as admin first.")


# ---------------------------------------------------------------- what the dashboard shows
# The order of the values every data handler returns; build_dashboard lists its components in it.
VIEW = ("status", "versions", "rollback", "reward_table", "tie_table",
        "plot_time", "plot_version", "plot_thumbs", "plot_wins", "plot_reward", "plot_ppo_reward", "plot_ppo_kl", "plot_kl")


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
    fb = _read("feedback database", lambda: read_feedback(deps.store.path), {}, problems)
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


def login(deps, password: str):
    """Returns (admin flag, message, dashboard body, timer, *VIEW values)."""
    if not password_matches(deps.args.admin_password, password):
        return (False, "Wrong password.", HIDE, gr.update(active=False), *_values(blank()))
    return (True, "Logged in as admin.", SHOW, gr.update(active=True), *_values(view(deps)))


def refresh(deps, admin: bool):
    """Returns the VIEW values."""
    require_admin(admin)
    return _values(view(deps))


def roll_back(deps, admin: bool, version: str | None):
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


def retrain(deps, admin: bool):
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
    outputs = [comps[name] for name in VIEW]

    def on_login(password: str):
        return login(deps, password)

    def on_refresh(admin: bool):
        return refresh(deps, admin)

    def on_roll_back(admin: bool, version: str | None):
        return roll_back(deps, admin, version)

    def on_retrain(admin: bool):
        return retrain(deps, admin)

    login_outputs = [admin, login_msg, body, timer, *outputs]
    login_btn.click(on_login, [password], login_outputs, **events)
    password.submit(on_login, [password], login_outputs, **events)
    refresh_btn.click(on_refresh, [admin], outputs, **events)
    timer.tick(on_refresh, [admin], outputs, show_progress="hidden", **events)
    rollback_btn.click(on_roll_back, [admin, comps["rollback"]], [action_msg, *outputs], **events)
    retrain_btn.click(on_retrain, [admin], [action_msg, *outputs], **events)
