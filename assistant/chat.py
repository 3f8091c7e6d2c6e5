"""Chat generation: prompt building, continuous batched streaming, adapter pinning.

What it is: `Engine`, a single background thread that owns the model. Requests
from any number of UI sessions are tokenised in the caller's thread, queued, and
joined into one running batch between decode steps (continuous batching over a
left-padded KV cache; assistant/kvcache.py keeps it in preallocated buffers so that a
step, a join or a retirement copies only what changes). Each new token is pushed to that request's `Stream`, which
the caller iterates for text deltas.

Because only the engine thread ever touches the model, the thread itself is the
generation/swap lock: `Engine.call(fn)` runs `fn(policy)` between two decode
steps, which is where adapters are loaded and switched. Loading is cheap there:
the engine keeps `adapter_slots` peft adapters ready, a new version's weights are
copied into a free one from the caller's thread (`Policy.stage`) while decoding
goes on, and the job between steps only records it. Every request is pinned to
the adapter version current when it was submitted; rows of different versions
share a batch through peft's per-row `adapter_names`, so an in-flight reply always
finishes on the adapter it started with.

What it is not: a web server or a store. It knows nothing of Gradio or SQLite.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from assistant.config import BASE_VERSION
from assistant.kvcache import SlackCache
from assistant.model import Policy, SlotBank

log = logging.getLogger(__name__)

_DONE = object()


class QueueFull(RuntimeError):
    """More requests are waiting than the configured limit allows."""


class PromptTooLong(ValueError):
    """The conversation plus the reply budget exceeds the model's context."""


@dataclass(frozen=True)
class GenParams:
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9
    max_new_tokens: int = 256

    def validate(self) -> None:
        if not 0 <= self.temperature <= 5:
            raise ValueError(f"temperature must be in [0, 5], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 1 <= self.max_new_tokens <= 8192:
            raise ValueError(f"max_new_tokens must be in 1..8192, got {self.max_new_tokens}")


@dataclass
class Reply:
    """The finished reply and what it cost."""

    text: str
    adapter_version: str
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float | None
    latency_ms: float
    finish_reason: str  # eos | length | stopped


class Stream:
    """One reply being generated. Iterate it for text deltas; `.reply` is set at the end."""

    def __init__(self, prompt_ids: list[int], params: GenParams, version: str):
        self.prompt_ids = prompt_ids
        self.params = params
        self.version = version
        self.reply: Reply | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        """Ask the engine to stop this reply after the current step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def poll(self, timeout: float) -> tuple[str, bool]:
        """Text produced since the last poll (waiting up to `timeout` seconds for the
        first piece) and whether the reply has finished."""
        pieces, done = [], False
        try:
            item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            while True:
                if item is _DONE:
                    done = True
                    break
                if isinstance(item, BaseException):
                    raise item
                pieces.append(item)
                item = self._queue.get_nowait()
        except queue.Empty:
            pass
        return "".join(pieces), done

    def text(self) -> str:
        """Block until the reply is finished and return it whole."""
        for _ in self:
            pass
        return self.reply.text


@dataclass
class _Row:
    """Engine-side state of one request in the running batch."""

    stream: Stream
    pos: int  # tokens in the sequence so far (prompt + generated, excluding next_token)
    detok: Detokenizer
    next_token: int = -1
    first_token_at: float | None = None

    @property
    def generated(self) -> list[int]:
        return self.detok.ids


def build_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` in the model's chat template, ready for the reply."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class Detokenizer:
    """Incremental detokenisation: text deltas of a growing token list, each step
    decoding only a short window, so a reply of n tokens costs O(n), not O(n²).

    The window starts at the last token already emitted before the previous delta
    (`prefix`), so tokenisers whose pieces depend on the token before them (leading
    spaces, byte-level merges) decode the new token in context. A multi-byte
    character split over several tokens decodes to U+FFFD until its last byte
    arrives; such a delta is held back until the character is whole. The same
    scheme as the streaming detokenisers of text-generation-inference and vLLM."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # window start: context for the next token
        self._read = 0  # tokens whose text has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add one token; the text it completes ('' while a character is partial)."""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd") or not after.startswith(before):
            return ""
        delta = after[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta

    def finish(self) -> str:
        """The reply's text decoded whole, and the tail not yet emitted (a held-back
        partial character, decoded as U+FFFD if the reply ended inside it)."""
        final = self._decode(self.ids)
        tail = final[len(self.text) :] if final.startswith(self.text) else ""
        self.text = final
        return tail


NUCLEUS_CANDIDATES = 256  # tokens tried first for the top-p nucleus (exact: the full sort runs when they do not cover it)


def nucleus(probs: torch.Tensor, top_p: torch.Tensor, candidates: int = NUCLEUS_CANDIDATES) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-p nucleus of each row: (kept probabilities, their token ids), each (B, K),
    in descending order, the dropped ones set to 0. A token is kept when the tokens
    ranked above it sum to at most top_p (the smallest prefix reaching top_p).

    Sorting the whole vocabulary of every row on every decode step is a visible part
    of a small model's step, while the nucleus at serving temperatures is a few dozen
    tokens. So the
    `candidates` most likely tokens come first (`topk`); when they sum to more than
    top_p in every row, the nucleus lies inside them and the result is the full
    sort's. Otherwise (a flat distribution, top_p 1) the whole vocabulary is sorted."""
    k = min(candidates, probs.shape[-1])
    sorted_probs, order = probs.topk(k, dim=-1)  # (B, k), descending
    if k < probs.shape[-1] and not bool((sorted_probs.sum(-1) > top_p).all()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V)
    drop = (sorted_probs.cumsum(-1) - sorted_probs) > top_p.unsqueeze(-1)
    return sorted_probs.masked_fill(drop, 0.0), order


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Sample one token per row. logits (B, V); temperature, top_p (B,). Rows with
    temperature 0 take the argmax. Returns (B,) token ids."""
    greedy = logits.argmax(-1)
    temp = temperature.clamp_min(1e-5).unsqueeze(-1)  # (B, 1)
    probs = torch.softmax(logits.float() / temp, dim=-1)  # (B, V)
    kept, order = nucleus(probs, top_p)
    choice = torch.multinomial(kept, 1).squeeze(-1)  # (B,)
    sampled = order.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
    return torch.where(temperature > 0, sampled, greedy)


class Engine:
    """Continuous-batching generator that owns the policy on one thread."""

    def __init__(self, policy: Policy, max_batch: int = 8, max_queue: int = 64, adapter_slots: int = 6, kv_cache: str = "slack"):
        """kv_cache: "slack" (assistant/kvcache.py) or "dynamic" (transformers' DynamicCache,
        grown by concatenation; kept to measure the other against)."""
        if kv_cache not in ("slack", "dynamic"):
            raise ValueError(f"kv_cache must be 'slack' or 'dynamic', got {kv_cache!r}")
        self.kv_cache = kv_cache
        self.policy = policy
        while len(policy.slots) < adapter_slots:  # before the engine thread runs: adding one adds modules
            policy.add_slot()
        if policy.slots and policy.bank is None:
            policy.bank = SlotBank(policy.model, list(policy.slots))
        self.max_batch = max_batch
        self.max_queue = max_queue
        tok = policy.tokenizer
        eos = policy.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tok.eos_token_id is not None:
            eos_ids.add(tok.eos_token_id)
        self.eos_ids = eos_ids
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else next(iter(eos_ids))
        self.max_positions = getattr(policy.model.config, "max_position_embeddings", None) or 2048
        base = policy.model.get_base_model() if hasattr(policy.model, "get_base_model") else policy.model
        # Only the last position's logits are sampled from: a prefill need not project every prompt token onto the vocabulary.
        self._last_logits = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}
        self._waiting: queue.Queue = queue.Queue()
        # Held while a request is pinned to a version and queued, and while a swap
        # changes the current version and decides which adapters are still in use.
        self.pin_lock = threading.Lock()
        self._retiring: set[str] = set()  # swapped-out versions to unload once unused
        self._mode: tuple | None = None  # adapter state the model is in: (version or 'mixed', its peft name), None = unknown
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (B, T) 1 for real tokens, 0 for left padding
        self._thread = threading.Thread(target=self._loop, name="generation", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ callers
    def submit(self, messages: list[dict], params: GenParams, version: str | None = None) -> Stream:
        """Queue a reply to `messages`; raises PromptTooLong or QueueFull at once."""
        params.validate()
        ids = build_prompt(self.policy.tokenizer, messages)
        if len(ids) + params.max_new_tokens > self.max_positions:
            raise PromptTooLong(
                f"the conversation is {len(ids)} tokens and the reply may take {params.max_new_tokens}; "
                f"the model's context is {self.max_positions}. Clear the chat or lower max new tokens."
            )
        with self.pin_lock:  # pin the version and queue atomically with respect to swaps
            version = version or self.policy.current
            if version != BASE_VERSION and version not in self.policy.loaded:
                raise ValueError(f"adapter version {version} is not loaded")
            if self._waiting.qsize() >= self.max_queue:
                raise QueueFull(f"the server is busy ({self.max_queue} replies waiting); try again in a moment")
            stream = Stream(ids, params, version)
            self._waiting.put(stream)
        self._wake.set()
        return stream

    def call(self, fn) -> Future:
        """Run `fn(policy)` on the engine thread between decode steps."""
        fut: Future = Future()
        self._jobs.put((fn, fut))
        self._wake.set()
        return fut

    def active_versions(self) -> set[str]:
        """Adapter versions that running or queued replies are pinned to."""
        with self._waiting.mutex:
            queued = [s.version for s in self._waiting.queue]
        return {r.stream.version for r in list(self._rows)} | set(queued)

    def close(self) -> None:
        """Stop the engine thread; running and queued replies end with an error."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        closed = RuntimeError("the generation engine was shut down")
        for row in self._rows:
            if row.stream.reply is None:
                row.stream._queue.put(closed)
        while True:
            try:
                self._waiting.get_nowait()._queue.put(closed)
            except queue.Empty:
                break
        self._rows, self._cache, self._mask = [], None, None

    def switch(self, version: str) -> str:
        """Make `version` current for new replies; returns the old one. From any thread.

        `version` is 'base', loaded, or staged into an adapter slot (Policy.stage), in
        which case it is loaded here: a slot is a mapping, so nothing waits for the
        decode step. The old adapter stays loaded while running or queued replies are
        pinned to it; the engine unloads it between steps after the last one."""
        with self.pin_lock:
            if version != BASE_VERSION and version not in self.policy.loaded:
                if version not in self.policy.staged:
                    raise ValueError(f"adapter version {version} is neither loaded nor staged")
                self.policy.load_adapter(version, None)  # staged: records its slot, touches no module
            old, self.policy.current = self.policy.current, version
            if old != version and old != BASE_VERSION:
                self._retiring.add(old)
            self._retiring.discard(version)
        if threading.current_thread() is self._thread:
            self.release_unused()
        else:
            self._wake.set()  # the loop releases what no reply uses any more
        return old

    def retire(self, version: str) -> None:
        """Unload a loaded, non-current adapter once no reply uses it. From any thread."""
        with self.pin_lock:
            if version == self.policy.current or version == BASE_VERSION or version not in self.policy.loaded:
                return
            self._retiring.add(version)
        if threading.current_thread() is self._thread:
            self.release_unused()
        else:
            self._wake.set()

    def load_staged(self, version: str) -> bool:
        """Load a version staged into an adapter slot, from any thread (a mapping; no
        module changes). False when it is not staged; True when loaded or already loaded."""
        with self.pin_lock:
            if version in self.policy.loaded:
                return True
            if version not in self.policy.staged:
                return False
            self.policy.load_adapter(version, None)
            return True

    def release_unused(self) -> None:
        """Unload swapped-out adapters that no running or queued reply is pinned to."""
        with self.pin_lock:
            in_use = self.active_versions()
            for v in list(self._retiring):
                if v not in in_use:
                    self.policy.unload_adapter(v)
                    self._mode = None
                    self._retiring.discard(v)

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._run_jobs()
            if self._retiring:
                self.release_unused()
            admitted = self._admit()
            if not self._rows and not admitted:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                with torch.inference_mode():
                    if admitted:
                        self._prefill(admitted)
                    self._emit_and_retire()
                    if self._rows:
                        self._decode_step()
            except Exception as exc:  # a failed step must not take the server down
                log.exception("generation step failed; failing %d in-flight replies", len(self._rows))
                for row in {id(r): r for r in self._rows + admitted if r.stream.reply is None}.values():  # + admitted: a failed prefill never merged them
                    row.stream._queue.put(RuntimeError(f"generation failed: {exc}"))
                self._rows, self._cache, self._mask = [], None, None

    def _run_jobs(self) -> None:
        while True:
            try:
                fn, fut = self._jobs.get_nowait()
            except queue.Empty:
                return
            if self._retiring:  # a job sees every swapped-out adapter no reply uses released
                self.release_unused()
            if fut.set_running_or_notify_cancel():
                self._mode = None  # the job may load, delete or activate adapters
                try:
                    fut.set_result(fn(self.policy))
                except BaseException as exc:
                    fut.set_exception(exc)
                self._mode = None

    def _admit(self) -> list[_Row]:
        rows = []
        while len(self._rows) + len(rows) < self.max_batch:
            try:
                stream = self._waiting.get_nowait()
            except queue.Empty:
                break
            if stream.cancelled:
                self._finish(_Row(stream, pos=len(stream.prompt_ids), detok=Detokenizer(self.policy.tokenizer)), "stopped")
                continue
            rows.append(_Row(stream, pos=len(stream.prompt_ids), detok=Detokenizer(self.policy.tokenizer)))
        return rows

    def _select_adapters(self, versions: list[str]) -> dict:
        """Put the model in the adapter state `versions` need; returns extra forward kwargs.

        Rows whose versions are all in adapter slots (or the base, with at least one
        slot among them) go through the slot bank: each row gathers its own slot's LoRA
        weights, whether the batch holds one version or several, so a swap costs no
        peft toggles and a mixed batch costs what a single one does (SlotBank). Other
        batches: one version switches the model's active adapter, or disables LoRA for
        'base', only when it changes (peft's toggles walk every module and would
        otherwise cost a quarter of each decode step); several go through peft's
        per-row `adapter_names`."""
        model = self.policy.model
        unique = set(versions)
        bank = self.policy.bank
        if bank is not None and unique != {BASE_VERSION}:
            rows = bank.rows_for([None if v == BASE_VERSION else self.policy.loaded[v] for v in versions])
            if rows is not None:
                bank.use(rows.to(self.policy.device), self.policy.lora.r)
                return {}
        mode = versions[0] if len(unique) == 1 else "mixed"
        key = (mode, self.policy.loaded.get(mode))  # a version re-loaded into another slot is another state
        if key != self._mode:
            if mode == BASE_VERSION:
                model.base_model.disable_adapter_layers()
            else:
                model.base_model.enable_adapter_layers()
                if mode != "mixed":
                    model.set_adapter(self.policy.loaded[mode])
            self._mode = key
        if mode == "mixed":
            return {"adapter_names": ["__base__" if v == BASE_VERSION else self.policy.loaded[v] for v in versions]}
        return {}

    def _forward(self, input_ids, attention_mask, position_ids, cache, versions: list[str]):
        """One forward pass with each row on its own adapter version."""
        try:
            out = self.policy.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                **self._last_logits,
                **self._select_adapters(versions),
            )
        finally:
            if self.policy.bank is not None:
                self.policy.bank.use(None, 0)
        return out.logits[:, -1, :]  # (B, V)

    def _prefill(self, rows: list[_Row]) -> None:
        device = self.policy.device
        longest = max(len(r.stream.prompt_ids) for r in rows)
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r.stream.prompt_ids)
            ids[i, longest - n :] = torch.tensor(r.stream.prompt_ids)
            mask[i, longest - n :] = 1
        ids, mask = ids.to(device), mask.to(device)
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, T)
        cache = SlackCache() if self.kv_cache == "slack" else DynamicCache()
        logits = self._forward(ids, mask, position_ids, cache, [r.stream.version for r in rows])
        self._sample_into(rows, logits)
        self._merge(rows, cache, mask)

    def _merge(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append freshly prefilled rows to the running batch, left-padding the shorter side."""
        if not self._rows:
            self._rows, self._cache, self._mask = rows, cache, mask
            return
        old_len, new_len = self._mask.shape[1], mask.shape[1]
        width = max(old_len, new_len)

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        if isinstance(self._cache, SlackCache):  # copies only the new rows
            self._cache.join(cache, self.max_batch)
        else:
            for old, new in zip(self._cache.layers, cache.layers):
                old.keys = torch.cat([pad(old.keys, 2), pad(new.keys, 2)], dim=0)  # (B, H, T, D)
                old.values = torch.cat([pad(old.values, 2), pad(new.values, 2)], dim=0)
        self._mask = torch.cat([pad(self._mask, 1), pad(mask, 1)], dim=0)  # (B, T)
        self._rows = self._rows + rows

    def _sample_into(self, rows: list[_Row], logits: torch.Tensor) -> None:
        temps = torch.tensor([r.stream.params.temperature for r in rows], device=logits.device)
        top_p = torch.tensor([r.stream.params.top_p for r in rows], device=logits.device)
        tokens = sample(logits, temps, top_p).tolist()
        now = time.perf_counter()
        for r, t in zip(rows, tokens):
            r.next_token = t
            if r.first_token_at is None:
                r.first_token_at = now

    def _decode_step(self) -> None:
        rows = self._rows
        device = self._mask.device
        ids = torch.tensor([[r.next_token] for r in rows], device=device)  # (B, 1)
        positions = torch.tensor([[r.pos] for r in rows], device=device)  # (B, 1)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        logits = self._forward(ids, self._mask, positions, self._cache, [r.stream.version for r in rows])
        for r in rows:
            r.pos += 1
        self._sample_into(rows, logits)

    def _emit_and_retire(self) -> None:
        """Commit each row's sampled token, stream its text, and drop finished rows."""
        keep = []
        for i, r in enumerate(self._rows):
            reason = None
            if r.stream.cancelled:
                reason = "stopped"
            elif r.next_token in self.eos_ids:
                reason = "eos"
            else:
                delta = r.detok.push(r.next_token)
                if delta:
                    r.stream._queue.put(delta)
                if len(r.generated) >= r.stream.params.max_new_tokens:
                    reason = "length"
            if reason is None:
                keep.append(i)
            else:
                self._finish(r, reason)
        if len(keep) == len(self._rows):
            return
        kept = set(keep)
        retired_old = any(r.stream.version in self._retiring for i, r in enumerate(self._rows) if i not in kept)
        self._retire(keep)
        if retired_old:  # the last reply on a swapped-out adapter may have just ended
            self.release_unused()

    def _retire(self, keep: list[int]) -> None:
        """Keep only rows `keep` in the batch, trimming padding no row needs."""
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self._mask.device)
        self._rows = [self._rows[i] for i in keep]
        self._mask = self._mask[index]
        start = int((self._mask.sum(0) > 0).nonzero()[0])  # drop padding columns no row needs
        self._mask = self._mask[:, start:]
        if isinstance(self._cache, SlackCache):  # moves only the rows after a retired one
            self._cache.keep(keep, start)
            return
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]

    def _finish(self, r: _Row, reason: str) -> None:
        now = time.perf_counter()
        s = r.stream
        tail = r.detok.finish()
        if tail:
            s._queue.put(tail)  # the held-back tail of a split character
        s.reply = Reply(
            text=r.detok.text,
            adapter_version=s.version,
            prompt_tokens=len(s.prompt_ids),
            completion_tokens=len(r.generated),
            ttft_ms=None if r.first_token_at is None else (r.first_token_at - s.submitted) * 1000,
            latency_ms=(now - s.submitted) * 1000,
            finish_reason=reason,
        )
        s._queue.put(_DONE)
