"""16 real clients (gradio_client) chat and vote at once against the running app."""

from __future__ import annotations

import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from gradio_client import Client

from assistant.model import prepare_default_model
from tests.server import ROOT, running_app

pytestmark = pytest.mark.e2e

CLIENTS = 16
SEED_TASKS = ROOT.parent / "shared" / "data" / "seed-tasks.jsonl"


def prompts(n: int) -> list[str]:
    if SEED_TASKS.exists():
        rows = [json.loads(line) for line in SEED_TASKS.read_text().splitlines()[:n]]
        return [r["instruction"] for r in rows]
    return [f"Give me one fact about the number {i}." for i in range(n)]


def one_client(url: str, i: int, prompt: str) -> dict:
    client = Client(url, verbose=False)
    client.predict(f"user{i:02d}", "load test", api_name="/set_user")
    outputs = client.submit(prompt, "You are a helpful assistant.", 0.7, 0.9, 12, False, api_name="/send").result()
    chat = outputs[0]
    # Vote up, then change the vote; odd clients end on a down vote.
    client.predict(1, 1, "first thought", api_name="/vote")
    final = -1 if i % 2 else 1
    client.predict(1, final, f"final from {i}", api_name="/vote")
    return {"user": f"user{i:02d}", "prompt": prompt, "final": final, "messages": len(chat)}


def test_sixteen_clients_chat_and_vote_at_once(tmp_path: Path):
    prepare_default_model(ROOT / "data" / "models")
    db = tmp_path / "feedback.db"
    with running_app("--db", str(db), "--adapters-dir", str(tmp_path / "adapters"), "--max-batch", "8") as url:
        work = prompts(CLIENTS)
        with ThreadPoolExecutor(CLIENTS) as pool:
            results = list(pool.map(lambda a: one_client(url, *a), enumerate(work)))

    assert all(r["messages"] == 2 for r in results)
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    votes = con.execute(
        "SELECT u.name, v.value, v.reason, r.context FROM votes v JOIN users u ON u.id = v.user_id JOIN replies r ON r.id = v.reply_id"
    ).fetchall()
    assert len(votes) == CLIENTS  # one row per (reply, user): the change updated it
    assert con.execute("SELECT COUNT(*) FROM vote_events").fetchone()[0] == 2 * CLIENTS
    by_user = {v["name"]: v for v in votes}
    for r in results:
        v = by_user[r["user"]]
        assert v["value"] == r["final"]
        assert v["reason"] == f"final from {int(r['user'][4:])}"
        # No state mixed between sessions: the voted reply answers this client's own prompt.
        context = json.loads(v["context"])
        assert context[-1] == {"role": "user", "content": r["prompt"]}
    assert con.execute("SELECT COUNT(*) FROM replies").fetchone()[0] == CLIENTS
    assert con.execute("SELECT COUNT(DISTINCT conversation_id) FROM replies").fetchone()[0] == CLIENTS
