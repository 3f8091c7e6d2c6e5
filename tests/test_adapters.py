"""Tests for assistant/adapters.py: the on-disk format (publish, CURRENT pointer),
validation of what the server is asked to load, and hot-swapping through the Engine
(new replies switch, in-flight replies finish on the adapter they started with, bad
adapters are refused, rollback to the base model).

Adapters are trained-looking LoRA weights on the tiny seeded model (tests/conftest.py).
Run: python -m pytest tests/test_adapters.py -q
"""

from __future__ import annotations

import threading
import time

import pytest
from safetensors.torch import load_file, save_file

from assistant import adapters as adapters_mod
from assistant.adapters import (
    POINTER,
    REQUIRED_FILES,
    InvalidAdapter,
    activate,
    publish,
    read_current,
    read_manifest,
    set_current,
    validate,
    versions,
)
from assistant.chat import GenParams
from assistant.config import BASE_VERSION

HANG_GUARD_S = 60
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MANIFEST = {"parent": "base", "reward_model": "rm000001", "feedback_ids": [1, 40], "metrics": {"objective/kl": 0.01}}


def greedy(max_new_tokens: int) -> GenParams:
    return GenParams(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)


@pytest.fixture
def adapters_dir(tmp_path):
    return tmp_path / "adapters"


@pytest.fixture
def published(adapters_dir, trained_peft):
    """adapters_dir holding v000001 (seed 1) and v000002 (seed 2); CURRENT not set."""
    for seed in (1, 2):
        publish(adapters_dir, trained_peft(seed=seed), "default", dict(MANIFEST))
    return adapters_dir


def corrupt_weights(path, how) -> None:
    """Rewrite the adapter's safetensors with the first tensor changed by `how`."""
    file = path / "adapter_model.safetensors"
    tensors = load_file(str(file))
    name = sorted(tensors)[0]
    tensors[name] = how(tensors[name].clone())
    save_file(tensors, str(file))


def with_value(value):
    def how(t):
        t.view(-1)[0] = value
        return t

    return how


def activate_in_background(engine, adapters_dir, version) -> tuple[threading.Thread, dict]:
    """Start `activate` on another thread and return once its swap is done (an adapter
    staged into a slot switches without the engine thread) or queued on the engine (one
    loaded through peft), so the caller decides what the engine is doing meanwhile."""
    queued, call = threading.Event(), engine.call

    def call_and_signal(fn):
        fut = call(fn)
        queued.set()
        return fut

    engine.call = call_and_signal
    result: dict = {}

    def run():
        result["old"] = activate(engine, adapters_dir, version)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + HANG_GUARD_S
    while not queued.wait(0.01) and thread.is_alive():
        assert time.monotonic() < deadline, "activate never switched or queued its swap"
    engine.call = call
    return thread, result


# -- versions and the CURRENT pointer ----------------------------------------------------


def test_versions_of_a_missing_directory_is_empty(adapters_dir):
    assert versions(adapters_dir) == []


def test_read_current_is_base_without_a_pointer(adapters_dir):
    assert read_current(adapters_dir) == BASE_VERSION
    adapters_dir.mkdir()
    assert read_current(adapters_dir) == BASE_VERSION


def test_read_current_refuses_a_garbled_pointer(adapters_dir):
    adapters_dir.mkdir()
    (adapters_dir / POINTER).write_text("../../etc\n")
    with pytest.raises(InvalidAdapter, match="not a version name"):
        read_current(adapters_dir)


def test_set_current_refuses_an_unknown_version(adapters_dir):
    with pytest.raises(InvalidAdapter, match="no adapter v000007"):
        set_current(adapters_dir, "v000007")


def test_set_current_to_base_needs_no_adapter(adapters_dir):
    set_current(adapters_dir, BASE_VERSION)
    assert read_current(adapters_dir) == BASE_VERSION


def test_set_current_leaves_no_temporary_files(published):
    set_current(published, "v000001")
    set_current(published, "v000002")
    assert read_current(published) == "v000002"
    assert sorted(p.name for p in published.iterdir()) == [POINTER, "v000001", "v000002"]


# -- publish ---------------------------------------------------------------------------------


def test_publish_writes_the_first_version_with_required_files(adapters_dir, trained_peft):
    version = publish(adapters_dir, trained_peft(), "default", dict(MANIFEST))
    assert version == "v000001"
    for name in REQUIRED_FILES:
        assert (adapters_dir / version / name).is_file(), name


def test_publish_writes_the_manifest(adapters_dir, trained_peft):
    version = publish(adapters_dir, trained_peft(), "default", dict(MANIFEST))
    manifest = read_manifest(adapters_dir, version)
    assert manifest["version"] == version
    assert manifest["status"] == "candidate"
    assert manifest["created_at"].endswith("Z")
    assert {k: manifest[k] for k in MANIFEST} == MANIFEST


def test_publish_increments_versions(published, trained_peft):
    assert versions(published) == ["v000001", "v000002"]
    assert publish(published, trained_peft(seed=3), "default", {}) == "v000003"


def test_publish_leaves_no_temporary_directories(published):
    assert [p.name for p in published.iterdir() if p.name.startswith(".")] == []
    assert sorted(p.name for p in published.iterdir()) == ["v000001", "v000002"]


def test_publish_flattens_a_named_adapter(adapters_dir, trained_peft, policy):
    version = publish(adapters_dir, trained_peft(adapter_name="policy"), "policy", {})
    assert [p.name for p in (adapters_dir / version).iterdir() if p.is_dir()] == []
    validate(adapters_dir / version, policy.lora)


def test_publish_does_not_move_current_unless_asked(published, trained_peft):
    set_current(published, "v000001")
    publish(published, trained_peft(seed=3), "default", {})
    assert read_current(published) == "v000001"
    assert publish(published, trained_peft(seed=4), "default", {}, make_current=True) == "v000004"
    assert read_current(published) == "v000004"


# -- validate ---------------------------------------------------------------------------------


def test_published_adapter_is_valid(published, policy):
    validate(published / "v000001", policy.lora)


@pytest.mark.parametrize("missing", REQUIRED_FILES)
def test_validate_refuses_a_missing_file(published, policy, missing):
    (published / "v000001" / missing).unlink()
    with pytest.raises(InvalidAdapter, match=f"v000001: missing {missing}"):
        validate(published / "v000001", policy.lora)


def test_validate_refuses_a_missing_directory(adapters_dir, policy):
    with pytest.raises(InvalidAdapter, match="missing adapter_config.json"):
        validate(adapters_dir / "v000009", policy.lora)


def test_validate_refuses_a_wrong_rank(tmp_path, make_adapter, policy):
    path = make_adapter(tmp_path / "v000001", lora_r=8)
    with pytest.raises(InvalidAdapter, match=r"rank/alpha 8/32 do not match the server's 16/32"):
        validate(path, policy.lora)


def test_validate_refuses_a_wrong_alpha(tmp_path, make_adapter, policy):
    path = make_adapter(tmp_path / "v000001", lora_alpha=64)
    with pytest.raises(InvalidAdapter, match=r"rank/alpha 16/64"):
        validate(path, policy.lora)


def test_validate_refuses_wrong_target_modules(tmp_path, make_adapter, policy):
    path = make_adapter(tmp_path / "v000001", lora_target_modules="q_proj,v_proj")
    with pytest.raises(InvalidAdapter, match=r"target modules \['q_proj', 'v_proj'\] do not match"):
        validate(path, policy.lora)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_validate_refuses_non_finite_weights(published, policy, value):
    corrupt_weights(published / "v000001", with_value(value))
    with pytest.raises(InvalidAdapter, match="NaN or infinite"):
        validate(published / "v000001", policy.lora)


def test_validate_refuses_unreadable_weights(published, policy):
    (published / "v000001" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InvalidAdapter, match="adapter weights unreadable"):
        validate(published / "v000001", policy.lora)


def test_validate_refuses_a_corrupt_manifest(published, policy):
    (published / "v000001" / "manifest.json").write_text("{half")
    with pytest.raises(InvalidAdapter, match="unreadable config or manifest"):
        validate(published / "v000001", policy.lora)


# -- activate (hot-swap through the engine) ------------------------------------------------------


def test_activate_returns_the_old_version_and_switches(engine, policy, published):
    assert activate(engine, published, "v000001") == BASE_VERSION
    assert policy.current == "v000001"
    assert set(policy.loaded) == {"v000001"}


def test_replies_after_activate_record_the_new_version(engine, published, drain):
    activate(engine, published, "v000001")
    stream = engine.submit(QUESTION, greedy(6))
    drain(stream)
    assert stream.reply.adapter_version == "v000001"


def test_replies_after_activate_use_the_new_weights(engine, policy, published, trained_peft, hf_greedy, drain):
    activate(engine, published, "v000001")
    stream = engine.submit(QUESTION, greedy(16))
    drain(stream)
    assert stream.reply.text == hf_greedy(trained_peft(seed=1), policy.tokenizer, QUESTION, 16)


def test_in_flight_reply_finishes_on_the_version_it_started_with(
    engine, policy, published, trained_peft, tiny_reference, hf_greedy, drain
):
    # Park the engine inside its 5th forward call (the old reply is 4 tokens in), queue
    # the swap, then let go: the swap runs before the 6th call, while the reply is running.
    inner, calls = engine._forward, []
    reached, go = threading.Event(), threading.Event()

    def forward(*args):
        calls.append((policy.current, list(args[-1])))  # (current version, versions of the rows)
        if len(calls) == 5:
            reached.set()
            go.wait(HANG_GUARD_S)
        return inner(*args)

    engine._forward = forward
    old = engine.submit(QUESTION, greedy(40))
    try:
        assert reached.wait(HANG_GUARD_S)
        swapper, result = activate_in_background(engine, published, "v000001")
    finally:
        go.set()
    swapper.join(HANG_GUARD_S)
    assert result["old"] == BASE_VERSION
    new = engine.submit(QUESTION, greedy(40))
    drain(old), drain(new)

    assert calls[4][0] == BASE_VERSION and calls[5][0] == "v000001"  # swapped between calls 5 and 6
    assert any(BASE_VERSION in versions for _, versions in calls[5:])  # the old reply kept going on base
    assert old.reply.adapter_version == BASE_VERSION
    assert old.reply.text == hf_greedy(tiny_reference, policy.tokenizer, QUESTION, 40)
    assert new.reply.adapter_version == "v000001"
    assert new.reply.text == hf_greedy(trained_peft(seed=1), policy.tokenizer, QUESTION, 40)


def test_activate_keeps_an_adapter_that_a_queued_reply_uses(
    engine, policy, published, trained_peft, hf_greedy, stall, drain
):
    activate(engine, published, "v000001")
    release = stall(engine)
    pinned = engine.submit(QUESTION, greedy(12))  # queued on v000001 while the engine is parked
    swapper, _ = activate_in_background(engine, published, "v000002")
    release()
    swapper.join(HANG_GUARD_S)
    assert policy.current == "v000002"
    assert "v000001" in policy.loaded
    drain(pinned)
    assert pinned.reply.adapter_version == "v000001"
    assert pinned.reply.text == hf_greedy(trained_peft(seed=1), policy.tokenizer, QUESTION, 12)


def test_reply_pinned_just_before_a_swap_keeps_its_adapter(engine, policy, published, trained_peft, hf_greedy, drain):
    activate(engine, published, "v000001")
    put = engine._waiting.put

    swapper = threading.Thread(target=activate, args=(engine, published, "v000002"))

    def swap_then_put(stream):  # a swap starts in the window between pinning and queueing
        swapper.start()
        time.sleep(0.3)  # let the swap reach the engine thread; it must wait for the queueing
        put(stream)

    engine._waiting.put = swap_then_put
    stream = engine.submit(QUESTION, greedy(8))
    engine._waiting.put = put
    swapper.join(HANG_GUARD_S)
    assert policy.current == "v000002"
    assert stream.version == "v000001"
    drain(stream)
    assert stream.reply.text == hf_greedy(trained_peft(seed=1), policy.tokenizer, QUESTION, 8)


def test_activate_unloads_an_adapter_no_reply_uses(engine, policy, published):
    activate(engine, published, "v000001")
    activate(engine, published, "v000002")
    engine.call(lambda p: None).result()  # the engine releases swapped-out adapters between steps
    assert set(policy.loaded) == {"v000002"}
    assert "v000001" not in policy.model.peft_config


def test_activate_refuses_an_invalid_adapter_and_keeps_serving(engine, policy, published, drain):
    activate(engine, published, "v000001")
    corrupt_weights(published / "v000002", with_value(float("nan")))
    with pytest.raises(InvalidAdapter, match="v000002: tensor .* NaN"):
        activate(engine, published, "v000002")
    assert policy.current == "v000001"
    assert set(policy.loaded) == {"v000001"}
    stream = engine.submit(QUESTION, greedy(4))
    drain(stream)
    assert stream.reply.adapter_version == "v000001"


def test_activate_refuses_an_unpublished_version(engine, policy, published):
    with pytest.raises(InvalidAdapter, match="missing"):
        activate(engine, published, "v000009")
    assert policy.current == BASE_VERSION
    assert policy.loaded == {}


def test_rollback_to_base_serves_the_base_model(engine, policy, published, tiny_reference, hf_greedy, drain):
    activate(engine, published, "v000001")
    assert activate(engine, published, BASE_VERSION) == "v000001"
    assert policy.current == BASE_VERSION
    engine.call(lambda p: None).result()  # swapped-out adapters are released between steps
    assert policy.loaded == {}
    stream = engine.submit(QUESTION, greedy(16))
    drain(stream)
    assert stream.reply.adapter_version == BASE_VERSION
    assert stream.reply.text == hf_greedy(tiny_reference, policy.tokenizer, QUESTION, 16)


def test_rollback_to_an_older_version(engine, policy, published, trained_peft, hf_greedy, drain):
    activate(engine, published, "v000002")
    assert activate(engine, published, "v000001") == "v000002"
    stream = engine.submit(QUESTION, greedy(16))
    drain(stream)
    assert stream.reply.adapter_version == "v000001"
    assert stream.reply.text == hf_greedy(trained_peft(seed=1), policy.tokenizer, QUESTION, 16)


# -- the watcher, promotion and rollback ----------------------------------------------------


def break_adapter(path, how: str) -> None:
    if how == "nan":
        corrupt_weights(path, with_value(float("nan")))
    elif how == "missing file":
        (path / "adapter_model.safetensors").unlink()
    elif how == "wrong rank":
        import json

        cfg = json.loads((path / "adapter_config.json").read_text())
        cfg["r"] = 4
        (path / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("how, why", [("nan", "NaN"), ("wrong rank", "rank/alpha 4/"), ("missing file", "missing adapter_model.safetensors")])
def test_watcher_refuses_a_bad_promoted_adapter_with_a_log_line_and_keeps_serving(engine, policy, published, drain, caplog, how, why):
    watcher = adapters_mod.CurrentWatcher(engine, published)
    adapters_mod.set_current(published, "v000001")
    assert watcher.poll() == "v000001"
    break_adapter(published / "v000002", how)
    adapters_mod.set_current(published, "v000002")

    with caplog.at_level("ERROR", logger="assistant.adapters"):
        assert watcher.poll() == "v000001"
        assert watcher.poll() == "v000001"
    refusals = [r.getMessage() for r in caplog.records if "refusing" in r.getMessage()]
    assert len(refusals) == 1 and why in refusals[0] and "v000001 keeps serving" in refusals[0]
    stream = engine.submit(QUESTION, greedy(4))
    drain(stream)
    assert stream.reply.adapter_version == "v000001"


def test_watcher_follows_a_new_pointer_after_refusing_one(engine, published, trained_peft):
    watcher = adapters_mod.CurrentWatcher(engine, published)
    break_adapter(published / "v000002", "nan")
    adapters_mod.set_current(published, "v000002")
    assert watcher.poll() == BASE_VERSION
    publish(published, trained_peft(seed=3), "default", dict(MANIFEST), make_current=True)
    assert watcher.poll() == "v000003"


def test_watcher_survives_a_garbled_pointer(engine, published, caplog):
    watcher = adapters_mod.CurrentWatcher(engine, published)
    (published / "CURRENT").write_text("../../etc\n")
    with caplog.at_level("ERROR", logger="assistant.adapters"):
        assert watcher.poll() == BASE_VERSION
    assert "not a version name" in caplog.text


def test_watcher_thread_swaps_within_its_interval(engine, published):
    watcher = adapters_mod.CurrentWatcher(engine, published, interval=0.05).start()
    try:
        adapters_mod.promote(published, "v000002")
        deadline = time.monotonic() + 10
        while engine.policy.current != "v000002":
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        watcher.stop()


def test_promote_then_rollback_moves_statuses_and_the_pointer(published):
    adapters_mod.promote(published, "v000001")
    adapters_mod.update_manifest(published, "v000002", parent="v000001")
    assert adapters_mod.promote(published, "v000002") == "v000001"
    status = lambda v: adapters_mod.read_manifest(published, v)["status"]  # noqa: E731
    assert (status("v000001"), status("v000002")) == ("retired", "active")

    assert adapters_mod.rollback(published) == ("v000002", "v000001")  # default: the parent
    assert adapters_mod.read_current(published) == "v000001"
    assert (status("v000001"), status("v000002")) == ("active", "retired")
    history = adapters_mod.read_manifest(published, "v000002")["history"]
    assert [h["status"] for h in history] == ["active", "retired"] and "rolled back to v000001" in history[-1]["reason"]
    assert adapters_mod.rollback(published, BASE_VERSION) == ("v000001", BASE_VERSION)


def test_rollback_refuses_versions_never_served_and_broken_ones(published, policy):
    adapters_mod.promote(published, "v000001")
    with pytest.raises(InvalidAdapter, match="v000002 is candidate"):
        adapters_mod.rollback(published, "v000002")
    adapters_mod.reject(published, "v000002", ["margin too small"])
    with pytest.raises(InvalidAdapter, match="v000002 is rejected"):
        adapters_mod.rollback(published, "v000002")
    with pytest.raises(InvalidAdapter, match="already serving"):
        adapters_mod.rollback(published, "v000001")
    adapters_mod.rollback(published, BASE_VERSION)
    corrupt_weights(published / "v000001", with_value(float("inf")))
    with pytest.raises(InvalidAdapter, match="infinite"):
        adapters_mod.rollback(published, "v000001", lora=policy.lora)
    assert adapters_mod.read_current(published) == BASE_VERSION


def test_rollback_cli_prints_the_change(published, capsys):
    from trainer.__main__ import main

    adapters_mod.promote(published, "v000001")
    assert main(["rollback", "base", "--adapters-dir", str(published)]) == 0
    assert "CURRENT: v000001 -> base" in capsys.readouterr().out
    assert main(["rollback", "v000002", "--adapters-dir", str(published)]) == 2
    assert "v000002 is candidate" in capsys.readouterr().err


# -- version names: every writer refuses what readers refuse ---------------------------------


BAD_NAMES = ["v000001/", "../v000001", "v1", "V000001", "v0000001", "", "base/"]


def writers(published):
    """Every function that writes a version name to disk, as name -> call(version)."""
    return {
        "set_current": lambda v: set_current(published, v),
        "set_live": lambda v: adapters_mod.set_live(published, v),
        "rollback": lambda v: adapters_mod.rollback(published, v),
        "update_manifest": lambda v: adapters_mod.update_manifest(published, v, note="x"),
        "update_manifest parent": lambda v: adapters_mod.update_manifest(published, "v000001", parent=v),
    }


@pytest.mark.parametrize("writer", ["set_current", "set_live", "rollback", "update_manifest", "update_manifest parent"])
@pytest.mark.parametrize("name", BAD_NAMES)
def test_writers_refuse_a_name_that_is_not_a_version(published, writer, name):
    adapters_mod.promote(published, "v000002")
    adapters_mod.update_manifest(published, "v000001", status="retired")
    before = {p.name: p.read_bytes() for p in published.rglob("*") if p.is_file()}
    with pytest.raises(InvalidAdapter, match="is not a version name"):
        writers(published)[writer](name)
    assert {p.name: p.read_bytes() for p in published.rglob("*") if p.is_file()} == before
    assert read_current(published) == "v000002"


def test_live_pointer_refuses_base(published):
    with pytest.raises(InvalidAdapter, match="'v' \\+ 6 digits"):
        adapters_mod.set_live(published, BASE_VERSION)


def test_publish_refuses_a_parent_that_is_not_a_version(adapters_dir, trained_peft):
    with pytest.raises(InvalidAdapter, match="'v000001/' is not a version name"):
        publish(adapters_dir, trained_peft(), "default", {**MANIFEST, "parent": "v000001/"})
    assert versions(adapters_dir) == []


@pytest.mark.parametrize("content", [b"v000001/\n", b"\xff\xfe garbage \x00", b"", b"x" * 500])
def test_readers_refuse_a_garbled_pointer_without_crashing(adapters_dir, content):
    adapters_dir.mkdir()
    for name, read in ((POINTER, read_current), ("LIVE", adapters_mod.read_live)):
        (adapters_dir / name).write_bytes(content)
        with pytest.raises(InvalidAdapter, match="not a version name") as caught:
            read(adapters_dir)
        assert len(str(caught.value)) < 300  # a long garbled file is shown shortened


# -- rollback repairs a bad CURRENT ------------------------------------------------------------


def served_twice(published):
    """v000001 then v000002 served (v000002's parent is v000001): v000002 active, v000001 retired."""
    adapters_mod.promote(published, "v000001")
    adapters_mod.update_manifest(published, "v000002", parent="v000001")
    adapters_mod.promote(published, "v000002")


@pytest.mark.parametrize("garbled", ["../../etc\n", "v000002/\n"])
def test_rollback_to_a_named_version_repairs_a_garbled_current(published, policy, garbled, caplog):
    served_twice(published)
    (published / POINTER).write_text(garbled)
    with caplog.at_level("WARNING", logger="assistant.adapters"):
        assert adapters_mod.rollback(published, "v000001", lora=policy.lora) == (None, "v000001")
    assert read_current(published) == "v000001"
    assert "not a version name" in caplog.text
    status = lambda v: read_manifest(published, v)["status"]  # noqa: E731
    assert (status("v000001"), status("v000002")) == ("active", "retired")  # the old active one, whatever CURRENT said
    assert "unreadable CURRENT" in read_manifest(published, "v000001")["history"][-1]["reason"]


def test_rollback_to_base_repairs_a_garbled_current(published):
    served_twice(published)
    (published / POINTER).write_text("garbage")
    assert adapters_mod.rollback(published, BASE_VERSION) == (None, BASE_VERSION)
    assert read_current(published) == BASE_VERSION


def test_rollback_without_a_version_says_what_to_pass_when_current_is_garbled(published):
    served_twice(published)
    (published / POINTER).write_text("garbage")
    with pytest.raises(InvalidAdapter, match=r"holds 'garbage'.*name the version to serve, one of: base, v000002, v000001"):
        adapters_mod.rollback(published)
    assert (published / POINTER).read_text() == "garbage"


def test_rollback_repairs_a_current_that_names_a_missing_version(published):
    served_twice(published)
    (published / POINTER).write_text("v000009\n")
    with pytest.raises(InvalidAdapter, match=r"CURRENT points at v000009, which is not under .*one of: base, v000002, v000001"):
        adapters_mod.rollback(published)
    assert adapters_mod.rollback(published, "v000002") == ("v000009", "v000002")
    assert read_current(published) == "v000002"
    status = lambda v: read_manifest(published, v)["status"]  # noqa: E731
    assert (status("v000001"), status("v000002")) == ("retired", "active")


def test_rollback_refuses_a_target_whose_manifest_is_broken(published):
    served_twice(published)
    (published / "v000001" / "manifest.json").write_text("{half")
    with pytest.raises(InvalidAdapter, match="v000001: manifest unreadable"):
        adapters_mod.rollback(published, "v000001")
    assert read_current(published) == "v000002"


# -- the watcher refuses any failure to load, once ----------------------------------------------


def shape_mismatch(path) -> None:
    """Weights that pass the quick checks (files, config, finite) but that peft cannot load:
    the first lora_A tensor has half the rank its config says."""
    file = path / "adapter_model.safetensors"
    tensors = load_file(str(file))
    name = next(n for n in sorted(tensors) if "lora_A" in n)
    tensors[name] = tensors[name][: tensors[name].shape[0] // 2].contiguous()
    save_file(tensors, str(file))


def counting_loads(policy, fail: Exception | None = None) -> list[str]:
    """Record every policy.load_adapter call (and raise `fail` from it, when given)."""
    calls, inner = [], policy.load_adapter

    def load(version, path):
        calls.append(version)
        if fail is not None:
            raise fail
        inner(version, path)

    policy.load_adapter = load
    return calls


def test_a_shape_mismatch_passes_validation(published, policy):
    shape_mismatch(published / "v000002")
    validate(published / "v000002", policy.lora)  # so only loading it can tell


@pytest.mark.parametrize("fail", [None, RuntimeError("peft: size mismatch"), OSError("disk read error")],
                         ids=["peft shape mismatch", "RuntimeError", "OSError"])
def test_watcher_refuses_an_adapter_that_fails_to_load_once_and_keeps_serving(engine, policy, published, drain, caplog, fail):
    watcher = adapters_mod.CurrentWatcher(engine, published)
    set_current(published, "v000001")
    assert watcher.poll() == "v000001"
    shape_mismatch(published / "v000002")
    calls = counting_loads(policy, fail)
    set_current(published, "v000002")

    with caplog.at_level("ERROR", logger="assistant.adapters"):
        assert watcher.poll() == "v000001"
        assert watcher.poll() == "v000001"
        assert watcher.poll() == "v000001"
    assert calls == ["v000002"]  # tried once, not again on every poll
    refusals = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(refusals) == 1 and "refusing adapter pointer v000002: loading failed" in refusals[0]
    assert "v000001 keeps serving" in refusals[0] and "\n" not in refusals[0]
    assert set(policy.loaded) == {"v000001"} and "v000002" not in policy.model.peft_config  # nothing half-loaded stays
    stream = engine.submit(QUESTION, greedy(4))
    drain(stream)
    assert stream.reply.adapter_version == "v000001"


@pytest.mark.parametrize("fail", [None, RuntimeError("peft: size mismatch")], ids=["peft shape mismatch", "RuntimeError"])
def test_watcher_refuses_a_live_candidate_that_fails_to_load_once(engine, policy, published, caplog, fail):
    watcher = adapters_mod.CurrentWatcher(engine, published)
    set_current(published, "v000001")
    assert watcher.poll() == "v000001"
    shape_mismatch(published / "v000002")
    calls = counting_loads(policy, fail)
    adapters_mod.set_live(published, "v000002")

    with caplog.at_level("ERROR", logger="assistant.adapters"):
        assert watcher.poll() == "v000001"
        assert watcher.poll() == "v000001"
    assert calls == ["v000002"]
    refusals = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(refusals) == 1 and "refusing adapter pointer v000002: loading failed" in refusals[0]
    assert watcher.live is None and set(policy.loaded) == {"v000001"}


def test_watcher_drops_the_old_live_candidate_when_the_new_one_fails_to_load(engine, policy, published, trained_peft):
    publish(published, trained_peft(seed=3), "default", dict(MANIFEST))
    watcher = adapters_mod.CurrentWatcher(engine, published)
    set_current(published, "v000001")
    adapters_mod.set_live(published, "v000002")
    watcher.poll()
    assert watcher.live == "v000002" and set(policy.loaded) == {"v000001", "v000002"}
    shape_mismatch(published / "v000003")
    adapters_mod.set_live(published, "v000003")
    watcher.poll()
    engine.call(lambda p: None).result()  # swapped-out adapters are released between steps
    assert watcher.live is None and set(policy.loaded) == {"v000001"}
    assert "v000003" in watcher.refused


def test_rollback_without_a_version_refuses_a_parent_that_is_not_a_version(published):
    import json

    served_twice(published)
    manifest = read_manifest(published, "v000002")
    (published / "v000002" / "manifest.json").write_text(json.dumps({**manifest, "parent": "v000001/"}))  # written by hand
    with pytest.raises(InvalidAdapter, match=r"v000002: no usable parent .*'v000001/' is not a version name.*one of: base"):
        adapters_mod.rollback(published)
    assert read_current(published) == "v000002"


# -- pruning old versions --------------------------------------------------------------------


def lineage(adapters_dir, parents: dict[str, str]) -> None:
    """Version directories (a manifest each is all pruning reads) with the given parents."""
    import json

    for version, parent in parents.items():
        (adapters_dir / version).mkdir(parents=True)
        (adapters_dir / version / "manifest.json").write_text(json.dumps({"version": version, "parent": parent, "status": "retired"}))


def test_prune_keeps_the_newest_what_serves_the_live_candidate_and_their_ancestors(adapters_dir):
    lineage(adapters_dir, {"v000001": "base", "v000002": "v000001", "v000003": "v000002", "v000004": "v000003",
                           "v000005": "v000003", "v000006": "base", "v000007": "v000004", "v000008": "v000003"})
    set_current(adapters_dir, "v000003")
    adapters_mod.set_live(adapters_dir, "v000007")

    assert adapters_mod.in_use(adapters_dir) == {"v000003": "CURRENT", "v000002": "ancestor of CURRENT", "v000001": "ancestor of CURRENT",
                                                 "v000007": "LIVE", "v000004": "ancestor of LIVE"}
    assert adapters_mod.prune(adapters_dir, keep=1, dry_run=True) == ["v000005", "v000006"]
    assert versions(adapters_dir) == [f"v00000{i}" for i in range(1, 9)]  # a dry run deletes nothing

    assert adapters_mod.prune(adapters_dir, keep=1) == ["v000005", "v000006"]
    assert versions(adapters_dir) == ["v000001", "v000002", "v000003", "v000004", "v000007", "v000008"]
    assert sorted(p.name for p in adapters_dir.iterdir() if p.name.startswith(".v")) == []  # nothing set aside is left
    assert adapters_mod.prune(adapters_dir, keep=1) == []
    assert adapters_mod.rollback(adapters_dir) == ("v000003", "v000002")  # the rollback chain is intact


def test_prune_keeps_the_newest_n(adapters_dir):
    lineage(adapters_dir, {f"v00000{i}": "base" for i in range(1, 6)})
    set_current(adapters_dir, "v000001")
    assert adapters_mod.prune(adapters_dir, keep=2) == ["v000002", "v000003"]
    assert versions(adapters_dir) == ["v000001", "v000004", "v000005"]
    with pytest.raises(ValueError, match="at least 1"):
        adapters_mod.prune(adapters_dir, keep=0)


@pytest.mark.parametrize("pointer, content, why", [
    ("CURRENT", "../../etc\n", "not a version name"),
    ("CURRENT", "v000009\n", "CURRENT points at v000009, which is not under"),
    ("LIVE", "garbage\n", "not a version name"),
])
def test_prune_deletes_nothing_when_what_is_in_use_is_unknown(adapters_dir, pointer, content, why):
    lineage(adapters_dir, {f"v00000{i}": "base" for i in range(1, 5)})
    (adapters_dir / pointer).write_text(content)
    with pytest.raises(InvalidAdapter, match=why):
        adapters_mod.prune(adapters_dir, keep=1)
    assert versions(adapters_dir) == ["v000001", "v000002", "v000003", "v000004"]


def test_prune_deletes_nothing_when_an_ancestors_manifest_is_unreadable(adapters_dir):
    lineage(adapters_dir, {"v000001": "base", "v000002": "v000001", "v000003": "v000002", "v000004": "base"})
    set_current(adapters_dir, "v000003")
    (adapters_dir / "v000002" / "manifest.json").write_text("{torn")
    with pytest.raises(InvalidAdapter, match="v000002: manifest unreadable"):
        adapters_mod.prune(adapters_dir, keep=1)
    assert len(versions(adapters_dir)) == 4


def test_a_crash_while_deleting_never_leaves_a_partial_directory_under_a_version_name(adapters_dir, monkeypatch):
    lineage(adapters_dir, {"v000001": "base", "v000002": "base", "v000003": "base"})
    for v in ("v000001", "v000002"):
        (adapters_dir / v / "adapter_model.safetensors").write_bytes(b"x" * 100)
    set_current(adapters_dir, "v000003")

    def crash(path, ignore_errors=False):  # the process dies after deleting one file
        next(p for p in sorted(path.iterdir())).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(adapters_mod.shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        adapters_mod.prune(adapters_dir, keep=1)
    assert versions(adapters_dir) == ["v000003"]  # both were set aside before any file was deleted
    left = sorted(p.name for p in adapters_dir.iterdir() if p.name.startswith("."))
    assert [n.split(".pruned-")[0] for n in left if ".pruned-" in n] == [".v000001", ".v000002"]
    assert all(adapters_mod.read_manifest(adapters_dir, v) for v in versions(adapters_dir))


def test_promote_refuses_when_current_moved_since_the_evaluation(published):
    adapters_mod.promote(published, "v000001")
    with pytest.raises(InvalidAdapter, match="evaluated against base, but CURRENT now points at v000001"):
        adapters_mod.promote(published, "v000002", expect_current=BASE_VERSION)
    assert read_current(published) == "v000001" and read_manifest(published, "v000002")["status"] == "candidate"
    assert adapters_mod.promote(published, "v000002", expect_current="v000001") == "v000001"
    assert read_current(published) == "v000002"


def test_the_gates_judged_pairs_are_written_beside_a_version_and_read_back(published):
    from assistant.adapters import EVALUATION_FILE, read_evaluation, write_evaluation

    assert read_evaluation(published, "v000001") == []  # never evaluated
    rows = [{"prompt": "Say hi", "candidate": "Hi 👋", "current": "Hello there.", "candidate_score": 0.5, "current_score": -0.25},
            {"prompt": "Line\nbreaks", "candidate": "a\nb", "current": "", "candidate_score": 0.0, "current_score": 1.0}]
    path = write_evaluation(published, "v000001", rows)
    assert path == published / "v000001" / EVALUATION_FILE and len(path.read_text().splitlines()) == 2
    assert read_evaluation(published, "v000001") == rows
    write_evaluation(published, "v000001", rows[:1])  # a second evaluation replaces the first
    assert read_evaluation(published, "v000001") == rows[:1]
    assert not [p for p in (published / "v000001").iterdir() if p.name.startswith(".")]  # no temporary left behind
    with pytest.raises(InvalidAdapter):
        write_evaluation(published, "../v000001", rows)
