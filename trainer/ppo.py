"""PPO on the policy's LoRA adapter against a reward function, the way the field does it.

The top half is pure math on tensors (masked statistics, GAE, the clipped losses,
KL estimators, the adaptive KL controller), each small enough to check against a
slow reference. The bottom half is `ppo_iteration`, one numbered recipe:

    (1) roll out responses from prompts with the policy
    (2) score them with the reward model (missing-EOS penalty subtracted, if on)
    (3) per-token log-probs of the policy and of the reference (the parent adapter
        the run started from, or the base with the adapter disabled)
    (4) rewards = score at the last token − kl_coef · KL per token
    (5) values from the value head
    (6) GAE advantages and returns; advantages whitened
    (7) PPO epochs over mini-batches: clipped policy loss + vf_coef · clipped value loss,
        gradient-norm clipping, non-finite checks

Names follow TRL's former PPO trainer (`kl_coef`, `cliprange`, `cliprange_value`,
`vf_coef`, `gamma`, `lam`) and its logged metrics (`objective/kl`, `policy/clipfrac`,
...), so readers recognise every knob. The reference policy is the adapter this run
started from (the served one), loaded a second time as a frozen adapter on the same
base, or the base itself (adapter disabled) on a cold start; no second copy of the
base weights exists. The KL penalty is therefore this cycle's change; the total KL to
the base is the gate's concern (trainer/gate.py).

Rollouts sample with the temperature and top-p the app serves with; log-probs use
logits scaled by the temperature over the whole vocabulary (the importance ratio and
the KL ignore the top-p truncation, as TRL's former PPO trainer did). State that
carries over between cycles, the value head and the KL controller, is `PPOState`:
saved with each adapter (`save_state`) and loaded by the next run (`load_state`).

Under torchrun (trainer/distributed.py) each process rolls out its share of every
batch and the statistics, minibatches and gradients are made global, so the run is
the single-process one spread over the processes (`ppo_iteration`, `train`).

What it is not: data loading or publishing (schedule.py and __main__.py do that).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer import distributed

# ------------------------------------------------------------------ pure math


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp_min(1.0)
    return var


def masked_mean_var(x: torch.Tensor, mask: torch.Tensor, all_reduce=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked_mean, unbiased masked_var) of `x`. With `all_reduce` (sums a tensor over
    processes, in place: `distributed.all_reduce_sum`) they are those of every process's
    masked entries together, in two passes like masked_var (mean first, then the squared
    deviations from it), so a data-parallel run whitens with the global batch's statistics."""
    if all_reduce is None:
        return masked_mean(x, mask), masked_var(x, mask)
    mask = mask.to(x.dtype)
    sums = all_reduce(torch.stack([(x * mask).sum(), mask.sum()]))  # (2,): Σ x, n over every process
    n = sums[1]
    mean = sums[0] / n.clamp_min(1.0)
    squares = all_reduce(((x - mean) ** 2 * mask).sum())
    var = squares / n.clamp_min(1.0) * n / (n - 1).clamp_min(1.0)
    return mean, var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, all_reduce=None) -> torch.Tensor:
    """Normalise `x` to unit variance (and zero mean if `shift_mean`) over masked entries
    (of every process with `all_reduce`, as in masked_mean_var)."""
    mean, var = masked_mean_var(x, mask, all_reduce)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over response tokens.

    rewards, values, mask: (B, T), mask 1 on response tokens (right-padded).
    Returns (advantages, returns), both (B, T) and zero where mask is 0."""
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < T else 0.0)
        last = last * mask[:, t]
        advantages[:, t] = last
    returns = advantages + values
    return advantages * mask, returns * mask


def policy_loss(logprobs, old_logprobs, advantages, mask, cliprange: float):
    """Clipped surrogate objective. All (B, T). Returns (loss, clipfrac, approxkl)."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    clipfrac = masked_mean((pg_losses2 > pg_losses).float(), mask)
    approxkl = 0.5 * masked_mean(log_ratio**2, mask)
    return loss, clipfrac, approxkl


def value_loss(values, old_values, returns, mask, cliprange_value: float):
    """Clipped value loss (PPO2). All (B, T). Returns (loss, clipfrac)."""
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf_losses1 = (values - returns) ** 2
    vf_losses2 = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), mask)
    return loss, clipfrac


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate log p − log q (unbiased, can be negative)."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate (r − 1) − log r with r = q/p (non-negative, low variance)."""
    log_r = ref_logprobs - logprobs
    return torch.expm1(log_r) - log_r


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """rewards (B, T) = −kl_coef · kl on every response token, plus the score on the last one."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1) - 1).clamp_min(0).long()  # (B,)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(tokens) under logits scaled by the sampling temperature. logits (B, T, V), tokens (B, T)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, all_reduce=None) -> float:
    """1 − Var(returns − values) / Var(returns) over masked entries (of every process with `all_reduce`)."""
    var_returns = masked_mean_var(returns, mask, all_reduce)[1]
    return float(1 - masked_mean_var(returns - values, mask, all_reduce)[1] / var_returns) if var_returns > 0 else float("nan")


class AdaptiveKLController:
    """Ziegler et al. 2019: move kl_coef so the observed KL tracks `target` over `horizon` samples.

    `update(kl, n_steps)` with n_steps = rollouts of the iteration: at the defaults (8
    rollouts, horizon 32) β moves by up to 5% per iteration, so it can double or halve
    within a cycle or two; its value carries over to the next cycle through `PPOState`."""

    def __init__(self, init_kl_coef: float, target: float | None, horizon: int = 32):
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def update(self, current_kl: float, n_steps: int) -> None:
        if self.target is None:  # fixed coefficient
            return
        proportional_error = max(-0.2, min(0.2, current_kl / self.target - 1))
        self.value *= 1 + proportional_error * n_steps / self.horizon


class ValueHead(nn.Module):
    """Scalar value per token from the policy's last hidden state."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T)
        return self.summary(hidden.float()).squeeze(-1)


# ------------------------------------------------------------------ the loop


@dataclass
class PPOConfig:
    """Knobs of one PPO iteration (the CLI's PPOArgs fill these in)."""

    batch_size: int = 8  # prompts per iteration
    mini_batch_size: int = 4
    ppo_epochs: int = 2
    lr: float = 1e-4
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    init_kl_coef: float = 0.05
    target_kl: float | None = 6.0  # adaptive controller target; None = fixed kl_coef
    kl_horizon: int = 32  # in rollouts
    kl_ceiling: float = 12.0  # mean sequence KL above this stops the run and restores the last weights under it
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    max_grad_norm: float = 1.0
    missing_eos_penalty: float | None = None  # subtracted from the score of replies that never emitted EOS; None/0 = off
    whiten_rewards: bool = False


@dataclass
class PPOState:
    """What one run hands to the next: the value head and the KL controller."""

    value_head: ValueHead
    kl_ctl: AdaptiveKLController


STATE_FILE = "ppo_state.safetensors"  # beside the adapter: the value head's weights
STATE_KEY = "ppo_state"  # manifest field: the KL controller and where the value head came from


def new_state(hidden_size: int, cfg: "PPOConfig", device="cpu") -> PPOState:
    return PPOState(ValueHead(hidden_size).to(device), AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon))


def save_state(state: PPOState) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors for STATE_FILE, JSON for the manifest's STATE_KEY)."""
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in state.value_head.state_dict().items()}
    return tensors, {"kl_ctl": state.kl_ctl.state_dict()}


def load_state(adapter_dir, manifest: dict, hidden_size: int, cfg: "PPOConfig", device="cpu") -> tuple[PPOState, bool]:
    """The state saved beside a parent adapter, or a fresh one. Returns (state, resumed).

    The controller resumes at the parent's β with this run's target and horizon (the
    settings may have changed between cycles; the learned β is what carries over)."""
    from pathlib import Path

    from safetensors.torch import load_file

    state = new_state(hidden_size, cfg, device)
    path = Path(adapter_dir) / STATE_FILE if adapter_dir is not None else None
    saved = (manifest or {}).get(STATE_KEY) or {}
    if path is None or not path.is_file() or "kl_ctl" not in saved:
        return state, False
    tensors = load_file(str(path))
    if tuple(tensors["summary.weight"].shape) != tuple(state.value_head.summary.weight.shape):
        return state, False
    state.value_head.load_state_dict({k: v.to(device) for k, v in tensors.items()})
    value = float(saved["kl_ctl"]["value"])
    if math.isfinite(value) and value > 0:
        state.kl_ctl.value = value
    return state, True


class NonFiniteError(RuntimeError):
    """A loss, logit or gradient was NaN/inf; the update was skipped and the run must stop."""


@dataclass
class Rollout:
    queries: list[torch.Tensor]  # prompt ids, one (Tq,) tensor each
    responses: torch.Tensor  # (B, T) response ids, right-padded with pad_id
    mask: torch.Tensor  # (B, T) 1 on response tokens up to and including EOS
    texts: list[str]
    ended: torch.Tensor  # (B,) bool: emitted EOS


def _batch_sequences(queries: list[torch.Tensor], responses: torch.Tensor, pad_id: int):
    """Left-pad queries and append right-padded responses: (B, L) ids, attention mask, query width."""
    width = max(len(q) for q in queries)
    B, T = responses.shape
    ids = torch.full((B, width + T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, width + T), dtype=torch.long)
    for i, q in enumerate(queries):
        ids[i, width - len(q) : width] = q
        attn[i, width - len(q) : width] = 1
    ids[:, width:] = responses
    return ids, attn, width


def forward_logprobs(model, value_head, queries, responses, resp_mask, pad_id, temperature, with_values: bool):
    """Per-token log-probs (B, T) of `responses` (and values (B, T), logits entropy) under `model`."""
    ids, attn, width = _batch_sequences(queries, responses, pad_id)
    ids, attn = ids.to(responses.device), attn.to(responses.device)
    attn[:, width:] = resp_mask
    position_ids = (attn.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=attn, position_ids=position_ids, output_hidden_states=with_values)
    T = responses.shape[1]
    logits = out.logits[:, width - 1 : width - 1 + T]  # (B, T, V): position t predicts response token t
    logprobs = logprobs_from_logits(logits, responses, temperature)
    values = value_head(out.hidden_states[-1][:, width - 1 : width - 1 + T]) if with_values else None
    return logprobs, values, logits


@torch.no_grad()
def rollout(model, tokenizer, queries: list[torch.Tensor], cfg: PPOConfig, eos_ids: set[int], pad_id: int) -> Rollout:
    """(1) Sample responses from the policy (adapter on), batched with left padding."""
    device = next(model.parameters()).device
    ids, attn, width = _batch_sequences(queries, torch.zeros((len(queries), 0), dtype=torch.long), pad_id)
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=attn.to(device),
        do_sample=True,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=0,
        max_new_tokens=cfg.max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=sorted(eos_ids),
    )
    responses = out[:, width:].cpu()
    B, T = responses.shape
    mask = torch.zeros((B, T), dtype=torch.long)
    ended = torch.zeros(B, dtype=torch.bool)
    for i in range(B):
        n = T
        for t in range(T):
            if int(responses[i, t]) in eos_ids:
                n, ended[i] = t + 1, True
                break
        mask[i, :n] = 1
        responses[i, n:] = pad_id
    texts = [tokenizer.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(responses, mask)]
    return Rollout(queries, responses, mask, texts, ended)


def degenerate(texts: list[str], responses: torch.Tensor, mask: torch.Tensor) -> int:
    """Count empty replies and replies dominated by one repeated token."""
    count = 0
    for text, r, m in zip(texts, responses, mask):
        toks = r[m.bool()].tolist()
        if not text.strip():
            count += 1
        elif len(toks) >= 8 and max(toks.count(t) for t in set(toks)) / len(toks) > 0.5:
            count += 1
    return count


def eos_penalised(scores: torch.Tensor, ended: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """scores − penalty where a reply hit the cap without EOS (TRL's missing_eos_penalty). (B,), (B,) bool."""
    if not penalty:
        return scores
    return scores - penalty * (~ended).to(scores.dtype)


REFERENCE_ADAPTER = "reference"  # peft name of the frozen parent adapter in a PPO run


@contextlib.contextmanager
def reference(model, ref_adapter: str | None):
    """Run the reference policy inside the block: the frozen adapter `ref_adapter`, or
    the base with adapters disabled when it is None. The active adapter is restored after."""
    from trainer.shared import using

    if ref_adapter is None:
        with model.disable_adapter():
            yield
        return
    with using(model, ref_adapter):
        yield


def ppo_iteration(model, value_head, optimizer, tokenizer, queries, prompts, reward_fn, cfg: PPOConfig, kl_ctl: AdaptiveKLController, eos_ids, pad_id,
                  ref_adapter: str | None = None):
    """One numbered PPO iteration. `reward_fn(prompts, texts) -> (B,) scores`. Returns metrics.

    `ref_adapter` names the frozen adapter that is the reference policy (None: the base).

    Launched data-parallel (trainer/distributed.py), `queries` and `prompts` are this
    process's contiguous share of the global batch (`distributed.shard`, in rank order):
    it rolls out, scores and evaluates its own rows; advantages are whitened with the
    global batch's statistics and the KL controller moves on the global mean KL. Each
    PPO epoch draws one permutation of the global batch (rank 0's) and every process
    takes its rows of each minibatch; token-mean losses are divided by the minibatch's
    global token count, so the gradients summed across processes (value head included)
    are the single-process ones, and every process takes the same step (one with no
    rows in a minibatch adds zeros). Metrics are those of the global batch. A non-finite
    value on any process stops them all."""
    times = {}
    device = next(model.parameters()).device
    model.eval()  # dropout off for rollout, scoring and the update (the KL terms assume it)
    if not queries:
        raise ValueError("ppo_iteration: no prompts to roll out")
    world, rank = distributed.world(), distributed.rank()
    reduce = distributed.all_reduce_sum if world > 1 else None  # global statistics when data-parallel
    sizes = torch.zeros(world, dtype=torch.long)
    sizes[rank] = len(queries)
    distributed.all_reduce_sum(sizes)  # (world,): rows per process
    B, offset, local = int(sizes.sum()), int(sizes[:rank].sum()), len(queries)  # global batch; this process's rows are offset..offset+local

    # (1) roll out responses from prompts
    t = time.perf_counter()
    ro = rollout(model, tokenizer, queries, cfg, eos_ids, pad_id)
    responses, mask = ro.responses.to(device), ro.mask.to(device)
    times["time/rollout"] = time.perf_counter() - t

    # (2) score with the reward model; replies that never ended lose the missing-EOS penalty
    t = time.perf_counter()
    raw_scores = reward_fn(prompts, ro.texts).to(device).float()  # (B,)
    if distributed.any_rank(not torch.isfinite(raw_scores).all()):
        raise NonFiniteError("non-finite reward scores; update skipped")
    scores = eos_penalised(raw_scores, ro.ended.to(device), cfg.missing_eos_penalty)
    times["time/score"] = time.perf_counter() - t

    # (3) per-token log-probs of policy and reference (the parent adapter, or the base), (5) values
    t = time.perf_counter()
    fmask = mask.float()
    with torch.no_grad():
        old_logprobs, old_values, logits = forward_logprobs(model, value_head, queries, responses, mask, pad_id, cfg.temperature, True)
        token_entropy = entropy_from_logits(logits, cfg.temperature)  # (B, T)
        entropy = masked_mean(token_entropy, fmask)
        with reference(model, ref_adapter):
            ref_logprobs, _, _ = forward_logprobs(model, value_head, queries, responses, mask, pad_id, cfg.temperature, False)
    if distributed.any_rank(not (torch.isfinite(old_logprobs).all() and torch.isfinite(ref_logprobs).all())):
        raise NonFiniteError("non-finite log-probs in the rollout; update skipped")
    kl = kl_k1(old_logprobs, ref_logprobs) * fmask  # (B, T)

    # (4) rewards = score at the last token − kl_coef · KL per token
    rewards = per_token_rewards(scores, kl, fmask, kl_ctl.value)
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, fmask, shift_mean=False, all_reduce=reduce)

    # (6) GAE advantages and returns; whitened advantages
    advantages, returns = compute_gae(rewards, old_values, fmask, cfg.gamma, cfg.lam)
    advantages = masked_whiten(advantages, fmask, all_reduce=reduce)
    times["time/reference"] = time.perf_counter() - t

    # (7) PPO epochs over mini-batches
    t = time.perf_counter()
    stats = {"pg_loss": [], "vf_loss": [], "clipfrac": [], "vf_clipfrac": [], "approxkl": [], "ratio": []}
    params = [p for p in model.parameters() if p.requires_grad] + list(value_head.parameters())
    for _ in range(cfg.ppo_epochs):
        order = distributed.broadcast(torch.randperm(B))  # one permutation of the global batch, rank 0's
        for start in range(0, B, cfg.mini_batch_size):
            idx = order[start : start + cfg.mini_batch_size]
            idx = idx[(idx >= offset) & (idx < offset + local)] - offset  # this process's rows of the minibatch
            m = fmask[idx]
            n_tokens = distributed.all_reduce_sum(m.sum())  # the minibatch's tokens over every process
            share = m.sum() / n_tokens.clamp_min(1.0)  # token means below are over the whole minibatch (1 in one process)
            loss, mb_stats = None, torch.zeros(len(stats), device=device)
            if len(idx):
                mb_q = [queries[i] for i in idx.tolist()]
                logprobs, values, _ = forward_logprobs(model, value_head, mb_q, responses[idx], mask[idx], pad_id, cfg.temperature, True)
                pg, clipfrac, approxkl = policy_loss(logprobs, old_logprobs[idx], advantages[idx], m, cfg.cliprange)
                vf, vf_clipfrac = value_loss(values, old_values[idx], returns[idx], m, cfg.cliprange_value)
                with torch.no_grad():
                    ratio = masked_mean(torch.exp(logprobs - old_logprobs[idx]), m)
                loss = (pg + cfg.vf_coef * vf) * share
                mb_stats = torch.stack([pg, vf, clipfrac, vf_clipfrac, approxkl, ratio]).detach() * share  # in the order of `stats`
            distributed.all_reduce_sum(mb_stats)  # the minibatch's token means over every process
            total = mb_stats[0] + cfg.vf_coef * mb_stats[1]
            if not torch.isfinite(total):
                optimizer.zero_grad(set_to_none=True)
                raise NonFiniteError(f"non-finite loss ({float(total)}); update skipped")
            optimizer.zero_grad(set_to_none=True)
            if loss is not None:
                loss.backward()
            distributed.all_reduce_grads(params)  # the whole minibatch's gradient, the same on every process
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if not torch.isfinite(grad_norm):
                optimizer.zero_grad(set_to_none=True)
                raise NonFiniteError("non-finite gradient norm; update skipped")
            optimizer.step()
            for k, v in zip(stats, mb_stats.tolist()):
                stats[k].append(v)
    times["time/update"] = time.perf_counter() - t

    gen_tokens, degenerate_count = int(mask.sum()), degenerate(ro.texts, ro.responses, ro.mask)
    mean_kl, mean_raw, mean_scores = float((kl.sum(1)).mean()), float(raw_scores.mean()), float(scores.mean())
    ended, entropy = float(ro.ended.float().mean()), float(entropy)
    if world > 1:  # the global batch's figures, from every process's sums
        sums = distributed.all_reduce_sum(torch.tensor([float(kl.sum()), float(raw_scores.sum()), float(scores.sum()), float(ro.ended.sum()),
                                                        float((token_entropy * fmask).sum()), gen_tokens, degenerate_count], dtype=torch.float64))
        mean_kl, mean_raw, mean_scores, ended = (float(x) / B for x in sums[:4])
        entropy, gen_tokens, degenerate_count = float(sums[4] / sums[5].clamp_min(1.0)), int(sums[5]), int(sums[6])
    kl_ctl.update(mean_kl, B)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {
        "objective/scores": mean_raw,
        "objective/scores_with_eos_penalty": mean_scores,
        "objective/kl": mean_kl,
        "objective/kl_coef": kl_ctl.value,
        "objective/entropy": entropy,
        "policy/approxkl": mean(stats["approxkl"]),
        "policy/clipfrac": mean(stats["clipfrac"]),
        "loss/policy": mean(stats["pg_loss"]),
        "loss/value": mean(stats["vf_loss"]),
        "val/ratio": mean(stats["ratio"]),
        "val/clipfrac": mean(stats["vf_clipfrac"]),
        "val/explained_variance": explained_variance(old_values, returns, fmask, all_reduce=reduce),
        "response/length": gen_tokens / B,
        "response/ended": ended,
        "response/degenerate": degenerate_count,
        "tokens_per_s/rollout": gen_tokens / max(times["time/rollout"], 1e-9),  # all processes' tokens, rolled out side by side
        **times,
        "samples": ro.texts[:2],
    }


def kl_too_high(metrics: dict, cfg: PPOConfig) -> bool:
    return math.isfinite(metrics["objective/kl"]) and metrics["objective/kl"] > cfg.kl_ceiling


# ------------------------------------------------------------------ a whole run


def config_from(args) -> PPOConfig:
    """PPOConfig from the CLI's PPOArgs."""
    return PPOConfig(
        batch_size=args.ppo_batch_size,
        mini_batch_size=args.mini_batch_size,
        ppo_epochs=args.ppo_epochs,
        lr=args.ppo_lr,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        init_kl_coef=args.init_kl_coef,
        target_kl=args.target_kl or None,
        kl_horizon=args.kl_horizon,
        kl_ceiling=args.kl_ceiling,
        cliprange=args.cliprange,
        cliprange_value=args.cliprange_value,
        vf_coef=args.vf_coef,
        gamma=args.gamma,
        lam=args.lam,
        max_grad_norm=args.max_grad_norm,
        missing_eos_penalty=args.missing_eos_penalty or None,
    )


POLICY_ADAPTER = "policy"


def build_trainable_policy(model_args, parent_dir=None):
    """(peft model with a trainable 'policy' adapter, tokenizer). The adapter starts
    from `parent_dir` (the adapter being served) when given, else fresh (identity).

    With a parent, the same weights are loaded a second time as the frozen adapter
    REFERENCE_ADAPTER, the reference policy of the run (`train(..., ref_adapter=...)`).
    Inside a `trainer.shared.sharing` block both go on the block's shared base (beside
    the reward model); release them with `trainer.shared.release` when done."""
    from assistant.model import lora_config
    from trainer.shared import adapter_model

    if parent_dir is not None:
        tokenizer, model = adapter_model(model_args, POLICY_ADAPTER, path=parent_dir, trainable=True)
        model.load_adapter(str(parent_dir), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    else:
        tokenizer, model = adapter_model(model_args, POLICY_ADAPTER, config=lora_config(model_args))
    model.set_adapter(POLICY_ADAPTER)
    for name, p in model.named_parameters():  # only the policy trains; the reference and any reward model stay frozen
        p.requires_grad_(f".{POLICY_ADAPTER}." in name)
    model.eval()
    return model, tokenizer


def special_ids(model, tokenizer) -> tuple[set[int], int]:
    """(token ids that end a reply, pad id) of a model and its tokenizer."""
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    return eos_ids, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)


def encode_prompts(tokenizer, prompts: list[list[dict]], max_tokens: int) -> tuple[list[list[dict]], list[torch.Tensor]]:
    """Chat-template the prompts; drop those longer than `max_tokens`."""
    from assistant.chat import build_prompt

    kept, queries = [], []
    for p in prompts:
        ids = build_prompt(tokenizer, p)
        if len(ids) <= max_tokens:
            kept.append(p)
            queries.append(torch.tensor(ids, dtype=torch.long))
    return kept, queries


def train(model, tokenizer, prompts: list[list[dict]], reward_fn, cfg: PPOConfig, iterations: int, seed: int = 0,
          prompt_max_tokens: int = 256, progress: bool = True, log=print, state: PPOState | None = None,
          ref_adapter: str | None = None):
    """Run PPO iterations on `model`'s trainable adapter; returns (state, history, stop_reason).

    `state` continues a previous run's value head and KL controller (a fresh one when
    None); `ref_adapter` is the frozen reference adapter (None: the base). When the
    rollouts' mean KL to the reference exceeds `cfg.kl_ceiling`, the run stops and the
    adapter and value head go back to the last weights whose rollouts were under it
    (the starting ones if none were), so a run never hands on weights known to be past
    the ceiling; the last iteration's update, never rolled out, is kept. A non-finite value raises NonFiniteError after skipping
    the update, so the caller keeps the last good adapter.

    Launched data-parallel (trainer/distributed.py), every process draws the same global
    batch of `cfg.batch_size` prompts (the same seeded generator) and rolls out its
    contiguous share of it, sampling with its own seed (seed + rank, so processes do
    not draw the same noise); all start from rank 0's adapter and value head and take
    the same optimiser steps (`ppo_iteration`)."""
    from tqdm import tqdm

    torch.manual_seed(seed + distributed.rank())
    prompts, queries = encode_prompts(tokenizer, prompts, prompt_max_tokens)
    if not prompts:
        raise ValueError("no prompts to roll out (all empty or longer than --prompt-max-tokens)")
    if cfg.batch_size < distributed.world():
        raise ValueError(f"--ppo-batch-size {cfg.batch_size} is smaller than the {distributed.world()} processes launched; "
                         "each needs at least one prompt per iteration")
    device = next(model.parameters()).device
    state = state or new_state(model.get_base_model().config.hidden_size, cfg, device)
    value_head, kl_ctl = state.value_head, state.kl_ctl
    params = [p for p in model.parameters() if p.requires_grad] + list(value_head.parameters())
    distributed.broadcast_params(params)  # a fresh adapter's LoRA A is random: start every process from rank 0's
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    eos_ids, pad_id = special_ids(model, tokenizer)
    rng = torch.Generator().manual_seed(seed)  # the same on every process: they draw the same global batches
    history, stop = [], "completed"
    kept = None  # (iteration, weights) of the last weights whose own rollouts were under the ceiling
    bar = tqdm(range(iterations), desc="ppo", unit="iter", disable=not progress)
    for it in bar:
        pick = distributed.shard(torch.randint(len(prompts), (cfg.batch_size,), generator=rng).tolist())  # this process's share
        before = [p.detach().clone() for p in params]  # the weights this iteration rolls out with
        metrics = ppo_iteration(model, value_head, optimizer, tokenizer, [queries[i] for i in pick], [prompts[i] for i in pick],
                                reward_fn, cfg, kl_ctl, eos_ids, pad_id, ref_adapter)
        metrics["iteration"] = it + 1
        history.append(metrics)
        bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.2f}")
        log(format_metrics(metrics))
        if kl_too_high(metrics, cfg):
            # the weights that rolled out this batch are already past the ceiling, and this
            # iteration's update went further: go back to the last ones measured under it
            restore = kept[1] if kept is not None else before
            with torch.no_grad():
                for p, w in zip(params, restore):
                    p.copy_(w)
            last = f"those of iteration {kept[0]}" if kept is not None else "the starting ones"
            stop = f"KL {metrics['objective/kl']:.2f} above the ceiling {cfg.kl_ceiling}: weights restored to {last}"
            log(stop)
            break
        kept = (it + 1, before)
    return state, history, stop


LOGGED = ("objective/scores", "objective/kl", "objective/entropy", "policy/approxkl", "policy/clipfrac",
          "val/ratio", "val/explained_variance", "time/rollout", "time/score", "time/reference", "time/update",
          "tokens_per_s/rollout", "response/degenerate")


def format_metrics(m: dict) -> str:
    return f"iter {m['iteration']}: " + "  ".join(f"{k}={m[k]:.4g}" for k in LOGGED if k in m)
