"""Typed settings for the trainer, one dataclass per stage; stdlib only.

Each field carries a one-line help that becomes its `--flag` help through
`assistant.config.add_args`; `python -m trainer <command> --help` lists them.
Defaults run on a laptop CPU with the default 135M model, and they are the settings
`python app.py` starts the trainer with and that `bench/loop.py` measures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from assistant.annotators import DEFAULT_FLOOR
from assistant.config import ServeArgs

POLICY_STEPS = ("ppo", "dpo", "kto", "sft", "grpo", "rloo")
DPO_LOSSES = ("sigmoid", "ipo", "robust", "hinge", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down")
SFT_CORRECTIONS = ("edits", "whole")  # a correction's SFT loss: on the tokens the person changed, or on the whole reply
SERVED = ServeArgs()  # rollouts and evaluation sample the way the app serves replies


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class DataArgs:
    db: str = _f("data/feedback.db", "SQLite feedback store to read")
    val_fraction: float = _f(0.2, "share of conversations held out for validation (split by conversation id, deterministic)")
    split_seed: str = _f("split-v1", "salt of the deterministic train/validation split")
    annotator_floor: float = _f(DEFAULT_FLOOR, "leave out the feedback of people whose reliability weight (from gold items and repeats, 0..1; a newcomer has 0.5) is below this; see assistant/annotators.py")

    def validate(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.annotator_floor <= 1.0:
            raise ValueError(f"--annotator-floor must be a weight in [0, 1], got {self.annotator_floor}")


@dataclass
class RewardArgs:
    reward_dir: str = _f("data/reward", "where reward-model versions (rNNNNNN/) are written")
    reward_lora_r: int = _f(16, "LoRA rank of the reward model's adapter")
    reward_lora_alpha: int = _f(32, "LoRA alpha of the reward model's adapter")
    reward_lora_layers: int = _f(8, "LoRA on the top N transformer layers only (0 = every layer); the backward pass stops below them")
    reward_lr: float = _f(3e-4, "AdamW learning rate (LoRA and scalar head)")
    reward_epochs: int = _f(2, "passes over the training examples")
    reward_min_steps: int = _f(32, "at least this many optimiser steps: a small data set gets more passes than --reward-epochs (0 = exactly --reward-epochs)")
    reward_batch_size: int = _f(8, "pairs (or pointwise labels) per optimiser step")
    reward_micro_batch_size: int = _f(2, "pairs (or pointwise labels) per forward/backward pass; gradients accumulate to --reward-batch-size")
    reward_gradient_checkpointing: bool = _f(False, "recompute the LoRA layers' activations in the backward pass (less memory, more time; dropout on)")
    reward_packing: bool = _f(True, "fit on packed micro-batches: each pair's shared prompt encoded once, no padding computed (same rewards); --no-reward-packing pads every sequence, as models whose attention cannot take a 4D mask do anyway")
    reward_max_length: int = _f(512, "tokens per (prompt + reply), truncated from the left of the prompt")
    pointwise_weight: float = _f(0.5, "weight of the pointwise (thumbs) loss next to the pairwise Bradley-Terry loss")
    min_pairs: int = _f(16, "fewest training pairs + pointwise labels a fit accepts; fewer is refused")
    seed: int = _f(0, "random seed for initialisation and shuffling")
    reward_max_grad_norm: float = _f(1.0, "gradient-norm clip of each reward-model optimiser step")
    reward_eval_batch_size: int = _f(16, "sequences per forward pass when scoring (validation, normalisation)")
    normalizer_size: int = _f(512, "most training replies scored after fitting to set the reward's mean/std normalisation")
    reward_condition_on_profile: bool = _f(False, "condition the reward model on the rater's profile group: feedback is merged per group and each reply is read after a 'Rater profile: <group>' system message (PPO and the gate score with 'any'); see the README")

    def validate(self) -> None:
        for name in ("reward_lora_r", "reward_lora_alpha", "reward_epochs", "reward_batch_size", "reward_micro_batch_size", "reward_max_length",
                     "min_pairs", "reward_eval_batch_size", "normalizer_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.reward_min_steps < 0:
            raise ValueError(f"--reward-min-steps must be >= 0, got {self.reward_min_steps}")
        if self.reward_lora_layers < 0:
            raise ValueError(f"--reward-lora-layers must be >= 0, got {self.reward_lora_layers}")
        if not isinstance(self.reward_packing, bool):
            raise ValueError(f"--reward-packing must be true or false, got {self.reward_packing!r}")
        if self.reward_lr <= 0:
            raise ValueError(f"--reward-lr must be positive, got {self.reward_lr}")
        if self.pointwise_weight < 0:
            raise ValueError(f"--pointwise-weight must be >= 0, got {self.pointwise_weight}")
        if self.reward_max_grad_norm <= 0:
            raise ValueError(f"--reward-max-grad-norm must be positive, got {self.reward_max_grad_norm}")


@dataclass
class PPOArgs:
    adapters_dir: str = _f("data/adapters", "where candidate adapters (vNNNNNN/) are published")
    reward: str = _f("", "reward-model version to optimise against (default: the latest under --reward-dir)")
    ppo_iterations: int = _f(6, "PPO iterations (rollout → score → update) per run")
    ppo_batch_size: int = _f(8, "prompts rolled out per iteration")
    mini_batch_size: int = _f(4, "rollouts per gradient step")
    ppo_epochs: int = _f(2, "passes over each iteration's rollouts")
    ppo_lr: float = _f(1e-3, "AdamW learning rate of the policy LoRA and the value head")
    max_new_tokens: int = _f(SERVED.max_new_tokens, "reply length cap during rollouts (default: the app's served cap)")
    temperature: float = _f(SERVED.temperature, "sampling temperature of rollouts, as served (log-probs are scaled by it too)")
    top_p: float = _f(SERVED.top_p, "nucleus-sampling top-p of rollouts, as served")
    init_kl_coef: float = _f(0.05, "initial β of the per-token KL penalty (the next cycle continues from the parent's β)")
    target_kl: float = _f(6.0, "KL to the parent (nats per reply) the adaptive controller steers to; 0 = keep β fixed")
    kl_horizon: int = _f(32, "rollouts over which the adaptive controller closes its gap to --target-kl")
    kl_ceiling: float = _f(12.0, "when the rollouts' mean KL per reply to the reference (the parent, or the SFT result with --sft-first) exceeds this, stop and restore the last weights under it (default: the gate's --kl-budget)")
    cliprange: float = _f(0.2, "PPO ratio clip")
    cliprange_value: float = _f(0.2, "value-function clip")
    vf_coef: float = _f(0.1, "weight of the value loss")
    gamma: float = _f(1.0, "discount")
    lam: float = _f(0.95, "GAE λ")
    max_grad_norm: float = _f(1.0, "gradient-norm clip")
    missing_eos_penalty: float = _f(0.0, "subtracted from the score of a rollout that hits the length cap without EOS (0 = off)")
    max_prompts: int = _f(256, "most distinct prompts taken from the snapshot (most recent first)")
    prompt_max_tokens: int = _f(256, "prompts longer than this (in tokens) are skipped")
    ppo_seed: int = _f(0, "random seed of prompt sampling, rollouts and initialisation")

    def validate(self) -> None:
        for name in ("ppo_iterations", "ppo_batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens", "kl_horizon", "max_prompts", "prompt_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.mini_batch_size > self.ppo_batch_size:
            raise ValueError(f"--mini-batch-size ({self.mini_batch_size}) must not exceed --ppo-batch-size ({self.ppo_batch_size})")
        for name in ("ppo_lr", "temperature", "cliprange", "cliprange_value", "kl_ceiling", "max_grad_norm"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.init_kl_coef < 0 or self.target_kl < 0:
            raise ValueError("--init-kl-coef and --target-kl must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.missing_eos_penalty < 0:
            raise ValueError(f"--missing-eos-penalty is subtracted from the score, so it must be >= 0, got {self.missing_eos_penalty}")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError("--gamma and --lam must be in [0, 1]")


@dataclass
class PolicyArgs:
    policy_step: str = _f("ppo", "how a cycle improves the adapter: ppo, dpo, kto, sft, grpo or rloo (see the README's \"which policy step when\")")
    sft_first: bool = _f(True, "run SFT on the demonstrations (corrections, 👍 replies, --demonstrations) before the policy step; skipped with fewer than --min-policy-rows")
    demonstrations: str = _f("", "JSONL file of demonstrations in TRL's messages format, added to SFT's data")
    reward_functions: str = _f("", "Python file of reward_* functions added to the reward model's score (PPO, GRPO, RLOO); see trainer/reward_functions.py")
    policy_lr: float = _f(2e-4, "AdamW learning rate of DPO, KTO, GRPO and RLOO on the LoRA adapter")
    sft_lr: float = _f(2e-4, "AdamW learning rate of SFT on the LoRA adapter")
    policy_epochs: int = _f(2, "DPO/KTO: passes over the feedback")
    sft_epochs: int = _f(2, "SFT: passes over the demonstrations")
    sft_min_steps: int = _f(36, "SFT: at least this many optimiser steps, however few the demonstrations (more passes over them)")
    sft_corrections: str = _f("edits", "SFT on a correction: loss on the tokens the person changed (edits) or on the whole corrected reply (whole)")
    policy_iterations: int = _f(6, "GRPO/RLOO: optimiser steps (each samples --num-generations replies to --policy-batch-size prompts)")
    policy_batch_size: int = _f(4, "DPO/KTO/SFT: rows per optimiser step; GRPO/RLOO: prompts per step")
    policy_grad_accum: int = _f(1, "DPO/KTO/SFT: gradient accumulation steps")
    beta: float = _f(0.1, "DPO/KTO β (strength of the pull to the parent); GRPO/RLOO KL coefficient")
    dpo_loss: str = _f("sigmoid", "DPO loss: sigmoid (DPO), ipo, robust (label-smoothed DPO for noisy labels), hinge, ...")
    label_smoothing: float = _f(0.1, "robust DPO: assumed share of flipped preference labels")
    num_generations: int = _f(4, "GRPO/RLOO: replies sampled per prompt (the group a reply is compared with)")
    policy_max_length: int = _f(512, "DPO/KTO/SFT: most tokens per (prompt + reply); longer rows are cut at the end")
    policy_gradient_checkpointing: bool = _f(False, "DPO/KTO/SFT/GRPO/RLOO: recompute activations in the backward pass (less memory, more time)")
    min_policy_rows: int = _f(4, "fewest training rows a DPO/KTO/SFT step accepts")
    policy_seed: int = _f(0, "random seed of DPO/KTO/SFT/GRPO/RLOO")

    def validate(self) -> None:
        if self.policy_step not in POLICY_STEPS:
            raise ValueError(f"--policy-step must be one of {', '.join(POLICY_STEPS)}, got {self.policy_step!r}")
        if self.dpo_loss not in DPO_LOSSES:
            raise ValueError(f"--dpo-loss must be one of {', '.join(DPO_LOSSES)}, got {self.dpo_loss!r}")
        for name in ("policy_epochs", "sft_epochs", "sft_min_steps", "policy_iterations", "policy_batch_size", "policy_grad_accum", "policy_max_length", "min_policy_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.num_generations < 2:
            raise ValueError(f"--num-generations must be at least 2 (a group baseline needs two replies), got {self.num_generations}")
        if self.policy_lr <= 0 or self.sft_lr <= 0 or self.beta <= 0:
            raise ValueError("--policy-lr, --sft-lr and --beta must be positive")
        if self.sft_corrections not in SFT_CORRECTIONS:
            raise ValueError(f"--sft-corrections must be one of {', '.join(SFT_CORRECTIONS)}, got {self.sft_corrections!r}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")


@dataclass
class ScheduleArgs:
    lock_file: str = _f("data/trainer.lock", "lock file that lets only one cycle run at a time, across processes")
    cycles_log: str = _f("data/cycles.jsonl", "one JSON line per finished cycle: decision, reasons, versions, feedback ids")
    every_min: float = _f(30.0, "`run`: minutes between checks for new feedback (0 = only at --at)")
    min_new_rows: int = _f(20, "`run`: new feedback rows (votes, choices, corrections, rankings) since the last cycle needed to start one")
    at: str = _f("", "`run`: also run a cycle every day at this local time, HH:MM (needs at least one new row)")
    min_decisive_pairs: int = _f(24, "fewest preference pairs (a choice, correction, ranking or up- vs down-vote) a cycle trains on; fewer: wait for feedback")
    min_val_pairs: int = _f(16, "fewest pairs the reward models are validated on (cross-fitted: each pair by the model that did not see it)")
    min_val_accuracy: float = _f(0.5, "the reward models are trusted (and training starts) only when the 95% lower bound of their held-out pair accuracy is above this")
    eval_fraction: float = _f(0.25, "share of prompts (snapshot and default set) held out from PPO to evaluate candidates on")
    eval_replies: int = _f(64, "replies per side (candidate, current) on held-out prompts; prompts repeat with new samples to reach it")
    eval_max_new_tokens: int = _f(SERVED.max_new_tokens, "reply length cap when evaluating (default: the app's served cap)")
    eval_seed: int = _f(1234, "random seed of evaluation sampling (the same for both sides)")
    min_win_rate: float = _f(0.5, "promotion needs the 95% lower bound of the judge's paired win rate (candidate vs current) above this")
    min_human_agreement: float = _f(0.5, "promotion is refused when the 95% upper bound of the held-out human agreement (validation pairs where the candidate moved towards the chosen reply) is below this")
    kl_budget: float = _f(12.0, "promotion needs the candidate's mean KL to its parent (this cycle's change, nats per reply) under this")
    kl_total_budget: float = _f(40.0, "promotion needs the candidate's mean KL to the base (all cycles together, nats per reply) under this")
    max_degenerate: int = _f(0, "promotion needs at most this many degenerate (empty or repetitive) held-out replies")
    live_compare: bool = _f(False, "after passing evaluation, serve the candidate against CURRENT in Compare mode and decide on votes")
    live_min_votes: int = _f(10, "live comparison: fewest counted votes (one per user and prompt) before the sequential rule may decide")
    live_confidence: float = _f(0.95, "live comparison: promote when P(win rate > 0.5) under a Beta(1+wins, 1+losses) posterior reaches this, reject when P(win rate < 0.5) does")
    live_max_hours: float = _f(48.0, "live comparison: a candidate still undecided this long after going live is withdrawn")
    keep: int = _f(10, "after each cycle, delete adapter and reward-model versions beyond the newest N (never the served or live one, their ancestors, or the reward models kept adapters name); 0 = keep all")
    backup_every_hours: float = _f(24.0, "`run`: back up the feedback database (--db) every N hours, first when the schedule starts (0 = never)")
    backup_dir: str = _f("", "`run`: where backups of the feedback database are written (default: backups/ beside --db, e.g. data/backups)")
    backup_keep: int = _f(7, "`run`: backups of the feedback database kept (the oldest beyond this are deleted)")

    def validate(self) -> None:
        if self.every_min < 0:
            raise ValueError(f"--every-min must be >= 0, got {self.every_min}")
        if self.min_new_rows < 1:
            raise ValueError(f"--min-new-rows must be at least 1, got {self.min_new_rows}")
        if self.at:
            parts = self.at.split(":")
            if len(parts) != 2 or not all(p.isdigit() for p in parts) or not (0 <= int(parts[0]) < 24 and 0 <= int(parts[1]) < 60):
                raise ValueError(f"--at must be a time of day HH:MM, got {self.at!r}")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"--eval-fraction must be in (0, 1), got {self.eval_fraction}")
        for name in ("min_decisive_pairs", "min_val_pairs", "eval_replies", "eval_max_new_tokens", "live_min_votes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.min_win_rate < 1:
            raise ValueError(f"--min-win-rate must be in [0, 1), got {self.min_win_rate}")
        if not 0 <= self.min_val_accuracy < 1:
            raise ValueError(f"--min-val-accuracy must be in [0, 1), got {self.min_val_accuracy}")
        if not 0 <= self.min_human_agreement <= 1:
            raise ValueError(f"--min-human-agreement must be in [0, 1], got {self.min_human_agreement}")
        if self.kl_budget <= 0 or self.kl_total_budget <= 0:
            raise ValueError(f"--kl-budget and --kl-total-budget must be positive, got {self.kl_budget} and {self.kl_total_budget}")
        if self.max_degenerate < 0:
            raise ValueError(f"--max-degenerate must be >= 0, got {self.max_degenerate}")
        if not 0.5 < self.live_confidence < 1:
            raise ValueError(f"--live-confidence must be in (0.5, 1), got {self.live_confidence}")
        if self.live_max_hours <= 0:
            raise ValueError(f"--live-max-hours must be positive, got {self.live_max_hours}")
        if self.keep < 0:
            raise ValueError(f"--keep must be >= 0 (0 keeps every version), got {self.keep}")
        if self.backup_every_hours < 0:
            raise ValueError(f"--backup-every-hours must be >= 0 (0 = never), got {self.backup_every_hours}")
        if self.backup_keep < 1:
            raise ValueError(f"--backup-keep must be at least 1, got {self.backup_keep}")
