"""Typed settings for the trainer, one dataclass per stage; stdlib only.

Each field carries a one-line help that becomes its `--flag` help through
`assistant.config.add_args`; `python -m trainer <command> --help` lists them.
Defaults run on a laptop CPU with the default 135M model.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class DataArgs:
    db: str = _f("data/feedback.db", "SQLite feedback store to read")
    val_fraction: float = _f(0.2, "share of conversations held out for validation (split by conversation id, deterministic)")
    split_seed: str = _f("split-v1", "salt of the deterministic train/validation split")

    def validate(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")


@dataclass
class RewardArgs:
    reward_dir: str = _f("data/reward", "where reward-model versions (rNNNNNN/) are written")
    reward_lora_r: int = _f(16, "LoRA rank of the reward model's adapter")
    reward_lora_alpha: int = _f(32, "LoRA alpha of the reward model's adapter")
    reward_lr: float = _f(1e-4, "AdamW learning rate (LoRA and scalar head)")
    reward_epochs: int = _f(1, "passes over the training examples")
    reward_batch_size: int = _f(8, "pairs (or pointwise labels) per optimiser step")
    reward_max_length: int = _f(512, "tokens per (prompt + reply), truncated from the left of the prompt")
    pointwise_weight: float = _f(0.5, "weight of the pointwise (thumbs) loss next to the pairwise Bradley-Terry loss")
    min_pairs: int = _f(16, "fewest training pairs + pointwise labels a fit accepts; fewer is refused")
    seed: int = _f(0, "random seed for initialisation and shuffling")
    reward_max_grad_norm: float = _f(1.0, "gradient-norm clip of each reward-model optimiser step")
    reward_eval_batch_size: int = _f(16, "sequences per forward pass when scoring (validation, normalisation)")
    normalizer_size: int = _f(512, "most training replies scored after fitting to set the reward's mean/std normalisation")

    def validate(self) -> None:
        for name in ("reward_lora_r", "reward_lora_alpha", "reward_epochs", "reward_batch_size", "reward_max_length", "min_pairs", "reward_eval_batch_size", "normalizer_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.reward_lr <= 0:
            raise ValueError(f"--reward-lr must be positive, got {self.reward_lr}")
        if self.pointwise_weight < 0:
            raise ValueError(f"--pointwise-weight must be >= 0, got {self.pointwise_weight}")
        if self.reward_max_grad_norm <= 0:
            raise ValueError(f"--reward-max-grad-norm must be positive, got {self.reward_max_grad_norm}")
