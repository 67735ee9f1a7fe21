"""The continuous-batching scheduler: one background thread runs the model for every request.

    submit(job, emit) -> Handle        from any thread; `emit` gets Started, Delta(text)..., then one
                                       Finished (or Finished alone: refused, cancelled while waiting)
    loop (engine thread):  admit waiting jobs into free slots, prefilled together in one forward
                           (at most `prefill_tokens` padded tokens; the rest wait for the next
                           iteration), each picking its first token -> one decode step for every
                           running slot together -> finished or cancelled requests free their
                           slots -> repeat

Requests join the running batch between decode steps: nobody waits for a batch to drain, and a
burst of arrivals is prefilled in as few forwards as the budget allows, each followed by a decode
step of the running batch (so a burst stalls running answers one prefill forward at a time).
Each request has its own KV cache slot (`SlotCache`), its own sampling generator and stop rules
(`decoding.TextState`), so its tokens are those of `Assistant.answer` for it alone (greedy: the
same token ids, up to float rounding in a batched matmul; sampled: the same seeded draws).

A batched prefill makes each row's input embeddings alone (`model.prepare` on its own prompt and
images: a request whose images fail is refused without failing the others), right-pads them and
runs the LM once; each row's tokens sit at positions `0 .. L-1` of its slot, as alone, and the
mask (`slot_mask`) hides the padding, whose keys the slot's length then leaves out. A prompt's
start that the last prefilled prompt shared before its first image (the chat template's opening,
a system prompt: `slot_cache.SharedPrefix`) is copied into the slot, not computed again.

Every fusion kind runs batched: projector, film and qformer models put the image tokens in the
sequence (instruction-conditioned ones get each image's instruction at prefill); gated
cross-attention (`xattn`) models keep each request's visual keys/values from its prefill and
prefill and decode forwards batch them (`slot_cache.merge_cross`).

`emit` is called on the engine thread and must not block (the API hands events to its event loop).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from vitune.data.chat import stop_token_id
from vitune.inference.assistant import Assistant
from vitune.inference.generate import GenerationConfig
from vitune.model.cross_attention import CrossContext
from vitune.model.vlm import Instructions
from vitune.serving.decoding import TextState, pick_tokens
from vitune.serving.slot_cache import SharedPrefix, SlotCache, decode_mask, merge_cross, slot_mask

PREFILL_TOKENS = 1024  # default budget of one prefill forward: rows x padded prompt length


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
    prefills: int = 0  # prefill forwards (a burst of arrivals may share one)
    prefix_reused: int = 0  # prompt tokens copied from the shared prefix instead of computed
    on_step: Callable[[int], None] | None = None  # the batch size of every decode step


class Engine:
    """`max_batch`: KV cache slots (requests decoded together); `prefill_tokens`: the most padded
    prompt tokens (rows x longest prompt) one prefill forward takes; a longer prompt runs alone."""

    def __init__(self, assistant: Assistant, max_batch: int = 8, stats: EngineStats | None = None,
                 prefill_tokens: int = PREFILL_TOKENS):
        if max_batch < 1 or prefill_tokens < 1:
            raise ValueError(f"max_batch and prefill_tokens must be >= 1, got {max_batch}, {prefill_tokens}")
        self.assistant, self.model, self.tok = assistant, assistant.model, assistant.tok
        self.stop_ids = frozenset({stop_token_id(self.tok, assistant.template), self.tok.special.eos})
        p = next(self.model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.cache = SlotCache(self.model.cfg.lm, max_batch, self.model.cfg.lm.max_seq_len, self.dtype, self.device)
        self.prefix = SharedPrefix()
        self.stats = stats or EngineStats()
        self.prefill_tokens = prefill_tokens
        self._waiting: queue.Queue[Handle] = queue.Queue()
        self._held: deque[Handle] = deque()  # taken off the queue, over the last prefill's budget
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
        while (handle := self._next_waiting(block=False)) is not None:
            self._refuse(handle, "cancelled", "")

    def _admit(self) -> None:
        """Prefill the next waiting jobs that fit in free slots and the budget, in one forward."""
        batch = self._next_batch()
        if batch:
            self._prefill(batch)
        self.stats.running = len(self._running)

    def _next_batch(self) -> list[Handle]:
        """Waiting jobs in arrival order, as many as free slots and `prefill_tokens` allow (at
        least one); with nothing running, wait a little for the first."""
        batch: list[Handle] = []
        while len(batch) < self.cache.n_slots - len(self._running):
            handle = self._next_waiting(block=not self._running and not batch)
            if handle is None:
                break
            if handle.cancelled:
                self._refuse(handle, "cancelled", "")
                continue
            longest = max(len(h.job.prompt) for h in [*batch, handle])
            if batch and (len(batch) + 1) * longest > self.prefill_tokens:
                self._held.appendleft(handle)
                break
            batch.append(handle)
        self.stats.waiting = len(self._held) + self._waiting.qsize()
        return batch

    def _next_waiting(self, block: bool) -> Handle | None:
        if self._held:
            return self._held.popleft()
        try:
            return self._waiting.get(timeout=0.05) if block else self._waiting.get_nowait()
        except queue.Empty:
            return None

    def _prefill(self, handles: list[Handle]) -> None:
        """Read the prompts of `handles` in one forward, each into a free slot, and pick each one's
        first token; a request whose inputs fail is refused alone, a failing forward refuses all."""
        start = time.monotonic()
        rows = self._rows(handles)
        if not rows:
            return
        slots = sorted(set(range(self.cache.n_slots)) - set(self._running))[:len(rows)]
        runs = [self._new_run(handle, cross) for handle, _, cross in rows]
        try:
            hidden = self._prefill_forward(slots, [h.job.prompt for h, *_ in rows], [e for _, e, _ in rows],
                                           [c for *_, c in rows])  # (n, D)
            picked = pick_tokens(self.model.lm.logits(hidden), [r.state.gen for r in runs], [r.rng for r in runs])
        except Exception as e:  # noqa: BLE001 - fail these requests, keep serving the running ones
            for handle, *_ in rows:
                self._refuse(handle, "error", f"{type(e).__name__}: {e}")
            return
        self._merged = None
        self.stats.prefills += 1
        for slot, run, token in zip(slots, runs, picked):
            self._running[slot] = run
            self.stats.running = len(self._running)
            run.handle.emit(Started(start - run.handle.submitted))
            self._take(slot, token)

    def _rows(self, handles: list[Handle]) -> list[tuple[Handle, torch.Tensor, CrossContext | None]]:
        """Each handle with its inputs (`_inputs`); one whose inputs fail is refused here."""
        rows = []
        for handle in handles:
            try:
                rows.append((handle, *self._inputs(handle.job)))
            except Exception as e:  # noqa: BLE001 - one bad request must not stop the others
                self._refuse(handle, "error", f"{type(e).__name__}: {e}")
        return rows

    def _inputs(self, job: Job) -> tuple[torch.Tensor, CrossContext | None]:
        """One prompt's input embeddings `(L, D)` with its images merged in, made alone (batch of
        one), and its visual context (gated cross-attention; None otherwise)."""
        ids = torch.tensor([job.prompt], device=self.device)  # (1, L)
        positions = torch.arange(ids.shape[1], device=self.device)[None]
        pixels = None if job.pixel_values is None else job.pixel_values.to(self.device, self.dtype)
        embeds, cross = self.model.prepare(ids, pixels, job.instructions, positions)  # (1, L, D)
        return embeds[0], cross

    def _new_run(self, handle: Handle, cross: CrossContext | None) -> _Running:
        gen = handle.job.gen
        state = TextState(gen, self.stop_ids, self.tok.decode, lambda t: handle.emit(Delta(t)))
        return _Running(handle, state, torch.Generator(device="cpu").manual_seed(gen.seed), cross=cross)

    def _prefill_forward(self, slots: list[int], prompts: list[list[int]], embeds: list[torch.Tensor],
                         crosses: list[CrossContext | None]) -> torch.Tensor:
        """Prompts (`embeds[i] (L_i, D)`) into `slots` in one forward, each slot starting with the
        kept shared prefix it matches and the rest right-padded -> the hidden state of each one's
        last prompt token `(n, D)`."""
        starts = [self.prefix.match(p) for p in prompts]
        rest = [e[c:] for e, c in zip(embeds, starts)]
        lengths = [r.shape[0] for r in rest]
        n, T = len(rest), max(lengths)
        x = rest[0].new_zeros(n, T, rest[0].shape[-1])
        for i, r in enumerate(rest):
            x[i, :lengths[i]] = r
        for slot, c in zip(slots, starts):
            self.prefix.load(self.cache, slot, c)
        self.cache.select(slots)
        first = torch.tensor(starts, device=self.device)
        positions = first[:, None] + torch.arange(T, device=self.device)[None, :]  # (n, T)
        cross = merge_cross(crosses) if self.model.xattn is not None else None
        hidden = self.model.lm(x, positions, slot_mask(starts, T, self.device), self.cache, cross)
        self.cache.prefilled(slots, [c + m for c, m in zip(starts, lengths)])
        self.prefix.keep(self.cache, slots[0], prompts[0], self.model.image_token_id)
        self.stats.prefix_reused += sum(starts)
        return hidden[torch.arange(n, device=self.device), torch.tensor(lengths, device=self.device) - 1]

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
