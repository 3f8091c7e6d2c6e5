"""Load and fault benchmark: many `gradio_client` users against the running app.

Three phases, one app database, results in one JSON:

1. **Load.** `--users` (64) people sign up and then, for `--minutes` (5), chat and
   vote through the app's API routes (`/sign_up`, `/send`, `/vote`, `/clear`), each in
   their own thread and client, honouring "try again in N s" when a rate limit
   answers. Afterwards, per user, the votes the database holds must equal the votes
   whose client was told "recorded": 0 lost, 0 duplicated. Vote latency is the wall
   time of each `/vote` call (p50/p99).
2. **Kill.** The same load again; after `--kill-after-s` the app is SIGKILLed. It
   is restarted on the same database: `PRAGMA integrity_check` must say ok, and every
   vote a client was told "recorded" must be there (a vote stored whose answer was
   lost with the connection is allowed: nobody was told otherwise).
3. **Malformed calls.** Every API route is called with wrong types, huge strings,
   unknown indexes and ids, and by a client that is not signed in. Each call must end
   in a clear message (a status line or a Gradio error), never a traceback, and no
   feedback row may be added.

Run (defaults = the app's defaults plus accounts mode; about 9 minutes here):
    .venv/bin/python bench/load.py                       # default model
    .venv/bin/python bench/load.py --minutes 1 --users 8 # a shorter look
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import sqlite3
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, SYSTEM, machine, percentile, seed_tasks, task_prompt, write_results  # noqa: E402
from tests.server import free_port, start_app, stop_app  # noqa: E402

PASSWORD = "load test password 1"
FEEDBACK_TABLES = ("votes", "vote_events", "comparisons", "rankings", "corrections")
WAIT = re.compile(r"try again in (\d+) s")


def counts(db: Path) -> dict[str, int]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {t: con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in FEEDBACK_TABLES}
    finally:
        con.close()


def votes_by_user(db: Path) -> dict[str, int]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return dict(con.execute("SELECT u.name, COUNT(*) FROM votes v JOIN users u ON u.id = v.user_id "
                                "WHERE v.value != 0 GROUP BY u.name").fetchall())
    finally:
        con.close()


class User(threading.Thread):
    """One person: signs up, then chats and votes until `deadline` or until the app dies."""

    def __init__(self, url: str, name: str, prompts: list[str], deadline: float, max_new_tokens: int, seed: int):
        super().__init__(daemon=True)
        self.url, self.name, self.prompts, self.deadline = url, name, prompts, deadline
        self.max_new_tokens, self.rng = max_new_tokens, random.Random(seed)
        self.recorded = 0  # votes the app answered "recorded"
        self.vote_ms: list[float] = []
        self.outcomes: dict[str, int] = {}
        self.error: str | None = None

    def _count(self, what: str) -> None:
        self.outcomes[what] = self.outcomes.get(what, 0) + 1

    def _waited(self, status: str) -> bool:
        m = WAIT.search(status or "")
        if m:
            self._count("rate limited")
            time.sleep(min(float(m.group(1)), max(0.0, self.deadline - time.monotonic())))
        return bool(m)

    def run(self) -> None:
        from gradio_client import Client

        try:
            client = Client(self.url, verbose=False)
            signed = client.predict(self.name, PASSWORD, "load", api_name="/sign_up")
            if "Signed in" not in signed:
                signed = client.predict(self.name, PASSWORD, api_name="/log_in")  # the kill phase: same people
            if "Signed in" not in signed:
                raise RuntimeError(f"could not sign in: {signed}")
            index = -1
            while time.monotonic() < self.deadline:
                if index >= 9:  # keep conversations short: the context stays small
                    client.predict(api_name="/clear")
                    index = -1
                *_, status = client.predict(self.rng.choice(self.prompts), SYSTEM, 0.7, 0.9, self.max_new_tokens, False,
                                            api_name="/send")
                if self._waited(status) or "busy" in (status or ""):
                    self._count("busy" if "busy" in (status or "") else "rate limited")
                    continue
                index += 2
                self._count("replies")
                t = time.perf_counter()
                answer = client.predict(index, self.rng.choice((1, -1)), "", api_name="/vote")
                ms = (time.perf_counter() - t) * 1000
                if "recorded" in (answer or ""):
                    self.recorded += 1
                    self.vote_ms.append(ms)
                elif not self._waited(answer):
                    self._count(f"vote answered: {answer[:60]}")
        except Exception as exc:  # noqa: BLE001 - the kill phase ends every client this way
            self.error = f"{type(exc).__name__}: {str(exc)[:200]}"


def run_users(url: str, names: list[str], prompts: list[str], seconds: float, max_new_tokens: int, seed: int) -> list[User]:
    deadline = time.monotonic() + seconds
    users = [User(url, n, prompts, deadline, max_new_tokens, seed + i) for i, n in enumerate(names)]
    for u in users:
        u.start()
        time.sleep(0.05)  # a sign-up costs one scrypt hash: spread them a little
    return users


def summary(users: list[User], seconds: float) -> dict:
    ms = [x for u in users for x in u.vote_ms]
    outcomes: dict[str, int] = {}
    for u in users:
        for k, v in u.outcomes.items():
            outcomes[k] = outcomes.get(k, 0) + v
    return {"users": len(users), "seconds": round(seconds, 1), "votes_recorded": sum(u.recorded for u in users),
            "vote_ms_p50": percentile(ms, 0.5) if ms else None, "vote_ms_p99": percentile(ms, 0.99) if ms else None,
            "votes_per_s": round(len(ms) / seconds, 2), "outcomes": outcomes,
            "client_errors": sorted({u.error for u in users if u.error})[:10],
            "users_with_errors": sum(1 for u in users if u.error)}


def check_votes(db: Path, users: list[User], exact: bool) -> dict:
    stored = votes_by_user(db)
    lost = {u.name: u.recorded - stored.get(u.name, 0) for u in users if stored.get(u.name, 0) < u.recorded}
    extra = {u.name: stored.get(u.name, 0) - u.recorded for u in users if stored.get(u.name, 0) > u.recorded}
    return {"stored": sum(stored.get(u.name, 0) for u in users), "recorded": sum(u.recorded for u in users),
            "users_with_lost_votes": len(lost), "lost": sum(lost.values()),
            "users_with_extra_votes": len(extra), "extra": sum(extra.values()),
            "ok": not lost and (not extra if exact else True)}


# -- malformed calls ------------------------------------------------------------------


HUGE = "x" * 1_000_000
BAD_VALUES = {"wrong type": {"not": "a string"}, "huge string": HUGE, "unknown index": 10**9, "negative": -7,
              "empty": "", "null": None, "float": 1.5}


def malformed(url: str, db: Path) -> dict:
    """Every named route, called with each bad value in each parameter, signed in and not."""
    from gradio_client import Client

    api = Client(url, verbose=False).view_api(return_format="dict", print_info=False)
    routes = {name: info.get("parameters", []) for name, info in api["named_endpoints"].items()}
    before = counts(db)
    calls, clear, tracebacks, unhandled, crashed, answers = 0, 0, [], [], [], {}
    signed_in = Client(url, verbose=False)
    signed_in.predict("malformed", PASSWORD, "", api_name="/sign_up")
    signed_in.predict("hello", SYSTEM, 0.7, 0.9, 4, False, api_name="/send")
    for label, client in (("signed in", signed_in), ("not signed in", Client(url, verbose=False))):
        for route, params in sorted(routes.items(), key=lambda kv: (kv[0] == "/log_out", kv[0])):  # log-out last: it ends the session
            good = [p.get("example_input", p.get("parameter_default", "")) for p in params]
            variants = [("no arguments", [])] if not params else []
            for i in range(len(params)):
                for what, value in BAD_VALUES.items():
                    args = list(good)
                    args[i] = value
                    variants.append((f"{params[i].get('parameter_name', i)}={what}", args))
            for what, args in variants:
                calls += 1
                try:
                    out = client.predict(*args, api_name=route)
                    text = str(out)
                except Exception as exc:  # noqa: BLE001 - a refusal is the expected answer
                    text = f"{type(exc).__name__}: {exc}"
                if "Traceback" in text or 'File "' in text:
                    tracebacks.append(f"{label} {route} {what}: {text[:200]}")
                elif "has raised an exception" in text or text.strip() in ("", "None", "Error"):
                    unhandled.append(f"{label} {route} {what}: {text[:200]}")  # Gradio's answer to an uncaught exception
                else:
                    clear += 1
                    answers.setdefault(route, set()).add(text[:120])
                try:
                    urllib.request.urlopen(url + "config", timeout=5).close()
                except OSError as exc:
                    crashed.append(f"{label} {route} {what}: app unreachable ({exc})")
                    break
    after = counts(db)
    # the one chat turn above stored no feedback; anything in these tables came from a malformed call
    added = {t: after[t] - before[t] for t in FEEDBACK_TABLES if after[t] != before[t]}
    return {"routes": sorted(routes), "calls": calls, "clear_answers": clear, "tracebacks": tracebacks[:10],
            "n_tracebacks": len(tracebacks), "unhandled": unhandled[:20], "n_unhandled": len(unhandled),
            "app_unreachable": crashed, "feedback_rows_added": added,
            "answers": {r: sorted(a)[:6] for r, a in sorted(answers.items())},
            "ok": not tracebacks and not unhandled and not crashed and not added}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=64)
    ap.add_argument("--minutes", type=float, default=5.0, help="length of the load phase")
    ap.add_argument("--kill-after-s", type=float, default=60.0, help="load before the SIGKILL in the kill phase")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="reply cap the simulated users ask for (kept short: load, not generation)")
    ap.add_argument("--app-args", default="", help="extra arguments for app.py (e.g. '--model PATH --quantize none')")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip", default="", help="comma-separated phases to skip: load, kill, malformed")
    ap.add_argument("--out", default=str(RESULTS / "load.json"))
    ns = ap.parse_args(argv)
    skip = set(filter(None, ns.skip.split(",")))
    prompts = [task_prompt(t) for t in seed_tasks()][:200]
    work = Path(tempfile.mkdtemp(prefix="load-"))
    db, log_path, port = work / "feedback.db", work / "app.log", free_port()
    app_args = ["--no-open", "--db", str(db), "--adapters-dir", str(work / "adapters"), *ns.app_args.split()]
    url = f"http://127.0.0.1:{port}/"
    result = {"machine": machine(), "command": "python bench/load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "users": ns.users, "minutes": ns.minutes, "max_new_tokens": ns.max_new_tokens, "app_args": app_args}
    names = [f"user{i:03d}" for i in range(ns.users)]
    recorded: dict[str, int] = {}  # per user: votes answered "recorded", over the phases so far

    proc = start_app(*app_args, port=port, timeout=300, log_path=log_path)
    try:
        if "load" not in skip:
            print(f"load: {ns.users} users for {ns.minutes} min", flush=True)
            t0 = time.monotonic()
            users = run_users(url, names, prompts, ns.minutes * 60, ns.max_new_tokens, ns.seed)
            for u in users:
                u.join()
            result["load"] = {**summary(users, time.monotonic() - t0), "check": check_votes(db, users, exact=True)}
            recorded.update({u.name: u.recorded for u in users})
            print(f"  {result['load']}", flush=True)
        if "kill" not in skip:
            print(f"kill: SIGKILL after {ns.kill_after_s} s of load", flush=True)
            t0 = time.monotonic()
            users = run_users(url, names, prompts, ns.kill_after_s + 30, ns.max_new_tokens, ns.seed + 1000)
            time.sleep(ns.kill_after_s)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            killed_at = time.monotonic() - t0
            for u in users:
                u.join(timeout=60)
            proc = start_app(*app_args, port=port, timeout=300, log_path=log_path, append=True)
            con = sqlite3.connect(db)
            integrity = con.execute("PRAGMA integrity_check").fetchone()[0]
            con.close()
            for u in users:
                recorded[u.name] = recorded.get(u.name, 0) + u.recorded
            stored = votes_by_user(db)
            lost = {n: r - stored.get(n, 0) for n, r in recorded.items() if stored.get(n, 0) < r}
            check = {"recorded_both_phases": sum(recorded.values()), "stored": sum(stored.get(n, 0) for n in recorded),
                     "users_with_lost_votes": len(lost), "lost": sum(lost.values()), "ok": not lost}
            result["kill"] = {**summary(users, killed_at), "killed_at_s": round(killed_at, 1), "integrity_check": integrity,
                              "check": check, "ok": integrity == "ok" and check["ok"]}
            print(f"  {result['kill']}", flush=True)
        if "malformed" not in skip:
            print("malformed calls", flush=True)
            result["malformed"] = malformed(url, db)
            print(f"  {({k: v for k, v in result['malformed'].items() if k not in ('routes', 'answers')})}", flush=True)
    finally:
        stop_app(proc)
    path = write_results(ns.out, result)
    print(f"wrote {path}")
    return 0 if all(result.get(k, {}).get("ok", True) and result.get(k, {}).get("check", {}).get("ok", True)
                    for k in ("load", "kill", "malformed")) else 1


if __name__ == "__main__":
    raise SystemExit(main())
