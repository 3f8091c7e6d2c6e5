"""Policy steps besides PPO, on TRL's maintained trainers, with the LoRA adapter.

    sft    SFTTrainer   demonstrations: corrected replies, 👍 replies, an imported
                        `messages` file; loss on the reply tokens only
    dpo    DPOTrainer   preference pairs, no reward model (loss variants: sigmoid,
                        ipo, robust via label smoothing, hinge, ...)
    kto    KTOTrainer   thumbs (and each side of a pair) as desirable/undesirable,
                        weighted so that 3 👍 against 45 👎 still both count
    grpo   GRPOTrainer  k samples per prompt scored by the reward model plus the
    rloo   RLOOTrainer  team's reward functions (trainer/rewards.py), group baseline

PPO stays in trainer/ppo.py (written by hand there: TRL's PPOTrainer needs a
separate value model and reference model, which this project keeps on one base).

Every step trains the served adapter: it is loaded as peft's "default" adapter,
trainable, and TRL adds a frozen copy named "ref" as the reference policy, so KL and
the DPO/KTO log-ratios are measured against the parent, not the base. The base
weights stay frozen. The result is saved like a PPO adapter (same LoRA config, same
validator, same hot-swap) with the step that made it in the manifest.

Annotator weights (assistant/annotators.py): TRL 1.16's DPOTrainer and KTOTrainer take
no per-example weight (DPO's `use_weighting` is WPO's weighting by the policy's own
probabilities; KTO's desirable/undesirable weights are per class), so these steps use
the weights only as far as the data allows: the feedback of people below the
annotator floor is already left out by `build_examples`, examples whose weight is 0
are dropped here, and every other row counts the same. The reward model (and so PPO,
GRPO and RLOO through it) weighs every pair by its judges' reliability.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from assistant.config import BASE_VERSION, ModelArgs
from trainer.data import Examples, prompt_messages

log = logging.getLogger("trainer")

from trainer.config import DPO_LOSSES, SFT_CORRECTIONS, POLICY_STEPS as STEPS

TRL_STEPS = tuple(s for s in STEPS if s != "ppo")
__all__ = ["DPO_LOSSES", "STEPS", "TRL_STEPS", "ADAPTER", "build_policy", "train_step", "read_demonstrations"]
ADAPTER = "default"  # the trainable adapter's peft name, the one TRL copies into "ref"


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# -- feedback → TRL datasets ---------------------------------------------------------------------


def read_demonstrations(path: str | Path) -> list[dict]:
    """A JSONL file in TRL's `messages` format ({"messages": [..., {"role": "assistant", ...}]})
    → prompt-completion rows. Raises ValueError naming the first bad line."""
    rows = []
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--demonstrations {path}: no such file")
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            messages = record["messages"]
            ok = (isinstance(messages, list) and len(messages) >= 2
                  and all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user", "assistant") for m in messages)
                  and messages[-1]["role"] == "assistant" and messages[-2]["role"] == "user")
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise ValueError(f"--demonstrations {path}, line {n}: expected {{\"messages\": [..., user, assistant]}} with role/content strings")
        rows.append({"prompt": [{"role": m["role"], "content": m["content"]} for m in messages[:-1]],
                     "completion": _assistant(messages[-1]["content"])})
    return rows


def sft_rows(examples: Examples, demonstrations: list[dict] | None = None) -> list[dict]:
    """Demonstrations: corrected replies (the edited text), 👍 replies and the given
    imported rows, each (prompt, reply) once."""
    seen, rows = set(), []

    def add(prompt: tuple, text: str, original: str | None = None) -> None:
        if (prompt, text) not in seen and text.strip():
            seen.add((prompt, text))
            row = {"prompt": prompt_messages(prompt), "completion": _assistant(text)}
            if original is not None:
                row["original"] = original
            rows.append(row)

    for p in examples.pairs:
        if p.kind == "correction":
            add(p.prompt, p.chosen, p.rejected)
    for x in examples.pointwise:
        if x.label == 1 and x.kind == "thumbs":
            add(x.prompt, x.completion)
    for row in demonstrations or []:
        add(tuple((m["role"], m["content"]) for m in row["prompt"]), row["completion"][0]["content"])
    return rows


def _chat_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding in transformers 5


def edited_tokens(original: list[int], edited: list[int]) -> list[int]:
    """1 for each token of `edited` that the person wrote, 0 for one copied unchanged
    from `original`: tokens inserted or replaced (difflib's alignment of the two token
    sequences), and the token just after a deletion, which is where the reply has to
    skip what was cut (for a truncation, the end of the turn)."""
    import difflib

    marks = [0] * len(edited)
    for tag, _, _, j1, j2 in difflib.SequenceMatcher(None, original, edited, autojunk=False).get_opcodes():
        if tag in ("replace", "insert"):
            marks[j1:j2] = [1] * (j2 - j1)
        elif tag == "delete" and j1 < len(edited):
            marks[j1] = 1
    return marks


def sft_dataset_rows(rows: list[dict], tokenizer, max_length: int, corrections: str = "edits") -> list[dict]:
    """`sft_rows` tokenized for TRL's SFTTrainer (`input_ids` and `labels`, -100 where
    there is no loss): the loss is on the reply's tokens, and for a correction with
    `corrections="edits"` only on the tokens the person changed (`edited_tokens`).

    Why by hand: TRL computes the loss over the whole completion, and a correction's
    completion is mostly the model's own reply copied back. Imitating the copy teaches
    nothing, and it drowns the edit: on a correction that puts a one-line summary in
    front of a 150-word reply, the summary is about a tenth of the tokens. TRL takes a
    pre-tokenized dataset with a `labels` column as it is, so the trainer stays TRL's."""
    if corrections not in SFT_CORRECTIONS:
        raise ValueError(f"--sft-corrections must be one of {', '.join(SFT_CORRECTIONS)}, got {corrections!r}")
    out = []
    for row in rows:
        prompt_ids = _chat_ids(tokenizer, row["prompt"], add_generation_prompt=True)
        ids = _chat_ids(tokenizer, row["prompt"] + row["completion"])
        start = 0
        while start < min(len(prompt_ids), len(ids)) and prompt_ids[start] == ids[start]:
            start += 1
        marks = [1] * (len(ids) - start)
        if corrections == "edits" and row.get("original") is not None:
            original = _chat_ids(tokenizer, row["prompt"] + _assistant(row["original"]))
            marks = edited_tokens(original[start:], ids[start:])
            if not any(marks):  # the same tokens (a whitespace-only edit): learn the reply as it is
                marks = [1] * (len(ids) - start)
        labels = [-100] * start + [t if m else -100 for t, m in zip(ids[start:], marks)]
        ids, labels = ids[:max_length], labels[:max_length]
        if any(t != -100 for t in labels):
            out.append({"input_ids": ids, "labels": labels})
    return out


def _steps_per_epoch(rows: int, policy_args) -> int:
    return max(1, math.ceil(math.ceil(rows / policy_args.policy_batch_size) / policy_args.policy_grad_accum))


def sft_steps(rows: int, policy_args) -> int:
    """SFT's optimiser steps on `rows` demonstrations: --sft-epochs passes, and at least
    --sft-min-steps. A few corrections are the strongest signal a cycle gets, and 9 of
    them at batch 4 for 2 epochs are 6 steps: too few for a format the base never writes
    to reach its sampled replies (docs/benchmarks.md, users who want a summary line)."""
    return max(policy_args.sft_epochs * _steps_per_epoch(rows, policy_args), policy_args.sft_min_steps)


def dpo_rows(examples: Examples) -> list[dict]:
    """One row per pair of weight > 0 (TRL's DPO takes no weight per row; see the module docstring)."""
    return [{"prompt": prompt_messages(p.prompt), "chosen": _assistant(p.chosen), "rejected": _assistant(p.rejected)}
            for p in examples.pairs if p.weight > 0]


def kto_rows(examples: Examples) -> list[dict]:
    """Thumbs as they are, plus both sides of every pair (chosen desirable, rejected not);
    a (prompt, reply) judged both ways keeps its first label. Examples of weight 0 give
    no row (TRL's KTO takes no weight per row; see the module docstring)."""
    seen, rows = set(), []

    def add(prompt: tuple, text: str, label: bool) -> None:
        if (prompt, text) not in seen:
            seen.add((prompt, text))
            rows.append({"prompt": prompt_messages(prompt), "completion": _assistant(text), "label": label})

    for x in examples.pointwise:
        if x.weight > 0:
            add(x.prompt, x.completion, x.label == 1)
    for p in examples.pairs:
        if p.weight > 0:
            add(p.prompt, p.chosen, True)
            add(p.prompt, p.rejected, False)
    return rows


def kto_weights(rows: list[dict]) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight) so that both sides weigh the same in total,
    as the KTO paper advises for unbalanced data (TRL warns outside [1, 4/3])."""
    good = sum(r["label"] for r in rows)
    bad = len(rows) - good
    if not good or not bad:
        return 1.0, 1.0
    return (bad / good, 1.0) if bad > good else (1.0, good / bad)


def rows_needed(step: str, rows: list, minimum: int) -> None:
    if len(rows) < minimum:
        what = {"sft": "demonstrations (corrections, 👍 replies, --demonstrations)", "dpo": "preference pairs",
                "kto": "labelled replies (thumbs, pair sides)", "grpo": "prompts", "rloo": "prompts"}[step]
        raise ValueError(f"--policy-step {step} needs at least {minimum} {what}, the feedback has {len(rows)}")


# -- the model ----------------------------------------------------------------------------------


def build_policy(model_args: ModelArgs, parent_dir: str | Path | None):
    """(peft model with the trainable "default" adapter, tokenizer): the parent adapter
    when given, else a fresh (identity) LoRA."""
    from peft import PeftModel, get_peft_model

    from assistant.model import load_base, lora_config

    tokenizer, base = load_base(model_args)
    if parent_dir is not None:
        model = PeftModel.from_pretrained(base, str(parent_dir), adapter_name=ADAPTER, is_trainable=True)
    else:
        model = get_peft_model(base, lora_config(model_args), adapter_name=ADAPTER)
    return model, tokenizer


def drop_reference(model) -> None:
    """Remove the "ref" copy TRL added, so the next step (or the save) sees one adapter."""
    if "ref" in model.peft_config:
        model.delete_adapter("ref")
    model.set_adapter(ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(f".{ADAPTER}." in name)


def _common(policy_args, ppo_args, out_dir: str, progress: bool, device: torch.device, *, lr: float, epochs: int) -> dict:
    return dict(
        output_dir=out_dir, learning_rate=lr, num_train_epochs=epochs,
        per_device_train_batch_size=policy_args.policy_batch_size, gradient_accumulation_steps=policy_args.policy_grad_accum,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=ppo_args.max_grad_norm, weight_decay=0.0,
        logging_steps=1, save_strategy="no", report_to=[], seed=policy_args.policy_seed, data_seed=policy_args.policy_seed,
        disable_tqdm=not progress, use_cpu=device.type != "cuda", bf16=device.type == "cuda", dataloader_num_workers=0,
        gradient_checkpointing=policy_args.policy_gradient_checkpointing,
    )


def _history(trainer) -> list[dict]:
    keep = []
    for entry in trainer.state.log_history:
        keep.append({k: (round(v, 6) if isinstance(v, float) else v) for k, v in entry.items()
                     if isinstance(v, (int, float)) and not (isinstance(v, float) and not math.isfinite(v))})
    return keep


def _check_finite(model, step: str) -> None:
    for name, p in model.named_parameters():
        if p.requires_grad and not torch.isfinite(p).all():
            raise FloatingPointError(f"{step}: adapter weight {name} is not finite after training; nothing published")


def train_step(step: str, model, tokenizer, policy_args, ppo_args, *, examples: Examples | None = None, prompts: list | None = None,
               demonstrations: list[dict] | None = None, reward_fn=None, progress: bool = True) -> dict:
    """Run one TRL step on `model`'s "default" adapter in place. Returns
    {"rows": n, "history": [...], "seconds": s}. `reward_fn(prompts, texts) -> (B,)`
    is the combined reward GRPO/RLOO optimise."""
    from datasets import Dataset

    started = time.perf_counter()
    device = next(model.parameters()).device
    if step == "sft":
        rows = sft_rows(examples or Examples(), demonstrations)
    elif step == "dpo":
        rows = dpo_rows(examples or Examples())
    elif step == "kto":
        rows = kto_rows(examples or Examples())
    elif step in ("grpo", "rloo"):
        rows = [{"prompt": p} for p in (prompts or [])]
        if reward_fn is None:
            raise ValueError(f"--policy-step {step} needs a reward model")
    else:
        raise ValueError(f"--policy-step must be one of {', '.join(TRL_STEPS)} here, got {step!r}")
    rows_needed(step, rows, policy_args.min_policy_rows)
    if not progress:
        import datasets

        datasets.disable_progress_bars()
    if step == "sft":
        dataset = Dataset.from_list(sft_dataset_rows(rows, tokenizer, policy_args.policy_max_length, policy_args.sft_corrections))
    else:
        dataset = Dataset.from_list(rows)
    with tempfile.TemporaryDirectory(prefix=f"trl-{step}-") as out, _quiet():
        common = _common(policy_args, ppo_args, out, progress, device, lr=policy_args.policy_lr, epochs=policy_args.policy_epochs)
        if step == "sft":
            from trl import SFTConfig, SFTTrainer

            common.update(learning_rate=policy_args.sft_lr, num_train_epochs=policy_args.sft_epochs)
            steps = sft_steps(len(dataset), policy_args)
            if steps > policy_args.sft_epochs * _steps_per_epoch(len(dataset), policy_args):
                common["max_steps"] = steps  # few demonstrations: more passes, up to --sft-min-steps
            cfg = SFTConfig(**common, max_length=policy_args.policy_max_length, completion_only_loss=True, packing=False)
            trainer = SFTTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tokenizer)
        elif step == "dpo":
            from trl import DPOConfig, DPOTrainer

            loss = policy_args.dpo_loss
            cfg = DPOConfig(**common, beta=policy_args.beta, loss_type=[loss],
                            label_smoothing=policy_args.label_smoothing if loss == "robust" else 0.0,
                            max_length=policy_args.policy_max_length, truncation_mode="keep_end")
            trainer = DPOTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tokenizer)
        elif step == "kto":
            from trl import KTOConfig, KTOTrainer

            good_w, bad_w = kto_weights(rows)
            cfg = KTOConfig(**common, beta=policy_args.beta, desirable_weight=good_w, undesirable_weight=bad_w,
                            max_length=policy_args.policy_max_length)
            trainer = KTOTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tokenizer)
        else:
            trainer = _group_trainer(step, model, tokenizer, dataset, common, policy_args, ppo_args, reward_fn)
        if not progress:
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)
        model.train()
        trainer.train()
    model.eval()
    drop_reference(model)
    _check_finite(model, step)
    return {"rows": len(rows), "history": _history(trainer), "seconds": time.perf_counter() - started}


def _group_trainer(step, model, tokenizer, dataset, common, policy_args, ppo_args, reward_fn):
    """GRPO or RLOO: `policy_args.num_generations` samples per prompt at the served
    sampling settings, scored by `reward_fn`, for `--policy-iterations` optimiser steps."""
    def reward_model(prompts, completions, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(x) for x in reward_fn(prompts, texts)]

    g = policy_args.num_generations
    common.update(per_device_train_batch_size=g * policy_args.policy_batch_size, gradient_accumulation_steps=1,
                  max_steps=policy_args.policy_iterations, num_train_epochs=1)
    kw = dict(num_generations=g, max_completion_length=ppo_args.max_new_tokens, temperature=ppo_args.temperature,
              top_p=ppo_args.top_p, beta=policy_args.beta, log_completions=False)
    if step == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        return GRPOTrainer(model=model, reward_funcs=[reward_model], args=GRPOConfig(**common, **kw),
                           train_dataset=dataset, processing_class=tokenizer)
    from trl import RLOOConfig, RLOOTrainer

    return RLOOTrainer(model=model, reward_funcs=[reward_model], args=RLOOConfig(**common, **kw),
                       train_dataset=dataset, processing_class=tokenizer)


@contextlib.contextmanager
def _quiet():
    """TRL and transformers log per-run warnings (tokenizer padding side, unused columns)
    at WARNING; they say nothing a user can act on here."""
    names = ("transformers.trainer", "trl", "transformers.training_args")
    old = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        yield
    finally:
        for n, lvl in old.items():
            logging.getLogger(n).setLevel(lvl)


def parent_of(adapters_dir: str | Path) -> tuple[str, Path | None, dict]:
    """(served version, its directory or None for the base, its manifest)."""
    from assistant import adapters

    parent = adapters.read_current(adapters_dir)
    if parent == BASE_VERSION:
        return parent, None, {}
    return parent, Path(adapters_dir) / parent, adapters.read_manifest(adapters_dir, parent)
