"""The serving engine (continuous batching) on tiny random models: requests admitted at different
decode steps, or arriving together and prefilled in one right-padded forward, with different
prompt lengths and images, get the very token ids they get alone (`generate` on one prompt, what
`Assistant.answer` runs) for every fusion kind; the prefill budget splits a burst into forwards
with decode steps between them; cancellation and errors free their slots; seeded sampling does
not depend on the batch; streamed deltas add up to the answer; the slot cache writes each row at
its own length. Exact equality is the rule (no tolerance): these models and batches have shown no
argmax tie that batched float rounding flips."""

from __future__ import annotations

import dataclasses
import queue
import threading

import pytest
import torch
from serve_helpers import image, tiny_model

from vitune.config import FusionConfig
from vitune.data.chat import stop_token_id
from vitune.data.packing import common_prefix_len
from vitune.inference.assistant import Assistant, Request, user_turn
from vitune.inference.generate import GenerationConfig, generate
from vitune.serving.decoding import StrippedStream
from vitune.serving.engine import Delta, Engine, EngineStats, Finished, Job, Started
from vitune.serving.slot_cache import SlotCache, decode_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def fusion(tok, kind: str) -> dict:
    if kind == "projector":
        return {}
    f = FusionConfig(kind=kind, queries=3, layers=1, heads=2)
    text = dataclasses.replace(f.text, vocab_size=tok.vocab_size, dim=32, heads=2, ffn_dim=64, pad_id=tok.special.eos)
    return {"fusion": dataclasses.replace(f, text=text)}


@pytest.fixture(scope="module")
def bot(tok):
    return Assistant(tiny_model(tok), tok)


def requests() -> list[Request]:
    """Prompts of different lengths: one image, none, two images, a multi-turn chat."""
    from vitune.data.chat import Message
    a, b, c = image(0), image(1, (30, 18)), image(2)
    return [
        Request([a], [user_turn("what is it?", 1)]),
        Request([], [user_turn("a text-only question that is a good deal longer than the others", 0)]),
        Request([b, c], [user_turn("compare", 2)]),
        Request([a], [user_turn("colour?", 1), Message("assistant", "red"), Message("user", "and the shape?")]),
        Request([c], [user_turn("x", 1)]),
    ]


def job(bot: Assistant, req: Request, gen: GenerationConfig) -> Job:
    instr = bot.instructions([req], torch.device("cpu")) if bot.model.needs_instruction and req.images else None
    return Job(bot.prompt_ids(req, gen.max_new_tokens), bot.transform(req.images) if req.images else None, gen, instr)


def alone(bot: Assistant, req: Request, gen: GenerationConfig) -> list[int]:
    """The token ids `Assistant.answer` decodes for `req` alone (stop token excluded)."""
    j = job(bot, req, gen)
    stops = {stop_token_id(bot.tok, bot.template), bot.tok.special.eos}
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bot.precision == "bf16"):
        return generate(bot.model, [j.prompt], j.pixel_values, gen, stops, bot.tok.decode, bot.tok.special.eos,
                        instructions=j.instructions).token_ids[0]


class Collector:
    """One request's events, as the engine emits them."""

    def __init__(self):
        self.events: list = []
        self.done = threading.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        if isinstance(event, Finished):
            self.done.set()

    def finished(self, timeout: float = 30) -> Finished:
        assert self.done.wait(timeout), "the request did not finish"
        return self.events[-1]

    @property
    def streamed(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, Delta))


def run_staggered(engine: Engine, jobs: list[Job], admit_at: list[int]) -> tuple[list[Finished], list[Collector]]:
    """Submit job i once the engine has made `admit_at[i]` decode steps (0: before it starts), or
    as soon as it idles (everything before it finished early); the batch must have been shared."""
    sinks = [Collector() for _ in jobs]
    pending = sorted(range(len(jobs)), key=lambda i: admit_at[i])
    lock, sizes = threading.Lock(), []

    def admit(due) -> None:
        with lock:
            while pending and due(admit_at[pending[0]]):
                i = pending.pop(0)
                engine.submit(jobs[i], sinks[i])

    observe = engine.stats.on_step

    def on_step(batch: int) -> None:
        sizes.append(batch)
        if observe is not None:
            observe(batch)
        admit(lambda at: at <= engine.stats.steps)
    engine.stats.on_step = on_step
    admit(lambda at: at == 0)
    engine.start()
    try:
        while pending:
            threading.Event().wait(0.01)
            with lock:
                submitted = [sinks[i] for i in range(len(jobs)) if i not in pending]
            if all(s.done.is_set() for s in submitted):
                admit(lambda at: True)
        out = [s.finished() for s in sinks]
    finally:
        engine.stop()
    assert max(sizes) > 1, "the requests never shared a decode step"
    return out, sinks


@pytest.mark.parametrize("kind", ["projector", "xattn", "film"])
def test_staggered_batched_greedy_equals_one_by_one(tok, kind):
    bot = Assistant(tiny_model(tok, **fusion(tok, kind)), tok)
    gen = GenerationConfig(max_new_tokens=20)
    reqs = requests()
    want = [alone(bot, r, gen) for r in reqs]
    engine = Engine(bot, max_batch=3)
    got, sinks = run_staggered(engine, [job(bot, r, gen) for r in reqs], [0, 0, 3, 5, 9])
    assert [list(f.token_ids) for f in got] == want
    assert engine.stats.prefix_reused > 0  # the later prompts copied the chat template's opening
    assert len({tuple(w) for w in want}) == len(want)  # the requests really differ
    if kind == "projector":
        assert [f.text for f in got] == [bot.answer(r, gen) for r in reqs]
    for f, s in zip(got, sinks):
        assert isinstance(s.events[0], Started) and s.streamed == f.text
        assert f.reason in ("stop", "length") and f.prompt_tokens > 0
        assert f.completion_tokens == len(f.token_ids) + (f.reason == "stop")


@pytest.mark.parametrize("kind", ["projector", "xattn", "film"])
def test_a_burst_is_prefilled_in_one_forward_as_alone(tok, kind):
    bot = Assistant(tiny_model(tok, **fusion(tok, kind)), tok)
    gen = GenerationConfig(max_new_tokens=12)
    reqs = requests()
    jobs = [job(bot, r, gen) for r in reqs]
    assert len({len(j.prompt) for j in jobs}) == len(jobs)  # every row padded differently
    engine = Engine(bot, max_batch=len(jobs))
    got, _ = run_staggered(engine, jobs, [0] * len(jobs))
    assert engine.stats.prefills == 1
    assert [list(f.token_ids) for f in got] == [alone(bot, r, gen) for r in reqs]


def test_the_prefill_budget_splits_a_burst_between_decode_steps(bot):
    gen = GenerationConfig(max_new_tokens=12)
    reqs = requests()
    jobs = [job(bot, r, gen) for r in reqs]
    want = [alone(bot, r, gen) for r in reqs]
    longest = max(len(j.prompt) for j in jobs)
    engine = Engine(bot, max_batch=len(jobs), prefill_tokens=2 * longest - 1)  # the longest prompt runs alone
    got, _ = run_staggered(engine, jobs, [0] * len(jobs))
    assert 1 < engine.stats.prefills < len(jobs)
    assert [list(f.token_ids) for f in got] == want
    one_by_one, sizes = Engine(bot, max_batch=len(jobs), prefill_tokens=1), []
    one_by_one.stats.on_step = sizes.append
    got, _ = run_staggered(one_by_one, jobs, [0] * len(jobs))
    assert one_by_one.stats.prefills == len(jobs) and sizes[0] == 1  # a decode step after the first prefill
    assert [list(f.token_ids) for f in got] == want


def test_prompts_copy_the_kept_start_of_earlier_ones(bot):
    gen = GenerationConfig(max_new_tokens=8)
    text, pictured = requests()[1], requests()[0]
    jobs = [job(bot, r, gen) for r in (text, text, pictured)]
    image_at = jobs[2].prompt.index(bot.tok.special.image)
    engine = Engine(bot, max_batch=2).start()
    reused = []
    try:
        for j, r in zip(jobs, (text, text, pictured)):
            sink = Collector()
            engine.submit(j, sink)
            assert list(sink.finished().token_ids) == alone(bot, r, gen)
            reused.append(engine.stats.prefix_reused - sum(reused))
    finally:
        engine.stop()
    # nothing kept yet; the same text prompt: all but its last token; then the opening before the image
    assert reused == [0, len(jobs[1].prompt) - 1, common_prefix_len([jobs[0].prompt, jobs[2].prompt])]
    assert 0 < reused[2] <= image_at


def test_bf16_autocast_batches_as_alone(tok):
    bot = Assistant(tiny_model(tok), tok, precision="bf16")
    gen = GenerationConfig(max_new_tokens=12)
    reqs = requests()[:3]
    got, _ = run_staggered(Engine(bot, max_batch=3), [job(bot, r, gen) for r in reqs], [0, 0, 2])
    assert all(f.reason in ("stop", "length") for f in got)
    assert [list(f.token_ids) for f in got] == [alone(bot, r, gen) for r in reqs]


def test_cancelling_frees_the_slot_for_the_next_request(bot):
    engine = Engine(bot, max_batch=1).start()
    try:
        long_gen = GenerationConfig(max_new_tokens=150)
        first, second = Collector(), Collector()
        handle = engine.submit(job(bot, Request([], [user_turn("hi", 0)]), long_gen), first)
        engine.submit(job(bot, Request([], [user_turn("next", 0)]), GenerationConfig(max_new_tokens=5)), second)
        while not first.events:
            first.done.wait(0.01)
        handle.cancel()
        assert first.finished().reason == "cancelled"
        assert first.finished().completion_tokens < 150
        assert second.finished().reason in ("stop", "length")
        assert engine.stats.running == 0 and engine.stats.waiting == 0
    finally:
        engine.stop()


def test_a_failing_request_does_not_stop_the_others(bot):
    gen = GenerationConfig(max_new_tokens=4)
    good = job(bot, Request([image(0)], [user_turn("q", 1)]), gen)
    bad = dataclasses.replace(good, pixel_values=None)  # image tokens but no image: prepare refuses it
    engine = Engine(bot, max_batch=3)
    sinks = [Collector(), Collector(), Collector()]
    for j, sink in zip([good, bad, good], sinks):  # submitted before the start: one prefill
        engine.submit(j, sink)
    engine.start()
    try:
        failed = sinks[1].finished()
        assert failed.reason == "error" and "image" in failed.error
        assert [sinks[i].finished().token_ids for i in (0, 2)] == [tuple(alone(bot, Request([image(0)],
                                                                   [user_turn("q", 1)]), gen))] * 2
        assert engine.stats.prefills == 1
    finally:
        engine.stop()


def test_seeded_sampling_does_not_depend_on_the_batch(bot):
    reqs = requests()
    sampled = GenerationConfig(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    want = alone(bot, reqs[0], sampled)
    others = [job(bot, r, dataclasses.replace(sampled, seed=100 + i)) for i, r in enumerate(reqs[1:])]
    for admit in ([0, 0, 0, 0, 0], [4, 0, 0, 2, 0]):
        got, _ = run_staggered(Engine(bot, max_batch=4), [job(bot, reqs[0], sampled), *others], admit)
        assert list(got[0].token_ids) == want
    other_seed, _ = run_staggered(Engine(bot, max_batch=2), [job(bot, reqs[0], dataclasses.replace(sampled, seed=8)),
                                                            others[0]], [0, 0])
    assert list(other_seed[0].token_ids) != want


def test_stop_strings_cut_the_answer_and_its_stream(bot):
    gen = GenerationConfig(max_new_tokens=20)
    texts = [(r, bot.tok.decode(alone(bot, r, gen)).strip()) for r in requests()]
    req, text, stop = next((r, t, ch) for r, t in texts for ch in t[1:]
                           if ch.isascii() and ch.isprintable() and not ch.isspace())
    stopped = dataclasses.replace(gen, stop_strings=(stop,))
    j = job(bot, req, stopped)
    with torch.inference_mode():
        want = generate(bot.model, [j.prompt], j.pixel_values, stopped, {bot.tok.special.im_end, bot.tok.special.eos},
                        bot.tok.decode, bot.tok.special.eos).texts[0].strip()
    got, sinks = run_staggered(Engine(bot, max_batch=2), [j, job(bot, requests()[0], gen)], [0, 0])
    assert got[0].reason == "stop" and got[0].text == want and len(want) < len(text)
    assert sinks[0].streamed == want and stop not in sinks[0].streamed


def test_submit_refuses_a_job_over_the_context(bot):
    with pytest.raises(ValueError, match="exceeds max_seq_len=192"):
        Engine(bot, max_batch=1).submit(Job([1] * 190, None, GenerationConfig(max_new_tokens=5)), lambda e: None)


def test_stripped_stream_adds_up_to_the_stripped_text():
    out: list[str] = []
    s = StrippedStream(out.append)
    pieces = ["  ", " a", " b  ", " ", "c ", "  "]
    for piece in pieces:
        s(piece)
    assert "".join(out) == "".join(pieces).strip() == "a b   c"


def test_slot_cache_writes_each_row_at_its_own_length(tok):
    cfg = tiny_model(tok).cfg.lm
    cache = SlotCache(cfg, n_slots=4, max_len=8, dtype=torch.float32, device=torch.device("cpu"))
    hd = cfg.dim // cfg.heads
    cache.lengths = [0, 3, 0, 1]
    cache.select([3, 1])  # out of slot order: a gathered copy
    k = torch.arange(2.0)[:, None, None, None].expand(2, cfg.kv_heads, 1, hd) + 10
    keys, _ = cache.update(0, k, k)
    assert keys.shape == (2, cfg.kv_heads, 4, hd)
    assert cache.k[0][3, 0, 1, 0] == 10 and cache.k[0][1, 0, 3, 0] == 11
    cache.length += 1
    assert cache.lengths == [0, 4, 0, 2]
    cache.prefilled([3, 1], [1, 2])
    assert cache.lengths == [0, 2, 0, 1]
    mask = decode_mask([2, 4], torch.device("cpu"))
    assert mask.shape == (2, 1, 1, 5) and mask[0, 0, 0].tolist() == [True, True, True, False, False]
    with pytest.raises(ValueError, match="distinct slots"):
        cache.select([1, 1])
    cache.select([1])
    with pytest.raises(ValueError, match="KV cache full"):
        cache.update(0, torch.zeros(1, cfg.kv_heads, 7, hd), torch.zeros(1, cfg.kv_heads, 7, hd))  # 2 + 7 > 8


def test_engine_stop_cancels_what_is_left(bot):
    engine = Engine(bot, max_batch=1, stats=EngineStats())
    sinks = [Collector(), Collector()]
    for s in sinks:
        engine.submit(job(bot, Request([], [user_turn("hi", 0)]), GenerationConfig(max_new_tokens=150)), s)
    engine.start()
    while not sinks[0].events:
        sinks[0].done.wait(0.01)
    engine.stop()
    assert [s.finished().reason for s in sinks] == ["cancelled", "cancelled"]
    with pytest.raises(RuntimeError, match="stopped"):
        engine.submit(job(bot, Request([], [user_turn("hi", 0)]), GenerationConfig()), queue.Queue().put)
