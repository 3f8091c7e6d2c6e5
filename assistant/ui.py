"""Gradio wiring: the chat page, its feedback controls, and the handlers behind them.

What it is: `build_demo(deps) -> gr.Blocks` plus small named handlers. Each handler
gets its dependencies (`Deps`: the engine, the store, the settings) and the
browser session's `Session` passed in; there are no module globals, so the same
functions serve the browser, `gradio_client`, and tests that call them directly.

The server-side `Session` is the source of truth for a conversation (raw text,
the reply id behind every assistant message); the Chatbot only displays it, with
HTML escaped so that markup in a message is shown as text and never executed.

What it is not: generation (chat.py) or storage (feedback.py). A failing store
never stops the chat: the reply is shown, the user is told it was not saved.
"""

from __future__ import annotations

import html
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import gradio as gr

from assistant.adapters import CurrentWatcher
from assistant.chat import Engine, GenParams, PromptTooLong, QueueFull, Stream
from assistant.config import ServeArgs
from assistant.feedback import FeedbackError, FeedbackStore, StoreUnavailable

log = logging.getLogger(__name__)

FEEDBACK_OPTIONS = ("Like", "Dislike", "Incorrect", "Unhelpful", "Unsafe", "Too long")
STREAM_INTERVAL_S = 0.15  # coalesce tokens into at most ~7 UI updates per second per reply
NAME_FIRST = "Enter your name at the top (once per session) so your feedback can be stored."


@dataclass
class Deps:
    engine: Engine
    store: FeedbackStore
    args: ServeArgs
    model_name: str
    watcher: CurrentWatcher | None = None  # follows CURRENT/LIVE; None when nothing hot-swaps
    retrain: Callable[[], str] | None = None  # starts one training cycle in the background; returns what happened


@dataclass
class Turn:
    role: str
    content: str
    reply_id: int | None = None  # the stored reply behind an assistant message
    note: str = ""  # e.g. "edited"


@dataclass
class Session:
    """One browser session's conversation and identity (kept server-side)."""

    user_id: int | None = None
    user_name: str = ""
    conversation_id: str | None = None
    system_prompt: str = ""
    turns: list[Turn] = field(default_factory=list)
    streams: list[Stream] = field(default_factory=list)
    pending: list[dict] | None = None  # the two sides of an undecided comparison

    def context(self, system_prompt: str) -> list[dict]:
        msgs = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
        return msgs + [{"role": t.role, "content": t.content} for t in self.turns]


# ---------------------------------------------------------------- pure helpers
def display(turns: list[Turn]) -> list[dict]:
    """Chatbot messages for `turns`, HTML escaped so markup shows as text."""
    return [{"role": t.role, "content": html.escape(t.content, quote=False)} for t in turns]


def validate_message(text: str | None, limit: int) -> str:
    text = (text or "").strip()
    if not text:
        raise ValueError("Type a message first: empty messages are not sent.")
    if len(text) > limit:
        raise ValueError(f"Your message is {len(text):,} characters; the limit is {limit:,}. Shorten it and send again (your text is still in the box).")
    return text


def vote_value(liked) -> tuple[int, str]:
    """Map a Chatbot like payload to (value, reason): True up, False down,
    '' or None removed, any other option a down vote with that option as reason."""
    if liked is True:
        return 1, ""
    if liked is False:
        return -1, ""
    if not liked:
        return 0, ""
    return -1, str(liked)


def params_from(temperature, top_p, max_new_tokens) -> GenParams:
    p = GenParams(temperature=float(temperature), top_p=float(top_p), max_new_tokens=int(max_new_tokens))
    p.validate()
    return p


def follow(streams: list[Stream], interval: float = STREAM_INTERVAL_S):
    """Yield the texts of `streams` so far, about every `interval` seconds, until all
    have finished; the last yield holds the final reply texts."""
    texts = [""] * len(streams)
    done = [False] * len(streams)
    while not all(done):
        deadline = time.perf_counter() + interval
        changed = False
        while not all(done) and (left := deadline - time.perf_counter()) > 0:
            for i, s in enumerate(streams):
                if not done[i]:
                    delta, done[i] = s.poll(left / len(streams))
                    texts[i] += delta
                    changed = changed or bool(delta)
        if changed:
            yield list(texts)
    yield [s.reply.text for s in streams]


# ---------------------------------------------------------------- store calls
def _store(fn, *args, **kwargs):
    """Call the store; on failure tell the user and return None (the chat goes on)."""
    try:
        return fn(*args, **kwargs)
    except (FeedbackError, StoreUnavailable) as exc:
        gr.Warning(str(exc))
        return None


def _ensure_conversation(deps: Deps, session: Session, system_prompt: str) -> str | None:
    if session.conversation_id is None or session.system_prompt != system_prompt:
        session.conversation_id = _store(deps.store.new_conversation, session.user_id, system_prompt)
        session.system_prompt = system_prompt
    return session.conversation_id


def _save_reply(deps, session, context, stream: Stream, source: str) -> int | None:
    if session.conversation_id is None:
        return None
    r = stream.reply
    return _store(
        deps.store.add_reply,
        conversation_id=session.conversation_id,
        context=context,
        text=r.text,
        params={"temperature": stream.params.temperature, "top_p": stream.params.top_p, "max_new_tokens": stream.params.max_new_tokens},
        model=deps.model_name,
        adapter_version=r.adapter_version,
        prompt_tokens=r.prompt_tokens,
        completion_tokens=r.completion_tokens,
        latency_ms=r.latency_ms,
        ttft_ms=r.ttft_ms,
        finish_reason=r.finish_reason,
        source=source,
    )


def compare_versions(deps: Deps) -> tuple[str, str]:
    """The adapter versions the two sides of a comparison come from, in random order:
    the candidate under live comparison against the served version when there is one."""
    current = deps.engine.policy.current
    live = deps.watcher.live if deps.watcher is not None else None
    pair = [current, live if live and live != current and live in deps.engine.policy.loaded else current]
    random.shuffle(pair)
    return pair[0], pair[1]


# ---------------------------------------------------------------- handlers
HIDE = gr.update(visible=False)
SHOW = gr.update(visible=True)


def set_user(deps: Deps, session: Session, name: str, profile: str):
    try:
        session.user_id = deps.store.ensure_user(name or "", profile or "")
    except (FeedbackError, StoreUnavailable) as exc:
        gr.Warning(str(exc))
        return session, status_text(deps, session)
    session.user_name = (name or "").strip()
    return session, status_text(deps, session)


def status_text(deps: Deps, session: Session) -> str:
    who = f"Giving feedback as **{html.escape(session.user_name)}**" if session.user_id else NAME_FIRST
    return f"{who} · serving adapter `{deps.engine.policy.current}`"


def send(deps: Deps, session: Session, message: str, system_prompt: str, temperature, top_p, max_new_tokens, compare: bool):
    """Generator: append the user's message and stream one reply (or two, in compare mode).

    Yields (chatbot, textbox, reply_a, reply_b, compare_row, status)."""
    no_change = (display(session.turns), gr.update(), gr.update(), gr.update(), gr.update(), status_text(deps, session))
    if session.pending:
        gr.Warning("Pick A, B, tie or both bad for the comparison above first.")
        yield no_change
        return
    try:
        text = validate_message(message, deps.args.max_message_chars)
        params = params_from(temperature, top_p, max_new_tokens)
    except ValueError as exc:
        gr.Warning(str(exc))
        yield no_change
        return
    system_prompt = system_prompt or ""
    context = session.context(system_prompt) + [{"role": "user", "content": text}]
    streams: list[Stream] = []
    try:
        for version in compare_versions(deps) if compare else (None,):
            streams.append(deps.engine.submit(context, params, version))
    except (PromptTooLong, QueueFull, ValueError) as exc:
        for s in streams:  # the first of a pair was queued: free its slot
            s.cancel()
        gr.Warning(str(exc))
        yield no_change
        return
    session.streams = streams
    if _ensure_conversation(deps, session, system_prompt):
        _store(deps.store.add_message, session.conversation_id, "user", text)
    session.turns.append(Turn("user", text))
    try:
        if compare:
            yield from _stream_compare(deps, session, context, streams)
        else:
            yield from _stream_single(deps, session, context, streams[0], "chat")
    finally:  # the browser went away or Stop was pressed: free the batch slots
        for s in streams:
            if s.reply is None:
                s.cancel()
        session.streams = []


def _stream_single(deps, session, context, stream: Stream, source: str):
    turn = Turn("assistant", "")
    session.turns.append(turn)
    try:
        for (text,) in follow([stream]):
            turn.content = text
            yield display(session.turns), "", gr.update(), gr.update(), gr.update(), status_text(deps, session)
    except RuntimeError as exc:
        session.turns.remove(turn)
        gr.Warning(f"The reply failed: {exc}")
        yield display(session.turns), gr.update(), gr.update(), gr.update(), gr.update(), status_text(deps, session)
        return
    turn.reply_id = _save_reply(deps, session, context, stream, source)
    yield display(session.turns), "", gr.update(), gr.update(), gr.update(), status_text(deps, session)


def _stream_compare(deps, session, context, streams):
    texts = ["", ""]
    try:
        for texts in follow(streams):
            yield display(session.turns), "", texts[0], texts[1], SHOW, status_text(deps, session)
    except RuntimeError as exc:
        session.turns.pop()
        gr.Warning(f"The replies failed: {exc}")
        yield display(session.turns), gr.update(), "", "", HIDE, status_text(deps, session)
        return
    session.pending = [
        {"reply_id": _save_reply(deps, session, context, s, "compare"), "text": s.reply.text, "version": s.reply.adapter_version}
        for s in streams
    ]
    yield display(session.turns), "", texts[0], texts[1], SHOW, "Which reply is better? Pick A, B, tie or both bad."


def stop(session: Session):
    for s in session.streams:
        s.cancel()
    return session


def decide(deps: Deps, session: Session, choice: str):
    """Record a side-by-side choice; the chosen reply (A on a tie or both bad) continues the chat.

    Returns (chatbot, reply_a, reply_b, compare_row, status)."""
    if not session.pending:
        gr.Warning("There is no comparison waiting for a vote.")
        return display(session.turns), gr.update(), gr.update(), HIDE, status_text(deps, session)
    if not session.user_id:
        gr.Warning(NAME_FIRST)
        return display(session.turns), gr.update(), gr.update(), SHOW, NAME_FIRST
    a, b = session.pending
    saved = None
    if a["reply_id"] and b["reply_id"]:
        saved = _store(deps.store.add_comparison, a["reply_id"], b["reply_id"], choice, session.user_id)
    else:
        gr.Warning("These replies were not saved, so the vote cannot be stored; the chat goes on.")
    keep = b if choice == "b" else a
    session.turns.append(Turn("assistant", keep["text"], keep["reply_id"]))
    session.pending = None
    label = {"a": "A is better", "b": "B is better", "tie": "a tie", "both_bad": "both bad"}[choice]
    note = "" if saved else " (not saved)"
    reveal = f"You chose {label}{note}. A came from adapter `{a['version']}`, B from `{b['version']}`."
    if choice == "both_bad":
        reveal += " A continues the chat; you can edit it into a better reply."
    return display(session.turns), "", "", HIDE, reveal + " · " + status_text(deps, session)


def record_vote(deps: Deps, session: Session, index: int, value: int, reason: str) -> str:
    """Store a thumbs vote on the assistant message at chat position `index`."""
    if not session.user_id:
        gr.Warning(NAME_FIRST)
        return NAME_FIRST
    if not isinstance(index, int) or not 0 <= index < len(session.turns) or session.turns[index].role != "assistant":
        gr.Warning("That message is not an assistant reply in this conversation.")
        return status_text(deps, session)
    turn = session.turns[index]
    if turn.reply_id is None:
        gr.Warning("This message was not stored as a model reply (it is an edit, or saving failed), so it cannot be voted on.")
        return status_text(deps, session)
    if _store(deps.store.set_vote, turn.reply_id, session.user_id, int(value), (reason or "").strip()) is None:
        return status_text(deps, session)
    word = {1: "👍 recorded", -1: "👎 recorded", 0: "vote removed"}[int(value)]
    return f"{word} · " + status_text(deps, session)


def on_like(deps: Deps, session: Session, reason: str, data: gr.LikeData):
    value, option = vote_value(data.liked)
    index = data.index if isinstance(data.index, int) else data.index[0]
    full_reason = "; ".join(r for r in (option, (reason or "").strip()) if r)
    return session, record_vote(deps, session, index, value, full_reason)


def api_vote(deps: Deps, session: Session, index, value, reason: str):
    """API twin of the like button: vote on message `index` with value 1, -1 or 0."""
    try:
        index, value = int(index), int(value)
    except (TypeError, ValueError):
        gr.Warning("index and value must be integers")
        return session, status_text(deps, session)
    if value not in (1, -1, 0):
        gr.Warning("value must be 1 (up), -1 (down) or 0 (remove)")
        return session, status_text(deps, session)
    return session, record_vote(deps, session, index, value, reason)


def on_edit(deps: Deps, session: Session, data: gr.EditData):
    """A corrected assistant reply is stored (the original stays, linked) and the
    conversation continues from the edited text; later turns are dropped."""
    index = data.index if isinstance(data.index, int) else data.index[0]
    new_text = html.unescape(str(data.value if not isinstance(data.value, list) else data.value[0])).strip()
    if not 0 <= index < len(session.turns) or session.turns[index].role != "assistant":
        gr.Warning("Only assistant replies can be corrected. To change your message, send a new one.")
        return session, display(session.turns), status_text(deps, session)
    turn = session.turns[index]
    if not new_text:
        gr.Warning("A correction cannot be empty.")
        return session, display(session.turns), status_text(deps, session)
    if new_text == turn.content:
        return session, display(session.turns), status_text(deps, session)
    if not session.user_id:
        gr.Warning(NAME_FIRST)
        return session, display(session.turns), NAME_FIRST
    if turn.reply_id is None:
        gr.Warning("This message was not stored as a model reply, so the correction cannot be linked to it.")
        return session, display(session.turns), status_text(deps, session)
    if _store(deps.store.add_correction, turn.reply_id, new_text, session.user_id) is None:
        return session, display(session.turns), status_text(deps, session)
    dropped = len(session.turns) - index - 1
    session.turns[index:] = [Turn("assistant", new_text, None, note="edited")]
    msg = "Correction saved; the chat continues from your edited reply."
    if dropped:
        msg += f" The {dropped} later message(s) were removed."
    return session, display(session.turns), msg + " · " + status_text(deps, session)


def api_correct(deps: Deps, session: Session, index, text: str):
    """API twin of the edit (✏️) on a reply: correct message `index` into `text`."""
    try:
        index = int(index)
    except (TypeError, ValueError):
        gr.Warning("index must be an integer")
        return session, status_text(deps, session)
    previous = session.turns[index].content if 0 <= index < len(session.turns) else ""
    session, _, status = on_edit(deps, session, SimpleNamespace(index=index, value=text or "", previous_value=previous))
    return session, status


def regenerate(deps: Deps, session: Session, system_prompt: str, temperature, top_p, max_new_tokens):
    """Generator: replace the last assistant reply with a fresh one (the old one stays stored)."""
    if session.pending or not session.turns or session.turns[-1].role != "assistant":
        gr.Warning("There is no reply to regenerate.")
        yield display(session.turns), gr.update(), gr.update(), gr.update(), gr.update(), status_text(deps, session)
        return
    try:
        params = params_from(temperature, top_p, max_new_tokens)
    except ValueError as exc:
        gr.Warning(str(exc))
        yield display(session.turns), gr.update(), gr.update(), gr.update(), gr.update(), status_text(deps, session)
        return
    session.turns.pop()
    context = session.context(system_prompt or "")
    try:
        stream = deps.engine.submit(context, params)
    except (PromptTooLong, QueueFull, ValueError) as exc:
        gr.Warning(str(exc))
        yield display(session.turns), gr.update(), gr.update(), gr.update(), gr.update(), status_text(deps, session)
        return
    session.streams = [stream]
    _ensure_conversation(deps, session, system_prompt or "")
    try:
        yield from _stream_single(deps, session, context, stream, "regenerate")
    finally:
        if stream.reply is None:
            stream.cancel()
        session.streams = []


def clear(deps: Deps, session: Session):
    for s in session.streams:
        s.cancel()
    session.turns, session.pending, session.conversation_id = [], None, None
    return session, [], "", "", HIDE, status_text(deps, session)


# ---------------------------------------------------------------- layout
def build_demo(deps: Deps) -> gr.Blocks:
    from assistant.dashboard import build_dashboard  # the admin tab; it reads the trainer's files

    a = deps.args
    with gr.Blocks(title="Assistant") as demo:
        session = gr.State(Session())
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Chat", id="chat", elem_id="chat-tab"):
                gr.Markdown("## Assistant\nChat, then tell it what was good or bad: 👍/👎 on a reply, ✏️ edit a reply into a better one, or switch on *Compare* to pick between two anonymous replies. Your feedback trains the next version.")
                with gr.Row():
                    name = gr.Textbox(label="Your name", placeholder="needed once to give feedback", scale=2, max_length=100, elem_id="user-name")
                    profile = gr.Textbox(label="Profile (optional)", placeholder="role or expertise, e.g. 'nurse', 'Python developer'", scale=3, max_length=300, elem_id="user-profile")
                    save_user = gr.Button("Save", scale=1, elem_id="save-user")
                status = gr.Markdown(NAME_FIRST, elem_id="status")
                chatbot = gr.Chatbot(
                    label="Conversation", height=460, editable="all", feedback_options=FEEDBACK_OPTIONS, elem_id="chatbot",
                )
                with gr.Row(visible=False, elem_id="compare-row") as compare_row:
                    with gr.Column():
                        reply_a = gr.Textbox(label="A", interactive=False, lines=6, elem_id="reply-a")
                        pick_a = gr.Button("A is better", elem_id="pick-a")
                    with gr.Column():
                        reply_b = gr.Textbox(label="B", interactive=False, lines=6, elem_id="reply-b")
                        pick_b = gr.Button("B is better", elem_id="pick-b")
                    with gr.Column(scale=0, min_width=120):
                        pick_tie = gr.Button("Tie", elem_id="pick-tie")
                        pick_bad = gr.Button("Both bad", elem_id="pick-both-bad")
                with gr.Row():
                    msg = gr.Textbox(show_label=False, placeholder=f"Message (up to {a.max_message_chars:,} characters)", scale=6, lines=1, max_lines=8, elem_id="message")
                    send_btn = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                    stop_btn = gr.Button("Stop", scale=1, elem_id="stop")
                with gr.Row():
                    compare = gr.Checkbox(label="Compare: two anonymous replies (A/B), you pick", value=False, elem_id="compare")
                    regen_btn = gr.Button("Regenerate", size="sm", elem_id="regenerate")
                    clear_btn = gr.Button("Clear", size="sm", elem_id="clear")
                reason = gr.Textbox(label="Why? (optional, saved with your next 👍/👎)", max_length=500, elem_id="reason")
                with gr.Accordion("Settings", open=False):
                    system_prompt = gr.Textbox(label="System prompt", value=a.system_prompt, lines=2, elem_id="system-prompt")
                    temperature = gr.Slider(0, 2, value=a.temperature, step=0.05, label="Temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1, value=a.top_p, step=0.05, label="Top-p")
                    max_new = gr.Slider(1, a.max_new_tokens_limit, value=a.max_new_tokens, step=1, label="Max new tokens")
            with gr.Tab("Dashboard", id="dashboard", elem_id="dashboard-tab"):
                build_dashboard(deps)
        # API-only twin of the like buttons, for gradio_client and scripts.
        api_index = gr.Number(visible=False, precision=0)
        api_value = gr.Number(visible=False, precision=0)
        api_vote_btn = gr.Button(visible=False)
        api_text = gr.Textbox(visible=False)
        api_correct_btn = gr.Button(visible=False)

        def bind(fn):
            def wrapped(*args, **kwargs):
                return fn(deps, *args, **kwargs)

            wrapped.__name__ = fn.__name__
            wrapped.__doc__ = fn.__doc__
            return wrapped

        def bind_gen(fn):
            def wrapped(*args):
                yield from fn(deps, *args)

            wrapped.__name__ = fn.__name__
            return wrapped

        def like_handler(session: Session, reason: str, data: gr.LikeData):
            return on_like(deps, session, reason, data)

        def edit_handler(session: Session, data: gr.EditData):
            return on_edit(deps, session, data)

        gen_limit = a.max_batch * 2
        stream_outputs = [chatbot, msg, reply_a, reply_b, compare_row, status]
        send_inputs = [session, msg, system_prompt, temperature, top_p, max_new, compare]
        send_evt = msg.submit(bind_gen(send), send_inputs, stream_outputs, api_name="send", concurrency_limit=gen_limit)
        click_evt = send_btn.click(bind_gen(send), send_inputs, stream_outputs, api_visibility="private", concurrency_limit=gen_limit)
        regen_inputs = [session, system_prompt, temperature, top_p, max_new]
        regen_evt = regen_btn.click(bind_gen(regenerate), regen_inputs, stream_outputs, api_name="regenerate", concurrency_limit=gen_limit)
        retry_evt = chatbot.retry(bind_gen(regenerate), regen_inputs, stream_outputs, api_visibility="private", concurrency_limit=gen_limit)
        stop_btn.click(stop, [session], [session], api_name="stop", concurrency_limit=None)
        del send_evt, click_evt, regen_evt, retry_evt
        clear_outputs = [session, chatbot, reply_a, reply_b, compare_row, status]
        clear_btn.click(bind(clear), [session], clear_outputs, api_name="clear", concurrency_limit=None)
        chatbot.clear(bind(clear), [session], clear_outputs, api_visibility="private", concurrency_limit=None)
        save_user.click(bind(set_user), [session, name, profile], [session, status], api_name="set_user", concurrency_limit=None)
        name.submit(bind(set_user), [session, name, profile], [session, status], api_visibility="private", concurrency_limit=None)
        chatbot.like(like_handler, [session, reason], [session, status], api_visibility="private", concurrency_limit=None)
        chatbot.edit(edit_handler, [session], [session, chatbot, status], api_visibility="private", concurrency_limit=None)
        api_vote_btn.click(bind(api_vote), [session, api_index, api_value, reason], [session, status], api_name="vote", concurrency_limit=None)
        api_correct_btn.click(bind(api_correct), [session, api_index, api_text], [session, status], api_name="correct", concurrency_limit=None)
        decide_outputs = [chatbot, reply_a, reply_b, compare_row, status]
        for button, choice in ((pick_a, "a"), (pick_b, "b"), (pick_tie, "tie"), (pick_bad, "both_bad")):
            button.click(
                lambda s, c=choice: decide(deps, s, c),
                [session], decide_outputs, api_name=f"choose_{choice}", concurrency_limit=None,
            )
    return demo
