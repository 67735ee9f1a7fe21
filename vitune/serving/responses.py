"""OpenAI response bodies: a chat completion, its stream chunks (server-sent events ending with
`data: [DONE]`), usage, the model list and embeddings."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

FINGERPRINT = "vitune"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def body(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass(frozen=True)
class Completion:
    """One chat completion's identity: the same id and timestamp in all its chunks."""

    model: str
    id: str = ""
    created: int = 0

    @classmethod
    def new(cls, model: str) -> "Completion":
        return cls(model, f"chatcmpl-{uuid.uuid4().hex}", int(time.time()))

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": FINGERPRINT}

    def full(self, text: str, finish_reason: str, usage: Usage) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                  "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("chat.completion"), "choices": [choice], "usage": usage.body()}

    def chunk(self, delta: dict, finish_reason: str | None = None, with_usage: bool = False) -> str:
        """One event; `with_usage`: the stream carries a usage chunk, so every other one says null."""
        body = {**self._head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        if with_usage:
            body["usage"] = None
        return sse(body)

    def usage_chunk(self, usage: Usage) -> str:
        return sse({**self._head("chat.completion.chunk"), "choices": [], "usage": usage.body()})


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"


def error_event(body: dict) -> str:
    """An error inside a stream that has already begun (the status line is sent): one event."""
    return sse(body)


def model_list(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "vitune"}]}


def embedding_list(model: str, vectors: list, prompt_tokens: int) -> dict:
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
