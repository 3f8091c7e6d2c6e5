"""Closed-loop benchmark: simulated users teach the running app a hidden preference over several training cycles.

    .venv/bin/python bench/loop.py                          # "shorter" users, 3 cycles, the app's default trainer settings
    .venv/bin/python bench/loop.py --preference fuller      # users who like longer, fuller replies
    .venv/bin/python bench/loop.py --preference listy       # users who like replies laid out as a list
    .venv/bin/python bench/loop.py --preference summary     # users who want a reply to open with "In short: ..."
    .venv/bin/python bench/loop.py --preference coin        # the control: users who flip a coin
    .venv/bin/python bench/loop.py --policy-step dpo        # another policy step (labelled: not the default)
    .venv/bin/python bench/loop.py --cycles 2 --feedback-prompts 8 --heldout-prompts 8 --users 2   # smoke run

Everything goes through the real processes, as in production: the app (`app.py`,
started by tests.server.running_app with --no-trainer and a 1 s --watch-interval)
serves the default model, simulated users drive it with gradio_client, and the
trainer runs each cycle as `python -m trainer once` on the app's files. All state
(feedback.db, adapters/, reward/, lock, cycles log) lives in a temporary directory.
Each cycle runs the trainer at its defaults: it gets only the file flags (--db,
--adapters-dir, --reward-dir, --lock-file, --cycles-log) and the model flags
(--model, --quantize, --device). --trainer-args adds flags; every result is then
labelled "trainer settings overridden: ..." in the tables and the JSON, since the
point of the benchmark is to measure the defaults.

A simulated user holds a hidden preference, a small class (`--preference`) with a
`score` (higher is better; equal scores are a tie), a `thumb` (👍/👎 and a reason)
and a `rewrite` (the correction the user types, or None):
- shorter: score = −(words); an empty reply is the worst. 👍 for 1..--short-words
  words. Correction: the reply cut after its last sentence that fits in
  --short-words words (its first --short-words words when the first sentence is
  longer; the first sentence of the task's reference output when the reply is empty);
  a reply that already fits is left as it is.
- fuller: score = words, capped at --full-words; a degenerate reply (more than half
  of its 8+ words one word, or of its 3+ lines one line) scores 0. 👍 for at least
  --full-words / 2 words. Correction: the reply, a blank line, then the seed task's
  human-written reference output (the reference alone when the reply is degenerate).
- listy: score = lines that start with "- ", "* ", "• ", "N." or "N)", capped at 5
  (a format preference, not a length one). 👍 for 2 or more. Correction: the reply's
  sentences (split at sentence ends and newlines) as "- " bullet lines, when it has
  2 or more sentences.
- summary: replies that open with a one-line summary, "In short: ...": score 2 when
  the first non-empty line starts with "In short:" and has at most 30 words, 1 when
  some other line does, 0 otherwise, −1 for an empty reply. 👍 for 2. A format the
  base model almost never produces by itself, so A/B choices are mostly ties and the
  corrections carry the signal. Correction: "In short: " and the reply's first
  sentence (cut to 25 words), a blank line, then the reply (for an empty reply, the
  first sentence of the task's reference output alone).
- coin: the control. Each user flips a coin seeded from --seed and the user's name:
  A or B at random, 👍 or 👎 at random, never a correction. Its win rates are judged
  by a fair coin seeded per pair; the figure that counts is its promotions (0 of N
  cycles is the expected answer).

Prompts: seed tasks of /work/shared/data/seed-tasks.jsonl whose user message (the
instruction, then the task's input when it has one, as in bench/ppo.py) is at most
--max-prompt-chars long, shuffled with --seed, then split: the first
--heldout-prompts are held out for the measurement and never get feedback; each
cycle then takes the next --feedback-prompts, a slice no other cycle uses. The
benchmark stops with an error when the pool is too small for that.

Every message is sent with the app's served sampling defaults (temperature, top-p,
max new tokens of assistant.config.ServeArgs) unless --temperature, --top-p or
--max-new-tokens override them (labelled in the JSON).

Phases:
1. baseline, once: on the held-out prompts, --users clients each send their share
   as plain chats (--samples replies per prompt) to the app serving `base`. No
   feedback is given on them.
2. per cycle k = 1..--cycles:
   a. feedback on the cycle's own prompts, --users clients at once. Per prompt, a
      user either (share 1 − --chat-share) sends it in Compare mode, picks A, B or tie
      by the hidden preference and thumbs the reply that continues the chat, or sends
      it as a plain chat and thumbs the reply. On a --correct-share of these items
      (chosen from --seed) the user then corrects that reply with the preference's
      rewrite, through the app's /correct, when it differs from the reply.
   b. training: `python -m trainer once` on the app's files (see above). Before it,
      the store's feedback prompts (those of replies with a vote, comparison or
      correction) are checked to include no held-out prompt. The held-out
      measurement chats are in the store as replies without feedback
      (`heldout_in_store` in the JSON): the trainer's own held-out split decides which
      prompts PPO uses; the hidden-preference measurement below stays on the
      benchmark's held-out prompts.
   c. when the cycle's decision is "promoted", wait until the app reports
      "serving adapter `vNNNNNN`", then send the held-out prompts again (same
      samples) to the new adapter. Otherwise nothing is measured: the served adapter
      did not change, and its figures carry over.

What is measured, per cycle: the decision and its reasons; the hidden-preference
win rate of the served adapter against the base and against the previously served
adapter (base for the first promotion), pairing replies to the same held-out prompt
and sample index (a win counts 1, a tie ½), with 95% Wilson intervals and the number
of pairs; the served adapter's mean words and share of replies that ended (emitted
EOS, from the replies table); from the trainer's cycles log the KL to the parent and
to the base, the reward model's validation accuracy and the gate's judge win rate
with their intervals; for every candidate the gate judged, promoted or not, its judged
pairs (the adapter's evaluation.jsonl) scored again by the hidden preference: the
candidate's win rate there and how often the gate's judge picked the hidden
preference's side (a wrong refusal shows as a high hidden win rate on a rejected
candidate); the wall time of feedback, trainer, hot-swap wait and
measurement. Summary: the served adapter's win rate against the base after the last
cycle, the promotions, and the regressions (promotions whose win rate against the
previous adapter has a 95% interval wholly below 0.5). The policy step's metrics
(candidate manifest: PPO's per iteration, the TRL steps' per optimiser step, rows
used) go to the JSON, with one line each on the console. Prints
Markdown tables and writes bench/results/loop-PREFERENCE.json (or --out). The file is
also written after the baseline and after every cycle, marked "partial", so a run cut
short keeps what it measured; the last write, without that mark, is the whole run.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import queue
import random
import re
import shlex
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models only from local paths

from gradio_client import Client  # noqa: E402

from assistant.config import DEFAULT_MODEL, ServeArgs  # noqa: E402
from bench.common import RESULTS, SEED_TASKS, SYSTEM, machine, seed_tasks, task_prompt, write_results  # noqa: E402
from trainer.config import POLICY_STEPS, PolicyArgs  # noqa: E402  (stdlib-only dataclasses)

VERSION_RE = re.compile(r"serving adapter `([^`]+)`")
TQDM_STEP = re.compile(r"^(?P<desc>[^:|]+):\s+\d+%\|[^|]*\|\s*(?P<step>\d+/\d+)")  # a tqdm bar's "name: 40%|███ | 4/10"
LOG_LINE_START = re.compile(r"(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} )")  # a log line glued to a tqdm update
FILE_FLAGS = ("--db", "--adapters-dir", "--reward-dir", "--lock-file", "--cycles-log")
MODEL_FLAGS = ("--model", "--quantize", "--device")


# -- hidden preferences ----------------------------------------------------------------

LIST_LINE = re.compile(r"^\s*(?:[-*•]\s|\d+[.)](?:\s|$))")  # "- ", "* ", "• ", "1." or "1)"
LIST_MARKER = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")
SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+")
SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)|\n")


def sentences(text: str) -> list[str]:
    """The text's sentences: split at newlines and at . ! ? followed by a space; list markers dropped."""
    out = []
    for line in text.splitlines():
        line = LIST_MARKER.sub("", line).strip()
        out += [s.strip() for s in SENTENCE_SPLIT.split(line) if s.strip()]
    return out


def reference(task: dict) -> str:
    """The seed task's human-written reference output."""
    return task["instances"][0]["output"].strip()


def degenerate(text: str) -> bool:
    """More than half of the words one word (8+ words), or of the lines one line (3+ lines)."""
    words = text.lower().split()
    if len(words) >= 8 and Counter(words).most_common(1)[0][1] / len(words) > 0.5:
        return True
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return len(lines) >= 3 and Counter(lines).most_common(1)[0][1] / len(lines) > 0.5


def cut_to_words(text: str, max_words: int) -> str:
    """`text` up to its last sentence end within `max_words` words; its first `max_words` words when
    the first sentence is longer; unchanged when it has at most `max_words` words."""
    text = text.strip()
    words = text.split()
    if len(words) <= max_words:
        return text
    best = ""
    for m in SENTENCE_END.finditer(text):
        head = text[: m.end()].strip()
        if len(head.split()) > max_words:
            break
        best = head or best
    return best or " ".join(words[:max_words])


class Preference:
    """A hidden preference; the subclasses set name and description and define score and thumb."""

    name = ""
    description = ""
    control = False  # True for the coin-flip control

    def seeded(self, name: str) -> Preference:
        """The preference as held by one user (or used to judge one pair): itself, unless it is random."""
        return self

    def score(self, text: str) -> float:
        raise NotImplementedError

    def thumb(self, text: str) -> tuple[int, str]:
        raise NotImplementedError

    def rewrite(self, text: str, task: dict) -> str | None:
        return None


class Shorter(Preference):
    """Prefers shorter replies: fewer words is better; an empty reply is the worst."""

    name = "shorter"
    description = "prefers shorter replies"

    def __init__(self, max_words: int = 30):
        self.max_words = max_words

    def score(self, text: str) -> float:
        words = len(text.split())
        return -math.inf if words == 0 else -float(words)

    def thumb(self, text: str) -> tuple[int, str]:
        words = len(text.split())
        return (1, "") if 0 < words <= self.max_words else (-1, "Too long" if words else "Unhelpful")

    def rewrite(self, text: str, task: dict) -> str | None:
        if text.split():
            return cut_to_words(text, self.max_words)
        first = sentences(reference(task))[:1]
        return cut_to_words(first[0], self.max_words) if first else None


class Fuller(Preference):
    """Prefers longer, fuller replies: words up to a cap; a degenerate (repetitive) reply scores 0."""

    name = "fuller"
    description = "prefers longer, fuller replies"

    def __init__(self, full_words: int = 150):
        self.full_words = full_words

    def score(self, text: str) -> float:
        return 0.0 if degenerate(text) else float(min(len(text.split()), self.full_words))

    def thumb(self, text: str) -> tuple[int, str]:
        return (1, "") if self.score(text) >= self.full_words / 2 else (-1, "Too short")

    def rewrite(self, text: str, task: dict) -> str | None:
        ref = reference(task)
        if not ref.split():
            return None
        body = "" if degenerate(text) else text.strip()
        return f"{body}\n\n{ref}" if body else ref


class Listy(Preference):
    """Prefers replies laid out as a list: lines that start with a bullet or a number, up to 5."""

    name = "listy"
    description = "prefers replies laid out as a list"

    def score(self, text: str) -> float:
        return float(min(sum(bool(LIST_LINE.match(line)) for line in text.splitlines()), 5))

    def thumb(self, text: str) -> tuple[int, str]:
        return (1, "") if self.score(text) >= 2 else (-1, "Not a list")

    def rewrite(self, text: str, task: dict) -> str | None:
        parts = sentences(text)
        return "\n".join(f"- {s}" for s in parts) if len(parts) >= 2 else None


SUMMARY_LEAD = re.compile(r"^\s*(?:[*_#>]+\s*)?in short\s*:", re.IGNORECASE)


class Summary(Preference):
    """Prefers replies that open with a one-line summary ("In short: ..."); 2 when the first
    line is one of at most 30 words, 1 when a later line is, 0 without one, −1 for an empty reply."""

    name = "summary"
    description = 'prefers replies that open with a one-line "In short:" summary'
    max_words = 30

    def score(self, text: str) -> float:
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            return -1.0
        if SUMMARY_LEAD.match(lines[0]) and len(lines[0].split()) <= self.max_words:
            return 2.0
        return 1.0 if any(SUMMARY_LEAD.match(line) for line in lines) else 0.0

    def thumb(self, text: str) -> tuple[int, str]:
        return (1, "") if self.score(text) >= 2 else (-1, "Unhelpful" if not text.strip() else "No summary first")

    def rewrite(self, text: str, task: dict) -> str | None:
        if self.score(text) >= 2:
            return None
        body = text.strip()
        first = sentences(body)[:1] or sentences(reference(task))[:1]
        if not first:
            return None
        lead = "In short: " + cut_to_words(first[0], self.max_words - 5)
        return f"{lead}\n\n{body}" if body else lead


class Coin(Preference):
    """The control: a coin flip (seeded from --seed and the user's name) decides every choice and thumb."""

    name = "coin"
    description = "flips a coin (the control)"
    control = True

    def __init__(self, seed: int = 0, user: str = ""):
        self.seed, self.user = seed, user
        self.rng = random.Random(f"{seed}:{user}")

    def seeded(self, name: str) -> Coin:
        return Coin(self.seed, name)

    def score(self, text: str) -> float:
        return self.rng.random()  # two replies: A or B at random

    def thumb(self, text: str) -> tuple[int, str]:
        return (1, "") if self.rng.random() < 0.5 else (-1, "Dislike")


PREFERENCES = {"shorter": Shorter, "fuller": Fuller, "listy": Listy, "summary": Summary, "coin": Coin}


def make_preference(args: argparse.Namespace) -> Preference:
    if args.preference == "shorter":
        return Shorter(args.short_words)
    if args.preference == "fuller":
        return Fuller(args.full_words)
    if args.preference == "coin":
        return Coin(args.seed)
    return PREFERENCES[args.preference]()


def judge(pref, text_a: str, text_b: str) -> str:
    """'a', 'b' or 'tie' by the hidden preference."""
    a, b = pref.score(text_a), pref.score(text_b)
    return "a" if a > b else "b" if b > a else "tie"


def correction(pref, text: str, task: dict) -> str | None:
    """The correction the user sends for reply `text`, or None (no rewrite, or the same text)."""
    new = pref.rewrite(text, task)
    return new if new and new.strip() and new.strip() != text.strip() else None


# -- prompts -----------------------------------------------------------------------------


def split_prompts(max_chars: int, heldout: int, feedback: int, cycles: int, seed: int,
                  path: Path = SEED_TASKS) -> tuple[list[dict], list[list[dict]]]:
    """(held-out tasks, one list of feedback tasks per cycle): seed tasks with distinct user messages
    of at most max_chars, shuffled with `seed`. Each task is the seed task's dict plus "prompt" (the
    user message); its reference output stays at task["instances"][0]["output"]."""
    by_prompt: dict[str, dict] = {}
    for task in seed_tasks(path):
        prompt = task_prompt(task)
        if len(prompt) <= max_chars:
            by_prompt.setdefault(prompt, {**task, "prompt": prompt})
    tasks = list(by_prompt.values())
    random.Random(seed).shuffle(tasks)
    need = heldout + cycles * feedback
    if need > len(tasks):
        sys.exit(f"error: --heldout-prompts + --cycles × --feedback-prompts = {heldout} + {cycles} × {feedback} = {need} prompts, "
                 f"but only {len(tasks)} seed tasks have at most --max-prompt-chars {max_chars} characters; "
                 "ask for fewer cycles or prompts")
    slices = [tasks[heldout + k * feedback : heldout + (k + 1) * feedback] for k in range(cycles)]
    return tasks[:heldout], slices


# -- talking to the app --------------------------------------------------------------------


@dataclass
class Sampling:
    temperature: float
    top_p: float
    max_new_tokens: int


def reply_text(chat: list[dict]) -> str:
    """The last assistant message of a Chatbot value, as the user reads it (unescaped)."""
    content = chat[-1]["content"] if chat and chat[-1]["role"] == "assistant" else ""
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return html.unescape(content or "")


def served_version(status: str) -> str | None:
    m = VERSION_RE.search(status or "")
    return m.group(1) if m else None


class User:
    """One simulated user: a gradio_client session with a name and a hidden preference."""

    def __init__(self, url: str, name: str, pref, sampling: Sampling, timeout: float):
        self.client = Client(url, verbose=False)
        self.name, self.pref, self.s, self.timeout = name, pref.seeded(name), sampling, timeout
        self.client.predict(name, f"simulated user who {pref.description}", api_name="/set_user")

    def _send(self, prompt: str, compare: bool):
        job = self.client.submit(prompt, SYSTEM, self.s.temperature, self.s.top_p, self.s.max_new_tokens, compare, api_name="/send")
        return job.result(timeout=self.timeout)

    def chat(self, prompt: str) -> dict:
        """Send `prompt` as a plain chat in a fresh conversation; the reply and the version the status shows."""
        self.client.predict(api_name="/clear")
        chat, _, _, _, status = self._send(prompt, False)
        text = reply_text(chat)
        if len(chat) != 2 or chat[-1]["role"] != "assistant":
            raise RuntimeError(f"{self.name}: no reply to {prompt[:60]!r} (status: {status})")
        return {"text": text, "status_version": served_version(status)}

    def vote(self, text: str) -> tuple[int, str]:
        value, reason = self.pref.thumb(text)
        status = self.client.predict(1, value, reason, api_name="/vote")
        if "recorded" not in status:
            raise RuntimeError(f"{self.name}: vote not stored: {status}")
        return value, reason

    def correct(self, text: str, task: dict) -> str | None:
        """Correct the reply at chat position 1 (the one exchange since /clear) with the preference's rewrite."""
        new = correction(self.pref, text, task)
        if new is None:
            return None
        status = self.client.predict(1, new, api_name="/correct")
        if "Correction saved" not in (status or ""):
            raise RuntimeError(f"{self.name}: correction not stored: {status}")
        return new

    def compare(self, task: dict, correct: bool) -> dict:
        """Compare mode: two replies, a choice by the hidden preference, a thumb (and maybe a correction) on the kept reply."""
        self.client.predict(api_name="/clear")
        _, _, a, b, status = self._send(task["prompt"], True)
        if "Which reply is better" not in status:
            raise RuntimeError(f"{self.name}: the comparison did not finish: {status}")
        choice = judge(self.pref, a, b)
        reveal = self.client.predict(api_name=f"/choose_{choice}")[-1]
        if "(not saved)" in reveal:
            raise RuntimeError(f"{self.name}: the choice was not stored: {reveal}")
        kept = b if choice == "b" else a
        value, _ = self.vote(kept)
        fixed = self.correct(kept, task) if correct else None
        return {"a": a, "b": b, "choice": choice, "thumb": value, "correct": correct, "correction": fixed}

    def feedback_chat(self, task: dict, correct: bool) -> dict:
        r = self.chat(task["prompt"])
        value, _ = self.vote(r["text"])
        fixed = self.correct(r["text"], task) if correct else None
        return {"text": r["text"], "thumb": value, "correct": correct, "correction": fixed}


def run_users(url: str, names: list[str], pref, sampling: Sampling, work: list, do, label: str, timeout: float) -> list:
    """Each of `names` is one client working through a shared queue of `work` items with
    `do(user, item) -> result`; results in the order of `work`. Prints one line per item."""
    q: queue.Queue = queue.Queue()
    for i, item in enumerate(work):
        q.put((i, item))
    results: list = [None] * len(work)
    errors: list = []
    done = [0]
    lock = threading.Lock()
    t0 = time.perf_counter()

    def worker(name: str) -> None:
        try:
            user = User(url, name, pref, sampling, timeout)
            while not errors:
                try:
                    i, item = q.get_nowait()
                except queue.Empty:
                    return
                results[i] = do(user, item)
                with lock:
                    done[0] += 1
                    elapsed = time.perf_counter() - t0
                    eta = elapsed / done[0] * (len(work) - done[0])
                    print(f"  [{label}] {done[0]}/{len(work)}  {elapsed:5.0f}s  eta {eta:4.0f}s  {name}: {summary(results[i])}", flush=True)
        except Exception as exc:  # stop the other users and report
            errors.append(f"{name}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{label} failed: " + "; ".join(errors))
    return results


def summary(r: dict) -> str:
    words = lambda t: len(t.split())  # noqa: E731
    fixed = f", corrected to {words(r['correction'])} words" if r.get("correction") else ""
    if "choice" in r:
        return f"compare {words(r['a'])} vs {words(r['b'])} words -> {r['choice']}, thumb {r['thumb']:+d}{fixed}"
    if "thumb" in r:
        return f"chat {words(r['text'])} words, thumb {r['thumb']:+d}{fixed}"
    return f"{words(r['text'])} words, serving {r['status_version']}"


def wait_for_version(url: str, version: str, timeout: float) -> float:
    """Seconds until the app's status line says it serves `version`."""
    client = Client(url, verbose=False)
    t0 = time.perf_counter()
    while True:
        status = client.predict("swap-watcher", "", api_name="/set_user")
        if served_version(status) == version:
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"the app still serves {served_version(status)!r} {timeout:.0f}s after {version} was promoted")
        time.sleep(0.5)


# -- the store and the trainer's files -------------------------------------------------------


def replies_by_user_prefix(db: Path, prefix: str) -> list[dict]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    con.row_factory = sqlite3.Row
    try:
        rows = con.execute(
            """SELECT r.id, r.text, r.adapter_version, r.finish_reason, r.completion_tokens, r.source, r.context, u.name
               FROM replies r JOIN conversations c ON c.id = r.conversation_id JOIN users u ON u.id = c.user_id
               WHERE u.name LIKE ? ORDER BY r.id""", (prefix + "%",)).fetchall()
    finally:
        con.close()
    return [dict(r) for r in rows]


def feedback_prompts_in_store(db: Path) -> set[str]:
    """The last user message of every stored reply that has a vote, is in a comparison or was corrected."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = con.execute(
            """SELECT context FROM replies WHERE id IN (
                   SELECT reply_id FROM votes UNION SELECT reply_a_id FROM comparisons
                   UNION SELECT reply_b_id FROM comparisons UNION SELECT reply_id FROM corrections)""").fetchall()
    finally:
        con.close()
    prompts = set()
    for (context,) in rows:
        users = [m["content"] for m in json.loads(context) if m.get("role") == "user"]
        if users:
            prompts.add(users[-1])
    return prompts


def reply_stats(rows: list[dict], pref) -> dict:
    if not rows:
        return {}
    versions: dict[str, int] = {}
    for r in rows:
        versions[r["adapter_version"]] = versions.get(r["adapter_version"], 0) + 1
    scores = [] if pref.control else [pref.score(r["text"]) for r in rows]
    finite = [s for s in scores if math.isfinite(s)]
    return {
        "replies": len(rows),
        "versions": versions,
        "ended": sum(r["finish_reason"] == "eos" for r in rows) / len(rows),
        "mean_tokens": statistics.fmean(r["completion_tokens"] for r in rows),
        "mean_words": statistics.fmean(len(r["text"].split()) for r in rows),
        "mean_hidden_score": statistics.fmean(finite) if finite else None,
        "empty": sum(not r["text"].strip() for r in rows),
    }


def wilson(successes: float, n: int) -> tuple[float, float, float]:
    """(rate, lo, hi): 95% Wilson score interval; ties count as half a success."""
    from trainer.reward import accuracy_ci

    return accuracy_ci(successes, n)


def win_rate(pref, tag: str, new: list[str], old: list[str]) -> dict:
    """Pairs (new[i], old[i]) judged by the hidden preference (for the coin control: a fair coin seeded
    by `tag` and the pair index): wins of `new`, ties, losses, and the win rate (a tie counts ½) with
    its 95% Wilson interval."""
    winners = []
    for i, (n, o) in enumerate(zip(new, old)):
        verdict = judge(pref.seeded(f"{tag}-pair-{i}"), n, o)
        winners.append({"a": "new", "b": "old", "tie": "tie"}[verdict])
    wins, ties = winners.count("new"), winners.count("tie")
    rate, lo, hi = wilson(wins + 0.5 * ties, len(winners))
    return {"pairs": len(winners), "wins": wins, "ties": ties, "losses": len(winners) - wins - ties,
            "win_rate": rate, "win_rate_lo": lo, "win_rate_hi": hi, "winners": winners}


def judged_by_hidden(pref, tag: str, judged: list[dict]) -> dict | None:
    """The gate's own pairs (the candidate's and the served version's replies to held-out prompts,
    as the trainer kept them in the adapter's evaluation.jsonl) judged again by the hidden preference:
    its win rate for the candidate, and the share of decisive pairs where the gate's judge (the reward
    model's scores) and the hidden preference pick the same side. None when there are no pairs."""
    if not judged:
        return None
    wr = win_rate(pref, tag, [j["candidate"] for j in judged], [j["current"] for j in judged])
    winners = wr.pop("winners")
    both = [(w, j) for w, j in zip(winners, judged) if w != "tie" and j["candidate_score"] != j["current_score"]]
    agree = sum((w == "new") == (j["candidate_score"] > j["current_score"]) for w, j in both)
    rate, lo, hi = wilson(agree, len(both)) if both else (None, None, None)
    return {**wr, "judge_agreement": rate, "judge_agreement_lo": lo, "judge_agreement_hi": hi, "judge_agreement_n": len(both)}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def read_cycles(cycles_log: Path) -> list[dict]:
    """Every line of the trainer's cycles log, oldest first."""
    lines = [line for line in cycles_log.read_text().splitlines() if line.strip()] if cycles_log.exists() else []
    return [json.loads(line) for line in lines]


def run_trainer(cmd: list[str], log_path: Path) -> int:
    """Run the trainer, echoing its output (tqdm's carriage returns split into lines) to the console and a log."""
    print("  $ " + shlex.join(cmd), flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        try:
            buf, bars = b"", {}
            while chunk := proc.stdout.read1(4096):
                log.write(chunk)
                buf += chunk
                *lines, buf = re.split(rb"[\r\n]", buf)
                for line in lines:
                    for text in LOG_LINE_START.split(line.decode(errors="replace").rstrip()):
                        bar = TQDM_STEP.match(text)
                        if bar and bars.get(bar["desc"]) == bar["step"]:
                            continue  # the same step again, with new postfix figures only
                        if bar:
                            bars[bar["desc"]] = bar["step"]
                        if text.strip() and "Loading weights" not in text:
                            print("  trainer | " + text, flush=True)
            if buf.strip():
                print("  trainer | " + buf.decode(errors="replace").rstrip(), flush=True)
            return proc.wait()
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()


# -- one cycle's figures, the summary, the report ------------------------------------------------


def cycle_figures(entry: dict) -> dict:
    """The figures of one line of the trainer's cycles log; any field may be missing (None)."""
    sig = entry.get("signal") or {}
    ev = entry.get("evaluation") or {}
    return {
        "decision": entry.get("decision") or "failed",
        "version": entry.get("version"),
        "parent": entry.get("parent"),
        "reward_version": entry.get("reward_version"),
        "judge_version": entry.get("judge_version"),
        "reasons": list(entry.get("reasons") or []),
        "policy_step": entry.get("policy_step"),
        "rows": entry.get("rows"),
        "feedback_ids": entry.get("feedback_ids"),
        "trainer_seconds": entry.get("seconds"),
        "decisive_pairs": sig.get("decisive_pairs"),
        "min_decisive_pairs": sig.get("min_decisive_pairs"),
        "reward_val_pairs": sig.get("val_pairs"),
        "reward_val_accuracy": sig.get("val_accuracy"),
        "reward_val_accuracy_lo": sig.get("val_accuracy_lo"),
        "reward_val_accuracy_hi": sig.get("val_accuracy_hi"),
        "gate_prompts": ev.get("prompts"),
        "gate_win_rate": ev.get("win_rate"),
        "gate_win_rate_lo": ev.get("win_rate_lo"),
        "gate_win_rate_hi": ev.get("win_rate_hi"),
        "kl_parent": ev.get("kl_parent"),
        "kl_base": ev.get("kl_base"),
        "kl_reference": ev.get("kl_reference"),
        "optimised_from": ev.get("optimised_from", "parent" if ev else None),
        "kl_optimised": ev.get("kl_optimised"),
        "kl_optimised_total": ev.get("kl_optimised_total"),
        "human_agreement": ev.get("human_agreement") or None,
    }


def promoted_version(entry: dict) -> str | None:
    """The adapter this cycle made the served one: its own candidate when promoted, or a live
    candidate from an earlier cycle that it settled as promoted."""
    if entry.get("decision") == "promoted":
        return entry.get("version")
    settled = entry.get("settled") or {}
    return settled.get("version") if settled.get("decision") == "promoted" else None


def summarize(cycles: list[dict], labels: list[str], control: bool = False) -> dict:
    """After the last cycle: the served adapter's win rate against the base, promotions, and
    regressions (promotions whose win rate against the previous adapter has a 95% interval wholly below 0.5)."""
    promotions = [c for c in cycles if c.get("promoted")]
    regressions = [c["cycle"] for c in promotions
                   if (c.get("vs_previous") or {}).get("win_rate_hi") is not None and c["vs_previous"]["win_rate_hi"] < 0.5]
    served = (cycles[-1].get("served") if cycles else None) or {"version": "base"}
    vs_base = served.get("vs_base") or {}
    out = {
        "cycles": len(cycles),
        "decisions": dict(Counter(c.get("decision") or "failed" for c in cycles)),
        "promotions": len(promotions),
        "regressions": len(regressions),
        "regression_cycles": regressions,
        "served_version": served.get("version"),
        "win_rate_vs_base": vs_base.get("win_rate"),
        "win_rate_vs_base_lo": vs_base.get("win_rate_lo"),
        "win_rate_vs_base_hi": vs_base.get("win_rate_hi"),
        "pairs_vs_base": vs_base.get("pairs"),
        "control": control,
        "labels": labels,
    }
    if control:
        out["headline"] = f"control (coin-flip users): promotions: {len(promotions)} of {len(cycles)} cycles"
    elif vs_base:
        out["headline"] = (f"serving {served['version']} after {len(cycles)} cycles: win rate vs base {ci(vs_base, 'win_rate')} "
                           f"over {vs_base.get('pairs')} pairs; {len(promotions)} promotions, {len(regressions)} regressions")
    else:
        out["headline"] = f"serving {served.get('version')} after {len(cycles)} cycles: {len(promotions)} promotions"
    if labels:
        out["headline"] += " (" + "; ".join(labels) + ")"
    return out


def fmt(x, spec: str = ".3f") -> str:
    return "–" if x is None else format(x, spec)


def na(x) -> str:
    return "–" if x is None else str(x)


def ci(d: dict | None, key: str) -> str:
    """'rate [lo, hi]' from d[key], d[key_lo], d[key_hi]; '–' when not measured."""
    if not d or d.get(key) is None:
        return "–"
    return f"{d[key]:.3f} [{fmt(d.get(key + '_lo'))}, {fmt(d.get(key + '_hi'))}]"


def step_line(manifest: dict) -> str:
    """One line on what the candidate's policy step did (its manifest)."""
    step = manifest.get("policy_step") or manifest.get("kind") or "ppo"
    if step == "ppo":
        return ppo_line(manifest.get("metrics"), manifest.get("stop_reason"))
    parts = []
    for stage, history in (manifest.get("metrics") or {}).items():
        losses = [h["loss"] for h in history if "loss" in h]
        rows = (manifest.get("rows") or {}).get(stage)
        parts.append(f"{stage.upper()} on {rows} rows, {len(losses)} steps, loss {fmt(losses[0] if losses else None)} → {fmt(losses[-1] if losses else None)}")
    return "; ".join(parts) or f"{step}: no metrics"


def ppo_line(history: list[dict] | None, stop_reason: str | None) -> str:
    """One line on PPO's per-iteration history (candidate manifest `metrics`)."""
    if not history:
        return "PPO: no per-iteration metrics"
    first, last = history[0], history[-1]
    parts = [f"{key} {fmt(first.get(key), spec)} → {fmt(last.get(key), spec)}"
             for key, spec in (("objective/scores", ".3f"), ("objective/kl", ".2f"), ("response/length", ".1f"), ("response/ended", ".2f"))]
    return f"PPO: {len(history)} iterations ({stop_reason or '–'}); " + ", ".join(parts)


def gate_hidden(gh: dict | None) -> str:
    if not gh:
        return "–"
    return f"{ci(gh, 'win_rate')} / {ci(gh, 'judge_agreement')} (n={gh['judge_agreement_n']})"


def cycle_table(baseline: dict, cycles: list[dict]) -> list[str]:
    lines = ["| cycle | decision | step | serving | win rate vs base [95% CI] | vs previous [95% CI] | pairs | words | ended | "
             "KL parent / base (budgeted: cycle / lineage) | reward val acc [95% CI] (n) | gate win rate [95% CI] | gate pairs, hidden judge [95% CI] / judge agrees | "
             "feedback: cmp / chat / corrected | wall s: feedback / trainer / swap / measure |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    if baseline:
        st = baseline.get("replies") or {}
        lines.append(f"| 0 | baseline | – | base | – | – | – | {fmt(st.get('mean_words'), '.1f')} | {fmt(st.get('ended'), '.2f')} | – | – | – | – | – | "
                     f"– / – / – / {fmt(baseline.get('seconds'), '.0f')} |")
    for c in cycles:
        served, vb, vp = c.get("served") or {}, c.get("vs_base"), c.get("vs_previous")
        fb, ph = c.get("feedback") or {}, c.get("phases_s") or {}
        decision = c.get("decision") or "failed"
        if c.get("promoted") and c["promoted"] != c.get("version"):
            decision += f" (live {c['promoted']} promoted)"
        prev = f" vs {vp.get('previous')}" if vp else ""
        lines.append(
            f"| {c['cycle']} | {decision} | {c.get('policy_step') or '–'} | {served.get('version', '–')} | {ci(vb, 'win_rate')} | {ci(vp, 'win_rate')}{prev} | "
            f"{(vb or {}).get('pairs', '–')} | {fmt(served.get('mean_words'), '.1f')} | {fmt(served.get('ended'), '.2f')} | "
            f"{fmt(c.get('kl_parent'), '.2f')} / {fmt(c.get('kl_base'), '.2f')}"
            + (f" ({fmt(c['kl_optimised'], '.2f')} / {fmt(c.get('kl_optimised_total'), '.2f')})" if c.get("kl_optimised") is not None else "") + " | "
            f"{ci(c, 'reward_val_accuracy')} (n={na(c.get('reward_val_pairs'))}) | "
            f"{ci(c, 'gate_win_rate')} | {gate_hidden(c.get('gate_pairs_hidden'))} | "
            f"{fb.get('comparisons', '–')} / {fb.get('chats', '–')} / {fb.get('corrections', '–')} | "
            + " / ".join(fmt(ph.get(k), ".1f" if k == "swap_wait" else ".0f") for k in ("feedback", "trainer", "swap_wait", "measurement"))
            + " |")
    return lines


def summary_table(s: dict, preference: str) -> list[str]:
    return ["| preference | cycles | decisions | promotions | regressions | serving after the last cycle | "
            "win rate vs base [95% CI] (pairs) | settings |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            f"| {preference}{' (control)' if s.get('control') else ''} | {s['cycles']} | "
            f"{', '.join(f'{k} {v}' for k, v in s['decisions'].items()) or '–'} | {s['promotions']} | {s['regressions']} | "
            f"{s.get('served_version') or '–'} | {ci(s, 'win_rate_vs_base')} ({s.get('pairs_vs_base') or '–'}) | "
            f"{'; '.join(s.get('labels') or []) or 'app defaults'} |"]


def report(result: dict) -> None:
    pref, cycles, s = result["preference"], result.get("cycles") or [], result["summary"]
    print(f"\n## Closed loop: hidden preference '{pref['name']}' ({pref['description']}), {len(cycles)} cycles\n")
    for label in result.get("labels") or []:
        print(f"**{label}**\n")
    sm = result["sampling"]
    print(f"Sampling: temperature {sm['temperature']}, top-p {sm['top_p']}, max new tokens {sm['max_new_tokens']} "
          f"({sm['source']}); {result['prompts']['heldout']} held-out prompts × {result['prompts']['samples_per_heldout_prompt']} samples, "
          f"{result['prompts']['feedback_per_cycle']} feedback prompts per cycle.\n")
    print("\n".join(cycle_table(result.get("baseline") or {}, cycles)))
    print("\nDecisions:\n")
    for c in cycles:
        print(f"- cycle {c['cycle']}: {c.get('decision') or 'failed'} {c.get('version') or ''}"
              f"{': ' + '; '.join(c['reasons']) if c.get('reasons') else ''}")
    print("\n### Summary\n")
    print("\n".join(summary_table(s, pref["name"])))
    print(f"\n{s['headline']}")


# -- the run ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    serve = ServeArgs()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preference", default="shorter", choices=sorted(PREFERENCES), help="the simulated users' hidden preference")
    ap.add_argument("--short-words", type=int, default=30, help="shorter: most words of a reply that gets 👍, and of a correction")
    ap.add_argument("--full-words", type=int, default=150, help="fuller: the word count at which the score stops growing; 👍 from half of it")
    ap.add_argument("--cycles", type=int, default=3, help="training cycles, each after its own feedback")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="base model, for app and trainer (ModelArgs.model)")
    ap.add_argument("--quantize", default="auto", choices=("auto", "nf4", "int8", "none"), help="base-weight quantisation, app and trainer")
    ap.add_argument("--device", default="auto", help="torch device, app and trainer")
    ap.add_argument("--users", type=int, default=4, help="simulated users (gradio_client sessions) at once")
    ap.add_argument("--feedback-prompts", type=int, default=30, help="seed tasks the users give feedback on in each cycle (a fresh slice per cycle)")
    ap.add_argument("--chat-share", type=float, default=0.25, help="share of feedback prompts sent as a plain chat + thumb instead of a comparison")
    ap.add_argument("--correct-share", type=float, default=0.25, help="share of feedback items whose kept reply the user then corrects (when the rewrite differs)")
    ap.add_argument("--heldout-prompts", type=int, default=64, help="seed tasks held out for the measurement (never given feedback)")
    ap.add_argument("--samples", type=int, default=1, help="replies per held-out prompt and side (pairs = prompts × samples)")
    ap.add_argument("--max-prompt-chars", type=int, default=400, help="seed tasks whose user message is longer are not used")
    ap.add_argument("--temperature", type=float, default=None, help=f"sampling temperature of every message (default: the app's, {serve.temperature})")
    ap.add_argument("--top-p", type=float, default=None, help=f"top-p of every message (default: the app's, {serve.top_p})")
    ap.add_argument("--max-new-tokens", type=int, default=None, help=f"reply cap of every message (default: the app's, {serve.max_new_tokens})")
    ap.add_argument("--policy-step", default=PolicyArgs.policy_step, choices=POLICY_STEPS,
                    help=f"the trainer's --policy-step (default: the trainer's own, {PolicyArgs.policy_step}); another one is labelled")
    ap.add_argument("--trainer-args", default="", help="extra flags for `python -m trainer once` (default none: the trainer's own defaults); "
                                                        "results are then labelled as overridden")
    ap.add_argument("--watch-interval", type=float, default=1.0, help="the app's --watch-interval (s)")
    ap.add_argument("--swap-timeout", type=float, default=120.0, help="seconds to wait for the app to serve a promoted adapter")
    ap.add_argument("--request-timeout", type=float, default=900.0, help="seconds one request to the app may take")
    ap.add_argument("--seed", type=int, default=0, help="shuffle of the seed tasks, the chat/compare and correction picks, the coin flips")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (database, adapters, reward models, logs)")
    ap.add_argument("--out", default=None, help="JSON output (default: bench/results/loop-PREFERENCE.json)")
    args = ap.parse_args(argv)
    if min(args.cycles, args.users, args.samples, args.feedback_prompts, args.heldout_prompts) < 1:
        ap.error("--cycles, --users, --samples, --feedback-prompts and --heldout-prompts must be at least 1")
    if not 0 <= args.chat_share <= 1 or not 0 <= args.correct_share <= 1:
        ap.error("--chat-share and --correct-share must be in [0, 1]")
    if args.short_words < 1 or args.full_words < 2:
        ap.error("--short-words must be at least 1 and --full-words at least 2")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        ap.error("--max-new-tokens must be at least 1")
    given = [a.split("=", 1)[0] for a in shlex.split(args.trainer_args)]
    for flag in FILE_FLAGS + MODEL_FLAGS + ("--policy-step",):
        if flag in given:
            ap.error(f"--trainer-args must not set {flag}: the benchmark sets it")
    return args


def settings_labels(args: argparse.Namespace) -> list[str]:
    """'... overridden: ...' for trainer flags and sampling settings that are not the app's defaults."""
    labels = []
    if args.policy_step != PolicyArgs.policy_step:
        labels.append(f"policy step {args.policy_step} (the trainer's default is {PolicyArgs.policy_step})")
    if args.trainer_args.strip():
        labels.append(f"trainer settings overridden: {args.trainer_args.strip()}")
    sampling = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in ("temperature", "top_p", "max_new_tokens") if getattr(args, k) is not None]
    if sampling:
        labels.append("sampling overridden: " + " ".join(sampling))
    return labels


def feedback_work(tasks: list[dict], chat_share: float, correct_share: float, seed: int, cycle: int) -> list[tuple[str, dict, bool]]:
    """(kind, task, correct) per feedback prompt: 'chat' or 'compare', and whether the user corrects the reply."""
    n_chat = round(len(tasks) * chat_share)
    kinds = ["chat"] * n_chat + ["compare"] * (len(tasks) - n_chat)
    random.Random(f"{seed}-kinds-{cycle}").shuffle(kinds)
    corrected = set(random.Random(f"{seed}-correct-{cycle}").sample(range(len(tasks)), round(len(tasks) * correct_share)))
    return [(kind, task, i in corrected) for i, (kind, task) in enumerate(zip(kinds, tasks))]


def main() -> None:
    args = parse_args()
    if args.model == DEFAULT_MODEL and not (ROOT / "data" / "models" / DEFAULT_MODEL / "config.json").exists():
        sys.exit(f"error: the default model is not prepared under data/models/{DEFAULT_MODEL}; run `make model` first")
    suffix = "" if args.policy_step == PolicyArgs.policy_step else f"-{args.policy_step}"
    out = Path(args.out or RESULTS / f"loop-{args.preference}{suffix}.json")

    from assistant.adapters import read_evaluation
    from tests.server import running_app

    pref = make_preference(args)
    serve = ServeArgs()
    sampling = Sampling(serve.temperature if args.temperature is None else args.temperature,
                        serve.top_p if args.top_p is None else args.top_p,
                        serve.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens)
    labels = settings_labels(args)
    heldout, slices = split_prompts(args.max_prompt_chars, args.heldout_prompts, args.feedback_prompts, args.cycles, args.seed)
    heldout_prompts = {t["prompt"] for t in heldout}
    names = lambda prefix: [f"{prefix}-{i + 1:02d}" for i in range(args.users)]  # noqa: E731

    tmp = Path(tempfile.mkdtemp(prefix="bench-loop-"))
    files = {"db": tmp / "feedback.db", "adapters_dir": tmp / "adapters", "reward_dir": tmp / "reward",
             "lock_file": tmp / "trainer.lock", "cycles_log": tmp / "cycles.jsonl"}
    model_flags = ["--model", args.model, "--quantize", args.quantize, "--device", args.device]
    file_flags = [x for k, v in files.items() for x in ("--" + k.replace("_", "-"), str(v))]
    step_flags = ["--policy-step", args.policy_step] if args.policy_step != PolicyArgs.policy_step else []
    trainer_cmd = [sys.executable, "-m", "trainer", "once", *file_flags, *model_flags, *step_flags, *shlex.split(args.trainer_args)]
    result: dict = {
        "command": "python bench/loop.py " + shlex.join(sys.argv[1:]),
        "machine": machine(with_torch=False),
        "args": vars(args),
        "labels": labels,
        "preference": {"name": pref.name, "description": pref.description, "rule": (type(pref).__doc__ or "").strip(), "control": pref.control},
        "sampling": {**vars(sampling), "source": "; ".join(x for x in labels if x.startswith("sampling")) or "the app's defaults, assistant.config.ServeArgs"},
        "trainer_command": shlex.join(["python", *trainer_cmd[1:]]),
        "prompts": {"heldout": len(heldout), "feedback_per_cycle": args.feedback_prompts, "cycles": args.cycles,
                    "samples_per_heldout_prompt": args.samples, "heldout_in_store": True,
                    "heldout_ids": [t.get("id") for t in heldout], "feedback_ids": [[t.get("id") for t in s] for s in slices]},
        "loadavg_start": os.getloadavg(),
        "baseline": {},
        "cycles": [],
    }
    cycles: list[dict] = result["cycles"]
    phases: dict[str, float] = {}
    print(f"bench/loop.py: simulated users who each {pref.description}; {args.users} at once; {args.cycles} cycles of "
          f"{args.feedback_prompts} feedback prompts; {len(heldout)} held-out prompts × {args.samples} samples; sampling "
          f"T={sampling.temperature} top-p={sampling.top_p} max_new_tokens={sampling.max_new_tokens}; work dir {tmp}", flush=True)
    for label in labels:
        print(f"  {label}", flush=True)
    started = time.perf_counter()
    try:
        with running_app(*model_flags, *file_flags, "--watch-interval", str(args.watch_interval), "--max-batch", "8",
                         log_path=tmp / "app.log") as url:
            phases["app_start"] = time.perf_counter() - started
            print(f"app up at {url} after {phases['app_start']:.0f}s (log: {tmp / 'app.log'})", flush=True)

            # baseline: held-out replies from the served base model, before any training
            hwork = [(i, k, task) for k in range(args.samples) for i, task in enumerate(heldout)]
            print(f"\n[baseline] {len(hwork)} replies on held-out prompts from the served base model", flush=True)
            t = time.perf_counter()
            base = run_users(url, names("heldout-base"), pref, sampling, hwork, lambda u, w: u.chat(w[2]["prompt"]), "baseline", args.request_timeout)
            phases["baseline"] = time.perf_counter() - t
            base_stats = reply_stats(replies_by_user_prefix(files["db"], "heldout-base-"), pref)
            result["baseline"] = {"version": "base", "seconds": phases["baseline"], "replies": base_stats,
                                  "texts": [b["text"] for b in base]}
            served = {"version": "base", "measured_in_cycle": 0, "texts": [b["text"] for b in base],
                      "mean_words": base_stats.get("mean_words"), "ended": base_stats.get("ended"), "vs_base": None}
            write_results(out, {**result, "phases_s": phases, "partial": "written after the baseline"})

            for k in range(1, args.cycles + 1):
                c: dict = {"cycle": k, "labels": labels}
                ph: dict[str, float] = {}
                c["phases_s"] = ph
                cycles.append(c)

                # a. feedback on this cycle's own prompts
                work = feedback_work(slices[k - 1], args.chat_share, args.correct_share, args.seed, k)
                n_chat = sum(w[0] == "chat" for w in work)
                print(f"\n[cycle {k}/{args.cycles}: feedback] {len(work) - n_chat} comparisons + {n_chat} plain chats, each with a thumb; "
                      f"{sum(w[2] for w in work)} to correct", flush=True)
                t = time.perf_counter()
                fb = run_users(url, names(f"feedback-c{k}"), pref, sampling, work,
                               lambda u, w: u.compare(w[1], w[2]) if w[0] == "compare" else u.feedback_chat(w[1], w[2]),
                               f"cycle {k} feedback", args.request_timeout)
                ph["feedback"] = time.perf_counter() - t
                choices = {x: sum(r.get("choice") == x for r in fb) for x in ("a", "b", "tie")}
                thumbs = {"up": sum(r["thumb"] == 1 for r in fb), "down": sum(r["thumb"] == -1 for r in fb)}
                c["feedback"] = {"prompts": len(work), "comparisons": len(work) - n_chat, "chats": n_chat,
                                 "correction_picks": sum(w[2] for w in work), "corrections": sum(bool(r.get("correction")) for r in fb),
                                 "choices": choices, "thumbs": thumbs,
                                 "replies": reply_stats(replies_by_user_prefix(files["db"], f"feedback-c{k}-"), pref)}
                print(f"  choices {choices}, thumbs {thumbs}, corrections {c['feedback']['corrections']}, {ph['feedback']:.0f}s", flush=True)

                # b. one training cycle on the app's files, at the trainer's defaults
                leaked = feedback_prompts_in_store(files["db"]) & heldout_prompts
                if leaked:
                    raise RuntimeError(f"{len(leaked)} held-out prompts have feedback in the store; not starting cycle {k}")
                print(f"\n[cycle {k}/{args.cycles}: trainer] python -m trainer once (file and model flags{', ' + args.trainer_args if args.trainer_args else ''})", flush=True)
                before = len(read_cycles(files["cycles_log"]))
                t = time.perf_counter()
                rc = run_trainer(trainer_cmd, tmp / f"trainer-c{k}.log")
                ph["trainer"] = time.perf_counter() - t
                new_lines = read_cycles(files["cycles_log"])[before:]
                entry = new_lines[-1] if new_lines else {
                    "decision": "failed", "reasons": [f"the trainer wrote no cycles-log line (exit code {rc}; log trainer-c{k}.log)"]}
                c.update(cycle_figures(entry))
                c["trainer"] = {"exit_code": rc, "cycles_log": entry}
                version = c["version"]
                manifest = read_json(files["adapters_dir"] / version / "manifest.json") if version else {}
                c["policy"] = {key: manifest.get(key) for key in ("policy_step", "sft_first", "sft_skipped", "sft", "rows", "prompts", "stop_reason", "seconds", "metrics")}
                judged = read_evaluation(files["adapters_dir"], version) if version else []
                c["gate_pairs_hidden"] = judged_by_hidden(pref, f"c{k}-gate", judged)
                rmanifest = read_json(files["reward_dir"] / c["reward_version"] / "manifest.json") if c["reward_version"] else {}
                c["reward_model"] = {"version": c["reward_version"], **{key: rmanifest.get(key) for key in ("examples", "metrics", "seconds")}}
                print(f"  cycle {k} {c['decision']} {version or ''} after {ph['trainer']:.0f}s (exit code {rc}): "
                      f"{'; '.join(c['reasons']) or 'passed the gate'}", flush=True)
                print(f"  reward model {na(c['reward_version'])}: val accuracy {ci(c, 'reward_val_accuracy')} (n={na(c['reward_val_pairs'])}), "
                      f"decisive pairs {na(c['decisive_pairs'])} (min {na(c['min_decisive_pairs'])}); judge {na(c['judge_version'])}: "
                      f"gate win rate {ci(c, 'gate_win_rate')} on {na(c['gate_prompts'])} prompts; KL parent {fmt(c['kl_parent'], '.2f')}, "
                      f"base {fmt(c['kl_base'], '.2f')}, budgeted {fmt(c['kl_optimised'], '.2f')} / {fmt(c['kl_optimised_total'], '.2f')}; "
                      f"{step_line(manifest)}", flush=True)
                gh = c["gate_pairs_hidden"]
                if gh:
                    print(f"  the gate's {gh['pairs']} pairs by the hidden preference: candidate win rate {ci(gh, 'win_rate')}; "
                          f"the judge picks the hidden preference's side on {ci(gh, 'judge_agreement')} of {gh['judge_agreement_n']} decisive pairs", flush=True)

                # c. when promoted: the app swaps, and the held-out prompts are measured on the new adapter
                promoted = promoted_version(entry)
                c["promoted"] = promoted
                if promoted:
                    ph["swap_wait"] = wait_for_version(url, promoted, args.swap_timeout)
                    print(f"\n[cycle {k}/{args.cycles}: measurement] the app serves {promoted} {ph['swap_wait']:.1f}s after the cycle ended; "
                          f"{len(hwork)} replies on held-out prompts", flush=True)
                    t = time.perf_counter()
                    new = run_users(url, names(f"heldout-c{k}"), pref, sampling, hwork, lambda u, w: u.chat(w[2]["prompt"]),
                                    f"cycle {k} measurement", args.request_timeout)
                    ph["measurement"] = time.perf_counter() - t
                    texts = [n["text"] for n in new]
                    vs_base = win_rate(pref, f"c{k}-base", texts, result["baseline"]["texts"])
                    vs_prev = win_rate(pref, f"c{k}-previous", texts, served["texts"])
                    c["pairs_detail"] = [{"prompt": task["prompt"], "sample": s, "text": text, "status_version": n["status_version"],
                                          "vs_base": wb, "vs_previous": wp}
                                         for (_, s, task), text, n, wb, wp in zip(hwork, texts, new, vs_base.pop("winners"), vs_prev.pop("winners"))]
                    c["vs_base"], c["vs_previous"] = vs_base, {**vs_prev, "previous": served["version"]}
                    stats = reply_stats(replies_by_user_prefix(files["db"], f"heldout-c{k}-"), pref)
                    others = {v: n for v, n in stats.get("versions", {}).items() if v != promoted}
                    if others:
                        print(f"  warning: {sum(others.values())} measurement replies came from other versions: {others}", flush=True)
                    served = {"version": promoted, "measured_in_cycle": k, "texts": texts, "replies": stats,
                              "mean_words": stats.get("mean_words"), "ended": stats.get("ended"), "vs_base": vs_base}
                    print(f"  {promoted} vs base: {ci(vs_base, 'win_rate')} over {vs_base['pairs']} pairs; vs {c['vs_previous']['previous']}: "
                          f"{ci(vs_prev, 'win_rate')}; words {fmt(served['mean_words'], '.1f')}, ended {fmt(served['ended'], '.2f')}", flush=True)
                c["served"] = {key: v for key, v in served.items() if key != "texts"}
                write_results(out, {**result, "phases_s": phases, "partial": f"written after cycle {k} of {args.cycles}"})
                if rc == 2:
                    print("  the trainer refused its flags (exit code 2); stopping", flush=True)
                    break
    finally:
        phases["total"] = time.perf_counter() - started
        result["phases_s"] = phases
        result["summary"] = summarize(cycles, labels, pref.control)
        result["loadavg_end"] = os.getloadavg()
        result["work_dir"] = str(tmp) if args.keep else None
        write_results(out, result)
        if args.keep:
            print(f"\nkept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    report(result)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
