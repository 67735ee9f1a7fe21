"""The web page at `/` of `vitune serve` in a real headless browser: Debian's `chromium` driven by
Playwright through `executable_path` (Playwright's own browser downloads are never used). A live
server with a tiny random model and an API key: the public page loads, asks for the key, the user
types it, uploads an image through the file input, asks, and the answer streamed onto the page is
the API's non-streamed answer to the same request (temperature 0 by default); the page's
screenshot holds, where the answer box is, exactly the pixels of the API's answer drawn in that box
(and not those of the box with its text made transparent); no request leaves the server's origin. Then a wrong key, an image dropped on the page,
multi-turn (the second request carries the first answer), Shift+Enter, "New chat", a pasted image
removed and another attached, and an error body shown as readable text (the question given back).

Skipped, with the reason, only where playwright or chromium cannot be found (scripts/setup.sh
installs both: chromium via apt-get as root, playwright with the serve extra).
"""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image
from serve_helpers import LiveServer, data_url, image, model_folder, png_bytes

from vitune.inference.assistant import Assistant
from vitune.serving.settings import ServeSettings

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    expect = sync_playwright = None

pytestmark = pytest.mark.usefixtures("one_thread")
KEY = "page-key"
MAX_TOKENS = 10
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def browser():
    if sync_playwright is None:
        pytest.skip("playwright is not installed (it is in the serve extra: pip install -e '.[serve]')")
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium; scripts/setup.sh installs it as root)")
    with sync_playwright() as p:
        # --no-sandbox: chromium refuses to start as root (CI containers) with its sandbox on.
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory, tok):
    bot = Assistant.load(model_folder(tok, tmp_path_factory.mktemp("page") / "tiny"))
    with LiveServer(bot, ServeSettings(api_key=KEY, max_batch=2)) as server:
        yield server


class Session:
    """A fresh browser context on the page, recording every request it makes and its console."""

    def __init__(self, browser, live):
        self.context = browser.new_context(viewport={"width": 1000, "height": 760})
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        expect.set_options(timeout=TIMEOUT_MS)
        # Waits go through locators: the page's CSP forbids eval, so no wait_for_function(string).
        self.requests, self.problems = [], []
        self.page.on("request", lambda r: self.requests.append(r))
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("console", lambda m: self.problems.append(m.text) if "Content Security Policy" in m.text
                     else None)
        self.origin = live.url

    def open(self, key: str = KEY) -> None:
        page = self.page
        page.goto(self.origin + "/")
        page.wait_for_selector("#notice:not([hidden])")  # a 401 from /v1/models: the page asks for the key
        assert "API key" in page.text_content("#notice")
        assert page.evaluate("document.getElementById('settings').open")  # opened to ask for the key
        page.fill("#max-tokens", str(MAX_TOKENS))
        page.fill("#api-key", key)
        page.press("#api-key", "Tab")  # change: the page reloads the model list with the key
        if key == KEY:
            expect(page.locator("#model")).to_contain_text("tiny")
            expect(page.locator("#api-key")).to_be_hidden()  # the key works: the settings close again

    def setting(self, field: str, value: str) -> None:
        if not self.page.evaluate("document.getElementById('settings').open"):
            self.page.click("#settings summary")
        self.page.fill(field, value)

    def attach(self, im: Image.Image, name: str = "picture.png") -> bytes:
        data = png_bytes(im)
        n = self.page.locator("#attachments img").count()
        self.page.set_input_files("#file", files=[{"name": name, "mimeType": "image/png", "buffer": data}])
        expect(self.page.locator("#attachments img")).to_have_count(n + 1)
        return data

    def hand_over(self, how: str, im: Image.Image, name: str) -> bytes:
        """Drop the image on the page, or paste it into the question box, as a user's browser would."""
        data = png_bytes(im)
        n = self.page.locator("#attachments img").count()
        self.page.evaluate("""([how, b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, {type: "image/png"}));
            const init = {bubbles: true, cancelable: true};
            if (how === "drop") {
                const target = document.getElementById("scroller");
                target.dispatchEvent(new DragEvent("dragover", {...init, dataTransfer: dt}));
                target.dispatchEvent(new DragEvent("drop", {...init, dataTransfer: dt}));
            } else {
                const paste = new ClipboardEvent("paste", {...init, clipboardData: dt});
                document.getElementById("question").dispatchEvent(paste);
            }
        }""", [how, base64.b64encode(data).decode(), name])
        expect(self.page.locator("#attachments img")).to_have_count(n + 1)
        return data

    def ask(self, question: str) -> str:
        """Type the question, press Enter, wait for the streamed answer; the text shown."""
        page = self.page
        n = page.locator("#log .turn.assistant").count()
        page.fill("#question", question)
        page.press("#question", "Enter")
        answer = page.locator("#log .turn.assistant").nth(n)
        expect(answer).to_have_count(1)
        expect(answer).not_to_have_attribute("data-state", "streaming")
        assert answer.get_attribute("data-state") == "done", answer.text_content()
        return answer.locator(".text").text_content()

    def chat_bodies(self) -> list[tuple[dict, dict]]:
        return [(r.post_data_json, r.headers) for r in self.requests
                if r.url == f"{self.origin}/v1/chat/completions" and r.method == "POST"]

    def close(self) -> None:
        assert not self.problems, self.problems
        outside = [r.url for r in self.requests if not r.url.startswith(self.origin + "/")
                   and not r.url.startswith(("data:", "blob:"))]
        assert not outside, f"requests outside {self.origin}: {outside}"
        self.context.close()


@pytest.fixture
def session(browser, live):
    s = Session(browser, live)
    yield s
    s.close()


def api_answer(live, body: dict) -> str:
    """The API's non-streamed answer to the request the page sent."""
    plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    r = httpx.post(f"{live.url}/v1/chat/completions", json=plain, headers={"authorization": f"Bearer {KEY}"},
                   timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_the_page_streams_the_answer_the_api_gives(session, live, tmp_path):
    r = httpx.get(f"{live.url}/", timeout=10)  # public, though the API needs a key
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    session.open()
    png = session.attach(image(11))
    shown = session.ask("what is in the picture?")

    [(body, headers)] = session.chat_bodies()
    assert headers["authorization"] == f"Bearer {KEY}"
    assert body["stream"] is True and body["temperature"] == 0 and body["max_tokens"] == MAX_TOKENS
    assert body["model"] == "tiny"
    assert body["messages"] == [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png)}},
                                                             {"type": "text", "text": "what is in the picture?"}]}]
    expected = api_answer(live, body)
    assert expected, "the tiny model answered nothing: pick another image seed"
    assert shown == expected
    assert session.page.evaluate("sessionStorage.getItem('vitune.apiKey')") == KEY
    assert session.page.locator("#log .turn.user img").count() == 1  # the thumbnail stays with its turn
    assert session.page.locator("#attachments img").count() == 0

    shot = Path(tmp_path) / "page.png"
    session.page.screenshot(path=str(shot), full_page=True)
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    with Image.open(io.BytesIO(data)) as im:
        assert im.size[0] >= 1000 and im.size[1] >= 700
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or range(2)) > 1  # not a blank page
        box = session.page.locator("#log .turn.assistant .text").bounding_box()  # the answer is in the picture
        assert box and box["width"] > 0 and box["height"] > 0 and box["y"] + box["height"] <= im.size[1]
        page_pixels = im.convert("RGB")
    answer = session.page.locator("#log .turn.assistant .text")
    with Image.open(io.BytesIO(answer.screenshot())) as a:
        shown_pixels = a.convert("RGB")
    assert _found_in(page_pixels, shown_pixels, box), "the page's screenshot does not hold the answer box"
    assert_pixels_show(answer, shown_pixels, expected)


def _found_in(page: Image.Image, part: Image.Image, box: dict) -> bool:
    """Whether `part` stands in `page` where `box` says, give or take a pixel of rounding."""
    x, y = int(box["x"]), int(box["y"])
    w, h = part.size
    return any(page.crop((x + dx, y + dy, x + dx + w, y + dy + h)).tobytes() == part.tobytes()
               for dx in (-1, 0, 1) for dy in (-1, 0, 1))


def _rendered(locator, text: str, color: str = "") -> Image.Image:
    """The element drawn with `text` as its content (set as text, never as HTML), in `color`
    ("" the page's own)."""
    locator.evaluate("(el, [t, c]) => { el.textContent = t; el.style.color = c; }", [text, color])
    with Image.open(io.BytesIO(locator.screenshot())) as im:
        return im.convert("RGB")


def assert_pixels_show(locator, shown: Image.Image, expected: str) -> None:
    """The screenshot's answer box holds exactly the pixels of `expected` drawn there, and not
    those of the same box with its text invisible: the text is on the screen, not only in the DOM."""
    assert _rendered(locator, expected).tobytes() == shown.tobytes(), "the screenshot does not show the answer"
    assert _rendered(locator, expected, "transparent").tobytes() != shown.tobytes(), "the answer draws no pixels"
    _rendered(locator, expected)  # as it was


def test_multi_turn_new_chat_and_errors_shown_as_text(session, live):
    page = session.page
    session.open(key="wrong-key")
    expect(page.locator("#notice")).to_contain_text("refused this API key")
    page.fill("#api-key", KEY)
    page.press("#api-key", "Tab")
    expect(page.locator("#model")).to_contain_text("tiny")

    png = session.hand_over("drop", image(12), "dropped.png")
    first = session.ask("describe it")
    second = session.ask("and the colours?")  # no image: the first one stays with the first turn
    [_, (body, _)] = session.chat_bodies()
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png)}},
                                     {"type": "text", "text": "describe it"}]},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "and the colours?"}]
    assert second == api_answer(live, body)

    page.fill("#question", "one")
    page.press("#question", "Shift+Enter")  # a new line, not a question
    assert page.input_value("#question") == "one\n" and len(session.chat_bodies()) == 2

    page.click("#new-chat")
    expect(page.locator("#log .turn")).to_have_count(0)
    assert page.input_value("#question") == ""
    session.hand_over("paste", image(13), "dropped-by-mistake.png")
    page.click("button[aria-label='Remove image dropped-by-mistake.png']")
    expect(page.locator("#attachments img")).to_have_count(0)
    pasted = session.hand_over("paste", image(14), "pasted.png")
    session.setting("#max-tokens", "1000")  # over the tiny model's context: a 400 with an OpenAI-style body
    page.fill("#question", "anyone there?")
    page.press("#question", "Enter")
    error = page.locator("#log .turn.assistant[data-state='error'] .error")
    expect(error).to_have_count(1)
    assert error.text_content().startswith("400: max_tokens: 1000 is over what this model can generate"), \
        error.text_content()
    assert page.input_value("#question") == "anyone there?"  # given back, to retry, with its image
    expect(page.locator("#attachments img")).to_have_count(1)

    session.setting("#max-tokens", str(MAX_TOKENS))
    session.ask("anyone there?")
    [*_, (body, _)] = session.chat_bodies()
    assert body["messages"] == [{"role": "user", "content": [  # a new chat; the failed turn is not kept
        {"type": "image_url", "image_url": {"url": data_url(pasted)}}, {"type": "text", "text": "anyone there?"}]}]
