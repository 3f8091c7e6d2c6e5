"""The engine's KV cache: preallocated buffers (assistant/kvcache.py) against
transformers' DynamicCache, grown by concatenation, on the same engine and model.

    .venv/bin/python bench/kvcache.py                 # default model, 1 and 8 streams, 3 alternating rounds each
    .venv/bin/python bench/kvcache.py --rounds 5 --max-new-tokens 256

Each round runs one Engine per cache kind, one after the other (order alternating from
round to round), on the same policy, with the same prompts (seed-tasks.jsonl, the
same system prompt as bench/serve.py) submitted by N concurrent users, greedy, so both
kinds generate the same tokens (checked). Users send their prompts back to back, so
rows join and retire mid-batch as they do in the app. Reported: tokens/s per kind and
round, and the ratio slack / dynamic per round with its median.
Writes bench/results/kvcache.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, SYSTEM, machine, seed_tasks, write_results  # noqa: E402


def run_round(policy, kind: str, prompts: list[str], streams: int, params) -> dict:
    from assistant.chat import Engine

    engine = Engine(policy, max_batch=8, kv_cache=kind)
    msgs = lambda p: [{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}]  # noqa: E731
    try:
        engine.submit(msgs("Say hi."), params).text()  # warm-up
        t0 = time.perf_counter()

        def user(u: int) -> list[tuple[str, int]]:
            out = []
            for p in prompts[u::streams]:
                s = engine.submit(msgs(p), params)
                out.append((s.text(), s.reply.completion_tokens))
            return out

        with ThreadPoolExecutor(streams) as pool:
            replies = [r for rs in pool.map(user, range(streams)) for r in rs]
        wall = time.perf_counter() - t0
    finally:
        engine.close()
    tokens = sum(n for _, n in replies)
    return {"kind": kind, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "texts": [t for t, _ in replies]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per stream count")
    ap.add_argument("--streams", default="1,8", help="comma-separated concurrent users")
    ap.add_argument("--per-user", type=int, default=3, help="prompts each user sends back to back")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", default=str(RESULTS / "kvcache.json"))
    args = ap.parse_args()

    from assistant.chat import GenParams
    from assistant.config import ModelArgs
    from assistant.model import build_policy

    policy = build_policy(ModelArgs())
    params = GenParams(temperature=0.0, top_p=1.0, max_new_tokens=args.max_new_tokens)
    tasks = [t["instruction"] for t in seed_tasks()]
    result = {"machine": machine(), "max_new_tokens": args.max_new_tokens, "per_user": args.per_user, "streams": {}}
    for n in (int(x) for x in args.streams.split(",")):
        prompts = tasks[: n * args.per_user]
        rounds = []
        for r in range(args.rounds):
            order = ("slack", "dynamic") if r % 2 == 0 else ("dynamic", "slack")
            got = {kind: run_round(policy, kind, prompts, n, params) for kind in order}
            same = got["slack"]["texts"] == got["dynamic"]["texts"]
            ratio = got["slack"]["tokens_per_s"] / got["dynamic"]["tokens_per_s"]
            rounds.append({"order": list(order), "same_texts": same, "ratio": ratio,
                           **{k: {x: v[x] for x in ("tokens", "wall_s", "tokens_per_s")} for k, v in got.items()}})
            print(f"{n} stream(s), round {r + 1} ({' then '.join(order)}): slack {got['slack']['tokens_per_s']:.1f} tok/s, "
                  f"dynamic {got['dynamic']['tokens_per_s']:.1f} tok/s = {ratio:.2f}x; same replies: {same}", flush=True)
        ratios = [x["ratio"] for x in rounds]
        result["streams"][str(n)] = {"rounds": rounds, "median_ratio": statistics.median(ratios), "min_ratio": min(ratios),
                                     "max_ratio": max(ratios)}
    print("\n| streams | slack / dynamic tokens/s, median [min, max] of rounds | same replies |\n| --- | --- | --- |")
    for n, s in result["streams"].items():
        print(f"| {n} | {s['median_ratio']:.2f}x [{s['min_ratio']:.2f}, {s['max_ratio']:.2f}] ({len(s['rounds'])} rounds) | "
              f"{all(r['same_texts'] for r in s['rounds'])} |")
    print(f"\nwrote {write_results(args.out, result)}")


if __name__ == "__main__":
    main()
