"""`vitune serve`'s API against a live server on 127.0.0.1, through the official `openai` client:
answers equal `Assistant.answer`, streaming (chunks, usage, `[DONE]`), two concurrent streams
batched together, /v1/models, /health, /metrics, the API key, embeddings from the retrieval
head, a client that disconnects freeing its slot, the drain on SIGTERM, and `python -m
vitune.serving` end to end. Tiny random models; the server runs in a thread of the test process
(the SIGTERM test: in a subprocess)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from serve_helpers import LiveServer, image, image_part, model_folder

from vitune.data.processor import _encode_text, pad_instructions
from vitune.inference.assistant import Assistant, Request, user_turn
from vitune.inference.generate import GenerationConfig
from vitune.serving.server import Drain
from vitune.serving.settings import ServeSettings

pytestmark = pytest.mark.usefixtures("one_thread")
KEY = "test-key"


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tok) -> Path:
    return model_folder(tok, tmp_path_factory.mktemp("serve") / "tiny", contrastive=True)


@pytest.fixture(scope="module")
def bot(folder) -> Assistant:
    return Assistant.load(folder)


@pytest.fixture(scope="module")
def live(bot):
    with LiveServer(bot, ServeSettings(api_key=KEY, max_batch=4)) as server:
        yield server


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=30)


def ask(question: str, *images) -> list[dict]:
    return [{"role": "user", "content": [*(image_part(im) for im in images), {"type": "text", "text": question}]}]


def test_an_answer_equals_assistant_answer(client, bot):
    im = image(3)
    r = client.chat.completions.create(model="tiny", messages=ask("what is it?", im), max_tokens=12, temperature=0)
    req = Request([im], [user_turn("what is it?", 1)])
    assert r.choices[0].message.content == bot.answer(req, GenerationConfig(max_new_tokens=12))
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion" and r.model == "tiny"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(bot.prompt_ids(req, 12))
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_multi_turn_and_system_messages_render_as_the_chat_template(client, bot):
    from vitune.data.chat import Message
    im = image(4)
    messages = [{"role": "system", "content": "be brief"}, *ask("colour?", im), {"role": "assistant", "content": "red"},
                {"role": "user", "content": [{"type": "text", "text": "and?"}]}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    req = Request([im], [Message("system", "be brief"), user_turn("colour?", 1), Message("assistant", "red"),
                         Message("user", "and?")])
    assert r.choices[0].message.content == bot.answer(req, GenerationConfig(max_new_tokens=8))
    assert r.usage.prompt_tokens == len(bot.prompt_ids(req, 8))


def stream_text(client, messages, max_tokens, **kw) -> tuple[str, list]:
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens,
                                                 temperature=0, stream=True, **kw))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_streaming_matches_the_answer_and_reports_usage(client, live):
    messages = ask("stream it", image(5))
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    text, chunks = stream_text(client, messages, 16, stream_options={"include_usage": True})
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1]) and len({c.id for c in chunks}) == 1
    raw = httpx.post(f"{live.url}/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                     json={"model": "tiny", "messages": messages, "max_tokens": 4, "stream": True}, timeout=30)
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]") and '"usage"' not in raw.text


def test_two_concurrent_streams_are_decoded_together(client, live):
    a, b = ask("the first, long", image(6)), ask("second")
    alone = [client.chat.completions.create(model="tiny", messages=m, max_tokens=n, temperature=0)
             for m, n in ((a, 120), (b, 10))]
    assert alone[0].choices[0].finish_reason == "length"  # so it is still decoding when b arrives
    stats = live.state.engine.stats
    steps_before, observe, sizes = stats.steps, stats.on_step, []
    stats.on_step = lambda n: (sizes.append(n), observe(n))
    first = client.chat.completions.create(model="tiny", messages=a, max_tokens=120, temperature=0, stream=True)
    pieces = [next(first).choices[0].delta.content]
    second_text, _ = stream_text(client, b, 10)
    pieces += [c.choices[0].delta.content or "" for c in first]
    assert "".join(pieces) == alone[0].choices[0].message.content
    assert second_text == alone[1].choices[0].message.content
    stats.on_step = observe
    assert max(sizes) == 2 and stats.steps > steps_before


def test_models_health_and_metrics(client, live):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    health = httpx.get(f"{live.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert httpx.get(f"{live.url}/metrics").status_code == 401
    metrics = httpx.get(f"{live.url}/metrics", headers={"authorization": f"Bearer {KEY}"}).text
    for name in ("vitune_requests_total{", "vitune_completion_tokens_total", "vitune_queue_length",
                 "vitune_request_latency_seconds_bucket", "vitune_time_to_first_token_seconds_count",
                 "vitune_decode_batch_size_bucket"):
        assert name in metrics, name
    assert 'endpoint="/v1/chat/completions",status="200"' in metrics


def test_the_api_key_is_required(live):
    wrong = openai.OpenAI(base_url=f"{live.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.chat.completions.create(model="tiny", messages=ask("hi"))
    assert e.value.status_code == 401 and e.value.body["type"] == "authentication_error"
    r = httpx.get(f"{live.url}/v1/models")
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_embeddings_are_the_retrieval_heads(client, bot, live):
    texts = ["a red square", "two blue circles"]
    got = client.embeddings.create(model="tiny", input=texts)  # the client asks for base64
    max_len = bot.model.cfg.contrastive.text.max_len
    ids = [_encode_text(bot.tok, t, max_len, "t", "text encoder", print) for t in texts]
    with torch.no_grad():
        want = bot.model.embed_texts(*pad_instructions(ids, bot.tok.special.eos))
        want_image = bot.model.embed_images(bot.transform([image(7)]))[0]
    assert torch.allclose(torch.tensor([d.embedding for d in got.data]), want, atol=1e-6)
    assert got.usage.prompt_tokens == sum(len(x) for x in ids)
    body = {"model": "tiny", "input": ["a red square", image_part(image(7))], "encoding_format": "float"}
    raw = httpx.post(f"{live.url}/v1/embeddings", headers={"authorization": f"Bearer {KEY}"}, timeout=30, json=body)
    assert raw.status_code == 200, raw.text
    vectors = torch.tensor([d["embedding"] for d in raw.json()["data"]])
    assert torch.allclose(vectors[0], want[0], atol=1e-6) and torch.allclose(vectors[1], want_image, atol=1e-6)


def test_embeddings_need_a_retrieval_head(tmp_path, tok):
    plain = Assistant.load(model_folder(tok, tmp_path / "plain"))
    with LiveServer(plain, ServeSettings()) as server:
        r = httpx.post(f"{server.url}/v1/embeddings", json={"model": "tiny", "input": "x"})
    assert r.status_code == 400 and "no retrieval head" in r.json()["error"]["message"]


def slow_steps(engine, seconds: float) -> None:
    """Make each decode step take at least `seconds` (so a request stays in flight for a while)."""
    step = engine._step

    def slow() -> None:
        time.sleep(seconds)
        step()
    engine._step = slow


def test_a_client_that_disconnects_frees_its_slot(client, live):
    engine = live.state.engine
    reasons: list[str] = []
    finish = engine._finish
    engine._finish = lambda slot, reason, error="": (reasons.append(reason), finish(slot, reason, error))
    slow_steps(engine, 0.01)
    try:
        with httpx.stream("POST", f"{live.url}/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                          json={"model": "tiny", "messages": ask("long"), "max_tokens": 150, "stream": True},
                          timeout=30) as r:
            next(r.iter_lines())
        deadline = time.monotonic() + 10
        while not reasons and time.monotonic() < deadline:
            time.sleep(0.02)
        assert reasons == ["cancelled"] and engine.stats.running == 0, (reasons, engine.stats.running)
    finally:
        del engine._finish, engine._step


def test_draining_finishes_in_flight_requests_and_refuses_new_ones(bot):
    with LiveServer(bot, ServeSettings(drain_timeout_s=20)) as server:
        slow_steps(server.state.engine, 0.02)
        c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=30)
        stream = c.chat.completions.create(model="tiny", messages=ask("in flight"), max_tokens=60, temperature=0,
                                           stream=True)
        pieces = [next(stream).choices[0].delta.content]
        Drain(server.server, server.state.lifecycle, 20).on_signal(signal.SIGTERM, None)
        with pytest.raises(openai.APIStatusError) as refused:
            c.chat.completions.create(model="tiny", messages=ask("new"), max_tokens=2)
        assert refused.value.status_code == 503 and httpx.get(f"{server.url}/health").status_code == 503
        chunks = list(stream)
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        pieces += [c.choices[0].delta.content or "" for c in chunks]
        want = bot.answer(Request([], [user_turn("in flight", 0)]), GenerationConfig(max_new_tokens=60))
        assert "".join(pieces) == want  # the in-flight answer went on to its end
        server.thread.join(10)
        assert not server.thread.is_alive()  # the drain ended the server once nothing was in flight


def test_python_m_vitune_serving_serves_and_stops_on_sigterm(folder):
    env = {**os.environ, "VITUNE_API_KEY": KEY, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "vitune.serving", "--model", str(folder), "--port", "0",
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "vitune serve: model 'tiny' at http://127.0.0.1:" in line, line + proc.stderr.read()
        url = line.split(" at ")[1].split()[0]
        c = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=30)
        deadline = time.monotonic() + 60  # generous: a loaded CI machine starts python slowly
        while time.monotonic() < deadline:
            try:
                r = c.chat.completions.create(model="tiny", messages=ask("hi", image(1)), max_tokens=3, temperature=0)
                break
            except openai.APIConnectionError:
                time.sleep(0.1)
        assert r.choices[0].finish_reason in ("stop", "length")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert "SIGTERM: draining" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()

