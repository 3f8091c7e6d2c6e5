"""End-to-end browser test: the real app (`python app.py`, default model, temp
database) driven through its web page by headless Chromium, then the database read
back to check that what the user did in the page was stored.

One walk through the page, as a user would do it:
  name + profile, Save -> temperature 0 in Settings -> ask a question (Enter) and
  watch the reply stream in -> type a reason, thumbs up (the reason box empties) ->
  edit it through the Chatbot's edit control -> mode Compare, send, see both sides as
  chat messages side by side, pick "A is better", see the adapter versions revealed ->
  send a message full of HTML and check it is shown as text, not run.

A walk in Rank mode, on the tiny model: send, see k replies side by side, give two of
them the same place and be told, fix the places, save, and find the ranking (and how
each reply was sampled and where it was shown) in the database. Then a message with a
Markdown image and an <img> pointing at another host: the browser requests nothing
from it (messages and replies are shown through one function, `ui.safe_markdown`).

A second walk, on the tiny model with two published adapters (v000002 serving, v000001
its parent): open the Dashboard tab, see a wrong password show nothing, log in, see the
version table and the plots, roll back, and see v000001 serve in the dashboard, the chat
status line and the next stored reply.

A walk with accounts on (`--no-open`), on the tiny model: sign up with a profile, log
out, fail to log in with a wrong password, log in, chat, reload the page and find the
log-in and the conversation still there, open a saved conversation whose reply holds
images on a local HTTP server (the server gets no request), reopen the first one and
continue it; the database shows the follow-up in the same conversation.

Needs Debian's Chromium at /usr/bin/chromium (`make browser`); Playwright drives it
through `executable_path`, no Playwright-managed browser is used. Without it the
test is skipped, except under CI=true, where it fails instead.
Run: python -m pytest tests/test_browser.py -q -s
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

from assistant.config import BASE_VERSION, DEFAULT_MODEL
from assistant.model import prepare_default_model
from tests.server import running_app

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
IN_CI = os.environ.get("CI") == "true"

# Generous: the CPU may be slow and shared. Nothing below asserts on timing.
START_S = 120  # page load
REPLY_S = 240  # one reply (or two, side by side) to finish
ACTION_S = 90  # generous: the CPU may be shared with other work

NAME = "Ada Browser"
PROFILE = "QA engineer"
QUESTION = "What is the capital of France?"
WHY = "names the city at once"
EDITED = "Paris is the capital of France, edited by hand."
COMPARE_MSG = "Name one primary colour."
HTML_MSG = '<img src=x onerror="window.__pwned=1"><b>bold?</b>'

BOT = '#chatbot [data-testid="bot"]'
USER = '#chatbot [data-testid="user"]'
BOT_BUTTONS = "#chatbot .message-buttons-left"  # the row of icon buttons under each bot message

# Records every distinct text of the last bot message as the page changes, so the
# test sees the reply grow however fast or slow the tokens arrive.
WATCH_JS = """() => {
  window.__botTexts = [];
  const root = document.querySelector('#chatbot');
  const grab = () => {
    const bots = root.querySelectorAll('[data-testid="bot"]');
    const t = bots.length ? bots[bots.length - 1].innerText.trim() : '';
    const seen = window.__botTexts;
    if (t && seen[seen.length - 1] !== t) seen.push(t);
  };
  if (window.__botObserver) window.__botObserver.disconnect();
  window.__botObserver = new MutationObserver(grab);
  window.__botObserver.observe(root, {subtree: true, childList: true, characterData: true});
}"""


def _require(condition: bool, why: str) -> None:
    """Skip when a browser prerequisite is missing, except under CI, where it fails."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{why} (CI=true: the browser test must run, not be skipped)")
    pytest.skip(why)


def _sync_playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        _require(False, f"playwright is not installed: {exc}")
    return sync_playwright


def _wait_text(page, selector: str, text: str, timeout_s: float = ACTION_S) -> None:
    """Wait until the element at `selector` contains `text`."""
    page.wait_for_function(
        "([sel, text]) => { const el = document.querySelector(sel); return !!el && el.innerText.includes(text); }",
        arg=[selector, text], timeout=timeout_s * 1000,
    )


def _wait_reply_done(page, n_bots: int, timeout_s: float = REPLY_S) -> str:
    """Wait for the `n_bots`-th bot message to be complete (its Edit button turns
    enabled once the event has finished) and return its text."""
    page.wait_for_function(
        """([botSel, rowSel, n]) => {
            const bots = document.querySelectorAll(botSel);
            const rows = document.querySelectorAll(rowSel);
            if (bots.length < n || rows.length < n) return false;
            const edit = rows[n - 1].querySelector('button[aria-label="Edit"]');
            return !!edit && !edit.disabled && bots[n - 1].innerText.trim().length > 0;
        }""",
        arg=[BOT, BOT_BUTTONS, n_bots], timeout=timeout_s * 1000,
    )
    return page.locator(BOT).nth(n_bots - 1).inner_text().strip()


def _send(page, text: str, *, enter: bool = False) -> None:
    box = page.locator("#message textarea")
    box.fill(text)
    if enter:
        box.press("Enter")
    else:
        page.locator("#send").click()


def _db_rows(db_path: Path, sql: str, *params) -> list[sqlite3.Row]:
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        con.row_factory = sqlite3.Row
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def _toasts(page) -> str:
    try:
        return " | ".join(t.strip() for t in page.locator(".toast-body").all_inner_texts())
    except Exception:  # noqa: BLE001 - best effort, only for a failure message
        return ""


@pytest.mark.e2e
def _in_browser(app_args: tuple, tmp_path: Path, log_path: Path, walk, shot_name: str) -> None:
    """Start the app with `app_args`, open it in headless Chromium and run `walk(page, url)`;
    on failure print a screenshot path, the toasts, page errors and the app log's tail."""
    sync_playwright = _sync_playwright()
    with running_app(*app_args, log_path=log_path) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.set_default_timeout(ACTION_S * 1000)
        console_errors: list[str] = []
        page.on("pageerror", lambda exc: console_errors.append(str(exc)))
        try:
            walk(page, url)
            page.screenshot(path=str(tmp_path / shot_name), full_page=True)
            assert not console_errors, console_errors
        except BaseException:
            shot = tmp_path / "failure.png"
            try:
                page.screenshot(path=str(shot), full_page=True)
            except Exception:  # noqa: BLE001 - the page may be gone; the log still helps
                pass
            print(f"\n[browser test] screenshot: {shot}\n[browser test] toasts: {_toasts(page)}"
                  f"\n[browser test] page errors: {console_errors}"
                  f"\n[browser test] app log ({log_path}), last lines:\n{log_path.read_text()[-3000:]}")
            raise
        finally:
            browser.close()


def test_chat_feedback_in_browser(tmp_path):
    _require(CHROMIUM.exists(), f"no Chromium at {CHROMIUM} (install it with `make browser`)")
    prepare_default_model(REPO / "data" / "models")
    db_path = tmp_path / "feedback.db"
    args = ("--db", str(db_path), "--adapters-dir", str(tmp_path / "adapters"), "--max-new-tokens", "24")

    def walk(page, url):
        _walk_through(page, url)
        _check_database(db_path)

    _in_browser(args, tmp_path, tmp_path / "app.log", walk, "final.png")


def _walk_through(page, url: str) -> None:
    page.goto(url)
    page.locator("#message textarea").wait_for(state="visible", timeout=START_S * 1000)

    # -- who gives the feedback
    page.locator("#user-name textarea, #user-name input").first.fill(NAME)
    page.locator("#user-profile textarea, #user-profile input").first.fill(PROFILE)
    page.locator("#save-user").click()
    _wait_text(page, "#status", f"Giving feedback as {NAME}")

    # -- greedy decoding, so the reply is the model's deterministic one
    page.get_by_text("Settings", exact=True).first.click()
    temperature = page.get_by_label("number input for Temperature (0 = greedy)")
    temperature.wait_for(state="visible", timeout=START_S * 1000)
    slider_is_zero = "() => document.querySelector('input[aria-label=\"range slider for Temperature (0 = greedy)\"]').value === '0'"
    for attempt in range(5):  # on a loaded machine the first edit can land before the accordion has settled
        temperature.fill("0")
        temperature.press("Enter")
        temperature.blur()
        try:
            page.wait_for_function(slider_is_zero, timeout=20_000)
            break
        except Exception as exc:  # playwright's TimeoutError; the import is optional at module level
            if attempt == 4 or "Timeout" not in type(exc).__name__:
                raise
    # the range shows 0 before the component's value may have caught up (the server then still
    # gets 0.7); an input event on the range itself, as a drag sends, makes the value 0
    page.evaluate(SLIDER_INPUT_JS, "range slider for Temperature (0 = greedy)")
    page.wait_for_function(slider_is_zero, timeout=20_000)

    # -- ask; the reply streams into the chatbot
    page.evaluate(WATCH_JS)
    _send(page, QUESTION, enter=True)
    page.locator(USER).first.wait_for(timeout=ACTION_S * 1000)
    assert QUESTION in page.locator(USER).first.inner_text()
    reply = _wait_reply_done(page, 1)
    assert "Paris" in reply, f"greedy reply to {QUESTION!r} was {reply!r}"
    texts = page.evaluate("window.__botTexts")
    assert texts and texts[-1] == reply, texts
    partial = [t for t in texts[:-1] if reply.startswith(t) and t != reply]
    assert partial, f"the reply did not grow while streaming; texts seen: {texts}"
    assert page.locator("#message textarea").input_value() == "", "the message box was not cleared"

    # -- thumbs up on the reply, with a reason; the reason box empties so it cannot stick to the next vote
    page.locator("#reason textarea").fill(WHY)
    first_buttons = page.locator(BOT_BUTTONS).nth(0)
    first_buttons.locator('button[aria-label="Like"]').click()
    _wait_text(page, "#status", "recorded")
    assert "👍" in page.inner_text("#status")
    page.wait_for_function("() => document.querySelector('#reason textarea').value === ''")

    # -- edit the reply through the Chatbot's own edit control
    first_buttons.locator('button[aria-label="Edit"]').click()
    editor = page.locator("#chatbot textarea.edit-textarea")
    editor.wait_for(state="visible")
    editor.fill(EDITED)
    page.locator('#chatbot button[aria-label="Submit"]').click()
    _wait_text(page, "#status", "Correction saved")
    page.wait_for_function(
        "([sel, text]) => { const b = document.querySelectorAll(sel); return b.length === 1 && b[0].innerText.trim() === text; }",
        arg=[BOT, EDITED],
    )

    # -- side-by-side comparison: two replies shown as chat messages, pick A, the versions are revealed
    page.locator('#mode input[value="compare"]').check()
    _send(page, COMPARE_MSG)
    _wait_text(page, "#status", "Which reply is better?", REPLY_S)
    for side in ("#reply-a", "#reply-b"):
        assert page.locator(f'{side} [data-testid="bot"]').inner_text().strip(), f"{side} stayed empty"
    for button in ("#pick-a", "#pick-b", "#pick-tie", "#pick-both-bad"):
        assert page.locator(button).is_visible(), f"{button} is not visible"
    box_a, box_b = page.locator("#reply-a").bounding_box(), page.locator("#reply-b").bounding_box()
    assert abs(box_a["width"] - box_b["width"]) < 2 and abs(box_a["y"] - box_b["y"]) < 2, (box_a, box_b)  # side by side, same width
    assert box_b["x"] >= box_a["x"] + box_a["width"] - 2, (box_a, box_b)
    chosen = page.locator('#reply-a [data-testid="bot"]').inner_text().strip()
    page.locator("#pick-a").click()
    _wait_text(page, "#status", "A came from adapter")
    status = page.inner_text("#status")
    assert f"A came from adapter {BASE_VERSION}" in status and f"B from {BASE_VERSION}" in status, status
    page.locator("#compare-row").wait_for(state="hidden")
    assert page.locator(BOT).last.inner_text().strip() == chosen, "the chosen reply does not continue the chat"
    n_bots = page.locator(BOT).count()

    # -- markup in a message is shown as text, never executed
    page.locator('#mode input[value="chat"]').check()
    _send(page, HTML_MSG)
    page.wait_for_function(
        "([sel, n]) => document.querySelectorAll(sel).length >= n", arg=[USER, 3],
    )
    _wait_reply_done(page, n_bots + 1)
    shown = page.locator(USER).last.inner_text()
    assert "<b>bold?</b>" in shown, f"the literal markup is not shown: {shown!r}"
    assert "<img src=x" in shown, shown
    assert page.evaluate("typeof window.__pwned") == "undefined", "a script in a message ran"
    assert page.locator("#chatbot img[src='x']").count() == 0, "an <img> from a message was rendered"
    assert page.locator("#chatbot b", has_text="bold?").count() == 0, "a <b> from a message was rendered"


SLIDER_INPUT_JS = """(label) => {
    const r = document.querySelector(`input[aria-label="${label}"]`);
    r.value = '0';
    r.dispatchEvent(new Event('input', {bubbles: true}));
    r.dispatchEvent(new Event('change', {bubbles: true}));
}"""


def _check_database(db_path: Path) -> None:
    users = _db_rows(db_path, "SELECT id, name, profile FROM users WHERE name = ?", NAME)
    assert len(users) == 1, users
    assert users[0]["profile"] == PROFILE
    user_id = users[0]["id"]

    replies = _db_rows(db_path, "SELECT * FROM replies ORDER BY id")
    assert len(replies) >= 4, f"expected chat + 2 compared + html replies, got {len(replies)}"
    for r in replies:
        assert r["adapter_version"] == BASE_VERSION, dict(r)
        assert r["model"] == DEFAULT_MODEL, dict(r)
        assert r["prompt_tokens"] > 0 and r["completion_tokens"] > 0, dict(r)
        assert r["latency_ms"] > 0, dict(r)
        assert r["finish_reason"], dict(r)

    # the first reply: voted up, then corrected; the original text is unchanged
    first = replies[0]
    assert first["source"] == "chat"
    assert "Paris" in first["text"], first["text"]
    assert first["text"].strip() != EDITED
    votes = _db_rows(db_path, "SELECT * FROM votes WHERE reply_id = ? AND user_id = ?", first["id"], user_id)
    assert len(votes) == 1 and votes[0]["value"] == 1 and votes[0]["reason"] == WHY, [dict(v) for v in votes]
    corrections = _db_rows(db_path, "SELECT * FROM corrections")
    assert len(corrections) == 1, [dict(c) for c in corrections]
    assert corrections[0]["text"] == EDITED
    assert corrections[0]["reply_id"] == first["id"]
    assert corrections[0]["user_id"] == user_id

    # the comparison: two distinct stored replies to the same context, A chosen
    comparisons = _db_rows(db_path, "SELECT * FROM comparisons")
    assert len(comparisons) == 1, [dict(c) for c in comparisons]
    c = comparisons[0]
    assert c["choice"] == "a" and c["user_id"] == user_id
    by_id = {r["id"]: r for r in replies}
    a, b = by_id[c["reply_a_id"]], by_id[c["reply_b_id"]]
    assert a["source"] == b["source"] == "compare"
    assert a["context"] == b["context"]
    pa, pb = json.loads(a["params"]), json.loads(b["params"])
    assert (pa["side"], pb["side"]) == ("A", "B") and pa["variant"] == pb["variant"] == "temperature-spread", (pa, pb)
    assert pa["user_temperature"] == pb["user_temperature"] == 0 and {pa["temperature"], pb["temperature"]} == {0, 0.3}, (pa, pb)
    assert EDITED in a["context"], "the compared replies do not continue from the edited reply"

    # the HTML message was stored as sent
    messages = _db_rows(db_path, "SELECT content FROM messages WHERE role = 'user' ORDER BY id")
    assert [m["content"] for m in messages][-1] == HTML_MSG


# -- Rank mode ------------------------------------------------------------------------------

RANK_MSG = "Rank these replies."
RANK_K = 3


@pytest.mark.e2e
def test_rank_replies_in_browser(tmp_path, tiny_dir):
    _require(CHROMIUM.exists(), f"no Chromium at {CHROMIUM} (install it with `make browser`)")
    db_path = tmp_path / "feedback.db"
    log_path = tmp_path / "app.log"
    args = ("--model", str(tiny_dir), "--db", str(db_path), "--adapters-dir", str(tmp_path / "adapters"),
            "--max-new-tokens", "8", "--rank-k", str(RANK_K))

    def walk(page, url):
        _rank_walk_through(page, url)
        _check_ranking(db_path)
        _remote_images_not_loaded(page)

    _in_browser(args, tmp_path, log_path, walk, "rank.png")


def _place(page, reply: int, label: str) -> None:
    page.locator(f"#rank-place-{reply}").get_by_text(label, exact=True).click()


def _rank_walk_through(page, url: str) -> None:
    page.goto(url)
    page.locator("#message textarea").wait_for(state="visible", timeout=START_S * 1000)
    page.locator("#user-name textarea, #user-name input").first.fill(NAME)
    page.locator("#save-user").click()
    _wait_text(page, "#status", f"Giving feedback as {NAME}")

    # -- Rank mode: k replies to one message, side by side
    page.locator('#mode input[value="rank"]').check()
    _send(page, RANK_MSG)
    _wait_text(page, "#status", f"Put the {RANK_K} replies in order", REPLY_S)
    boxes = [page.locator(f"#rank-reply-{i}").bounding_box() for i in range(1, RANK_K + 1)]
    assert all(b and abs(b["y"] - boxes[0]["y"]) < 2 and abs(b["width"] - boxes[0]["width"]) < 2 for b in boxes), boxes
    assert page.locator("#compare-row").is_hidden()

    # -- two replies in one place is refused, and nothing is stored
    _place(page, 1, "1st (best)")
    _place(page, 2, "1st (best)")
    _place(page, 3, "3rd (worst)")
    page.locator("#rank-save").click()
    page.locator(".toast-body", has_text="Each place goes to one reply").first.wait_for()
    assert page.locator("#rank-row").is_visible()

    # -- reply 3 is best, then reply 1, then reply 2
    _place(page, 1, "2nd")
    _place(page, 2, "3rd (worst)")
    _place(page, 3, "1st (best)")
    page.locator("#rank-save").click()
    _wait_text(page, "#status", "Ranking saved: reply 3 > 1 > 2 (3 preference pairs)")
    page.locator("#rank-row").wait_for(state="hidden")
    for i in range(1, RANK_K + 1):  # the places are cleared for the next ranking
        assert page.locator(f"#rank-place-{i} input:checked").count() == 0


def _check_ranking(db_path: Path) -> None:
    [user] = _db_rows(db_path, "SELECT id FROM users WHERE name = ?", NAME)
    rankings = _wait_rows(db_path, "SELECT * FROM rankings", 1)
    assert len(rankings) == 1 and rankings[0]["user_id"] == user["id"], [dict(r) for r in rankings]
    reply_ids = json.loads(rankings[0]["reply_ids"])
    by_id = {r["id"]: r for r in _db_rows(db_path, "SELECT * FROM replies")}
    assert len(reply_ids) == RANK_K and set(reply_ids) == set(by_id), (reply_ids, list(by_id))
    ranked = [by_id[i] for i in reply_ids]
    assert {r["source"] for r in ranked} == {"rank"} and len({r["context"] for r in ranked}) == 1
    assert RANK_MSG in ranked[0]["context"]
    params = [json.loads(r["params"]) for r in ranked]
    assert [p["position"] for p in params] == [3, 1, 2], params  # best first: shown 3rd, then 1st, then 2nd
    assert {p["variant"] for p in params} == {"temperature-spread"}, params
    assert sorted(p["temperature"] for p in params) == [0.4, 0.7, 1.0] and {p["user_temperature"] for p in params} == {0.7}, params
    assert _db_rows(db_path, "SELECT COUNT(*) AS n FROM comparisons")[0]["n"] == 0  # the refused attempt stored nothing


LEAK_HOST = "leak.invalid"
IMAGE_MSG = f'Look: ![chart](http://{LEAK_HOST}/md?q=secret) and <img src="http://{LEAK_HOST}/html">'


def _remote_images_not_loaded(page) -> None:
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url) if LEAK_HOST in request.url else None)
    page.locator('#mode input[value="chat"]').check()
    n_users = page.locator(USER).count()
    _send(page, IMAGE_MSG)
    page.wait_for_function(
        "([sel, n]) => { const users = document.querySelectorAll(sel); return users.length > n && users[n].innerText.includes('Look:'); }",
        arg=[USER, n_users],
    )
    page.wait_for_timeout(1000)  # time for any image request to start
    assert page.locator(f"#chatbot img[src*='{LEAK_HOST}']").count() == 0, "an image from a message was rendered"
    assert requested == [], f"the page requested {requested}"
    shown = page.locator(USER).last.inner_text()
    assert "!chart" in shown and f'<img src="http://{LEAK_HOST}/html">' in shown, shown  # shown as text and a link


# -- the administrators' dashboard ---------------------------------------------------------

ADMIN_PASSWORD = "dashboard-e2e-secret"
PPO_METRICS = [{"iteration": i, "objective/scores": 0.1 * i, "objective/kl": 0.02 * i} for i in (1, 2, 3)]


def _dashboard_files(tmp_path: Path, trained_peft) -> dict[str, Path]:
    """Two published versions, v000002 serving with v000001 (retired) its parent; a reward-model
    manifest; and some feedback on replies of both versions."""
    from assistant.adapters import promote, publish
    from assistant.feedback import FeedbackStore

    files = {name: tmp_path / name for name in ("adapters", "reward", "feedback.db", "trainer.lock", "cycles.jsonl")}
    adir = files["adapters"]
    v1 = publish(adir, trained_peft(seed=1), "default", {"parent": BASE_VERSION, "reward_model": "r000001", "metrics": PPO_METRICS})
    v2 = publish(adir, trained_peft(seed=2), "default", {"parent": v1, "reward_model": "r000001", "metrics": PPO_METRICS[:2]})
    promote(adir, v1)
    promote(adir, v2, evaluation={"margin": 0.125, "kl": 0.75, "degenerate": 0})
    (files["reward"] / "r000001").mkdir(parents=True)
    (files["reward"] / "r000001" / "manifest.json").write_text(json.dumps({
        "version": "r000001", "created_at": "2025-03-01T10:00:00Z",
        "metrics": {"val_accuracy": 0.62, "val_accuracy_lo": 0.55, "val_accuracy_hi": 0.69, "train_accuracy": 0.8},
    }))
    with FeedbackStore(files["feedback.db"]) as store:
        uid = store.ensure_user("earlier user")
        cid = store.new_conversation(uid)
        replies = [store.add_reply(conversation_id=cid, context=[{"role": "user", "content": "hi"}], text=f"hello from {v}",
                                   params={}, model="tiny", adapter_version=v, prompt_tokens=1, completion_tokens=2,
                                   latency_ms=3.0, ttft_ms=1.0, finish_reason="stop", source="compare") for v in (v1, v2)]
        store.set_vote(replies[0], uid, 1)
        store.set_vote(replies[1], uid, -1)
        store.add_comparison(replies[0], replies[1], "b", uid)
    return files


@pytest.mark.e2e
def test_dashboard_login_and_rollback_in_browser(tmp_path, tiny_dir, trained_peft):
    _require(CHROMIUM.exists(), f"no Chromium at {CHROMIUM} (install it with `make browser`)")
    files = _dashboard_files(tmp_path, trained_peft)
    log_path = tmp_path / "app.log"
    password_file = tmp_path / "admin-password"  # never on the command line
    password_file.write_text(ADMIN_PASSWORD + "\n")
    password_file.chmod(0o600)
    args = ("--model", str(tiny_dir), "--db", str(files["feedback.db"]), "--adapters-dir", str(files["adapters"]),
            "--reward-dir", str(files["reward"]), "--lock-file", str(files["trainer.lock"]),
            "--cycles-log", str(files["cycles.jsonl"]), "--admin-password-file", str(password_file), "--max-new-tokens", "8")

    def walk(page, url):
        _dashboard_walk_through(page, url)
        replies = _wait_rows(files["feedback.db"], "SELECT adapter_version FROM replies ORDER BY id", 3)
        assert replies[-1]["adapter_version"] == "v000001", [dict(r) for r in replies]

    _in_browser(args, tmp_path, log_path, walk, "dashboard.png")


def _dashboard_walk_through(page, url: str) -> None:
    page.goto(url)
    page.locator("#message textarea").wait_for(state="visible", timeout=START_S * 1000)
    page.get_by_role("tab", name="Dashboard").click()
    password = page.locator("#admin-password input")
    password.wait_for(state="visible")

    # -- a wrong password shows nothing
    password.fill("not the password")
    page.locator("#admin-login").click()
    _wait_text(page, "#admin-login-status", "Wrong password")
    assert not page.locator("#versions-table").is_visible(), "the version table shows without logging in"
    assert not page.locator("#rollback").is_visible()

    # -- the right one shows what is serving, the version table and the plots
    password.fill(ADMIN_PASSWORD)
    page.locator("#admin-login").click()
    _wait_text(page, "#admin-login-status", "Logged in")
    _wait_text(page, "#serving-version", "Serving: v000002")
    _wait_text(page, "#versions-table", "v000001")
    table = page.inner_text("#versions-table")
    for text in ("v000002", "active", "retired", "serving", "+0.125"):
        assert text in table, f"{text!r} missing from the version table:\n{table}"
    for plot in ("#plot-feedback-time", "#plot-feedback-version", "#plot-thumbs-up", "#plot-win-rate",
                 "#plot-ppo-reward", "#plot-ppo-kl", "#plot-reward-accuracy"):
        page.locator(f"{plot} canvas, {plot} svg.marks").first.wait_for(state="visible")
    assert page.locator("#rollback-version input").input_value() == "v000001", "the rollback default is not the parent"

    # -- roll back: the server swaps to v000001 at once
    page.locator("#rollback").click()
    _wait_text(page, "#admin-message", "now serving v000001")
    _wait_text(page, "#serving-version", "Serving: v000001")

    # -- the chat tab serves v000001 too, and a new reply is recorded under it
    page.get_by_role("tab", name="Chat").click()
    page.locator("#user-name textarea, #user-name input").first.fill(NAME)
    page.locator("#save-user").click()
    _wait_text(page, "#status", "serving adapter v000001")
    _send(page, "hello")
    page.locator(USER).first.wait_for()


def _wait_rows(db_path: Path, sql: str, n: int, timeout_s: float = REPLY_S) -> list[sqlite3.Row]:
    """Poll until `sql` returns at least `n` rows (the tiny model's reply may be blank on screen)."""
    deadline = time.monotonic() + timeout_s
    while len(rows := _db_rows(db_path, sql)) < n:
        assert time.monotonic() < deadline, f"fewer than {n} rows from {sql!r} after {timeout_s}s: {[dict(r) for r in rows]}"
        time.sleep(0.5)
    return rows


# -- accounts and saved conversations ----------------------------------------------------------

ACCOUNT = "Grace Browser"
ACCOUNT_PASSWORD = "browser-e2e-password"
FIRST_MSG = "Remember this conversation."
FOLLOW_UP = "And continue it after a reload."
SEEDED_TITLE = "Show me a chart"


class _ImageHost:
    """A tiny local HTTP server that records every request it gets: the host a reply's
    image points at. The page must never fetch from it."""

    def __init__(self):
        import http.server

        self.requests: list[str] = []
        seen = self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server API
                seen.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        import threading

        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.e2e
def test_accounts_and_saved_conversations_in_browser(tmp_path, tiny_dir):
    _require(CHROMIUM.exists(), f"no Chromium at {CHROMIUM} (install it with `make browser`)")
    db_path = tmp_path / "feedback.db"
    args = ("--model", str(tiny_dir), "--db", str(db_path), "--adapters-dir", str(tmp_path / "adapters"),
            "--max-new-tokens", "8", "--no-open")
    host = _ImageHost()
    try:
        _in_browser(args, tmp_path, tmp_path / "app.log", lambda page, url: _accounts_walk(page, url, db_path, host), "accounts.png")
    finally:
        host.close()


def _field(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def _seed_image_conversation(db_path: Path, host: _ImageHost) -> str:
    """A saved conversation of ACCOUNT whose stored reply shows an image from `host`, written
    the way the app saves one (a stored reply and the transcript that points at it)."""
    from assistant.feedback import FeedbackStore

    text = f"Here it is: ![]({host.url}/x.png) and ![chart]({host.url}/chart.png)"
    with FeedbackStore(db_path) as store:
        uid = store.credential(ACCOUNT)[0]
        cid = store.new_conversation(uid, "You are a helpful assistant.")
        store.add_message(cid, "user", SEEDED_TITLE)
        context = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": SEEDED_TITLE}]
        rid = store.add_reply(conversation_id=cid, context=context, text=text, params={}, model="tiny", adapter_version=BASE_VERSION,
                              prompt_tokens=1, completion_tokens=1, latency_ms=1.0, ttft_ms=1.0, finish_reason="eos")
        store.save_conversation_state(cid, uid, SEEDED_TITLE, {"turns": [
            {"role": "user", "content": SEEDED_TITLE, "reply_id": None, "note": "", "version": ""},
            {"role": "assistant", "content": text, "reply_id": rid, "note": "", "version": BASE_VERSION}],
            "pending": None, "ranking": None})
    return cid


def _accounts_walk(page, url: str, db_path: Path, host: _ImageHost) -> None:
    page.goto(url)
    _field(page, "account-name").wait_for(state="visible", timeout=START_S * 1000)
    assert page.locator("#user-name").count() == 0, "the open-mode name box is shown in accounts mode"

    # -- sign up (with a profile), log out, log in again
    _field(page, "account-name").fill(ACCOUNT)
    _field(page, "account-password").fill(ACCOUNT_PASSWORD)
    _field(page, "user-profile").fill(PROFILE)
    page.locator("#sign-up").click()
    _wait_text(page, "#status", f"Signed in as {ACCOUNT}")
    page.locator("#login-row").wait_for(state="hidden")
    assert _field(page, "profile-edit").input_value() == PROFILE
    page.locator("#log-out").click()
    _wait_text(page, "#status", "Logged out")
    _field(page, "account-password").wait_for(state="visible")
    _field(page, "account-name").fill(ACCOUNT)
    _field(page, "account-password").fill("a wrong password")
    page.locator("#log-in").click()
    _wait_text(page, "#status", "Wrong name or password")
    _field(page, "account-password").fill(ACCOUNT_PASSWORD)
    page.locator("#log-in").click()
    _wait_text(page, "#status", f"Signed in as {ACCOUNT}")

    # -- chat; the conversation is listed under its first message
    _send(page, FIRST_MSG)
    _wait_text(page, USER, FIRST_MSG)
    [reply] = _wait_rows(db_path, "SELECT id, conversation_id FROM replies", 1)
    _wait_text(page, "#conversations", FIRST_MSG)

    # -- a reload keeps the log-in and shows the conversation again
    page.reload()
    _wait_text(page, "#status", f"Signed in as {ACCOUNT}", START_S)
    _wait_text(page, USER, FIRST_MSG)
    _wait_text(page, "#conversations", FIRST_MSG)
    assert page.locator("#login-row").is_hidden()

    # -- a saved reply with remote images: shown, and nothing fetched from their host
    _seed_image_conversation(db_path, host)
    page.locator("#clear").click()
    page.wait_for_function("(sel) => document.querySelectorAll(sel).length === 0", arg=USER)
    _wait_text(page, "#conversations", SEEDED_TITLE)
    page.locator("#conversations").get_by_text(SEEDED_TITLE).click()
    _wait_text(page, "#status", "reopened")
    _wait_text(page, BOT, "Here it is:")
    page.wait_for_timeout(1500)  # time for any image request to start
    assert page.locator(f"#chatbot img[src*='{host.url}']").count() == 0, "an image from a reply was rendered"
    assert host.requests == [], f"the page fetched {host.requests} from the reply's image host"

    # -- reopen the first conversation and continue it
    page.locator("#conversations").get_by_text(FIRST_MSG).click()
    _wait_text(page, USER, FIRST_MSG)
    _send(page, FOLLOW_UP)
    rows = _wait_rows(db_path, "SELECT conversation_id, context FROM replies WHERE context LIKE '%continue it after%'", 1)
    assert rows[0]["conversation_id"] == reply["conversation_id"], "the follow-up went to another conversation"
    context = json.loads(rows[0]["context"])
    assert [m["content"] for m in context if m["role"] == "user"] == [FIRST_MSG, FOLLOW_UP], context
    [user] = _db_rows(db_path, "SELECT id, profile FROM users WHERE name = ?", ACCOUNT)
    assert user["profile"] == PROFILE
    [state] = _wait_rows(db_path, f"SELECT state FROM conversation_states WHERE conversation_id = '{reply['conversation_id']}' "
                                  "AND state LIKE '%continue it after%' AND state LIKE '%\"version\": \"base\"%'", 1)
    turns = json.loads(state["state"])["turns"]
    assert [t["role"] for t in turns][:3] == ["user", "assistant", "user"] and turns[1]["reply_id"] == reply["id"], turns
    assert len(_db_rows(db_path, "SELECT 1 FROM conversation_states WHERE user_id = ?", user["id"])) == 2
