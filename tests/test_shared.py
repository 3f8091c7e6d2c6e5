"""Tests for trainer/shared.py: one base model for the reward model, the policy and its
reference within a `sharing` block.

Inside a block the base is loaded once and every model is an adapter on it; scores
match those of a reward model loaded on a base of its own; switching to the reward
adapter to score leaves only the policy trainable; the policy's adapters are released
after a PPO run; outside a block every model gets its own base, as before.

Everything runs on the tiny seeded model from tests/tiny.py, offline, on CPU.
Run: python -m pytest tests/test_shared.py -q
"""

from __future__ import annotations

import pytest
import torch

from assistant import model as modellib
from assistant.config import ModelArgs
from trainer import ppo, reward, shared
from trainer.config import DataArgs, PPOArgs, RewardArgs
from trainer.data import Examples, Pair

PROMPTS = [[{"role": "user", "content": f"Name a colour, take {i}."}] for i in range(6)]
REPLIES = ["Red.", "Blue, I think.", "Green is a colour.", "Yellow!", "Purple and gold.", "Black."]


@pytest.fixture(scope="module")
def model_args(tiny_dir) -> ModelArgs:
    return ModelArgs(model=str(tiny_dir), quantize="none", device="cpu")


@pytest.fixture(scope="module")
def saved_reward(model_args, tmp_path_factory) -> tuple[str, str]:
    """(reward_dir, version): a reward model fitted for a few steps and saved."""
    pairs = [Pair((("user", f"Pick a word {i}."),), f"banana {i}", f"apple {i}", f"c{i}", "comparison") for i in range(8)]
    args = RewardArgs(reward_epochs=1, reward_max_length=64, min_pairs=4, reward_dir=str(tmp_path_factory.mktemp("reward")))
    rm, _ = reward.fit(model_args, args, Examples(pairs=pairs), Examples(), progress=False)
    return args.reward_dir, reward.save(args.reward_dir, rm, {"metrics": {}})


def counting_loads(monkeypatch) -> list:
    calls = []
    real = modellib.load_base

    def load_base(args):
        calls.append(args)
        return real(args)

    monkeypatch.setattr(modellib, "load_base", load_base)
    return calls


def test_one_base_carries_the_reward_model_policy_and_reference(model_args, saved_reward, tmp_path, monkeypatch):
    reward_dir, version = saved_reward
    alone = reward.load(reward_dir, model_args, version).score(PROMPTS, REPLIES)
    loads = counting_loads(monkeypatch)
    with shared.sharing(model_args):
        rm = reward.load(reward_dir, model_args, version)
        parent = tmp_path / "parent"
        rm.model.save_pretrained(str(parent), selected_adapters=[rm.adapter])  # any LoRA will do as a "parent" adapter
        policy, _ = ppo.build_trainable_policy(model_args, parent / rm.adapter)
        assert policy is rm.model, "the policy must sit on the reward model's base"
        assert set(policy.peft_config) == {rm.adapter, ppo.POLICY_ADAPTER, ppo.REFERENCE_ADAPTER}
        assert len(loads) == 1, f"the base was loaded {len(loads)} times"
        trainable_before = sorted(n for n, p in policy.named_parameters() if p.requires_grad)
        assert trainable_before and all(f".{ppo.POLICY_ADAPTER}." in n for n in trainable_before)

        scores = rm.score(PROMPTS, REPLIES)  # switches to the reward adapter and back
        torch.testing.assert_close(scores, alone, atol=1e-5, rtol=0)
        assert policy.active_adapter == ppo.POLICY_ADAPTER
        assert sorted(n for n, p in policy.named_parameters() if p.requires_grad) == trainable_before

        shared.release(policy, ppo.POLICY_ADAPTER, ppo.REFERENCE_ADAPTER)
        assert set(policy.peft_config) == {rm.adapter}
        torch.testing.assert_close(rm.score(PROMPTS, REPLIES), alone, atol=1e-5, rtol=0)
    assert shared.current(model_args) is None


def test_the_policy_sees_its_own_adapter_not_the_reward_models(model_args, saved_reward, tmp_path):
    """Logits of the policy on a shared base, after the reward model scored, equal those
    of the same adapter on a base of its own."""
    reward_dir, version = saved_reward
    ids = torch.tensor([[5, 9, 14, 3, 7]])
    made, _ = ppo.build_trainable_policy(model_args)
    with torch.no_grad():
        for p in made.parameters():
            if p.requires_grad:
                p.add_(0.05)  # a policy that differs from the identity, so a wrong adapter shows
    made.save_pretrained(str(tmp_path), selected_adapters=[ppo.POLICY_ADAPTER])
    parent = tmp_path / ppo.POLICY_ADAPTER
    alone, _ = ppo.build_trainable_policy(model_args, parent)
    with torch.no_grad():
        expected = alone(input_ids=ids).logits
        with ppo.reference(alone, None):
            base_logits = alone(input_ids=ids).logits
    assert not torch.allclose(expected, base_logits, atol=1e-3), "the test adapter must change the logits"
    with shared.sharing(model_args):
        rm = reward.load(reward_dir, model_args, version)
        policy, _ = ppo.build_trainable_policy(model_args, parent)
        with torch.no_grad():
            rm.score(PROMPTS[:2], REPLIES[:2])
            got = policy(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_run_ppo_shares_one_base_and_releases_its_adapters(model_args, saved_reward, tmp_path, monkeypatch):
    reward_dir, version = saved_reward
    loads = counting_loads(monkeypatch)
    ppo_args = PPOArgs(adapters_dir=str(tmp_path / "adapters"), ppo_iterations=1, ppo_batch_size=2, mini_batch_size=2,
                       max_new_tokens=4, reward=version)
    from trainer import steps

    with shared.sharing(model_args) as block:
        out, manifest = steps.run_ppo(model_args, DataArgs(db=str(tmp_path / "none.db")), RewardArgs(reward_dir=reward_dir), ppo_args,
                                      progress=False, prompts=PROMPTS[:2])
        assert len(loads) == 1, f"the base was loaded {len(loads)} times for the reward model and the policy"
        assert set(block.model.peft_config) == {"reward_1"}, "the policy's adapters must be released after publishing"
    assert manifest["reward_model"] == version and out


def test_outside_a_block_every_model_has_its_own_base(model_args, saved_reward, monkeypatch):
    reward_dir, version = saved_reward
    loads = counting_loads(monkeypatch)
    rm = reward.load(reward_dir, model_args, version)
    policy, _ = ppo.build_trainable_policy(model_args)
    assert policy is not rm.model and len(loads) == 2
    assert rm.adapter == reward.ADAPTER
    shared.release(policy, ppo.POLICY_ADAPTER)  # a model of its own: nothing to release
    assert ppo.POLICY_ADAPTER in policy.peft_config


def test_adding_an_adapter_twice_is_refused(model_args):
    from assistant.model import lora_config

    with shared.sharing(model_args):
        shared.adapter_model(model_args, "x", config=lora_config(model_args))
        with pytest.raises(ValueError, match="already on the shared base"):
            shared.adapter_model(model_args, "x", config=lora_config(model_args))
    with pytest.raises(ValueError, match="exactly one"):
        shared.adapter_model(model_args, "y")
