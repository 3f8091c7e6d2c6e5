"""Accounts, rate limits and saved conversations: who feedback is from, how often it may
come, and what is kept of a conversation.

Password hashing and the log-in back-off are checked on their own; the UI handlers are
called directly (tiny model, accounts mode) to show that feedback is stored only under
the signed-in user, that limits hold and say so, and that a conversation reopens into a
session that continues it; finally the real app runs with accounts on and three
`gradio_client` clients try to vote as each other.

Run: python -m pytest tests/test_accounts.py -q
"""

from __future__ import annotations

import datetime
import io
import json
import sqlite3
import threading

import pytest

from assistant import accounts as acc
from assistant import ui
from assistant.accounts import AccountError, Accounts, Backoff
from assistant.chat import Engine
from assistant.config import ModelArgs, ServeArgs
from assistant.feedback import FeedbackError, FeedbackStore
from assistant.limits import Limits, TokenBuckets, too_many
from assistant.model import build_policy
from tests.server import running_app
from tests.tiny import save_tiny_model

PASSWORD = "correct horse"


class Clock:
    """A settable clock: `now()` for datetimes, `mono()` for seconds."""

    def __init__(self):
        self.t = 0.0
        self.start = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)

    def now(self) -> datetime.datetime:
        return self.start + datetime.timedelta(seconds=self.t)

    def mono(self) -> float:
        return self.t


@pytest.fixture
def store(tmp_path):
    with FeedbackStore(tmp_path / "feedback.db") as s:
        yield s


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def accounts(store, clock):
    return Accounts(store, session_hours=1, backoff=Backoff(clock=clock.mono), clock=clock.now)


# -- passwords -----------------------------------------------------------------------


def test_a_password_is_stored_as_a_salted_scrypt_hash_with_its_parameters():
    first, second = acc.hash_password("hunter2!"), acc.hash_password("hunter2!")
    scheme, n, r, p, salt, digest = first.split("$")
    assert (scheme, int(n), int(r), int(p)) == ("scrypt", 2**14, 8, 1)
    assert len(acc.base64.b64decode(salt)) == 16 and len(acc.base64.b64decode(digest)) == 32
    assert first != second  # a fresh salt each time
    assert acc.verify_password("hunter2!", first) and acc.verify_password("hunter2!", second)
    assert not acc.verify_password("hunter2?", first)
    assert not acc.needs_rehash(first) and acc.needs_rehash(acc.hash_password("x", n=2**10))


def test_a_weaker_hash_is_replaced_at_the_next_log_in(accounts, store):
    user = store.ensure_user("ada")
    store.set_password_hash(user, acc.hash_password(PASSWORD, n=2**10), end_logins=False)
    accounts.log_in("ada", PASSWORD)
    assert store.credential("ada")[1].startswith(f"scrypt${2**14}$8$1$")
    accounts.log_in("ada", PASSWORD)  # and the new hash works


def test_only_the_digest_of_a_session_token_is_stored(accounts, store):
    account, token = accounts.sign_up("ada", PASSWORD, "physician")
    rows = store.db().execute("SELECT token_sha256, user_id FROM logins").fetchall()
    assert [tuple(r) for r in rows] == [(acc.token_digest(token), account.user_id)]
    dumped = "\n".join(store.db().conn.iterdump())
    assert token not in dumped and PASSWORD not in dumped
    assert accounts.account(token) == acc.Account(account.user_id, "ada", "physician", None)


# -- sign-up and log-in ---------------------------------------------------------------


@pytest.mark.parametrize("name, password, message", [
    ("", PASSWORD, "Enter a name"), ("x" * 101, PASSWORD, "at most 100"), ("ada", "short", "at least 8"),
    ("import", PASSWORD, "reserved"),
])
def test_sign_up_refuses_bad_names_and_passwords_with_a_reason(accounts, store, name, password, message):
    with pytest.raises(AccountError, match=message):
        accounts.sign_up(name, password)
    assert store.counts()["users"] == 0


def test_a_taken_name_and_a_name_with_old_feedback_are_refused(accounts, store):
    accounts.sign_up("ada", PASSWORD)
    with pytest.raises(AccountError, match="taken"):
        accounts.sign_up(" ada ", "another password")
    store.ensure_user("bob")  # feedback from open mode, no password
    with pytest.raises(AccountError, match="set-password 'bob'"):
        accounts.sign_up("bob", PASSWORD)
    assert store.credential("bob") == (store.ensure_user("bob"), None)


def test_a_wrong_password_and_an_unknown_name_fail_alike(accounts):
    accounts.sign_up("ada", PASSWORD)
    with pytest.raises(AccountError) as wrong:
        accounts.log_in("ada", "not the password")
    with pytest.raises(AccountError) as unknown:
        accounts.log_in("nobody", "not the password")
    assert str(wrong.value) == str(unknown.value) == acc.WRONG
    account, token = accounts.log_in(" ada ", PASSWORD)
    assert account.name == "ada" and accounts.account(token).user_id == account.user_id


def test_failed_log_ins_back_off_per_name_even_for_the_right_password(accounts, clock):
    accounts.sign_up("ada", PASSWORD)
    for _ in range(acc.FREE_FAILURES - 1):
        with pytest.raises(AccountError, match=r"^Wrong name or password\.$"):
            accounts.log_in("ada", "guess")
    with pytest.raises(AccountError, match=r"Too many failed log-ins: try again in 1 s"):
        accounts.log_in("ada", "guess")  # the 5th: from now on each try waits
    with pytest.raises(AccountError, match="try again in 1 s"):
        accounts.log_in("ada", PASSWORD)  # refused without a look at the password
    clock.t += 1.01
    with pytest.raises(AccountError, match="try again in 2 s"):
        accounts.log_in("ada", "guess")  # the wait doubles
    clock.t += 2.01
    accounts.log_in("ada", PASSWORD)  # the wait is over, and success clears the count
    accounts.log_in("ada", PASSWORD)


def test_failed_log_ins_back_off_per_address_across_names(accounts):
    accounts.sign_up("ada", PASSWORD)
    for i in range(acc.FREE_FAILURES):
        with pytest.raises(AccountError):
            accounts.log_in(f"name{i}", "guess", ip="203.0.113.9")
    with pytest.raises(AccountError, match="Too many failed log-ins"):
        accounts.log_in("ada", PASSWORD, ip="203.0.113.9")
    accounts.log_in("ada", PASSWORD, ip="198.51.100.1")  # another address is not held back


def test_a_session_expires_and_a_log_out_ends_it(accounts, clock):
    _, token = accounts.sign_up("ada", PASSWORD)
    clock.t += 3599
    assert accounts.account(token) is not None
    clock.t += 2  # past session_hours=1
    assert accounts.account(token) is None
    _, token = accounts.log_in("ada", PASSWORD)
    accounts.log_out(token)
    assert accounts.account(token) is None and accounts.account("forged") is None


def test_set_password_reads_stdin_and_ends_old_log_ins(store, monkeypatch, capsys):
    user = store.ensure_user("bob", "tester")  # open-mode feedback, no password
    a = Accounts(store)
    monkeypatch.setattr("sys.stdin", io.StringIO("a new password\n"))
    assert acc.main(["set-password", "bob", "--db", str(store.path)]) == 0
    assert "Password set for 'bob'" in capsys.readouterr().out
    account, token = a.log_in("bob", "a new password")
    assert account.user_id == user  # the old feedback is theirs
    monkeypatch.setattr("sys.stdin", io.StringIO("yet another one\n"))
    assert acc.main(["set-password", "bob", "--db", str(store.path)]) == 0
    assert a.account(token) is None  # a new password signs every browser out
    with pytest.raises(SystemExit):
        acc.main(["set-password", "bob", "a-password-in-argv", "--db", str(store.path)])
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert acc.main(["set-password", "bob", "--db", str(store.path)]) == 1


# -- rate limits ----------------------------------------------------------------------


def test_a_token_bucket_allows_a_minutes_worth_then_refills(clock):
    buckets = TokenBuckets(3, clock=clock.mono)
    assert [buckets.take(["k"]) for _ in range(3)] == [0, 0, 0]
    assert buckets.take(["k"]) == pytest.approx(20.0)  # one token per 60/3 s
    assert buckets.take(["other"]) == 0
    clock.t += 20
    assert buckets.take(["k"]) == 0 and buckets.take(["k"]) > 0
    assert TokenBuckets(0, clock=clock.mono).take(["k"]) == 0  # 0 = no limit


def test_limits_count_per_user_and_per_address_and_take_from_none_when_one_is_empty(clock):
    limits = Limits(messages_per_minute=2, feedback_per_minute=5, clock=clock.mono)
    assert limits.take("messages", 1, "10.0.0.1") == 0 and limits.take("messages", 1, "10.0.0.2") == 0
    assert limits.take("messages", 1, "10.0.0.3") > 0  # user 1 is out, whatever the address
    assert limits.take("messages", 2, "10.0.0.1") == 0
    assert limits.take("messages", 3, "10.0.0.1") > 0  # 10.0.0.1 is out, whoever sends
    assert limits.take("messages", 4, "10.0.0.4") == 0 and limits.take("messages", 4, "10.0.0.4") == 0  # a refusal took nothing
    assert limits.take("feedback", 1, "10.0.0.1") == 0  # feedback counts apart
    assert too_many("messages", 11.2) == "Too many messages: try again in 12 s."


def test_an_address_may_send_address_factor_times_what_one_user_may(clock):
    limits = Limits(messages_per_minute=2, feedback_per_minute=0, clock=clock.mono, address_factor=3)
    sent = [limits.take("messages", user, "10.0.0.1") == 0 for user in range(1, 6) for _ in range(2)]
    assert sent == [True] * 6 + [False] * 4  # users 1-3 send 2 each; the address is then spent
    with pytest.raises(ValueError, match="at least a user's"):
        Limits(1, 1, address_factor=0.5)


def test_token_buckets_are_thread_safe(clock):
    buckets = TokenBuckets(50, clock=clock.mono)  # the clock stands still: no refill
    granted = []

    def hammer():
        granted.extend(w == 0 for w in (buckets.take(["k"]) for _ in range(100)))

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(granted) == 50


# -- the handlers, in accounts mode ----------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp("tiny"))
    eng = Engine(build_policy(ModelArgs(model=str(path), device="cpu", quantize="none")), max_batch=4)
    yield eng
    eng.close()


@pytest.fixture
def deps(engine, store, accounts, clock):
    args = ServeArgs(messages_per_minute=0, feedback_per_minute=0, compare_temperature_spread=0.0)
    return ui.Deps(engine=engine, store=store, args=args, model_name="tiny", accounts=accounts)


def chat(deps, session, text, compare=False, ip=""):
    last = None
    for last in ui.send(deps, session, text, "Be brief.", 0.0, 1.0, 4, compare, ip):
        pass
    return last


def signed_up(deps, name):
    session = ui.Session()
    _, status = ui.sign_up(deps, session, name, PASSWORD, "")
    assert session.user_id and f"Signed in as **{name}**" in status
    return session


def rows(store, sql, *args):
    return [tuple(r) for r in store.db().execute(sql, args).fetchall()]


def test_no_handler_gives_feedback_under_a_typed_name(deps, store):
    ada = signed_up(deps, "ada")
    chat(deps, ada, "hi")
    mallory = ui.Session()
    with pytest.warns(UserWarning, match="Log in"):
        ui.set_user(deps, mallory, "ada", "")  # open mode's name box is refused
    assert mallory.user_id is None
    chat(deps, mallory, "hi")
    with pytest.warns(UserWarning, match="Log in"):
        assert ui.record_vote(deps, mallory, 1, 1, "") == ui.LOG_IN_FIRST
    with pytest.warns(UserWarning, match="Wrong name or password"):
        ui.log_in(deps, mallory, "ada", "not the password")
    assert mallory.user_id is None
    mallory = signed_up(deps, "mallory")
    chat(deps, mallory, "hi")
    ui.record_vote(deps, mallory, 1, -1, "")
    ui.record_vote(deps, ada, 1, 1, "")
    votes = rows(store, "SELECT u.name, r.conversation_id, v.value FROM votes v JOIN users u ON u.id = v.user_id "
                        "JOIN replies r ON r.id = v.reply_id ORDER BY v.id")
    assert votes == [("mallory", mallory.conversation_id, -1), ("ada", ada.conversation_id, 1)]


def test_a_login_that_expired_or_ended_elsewhere_stops_feedback_at_once(deps, store, clock):
    ada = signed_up(deps, "ada")
    chat(deps, ada, "hi")
    clock.t += 3601
    with pytest.warns(UserWarning, match="log-in has ended"):
        assert ui.record_vote(deps, ada, 1, 1, "") == ui.LOGIN_ENDED
    assert ada.user_id is None and store.counts()["votes"] == 0
    ui.log_in(deps, ada, "ada", PASSWORD)
    other_tab = ui.Session()
    ui.restore(deps, other_tab, ada.token)
    ui.log_out(deps, other_tab)  # log out in another tab: this one is out too
    with pytest.warns(UserWarning, match="log-in has ended"):
        ui.record_vote(deps, ada, 1, 1, "")
    assert store.counts()["votes"] == 0


def test_messages_past_the_limit_are_refused_and_nothing_is_generated_or_stored(deps, store):
    deps.limits = Limits(messages_per_minute=2, feedback_per_minute=0)
    ada = signed_up(deps, "ada")
    chat(deps, ada, "one")
    chat(deps, ada, "two")
    before = store.counts()
    with pytest.warns(UserWarning, match=r"Too many messages: try again in \d+ s"):
        *_, status = chat(deps, ada, "three")
    assert status.startswith("Too many messages: try again in 30 s.")
    assert store.counts() == before and len(ada.turns) == 4
    bob = signed_up(deps, "bob")
    chat(deps, bob, "mine", ip="10.0.0.9")  # another user: their own bucket
    chat(deps, bob, "again", ip="10.0.0.9")
    carol = signed_up(deps, "carol")
    with pytest.warns(UserWarning, match="Too many messages"):
        chat(deps, carol, "same address", ip="10.0.0.9")  # the address is spent
    assert len(carol.turns) == 0


def test_feedback_past_the_limit_is_refused_and_not_stored(deps, store):
    deps.limits = Limits(messages_per_minute=0, feedback_per_minute=2)
    ada = signed_up(deps, "ada")
    chat(deps, ada, "one")
    ui.record_vote(deps, ada, 1, 1, "")
    ui.record_vote(deps, ada, 1, -1, "")
    with pytest.warns(UserWarning, match="Too much feedback at once: try again in"):
        status = ui.record_vote(deps, ada, 1, 0, "")
    assert status.startswith("Too much feedback at once")
    assert store.counts()["vote_events"] == 2
    chat(deps, ada, "pick", compare=True)
    with pytest.warns(UserWarning, match="Too much feedback"):
        *_, status = ui.decide(deps, ada, "a")
    assert ada.pending is not None and store.counts()["comparisons"] == 0  # still waiting for a choice


def test_one_choice_per_comparison_per_person(deps, store):
    ada = signed_up(deps, "ada")
    chat(deps, ada, "pick", compare=True)
    a, b = ada.pending
    reloaded = ui.restore(deps, ui.Session(), ada.token)[0]  # the same comparison open in a second tab
    ui.decide(deps, ada, "a")
    with pytest.warns(UserWarning, match="already judged"):
        ui.decide(deps, reloaded, "b")
    assert rows(store, "SELECT reply_a_id, reply_b_id, choice FROM comparisons") == [(a["reply_id"], b["reply_id"], "a")]
    with pytest.raises(FeedbackError, match="already judged"):
        store.add_comparison(b["reply_id"], a["reply_id"], "tie", ada.user_id, once=True)


def test_conversations_are_listed_per_user_and_continue_after_a_rebuild(deps, store):
    ada, bob = signed_up(deps, "ada"), signed_up(deps, "bob")
    chat(deps, ada, "First   question\nof ada")
    first = ada.conversation_id
    ui.clear(deps, ada)
    chat(deps, ada, "second " + "x" * 80)
    second = ada.conversation_id
    chat(deps, bob, "bob's only")
    listed = ui.conversations(deps, ada)
    assert [c["conversation_id"] for c in listed] == [second, first]  # newest first
    assert listed[1]["title"] == "First question of ada" and len(listed[0]["title"]) == ui.TITLE_CHARS
    assert [c["title"] for c in ui.conversations(deps, bob)] == ["bob's only"]
    with pytest.warns(UserWarning, match="no saved conversation of yours"):
        ui.open_conversation(deps, bob, first)  # not bob's
    assert bob.turns[0].content == "bob's only"

    # a reload (a new server-side session from the browser's token) reopens the open one
    reloaded, _ = ui.restore(deps, ui.Session(), ada.token)
    assert reloaded.conversation_id == second and reloaded.turns == ada.turns
    session, chatbot, status = ui.open_conversation(deps, reloaded, first)
    assert "reopened" in status and [m["content"] for m in chatbot][0] == "First   question\nof ada"
    old_reply = session.turns[1]
    assert old_reply.reply_id and old_reply.version == "base"
    chat(deps, session, "and a follow-up")
    context = store.get_reply(session.turns[3].reply_id)["context"]
    assert [m["content"] for m in context] == ["Be brief.", "First   question\nof ada", old_reply.content, "and a follow-up"]
    assert store.get_reply(session.turns[3].reply_id)["conversation_id"] == first
    ui.record_vote(deps, session, 1, 1, "")  # feedback on a reply from before the rebuild
    assert rows(store, "SELECT reply_id, user_id, value FROM votes") == [(old_reply.reply_id, ada.user_id, 1)]
    assert ui.restore(deps, ui.Session(), ada.token)[0].conversation_id == first  # now the open one


def test_a_waiting_comparison_is_there_again_after_a_reload(deps):
    ada = signed_up(deps, "ada")
    chat(deps, ada, "pick", compare=True)
    page = ui.restore_page(deps, ui.Session(), ada.token)
    reloaded = page[0]
    assert reloaded.pending == ada.pending and page[12] == ui.SHOW  # the compare row
    assert page[10] == ui.panel(ada.pending[0]["text"])


def test_a_conversation_begun_before_logging_in_becomes_the_users(deps, store):
    session = ui.Session()
    chat(deps, session, "anonymous start")
    ui.sign_up(deps, session, "ada", PASSWORD, "")
    assert rows(store, "SELECT user_id FROM conversations WHERE id = ?", session.conversation_id) == [(session.user_id,)]
    assert [c["title"] for c in ui.conversations(deps, session)] == ["anonymous start"]
    ui.log_out(deps, session)
    assert session.turns == [] and session.user_id is None  # the next person sees nothing of it


def test_open_mode_keeps_the_name_box_and_saves_no_conversations(engine, store):
    deps = ui.Deps(engine=engine, store=store, args=ServeArgs(), model_name="tiny")
    session = ui.Session()
    ui.set_user(deps, session, "ada", "")
    chat(deps, session, "hi")
    assert ui.conversations(deps, session) == [] and store.counts()["users"] == 1
    assert rows(store, "SELECT COUNT(*) FROM conversation_states") == [(0,)]
    demo = ui.build_demo(deps)
    assert "set_user" in {f.api_name for f in demo.fns.values()}


def test_accounts_mode_has_no_route_that_takes_a_user_name_without_a_password(deps):
    demo = ui.build_demo(deps)
    routes = {f.api_name: f for f in demo.fns.values() if f.api_visibility != "private"}
    assert "set_user" not in routes
    assert {"sign_up", "log_in", "log_out", "conversations", "open_conversation", "vote", "send"} <= set(routes)
    assert [type(c).__name__ for c in routes["log_in"].inputs] == ["State", "Textbox", "Textbox"]


def test_open_mode_is_the_default_on_loopback_only():
    assert ServeArgs().open_mode and ServeArgs(host="localhost").open_mode and ServeArgs(host="::1").open_mode
    assert not ServeArgs(host="0.0.0.0").open_mode and not ServeArgs(host="192.168.1.5").open_mode
    assert ServeArgs(host="0.0.0.0", open=True).open_mode and not ServeArgs(open=False).open_mode
    with pytest.raises(ValueError, match="--session-hours"):
        ServeArgs(session_hours=0).validate()
    with pytest.raises(ValueError, match="--messages-per-minute"):
        ServeArgs(messages_per_minute=-1).validate()


def test_the_app_warns_when_open_beyond_localhost(tmp_path, tiny_dir):
    import os
    import socket
    import subprocess
    import sys

    from tests.server import ROOT

    with socket.socket() as taken:  # the app logs its mode, then cannot bind and exits: it never listens
        taken.bind(("0.0.0.0", 0))
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, str(ROOT / "app.py"), "--model", str(tiny_dir), "--quantize", "none", "--device", "cpu",
             "--no-trainer", "--db", str(tmp_path / "f.db"), "--adapters-dir", str(tmp_path / "adapters"),
             "--host", "0.0.0.0", "--open", "--port", str(port)],
            capture_output=True, text=True, cwd=ROOT, timeout=180, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0
    assert "OPEN MODE on 0.0.0.0: anyone who can reach this server can give feedback under any name" in proc.stderr


# -- the running app, through gradio_client ----------------------------------------------


def test_clients_cannot_vote_as_each_other_against_the_running_app(tmp_path, tiny_dir):
    from gradio_client import Client

    db = tmp_path / "feedback.db"
    args = ("--model", str(tiny_dir), "--quantize", "none", "--device", "cpu", "--no-open", "--db", str(db),
            "--adapters-dir", str(tmp_path / "adapters"), "--max-new-tokens", "4", "--temperature", "0",
            "--messages-per-minute", "3", "--address-limit-factor", "1")  # per user, and per address: every client here comes from 127.0.0.1
    with running_app(*args, log_path=tmp_path / "app.log") as url:
        ada = Client(url, verbose=False)
        assert "Signed in as **ada**" in ada.predict("ada", PASSWORD, "nurse", api_name="/sign_up")
        ada.predict("hello", "Be brief.", 0, 1, 4, False, api_name="/send")
        assert "recorded" in ada.predict(1, 1, "", api_name="/vote")

        mallory = Client(url, verbose=False)
        with pytest.raises(ValueError, match="set_user"):
            mallory.predict("ada", "", api_name="/set_user")  # there is no such route
        assert "Wrong name or password" in mallory.predict("ada", "guess", api_name="/log_in")
        assert "taken" in mallory.predict("ada", "another password", "", api_name="/sign_up")
        mallory.predict("hello", "Be brief.", 0, 1, 4, False, api_name="/send")
        assert ui.LOG_IN_FIRST in mallory.predict(1, 1, "", api_name="/vote")  # not logged in: no vote at all
        assert "Signed in as **mallory**" in mallory.predict("mallory", PASSWORD, "", api_name="/sign_up")
        assert "recorded" in mallory.predict(1, -1, "", api_name="/vote")  # hers, on the reply in her own session

        ada_listed = ada.predict(api_name="/conversations")
        mallory_listed = mallory.predict(api_name="/conversations")
        assert [c["title"] for c in ada_listed] == ["hello"] and [c["title"] for c in mallory_listed] == ["hello"]
        *_, status = mallory.predict(ada_listed[0]["conversation_id"], api_name="/open_conversation")
        assert "Signed in as **mallory**" in status and "reopened" not in status
        mallory.predict(api_name="/log_out")
        assert ui.LOG_IN_FIRST in mallory.predict(1, 1, "", api_name="/vote")

        ada.predict("again", "Be brief.", 0, 1, 4, False, api_name="/send")  # the address's 3rd message, ada's 2nd
        *_, status = ada.predict("more", "Be brief.", 0, 1, 4, False, api_name="/send")
        assert status.startswith("Too many messages: try again in")  # the address is spent, though ada is not

    con = sqlite3.connect(db)
    votes = con.execute("SELECT u.name, c.user_id = u.id, v.value FROM votes v JOIN users u ON u.id = v.user_id "
                        "JOIN replies r ON r.id = v.reply_id JOIN conversations c ON c.id = r.conversation_id ORDER BY v.id").fetchall()
    assert votes == [("ada", 1, 1), ("mallory", 1, -1)]  # each on a reply of their own conversation
    assert con.execute("SELECT COUNT(*) FROM logins WHERE ended_at IS NOT NULL").fetchone() == (1,)
    state = json.loads(con.execute("SELECT state FROM conversation_states WHERE conversation_id = ?",
                                   [ada_listed[0]["conversation_id"]]).fetchone()[0])
    assert [t["role"] for t in state["turns"]] == ["user", "assistant"] * 2 and state["turns"][1]["version"] == "base"
    assert con.execute("SELECT COUNT(*) FROM messages WHERE content = 'more'").fetchone() == (0,)
