"""Hot-swap benchmark: adapter swaps while 8 streaming chats run, and a check that no
reply mixed adapter versions.

    .venv/bin/python bench/swap.py                  # default model, 8 chats, 20 swaps (~5 min on 2 CPU cores)
    .venv/bin/python bench/swap.py --fresh          # every swap to an adapter activates a never-loaded version
    .venv/bin/python bench/swap.py --model DIR --max-new-tokens 16   # any local model directory

What it does, all in one process on the real serving engine (`assistant.chat.Engine`):
1. Publishes `--adapters` LoRA adapters (2) with `assistant.adapters.publish` into a
   temporary adapters directory. Their A and B matrices are random (B scaled by
   `--lora-scale`), so greedy replies differ from the base model's and from each other.
2. Starts `--chats` (8) threads that each stream one chat after another (greedy,
   `--max-new-tokens` each, a new chat as soon as one ends) on prompts from
   seed-tasks.jsonl. Every reply is pinned to the version current when it was sent.
3. Once the first `--chats` replies have finished, a baseline phase: `--swaps` ×
   `--interval` seconds with no swap.
4. Swap phase, the same length: `--swaps` (20) calls of `assistant.adapters.activate`,
   one every `--interval` seconds, rotating v000001 → v000002 → base → v000001 ...
   (`--no-base` leaves base out). With `--fresh`, every swap to an adapter activates
   a version published for it (the same weights as its slot), so each of those loads
   from disk.
5. Stops the chats, then regenerates every reply alone: a new engine with max_batch=1,
   only the reply's recorded version active, one reply at a time. A reply whose text
   differs from its solo regeneration is counted as mixed-version (or batch-dependent:
   replies from the no-swap phases are the control for that), and the point where the
   two diverge is analysed (re-tokenised texts, logits of the solo model there).

Swap latency is the wall time of each `activate` call: validate on the caller's thread,
wait for the current decode step, then load (when the version is not loaded) and
switch on the engine thread. The parts, and each forward pass's duration, are timed by
wrapping `Policy.load_adapter`, `Policy.unload_adapter`, `Engine.call` and
`Engine._forward` on the instances. Tokens/s of each phase counts the tokens generated
inside its window (each reply's tokens spread evenly between its first token and its
end). Prints a table and writes bench/results/swap.json.
"""

from __future__ import annotations

import argparse
import itertools
import math
import shutil
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402

from assistant import adapters  # noqa: E402
from assistant.chat import Engine, GenParams, build_prompt  # noqa: E402
from assistant.config import BASE_VERSION, DEFAULT_MODEL, ModelArgs  # noqa: E402
from assistant.model import build_policy, load_base, lora_config  # noqa: E402
from bench.common import RESULTS, SEED_TASKS, SYSTEM, machine, percentile, seed_tasks, write_results  # noqa: E402

PROBES = [  # replies to these under each version show how differently the adapters behave
    "Give me three tips for sleeping better.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a binary search does.",
]
FALLBACK_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a binary search does.",
    "Give me three tips for sleeping better.",
    "What is 17 times 23?",
    "Describe a cat to someone who has never seen one.",
    "Suggest a name for a bakery.",
    "Why is the sky blue?",
]


def load_prompts() -> list[str]:
    """Seed-task instructions, or a few built-in prompts where the data set is not beside the checkout."""
    return [t["instruction"] for t in seed_tasks()] if SEED_TASKS.exists() else FALLBACK_PROMPTS


def messages(prompt: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]


# -- adapters ----------------------------------------------------------------------------


def publish_adapters(margs: ModelArgs, adapters_dir: Path, weights_of: list[int], scale: float, seed: int) -> list[str]:
    """Publish one version per entry of `weights_of` (an adapter index: the same index,
    the same weights) and return the version names in that order."""
    _, base = load_base(margs)
    model = get_peft_model(base, lora_config(margs), adapter_name="bench").eval()
    params = {n: p for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n}
    weights = {}
    for k in sorted(set(weights_of)):
        gen = torch.Generator().manual_seed(seed * 1000 + k)
        w = {}
        for name, p in params.items():
            if "lora_A" in name:  # peft's own init range for A: U(-1/sqrt(in), 1/sqrt(in))
                w[name] = (torch.rand(p.shape, generator=gen) * 2 - 1) / math.sqrt(p.shape[1])
            else:
                w[name] = torch.randn(p.shape, generator=gen) * scale
        weights[k] = w
    out = []
    for k in weights_of:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights[k][name])
        manifest = {"parent": BASE_VERSION, "metrics": {}, "bench": {"adapter": k + 1, "lora_scale": scale, "seed": seed}}
        out.append(adapters.publish(adapters_dir, model, "bench", manifest))
    del model, base
    return out


@dataclass
class SwapPlan:
    """The adapter versions of one run of swaps, published and in order."""

    initial: str  # active before the first swap
    schedule: list[str]  # the version each swap activates, in order
    version_of_slot: dict[str, str]  # slot -> the first version published for it (base -> base)
    slot_of: dict[str, str]  # version -> its slot
    published: list[str]


def plan_swaps(margs: ModelArgs, adapters_dir: Path, slots: list[str], swaps: int, fresh: bool, scale: float, seed: int) -> SwapPlan:
    """Publish what `swaps` swaps over `slots` need: slot 0 is active before the run and
    swap i goes to slot (i + 1) mod len(slots). One version per adapter slot, or with
    `fresh` one per swap to an adapter (the same weights as its slot), so that every such
    swap loads from disk. BASE_VERSION in `slots` stands for the base model."""
    targets = [slots[(i + 1) % len(slots)] for i in range(swaps)]
    wanted = [s for s in [slots[0], *targets] if s != BASE_VERSION] if fresh else [s for s in slots if s != BASE_VERSION]
    published = publish_adapters(margs, adapters_dir, [slots.index(s) for s in wanted], scale, seed)
    if fresh:
        it = iter(published)
        initial = next(it)
        schedule = [BASE_VERSION if s == BASE_VERSION else next(it) for s in targets]
    else:
        initial = published[0]
        schedule = [published[slots.index(s)] if s != BASE_VERSION else BASE_VERSION for s in targets]
    version_of_slot = {BASE_VERSION: BASE_VERSION}
    for s, v in zip(wanted, published):
        version_of_slot.setdefault(s, v)
    slot_of = {v: s for s, v in zip(wanted, published)} | {BASE_VERSION: BASE_VERSION}
    return SwapPlan(initial, schedule, version_of_slot, slot_of, published)


# -- instrumentation (wraps, on the instances only, what the engine calls) ------------------


class Probe:
    """Times adapter loads/unloads and engine jobs, and counts forward passes that mix versions."""

    def __init__(self, engine: Engine):
        policy = engine.policy
        self.loads: list[dict] = []
        self.unloads: list[dict] = []
        self.last_job: dict = {}
        self.forwards = self.mixed_forwards = 0
        self.steps: list[tuple] = []  # (started at, rows, mixes versions, decode step, ms) of each forward pass
        load, unload, forward, call = policy.load_adapter, policy.unload_adapter, engine._forward, engine.call

        def timed_load(version, path):
            t = time.perf_counter()
            load(version, path)
            self.loads.append({"version": version, "at": t, "ms": (time.perf_counter() - t) * 1000})

        def timed_unload(version):
            t = time.perf_counter()
            unload(version)
            self.unloads.append({"version": version, "at": t, "ms": (time.perf_counter() - t) * 1000})

        def counted_forward(input_ids, attention_mask, position_ids, cache, versions):
            self.forwards += 1
            mixed = len(set(versions)) > 1
            self.mixed_forwards += mixed
            t = time.perf_counter()
            out = forward(input_ids, attention_mask, position_ids, cache, versions)
            self.steps.append((t, len(versions), mixed, input_ids.shape[1] == 1, (time.perf_counter() - t) * 1000))
            return out

        def timed_call(fn):
            box = {"queued": time.perf_counter()}

            def job(p):
                box["started"] = time.perf_counter()
                try:
                    return fn(p)
                finally:
                    box["done"] = time.perf_counter()

            self.last_job = box
            return call(job)

        prepare = adapters.prepare
        self.last_prepare_ms: float | None = None

        def timed_prepare(*args):
            t = time.perf_counter()
            try:
                return prepare(*args)
            finally:
                self.last_prepare_ms = (time.perf_counter() - t) * 1000

        policy.load_adapter, policy.unload_adapter = timed_load, timed_unload
        engine._forward, engine.call = counted_forward, timed_call
        adapters.prepare = timed_prepare  # validate + copy into a free slot, on the swapping thread


# -- the chats ---------------------------------------------------------------------------


def chat_worker(engine: Engine, prompts: list[str], counter, params: GenParams, stop: threading.Event, records: list) -> None:
    """Stream one chat after another until `stop` is set; append one record per reply."""
    while not stop.is_set():
        n = next(counter)
        rec: dict = {"n": n, "prompt": n % len(prompts), "error": None}
        try:
            stream = engine.submit(messages(prompts[n % len(prompts)]), params)
        except Exception as exc:  # counted as a failed reply
            rec.update(error=f"submit: {type(exc).__name__}: {exc}", t_submit=time.perf_counter(), t_end=time.perf_counter(), version=None)
            records.append(rec)
            time.sleep(0.1)
            continue
        rec.update(version=stream.version, t_submit=stream.submitted)
        pieces = []
        try:
            for delta in stream:
                pieces.append(delta)
        except Exception as exc:
            rec["error"] = f"stream: {type(exc).__name__}: {exc}"
        reply = stream.reply
        rec["streamed"] = "".join(pieces)
        if reply is None:
            rec["error"] = rec["error"] or "no reply at the end of the stream"
            rec["t_end"] = time.perf_counter()
        else:
            rec.update(
                text=reply.text,
                version=reply.adapter_version,
                tokens=reply.completion_tokens,
                finish=reply.finish_reason,
                t_first=None if reply.ttft_ms is None else stream.submitted + reply.ttft_ms / 1000,
                t_end=stream.submitted + reply.latency_ms / 1000,
            )
        records.append(rec)


def failure(rec: dict) -> str | None:
    """Why a reply counts as failed, or None."""
    if rec["error"]:
        return rec["error"]
    if rec["finish"] == "stopped":
        return "cancelled"
    if rec["streamed"] != rec["text"]:
        return "streamed text differs from the stored reply"
    if rec["tokens"] > 0 and not rec["text"]:
        return "empty text for a non-empty reply"
    return None


def tokens_in(records: list[dict], a: float, b: float) -> float:
    """Tokens generated in [a, b], each reply's tokens spread evenly over its decoding time."""
    total = 0.0
    for r in records:
        if r.get("t_first") is None or not r.get("tokens"):
            continue
        s, e = r["t_first"], r["t_end"]
        if e - s < 1e-6:
            total += r["tokens"] if a <= e <= b else 0
        else:
            total += r["tokens"] * max(0.0, min(b, e) - max(a, s)) / (e - s)
    return total


def wait_until(cond, timeout: float) -> None:
    deadline = time.perf_counter() + timeout
    while not cond() and time.perf_counter() < deadline:
        time.sleep(0.05)


def timed_swaps(engine: Engine, probe: Probe, adapters_dir: Path, schedule: list[str], interval: float, t_swap: float,
                t_start: float, slot_of: dict | None = None) -> list[dict]:
    """Activate each version of `schedule` in turn, swap i at `t_swap` + i × `interval`;
    one record per swap: the wall time of the `adapters.activate` call (`ms`) and its
    parts from `probe` (validate, wait for the decode step, load, switch). `at` counts
    from `t_start`; a failed swap records its error and the next one goes ahead."""
    swaps = []
    for i, version in enumerate(schedule):
        time.sleep(max(0.0, t_swap + i * interval - time.perf_counter()))
        loads_before = len(probe.loads)
        probe.last_job, probe.last_prepare_ms = {}, None
        t = time.perf_counter()
        sw = {"i": i + 1, "to": version, "slot": (slot_of or {}).get(version, version), "at": t - t_start}
        try:
            sw["from"] = adapters.activate(engine, adapters_dir, version)
            sw["error"] = None
        except Exception as exc:
            sw["error"] = f"{type(exc).__name__}: {exc}"
        end = time.perf_counter()
        job = probe.last_job
        new_loads = probe.loads[loads_before:]
        sw.update(
            ms=(end - t) * 1000,
            validate_ms=probe.last_prepare_ms,
            wait_step_ms=(job["started"] - job["queued"]) * 1000 if "started" in job else 0.0,  # 0: switched without the engine thread
            job_ms=(job["done"] - job["started"]) * 1000 if "done" in job else 0.0,
            on_engine_thread="started" in job,
            switched_at=job.get("started", end),
            loaded=bool(new_loads),
            load_ms=sum(x["ms"] for x in new_loads),
        )
        swaps.append(sw)
        print(f"  swap {i + 1:2d}/{len(schedule)} {sw.get('from', '?')} -> {version}: {sw['ms']:6.0f} ms "
              f"(validate {sw['validate_ms'] or 0:.0f}, wait for step {sw['wait_step_ms'] or 0:.0f}, "
              f"{'load ' + format(sw['load_ms'], '.0f') + ' + ' if sw['loaded'] else 'nothing to load, ' if version == BASE_VERSION else 'already loaded, '}"
              f"switch {(sw['job_ms'] or 0) - sw['load_ms']:.0f})" + (f" FAILED: {sw['error']}" if sw["error"] else ""), flush=True)
    return swaps


# -- the solo check ------------------------------------------------------------------------


def logits_after(policy, version: str, ids: list[int]) -> torch.Tensor:
    """Next-token logits of `version` after `ids`, one sequence, no cache (engine thread only)."""
    model = policy.model
    x = torch.tensor([ids], device=policy.device)
    with torch.inference_mode():
        if version == BASE_VERSION:
            with model.disable_adapter():
                return model(input_ids=x).logits[0, -1].float().cpu()
        model.set_adapter(policy.loaded[version])
        return model(input_ids=x).logits[0, -1].float().cpu()


def divergence(engine: Engine, rec: dict, prompt: str) -> dict:
    """Where a batched reply and its solo regeneration part, on re-tokenised text, and how
    close the solo model's logits were to a tie there."""
    tok = engine.policy.tokenizer
    got = tok(rec["text"], add_special_tokens=False)["input_ids"]
    ref = tok(rec["solo"], add_special_tokens=False)["input_ids"]
    j = next((i for i, (x, y) in enumerate(zip(got, ref)) if x != y), min(len(got), len(ref)))
    out = {"token_index": j, "batched_tokens": len(got), "solo_tokens": len(ref),
           "char_index": next((i for i, (x, y) in enumerate(zip(rec["text"], rec["solo"])) if x != y), min(len(rec["text"]), len(rec["solo"])))}
    prefix = build_prompt(tok, messages(prompt)) + ref[:j]
    logits = engine.call(lambda p: logits_after(p, rec["version"], prefix)).result()
    top2 = logits.topk(2)
    out["solo_top1"], out["solo_top2_gap"] = tok.decode([int(top2.indices[0])]), float(top2.values[0] - top2.values[1])
    if j < len(got):
        out["batched_token"] = tok.decode([got[j]])
        out["solo_logit_gap_to_batched_token"] = float(logits.max() - logits[got[j]])
        out["batched_token_rank"] = int((logits > logits[got[j]]).sum())
    return out


def solo_check(policy, adapters_dir: Path, records: list[dict], reps: dict, prompts: list[str], params: GenParams) -> dict:
    """Regenerate every reply alone with only its version active; compare texts."""
    engine = Engine(policy, max_batch=1)
    try:
        probe = {}
        for slot, version in reps.items():
            adapters.activate(engine, adapters_dir, version)
            probe[slot] = [engine.submit(messages(q), params).text() for q in PROBES]
            print(f"  probe on {slot} ({version}): {probe[slot][0][:70]!r}", flush=True)
        todo = [r for r in records if failure(r) is None]
        order = list(dict.fromkeys(r["version"] for r in todo))
        done = 0
        t0 = time.perf_counter()
        for version in order:
            adapters.activate(engine, adapters_dir, version)
            for r in (r for r in todo if r["version"] == version):
                r["solo"] = engine.submit(messages(prompts[r["prompt"]]), params).text()
                r["match"] = r["solo"] == r["text"]
                if not r["match"]:
                    r["divergence"] = divergence(engine, r, prompts[r["prompt"]])
                done += 1
                if done % max(10, len(todo) // 10) == 0 or done == len(todo):
                    bad = sum(not x["match"] for x in todo if "match" in x)
                    print(f"  checked {done}/{len(todo)} replies alone ({time.perf_counter() - t0:.0f} s), {bad} differ", flush=True)
        # For each reply that differs: is it another version's solo reply?
        differing = [r for r in todo if not r["match"]]
        if differing:
            for slot, version in reps.items():
                adapters.activate(engine, adapters_dir, version)
                for r in differing:
                    other = engine.submit(messages(prompts[r["prompt"]]), params).text()
                    if other == r["text"]:
                        r.setdefault("equals_solo_reply_of", []).append(slot)
        return {"probe": probe}
    finally:
        engine.close()


# -- main --------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"'{DEFAULT_MODEL}' (prepared under --models-dir by `make model`) or a local model directory")
    ap.add_argument("--models-dir", default=str(ROOT / "data" / "models"))
    ap.add_argument("--quantize", default="auto", choices=("auto", "nf4", "int8", "none"), help="auto = none (float32) on CPU, nf4 on CUDA")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--chats", type=int, default=8, help="concurrent streaming chats (also the engine's max batch)")
    ap.add_argument("--swaps", type=int, default=20)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds from one swap's start to the next; each phase lasts swaps × interval")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--adapters", type=int, default=2, help="published adapters with different weights")
    ap.add_argument("--base", action=argparse.BooleanOptionalAction, default=True, help="include the base model in the rotation")
    ap.add_argument("--fresh", action="store_true", help="every swap activates a version never loaded before (published for it), so each one loads from disk")
    ap.add_argument("--lora-scale", type=float, default=0.1, help="std of the random LoRA B weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--out", default=str(RESULTS / "swap.json"))
    args = ap.parse_args()
    # peft says so each time the adapter it had active is unloaded; the engine re-selects
    # adapters before the next step anyway.
    warnings.filterwarnings("ignore", message=r"Adapter .* was active which is now deleted")
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.model == DEFAULT_MODEL:
        if not (Path(args.models_dir) / DEFAULT_MODEL / "config.json").exists():
            sys.exit(f"error: the default model is not prepared under {args.models_dir}/{DEFAULT_MODEL}; run `make model` first")
    elif not (Path(args.model) / "config.json").exists():
        sys.exit(f"error: --model {args.model}: no config.json there; give a local model directory (or leave --model out and run `make model`)")
    slots = [f"adapter {k + 1}" for k in range(args.adapters)] + ([BASE_VERSION] if args.base else [])
    if len(slots) < 2:
        sys.exit("error: nothing to swap between; use --adapters 2 or more, or keep --base")

    margs = ModelArgs(model=args.model, quantize=args.quantize, device=args.device, models_dir=args.models_dir)
    margs.validate()
    prompts = load_prompts()
    params = GenParams(temperature=0.0, top_p=1.0, max_new_tokens=args.max_new_tokens)
    tmp = Path(tempfile.mkdtemp(prefix="swap-bench-"))
    adapters_dir = tmp / "adapters"
    try:
        t = time.perf_counter()
        plan = plan_swaps(margs, adapters_dir, slots, args.swaps, args.fresh, args.lora_scale, args.seed)
        initial, schedule, version_of_slot, slot_of = plan.initial, plan.schedule, plan.version_of_slot, plan.slot_of
        print(f"published {len(plan.published)} adapter version(s) in {time.perf_counter() - t:.1f} s "
              f"(LoRA r {margs.lora_r}, alpha {margs.lora_alpha}, B std {args.lora_scale})", flush=True)

        t = time.perf_counter()
        policy = build_policy(margs)
        engine = Engine(policy, max_batch=args.chats)
        probe = Probe(engine)
        print(f"loaded {args.model} ({policy.quantize}, {policy.device}) in {time.perf_counter() - t:.1f} s", flush=True)
        adapters.activate(engine, adapters_dir, initial)
        warm = [engine.submit(messages(p), GenParams(temperature=0.0, top_p=1.0, max_new_tokens=8)) for p in prompts[-args.chats:]]
        for s in warm:
            s.text()

        records: list[dict] = []
        stop = threading.Event()
        counter = itertools.count()
        workers = [threading.Thread(target=chat_worker, args=(engine, prompts, counter, params, stop, records), daemon=True)
                   for _ in range(args.chats)]
        t_start = time.perf_counter()
        for w in workers:
            w.start()
        phase = args.swaps * args.interval
        print(f"{args.chats} chats started; settling until {args.chats} replies have finished...", flush=True)
        wait_until(lambda: len(records) >= args.chats, timeout=600)
        t_base = time.perf_counter()
        print(f"baseline: {phase:.0f} s without swaps on {initial}", flush=True)
        while time.perf_counter() < t_base + phase:
            time.sleep(min(5.0, t_base + phase - time.perf_counter()))
            print(f"  {time.perf_counter() - t_base:4.0f} s: {len(records)} replies done", flush=True)

        t_swap = time.perf_counter()
        print(f"swapping: {args.swaps} swaps, one every {args.interval:g} s", flush=True)
        swaps = timed_swaps(engine, probe, adapters_dir, schedule, args.interval, t_swap, t_start, slot_of)
        time.sleep(max(0.0, t_swap + phase - time.perf_counter()))
        t_swap_end = time.perf_counter()
        stop.set()
        print("stopping the chats (in-flight replies finish)...", flush=True)
        for w in workers:
            w.join(timeout=600)
        alive = sum(w.is_alive() for w in workers)
        engine.close()
        forwards, mixed_forwards = probe.forwards, probe.mixed_forwards
        run_loads, run_unloads = list(probe.loads), list(probe.unloads)  # the solo check below loads and unloads too
        full = [x for x in probe.steps if x[0] >= t_base and x[1] == args.chats and x[3]]  # decode steps of a full batch
        step_ms = {
            "single_version": [x[4] for x in full if not x[2]],
            "mixed": [x[4] for x in full if x[2]],
        }
        stalled_s = sum(x["ms"] for x in run_loads if t_swap <= x["at"] <= t_swap_end) / 1000

        # Phases, token rates, replies that were in flight while the current version changed.
        switch_times = [s["switched_at"] for s in swaps if s["switched_at"] and not s["error"]]
        for r in records:
            r["during_swaps"] = r["t_submit"] < t_swap_end and r["t_end"] > t_swap
            r["across_a_swap"] = any(r["t_submit"] < x < r["t_end"] for x in switch_times)
        base_tokens = tokens_in(records, t_base, t_base + phase)
        swap_tokens = tokens_in(records, t_swap, t_swap_end)
        base_tps, swap_tps = base_tokens / phase, swap_tokens / (t_swap_end - t_swap)

        print(f"checking {len(records)} replies against solo regeneration (max_batch=1, only their version active)...", flush=True)
        reps = {s: version_of_slot[s] for s in slots}
        check = solo_check(policy, adapters_dir, records, reps, prompts, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    failed = [r for r in records if failure(r)]
    ok = [r for r in records if not failure(r)]
    swap_ok = [s for s in swaps if not s["error"]]
    lat = [s["ms"] for s in swap_ok]
    loaded = [s for s in swap_ok if s["loaded"]]
    during = [r for r in ok if r["during_swaps"]]
    control = [r for r in ok if not r["during_swaps"]]
    mixed = [r for r in during if not r["match"]]
    batch_dep = [r for r in control if not r["match"]]
    per_prompt = list(zip(*check["probe"].values()))  # for each probe prompt, the replies of every version
    distinct = sum(len(set(texts)) == len(texts) for texts in per_prompt)

    summary = {
        "swaps": len(swaps),
        "swaps_failed": len(swaps) - len(swap_ok),
        "swap_ms_p50": percentile(lat, 0.5) if lat else None,
        "swap_ms_p99": percentile(lat, 0.99) if lat else None,
        "swap_ms_max": max(lat) if lat else None,
        "swaps_that_loaded": len(loaded),
        "swap_ms_p50_loaded": percentile([s["ms"] for s in loaded], 0.5) if loaded else None,
        "swap_ms_p50_no_load": percentile([s["ms"] for s in swap_ok if not s["loaded"]], 0.5) if len(loaded) < len(swap_ok) else None,
        "load_ms_p50": percentile([s["load_ms"] for s in loaded], 0.5) if loaded else None,
        "validate_ms_p50": percentile([s["validate_ms"] for s in swap_ok if s["validate_ms"] is not None] or [0.0], 0.5) if swap_ok else None,
        "swaps_on_engine_thread": sum(s.get("on_engine_thread", False) for s in swap_ok),
        "wait_step_ms_p50": percentile([s["wait_step_ms"] for s in swap_ok], 0.5) if swap_ok else None,
        "wait_step_ms_max": max(s["wait_step_ms"] for s in swap_ok) if swap_ok else None,
        "unloads": len(run_unloads),
        "unload_ms_p50": percentile([u["ms"] for u in run_unloads], 0.5) if run_unloads else None,
        "replies": len(records),
        "replies_completed": len(ok),
        "replies_during_swaps": len(during),
        "replies_across_a_swap": sum(r["across_a_swap"] for r in during),
        "replies_failed": len(failed),
        "replies_empty": sum(1 for r in ok if not r["text"]),
        "mixed_version_replies": len(mixed),
        "no_swap_replies_differing_from_solo": len(batch_dep),
        "decode_step_ms_p50_full_batch_single_version": percentile(step_ms["single_version"], 0.5) if step_ms["single_version"] else None,
        "decode_step_ms_p50_full_batch_mixed": percentile(step_ms["mixed"], 0.5) if step_ms["mixed"] else None,
        "decode_steps_full_batch": {k: len(v) for k, v in step_ms.items()},
        "engine_seconds_loading_adapters_while_swapping": stalled_s,
        "forward_passes": forwards,
        "forward_passes_mixing_versions": mixed_forwards,
        "tokens_per_s_no_swaps": base_tps,
        "tokens_per_s_swapping": swap_tps,
        "tokens_per_s_ratio": swap_tps / base_tps if base_tps else None,
        "phase_s": phase,
        "swap_phase_s": t_swap_end - t_swap,
        "probe_prompts_all_versions_distinct": distinct,
        "probe_prompts": len(PROBES),
        "workers_stuck": alive,
    }
    result = {
        "machine": machine(),
        "model": args.model,
        "quantize": policy.quantize,
        "device": str(policy.device),
        "args": vars(args),
        "schedule": [initial, *schedule],
        "summary": summary,
        "probe_replies": {"prompts": PROBES, **check["probe"]},
        "swaps": swaps,
        "loads": run_loads,
        "unloads": run_unloads,
        "failed": [{"n": r["n"], "version": r["version"], "why": failure(r)} for r in failed],
        "differing": [
            {k: r.get(k) for k in ("n", "prompt", "version", "during_swaps", "across_a_swap", "text", "solo", "divergence", "equals_solo_reply_of")}
            for r in mixed + batch_dep
        ],
        "replies": [
            {k: r.get(k) for k in ("n", "prompt", "version", "tokens", "finish", "during_swaps", "across_a_swap", "match")}
            for r in records
        ],
    }

    fmt = lambda x: "n/a" if x is None else f"{x:.0f}"  # noqa: E731
    print()
    print("| measure | value |")
    print("| --- | --- |")
    print(f"| swaps (failed) | {summary['swaps']} ({summary['swaps_failed']}) |")
    print(f"| swap latency p50 / p99 / max | {fmt(summary['swap_ms_p50'])} / {fmt(summary['swap_ms_p99'])} / {fmt(summary['swap_ms_max'])} ms |")
    print(f"| swaps that loaded the adapter from disk | {summary['swaps_that_loaded']} of {len(swap_ok)} "
          f"(p50 {fmt(summary['swap_ms_p50_loaded'])} ms, load itself {fmt(summary['load_ms_p50'])} ms; "
          f"without a load (already loaded, or base): p50 {fmt(summary['swap_ms_p50_no_load'])} ms) |")
    print(f"| in each swap, p50: validate and copy into a slot (swapping thread) / wait for the decode step | {fmt(summary['validate_ms_p50'])} / {fmt(summary['wait_step_ms_p50'])} ms (wait max {fmt(summary['wait_step_ms_max'])}) |")
    print(f"| swaps that needed the engine thread (no free slot: loaded through peft) | {summary['swaps_on_engine_thread']} of {len(swaps)} |")
    print(f"| adapters unloaded after their last reply | {summary['unloads']} (p50 {fmt(summary['unload_ms_p50'])} ms each) |")
    print(f"| replies completed (while swapping / in flight across a swap) | {summary['replies_completed']} ({summary['replies_during_swaps']} / {summary['replies_across_a_swap']}) |")
    print(f"| failed replies | {summary['replies_failed']} |")
    print(f"| mixed-version replies (differ from solo regeneration) | {summary['mixed_version_replies']} of {summary['replies_during_swaps']} |")
    print(f"| no-swap replies differing from solo regeneration (control) | {summary['no_swap_replies_differing_from_solo']} of {len(control)} |")
    print(f"| forward passes mixing versions in one batch | {mixed_forwards} of {forwards} |")
    print(f"| decode step of {args.chats} rows, p50: one version / mixed versions | "
          f"{fmt(summary['decode_step_ms_p50_full_batch_single_version'])} / {fmt(summary['decode_step_ms_p50_full_batch_mixed'])} ms "
          f"({len(step_ms['single_version'])} / {len(step_ms['mixed'])} steps) |")
    print(f"| engine time spent loading adapters while swapping | {stalled_s:.1f} s of {t_swap_end - t_swap:.0f} s |")
    print(f"| tokens/s: no swaps / swapping ({phase:.0f} s each) | {base_tps:.1f} / {swap_tps:.1f} ({summary['tokens_per_s_ratio']:.2f}x) |")
    print(f"| probe prompts on which every version replies differently | {distinct} of {len(PROBES)} |")
    for r in mixed + batch_dep:
        d = r["divergence"]
        print(f"  differs: reply {r['n']} on {r['version']} ({'while swapping' if r['during_swaps'] else 'no swaps'}): "
              f"token {d['token_index']}, batched {d.get('batched_token')!r} vs solo {d['solo_top1']!r}, "
              f"solo logit gap {d.get('solo_logit_gap_to_batched_token', float('nan')):.4f}, "
              f"equals solo reply of {r.get('equals_solo_reply_of')}")
    if alive:
        print(f"WARNING: {alive} chat thread(s) never finished")
    print(f"\nwrote {write_results(args.out, result)}")


if __name__ == "__main__":
    main()
