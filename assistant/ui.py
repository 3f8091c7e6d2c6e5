"""Gradio wiring: the chat page, its feedback controls, and the handlers behind them.

What it is: `build_demo(deps) -> gr.Blocks` plus small named handlers. Each handler
gets its dependencies (`Deps`: the engine, the store, the settings) and the
browser session's `Session` passed in; there are no module globals, so the same
functions serve the browser, `gradio_client`, and tests that call them directly.

The server-side `Session` is the source of truth for a conversation (raw text,
the reply id behind every assistant message); the Chatbot only displays it, through
`safe_markdown`: HTML is shown as text and never executed, images are not loaded (a
reply could otherwise make the reader's browser fetch a URL that carries the
conversation away) and links go nowhere but http(s) and mailto. What is stored is
the text as generated.

Three ways to answer a message: Chat (one reply), Compare (two anonymous replies, A
and B, and the person picks) and Rank (k replies, `--rank-k`, put in order best to
worst). The replies of a comparison or ranking are sampled differently on purpose
(`sampling_plan`): a live candidate against the served adapter at the user's settings,
or else the served adapter at temperatures `--compare-temperature-spread` apart, so
that people judge replies that differ. Which reply is shown where is shuffled, and
every stored reply's params record how it was produced (variant, temperature, the
user's own temperature) and where it was shown (side A/B, or position 1..k).

What it is not: generation (chat.py) or storage (assistant/feedback/). A failing store
never stops the chat: the reply is shown, the user is told it was not saved.
"""

from __future__ import annotations

import dataclasses
import html
import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import gradio as gr

from assistant.adapters import CurrentWatcher
from assistant.chat import Engine, GenParams, PromptTooLong, QueueFull, Stream
from assistant.config import ServeArgs
from assistant.feedback import FeedbackError, FeedbackStore, StoreUnavailable

log = logging.getLogger(__name__)

FEEDBACK_OPTIONS = ("Like", "Dislike", "Incorrect", "Unhelpful", "Unsafe", "Too long")
MODES = ("chat", "compare", "rank")
PLACES = ("1st", "2nd", "3rd", "4th")
TEMPERATURE_MAX = 2.0  # the top of the UI's temperature slider
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
    rng: random.Random = field(default_factory=random.Random)  # shuffles where each compared or ranked reply is shown


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
    pending: list[dict] | None = None  # the two sides of an undecided comparison, as shown (A, B)
    ranking: list[dict] | None = None  # the k replies waiting to be ranked, as shown (1..k)

    def context(self, system_prompt: str) -> list[dict]:
        msgs = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
        return msgs + [{"role": t.role, "content": t.content} for t in self.turns]


# ---------------------------------------------------------------- pure helpers
LINK_SCHEMES = ("http", "https", "mailto")  # where a link in a message may go
# `](` of an inline link or `]:` of a link definition, and what follows on its line (or the next)
_LINK_TARGET = re.compile(r"\]([(:])([ \t]*\n?[^()\n]*)")
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*(?=:)")


def _safe_link(match: re.Match) -> str:
    target = re.sub(r"[\x00-\x20\\]", "", match[2]).lower()  # as a browser reads a URL: no blanks, no escapes
    scheme = _SCHEME.match(target.removeprefix("&lt;"))
    if scheme is None or scheme[0] in LINK_SCHEMES:
        return match[0]
    return "]" + f"&#{ord(match[1])};" + match[2]  # the bracket and target stay, as text


def safe_markdown(text: str) -> str:
    """`text` (a model reply or a message) as Chatbot Markdown that neither runs nor fetches anything.

    - HTML is escaped, so `<img src=...>`, `<script>` and the rest show as text.
    - No image is loaded: the `!` of every `![` (inline, reference or inside a link)
      becomes the entity `&#33;`, which Markdown shows as "!" but never reads as an
      image, so `![alt](url)` shows "!" and a link "alt" that is not followed unless clicked.
    - A link (or link definition) to anything but http(s) or mailto, e.g. `javascript:`
      or `data:`, is shown as plain text, the same way.
    Everything else (emphasis, lists, code, http links) renders as usual. The change is
    entities only, so `html.unescape` gives back `text` exactly (what an edit returns)."""
    out = html.escape(text, quote=False).replace("![", "&#33;[")
    return _LINK_TARGET.sub(_safe_link, out)


def display(turns: list[Turn]) -> list[dict]:
    """Chatbot messages for `turns`, through `safe_markdown`."""
    return [{"role": t.role, "content": safe_markdown(t.content)} for t in turns]


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


def spread_temperatures(temperature: float, spread: float, n: int) -> list[float]:
    """n sampling temperatures: the user's first, then the user's + spread, - spread,
    + 2·spread, ... skipping any outside 0..max(TEMPERATURE_MAX, the user's). A spread
    of 0 gives the user's n times."""
    if spread <= 0:
        return [temperature] * n
    top = max(TEMPERATURE_MAX, temperature)
    temps, step = [temperature], 1
    while len(temps) < n:
        fits = [t for t in (round(temperature + step * spread, 3), round(temperature - step * spread, 3)) if 0 <= t <= top]
        if not fits:
            raise ValueError(f"{n} temperatures {spread} apart do not fit in 0..{top}")
        temps += fits[: n - len(temps)]
        step += 1
    return temps


@dataclass(frozen=True)
class Arm:
    """How one of the replies to a compared or ranked message is sampled."""

    version: str  # adapter version
    params: GenParams


def sampling_plan(current: str, live: str | None, params: GenParams, spread: float, n: int) -> tuple[str, list[Arm]]:
    """The variant and the n arms of a comparison (n = 2) or ranking, the served adapter
    at the user's settings first:

      live-candidate      a live candidate alternates with the served adapter, both at the
                          user's settings (a third or fourth reply of one adapter at a spread
                          temperature), so the pair measures the adapters and nothing else;
      temperature-spread  the served adapter at `spread_temperatures`;
      plain               spread 0 and no candidate: every reply sampled alike.
    """
    if live is not None and live != current:
        temps = spread_temperatures(params.temperature, spread, (n + 1) // 2)
        return "live-candidate", [
            Arm((current, live)[i % 2], dataclasses.replace(params, temperature=temps[i // 2])) for i in range(n)]
    variant = "temperature-spread" if spread > 0 else "plain"
    return variant, [Arm(current, dataclasses.replace(params, temperature=t)) for t in spread_temperatures(params.temperature, spread, n)]


def parse_order(order, k: int) -> list[int] | None:
    """The shown numbers (1..k) of ranked replies, best first, from a list ([2, 1, 3]) or
    text ('2,1,3', '2 > 1 > 3'); None for 'tie' (all about the same)."""
    example = ",".join(map(str, [2, 1, *range(3, k + 1)]))
    if isinstance(order, str) and order.strip().lower() == "tie":
        return None
    try:
        parts = re.split(r"[\s,>]+", order.strip()) if isinstance(order, str) else list(order)
        numbers = [int(p) for p in parts if p != ""]
    except (TypeError, ValueError):
        raise ValueError(f"The order lists the replies' numbers best first, like '{example}', or is 'tie'; got {order!r}.") from None
    if sorted(numbers) != list(range(1, k + 1)):
        raise ValueError(f"The order names each of the {k} replies (1 to {k}) once, best first, like '{example}'; got {order!r}.")
    return numbers


def places_to_order(places: Sequence) -> list[int]:
    """The shown numbers of ranked replies best first, from the place (1 = best) the
    person gave each shown reply: places [2, 1, 3] give the order [2, 1, 3]."""
    missing = [str(i + 1) for i, p in enumerate(places) if p in (None, "")]
    if missing:
        raise ValueError(f"Give every reply a place first: reply {', '.join(missing)} has none yet.")
    places = [int(p) for p in places]
    for place in range(1, len(places) + 1):
        holders = [str(i + 1) for i, p in enumerate(places) if p == place]
        if len(holders) > 1:
            raise ValueError(f"Each place goes to one reply: {PLACES[place - 1]} is given to replies {' and '.join(holders)}.")
    return [places.index(place) + 1 for place in range(1, len(places) + 1)]


def panel(text):
    """A side panel's value: `text` as one assistant message, made safe as in the chat; an
    update (anything but text) passes through."""
    if not isinstance(text, str):
        return text
    return [{"role": "assistant", "content": safe_markdown(text)}] if text else []


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


def _save_reply(deps, session, context, stream: Stream, source: str, how: dict | None = None) -> int | None:
    """Store the finished reply of `stream`; `how` adds to its params how it was produced and shown."""
    if session.conversation_id is None:
        return None
    r = stream.reply
    return _store(
        deps.store.add_reply,
        conversation_id=session.conversation_id,
        context=context,
        text=r.text,
        params={"temperature": stream.params.temperature, "top_p": stream.params.top_p, "max_new_tokens": stream.params.max_new_tokens,
                **(how or {})},
        model=deps.model_name,
        adapter_version=r.adapter_version,
        prompt_tokens=r.prompt_tokens,
        completion_tokens=r.completion_tokens,
        latency_ms=r.latency_ms,
        ttft_ms=r.ttft_ms,
        finish_reason=r.finish_reason,
        source=source,
    )


def live_candidate(deps: Deps) -> str | None:
    """The loaded candidate under live comparison, if there is one."""
    live = deps.watcher.live if deps.watcher is not None else None
    return live if live and live != deps.engine.policy.current and live in deps.engine.policy.loaded else None


def _save_shown(deps, session, context, streams: list[Stream], shown: list[int], source: str, variant: str,
                user_params: GenParams, where: Callable[[int], dict]) -> list[dict]:
    """Store the replies of a comparison or ranking, in the order they were sampled, each
    with how it was produced and `where(position)` it was shown; returns them as shown."""
    position = {arm: pos for pos, arm in enumerate(shown)}
    saved = [{
        "reply_id": _save_reply(deps, session, context, s, source,
                                {"variant": variant, "user_temperature": user_params.temperature, **where(position[i])}),
        "text": s.reply.text, "version": s.reply.adapter_version, "temperature": s.params.temperature,
    } for i, s in enumerate(streams)]
    return [saved[arm] for arm in shown]


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


def _start(deps: Deps, session: Session, message: str, system_prompt: str, temperature, top_p, max_new_tokens, n: int):
    """Validate a new message and queue its n replies (one: the user's settings; more:
    `sampling_plan`). Returns (context, streams, variant, params), or None after telling
    the user why nothing was sent."""
    if session.pending:
        gr.Warning("Pick A, B, tie or both bad for the comparison above first.")
        return None
    if session.ranking:
        gr.Warning("Rank the replies above first: give each a place and save, or press All about the same.")
        return None
    try:
        text = validate_message(message, deps.args.max_message_chars)
        params = params_from(temperature, top_p, max_new_tokens)
    except ValueError as exc:
        gr.Warning(str(exc))
        return None
    system_prompt = system_prompt or ""
    context = session.context(system_prompt) + [{"role": "user", "content": text}]
    if n == 1:
        variant, plan = "", [(None, params)]  # None: the serving version, pinned at submit
    else:
        variant, arms = sampling_plan(deps.engine.policy.current, live_candidate(deps), params, deps.args.compare_temperature_spread, n)
        plan = [(arm.version, arm.params) for arm in arms]
    streams: list[Stream] = []
    try:
        for version, arm_params in plan:
            streams.append(deps.engine.submit(context, arm_params, version))
    except (PromptTooLong, QueueFull, ValueError) as exc:
        for s in streams:  # the first of several was queued: free its slot
            s.cancel()
        gr.Warning(str(exc))
        return None
    session.streams = streams
    if _ensure_conversation(deps, session, system_prompt):
        _store(deps.store.add_message, session.conversation_id, "user", text)
    session.turns.append(Turn("user", text))
    return context, streams, variant, params


def _release(session: Session, streams: list[Stream]) -> None:
    """The browser went away or Stop was pressed: free the batch slots of unfinished replies."""
    for s in streams:
        if s.reply is None:
            s.cancel()
    session.streams = []


def send(deps: Deps, session: Session, message: str, system_prompt: str, temperature, top_p, max_new_tokens, compare: bool):
    """Generator: append the user's message and stream one reply (or two, in compare mode).

    Yields (chatbot, textbox, reply_a, reply_b, compare_row, status); reply_a and reply_b
    are the texts of the sides as shown."""
    started = _start(deps, session, message, system_prompt, temperature, top_p, max_new_tokens, 2 if compare else 1)
    if started is None:
        yield display(session.turns), gr.update(), gr.update(), gr.update(), gr.update(), status_text(deps, session)
        return
    context, streams, variant, params = started
    try:
        if compare:
            yield from _stream_compare(deps, session, context, streams, variant, params)
        else:
            yield from _stream_single(deps, session, context, streams[0], "chat")
    finally:
        _release(session, streams)


def send_rank(deps: Deps, session: Session, message: str, system_prompt: str, temperature, top_p, max_new_tokens):
    """Generator: append the user's message and stream `--rank-k` replies to rank.

    Yields (chatbot, textbox, *k reply texts as shown, rank_row, status)."""
    k = deps.args.rank_k
    started = _start(deps, session, message, system_prompt, temperature, top_p, max_new_tokens, k)
    if started is None:
        yield display(session.turns), gr.update(), *[gr.update()] * k, gr.update(), status_text(deps, session)
        return
    context, streams, variant, params = started
    shown = list(range(k))
    deps.rng.shuffle(shown)
    texts = [""] * k
    try:
        for texts in follow(streams):
            yield display(session.turns), "", *[texts[arm] for arm in shown], SHOW, status_text(deps, session)
        session.ranking = _save_shown(deps, session, context, streams, shown, "rank", variant, params, lambda pos: {"position": pos + 1})
    except RuntimeError as exc:
        session.turns.pop()
        gr.Warning(f"The replies failed: {exc}")
        yield display(session.turns), gr.update(), *[""] * k, HIDE, status_text(deps, session)
        return
    finally:
        _release(session, streams)
    yield (display(session.turns), "", *[r["text"] for r in session.ranking], SHOW,
           f"Put the {k} replies in order: give each a place (1st = best) and save, or press All about the same.")


def send_in_mode(deps: Deps, session: Session, message: str, system_prompt: str, temperature, top_p, max_new_tokens, mode: str):
    """Generator behind the page's Send: `send` or `send_rank` by `mode` (one of MODES),
    with the replies shown as chat messages in their panels.

    Yields (chatbot, textbox, panel_a, panel_b, compare_row, *k rank panels, rank_row, status)."""
    k = deps.args.rank_k
    if mode not in MODES:
        gr.Warning(f"Unknown mode {mode!r}; pick one of {', '.join(MODES)}.")
        yield display(session.turns), gr.update(), gr.update(), gr.update(), gr.update(), *[gr.update()] * k, gr.update(), status_text(deps, session)
        return
    if mode == "rank":
        for chatbot, box, *rest in send_rank(deps, session, message, system_prompt, temperature, top_p, max_new_tokens):
            *texts, row, status = rest
            yield chatbot, box, gr.update(), gr.update(), gr.update(), *map(panel, texts), row, status
        return
    for chatbot, box, a, b, row, status in send(deps, session, message, system_prompt, temperature, top_p, max_new_tokens, mode == "compare"):
        yield chatbot, box, panel(a), panel(b), row, *[gr.update()] * k, gr.update(), status


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


def _stream_compare(deps, session, context, streams, variant: str, params: GenParams):
    shown = [0, 1]
    deps.rng.shuffle(shown)  # which arm is A: position must not tell which way a reply was sampled
    texts = ["", ""]
    try:
        for texts in follow(streams):
            yield display(session.turns), "", texts[shown[0]], texts[shown[1]], SHOW, status_text(deps, session)
    except RuntimeError as exc:
        session.turns.pop()
        gr.Warning(f"The replies failed: {exc}")
        yield display(session.turns), gr.update(), "", "", HIDE, status_text(deps, session)
        return
    session.pending = _save_shown(deps, session, context, streams, shown, "compare", variant, params, lambda pos: {"side": "AB"[pos]})
    a, b = session.pending
    yield display(session.turns), "", a["text"], b["text"], SHOW, "Which reply is better? Pick A, B, tie or both bad."


def stop(session: Session):
    for s in session.streams:
        s.cancel()
    return session


def _origin(reply: dict) -> str:
    return f"`{reply['version']}` at temperature {reply['temperature']:g}"


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
    reveal = (f"You chose {label}{note}. A came from adapter `{a['version']}`, B from `{b['version']}` "
              f"(sampled at temperature {a['temperature']:g} and {b['temperature']:g}).")
    if choice == "both_bad":
        reveal += " A continues the chat; you can edit it into a better reply."
    return display(session.turns), "", "", HIDE, reveal + " · " + status_text(deps, session)


def rank(deps: Deps, session: Session, order):
    """Record the ranking of the replies shown in Rank mode; the best (on a tie, reply 1)
    continues the chat. `order`: the shown numbers (1..k) best first, as a list or text
    ('2,1,3'), or 'tie' when they are all about the same (every pair is stored as a tie).

    Returns (chatbot, rank_row, status)."""
    if not session.ranking:
        gr.Warning("There are no replies waiting to be ranked.")
        return display(session.turns), HIDE, status_text(deps, session)
    shown = session.ranking
    try:
        best_first = parse_order(order, len(shown))
    except ValueError as exc:
        gr.Warning(str(exc))
        return display(session.turns), SHOW, status_text(deps, session)
    if not session.user_id:
        gr.Warning(NAME_FIRST)
        return display(session.turns), SHOW, NAME_FIRST
    saved = None
    if all(r["reply_id"] for r in shown):
        if best_first is None:
            saved = _store(deps.store.add_ties, [r["reply_id"] for r in shown], session.user_id)
        else:
            saved = _store(deps.store.add_ranking, [shown[n - 1]["reply_id"] for n in best_first], session.user_id)
    else:
        gr.Warning("These replies were not saved, so the ranking cannot be stored; the chat goes on.")
    best = best_first[0] if best_first else 1
    keep = shown[best - 1]
    session.turns.append(Turn("assistant", keep["text"], keep["reply_id"]))
    session.ranking = None
    k, note = len(shown), "" if saved else " (not saved)"
    if best_first is None:
        reveal = f"Saved as a tie: the {k} replies are all about the same{note}."
    else:
        reveal = f"Ranking saved{note}: reply {' > '.join(map(str, best_first))} ({k * (k - 1) // 2} preference pairs)."
    first, *others = shown
    reveal += (f" Reply 1 came from adapter {_origin(first)}" + "".join(f", reply {i} from {_origin(r)}" for i, r in enumerate(others, start=2))
               + f". Reply {best} continues the chat.")
    return display(session.turns), HIDE, reveal + " · " + status_text(deps, session)


def rank_by_places(deps: Deps, session: Session, *places):
    """The page's *Save ranking*: places[i] is the place (1 = best) given to shown reply
    i + 1. Returns (chatbot, rank_row, status, *places), the places cleared once saved."""
    keep = [gr.update()] * len(places)
    order: list[int] = []  # with nothing to rank, rank() says so
    if session.ranking:
        try:
            order = places_to_order(places)
        except ValueError as exc:
            gr.Warning(str(exc))
            return display(session.turns), SHOW, status_text(deps, session), *keep
    out = rank(deps, session, order)
    return (*out, *([None] * len(places) if session.ranking is None else keep))


def rank_tie(deps: Deps, session: Session, *places):
    """The page's *All about the same*. Returns (chatbot, rank_row, status, *places)."""
    out = rank(deps, session, "tie")
    return (*out, *([None] * len(places) if session.ranking is None else [gr.update()] * len(places)))


def _vote(deps: Deps, session: Session, index: int, value: int, reason: str) -> tuple[bool, str]:
    """Store a thumbs vote on the assistant message at chat position `index`: (stored, status)."""
    if not session.user_id:
        gr.Warning(NAME_FIRST)
        return False, NAME_FIRST
    if not isinstance(index, int) or not 0 <= index < len(session.turns) or session.turns[index].role != "assistant":
        gr.Warning("That message is not an assistant reply in this conversation.")
        return False, status_text(deps, session)
    turn = session.turns[index]
    if turn.reply_id is None:
        gr.Warning("This message was not stored as a model reply (it is an edit, or saving failed), so it cannot be voted on.")
        return False, status_text(deps, session)
    if _store(deps.store.set_vote, turn.reply_id, session.user_id, int(value), (reason or "").strip()) is None:
        return False, status_text(deps, session)
    word = {1: "👍 recorded", -1: "👎 recorded", 0: "vote removed"}[int(value)]
    return True, f"{word} · " + status_text(deps, session)


def record_vote(deps: Deps, session: Session, index: int, value: int, reason: str) -> str:
    """Store a thumbs vote on the assistant message at chat position `index`; returns the status line."""
    return _vote(deps, session, index, value, reason)[1]


def on_like(deps: Deps, session: Session, reason: str, data: gr.LikeData):
    """A 👍/👎 (or a reason from the flag menu) on a reply, with the *Why?* text as part of
    its reason. Once the vote is stored the *Why?* box is cleared, so its text belongs to
    this vote only; removing a vote takes no reason and leaves the box as it is.

    Returns (session, status, why_box)."""
    value, option = vote_value(data.liked)
    index = data.index if isinstance(data.index, int) else data.index[0]
    why = (reason or "").strip() if value != 0 else ""
    stored, status = _vote(deps, session, index, value, "; ".join(r for r in (option, why) if r))
    return session, status, "" if stored and why else gr.update()


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
    if session.pending or session.ranking or not session.turns or session.turns[-1].role != "assistant":
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
    """Start over: a new conversation; an undecided comparison or ranking is dropped.
    Returns (session, chatbot, reply_a, reply_b, compare_row, status)."""
    for s in session.streams:
        s.cancel()
    session.turns, session.pending, session.ranking, session.conversation_id = [], None, None, None
    return session, [], "", "", HIDE, status_text(deps, session)


def clear_page(deps: Deps, session: Session):
    """The page's *Clear*: `clear`, with every panel emptied and the places unset.
    Returns (session, chatbot, panel_a, panel_b, compare_row, *k rank panels, *k places, rank_row, status)."""
    session, chatbot, _, _, compare_row, status = clear(deps, session)
    k = deps.args.rank_k
    return session, chatbot, [], [], compare_row, *[[]] * k, *[None] * k, HIDE, status


# ---------------------------------------------------------------- layout
def _reply_panel(label: str, elem_id: str) -> gr.Chatbot:
    """A side panel that shows one reply the way the chat shows replies (`safe_markdown`)."""
    return gr.Chatbot(label=label, height=320, feedback_options=None, buttons=["copy"], elem_id=elem_id)


def _place_label(place: int, k: int) -> str:
    return PLACES[place - 1] + (" (best)" if place == 1 else " (worst)" if place == k else "")


def build_demo(deps: Deps) -> gr.Blocks:
    from assistant.dashboard import build_dashboard  # the admin tab; it reads the trainer's files

    a = deps.args
    k = a.rank_k
    with gr.Blocks(title="Assistant") as demo:
        session = gr.State(Session())
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Chat", id="chat", elem_id="chat-tab"):
                gr.Markdown("## Assistant\nChat, then tell it what was good or bad: 👍/👎 on a reply, ✏️ edit a reply into a better one, "
                            f"or switch the mode to *Compare* (pick between two anonymous replies) or *Rank* (put {k} in order). "
                            "Your feedback trains the next version.")
                with gr.Row():
                    name = gr.Textbox(label="Your name", placeholder="needed once to give feedback", scale=2, max_length=100, elem_id="user-name")
                    profile = gr.Textbox(label="Profile (optional)", placeholder="role or expertise, e.g. 'nurse', 'Python developer'", scale=3, max_length=300, elem_id="user-profile")
                    save_user = gr.Button("Save", scale=1, elem_id="save-user")
                status = gr.Markdown(NAME_FIRST, elem_id="status")
                chatbot = gr.Chatbot(
                    label="Conversation", height=460, editable="all", feedback_options=FEEDBACK_OPTIONS, elem_id="chatbot",
                )
                with gr.Column(visible=False, elem_id="compare-row") as compare_row:
                    with gr.Row(equal_height=True):
                        with gr.Column(scale=1, min_width=240):
                            reply_a = _reply_panel("A", "reply-a")
                            pick_a = gr.Button("A is better", elem_id="pick-a")
                        with gr.Column(scale=1, min_width=240):
                            reply_b = _reply_panel("B", "reply-b")
                            pick_b = gr.Button("B is better", elem_id="pick-b")
                    with gr.Row():
                        pick_tie = gr.Button("Tie", elem_id="pick-tie")
                        pick_bad = gr.Button("Both bad", elem_id="pick-both-bad")
                with gr.Column(visible=False, elem_id="rank-row") as rank_row:
                    rank_views, rank_places = [], []
                    with gr.Row(equal_height=True):
                        for i in range(1, k + 1):
                            with gr.Column(scale=1, min_width=200):
                                rank_views.append(_reply_panel(f"Reply {i}", f"rank-reply-{i}"))
                                rank_places.append(gr.Radio([(_place_label(p, k), p) for p in range(1, k + 1)], value=None,
                                                            label=f"Place of reply {i}", elem_id=f"rank-place-{i}"))
                    with gr.Row():
                        rank_save = gr.Button("Save ranking", variant="primary", elem_id="rank-save")
                        rank_same = gr.Button("All about the same", elem_id="rank-tie")
                with gr.Row():
                    msg = gr.Textbox(show_label=False, placeholder=f"Message (up to {a.max_message_chars:,} characters)", scale=6, lines=1, max_lines=8, elem_id="message")
                    send_btn = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                    stop_btn = gr.Button("Stop", scale=1, elem_id="stop")
                with gr.Row():
                    mode = gr.Radio(
                        [("Chat", "chat"), ("Compare: two anonymous replies (A/B), you pick", "compare"),
                         (f"Rank: {k} anonymous replies, you order them", "rank")],
                        value="chat", label="Mode", scale=4, elem_id="mode",
                    )
                    regen_btn = gr.Button("Regenerate", size="sm", scale=1, elem_id="regenerate")
                    clear_btn = gr.Button("Clear", size="sm", scale=1, elem_id="clear")
                reason = gr.Textbox(label="Why? (optional, saved with your next 👍/👎)", max_length=500, elem_id="reason")
                with gr.Accordion("Settings", open=False):
                    system_prompt = gr.Textbox(label="System prompt", value=a.system_prompt, lines=2, elem_id="system-prompt")
                    temperature = gr.Slider(0, TEMPERATURE_MAX, value=a.temperature, step=0.05, label="Temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1, value=a.top_p, step=0.05, label="Top-p")
                    max_new = gr.Slider(1, a.max_new_tokens_limit, value=a.max_new_tokens, step=1, label="Max new tokens")
            with gr.Tab("Dashboard", id="dashboard", elem_id="dashboard-tab"):
                build_dashboard(deps)
        # API-only twins of the page's controls, for gradio_client and scripts: /send (chat or
        # compare, the sides as plain text), /send_rank, /rank, /vote and /correct.
        api_compare = gr.Checkbox(visible=False)
        api_texts = [gr.Textbox(visible=False) for _ in range(max(2, k))]
        api_send_btn = gr.Button(visible=False)
        api_send_rank_btn = gr.Button(visible=False)
        api_order = gr.Textbox(visible=False)
        api_rank_btn = gr.Button(visible=False)
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
        private = {"api_visibility": "private", "concurrency_limit": None}
        page_outputs = [chatbot, msg, reply_a, reply_b, compare_row, *rank_views, rank_row, status]
        page_inputs = [session, msg, system_prompt, temperature, top_p, max_new, mode]
        msg.submit(bind_gen(send_in_mode), page_inputs, page_outputs, api_visibility="private", concurrency_limit=gen_limit)
        send_btn.click(bind_gen(send_in_mode), page_inputs, page_outputs, api_visibility="private", concurrency_limit=gen_limit)
        generate_inputs = [session, msg, system_prompt, temperature, top_p, max_new]
        api_send_btn.click(bind_gen(send), [*generate_inputs, api_compare], [chatbot, msg, *api_texts[:2], compare_row, status],
                           api_name="send", concurrency_limit=gen_limit)
        api_send_rank_btn.click(bind_gen(send_rank), generate_inputs, [chatbot, msg, *api_texts[:k], rank_row, status],
                                api_name="send_rank", concurrency_limit=gen_limit)
        stream_outputs = [chatbot, msg, reply_a, reply_b, compare_row, status]
        regen_inputs = [session, system_prompt, temperature, top_p, max_new]
        regen_btn.click(bind_gen(regenerate), regen_inputs, stream_outputs, api_name="regenerate", concurrency_limit=gen_limit)
        chatbot.retry(bind_gen(regenerate), regen_inputs, stream_outputs, api_visibility="private", concurrency_limit=gen_limit)
        stop_btn.click(stop, [session], [session], api_name="stop", concurrency_limit=None)
        clear_outputs = [session, chatbot, reply_a, reply_b, compare_row, *rank_views, *rank_places, rank_row, status]
        clear_btn.click(bind(clear_page), [session], clear_outputs, api_name="clear", concurrency_limit=None)
        chatbot.clear(bind(clear_page), [session], clear_outputs, **private)
        save_user.click(bind(set_user), [session, name, profile], [session, status], api_name="set_user", concurrency_limit=None)
        name.submit(bind(set_user), [session, name, profile], [session, status], **private)
        chatbot.like(like_handler, [session, reason], [session, status, reason], **private)
        chatbot.edit(edit_handler, [session], [session, chatbot, status], **private)
        api_vote_btn.click(bind(api_vote), [session, api_index, api_value, reason], [session, status], api_name="vote", concurrency_limit=None)
        api_correct_btn.click(bind(api_correct), [session, api_index, api_text], [session, status], api_name="correct", concurrency_limit=None)
        decide_outputs = [chatbot, reply_a, reply_b, compare_row, status]
        for button, choice in ((pick_a, "a"), (pick_b, "b"), (pick_tie, "tie"), (pick_bad, "both_bad")):
            button.click(
                lambda s, c=choice: _panels(decide(deps, s, c), (1, 2)),
                [session], decide_outputs, api_name=f"choose_{choice}", concurrency_limit=None,
            )
        rank_outputs = [chatbot, rank_row, status, *rank_places]
        rank_save.click(bind(rank_by_places), [session, *rank_places], rank_outputs, **private)
        rank_same.click(bind(rank_tie), [session, *rank_places], rank_outputs, **private)
        api_rank_btn.click(bind(rank), [session, api_order], [chatbot, rank_row, status], api_name="rank", concurrency_limit=None)
    return demo


def _panels(values: tuple, positions: tuple[int, ...]) -> tuple:
    """`values` with the reply texts at `positions` turned into panel values."""
    return tuple(panel(v) if i in positions else v for i, v in enumerate(values))
