"""The UI handlers called directly (no browser): what each does to the session and the store."""

from __future__ import annotations

import types

import pytest

from assistant.chat import Engine
from assistant.config import ModelArgs, ServeArgs
from assistant.feedback import FeedbackStore
from assistant.model import build_policy
from assistant import ui
from tests.tiny import save_tiny_model


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp("tiny"))
    eng = Engine(build_policy(ModelArgs(model=str(path), device="cpu", quantize="none")), max_batch=4)
    yield eng
    eng.close()


@pytest.fixture
def deps(engine, tmp_path):
    store = FeedbackStore(tmp_path / "feedback.db")
    yield ui.Deps(engine=engine, store=store, args=ServeArgs(max_message_chars=200), model_name="tiny")
    store.close()


def run(gen):
    """Drain a streaming handler; return its last yield."""
    last = None
    for last in gen:
        pass
    return last


def chat(deps, session, text, compare=False, max_new_tokens=6):
    return run(ui.send(deps, session, text, "Be brief.", 0.0, 1.0, max_new_tokens, compare))


def named(deps, name="ada"):
    session = ui.Session()
    ui.set_user(deps, session, name, "tester")
    return session


def test_validate_message_rejects_empty_and_too_long():
    with pytest.raises(ValueError, match="empty"):
        ui.validate_message("  \n\t ", 10)
    with pytest.raises(ValueError, match="limit is 10"):
        ui.validate_message("x" * 11, 10)
    assert ui.validate_message("  hi ", 10) == "hi"


def test_display_escapes_html():
    shown = ui.display([ui.Turn("user", '<script>alert(1)</script> & <b>x</b>')])
    assert shown[0]["content"] == "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;b&gt;x&lt;/b&gt;"


@pytest.mark.parametrize("liked, expected", [(True, (1, "")), (False, (-1, "")), ("", (0, "")), (None, (0, "")), ("Incorrect", (-1, "Incorrect"))])
def test_vote_value_maps_like_payloads(liked, expected):
    assert ui.vote_value(liked) == expected


def test_send_streams_and_stores_reply_with_context(deps):
    session = named(deps)
    chatbot, box, *_ = chat(deps, session, "hello <b>there</b>")
    assert box == ""
    assert [t.role for t in session.turns] == ["user", "assistant"]
    reply = deps.store.get_reply(session.turns[1].reply_id)
    assert reply["context"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello <b>there</b>"}]
    assert reply["adapter_version"] == "base" and reply["model"] == "tiny"
    assert reply["completion_tokens"] == 6 and reply["params"]["max_new_tokens"] == 6
    assert chatbot[0]["content"] == "hello &lt;b&gt;there&lt;/b&gt;"


def test_empty_message_stores_nothing_and_keeps_session(deps):
    session = named(deps)
    out = chat(deps, session, "   ")
    assert session.turns == [] and out[1] != ""  # the textbox is left alone
    assert deps.store.counts()["replies"] == 0


def test_vote_change_and_removal_keep_one_row(deps):
    session = named(deps)
    chat(deps, session, "hi")
    ui.record_vote(deps, session, 1, 1, "good")
    ui.record_vote(deps, session, 1, -1, "changed my mind")
    status = ui.record_vote(deps, session, 1, 0, "")
    assert "removed" in status
    counts = deps.store.counts()
    assert counts["votes"] == 1 and counts["vote_events"] == 3


def test_vote_on_user_message_or_missing_index_stores_nothing(deps):
    session = named(deps)
    chat(deps, session, "hi")
    ui.record_vote(deps, session, 0, 1, "")
    ui.record_vote(deps, session, 7, 1, "")
    assert deps.store.counts()["votes"] == 0


def test_feedback_needs_a_name(deps):
    session = ui.Session()
    chat(deps, session, "hi")
    assert ui.record_vote(deps, session, 1, 1, "") == ui.NAME_FIRST
    assert deps.store.counts()["votes"] == 0


def test_like_event_with_reason_option(deps):
    session = named(deps)
    chat(deps, session, "hi")
    data = types.SimpleNamespace(index=1, liked="Incorrect", value="x")
    ui.on_like(deps, session, "wrong city", data)
    vote = deps.store.db().execute("SELECT value, reason FROM votes").fetchone()
    assert tuple(vote) == (-1, "Incorrect; wrong city")


def test_edit_stores_correction_and_conversation_continues_from_it(deps):
    session = named(deps)
    chat(deps, session, "first")
    original_id = session.turns[1].reply_id
    original_text = deps.store.get_reply(original_id)["text"]
    ui.on_edit(deps, session, types.SimpleNamespace(index=1, value="A better &lt;reply&gt;", previous_value=""))
    assert session.turns[1].content == "A better <reply>"
    row = deps.store.db().execute("SELECT reply_id, text FROM corrections").fetchone()
    assert tuple(row) == (original_id, "A better <reply>")
    assert deps.store.get_reply(original_id)["text"] == original_text  # the original stays
    chat(deps, session, "second")
    context = deps.store.get_reply(session.turns[3].reply_id)["context"]
    assert context[2] == {"role": "assistant", "content": "A better <reply>"}


def test_edit_of_user_message_is_refused(deps):
    session = named(deps)
    chat(deps, session, "first")
    ui.on_edit(deps, session, types.SimpleNamespace(index=0, value="changed", previous_value="first"))
    assert session.turns[0].content == "first"
    assert deps.store.counts()["corrections"] == 0


def test_compare_vote_stores_choice_and_chosen_reply_continues(deps):
    session = named(deps)
    out = chat(deps, session, "pick one", compare=True)
    assert out[2] and out[3]  # both sides shown
    assert session.pending is not None
    a, b = session.pending
    blocked = chat(deps, session, "next")  # no new message until the vote
    assert len(session.turns) == 1 and blocked is not None
    _, _, _, _, status = ui.decide(deps, session, "b")
    assert "A came from adapter `base`, B from `base`" in status
    row = deps.store.db().execute("SELECT reply_a_id, reply_b_id, choice FROM comparisons").fetchone()
    assert tuple(row) == (a["reply_id"], b["reply_id"], "b")
    assert session.turns[-1].content == b["text"] and session.turns[-1].reply_id == b["reply_id"]
    assert session.pending is None


def test_regenerate_replaces_last_reply_and_keeps_old_one_stored(deps):
    session = named(deps)
    chat(deps, session, "hi")
    first = session.turns[1].reply_id
    run(ui.regenerate(deps, session, "Be brief.", 0.0, 1.0, 6))
    assert len(session.turns) == 2 and session.turns[1].reply_id != first
    assert deps.store.get_reply(session.turns[1].reply_id)["source"] == "regenerate"
    assert deps.store.get_reply(first)  # still there


def test_stop_ends_reply_early_and_stores_it_as_stopped(deps):
    session = named(deps)
    gen = ui.send(deps, session, "talk for a long time", "", 0.0, 1.0, 500, False)  # greedy: deterministic, no early eos
    next(gen)  # first streamed piece
    ui.stop(session)
    run(gen)
    reply = deps.store.get_reply(session.turns[1].reply_id)
    assert reply["finish_reason"] == "stopped" and reply["completion_tokens"] < 500


def test_read_only_store_keeps_chat_working(engine, tmp_path):
    FeedbackStore(tmp_path / "feedback.db").close()
    store = FeedbackStore(tmp_path / "feedback.db", readonly=True)
    deps = ui.Deps(engine=engine, store=store, args=ServeArgs(), model_name="tiny")
    session = ui.Session()
    with pytest.warns(UserWarning, match="not saved|read"):
        chat(deps, session, "hello")
    assert session.turns[-1].role == "assistant" and session.turns[-1].reply_id is None
    assert ui.record_vote(deps, session, 1, 1, "") == ui.NAME_FIRST


def test_clear_starts_a_new_conversation(deps):
    session = named(deps)
    chat(deps, session, "hi")
    first = session.conversation_id
    ui.clear(deps, session)
    chat(deps, session, "again")
    assert session.conversation_id != first and len(session.turns) == 2
