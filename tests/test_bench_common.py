"""bench/common.py: the helpers every benchmark script shares."""

from __future__ import annotations

import json
import statistics

import pytest

from bench import common


def test_percentile_matches_the_inclusive_quantiles_of_the_statistics_module():
    xs = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0]
    cuts = statistics.quantiles(xs, n=100, method="inclusive")  # cuts[k - 1] is the k-th percentile
    for k in (1, 25, 50, 90, 99):
        assert common.percentile(xs, k / 100) == pytest.approx(cuts[k - 1])
    assert common.percentile(xs, 0.0) == 1.0 and common.percentile(xs, 1.0) == 9.0
    assert common.percentile([4.0], 0.99) == 4.0


def test_percentile_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="no values"):
        common.percentile([], 0.5)


def test_task_prompt_appends_the_input_when_there_is_one():
    task = {"instruction": " Sort these. ", "instances": [{"input": "3, 1, 2\n", "output": "1, 2, 3"}]}
    assert common.task_prompt(task) == "Sort these.\n\n3, 1, 2"
    assert common.task_prompt({"instruction": "Say hi.", "instances": [{"input": "  ", "output": ""}]}) == "Say hi."


def test_seed_tasks_reads_every_non_blank_line(tmp_path):
    path = tmp_path / "tasks.jsonl"
    rows = [{"id": "a", "instruction": "One"}, {"id": "b", "instruction": "Two"}]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    assert common.seed_tasks(path) == rows


def test_seed_tasks_names_a_missing_file(tmp_path):
    with pytest.raises(SystemExit, match="nowhere.jsonl not found"):
        common.seed_tasks(tmp_path / "nowhere.jsonl")


def test_write_results_creates_folders_replaces_the_file_and_stringifies(tmp_path):
    out = tmp_path / "deep" / "er" / "result.json"
    assert common.write_results(out, {"path": tmp_path, "n": 1}) == out
    assert json.loads(out.read_text()) == {"path": str(tmp_path), "n": 1}
    common.write_results(out, {"n": 2})
    assert json.loads(out.read_text()) == {"n": 2}
    assert sorted(p.name for p in out.parent.iterdir()) == ["result.json"]  # no temporary file left


def test_machine_names_cores_and_python_and_torch_only_when_asked():
    import os
    import platform

    line = common.machine(with_torch=False)
    assert f"{os.cpu_count()} cores" in line and f"Python {platform.python_version()}" in line
    assert "torch" not in line
    assert "torch " in common.machine()


def test_library_versions_leaves_out_what_is_not_installed():
    versions = common.library_versions("torch", "no-such-package-here")
    assert set(versions) == {"torch"} and versions["torch"][0].isdigit()


def test_rss_sampler_reports_a_peak_at_least_the_current_memory():
    sampler = common.RssSampler(every=0.01)
    sampler.start()
    try:
        now = common.rss_mb()
        assert now > 0
        assert sampler.take() >= now * 0.9  # memory may shrink a little between the two reads
    finally:
        sampler.stop.set()
