"""The promotion gate: a cycle promotes only what it can show is better, on evidence
the policy step did not optimise against.

In the order a cycle applies them:

1. Enough signal (`signal_reasons`, before any training; `fit_reasons`, after the
   reward models): at least --min-decisive-pairs preference pairs in the snapshot, and
   a cross-fitted validation accuracy (each pair scored by the reward model that did
   not see it, steps.fit_reward_pair) on at least --min-val-pairs pairs whose 95%
   Wilson lower bound is above --min-val-accuracy (0.5). Otherwise the cycle waits for
   feedback and says so.
2. Held-out human judgements (`human_agreement`): on the judge's fold (pairs the
   policy's reward model never saw), the share of pairs where the candidate's implicit
   preference points the way people chose, as DPO measures it:
       Δ = [log π_cand(chosen) − log π_cur(chosen)] − [log π_cand(rejected) − log π_cur(rejected)]
   with the current adapter as the reference, so Δ > 0 means the candidate moved
   towards what people chose. A share whose 95% interval lies wholly below
   --min-human-agreement (0.5) rejects.
3. A paired win rate on held-out prompts (`evaluate`): --eval-replies sampled replies
   a side, candidate and current from the same seed with the served temperature and
   top-p, each pair judged by the judge reward model (fold B; PPO trained against
   fold A's). Promotion needs the 95% lower bound above --min-win-rate (0.5). Also no
   degenerate replies, finite weights, and the KL the optimising step added under the
   budgets (`optimised_kl`): this cycle's under --kl-budget, and the sum over the
   lineage's promoted cycles under --kl-total-budget. The reward-model margin (judge's
   mean score, candidate minus current) is reported, never decisive.

   What the KL budgets count. They bound optimisation against a learnt signal (a reward
   model, or preference pairs), which is what over-optimises (Gao et al., "Scaling Laws
   for Reward Model Overoptimization"). Imitating the replies people wrote or liked
   (SFT) is not that, and teaching a format they asked for moves the policy far: 65 nats
   per reply in one measured case, against a per-cycle budget of 12. So, as InstructGPT
   anchors PPO to its SFT model, a step that ran after SFT is budgeted from the SFT
   result (saved beside the candidate, adapters.REFERENCE_FILE), a step without SFT from the
   parent, and SFT alone adds nothing; the judge, the human agreement and the
   degenerate-reply check still decide it. KL to the parent and to the base are
   measured and reported for every candidate either way.
4. Live A/B (`live_decision`), with --live-compare: one vote per user and prompt, a
   Beta(1 + wins, 1 + losses) posterior; promote when P(win rate > 0.5) reaches
   --live-confidence, reject when P(win rate < 0.5) does, withdraw after
   --live-max-hours.

Pure functions here take numbers and dicts; `evaluate` and `human_agreement` load
the models. What it is not: the order of the steps (schedule.py) or training.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

from assistant import annotators
from assistant.config import BASE_VERSION, ModelArgs
from trainer.config import PPOArgs, ScheduleArgs

REFERENCE = "reference"  # peft name, in evaluation, of the SFT result a candidate's optimising step started from


def wilson(successes: float, n: int) -> tuple[float, float, float]:
    """(rate, lo, hi) with the 95% Wilson interval; n = 0 gives (nan, 0, 1)."""
    lo, hi = annotators.wilson(successes, n)
    return (successes / n if n else float("nan")), lo, hi


# -- 1. enough signal ------------------------------------------------------------------


def decisive_pairs(examples) -> int:
    """Preference pairs whose majority is a real majority (support > against)."""
    return sum(p.support > p.against for p in examples.pairs)


def signal_reasons(examples, sched: ScheduleArgs) -> list[str]:
    """Why the snapshot is too thin to train on (empty: enough)."""
    n = decisive_pairs(examples)
    if n < sched.min_decisive_pairs:
        return [f"waiting for more feedback: {n} decisive pair{'s' if n != 1 else ''} of the {sched.min_decisive_pairs} needed "
                f"(--min-decisive-pairs; A/B choices, corrections, rankings, up- vs down-votes on one prompt; "
                f"{examples.counts.get('tie', 0)} ties give none)"]
    return []


def fold_reasons(fold_a, fold_b, min_pairs: int) -> list[str]:
    """Why the two folds cannot each fit a reward model (empty: they can)."""
    sizes = [len(f.pairs) + len(f.pointwise) for f in (fold_a, fold_b)]
    if min(sizes) < min_pairs:
        return [f"waiting for more feedback: the two folds hold {sizes[0]} and {sizes[1]} examples; each reward model needs "
                f"--min-pairs {min_pairs}"]
    return []


def fit_reasons(signal: dict, sched: ScheduleArgs) -> list[str]:
    """Why the reward models cannot be trusted (empty: they can)."""
    n = signal.get("val_pairs") or 0
    if n < sched.min_val_pairs:
        return [f"waiting for more feedback: {n} validation pairs of the {sched.min_val_pairs} needed (--min-val-pairs)"]
    if signal["val_accuracy_lo"] <= sched.min_val_accuracy:
        return [f"waiting for more feedback: the reward models agree with held-out choices on {signal['val_accuracy']:.0%} of "
                f"{n} pairs (95% CI {signal['val_accuracy_lo']:.2f}-{signal['val_accuracy_hi']:.2f}); the lower bound must be above "
                f"{sched.min_val_accuracy:.2f} (--min-val-accuracy)"]
    return []


# -- 2 and 3. evidence about the candidate -------------------------------------------------


def paired_outcomes(candidate: list[float], current: list[float], same_text: list[bool]) -> dict:
    """Wins, ties (identical texts or equal scores) and losses of candidate vs current, pair by pair,
    and the win rate (ties ½) with its 95% Wilson interval."""
    wins = ties = 0
    for a, b, same in zip(candidate, current, same_text):
        if same or a == b:
            ties += 1
        elif a > b:
            wins += 1
    n = len(candidate)
    rate, lo, hi = wilson(wins + 0.5 * ties, n)
    return {"replies": n, "wins": wins, "ties": ties, "losses": n - wins - ties, "win_rate": rate, "win_rate_lo": lo, "win_rate_hi": hi}


def agreement_share(deltas: list[float]) -> dict:
    """Share of Δ > 0 (Δ = 0 counts ½) with its 95% Wilson interval."""
    up = sum(d > 0 for d in deltas) + 0.5 * sum(d == 0 for d in deltas)
    share, lo, hi = wilson(up, len(deltas))
    return {"share": share if deltas else None, "lo": lo, "hi": hi, "n": len(deltas)}


def gate(evaluation: dict, finite_error: str | None, sched: ScheduleArgs) -> list[str]:
    """Reasons to reject (empty: promote)."""
    if finite_error:
        return [f"invalid weights: {finite_error}"]
    e = evaluation
    reasons = []
    if e.get("win_rate_lo") is None or e["win_rate_lo"] <= sched.min_win_rate:
        reasons.append(f"judge win rate {e.get('win_rate', float('nan')):.2f} (95% CI {e.get('win_rate_lo', 0):.2f}-{e.get('win_rate_hi', 1):.2f}) "
                       f"over {e.get('replies', 0)} held-out replies: the lower bound is not above {sched.min_win_rate:.2f}")
    h = e.get("human_agreement") or {}
    if h.get("n") and h["hi"] < sched.min_human_agreement:
        reasons.append(f"held-out human judgements say it is worse: it moved towards the chosen reply on {h['share']:.0%} of "
                       f"{h['n']} validation pairs (95% CI {h['lo']:.2f}-{h['hi']:.2f})")
    if "kl_optimised" in e:  # what the optimising step added (optimised_kl)
        cycle_kl, total_kl = e.get("kl_optimised"), e.get("kl_optimised_total")
        to = "the SFT result it started from" if e.get("optimised_from") == "sft" else "the parent"
        cycle_what, total_what = f"KL of this cycle's optimisation (to {to})", "KL of the optimisation over all cycles"
    else:  # an evaluation without the lineage: its plain KL to the parent and to the base
        cycle_kl, total_kl = e.get("kl_parent"), e.get("kl_base")
        cycle_what, total_what = "KL to the parent", "KL to the base"
    if cycle_kl is not None and cycle_kl > sched.kl_budget:
        reasons.append(f"{cycle_what} {cycle_kl:.2f} over the per-cycle budget {sched.kl_budget:.2f}")
    if total_kl is not None and total_kl > sched.kl_total_budget:
        reasons.append(f"{total_what} {total_kl:.2f} over the total budget {sched.kl_total_budget:.2f}")
    if e.get("degenerate", 0) > sched.max_degenerate:
        reasons.append(f"{e['degenerate']} degenerate replies out of {e.get('replies', '?')} (at most {sched.max_degenerate})")
    return reasons


def load_pair(model_args: ModelArgs, adapters_dir, candidate: str, current: str):
    """(tokenizer, peft model) with adapters 'candidate' and, unless current is the base,
    'current', and REFERENCE when the candidate has one (adapters.REFERENCE_FILE); on the
    shared base of an open `trainer.shared.sharing` block, if any."""
    from assistant import adapters
    from trainer.shared import adapter_model

    d = Path(adapters_dir)
    tok, model = adapter_model(model_args, "candidate", path=d / candidate)
    if current != BASE_VERSION:
        model.load_adapter(str(d / current), adapter_name="current")
    if (d / candidate / adapters.REFERENCE_FILE).exists():  # the SFT result its optimising step started from
        with tempfile.TemporaryDirectory(prefix="reference-") as tmp:
            shutil.copy(d / candidate / "adapter_config.json", tmp)
            os.symlink((d / candidate / adapters.REFERENCE_FILE).resolve(), Path(tmp) / "adapter_model.safetensors")
            model.load_adapter(tmp, adapter_name=REFERENCE)
    model.eval()
    return tok, model


def optimised_kl(evaluation: dict, manifest: dict, parent_spent: float) -> dict:
    """The KL the gate budgets: what this cycle's optimising step added, and that summed
    over the lineage (module docstring, step 3).

    `manifest` is the candidate's: `optimised_from` "parent" (the step started from
    the parent: the KL to the parent), "sft" (it started from this cycle's SFT result:
    the KL to those weights, `kl_reference`) or None (SFT alone, imitation: 0).
    Manifests written before the field existed count as "parent". `parent_spent` is
    the parent's `kl_optimised_total` (0 for the base)."""
    source = manifest.get("optimised_from", "parent")
    if source == "sft":
        spent = evaluation.get("kl_reference")
    elif source is None:
        spent = 0.0
    else:
        spent = evaluation.get("kl_parent")
    if spent is None:
        return {"optimised_from": source, "kl_optimised": None, "kl_optimised_total": None}
    return {"optimised_from": source, "kl_optimised": spent, "kl_optimised_total": parent_spent + spent}


def spent_kl(adapters_dir, version: str | None) -> float:
    """A promoted version's `kl_optimised_total` (0 for the base; its KL to the base when
    it was gated before that field existed)."""
    from assistant import adapters

    if version in (None, BASE_VERSION):
        return 0.0
    e = adapters.read_manifest(adapters_dir, version).get("evaluation") or {}
    value = e.get("kl_optimised_total", e.get("kl_base"))
    return float(value) if value is not None else 0.0


def _logprobs_as(model, name: str, fn):
    """fn() with adapter `name` active ('base': adapters disabled)."""
    from trainer.shared import using

    if name == BASE_VERSION:
        with model.disable_adapter():
            return fn()
    with using(model, name):
        return fn()


def human_agreement(model, tok, pairs, current: str, max_pairs: int = 128, batch: int = 8) -> dict:
    """Share of `pairs` (data.Pair) where the candidate's implicit preference relative to
    `current` points to the chosen reply (module docstring, step 2). Log-probs at
    temperature 1 of each reply, EOS included, after the chat-templated prompt."""
    import torch

    from assistant.chat import build_prompt
    from trainer import ppo
    from trainer.data import prompt_messages

    pairs = list(pairs)[:max_pairs]
    if not pairs:
        return agreement_share([])
    eos_ids, pad_id = ppo.special_ids(model, tok)
    end = tok.eos_token_id if tok.eos_token_id is not None else min(eos_ids)  # the end of a chat turn
    device = next(model.parameters()).device

    def encode(prompt, reply):
        query = build_prompt(tok, prompt_messages(prompt))[-512:]
        return torch.tensor(query, dtype=torch.long), tok(reply, add_special_tokens=False)["input_ids"][:255] + [end]

    seqs = [encode(p.prompt, text) for p in pairs for text in (p.chosen, p.rejected)]  # chosen, rejected, chosen, ...

    def total_logprobs(name: str) -> torch.Tensor:
        out = []
        for start in range(0, len(seqs), batch):
            part = seqs[start : start + batch]
            width = max(len(r) for _, r in part)
            responses = torch.full((len(part), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(part), width), dtype=torch.long)
            for i, (_, r) in enumerate(part):
                responses[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
            responses, mask = responses.to(device), mask.to(device)
            logp, _, _ = _logprobs_as(model, name, lambda: ppo.forward_logprobs(model, None, [q for q, _ in part], responses, mask, pad_id, 1.0, False))
            out.append((logp * mask).sum(1).float().cpu())
        return torch.cat(out)

    with torch.no_grad():
        cand = total_logprobs("candidate")
        cur = total_logprobs("current" if current != BASE_VERSION else BASE_VERSION)
    ratio = (cand - cur).view(-1, 2)  # (P, 2): chosen, rejected
    deltas = (ratio[:, 0] - ratio[:, 1]).tolist()
    return agreement_share(deltas)


def evaluate(model_args: ModelArgs, adapters_dir, candidate: str, current: str, prompts: list[list[dict]], judge_fn,
             sched: ScheduleArgs, ppo_args: PPOArgs, val_pairs=(), chunk: int = 32, progress: bool = False) -> dict:
    """Candidate vs current on held-out prompts (module docstring, steps 2-3).

    `prompts` repeat, with fresh samples, until there are --eval-replies replies a side;
    both sides sample chunk by chunk from the same seeds, at the served temperature and
    top-p, capped at --eval-max-new-tokens. `judge_fn(prompts, texts) -> (B,)` scores.
    KL (k1, nats per reply, on the candidate's samples, logits at the sampling
    temperature) to the parent (current) and to the base. With `progress`, a bar
    counts the pairs sampled and judged."""
    from trainer.shared import release

    from assistant import adapters

    manifest = adapters.read_manifest(adapters_dir, candidate)
    tok, model = load_pair(model_args, adapters_dir, candidate, current)
    try:
        e = _evaluate(model, tok, candidate, current, prompts, judge_fn, sched, ppo_args, val_pairs, chunk, progress)
    finally:
        release(model, "candidate", "current", REFERENCE)
    return {**e, **optimised_kl(e, manifest, spent_kl(adapters_dir, manifest.get("parent")))}


def _evaluate(model, tok, candidate, current, prompts, judge_fn, sched, ppo_args, val_pairs, chunk, progress=False) -> dict:
    import torch
    from tqdm.auto import tqdm

    from trainer import ppo

    prompts, queries = ppo.encode_prompts(tok, prompts, ppo_args.prompt_max_tokens)
    if not prompts:
        raise ValueError("no held-out prompts to evaluate on")
    order = [i % len(prompts) for i in range(max(sched.eval_replies, len(prompts)))]
    cfg = ppo.PPOConfig(max_new_tokens=sched.eval_max_new_tokens, temperature=ppo_args.temperature, top_p=ppo_args.top_p)
    eos_ids, pad_id = ppo.special_ids(model, tok)
    cur_name = "current" if current != BASE_VERSION else BASE_VERSION
    device = next(model.parameters()).device
    cand_texts, cur_texts, cand_scores, cur_scores = [], [], [], []
    kl_parent, kl_base, kl_ref, ended, cur_ended, lengths, cur_lengths, degenerate, cur_degenerate = [], [], [], [], [], [], [], 0, 0
    has_reference = REFERENCE in model.peft_config
    bar = tqdm(total=len(order), desc=f"gate {candidate} vs {current}", unit="pair", disable=not progress)
    with torch.no_grad(), bar:
        for c, start in enumerate(range(0, len(order), chunk)):
            idx = order[start : start + chunk]
            qs, ps = [queries[i] for i in idx], [prompts[i] for i in idx]
            sides = {}
            for name in ("candidate", cur_name):
                torch.manual_seed(sched.eval_seed + c)
                sides[name] = _logprobs_as(model, name, lambda: ppo.rollout(model, tok, qs, cfg, eos_ids, pad_id))
            a, b = sides["candidate"], sides[cur_name]
            cand_texts += a.texts
            cur_texts += b.texts
            cand_scores += judge_fn(ps, a.texts).float().tolist()
            cur_scores += judge_fn(ps, b.texts).float().tolist()
            responses, mask = a.responses.to(device), a.mask.to(device)

            def logp(name):
                return _logprobs_as(model, name, lambda: ppo.forward_logprobs(model, None, qs, responses, mask, pad_id, cfg.temperature, False))[0]

            own = logp("candidate")
            fmask = mask.float()
            kl_parent += (ppo.kl_k1(own, logp(cur_name)) * fmask).sum(1).tolist()
            kl_base += (ppo.kl_k1(own, logp(BASE_VERSION)) * fmask).sum(1).tolist() if current != BASE_VERSION else kl_parent[-len(idx):]
            if has_reference:
                kl_ref += (ppo.kl_k1(own, logp(REFERENCE)) * fmask).sum(1).tolist()
            ended += a.ended.tolist()
            cur_ended += b.ended.tolist()
            lengths += a.mask.sum(1).tolist()
            cur_lengths += b.mask.sum(1).tolist()
            degenerate += ppo.degenerate(a.texts, a.responses, a.mask)
            cur_degenerate += ppo.degenerate(b.texts, b.responses, b.mask)
            bar.update(len(idx))
        agreement = human_agreement(model, tok, val_pairs, current)
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    outcome = paired_outcomes(cand_scores, cur_scores, [x == y for x, y in zip(cand_texts, cur_texts)])
    return {
        "prompts": len(prompts),
        **outcome,
        "candidate_score": mean(cand_scores),
        "current_score": mean(cur_scores),
        "margin": mean(cand_scores) - mean(cur_scores),
        "kl_parent": mean(kl_parent),
        "kl_base": mean(kl_base),
        "kl_reference": mean(kl_ref),  # to the SFT result the optimising step started from (None: none saved)
        "degenerate": degenerate,
        "current_degenerate": cur_degenerate,
        "candidate_ended": mean([float(x) for x in ended]),
        "current_ended": mean([float(x) for x in cur_ended]),
        "candidate_length": mean([float(x) for x in lengths]),
        "current_length": mean([float(x) for x in cur_lengths]),
        "candidate_words": mean([len(t.split()) for t in cand_texts]),
        "current_words": mean([len(t.split()) for t in cur_texts]),
        "human_agreement": agreement,
        "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens},
        "samples": [{"prompt": prompts[i][-1]["content"][:200], "candidate": x, "current": y}
                    for i, x, y in list(zip(order, cand_texts, cur_texts))[:3]],
        # every pair the judge scored; judge_candidate moves these out of the manifest into EVALUATION_FILE
        "judged": [{"prompt": prompts[i][-1]["content"], "candidate": x, "current": y, "candidate_score": s, "current_score": t}
                   for i, x, y, s, t in zip(order, cand_texts, cur_texts, cand_scores, cur_scores)],
    }


# -- 4. live A/B ---------------------------------------------------------------------------


def prob_below_half(wins: int, losses: int) -> float:
    """P(p < 0.5) for p ~ Beta(1 + wins, 1 + losses), exactly: for integer a, b the
    regularised incomplete beta I_½(a, b) is P(Binomial(a + b − 1, ½) ≥ a)."""
    a, b = 1 + wins, 1 + losses
    n = a + b - 1
    return sum(math.comb(n, j) for j in range(a, n + 1)) / 2**n


def live_decision(wins: int, losses: int, hours_live: float, sched: ScheduleArgs) -> tuple[str, str]:
    """('promote' | 'reject' | 'withdraw' | 'wait', why) for a live candidate's tally."""
    votes = wins + losses
    below = prob_below_half(wins, losses)
    tally = f"{wins} of {votes} counted votes (P(better) = {1 - below:.2f})"
    if votes >= sched.live_min_votes and 1 - below >= sched.live_confidence:
        return "promote", f"won {tally}"
    if votes >= sched.live_min_votes and below >= sched.live_confidence:
        return "reject", f"lost in live comparison: won {tally}"
    if hours_live >= sched.live_max_hours:
        return "withdraw", f"withdrawn after {hours_live:.1f} h of live comparison without a decision: won {tally}"
    return "wait", f"in live comparison: won {tally}; needs P >= {sched.live_confidence} either way with >= {sched.live_min_votes} votes"
