"""A chat about images (`vitune chat`): one question answered, or an interactive session.

The session keeps going on bad input: an error (a message too long for the model, say) is shown,
that message dropped and the next one read; Ctrl-C during a reply stops that reply; empty lines
are ignored; `exit`, `quit` or the end of input ends it. A conversation that outgrows the
model's max_seq_len drops its oldest exchanges, with a notice; the images stay: they move from
the first question to the oldest question kept.
"""

from __future__ import annotations

import sys
from typing import Callable

from PIL import Image

from vitune.data.chat import Message, render
from vitune.inference.assistant import Assistant, Request, user_turn
from vitune.inference.generate import GenerationConfig


def stream_printer() -> Callable[[str], None]:
    """Print streamed text as it comes, without the leading space a tokenizer may put first."""
    started = False

    def show(text: str) -> None:
        nonlocal started
        text = text if started else text.lstrip()
        started = started or bool(text)
        print(text, end="", flush=True)
    return show


def fits(assistant: Assistant, messages: list[Message], max_new_tokens: int) -> bool:
    """The rule of `Assistant.prompt_ids`: the prompt plus the reply fit in max_seq_len."""
    r = render(assistant.tok, messages, assistant.template, assistant.model.n_image_tokens,
               add_generation_prompt=True, system_prompt=assistant.model.cfg.system_prompt)
    return len(r.input_ids) + max_new_tokens <= assistant.model.cfg.lm.max_seq_len


def fit_history(assistant: Assistant, messages: list[Message], n_images: int,
                max_new_tokens: int) -> tuple[list[Message], int]:
    """Drop the oldest user/assistant pairs until the prompt fits; returns (messages, pairs dropped)."""
    dropped = 0
    while len(messages) > 1 and not fits(assistant, messages, max_new_tokens):
        messages = messages[2:]
        if n_images:  # the first message holds the images: so does the one that is first now
            messages[0] = user_turn(messages[0].text, n_images)  # a follow-up's text is as typed
        dropped += 1
    return messages, dropped


def _read() -> str | None:
    """The next question, or None at `exit`, `quit` or the end of input."""
    while True:
        try:
            question = input("you> ").strip()
        except EOFError:
            print()
            return None
        if question in ("exit", "quit"):
            return None
        if question:
            return question


def _note_dropped(assistant: Assistant, gen: GenerationConfig, dropped: int, has_images: bool) -> None:
    kept = "; the image stays, now with the oldest question kept" if has_images else ""
    print(f"note: the conversation outgrew the model's context ({assistant.model.cfg.lm.max_seq_len} tokens, "
          f"{gen.max_new_tokens} of them for the reply): dropped its oldest {dropped} exchange(s){kept}",
          file=sys.stderr)


def run_chat(assistant: Assistant, images: list[Image.Image], gen: GenerationConfig, question: str | None) -> None:
    """Answer `question` and end; None: an interactive session (see the module docstring)."""
    interactive = question is None
    messages: list[Message] = []
    while True:
        if interactive:
            question = _read()
            if question is None:
                return
        try:
            turn = user_turn(question, len(images) if not messages else 0)
            history, dropped = fit_history(assistant, [*messages, turn], len(images), gen.max_new_tokens)
            if dropped:
                _note_dropped(assistant, gen, dropped, bool(images))
            reply = assistant.answer(Request(images, history), gen, on_text=stream_printer())
        except ValueError as e:
            if not interactive:
                raise
            print(f"error: {e}\n(that message is dropped; the conversation goes on)", file=sys.stderr)
            continue
        except KeyboardInterrupt:
            if not interactive:
                raise
            print("\n(reply stopped; the conversation goes on)", file=sys.stderr)
            continue
        print()
        if not interactive:
            return
        messages = [*history, Message("assistant", reply)]
