"""Reward-model benchmark: our `trainer.reward.fit` against TRL's `RewardTrainer`.

    .venv/bin/python bench/reward.py --pairs 48 --val-pairs 64 --threads 1   # ~12 min on a 2-core CPU
    .venv/bin/python bench/reward.py --pairs 48 --val-pairs 64 --threads 1 --trl-first
    .venv/bin/python bench/reward.py                                          # every pair of the data set
    .venv/bin/python bench/reward.py --skip-trl                               # ours only
    .venv/bin/python bench/reward.py --pairs 24 --val-pairs 64 --threads 1 --repeat 5   # 5 runs, order alternating: the median ratio
    .venv/bin/python bench/reward.py --skip-trl --no-packing                  # ours, padded as TRL pads

Needs the benchmark extras (`pip install -r requirements-bench.txt`: trl, datasets).

Data: /work/shared/data/hh-harmless-dev.jsonl is imported with `import_preferences`
into a feedback store kept at bench/results/reward-hh-harmless-dev.db (`--db`), read back with
`read_snapshot` → `build_examples`, and split 80/20 by conversation with the project's
`split` (DataArgs' val_fraction and split_seed). The split hashes conversation ids,
which the import derives from each pair's content, so every fresh import splits the
same way; the store is kept only to skip re-importing. `--pairs` takes the first N
training pairs, `--val-pairs` the first M validation pairs.

Both sides train the same base model files with the same LoRA (rank, alpha, dropout,
q/k/v/o projections), a scalar head on the last token of the chat-templated
prompt + reply, the Bradley-Terry loss, AdamW (lr, weight decay 0.01, no schedule),
gradient clipping at 1.0, LoRA on the same top `--reward-lora-layers` layers, the
same batch size, epochs and seed, no gradient checkpointing and no mixed precision. Both see the same token ids: TRL tokenises the
pairs itself (conversational format, chat template) and the benchmark then cuts each
sequence from the left to --max-length, as `RewardModel.encode` does, and checks the
ids equal ours. (TRL 1.16 itself drops pairs longer than `max_length`; it does not cut.)

Before the first side, one untimed forward and backward pass warms the process up, so
that neither side pays the one-off cost of the process's first pass. Then:
- train pairs/s of the optimisation loop only: ours from fit's `pairs_per_s` (the loop
  after tokenising, before normalising), TRL's from the wall time of `trainer.train()`
  (tokenising happens earlier, in the trainer's constructor); TRL's own
  `train_samples_per_second` is recorded too, and so are each loop's process CPU
  seconds and padded tokens (batches are shuffled differently, so padding differs);
  ours packs each micro-batch (`RewardArgs.reward_packing`; `--no-packing` pads it),
  and then records the tokens its packed rows computed (`packed_tokens`) beside the
  tokens padding the same micro-batches would have computed (`padded_tokens`);
- the time around each loop: model load, tokenising, and for ours the normalisation
  pass over the training replies;
- validation accuracy (r_chosen > r_rejected) with its 95% Wilson interval on the same
  validation token ids: ours through `evaluate_pairs`, TRL's model through its own
  forward (the score at the last non-pad token), batched the same way.

Prints a table and writes bench/results/reward.json. It does not tune either side.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import trainer.reward as reward  # noqa: E402
from assistant.config import DEFAULT_MODEL, ModelArgs  # noqa: E402
from assistant.feedback import FeedbackStore  # noqa: E402
from assistant.model import resolve_device, resolve_model_path, resolve_quantize  # noqa: E402
from bench.common import HH_HARMLESS, RESULTS, library_versions, machine, write_results  # noqa: E402
from trainer.config import DataArgs, RewardArgs  # noqa: E402
from trainer.data import Examples, Pair, build_examples, import_preferences, prompt_messages, read_snapshot, split  # noqa: E402


# -- data ------------------------------------------------------------------------


def load_split(path: Path, db: Path) -> tuple[list[Pair], list[Pair], dict]:
    """The data set through the project's own path: import into the store at `db` →
    snapshot → examples → 80/20 split by conversation.

    The store is kept: the split hashes conversation ids, which the import draws at
    random, so a fresh store would give a different split on every run. Importing
    into the same store again adds nothing, and the split stays the same."""
    data_args = DataArgs()
    db.parent.mkdir(parents=True, exist_ok=True)
    with FeedbackStore(db) as store:
        report = import_preferences(store, path)
    examples = build_examples(read_snapshot(db))
    train, val = split(examples, data_args.val_fraction, data_args.split_seed)
    info = {
        "file": str(path),
        "db": str(db),
        "imported_now": report.added,
        "already_in_store": report.skipped,
        "bad_lines": len(report.errors),
        "pairs": len(examples.pairs),
        "train_pairs": len(train.pairs),
        "val_pairs": len(val.pairs),
        "val_fraction": data_args.val_fraction,
        "split_seed": data_args.split_seed,
    }
    return train.pairs, val.pairs, info


def token_ids(model_args: ModelArgs, reward_args: RewardArgs, pairs: list[Pair]) -> list[list[int]]:
    """Each pair's chosen then rejected sequence as `RewardModel.encode` makes them for fit:
    [chosen ids of every pair..., rejected ids of every pair...]. Tokeniser only, no weights."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model_args))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoder = reward.RewardModel(model=None, head=None, tokenizer=tokenizer, model_name=model_args.model, quantize="none", max_length=reward_args.reward_max_length)
    return [encoder.encode(prompt_messages(p.prompt), p.chosen) for p in pairs] + [encoder.encode(prompt_messages(p.prompt), p.rejected) for p in pairs]


def warm_up(model_args: ModelArgs, reward_args: RewardArgs, seqs: list[list[int]]) -> None:
    """One untimed forward and backward pass of a throw-away reward model on `seqs`, so
    that neither side pays the process's one-off costs of a first pass (memory growth,
    kernel set-up) inside its timing."""
    rm = reward.build(model_args, reward_args)
    rm.model.train()
    input_ids, attention_mask = reward.pad_right(seqs, rm.tokenizer.pad_token_id, rm.device)  # (B, T)
    rm.rewards(input_ids, attention_mask).sum().backward()
    del rm
    gc.collect()


def length_stats(seqs: list[list[int]]) -> dict:
    lengths = sorted(len(s) for s in seqs)
    return {"sequences": len(lengths), "tokens": sum(lengths), "mean": sum(lengths) / len(lengths), "max": lengths[-1]}


# -- ours ------------------------------------------------------------------------


@contextlib.contextmanager
def timed(module, name: str, marks: dict):
    """Wrap `module.name` so each call records marks[name] = (wall start, wall end,
    process CPU start, process CPU end), last call wins; restored on exit."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            marks[name] = (wall, time.perf_counter(), cpu, time.process_time())

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, original)


@contextlib.contextmanager
def recording_packs(module, name: str, packs: list):
    """Wrap `module.name` (trainer.packing.pack) so each call appends (wall time, tokens
    computed, tokens padding would compute) to `packs`; restored on exit."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        packed = original(*args, **kwargs)
        packs.append((time.perf_counter(), packed.tokens, packed.padded_tokens))
        return packed

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, original)


@contextlib.contextmanager
def recording_shapes(module, name: str, shapes: list):
    """Wrap `module.name` (a padder returning (input_ids, attention_mask)) so each call
    appends (wall time, B, T) to `shapes`; restored on exit."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        input_ids, attention_mask = original(*args, **kwargs)
        shapes.append((time.perf_counter(), *input_ids.shape))
        return input_ids, attention_mask

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, original)


def run_ours(model_args: ModelArgs, reward_args: RewardArgs, train: list[Pair], val: list[Pair]) -> dict:
    """fit() on `train` (no validation inside fit), then evaluate_pairs on `val`."""
    marks: dict = {}
    shapes: list = []
    packs: list = []
    load_before = os.getloadavg()
    with timed(reward, "build", marks), timed(reward, "normalize", marks), recording_shapes(reward, "pad_right", shapes), \
            recording_packs(reward, "pack", packs):
        started = time.perf_counter()
        rm, metrics = reward.fit(model_args, reward_args, Examples(pairs=list(train)), Examples())
        fit_wall = time.perf_counter() - started
    trainable = sum(p.numel() for p in rm.model.parameters() if p.requires_grad) + sum(p.numel() for p in rm.head.parameters())

    started = time.perf_counter()
    val_metrics = reward.evaluate_pairs(rm, val, reward_args.reward_eval_batch_size)
    val_seconds = time.perf_counter() - started
    loop_batches = [(b, t) for when, b, t in shapes if marks["build"][1] < when < marks["normalize"][0]]
    loop_packs = [(n, padded) for when, n, padded in packs if marks["build"][1] < when < marks["normalize"][0]]
    # packed: what padding the same micro-batches would compute, so that tokens/s compares with TRL's
    padded_tokens = sum(padded for _, padded in loop_packs) + sum(b * t for b, t in loop_batches)
    load_seconds = marks["build"][1] - marks["build"][0]
    normalize_seconds = marks["normalize"][1] - marks["normalize"][0]
    results = {
        "pairs_per_s": metrics["pairs_per_s"],
        "loop_seconds": metrics["train_seconds"],
        # process CPU seconds (all threads) from the end of build to the start of normalize:
        # the loop plus tokenising and optimiser set-up, which take well under a second
        "loop_cpu_seconds": marks["normalize"][2] - marks["build"][3],
        "steps": metrics["steps"],
        "packing": reward_args.reward_packing,
        "packed_tokens": sum(n for n, _ in loop_packs) if loop_packs else None,
        "padded_tokens": padded_tokens,
        "padded_tokens_per_s": padded_tokens / metrics["train_seconds"],
        "train_loss_last_epoch": metrics["train_loss"],
        "train_accuracy_last_epoch": metrics["train_accuracy"],
        "fit_seconds": fit_wall,
        "fit_seconds_excluding_load": fit_wall - load_seconds,
        "load_seconds": load_seconds,
        "normalize_seconds": normalize_seconds,
        "normalize_replies": metrics["normalizer"]["n"],
        "tokenize_and_setup_seconds": fit_wall - load_seconds - metrics["train_seconds"] - normalize_seconds,
        "trainable_params": trainable,
        "val": val_metrics,
        "val_seconds": val_seconds,
        "val_pairs_per_s": len(val) / val_seconds if val else None,
        "loadavg_before_after": [load_before, os.getloadavg()],
    }
    del rm
    gc.collect()
    return results


# -- TRL -------------------------------------------------------------------------


def trl_model(model_args: ModelArgs, path: str):
    """The same base files as a sequence-classification model with one label, loaded
    with the dtype and quantisation `assistant.model.load_base` would pick."""
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    device = resolve_device(model_args.device)
    quantize = resolve_quantize(model_args.quantize, device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kwargs: dict = {"dtype": dtype, "num_labels": 1}
    if quantize == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        kwargs["device_map"] = {"": device}
    elif quantize == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device}
    model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    if quantize in ("nf4", "int8"):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # as trainer.reward.build
    return model, device


def score_seqcls(model, seqs: list[list[int]], pad_id: int, device, batch_size: int) -> torch.Tensor:
    """Scores of token lists from a sequence-classification model, batched longest-first
    and right-padded like `RewardModel.score_ids`: (N,) float32 on CPU."""
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out = torch.empty(len(seqs), dtype=torch.float32)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            input_ids, attention_mask = reward.pad_right([seqs[i] for i in idx], pad_id, device)  # (B, T)
            out[idx] = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.squeeze(-1).float().cpu()  # (B,)
    return out


def run_trl(model_args: ModelArgs, reward_args: RewardArgs, train: list[Pair], our_train_ids: list, val_ids: list, progress: bool) -> dict:
    """RewardTrainer on the same pairs, then its model scored on the same validation ids.

    our_train_ids, val_ids: token ids as `RewardModel.encode` makes them, chosen then rejected."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, set_seed
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    class RecordingCollator(DataCollatorForPreference):
        """TRL's default collator for this trainer, recording each batch's (B, T) in `shapes`."""

        def torch_call(self, examples):
            batch = super().torch_call(examples)
            self.shapes.append(tuple(batch["input_ids"].shape))
            return batch

    path = resolve_model_path(model_args)
    max_length = reward_args.reward_max_length
    load_before = os.getloadavg()
    started = time.perf_counter()
    set_seed(reward_args.seed)
    model, device = trl_model(model_args, path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    load_seconds = time.perf_counter() - started

    dataset = Dataset.from_list([
        {
            "prompt": prompt_messages(p.prompt),
            "chosen": [{"role": "assistant", "content": p.chosen}],
            "rejected": [{"role": "assistant", "content": p.rejected}],
        }
        for p in train
    ])
    ours_lora = reward._reward_lora(model_args, reward_args, model.config.get_text_config().num_hidden_layers)
    peft_config = LoraConfig(
        r=reward_args.reward_lora_r,
        lora_alpha=reward_args.reward_lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.target_modules,
        layers_to_transform=ours_lora.layers_to_transform,  # the same layers as ours (the top --reward-lora-layers)
        layers_pattern=ours_lora.layers_pattern,
        bias="none",
        task_type="SEQ_CLS",  # peft then trains the `score` head too (modules_to_save)
    )
    with tempfile.TemporaryDirectory() as out_dir:
        config = RewardConfig(
            output_dir=out_dir,
            per_device_train_batch_size=reward_args.reward_batch_size,
            num_train_epochs=reward_args.reward_epochs,
            learning_rate=reward_args.reward_lr,
            lr_scheduler_type="constant",  # ours has no schedule; TRL's default decays linearly
            optim="adamw_torch",  # torch.optim.AdamW, as ours (the default here would be the fused variant)
            weight_decay=0.01,  # torch.optim.AdamW's default, which ours uses; Trainer's default is 0
            max_grad_norm=reward_args.reward_max_grad_norm,
            seed=reward_args.seed,
            gradient_checkpointing=False,  # TRL's default is True
            bf16=False,  # TRL's default is True (autocast); ours runs in the weights' dtype
            fp16=False,
            disable_dropout=False,  # keep LoRA dropout, as ours does while training
            max_length=None,  # TRL would drop longer pairs; they are cut from the left below instead
            eval_strategy="no",
            save_strategy="no",
            report_to="none",
            use_cpu=device.type == "cpu",
            dataloader_num_workers=0,
            disable_tqdm=not progress,
        )
        started = time.perf_counter()
        collator = RecordingCollator(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=config.pad_to_multiple_of)
        collator.shapes = []
        trainer = RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config, data_collator=collator)
        init_seconds = time.perf_counter() - started  # peft wrap, chat template + tokenising (datasets.map), accelerate

        started = time.perf_counter()
        trainer.train_dataset = trainer.train_dataset.map(
            lambda ex: {"chosen_ids": ex["chosen_ids"][-max_length:], "rejected_ids": ex["rejected_ids"][-max_length:]},
            desc=f"cutting to the last {max_length} tokens",
        )
        truncate_seconds = time.perf_counter() - started
        trl_ids = list(trainer.train_dataset["chosen_ids"]) + list(trainer.train_dataset["rejected_ids"])
        if trl_ids != our_train_ids:
            differ = sum(a != b for a, b in zip(trl_ids, our_train_ids))
            raise RuntimeError(f"TRL's token ids differ from ours in {differ} of {len(our_train_ids)} sequences; the comparison would not be fair")
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)

        started, cpu_started = time.perf_counter(), time.process_time()
        output = trainer.train()
        train_wall, train_cpu = time.perf_counter() - started, time.process_time() - cpu_started
        train_logs = [h for h in trainer.state.log_history if "loss" in h]

    model = trainer.model
    started = time.perf_counter()
    scores = score_seqcls(model, val_ids, tokenizer.pad_token_id, device, reward_args.reward_eval_batch_size)  # (2M,)
    val_seconds = time.perf_counter() - started
    n = len(val_ids) // 2
    val = {"accuracy": None, "lo": 0.0, "hi": 1.0, "n": 0, "loss": None}
    if n:
        rewards_chosen, rewards_rejected = scores[:n], scores[n:]
        correct = int((rewards_chosen > rewards_rejected).sum())
        acc, lo, hi = reward.accuracy_ci(correct, n)
        val = {"accuracy": acc, "lo": lo, "hi": hi, "n": n, "loss": float(reward.pairwise_loss(rewards_chosen, rewards_rejected))}
    pairs_trained = len(train) * reward_args.reward_epochs
    results = {
        "pairs_per_s": pairs_trained / train_wall,
        "loop_seconds": train_wall,
        "loop_cpu_seconds": train_cpu,
        "trl_train_samples_per_second": output.metrics.get("train_samples_per_second"),
        "trl_train_runtime": output.metrics.get("train_runtime"),
        "steps": output.global_step,
        "padded_tokens": sum(b * t for b, t in collator.shapes),
        "padded_tokens_per_s": sum(b * t for b, t in collator.shapes) / train_wall,
        "train_loss": output.training_loss,
        "train_logs": train_logs,
        "load_seconds": load_seconds,
        "trainer_init_seconds": init_seconds,
        "truncate_seconds": truncate_seconds,
        "total_seconds": load_seconds + init_seconds + truncate_seconds + train_wall,
        "trainable_params": trainable,
        "val": val,
        "val_seconds": val_seconds,
        "val_pairs_per_s": n / val_seconds if n else None,
        "loadavg_before_after": [load_before, os.getloadavg()],
    }
    del trainer, model
    gc.collect()
    return results


# -- report ----------------------------------------------------------------------


def fmt_acc(v: dict) -> str:
    if v.get("accuracy") is None:
        return "n/a"
    return f"{v['accuracy']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}] (n={v['n']})"


def table(result: dict) -> list[str]:
    """The Markdown table docs/benchmarks.md shows."""
    ours, trl = result["ours"], result["trl"]
    rows = [
        ("train pairs/s, optimisation loop only", lambda r: f"{r['pairs_per_s']:.3f}"),
        ("ratio ours / TRL", lambda r: f"**{result['ratio_pairs_per_s_ours_over_trl']:.2f}×**" if r is ours else "1.00× (baseline)"),
        ("TRL's own train_samples_per_second", lambda r: f"{r['trl_train_samples_per_second']:.3f}" if r is trl else "–"),
        (f"loop seconds ({ours['steps']} steps of {result['args']['batch_size']} pairs)", lambda r: f"{r['loop_seconds']:.1f}"),
        ("loop process CPU seconds (all threads)", lambda r: f"{r['loop_cpu_seconds']:.1f}"),
        ("padded tokens in the loop's batches / per second", lambda r: f"{r['padded_tokens']:,} / {r['padded_tokens_per_s']:.0f}"
         + (f" (packed: {r['packed_tokens']:,} computed)" if r.get("packed_tokens") else "")),
        ("model load seconds", lambda r: f"{r['load_seconds']:.1f}"),
        ("tokenise + set-up seconds", lambda r: f"{r['tokenize_and_setup_seconds']:.1f}" if r is ours else f"{r['trainer_init_seconds'] + r['truncate_seconds']:.1f}"),
        (f"normalisation pass seconds ({ours['normalize_replies']} replies)", lambda r: f"{r['normalize_seconds']:.1f}" if r is ours else "none"),
        ("total seconds (fit / load + trainer + train)", lambda r: f"{r['fit_seconds']:.1f}" if r is ours else f"{r['total_seconds']:.1f}"),
        ("val accuracy [95% Wilson CI]", lambda r: fmt_acc(r["val"])),
        ("val scoring pairs/s", lambda r: f"{r['val_pairs_per_s']:.2f}" if r["val_pairs_per_s"] else "–"),
        ("trainable parameters", lambda r: f"{r['trainable_params']:,}"),
        ("1-min load average before / after", lambda r: " / ".join(f"{x[0]:.1f}" for x in r["loadavg_before_after"])),
    ]
    if trl is None:
        rows = [row for row in rows if not row[0].startswith(("ratio", "TRL's"))]
    lines = ["| measure | ours (`trainer.reward.fit`) | TRL `RewardTrainer` |", "| --- | --- | --- |"]
    lines += [f"| {name} | {cell(ours)} | {cell(trl) if trl else '–'} |" for name, cell in rows]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(HH_HARMLESS), help="preference JSONL (HH-RLHF or TRL) to import")
    ap.add_argument("--db", default=None,
                    help="feedback store the data is imported into, kept so that every run gets the same split "
                         "(default: bench/results/reward-<data file name>.db)")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="base model (ModelArgs.model)")
    ap.add_argument("--pairs", type=int, default=None, help="training pairs used, the first N of the split (default: all)")
    ap.add_argument("--val-pairs", type=int, default=None, help="validation pairs scored, the first M of the split (default: all)")
    ap.add_argument("--max-length", type=int, default=256, help="tokens per prompt + reply, cut from the left")
    ap.add_argument("--batch-size", type=int, default=8, help="pairs per optimiser step")
    ap.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    ap.add_argument("--epochs", type=int, default=1, help="passes over the training pairs")
    ap.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    ap.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha")
    ap.add_argument("--seed", type=int, default=RewardArgs.seed, help="seed of initialisation and shuffling, both sides")
    ap.add_argument("--quantize", default="auto", choices=("auto", "nf4", "int8", "none"), help="base-weight quantisation (ModelArgs.quantize), both sides")
    ap.add_argument("--skip-trl", action="store_true", help="run ours only")
    ap.add_argument("--no-packing", action="store_true", help="ours pads every sequence of a micro-batch (reward_packing=False) "
                                                               "instead of packing each pair's shared prompt once")
    ap.add_argument("--trl-first", action="store_true", help="run TRL before ours (to see whether the order matters)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of both sides, the order alternating from run to run; reports the median ratio")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads, both sides (default: torch's, one per core)")
    ap.add_argument("--no-warm-up", action="store_true", help="skip the untimed warm-up pass before the first side")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--out", default=str(RESULTS / "reward.json"))
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)

    model_args = ModelArgs(model=args.model, quantize=args.quantize, models_dir=str(ROOT / "data" / "models"))
    model_args.validate()
    reward_args = RewardArgs(
        reward_lora_r=args.lora_r,
        reward_lora_alpha=args.lora_alpha,
        reward_lr=args.lr,
        reward_epochs=args.epochs,
        reward_min_steps=0,  # exactly --epochs passes, as TRL's num_train_epochs
        reward_batch_size=args.batch_size,
        reward_max_length=args.max_length,
        seed=args.seed,
        min_pairs=1,
        reward_packing=not args.no_packing,
    )
    reward_args.validate()
    resolve_model_path(model_args)  # prepares the default model once, before anything is timed

    db = Path(args.db) if args.db else RESULTS / f"reward-{Path(args.data).stem}.db"
    train_all, val_all, data_info = load_split(Path(args.data), db)
    train = train_all[: args.pairs] if args.pairs is not None else train_all
    val = val_all[: args.val_pairs] if args.val_pairs is not None else val_all
    if not train:
        ap.error("--pairs leaves no training pairs")
    print(f"{data_info['pairs']} pairs, split {data_info['train_pairs']} train / {data_info['val_pairs']} val; "
          f"using {len(train)} train and {len(val)} val pairs at --max-length {args.max_length}", flush=True)

    train_ids, val_ids = token_ids(model_args, reward_args, train), token_ids(model_args, reward_args, val)
    if not args.no_warm_up:
        print("warm-up: one untimed forward and backward pass", flush=True)
        warm_up(model_args, reward_args, train_ids[: 2 * args.batch_size])

    def ours_side():
        print("\n== ours: trainer.reward.fit ==", flush=True)
        return run_ours(model_args, reward_args, train, val)

    def trl_side():
        print("\n== TRL: RewardTrainer ==", flush=True)
        return run_trl(model_args, reward_args, train, train_ids, val_ids, progress=not args.no_progress)

    runs = []
    for i in range(args.repeat):
        trl_first = args.trl_first != (i % 2 == 1)  # alternate the order from run to run
        ours = trl = None
        if args.skip_trl:
            ours = ours_side()
        elif trl_first:
            trl = trl_side()
            ours = ours_side()
        else:
            ours = ours_side()
            trl = trl_side()
        runs.append({"ours": ours, "trl": trl, "order": "trl, ours" if trl_first and trl else "ours, trl" if trl else "ours",
                     "ratio_pairs_per_s_ours_over_trl": ours["pairs_per_s"] / trl["pairs_per_s"] if trl else None})
        if args.repeat > 1 and trl:
            print(f"run {i + 1}/{args.repeat} ({runs[-1]['order']}): ours / TRL pairs/s = {runs[-1]['ratio_pairs_per_s_ours_over_trl']:.2f}x", flush=True)

    ratios = [r["ratio_pairs_per_s_ours_over_trl"] for r in runs if r["trl"]]
    result = {
        "machine": machine(),
        "versions": library_versions(),
        "device": str(resolve_device(model_args.device)),
        "quantize": resolve_quantize(model_args.quantize, resolve_device(model_args.device)),
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "args": vars(args),
        "data": {**data_info, "train_pairs_used": len(train), "val_pairs_used": len(val)},
        "train_lengths": length_stats(train_ids),
        "val_lengths": length_stats(val_ids) if val_ids else None,
        **runs[-1],
        "runs": runs,
        "median_ratio": statistics.median(ratios) if ratios else None,
    }

    print()
    print("\n".join(table(result)))
    if len(runs) > 1 and ratios:
        print("\n| run | order | ours / TRL pairs/s | val accuracy ours | val accuracy TRL |\n| --- | --- | --- | --- | --- |")
        for i, r in enumerate(runs):
            print(f"| {i + 1} | {r['order']} | {r['ratio_pairs_per_s_ours_over_trl']:.2f}x | {fmt_acc(r['ours']['val'])} | {fmt_acc(r['trl']['val'])} |")
        print(f"\nmedian ours / TRL over {len(ratios)} runs: {result['median_ratio']:.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f}); "
              "the table above is the last run")
    ls = result["train_lengths"]
    print(f"\ntrain: {len(train)} pairs, {ls['tokens']:,} tokens (mean {ls['mean']:.0f}, max {ls['max']} per sequence), the same ids on both sides")
    print(f"wrote {write_results(args.out, result)}")


if __name__ == "__main__":
    main()
