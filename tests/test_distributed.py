"""Tests for data-parallel training (trainer/distributed.py, reward.fit and ppo.train
launched on several processes): two processes on CPU (gloo, rendezvous on 127.0.0.1
at a free port) must end where one process ends on the same global batches.

- a reward fit of a few optimiser steps (pairs and pointwise labels mixed, uneven
  weights, a last batch smaller than the number of processes) gives the same LoRA and
  head parameters and the same training loss and accuracy as one process;
- PPO iterations on scripted rollouts (responses built from each query, so any split
  of the batch rolls out the same) and a scripted reward give the same adapter and
  value-head parameters and the same global metrics, with minibatches that span both
  processes unevenly and minibatches of one row (the other process adds zeros);
- every process ends with exactly the same weights;
- `torchrun -m trainer reward` on two processes saves one version (rank 0), prints
  once, and saves what one process saves;
- the sharding helpers, and the collectives as no-ops in one process.

Any missing piece (the gradient all-reduce, the global token count, the global
whitening, the shared permutation, the KL controller's global mean) moves the
parameters apart by far more than the tolerance.

Everything runs offline on CPU on the tiny model of tests/tiny.py.
Run: python -m pytest tests/test_distributed.py -q
"""

from __future__ import annotations

import json
import os
import socket
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from assistant.config import ModelArgs
from trainer import distributed, ppo, reward
from trainer.config import RewardArgs
from tests.tiny import save_tiny_model
from trainer.data import Examples, Pair, Pointwise, default_prompts

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
SPAWN_TIMEOUT_S = 240
ATOL = 1e-5
FRUIT = "apple cherry grape lemon mango melon peach plum kiwi fig lime pear".split()

# 13 examples in batches of 6: per process 3, 3 and then 1 and 0 (a process with no example adds zeros)
REWARD_ARGS = RewardArgs(reward_lr=3e-3, reward_epochs=2, reward_batch_size=6, reward_micro_batch_size=2, reward_max_length=64,
                         min_pairs=8, normalizer_size=16, reward_min_steps=0)
# A: 5 rollouts (2 and 3 per process), minibatches of 3 that straddle the processes unevenly,
#    two epochs, two iterations with the adaptive KL controller and the missing-EOS penalty.
# B: minibatches of one row (the other process has none), whitened rewards.
PPO_RUNS = {
    "A": (ppo.PPOConfig(batch_size=5, mini_batch_size=3, ppo_epochs=2, lr=1e-3, init_kl_coef=0.2, target_kl=0.01, missing_eos_penalty=0.5), 2),
    "B": (ppo.PPOConfig(batch_size=4, mini_batch_size=1, ppo_epochs=1, lr=1e-3, whiten_rewards=True, target_kl=None), 1),
}
COMPARED_METRICS = ("objective/scores", "objective/scores_with_eos_penalty", "objective/kl", "objective/kl_coef", "objective/entropy",
                    "policy/approxkl", "policy/clipfrac", "loss/policy", "loss/value", "val/ratio", "val/clipfrac",
                    "val/explained_variance", "response/length", "response/ended")


# -- what both the processes and the reference run -------------------------------------


def reward_examples() -> Examples:
    """9 pairs and 4 thumbs with uneven weights: the step loss must add up across processes."""
    pairs = [Pair((("user", f"Pick a fruit for day {i}."),), f"I suggest {FRUIT[i]} and banana.", f"I suggest {FRUIT[i + 1]}.",
                  f"c{i}", "comparison", weight=0.5 + 0.25 * (i % 4)) for i in range(9)]
    points = [Pointwise((("user", f"Anything for lunch {i}?"),), f"Try {FRUIT[i + 3]}{' and banana' * (i % 2)}.", i % 2,
                        f"p{i}", "thumbs", weight=1.0 + 0.5 * i) for i in range(4)]
    return Examples(pairs=pairs, pointwise=points)


def fit_reward(model_dir: str) -> dict:
    rm, metrics = reward.fit(ModelArgs(model=model_dir, quantize="none", device="cpu"), REWARD_ARGS, reward_examples(), Examples(), progress=False)
    params = {n: p.detach().clone() for n, p in rm.model.named_parameters() if p.requires_grad}
    params.update({f"head.{n}": p.detach().clone() for n, p in rm.head.named_parameters()})
    return {"params": params, "metrics": {k: metrics[k] for k in ("train_loss", "train_accuracy", "steps")}}


def scripted_rollout(model, tokenizer, queries, cfg, eos_ids, pad_id) -> ppo.Rollout:
    """Responses that depend on each query alone, drawing no random numbers: 2 to 5 of
    its tokens from the middle, reversed, ending with EOS when the query's length is even."""
    eos = min(eos_ids)
    rows = []
    for q in queries:
        k, mid = 2 + len(q) % 4, len(q) // 2
        rows.append(q[mid : mid + k].flip(0).tolist() + ([eos] if len(q) % 2 == 0 else []))
    width = max(len(r) for r in rows)
    responses = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        responses[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    ended = torch.tensor([r[-1] == eos for r in rows])
    texts = [tokenizer.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(responses, mask)]
    return ppo.Rollout(queries, responses, mask, texts, ended)


def scripted_reward(prompts, texts) -> torch.Tensor:
    """The share of lowercase letters, minus a little per character: varied across replies."""
    return torch.tensor([sum(c in string.ascii_lowercase for c in t) / max(len(t), 1) - 0.02 * len(t) for t in texts])


def run_ppo(model_dir: str, name: str, init_seed: int = 0) -> dict:
    """A run on a fresh adapter whose LoRA A draws from `init_seed`: each process of a
    launch draws another, so they agree only if all start from rank 0's weights."""
    cfg, iterations = PPO_RUNS[name]
    torch.manual_seed(init_seed)
    model, tokenizer = ppo.build_trainable_policy(ModelArgs(model=model_dir, quantize="none", device="cpu", lora_dropout=0.0))
    state, history, stop = ppo.train(model, tokenizer, default_prompts()[:7], scripted_reward, cfg, iterations, seed=3,
                                     progress=False, log=lambda s: None)
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    params.update({f"value_head.{n}": p.detach().clone() for n, p in state.value_head.named_parameters()})
    return {"params": params, "history": [{k: m[k] for k in COMPARED_METRICS} for m in history], "stop": stop}


def run_all(model_dir: str, rank: int) -> dict:
    ppo.rollout = scripted_rollout  # in a spawned process; the reference run patches it with monkeypatch
    return {"reward": fit_reward(model_dir), **{f"ppo_{name}": run_ppo(model_dir, name, init_seed=rank) for name in PPO_RUNS}}


def _worker(rank: int, port: int, model_dir: str, out_dir: str) -> None:
    """One process of the launch: torchrun's variables, the group, every run, its results saved."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert distributed.init("cpu") and distributed.world() == WORLD and distributed.rank() == rank
    torch.save(run_all(model_dir, rank), Path(out_dir) / f"rank{rank}.pt")
    distributed.destroy()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet_env() -> dict:
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    if Path("/sys/class/net/lo").exists():  # gloo on the loopback interface, whatever the hostname resolves to
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The tiny model at its initial scale. Not the sharpened `tiny_dir`: its saturated
    attention leaves some LoRA gradients at rounding level, and AdamW's first steps move
    each weight by about ±lr whatever its gradient's size, so rounding noise (sums taken
    in another order) would move those weights by lr and fail the comparison on noise alone."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-plain"))


@pytest.fixture(scope="module")
def launched(model_dir, tmp_path_factory) -> list[dict]:
    """Every run on two spawned processes: the results of rank 0 and rank 1."""
    out = tmp_path_factory.mktemp("dp")
    with pytest.MonkeyPatch.context() as env:
        for key, value in quiet_env().items():  # inherited by the spawned processes
            env.setenv(key, value)
        ctx = mp.start_processes(_worker, args=(free_port(), str(model_dir), str(out)), nprocs=WORLD, join=False, start_method="spawn")
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.terminate()
                pytest.fail(f"the {WORLD} processes did not finish within {SPAWN_TIMEOUT_S}s (a collective left waiting?)")
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def single(model_dir) -> dict:
    """Every run in this process, unlaunched."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ppo, "rollout", scripted_rollout)
        return {"reward": fit_reward(str(model_dir)), **{f"ppo_{name}": run_ppo(str(model_dir), name) for name in PPO_RUNS}}


def assert_params_close(got: dict, want: dict):
    assert got.keys() == want.keys() and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=ATOL, msg=name)


# -- two processes against one ------------------------------------------------------------


def test_a_two_process_reward_fit_ends_with_the_parameters_of_one_process(launched, single):
    assert_params_close(launched[0]["reward"]["params"], single["reward"]["params"])
    assert launched[0]["reward"]["metrics"]["steps"] == single["reward"]["metrics"]["steps"] == 6


def test_a_two_process_reward_fit_reports_the_loss_and_accuracy_of_all_processes(launched, single):
    got, want = launched[0]["reward"]["metrics"], single["reward"]["metrics"]
    assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5)
    assert got["train_accuracy"] == want["train_accuracy"]  # over the 9 pairs of the last epoch, not one process's share


@pytest.mark.parametrize("run", sorted(PPO_RUNS))
def test_two_process_ppo_ends_with_the_adapter_and_value_head_of_one_process(launched, single, run):
    got, want = launched[0][f"ppo_{run}"], single[f"ppo_{run}"]
    assert_params_close(got["params"], want["params"])
    assert any(k.startswith("value_head.") for k in want["params"]) and any("lora_B" in k for k in want["params"])


@pytest.mark.parametrize("run", sorted(PPO_RUNS))
def test_two_process_ppo_reports_the_metrics_of_the_global_batch(launched, single, run):
    got, want = launched[0][f"ppo_{run}"], single[f"ppo_{run}"]
    assert len(got["history"]) == len(want["history"]) == PPO_RUNS[run][1]
    for g, w in zip(got["history"], want["history"]):
        for key in COMPARED_METRICS:
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), key


def test_every_process_ends_with_the_same_weights(launched):
    for run in ("reward", *(f"ppo_{name}" for name in PPO_RUNS)):
        first, second = launched[0][run]["params"], launched[1][run]["params"]
        for name in first:
            assert torch.equal(first[name], second[name]), f"{run}: {name}"


def test_the_runs_train(single):
    """The comparisons above mean something: every run moved its parameters away from the start."""
    assert single["ppo_A"]["history"][1]["objective/kl_coef"] != single["ppo_A"]["history"][0]["objective/kl_coef"]
    for run in ("reward", *(f"ppo_{name}" for name in PPO_RUNS)):
        lora_b = [p for n, p in single[run]["params"].items() if "lora_B" in n]
        assert lora_b and all(p.abs().max() > 1e-3 for p in lora_b), run  # LoRA B starts at zero


# -- the command line under torchrun ----------------------------------------------------


def test_torchrun_reward_saves_once_what_one_process_saves(model_dir, tmp_path):
    from trainer.__main__ import main

    records = [{"prompt": f"Pick a fruit for day {i}.", "chosen": f"I suggest {FRUIT[i % 12]} and banana.",
                "rejected": f"I suggest {FRUIT[(i + 5) % 12]}."} for i in range(14)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    db = tmp_path / "feedback.db"
    assert main(["import", str(data), "--db", str(db)]) == 0
    flags = ["--db", str(db), "--model", str(model_dir), "--quantize", "none", "--device", "cpu", "--val-fraction", "0",
             "--min-pairs", "8", "--reward-epochs", "1", "--reward-batch-size", "5", "--reward-max-length", "64",
             "--lock-file", str(tmp_path / "cycle.lock")]
    env = {**os.environ, **quiet_env()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(WORLD),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "trainer", "reward", "--reward-dir", str(tmp_path / "dp"), *flags]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=SPAWN_TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("saved under") == 1, run.stdout  # rank 0 reports; the other process stays quiet
    assert reward.versions(tmp_path / "dp") == ["r000001"]  # saved once

    assert main(["reward", "--reward-dir", str(tmp_path / "one"), *flags]) == 0
    args = ModelArgs(model=str(model_dir), quantize="none", device="cpu")
    two, one = reward.load(tmp_path / "dp", args), reward.load(tmp_path / "one", args)
    torch.testing.assert_close(two.head.weight, one.head.weight, rtol=0, atol=ATOL)
    lora = lambda rm: {n: p for n, p in rm.model.named_parameters() if "lora_" in n}  # noqa: E731
    assert_params_close(lora(two), lora(one))


def test_torchrun_refuses_a_command_that_does_not_run_data_parallel(monkeypatch, tmp_path, capsys):
    from trainer.__main__ import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exc:
        main(["prune", "--adapters-dir", str(tmp_path / "adapters"), "--reward-dir", str(tmp_path / "reward")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "`prune` runs as one process" in err and "reward and ppo" in err
    assert not distributed.active()


# -- the helpers --------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_cover_a_batch_in_rank_order_and_differ_by_at_most_one(world):
    for n in range(11):
        items = list(range(n))
        shards = [distributed.shard(items, r, world) for r in range(world)]
        assert sum(shards, []) == items
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
        assert [distributed.shard_range(n, r, world) for r in range(world)][0][0] == 0


def test_shard_refuses_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="rank 2 is not one of the 2 processes"):
        distributed.shard_range(5, 2, 2)


def test_one_process_is_rank_0_of_1_and_its_collectives_return_their_input(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.launched() and not distributed.init("cpu") and not distributed.active()
    assert (distributed.rank(), distributed.world(), distributed.is_main()) == (0, 1, True)
    t = torch.tensor([1.5, -2.0])
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [1.5, -2.0]
    assert distributed.broadcast(t) is t and t.tolist() == [1.5, -2.0]
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    obj = {"a": 1}
    assert distributed.broadcast_object(obj) is obj
    distributed.barrier()
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]
    with_grad, without = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    with_grad.grad = torch.tensor([0.25, 0.5])
    distributed.all_reduce_grads([with_grad, without])
    distributed.broadcast_params([with_grad, without])
    assert with_grad.grad.tolist() == [0.25, 0.5] and without.grad is None


def test_a_launch_is_more_than_one_process_and_puts_each_on_its_local_gpu(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not distributed.launched()
    assert distributed.local_device("cuda") == "cuda"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.launched()
    assert distributed.local_device("cuda") == "cuda:1"
    assert distributed.local_device("cpu") == "cpu" and distributed.local_device("cuda:3") == "cuda:3"
    assert distributed.local_device("auto") == ("cuda:1" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        distributed.launched()


def test_masked_mean_var_with_a_one_process_reduction_is_masked_mean_and_var():
    x = torch.tensor([[1.0, 2.0, 7.0], [3.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    mean, var = ppo.masked_mean_var(x, mask, all_reduce=lambda t: t)
    torch.testing.assert_close(mean, ppo.masked_mean(x, mask))
    torch.testing.assert_close(var, ppo.masked_var(x, mask))
