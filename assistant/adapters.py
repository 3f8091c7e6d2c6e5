"""The on-disk adapter format: publish (trainer side), validate and activate (server side).

Layout under `data/adapters/`:

    v000001/            # peft save_pretrained output + manifest.json
        adapter_config.json
        adapter_model.safetensors
        manifest.json   # parent, reward model, feedback id range, metrics, status, created_at
        evaluation.jsonl  # after the gate: each held-out pair it judged (prompt, both replies, judge scores)
        reference_adapter.safetensors  # when its optimising step ran after SFT: the SFT result's LoRA weights
    CURRENT             # one line: the version the server should serve
    LIVE                # optional: a candidate the Compare mode puts against CURRENT

A version's manifest `status` moves candidate → active | rejected, and active →
retired when another version replaces it (promotion or rollback); `history` lists
each change with its time and reason.

Old versions are pruned (`prune`): all but the newest N are deleted, except the
versions `CURRENT` and `LIVE` name and their ancestors (the parent chain a rollback
walks). A pruned directory is first renamed to a hidden temporary name, so a crash
mid-delete never leaves a partial directory that looks like a version.

Publishing is atomic: the directory is written under a temporary name, fsynced and
renamed into place, and `CURRENT` is replaced with `os.replace`, so a reader never
sees a half-written adapter or pointer. The server validates an adapter (files
complete, LoRA shape matches the base, every tensor finite) before it loads it;
a bad adapter is refused and the old one keeps serving.

What it is not: a training loop or a scheduler.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from assistant import portable
from assistant.config import BASE_VERSION

log = logging.getLogger(__name__)

REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors", "manifest.json")
EVALUATION_FILE = "evaluation.jsonl"
REFERENCE_FILE = "reference_adapter.safetensors"  # the SFT result a candidate's optimising step started from (the gate's KL budget)
VERSION_RE = re.compile(r"^v\d{6}$")
POINTER = "CURRENT"
LIVE_POINTER = "LIVE"
STATUSES = ("candidate", "active", "rejected", "retired")


class InvalidAdapter(ValueError):
    """An adapter directory that must not be served."""


def check_version(version, allow_base: bool = True) -> str:
    """`version` when it is a version name ('v' + 6 digits, or 'base' where allowed);
    else InvalidAdapter. Every writer of a version name to disk calls this, so a pointer
    or manifest never holds a path, a trailing slash or a typo that readers refuse."""
    if (allow_base and version == BASE_VERSION) or (isinstance(version, str) and VERSION_RE.match(version)):
        return version
    allowed = "'base' or 'v' + 6 digits" if allow_base else "'v' + 6 digits"
    raise InvalidAdapter(f"{version!r} is not a version name ({allowed}, like v000001)")


def versions(adapters_dir: str | Path) -> list[str]:
    """Published versions, oldest first."""
    d = Path(adapters_dir)
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if p.is_dir() and VERSION_RE.match(p.name))


def _read_pointer(pointer: Path, allow_base: bool) -> str | None:
    """The version name in a pointer file, None when there is none; InvalidAdapter when
    it cannot be read or holds anything but a version name."""
    try:
        raw = pointer.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InvalidAdapter(f"{pointer} is unreadable ({exc})") from exc
    version = raw.decode("utf-8", errors="replace").strip()
    if (allow_base and version == BASE_VERSION) or VERSION_RE.match(version):
        return version
    shown = version if len(version) <= 60 else version[:57] + "..."
    raise InvalidAdapter(f"{pointer} holds {shown!r}, which is not a version name like v000001")


def read_current(adapters_dir: str | Path) -> str:
    """The version `CURRENT` points at, or 'base' when nothing is published."""
    return _read_pointer(Path(adapters_dir) / POINTER, allow_base=True) or BASE_VERSION


def fsync_dir(path: Path) -> None:
    """fsync a directory, so a rename into it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_pointer(d: Path, name: str, version: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{name}.")
    with os.fdopen(fd, "w") as f:
        f.write(version + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, d / name)
    fsync_dir(d)


def set_current(adapters_dir: str | Path, version: str) -> None:
    """Atomically point `CURRENT` at `version` (which must exist, or be 'base')."""
    d = Path(adapters_dir)
    if check_version(version) != BASE_VERSION and not (d / version).is_dir():
        raise InvalidAdapter(f"no adapter {version} under {d}")
    _write_pointer(d, POINTER, version)


def read_live(adapters_dir: str | Path) -> str | None:
    """The candidate under live comparison, or None."""
    return _read_pointer(Path(adapters_dir) / LIVE_POINTER, allow_base=False)


def set_live(adapters_dir: str | Path, version: str | None) -> None:
    """Atomically point `LIVE` at a candidate, or remove it (None)."""
    d = Path(adapters_dir)
    if version is None:
        with contextlib.suppress(FileNotFoundError):
            (d / LIVE_POINTER).unlink()
            fsync_dir(d)
        return
    if not (d / check_version(version, allow_base=False)).is_dir():
        raise InvalidAdapter(f"no adapter {version} under {d}")
    _write_pointer(d, LIVE_POINTER, version)


def publish(adapters_dir: str | Path, model, adapter_name: str, manifest: dict, make_current: bool = False,
            tensors: dict[str, dict] | None = None) -> str:
    """Save `adapter_name` of peft `model` as the next version; returns its name.

    `tensors` {file name: {name: tensor}} are saved beside the adapter (safetensors),
    e.g. the trainer's value head, inside the same atomic publish."""
    if manifest.get("parent") is not None:
        check_version(manifest["parent"])
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
    for name, state in (tensors or {}).items():
        save_file(state, str(tmp / name))
    unservable = portable.problems(tmp)
    if unservable:  # an adapter that vLLM / SGLang could not load is not published (docs/scaling.md)
        shutil.rmtree(tmp, ignore_errors=True)
        raise InvalidAdapter(f"not publishing {version}: {'; '.join(unservable)}")
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


def manifests(adapters_dir: str | Path) -> list[dict]:
    """Every published version's manifest, oldest first (unreadable ones as status 'broken')."""
    out = []
    for v in versions(adapters_dir):
        try:
            out.append(read_manifest(adapters_dir, v))
        except (OSError, json.JSONDecodeError) as exc:
            out.append({"version": v, "status": "broken", "reasons": [f"manifest unreadable: {exc}"]})
    return out


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def update_manifest(adapters_dir: str | Path, version: str, status: str | None = None, reason: str = "", **fields) -> dict:
    """Merge `fields` into a version's manifest (atomically); a status change is appended to `history`."""
    d = Path(adapters_dir) / check_version(version, allow_base=False)
    if fields.get("parent") is not None:
        check_version(fields["parent"])
    manifest = read_manifest(adapters_dir, version)
    manifest.update(fields)
    if status is not None:
        if status not in STATUSES:
            raise ValueError(f"unknown adapter status {status!r}; one of {', '.join(STATUSES)}")
        manifest["status"] = status
        manifest.setdefault("history", []).append({"status": status, "at": _now(), "reason": reason})
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".manifest.")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(manifest, indent=2))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, d / "manifest.json")
    fsync_dir(d)
    return manifest


def write_evaluation(adapters_dir: str | Path, version: str, rows: list[dict]) -> Path:
    """Replace a version's EVALUATION_FILE (one JSON object per line), atomically."""
    d = Path(adapters_dir) / check_version(version, allow_base=False)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".evaluation.")
    with os.fdopen(fd, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, d / EVALUATION_FILE)
    fsync_dir(d)
    return d / EVALUATION_FILE


def read_evaluation(adapters_dir: str | Path, version: str) -> list[dict]:
    """The pairs the gate judged for `version` ([] when it was never evaluated)."""
    path = Path(adapters_dir) / check_version(version, allow_base=False) / EVALUATION_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@contextlib.contextmanager
def pointer_lock(adapters_dir: str | Path):
    """Serialise read-modify-write of the pointers and statuses across processes (a short flock)."""
    d = Path(adapters_dir)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".pointer.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def promote(adapters_dir: str | Path, version: str, reason: str = "passed evaluation", expect_current: str | None = None, **fields) -> str:
    """Make a validated candidate the served version; the one it replaces becomes 'retired'. Returns the old version.

    `expect_current`: the version the candidate was evaluated against; when CURRENT
    names another one by the time the pointer lock is held, nothing changes and
    InvalidAdapter says so (the evidence was about replacing a version no longer served)."""
    with pointer_lock(adapters_dir):
        old = read_current(adapters_dir)
        if expect_current is not None and old != expect_current:
            raise InvalidAdapter(f"{version} was evaluated against {expect_current}, but CURRENT now points at {old}; "
                                 "evaluate it against the served version first")
        update_manifest(adapters_dir, version, status="active", reason=reason, promoted_at=_now(), **fields)
        set_current(adapters_dir, version)
        if read_live(adapters_dir) == version:
            set_live(adapters_dir, None)
        if old not in (BASE_VERSION, version) and (Path(adapters_dir) / old).is_dir():
            update_manifest(adapters_dir, old, status="retired", reason=f"replaced by {version}")
    return old


def reject(adapters_dir: str | Path, version: str, reasons: list[str], **fields) -> None:
    """Mark a candidate rejected with its reasons; it is never served."""
    with pointer_lock(adapters_dir):
        update_manifest(adapters_dir, version, status="rejected", reason="; ".join(reasons), reasons=reasons, **fields)
        if read_live(adapters_dir) == version:
            set_live(adapters_dir, None)


def rollback(adapters_dir: str | Path, version: str | None = None, lora=None) -> tuple[str | None, str]:
    """Point CURRENT back at `version` (default: the served version's parent). Returns (old, new);
    old is None when CURRENT was unreadable (garbled), which a rollback to a named version repairs.

    The target must be 'base' or a version that was served before (active or retired);
    with `lora` given it is validated first, so a rollback never points at a broken adapter."""
    d = Path(adapters_dir)
    if version is not None:
        check_version(version)
    with pointer_lock(adapters_dir):
        try:
            old = read_current(adapters_dir)
        except InvalidAdapter as exc:
            if version is None:
                raise InvalidAdapter(f"{exc}, so the served version's parent is unknown; "
                                     f"name the version to serve, one of: {', '.join(_served_before(d))}") from exc
            log.warning("%s; the rollback to %s replaces it", exc, version)
            old = None
        known = old is not None and (old == BASE_VERSION or (d / old).is_dir())
        if version is None:
            if old == BASE_VERSION:
                raise InvalidAdapter("the base model is serving; there is nothing to roll back to")
            why = "" if known else f"CURRENT points at {old}, which is not under {d}"
            if known:
                try:
                    version = check_version(read_manifest(adapters_dir, old).get("parent") or BASE_VERSION)
                except (OSError, json.JSONDecodeError, InvalidAdapter) as exc:
                    why = f"{old}: no usable parent in its manifest ({exc})"
            if why:
                raise InvalidAdapter(f"{why}; the served version's parent is unknown, so name the version to serve, "
                                     f"one of: {', '.join(_served_before(d))}")
        if version == old:
            raise InvalidAdapter(f"{version} is already serving")
        if version != BASE_VERSION:
            if not (Path(adapters_dir) / version).is_dir():
                raise InvalidAdapter(f"no adapter {version} under {adapters_dir}")
            try:
                status = read_manifest(adapters_dir, version).get("status")
            except (OSError, json.JSONDecodeError) as exc:
                raise InvalidAdapter(f"{version}: manifest unreadable ({exc})") from exc
            if status not in ("active", "retired"):
                raise InvalidAdapter(f"{version} is {status}; only versions that were served before (active or retired) can be rolled back to")
            if lora is not None:
                validate(Path(adapters_dir) / version, lora)
            update_manifest(adapters_dir, version, status="active", reason=f"rolled back to from {old or 'an unreadable CURRENT'}")
        set_current(adapters_dir, version)
        if not known:  # which version served is unknown: retire every other active one
            for m in manifests(d):
                if m["version"] != version and m.get("status") == "active":
                    update_manifest(d, m["version"], status="retired", reason=f"rolled back to {version}", rolled_back_at=_now())
        elif old != BASE_VERSION:
            update_manifest(adapters_dir, old, status="retired", reason=f"rolled back to {version}", rolled_back_at=_now())
    return old, version


def in_use(adapters_dir: str | Path) -> dict[str, str]:
    """{version: why it must stay} for the versions `CURRENT` and `LIVE` name and their
    ancestors (parent, grandparent, ... as far as they are still on disk).

    InvalidAdapter when that cannot be known: a pointer is garbled or names a missing
    version, or a manifest on the chain is unreadable."""
    d = Path(adapters_dir)
    keep: dict[str, str] = {}
    for name, version in ((POINTER, read_current(d)), (LIVE_POINTER, read_live(d))):
        if version not in (None, BASE_VERSION) and not (d / version).is_dir():
            raise InvalidAdapter(f"{name} points at {version}, which is not under {d}")
        why = name
        while version not in (None, BASE_VERSION) and version not in keep and (d / version).is_dir():
            keep[version] = why
            try:
                parent = read_manifest(d, version).get("parent")
            except (OSError, json.JSONDecodeError) as exc:
                raise InvalidAdapter(f"{version}: manifest unreadable ({exc}), so its ancestors are unknown") from exc
            version = None if parent is None else check_version(parent)
            why = f"ancestor of {name}"
    return keep


def _set_aside(path: Path) -> Path:
    """Rename a version directory to a hidden temporary name (that no reader lists and
    that the trainer's tidy-up removes), durably; returns the new path."""
    tmp = path.with_name(f".{path.name}.pruned-{uuid.uuid4().hex[:8]}")
    os.rename(path, tmp)
    fsync_dir(path.parent)
    return tmp


def remove_dir(path: str | Path) -> None:
    """Delete a version directory (an adapter or a reward model) so that a crash at any
    point leaves either the whole directory or none of it under its version name."""
    shutil.rmtree(_set_aside(Path(path)), ignore_errors=True)


def prune(adapters_dir: str | Path, keep: int, dry_run: bool = False) -> list[str]:
    """Delete every version but the newest `keep` and those `in_use`; returns the
    versions deleted (with `dry_run`, those that would be), oldest first.

    Call it under the cycle lock, so no training step is writing next to it. The
    pointers are read and the directories set aside under the pointer lock, so a
    promotion or rollback never points at a version being deleted; a server only ever
    loads what a pointer names. InvalidAdapter (nothing deleted) when what is in use
    cannot be known."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    d = Path(adapters_dir)
    if not d.is_dir():
        return []
    with pointer_lock(d):
        protected = in_use(d)
        doomed = [v for v in versions(d)[:-keep] if v not in protected]
        if dry_run:
            return doomed
        moved = [_set_aside(d / v) for v in doomed]
    for tmp in moved:
        shutil.rmtree(tmp, ignore_errors=True)
    return doomed


def _served_before(adapters_dir: Path) -> list[str]:
    """'base' and the versions a rollback may target (active or retired), newest first."""
    return [BASE_VERSION] + [m["version"] for m in reversed(manifests(adapters_dir)) if m.get("status") in ("active", "retired")]


def validate(path: str | Path, lora) -> dict[str, torch.Tensor]:
    """Raise InvalidAdapter unless `path` is a complete, finite adapter shaped like `lora`;
    returns its weights (CPU tensors, by the names peft saved them under)."""
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
    return tensors


def prepare(engine, adapters_dir: str | Path, version: str) -> None:
    """Validate `version` and copy its weights into a free adapter slot (Policy.stage),
    on the calling thread, while the engine goes on generating; the engine's job that
    loads it then has nothing left to do but record it. Raises InvalidAdapter."""
    if version == BASE_VERSION or version in engine.policy.loaded:
        return
    tensors = validate(Path(adapters_dir) / version, engine.policy.lora)
    engine.policy.stage(version, tensors)  # False: no free slot or another shape; loading then goes through peft


def _load_prepared(engine, adapters_dir: Path, version: str, then=None):
    """Run, between decode steps, the load of a prepared `version` (and `then()`);
    a failure gives the slot back. Returns what `then` returns."""
    def job(policy):
        if version != BASE_VERSION and version not in policy.loaded:
            policy.load_adapter(version, adapters_dir / version)
        return then() if then is not None else None

    try:
        return engine.call(job).result()
    except BaseException:
        engine.policy.unstage(version)
        raise


def activate(engine, adapters_dir: str | Path, version: str) -> str:
    """Validate, load and switch to `version`; returns the old version.

    The weights are copied into a free adapter slot on the calling thread while the
    engine keeps decoding, and the switch is a pointer change, so nothing waits for a
    decode step; an adapter that fits no slot is loaded through peft between two
    steps instead. In-flight and queued replies keep the version they were pinned to; the previous
    adapter is unloaded as soon as no reply uses it. Raises InvalidAdapter and changes nothing when
    the adapter is bad; an error while loading it (from peft) is raised as it is, and nothing
    changes either.
    """
    prepare(engine, adapters_dir, version)
    if version == BASE_VERSION or engine.load_staged(version):  # in a slot: no wait for the decode step
        return engine.switch(version)
    return _load_prepared(engine, Path(adapters_dir), version, then=lambda: engine.switch(version))


def _why(exc: Exception) -> str:
    """A refusal's reason, on one line: InvalidAdapter says it all; anything else is a
    failure to load (peft's messages run over many lines, one per tensor: shortened)."""
    if isinstance(exc, InvalidAdapter):
        return str(exc)
    why = f"loading failed: {type(exc).__name__}: {' '.join(str(exc).split())}"
    return why if len(why) <= 300 else why[:297] + "..."


class CurrentWatcher:
    """Follows the CURRENT (and LIVE) pointers and hot-swaps the engine to match.

    `poll()` does one check; `start()` runs it every `interval` seconds on a daemon
    thread. A pointer at an adapter that cannot be served (it fails validation, or
    loading it raises, e.g. peft on weights of the wrong shape) is refused with an
    error log line, once per pointer value, and the version already serving keeps
    serving; it is not tried again until the pointer names another version."""

    def __init__(self, engine, adapters_dir: str | Path, interval: float = 2.0):
        self.engine, self.adapters_dir, self.interval = engine, Path(adapters_dir), interval
        self.refused: dict[str, str] = {}  # version -> why, for pointer values not to retry
        self.live: str | None = None  # the candidate loaded for live comparison
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> str:
        """Bring the engine in line with the pointers; returns the version now serving."""
        with self._lock:
            self._follow_current()
            self._follow_live()
            return self.engine.policy.current

    def _follow_current(self) -> None:
        try:
            version = read_current(self.adapters_dir)
        except (InvalidAdapter, OSError) as exc:
            self._refuse(POINTER, str(exc))
            return
        self.refused.pop(POINTER, None)  # readable again: a later garbling is logged anew
        if version == self.engine.policy.current or version in self.refused:
            return
        try:
            old = activate(self.engine, self.adapters_dir, version)
        except Exception as exc:  # noqa: BLE001 - any failure to load refuses the version; the old one keeps serving
            self._refuse(version, _why(exc))
            return
        if self.live == version:
            self.live = None  # the candidate was promoted
        log.info("hot-swapped adapter %s -> %s", old, version)

    def _follow_live(self) -> None:
        try:
            version = read_live(self.adapters_dir)
        except (InvalidAdapter, OSError) as exc:
            self._refuse(LIVE_POINTER, str(exc))
            version = None
        else:
            self.refused.pop(LIVE_POINTER, None)
        if version == self.live or version in self.refused:
            return
        engine, old = self.engine, self.live
        if version is not None and version != engine.policy.current:
            try:
                prepare(engine, self.adapters_dir, version)
                if not engine.load_staged(version):
                    _load_prepared(engine, self.adapters_dir, version)
            except Exception as exc:  # noqa: BLE001 - any failure to load refuses the candidate
                self._refuse(version, _why(exc))
                version = None
            if version == old:
                return

        if old is not None and old != version:
            engine.retire(old)
        self.live = version
        log.info("live comparison candidate: %s", version or "none")

    def _refuse(self, key: str, why: str) -> None:
        if self.refused.get(key) != why:
            log.error("refusing adapter pointer %s: %s; %s keeps serving", key, why, self.engine.policy.current)
        self.refused[key] = why

    def start(self) -> "CurrentWatcher":
        def loop():
            while not self._stop.wait(self.interval):
                try:
                    self.poll()
                except Exception:  # the watcher must outlive any one bad poll
                    log.exception("adapter watcher poll failed; retrying in %.1fs", self.interval)

        self._thread = threading.Thread(target=loop, name="adapter-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
