"""Bad and hostile input to `vitune serve` (issue 10, section 3): each case gets a 4xx with an
OpenAI-style error body whose message names the field at fault, and then a normal request must
still succeed. Cases: malformed JSON, unknown model, missing and wrong-typed fields, non-image
bytes, truncated images, decompression bombs (refused from the header), bodies and images over
the byte limits, too many images, max_tokens over the model's limit, prompts over the context,
remote http(s) URLs, file: URLs and paths outside the allowed folder, non-UTF-8 bodies and lone
surrogates, and a slow-loris body (the read timeout)."""

from __future__ import annotations

import json
import socket
import struct
import time
import zlib

import httpx
import pytest
from PIL import Image
from serve_helpers import LiveServer, data_url, image, image_part, model_folder, png_bytes

from vitune.inference.assistant import Assistant
from vitune.serving.settings import ServeSettings

pytestmark = pytest.mark.usefixtures("one_thread")
KB = 1024


@pytest.fixture(scope="module")
def allowed(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    (root / "allowed").mkdir()
    image(1).save(root / "allowed" / "ok.png")
    image(2).save(root / "outside.png")
    return root


@pytest.fixture(scope="module")
def live(tmp_path_factory, tok, allowed):
    bot = Assistant.load(model_folder(tok, tmp_path_factory.mktemp("model") / "tiny"))
    settings = ServeSettings(max_body_bytes=256 * KB, read_timeout_s=1.0, max_images=3, max_image_bytes=64 * KB,
                             max_image_pixels=250_000, allow_file_dirs=(allowed / "allowed",))
    with LiveServer(bot, settings) as server:
        yield server


def chat(content, **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def with_image(url: str) -> dict:
    return chat([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}])


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (its data is a 1x1 image's): a bomb's header."""
    png = bytearray(png_bytes(image(0, (1, 1))))
    ihdr = png[12:29]  # b"IHDR" + 13 bytes of data
    ihdr[4:12] = struct.pack(">II", width, height)
    png[12:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(png)


def noise_png(side: int) -> bytes:
    return png_bytes(image(5, (side, side)))


GOOD_PNG = png_bytes(image(3))
URL = "messages[0].content[0].image_url.url"
CASES = [
    # (id, body (dict: sent as JSON; bytes: sent as they are), status, code, what the message names)
    ("malformed json", b'{"model": "tiny", "messages": [', 400, "invalid_json", "not valid JSON"),
    ("not an object", b"[1, 2, 3]", 400, "invalid_json", "JSON object"),
    ("nan", b'{"model": "tiny", "temperature": NaN, "messages": []}', 400, "invalid_json", "NaN"),
    ("empty body", b"", 400, "invalid_json", "empty"),
    ("non-utf-8 body", b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400,
     "invalid_encoding", "UTF-8"),
    ("lone surrogate", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', 400,
     "invalid_encoding", "messages[0].content"),
    ("unknown model", {**chat("hi"), "model": "gpt-4"}, 404, "model_not_found", "'gpt-4'"),
    ("missing model", {"messages": chat("hi")["messages"]}, 400, "missing_field", "model"),
    ("missing messages", {"model": "tiny"}, 400, "missing_field", "messages"),
    ("messages not an array", {"model": "tiny", "messages": "hi"}, 400, "invalid_type", "messages"),
    ("empty messages", {"model": "tiny", "messages": []}, 400, "invalid_value", "messages"),
    ("message not an object", {"model": "tiny", "messages": ["hi"]}, 400, "invalid_type", "messages[0]"),
    ("unknown role", {"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}, 400, "invalid_value",
     "messages[0].role"),
    ("content wrong type", chat(42), 400, "invalid_type", "messages[0].content"),
    ("unknown part type", chat([{"type": "input_audio", "input_audio": {}}]), 400, "invalid_type",
     "messages[0].content[0].type"),
    ("text part without text", chat([{"type": "text"}]), 400, "missing_field", "messages[0].content[0].text"),
    ("image slot character", chat("a \ufffc b"), 400, "invalid_value", "messages[0].content"),
    ("last message not the user's", {"model": "tiny", "messages": [{"role": "user", "content": "q"},
                                                                   {"role": "assistant", "content": "a"}]},
     400, "invalid_value", "messages[1].role"),
    ("image in an assistant message", {"model": "tiny", "messages": [
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": data_url(GOOD_PNG)}}]},
        {"role": "user", "content": "q"}]}, 400, "invalid_value", "messages[0].content[0]"),
    ("max_tokens a string", chat("hi", max_tokens="ten"), 400, "invalid_type", "max_tokens"),
    ("max_tokens zero", chat("hi", max_tokens=0), 400, "invalid_value", "max_tokens"),
    ("max_tokens a boolean", chat("hi", max_tokens=True), 400, "invalid_type", "max_tokens"),
    ("temperature out of range", chat("hi", temperature=5), 400, "invalid_value", "temperature"),
    ("top_p zero", chat("hi", top_p=0), 400, "invalid_value", "top_p"),
    ("stop not strings", chat("hi", stop=[1]), 400, "invalid_type", "stop[0]"),
    ("seed a float", chat("hi", seed=1.5), 400, "invalid_type", "seed"),
    ("n of 2", chat("hi", n=2), 400, "unsupported_parameter", "n"),
    ("tools", chat("hi", tools=[{"type": "function"}]), 400, "unsupported_parameter", "tools"),
    ("stream not a boolean", chat("hi", stream="yes"), 400, "invalid_type", "stream"),
    ("stream_options without stream", chat("hi", stream_options={"include_usage": True}), 400, "invalid_value",
     "stream_options"),
    ("max_tokens over the model's limit", chat("hi", max_tokens=500), 400, "context_length_exceeded", "max_tokens"),
    ("prompt over the context", chat("word " * 60), 400, "context_length_exceeded", "messages"),
    ("non-image bytes", with_image(data_url(b"this is not an image at all")), 400, "invalid_image", URL),
    ("truncated image", with_image(data_url(noise_png(60)[:400])), 400, "invalid_image", URL),
    ("decompression bomb", with_image(data_url(bomb_png(12000, 12000))), 400, "image_too_large", "pixels"),
    ("image over the pixel limit", with_image(data_url(png_bytes(Image.new("RGB", (600, 500))))), 400,
     "image_too_large", URL),
    ("image over the byte limit", with_image(data_url(noise_png(200))), 413, "image_too_large", URL),
    ("not base64", with_image("data:image/png;base64,@@@@"), 400, "invalid_value", URL),
    ("not an image media type", with_image("data:text/html;base64,PGI+"), 400, "invalid_value", URL),
    ("too many images", chat([image_part(image(i)) for i in range(4)]), 400, "too_many_images", "messages"),
    ("remote http url", with_image("http://example.com/cat.png"), 400, "remote_url_refused", URL),
    ("remote https url", with_image("https://example.com/cat.png"), 400, "remote_url_refused", URL),
    ("unknown url scheme", with_image("ftp://example.com/cat.png"), 400, "invalid_value", URL),
    ("body over the byte limit", chat("x" * (300 * KB)), 413, "payload_too_large", "bytes"),
    ("embeddings of token ids", {"model": "tiny", "input": [1, 2, 3]}, 400, "invalid_type", "input"),
]


def post(live, body, path: str = "/v1/chat/completions") -> httpx.Response:
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else \
        {"json": body}
    return httpx.post(f"{live.url}{path}", timeout=30, **kw)


def assert_error(r: httpx.Response, status: int, code: str, names: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code, err
    assert names in err["message"], err
    assert "Traceback" not in r.text


def assert_still_serving(live) -> None:
    r = post(live, with_image(data_url(GOOD_PNG)))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_refused_and_the_server_stays_up(live, case):
    name, body, status, code, names = case
    path = "/v1/embeddings" if name.startswith("embeddings") else "/v1/chat/completions"
    assert_error(post(live, body, path), status, code, names)
    assert_still_serving(live)


@pytest.mark.parametrize("where, code", [("outside", "file_url_refused"), ("traversal", "file_url_refused"),
                                         ("missing", "file_not_found")])
def test_file_urls_outside_the_allowed_folder_are_refused(live, allowed, where, code):
    url = {"outside": f"file://{allowed / 'outside.png'}", "traversal": "../outside.png",
           "missing": "nope.png"}[where]
    assert_error(post(live, with_image(url)), 400, code, URL)
    assert_still_serving(live)


def test_file_urls_and_paths_under_the_allowed_folder_are_read(live, allowed):
    for url in (f"file://{allowed / 'allowed' / 'ok.png'}", "ok.png", str(allowed / "allowed" / "ok.png")):
        r = post(live, with_image(url))
        assert r.status_code == 200, (url, r.text)


def test_file_urls_are_refused_without_an_allowed_folder(tmp_path, tok, allowed):
    bot = Assistant.load(model_folder(tok, tmp_path / "m"))
    with LiveServer(bot, ServeSettings()) as server:
        r = post(server, with_image(f"file://{allowed / 'allowed' / 'ok.png'}"))
    assert_error(r, 400, "file_url_refused", "--allow-file-dir")


def test_a_huge_declared_body_is_refused_before_it_is_read(live):
    with socket.create_connection(("127.0.0.1", int(live.url.rsplit(":", 1)[1])), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 999999999\r\n\r\n")
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413") and "payload_too_large" in reply
    assert_still_serving(live)


def _read_whole_reply(s: socket.socket, reply: bytes) -> bytes:
    """`reply` read on until its body holds Content-Length bytes (or the server closes)."""
    while True:
        head, sep, body = reply.partition(b"\r\n\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), None)
        if sep and length is not None and len(body) >= length:
            return reply
        chunk = s.recv(4096)
        if not chunk:
            return reply
        reply += chunk


def test_a_slow_loris_body_times_out(live):
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", int(live.url.rsplit(":", 1)[1])), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 200\r\n\r\n{")
        reply = b""
        for _ in range(40):  # one byte every 0.1 s: 200 bytes would take 20 s
            try:
                s.sendall(b" ")
            except OSError:
                break
            s.settimeout(0.1)
            try:
                reply += s.recv(4096)
                break
            except socket.timeout:
                continue
        s.settimeout(5)
        reply += s.recv(4096) if not reply else b""
        reply = _read_whole_reply(s, reply)  # headers and body can come in separate segments under load
    assert reply.startswith(b"HTTP/1.1 408"), reply
    body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_timeout" and "1 s" in body["error"]["message"]
    assert time.monotonic() - t0 < 4
    assert_still_serving(live)


def test_metrics_count_the_refusals(live):
    metrics = httpx.get(f"{live.url}/metrics").text
    assert 'endpoint="/v1/chat/completions",status="400"' in metrics
    assert 'endpoint="/v1/chat/completions",status="413"' in metrics


@pytest.mark.parametrize("method, path, status", [("GET", "/index.php", 404), ("POST", "/v1/completions", 404),
                                                  ("GET", "/v1/chat/completions", 405)])
def test_unknown_routes_and_methods_get_openai_style_errors(live, method, path, status):
    r = httpx.request(method, f"{live.url}{path}")
    assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
