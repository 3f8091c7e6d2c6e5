"""GPU benchmark: the serving engine, hot-swap, a PPO iteration and a reward-model step,
on models of real shapes with random weights, in one run of under 8 minutes.

    bash bench/gpu.sh                       # on the GPU machine: installs what it lacks, then runs this
    .venv/bin/python bench/gpu.py           # where peft and bitsandbytes are installed already
    .venv/bin/python bench/gpu.py --cpu     # smoke run on a CPU (~30 s on 2 cores): small sizes, float32, no nf4
    .venv/bin/python bench/gpu.py --tiny    # the smallest CPU run (~20 s), the one tests/test_bench_gpu.py runs

No model files and no network are needed. Each shape is built from its config in memory,
with random weights (seeded), and saved to a temporary directory, so that every
measurement loads it through the project's own code (`assistant.model.build_policy`,
`load_base`, nf4 through bitsandbytes) exactly as a downloaded model would be:

    smollm2-135m  SmolLM2-135M's LlamaConfig: hidden 576, 30 layers, 9 heads, 3 kv heads, MLP 1536, vocab 49152, tied
    qwen2-1.5b    Qwen2-1.5B's shape: hidden 1536, 28 layers, 12 heads, 2 kv heads, MLP 8960, vocab 151936, tied
    llama3-8b     Llama-3-8B's shape: hidden 4096, 32 layers, 32 heads, 8 kv heads, MLP 14336, vocab 128256 (engine only)

Tokenizer: the byte-level tokenizer of tests/tiny.py (3 special tokens + 256 bytes, the
tiny model's chat template), its vocabulary padded with filler tokens `<|padN|>` up to
each shape's vocab_size. Prompts therefore take about one token per character, and
sampled ids, which the random weights spread over the whole vocabulary, decode to the
fillers' names. The ids mean nothing; what is measured is what each step costs.

What it measures, per shape (the 8B: the engine only, and only if time allows):
1. engine-none, engine-nf4: `assistant.chat.Engine` with 1, 8 and 32 concurrent streams
   (sampling 0.7 / top-p 0.9, --max-new-tokens each), on the unquantised base (bfloat16
   on CUDA, what `--quantize none` loads) and on the nf4 base. Per round: tokens/s,
   median time to first token, and the share of the bandwidth bound it reaches. The
   bound is the tokens/s at which each decode step only reads memory at the GPU's peak
   bandwidth (--hbm-gbps, default 4800 GB/s for an H200; the JSON says which was used):
       bytes per step = weights read per step + streams × mean context × KV bytes per token
   where the weights are every base parameter a step reads (packed 4-bit weights and
   their scales for nf4; the LM head once; not the input embeddings, of which a step
   reads one row per stream; not LoRA weights, which are off while the base serves), and
   the mean context is the longest prompt plus half the reply (the engine left-pads its
   KV cache to the longest row). Tokens/s counts prefill and every other cost of a round,
   so the share is an end-to-end figure.
2. swap: hot-swap latency while chats stream, measured as bench/swap.py measures it
   (its `plan_swaps`, `chat_worker`, `Probe` and `timed_swaps`): --swaps calls of
   `adapters.activate`, each to a freshly published version (a load from disk) or to the
   base, while --swap-chats greedy chats stream; p50 / p99 / max of the calls' wall time.
   The mixed-version check of bench/swap.py is not repeated here.
3. ppo: one `trainer.ppo.train` iteration at the trainer's PPO settings (batch 8,
   mini-batch 4, 2 epochs) with replies capped at --ppo-new-tokens, on the base the
   trainer picks (`--quantize auto`: nf4 on CUDA), against a scripted reward.
4. reward: one optimiser step of `trainer.reward.fit` at the RewardArgs defaults (8 pairs
   in micro-batches of 2, LoRA on the top 8 layers) on synthetic pairs as long as
   --reward-max-length allows, on the same base as PPO.
Items 3 and 4 record peak GPU memory (`torch.cuda.max_memory_allocated`; on a CPU, the
process's peak resident memory during the item), and so do the others.

Time budget: before each item the time left (--budget-s from the start of the process)
is compared with a stated upper estimate of the item; an item that would not fit is
skipped and recorded as skipped, with the reason. Stream rounds that run past their
item's allowance are cut (replies cancelled) and marked `cut_short`. An item that fails
is recorded with its error and the run goes on. The JSON is rewritten after every item,
so a run that is stopped keeps what it measured. Prints a table at the end and writes
bench/results/gpu.json (gpu.sh: $OUT/gpu.json).
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # the budget counts from here, imports included

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import itertools  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from assistant import adapters  # noqa: E402
from assistant.chat import Engine, GenParams  # noqa: E402
from assistant.config import BASE_VERSION, ModelArgs  # noqa: E402
from assistant.model import build_policy, resolve_quantize  # noqa: E402
from bench import swap  # noqa: E402
from bench.common import RESULTS, RssSampler, library_versions, machine, percentile, write_results  # noqa: E402

H200_HBM_GBPS = 4800.0  # NVIDIA H200: 4.8 TB/s of HBM3e
ITEMS = ("engine-none", "swap", "engine-nf4", "ppo", "reward")
SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # those of tests/tiny.py's tokenizer

SHAPES = {  # name -> (model_type, config fields); max_position_embeddings only bounds prompt + reply in the engine
    "smollm2-135m": ("llama", dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                   intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                                   max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5)),
    "qwen2-1.5b": ("qwen2", dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                 intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True,
                                 max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)),
    "llama3-8b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
                                max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5)),
}


@dataclass(frozen=True)
class Sizes:
    """How much of each measurement one run does, and how long each item may take."""

    plan: dict  # shape -> (layers, or None for the shape's own; items run)
    streams: tuple[int, ...]  # concurrent streams per engine round
    max_new_tokens: int  # tokens per stream in the engine rounds
    swaps: int
    swap_interval: float  # seconds from one swap's start to the next
    swap_chats: int
    swap_new_tokens: int
    ppo_batch: int  # PPOArgs: ppo_batch_size, mini_batch_size, ppo_epochs
    ppo_mini_batch: int
    ppo_epochs: int
    ppo_new_tokens: int
    reward_pairs: int  # RewardArgs.reward_batch_size: one step
    reward_micro_batch: int
    reward_max_length: int
    budget_s: float
    estimates: dict = field(default_factory=dict)  # shape -> item ("build" too) -> upper estimate in seconds


PRESETS = {
    "gpu": Sizes(
        plan={"smollm2-135m": (None, ITEMS), "qwen2-1.5b": (None, ITEMS), "llama3-8b": (None, ("engine-none", "engine-nf4"))},
        streams=(1, 8, 32), max_new_tokens=128, swaps=9, swap_interval=0.5, swap_chats=8, swap_new_tokens=64,
        ppo_batch=8, ppo_mini_batch=4, ppo_epochs=2, ppo_new_tokens=128, reward_pairs=8, reward_micro_batch=2,
        reward_max_length=512, budget_s=420,
        # Guesses, not measurements (no GPU run was recorded when they were set): generous, so that an item that
        # starts also ends inside the budget. The 8B's build writes 16 GB and its loads read it back.
        estimates={"smollm2-135m": {"build": 15, "engine-none": 45, "swap": 45, "engine-nf4": 50, "ppo": 45, "reward": 30},
                   "qwen2-1.5b": {"build": 30, "engine-none": 50, "swap": 50, "engine-nf4": 60, "ppo": 60, "reward": 40},
                   "llama3-8b": {"build": 90, "engine-none": 90, "engine-nf4": 100}},
    ),
    "cpu": Sizes(
        plan={"smollm2-135m": (4, ITEMS)}, streams=(1, 8), max_new_tokens=32, swaps=4, swap_interval=1.0, swap_chats=4,
        swap_new_tokens=16, ppo_batch=4, ppo_mini_batch=2, ppo_epochs=1, ppo_new_tokens=16, reward_pairs=4,
        reward_micro_batch=2, reward_max_length=128, budget_s=170,
        estimates={"smollm2-135m": {"build": 10, "engine-none": 30, "swap": 30, "engine-nf4": 30, "ppo": 30, "reward": 30}},
    ),
    "tiny": Sizes(
        plan={"smollm2-135m": (1, ITEMS)}, streams=(1, 2), max_new_tokens=4, swaps=2, swap_interval=0.2, swap_chats=2,
        swap_new_tokens=4, ppo_batch=2, ppo_mini_batch=2, ppo_epochs=1, ppo_new_tokens=4, reward_pairs=2,
        reward_micro_batch=2, reward_max_length=32, budget_s=90,
        estimates={"smollm2-135m": {"build": 5, "engine-none": 5, "swap": 5, "engine-nf4": 5, "ppo": 5, "reward": 5}},
    ),
}

TOKENIZER_NOTE = ("tests/tiny.py's byte-level tokenizer (3 special tokens + 256 bytes, its chat template), the vocabulary "
                  "padded with filler tokens <|padN|> up to each shape's vocab_size: prompts take about one token per "
                  "character; the random weights sample ids all over the vocabulary, which decode to the fillers' names")


# -- models -----------------------------------------------------------------------------


def padded_tokenizer(vocab_size: int):
    """tests/tiny.py's byte-level tokenizer with filler tokens appended to its vocabulary up to `vocab_size`."""
    from tokenizers import models

    from tests.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    backend = tok.backend_tokenizer
    vocab = backend.get_vocab(with_added_tokens=True)
    if vocab_size < len(vocab):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {len(vocab)} tokens")
    vocab.update({f"<|pad{i}|>": i for i in range(len(vocab), vocab_size)})
    backend.model = models.BPE(vocab=vocab, merges=[])  # no merges: text still splits into bytes
    return tok


def shape_config(shape: str, layers: int | None):
    from transformers import AutoConfig

    model_type, fields = SHAPES[shape]
    fields = {**fields, **({"num_hidden_layers": layers} if layers else {}), **SPECIAL_IDS}
    return AutoConfig.for_model(model_type, **fields)


def build_model_dir(shape: str, layers: int | None, device: torch.device, dtype: torch.dtype, path: Path) -> dict:
    """Build `shape` with random weights (seed 0) on `device` in `dtype` and save it, with
    its padded tokenizer, as a Hugging Face checkpoint at `path`."""
    from transformers import AutoModelForCausalLM

    config = shape_config(shape, layers)
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for key, value in SPECIAL_IDS.items():
        setattr(model.generation_config, key, value)
    init_s = time.perf_counter() - t
    t = time.perf_counter()
    model.save_pretrained(path)
    padded_tokenizer(config.vocab_size).save_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    del model
    return {"model_type": config.model_type, "layers": config.num_hidden_layers, "parameters": params,
            "config": {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                                        "intermediate_size", "vocab_size", "tie_word_embeddings", "max_position_embeddings")},
            "init_s": init_s, "save_s": time.perf_counter() - t,
            "saved_gb": sum(f.stat().st_size for f in path.iterdir()) / 1e9}


def bytes_read_per_step(model) -> int:
    """Bytes of weights one decode step reads (see the module docstring): every base
    parameter once, packed 4-bit weights with their quantisation scales, the LM head once
    even when tied, and neither an untied input embedding nor LoRA weights."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding, head = base.get_input_embeddings().weight, base.get_output_embeddings().weight
    total = 0
    for name, p in base.named_parameters():  # shared (tied) parameters come once
        if "lora_" in name or (p is embedding and embedding.data_ptr() != head.data_ptr()):
            continue
        total += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)  # bitsandbytes 4-bit: per-block scales, themselves quantised
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            if getattr(state, "state2", None) is not None:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return total


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of keys and values one token adds to the KV cache, all layers."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def peak_memory(device: torch.device, record: dict):
    """Record the peak memory of the block in record["peak_memory_mb"] and how it was measured."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        try:
            yield
        finally:
            torch.cuda.synchronize()
            record["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
            record["memory_measure"] = "torch.cuda.max_memory_allocated"
        return
    sampler = RssSampler(every=0.02)
    sampler.start()
    try:
        yield
    finally:
        sampler.stop.set()
        record["peak_memory_mb"] = sampler.take()
        record["memory_measure"] = "peak resident memory of the process during the item (no CUDA device)"


# -- the items --------------------------------------------------------------------------


def model_args(path: Path, quantize: str, device: torch.device) -> ModelArgs:
    margs = ModelArgs(model=str(path), quantize=quantize, device=str(device))
    margs.validate()
    return margs


def stream_round(engine: Engine, n: int, params: GenParams, prompts: list[str], deadline: float, weight_bytes: int,
                 kv_token_bytes: int, hbm_gbps: float) -> dict:
    """`n` streams submitted at once and drained; cancelled at `deadline`."""
    t0 = time.perf_counter()
    streams = [engine.submit(swap.messages(prompts[i % len(prompts)]), params) for i in range(n)]
    timer = threading.Timer(max(0.0, deadline - time.perf_counter()), lambda: [s.cancel() for s in streams])
    timer.daemon = True
    timer.start()
    try:
        for s in streams:
            s.text()
    finally:
        timer.cancel()
    wall = time.perf_counter() - t0
    replies = [s.reply for s in streams]
    tokens = sum(r.completion_tokens for r in replies)
    steps = max(r.completion_tokens for r in replies)
    longest_prompt = max(len(s.prompt_ids) for s in streams)
    bytes_per_step = weight_bytes + n * (longest_prompt + steps / 2) * kv_token_bytes
    bound = n * hbm_gbps * 1e9 / bytes_per_step
    tps = tokens / wall
    ttfts = [r.ttft_ms for r in replies if r.ttft_ms is not None]
    return {
        "streams": n, "tokens": tokens, "wall_s": wall, "tokens_per_s": tps, "tokens_per_s_per_stream": tps / n,
        "ttft_ms_median": statistics.median(ttfts) if ttfts else None, "ms_per_step": wall * 1000 / max(steps, 1),
        "longest_prompt_tokens": longest_prompt, "bytes_per_step": bytes_per_step, "bound_tokens_per_s": bound,
        "share_of_bandwidth_bound": tps / bound, "cut_short": any(r.finish_reason == "stopped" for r in replies),
    }


def engine_item(path: Path, quantize: str, device: torch.device, dtype: torch.dtype, sizes: Sizes, prompts: list[str], hbm_gbps: float,
                deadline: float) -> dict:
    """Stream rounds at each of `sizes.streams` on one engine; `dtype` is the compute dtype (that of the KV cache)."""
    rec: dict = {}
    with peak_memory(device, rec):
        t = time.perf_counter()
        policy = build_policy(model_args(path, quantize, device))
        rec["load_s"] = time.perf_counter() - t
        rec.update(quantize=policy.quantize, dtype=str(dtype).removeprefix("torch."))
        weight_bytes = bytes_read_per_step(policy.model)
        kv_token_bytes = kv_bytes_per_token(policy.model.get_base_model().config, dtype)
        rec.update(weight_bytes_per_step=weight_bytes, kv_bytes_per_token=kv_token_bytes, max_new_tokens=sizes.max_new_tokens)
        engine = Engine(policy, max_batch=max(sizes.streams))
        try:
            warm = [engine.submit(swap.messages(p), GenParams(max_new_tokens=4)) for p in itertools.islice(itertools.cycle(prompts), max(sizes.streams))]
            for s in warm:  # kernels and allocator warmed at the largest batch
                s.text()
            params = GenParams(temperature=0.7, top_p=0.9, max_new_tokens=sizes.max_new_tokens)
            rec["streams"] = {}
            for n in sizes.streams:
                if time.perf_counter() >= deadline:
                    rec["streams"][str(n)] = {"streams": n, "status": "skipped", "reason": "the item's time allowance ran out"}
                    continue
                r = rec["streams"][str(n)] = stream_round(engine, n, params, prompts, deadline, weight_bytes, kv_token_bytes, hbm_gbps)
                print(f"  {n:2d} stream(s): {r['tokens_per_s']:8.1f} tok/s, {r['share_of_bandwidth_bound']:6.1%} of the bandwidth bound "
                      f"({r['bound_tokens_per_s']:.0f} tok/s), TTFT {r['ttft_ms_median'] or 0:.0f} ms", flush=True)
        finally:
            engine.close()
    del policy, engine
    return rec


def swap_item(path: Path, device: torch.device, sizes: Sizes, prompts: list[str], work: Path, deadline: float) -> dict:
    """Swaps while chats stream, as bench/swap.py measures them (every swap to an adapter loads a fresh version)."""
    rec: dict = {}
    with peak_memory(device, rec):
        margs = model_args(path, "none", device)
        adapters_dir = work / "adapters"
        slots = ["adapter 1", "adapter 2", BASE_VERSION]
        plan = swap.plan_swaps(margs, adapters_dir, slots, sizes.swaps, True, 0.1, 0)
        free_memory()  # the copy of the base that published the adapters
        policy = build_policy(margs)
        engine = Engine(policy, max_batch=sizes.swap_chats)
        probe = swap.Probe(engine)
        records: list[dict] = []
        stop = threading.Event()
        workers: list[threading.Thread] = []
        try:
            adapters.activate(engine, adapters_dir, plan.initial)
            params = GenParams(temperature=0.0, top_p=1.0, max_new_tokens=sizes.swap_new_tokens)
            counter = itertools.count()
            workers += [threading.Thread(target=swap.chat_worker, args=(engine, prompts, counter, params, stop, records), daemon=True)
                        for _ in range(sizes.swap_chats)]
            t_start = time.perf_counter()
            for w in workers:
                w.start()
            swap.wait_until(lambda: len(records) >= sizes.swap_chats, timeout=max(1.0, deadline - time.perf_counter()))
            t_swap = time.perf_counter()
            swaps = swap.timed_swaps(engine, probe, adapters_dir, plan.schedule, sizes.swap_interval, t_swap, t_start, plan.slot_of)
            time.sleep(max(0.0, t_swap + sizes.swaps * sizes.swap_interval - time.perf_counter()))
            t_end = time.perf_counter()
        finally:
            stop.set()
            for w in workers:
                w.join(timeout=max(5.0, deadline - time.perf_counter()))
            engine.close()
    ok = [s for s in swaps if not s["error"]]
    lat = [s["ms"] for s in ok]
    loads = [s["load_ms"] for s in ok if s["loaded"]]
    rec.update(
        swaps=len(swaps), swaps_failed=len(swaps) - len(ok), chats=sizes.swap_chats, max_new_tokens=sizes.swap_new_tokens,
        swap_ms_p50=percentile(lat, 0.5) if lat else None, swap_ms_p99=percentile(lat, 0.99) if lat else None,
        swap_ms_max=max(lat) if lat else None, swaps_that_loaded=len(loads), load_ms_p50=percentile(loads, 0.5) if loads else None,
        wait_step_ms_p50=percentile([s["wait_step_ms"] for s in ok if s["wait_step_ms"] is not None] or [0.0], 0.5),
        replies=len(records), replies_failed=sum(swap.failure(r) is not None for r in records if "t_end" in r),
        tokens_per_s_while_swapping=swap.tokens_in(records, t_swap, t_end) / (t_end - t_swap),
        schedule=[plan.initial, *plan.schedule],
    )
    del policy, engine, probe
    return rec


def ppo_item(path: Path, device: torch.device, sizes: Sizes, prompts: list[str]) -> dict:
    """One `trainer.ppo.train` iteration at the trainer's settings, on the base it would pick."""
    from trainer import ppo
    from trainer.config import PPOArgs

    rec: dict = {}
    args = dataclasses.replace(PPOArgs(), ppo_batch_size=sizes.ppo_batch, mini_batch_size=sizes.ppo_mini_batch,
                               ppo_epochs=sizes.ppo_epochs, max_new_tokens=sizes.ppo_new_tokens)
    args.validate()
    cfg = ppo.config_from(args)
    with peak_memory(device, rec):
        t = time.perf_counter()
        margs = model_args(path, "auto", device)
        model, tokenizer = ppo.build_trainable_policy(margs)
        rec["load_s"] = time.perf_counter() - t
        convs = [[{"role": "user", "content": p}] for p in prompts]
        reward_fn = lambda _prompts, texts: torch.tensor([len(t) / 100 for t in texts])  # noqa: E731  scripted: the weights are random
        t = time.perf_counter()
        _, history, stop = ppo.train(model, tokenizer, convs, reward_fn, cfg, 1, seed=0, progress=False, log=lambda line: None)
        rec["seconds"] = time.perf_counter() - t
    h = history[0]
    rec.update(quantize=resolve_quantize(margs.quantize, device), batch_size=cfg.batch_size, mini_batch_size=cfg.mini_batch_size,
               ppo_epochs=cfg.ppo_epochs, max_new_tokens=cfg.max_new_tokens, stop=stop,
               **{k: h[k] for k in ("time/rollout", "time/score", "time/reference", "time/update", "tokens_per_s/rollout", "response/length")})
    del model
    return rec


def reward_item(path: Path, device: torch.device, sizes: Sizes, prompts: list[str]) -> dict:
    """One optimiser step of `trainer.reward.fit` at the RewardArgs defaults, on pairs as long as the cut allows."""
    from trainer import reward
    from trainer.config import RewardArgs
    from trainer.data import Examples, Pair, to_prompt

    rec: dict = {}
    rargs = dataclasses.replace(RewardArgs(), reward_epochs=1, reward_min_steps=0, reward_batch_size=sizes.reward_pairs, reward_micro_batch_size=sizes.reward_micro_batch,
                                reward_max_length=sizes.reward_max_length, min_pairs=1, normalizer_size=2 * sizes.reward_pairs)
    rargs.validate()
    chars = sizes.reward_max_length + 16  # one byte-level token per character: longer than the cut
    pairs = [Pair(to_prompt([{"role": "user", "content": prompts[i % len(prompts)]}]), ("yes, " * chars)[:chars], ("no, " * chars)[:chars],
                  conversation_id=f"bench-{i}", kind="comparison") for i in range(sizes.reward_pairs)]
    with peak_memory(device, rec):
        rm, metrics = reward.fit(model_args(path, "auto", device), rargs, Examples(pairs=pairs), Examples(), progress=False)
    rec.update(quantize=rm.quantize, pairs=len(pairs), micro_batch_size=rargs.reward_micro_batch_size, max_length=rargs.reward_max_length,
               lora_layers=rargs.reward_lora_layers, steps=metrics["steps"], step_s=metrics["train_seconds"], fit_s=metrics["seconds"],
               pairs_per_s=metrics["pairs_per_s"])
    del rm
    return rec


# -- the run ----------------------------------------------------------------------------


class Budget:
    """The run's time budget: runs an item if its estimate fits in the time left, records
    what happened to it, and rewrites the JSON after each one."""

    def __init__(self, seconds: float, out: Path, result: dict):
        self.seconds, self.deadline, self.out, self.result = seconds, STARTED + seconds, out, result

    def elapsed(self) -> float:
        return time.perf_counter() - STARTED

    def run(self, record: dict, label: str, estimate_s: float, fn, reserve_s: float = 0.0) -> bool:
        """`fn(deadline)` returns the item's figures; they go into `record` with its status.
        The item is skipped unless its estimate, plus `reserve_s` for what must follow it, fits."""
        left = self.deadline - time.perf_counter()
        record.clear()  # what it said before it ran
        if left < estimate_s + reserve_s:
            then = f" and {reserve_s:.0f} s for the first item after it" if reserve_s else ""
            record.update(status="skipped", reason=f"time budget: {left:.0f} s of {self.seconds:.0f} s left, the item may take "
                                                   f"{estimate_s:.0f} s{then}")
        else:
            print(f"[{self.elapsed():4.0f} s] {label} (may take {estimate_s:.0f} s)", flush=True)
            started = time.perf_counter()
            try:
                figures = fn(min(self.deadline, started + 2 * estimate_s))
                record.update(status="ok", **figures)
            except Exception as exc:  # one item's failure must not lose the others' figures
                record.update(status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-4000:])
                print(f"  FAILED: {type(exc).__name__}: {exc}", flush=True)
            record["item_s"] = time.perf_counter() - started
            free_memory()
        if record["status"] == "skipped":
            print(f"[{self.elapsed():4.0f} s] {label}: skipped ({record['reason']})", flush=True)
        self.result["items"].append({"item": label, "status": record["status"], "seconds": record.get("item_s"), "estimate_s": estimate_s})
        self.result["elapsed_s"] = self.elapsed()
        write_results(self.out, self.result)
        return record["status"] == "ok"


def skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


def shape_entry(reason: str) -> dict:
    """Every record of one shape, each skipped for `reason` until it runs."""
    return {"build": skipped(reason), "engine": {"none": skipped(reason), "nf4": skipped(reason)},
            "swap": skipped(reason), "ppo": skipped(reason), "reward": skipped(reason)}


def record_of(entry: dict, item: str) -> dict:
    return entry["engine"][item.split("-")[1]] if item.startswith("engine-") else entry[item]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="smoke run on the CPU: the 135M shape with 4 layers, 1 and 8 streams, float32, no nf4")
    ap.add_argument("--tiny", action="store_true", help="the smallest CPU run (implies --cpu): 1 layer, 1 and 2 streams, 4 new tokens")
    ap.add_argument("--hbm-gbps", type=float, default=None,
                    help=f"the GPU's peak memory bandwidth in GB/s, for the bandwidth bound (default: {H200_HBM_GBPS:g}, an NVIDIA H200)")
    ap.add_argument("--budget-s", type=float, default=None, help="seconds the whole run may take, from the start (default: 420 GPU, 170 --cpu, 90 --tiny)")
    ap.add_argument("--shapes", default=None, help=f"comma-separated shapes to run, of {', '.join(SHAPES)} (default: all the setting plans)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: 1 with --cpu, whose figures only show that the script works and "
                         "which one thread keeps steady on a shared machine; torch's own on a GPU)")
    ap.add_argument("--work-dir", default=None, help="where the random models are saved while they are measured (default: a temporary directory)")
    ap.add_argument("--out", default=str(RESULTS / "gpu.json"))
    args = ap.parse_args(argv)
    args.cpu = args.cpu or args.tiny
    if args.hbm_gbps is not None and args.hbm_gbps <= 0:
        ap.error("--hbm-gbps must be positive")
    if args.budget_s is not None and args.budget_s <= 0:
        ap.error("--budget-s must be positive")
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be at least 1")
    if args.shapes:
        unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
        if unknown:
            ap.error(f"--shapes: unknown {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
    if not args.cpu and not torch.cuda.is_available():
        ap.error("no CUDA device here; add --cpu (or --tiny) for the CPU smoke run")
    return args


def report(result: dict) -> None:
    print(f"\n## GPU benchmark ({result['setting']}, {result['device']['name']}, bound at {result['bandwidth']['hbm_gbps']:g} GB/s)\n")
    print("| shape | measure | value |\n| --- | --- | --- |")
    for shape, entry in result["models"].items():
        for q in ("none", "nf4"):
            e = entry["engine"][q]
            if e["status"] != "ok":
                print(f"| {shape} | engine, {q} | {e['status']}: {e.get('reason') or e.get('error')} |")
                continue
            cells = [f"{n}: {r['tokens_per_s']:.0f} tok/s ({r['share_of_bandwidth_bound']:.1%})" if "tokens_per_s" in r else f"{n}: skipped"
                     for n, r in e["streams"].items()]
            print(f"| {shape} | engine, {q} ({e['dtype']}), streams: tokens/s (share of bound) | {'; '.join(cells)} |")
        for name, key, fmt in (("swap", "swap_ms_p50", lambda r: f"p50 / p99 / max {r['swap_ms_p50']:.0f} / {r['swap_ms_p99']:.0f} / "
                                                                  f"{r['swap_ms_max']:.0f} ms over {r['swaps']} swaps ({r['swaps_failed']} failed)"),
                               ("ppo", "seconds", lambda r: f"{r['seconds']:.1f} s per iteration, peak {r['peak_memory_mb']:,.0f} MB"),
                               ("reward", "step_s", lambda r: f"{r['step_s']:.2f} s per step, peak {r['peak_memory_mb']:,.0f} MB")):
            r = entry[name]
            print(f"| {shape} | {name} | {fmt(r) if r['status'] == 'ok' and r.get(key) is not None else r['status'] + ': ' + str(r.get('reason') or r.get('error'))} |")


def main() -> None:
    args = parse_args()
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one bar per load and save would drown the log
    if args.threads or args.cpu:
        torch.set_num_threads(args.threads or 1)
    # peft says so each time the adapter it had active is unloaded; the engine re-selects adapters anyway
    warnings.filterwarnings("ignore", message=r"Adapter .* was active which is now deleted")
    setting = "tiny" if args.tiny else "cpu" if args.cpu else "gpu"
    sizes = PRESETS[setting]
    device = torch.device("cpu" if args.cpu else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # what assistant.model.load_base computes in
    wanted = set(args.shapes.split(",")) if args.shapes else set(SHAPES)
    prompts = swap.load_prompts()
    dev = {"type": device.type, "name": "CPU"}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        dev = {"type": "cuda", "name": props.name, "memory_gib": props.total_memory / 2**30, "cuda": torch.version.cuda,
               "capability": f"{props.major}.{props.minor}"}
    result: dict = {
        "command": "python bench/gpu.py " + " ".join(sys.argv[1:]),
        "setting": setting,
        "machine": machine(),
        "versions": library_versions("torch", "transformers", "peft", "bitsandbytes", "accelerate"),
        "device": dev,
        "dtype": str(dtype).removeprefix("torch."),
        "bandwidth": {"hbm_gbps": args.hbm_gbps or H200_HBM_GBPS,
                      "source": "--hbm-gbps" if args.hbm_gbps else "default: the NVIDIA H200's peak HBM3e bandwidth, 4.8 TB/s",
                      **({"note": "a CPU run: the share is against that GPU figure, not this machine's memory"} if args.cpu else {})},
        "tokenizer": TOKENIZER_NOTE,
        "prompts": {"source": "seed-tasks.jsonl" if prompts is not swap.FALLBACK_PROMPTS else "bench/swap.py's built-in prompts",
                    "count": len(prompts)},
        "sizes": {k: v for k, v in dataclasses.asdict(sizes).items() if k != "plan"} | {"plan": {s: list(p[1]) for s, p in sizes.plan.items()}},
        "budget_s": args.budget_s or sizes.budget_s,
        "models": {},
        "items": [],
    }
    out = Path(args.out)
    budget = Budget(result["budget_s"], out, result)
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-", dir=args.work_dir))
    print(f"bench/gpu.py ({setting}) on {dev['name']}, {result['dtype']}, budget {budget.seconds:.0f} s; models under {work}", flush=True)
    try:
        for shape in SHAPES:
            if shape not in sizes.plan:
                result["models"][shape] = shape_entry(f"not in the {setting} setting")
                continue
            if shape not in wanted:
                result["models"][shape] = shape_entry("left out by --shapes")
                continue
            entry = result["models"][shape] = shape_entry("the model was not built")
            layers, items = sizes.plan[shape]
            est = sizes.estimates[shape]
            path = work / shape
            if not budget.run(entry["build"], f"{shape}: build and save", est["build"],
                              lambda deadline: build_model_dir(shape, layers, device, dtype, path), reserve_s=min(est[i] for i in items)):
                continue
            fns = {
                "engine-none": lambda d: engine_item(path, "none", device, dtype, sizes, prompts, result["bandwidth"]["hbm_gbps"], d),
                "engine-nf4": lambda d: engine_item(path, "nf4", device, dtype, sizes, prompts, result["bandwidth"]["hbm_gbps"], d),
                "swap": lambda d: swap_item(path, device, sizes, prompts, work / f"{shape}-swap", d),
                "ppo": lambda d: ppo_item(path, device, sizes, prompts),
                "reward": lambda d: reward_item(path, device, sizes, prompts),
            }
            for item in ITEMS:
                rec = record_of(entry, item)
                if item not in items:
                    rec.update(reason="not planned for this shape: the 8B runs the engine only")
                    continue
                if item == "engine-nf4" and device.type == "cpu":
                    rec.update(reason="a CPU run: bitsandbytes dequantises every weight on each CPU matmul, so an nf4 figure "
                                      "here says nothing of the GPU path (tests/test_model.py tests nf4 on CPU)")
                    continue
                budget.run(rec, f"{shape}: {item}", est[item], fns[item])
            shutil.rmtree(path, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        result["elapsed_s"] = budget.elapsed()
        write_results(out, result)
    report(result)
    print(f"\nwrote {out} after {result['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
