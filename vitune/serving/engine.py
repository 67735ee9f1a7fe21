"""The continuous-batching scheduler: one background thread runs the model for every request.

    submit(job, emit) -> Handle        from any thread; `emit` gets Started, Delta(text)..., then one
                                       Finished (or Finished alone: refused, cancelled while waiting)
    loop (engine thread):  admit waiting jobs into free slots (each prefilled alone, its first token
                           picked) -> one decode step for every running slot together -> finished
                           or cancelled requests free their slots -> repeat

Requests join the running batch between decode steps: nobody waits for a batch to drain. Each
request has its own KV cache slot (`SlotCache`), its own sampling generator and stop rules
(`decoding.TextState`), so its tokens are those of `Assistant.answer` for it alone (greedy: the
same token ids, up to float rounding in a batched matmul; sampled: the same seeded draws).

Every fusion kind runs batched: projector, film and qformer models put the image tokens in the
sequence (instruction-conditioned ones get each image's instruction at prefill); gated
cross-attention (`xattn`) models keep each request's visual keys/values from its prefill and
the step batches them (`slot_cache.merge_cross`).

`emit` is called on the engine thread and must not block (the API hands events to its event loop).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from vitune.data.chat import stop_token_id
from vitune.inference.assistant import Assistant
from vitune.inference.generate import GenerationConfig, _attn_mask
from vitune.model.cross_attention import CrossContext
from vitune.model.vlm import Instructions
from vitune.serving.decoding import TextState, pick_tokens
from vitune.serving.slot_cache import SlotCache, decode_mask, merge_cross


@dataclass(frozen=True)
class Job:
    """What the model needs for one answer: prompt ids (image placeholders included), the pixels
    of its images in order, each image's instruction (instruction-conditioned fusions only)."""

    prompt: list[int]
    pixel_values: torch.Tensor | None
    gen: GenerationConfig
    instructions: Instructions | None = None


@dataclass(frozen=True)
class Started:
    """The prompt is read and the first token picked (what time-to-first-token measures)."""

    queued_s: float  # from submit to the start of its prefill


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Finished:
    reason: Literal["stop", "length", "cancelled", "error"]
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int  # tokens the model sampled (a stop token included)
    error: str = ""


Event = Started | Delta | Finished
Emit = Callable[[Event], None]


@dataclass
class Handle:
    """The caller's side of a submitted job: `cancel()` frees its slot at the next step."""

    job: Job
    emit: Emit
    submitted: float = field(default_factory=time.monotonic)
    _cancel: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()


@dataclass
class _Running:
    handle: Handle
    state: TextState
    rng: torch.Generator
    token: int = -1
    cross: CrossContext | None = None


@dataclass
class EngineStats:
    """What /metrics and /health read (plain ints, updated by the engine thread)."""

    waiting: int = 0
    running: int = 0
    steps: int = 0
    on_step: Callable[[int], None] | None = None  # the batch size of every decode step


class Engine:
    def __init__(self, assistant: Assistant, max_batch: int = 8, stats: EngineStats | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.assistant, self.model, self.tok = assistant, assistant.model, assistant.tok
        self.stop_ids = frozenset({stop_token_id(self.tok, assistant.template), self.tok.special.eos})
        p = next(self.model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.cache = SlotCache(self.model.cfg.lm, max_batch, self.model.cfg.lm.max_seq_len, self.dtype, self.device)
        self.stats = stats or EngineStats()
        self._waiting: queue.Queue[Handle] = queue.Queue()
        self._running: dict[int, _Running] = {}
        self._merged: tuple[tuple[int, ...], CrossContext] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the caller's side -------------------------------------------------------------------------

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="vitune-engine", daemon=True)
        self._thread.start()
        return self

    def submit(self, job: Job, emit: Emit) -> Handle:
        if self._stop.is_set() or (self._thread is not None and not self._thread.is_alive()):
            raise RuntimeError("the engine is stopped")
        limit = self.model.cfg.lm.max_seq_len
        if len(job.prompt) + job.gen.max_new_tokens > limit:
            raise ValueError(f"prompt of {len(job.prompt)} tokens + {job.gen.max_new_tokens} new tokens exceeds "
                             f"max_seq_len={limit}")
        handle = Handle(job, emit)
        self._waiting.put(handle)
        self.stats.waiting = self._waiting.qsize()
        return handle

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread; requests still waiting or running finish as cancelled."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the engine thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                     enabled=self.assistant.precision == "bf16"):
            while not self._stop.is_set():
                self._admit()
                if self._running:
                    self._guarded_step()
        for slot in list(self._running):
            self._finish(slot, "cancelled")
        while not self._waiting.empty():
            self._refuse(self._waiting.get_nowait(), "cancelled", "")

    def _admit(self) -> None:
        """Prefill waiting jobs into free slots; with nothing running, wait a little for one."""
        while len(self._running) < self.cache.n_slots:
            try:
                handle = self._waiting.get(timeout=0.05) if not self._running else self._waiting.get_nowait()
            except queue.Empty:
                break
            self.stats.waiting = self._waiting.qsize()
            if handle.cancelled:
                self._refuse(handle, "cancelled", "")
                continue
            slot = min(set(range(self.cache.n_slots)) - set(self._running))
            try:
                self._prefill(slot, handle)
            except Exception as e:  # noqa: BLE001 - one bad request must not stop the others
                self._running.pop(slot, None)
                self._refuse(handle, "error", f"{type(e).__name__}: {e}")
        self.stats.running = len(self._running)

    def _prefill(self, slot: int, handle: Handle) -> None:
        job = handle.job
        queued = time.monotonic() - handle.submitted
        ids = torch.tensor([job.prompt], device=self.device)  # (1, L)
        L = ids.shape[1]
        positions = torch.arange(L, device=self.device)[None]
        pixels = None if job.pixel_values is None else job.pixel_values.to(self.device, self.dtype)
        embeds, cross = self.model.prepare(ids, pixels, job.instructions, positions)  # (1, L, D)
        self.cache.reset(slot)
        self.cache.select([slot])
        hidden = self.model.lm(embeds, positions, _attn_mask(torch.ones(1, L, dtype=torch.bool, device=self.device), L),
                               self.cache, cross)
        state = TextState(job.gen, self.stop_ids, self.tok.decode, lambda t: handle.emit(Delta(t)))
        run = _Running(handle, state, torch.Generator(device="cpu").manual_seed(job.gen.seed), cross=cross)
        logits = self.model.lm.logits(hidden[:, -1])  # (1, V)
        token = pick_tokens(logits, [job.gen], [run.rng])[0]
        self._running[slot] = run
        self._merged = None
        self.stats.running = len(self._running)
        handle.emit(Started(queued))
        self._take(slot, token)

    def _guarded_step(self) -> None:
        try:
            self._step()
        except Exception as e:  # noqa: BLE001 - fail the batch's requests, keep serving
            for slot in list(self._running):
                self._finish(slot, "error", f"{type(e).__name__}: {e}")

    def _step(self) -> None:
        """One token for every running slot, in one forward."""
        for slot in [s for s, r in self._running.items() if r.handle.cancelled]:
            self._finish(slot, "cancelled")
        rows = sorted(self._running)
        if not rows:
            return
        runs = [self._running[s] for s in rows]
        lengths = [self.cache.lengths[s] for s in rows]
        tokens = torch.tensor([[r.token] for r in runs], device=self.device)  # (B, 1)
        positions = torch.tensor(lengths, device=self.device)[:, None]  # (B, 1)
        self.cache.select(rows)
        hidden = self.model.lm(self.model.lm.embed(tokens), positions, decode_mask(lengths, self.device),
                               self.cache, self._cross(rows))
        logits = self.model.lm.logits(hidden[:, -1])  # (B, V)
        picked = pick_tokens(logits, [r.state.gen for r in runs], [r.rng for r in runs])
        self.stats.steps += 1
        if self.stats.on_step is not None:
            self.stats.on_step(len(rows))
        for slot, token in zip(rows, picked):
            self._take(slot, token)

    def _cross(self, rows: list[int]) -> CrossContext | None:
        """The batch's visual context for gated cross-attention (None for other fusions)."""
        if self.model.xattn is None:
            return None
        key = tuple(rows)
        if self._merged is None or self._merged[0] != key:
            self._merged = key, merge_cross([self._running[s].cross for s in rows])
        return self._merged[1]

    def _take(self, slot: int, token: int) -> None:
        run = self._running[slot]
        run.token = token
        if run.state.add(token):
            self._finish(slot, run.state.finish)

    def _finish(self, slot: int, reason: str, error: str = "") -> None:
        run = self._running.pop(slot)
        self._merged = None
        self.stats.running = len(self._running)
        s = run.state
        run.handle.emit(Finished(reason, s.answer, tuple(s.tokens), len(run.handle.job.prompt), s.sampled, error))

    def _refuse(self, handle: Handle, reason: str, error: str) -> None:
        handle.emit(Finished(reason, "", (), len(handle.job.prompt), 0, error))
