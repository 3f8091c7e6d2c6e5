"""The on-disk adapter format: publish (trainer side), validate and activate (server side).

Layout under `data/adapters/`:

    v000001/            # peft save_pretrained output + manifest.json
        adapter_config.json
        adapter_model.safetensors
        manifest.json   # parent, reward model, feedback id range, metrics, status, created_at
    CURRENT             # one line: the version the server should serve

Publishing is atomic: the directory is written under a temporary name, fsynced and
renamed into place, and `CURRENT` is replaced with `os.replace`, so a reader never
sees a half-written adapter or pointer. The server validates an adapter (files
complete, LoRA shape matches the base, every tensor finite) before it loads it;
a bad adapter is refused and the old one keeps serving.

What it is not: a training loop or a scheduler.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from assistant.config import BASE_VERSION

log = logging.getLogger(__name__)

REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors", "manifest.json")
VERSION_RE = re.compile(r"^v\d{6}$")
POINTER = "CURRENT"


class InvalidAdapter(ValueError):
    """An adapter directory that must not be served."""


def versions(adapters_dir: str | Path) -> list[str]:
    """Published versions, oldest first."""
    d = Path(adapters_dir)
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if p.is_dir() and VERSION_RE.match(p.name))


def read_current(adapters_dir: str | Path) -> str:
    """The version `CURRENT` points at, or 'base' when nothing is published."""
    pointer = Path(adapters_dir) / POINTER
    if not pointer.exists():
        return BASE_VERSION
    version = pointer.read_text().strip()
    if version != BASE_VERSION and not VERSION_RE.match(version):
        raise InvalidAdapter(f"{pointer} holds {version!r}, which is not a version name like v000001")
    return version


def fsync_dir(path: Path) -> None:
    """fsync a directory, so a rename into it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def set_current(adapters_dir: str | Path, version: str) -> None:
    """Atomically point `CURRENT` at `version` (which must exist, or be 'base')."""
    d = Path(adapters_dir)
    if version != BASE_VERSION and not (d / version).is_dir():
        raise InvalidAdapter(f"no adapter {version} under {d}")
    d.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".CURRENT.")
    with os.fdopen(fd, "w") as f:
        f.write(version + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, d / POINTER)
    fsync_dir(d)


def publish(adapters_dir: str | Path, model, adapter_name: str, manifest: dict, make_current: bool = False) -> str:
    """Save `adapter_name` of peft `model` as the next version; returns its name."""
    d = Path(adapters_dir)
    d.mkdir(parents=True, exist_ok=True)
    existing = versions(d)
    version = f"v{int(existing[-1][1:]) + 1 if existing else 1:06d}"
    tmp = Path(tempfile.mkdtemp(dir=d, prefix=f".{version}."))
    model.save_pretrained(str(tmp), selected_adapters=[adapter_name])
    saved = tmp / adapter_name if (tmp / adapter_name).is_dir() else tmp  # peft nests non-default names
    if saved != tmp:
        for f in saved.iterdir():
            os.replace(f, tmp / f.name)
        saved.rmdir()
    manifest = {"version": version, "status": "candidate", "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **manifest}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(tmp)
    os.rename(tmp, d / version)
    fsync_dir(d)
    if make_current:
        set_current(d, version)
    return version


def read_manifest(adapters_dir: str | Path, version: str) -> dict:
    return json.loads((Path(adapters_dir) / version / "manifest.json").read_text())


def validate(path: str | Path, lora) -> None:
    """Raise InvalidAdapter unless `path` is a complete, finite adapter shaped like `lora`."""
    path = Path(path)
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise InvalidAdapter(f"{path.name}: missing {', '.join(missing)}")
    try:
        cfg = json.loads((path / "adapter_config.json").read_text())
        json.loads((path / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidAdapter(f"{path.name}: unreadable config or manifest ({exc})") from exc
    if cfg.get("r") != lora.r or cfg.get("lora_alpha") != lora.lora_alpha:
        raise InvalidAdapter(f"{path.name}: rank/alpha {cfg.get('r')}/{cfg.get('lora_alpha')} do not match the server's {lora.r}/{lora.lora_alpha}")
    if set(cfg.get("target_modules") or []) != set(lora.target_modules):
        raise InvalidAdapter(f"{path.name}: target modules {sorted(cfg.get('target_modules') or [])} do not match the server's {sorted(lora.target_modules)}")
    try:
        tensors = load_file(str(path / "adapter_model.safetensors"))
    except Exception as exc:
        raise InvalidAdapter(f"{path.name}: adapter weights unreadable ({exc})") from exc
    if not tensors:
        raise InvalidAdapter(f"{path.name}: adapter holds no tensors")
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise InvalidAdapter(f"{path.name}: tensor {name} has NaN or infinite values")


def activate(engine, adapters_dir: str | Path, version: str) -> str:
    """Validate, load and switch to `version` between decode steps; returns the old version.

    In-flight and queued replies keep the version they were pinned to; the previous
    adapter is unloaded as soon as no reply uses it. Raises InvalidAdapter and changes nothing when
    the adapter is bad.
    """
    policy = engine.policy
    if version != BASE_VERSION:
        validate(Path(adapters_dir) / version, policy.lora)

    def swap(policy):
        if version != BASE_VERSION and version not in policy.loaded:
            policy.load_adapter(version, Path(adapters_dir) / version)
        return engine.switch(version)

    return engine.call(swap).result()
