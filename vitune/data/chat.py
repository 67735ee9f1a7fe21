"""Chat: typed messages, chat templates, and turn-by-turn rendering into `input_ids` + `labels`.

Labels are built per turn, never by length arithmetic: every assistant turn's text and its
end-of-turn token are trained, everything else is `IGNORE_INDEX`. Each image slot (`IMAGE_SLOT`)
in a message becomes `n_image_tokens` copies of the image placeholder id; all other text is
text, whatever it spells (control tokens come from the templates alone).

Templates (one renderer each, chosen by name from `TEMPLATES`):
- `plain`  : <image tokens> caption <eos>             (caption alignment, as in LLaVA's stage 1)
- `chatml` : <|im_start|>role\\ntext<|im_end|>\\n ...  (instruction data; SmolLM2/Qwen2 format)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

from vitune.conventions import IGNORE_INDEX
from vitune.data.tokenizer import IMAGE_SLOT, Tokenizer

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Message:
    role: Role
    text: str


@dataclass
class Rendered:
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def add(self, ids: list[int], trained: bool) -> None:
        self.input_ids += ids
        self.labels += ids if trained else [IGNORE_INDEX] * len(ids)


def encode_with_images(tok: Tokenizer, text: str, n_image_tokens: int) -> list[int]:
    """Tokenize `text`, expanding each image slot into `n_image_tokens` placeholder ids."""
    pieces = text.split(IMAGE_SLOT)
    ids: list[int] = tok.encode(pieces[0])
    for piece in pieces[1:]:
        ids += [tok.special.image] * n_image_tokens
        ids += tok.encode(piece)
    return ids


def _render_plain(tok: Tokenizer, messages: list[Message], n_img: int, gen_prompt: bool) -> Rendered:
    out = Rendered()
    for m in messages:
        if m.role == "assistant":
            out.add(tok.encode(m.text) + [tok.special.eos], trained=True)
        elif m.role == "user":
            out.add(encode_with_images(tok, m.text, n_img), trained=False)
    return out


def _render_chatml(tok: Tokenizer, messages: list[Message], n_img: int, gen_prompt: bool) -> Rendered:
    s, nl = tok.special, tok.newline
    out = Rendered()
    for m in messages:
        out.add([s.im_start] + tok.encode(m.role) + nl, trained=False)
        body = encode_with_images(tok, m.text, n_img)
        if m.role == "assistant":
            out.add(body + [s.im_end], trained=True)
            out.add(nl, trained=False)
        else:
            out.add(body + [s.im_end] + nl, trained=False)
    if gen_prompt:
        out.add([s.im_start] + tok.encode("assistant") + nl, trained=False)
    return out


Renderer = Callable[[Tokenizer, list[Message], int, bool], Rendered]
TEMPLATES: dict[str, Renderer] = {"plain": _render_plain, "chatml": _render_chatml}


def render(
    tok: Tokenizer,
    messages: list[Message],
    template: str,
    n_image_tokens: int,
    add_generation_prompt: bool = False,
    system_prompt: str = "",
) -> Rendered:
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; valid: {sorted(TEMPLATES)}")
    if system_prompt and template == "chatml" and (not messages or messages[0].role != "system"):
        messages = [Message("system", system_prompt), *messages]
    return TEMPLATES[template](tok, messages, n_image_tokens, add_generation_prompt)


def image_instructions(messages: list[Message]) -> list[str]:
    """The instruction of every image, in order: the text of the user message that holds it,
    without its image slots (what an instruction-conditioned fusion reads)."""
    out: list[str] = []
    for m in messages:
        n = m.text.count(IMAGE_SLOT)
        if n:
            text = " ".join(m.text.replace(IMAGE_SLOT, " ").split())
            out += [text] * n
    return out


def caption_text(messages: list[Message]) -> str | None:
    """The text an alignment loss pairs with a record's image: its first assistant answer (a
    caption record's caption), or None when it has none."""
    return next((m.text for m in messages if m.role == "assistant"), None)


def stop_token_id(tok: Tokenizer, template: str) -> int:
    """The token that ends an assistant turn in `template`."""
    return {"plain": tok.special.eos, "chatml": tok.special.im_end}[template]


def format_masked(tok: Tokenizer, input_ids: list[int], labels: list[int], color: bool = True) -> str:
    """Show a rendered sample: trained tokens green (or [[...]]), masked ones dim; image spans folded."""
    out, i = [], 0
    while i < len(input_ids):
        j, trained = i, labels[i] != IGNORE_INDEX
        is_img = input_ids[i] == tok.special.image
        while j < len(input_ids) and (labels[j] != IGNORE_INDEX) == trained and (input_ids[j] == tok.special.image) == is_img:
            j += 1
        text = f"<image x{j - i}>" if is_img else tok.decode(input_ids[i:j], skip_special=False)
        if color:
            out.append(f"\033[1;32m{text}\033[0m" if trained else f"\033[2m{text}\033[0m")
        else:
            out.append(f"[[{text}]]" if trained else text)
        i = j
    return "".join(out)
