"""Closed-loop benchmark: simulated users teach the running app a hidden preference.

    .venv/bin/python bench/loop.py                          # "concise" users, default model (~30 min on 2 CPU cores)
    .venv/bin/python bench/loop.py --preference question    # users who like replies that end with a question
    .venv/bin/python bench/loop.py --force-measure          # measure the candidate even if the gate rejects it
    .venv/bin/python bench/loop.py --feedback-prompts 16 --heldout-prompts 8 \\
        --trainer-args "--ppo-iterations 2 --reward-epochs 1"   # smoke test (a few minutes)

Everything goes through the real processes, as in production: the app (`app.py`,
started by tests.server.running_app with --no-trainer and a 1 s --watch-interval)
serves the default model, simulated users drive it with gradio_client, and the
trainer runs one cycle as `python -m trainer once` on the app's files. All state
(feedback.db, adapters/, reward/, lock, cycles log) lives in a temporary directory.

A simulated user holds a hidden preference, a small class that scores a reply
(`--preference`):
- concise:  score = −(words in the reply); an empty reply is the worst; 👍 for
  1..--concise-words words, 👎 ("Too long") otherwise.
- question: score 2 when the reply ends with a question mark, 1 when it asks a
  question elsewhere, 0 otherwise; 👍 only for 2.
Two replies with equal scores are a tie.

Prompts: seed tasks of /work/shared/data/seed-tasks.jsonl whose user message (the
instruction, then the task's input when it has one, as in bench/ppo.py) is at most
--max-prompt-chars long, shuffled with --seed, then split: the first
--heldout-prompts are held out, the next --feedback-prompts get feedback.

Phases:
1. baseline: on the held-out prompts, --users clients each send their share as
   plain chats (--samples replies per prompt) to the app serving version `base`. No
   feedback is given on them.
2. feedback: on the feedback prompts, --users clients at once. Per prompt, a user
   either (share 1 − --chat-share) sends it in Compare mode, picks A, B or tie by the
   hidden preference and thumbs the reply that continues the chat, or sends it as a
   plain chat and thumbs the reply. Then /clear.
3. training cycle: `python -m trainer once` with the app's --db, --adapters-dir,
   --reward-dir, --lock-file and --cycles-log, the sampling temperature, and
   --trainer-args (printed). `--max-prompts` is set to the number of distinct
   feedback prompts: the store's prompts are taken most recent first, so the older
   held-out baseline chats never become PPO prompts (checked before the cycle starts).
4. swap: when the gate promotes the candidate, wait until the app reports
   "serving adapter `vNNNNNN`". When it rejects it, print why (the manifest's
   `reasons`) and stop, unless --force-measure: then the candidate is promoted with
   assistant.adapters.promote and every figure below is labelled as forced.
5. measurement: the same held-out prompts, the same sampling settings and number of
   samples, through the app now serving the new adapter. Each (base reply, new reply)
   pair of the same prompt and sample index is judged by the hidden preference: a win
   for the new adapter counts 1, a tie ½. Reported: win rate with a 95% Wilson
   interval, the number of pairs, and each side's mean hidden score, words and share
   of replies that ended (emitted EOS, from the replies table).

Also reported: the reward model's validation accuracy (reward/r000001/manifest.json),
the feedback rows the cycle used (cycles log `rows`, manifest `feedback_ids`), KL to
the base (the gate's held-out evaluation and PPO's per-iteration `objective/kl`), and
the wall time of each phase. Prints tables and writes bench/results/loop-PREFERENCE.json.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import json
import math
import os
import platform
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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models only from local paths

from gradio_client import Client  # noqa: E402

from assistant.config import DEFAULT_MODEL  # noqa: E402

SEED_TASKS = ROOT.parent / "shared" / "data" / "seed-tasks.jsonl"
SYSTEM = "You are a helpful assistant."
VERSION_RE = re.compile(r"serving adapter `([^`]+)`")
TQDM_STEP = re.compile(r"^(?P<desc>[^:|]+):\s+\d+%\|[^|]*\|\s*(?P<step>\d+/\d+)")  # a tqdm bar's "name: 40%|███ | 4/10"
LOG_LINE_START = re.compile(r"(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} )")  # a log line glued to a tqdm update

# Trainer settings sized for ~30 minutes of the whole benchmark on 2 CPU cores; the
# benchmark adds --temperature (its own) and --max-prompts (the feedback prompts).
TRAINER_ARGS = (
    "--reward-epochs 2 --reward-lr 3e-4 --reward-max-length 160 "
    "--ppo-iterations 12 --ppo-batch-size 8 --mini-batch-size 4 --ppo-epochs 2 --ppo-lr 1e-3 --max-new-tokens 48 "
    "--eval-prompts 12 --eval-max-new-tokens 48"
)


# -- hidden preferences ----------------------------------------------------------------


class Concise:
    """Prefers short replies: fewer words is better; an empty reply is the worst."""

    name = "concise"
    description = "prefers concise replies"

    def __init__(self, max_words: int = 40):
        self.max_words = max_words

    def score(self, text: str) -> float:
        words = len(text.split())
        return -math.inf if words == 0 else -float(words)

    def thumb(self, text: str) -> tuple[int, str]:
        words = len(text.split())
        return (1, "") if 0 < words <= self.max_words else (-1, "Too long" if words else "Unhelpful")


class EndsWithQuestion:
    """Prefers replies that end with a question (to keep the conversation going)."""

    name = "question"
    description = "prefers replies that end with a question"

    def score(self, text: str) -> float:
        t = text.strip().rstrip("\"')]*_ ")
        return 2.0 if t.endswith("?") else 1.0 if "?" in t else 0.0

    def thumb(self, text: str) -> tuple[int, str]:
        return (1, "") if self.score(text) == 2.0 else (-1, "Does not end with a question")


PREFERENCES = {"concise": Concise, "question": EndsWithQuestion}


def judge(pref, text_a: str, text_b: str) -> str:
    """'a', 'b' or 'tie' by the hidden preference."""
    a, b = pref.score(text_a), pref.score(text_b)
    return "a" if a > b else "b" if b > a else "tie"


# -- prompts -----------------------------------------------------------------------------


def task_prompt(task: dict) -> str:
    """One user message: the instruction, then the task's input when it has one (as bench/ppo.py)."""
    text = task["instruction"].strip()
    extra = task["instances"][0]["input"].strip()
    return f"{text}\n\n{extra}" if extra else text


def split_prompts(max_chars: int, heldout: int, feedback: int, seed: int) -> tuple[list[str], list[str]]:
    """(held-out, feedback) user messages: distinct seed tasks up to max_chars, shuffled with `seed`."""
    if not SEED_TASKS.exists():
        sys.exit(f"error: {SEED_TASKS} not found; the benchmark's prompts come from it")
    tasks = [json.loads(line) for line in SEED_TASKS.read_text().splitlines() if line.strip()]
    prompts = list(dict.fromkeys(p for p in map(task_prompt, tasks) if len(p) <= max_chars))
    random.Random(seed).shuffle(prompts)
    if heldout + feedback > len(prompts):
        sys.exit(f"error: --heldout-prompts + --feedback-prompts = {heldout + feedback}, but only {len(prompts)} "
                 f"seed tasks have at most --max-prompt-chars {max_chars} characters")
    return prompts[:heldout], prompts[heldout : heldout + feedback]


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
        self.name, self.pref, self.s, self.timeout = name, pref, sampling, timeout
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

    def compare(self, prompt: str) -> dict:
        """Compare mode: two replies, a choice by the hidden preference, a thumb on the kept reply."""
        self.client.predict(api_name="/clear")
        _, _, a, b, status = self._send(prompt, True)
        if "Which reply is better" not in status:
            raise RuntimeError(f"{self.name}: the comparison did not finish: {status}")
        choice = judge(self.pref, a, b)
        reveal = self.client.predict(api_name=f"/choose_{choice}")[-1]
        if "(not saved)" in reveal:
            raise RuntimeError(f"{self.name}: the choice was not stored: {reveal}")
        kept = b if choice == "b" else a
        value, _ = self.vote(kept)
        return {"a": a, "b": b, "choice": choice, "thumb": value}

    def feedback_chat(self, prompt: str) -> dict:
        r = self.chat(prompt)
        value, _ = self.vote(r["text"])
        return {"text": r["text"], "thumb": value}


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
    if "choice" in r:
        return f"compare {words(r['a'])} vs {words(r['b'])} words -> {r['choice']}, thumb {r['thumb']:+d}"
    if "thumb" in r:
        return f"chat {words(r['text'])} words, thumb {r['thumb']:+d}"
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


def reply_stats(rows: list[dict], pref) -> dict:
    if not rows:
        return {}
    versions: dict[str, int] = {}
    for r in rows:
        versions[r["adapter_version"]] = versions.get(r["adapter_version"], 0) + 1
    scores = [pref.score(r["text"]) for r in rows]
    finite = [s for s in scores if math.isfinite(s)]
    return {
        "replies": len(rows),
        "versions": versions,
        "ended": sum(r["finish_reason"] == "eos" for r in rows) / len(rows),
        "mean_tokens": statistics.fmean(r["completion_tokens"] for r in rows),
        "mean_words": statistics.fmean(len(r["text"].split()) for r in rows),
        "mean_hidden_score": statistics.fmean(finite) if finite else None,
        "empty": len(scores) - len(finite) if pref.name == "concise" else sum(not r["text"].strip() for r in rows),
    }


def wilson(successes: float, n: int) -> tuple[float, float, float]:
    """(rate, lo, hi): 95% Wilson score interval; ties count as half a success."""
    from trainer.reward import accuracy_ci

    return accuracy_ci(successes, n)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def last_cycle(cycles_log: Path) -> dict:
    lines = [line for line in cycles_log.read_text().splitlines() if line.strip()] if cycles_log.exists() else []
    return json.loads(lines[-1]) if lines else {}


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


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}"


# -- report ------------------------------------------------------------------------------------


def ppo_table(history: list[dict]) -> list[str]:
    lines = ["| iter | objective/scores | with EOS penalty | objective/kl | kl_coef | ended | length | degenerate | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for h in history:
        secs = sum(h.get(k, 0.0) for k in ("time/rollout", "time/score", "time/reference", "time/update"))
        lines.append(f"| {h['iteration']} | {h['objective/scores']:.3f} | {h['objective/scores_with_eos_penalty']:.3f} | "
                     f"{h['objective/kl']:.2f} | {h['objective/kl_coef']:.3f} | {h['response/ended']:.2f} | "
                     f"{h['response/length']:.1f} | {h['response/degenerate']} | {secs:.0f} |")
    return lines


def fmt(x, spec: str = ".3f") -> str:
    return "–" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preference", default="concise", choices=sorted(PREFERENCES), help="the simulated users' hidden preference")
    ap.add_argument("--concise-words", type=int, default=40, help="concise: most words of a reply that gets 👍")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="base model, for app and trainer (ModelArgs.model)")
    ap.add_argument("--quantize", default="auto", choices=("auto", "nf4", "int8", "none"), help="base-weight quantisation, app and trainer")
    ap.add_argument("--device", default="auto", help="torch device, app and trainer")
    ap.add_argument("--users", type=int, default=4, help="simulated users (gradio_client sessions) at once")
    ap.add_argument("--feedback-prompts", type=int, default=48, help="seed tasks the users give feedback on")
    ap.add_argument("--chat-share", type=float, default=0.25, help="share of feedback prompts sent as a plain chat + thumb instead of a comparison")
    ap.add_argument("--heldout-prompts", type=int, default=64, help="seed tasks held out for the measurement")
    ap.add_argument("--samples", type=int, default=1, help="replies per held-out prompt and side (pairs = prompts × samples)")
    ap.add_argument("--max-prompt-chars", type=int, default=400, help="seed tasks whose user message is longer are not used")
    ap.add_argument("--temperature", type=float, default=0.8, help="sampling temperature of every reply, and of PPO's rollouts")
    ap.add_argument("--top-p", type=float, default=1.0, help="top-p of every reply in the app (PPO's rollouts sample without top-p)")
    ap.add_argument("--max-new-tokens", type=int, default=80, help="reply cap of every reply in the app")
    ap.add_argument("--trainer-args", default=TRAINER_ARGS, help="flags for `python -m trainer once` (see its --help)")
    ap.add_argument("--force-measure", action="store_true", help="if the gate rejects the candidate, promote it anyway and measure it (labelled as forced)")
    ap.add_argument("--watch-interval", type=float, default=1.0, help="the app's --watch-interval (s)")
    ap.add_argument("--swap-timeout", type=float, default=120.0, help="seconds to wait for the app to serve the promoted adapter")
    ap.add_argument("--request-timeout", type=float, default=900.0, help="seconds one request to the app may take")
    ap.add_argument("--seed", type=int, default=0, help="shuffle of the seed tasks before the held-out / feedback split")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (database, adapters, reward model, logs)")
    ap.add_argument("--out", default=None, help="JSON output (default: bench/results/loop-PREFERENCE.json)")
    args = ap.parse_args()
    if args.users < 1 or args.samples < 1 or args.feedback_prompts < 1 or args.heldout_prompts < 1:
        ap.error("--users, --samples, --feedback-prompts and --heldout-prompts must be at least 1")
    if not 0 <= args.chat_share <= 1:
        ap.error("--chat-share must be in [0, 1]")
    if args.model == DEFAULT_MODEL and not (ROOT / "data" / "models" / DEFAULT_MODEL / "config.json").exists():
        sys.exit(f"error: the default model is not prepared under data/models/{DEFAULT_MODEL}; run `make model` first")
    for flag in ("--db", "--adapters-dir", "--reward-dir", "--lock-file", "--cycles-log", "--max-prompts"):
        if flag in shlex.split(args.trainer_args):
            ap.error(f"--trainer-args must not set {flag}: the benchmark sets it")
    out = Path(args.out or ROOT / "bench" / "results" / f"loop-{args.preference}.json")

    from tests.server import running_app

    pref = PREFERENCES[args.preference](args.concise_words) if args.preference == "concise" else PREFERENCES[args.preference]()
    sampling = Sampling(args.temperature, args.top_p, args.max_new_tokens)
    heldout, feedback = split_prompts(args.max_prompt_chars, args.heldout_prompts, args.feedback_prompts, args.seed)
    names = lambda prefix: [f"{prefix}-{i + 1:02d}" for i in range(args.users)]  # noqa: E731

    tmp = Path(tempfile.mkdtemp(prefix="bench-loop-"))
    files = {"db": tmp / "feedback.db", "adapters_dir": tmp / "adapters", "reward_dir": tmp / "reward",
             "lock_file": tmp / "trainer.lock", "cycles_log": tmp / "cycles.jsonl"}
    model_flags = ["--model", args.model, "--quantize", args.quantize, "--device", args.device]
    file_flags = [x for k, v in files.items() for x in ("--" + k.replace("_", "-"), str(v))]
    result: dict = {
        "command": "python bench/loop.py " + shlex.join(sys.argv[1:]),
        "machine": machine(),
        "args": vars(args),
        "preference": {"name": pref.name, "description": pref.description, "rule": (type(pref).__doc__ or "").strip()},
        "prompts": {"heldout": len(heldout), "feedback": len(feedback), "samples_per_heldout_prompt": args.samples},
        "loadavg_start": os.getloadavg(),
    }
    phases: dict[str, float] = {}
    print(f"bench/loop.py: simulated users who each {pref.description}; {args.users} at once; {len(feedback)} feedback prompts, "
          f"{len(heldout)} held-out prompts × {args.samples} samples; sampling T={args.temperature} top-p={args.top_p} "
          f"max_new_tokens={args.max_new_tokens}; work dir {tmp}", flush=True)
    started = time.perf_counter()
    try:
        with running_app(*model_flags, *file_flags, "--watch-interval", str(args.watch_interval), "--max-batch", "8",
                         log_path=tmp / "app.log") as url:
            phases["app_start"] = time.perf_counter() - started
            print(f"app up at {url} after {phases['app_start']:.0f}s (log: {tmp / 'app.log'})", flush=True)

            # 1. baseline replies on the held-out prompts (version base), before any training
            print(f"\n[1/5] baseline: {len(heldout) * args.samples} replies on held-out prompts from the served base model", flush=True)
            work = [(i, k, p) for k in range(args.samples) for i, p in enumerate(heldout)]
            t = time.perf_counter()
            base = run_users(url, names("heldout-base"), pref, sampling, work, lambda u, w: u.chat(w[2]), "baseline", args.request_timeout)
            phases["baseline"] = time.perf_counter() - t

            # 2. feedback on the feedback prompts
            n_chat = round(len(feedback) * args.chat_share)
            kinds = ["chat"] * n_chat + ["compare"] * (len(feedback) - n_chat)
            random.Random(args.seed + 1).shuffle(kinds)
            print(f"\n[2/5] feedback: {len(feedback) - n_chat} comparisons + {n_chat} plain chats, each with a thumb", flush=True)
            t = time.perf_counter()
            fb = run_users(url, names("feedback"), pref, sampling, list(zip(kinds, feedback)),
                           lambda u, w: u.compare(w[1]) if w[0] == "compare" else u.feedback_chat(w[1]), "feedback", args.request_timeout)
            phases["feedback"] = time.perf_counter() - t
            choices = {c: sum(r.get("choice") == c for r in fb) for c in ("a", "b", "tie")}
            thumbs = {"up": sum(r["thumb"] == 1 for r in fb), "down": sum(r["thumb"] == -1 for r in fb)}
            result["feedback"] = {"comparisons": len(feedback) - n_chat, "chats": n_chat, "choices": choices, "thumbs": thumbs,
                                  "replies": reply_stats(replies_by_user_prefix(files["db"], "feedback-"), pref)}
            print(f"  choices {choices}, thumbs {thumbs}, {phases['feedback']:.0f}s", flush=True)

            # 3. one training cycle on the app's files
            from trainer.data import recent_prompts

            fb_contexts = {r["context"] for r in replies_by_user_prefix(files["db"], "feedback-")}
            ppo_prompts = recent_prompts(files["db"], len(fb_contexts))
            leaked = {p[-1]["content"] for p in ppo_prompts} & set(heldout)
            if leaked:
                raise RuntimeError(f"{len(leaked)} held-out prompts would be PPO prompts; not starting the cycle")
            cmd = [sys.executable, "-m", "trainer", "once", *model_flags, *file_flags,
                   "--temperature", str(args.temperature), *shlex.split(args.trainer_args), "--max-prompts", str(len(fb_contexts))]
            result["trainer_command"] = shlex.join(["python", *cmd[1:]])
            print(f"\n[3/5] training cycle: python -m trainer once ... {args.trainer_args} --temperature {args.temperature} "
                  f"--max-prompts {len(fb_contexts)}", flush=True)
            t = time.perf_counter()
            rc = run_trainer(cmd, tmp / "trainer.log")
            phases["cycle"] = time.perf_counter() - t
            cycle = last_cycle(files["cycles_log"])
            result["cycle"] = {"exit_code": rc, **cycle}
            version = cycle.get("version")
            manifest = read_json(files["adapters_dir"] / version / "manifest.json") if version else {}
            rversion = cycle.get("reward_version")
            rmanifest = read_json(files["reward_dir"] / rversion / "manifest.json") if rversion else {}
            result["reward_model"] = {"version": rversion, **{k: rmanifest.get(k) for k in ("counts", "examples", "metrics", "feedback_ids", "seconds")}}
            result["candidate"] = {"version": version, **{k: manifest.get(k) for k in ("status", "reasons", "parent", "reward_model", "feedback_ids",
                                                                                       "prompts", "eval_prompts", "stop_reason", "evaluation", "seconds")},
                                   "ppo_metrics": manifest.get("metrics")}
            decision = cycle.get("decision", "failed")
            print(f"  cycle {decision} after {phases['cycle']:.0f}s: {'; '.join(cycle.get('reasons') or []) or 'passed the gate'}", flush=True)

            # 4. the app swaps to the new adapter
            forced = False
            if decision == "rejected" and version and args.force_measure:
                from assistant import adapters

                adapters.promote(files["adapters_dir"], version, reason="promoted by bench/loop.py --force-measure after the gate rejected it",
                                 forced_by_benchmark=True)
                forced = True
                print(f"  --force-measure: {version} promoted by hand although the gate rejected it", flush=True)
            measure = decision == "promoted" or forced
            if decision == "rejected" and not forced:
                print(f"  {version} was rejected (manifest reasons: {'; '.join(manifest.get('reasons') or [])}); "
                      "nothing to measure (--force-measure promotes and measures it anyway)", flush=True)
            result["measurement_label"] = ("forced: rejected by the gate, promoted by --force-measure" if forced
                                           else "promoted by the gate" if measure else f"not measured: cycle {decision}")
            if measure:
                phases["swap_wait"] = wait_for_version(url, version, args.swap_timeout)
                print(f"\n[4/5] the app serves {version} {phases['swap_wait']:.1f}s after the cycle ended", flush=True)

                # 5. the same held-out prompts on the new adapter, judged against the baseline
                print(f"\n[5/5] measurement: {len(work)} replies on held-out prompts from {version}", flush=True)
                t = time.perf_counter()
                new = run_users(url, names("heldout-new"), pref, sampling, work, lambda u, w: u.chat(w[2]), "after", args.request_timeout)
                phases["after"] = time.perf_counter() - t
                phases["measurement"] = phases["baseline"] + phases["after"]
                outcomes = []
                for (i, k, prompt), b, n in zip(work, base, new):
                    verdict = judge(pref, n["text"], b["text"])  # 'a' = the new adapter's reply
                    outcomes.append({"prompt": prompt, "sample": k, "base": b["text"], "new": n["text"],
                                     "winner": {"a": "new", "b": "base", "tie": "tie"}[verdict],
                                     "base_status_version": b["status_version"], "new_status_version": n["status_version"]})
                wins = sum(o["winner"] == "new" for o in outcomes)
                ties = sum(o["winner"] == "tie" for o in outcomes)
                rate, lo, hi = wilson(wins + 0.5 * ties, len(outcomes))
                result["measurement"] = {
                    "pairs": len(outcomes), "wins": wins, "ties": ties, "losses": len(outcomes) - wins - ties,
                    "win_rate": rate, "win_rate_lo": lo, "win_rate_hi": hi,
                    "base": reply_stats(replies_by_user_prefix(files["db"], "heldout-base-"), pref),
                    "new": reply_stats(replies_by_user_prefix(files["db"], "heldout-new-"), pref),
                    "pairs_detail": outcomes,
                }
    finally:
        phases["total"] = time.perf_counter() - started
        result["phases_s"] = phases
        result["loadavg_end"] = os.getloadavg()
        result["work_dir"] = str(tmp) if args.keep else None
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str))
        if args.keep:
            print(f"\nkept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    report(result)
    print(f"\nwrote {out}")


def report(result: dict) -> None:
    ph, rm, cand, cyc = result["phases_s"], result.get("reward_model") or {}, result.get("candidate") or {}, result.get("cycle") or {}
    rmm = rm.get("metrics") or {}
    ev = cand.get("evaluation") or {}
    history = cand.get("ppo_metrics") or []
    m = result.get("measurement")
    print(f"\n## Closed loop: hidden preference '{result['preference']['name']}' ({result['preference']['description']})\n")
    print("| measure | value |")
    print("| --- | --- |")
    if m:
        print(f"| win rate of the new adapter over base, held-out prompts ({result['measurement_label']}) | "
              f"**{m['win_rate']:.3f}** [95% CI {m['win_rate_lo']:.3f}, {m['win_rate_hi']:.3f}] |")
        print(f"| pairs: wins / ties / losses | {m['pairs']}: {m['wins']} / {m['ties']} / {m['losses']} |")
        if m["wins"] + m["losses"]:
            print(f"| decisive pairs won by the new adapter | {m['wins'] / (m['wins'] + m['losses']):.3f} of {m['wins'] + m['losses']} |")
        b, n = m["base"], m["new"]
        print(f"| mean words, base → new | {b['mean_words']:.1f} → {n['mean_words']:.1f} |")
        print(f"| replies that ended (EOS), base → new | {b['ended']:.2f} → {n['ended']:.2f} |")
        print(f"| mean hidden score, base → new | {fmt(b['mean_hidden_score'], '.2f')} → {fmt(n['mean_hidden_score'], '.2f')} |")
        print(f"| versions that produced the replies, base / new | {b['versions']} / {n['versions']} |")
    else:
        print(f"| win rate | {result.get('measurement_label', 'not measured')} |")
    print(f"| cycle decision | {cyc.get('decision', '?')}{': ' + '; '.join(cyc['reasons']) if cyc.get('reasons') else ''} |")
    print(f"| feedback rows used (cycle `rows`) | {cyc.get('rows', '–')}; ids {json.dumps(cyc.get('feedback_ids', {}))} |")
    print(f"| reward model {rm.get('version') or '–'}: examples | {json.dumps(rm.get('examples'))} |")
    print(f"| reward model: val accuracy [95% CI] | {fmt(rmm.get('val_accuracy'))} [{fmt(rmm.get('val_accuracy_lo'))}, {fmt(rmm.get('val_accuracy_hi'))}] "
          f"(n={rmm.get('val_pairs', '–')}); pointwise {fmt(rmm.get('val_pointwise_accuracy'))}; train accuracy {fmt(rmm.get('train_accuracy'))} |")
    if ev:
        print(f"| gate: held-out reward, candidate vs base | {ev['candidate_score']:.3f} vs {ev['current_score']:.3f} (margin {ev['margin']:+.3f}), "
              f"{ev['prompts']} prompts |")
        print(f"| gate: KL to the base (nats per reply) | {ev['kl']:.2f} |")
        print(f"| gate: ended, candidate vs base; degenerate | {ev['candidate_ended']:.2f} vs {ev['current_ended']:.2f}; {ev['degenerate']} |")
    if history:
        print(f"| PPO objective/kl, first → last iteration | {history[0]['objective/kl']:.2f} → {history[-1]['objective/kl']:.2f} ({cand.get('stop_reason')}) |")
    if cyc.get("seconds") is not None and "cycle" in ph:
        rm_s, ppo_s = rm.get("seconds") or 0.0, cand.get("seconds") or 0.0
        print(f"| training cycle by step | reward model {rm_s:.0f} s, PPO {ppo_s:.0f} s, evaluation + gate {cyc['seconds'] - rm_s - ppo_s:.0f} s, "
              f"process start {ph['cycle'] - cyc['seconds']:.0f} s |")
    for key, label in (("app_start", "app start"), ("baseline", "baseline replies (measurement, before)"), ("feedback", "feedback"),
                       ("cycle", "training cycle"), ("swap_wait", "hot-swap wait"), ("after", "new-adapter replies (measurement, after)"),
                       ("measurement", "measurement (before + after)"),
                       ("total", "total")):
        if key in ph:
            print(f"| wall time: {label} | {ph[key]:.1f} s |" if key == "swap_wait" else f"| wall time: {label} | {ph[key]:.0f} s |")
    if history:
        print("\nPPO iterations (candidate manifest):\n")
        print("\n".join(ppo_table(history)))
    if m:
        print("\nFirst pairs (new adapter vs base, held-out prompts):\n")
        for o in m["pairs_detail"][:3]:
            print(f"- {o['prompt'][:70]!r}: winner {o['winner']}\n    new:  {o['new'][:160]!r}\n    base: {o['base'][:160]!r}")
    print(f"\ntrainer: {result.get('trainer_command', '')}")


if __name__ == "__main__":
    main()
