"""How many corrections, and how many SFT steps, it takes to teach what the base never writes.

    .venv/bin/python bench/sft_format.py                                 # summary users, 9 corrections
    .venv/bin/python bench/sft_format.py --preference listy --corrections 24
    .venv/bin/python bench/sft_format.py --setting "6 steps:sft_min_steps=1" --setting "defaults:"

The simulated users of bench/loop.py (their `rewrite`, the scripted correction) correct
the base model's replies to `--corrections` feedback prompts, sampled at the app's
served settings with its system prompt. Each `--setting` then trains SFT on those
corrections from the same fresh LoRA, through the trainer's own `train_step` (TRL's
SFTTrainer, the same rows and labels a cycle builds: `sft_rows`, `sft_dataset_rows`),
with the trainer's defaults except the fields the setting names. The measure is the
share of `--heldout` held-out prompts whose reply, sampled the same way with the same
seed, the users would give a 👍 (the preference's `thumb`), with its Wilson 95%
interval; the base's share is measured first, in the same process.

A cycle trains SFT on fold A of its snapshot (fold B stays with the judge), so the
9 corrections of the default are what fold A held after the three cycles of a
bench/loop.py run with summary users (24 corrections in all). This script answers
only "does the step learn the format"; whether the gate promotes it is bench/loop.py's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench import loop  # noqa: E402
from bench.common import RESULTS, SYSTEM, machine, write_results  # noqa: E402

DEFAULT_SETTINGS = ("defaults:", "before (2 epochs, whole reply):sft_min_steps=1,sft_corrections=whole")


def parse_setting(text: str) -> tuple[str, dict]:
    """'label:field=value,field=value' -> (label, {field: value}), values cast to PolicyArgs' field types."""
    from trainer.config import PolicyArgs

    label, _, rest = text.partition(":")
    types = {f.name: type(getattr(PolicyArgs(), f.name)) for f in dataclasses.fields(PolicyArgs)}
    out = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in types:
            raise SystemExit(f"error: --setting {text!r}: {item!r} is not field=value of a PolicyArgs field")
        out[key] = types[key](value)
    return label.strip() or "defaults", out


def messages(prompt: str) -> list[dict]:
    return ([{"role": "system", "content": SYSTEM}] if SYSTEM.strip() else []) + [{"role": "user", "content": prompt}]


def sample(model, tokenizer, prompts: list[str], sampling, seed: int, batch: int = 8) -> list[str]:
    """One reply per prompt at `sampling` (temperature, top-p, cap), seeded."""
    import torch

    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    model.eval()
    out = []
    for i in range(0, len(prompts), batch):
        texts = [tokenizer.apply_chat_template(messages(p), tokenize=False, add_generation_prompt=True) for p in prompts[i:i + batch]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            ids = model.generate(**enc, do_sample=sampling.temperature > 0, temperature=sampling.temperature, top_p=sampling.top_p,
                                 max_new_tokens=sampling.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def liked(pref, texts: list[str]) -> dict:
    k = sum(pref.thumb(t)[0] == 1 for t in texts)
    share, lo, hi = loop.wilson(k, len(texts))
    return {"liked": k, "n": len(texts), "share": share, "lo": lo, "hi": hi}


def main() -> None:
    from assistant.config import ModelArgs, ServeArgs

    serve = ServeArgs()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preference", default="summary", choices=sorted(p for p in loop.PREFERENCES if p != "coin"))
    ap.add_argument("--corrections", type=int, default=9, help="feedback prompts whose base reply the users correct")
    ap.add_argument("--heldout", type=int, default=24, help="held-out prompts the measure samples one reply each for")
    ap.add_argument("--setting", action="append", default=None,
                    help='"label:field=value,..." PolicyArgs fields to change from the defaults (repeatable; default: '
                         + " and ".join(repr(s) for s in DEFAULT_SETTINGS) + ")")
    ap.add_argument("--correction-tokens", type=int, default=serve.max_new_tokens, help="cap of the replies the users correct")
    ap.add_argument("--measure-tokens", type=int, default=48, help="cap of the held-out replies (the format shows early)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON output (default: bench/results/sft-format-PREFERENCE.json)")
    args = ap.parse_args()
    if min(args.corrections, args.heldout, args.correction_tokens, args.measure_tokens) < 1:
        ap.error("--corrections, --heldout and the token caps must be at least 1")
    settings = [parse_setting(s) for s in (args.setting or DEFAULT_SETTINGS)]

    import torch

    from trainer import policy
    from trainer.config import PolicyArgs, PPOArgs

    pref = loop.make_preference(argparse.Namespace(preference=args.preference, short_words=30, full_words=150, seed=args.seed))
    heldout, slices = loop.split_prompts(400, 64, 30, 3, args.seed)
    feedback = [t for s in slices for t in s][: args.corrections]
    measure = loop.Sampling(serve.temperature, serve.top_p, args.measure_tokens)
    served = loop.Sampling(serve.temperature, serve.top_p, args.correction_tokens)

    model, tokenizer = policy.build_policy(ModelArgs(), None)
    t0 = time.perf_counter()
    replies = sample(model, tokenizer, [t["prompt"] for t in feedback], served, args.seed + 1)
    rows = []
    for task, reply in zip(feedback, replies):
        fixed = loop.correction(pref, reply, task)
        if fixed:
            rows.append({"prompt": messages(task["prompt"]), "completion": policy._assistant(fixed), "original": reply})
    print(f"{len(rows)} corrections of {len(feedback)} replies ({time.perf_counter() - t0:.0f} s)", flush=True)
    if not rows:
        sys.exit("error: the users corrected none of the replies; nothing to train on")
    prompts = [t["prompt"] for t in heldout[: args.heldout]]
    base = liked(pref, sample(model, tokenizer, prompts, measure, args.seed + 2))
    print(f"base: {base['liked']}/{base['n']} liked", flush=True)

    start = {k: v.detach().clone() for k, v in model.state_dict().items() if f".{policy.ADAPTER}." in k}
    results = []
    original_rows = policy.sft_rows
    try:
        policy.sft_rows = lambda examples, demonstrations=None: rows  # the corrections above, as a cycle's rows
        for label, fields in settings:
            model.load_state_dict(start, strict=False)
            pa = PolicyArgs(**{**fields, "min_policy_rows": 1})
            pa.validate()
            out = policy.train_step("sft", model, tokenizer, pa, PPOArgs(), progress=True)
            losses = [h["loss"] for h in out["history"] if "loss" in h]
            texts = sample(model, tokenizer, prompts, measure, args.seed + 2)
            r = {"label": label, "fields": fields, "steps": len(losses), "loss_first": losses[0], "loss_last": losses[-1],
                 "train_seconds": out["seconds"], **liked(pref, texts), "examples": texts[:3]}
            results.append(r)
            print(f"{label}: {r['liked']}/{r['n']} liked [{r['lo']:.2f}, {r['hi']:.2f}]  {r['steps']} steps  "
                  f"loss {r['loss_first']:.2f} -> {r['loss_last']:.2f}  {r['train_seconds']:.0f} s", flush=True)
    finally:
        policy.sft_rows = original_rows

    print(f"\n{args.preference} users, {len(rows)} corrections, {base['n']} held-out replies a row (95% Wilson intervals)")
    print("| SFT setting | steps | liked | share | train s |\n| --- | --- | --- | --- | --- |")
    print(f"| base (no training) | 0 | {base['liked']}/{base['n']} | {base['share']:.2f} [{base['lo']:.2f}, {base['hi']:.2f}] | |")
    for r in results:
        print(f"| {r['label']} | {r['steps']} | {r['liked']}/{r['n']} | {r['share']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}] | {r['train_seconds']:.0f} |")
    path = write_results(args.out or RESULTS / f"sft-format-{args.preference}.json", {
        "command": " ".join([".venv/bin/python", "bench/sft_format.py", *sys.argv[1:]]), "machine": machine(),
        "preference": args.preference, "corrections": len(rows), "base": base, "settings": results,
        "torch_threads": torch.get_num_threads()})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
