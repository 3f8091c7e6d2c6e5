"""PPO benchmark: our `trainer.ppo.train` on the default model, and TRL's `RLOOTrainer` as a baseline.

    .venv/bin/python bench/ppo.py                          # 32 prompts, 8 iterations of 8, 32 new tokens (~20 min on 2 CPU cores)
    .venv/bin/python bench/ppo.py --skip-trl --skip-rm     # ours on the scripted reward only
    .venv/bin/python bench/ppo.py --quantize nf4           # 4-bit base on a CUDA GPU, both sides

Needs the benchmark extras for the baseline (`pip install -r requirements-bench.txt`: trl, datasets).

Prompts: the first `--prompts` tasks of /work/shared/data/seed-tasks.jsonl, each one user
message (the instruction, then the task's input when it has one).

The hidden rule both scenarios reward is "concise replies that end": a reply that emitted
EOS scores 1 − tokens / max_new_tokens (an empty reply scores 0); a reply cut off at the
length cap has a missing-EOS penalty of 1 subtracted from its score (which is 0 at the
cap, so it gets −1; with the reward model, its score − 1).

Scenario 1, scripted reward: `train()` against that rule as a Python function
(`concise_score`; train() itself applies the missing-EOS penalty).

Scenario 2, learned reward model: `trainer.reward.fit` on synthetic preference pairs
built from other seed tasks (`synthetic_pairs`: the first sentence of the task's
reference answer ≻ that answer padded out to a long reply), then `train()` against
`RewardModel.score`, the way `python -m trainer ppo` uses a saved reward model. The
hidden rule's score of the same rollouts is recorded too, to see whether what the
reward model learned is what it was meant to learn.

Baseline: TRL's RLOOTrainer (TRL no longer ships PPO) on the same model files, LoRA
config, prompts, reward (the same rule as a reward function, the missing-EOS penalty
applied inside it), sampling temperature, reply cap, learning rate, AdamW weight
decay, grad-norm clip, KL coefficient, ratio clip, mini-batch size and passes over each
batch, float32, no gradient checkpointing, dropout off (ours updates in eval mode).
RLOO needs at least 2 replies per prompt, so it is run twice:
- "same prompts": `--batch-size` prompts × 2 replies per iteration (twice our rollouts),
- "same rollouts": `--batch-size`/2 prompts × 2 replies (our batch shapes).
Speed is compared as wall time of the whole `train()` call per rollout (one
prompt-completion) and per prompt. What differs by design: RLOO has no value model and
no GAE (leave-one-out baseline, sequence-level KL); ours samples prompts with
replacement, TRL without.

Prints per-iteration tables and writes bench/results/ppo.json.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models only from local paths

import torch  # noqa: E402

from assistant.config import DEFAULT_MODEL, ModelArgs  # noqa: E402
from assistant.model import lora_config, resolve_device, resolve_model_path, resolve_quantize  # noqa: E402
from trainer import ppo  # noqa: E402
from trainer.config import RewardArgs  # noqa: E402
from bench.common import RESULTS, library_versions, machine, seed_tasks, task_prompt, write_results  # noqa: E402
from trainer.data import Examples, Pair, to_prompt  # noqa: E402


# -- prompts and the hidden rule ---------------------------------------------------


def task_messages(task: dict) -> list[dict]:
    """The conversation PPO rolls out from: the task as one user message."""
    return [{"role": "user", "content": task_prompt(task)}]


def concise_score(tokenizer, max_new_tokens: int):
    """The hidden rule on a reply that ended: 1 − tokens / max_new_tokens, 0 for an empty reply."""

    def score(text: str) -> float:
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        return 0.0 if n == 0 or not text.strip() else max(0.0, 1.0 - n / max_new_tokens)

    return score


def first_sentence(text: str, max_words: int = 12) -> str:
    head = re.split(r"(?<=[.!?])\s|\n", text.strip(), maxsplit=1)[0].strip()
    words = head.split()
    if len(words) > max_words:
        head = " ".join(words[:max_words]).rstrip(",;:") + "."
    return head


def synthetic_pairs(tasks: list[dict], min_long_words: int = 40) -> list[Pair]:
    """Concise ≻ long on each task: chosen = the first sentence of the reference answer
    (at most 12 words); rejected = the whole answer, padded with the next tasks' answers
    until it has `min_long_words` words. Tasks whose answer is empty are skipped."""
    pairs = []
    answers = [t["instances"][0]["output"].strip() for t in tasks]
    for i, task in enumerate(tasks):
        if not answers[i]:
            continue
        chosen = first_sentence(answers[i])
        long, j = answers[i], i + 1
        while len(long.split()) < min_long_words:
            long += " Also, " + answers[j % len(answers)]
            j += 1
        pairs.append(Pair(to_prompt(task_messages(task)), chosen, long, conversation_id=task["id"], kind="comparison"))
    return pairs


# -- ours --------------------------------------------------------------------------


def ppo_config(args) -> ppo.PPOConfig:
    return ppo.PPOConfig(batch_size=args.batch_size, mini_batch_size=args.mini_batch_size, ppo_epochs=args.ppo_epochs,
                         lr=args.lr, max_new_tokens=args.max_new_tokens, temperature=args.temperature, missing_eos_penalty=1.0)


def run_ours(model_args: ModelArgs, prompts: list[list[dict]], reward_fn, cfg: ppo.PPOConfig, args, label: str) -> dict:
    """build_trainable_policy + train(); the wall time of train() alone is what is compared."""
    started = time.perf_counter()
    model, tokenizer = ppo.build_trainable_policy(model_args)
    load_seconds = time.perf_counter() - started
    print(f"\n[{label}] ours: train(), {args.iterations} iterations of {cfg.batch_size} rollouts", flush=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    _, history, stop = ppo.train(model, tokenizer, prompts, reward_fn(tokenizer), cfg, args.iterations, seed=args.seed,
                                 progress=False, log=lambda line: print("  " + line, flush=True))
    wall = time.perf_counter() - started
    rollouts = len(history) * cfg.batch_size
    del model
    gc.collect()
    return {
        "history": history,
        "stop": stop,
        "train_seconds": wall,
        "load_seconds": load_seconds,
        "rollouts": rollouts,
        "seconds_per_rollout": wall / rollouts,
        "seconds_per_prompt": wall / rollouts,  # one rollout per prompt
        "loadavg_before_after": [load_before, os.getloadavg()],
    }


def scripted_reward(max_new_tokens: int):
    """reward_fn factory for train(): the hidden rule (train() applies the missing-EOS penalty)."""

    def make(tokenizer):
        score = concise_score(tokenizer, max_new_tokens)
        return lambda prompts, texts: torch.tensor([score(t) for t in texts])

    return make


def fit_reward_model(model_args: ModelArgs, tasks: list[dict], args) -> tuple[object, dict]:
    """trainer.reward.fit on synthetic concise ≻ long pairs from seed tasks outside the PPO prompts."""
    from trainer import reward

    pool = synthetic_pairs(tasks[args.prompts :])
    train, val = pool[: args.rm_pairs], pool[args.rm_pairs : args.rm_pairs + args.rm_val_pairs]
    reward_args = RewardArgs(reward_max_length=args.rm_max_length, reward_epochs=args.rm_epochs, reward_min_steps=0, reward_lr=args.rm_lr,
                             min_pairs=1, seed=args.seed)
    print(f"\n[reward model] fit on {len(train)} synthetic pairs (concise ≻ long), {len(val)} held out, "
          f"max_length {args.rm_max_length}, {args.rm_epochs} epochs", flush=True)
    started = time.perf_counter()
    rm, metrics = reward.fit(model_args, reward_args, Examples(pairs=train), Examples(pairs=val), progress=False)
    metrics = {k: v for k, v in metrics.items() if k != "train_examples_by_kind"}
    metrics["fit_wall_seconds"] = time.perf_counter() - started
    metrics["example_pair"] = {"prompt": train[0].prompt[0][1], "chosen": train[0].chosen, "rejected": train[0].rejected}
    print(f"  train accuracy {metrics['train_accuracy']:.3f}, val accuracy {metrics['val_accuracy']:.3f} "
          f"[{metrics['val_accuracy_lo']:.3f}, {metrics['val_accuracy_hi']:.3f}], {metrics['fit_wall_seconds']:.0f} s", flush=True)
    return rm, metrics


def rm_reward(rm, max_new_tokens: int, hidden: list):
    """reward_fn factory: the reward model's normalised score; the hidden rule's score of
    the same replies is appended to `hidden` (one list per call), not used for training."""

    def make(tokenizer):
        score = concise_score(tokenizer, max_new_tokens)

        def reward_fn(prompts, texts):
            hidden.append([score(t) for t in texts])
            return rm.score(prompts, texts, batch_size=16)

        return reward_fn

    return make


# -- TRL ---------------------------------------------------------------------------


def run_trl(model_args: ModelArgs, prompts: list[list[dict]], cfg: ppo.PPOConfig, args, prompts_per_step: int, label: str) -> dict:
    """RLOOTrainer with `prompts_per_step` prompts × 2 replies per generation, the same
    update passes and mini-batch size as ours; wall time of trainer.train()."""
    from datasets import Dataset
    from transformers import AutoTokenizer, BitsAndBytesConfig
    from trl import RLOOConfig, RLOOTrainer

    device = resolve_device(model_args.device)
    quantize = resolve_quantize(model_args.quantize, device)
    path = resolve_model_path(model_args)
    generations = 2
    rollouts_per_step = prompts_per_step * generations
    if rollouts_per_step % cfg.mini_batch_size:
        raise ValueError(f"--mini-batch-size {cfg.mini_batch_size} must divide TRL's {rollouts_per_step} rollouts per generation")
    steps_per_generation = rollouts_per_step // cfg.mini_batch_size
    optimizer_steps = args.iterations * steps_per_generation * cfg.ppo_epochs

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    score = concise_score(tokenizer, cfg.max_new_tokens)
    eos_ids: set[int] = set()
    penalty = cfg.missing_eos_penalty

    def concise_reply(prompts, completions, completion_ids, **kwargs):
        """The same hidden rule as ours, the missing-EOS penalty applied here."""
        return [score(c[0]["content"]) - (0.0 if ids and ids[-1] in eos_ids else penalty) for c, ids in zip(completions, completion_ids)]

    class TimedRLOO(RLOOTrainer):
        """Records the wall time of generation and of generate+score+log-probs per generation batch."""

        marks: dict = {"generate": [], "generate_score_logprobs": [], "tokens": []}

        def _generate_single_turn(self, *a, **kw):
            t = time.perf_counter()
            ids = super()._generate_single_turn(*a, **kw)
            self.marks["generate"].append(time.perf_counter() - t)
            self.marks["tokens"].append(sum(len(x) for x in ids))
            return ids

        def _generate_and_score_completions(self, *a, **kw):
            t = time.perf_counter()
            out = super()._generate_and_score_completions(*a, **kw)
            self.marks["generate_score_logprobs"].append(time.perf_counter() - t)
            return out

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    quantization_config = None
    if quantize == "nf4":
        quantization_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                                 bnb_4bit_compute_dtype=dtype)
    elif quantize == "int8":
        quantization_config = BitsAndBytesConfig(load_in_8bit=True)
    dataset = Dataset.from_list([{"prompt": p} for p in prompts])
    print(f"\n[{label}] TRL RLOOTrainer: {args.iterations} generations of {prompts_per_step} prompts × {generations} replies, "
          f"{optimizer_steps} optimiser steps of {cfg.mini_batch_size}", flush=True)
    with tempfile.TemporaryDirectory() as out_dir:
        config = RLOOConfig(
            output_dir=out_dir,
            model_init_kwargs={"dtype": dtype, **({"device_map": {"": str(device)}} if quantization_config else {})},
            num_generations=generations,
            per_device_train_batch_size=cfg.mini_batch_size,
            gradient_accumulation_steps=1,
            steps_per_generation=steps_per_generation,
            num_iterations=cfg.ppo_epochs,  # passes over each generation batch, as ppo_epochs
            max_steps=optimizer_steps,
            max_completion_length=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=0,
            learning_rate=cfg.lr,
            lr_scheduler_type="constant",  # ours has no schedule; the default decays linearly
            optim="adamw_torch",
            weight_decay=0.01,  # torch.optim.AdamW's default, which ours uses; Trainer's default is 0
            max_grad_norm=cfg.max_grad_norm,
            beta=cfg.init_kl_coef,
            epsilon=cfg.cliprange,
            disable_dropout=True,  # ours updates in eval mode: no dropout anywhere
            gradient_checkpointing=False,  # TRL's default is True; ours does not checkpoint
            bf16=False,  # TRL's default is True (autocast); ours runs in the weights' dtype
            fp16=False,
            use_vllm=False,
            use_cpu=device.type == "cpu",
            seed=args.seed,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
        )
        started = time.perf_counter()
        trainer = TimedRLOO(model=path, reward_funcs=concise_reply, args=config, train_dataset=dataset, processing_class=tokenizer,
                            peft_config=lora_config(model_args), quantization_config=quantization_config)
        init_seconds = time.perf_counter() - started
        eos_ids.update(trainer.eos_token_ids)
        trl_ids = [list(x) for x in trainer._tokenize_prompts(prompts)[0]]
        our_ids = [q.tolist() for q in ppo.encode_prompts(tokenizer, prompts, 10**9)[1]]
        if trl_ids != our_ids:
            raise RuntimeError("TRL's prompt token ids differ from ours; the comparison would not be fair")
        TimedRLOO.marks = {"generate": [], "generate_score_logprobs": [], "tokens": []}
        load_before = os.getloadavg()
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
        logs = list(trainer.state.log_history)
        marks = TimedRLOO.marks
    del trainer
    gc.collect()

    gens = [h for h in logs if "reward" in h]
    rows = []
    for i, h in enumerate(gens):
        rows.append({
            "iteration": i + 1,
            "step": h.get("step"),
            "reward": h["reward"],
            "kl_per_token": h.get("kl"),
            "mean_length": h.get("completions/mean_length"),
            "clipped_ratio": h.get("completions/clipped_ratio"),
            "generate_seconds": marks["generate"][i] if i < len(marks["generate"]) else None,
            "generate_score_logprobs_seconds": marks["generate_score_logprobs"][i] if i < len(marks["generate_score_logprobs"]) else None,
            "tokens_per_s": marks["tokens"][i] / marks["generate"][i] if i < len(marks["generate"]) else None,
        })
    rollouts = len(marks["generate"]) * rollouts_per_step
    for r in rows:
        print(f"  generation {r['iteration']}: reward={r['reward']:.4g}  kl/token={r['kl_per_token']:.4g}  length={r['mean_length']:.1f}  "
              f"clipped={r['clipped_ratio']:.2f}  generate={r['generate_seconds']:.1f}s  tok/s={r['tokens_per_s']:.1f}", flush=True)
    return {
        "prompts_per_step": prompts_per_step,
        "generations_per_prompt": generations,
        "rollouts_per_step": rollouts_per_step,
        "optimizer_steps": optimizer_steps,
        "per_generation": rows,
        "log_history": logs,
        "train_seconds": wall,
        "init_seconds": init_seconds,
        "rollouts": rollouts,
        "prompts": len(marks["generate"]) * prompts_per_step,
        "seconds_per_rollout": wall / rollouts,
        "seconds_per_prompt": wall / (len(marks["generate"]) * prompts_per_step),
        "generate_seconds": sum(marks["generate"]),
        "generate_score_logprobs_seconds": sum(marks["generate_score_logprobs"]),
        "update_seconds": wall - sum(marks["generate_score_logprobs"]),
        "loadavg_before_after": [load_before, os.getloadavg()],
    }


# -- report ------------------------------------------------------------------------


def ours_table(history: list[dict], hidden: list | None = None) -> list[str]:
    head = "| iter | objective/scores | with EOS penalty | objective/kl | ended | length | rollout s | score s | reference s | update s | gen tok/s |"
    if hidden is not None:
        head += " hidden rule (raw) |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for i, h in enumerate(history):
        row = (f"| {h['iteration']} | {h['objective/scores']:.3f} | {h['objective/scores_with_eos_penalty']:.3f} | {h['objective/kl']:.3f} | "
               f"{h['response/ended']:.2f} | {h['response/length']:.1f} | {h['time/rollout']:.1f} | {h['time/score']:.2f} | "
               f"{h['time/reference']:.2f} | {h['time/update']:.1f} | {h['tokens_per_s/rollout']:.1f} |")
        if hidden is not None:
            row += f" {statistics.fmean(hidden[i]):.3f} |"
        lines.append(row)
    return lines


def trl_table(rows: list[dict]) -> list[str]:
    lines = ["| generation | reward (with EOS penalty) | kl per token | length | clipped | generate s | generate+score+log-probs s | gen tok/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['iteration']} | {r['reward']:.3f} | {r['kl_per_token']:.4f} | {r['mean_length']:.1f} | {r['clipped_ratio']:.2f} | "
                     f"{r['generate_seconds']:.1f} | {r['generate_score_logprobs_seconds']:.1f} | {r['tokens_per_s']:.1f} |")
    return lines


def speed_table(ours: dict, trls: dict) -> list[str]:
    lines = ["| run | rollouts | train() s | s per rollout | s per prompt | ours / this, per rollout | ours / this, per prompt |",
             "| --- | --- | --- | --- | --- | --- | --- |",
             f"| ours, scripted reward | {ours['rollouts']} | {ours['train_seconds']:.1f} | {ours['seconds_per_rollout']:.2f} | "
             f"{ours['seconds_per_prompt']:.2f} | 1.00 (baseline) | 1.00 (baseline) |"]
    for name, t in trls.items():
        lines.append(f"| TRL RLOO, {name} ({t['prompts_per_step']} prompts × 2) | {t['rollouts']} | {t['train_seconds']:.1f} | "
                     f"{t['seconds_per_rollout']:.2f} | {t['seconds_per_prompt']:.2f} | "
                     f"**{ours['seconds_per_rollout'] / t['seconds_per_rollout']:.2f}** | {ours['seconds_per_prompt'] / t['seconds_per_prompt']:.2f} |")
    return lines


def phase_table(ours: dict, trls: dict) -> list[str]:
    """Where the time goes, seconds per rollout. TRL's phases: generation; the rest of
    generate-and-score (reward, old and reference log-probs); everything else in train()."""
    h = ours["history"]
    n = ours["rollouts"]
    lines = ["| run | generate | score + log-probs (ours: + values, GAE) | update (+ trainer overhead) | total |",
             "| --- | --- | --- | --- | --- |",
             f"| ours | {sum(x['time/rollout'] for x in h) / n:.2f} | {sum(x['time/score'] + x['time/reference'] for x in h) / n:.2f} | "
             f"{(ours['train_seconds'] - sum(x['time/rollout'] + x['time/score'] + x['time/reference'] for x in h)) / n:.2f} | {ours['seconds_per_rollout']:.2f} |"]
    for name, t in trls.items():
        m = t["rollouts"]
        lines.append(f"| TRL, {name} | {t['generate_seconds'] / m:.2f} | {(t['generate_score_logprobs_seconds'] - t['generate_seconds']) / m:.2f} | "
                     f"{t['update_seconds'] / m:.2f} | {t['seconds_per_rollout']:.2f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="base model (ModelArgs.model)")
    ap.add_argument("--quantize", default="none", choices=("auto", "nf4", "int8", "none"), help="base-weight quantisation, both sides (nf4 needs CUDA)")
    ap.add_argument("--device", default="auto", help="torch device (ModelArgs.device)")
    ap.add_argument("--prompts", type=int, default=32, help="seed tasks used as PPO prompts (the first N)")
    ap.add_argument("--iterations", type=int, default=8, help="PPO iterations (TRL: generation batches)")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts (= rollouts) per iteration of ours")
    ap.add_argument("--mini-batch-size", type=int, default=4, help="rollouts per optimiser step, both sides")
    ap.add_argument("--ppo-epochs", type=int, default=2, help="passes over each batch, both sides (TRL: num_iterations)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="reply cap, both sides (TRL: max_completion_length)")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate, both sides (PPOConfig's 1e-4 barely moves this reward in 8 iterations)")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, both sides")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rm-pairs", type=int, default=48, help="synthetic training pairs of the reward model")
    ap.add_argument("--rm-val-pairs", type=int, default=32, help="held-out synthetic pairs")
    ap.add_argument("--rm-max-length", type=int, default=128, help="reward model tokens per prompt + reply")
    ap.add_argument("--rm-epochs", type=int, default=2, help="reward-model passes over the pairs")
    ap.add_argument("--rm-lr", type=float, default=RewardArgs.reward_lr, help="reward-model learning rate")
    ap.add_argument("--skip-rm", action="store_true", help="skip scenario 2 (reward model)")
    ap.add_argument("--skip-trl", action="store_true", help="skip the TRL baseline")
    ap.add_argument("--out", default=str(RESULTS / "ppo.json"))
    args = ap.parse_args()
    if args.batch_size % 2:
        ap.error("--batch-size must be even (TRL's 'same rollouts' run uses batch-size/2 prompts × 2 replies)")

    model_args = ModelArgs(model=args.model, quantize=args.quantize, device=args.device)
    model_args.validate()
    if resolve_quantize(args.quantize, resolve_device(args.device)) in ("nf4", "int8") and resolve_device(args.device).type != "cuda":
        ap.error(f"--quantize {args.quantize} needs a CUDA device")
    resolve_model_path(model_args)  # prepares the default model once
    torch.manual_seed(args.seed)
    tasks = seed_tasks()
    prompts = [task_messages(t) for t in tasks[: args.prompts]]
    cfg = ppo_config(args)
    result: dict = {"machine": machine(), "versions": library_versions(), "args": vars(args), "ppo_config": vars(cfg),
                    "command": "python bench/ppo.py " + " ".join(sys.argv[1:])}

    ours = run_ours(model_args, prompts, scripted_reward(cfg.max_new_tokens), cfg, args, "scripted reward")
    result["scripted"] = ours

    trls = {}
    if not args.skip_trl:
        trls["same prompts"] = run_trl(model_args, prompts, cfg, args, args.batch_size, "same prompts per iteration")
        trls["same rollouts"] = run_trl(model_args, prompts, cfg, args, args.batch_size // 2, "same rollouts per iteration")
        result["trl"] = trls

    hidden: list = []
    if not args.skip_rm:
        rm, rm_metrics = fit_reward_model(model_args, tasks, args)
        rm_run = run_ours(model_args, prompts, rm_reward(rm, cfg.max_new_tokens, hidden), cfg, args, "reward model")
        rm_run["hidden_rule"] = hidden
        result["reward_model"] = {"fit": rm_metrics, **rm_run}
        del rm
        gc.collect()

    def first_last(xs):
        return f"{xs[0]:.3f} → {xs[-1]:.3f}"

    print("\n## Ours, scripted reward (concise replies that end)\n")
    print("\n".join(ours_table(ours["history"])))
    print(f"\nscore with EOS penalty, first → last iteration: {first_last([h['objective/scores_with_eos_penalty'] for h in ours['history']])}; stop: {ours['stop']}")
    if not args.skip_rm:
        r = result["reward_model"]
        print("\n## Ours, learned reward model (reward-model score; 'hidden rule' = the scripted score of the same rollouts)\n")
        print("\n".join(ours_table(r["history"], hidden)))
        print(f"\nreward-model score with EOS penalty, first → last: {first_last([h['objective/scores_with_eos_penalty'] for h in r['history']])}; "
              f"hidden rule: {first_last([statistics.fmean(x) for x in hidden])}")
    for name, t in trls.items():
        print(f"\n## TRL RLOOTrainer, {name} per iteration ({t['prompts_per_step']} prompts × 2 replies)\n")
        print("\n".join(trl_table(t["per_generation"])))
        rewards = [r["reward"] for r in t["per_generation"]]
        if rewards:
            print(f"\nreward (with EOS penalty), first → last generation: {first_last(rewards)}")
    if trls:
        print("\n## Wall time of train(), per rollout and per prompt (ratio > 1: TRL faster)\n")
        print("\n".join(speed_table(ours, trls)))
        print("\n## Seconds per rollout by phase\n")
        print("\n".join(phase_table(ours, trls)))
        result["ratios"] = {name: {"ours_over_trl_per_rollout": ours["seconds_per_rollout"] / t["seconds_per_rollout"],
                                   "ours_over_trl_per_prompt": ours["seconds_per_prompt"] / t["seconds_per_prompt"]} for name, t in trls.items()}
    print(f"\nwrote {write_results(args.out, result)}")


if __name__ == "__main__":
    main()
