"""Serving benchmark: streaming speed through the real app, and vote-write latency.

    python bench/serve.py                  # starts the app on the default model itself
    python bench/serve.py --url URL --db PATH   # against an app you started

Measures, through gradio_client (the real client of a Gradio app):
- time to first token (TTFT) and tokens/s of 1 stream,
- aggregate tokens/s of 4 and 8 concurrent users (each sending prompts back to
  back), and the ratio to 1 user
  (the baseline, measured in the same run),
- on the engine alone (no web server): 1, 4 and 8 streams, and 1 stream against
  `model.generate` on the same model, prompts and settings (alternating prompt by prompt),
- p50/p99 latency of storing a vote with 32 concurrent writer threads, both
  directly on the FeedbackStore and end to end through the app's /vote endpoint.
Token counts come from the replies table (what the engine generated), timings
from the client. Prints a table and writes bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gradio_client import Client  # noqa: E402

from assistant.feedback import FeedbackStore  # noqa: E402
from bench.common import RESULTS, SYSTEM, machine, percentile, seed_tasks, write_results  # noqa: E402


def one_stream(url: str, prompt: str, max_new_tokens: int) -> dict:
    client = Client(url, verbose=False)
    t0 = time.perf_counter()
    ttft = None
    job = client.submit(prompt, SYSTEM, 0.7, 0.9, max_new_tokens, False, api_name="/send")
    for out in job:
        chat = out[0]
        if ttft is None and chat and chat[-1]["role"] == "assistant" and chat[-1]["content"]:
            ttft = time.perf_counter() - t0
    return {"prompt": prompt, "ttft_s": ttft, "wall_s": time.perf_counter() - t0}


def completion_tokens(db: Path, prompts: list[str]) -> int:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    total = 0
    for p in prompts:
        row = con.execute(
            "SELECT completion_tokens FROM replies WHERE json_extract(context, '$[#-1].content') = ? ORDER BY id DESC LIMIT 1", (p,)
        ).fetchone()
        total += row[0]
    con.close()
    return total


def streams_round(url: str, db: Path, prompts: list[str], n: int, per_user: int, max_new_tokens: int) -> dict:
    """`n` simulated users at once, each sending `per_user` prompts back to back."""
    used = prompts[: n * per_user]
    t0 = time.perf_counter()

    def user(u: int) -> list[dict]:
        return [one_stream(url, p, max_new_tokens) for p in used[u::n]]

    with ThreadPoolExecutor(n) as pool:
        runs = [r for rs in pool.map(user, range(n)) for r in rs]
    wall = time.perf_counter() - t0
    tokens = completion_tokens(db, used)
    return {
        "streams": n,
        "replies": len(used),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_s_median": statistics.median(r["ttft_s"] for r in runs),
    }


def engine_vs_generate(engine, policy, conversations: list[list[dict]], params) -> dict:
    """One stream: the Engine against `model.generate` on the same model (the base, no
    adapter, as the engine serves it before any promotion), prompts and sampling
    settings, alternating prompt by prompt so that drift in the machine's speed hits
    both sides alike. Tokens/s of each side = its generated tokens / its wall time."""
    import torch

    from assistant.chat import build_prompt

    model, tok = policy.model, policy.tokenizer
    eos = model.generation_config.eos_token_id
    sides = {"engine": [0, 0.0], "generate": [0, 0.0]}
    with model.disable_adapter():  # warm-up of generate's path
        model.generate(input_ids=torch.tensor([build_prompt(tok, conversations[0])]), do_sample=True, temperature=params.temperature,
                       top_p=params.top_p, top_k=0, max_new_tokens=8, pad_token_id=tok.pad_token_id)
    for i, conv in enumerate(conversations):
        torch.manual_seed(i)
        t0 = time.perf_counter()
        s = engine.submit(conv, params)
        s.text()
        sides["engine"][1] += time.perf_counter() - t0
        sides["engine"][0] += s.reply.completion_tokens
        ids = torch.tensor([build_prompt(tok, conv)])
        torch.manual_seed(i)
        t0 = time.perf_counter()
        with torch.inference_mode(), model.disable_adapter():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=params.temperature,
                                 top_p=params.top_p, top_k=0, max_new_tokens=params.max_new_tokens, pad_token_id=tok.pad_token_id,
                                 eos_token_id=eos)
        sides["generate"][1] += time.perf_counter() - t0
        sides["generate"][0] += out.shape[1] - ids.shape[1]
    res = {name: {"tokens": n, "wall_s": w, "tokens_per_s": n / w} for name, (n, w) in sides.items()}
    res["ratio_engine_over_generate"] = res["engine"]["tokens_per_s"] / res["generate"]["tokens_per_s"]
    res["prompts"] = len(conversations)
    print(f"1 stream, engine vs model.generate: {res['engine']['tokens_per_s']:.1f} vs {res['generate']['tokens_per_s']:.1f} tok/s "
          f"= {res['ratio_engine_over_generate']:.2f}x ({len(conversations)} prompts each)", flush=True)
    return res


def engine_rounds(prompts: list[str], max_new_tokens: int, per_user: int) -> dict:
    """The same load on the Engine in this process, without the web server."""
    from assistant.chat import Engine, GenParams
    from assistant.config import ModelArgs
    from assistant.model import build_policy

    policy = build_policy(ModelArgs())
    engine = Engine(policy, max_batch=8)
    params = GenParams(temperature=0.7, top_p=0.9, max_new_tokens=max_new_tokens)
    msgs = lambda p: [{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}]  # noqa: E731
    engine.submit(msgs("Say hi."), params).text()  # warm-up
    out = {"vs_generate": engine_vs_generate(engine, policy, [msgs(p) for p in prompts[:per_user * 2]], params)}
    for n in (1, 4, 8):
        used = prompts[: n * per_user]
        t0 = time.perf_counter()

        def user(u: int) -> int:
            total = 0
            for p in used[u::n]:
                s = engine.submit(msgs(p), params)
                s.text()
                total += s.reply.completion_tokens
            return total

        with ThreadPoolExecutor(n) as pool:
            tokens = sum(pool.map(user, range(n)))
        wall = time.perf_counter() - t0
        out[str(n)] = {"streams": n, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}
        print(f"engine only, {n} stream(s): {tokens} tokens in {wall:.2f}s = {tokens / wall:.1f} tok/s", flush=True)
    engine.close()
    return out


def vote_latency_store(db_path: Path, writers: int = 32, votes_each: int = 50) -> dict:
    store = FeedbackStore(db_path)
    conv = store.new_conversation(None, SYSTEM)
    ctx = [{"role": "user", "content": "hi"}]
    reply_ids = [
        store.add_reply(conversation_id=conv, context=ctx, text=f"reply {i}", params={}, model="bench", adapter_version="base",
                        prompt_tokens=1, completion_tokens=1, latency_ms=1.0, ttft_ms=1.0, finish_reason="eos")
        for i in range(votes_each)
    ]
    users = [store.ensure_user(f"writer{w}") for w in range(writers)]
    lat: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(writers)

    def writer(uid: int) -> None:
        start.wait()
        mine = []
        for i, rid in enumerate(reply_ids):
            t = time.perf_counter()
            store.set_vote(rid, uid, 1 if i % 2 else -1, "bench")
            mine.append((time.perf_counter() - t) * 1000)
        with lock:
            lat.extend(mine)

    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(writer, users))
    stored = store.counts()["votes"]
    store.close()
    return {"writers": writers, "votes": len(lat), "stored_rows": stored, "p50_ms": percentile(lat, 0.5), "p99_ms": percentile(lat, 0.99)}


def vote_latency_app(url: str, writers: int = 32, votes_each: int = 5) -> dict:
    def writer(w: int) -> list[float]:
        client = Client(url, verbose=False)
        client.predict(f"voter{w}", "", api_name="/set_user")
        client.submit("Say hi.", SYSTEM, 0.0, 0.9, 4, False, api_name="/send").result()
        out = []
        for i in range(votes_each):
            t = time.perf_counter()
            client.predict(1, 1 if i % 2 else -1, "", api_name="/vote")
            out.append((time.perf_counter() - t) * 1000)
        return out

    with ThreadPoolExecutor(writers) as pool:
        lat = [x for xs in pool.map(writer, range(writers)) for x in xs]
    return {"writers": writers, "votes": len(lat), "p50_ms": percentile(lat, 0.5), "p99_ms": percentile(lat, 0.99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="an already running app (default: start one on the default model)")
    ap.add_argument("--db", help="that app's --db (needed with --url, for token counts)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="reply length cap per stream")
    ap.add_argument("--per-user", type=int, default=3, help="prompts each simulated user sends back to back")
    ap.add_argument("--app-args", default="", help="extra flags for the app this script starts, e.g. '--quantize nf4'")
    ap.add_argument("--out", default=str(RESULTS / "serve.json"))
    args = ap.parse_args()

    from tests.server import running_app

    prompts = [t["instruction"] for t in seed_tasks()]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.url:
            if not args.db:
                ap.error("--db is required with --url")
            ctx, db = contextlib.nullcontext(args.url), Path(args.db)
        else:
            from assistant.model import prepare_default_model

            prepare_default_model(ROOT / "data" / "models")
            db = tmp / "feedback.db"
            ctx = running_app("--db", str(db), "--adapters-dir", str(tmp / "adapters"), "--max-batch", "8", *args.app_args.split())
        with ctx as url:
            streams_round(url, db, prompts[150:], 2, 1, 16)  # warm-up
            rounds = {}
            for n in (1, 4, 8):
                rounds[n] = streams_round(url, db, prompts, n, args.per_user, args.max_new_tokens)
                print(f"{n} stream(s): {rounds[n]['tokens']} tokens in {rounds[n]['wall_s']:.2f}s = {rounds[n]['tokens_per_s']:.1f} tok/s, "
                      f"median TTFT {rounds[n]['ttft_s_median'] * 1000:.0f} ms", flush=True)
            app_votes = vote_latency_app(url)
        store_votes = vote_latency_store(tmp / "votes.db")
    engine = engine_rounds(prompts, args.max_new_tokens, args.per_user) if not args.url else None

    base = rounds[1]["tokens_per_s"]
    result = {
        "machine": machine(),
        "max_new_tokens": args.max_new_tokens,
        "app_args": args.app_args,
        "streams": {str(n): r for n, r in rounds.items()},
        "speedup_4_vs_1": rounds[4]["tokens_per_s"] / base,
        "speedup_8_vs_1": rounds[8]["tokens_per_s"] / base,
        "engine_only": engine,
        "vote_store_32_writers": store_votes,
        "vote_app_32_clients": app_votes,
    }
    print()
    print("| measure | value |")
    print("| --- | --- |")
    print(f"| 1 stream: TTFT (median) | {rounds[1]['ttft_s_median'] * 1000:.0f} ms |")
    for n in (1, 4, 8):
        print(f"| {n} stream(s): aggregate tokens/s | {rounds[n]['tokens_per_s']:.1f} ({rounds[n]['tokens_per_s'] / base:.2f}x of 1 stream) |")
    if engine:
        e1 = engine["1"]["tokens_per_s"]
        for n in ("1", "4", "8"):
            print(f"| engine only (no web server), {n} stream(s): tokens/s | {engine[n]['tokens_per_s']:.1f} ({engine[n]['tokens_per_s'] / e1:.2f}x) |")
        g = engine["vs_generate"]
        print(f"| 1 stream, engine vs `model.generate` (same model, prompts, settings): tokens/s | {g['engine']['tokens_per_s']:.1f} vs "
              f"{g['generate']['tokens_per_s']:.1f} ({g['ratio_engine_over_generate']:.2f}x) |")
    print(f"| vote write, 32 writer threads on the store: p50 / p99 | {store_votes['p50_ms']:.2f} / {store_votes['p99_ms']:.2f} ms ({store_votes['stored_rows']} rows) |")
    print(f"| vote through the app, 32 clients: p50 / p99 | {app_votes['p50_ms']:.1f} / {app_votes['p99_ms']:.1f} ms |")
    print(f"\nwrote {write_results(args.out, result)}")


if __name__ == "__main__":
    main()
