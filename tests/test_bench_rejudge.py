"""bench/rejudge.py on the tiny model: a kept loop run's candidate judged again by the hidden preference."""

from __future__ import annotations

import json

import pytest

from bench import loop, rejudge


def _run(tmp_path, tiny_dir, make_adapter, work: bool = True):
    args = loop.parse_args(["--preference", "shorter", "--model", str(tiny_dir), "--quantize", "none", "--device", "cpu",
                            "--heldout-prompts", "3", "--feedback-prompts", "2", "--cycles", "1"])
    if work:
        make_adapter(tmp_path / "work" / "adapters" / "v000001", seed=3)
    results = tmp_path / "loop.json"
    results.write_text(json.dumps({"args": vars(args), "work_dir": str(tmp_path / "work")}))
    return results


def test_rejudge_scores_every_sampled_pair_by_the_hidden_preference(tmp_path, tiny_dir, make_adapter, capsys):
    results = _run(tmp_path, tiny_dir, make_adapter)
    out = tmp_path / "rejudge.json"
    rejudge.main(["--results", str(results), "--version", "v000001", "--replies", "4", "--max-new-tokens", "12", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["against"] == "base" and r["preference"] == "shorter" and r["pairs"] == 4 == len(r["judged"])
    assert r["wins"] + r["ties"] + r["losses"] == 4 and r["win_rate_lo"] <= r["win_rate"] <= r["win_rate_hi"]
    words = lambda t: len(t.split())  # noqa: E731
    for j in r["judged"]:  # shorter: fewer words wins, an empty reply is the worst
        a, b = (words(j["candidate"]) or 10**9), (words(j["current"]) or 10**9)
        assert j["winner"] == ("new" if a < b else "old" if b < a else "tie")
    assert r["wins"] == sum(j["winner"] == "new" for j in r["judged"]) and r["sampling"]["max_new_tokens"] == 12
    assert r["kl_parent"] is not None and "| v000001 (candidate) | base |" in capsys.readouterr().out


def test_rejudge_needs_the_kept_work_directory(tmp_path, tiny_dir, make_adapter):
    results = _run(tmp_path, tiny_dir, make_adapter, work=False)
    with pytest.raises(SystemExit, match="run bench/loop.py with --keep"):
        rejudge.main(["--results", str(results), "--version", "v000001"])
