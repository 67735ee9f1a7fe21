"""The OpenAI request bodies, parsed and checked into typed objects: chat completions and
embeddings. Every refusal is an `ApiError` (400) whose message and `param` name the field.

Chat completions accept: `model`, `messages` (roles system / developer (as system) / user /
assistant; content a string or a list of `text` and `image_url` parts, images in user messages
only, the last message the user's), `max_tokens` (or `max_completion_tokens`), `temperature`
(0..2; 0 = greedy), `top_p` (0 < p <= 1), `stop` (a string or up to 4), `seed`, `n` (1 only),
`stream`, `stream_options.include_usage`. Fields this server cannot honour (tools, logprobs,
penalties, response formats other than text) are refused unless they hold their neutral value;
other fields (`user`, `metadata`, ...) are ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from vitune.conventions import IMAGE_SLOT
from vitune.serving.errors import bad_request

Role = Literal["system", "user", "assistant"]
ROLES: dict[str, Role] = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 4
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.Generator.manual_seed takes
# Fields accepted only with these neutral values (anything else would be silently ignored otherwise).
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
    "logprobs": (False,), "top_logprobs": (0,), "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0),
    "logit_bias": ({},), "response_format": ({"type": "text"},), "modalities": (["text"],), "audio": (),
    "prediction": (), "parallel_tool_calls": (True, False),
}


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    url: str
    param: str  # its JSON path, for error messages


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    parts: tuple[TextPart | ImagePart, ...]


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[ChatMessage, ...]
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False

    @property
    def images(self) -> list[ImagePart]:
        return [p for m in self.messages for p in m.parts if isinstance(p, ImagePart)]


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    inputs: tuple[TextPart | ImagePart, ...]
    encoding_format: Literal["float", "base64"] = "float"


def parse_json(body: bytes) -> dict:
    """The body as a JSON object: UTF-8 only, no NaN/Infinity, no duplicate-key surprises."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(None, f"the request body is not valid UTF-8 (byte 0x{body[e.start]:02x} at offset "
                                f"{e.start})", "invalid_encoding") from None
    if not text.strip():
        raise bad_request(None, "the request body is empty; send a JSON object", "invalid_json")
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise bad_request(None, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column "
                                f"{e.colno}", "invalid_json") from None
    except (ValueError, RecursionError) as e:
        raise bad_request(None, f"the request body is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(obj, dict):
        raise bad_request(None, f"the request body must be a JSON object, got {type(obj).__name__}", "invalid_json")
    return obj


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _expect(value: Any, types: type | tuple[type, ...], param: str, what: str) -> Any:
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise bad_request(param, f"expected {what}, got {_kind(value)}", "invalid_type")
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def check_text(text: str, param: str) -> str:
    """Text that is valid Unicode (no lone surrogates) and holds no image-slot character."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(param, "the text is not valid UTF-8 (it holds a lone surrogate escape)",
                          "invalid_encoding") from None
    if IMAGE_SLOT in text:
        raise bad_request(param, "the text holds U+FFFC, which is reserved for image slots; send images as "
                                 "image_url parts")
    return text


def _required(body: dict, key: str, param: str) -> Any:
    if body.get(key) is None:
        raise bad_request(param, "this field is required", "missing_field")
    return body[key]


def parse_model(body: dict) -> str:
    model = _expect(_required(body, "model", "model"), str, "model", "a string (the served model's id)")
    return check_text(model, "model")


def _part(part: Any, param: str, role: Role) -> TextPart | ImagePart:
    _expect(part, dict, param, 'an object {"type": "text" | "image_url", ...}')
    kind = part.get("type")
    if kind == "text":
        return TextPart(check_text(_expect(_required(part, "text", f"{param}.text"), str, f"{param}.text",
                                           "a string"), f"{param}.text"))
    if kind == "image_url":
        if role != "user":
            raise bad_request(f"{param}", f"images are allowed in user messages only, not in a {role} message")
        image = _required(part, "image_url", f"{param}.image_url")
        if isinstance(image, str):
            return ImagePart(image, f"{param}.image_url")
        _expect(image, dict, f"{param}.image_url", 'an object {"url": "data:image/png;base64,..."}')
        url = _expect(_required(image, "url", f"{param}.image_url.url"), str, f"{param}.image_url.url", "a string")
        return ImagePart(url, f"{param}.image_url.url")
    raise bad_request(f"{param}.type", f"unsupported content part type {kind!r}; valid: 'text', 'image_url'",
                      "invalid_type")


def _message(msg: Any, param: str) -> ChatMessage:
    _expect(msg, dict, param, 'an object {"role": ..., "content": ...}')
    role_name = _expect(_required(msg, "role", f"{param}.role"), str, f"{param}.role", "a string")
    if role_name not in ROLES:
        raise bad_request(f"{param}.role", f"unsupported role {role_name!r}; valid: {sorted(ROLES)}")
    role = ROLES[role_name]
    content = _required(msg, "content", f"{param}.content")
    if isinstance(content, str):
        return ChatMessage(role, (TextPart(check_text(content, f"{param}.content")),))
    _expect(content, list, f"{param}.content", "a string or an array of content parts")
    if not content:
        raise bad_request(f"{param}.content", "the array of content parts is empty")
    return ChatMessage(role, tuple(_part(p, f"{param}.content[{j}]", role) for j, p in enumerate(content)))


def _messages(body: dict) -> tuple[ChatMessage, ...]:
    raw = _expect(_required(body, "messages", "messages"), list, "messages", "an array of messages")
    if not raw:
        raise bad_request("messages", "at least one message is required")
    messages = tuple(_message(m, f"messages[{i}]") for i, m in enumerate(raw))
    if messages[-1].role != "user":
        raise bad_request(f"messages[{len(raw) - 1}].role", "the last message must be the user's (the model "
                                                            "answers it)")
    return messages


def _number(body: dict, key: str, lo: float, hi: float, lo_open: bool, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    _expect(value, (int, float), key, "a number")
    low_ok = value > lo if lo_open else value >= lo
    if not (math.isfinite(value) and low_ok and value <= hi):
        raise bad_request(key, f"must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {value!r}")
    return float(value)


def _max_tokens(body: dict) -> int | None:
    given = {k: body[k] for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None}
    for key, value in given.items():
        _expect(value, int, key, "an integer")
        if value < 1:
            raise bad_request(key, f"must be >= 1, got {value}")
    if len(set(given.values())) > 1:
        raise bad_request("max_completion_tokens", "max_tokens and max_completion_tokens differ; give one")
    return next(iter(given.values()), None)


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else _expect(stop, list, "stop", "a string or an array of strings")
    if len(stops) > MAX_STOPS:
        raise bad_request("stop", f"at most {MAX_STOPS} stop strings, got {len(stops)}")
    for i, s in enumerate(stops):
        _expect(s, str, f"stop[{i}]", "a string")
        if not s:
            raise bad_request(f"stop[{i}]", "a stop string must not be empty")
        check_text(s, f"stop[{i}]")
    return tuple(stops)


def _seed(body: dict) -> int | None:
    seed = body.get("seed")
    if seed is None:
        return None
    _expect(seed, int, "seed", "an integer")
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise bad_request("seed", f"must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {seed}")
    return seed


def _unsupported(body: dict) -> None:
    for key, neutral in NEUTRAL.items():
        if body.get(key) is not None and not any(body[key] == v for v in neutral):
            raise bad_request(key, "not supported by this server", "unsupported_parameter")
    n = body.get("n")
    if n is not None and (_expect(n, int, "n", "an integer") != 1):
        raise bad_request("n", f"only n=1 is supported, got {n}", "unsupported_parameter")


def _streaming(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream")
    stream = False if stream is None else _expect(stream, bool, "stream", "a boolean")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    _expect(options, dict, "stream_options", 'an object {"include_usage": true}')
    if not stream:
        raise bad_request("stream_options", "only allowed with stream: true")
    usage = options.get("include_usage")
    return stream, False if usage is None else _expect(usage, bool, "stream_options.include_usage", "a boolean")


def parse_chat(body: dict) -> ChatRequest:
    _unsupported(body)
    stream, include_usage = _streaming(body)
    return ChatRequest(
        model=parse_model(body), messages=_messages(body), max_tokens=_max_tokens(body),
        temperature=_number(body, "temperature", 0, 2, False, 1.0), top_p=_number(body, "top_p", 0, 1, True, 1.0),
        stop=_stop(body), seed=_seed(body), stream=stream, include_usage=include_usage)


def _embedding_input(item: Any, param: str) -> TextPart | ImagePart:
    if isinstance(item, str):
        return TextPart(check_text(item, param))
    if isinstance(item, dict) and item.get("type") == "image_url":
        return _part(item, param, "user")
    if isinstance(item, (int, list)) and not isinstance(item, bool):
        raise bad_request(param, "token-id inputs are not accepted; send text (or an image_url part)",
                          "invalid_type")
    raise bad_request(param, 'expected a string or an image part {"type": "image_url", "image_url": {"url": ...}}, '
                             f"got {_kind(item)}", "invalid_type")


def parse_embeddings(body: dict, max_inputs: int) -> EmbeddingRequest:
    model = parse_model(body)
    raw = _required(body, "input", "input")
    if not isinstance(raw, list):
        items, params = [raw], ["input"]
    elif not raw:
        raise bad_request("input", "at least one input is required")
    elif all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
        raise bad_request("input", "token-id inputs are not accepted; send text (or an image_url part)",
                          "invalid_type")
    else:
        items, params = raw, [f"input[{i}]" for i in range(len(raw))]
    if len(items) > max_inputs:
        raise bad_request("input", f"at most {max_inputs} inputs per request, got {len(items)}")
    inputs = tuple(_embedding_input(x, p) for x, p in zip(items, params))
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise bad_request("encoding_format", f"must be 'float' or 'base64', got {fmt!r}")
    if body.get("dimensions") is not None:
        raise bad_request("dimensions", "not supported: the embedding size is the model's", "unsupported_parameter")
    return EmbeddingRequest(model, inputs, fmt)
