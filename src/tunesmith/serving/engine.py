"""The generation engine: one thread owns the model; requests reach it through a queue.

Why one thread: torch modules are not safe for concurrent forward passes, and switching the active adapter
(`set_adapter` / `disable_adapter`) mutates the model. So every forward pass, and every adapter load, runs
on the engine thread; HTTP handlers only tokenize, enqueue and wait on per-request event queues.

Batching: the engine takes the oldest waiting request and every other waiting request for the same served
model (base or one adapter) -- or, when all adapters are plain LoRA, for any model, each row naming its
adapter through peft's mixed-batch `adapter_names` -- up to `max_batch`, and generates them together:
prompts left-padded, one prefill, then one decode step per token for the whole batch. A batch runs until
its last row ends; requests arriving meanwhile wait for the next batch (no continuous batching).
Sampling is done per row (own temperature, top_p and torch.Generator seeded from the request), so requests
with different sampling settings share a batch and a seeded request gives the same text as it would alone
(up to float rounding: a row's logits can differ in the last bits with the batch's padding and size).
Each row stops on its own (end-of-turn / EOS token, its stop strings, its max_tokens).

We write the decode loop ourselves instead of calling `model.generate` because generate has one sampling
configuration and one stop list per call, and cannot hand out tokens row by row as they are produced.

Text handed to a client never contains a stop string: a suffix of the decoded text that could still turn
into one is held back until it cannot (and a trailing incomplete UTF-8 character likewise).
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from tunesmith.models.kv import cache_kw, cache_of
from tunesmith.models.util import pad_id

log = logging.getLogger("tunesmith.serve")


class Overloaded(Exception):
    """Too many requests are waiting or running; the client should retry later (HTTP 429)."""


@dataclass
class Event:
    """What the engine sends back for one generation: a piece of text, the end, or an error."""

    kind: str  # "text" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Generation:
    """One sequence to generate (a request with n=3 is three Generations sharing a prompt)."""

    model_id: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    """The request's stop strings, plus the template's end-of-turn markers that are several tokens here."""
    stop_token_ids: list[int] = field(default_factory=list)
    """EOS and single-token end-of-turn markers of the served model's template."""
    emit: Callable[[Event], None] = lambda e: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Set by the request handler when its client went away: the engine stops generating it."""
    finished: bool = False
    """Set by the engine once the final event was sent."""


class Engine:
    """Owns the model (through `registry`) and runs generations on one thread.

    `registry` is a `serving.registry.Registry`; the engine calls `registry.prepare(model_id)` on its own
    thread (to activate an adapter) and runs registry jobs (adapter loads) between batches.
    """

    def __init__(self, registry, max_batch: int = 8, max_pending: int = 64):
        self.registry = registry
        self.max_batch = max_batch
        self.max_pending = max_pending
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: list[Generation] = []
        self._pending = 0  # admitted and not yet finished, counted in Generations
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tunesmith-engine", daemon=True)
        self.batches_run = 0
        self.largest_batch = 0
        self.mixed_batches = 0  # batches holding rows for several models (LoRA adapters / base)
        self.cancelled = 0  # generations stopped because their client went away

    # ---- called from other threads ----------------------------------------------------------------------

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def submit(self, generations: list[Generation]) -> None:
        """Queue generations (all or none); Overloaded when that would pass `max_pending`."""
        if len(generations) > self.max_pending:
            raise ValueError(
                f"this request asks for {len(generations)} generations (prompts x n), more than the "
                f"server runs at once ({self.max_pending}, --max-pending); ask for fewer"
            )
        with self._lock:
            if self._pending + len(generations) > self.max_pending:
                raise Overloaded(
                    f"the server is busy ({self._pending} generations waiting or running, limit {self.max_pending}); "
                    "retry shortly"
                )
            self._pending += len(generations)
        for g in generations:
            self._inbox.put(g)

    def call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run `fn` on the engine thread between batches and return its result (or raise its exception)."""
        done = threading.Event()
        box: dict[str, Any] = {}

        def job():
            try:
                box["value"] = fn()
            except BaseException as e:  # handed back to the caller's thread
                box["error"] = e
            finally:
                done.set()

        self._inbox.put(job)
        if not done.wait(timeout):
            raise TimeoutError("the engine did not answer in time")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    # ---- the engine thread ------------------------------------------------------------------------------

    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            while not self._stop.is_set():
                self._drain(block=not self._waiting)
                if self._stop.is_set():
                    break
                batch = self._next_batch()
                if batch:
                    self._run(batch)
        self._drain(block=False)
        for g in self._waiting:  # shutting down: tell everyone still waiting
            self._finish(g, Event("error", error="the server is shutting down"))

    def _drain(self, block: bool) -> None:
        """Move everything in the inbox to the waiting list; run jobs at once. Blocks for the first item
        when there is nothing else to do."""
        while True:
            try:
                item = self._inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if item is None:
                if self._stop.is_set():
                    continue  # keep draining: generations queued behind the stop signal are failed by _loop
                return
            if isinstance(item, Generation):
                self._waiting.append(item)
            else:
                item()

    def _next_batch(self) -> list[Generation]:
        """The oldest waiting generation and the others that can share its batch, oldest first, up to
        max_batch: those for the same model, or, where the registry can mix models in one batch (LoRA
        adapters and the base), those for any mixable model. Cancelled ones (client gone) are dropped here."""
        for g in [g for g in self._waiting if g.cancelled.is_set()]:
            self._waiting.remove(g)
            self._finish(g, Event("done", finish_reason="cancelled"))
        if not self._waiting:
            return []
        first = self._waiting[0].model_id
        if self.registry.mixable(first):
            batch = [g for g in self._waiting if g.model_id == first or self.registry.mixable(g.model_id)]
        else:
            batch = [g for g in self._waiting if g.model_id == first]
        batch = batch[: self.max_batch]
        for g in batch:
            self._waiting.remove(g)
        return batch

    def _run(self, batch: list[Generation]) -> None:
        try:
            with self.registry.activate([g.model_id for g in batch]) as forward_kwargs:
                _generate(
                    self.registry.model,
                    self.registry.tokenizer,
                    batch,
                    forward_kwargs,
                    self.registry.tokenizer_lock,
                    self._finish,
                )
        except Exception as e:  # a bug or an out-of-memory: fail these requests, keep serving the others
            log.exception("generation failed")
            for g in batch:
                self._finish(g, Event("error", error=f"generation failed: {type(e).__name__}: {e}"))
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        self.mixed_batches += len({g.model_id for g in batch}) > 1

    def _finish(self, g: Generation, event: Event) -> None:
        if g.finished:
            return
        g.finished = True
        self.cancelled += event.finish_reason == "cancelled"
        self._release()
        g.emit(event)

    def _release(self) -> None:
        with self._lock:
            self._pending -= 1


# ---- one batch ----------------------------------------------------------------------------------------------


class _Row:
    """Decoding state of one generation in a batch."""

    def __init__(self, g: Generation, device):
        import torch

        self.g = g
        self.ids: list[int] = []
        self.sent = ""  # text already handed to the client
        self.done = False
        self.stops = [s for s in dict.fromkeys(g.stop) if s]
        self.stop_ids = set(g.stop_token_ids)
        self.generator = None
        if g.temperature > 0:
            self.generator = torch.Generator(device=device)
            seed = g.seed if g.seed is not None else random.SystemRandom().getrandbits(63)
            self.generator.manual_seed(seed & (2**63 - 1))  # any int64 (OpenAI allows negative seeds)


def _generate(model, tokenizer, batch: list[Generation], forward_kwargs: dict, tok_lock, finish) -> None:
    """Generate every row of `batch` to its end, emitting text as it comes. `forward_kwargs` go to every
    forward pass (peft's per-row `adapter_names` for a batch that mixes LoRA adapters)."""
    import torch

    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    rows = [_Row(g, device) for g in batch]
    width = max(len(g.prompt_ids) for g in batch)
    ids = torch.tensor([[pad] * (width - len(g.prompt_ids)) + g.prompt_ids for g in batch], device=device)
    mask = torch.tensor([[0] * (width - len(g.prompt_ids)) + [1] * len(g.prompt_ids) for g in batch], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    past = None
    while True:
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            **cache_kw(past),
            use_cache=True,
            logits_to_keep=1,
            **forward_kwargs,
        )
        past = cache_of(out)
        logits = out.logits[:, -1, :].float()
        del out
        next_ids = []
        for i, row in enumerate(rows):
            if row.done or row.g.cancelled.is_set():
                if not row.done:
                    row.done = True
                    finish(row.g, Event("done", finish_reason="cancelled", completion_tokens=len(row.ids)))
                next_ids.append(pad)
                continue
            token = _sample(logits[i], row)
            next_ids.append(token)
            _advance(row, token, tokenizer, tok_lock, finish)
        if all(r.done for r in rows):
            return
        ids = torch.tensor(next_ids, device=device).unsqueeze(1)
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
        positions = positions[:, -1:] + 1


def _sample(logits, row: _Row) -> int:
    """Greedy at temperature 0; else temperature, then nucleus (top_p) filtering, then a draw from the row's
    own generator, so a seeded row gives the same tokens whatever else is in the batch."""
    import torch

    g = row.g
    if g.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / g.temperature, dim=-1)
    if g.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = (sorted_p.cumsum(-1) - sorted_p) < g.top_p  # the smallest set whose mass reaches top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=row.generator))


def _advance(row: _Row, token: int, tokenizer, tok_lock, finish) -> None:
    """Take one sampled token: stop on a stop token, a stop string or max_tokens; emit the safe new text."""
    g = row.g
    if token in row.stop_ids:
        with tok_lock:
            text = tokenizer.decode(row.ids, skip_special_tokens=True)  # without the stop token
        cut = _first_stop(text, row.stops)
        _send(row, text if cut is None else text[:cut], final=True)
        row.ids.append(token)
        row.done = True
        finish(g, Event("done", finish_reason="stop", completion_tokens=len(row.ids)))
        return
    row.ids.append(token)
    with tok_lock:
        text = tokenizer.decode(row.ids, skip_special_tokens=True)
    cut = _first_stop(text, row.stops)
    if cut is not None:
        _send(row, text[:cut], final=True)
        row.done = True
        finish(g, Event("done", finish_reason="stop", completion_tokens=len(row.ids)))
        return
    if len(row.ids) >= g.max_tokens:
        _send(row, text, final=True)
        row.done = True
        finish(g, Event("done", finish_reason="length", completion_tokens=len(row.ids)))
        return
    _send(row, text[: _safe_length(text, row.stops)])


def _send(row: _Row, text: str, final: bool = False) -> None:
    """Emit what `text` adds to what was sent. `final`: no more tokens will come, so an incomplete UTF-8 character at
    the end is sent as decoded (U+FFFD), as run.generate returns it, instead of waiting for bytes that never come."""
    if text.endswith("\ufffd") and not final:  # an incomplete UTF-8 character: wait for its other bytes
        text = text.rstrip("\ufffd")
    if not text.startswith(row.sent):  # decoding more tokens rewrote earlier text (rare): keep what was sent
        text = row.sent + text[len(row.sent) :]
    if len(text) > len(row.sent):
        piece, row.sent = text[len(row.sent) :], text
        row.g.emit(Event("text", text=piece))


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [at for at in (text.find(s) for s in stops) if at >= 0]
    return min(found) if found else None


def _safe_length(text: str, stops: list[str]) -> int:
    """Length of the prefix of `text` that can be shown: not a suffix that might grow into a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return len(text) - hold
