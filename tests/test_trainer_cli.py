"""Tests for the trainer command line (trainer/__main__.py): `import`, `reward` and
`reward-eval` run for real, as `python -m trainer ...` in a subprocess or through
`main([...])` in this process, on the tiny seeded model from tests/tiny.py, with the
feedback database and reward-model directory under tmp_path. Covers what each
command prints, its exit code, the files it writes, and the errors that name the
flag to fix.

Everything runs offline on CPU. Run: python -m pytest tests/test_trainer_cli.py -q
"""

from __future__ import annotations

import json
import os
import random
import re
import sqlite3
import subprocess
import sys
import types
from pathlib import Path

import pytest

from assistant.config import BASE_VERSION as BASE
from trainer import reward
from trainer.__main__ import main
from tests.tiny import save_tiny_model

REPO = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 180

FRUIT = "apple cherry grape lemon mango melon peach plum kiwi fig lime pear".split()
TOPICS = "fruit snacks lunch breakfast dessert shopping garden market recipe picnic".split()
TRAIN_PAIRS = 40
EVAL_PAIRS = 24
# Small enough to fit in a few seconds on CPU, large enough to learn "banana wins".
FIT_FLAGS = ["--min-pairs", "8", "--reward-epochs", "3", "--reward-lr", "3e-3",
             "--reward-max-length", "96", "--reward-batch-size", "8"]
EVAL_RE = re.compile(r"pairwise accuracy (?P<acc>[\d.]+) \(95% CI (?P<lo>[\d.]+)-(?P<hi>[\d.]+)\), (?P<n>\d+) pairs scored, (?P<bad>\d+) bad lines skipped")


# -- helpers -----------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m trainer ARGS` from the repository root, as a user would run it."""
    # One torch thread: the tiny model gains nothing from more, and loses a lot when
    # other processes hold the cores.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S)


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """main([...]) in this process: (exit code, stdout, stderr). argparse errors exit
    through SystemExit; their code is returned like any other."""
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def banana_records(n: int, seed: int) -> list[dict]:
    """TRL records (string prompt) whose chosen reply mentions banana and whose rejected one does not."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        chosen = f"I suggest {' and '.join(rng.sample(FRUIT, 2))} and banana."
        rejected = f"I suggest {' and '.join(rng.sample(FRUIT, 3))}."
        records.append({"prompt": f"What should I pick for {rng.choice(TOPICS)}, take {seed}-{i}?",
                        "chosen": chosen, "rejected": rejected})
    return records


def hh_record(question: str, chosen: str, rejected: str) -> dict:
    return {"chosen": f"\n\nHuman: {question}\n\nAssistant: {chosen}",
            "rejected": f"\n\nHuman: {question}\n\nAssistant: {rejected}"}


def table_rows(db: Path, table: str) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    finally:
        conn.close()


def model_flags(model_dir: Path) -> list[str]:
    return ["--model", str(model_dir), "--quantize", "none", "--device", "cpu"]


# -- fixtures ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny):
    """Banana pairs imported with `python -m trainer import`, then one
    `python -m trainer reward` fit on them: a dict of paths and the two runs."""
    root = tmp_path_factory.mktemp("fitted")
    train = write_jsonl(root / "banana-train.jsonl", banana_records(TRAIN_PAIRS, seed=1))
    db, reward_dir = root / "feedback.db", root / "reward"
    imported = run_cli("import", str(train), "--db", str(db))
    assert imported.returncode == 0, imported.stderr
    fit = run_cli("reward", "--db", str(db), "--reward-dir", str(reward_dir), *model_flags(tiny), *FIT_FLAGS)
    return {"root": root, "db": db, "reward_dir": reward_dir, "imported": imported, "fit": fit}


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory) -> Path:
    """Held-out banana pairs (other prompts, other fruit draws) in TRL format."""
    return write_jsonl(tmp_path_factory.mktemp("eval") / "banana-eval.jsonl", banana_records(EVAL_PAIRS, seed=2))


# -- help ----------------------------------------------------------------------------


@pytest.mark.parametrize("command, expected", [
    ([], ["import", "reward", "reward-eval"]),
    (["import"], ["file", "--db"]),
    (["reward"], ["--db", "--reward-dir", "--min-pairs", "--reward-lr", "--val-fraction", "--model", "--quantize"]),
    (["reward-eval"], ["file", "--reward", "--limit", "--reward-dir", "--model"]),
    ([], ["evaluate", "promote", "prune", "backup", "restore"]),
    (["evaluate"], ["version", "--min-win-rate", "--eval-replies", "--adapters-dir", "--reward-dir", "--lock-file", "--db"]),
    (["promote"], ["version", "--adapters-dir", "--lock-file", "--model"]),
    (["prune"], ["--keep", "--dry-run", "--adapters-dir", "--reward-dir", "--lock-file"]),
    (["backup"], ["--db", "--to", "--keep"]),
    (["restore"], ["backup", "--db", "--lock-file"]),
    (["run"], ["--keep", "--backup-every-hours", "--backup-dir", "--backup-keep"]),
])
def test_help_exits_0_and_lists_the_settings(command, expected):
    result = run_cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m trainer")
    for word in expected:
        assert word in result.stdout


def test_no_command_is_a_usage_error(capsys):
    code, _, err = run_main(capsys)
    assert code == 2
    assert "required: command" in err


# -- import --------------------------------------------------------------------------


def test_import_trl_file_prints_counts_and_a_second_run_adds_nothing(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "Name a fruit.", "chosen": "Banana.", "rejected": "Rock."},
        {"prompt": [{"role": "user", "content": "Say hi."}],
         "chosen": [{"role": "assistant", "content": "Hi!"}], "rejected": [{"role": "assistant", "content": "No."}]},
        {"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
         "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]},
    ])
    db = tmp_path / "feedback.db"
    first = run_cli("import", str(path), "--db", str(db))
    assert first.returncode == 0, first.stderr
    assert "prefs.jsonl: 3 pairs added, 0 already present, 0 bad lines" in first.stdout
    assert table_rows(db, "comparisons") == 3

    second = run_cli("import", str(path), "--db", str(db))
    assert second.returncode == 0, second.stderr
    assert "prefs.jsonl: 0 pairs added, 3 already present, 0 bad lines" in second.stdout
    assert table_rows(db, "comparisons") == 3


def test_import_hh_file_prints_counts_and_a_second_run_adds_nothing(tmp_path, capsys):
    path = write_jsonl(tmp_path / "hh.jsonl", [
        hh_record("What is the capital of France?", "Paris.", "London."),
        hh_record("How many legs does a spider have?", "Eight.", "Six."),
    ])
    db = tmp_path / "feedback.db"
    code, out, _ = run_main(capsys, "import", str(path), "--db", str(db))
    assert code == 0
    assert "hh.jsonl: 2 pairs added, 0 already present, 0 bad lines" in out
    code, out, _ = run_main(capsys, "import", str(path), "--db", str(db))
    assert code == 0
    assert "hh.jsonl: 0 pairs added, 2 already present, 0 bad lines" in out
    assert table_rows(db, "comparisons") == 2


def test_import_missing_file_exits_2_and_creates_no_database(tmp_path, capsys):
    db = tmp_path / "feedback.db"
    code, out, err = run_main(capsys, "import", str(tmp_path / "nope.jsonl"), "--db", str(db))
    assert code == 2
    assert "nope.jsonl: no such file" in err
    assert out == ""
    assert not db.exists()


def test_import_reports_malformed_lines_by_line_number(tmp_path, capsys):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": "Name a fruit.", "chosen": "Banana.", "rejected": "Rock."},
        "{not json",
        {"prompt": "Name a colour.", "chosen": "Blue."},
        "",  # blank lines are skipped, not errors
        {"prompt": "Name a drink.", "chosen": "Water.", "rejected": "Sand."},
        {"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes."},
    ])
    db = tmp_path / "feedback.db"
    code, out, _ = run_main(capsys, "import", str(path), "--db", str(db))
    assert code == 0
    assert "mixed.jsonl: 2 pairs added, 0 already present, 3 bad lines" in out
    assert re.search(r"line 2: not valid JSON", out)
    assert "line 3: missing key 'rejected'" in out
    assert re.search(r"line 6: .*same text", out)
    assert table_rows(db, "comparisons") == 2


def test_import_lists_at_most_20_bad_lines(tmp_path, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", ["[1, 2]"] * 25)
    code, out, _ = run_main(capsys, "import", str(path), "--db", str(tmp_path / "feedback.db"))
    assert code == 0
    assert "0 pairs added, 0 already present, 25 bad lines" in out
    assert "line 20: expected a JSON object, got list" in out
    assert "line 21:" not in out
    assert "... and 5 more" in out


def test_import_into_something_that_is_not_a_database_exits_2_naming_db(tmp_path, capsys):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "Hi.", "chosen": "Hello.", "rejected": "Go away."}])
    not_a_db = tmp_path / "notes.txt"
    not_a_db.write_text("these are notes, not SQLite\n" * 100)
    code, _, err = run_main(capsys, "import", str(path), "--db", str(not_a_db))
    assert code == 2
    assert err.startswith("error: --db:")
    assert "not a usable feedback database" in err


# -- reward --------------------------------------------------------------------------


def test_reward_with_too_little_data_exits_2_naming_min_pairs(tmp_path, tiny, capsys):
    path = write_jsonl(tmp_path / "few.jsonl", banana_records(3, seed=7))
    db, reward_dir = tmp_path / "feedback.db", tmp_path / "reward"
    assert run_main(capsys, "import", str(path), "--db", str(db))[0] == 0
    code, out, err = run_main(capsys, "reward", "--db", str(db), "--reward-dir", str(reward_dir),
                              "--val-fraction", "0", "--min-pairs", "16", *model_flags(tiny))
    assert code == 2
    assert "--min-pairs" in err
    assert "need at least 16" in err
    assert "have 3 (3 pairs, 0 pointwise)" in err
    assert "python -m trainer import" in err  # says how to get more
    assert "saved" not in out
    assert reward.versions(reward_dir) == []


def test_reward_on_a_missing_db_exits_2_naming_db(tmp_path, tiny, capsys):
    db = tmp_path / "no-such.db"
    code, out, err = run_main(capsys, "reward", "--db", str(db), "--reward-dir", str(tmp_path / "reward"), *model_flags(tiny))
    assert code == 2
    assert f"--db {db}" in err
    assert "no feedback database" in err
    assert "python -m trainer import" in err
    assert out == ""
    assert not db.exists()
    assert not (tmp_path / "reward").exists()


@pytest.mark.parametrize("content", [b"", b"SQLite? no.\n" * 200])
def test_reward_on_an_unusable_db_exits_2_naming_db(tmp_path, tiny, capsys, content):
    db = tmp_path / "feedback.db"
    db.write_bytes(content)
    code, _, err = run_main(capsys, "reward", "--db", str(db), "--reward-dir", str(tmp_path / "reward"), *model_flags(tiny))
    assert code == 2
    assert err.startswith("error: --db:")
    assert str(db) in err


def test_reward_that_diverges_exits_2_naming_reward_lr(tmp_path, tiny, capsys):
    path = write_jsonl(tmp_path / "eight.jsonl", banana_records(8, seed=3))
    db, reward_dir = tmp_path / "feedback.db", tmp_path / "reward"
    assert run_main(capsys, "import", str(path), "--db", str(db))[0] == 0
    code, out, err = run_main(capsys, "reward", "--db", str(db), "--reward-dir", str(reward_dir), *model_flags(tiny),
                              "--val-fraction", "0", "--min-pairs", "8", "--reward-batch-size", "4",
                              "--reward-max-length", "32", "--reward-lr", "1e30")
    assert code == 2
    assert "--reward-lr" in err and "loss is nan" in err
    assert "saved" not in out
    assert reward.versions(reward_dir) == []


def test_reward_fits_saves_r000001_and_prints_metrics(fitted, tiny):
    fit = fitted["fit"]
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert f"{TRAIN_PAIRS} pairs added" in fitted["imported"].stdout
    reward_dir = fitted["reward_dir"]
    assert f"reward model r000001 saved under {reward_dir}" in fit.stdout
    for key in ("feedback ids used", "rows by kind", "examples", "train_loss", "train_accuracy", "val_accuracy",
                "val_accuracy_lo", "val_accuracy_hi", "pairs_per_s", "seconds"):
        assert key in fit.stdout, key
    assert reward.versions(reward_dir) == ["r000001"]
    for name in reward.REQUIRED_FILES:
        assert (reward_dir / "r000001" / name).is_file(), name


def test_reward_manifest_records_feedback_ids_counts_and_settings(fitted, tiny):
    assert fitted["fit"].returncode == 0, fitted["fit"].stderr[-3000:]
    manifest = json.loads((fitted["reward_dir"] / "r000001" / "manifest.json").read_text())
    assert manifest["version"] == "r000001"
    assert manifest["feedback_ids"]["comparisons"] == [1, TRAIN_PAIRS]
    assert manifest["feedback_ids"]["votes"] == [1, 0]  # empty range
    assert set(manifest["feedback_ids"]) == {"votes", "vote_events", "comparisons", "corrections", "rankings"}
    assert manifest["counts"]["comparison"] == TRAIN_PAIRS
    assert sum(manifest["counts"].values()) == TRAIN_PAIRS
    examples = manifest["examples"]
    assert examples["train_pairs"] + examples["val_pairs"] == TRAIN_PAIRS
    assert examples["train_pairs"] >= 8 and examples["val_pairs"] >= 1
    assert manifest["metrics"]["train_pairs"] == examples["train_pairs"]
    assert manifest["reward_args"]["min_pairs"] == 8
    assert manifest["reward_args"]["reward_epochs"] == 3
    assert manifest["reward_args"]["reward_dir"] == str(fitted["reward_dir"])
    assert manifest["base_model"] == str(tiny)
    assert manifest["quantize"] == "none"
    assert manifest["max_length"] == 96
    # What the command printed is what the manifest holds.
    assert f"feedback ids used: {json.dumps(manifest['feedback_ids'])}" in fitted["fit"].stdout


# -- reward-eval ---------------------------------------------------------------------


def test_reward_eval_prints_accuracy_ci_and_count(fitted, tiny, eval_file):
    assert fitted["fit"].returncode == 0, fitted["fit"].stderr[-3000:]
    result = run_cli("reward-eval", str(eval_file), "--reward", "r000001",
                     "--reward-dir", str(fitted["reward_dir"]), *model_flags(tiny))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "banana-eval.jsonl with reward model r000001" in result.stdout
    m = EVAL_RE.search(result.stdout)
    assert m, result.stdout
    acc, lo, hi = float(m["acc"]), float(m["lo"]), float(m["hi"])
    assert int(m["n"]) == EVAL_PAIRS and int(m["bad"]) == 0
    assert 0.0 <= lo <= acc <= hi <= 1.0
    assert acc >= 0.75, f"the fitted model should prefer the banana replies: {result.stdout}"


def test_reward_eval_limit_hh_file_latest_version_and_bad_lines(fitted, tiny, tmp_path, capsys):
    assert fitted["fit"].returncode == 0, fitted["fit"].stderr[-3000:]
    records = [hh_record(f"What should I pick for lunch, take {i}?", "Banana and apple.", "Apple and plum.") for i in range(8)]
    path = write_jsonl(tmp_path / "hh-eval.jsonl", records + ["not json", {"chosen": "x"}])
    code, out, err = run_main(capsys, "reward-eval", str(path), "--limit", "5",
                              "--reward-dir", str(fitted["reward_dir"]), *model_flags(tiny))
    assert code == 0, err[-3000:]
    assert "with reward model r000001" in out  # no --reward: the latest
    m = EVAL_RE.search(out)
    assert m, out
    assert int(m["n"]) == 5
    assert int(m["bad"]) == 2


def test_reward_eval_missing_version_exits_2_listing_the_saved_ones(fitted, tiny, eval_file, capsys):
    assert fitted["fit"].returncode == 0, fitted["fit"].stderr[-3000:]
    code, out, err = run_main(capsys, "reward-eval", str(eval_file), "--reward", "r000009",
                              "--reward-dir", str(fitted["reward_dir"]), *model_flags(tiny))
    assert code == 2
    assert "no reward model 'r000009'" in err
    assert "have: r000001" in err
    assert out == ""


def test_reward_eval_without_any_reward_model_exits_2_saying_how_to_fit_one(tmp_path, tiny, eval_file, capsys):
    code, _, err = run_main(capsys, "reward-eval", str(eval_file), "--reward-dir", str(tmp_path / "reward"), *model_flags(tiny))
    assert code == 2
    assert f"no reward model under {tmp_path / 'reward'}" in err
    assert "python -m trainer reward" in err


def test_reward_eval_on_another_base_model_exits_2(fitted, eval_file, tmp_path, capsys):
    assert fitted["fit"].returncode == 0, fitted["fit"].stderr[-3000:]
    other = save_tiny_model(tmp_path / "other-model", seed=1)
    code, _, err = run_main(capsys, "reward-eval", str(eval_file), "--reward-dir", str(fitted["reward_dir"]), *model_flags(other))
    assert code == 2
    assert "was trained on base" in err and "--model" in err


def test_reward_eval_missing_or_unusable_file_exits_2(tmp_path, capsys):
    code, _, err = run_main(capsys, "reward-eval", str(tmp_path / "nope.jsonl"), "--reward-dir", str(tmp_path / "reward"))
    assert code == 2
    assert "nope.jsonl: no such file" in err

    junk = write_jsonl(tmp_path / "junk.jsonl", ["not json", {"chosen": "only"}])
    code, _, err = run_main(capsys, "reward-eval", str(junk), "--reward-dir", str(tmp_path / "reward"))
    assert code == 2
    assert "junk.jsonl: no usable preference pairs (2 bad lines)" in err


# -- bad flag values -----------------------------------------------------------------


@pytest.mark.parametrize("argv, flag", [
    (["reward", "--val-fraction", "1.5"], "--val-fraction"),
    (["reward", "--val-fraction", "-0.1"], "--val-fraction"),
    (["reward", "--reward-lr", "-1"], "--reward-lr"),
    (["reward", "--reward-lr", "fast"], "--reward-lr"),
    (["reward", "--min-pairs", "0"], "--min-pairs"),
    (["reward", "--reward-epochs", "0"], "--reward-epochs"),
    (["reward", "--pointwise-weight", "-1"], "--pointwise-weight"),
    (["reward", "--quantize", "fp8"], "--quantize"),
    (["reward", "--device", "tpu"], "--device"),
    (["reward", "--lora-dropout", "1"], "--lora-dropout"),
    (["reward-eval", "prefs.jsonl", "--limit", "-1"], "--limit"),
    (["reward-eval", "prefs.jsonl", "--limit", "many"], "--limit"),
    (["reward-eval", "prefs.jsonl", "--reward-eval-batch-size", "0"], "--reward-eval-batch-size"),
    (["import", "prefs.jsonl", "--bogus"], "--bogus"),
])
def test_bad_flag_values_are_usage_errors_naming_the_flag(argv, flag, capsys, tmp_path):
    code, out, err = run_main(capsys, *argv, "--db" if argv[0] != "reward-eval" else "--reward-dir", str(tmp_path / "x"))
    assert code == 2
    assert flag in err
    if flag != "--bogus":  # argparse reports unknown flags with the top-level usage
        assert f"usage: python -m trainer {argv[0]}" in err  # the subcommand's own usage
    assert out == ""
    assert not (tmp_path / "x").exists()


def test_bad_flag_value_from_the_shell(tmp_path):
    result = run_cli("reward", "--val-fraction", "1.5", "--db", str(tmp_path / "feedback.db"))
    assert result.returncode == 2
    assert "python -m trainer reward: error: --val-fraction must be in [0, 1), got 1.5" in result.stderr
    assert "Traceback" not in result.stderr


# -- rollback and status on a bad pointer -------------------------------------------------


@pytest.fixture
def served(tmp_path, trained_peft) -> Path:
    """An adapter directory where v000001 then v000002 (its child) were served: v000002 serves."""
    from assistant import adapters

    adir = tmp_path / "adapters"
    v1 = adapters.publish(adir, trained_peft(seed=1), "default", {"parent": "base"})
    v2 = adapters.publish(adir, trained_peft(seed=2), "default", {"parent": v1})
    adapters.promote(adir, v1)
    adapters.promote(adir, v2)
    return adir


def status_flags(tmp_path: Path, adir: Path) -> list[str]:
    return ["--adapters-dir", str(adir), "--db", str(tmp_path / "feedback.db"),
            "--lock-file", str(tmp_path / "trainer.lock"), "--cycles-log", str(tmp_path / "cycles.jsonl")]


@pytest.mark.parametrize("arg", ["v000001/", "v000001//", "{adir}/v000001", "{adir}/v000001/", "{rel}/v000001/"])
def test_rollback_takes_a_version_directory_path(served, capsys, arg):
    from assistant import adapters

    rel = os.path.relpath(served)
    code, out, err = run_main(capsys, "rollback", arg.format(adir=served, rel=rel), "--adapters-dir", str(served))
    assert code == 0, err
    assert "CURRENT: v000002 -> v000001" in out
    assert (served / "CURRENT").read_text() == "v000001\n"
    assert adapters.read_current(served) == "v000001"


@pytest.mark.parametrize("arg, why", [
    ("v1", "is not a version"),
    ("latest", "is not a version"),
    ("../v000001", "is not a directory under --adapters-dir"),
    ("/elsewhere/adapters/v000001/", "is not a directory under --adapters-dir"),
    ("{adir}/CURRENT", "is not a version"),
])
def test_rollback_refuses_an_argument_that_is_not_a_version_naming_it(served, capsys, arg, why):
    arg = arg.format(adir=served)
    code, out, err = run_main(capsys, "rollback", arg, "--adapters-dir", str(served))
    assert code == 2 and out == ""
    assert f"error: rollback VERSION: {arg!r} {why}" in err
    assert (served / "CURRENT").read_text() == "v000002\n"


@pytest.mark.parametrize("garbled", [b"../../etc\n", b"v000002/\n", b"\xff\x00garbage", b""])
def test_rollback_repairs_a_garbled_current(served, capsys, garbled):
    (served / "CURRENT").write_bytes(garbled)
    code, out, err = run_main(capsys, "rollback", "v000001", "--adapters-dir", str(served))
    assert code == 0, err
    assert "CURRENT: unreadable -> v000001" in out
    assert (served / "CURRENT").read_text() == "v000001\n"
    code, out, _ = run_main(capsys, "rollback", "--adapters-dir", str(served))  # now readable: its parent is base
    assert code == 0 and "CURRENT: v000001 -> base" in out


def test_rollback_without_a_version_on_a_garbled_current_says_what_to_pass(served, capsys):
    (served / "CURRENT").write_text("garbage\n")
    code, out, err = run_main(capsys, "rollback", "--adapters-dir", str(served))
    assert code == 2 and out == ""
    assert "holds 'garbage', which is not a version name" in err
    assert "name the version to serve, one of: base, v000002, v000001" in err
    assert "Traceback" not in err
    assert (served / "CURRENT").read_text() == "garbage\n"


def test_rollback_without_a_version_on_a_current_naming_a_missing_version_says_what_to_pass(served, capsys):
    (served / "CURRENT").write_text("v000009\n")
    code, _, err = run_main(capsys, "rollback", "--adapters-dir", str(served))
    assert code == 2
    assert "CURRENT points at v000009, which is not under" in err and "one of: base, v000002, v000001" in err
    assert run_main(capsys, "rollback", "v000002", "--adapters-dir", str(served))[0] == 0


@pytest.mark.parametrize("pointer, garbled", [("CURRENT", "../../etc"), ("LIVE", "garbage"), ("CURRENT", "v000009")])
def test_status_reports_a_bad_pointer_and_goes_on(served, tmp_path, capsys, pointer, garbled):
    (served / pointer).write_text(garbled + "\n")
    code, out, err = run_main(capsys, "status", *status_flags(tmp_path, served))
    assert code == 0, err
    first = out.splitlines()[0]
    if pointer == "CURRENT":
        assert first.startswith("serving: unknown: CURRENT is ") and garbled in first and "rollback VERSION" in first
    else:
        assert first.startswith("serving: v000002, live comparison: unknown: LIVE is unreadable") and "garbage" in first
    assert "cycle: none running" in out
    assert "v000001  retired" in out and "v000002  active" in out  # the versions are still listed


def test_status_lists_versions_with_missing_fields(served, tmp_path, capsys):
    from assistant import adapters

    adapters.update_manifest(served, "v000001", parent=None, reward_model=None, evaluation={"win_rate": 0.6, "kl_parent": None})
    code, out, err = run_main(capsys, "status", *status_flags(tmp_path, served))
    assert code == 0, err
    assert "v000001  retired    parent ?" in out


def test_rollback_and_status_from_the_shell(served, tmp_path):
    (served / "CURRENT").write_text("v000002/\n")
    status = run_cli("status", *status_flags(tmp_path, served))
    assert status.returncode == 0 and "serving: unknown: CURRENT is unreadable" in status.stdout, status.stderr
    rollback = run_cli("rollback", f"{served}/v000001/", "--adapters-dir", str(served))
    assert rollback.returncode == 0, rollback.stderr
    assert "CURRENT: unreadable -> v000001" in rollback.stdout
    assert "Traceback" not in rollback.stderr


# -- start-up and progress ---------------------------------------------------------------


def test_starting_the_trainer_prints_no_library_warnings(tmp_path, served):
    """`status` and a command that imports the model libraries (reward-eval imports peft,
    which imports bitsandbytes) print nothing on stderr but their own lines."""
    status = run_cli("status", *status_flags(tmp_path, served))
    assert status.returncode == 0 and status.stderr == "", status.stderr
    missing = tmp_path / "nope.jsonl"
    result = run_cli("reward-eval", str(missing), "--reward-dir", str(tmp_path / "reward"))
    assert result.returncode == 2
    assert result.stderr == f"error: {missing}: no such file\n"


def test_reward_eval_shows_progress_and_no_library_warnings(fitted, tiny, eval_file):
    assert fitted["fit"].returncode == 0, fitted["fit"].stderr[-3000:]
    result = run_cli("reward-eval", str(eval_file), "--reward-dir", str(fitted["reward_dir"]), "--reward-eval-batch-size", "4", *model_flags(tiny))
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(rf"reward-eval: 100%.*? {EVAL_PAIRS}/{EVAL_PAIRS} \[\d\d:\d\d<.*pair/s", result.stderr), result.stderr  # pairs done, elapsed
    for noise in ("Warning", "WARNING", "kernels"):
        assert noise not in result.stderr, result.stderr
    assert int(EVAL_RE.search(result.stdout)["n"]) == EVAL_PAIRS


# -- evaluate and promote a candidate made by hand -------------------------------------------------


# The gate opened (plumbing): these tests are about what evaluate and promote do with
# the gate's verdict; whether the tiny model learns is not theirs to show.
GATE_OPEN = ["--min-val-accuracy", "0", "--min-win-rate", "0", "--min-human-agreement", "0", "--kl-budget", "1e6",
             "--kl-total-budget", "1e6", "--max-degenerate", "1000"]
EVAL_FLAGS = ["--min-pairs", "8", "--reward-epochs", "2", "--reward-max-length", "64", "--eval-replies", "8", "--eval-max-new-tokens", "8"]


@pytest.fixture(scope="module")
def banana_db(tmp_path_factory) -> Path:
    from assistant.feedback import FeedbackStore
    from trainer.data import import_preferences

    root = tmp_path_factory.mktemp("banana-db")
    db = root / "feedback.db"
    with FeedbackStore(db) as store:
        import_preferences(store, write_jsonl(root / "pairs.jsonl", banana_records(TRAIN_PAIRS, seed=1)), progress=False)
    return db


@pytest.fixture
def by_hand(tmp_path, banana_db, tiny, capsys):
    """A feedback store of 40 banana pairs and make(): `python -m trainer train --policy-step dpo`
    run by hand, returning the candidate's version. Flags: flags(*extra)."""
    import shutil

    shutil.copy(banana_db, tmp_path / "feedback.db")

    def flags(*extra: str) -> list[str]:
        return [*model_flags(tiny), "--db", str(tmp_path / "feedback.db"), "--adapters-dir", str(tmp_path / "adapters"),
                "--reward-dir", str(tmp_path / "reward"), "--lock-file", str(tmp_path / "trainer.lock"), *extra]

    def make(seed: int = 0) -> str:
        code, out, err = run_main(capsys, "train", *flags("--policy-step", "dpo", "--no-sft-first", "--policy-max-length", "64",
                                                          "--policy-seed", str(seed)))
        assert code == 0, err[-3000:]
        return re.search(r"candidate adapter (v\d{6}) written", out)[1]

    return types.SimpleNamespace(root=tmp_path, adapters=tmp_path / "adapters", flags=flags, make=make, model=model_flags(tiny),
                                 lock=["--lock-file", str(tmp_path / "trainer.lock")])


def test_a_candidate_made_by_hand_is_evaluated_then_promoted(by_hand, capsys):
    from assistant import adapters

    version = by_hand.make()
    code, out, err = run_main(capsys, "promote", version, "--adapters-dir", str(by_hand.adapters), *by_hand.lock, *by_hand.model)
    assert code == 1 and f"{version} has not been evaluated; run `python -m trainer evaluate {version}` first" in err
    assert adapters.read_current(by_hand.adapters) == BASE

    code, out, err = run_main(capsys, "evaluate", f"{by_hand.adapters}/{version}/", *by_hand.flags(*EVAL_FLAGS, *GATE_OPEN))
    assert code == 0, err[-3000:]
    assert f"{version} (dpo) against base, the version serving now: passed the gate" in out
    assert "judge win rate" in out and f"python -m trainer promote {version}" in out and "may have trained on the judge's fold" in out
    code, out, _ = run_main(capsys, "status", "--adapters-dir", str(by_hand.adapters), "--db", str(by_hand.root / "feedback.db"), *by_hand.lock,
                            "--cycles-log", str(by_hand.root / "cycles.jsonl"))
    assert code == 0 and f"{version}  candidate" in out and "evaluated against base: passed; `promote` serves it" in out
    manifest = adapters.read_manifest(by_hand.adapters, version)
    assert manifest["status"] == "candidate"  # evaluating promotes nothing
    gate = manifest["gate"]
    assert gate["passed"] and gate["against"] == BASE and gate["reasons"] == [] and gate["judge_model"] == "r000002"
    assert manifest["evaluation"]["replies"] == 8 and manifest["evaluation"]["human_agreement"]["n"] > 0
    assert adapters.read_current(by_hand.adapters) == BASE

    code, out, err = run_main(capsys, "promote", f"{version}/", "--adapters-dir", str(by_hand.adapters), *by_hand.lock, *by_hand.model)
    assert code == 0, err
    assert f"CURRENT: base -> {version}" in out
    assert adapters.read_current(by_hand.adapters) == version
    manifest = adapters.read_manifest(by_hand.adapters, version)
    assert manifest["status"] == "active" and manifest["history"][-1]["reason"].startswith("judge win rate")

    code, _, err = run_main(capsys, "promote", version, "--adapters-dir", str(by_hand.adapters), *by_hand.lock, *by_hand.model)
    assert code == 2 and f"{version} is already serving" in err


def test_a_candidate_the_gate_refuses_is_rejected_and_cannot_be_promoted(by_hand, capsys):
    from assistant import adapters

    version = by_hand.make()
    strict = [f if f != "1e6" else "1e-9" for f in GATE_OPEN]  # no KL at all allowed
    code, out, err = run_main(capsys, "evaluate", version, *by_hand.flags(*EVAL_FLAGS, *strict))
    assert code == 1, err[-3000:]
    assert "refused by the gate (status: rejected)" in out and "- KL of this cycle's optimisation (to the parent)" in out
    manifest = adapters.read_manifest(by_hand.adapters, version)
    assert manifest["status"] == "rejected" and not manifest["gate"]["passed"]
    assert any(r.startswith("KL of this cycle's optimisation (to the parent)") for r in manifest["reasons"])
    # every pair the judge scored is kept beside the rejected adapter, not in its manifest
    judged = adapters.read_evaluation(by_hand.adapters, version)
    assert "judged" not in manifest["evaluation"] and manifest["evaluation"]["judged_file"] == adapters.EVALUATION_FILE
    assert len(judged) == manifest["evaluation"]["replies"] == 8
    assert all(set(j) == {"prompt", "candidate", "current", "candidate_score", "current_score"} for j in judged)
    margin = sum(j["candidate_score"] - j["current_score"] for j in judged) / len(judged)
    assert margin == pytest.approx(manifest["evaluation"]["margin"], abs=1e-6)

    code, _, err = run_main(capsys, "promote", version, "--adapters-dir", str(by_hand.adapters), *by_hand.lock, *by_hand.model)
    assert code == 2 and f"{version} is rejected (KL of this cycle's optimisation" in err
    assert adapters.read_current(by_hand.adapters) == BASE


def test_promote_refuses_an_evaluation_against_a_version_that_no_longer_serves(by_hand, capsys):
    from assistant import adapters

    first, second = by_hand.make(seed=0), by_hand.make(seed=1)
    for version in (first, second):
        code, _, err = run_main(capsys, "evaluate", version, *by_hand.flags(*EVAL_FLAGS, *GATE_OPEN))
        assert code == 0, err[-3000:]
    promote = ["--adapters-dir", str(by_hand.adapters), *by_hand.lock, *by_hand.model]
    assert run_main(capsys, "promote", second, *promote)[0] == 0

    code, out, err = run_main(capsys, "promote", first, *promote)
    assert code == 1 and out == ""
    assert (f"not promoted: CURRENT moved since {first} was evaluated: it passed against base, but {second} serves now; "
            f"re-run `python -m trainer evaluate {first}`") in err
    assert adapters.read_current(by_hand.adapters) == second

    code, out, err = run_main(capsys, "evaluate", first, *by_hand.flags(*EVAL_FLAGS, *GATE_OPEN))  # against the version serving now
    assert code == 0 and f"{first} (dpo) against {second}, the version serving now: passed" in out, err[-3000:]
    assert run_main(capsys, "promote", first, *promote)[0] == 0
    assert adapters.read_current(by_hand.adapters) == first
    assert adapters.read_manifest(by_hand.adapters, second)["status"] == "retired"


def test_evaluate_refuses_what_is_not_a_candidate_and_waits_for_a_running_cycle(served, tmp_path, tiny, capsys):
    from assistant import adapters, cycles

    flags = [*model_flags(tiny), "--adapters-dir", str(served), "--lock-file", str(tmp_path / "trainer.lock"), "--db", str(tmp_path / "feedback.db")]
    for arg, why in (("base", "the base model is not a candidate"), ("v000009", "no adapter v000009 under"),
                     ("v000002", "v000002 is already serving"), ("v000001", "v000001 is retired; only a candidate"), ("latest", "is not a version")):
        code, out, err = run_main(capsys, "evaluate", arg, *flags)
        assert code == 2 and why in err and out == "", (arg, err)
    v3 = "v000003"
    (served / v3).mkdir()
    (served / v3 / "manifest.json").write_text(json.dumps({"version": v3, "status": "candidate", "parent": "v000002"}))
    adapters.set_live(served, v3)
    code, _, err = run_main(capsys, "evaluate", v3, *flags)
    assert code == 2 and "v000003 is in live comparison" in err
    adapters.set_live(served, None)
    with cycles.CycleLock(tmp_path / "trainer.lock"):
        code, _, err = run_main(capsys, "evaluate", v3, *flags)
    assert code == 3 and "not started: another cycle is running" in err
    code, _, err = run_main(capsys, "evaluate", v3, *flags)  # no feedback database: nothing to judge with
    assert code == 1, err
    assert adapters.read_manifest(served, v3)["gate"]["reasons"] == [f"no feedback database at {tmp_path / 'feedback.db'}"]
    assert adapters.read_manifest(served, v3)["status"] == "candidate"


# -- prune ----------------------------------------------------------------------------------


def test_prune_deletes_old_versions_but_what_serves_its_ancestors_and_their_reward_models(served, tmp_path, capsys):
    from assistant import adapters

    rdir = tmp_path / "reward"
    for r in ("r000001", "r000002", "r000003", "r000004"):
        (rdir / r).mkdir(parents=True)
        (rdir / r / "manifest.json").write_text(json.dumps({"version": r}))
    adapters.update_manifest(served, "v000001", reward_model="r000001")
    adapters.update_manifest(served, "v000002", reward_model="r000003", judge_model="r000002")
    for v in ("v000003", "v000004"):  # rejected children of the served version
        (served / v).mkdir()
        (served / v / "manifest.json").write_text(json.dumps({"version": v, "status": "rejected", "parent": "v000002", "reward_model": "r000004"}))
    prune = ["prune", "--keep", "1", "--adapters-dir", str(served), "--reward-dir", str(rdir), "--lock-file", str(tmp_path / "trainer.lock")]

    code, out, _ = run_main(capsys, *prune, "--dry-run")
    assert code == 0 and "would delete adapters: v000003; reward models: none" in out
    assert adapters.versions(served) == ["v000001", "v000002", "v000003", "v000004"]
    code, out, _ = run_main(capsys, *prune)
    assert code == 0 and "deleted adapters: v000003; reward models: none (--keep 1)" in out
    assert adapters.versions(served) == ["v000001", "v000002", "v000004"]
    assert sorted(p.name for p in rdir.iterdir()) == ["r000001", "r000002", "r000003", "r000004"]  # each named by a kept adapter

    (served / "v000004" / "manifest.json").write_text(json.dumps({"version": "v000004", "status": "rejected", "parent": "v000002"}))
    (rdir / "r000005").mkdir()
    code, out, _ = run_main(capsys, *prune)
    assert code == 0 and "deleted adapters: none; reward models: r000004" in out
    code, out, err = run_main(capsys, "status", *status_flags(tmp_path, served))
    assert code == 0 and "v000002  active" in out and "v000001  retired" in out and "v000003" not in out, err
    code, out, _ = run_main(capsys, *prune)
    assert code == 0 and out.startswith("nothing to prune")
    assert run_main(capsys, "rollback", "--adapters-dir", str(served))[0] == 0  # the parent is still there


def test_prune_on_a_garbled_current_deletes_nothing_and_says_how_to_repair_it(served, tmp_path, capsys):
    from assistant import adapters

    (served / "CURRENT").write_text("garbage\n")
    code, out, err = run_main(capsys, "prune", "--keep", "1", "--adapters-dir", str(served), "--reward-dir", str(tmp_path / "reward"),
                              "--lock-file", str(tmp_path / "trainer.lock"))
    assert code == 2 and out == ""
    assert err.startswith("error: nothing pruned: ") and "holds 'garbage'" in err and "rollback VERSION" in err
    assert adapters.versions(served) == ["v000001", "v000002"]
    code, _, err = run_main(capsys, "prune", "--keep", "0", "--adapters-dir", str(served))
    assert code == 2 and "--keep must be at least 1" in err
