"""The web page at `/` of `vitune serve`: one self-contained file, page.html (package data; its CSS
and JS are inline and it loads nothing from elsewhere, so it works offline), and the headers it
is served with.

What the page does: attach images (file picker, paste, drag and drop; shown as thumbnails, sent
as `data:` URLs with the turn they were attached to), ask, read the answer as it streams in
(fetch + a ReadableStream reading the SSE `data:` lines), keep the conversation (earlier turns go
back as messages), start a new chat, stop an answer (aborting the fetch; the server frees the
slot on disconnect), read errors (the OpenAI-style `{"error": {"message"}}` bodies) as text.
Temperature defaults to 0 (greedy) and max tokens to the server's default; both are settable.
The page itself is public: with an API key set, the user types the key on the page (kept in
sessionStorage, for the tab only) and it goes as `Authorization: Bearer` on the API calls.

Safety: model text goes into the page as text nodes only (never as HTML); the Content-Security-
Policy allows only the page's own inline script and style (by their hashes, computed here),
images from `data:`/`blob:` URLs and requests to the page's own origin.

No attention heatmap: neither the model nor the API exposes attention maps today, so the page
shows none; it would need an API field carrying them first.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache
from importlib.resources import files

PAGE_FILE = "page.html"


def _hashes(html: str, tag: str) -> str:
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    if not blocks:
        return "'none'"
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)


def headers_for(html: str) -> dict[str, str]:
    csp = (f"default-src 'none'; script-src {_hashes(html, 'script')}; style-src {_hashes(html, 'style')}; "
           "img-src data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {"content-security-policy": csp, "x-content-type-options": "nosniff", "referrer-policy": "no-referrer",
            "cache-control": "no-cache"}


@lru_cache(maxsize=1)
def page() -> tuple[bytes, dict[str, str]]:
    """The page's bytes (UTF-8 HTML) and its response headers."""
    html = files("vitune.serving").joinpath(PAGE_FILE).read_text(encoding="utf-8")
    return html.encode("utf-8"), headers_for(html)
