"""Tests for assistant/dashboard.py: the queries on a real feedback store, the views of the
trainer's files, the admin guard (login backoff, session expiry, the password kept off
the command line by app.py), rollback through the handler on a real engine, gold items,
the annotators view and the breakdown by profile group.

Feedback is written through FeedbackStore's own methods; adapters are real tiny ones
published with assistant.adapters.publish. No browser (see test_browser.py for that).
Run: python -m pytest tests/test_dashboard.py -q
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import gradio as gr
import pandas as pd
import pytest

from assistant import adapters, annotators, dashboard
from assistant.adapters import CurrentWatcher, promote, publish, read_current, reject
from assistant.config import ServeArgs
from assistant.feedback import FeedbackStore
from assistant.ui import Deps, build_demo
from assistant.cycles import CycleLock

PASSWORD = "correct horse"
CTX = [{"role": "user", "content": "What is 2+2?"}]


def add_reply(store: FeedbackStore, conversation_id: str, version: str, source: str = "chat") -> int:
    return store.add_reply(
        conversation_id=conversation_id, context=CTX, text=f"a reply by {version}", params={}, model="tiny",
        adapter_version=version, prompt_tokens=3, completion_tokens=4, latency_ms=5.0, ttft_ms=1.0,
        finish_reason="stop", source=source,
    )


@pytest.fixture
def store(tmp_path):
    s = FeedbackStore(tmp_path / "feedback.db")
    yield s
    s.close()


@pytest.fixture
def filled(store):
    """A store with replies of base and v000001 and every kind of feedback on them."""
    ada, bob = store.ensure_user("ada"), store.ensure_user("bob")
    cid = store.new_conversation(ada)
    base1, base2 = add_reply(store, cid, "base"), add_reply(store, cid, "base")
    new1, new2 = add_reply(store, cid, "v000001"), add_reply(store, cid, "v000001")
    store.set_vote(base1, ada, 1)
    store.set_vote(base1, bob, -1)
    store.set_vote(base2, ada, 1)
    store.set_vote(new1, ada, 1)
    store.set_vote(new2, ada, 1)
    store.set_vote(new2, bob, 1)
    store.set_vote(new2, bob, 0)  # removed: counts nowhere
    store.add_comparison(base1, new1, "b", ada)  # v000001 wins
    store.add_comparison(new2, base2, "a", bob)  # v000001 wins
    store.add_comparison(base2, new1, "a", bob)  # base wins
    store.add_comparison(base1, new2, "tie", ada)  # not decisive
    store.add_comparison(new1, new2, "a", ada)  # same version: says nothing about it
    store.add_correction(base1, "Four.", ada)
    store.add_ranking([new1, base1, new2], bob)
    store.import_pair(CTX, "4", "5", "pairs.jsonl")
    return store


def con(store):
    return store.db().conn


# -- feedback queries -------------------------------------------------------------------


def test_feedback_events_count_each_kind_and_keep_imports_apart(filled):
    kinds = dashboard.feedback_events(con(filled))["kind"].value_counts().to_dict()
    assert kinds == {"votes": 5, "comparisons": 5, "corrections": 1, "rankings": 1, "imported": 1}


def test_feedback_over_time_is_hourly_for_recent_feedback(filled):
    df = dashboard.feedback_over_time(dashboard.feedback_events(con(filled)))
    assert df.attrs["bucket"] == "hour"
    assert list(df.columns) == ["time", "kind", "count"]
    assert df.groupby("kind")["count"].sum().to_dict() == {"comparisons": 5, "corrections": 1, "imported": 1, "rankings": 1, "votes": 5}


def test_feedback_over_time_is_daily_over_long_spans_and_fills_quiet_days():
    events = pd.DataFrame({
        "at": pd.to_datetime(["2025-03-01T10:00:00+00:00", "2025-03-01T23:00:00+00:00", "2025-03-04T08:00:00+00:00"], utc=True),
        "kind": ["votes", "votes", "corrections"],
    })
    df = dashboard.feedback_over_time(events)
    assert df.attrs["bucket"] == "day"
    votes = df[df["kind"] == "votes"].set_index("time")["count"].to_dict()
    assert votes == {"2025-03-01": 2, "2025-03-02": 0, "2025-03-03": 0, "2025-03-04": 0}
    assert df[df["kind"] == "corrections"].set_index("time")["count"].to_dict()["2025-03-04"] == 1


def test_feedback_by_version_counts_feedback_on_each_versions_replies(filled):
    df = dashboard.feedback_by_version(con(filled))
    got = {(r.version, r.kind): r.count for r in df.itertuples()}
    assert got == {
        ("base", "votes"): 3, ("v000001", "votes"): 2,
        ("base", "comparisons"): 4, ("v000001", "comparisons"): 5,  # a comparison counts once per version in it
        ("base", "corrections"): 1,
        ("base", "rankings"): 1, ("v000001", "rankings"): 1,
    }
    assert "import" not in set(df["version"])


def test_thumbs_up_rate_per_version(filled):
    df = dashboard.thumbs_up_rate(con(filled)).set_index("version")
    assert df.loc["base", ["up", "down"]].tolist() == [2, 1]
    assert df.loc["base", "up_rate"] == pytest.approx(2 / 3)
    assert df.loc["v000001", "up_rate"] == 1.0  # bob's removed vote does not count
    assert "import" not in df.index


def test_win_rate_counts_decisive_choices_between_different_versions(filled):
    df = dashboard.win_rate(con(filled)).set_index("version")
    assert df.loc["v000001", ["wins", "decisive"]].tolist() == [2, 3]
    assert df.loc["base", ["wins", "decisive"]].tolist() == [1, 3]
    assert df.loc["v000001", "win_rate"] == pytest.approx(2 / 3)
    assert set(df.index) == {"base", "v000001"}  # the imported pair is one 'version' against itself


def test_empty_store_gives_empty_frames_that_plots_accept(store):
    frames = dashboard.read_feedback(store.path)
    assert all(df.empty for df in frames.values())
    assert frames["over_time"].attrs["bucket"] == "hour"
    plot = gr.BarPlot(x="version", y="up_rate")
    for df in frames.values():
        assert plot.postprocess(df).data == []


def test_read_feedback_opens_the_database_read_only(filled, monkeypatch):
    opened = []
    real = dashboard.FeedbackStore

    def spy(path, *args, **kwargs):
        opened.append(kwargs.get("readonly"))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(dashboard, "FeedbackStore", spy)
    assert not dashboard.read_feedback(filled.path)["thumbs_up"].empty
    assert opened == [True]


# -- the trainer's files -----------------------------------------------------------------


def write_reward_manifest(reward_dir: Path, version: str, **metrics) -> None:
    (reward_dir / version).mkdir(parents=True)
    manifest = {"version": version, "created_at": "2025-03-01T10:00:00Z", "metrics": metrics}
    (reward_dir / version / "manifest.json").write_text(json.dumps(manifest))


def test_reward_accuracy_per_reward_model_version(tmp_path):
    write_reward_manifest(tmp_path, "r000001", val_accuracy=0.6, val_accuracy_lo=0.5, val_accuracy_hi=0.7, train_accuracy=0.8, val_pairs=90)
    write_reward_manifest(tmp_path, "r000002", val_accuracy=None, train_accuracy=0.9)  # no validation pairs
    acc = dashboard.reward_accuracy(tmp_path)
    assert acc["reward model"].tolist() == ["r000001", "r000002"]
    assert acc.loc[0, ["val_accuracy", "ci_low", "ci_high", "train_accuracy"]].tolist() == [0.6, 0.5, 0.7, 0.8]
    lines = dashboard.reward_accuracy_lines(acc)
    assert set(lines["series"]) == {"validation", "95% CI low", "95% CI high", "training"}
    assert lines[lines["reward model"] == "r000002"]["series"].tolist() == ["training"]  # missing values are left out


def test_reward_accuracy_of_no_reward_models_is_empty(tmp_path):
    assert dashboard.reward_accuracy(tmp_path / "missing").empty
    assert dashboard.reward_accuracy_lines(dashboard.reward_accuracy(tmp_path / "missing")).empty


def test_ppo_curve_has_one_line_per_run():
    manifests = [
        {"version": "v000001", "metrics": [{"iteration": 1, "objective/scores": 0.1, "objective/kl": 0.0},
                                           {"iteration": 2, "objective/scores": 0.3, "objective/kl": 0.2}]},
        {"version": "v000002", "metrics": [{"iteration": 1, "objective/scores": 0.4}]},
        {"version": "v000003", "metrics": {}},  # not a PPO run
        {"version": "v000004", "status": "broken"},
    ]
    scores = dashboard.ppo_curve(manifests, "objective/scores")
    assert scores.values.tolist() == [["v000001", 1, 0.1], ["v000001", 2, 0.3], ["v000002", 1, 0.4]]
    assert dashboard.ppo_curve(manifests, "objective/kl")["version"].tolist() == ["v000001", "v000001"]
    assert dashboard.ppo_curve([], "objective/kl").empty


@pytest.fixture
def lineage(tmp_path, trained_peft):
    """adapters/: v000001 (from base, retired), v000002 (from v000001, active and CURRENT),
    v000003 (from v000002, rejected)."""
    d = tmp_path / "adapters"
    metrics = [{"iteration": 1, "objective/scores": 0.2, "objective/kl": 0.01}]
    v1 = publish(d, trained_peft(seed=1), "default", {"parent": "base", "reward_model": "r000001", "metrics": metrics})
    v2 = publish(d, trained_peft(seed=2), "default", {"parent": v1, "reward_model": "r000002", "metrics": metrics,
                                                      "kind": "ppo", "policy_step": "ppo", "sft": {"rows": 7}})
    v3 = publish(d, trained_peft(seed=3), "default", {"parent": v2, "reward_model": "r000003", "metrics": metrics})
    promote(d, v1)
    promote(d, v2, evaluation={"margin": 0.25, "kl_parent": 1.5, "kl_base": 2.25, "kl_optimised": 0.75, "kl_optimised_total": 1.0,
                               "optimised_from": "sft", "degenerate": 0, "replies": 64, "win_rate": 0.7,
                               "win_rate_lo": 0.58, "win_rate_hi": 0.8, "human_agreement": {"share": 0.6, "lo": 0.45, "hi": 0.73, "n": 40}})
    reject(d, v3, ["judge win rate 0.50 (95% CI 0.38-0.62) over 64 held-out replies: the lower bound is not above 0.50"],
           evaluation={"margin": -0.1, "kl_parent": 0.5, "kl_base": 2.5, "degenerate": 0})
    return d


def test_versions_table_from_published_manifests(lineage):
    table = dashboard.versions_table(adapters.manifests(lineage), serving="v000002", live=None)
    assert table["version"].tolist() == ["v000003", "v000002", "v000001"]  # newest first
    rows = table.set_index("version")
    assert rows["status"].to_dict() == {"v000001": "retired", "v000002": "active", "v000003": "rejected"}
    assert rows["parent"].to_dict() == {"v000001": "base", "v000002": "v000001", "v000003": "v000002"}
    assert rows["reward model"]["v000002"] == "r000002"
    assert rows["policy step"].to_dict() == {"v000001": "", "v000002": "sft + ppo", "v000003": ""}  # v000001/3: manifests from before policy steps
    assert rows.loc["v000002", "rows used"] == "sft 7"
    dpo = {"kind": "dpo", "policy_step": "dpo", "rows": {"sft": 7, "dpo": 31}}
    assert (dashboard._step(dpo), dashboard._step({"policy_step": "sft", "rows": {"sft": 9}})) == ("sft + dpo", "sft")
    assert rows["serving"].to_dict() == {"v000001": "", "v000002": "serving", "v000003": ""}
    assert rows.loc["v000002", ["judge win rate", "human agreement", "KL to parent", "KL to base", "budgeted KL", "margin"]].tolist() == [
        "0.70 [0.58, 0.80] n=64", "0.60 [0.45, 0.73] n=40", "1.50", "2.25", "0.75 / 1.00", "+0.250"]
    assert rows.loc["v000003", "budgeted KL"] == ""  # gated before the lineage was counted
    assert rows.loc["v000003", "reasons"].startswith("judge win rate 0.50")
    kl = dashboard.kl_by_version(adapters.manifests(lineage))
    assert kl.to_dict("records") == [{"version": "v000002", "series": "to the parent (this cycle)", "kl": 1.5},
                                     {"version": "v000002", "series": "to the base (in total)", "kl": 2.25},
                                     {"version": "v000002", "series": "budgeted: this cycle's optimisation", "kl": 0.75},
                                     {"version": "v000002", "series": "budgeted: optimisation over the lineage", "kl": 1.0},
                                     {"version": "v000003", "series": "to the parent (this cycle)", "kl": 0.5},
                                     {"version": "v000003", "series": "to the base (in total)", "kl": 2.5}]
    assert rows.loc["v000001", "created"].endswith("Z")


def test_rollback_choices_are_versions_that_served_before_defaulting_to_the_parent(lineage):
    choices, default = dashboard.rollback_choices(adapters.manifests(lineage), "v000002")
    assert choices == ["base", "v000001"]  # not the serving one, never the rejected one
    assert default == "v000001"
    assert dashboard.rollback_choices([], "base") == ([], None)


def test_status_shows_serving_live_running_cycle_and_last_cycle(tmp_path):
    lock_file, log = tmp_path / "trainer.lock", tmp_path / "cycles.jsonl"
    assert dashboard.training_state(lock_file, log) == {"running": None, "last": None}
    log.write_text(json.dumps({"decision": "rejected", "version": "v000003", "started_at": "2025-03-01T10:00:00Z",
                               "reasons": ["KL to the base 9.00 over the budget 5.00"]}) + "\n")
    with CycleLock(lock_file) as lock:
        lock.phase("ppo")
        state = dashboard.training_state(lock_file, log)
    assert state["running"]["phase"] == "ppo"
    text = dashboard.status_markdown("v000002", "v000002", "v000004", state)
    assert "**Serving:** `v000002`" in text and "`v000004`" in text
    assert "running, phase `ppo`" in text
    assert "rejected `v000003`" in text and "over the budget" in text
    idle = dashboard.status_markdown("base", "v000009", None, dashboard.training_state(lock_file, log), {"v000009": "bad <b>rank</b>"})
    assert "none running" in idle and "refused: bad &lt;b&gt;rank&lt;/b&gt;" in idle


# -- the admin guard and the handlers -----------------------------------------------------


def serve_args(tmp_path: Path, adapters_dir: Path, password: str = PASSWORD) -> ServeArgs:
    return ServeArgs(db=str(tmp_path / "feedback.db"), adapters_dir=str(adapters_dir), reward_dir=str(tmp_path / "reward"),
                     lock_file=str(tmp_path / "trainer.lock"), cycles_log=str(tmp_path / "cycles.jsonl"),
                     admin_password=password)


@pytest.fixture
def deps(tmp_path, lineage, engine, store):
    """The server's dependencies on the lineage above, with a watcher that has swapped to CURRENT (v000002)."""
    watcher = CurrentWatcher(engine, lineage)
    assert watcher.poll() == "v000002"
    calls = []

    def retrain() -> str:
        calls.append(1)
        return "Started a training cycle (pid 1)."

    d = Deps(engine=engine, store=store, args=serve_args(tmp_path, lineage), model_name="tiny", watcher=watcher, retrain=retrain)
    d.retrain_calls = calls
    return d


@pytest.fixture
def admin(deps) -> dashboard.AdminSession:
    """A valid admin login, as `login` puts it in the session state."""
    session = dashboard.login(deps, PASSWORD)[0]
    assert isinstance(session, dashboard.AdminSession)
    return session


def values(out: tuple) -> dict:
    """The VIEW part of a handler's return value, by name."""
    return dict(zip(dashboard.VIEW, out[-len(dashboard.VIEW):]))


def test_password_matches_only_the_configured_password():
    assert dashboard.password_matches("s3cret", "s3cret")
    assert not dashboard.password_matches("s3cret", "s3cret ")
    assert not dashboard.password_matches("s3cret", None)
    assert not dashboard.password_matches("", "")  # no password configured: nobody gets in


def test_wrong_password_returns_nothing(deps):
    out = dashboard.login(deps, "wrong")
    admin, message, body = out[:3]
    assert admin is False and "Wrong password" in message and body["visible"] is False
    shown = values(out)
    assert shown["status"] == ""
    assert shown["rollback"]["choices"] == []
    assert not any(isinstance(v, pd.DataFrame) or isinstance(v, dict) and isinstance(v.get("value"), pd.DataFrame)
                   for v in shown.values())


def test_login_shows_the_dashboard(deps):
    out = dashboard.login(deps, PASSWORD)
    assert isinstance(out[0], dashboard.AdminSession) and out[2]["visible"] is True and out[3]["active"] is True
    assert out[0].expires_at == pytest.approx(time.monotonic() + 60 * deps.args.admin_session_minutes, abs=5)
    assert "for 60 minutes" in out[1]
    shown = values(out)
    assert "**Serving:** `v000002`" in shown["status"]
    assert shown["versions"].set_index("version").loc["v000002", "serving"] == "serving"
    assert shown["rollback"]["choices"] == ["base", "v000001"] and shown["rollback"]["value"] == "v000001"
    assert shown["plot_ppo_reward"]["value"]["version"].tolist() == ["v000001", "v000002", "v000003"]
    assert shown["plot_reward"]["caption"] == "No reward model trained yet."


HANDLERS = [(dashboard.refresh, ()), (dashboard.roll_back, ("v000001",)), (dashboard.retrain, ()),
            (dashboard.add_gold, ("Is water wet?", "Yes.", "No."))]


@pytest.mark.parametrize("handler, args", HANDLERS)
@pytest.mark.parametrize("admin", [False, None, "true", True])
def test_handlers_refuse_without_login(deps, handler, args, admin):
    with pytest.raises(gr.Error, match="Log in"):
        handler(deps, admin, *args)
    assert read_current(deps.args.adapters_dir) == "v000002"
    assert deps.engine.policy.current == "v000002"
    assert deps.retrain_calls == []
    assert deps.store.gold_items() == []


@pytest.mark.parametrize("handler, args", HANDLERS)
def test_handlers_refuse_once_the_admin_session_has_expired(deps, admin, handler, args):
    ended = dashboard.AdminSession(expires_at=time.monotonic() - 1, minutes=60)
    with pytest.raises(gr.Error, match="session has ended .*60 minutes.*log in again"):
        handler(deps, ended, *args)
    assert read_current(deps.args.adapters_dir) == "v000002" and deps.retrain_calls == [] and deps.store.gold_items() == []
    handler(deps, admin, *args)  # a valid one goes through


def test_the_auto_refresh_logs_out_when_the_session_expires(deps, admin):
    out = dashboard.tick(deps, admin)
    assert out[0] is admin and out[2]["visible"] is True and "**Serving:**" in values(out)["status"]
    out = dashboard.tick(deps, dashboard.AdminSession(expires_at=time.monotonic() - 1, minutes=5))
    assert out[0] is False and "ended" in out[1] and out[2]["visible"] is False and out[3]["active"] is False
    assert values(out)["status"] == "" and values(out)["annotators_table"]["value"] is None


def test_admin_sessions_last_the_configured_minutes(deps):
    deps.args.admin_session_minutes = 0.5
    session = dashboard.login(deps, PASSWORD)[0]
    assert session.expires_at - time.monotonic() == pytest.approx(30, abs=5)
    dashboard.require_admin(session, now=session.expires_at - 1)
    with pytest.raises(gr.Error, match="ended"):
        dashboard.require_admin(session, now=session.expires_at)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failed_logins_from_one_address_back_off_doubling_and_say_how_long(deps):
    clock = Clock()
    guard = dashboard.LoginGuard(clock)
    for _ in range(dashboard.FREE_FAILURES_PER_CLIENT):
        assert dashboard.login(deps, "wrong", "10.0.0.1", guard)[1] == "Wrong password."
    waits = []
    for _ in range(4):
        out = dashboard.login(deps, "wrong", "10.0.0.1", guard)
        assert out[0] is False and "Wrong password. Too many failed logins" in out[1]
        waits.append(guard.wait_s("10.0.0.1"))
        assert f"{int(waits[-1])} s" in out[1]
        refused = dashboard.login(deps, PASSWORD, "10.0.0.1", guard)  # during the wait even the right password is not checked
        assert refused[0] is False and refused[1].startswith("Too many failed logins. Wait")
        clock.now += waits[-1]
    assert waits == [1.0, 2.0, 4.0, 8.0]
    assert guard.wait_s("10.0.0.2") == 0  # another address may still try
    assert isinstance(dashboard.login(deps, PASSWORD, "10.0.0.1", guard)[0], dashboard.AdminSession)
    assert guard.wait_s("10.0.0.1") == 0  # a success clears the count
    assert dashboard.login(deps, "wrong", "10.0.0.1", guard)[1] == "Wrong password."


def test_failed_logins_from_many_addresses_back_off_overall_and_the_wait_is_capped(deps):
    clock = Clock()
    guard = dashboard.LoginGuard(clock)
    for i in range(dashboard.FREE_FAILURES_OVERALL):
        assert dashboard.login(deps, "wrong", f"10.0.1.{i}", guard)[1] == "Wrong password."
    assert "Too many failed logins" in dashboard.login(deps, "wrong", "10.0.2.1", guard)[1]
    assert guard.wait_s("10.0.3.3") == 1.0  # everyone waits now
    for _ in range(30):
        clock.now += guard.wait_s("x")
        guard.failed("x")
    assert guard.wait_s("x") == dashboard.BACKOFF_MAX_S
    assert "Wait 15 min" in dashboard.login(deps, PASSWORD, "10.0.9.9", guard)[1]


def test_roll_back_swaps_the_serving_version_at_once(deps, admin):
    out = dashboard.roll_back(deps, admin, "v000001")
    assert deps.engine.policy.current == "v000001"
    assert read_current(deps.args.adapters_dir) == "v000001"
    assert "now serving `v000001`" in out[0]
    shown = values(out)
    assert "**Serving:** `v000001`" in shown["status"]
    rows = shown["versions"].set_index("version")
    assert rows.loc["v000001", ["status", "serving"]].tolist() == ["active", "serving"]
    assert rows.loc["v000002", "status"] == "retired"
    assert shown["rollback"]["choices"] == ["base", "v000002"] and shown["rollback"]["value"] == "base"


def test_roll_back_without_a_choice_goes_to_the_parent(deps, admin):
    dashboard.roll_back(deps, admin, None)
    assert deps.engine.policy.current == "v000001"


def test_roll_back_to_a_rejected_version_is_refused(deps, admin):
    out = dashboard.roll_back(deps, admin, "v000003")
    assert "Rollback refused" in out[0] and "rejected" in out[0]
    assert deps.engine.policy.current == "v000002" and read_current(deps.args.adapters_dir) == "v000002"


def test_retrain_starts_a_cycle_or_says_it_cannot(deps, admin):
    assert dashboard.retrain(deps, admin)[0] == "Started a training cycle (pid 1)."
    assert deps.retrain_calls == [1]
    deps.retrain = None
    assert "not available" in dashboard.retrain(deps, admin)[0]


def test_refresh_survives_unreadable_parts(deps, admin):
    (Path(deps.args.adapters_dir) / "CURRENT").write_text("garbage\n")
    Path(deps.store.path).unlink()
    shown = values(dashboard.refresh(deps, admin))
    assert "Could not read" in shown["status"] and "CURRENT pointer" in shown["status"] and "feedback database" in shown["status"]
    assert shown["plot_time"]["value"] is None
    assert not shown["versions"].empty


# -- the tab inside the app ------------------------------------------------------------------


def test_demo_has_the_dashboard_tab_with_private_endpoints_and_no_data_in_its_config(deps):
    demo = build_demo(deps)
    config = json.dumps(demo.config, default=str)
    for elem_id in ("admin-password", "admin-login", "serving-version", "versions-table", "rollback-version", "rollback", "retrain"):
        assert f'"{elem_id}"' in config, elem_id
    assert "v000001" not in config and "r000002" not in config  # nothing leaks before login
    for elem_id in ("annotators-table", "profile-thumbs-table", "profile-wins-table", "gold-prompt", "gold-add", "gold-table"):
        assert f'"{elem_id}"' in config, elem_id
    handlers = [f for f in demo.fns.values() if f.name in ("on_login", "on_refresh", "on_tick", "on_roll_back", "on_retrain", "on_add_gold")]
    assert len(handlers) == 7  # login by button and Enter, refresh by button, the timer, and one each for the rest
    assert {f.api_visibility for f in handlers} == {"private"}


def test_dashboard_is_locked_without_a_password(deps):
    deps.args.admin_password = ""
    config = json.dumps(build_demo(deps).config, default=str)
    assert '"dashboard-locked"' in config and "ASSISTANT_ADMIN_PASSWORD" in config and "--admin-password-file" in config
    assert '"admin-password"' not in config and '"rollback"' not in config


# -- tie rates -----------------------------------------------------------------------------


def sampled(store: FeedbackStore, conversation_id: str, version: str, variant: str | None, source: str) -> int:
    params = {"temperature": 0.7} if variant is None else {"temperature": 0.7, "variant": variant}
    return store.add_reply(
        conversation_id=conversation_id, context=CTX, text=f"a reply by {version}", params=params, model="tiny",
        adapter_version=version, prompt_tokens=3, completion_tokens=4, latency_ms=5.0, ttft_ms=1.0,
        finish_reason="stop", source=source,
    )


def test_wilson_interval_matches_known_values():
    assert dashboard.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert dashboard.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert dashboard.wilson(0, 0) == (0.0, 1.0)


def test_tie_rates_count_tied_pairs_per_version_mode_and_variant(store):
    ada = store.ensure_user("ada")
    cid = store.new_conversation(ada)
    spread = [sampled(store, cid, "base", "temperature-spread", "compare") for _ in range(2)]
    for choice in ("tie", "tie", "both_bad", "a"):  # 4 compared pairs: 2 ties
        store.add_comparison(*spread, choice, ada)
    live = [sampled(store, cid, v, "live-candidate", "compare") for v in ("base", "v000001")]
    store.add_comparison(*live, "tie", ada)  # one pair, counted for both versions
    store.add_comparison(*live, "b", ada)
    ranked = [sampled(store, cid, "base", "temperature-spread", "rank") for _ in range(3)]
    store.add_ranking(ranked, ada)  # 3 decisive pairs
    store.add_ties(ranked, ada)  # 3 tied pairs
    four = [sampled(store, cid, "base", "temperature-spread", "rank") for _ in range(4)]
    store.add_ranking(four, ada)  # 6 decisive pairs
    old = [sampled(store, cid, "base", None, "compare") for _ in range(2)]
    store.add_comparison(*old, "tie", ada)  # stored before replies recorded their variant
    store.import_pair(CTX, "4", "5", "pairs.jsonl")  # never counted
    df = dashboard.tie_rates(con(store))
    got = {(r.version, r.mode, r.variant): (r.pairs, r.ties, r.both_bad) for r in df.itertuples()}
    assert got == {
        ("base", "compare", "temperature-spread"): (4, 2, 1),
        ("base", "compare", "live-candidate"): (2, 1, 0),
        ("v000001", "compare", "live-candidate"): (2, 1, 0),
        ("base", "rank", "temperature-spread"): (3 + 3 + 6, 3, 0),
        ("base", "compare", dashboard.NOT_RECORDED): (1, 1, 0),
    }
    row = df.set_index(["version", "mode", "variant"]).loc[("base", "rank", "temperature-spread")]
    assert row["tie_rate"] == pytest.approx(3 / 12)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(dashboard.wilson(3, 12))
    assert row["ci_low"] < 0.25 < row["ci_high"]


def test_tie_table_is_shown_after_login(deps):
    shown = values(dashboard.login(deps, PASSWORD))
    assert isinstance(shown["tie_table"], pd.DataFrame)
    assert list(shown["tie_table"].columns) == ["version", "mode", "variant", "pairs", "ties", "both_bad", "tie_rate", "ci_low", "ci_high"]
    assert dashboard.blank()["tie_table"]["value"] is None


# -- gold items, annotators and profile groups ----------------------------------------------


def test_an_admin_adds_gold_items_and_sees_them_with_their_answers(deps, admin):
    out = dashboard.add_gold(deps, admin, "  Is <b>water</b> wet? ", "Yes.", "No.")
    assert out[0] == "Gold item 1 added."
    assert deps.store.gold_item(1)["prompt"] == [{"role": "user", "content": "Is <b>water</b> wet?"}]
    assert dashboard.add_gold(deps, admin, "Is <b>water</b> wet?", "Yes.", "No.")[0] == "This gold item is stored already (item 1)."
    assert "needs a question" in dashboard.add_gold(deps, admin, "", "Yes.", "No.")[0]
    assert "Not added" in dashboard.add_gold(deps, admin, "Same?", "x", "x")[0]
    assert "longer than" in dashboard.add_gold(deps, admin, "q" * (dashboard.MAX_GOLD_CHARS + 1), "a", "b")[0]
    ada = deps.store.ensure_user("ada")
    deps.store.add_gold_answer(1, ada, "b", "b")
    deps.store.add_gold_answer(1, deps.store.ensure_user("bob"), "a", "b")
    table = values(out)["gold_table"]
    assert table.to_dict("records") == [{"id": 1, "question": "Is <b>water</b> wet?", "better reply": "Yes.", "worse reply": "No.",
                                         "source": "dashboard", "answers": 0, "answered right": 0}]
    table = values(dashboard.refresh(deps, admin))["gold_table"]
    assert table[["answers", "answered right"]].values.tolist() == [[2, 1]]


def test_the_annotators_table_shows_figures_weight_and_why_someone_is_excluded(deps, admin, store):
    careful, coin = store.ensure_user("careful", "Nurse"), store.ensure_user("coin")
    for i in range(12):
        gid, _ = store.add_gold_item([{"role": "user", "content": f"q{i}"}], "good", "bad", "t")
        store.add_gold_answer(gid, careful, "a", "a")
        store.add_gold_answer(gid, coin, "a", "a" if i < 3 else "b")
    conv = store.new_conversation(careful)
    r1, r2 = add_reply(store, conv, "base"), add_reply(store, conv, "v000001")
    c = store.add_comparison(r1, r2, "a", careful)
    store.add_repeat_answer(c, careful, "a")
    table = values(dashboard.refresh(deps, admin))["annotators_table"]
    assert list(table.columns) == dashboard.ANNOTATOR_COLUMNS
    rows = table.set_index("name")
    lo, hi = annotators.wilson(12, 12)
    assert rows.loc["careful", "gold accuracy (95% CI)"] == f"1.00 [{lo:.2f}, {hi:.2f}] n=12"
    assert rows.loc["careful", "self-consistency"] == "1.00 (1/1)" and rows.loc["careful", "volume"] == 1
    assert rows.loc["careful", "excluded"] == "" and rows.loc["careful", "weight"] > 0.8
    assert rows.loc["coin", "excluded"] == "excluded" and "gold items 3/12 right" in rows.loc["coin", "why"]
    deps.args.annotator_floor = 0.0  # the server's floor decides what the table calls excluded
    assert values(dashboard.refresh(deps, admin))["annotators_table"].set_index("name").loc["coin", "excluded"] == ""


def test_win_and_thumbs_up_rates_by_normalised_profile_group(store):
    nurse, nurse2, dev, anon = (store.ensure_user(n, p) for n, p in
                                (("ada", "Nurse"), ("bea", " nurse."), ("cy", "Python developer"), ("dan", "")))
    cid = store.new_conversation(nurse)
    base, new = add_reply(store, cid, "base"), add_reply(store, cid, "v000001")
    store.add_comparison(base, new, "b", nurse)
    store.add_comparison(new, base, "a", nurse2)
    store.add_comparison(base, new, "a", dev)
    store.set_vote(new, nurse, 1)
    store.set_vote(new, nurse2, -1)
    store.set_vote(base, dev, 1)
    store.set_vote(new, anon, 1)
    store.import_pair(CTX, "4", "5", "pairs.jsonl")
    wins = dashboard.wins_by_profile(con(store)).set_index(["profile", "version"])
    assert wins.loc[("nurse", "v000001"), ["wins", "decisive"]].tolist() == [2, 2]
    assert wins.loc[("nurse", "base"), "win_rate"] == 0.0
    assert wins.loc[("python developer", "base"), "win_rate"] == 1.0
    assert (wins.loc[("nurse", "v000001"), "ci_low"], wins.loc[("nurse", "v000001"), "ci_high"]) == pytest.approx(dashboard.wilson(2, 2))
    thumbs = dashboard.thumbs_by_profile(con(store)).set_index(["profile", "version"])
    assert thumbs.loc[("nurse", "v000001"), ["up", "down"]].tolist() == [1, 1]
    assert thumbs.loc[(annotators.NO_PROFILE, "v000001"), "up_rate"] == 1.0
    assert thumbs.loc[("python developer", "base"), "up_rate"] == 1.0
    assert "import" not in set(thumbs.index.get_level_values("version")) | set(wins.index.get_level_values("version"))


# -- the password stays off the command line (app.py) -------------------------------------------------


def test_the_admin_password_flag_is_refused_with_a_pointer_to_the_env_var_and_the_file(capsys):
    import app

    for argv in (["--admin-password", "S3CRET"], ["--admin-password=S3CRET"], ["--port", "8000", "--admin-password", "x"]):
        with pytest.raises(SystemExit) as exc:
            app.parse_args(argv, environ={})
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "ASSISTANT_ADMIN_PASSWORD" in err and "--admin-password-file" in err and "S3CRET" not in err
    with pytest.raises(SystemExit):  # no abbreviation of --admin-password-file takes a password either
        app.parse_args(["--admin-pass", "S3CRET"], environ={})
    assert "S3CRET" not in capsys.readouterr().err


def test_the_admin_password_comes_from_the_environment_or_a_file(tmp_path, capsys):
    import app

    assert app.parse_args([], environ={})[1].admin_password == ""
    assert app.parse_args([], environ={"ASSISTANT_ADMIN_PASSWORD": "from-env"})[1].admin_password == "from-env"
    secret = tmp_path / "admin.txt"
    secret.write_text("from file  \nsecond line\n")
    secret.chmod(0o600)
    _, args = app.parse_args(["--admin-password-file", str(secret), "--admin-session-minutes", "15"], environ={})
    assert (args.admin_password, args.admin_session_minutes) == ("from file", 15.0)
    for environ, path, message in (({"ASSISTANT_ADMIN_PASSWORD": "x"}, secret, "keep one"),
                                   ({}, tmp_path / "missing.txt", "cannot read it"),
                                   ({}, tmp_path / "empty.txt", "first line is empty")):
        if path.name == "empty.txt":
            path.write_text("\n")
        with pytest.raises(SystemExit):
            app.parse_args(["--admin-password-file", str(path)], environ=environ)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        app.parse_args(["--admin-session-minutes", "0"], environ={})
    assert "--admin-session-minutes must be positive" in capsys.readouterr().err
    assert "--annotator-floor" in app.trainer_command(*app.parse_args([], environ={}), "run")
