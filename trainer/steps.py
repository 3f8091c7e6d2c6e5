"""The training steps a cycle is made of, each also runnable alone from the CLI.

    fit_reward(...)        one reward model on a train/validation split  (`python -m trainer reward`)
    fit_reward_pair(...)   two reward models on disjoint folds, cross-fitted: the
                           policy's reward (fold A) and the judge (fold B)  (the cycle)
    run_ppo(...)           PPO from the served adapter -> a candidate adapter (`python -m trainer ppo`)
    run_policy(...)        --policy-step (ppo, dpo, kto, sft, grpo, rloo; SFT first on request)
                           -> a candidate adapter (`python -m trainer train`, the cycle)

Why two reward models in a cycle: PPO optimises against its reward model, so that
model's opinion of the result is no evidence that the result is better. The judge is
fitted on the other half of the feedback and PPO never sees it; each model is
validated on the half it did not see, and the two together give a cross-fitted
accuracy on every pair. What it is not: the decision (trainer/gate.py) or the order
of the steps (trainer/schedule.py).

With --reward-condition-on-profile the reward models fit on the feedback merged per
rater profile group (build_examples(by_profile=True)); in a cycle each of those
examples stays in the fold its prompt is in, so the folds stay disjoint and the policy
step (DPO, KTO, SFT on fold A) and the gate (fold B) see the same split. PPO and the
judge score for "any" profile.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from assistant.annotators import DEFAULT_FLOOR
from assistant.config import ModelArgs
from trainer.config import DataArgs, PolicyArgs, PPOArgs, RewardArgs

log = logging.getLogger("trainer")

FOLD_SEED = "fold-v1"  # salt of the cycle's two-fold split (by conversation, like DataArgs.split_seed)


def _snapshot(data_args: DataArgs, snapshot=None):
    from trainer.data import read_snapshot

    if snapshot is not None:
        return snapshot
    if not Path(data_args.db).exists():
        raise ValueError(f"--db {data_args.db}: no feedback database yet; run the app and give feedback, or `python -m trainer import FILE`")
    return read_snapshot(data_args.db)


def _reward_manifest(snapshot, examples, train, val, metrics, reward_args, started, **extra) -> dict:
    return {
        "feedback_ids": snapshot.id_range(),
        "counts": examples.counts,
        "examples": {"train_pairs": len(train.pairs), "train_pointwise": len(train.pointwise),
                     "val_pairs": len(val.pairs), "val_pointwise": len(val.pointwise), "contradictions": examples.contradictions},
        "metrics": metrics,
        "reward_args": vars(reward_args),
        "seconds": time.perf_counter() - started,
        **extra,
    }


def fit_reward(model_args: ModelArgs, data_args: DataArgs, reward_args: RewardArgs, progress: bool = True, snapshot=None):
    """Snapshot the store (unless given one), build examples, split, fit, save.

    Returns (version, manifest, reward_model). Launched data-parallel, only rank 0
    saves; the other processes return version None."""
    from trainer import distributed, reward
    from trainer.data import build_examples, split

    snapshot = _snapshot(data_args, snapshot)
    examples = build_examples(snapshot, data_args.annotator_floor, by_profile=reward_args.reward_condition_on_profile)
    train, val = split(examples, data_args.val_fraction, data_args.split_seed)
    started = time.perf_counter()
    rm, metrics = reward.fit(model_args, reward_args, train, val, progress=progress)
    manifest = _reward_manifest(snapshot, examples, train, val, metrics, reward_args, started, role="single")
    version = reward.save(reward_args.reward_dir, rm, manifest) if distributed.is_main() else None  # rank 0 writes, once
    return version, manifest, rm


def folds(examples):
    """The cycle's two disjoint folds (A, B) of `examples`, split by conversation."""
    from trainer.data import split

    return split(examples, 0.5, FOLD_SEED)


def profile_folds(snapshot, fold_a, fold_b, annotator_floor: float = DEFAULT_FLOOR):
    """(A, B, all): the snapshot's examples merged per rater profile group, each in the
    fold (of `folds` of the examples merged over everyone) that holds its prompt.

    Merging per group makes finer examples, which `folds` could split differently; by
    prompt, every group's view of a prompt lands where the merged examples did, and the
    reward models, the policy step and the gate keep one split between them."""
    from trainer.data import Examples, Pair, build_examples

    side = {ex.prompt: 0 for ex in [*fold_a.pairs, *fold_a.pointwise]}
    side.update({ex.prompt: 1 for ex in [*fold_b.pairs, *fold_b.pointwise]})
    grouped = build_examples(snapshot, annotator_floor, by_profile=True)
    parts = (Examples(), Examples())
    for ex in [*grouped.pairs, *grouped.pointwise]:
        if ex.prompt not in side:
            raise ValueError("a per-profile example's prompt is in neither fold: the folds were not built from this snapshot "
                             f"at annotator floor {annotator_floor} (pass the --annotator-floor the examples were built with)")
        part = parts[side[ex.prompt]]
        (part.pairs if isinstance(ex, Pair) else part.pointwise).append(ex)
        part.contradictions += ex.against > 0
    return parts[0], parts[1], grouped


@dataclass
class CrossFit:
    """The policy's reward model (fitted on fold A) and the judge (fitted on fold B)."""

    policy_rm: object
    judge_rm: object
    policy_version: str
    judge_version: str
    fold_a: object  # Examples
    fold_b: object
    signal: dict  # val_pairs, val_correct, val_accuracy, val_accuracy_lo, val_accuracy_hi, per model


def fit_reward_pair(model_args: ModelArgs, reward_args: RewardArgs, snapshot, examples, progress: bool = True,
                    annotator_floor: float = DEFAULT_FLOOR) -> CrossFit:
    """Fit the policy's reward model on fold A (validated on B) and the judge on fold B
    (validated on A, with another seed); save both. The pooled validation accuracy over
    both folds, with its 95% Wilson interval, is `signal`.

    `examples` are the snapshot's, merged over everyone; CrossFit's folds are theirs.
    With --reward-condition-on-profile the models fit on `profile_folds` instead, built
    at `annotator_floor` (the one `examples` were built with), and their validation
    accuracy, hence `signal`, is that of the scores for "any", the ones PPO and the
    judge use."""
    from trainer import reward

    fold_a, fold_b = folds(examples)
    fit_a, fit_b, fit_examples = fold_a, fold_b, examples
    if reward_args.reward_condition_on_profile:
        fit_a, fit_b, fit_examples = profile_folds(snapshot, fold_a, fold_b, annotator_floor)
    fitted = {}
    for role, train, val, seed in (("policy", fit_a, fit_b, reward_args.seed), ("judge", fit_b, fit_a, reward_args.seed + 1)):
        started = time.perf_counter()
        rm, metrics = reward.fit(model_args, dataclasses.replace(reward_args, seed=seed), train, val, progress=progress)
        manifest = _reward_manifest(snapshot, fit_examples, train, val, metrics, reward_args, started, role=role,
                                    fold="A" if role == "policy" else "B")
        fitted[role] = (reward.save(reward_args.reward_dir, rm, manifest), rm, metrics)
        log.info("reward model %s (%s, fold %s): val accuracy %s on %d pairs", fitted[role][0], role, manifest["fold"],
                 metrics.get("val_accuracy"), metrics.get("val_pairs"))
    n = correct = 0
    for _, _, m in fitted.values():
        if m.get("val_accuracy") is not None:
            n += m["val_pairs"]
            correct += round(m["val_accuracy"] * m["val_pairs"])
    acc, lo, hi = reward.accuracy_ci(correct, n)
    signal = {"val_pairs": n, "val_correct": correct, "val_accuracy": acc if n else None, "val_accuracy_lo": lo, "val_accuracy_hi": hi,
              "policy_val_accuracy": fitted["policy"][2].get("val_accuracy"), "judge_val_accuracy": fitted["judge"][2].get("val_accuracy")}
    return CrossFit(fitted["policy"][1], fitted["judge"][1], fitted["policy"][0], fitted["judge"][0], fold_a, fold_b, signal)


def _reward(model_args: ModelArgs, reward_args: RewardArgs, ppo_args: PPOArgs, reward_fn=None, reward_version: str | None = None):
    """(reward_fn, version): the given one, else the --reward version (default the latest) loaded."""
    from trainer import reward

    if reward_fn is not None:
        return reward_fn, reward_version
    saved = reward.versions(reward_args.reward_dir)
    reward_version = ppo_args.reward or (saved[-1] if saved else None)
    if reward_version is None:
        raise ValueError(f"--reward-dir {reward_args.reward_dir}: no reward model yet; fit one with `python -m trainer reward`")
    rm = reward.load(reward_args.reward_dir, model_args, reward_version)

    def score(prompts, texts):
        return rm.score(prompts, texts, batch_size=reward_args.reward_eval_batch_size)

    return score, reward_version


def _prompts(snapshot, ppo_args: PPOArgs, prompts: list | None) -> tuple[list, dict]:
    from trainer.data import default_prompts, snapshot_prompts

    if prompts is not None:
        return prompts, {"given": len(prompts)}
    from_store = snapshot_prompts(snapshot, ppo_args.max_prompts) if snapshot is not None else []
    prompts = from_store if len(from_store) >= ppo_args.ppo_batch_size else from_store + default_prompts()
    return prompts, {"from_store": len(from_store), "default": len(prompts) - len(from_store)}


def run_ppo(model_args: ModelArgs, data_args: DataArgs, reward_args: RewardArgs, ppo_args: PPOArgs, progress: bool = True,
            reward_fn=None, reward_version: str | None = None, prompts: list | None = None, extra: dict | None = None,
            snapshot=None, reward_functions: list | None = None, start_dir: str | Path | None = None):
    """PPO from the served adapter against a reward model; publishes a candidate. Returns (version, manifest).

    `reward_fn(prompts, texts) -> (B,) scores` replaces loading the reward model (a
    scripted reward, or one the caller already holds as `reward_version`); `prompts`
    replaces the snapshot's prompts plus the default set; `extra` goes into the manifest;
    `reward_functions` (trainer/rewards.py) are added to the score.
    The run continues the parent's value head and KL controller (saved beside it) and
    uses the parent as its reference policy; both are saved with the candidate.
    `start_dir`: an adapter (an SFT result) to start from and use as the reference
    instead of the parent's weights.

    The reward model, the policy and its reference share one base (trainer/shared.py):
    the caller's `sharing` block when it has one (a cycle), else one opened here."""
    from trainer import shared

    with shared.sharing(model_args):
        return _run_ppo(model_args, data_args, reward_args, ppo_args, progress, reward_fn, reward_version, prompts, extra, snapshot,
                        reward_functions, start_dir)


def _run_ppo(model_args, data_args, reward_args, ppo_args, progress, reward_fn, reward_version, prompts, extra, snapshot,
             reward_functions, start_dir):
    from assistant import adapters
    from trainer import distributed, ppo, rewards, shared
    from trainer.policy import parent_of

    started = time.perf_counter()
    reward_fn, reward_version = _reward(model_args, reward_args, ppo_args, reward_fn, reward_version)
    reward_fn = rewards.combine(reward_fn, reward_functions or [])
    if snapshot is None and Path(data_args.db).exists():
        snapshot = _snapshot(data_args)
    prompts, prompt_counts = _prompts(snapshot, ppo_args, prompts)
    parent, parent_dir, parent_manifest = parent_of(ppo_args.adapters_dir)
    from_sft = start_dir is not None
    start_dir = start_dir if from_sft else parent_dir
    model, tokenizer = ppo.build_trainable_policy(model_args, start_dir)
    try:
        cfg = ppo.config_from(ppo_args)
        device = next(model.parameters()).device
        state, resumed = ppo.load_state(parent_dir, parent_manifest, model.get_base_model().config.hidden_size, cfg, device)
        kl_coef_start = state.kl_ctl.value
        log.info("PPO from %s: %s value head and KL controller (kl_coef %.4f)", parent, "the parent's" if resumed else "a fresh", kl_coef_start)
        state, history, stop = ppo.train(model, tokenizer, prompts, reward_fn, cfg, ppo_args.ppo_iterations, seed=ppo_args.ppo_seed,
                                         prompt_max_tokens=ppo_args.prompt_max_tokens, progress=progress, log=log.info, state=state,
                                         ref_adapter=ppo.REFERENCE_ADAPTER if start_dir is not None else None)
        tensors, state_json = ppo.save_state(state)
        files = {ppo.STATE_FILE: tensors}
        if from_sft:  # the reference PPO was held to; the gate budgets this run's KL against it
            files[adapters.REFERENCE_FILE] = reference_weights(start_dir)
        manifest = {
            "kind": "ppo",
            "policy_step": "ppo",
            "parent": parent,
            "reward_model": reward_version or "scripted",
            "feedback_ids": snapshot.id_range() if snapshot is not None else {},
            "prompts": prompt_counts,
            "base_model": model_args.model,
            "quantize": model_args.quantize,
            "ppo_args": vars(ppo_args),
            "stop_reason": stop,
            "metrics": history,
            "reward_functions": rewards.describe(reward_functions or []),
            "optimised_from": "sft" if from_sft else "parent",
            ppo.STATE_KEY: {**state_json, "resumed_from_parent": resumed, "kl_coef_start": kl_coef_start},
            "seconds": time.perf_counter() - started,
            **(extra or {}),
        }
        version = None  # launched data-parallel, rank 0 publishes, once; the others return None
        if distributed.is_main():
            version = adapters.publish(ppo_args.adapters_dir, model, ppo.POLICY_ADAPTER, manifest, tensors=files)
    finally:  # the shared base keeps serving the cycle's other models
        shared.release(model, ppo.POLICY_ADAPTER, ppo.REFERENCE_ADAPTER)
    return version, manifest


def reference_weights(adapter_dir) -> dict:
    """The LoRA weights of a saved adapter directory, by the names peft saved them under."""
    from safetensors.torch import load_file

    return load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))


def _stage_weights(model) -> dict:
    """The trainable adapter's weights as `reference_weights` reads them back."""
    from trainer import policy

    with tempfile.TemporaryDirectory(prefix="stage-") as d:
        model.save_pretrained(d, selected_adapters=[policy.ADAPTER])
        return {k: v.clone() for k, v in reference_weights(d).items()}


def run_policy(model_args: ModelArgs, data_args: DataArgs, reward_args: RewardArgs, ppo_args: PPOArgs, policy_args: PolicyArgs,
               progress: bool = True, reward_fn=None, reward_version: str | None = None, prompts: list | None = None,
               snapshot=None, examples=None, extra: dict | None = None):
    """`--policy-step` (after SFT when --sft-first) from the served adapter → a candidate.
    Returns (version, manifest).

    examples: the feedback to learn from (a cycle passes its fold A; default: the whole
    snapshot); prompts: GRPO/RLOO/PPO prompts (default: the snapshot's, then the default
    set). Reward functions and demonstrations are loaded and checked before any training."""
    from assistant import adapters
    from trainer import policy, rewards
    from trainer.data import Examples, build_examples

    started = time.perf_counter()
    step = policy_args.policy_step
    funcs = rewards.load(policy_args.reward_functions) if policy_args.reward_functions else []
    demos = policy.read_demonstrations(policy_args.demonstrations) if policy_args.demonstrations else []
    needs_reward = step in ("ppo", "grpo", "rloo")
    if needs_reward:
        reward_fn, reward_version = _reward(model_args, reward_args, ppo_args, reward_fn, reward_version)
    if snapshot is None and Path(data_args.db).exists():
        snapshot = _snapshot(data_args)
    if examples is None:
        examples = build_examples(snapshot, data_args.annotator_floor) if snapshot is not None else None
    info = {"policy_step": step, "sft_first": policy_args.sft_first, "policy_args": vars(policy_args), **(extra or {})}
    if step == "ppo" and not policy_args.sft_first:
        return run_ppo(model_args, data_args, reward_args, ppo_args, progress=progress, reward_fn=reward_fn, reward_version=reward_version,
                       prompts=prompts, snapshot=snapshot, reward_functions=funcs, extra=info)
    parent, parent_dir, _ = policy.parent_of(ppo_args.adapters_dir)
    model, tokenizer = policy.build_policy(model_args, parent_dir)
    stages = {}
    sft_rows = len(policy.sft_rows(examples or Examples(), demos))
    if step == "sft" or (policy_args.sft_first and sft_rows >= policy_args.min_policy_rows):
        stages["sft"] = policy.train_step("sft", model, tokenizer, policy_args, ppo_args, examples=examples, demonstrations=demos, progress=progress)
        log.info("SFT on %d demonstrations in %.0fs", stages["sft"]["rows"], stages["sft"]["seconds"])
    elif policy_args.sft_first:
        info["sft_skipped"] = f"{sft_rows} demonstrations, fewer than --min-policy-rows {policy_args.min_policy_rows}"
        log.info("SFT skipped: %s", info["sft_skipped"])
    if step == "ppo" and "sft" not in stages:
        del model
        return run_ppo(model_args, data_args, reward_args, ppo_args, progress=progress, reward_fn=reward_fn, reward_version=reward_version,
                       prompts=prompts, snapshot=snapshot, reward_functions=funcs, extra=info)
    if step == "ppo":
        with tempfile.TemporaryDirectory(prefix="sft-") as start:
            model.save_pretrained(start)
            del model
            version, manifest = run_ppo(model_args, data_args, reward_args, ppo_args, progress=progress, reward_fn=reward_fn,
                                        reward_version=reward_version, prompts=prompts, snapshot=snapshot, reward_functions=funcs,
                                        start_dir=start, extra={**info, "sft": stages["sft"]})
        return version, manifest
    files = {}
    if step != "sft" and "sft" in stages:  # the optimising step starts from the SFT result: the gate budgets its KL from there
        files[adapters.REFERENCE_FILE] = _stage_weights(model)
    if step in ("grpo", "rloo"):
        prompts, prompt_counts = _prompts(snapshot, ppo_args, prompts)
        info["prompts"] = prompt_counts
        stages[step] = policy.train_step(step, model, tokenizer, policy_args, ppo_args, prompts=prompts,
                                         reward_fn=rewards.combine(reward_fn, funcs), progress=progress)
    elif step != "sft":
        stages[step] = policy.train_step(step, model, tokenizer, policy_args, ppo_args, examples=examples, progress=progress)
    manifest = {
        "kind": step,
        "parent": parent,
        "reward_model": reward_version if needs_reward else None,
        "feedback_ids": snapshot.id_range() if snapshot is not None else {},
        "base_model": model_args.model,
        "quantize": model_args.quantize,
        "rows": {name: s["rows"] for name, s in stages.items()},
        "metrics": {name: s["history"] for name, s in stages.items()},
        "reward_functions": rewards.describe(funcs),
        "optimised_from": None if step == "sft" else "sft" if files else "parent",  # None: imitation only
        "seconds": time.perf_counter() - started,
        **info,
    }
    version = adapters.publish(ppo_args.adapters_dir, model, policy.ADAPTER, manifest, tensors=files)
    log.info("%s candidate %s from %s (%s)", step, version, parent, ", ".join(f"{k}: {v} rows" for k, v in manifest["rows"].items()))
    return version, manifest
