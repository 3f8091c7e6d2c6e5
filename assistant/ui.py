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

Checks in Compare mode (assistant/annotators.py): a message sent in Compare mode is,
with probability --gold-rate, answered first by a gold item (a comparison whose better
reply is known) and, with --repeat-rate, by one of the person's own comparisons from at
least --repeat-after-minutes ago, sides swapped. Either is shown as its own short
exchange, unmarked: each panel holds the item's question as the user turn and one reply
(a gold item's better reply on a random side); the conversation is left as it was, the
person's message stays in the box, and once they pick, the status asks them to send it,
and it then gets its own two replies (never a second check in a row). Picks on checks are
stored as gold or repeat answers, never as comparisons, so they do not train the model.

Who gives feedback: in accounts mode (`Deps.accounts`, the default when the server
listens beyond localhost) people sign up and log in with a password (accounts.py); the
page keeps the session token in the browser (`gr.BrowserState`) and the server checks it
on page load and before every piece of feedback, so a reload keeps the log-in and a
log-out or expiry anywhere ends it. Every handler takes the user from the server-side
`Session` alone: no route takes a user's name or id from the client, except sign-up and
log-in, which take a password with it. In open mode (`--open`, a laptop) a typed name is
enough, as it always was. A signed-in user's conversations are saved as shown after
every change (the turns, the reply id and adapter version behind each reply, a
comparison or ranking still waiting), listed newest first, and reopened into a `Session`
that continues them; a reload reopens the one that was open.

Every message and every piece of feedback takes a token from the sender's rate limits
(limits.py, per user and per client address); past them the person is told how long to
wait and nothing is generated or stored.

What it is not: generation (chat.py), storage (assistant/feedback/) or password hashing
(accounts.py). A failing store never stops the chat: the reply is shown, the user is
told it was not saved.
"""

from __future__ import annotations

import dataclasses
import datetime
import html
import inspect
import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import gradio as gr

from assistant import annotators
from assistant.accounts import MAX_PROFILE_CHARS, Account, AccountError, Accounts, token_digest
from assistant.adapters import CurrentWatcher
from assistant.chat import Engine, GenParams, PromptTooLong, QueueFull, Stream
from assistant.config import ServeArgs
from assistant.feedback import FeedbackError, FeedbackStore, StoreUnavailable
from assistant.limits import Limits, too_many

log = logging.getLogger(__name__)

FEEDBACK_OPTIONS = ("Like", "Dislike", "Incorrect", "Unhelpful", "Unsafe", "Too long")
MODES = ("chat", "compare", "rank")
PLACES = ("1st", "2nd", "3rd", "4th")
TEMPERATURE_MAX = 2.0  # the top of the UI's temperature slider
STREAM_INTERVAL_S = 0.15  # coalesce tokens into at most ~7 UI updates per second per reply
NAME_FIRST = "Enter your name at the top (once per session) so your feedback can be stored."
LOG_IN_FIRST = "Log in (or sign up) at the top so your feedback can be stored."
LOGIN_ENDED = "Your log-in has ended (it expired, or you logged out elsewhere): log in again to give feedback."
TITLE_CHARS = 60  # a saved conversation's title: the start of its first message
CONVERSATIONS_LISTED = 50


@dataclass
class Deps:
    engine: Engine
    store: FeedbackStore
    args: ServeArgs
    model_name: str
    watcher: CurrentWatcher | None = None  # follows CURRENT/LIVE; None when nothing hot-swaps
    retrain: Callable[[], str] | None = None  # starts one training cycle in the background; returns what happened
    rng: random.Random = field(default_factory=random.Random)  # shuffles where each compared or ranked reply is shown
    accounts: Accounts | None = None  # sign-up and log-in; None: open mode, a typed name is enough
    limits: Limits | None = None  # None: built from args (--messages-per-minute, --feedback-per-minute)
    check_rng: random.Random = field(default_factory=random.Random)  # draws the gold items and repeats of Compare mode

    def __post_init__(self):
        if self.limits is None:
            self.limits = Limits(self.args.messages_per_minute, self.args.feedback_per_minute,
                                 address_factor=self.args.address_limit_factor)


@dataclass
class Turn:
    role: str
    content: str
    reply_id: int | None = None  # the stored reply behind an assistant message
    note: str = ""  # e.g. "edited"
    version: str = ""  # the adapter version that produced the reply


@dataclass
class Session:
    """One browser session's conversation and identity (kept server-side)."""

    user_id: int | None = None
    user_name: str = ""
    user_profile: str = ""
    token: str | None = None  # the log-in's session token (accounts mode)
    conversation_id: str | None = None
    system_prompt: str = ""
    turns: list[Turn] = field(default_factory=list)
    streams: list[Stream] = field(default_factory=list)
    pending: list[dict] | None = None  # the two sides of an undecided comparison, as shown (A, B)
    ranking: list[dict] | None = None  # the k replies waiting to be ranked, as shown (1..k)
    own_next: bool = False  # a check (gold item or repeat) was just answered: the next message gets its own replies

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


def title_of(turns: list[Turn]) -> str:
    """A saved conversation's title: the start of its first user message, on one line."""
    first = next((" ".join(t.content.split()) for t in turns if t.role == "user"), "")
    return first if len(first) <= TITLE_CHARS else first[: TITLE_CHARS - 1].rstrip() + "…"


def state_of(session: Session) -> dict:
    """What is saved of a conversation to rebuild its `Session`: the turns (with the reply
    id and adapter version behind each reply) and a comparison or ranking still waiting."""
    return {"turns": [dataclasses.asdict(t) for t in session.turns], "pending": session.pending, "ranking": session.ranking}


def rebuild(session: Session, saved: dict) -> Session:
    """Put a saved conversation (`FeedbackStore.conversation_state`) into `session`, which
    continues it: the next reply's context is its turns under its system prompt."""
    state = saved["state"]
    names = {f.name for f in dataclasses.fields(Turn)}
    session.turns = [Turn(**{k: v for k, v in t.items() if k in names}) for t in state.get("turns", [])]
    session.pending, session.ranking = state.get("pending"), state.get("ranking")
    session.conversation_id, session.system_prompt = saved["conversation_id"], saved["system_prompt"]
    session.streams = []
    return session


def client_ip(request) -> str:
    """The address a request came from ("" when unknown, e.g. a handler called directly)."""
    client = getattr(request, "client", None)
    return str(getattr(client, "host", "") or "")


# ---------------------------------------------------------------- store calls
def _store(fn, *args, **kwargs):
    """Call the store; on failure tell the user and return None (the chat goes on)."""
    try:
        return fn(*args, **kwargs)
    except (FeedbackError, StoreUnavailable) as exc:
        log.warning("store refused %s: %s", getattr(fn, "__name__", fn), exc)  # the person sees it too, as a toast
        gr.Warning(str(exc))
        return None


def _ensure_conversation(deps: Deps, session: Session, system_prompt: str) -> str | None:
    if session.conversation_id is None or session.system_prompt != system_prompt:
        session.conversation_id = _store(deps.store.new_conversation, session.user_id, system_prompt)
        session.system_prompt = system_prompt
        _remember_open(deps, session)
    return session.conversation_id


# ---------------------------------------------------------------- who, how often, what is kept
def first_step(deps: Deps) -> str:
    """What to do before feedback can be stored: log in, or (open mode) give a name."""
    return LOG_IN_FIRST if deps.accounts is not None else NAME_FIRST


def _forget_user(session: Session) -> None:
    session.user_id, session.user_name, session.user_profile, session.token = None, "", "", None


def _signed_in(deps: Deps, session: Session) -> int | None:
    """The user this session gives feedback as. In accounts mode the log-in is checked
    again each time, so an expired or logged-out token stops counting at once."""
    if session.user_id is None or deps.accounts is None:
        return session.user_id
    try:
        account = deps.accounts.account(session.token)
    except StoreUnavailable:
        return session.user_id  # nothing can be stored either; the store call will say why
    if account is None or account.user_id != session.user_id:
        _forget_user(session)
        return None
    return session.user_id


def _feedback_giver(deps: Deps, session: Session) -> tuple[int | None, str]:
    """(user id, "") when this session may give feedback; else (None, what to do), told."""
    had = session.user_id is not None
    user_id = _signed_in(deps, session)
    if user_id is None:
        msg = LOGIN_ENDED if had else first_step(deps)
        gr.Warning(msg)
        return None, msg
    return user_id, ""


def _limited(deps: Deps, kind: str, user_id: int | None, ip: str) -> str:
    """"" when one more `kind` action ("messages" or "feedback") is allowed (and counted);
    else the message saying how long to wait, told."""
    wait = deps.limits.take(kind, user_id, ip)
    if not wait:
        return ""
    msg = too_many(kind, wait)
    gr.Warning(msg)
    return msg


def _saves(deps: Deps, session: Session) -> bool:
    """Whether this session's conversation is saved for its user (accounts mode, signed in)."""
    return deps.accounts is not None and session.user_id is not None and session.token is not None


def _remember_open(deps: Deps, session: Session) -> None:
    """Record which conversation this log-in has open, for the next page load."""
    if _saves(deps, session):
        _store(deps.store.set_login_conversation, token_digest(session.token), session.user_id, session.conversation_id)


def _persist(deps: Deps, session: Session) -> None:
    """Save the conversation as it now stands, so a reload or a later visit finds it."""
    if _saves(deps, session) and session.conversation_id is not None and session.turns:
        _store(deps.store.save_conversation_state, session.conversation_id, session.user_id,
               title_of(session.turns), state_of(session))


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
    """Open mode: give feedback under `name`. Refused in accounts mode (log in instead)."""
    if deps.accounts is not None:
        gr.Warning(LOG_IN_FIRST)
        return session, status_text(deps, session)
    try:
        session.user_id = deps.store.ensure_user(name or "", profile or "")
    except (FeedbackError, StoreUnavailable) as exc:
        gr.Warning(str(exc))
        return session, status_text(deps, session)
    session.user_name = (name or "").strip()
    return session, status_text(deps, session)


def status_text(deps: Deps, session: Session) -> str:
    if session.user_id:
        who = ("Signed in as" if deps.accounts is not None else "Giving feedback as") + f" **{safe_markdown(session.user_name)}**"
    else:
        who = first_step(deps)
    return f"{who} · serving adapter `{deps.engine.policy.current}`"


# ---------------------------------------------------------------- accounts
def _adopt(deps: Deps, session: Session, account: Account, token: str) -> None:
    """`session` is now `account`'s. A conversation begun before logging in becomes
    theirs and stays open; one that cannot be theirs is closed. Whoever was signed in
    here before is logged out."""
    if session.user_id is not None:
        log_out(deps, session)
    session.user_id, session.user_name, session.user_profile, session.token = account.user_id, account.name, account.profile, token
    if session.conversation_id is None:
        return
    try:
        deps.store.claim_conversation(session.conversation_id, account.user_id)  # anonymous: now theirs
        deps.store.set_login_conversation(token_digest(token), account.user_id, session.conversation_id)
    except FeedbackError:  # someone else's: start afresh
        _reset(session)
        return
    except StoreUnavailable as exc:
        gr.Warning(str(exc))
        return
    _persist(deps, session)


def _reset(session: Session) -> None:
    for s in session.streams:
        s.cancel()
    session.turns, session.pending, session.ranking, session.conversation_id, session.streams = [], None, None, None, []


def _no_accounts(deps: Deps) -> str:
    msg = "This server runs in open mode (--open): there are no accounts; enter your name instead."
    gr.Warning(msg)
    return msg


def sign_up(deps: Deps, session: Session, name: str, password: str, profile: str):
    """Create an account (name, password, optional profile) and log this session in.
    Returns (session, status)."""
    if deps.accounts is None:
        return session, _no_accounts(deps)
    try:
        account, token = deps.accounts.sign_up(name, password, profile)
    except (AccountError, StoreUnavailable) as exc:
        gr.Warning(str(exc))
        return session, f"{safe_markdown(str(exc))} · {status_text(deps, session)}"  # it may quote the name typed
    _adopt(deps, session, account, token)
    return session, f"Welcome, {safe_markdown(account.name)}: your account is ready. · {status_text(deps, session)}"


def log_in(deps: Deps, session: Session, name: str, password: str, ip: str = ""):
    """Log this session in. A wrong name or password gets one message, and repeated
    failures (per name and per address `ip`) must wait longer each time. Returns (session, status)."""
    if deps.accounts is None:
        return session, _no_accounts(deps)
    try:
        account, token = deps.accounts.log_in(name, password, ip)
    except (AccountError, StoreUnavailable) as exc:
        gr.Warning(str(exc))
        return session, f"{safe_markdown(str(exc))} · {status_text(deps, session)}"  # it may quote the name typed
    _adopt(deps, session, account, token)
    return session, status_text(deps, session)


def log_out(deps: Deps, session: Session):
    """End this session's log-in everywhere and empty the page. Returns (session, status)."""
    if deps.accounts is not None and session.token:
        _store(deps.accounts.log_out, session.token)
    _forget_user(session)
    _reset(session)
    return session, "Logged out. · " + status_text(deps, session)


def restore(deps: Deps, session: Session, token) -> tuple[Session, str]:
    """On page load: the log-in whose token the browser kept, if still valid, and the
    conversation it had open. Returns (session, status)."""
    if deps.accounts is None or not token:
        return session, status_text(deps, session)
    try:
        account = deps.accounts.account(token)
    except StoreUnavailable as exc:
        gr.Warning(str(exc))
        return session, status_text(deps, session)
    if account is None:
        return session, "Your log-in has expired: log in again. · " + status_text(deps, session)
    _reset(session)
    session.user_id, session.user_name, session.user_profile, session.token = account.user_id, account.name, account.profile, token
    if account.conversation_id:
        saved = _store(deps.store.conversation_state, account.conversation_id, account.user_id)
        if saved is not None:
            rebuild(session, saved)
    return session, status_text(deps, session)


def save_profile(deps: Deps, session: Session, profile: str):
    """Replace the signed-in user's profile (role, expertise). Returns (session, status)."""
    user_id, msg = _feedback_giver(deps, session)
    if user_id is None:
        return session, msg
    profile = (profile or "").strip()
    if len(profile) > MAX_PROFILE_CHARS:
        gr.Warning(f"A profile can have at most {MAX_PROFILE_CHARS} characters.")
        return session, status_text(deps, session)
    if _store(lambda: deps.store.set_profile(user_id, profile) or True) is None:
        return session, status_text(deps, session)
    session.user_profile = profile
    return session, "Profile saved. · " + status_text(deps, session)


def conversations(deps: Deps, session: Session) -> list[dict]:
    """The signed-in user's saved conversations, most recent first: [{conversation_id, title, updated_at}]."""
    if not _saves(deps, session) or _signed_in(deps, session) is None:
        return []
    return _store(deps.store.user_conversations, session.user_id, CONVERSATIONS_LISTED) or []


def open_conversation(deps: Deps, session: Session, conversation_id):
    """Reopen one of the signed-in user's saved conversations; the chat continues it and
    feedback on its replies counts as before. Returns (session, chatbot, status)."""
    user_id, msg = _feedback_giver(deps, session)
    if user_id is None:
        return session, display(session.turns), msg
    saved = _store(deps.store.conversation_state, str(conversation_id or ""), user_id)
    if saved is None:
        gr.Warning("There is no saved conversation of yours with that id.")
        return session, display(session.turns), status_text(deps, session)
    _reset(session)
    rebuild(session, saved)
    _remember_open(deps, session)
    return session, display(session.turns), f"Conversation “{safe_markdown(saved['title'])}” reopened. · " + status_text(deps, session)


def _start(deps: Deps, session: Session, message: str, system_prompt: str, temperature, top_p, max_new_tokens, n: int,
           ip: str = ""):
    """Validate a new message, count it against the rate limits of the sender and of
    address `ip`, and queue its n replies (one: the user's settings; more:
    `sampling_plan`). Returns (context, streams, variant, params), or else the reason
    nothing was sent, after telling the user."""
    def refuse(msg: str) -> str:
        gr.Warning(msg)
        return msg

    if session.pending:
        return refuse("Pick A, B, tie or both bad for the comparison above first.")
    if session.ranking:
        return refuse("Rank the replies above first: give each a place and save, or press All about the same.")
    try:
        text = validate_message(message, deps.args.max_message_chars)
        params = params_from(temperature, top_p, max_new_tokens)
    except ValueError as exc:
        return refuse(str(exc))
    limited = _limited(deps, "messages", _signed_in(deps, session), ip)
    if limited:
        return limited
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
        return refuse(str(exc))
    session.streams = streams
    if _ensure_conversation(deps, session, system_prompt):
        _store(deps.store.add_message, session.conversation_id, "user", text)
    session.turns.append(Turn("user", text))
    _persist(deps, session)
    return context, streams, variant, params


def _release(session: Session, streams: list[Stream]) -> None:
    """The browser went away or Stop was pressed: free the batch slots of unfinished replies."""
    for s in streams:
        if s.reply is None:
            s.cancel()
    session.streams = []


def _check_instead(deps: Deps, session: Session, message: str) -> list[dict] | None:
    """The two sides (A, B) of a check to show before the person's own replies to
    `message`, or None: drawn with `annotators.draw` at --gold-rate / --repeat-rate, for a
    person with a name, a message that could be sent, nothing waiting, and not right
    after a check. A gold item is one they have not answered, its better reply on a
    random side; a repeat is one of their comparisons made --repeat-after-minutes ago or
    earlier and never repeated, its sides swapped. No such item: None."""
    a = deps.args
    if session.user_id is None or session.pending or session.ranking or not (a.gold_rate or a.repeat_rate):
        return None
    try:
        validate_message(message, a.max_message_chars)
    except ValueError:
        return None
    if session.own_next:  # the message held back by a check: its own replies now
        session.own_next = False
        return None
    kind = annotators.draw(deps.check_rng, a.gold_rate, a.repeat_rate)
    if kind is None:
        return None
    rng, store, user_id = deps.check_rng, deps.store, session.user_id
    try:
        if kind == annotators.GOLD:
            candidates = store.unanswered_gold(user_id)
            if not candidates:
                return None
            item = store.gold_item(rng.choice(candidates))
            better_side = rng.choice("ab")
            check = {"kind": kind, "gold_id": item["id"], "better_side": better_side}
            texts = (item["better"], item["worse"]) if better_side == "a" else (item["worse"], item["better"])
            question = item["prompt"][-1]["content"]
            return [{"reply_id": None, "text": t, "version": "", "temperature": None, "question": question, "check": check}
                    for t in texts]
        before = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=a.repeat_after_minutes)
        candidates = store.repeat_candidates(user_id, before)
        if not candidates:
            return None
        original = store.comparison(rng.choice(candidates))
    except (FeedbackError, StoreUnavailable) as exc:
        log.warning("compare: no check shown, the store failed: %s", exc)
        return None
    check = {"kind": kind, "comparison_id": original["id"]}
    question = original["reply_a"]["context"][-1]["content"]
    return [{"reply_id": None, "text": r["text"], "version": r["adapter_version"], "temperature": r["params"].get("temperature"),
             "question": question, "check": check} for r in (original["reply_b"], original["reply_a"])]  # swapped


def check_panel(side: dict) -> list[dict]:
    """A check's side as a panel value: its question as the user turn, then its reply."""
    return [{"role": "user", "content": safe_markdown(side["question"])}, {"role": "assistant", "content": safe_markdown(side["text"])}]


def _decide_check(deps: Deps, session: Session, choice: str, user_id: int, ip: str):
    """`decide` on a check: store the answer (a gold answer, or a repeat answer in the
    original's terms), leave the conversation as it was. Returns what `decide` does."""
    a, b = session.pending
    check = a["check"]
    if limited := _limited(deps, "feedback", user_id, ip):
        return display(session.turns), gr.update(), gr.update(), SHOW, limited
    if check["kind"] == annotators.GOLD:
        saved = _store(deps.store.add_gold_answer, check["gold_id"], user_id, check["better_side"], choice)
    else:  # shown swapped: A was the original's B
        saved = _store(deps.store.add_repeat_answer, check["comparison_id"], user_id, {"a": "b", "b": "a"}.get(choice, choice))
    session.pending = None
    session.own_next = True
    _persist(deps, session)
    done = "Thanks, your choice is saved." if saved is not None else "Thanks (your choice could not be saved)."
    return (display(session.turns), "", "", HIDE,
            f"{done} Now send your message (it is still in the box) to get two replies to it. · " + status_text(deps, session))


def send(deps: Deps, session: Session, message: str, system_prompt: str, temperature, top_p, max_new_tokens, compare: bool,
         ip: str = ""):
    """Generator: append the user's message and stream one reply (or two, in compare mode).
    `ip`: the sender's address, for the rate limits.

    Yields (chatbot, textbox, reply_a, reply_b, compare_row, status); reply_a and reply_b
    are the texts of the sides as shown. In compare mode the comparison may be a check
    instead (`_check_instead`): the message then stays in the textbox, unsent."""
    if compare and (check := _check_instead(deps, session, message)) is not None:
        session.pending = check
        _persist(deps, session)
        question = html.escape(" ".join(check[0]["question"].split())[:200])
        yield (display(session.turns), gr.update(), check[0]["text"], check[1]["text"], SHOW,
               f"First, one comparison on another question: “{question}”. Which reply is better? Pick A, B, tie or "
               f"both bad; your message stays in the box, send it after you pick.")
        return
    started = _start(deps, session, message, system_prompt, temperature, top_p, max_new_tokens, 2 if compare else 1, ip)
    if isinstance(started, str):
        yield display(session.turns), gr.update(), gr.update(), gr.update(), gr.update(), f"{started} · {status_text(deps, session)}"
        return
    context, streams, variant, params = started
    try:
        if compare:
            yield from _stream_compare(deps, session, context, streams, variant, params)
        else:
            yield from _stream_single(deps, session, context, streams[0], "chat")
    finally:
        _release(session, streams)
        _persist(deps, session)


def send_rank(deps: Deps, session: Session, message: str, system_prompt: str, temperature, top_p, max_new_tokens, ip: str = ""):
    """Generator: append the user's message and stream `--rank-k` replies to rank.

    Yields (chatbot, textbox, *k reply texts as shown, rank_row, status)."""
    k = deps.args.rank_k
    started = _start(deps, session, message, system_prompt, temperature, top_p, max_new_tokens, k, ip)
    if isinstance(started, str):
        yield display(session.turns), gr.update(), *[gr.update()] * k, gr.update(), f"{started} · {status_text(deps, session)}"
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
        _persist(deps, session)
    yield (display(session.turns), "", *[r["text"] for r in session.ranking], SHOW,
           f"Put the {k} replies in order: give each a place (1st = best) and save, or press All about the same.")


def send_in_mode(deps: Deps, session: Session, message: str, system_prompt: str, temperature, top_p, max_new_tokens, mode: str,
                 ip: str = ""):
    """Generator behind the page's Send: `send` or `send_rank` by `mode` (one of MODES),
    with the replies shown as chat messages in their panels.

    Yields (chatbot, textbox, panel_a, panel_b, compare_row, *k rank panels, rank_row, status)."""
    k = deps.args.rank_k
    if mode not in MODES:
        gr.Warning(f"Unknown mode {mode!r}; pick one of {', '.join(MODES)}.")
        yield display(session.turns), gr.update(), gr.update(), gr.update(), gr.update(), *[gr.update()] * k, gr.update(), status_text(deps, session)
        return
    if mode == "rank":
        for chatbot, box, *rest in send_rank(deps, session, message, system_prompt, temperature, top_p, max_new_tokens, ip):
            *texts, row, status = rest
            yield chatbot, box, gr.update(), gr.update(), gr.update(), *map(panel, texts), row, status
        return
    for chatbot, box, a, b, row, status in send(deps, session, message, system_prompt, temperature, top_p, max_new_tokens, mode == "compare", ip):
        if session.pending and session.pending[0].get("check"):  # a check: each panel shows its question too
            a, b = map(check_panel, session.pending)
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
    turn.version = stream.reply.adapter_version
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


def decide(deps: Deps, session: Session, choice: str, ip: str = ""):
    """Record a side-by-side choice (one per comparison per person); the chosen reply (A
    on a tie or both bad) continues the chat.

    Returns (chatbot, reply_a, reply_b, compare_row, status)."""
    if not session.pending:
        gr.Warning("There is no comparison waiting for a vote.")
        return display(session.turns), gr.update(), gr.update(), HIDE, status_text(deps, session)
    user_id, msg = _feedback_giver(deps, session)
    if user_id is None:
        return display(session.turns), gr.update(), gr.update(), SHOW, msg
    if session.pending[0].get("check"):
        return _decide_check(deps, session, choice, user_id, ip)
    a, b = session.pending
    saved = None
    if a["reply_id"] and b["reply_id"]:
        if limited := _limited(deps, "feedback", user_id, ip):
            return display(session.turns), gr.update(), gr.update(), SHOW, limited
        saved = _store(deps.store.add_comparison, a["reply_id"], b["reply_id"], choice, user_id, once=True)
    else:
        gr.Warning("These replies were not saved, so the vote cannot be stored; the chat goes on.")
    keep = b if choice == "b" else a
    session.turns.append(Turn("assistant", keep["text"], keep["reply_id"], version=keep.get("version", "")))
    session.pending = None
    _persist(deps, session)
    label = {"a": "A is better", "b": "B is better", "tie": "a tie", "both_bad": "both bad"}[choice]
    note = "" if saved else " (not saved)"
    reveal = (f"You chose {label}{note}. A came from adapter `{a['version']}`, B from `{b['version']}` "
              f"(sampled at temperature {a['temperature']:g} and {b['temperature']:g}).")
    if choice == "both_bad":
        reveal += " A continues the chat; you can edit it into a better reply."
    return display(session.turns), "", "", HIDE, reveal + " · " + status_text(deps, session)


def rank(deps: Deps, session: Session, order, ip: str = ""):
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
    user_id, msg = _feedback_giver(deps, session)
    if user_id is None:
        return display(session.turns), SHOW, msg
    saved = None
    if all(r["reply_id"] for r in shown):
        if limited := _limited(deps, "feedback", user_id, ip):
            return display(session.turns), SHOW, limited
        if best_first is None:
            saved = _store(deps.store.add_ties, [r["reply_id"] for r in shown], user_id, once=True)
        else:
            saved = _store(deps.store.add_ranking, [shown[n - 1]["reply_id"] for n in best_first], user_id, once=True)
    else:
        gr.Warning("These replies were not saved, so the ranking cannot be stored; the chat goes on.")
    best = best_first[0] if best_first else 1
    keep = shown[best - 1]
    session.turns.append(Turn("assistant", keep["text"], keep["reply_id"], version=keep.get("version", "")))
    session.ranking = None
    _persist(deps, session)
    k, note = len(shown), "" if saved else " (not saved)"
    if best_first is None:
        reveal = f"Saved as a tie: the {k} replies are all about the same{note}."
    else:
        reveal = f"Ranking saved{note}: reply {' > '.join(map(str, best_first))} ({k * (k - 1) // 2} preference pairs)."
    first, *others = shown
    reveal += (f" Reply 1 came from adapter {_origin(first)}" + "".join(f", reply {i} from {_origin(r)}" for i, r in enumerate(others, start=2))
               + f". Reply {best} continues the chat.")
    return display(session.turns), HIDE, reveal + " · " + status_text(deps, session)


def rank_by_places(deps: Deps, session: Session, *places, ip: str = ""):
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
    out = rank(deps, session, order, ip)
    return (*out, *([None] * len(places) if session.ranking is None else keep))


def rank_tie(deps: Deps, session: Session, *places, ip: str = ""):
    """The page's *All about the same*. Returns (chatbot, rank_row, status, *places)."""
    out = rank(deps, session, "tie", ip)
    return (*out, *([None] * len(places) if session.ranking is None else [gr.update()] * len(places)))


def _vote(deps: Deps, session: Session, index: int, value: int, reason: str, ip: str = "") -> tuple[bool, str]:
    """Store a thumbs vote on the assistant message at chat position `index`: (stored, status)."""
    user_id, msg = _feedback_giver(deps, session)
    if user_id is None:
        return False, msg
    if not isinstance(index, int) or not 0 <= index < len(session.turns) or session.turns[index].role != "assistant":
        gr.Warning("That message is not an assistant reply in this conversation.")
        return False, status_text(deps, session)
    turn = session.turns[index]
    if turn.reply_id is None:
        gr.Warning("This message was not stored as a model reply (it is an edit, or saving failed), so it cannot be voted on.")
        return False, status_text(deps, session)
    if limited := _limited(deps, "feedback", user_id, ip):
        return False, limited
    if _store(deps.store.set_vote, turn.reply_id, user_id, int(value), (reason or "").strip()) is None:
        return False, status_text(deps, session)
    word = {1: "👍 recorded", -1: "👎 recorded", 0: "vote removed"}[int(value)]
    return True, f"{word} · " + status_text(deps, session)


def record_vote(deps: Deps, session: Session, index: int, value: int, reason: str, ip: str = "") -> str:
    """Store a thumbs vote on the assistant message at chat position `index`; returns the status line."""
    return _vote(deps, session, index, value, reason, ip)[1]


def on_like(deps: Deps, session: Session, reason: str, data: gr.LikeData, ip: str = ""):
    """A 👍/👎 (or a reason from the flag menu) on a reply, with the *Why?* text as part of
    its reason. Once the vote is stored the *Why?* box is cleared, so its text belongs to
    this vote only; removing a vote takes no reason and leaves the box as it is.

    Returns (session, status, why_box)."""
    value, option = vote_value(data.liked)
    index = data.index if isinstance(data.index, int) else data.index[0]
    why = (reason or "").strip() if value != 0 else ""
    stored, status = _vote(deps, session, index, value, "; ".join(r for r in (option, why) if r), ip)
    return session, status, "" if stored and why else gr.update()


def api_vote(deps: Deps, session: Session, index, value, reason: str, ip: str = ""):
    """API twin of the like button: vote on message `index` with value 1, -1 or 0."""
    try:
        index, value = int(index), int(value)
    except (TypeError, ValueError):
        gr.Warning("index and value must be integers")
        return session, status_text(deps, session)
    if value not in (1, -1, 0):
        gr.Warning("value must be 1 (up), -1 (down) or 0 (remove)")
        return session, status_text(deps, session)
    return session, record_vote(deps, session, index, value, reason, ip)


def on_edit(deps: Deps, session: Session, data: gr.EditData, ip: str = ""):
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
    user_id, msg = _feedback_giver(deps, session)
    if user_id is None:
        return session, display(session.turns), msg
    if turn.reply_id is None:
        gr.Warning("This message was not stored as a model reply, so the correction cannot be linked to it.")
        return session, display(session.turns), status_text(deps, session)
    if limited := _limited(deps, "feedback", user_id, ip):
        return session, display(session.turns), limited
    if _store(deps.store.add_correction, turn.reply_id, new_text, user_id) is None:
        return session, display(session.turns), status_text(deps, session)
    dropped = len(session.turns) - index - 1
    session.turns[index:] = [Turn("assistant", new_text, None, note="edited")]
    _persist(deps, session)
    msg = "Correction saved; the chat continues from your edited reply."
    if dropped:
        msg += f" The {dropped} later message(s) were removed."
    return session, display(session.turns), msg + " · " + status_text(deps, session)


def api_correct(deps: Deps, session: Session, index, text: str, ip: str = ""):
    """API twin of the edit (✏️) on a reply: correct message `index` into `text`."""
    try:
        index = int(index)
    except (TypeError, ValueError):
        gr.Warning("index must be an integer")
        return session, status_text(deps, session)
    previous = session.turns[index].content if 0 <= index < len(session.turns) else ""
    session, _, status = on_edit(deps, session, SimpleNamespace(index=index, value=text or "", previous_value=previous), ip)
    return session, status


def regenerate(deps: Deps, session: Session, system_prompt: str, temperature, top_p, max_new_tokens, ip: str = ""):
    """Generator: replace the last assistant reply with a fresh one (the old one stays
    stored). It counts as a message for the rate limits."""
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
    if limited := _limited(deps, "messages", _signed_in(deps, session), ip):
        yield display(session.turns), gr.update(), gr.update(), gr.update(), gr.update(), limited
        return
    context = session.context(system_prompt or "")[:-1]  # without the reply being replaced
    try:
        stream = deps.engine.submit(context, params)
    except (PromptTooLong, QueueFull, ValueError) as exc:
        gr.Warning(str(exc))
        yield display(session.turns), gr.update(), gr.update(), gr.update(), gr.update(), status_text(deps, session)
        return
    session.turns.pop()
    session.streams = [stream]
    _ensure_conversation(deps, session, system_prompt or "")
    try:
        yield from _stream_single(deps, session, context, stream, "regenerate")
    finally:
        if stream.reply is None:
            stream.cancel()
        session.streams = []
        _persist(deps, session)


def clear(deps: Deps, session: Session):
    """Start over: a new conversation; an undecided comparison or ranking is dropped.
    Returns (session, chatbot, reply_a, reply_b, compare_row, status)."""
    _reset(session)
    _remember_open(deps, session)  # a fresh page after a reload, too
    return session, [], "", "", HIDE, status_text(deps, session)


def clear_page(deps: Deps, session: Session):
    """The page's *Clear*: `clear`, with every panel emptied and the places unset.
    Returns (session, chatbot, panel_a, panel_b, compare_row, *k rank panels, *k places, rank_row, status)."""
    session, chatbot, _, _, compare_row, status = clear(deps, session)
    k = deps.args.rank_k
    return session, chatbot, [], [], compare_row, *[[]] * k, *[None] * k, HIDE, status


# ---------------------------------------------------------------- the page in accounts mode
def conversation_choices(deps: Deps, session: Session):
    """The conversation list's update: the user's saved conversations, most recent first,
    the open one selected."""
    listed = conversations(deps, session)
    choices = [(f"{c['title'] or '(untitled)'} · {c['updated_at'][:16].replace('T', ' ')}", c["conversation_id"]) for c in listed]
    value = session.conversation_id if any(v == session.conversation_id for _, v in choices) else None
    return gr.update(choices=choices, value=value)


def account_page(deps: Deps, session: Session, status: str) -> tuple:
    """The whole page after a sign-up, log-in, log-out, reload or reopened conversation.

    Returns (session, browser token, login_row, account_row, password box, profile box,
    conversations box, conversation list, system prompt, chatbot, panel_a, panel_b,
    compare_row, *k rank panels, *k places, rank_row, status)."""
    k = deps.args.rank_k
    signed = session.user_id is not None
    pending, ranking = session.pending or [], (session.ranking or [])[:k]
    return (
        session, session.token, gr.update(visible=not signed), gr.update(visible=signed),
        "" if signed else gr.update(), session.user_profile if signed else "",
        gr.update(visible=signed), conversation_choices(deps, session),
        session.system_prompt if session.conversation_id is not None else gr.update(),
        display(session.turns), panel(pending[0]["text"]) if pending else [], panel(pending[1]["text"]) if pending else [],
        SHOW if pending else HIDE, *[panel(r["text"]) for r in ranking], *[[]] * (k - len(ranking)), *[None] * k,
        SHOW if ranking else HIDE, status,
    )


def sign_up_page(deps: Deps, session: Session, name: str, password: str, profile: str):
    return account_page(deps, *sign_up(deps, session, name, password, profile))


def log_in_page(deps: Deps, session: Session, name: str, password: str, ip: str = ""):
    return account_page(deps, *log_in(deps, session, name, password, ip))


def log_out_page(deps: Deps, session: Session):
    return account_page(deps, *log_out(deps, session))


def restore_page(deps: Deps, session: Session, token):
    return account_page(deps, *restore(deps, session, token))


def open_conversation_page(deps: Deps, session: Session, conversation_id):
    session, _, status = open_conversation(deps, session, conversation_id)
    return account_page(deps, session, status)


def decide_page(deps: Deps, session: Session, choice: str, ip: str = ""):
    """`decide` with the sides' texts as panel values."""
    return _panels(decide(deps, session, choice, ip), (1, 2))


def _handler(deps: Deps, fn: Callable, n_inputs: int, *extra) -> Callable:
    """`fn(deps, *inputs, *extra)` as a Gradio handler of `n_inputs` inputs. Gradio also
    hands it the request, whose client address goes to `fn` as `ip` when `fn` takes one
    (the rate limits and the log-in back-off count per address)."""
    takes_ip = "ip" in inspect.signature(fn).parameters
    names = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "ip"][1:]
    names = (names + [f"input_{i}" for i in range(len(names), n_inputs)])[:n_inputs]

    def call(args):
        *values, request = args
        return fn(deps, *values, *extra, **({"ip": client_ip(request)} if takes_ip else {}))

    if inspect.isgeneratorfunction(fn):
        def wrapped(*args):
            yield from call(args)
    else:
        def wrapped(*args):
            return call(args)
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    wrapped.__signature__ = inspect.Signature([inspect.Parameter(n, positional) for n in names]
                                              + [inspect.Parameter("request", positional, annotation=gr.Request)])
    wrapped.__annotations__ = {"request": gr.Request}
    wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
    return wrapped


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
    accounts = deps.accounts is not None
    with gr.Blocks(title="Assistant") as demo:
        session = gr.State(Session())
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Chat", id="chat", elem_id="chat-tab"):
                gr.Markdown("## Assistant\nChat, then tell it what was good or bad: 👍/👎 on a reply, ✏️ edit a reply into a better one, "
                            f"or switch the mode to *Compare* (pick between two anonymous replies) or *Rank* (put {k} in order). "
                            "Your feedback trains the next version.")
                if accounts:
                    login_state = gr.BrowserState(None, storage_key="assistant-login")  # the session token, nothing else
                    with gr.Row(elem_id="login-row") as login_row:
                        account_name = gr.Textbox(label="Name", scale=2, max_length=100, elem_id="account-name")
                        account_password = gr.Textbox(label="Password", type="password", scale=2, max_length=1024, elem_id="account-password")
                        profile = gr.Textbox(label="Profile (optional, for sign-up)", placeholder="role or expertise, e.g. 'nurse', 'Python developer'",
                                             scale=3, max_length=300, elem_id="user-profile")
                        with gr.Column(scale=1, min_width=120):
                            log_in_btn = gr.Button("Log in", variant="primary", elem_id="log-in")
                            sign_up_btn = gr.Button("Sign up", elem_id="sign-up")
                    with gr.Row(visible=False, elem_id="account-row") as account_row:
                        profile_edit = gr.Textbox(label="Your profile (role, expertise)", scale=4, max_length=300, elem_id="profile-edit")
                        save_profile_btn = gr.Button("Save profile", scale=1, elem_id="save-profile")
                        log_out_btn = gr.Button("Log out", scale=1, elem_id="log-out")
                    with gr.Accordion("Your conversations", open=True, visible=False, elem_id="history") as history:
                        conversation_list = gr.Radio([], value=None, label="Most recent first: pick one to continue it", elem_id="conversations")
                else:
                    with gr.Row():
                        name = gr.Textbox(label="Your name", placeholder="needed once to give feedback", scale=2, max_length=100, elem_id="user-name")
                        profile = gr.Textbox(label="Profile (optional)", placeholder="role or expertise, e.g. 'nurse', 'Python developer'", scale=3, max_length=300, elem_id="user-profile")
                        save_user = gr.Button("Save", scale=1, elem_id="save-user")
                status = gr.Markdown(first_step(deps), elem_id="status")
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
        if accounts:  # and /sign_up, /log_in, /log_out, /conversations and /open_conversation
            api_name_box = gr.Textbox(visible=False)
            api_password = gr.Textbox(visible=False, type="password")
            api_profile = gr.Textbox(visible=False)
            api_listed = gr.JSON(visible=False)
            api_account_btns = {name: gr.Button(visible=False) for name in ("sign_up", "log_in", "log_out", "conversations", "open_conversation")}

        def on(event, fn, inputs, outputs, *extra, **kwargs):
            """Wire `event` to `fn(deps, *inputs, *extra)` (with the client's address, see `_handler`)."""
            return event(_handler(deps, fn, len(inputs), *extra), inputs, outputs, **kwargs)

        def like_handler(session: Session, reason: str, data: gr.LikeData, request: gr.Request):
            return on_like(deps, session, reason, data, client_ip(request))

        def edit_handler(session: Session, data: gr.EditData, request: gr.Request):
            return on_edit(deps, session, data, client_ip(request))

        gen_limit = a.max_batch * 2
        private = {"api_visibility": "private", "concurrency_limit": None}
        page_outputs = [chatbot, msg, reply_a, reply_b, compare_row, *rank_views, rank_row, status]
        page_inputs = [session, msg, system_prompt, temperature, top_p, max_new, mode]
        # After anything that changes the conversation, the list of saved ones follows (accounts mode).
        then = (lambda dep: dep.then(_handler(deps, conversation_choices, 1), [session], [conversation_list], **private)) if accounts \
            else (lambda dep: dep)
        then(on(msg.submit, send_in_mode, page_inputs, page_outputs, api_visibility="private", concurrency_limit=gen_limit))
        then(on(send_btn.click, send_in_mode, page_inputs, page_outputs, api_visibility="private", concurrency_limit=gen_limit))
        generate_inputs = [session, msg, system_prompt, temperature, top_p, max_new]
        then(on(api_send_btn.click, send, [*generate_inputs, api_compare], [chatbot, msg, *api_texts[:2], compare_row, status],
                api_name="send", concurrency_limit=gen_limit))
        then(on(api_send_rank_btn.click, send_rank, generate_inputs, [chatbot, msg, *api_texts[:k], rank_row, status],
                api_name="send_rank", concurrency_limit=gen_limit))
        stream_outputs = [chatbot, msg, reply_a, reply_b, compare_row, status]
        regen_inputs = [session, system_prompt, temperature, top_p, max_new]
        then(on(regen_btn.click, regenerate, regen_inputs, stream_outputs, api_name="regenerate", concurrency_limit=gen_limit))
        then(on(chatbot.retry, regenerate, regen_inputs, stream_outputs, api_visibility="private", concurrency_limit=gen_limit))
        stop_btn.click(stop, [session], [session], api_name="stop", concurrency_limit=None)
        clear_outputs = [session, chatbot, reply_a, reply_b, compare_row, *rank_views, *rank_places, rank_row, status]
        then(on(clear_btn.click, clear_page, [session], clear_outputs, api_name="clear", concurrency_limit=None))
        then(on(chatbot.clear, clear_page, [session], clear_outputs, **private))
        if not accounts:  # open mode: a typed name is who you are
            on(save_user.click, set_user, [session, name, profile], [session, status], api_name="set_user", concurrency_limit=None)
            on(name.submit, set_user, [session, name, profile], [session, status], **private)
        chatbot.like(like_handler, [session, reason], [session, status, reason], **private)
        then(chatbot.edit(edit_handler, [session], [session, chatbot, status], **private))
        on(api_vote_btn.click, api_vote, [session, api_index, api_value, reason], [session, status], api_name="vote", concurrency_limit=None)
        then(on(api_correct_btn.click, api_correct, [session, api_index, api_text], [session, status], api_name="correct", concurrency_limit=None))
        decide_outputs = [chatbot, reply_a, reply_b, compare_row, status]
        for button, choice in ((pick_a, "a"), (pick_b, "b"), (pick_tie, "tie"), (pick_bad, "both_bad")):
            then(on(button.click, decide_page, [session], decide_outputs, choice, api_name=f"choose_{choice}", concurrency_limit=None))
        rank_outputs = [chatbot, rank_row, status, *rank_places]
        then(on(rank_save.click, rank_by_places, [session, *rank_places], rank_outputs, **private))
        then(on(rank_same.click, rank_tie, [session, *rank_places], rank_outputs, **private))
        then(on(api_rank_btn.click, rank, [session, api_order], [chatbot, rank_row, status], api_name="rank", concurrency_limit=None))
        if accounts:
            page = [session, login_state, login_row, account_row, account_password, profile_edit, history, conversation_list,
                    system_prompt, chatbot, reply_a, reply_b, compare_row, *rank_views, *rank_places, rank_row, status]
            demo.load(_handler(deps, restore_page, 2), [session, login_state], page, **private)
            on(log_in_btn.click, log_in_page, [session, account_name, account_password], page, **private)
            on(account_password.submit, log_in_page, [session, account_name, account_password], page, **private)
            on(sign_up_btn.click, sign_up_page, [session, account_name, account_password, profile], page, **private)
            on(log_out_btn.click, log_out_page, [session], page, **private)
            on(conversation_list.input, open_conversation_page, [session, conversation_list], page, **private)
            on(save_profile_btn.click, save_profile, [session, profile_edit], [session, status], **private)
            api = api_account_btns
            on(api["sign_up"].click, sign_up, [session, api_name_box, api_password, api_profile], [session, status], api_name="sign_up", concurrency_limit=None)
            on(api["log_in"].click, log_in, [session, api_name_box, api_password], [session, status], api_name="log_in", concurrency_limit=None)
            on(api["log_out"].click, log_out, [session], [session, status], api_name="log_out", concurrency_limit=None)
            on(api["conversations"].click, conversations, [session], [api_listed], api_name="conversations", concurrency_limit=None)
            on(api["open_conversation"].click, open_conversation, [session, api_text], [session, chatbot, status],
               api_name="open_conversation", concurrency_limit=None)
    return demo


def _panels(values: tuple, positions: tuple[int, ...]) -> tuple:
    """`values` with the reply texts at `positions` turned into panel values."""
    return tuple(panel(v) if i in positions else v for i, v in enumerate(values))
