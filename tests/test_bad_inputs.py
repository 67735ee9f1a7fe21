"""The bad-input corpus: every way a user's input can be wrong, run through the real `vitune`
entry point, each case asserting its exit code and a message that names the file, record, key or
option at fault -- never a traceback, never an "internal error", never a silent exit 0, never a
lost file.

The cases are data: one row of `CASES` each, run by the one parametrized test at the bottom.
A row gives the argv (with placeholders, see `Ctx.sub`), the exit code, a regex the message must
match (stderr for errors; stdout + stderr for exit 0), an optional `setup` that builds the bad
input in the case's own tmp folder, an optional `check` of the files afterwards, and `keep`:
paths whose content must be unchanged by the command (no lost or clobbered files).

Two module fixtures serve all rows: the built-in shapes data (32 px) and one tiny model trained
for 1 + 1 steps. Almost every case fails before the first training step; the few that train
(documented non-error behaviour) use 1 + 1 steps on a handful of records.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from vitune.cli import main

SLOT = "\ufffc"  # the character vitune reserves for image slots


# ================================================================ fixtures

@pytest.fixture(scope="module")
def env(tmp_path_factory, one_thread):
    """(shapes data folder, trained model folder, its run folder)."""
    from vitune.data.builtin.shapes import generate_shapes
    root = tmp_path_factory.mktemp("bad_inputs")
    data, run = root / "data", root / "run"
    generate_shapes(data, n_train=24, n_test=4, seed=3, image_size=32)
    code = main(["train", "--preset", "tiny", "--data", f"align={data}/align.json",
                 "--data", f"instruct={data}/instruct.json", "--out", str(run),
                 "train.stages.0.steps=1", "train.stages.1.steps=1"])
    assert code == 0 and (run / "model" / "model.safetensors").is_file()
    SHARED.update({p: snapshot(p) for p in (data, run)})
    return data, run / "model", run


SHARED: dict[Path, Any] = {}  # the shared fixtures' content, checked unchanged after the corpus


@dataclass
class Ctx:
    """What a case's setup and check see: its own tmp folder and the shared fixtures."""

    tmp: Path
    data: Path
    model: Path
    run: Path
    mp: pytest.MonkeyPatch

    def sub(self, text: str) -> str:
        """Placeholders: {tmp} the case's folder, {d} its data folder ({tmp}/d), {bad} {d}/bad.json,
        {m} {tmp}/m (a damaged model copy), {data} the shapes data, {img} a shapes test image,
        {q}/{a} the shapes test questions/answers, {model} the trained model, {run} its run folder."""
        d = self.tmp / "d"
        table = {"{bad}": str(d / "bad.json"), "{d}": str(d), "{m}": str(self.tmp / "m"),
                 "{img}": str(self.data / "images" / "test_00000.png"),
                 "{q}": str(self.data / "test_questions.jsonl"), "{a}": str(self.data / "test_answers.jsonl"),
                 "{tmp}": str(self.tmp), "{data}": str(self.data), "{model}": str(self.model),
                 "{run}": str(self.run)}
        for k, v in table.items():
            text = text.replace(k, v)
        return text

    def path(self, text: str) -> Path:
        return Path(self.sub(text))


Setup = Callable[[Ctx], Any]


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    code: int
    match: str
    setup: Setup | None = None
    check: Setup | None = None
    keep: tuple[str, ...] = ()
    skip: str = ""


def both(*setups: Setup | None) -> Setup:
    def run(c: Ctx) -> None:
        for s in setups:
            if s is not None:
                s(c)
    return run


# ================================================================ building bad inputs

def png_bytes(mode: str = "RGB", size=(32, 32), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    if mode == "RGB":
        im = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    elif mode == "RGBA":
        im = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 4), dtype=np.uint8), "RGBA")
    elif mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65535, (size[1], size[0]), dtype=np.uint16))
    else:
        raise ValueError(mode)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels over a few bytes of pixel data (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


IMAGES: dict[str, Callable[[], bytes]] = {
    "corrupt.png": lambda: b"\x89PNG\r\n\x1a\nnot really a png",
    "truncated.png": lambda: png_bytes()[: len(png_bytes()) // 2],
    "empty.png": lambda: b"",
    "text.png": lambda: b"just some text, not an image\n",
    "anim.gif": animated_gif,
    "bomb.png": lambda: png_header_only(10_000, 10_000),
    "rgba.png": lambda: png_bytes("RGBA"),
    "deep.png": lambda: png_bytes("I;16"),
}


def write(path: str, content: str | bytes | Callable[[], bytes]) -> Setup:
    """Write a file (parents created); `content` may be a maker such as IMAGES[...]."""
    def run(c: Ctx) -> None:
        p = c.path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        body = content() if callable(content) else content
        p.write_bytes(body.encode() if isinstance(body, str) else body)
    return run


def images(*names: str) -> Setup:
    """{d}/images/a.png (a good image) plus the named bad ones from IMAGES."""
    def run(c: Ctx) -> None:
        folder = c.tmp / "d" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(c.data / "images" / "train_00000.png", folder / "a.png")
        for n in names:
            write(str(folder / n), IMAGES[n])(c)
    return run


DROP = object()
QA = ({"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": "red"})


def rec(rid: Any = "bad1", turns: Any = QA, **changes: Any) -> dict:
    """A LLaVA record (id, image images/a.png, one question and answer), with fields changed or DROPped."""
    r = {"id": rid, "image": "images/a.png", "conversations": [dict(t) if isinstance(t, dict) else t for t in turns]
         if isinstance(turns, (list, tuple)) else turns}
    for k, v in changes.items():
        if v is DROP:
            r.pop(k, None)
        else:
            r[k] = v
    return r


def turns(*pairs: tuple[Any, Any]) -> list:
    return [{"from": f, "value": v} for f, v in pairs]


GOOD = (rec("ok0"), rec("ok1", turns=turns(("human", "<image>\nAnd the shape?"), ("gpt", "square"))))


def records(*bad: dict, name: str = "bad.json", jsonl: bool = False, good: bool = True, imgs: tuple = ()) -> Setup:
    """{d}/NAME holding two good records and then `bad` (a JSON list, or JSONL), with images."""
    rows = [*(GOOD if good else ()), *bad]
    text = "".join(json.dumps(r) + "\n" for r in rows) if jsonl else json.dumps(rows, indent=1)
    return both(images(*imgs), write(f"{{d}}/{name}", text))


def raw(content: str | bytes, name: str = "bad.json") -> Setup:
    return both(images(), write(f"{{d}}/{name}", content))


def good_line() -> str:
    return json.dumps(rec("ok0")) + "\n"


def env_var(name: str, value: str) -> Setup:
    return lambda c: c.mp.setenv(name, value)


def symlink(link: str, target: str) -> Setup:
    def run(c: Ctx) -> None:
        p = c.path(link)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.symlink_to(c.path(target))
    return run


def mkdir(path: str) -> Setup:
    return lambda c: c.path(path).mkdir(parents=True, exist_ok=True)


def copy_run(dest: str = "{tmp}/out") -> Setup:
    return lambda c: shutil.copytree(c.run, c.path(dest))


# -- damaged model folders ---------------------------------------------------------------------------

def model_with(*damage: Callable[[Path], None]) -> Setup:
    """{m}: a copy of the trained model folder with `damage` applied."""
    def run(c: Ctx) -> None:
        m = c.tmp / "m"
        shutil.copytree(c.model, m)
        for d in damage:
            d(m)
    return run


def rm(name: str) -> Callable[[Path], None]:
    return lambda m: (m / name).unlink()


def put(name: str, content: str | bytes) -> Callable[[Path], None]:
    return lambda m: (m / name).write_bytes(content.encode() if isinstance(content, str) else content)


def cut(name: str, keep: float = 0.5) -> Callable[[Path], None]:
    def run(m: Path) -> None:
        data = (m / name).read_bytes()
        (m / name).write_bytes(data[: int(len(data) * keep)])
    return run


def meta(edit: Callable[[dict], Any]) -> Callable[[Path], None]:
    """Edit config.json: `edit(meta)` changes the dict in place (what it returns is ignored)."""
    def run(m: Path) -> None:
        d = json.loads((m / "config.json").read_text())
        edit(d)
        (m / "config.json").write_text(json.dumps(d))
    return run


def weights(edit: Callable[[dict], Any]) -> Callable[[Path], None]:
    def run(m: Path) -> None:
        w = load_file(str(m / "model.safetensors"))
        edit(w)
        save_file(w, str(m / "model.safetensors"), metadata={"format": "pt"})
    return run


def first_float(w: dict) -> str:
    return next(k for k, v in w.items() if v.is_floating_point())


def poison(value: float) -> Callable[[dict], None]:
    def run(w: dict) -> None:
        k = first_float(w)
        w[k] = w[k].clone()
        w[k].view(-1)[0] = value
    return run


def lm(**changes: Any) -> Callable[[dict], None]:
    return lambda d: d["model"]["lm"].update(changes)


# -- questions / answers / predictions -------------------------------------------------------------

def qrow(qid: Any = "q1", **changes: Any) -> dict:
    r = {"question_id": qid, "image": "a.png", "text": "What colour is the square?"}
    for k, v in changes.items():
        if v is DROP:
            r.pop(k, None)
        else:
            r[k] = v
    return r


def jsonl(path: str, *rows: Any, extra: str = "") -> Setup:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows) + extra)


def questions(*rows: dict, good: bool = True, imgs: tuple = ()) -> Setup:
    """{tmp}/q.jsonl (a good question q0, then `rows`) with {tmp}/a.png and the named bad images."""
    def run(c: Ctx) -> None:
        shutil.copy(c.data / "images" / "test_00000.png", c.tmp / "a.png")
        for n in imgs:
            write(f"{{tmp}}/{n}", IMAGES[n])(c)
        jsonl("{tmp}/q.jsonl", *([qrow("q0")] if good else []), *rows)(c)
    return run


def shapes_predictions(edit: Callable[[list[dict]], list[dict]] = lambda rows: rows) -> Setup:
    """{tmp}/p.jsonl: a prediction ("red") for every shapes test question, then `edit`ed."""
    def run(c: Ctx) -> None:
        ids = [json.loads(line)["question_id"] for line in (c.data / "test_questions.jsonl").read_text().splitlines()]
        jsonl("{tmp}/p.jsonl", *edit([{"question_id": i, "text": "red"} for i in ids]))(c)
    return run


# -- checks -------------------------------------------------------------------------------------------

def exists(*paths: str) -> Setup:
    def run(c: Ctx) -> None:
        for p in paths:
            assert c.path(p).exists(), f"{c.sub(p)} should exist"
    return run


def absent(*paths: str) -> Setup:
    def run(c: Ctx) -> None:
        for p in paths:
            assert not c.path(p).exists(), f"{c.sub(p)} should not exist"
    return run


def holds(path: str, regex: str) -> Setup:
    def run(c: Ctx) -> None:
        import re
        text = c.path(path).read_text()
        assert re.search(regex, text), f"{c.sub(path)} should match {regex!r}, holds {text[:300]!r}"
    return run


def n_lines(path: str, n: int) -> Setup:
    def run(c: Ctx) -> None:
        got = len(c.path(path).read_text().splitlines())
        assert got == n, f"{c.sub(path)}: {got} lines, expected {n}"
    return run


def snapshot(p: Path) -> dict[str, str] | None:
    """Relative path -> SHA-256 of every file under `p` (or of `p` itself); None if it is absent."""
    if not p.exists() and not p.is_symlink():
        return None
    if p.is_file():
        return {".": hashlib.sha256(p.read_bytes()).hexdigest()}
    return {str(f.relative_to(p)): hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else "dir"
            for f in sorted(p.rglob("*"))}


# ================================================================ argv builders

STEPS = ("train.stages.0.steps=1", "train.stages.1.steps=1")


def train(*overrides: str, data: tuple[str, ...] = ("{bad}",), opts: tuple[str, ...] = (),
          preset: str | None = "tiny", out: str = "{tmp}/run") -> tuple[str, ...]:
    """`vitune train` (options first: argparse takes the overrides as one run of positionals)."""
    head = ("train",) + (("--preset", preset) if preset else ()) + ("--out", out)
    return head + tuple(x for d in data for x in ("--data", d)) + opts + STEPS + overrides


def cfg(*overrides: str) -> tuple[str, ...]:
    """Train on the good shapes data with config overrides."""
    return train(*overrides, data=("{data}/instruct.json",))


def chat(*opts: str, model: str = "{model}", image: str = "{img}", question: str = "What colour is the square?"):
    return ("chat", "--model", model, *(("--image", image) if image else ()), *opts, question)


def predict(*opts: str, model: str = "{model}", q: str = "{tmp}/q.jsonl", out: str = "{tmp}/p.jsonl"):
    return ("predict", "--model", model, "--questions", q, "--out", out, *opts)


def evaluate(*opts: str, q: str = "{q}", a: str = "{a}", preds: str | None = "{tmp}/p.jsonl"):
    return ("eval", "--questions", q, "--answers", a, *(("--predictions", preds) if preds else ()), *opts)


BAD = r"bad\.json"
NO_CUDA = "" if not torch.cuda.is_available() else "this machine has CUDA"


# ================================================================ the corpus

DATA_FILES = [
    # -- the file as a whole
    Case("data-malformed-json-list", train(), 2, rf"{BAD}: malformed JSON at line \d+", raw('[{"id": "a",\n')),
    Case("data-json-list-trailing-garbage", train(), 2, rf"{BAD}: malformed JSON at line", raw('[{"id": "a"}] extra')),
    Case("data-malformed-jsonl-line", train(), 2, rf"{BAD}: line 2: malformed JSON", raw(good_line() + '{"id": \n')),
    Case("data-pretty-printed-object", train(), 2, rf"{BAD}: line 1: malformed JSON",
         raw(json.dumps(rec("x"), indent=2))),
    Case("data-not-utf8", train(), 2, rf"{BAD}: not UTF-8", raw(b'[{"id": "\xff\xfe"}]')),
    Case("data-binary-file", train(data=("{d}/images/a.png",)), 2, r"a\.png: not UTF-8", images()),
    Case("data-empty-file", train(), 2, rf"{BAD}: holds no records", raw("")),
    Case("data-whitespace-only", train(), 2, rf"{BAD}: holds no records", raw("\n  \n\n")),
    Case("data-empty-list", train(), 2, rf"{BAD}: holds no records", raw("[]")),
    Case("data-item-not-object", train(), 2, rf"{BAD}: item 2: expected a JSON object, got int",
         raw(json.dumps([*GOOD, 7]))),
    Case("data-item-null", train(), 2, rf"{BAD}: item 0: expected a JSON object", raw("[null]")),
    Case("data-jsonl-line-not-object", train(), 2, rf"{BAD}: line 2: expected a JSON object, got str",
         raw(good_line() + '"just a string"\n')),
    Case("data-jsonl-line-list", train(), 2, rf"{BAD}: line 2: expected a JSON object, got list",
         raw(good_line() + "[1, 2]\n")),
    # -- conversations and turns
    Case("rec-no-conversations", train(), 2, rf"{BAD}: record 'bad1': 'conversations' is missing",
         records(rec(conversations=DROP))),
    Case("rec-empty-conversations", train(), 2, rf"{BAD}: record 'bad1': 'conversations' is missing or empty",
         records(rec(turns=[]))),
    Case("rec-conversations-string", train(), 2, rf"{BAD}: record 'bad1': 'conversations'",
         records(rec(turns="hello"))),
    Case("rec-turn-not-object", train(), 2, rf"{BAD}: record 'bad1': turn 1 must be an object",
         records(rec(turns=[QA[0], "red"]))),
    Case("rec-turn-value-int", train(), 2, rf"{BAD}: record 'bad1': turn 1 must be an object with a string 'value'",
         records(rec(turns=turns(("human", "<image>\nHow many?"), ("gpt", 3))))),
    Case("rec-turn-no-value", train(), 2, rf"{BAD}: record 'bad1': turn 0 must be an object with a string 'value'",
         records(rec(turns=[{"from": "human"}, QA[1]]))),
    Case("rec-unknown-role", train(), 2, rf"{BAD}: record 'bad1': turn 1 has unknown role 'bot'",
         records(rec(turns=[QA[0], {"from": "bot", "value": "red"}]))),
    Case("rec-role-not-string", train(), 2, rf"{BAD}: record 'bad1': turn 0 has unknown role 1",
         records(rec(turns=[{"from": 1, "value": "<image>\nhi"}, QA[1]]))),
    Case("rec-role-missing", train(), 2, rf"{BAD}: record 'bad1': turn 0 has unknown role None",
         records(rec(turns=[{"value": "<image>\nhi"}, QA[1]]))),
    Case("rec-gpt-first", train(), 2, rf"{BAD}: record 'bad1': wrong role order: turn 0 is 'assistant'",
         records(rec(turns=turns(("gpt", "red"), ("human", "<image>\nWhat colour?"))))),
    Case("rec-two-humans", train(), 2, rf"{BAD}: record 'bad1': wrong role order: turn 1 is 'user'",
         records(rec(turns=turns(("human", "<image>\nWhat?"), ("human", "colour?"), ("gpt", "red"))))),
    Case("rec-system-in-the-middle", train(), 2, rf"{BAD}: record 'bad1': wrong role order: turn 2 is 'system'",
         records(rec(turns=turns(("human", "<image>\nWhat?"), ("gpt", "red"), ("system", "be brief"),
                                 ("human", "and?"), ("gpt", "blue"))))),
    Case("rec-last-turn-human", train(), 2, rf"{BAD}: record 'bad1': the last turn is from the human",
         records(rec(turns=turns(("human", "<image>\nWhat?"), ("gpt", "red"), ("human", "and?"))))),
    Case("rec-system-only", train(), 2, rf"{BAD}: record 'bad1': conversation has no user/assistant turns",
         records(rec(image=DROP, turns=turns(("system", "be brief"))))),
    Case("rec-image-tag-in-gpt-turn", train(), 2, rf"{BAD}: record 'bad1': turn 1 \(assistant\) holds an <image> tag",
         records(rec(turns=turns(("human", "<image>\nWhat?"), ("gpt", "<image> red"))))),
    Case("rec-slot-char-in-human-turn", train(), 2, rf"{BAD}: record 'bad1': turn 0 holds the character U\+FFFC",
         records(rec(turns=turns(("human", f"<image>\nWhat is {SLOT}?"), ("gpt", "red"))))),
    Case("rec-slot-char-in-gpt-turn", train(), 2, rf"{BAD}: record 'bad1': turn 1 holds the character U\+FFFC",
         records(rec(turns=turns(("human", "<image>\nWhat?"), ("gpt", f"red{SLOT}"))))),
    # -- images of a record
    Case("rec-two-tags-one-image", train(), 2, rf"{BAD}: record 'bad1': 2 <image> tag\(s\) in the text but 1 image",
         records(rec(turns=turns(("human", "<image>\n<image>\nWhat?"), ("gpt", "red"))))),
    Case("rec-image-without-tag", train(), 2, rf"{BAD}: record 'bad1': 0 <image> tag\(s\) in the text but 1 image",
         records(rec(turns=turns(("human", "What?"), ("gpt", "red"))))),
    Case("rec-tag-without-image", train(), 2, rf"{BAD}: record 'bad1': 1 <image> tag\(s\) in the text but 0 image",
         records(rec(image=DROP))),
    Case("rec-image-and-images", train(), 2, rf"{BAD}: record 'bad1': has both 'image' and 'images'",
         records(rec(images=["images/a.png"]))),
    Case("rec-image-number", train(), 2, rf"{BAD}: record 'bad1': 'image'/'images' must be a path", records(rec(image=5))),
    Case("rec-images-string", train(), 2, rf"{BAD}: record 'bad1': 'image'/'images' must be a path or a list",
         records(rec(image=DROP, images="images/a.png"))),
    Case("rec-image-empty-string", train(), 2, rf"{BAD}: record 'bad1': 'image'/'images' must be a path",
         records(rec(image=""))),
    Case("rec-images-holds-null", train(), 2, rf"{BAD}: record 'bad1': 'image'/'images' must be a path",
         records(rec(image=DROP, images=[None]))),
    Case("rec-image-missing", train(), 2, rf"{BAD}: record 'bad1': image not found: .*nope\.png",
         records(rec(image="images/nope.png"))),
    Case("rec-image-is-a-folder", train(), 2, rf"{BAD}: record 'bad1': .*images", records(rec(image="images"))),
    Case("rec-image-corrupt", train(), 2, r"record 'bad1': unreadable or corrupt image .*corrupt\.png",
         records(rec(image="images/corrupt.png"), imgs=("corrupt.png",))),
    Case("rec-image-truncated", train(), 2, r"record 'bad1': unreadable or corrupt image .*truncated\.png",
         records(rec(image="images/truncated.png"), imgs=("truncated.png",))),
    Case("rec-image-empty-file", train(), 2, r"record 'bad1': unreadable or corrupt image .*empty\.png: the file is empty",
         records(rec(image="images/empty.png"), imgs=("empty.png",))),
    Case("rec-image-text-as-png", train(), 2, r"record 'bad1': unreadable or corrupt image .*text\.png: not an image",
         records(rec(image="images/text.png"), imgs=("text.png",))),
    Case("rec-image-animated", train(), 2, r"record 'bad1': image .*anim\.gif has 3 frames",
         records(rec(image="images/anim.gif"), imgs=("anim.gif",))),
    Case("rec-image-bomb", train(), 2, r"record 'bad1': image .*bomb\.png is 10000x10000 = 100,000,000 pixels, over "
         r"vitune's cap.*VITUNE_MAX_IMAGE_PIXELS", records(rec(image="images/bomb.png"), imgs=("bomb.png",))),
    Case("rec-image-over-env-cap", train(), 2, r"record 'ok0': image .*a\.png is \d+x\d+ = [\d,]+ pixels, over "
         r"vitune's cap of 100 pixels", both(records(), env_var("VITUNE_MAX_IMAGE_PIXELS", "100"))),
    Case("env-pixel-cap-not-a-number", train(), 2, r"VITUNE_MAX_IMAGE_PIXELS='lots'",
         both(records(), env_var("VITUNE_MAX_IMAGE_PIXELS", "lots"))),
    Case("rec-image-dotdot-outside-root", train(), 2,
         rf"{BAD}: record 'bad1': image path '\.\./outside\.png' resolves to .*outside the image root.*--allow-outside-images",
         both(records(rec(image="../outside.png")), write("{tmp}/outside.png", png_bytes))),
    Case("rec-image-absolute-path", train(), 2, rf"{BAD}: record 'bad1': image path '.*outside\.png' is absolute",
         both(write("{tmp}/outside.png", png_bytes),
              lambda c: records(rec(image=str(c.tmp / "outside.png")))(c))),
    Case("rec-image-symlink-outside-root", train(), 2,
         rf"{BAD}: record 'bad1': image path 'images/link\.png' resolves to .*outside\.png, outside the image root",
         both(records(rec(image="images/link.png")), write("{tmp}/outside.png", png_bytes),
              symlink("{d}/images/link.png", "{tmp}/outside.png"))),
    Case("rec-image-root-option-without-the-images", train(opts=("--image-root", "{tmp}/other")), 2,
         rf"{BAD}: record 'ok0': image not found: .*other/images/a\.png", both(records(), mkdir("{tmp}/other"))),
    # -- lengths (model.lm.max_seq_len)
    Case("rec-image-tokens-exceed-max-seq-len", train("model.lm.max_seq_len=8"), 2,
         r"record 'ok0': its 16 image tokens alone exceed max_seq_len=8", records()),
    Case("rec-text-before-image-too-long", train(), 2,
         r"record 'bad1': \d+ tokens; cutting to max_seq_len=192 would cut into an image span",
         records(rec(turns=turns(("human", "why " * 60 + "<image>"), ("gpt", "red"))), good=False)),
    Case("rec-question-too-long-no-answer-left", train(), 2,
         r"record 'bad1': no trained \(assistant\) tokens remain after cutting to max_seq_len=192",
         records(rec(turns=turns(("human", "<image>\n" + "why " * 60), ("gpt", "red"))), good=False)),
    Case("rec-answer-cut-to-max-seq-len", train(), 0,
         r"warning: record 'long-answer': \d+ tokens cut to max_seq_len=192",
         records(rec("long-answer", turns=turns(("human", "<image>\nDescribe it."), ("gpt", "red " * 80)))),
         check=exists("{tmp}/run/model/model.safetensors")),
    # -- record ids
    Case("rec-duplicate-id", train(), 2, rf"{BAD}: record 'ok1': duplicate id", records(rec("ok1"))),
    Case("rec-id-is-a-list", train(), 2, rf"{BAD}: record #2\b.*\bid\b", records(rec(["a", "b"]))),
    Case("rec-id-is-an-object", train(), 2, rf"{BAD}: record #2\b.*\bid\b", records(rec({"n": 1}))),
    # -- --data and the stages
    Case("data-is-a-folder", train(data=("{d}",)), 2, r"/d: is a directory", images()),
    Case("data-missing-file", train(data=("{d}/nope.json",)), 2, r"nope\.json: file not found"),
    Case("data-unknown-stage", train(data=("algn={bad}",)), 2,
         r"--data algn=.*bad\.json: no stage named 'algn'; the stages are \['align', 'instruct'\]", records()),
    Case("data-stage-without-data", train(data=("align={bad}",)), 2, r"stage 'instruct' has no data", records()),
    Case("data-none-given", train(data=()), 2, r"stage 'align' has no data"),
    Case("data-missing-mix-file", train("train.stages.1.mix_data=[{tmp}/mix.json]"), 2, r"mix\.json: file not found",
         records()),
    Case("data-malformed-mix-file", train("train.stages.1.mix_data=[{tmp}/mix.json]"), 2,
         r"mix\.json: malformed JSON", both(records(), write("{tmp}/mix.json", "[{"))),
    # -- the bad-record policy and documented non-errors
    Case("skip-policy-trains-the-rest", train(opts=("--on-bad-record", "skip")), 0,
         rf"skipped bad record: .*{BAD}: record 'bad1': image not found",
         records(rec(image="images/nope.png")), check=exists("{tmp}/run/model/model.safetensors")),
    Case("skip-policy-all-bad", train(opts=("--on-bad-record", "skip")), 2,
         rf"vitune train: error: (?=[^\n]*no usable records)(?=[^\n]*({BAD}|stage 'align'))", records(rec(image="images/nope.png"), good=False),
         check=absent("{tmp}/run/model")),
    Case("rgba-and-16-bit-images-are-fine", train(), 0, r"model saved to",
         records(rec("rgba", image="images/rgba.png"), rec("deep", image="images/deep.png"),
                 imgs=("rgba.png", "deep.png")), check=exists("{tmp}/run/model/model.safetensors")),
]

CONFIG = [
    # -- numbers out of range (RANGES) and non-finite
    Case("cfg-lr-nan", cfg("train.stages.0.lr_lm=nan"), 2, r"train\.stages\.0\.lr_lm: must be a finite number"),
    Case("cfg-lr-inf", cfg("train.stages.0.lr_lm=.inf"), 2, r"train\.stages\.0\.lr_lm: must be a finite number"),
    Case("cfg-lr-negative", cfg("train.stages.1.lr_vision=-1e-3"), 2, r"train\.stages\.1\.lr_vision must be >= 0"),
    Case("cfg-steps-negative", cfg("train.stages.0.steps=-5"), 2, r"train\.stages\.0\.steps must be >= 0"),
    Case("cfg-heads-zero", cfg("model.lm.heads=0"), 2, r"model\.lm\.heads must be >= 1"),
    Case("cfg-layers-negative", cfg("model.vision.layers=-1"), 2, r"model\.vision\.layers must be >= 1"),
    Case("cfg-batch-size-zero", cfg("train.stages.0.batch_size=0"), 2, r"train\.stages\.0\.batch_size must be >= 1"),
    Case("cfg-grad-clip-nan", cfg("train.grad_clip=nan"), 2, r"train\.grad_clip: must be a finite number"),
    Case("cfg-threads-negative", cfg("train.threads=-1"), 2, r"train\.threads must be >= 0"),
    Case("cfg-seed-negative", cfg("train.seed=-1"), 2, r"train\.seed must be >= 0"),
    Case("cfg-log-every-zero", cfg("train.log_every=0"), 2, r"train\.log_every must be >= 1"),
    Case("cfg-save-every-minutes-negative", cfg("train.save_every_minutes=-1"), 2,
         r"train\.save_every_minutes must be >= 0"),
    Case("cfg-rope-theta-zero", cfg("model.lm.rope_theta=0"), 2, r"model\.lm\.rope_theta must be > 0"),
    Case("cfg-max-seq-len-zero", cfg("model.lm.max_seq_len=0"), 2, r"model\.lm\.max_seq_len must be >= 1"),
    Case("cfg-min-lr-ratio-over-1", cfg("train.stages.0.min_lr_ratio=2"), 2,
         r"train\.stages\.0\.min_lr_ratio must be in \[0, 1\]"),
    Case("cfg-mix-fraction-1", cfg("train.stages.1.mix_fraction=1"), 2,
         r"train\.stages\.1\.mix_fraction must be in \[0, 1\)"),
    Case("cfg-lora-dropout-1", cfg("model.lora.dropout=1"), 2, r"model\.lora\.dropout must be in \[0, 1\)"),
    Case("cfg-image-mean-over-1", cfg("model.vision.image_mean=[2,0.5,0.5]"), 2,
         r"model\.vision\.image_mean must be in \[0, 1\]"),
    Case("cfg-image-std-zero", cfg("model.vision.image_std=[0,0.5,0.5]"), 2, r"model\.vision\.image_std must be > 0"),
    Case("cfg-steps-and-epochs-zero", cfg("train.stages.0.steps=0", "train.stages.0.epochs=0"), 2,
         r"train\.stages\.0: set steps or epochs"),
    # -- the override syntax
    Case("cfg-unknown-key", cfg("model.lm.layerz=2"), 2, r"override 'model\.lm\.layerz': unknown field 'layerz'"),
    Case("cfg-unknown-section", cfg("model.lmm.dim=2"), 2, r"override 'model\.lmm\.dim': unknown field 'lmm'"),
    Case("cfg-unknown-top-level", cfg("optimizer=adam"), 2, r"override 'optimizer': unknown field 'optimizer'"),
    Case("cfg-index-out-of-range", cfg("train.stages.5.steps=1"), 2,
         r"override 'train\.stages\.5\.steps': '5' is not an index below 2"),
    Case("cfg-index-not-a-number", cfg("train.stages.first.steps=1"), 2,
         r"override 'train\.stages\.first\.steps': 'first' is not an index"),
    Case("cfg-missing-equals", cfg("train.stages.0.steps"), 2, r"override 'train\.stages\.0\.steps': expected key=value"),
    Case("cfg-empty-key", cfg("=3"), 2, r"override '': unknown field ''"),
    Case("cfg-value-malformed-yaml", cfg("model.lm.layers=[1"), 2, r"model\.lm\.layers"),
    Case("cfg-stage-given-a-number", cfg("train.stages.0=3"), 2, r"train\.stages\.0: expected a mapping, got 3"),
    Case("cfg-stages-emptied", cfg("train.stages=[]"), 2, r"train\.stages must not be empty"),
    Case("cfg-value-empty", cfg("model.lm.layers="), 2, r"model\.lm\.layers: expected int, got None"),
    # -- wrong types
    Case("cfg-int-given-a-word", cfg("model.lm.layers=two"), 2, r"model\.lm\.layers: expected int, got 'two'"),
    Case("cfg-int-given-a-float", cfg("model.lm.layers=2.5"), 2, r"model\.lm\.layers: expected int, got 2\.5"),
    Case("cfg-int-given-a-bool", cfg("model.lm.layers=true"), 2, r"model\.lm\.layers: expected int, got True"),
    Case("cfg-int-given-a-list", cfg("model.lm.dim=[1,2]"), 2, r"model\.lm\.dim: expected int"),
    Case("cfg-bool-given-a-word", cfg("model.lm.tie_embeddings=maybe"), 2,
         r"model\.lm\.tie_embeddings: expected bool, got 'maybe'"),
    Case("cfg-float-given-a-word", cfg("train.weight_decay=lots"), 2, r"train\.weight_decay: expected a number"),
    Case("cfg-section-given-a-number", cfg("model.lm=3"), 2, r"model\.lm: expected a mapping, got 3"),
    Case("cfg-tuple-wrong-length", cfg("model.vision.image_mean=[0.5,0.5]"), 2,
         r"model\.vision\.image_mean: expected 3 values, got 2"),
    Case("cfg-tuple-given-a-number", cfg("model.vision.image_mean=0.5"), 2,
         r"model\.vision\.image_mean: expected a list, got 0\.5"),
    Case("cfg-parts-given-a-string", cfg("train.stages.0.train=lora"), 2,
         r"train\.stages\.0\.train: expected a list, got 'lora'"),
    Case("cfg-literal-precision", cfg("train.precision=fp16"), 2,
         r"train\.precision: 'fp16' is not one of \['fp32', 'bf16'\]"),
    Case("cfg-literal-vision-kind", cfg("model.vision.kind=resnet"), 2, r"model\.vision\.kind: 'resnet' is not one of"),
    Case("cfg-literal-bad-record-policy", cfg("train.on_bad_record=ignore"), 2,
         r"train\.on_bad_record: 'ignore' is not one of"),
    Case("cfg-unknown-part", cfg("train.stages.1.train=[vision,brain]"), 2,
         r"train\.stages\.1\.train\.1: 'brain' is not one of"),
    # -- cross-field checks
    Case("cfg-kv-heads", cfg("model.lm.kv_heads=3"), 2, r"model\.lm\.heads must be a multiple of kv_heads"),
    Case("cfg-lm-dim-vs-heads", cfg("model.lm.dim=66"), 2, r"model\.lm\.dim must be divisible by heads"),
    Case("cfg-image-size-vs-patch-size", cfg("model.vision.image_size=30"), 2,
         r"model\.vision\.image_size must be a multiple of patch_size"),
    Case("cfg-vision-width-vs-heads", cfg("model.vision.width=33"), 2, r"model\.vision\.width must be divisible by heads"),
    Case("cfg-feature-layer", cfg("model.vision.feature_layer=5"), 2, r"model\.vision\.feature_layer=5 names no hidden state"),
    Case("cfg-bpe-vocab-too-small", cfg("model.tokenizer.kind=bpe", "model.tokenizer.vocab_size=100"), 2,
         r"model\.tokenizer\.vocab_size must be > 260"),
    Case("cfg-odd-grid-with-pooling", cfg("model.vision.image_size=24", "model.connector.reduce=pool2x2"), 2,
         r"model\.connector\.reduce=pool2x2 needs an even grid, got 3x3"),
    Case("cfg-duplicate-stage-names", cfg("train.stages.1.name=align"), 2, r"train\.stages: stage names must be unique"),
    Case("cfg-no-parts-to-train", cfg("train.stages.0.train=[]"), 2, r"train\.stages\.0\.train: name at least one part"),
    Case("cfg-lora-without-rank", cfg("train.stages.1.train=[lora]"), 2,
         r"train\.stages\.1\.train names 'lora' but model\.lora\.rank is 0"),
    Case("cfg-lora-no-targets", cfg("model.lora.targets=[]"), 2, r"model\.lora\.targets: name at least one layer"),
    Case("cfg-lora-targets-match-nothing", cfg("model.lora.rank=4", "model.lora.targets=[qproj]"), 2,
         r"model\.lora\.targets \['qproj'\] match no linear layer"),
    Case("cfg-fusion-part-with-projector", cfg("train.stages.0.train=[fusion]"), 2,
         r"train\.stages\.0\.train names 'fusion' but model\.fusion\.kind is projector"),
    Case("cfg-film-with-efficientnet", cfg("model.fusion.kind=film", "model.vision.kind=efficientnet_lite0"), 2,
         r"model\.fusion\.kind=film modulates a ViT or CNN tower"),
    Case("cfg-qformer-with-pooling", cfg("model.fusion.kind=qformer", "model.connector.reduce=pool2x2"), 2,
         r"model\.fusion\.kind=qformer .*model\.connector\.reduce must be none"),
    Case("cfg-xattn-heads", cfg("model.fusion.kind=xattn", "model.fusion.heads=3"), 2,
         r"model\.fusion\.kind=xattn: model\.lm\.dim must be divisible by model\.fusion\.heads"),
    Case("cfg-packing-with-film", cfg("model.fusion.kind=film", "train.stages.1.packing=shared_prefix"), 2,
         r"train\.stages\.1\.packing=shared_prefix .*use packing=none"),
    Case("cfg-contrastive-weight-without-head", cfg("train.stages.0.contrastive_weight=1"), 2,
         r"train\.stages\.0\.contrastive_weight > 0 needs an alignment head: set model\.contrastive\.dim"),
    Case("cfg-contrastive-part-without-head", cfg("train.stages.0.train=[contrastive]"), 2,
         r"train\.stages\.0\.train names 'contrastive' but model\.contrastive\.dim is 0"),
    Case("cfg-no-loss", cfg("train.stages.0.lm_weight=0"), 2, r"train\.stages\.0: lm_weight and contrastive_weight are both 0"),
    Case("cfg-contrastive-temperatures", cfg("model.contrastive.min_temperature=0.5"), 2,
         r"model\.contrastive: need 0 < min_temperature <= init_temperature"),
    Case("cfg-device-cuda-without-cuda", cfg("train.device=cuda"), 2, r"train\.device=cuda but .* no CUDA", skip=NO_CUDA),
    Case("cfg-device-mps-unavailable", cfg("train.device=mps"), 2, r"train\.device=mps but MPS is not available",
         skip="" if not torch.backends.mps.is_available() else "MPS available"),
    Case("cfg-lm-pretrained-missing", cfg("model.lm_pretrained={tmp}/no-such-lm"), 2,
         r"model\.lm_pretrained=.*no-such-lm"),
    Case("cfg-vision-pretrained-missing", cfg("model.vision.pretrained={tmp}/no-such-tower"), 2,
         r"model\.vision\.pretrained=.*no-such-tower"),
    Case("cfg-system-prompt-slot-char", cfg(f"model.system_prompt=be{SLOT}brief"), 2,
         r"model\.system_prompt.*U\+FFFC"),
    # -- command-line options of train
    Case("opt-on-bad-record-unknown", train(opts=("--on-bad-record", "ignore")), 2,
         r"argument --on-bad-record: invalid choice: 'ignore'"),
    Case("opt-stop-after-zero", train(opts=("--stop-after", "0")), 2, r"argument --stop-after: must be >= 1, got 0"),
    Case("opt-stop-after-word", train(opts=("--stop-after", "ten")), 2,
         r"argument --stop-after: expected an integer, got 'ten'"),
    # -- --preset and --config
    Case("preset-unknown", train(preset="huge", data=("{data}/instruct.json",)), 2, r"unknown preset 'huge'"),
    Case("preset-and-config", train(data=("{data}/instruct.json",), opts=("--config", "{tmp}/c.yaml")), 2,
         r"give exactly one of --preset NAME or --config FILE\.yaml", write("{tmp}/c.yaml", "train: {seed: 1}\n")),
    Case("preset-nor-config", train(preset=None, data=("{data}/instruct.json",)), 2,
         r"give exactly one of --preset NAME or --config FILE\.yaml"),
    Case("config-missing-file", train(preset=None, opts=("--config", "{tmp}/nope.yaml")), 2,
         r"nope\.yaml: no such file or directory"),
    Case("config-is-a-folder", train(preset=None, opts=("--config", "{tmp}")), 2, r": is a directory"),
    Case("config-malformed-yaml", train(preset=None, opts=("--config", "{tmp}/c.yaml")), 2, r"c\.yaml: malformed YAML",
         write("{tmp}/c.yaml", "model:\n  lm: {dim: 64\n")),
    Case("config-tab-indented", train(preset=None, opts=("--config", "{tmp}/c.yaml")), 2, r"c\.yaml: malformed YAML",
         write("{tmp}/c.yaml", "model:\n\tlm:\n\t\tdim: 64\n")),
    Case("config-a-yaml-list", train(preset=None, opts=("--config", "{tmp}/c.yaml")), 2,
         r"c\.yaml: expected a mapping of config sections .*got list", write("{tmp}/c.yaml", "- model\n- train\n")),
    Case("config-a-yaml-scalar", train(preset=None, opts=("--config", "{tmp}/c.yaml")), 2,
         r"c\.yaml: expected a mapping of config sections .*got str", write("{tmp}/c.yaml", "hello\n")),
    Case("config-unknown-section", train(preset=None, opts=("--config", "{tmp}/c.yaml")), 2,
         r"c\.yaml: unknown key\(s\) \['modle'\]", write("{tmp}/c.yaml", "modle: {}\n")),
    Case("config-unknown-nested-key", train(preset=None, opts=("--config", "{tmp}/c.yaml")), 2,
         r"c\.yaml\.model\.lm: unknown key\(s\) \['layerz'\]", write("{tmp}/c.yaml", "model:\n  lm: {layerz: 2}\n")),
    Case("config-bad-value", train(preset=None, opts=("--config", "{tmp}/c.yaml")), 2, r"train\.seed must be >= 0",
         write("{tmp}/c.yaml", "train: {seed: -1}\n")),
    Case("config-wrong-type", train(preset=None, opts=("--config", "{tmp}/c.yaml")), 2,
         r"c\.yaml\.model\.lm\.dim: expected int, got 'wide'", write("{tmp}/c.yaml", "model:\n  lm: {dim: wide}\n")),
    Case("config-no-stages", train(preset=None, opts=("--config", "{tmp}/c.yaml")), 2,
         r"train\.stages must not be empty", write("{tmp}/c.yaml", "train: {stages: []}\n")),
    Case("config-stage-data-missing", train(preset=None, data=(), opts=("--config", "{tmp}/c.yaml")), 2,
         r"nope\.json: file not found",
         write("{tmp}/c.yaml", "train:\n  stages: [{name: a, data: /nonexistent/nope.json}, {name: b, data: /nonexistent/nope.json}]\n")),
    Case("config-not-utf8", train(preset=None, opts=("--config", "{tmp}/c.yaml")), 2, r"c\.yaml: not UTF-8",
         write("{tmp}/c.yaml", b"train: {seed: \xff}\n")),
]

RUN_FOLDERS = [
    Case("run-out-holds-a-run", train(data=("{data}/instruct.json",), out="{tmp}/out"), 2,
         r"--out .*out holds an earlier run \(config\.yaml, metrics\.jsonl, state, model\): pass --resume .* --overwrite",
         copy_run(), keep=("{tmp}/out",)),
    Case("run-out-holds-a-config-only", train(data=("{data}/instruct.json",), out="{tmp}/out"), 2,
         r"--out .*out holds an earlier run \(config\.yaml\)", write("{tmp}/out/config.yaml", "model: {}\n"),
         keep=("{tmp}/out",)),
    Case("run-out-is-a-file", train(data=("{data}/instruct.json",), out="{tmp}/out"), 2,
         r"--out .*out: exists and is not a folder", write("{tmp}/out", "mine"), keep=("{tmp}/out",)),
    Case("run-out-under-a-file", train(data=("{data}/instruct.json",), out="{tmp}/notes.txt/run"), 2, r"notes\.txt",
         write("{tmp}/notes.txt", "mine"), keep=("{tmp}/notes.txt",)),
    Case("run-resume-and-overwrite", train(data=("{data}/instruct.json",), out="{tmp}/out", opts=("--resume", "--overwrite")),
         2, r"--resume continues the run in OUT, --overwrite starts afresh: give one of them", copy_run(),
         keep=("{tmp}/out",)),
    Case("run-resume-changed-config",
         train("model.lm.layers=3", data=("align={data}/align.json", "instruct={data}/instruct.json"), out="{tmp}/out",
               opts=("--resume",)), 2, r"(?s)--resume: the run in .*state was saved with another config.*"
         r"model\.lm\.layers: 2 -> 3.*--allow-config-change", copy_run(), keep=("{tmp}/out",)),
    Case("run-resume-other-data",
         train(data=("align={data}/align.json", "instruct={data}/align.json"), out="{tmp}/out", opts=("--resume",)), 2,
         r"data of stage 'instruct': not the data the run was trained on", copy_run(), keep=("{tmp}/out",)),
    Case("run-resume-corrupt-trainer-state",
         train(data=("align={data}/align.json", "instruct={data}/instruct.json"), out="{tmp}/out", opts=("--resume",)), 2,
         r"trainer\.json", both(copy_run(), write("{tmp}/out/state/trainer.json", "{not json")),
         keep=("{tmp}/out/state", "{tmp}/out/metrics.jsonl")),
    Case("run-resume-corrupt-saved-config",
         train(data=("align={data}/align.json", "instruct={data}/instruct.json"), out="{tmp}/out", opts=("--resume",)), 2,
         r"state/config\.yaml", both(copy_run(), write("{tmp}/out/state/config.yaml", "model: [unclosed\n")),
         keep=("{tmp}/out/state", "{tmp}/out/metrics.jsonl")),
    Case("run-stop-after-says-no-model", train(data=("{data}/instruct.json",), opts=("--stop-after", "1")), 0,
         r"(?is)stopped after 1 steps.*(no model|model (was|is) not saved)", check=both(absent("{tmp}/run/model"),
                                                             exists("{tmp}/run/state/trainer.json"))),
    Case("run-overwrite-keeps-other-files", train(data=("{bad}",), out="{tmp}/out", opts=("--overwrite",)), 0,
         r"model saved to", both(copy_run(), write("{tmp}/out/notes.txt", "mine"), records()),
         check=both(holds("{tmp}/out/notes.txt", "^mine$"), exists("{tmp}/out/model/model.safetensors")),
         keep=("{tmp}/out/notes.txt",)),
]

CHAT_Q = "What colour is the square?"
MODEL_FOLDERS = [
    Case("model-missing-folder", chat(model="{tmp}/nope"), 2, r"nope: not a vitune model folder \(no config\.json\)"),
    Case("model-empty-folder", chat(model="{tmp}/empty"), 2, r"empty: not a vitune model folder", mkdir("{tmp}/empty")),
    Case("model-path-is-a-file", chat(model="{tmp}/model.bin"), 2, r"model\.bin: not a vitune model folder",
         write("{tmp}/model.bin", "weights")),
    Case("model-no-config-json", chat(model="{m}"), 2, r"/m: not a vitune model folder \(no config\.json\)",
         model_with(rm("config.json"))),
    Case("model-config-json-garbage", chat(model="{m}"), 2, r"m/config\.json: corrupt or unreadable",
         model_with(put("config.json", "this is not json"))),
    Case("model-config-json-truncated", chat(model="{m}"), 2, r"m/config\.json: corrupt or unreadable",
         model_with(cut("config.json"))),
    Case("model-config-json-empty", chat(model="{m}"), 2, r"m/config\.json: corrupt or unreadable",
         model_with(put("config.json", ""))),
    Case("model-config-json-a-list", chat(model="{m}"), 2, r"m/config\.json", model_with(put("config.json", "[1, 2]"))),
    Case("model-wrong-format", chat(model="{m}"), 2, r"m/config\.json: format 'llava' is not 'vitune-vlm'",
         model_with(meta(lambda d: d.update(format="llava")))),
    Case("model-no-format", chat(model="{m}"), 2, r"m/config\.json: format None is not 'vitune-vlm'",
         model_with(meta(lambda d: d.pop("format")))),
    Case("model-unknown-key", chat(model="{m}"), 2, r"m/config\.json:model\.lm: unknown key\(s\) \['layerz'\]",
         model_with(meta(lm(layerz=2)))),
    Case("model-bad-value-type", chat(model="{m}"), 2, r"m/config\.json:model\.lm\.dim: expected int",
         model_with(meta(lm(dim="wide")))),
    Case("model-invalid-value", chat(model="{m}"), 2, r"m/config\.json.*heads", model_with(meta(lm(heads=0)))),
    Case("model-no-model-section", chat(model="{m}"), 2, r"m/config\.json.*(['\"]model['\"]|model section)",
         model_with(meta(lambda d: d.pop("model")))),
    Case("model-no-image-token-id", chat(model="{m}"), 2, r"m/config\.json.*image_token_id",
         model_with(meta(lambda d: d.pop("image_token_id")))),
    Case("model-image-token-id-not-a-number", chat(model="{m}"), 2, r"m/config\.json.*image_token_id",
         model_with(meta(lambda d: d.update(image_token_id="x")))),
    Case("model-image-token-id-not-the-tokenizers", chat(model="{m}"), 2, r"image_token_id",
         model_with(meta(lambda d: d.update(image_token_id=99999)))),
    Case("model-config-does-not-fit-weights", chat(model="{m}"), 2, r"(?s)m/model\.safetensors: corrupt or unreadable.*size mismatch",
         model_with(meta(lm(ffn_dim=96)))),
    Case("model-no-weights", chat(model="{m}"), 2, r"m/model\.safetensors", model_with(rm("model.safetensors"))),
    Case("model-weights-truncated", chat(model="{m}"), 2, r"m/model\.safetensors: corrupt or unreadable",
         model_with(cut("model.safetensors"))),
    Case("model-weights-empty", chat(model="{m}"), 2, r"m/model\.safetensors: corrupt or unreadable",
         model_with(put("model.safetensors", b""))),
    Case("model-weights-nan", chat(model="{m}"), 2, r"m/model\.safetensors: 1 tensor\(s\) hold NaN or infinite",
         model_with(weights(poison(float("nan"))))),
    Case("model-weights-inf", chat(model="{m}"), 2, r"m/model\.safetensors: 1 tensor\(s\) hold NaN or infinite",
         model_with(weights(poison(float("inf"))))),
    Case("model-missing-tensor", chat(model="{m}"), 2, r"(?s)m/model\.safetensors: .*Missing key",
         model_with(weights(lambda w: w.pop(first_float(w))))),
    Case("model-extra-tensor", chat(model="{m}"), 2, r"(?s)m/model\.safetensors: .*Unexpected key.*stray",
         model_with(weights(lambda w: w.update(stray=torch.zeros(2))))),
    Case("model-no-tokenizer", chat(model="{m}"), 2, r"/m: no tokenizer\.json", model_with(rm("tokenizer.json"))),
    Case("model-tokenizer-broken", chat(model="{m}"), 2, r"m/tokenizer\.json: corrupt or unreadable",
         model_with(put("tokenizer.json", '{"version": "1.0", "model": 3}'))),
    Case("model-tokenizer-truncated", chat(model="{m}"), 2, r"m/tokenizer\.json: corrupt or unreadable",
         model_with(cut("tokenizer.json"))),
    Case("model-run-folder-is-accepted", chat(model="{run}"), 0, r""),
    Case("model-broken-for-predict", predict(model="{m}", q="{q}"), 2, r"m/model\.safetensors: corrupt or unreadable",
         model_with(cut("model.safetensors")), check=absent("{tmp}/p.jsonl")),
    Case("model-broken-for-eval", evaluate("--out", "{tmp}/s.json", preds=None) + ("--model", "{m}"), 2,
         r"m/config\.json: corrupt or unreadable", model_with(put("config.json", "{")), check=absent("{tmp}/s.json")),
    Case("model-broken-for-inspect", ("data", "inspect", "{bad}", "--model", "{m}"), 2,
         r"m/model\.safetensors: 1 tensor\(s\) hold NaN", both(records(), model_with(weights(poison(float("nan")))))),
]

PREDICT = [
    Case("predict-questions-missing", predict(q="{tmp}/nope.jsonl"), 2, r"nope\.jsonl: file not found",
         check=absent("{tmp}/p.jsonl")),
    Case("predict-questions-malformed", predict(), 2, r"q\.jsonl: line 2: malformed JSON",
         both(questions(), write("{tmp}/q.jsonl", json.dumps(qrow("q0")) + "\n{oops\n"))),
    Case("predict-questions-empty", predict(), 2, r"q\.jsonl", write("{tmp}/q.jsonl", ""), check=absent("{tmp}/p.jsonl")),
    Case("predict-questions-item-not-object", predict(), 2, r"q\.jsonl: item 1: expected a JSON object, got list",
         both(questions(), write("{tmp}/q.jsonl", json.dumps([qrow("q0"), [1]])))),
    Case("predict-question-no-image-field", predict(), 2, r"q\.jsonl: line 2: missing field 'image'",
         questions(qrow(image=DROP))),
    Case("predict-question-no-text", predict(), 2, r"q\.jsonl: line 2: missing field 'text'", questions(qrow(text=DROP))),
    Case("predict-question-id-float", predict(), 2, r"q\.jsonl: line 2: field 'question_id' must be int or str, got float",
         questions(qrow(1.5))),
    Case("predict-question-id-bool", predict(), 2, r"q\.jsonl: line 2: field 'question_id' must be int or str, got bool",
         questions(qrow(True))),
    Case("predict-question-id-missing", predict(), 2, r"q\.jsonl: line 2: missing field 'question_id'",
         questions(qrow(question_id=DROP))),
    Case("predict-duplicate-question-id", predict(), 2, r"q\.jsonl: line 2: duplicate question_id 'q0'",
         questions(qrow("q0"))),
    Case("predict-text-not-a-string", predict(), 2, r"q\.jsonl: line 2: field 'text' must be str", questions(qrow(text=3))),
    Case("predict-category-not-a-string", predict(), 2, r"q\.jsonl: line 2: field 'category' must be str",
         questions(qrow(category=["a"]))),
    Case("predict-image-missing", predict(), 2, r"question 'q1': image not found: .*nope\.png",
         questions(qrow(image="nope.png")), check=absent("{tmp}/p.jsonl")),
    Case("predict-image-root-missing", predict("--image-root", "{tmp}/no-root"), 2,
         r"question 'q0': image not found: .*no-root/a\.png", questions()),
    Case("predict-image-corrupt", predict(), 2,
         r"(?s)question 'q1': unreadable or corrupt image .*corrupt\.png.*kept in .*p\.jsonl\.partial",
         questions(qrow(image="corrupt.png"), imgs=("corrupt.png",)), check=absent("{tmp}/p.jsonl")),
    Case("predict-image-animated", predict(), 2, r"question 'q1': image .*anim\.gif has 3 frames",
         questions(qrow(image="anim.gif"), imgs=("anim.gif",))),
    Case("predict-slot-char-in-question", predict(), 2, r"question 'q1': the text holds the character U\+FFFC",
         questions(qrow(text=f"What is {SLOT}?"))),
    Case("predict-question-too-long", predict(), 2, r"question 'long': prompt of \d+ tokens \+ 16 new tokens exceeds",
         questions(qrow("long", text="why " * 60))),
    Case("predict-out-is-a-folder", predict(out="{tmp}/outdir"), 2, r"--out .*outdir: is a folder",
         both(questions(), mkdir("{tmp}/outdir"))),
    Case("predict-out-is-the-questions", predict(out="{tmp}/q.jsonl"), 2,
         r"--out .*q\.jsonl would overwrite the questions file", questions(), keep=("{tmp}/q.jsonl",)),
    Case("predict-out-exists", predict(), 2, r"--out .*p\.jsonl already exists; pass --overwrite",
         both(questions(), write("{tmp}/p.jsonl", "my earlier predictions\n")), keep=("{tmp}/p.jsonl",)),
    Case("predict-out-under-a-file", predict(out="{tmp}/notes.txt/p.jsonl"), 2,
         r"--out .*notes\.txt/p\.jsonl: cannot create it: .*notes\.txt is a file",
         both(questions(), write("{tmp}/notes.txt", "mine")), keep=("{tmp}/notes.txt",)),
    Case("predict-partial-of-other-questions", predict(), 2,
         r"p\.jsonl\.partial holds answers for questions .*other\.jsonl.*delete .*p\.jsonl\.partial to start over",
         both(questions(), jsonl("{tmp}/p.jsonl.partial", {"format": "vitune-partial-predictions",
                                                          "questions": "/elsewhere/other.jsonl", "model": "x",
                                                          "weights": "1:1"}, {"question_id": "q0", "text": "red"})),
         keep=("{tmp}/p.jsonl.partial",)),
    Case("predict-partial-garbage", predict(), 2, r"p\.jsonl\.partial: not a vitune partial predictions file",
         both(questions(), write("{tmp}/p.jsonl.partial", "garbage\nmore\n")), keep=("{tmp}/p.jsonl.partial",)),
    Case("predict-overwrite-onto-the-questions", predict("--overwrite", out="{tmp}/q.jsonl"), 2,
         r"--out .*q\.jsonl would overwrite the questions file", questions(), keep=("{tmp}/q.jsonl",)),
    Case("predict-batch-size-zero", predict("--batch-size", "0"), 2, r"argument --batch-size: must be (an integer )?>= 1, got '?0"),
    Case("predict-precision-unknown", predict("--precision", "fp16"), 2, r"argument --precision: invalid choice: 'fp16'"),
    Case("predict-skip-policy", predict("--on-bad-record", "skip"), 0,
         r"wrote 2 predictions to .*p\.jsonl; 2 questions skipped \(see .*p\.jsonl\.errors\.jsonl\)",
         questions(qrow("gone", image="nope.png"), qrow("broken", image="corrupt.png"), qrow("q2"), imgs=("corrupt.png",)),
         check=both(n_lines("{tmp}/p.jsonl", 2), holds("{tmp}/p.jsonl.errors.jsonl", r'"gone".*\n.*"broken"'),
                    absent("{tmp}/p.jsonl.partial"))),
    Case("predict-rgba-image-is-fine", predict(), 0, r"wrote 2 predictions",
         questions(qrow("rgba", image="rgba.png"), imgs=("rgba.png",)), check=n_lines("{tmp}/p.jsonl", 2)),
]

EVAL = [
    Case("eval-neither-model-nor-predictions", evaluate(preds=None), 2,
         r"give exactly one of --model DIR or --predictions FILE"),
    Case("eval-model-and-predictions", evaluate("--model", "{model}"), 2,
         r"give exactly one of --model DIR or --predictions FILE", shapes_predictions()),
    Case("eval-compare-with-other-inputs", evaluate("--compare", "{tmp}/a", "{tmp}/b"), 2,
         r"--compare reads two results folders and takes no other input: drop --predictions, --questions, --answers"),
    Case("eval-compare-not-results-folders", ("eval", "--compare", "{tmp}", "{run}"), 2,
         r"tmp.*: holds no results\.json; --compare takes two results folders"),
    Case("eval-model-without-an-output", evaluate("--model", "{model}", preds=None), 2,
         r"eval --model writes the model's predictions and results into a folder, never into the model folder: "
         r"give --out RUN_DIR"),
    Case("eval-bench-with-questions", evaluate("--bench", "shapes", preds=None) + ("--model", "{model}"), 2,
         r"--bench shapes brings its own questions, answers and images: drop --questions"),
    Case("eval-bench-unknown", ("eval", "--bench", "gqa", "--predictions", "{tmp}/p.jsonl"), 2,
         r"argument --bench: invalid choice: 'gqa'"),
    Case("eval-max-questions-without-bench", evaluate("--max-questions", "3"), 2,
         r"--max-questions takes the first N questions of a --bench", shapes_predictions()),
    Case("eval-predictions-missing", evaluate(), 2, r"p\.jsonl: file not found"),
    Case("eval-predictions-malformed", evaluate(), 2, r"p\.jsonl: line 3: malformed JSON",
         write("{tmp}/p.jsonl", '{"question_id": 0, "text": "red"}\n\n{"question_id": 1, "te\n')),
    Case("eval-predictions-empty", evaluate(), 2, r"p\.jsonl holds no predictions", write("{tmp}/p.jsonl", "")),
    Case("eval-prediction-no-text", evaluate(), 2, r"p\.jsonl: line 2: missing field 'text'",
         shapes_predictions(lambda rows: [rows[0], {"question_id": rows[1]["question_id"]}, *rows[2:]])),
    Case("eval-prediction-text-not-a-string", evaluate(), 2, r"p\.jsonl: line 1: field 'text' must be str",
         shapes_predictions(lambda rows: [{**rows[0], "text": ["red"]}, *rows[1:]])),
    Case("eval-prediction-duplicate-id", evaluate(), 2, r"p\.jsonl: line 3: duplicate question_id 0",
         shapes_predictions(lambda rows: [*rows[:2], rows[0], *rows[2:]])),
    Case("eval-prediction-id-types-differ", evaluate(), 2,
         r"question_id types differ: .*p\.jsonl use '0' \(str\) where the questions .* use 0 \(int\)",
         shapes_predictions(lambda rows: [{**r, "question_id": str(r["question_id"])} for r in rows])),
    Case("eval-predictions-match-nothing", evaluate(), 2, r"none of the 31 predictions in .*p\.jsonl is for a question",
         shapes_predictions(lambda rows: [{**r, "question_id": r["question_id"] + 1000} for r in rows])),
    Case("eval-answers-match-no-question", evaluate(a="{tmp}/a.jsonl"), 2,
         r"no question in .*test_questions\.jsonl has a reference answer in .*a\.jsonl",
         both(shapes_predictions(), jsonl("{tmp}/a.jsonl", {"question_id": 999, "answer": "red"}))),
    Case("eval-answers-missing", evaluate(a="{tmp}/nope.jsonl"), 2, r"nope\.jsonl: file not found", shapes_predictions()),
    Case("eval-answers-duplicate-id", evaluate(a="{tmp}/a.jsonl"), 2, r"a\.jsonl: line 2: duplicate question_id 0",
         both(shapes_predictions(), jsonl("{tmp}/a.jsonl", {"question_id": 0, "answer": "red"},
                                          {"question_id": 0, "answer": "blue"}))),
    Case("eval-answers-empty-list", evaluate(a="{tmp}/a.jsonl"), 2, r"a\.jsonl: line 1: 'answers' is empty",
         both(shapes_predictions(), jsonl("{tmp}/a.jsonl", {"question_id": 0, "answers": []}))),
    Case("eval-answer-item-not-a-string", evaluate(a="{tmp}/a.jsonl"), 2,
         r"a\.jsonl: line 1: answers\[0\] must be a string",
         both(shapes_predictions(), jsonl("{tmp}/a.jsonl", {"question_id": 0, "answers": [3]}))),
    Case("eval-answer-field-missing", evaluate(a="{tmp}/a.jsonl"), 2, r"a\.jsonl: line 1: missing field 'answer'",
         both(shapes_predictions(), jsonl("{tmp}/a.jsonl", {"question_id": 0, "reply": "red"}))),
    Case("eval-questions-not-utf8", evaluate(q="{tmp}/q.jsonl"), 2, r"q\.jsonl: not UTF-8",
         both(shapes_predictions(), write("{tmp}/q.jsonl", b'{"question_id": 0, "text": "\xff"}\n'))),
    Case("eval-partial-coverage-warns", evaluate("--out", "{tmp}/run"), 0,
         r"warning: the predictions cover only 12 of the 31 scored questions; the other 19 count as wrong",
         shapes_predictions(lambda rows: rows[:12]), check=holds("{tmp}/run/results.json", r'"n_missing": 19')),
    Case("eval-out-is-the-questions", evaluate("--out", "{q}"), 2, r"--out .*test_questions\.jsonl: exists and is not "
         r"a folder; --out is the results folder", shapes_predictions(), keep=("{q}",)),
    Case("eval-out-is-the-predictions", evaluate("--out", "{tmp}/p.jsonl", "--overwrite"), 2,
         r"p\.jsonl: exists and is not a folder", shapes_predictions(), keep=("{tmp}/p.jsonl",)),
    Case("eval-out-holds-the-predictions", evaluate("--out", "{tmp}", "--overwrite"), 2,
         r"--out .*: is \(or contains\) the predictions file .*p\.jsonl; --out is never an input",
         shapes_predictions(), keep=("{tmp}/p.jsonl",)),
    Case("eval-out-holds-the-answers", evaluate("--out", "{tmp}", a="{tmp}/a.jsonl"), 2,
         r"--out .*: is \(or contains\) the answers file", both(shapes_predictions(), lambda c: shutil.copy(
             c.data / "test_answers.jsonl", c.tmp / "a.jsonl")), keep=("{tmp}/a.jsonl",)),
    Case("eval-out-not-empty", evaluate("--out", "{tmp}/run"), 2,
         r"--out .*run: exists and is not empty \(it holds mine\.txt\); pass --overwrite",
         both(shapes_predictions(), write("{tmp}/run/mine.txt", "mine")), keep=("{tmp}/run/mine.txt",)),
    Case("eval-model-out-holds-results", evaluate("--model", "{model}", "--out", "{tmp}/run", preds=None), 2,
         r"--out .*run: exists and is not empty \(it holds predictions\.jsonl\); pass --overwrite",
         write("{tmp}/run/predictions.jsonl", "mine\n"), keep=("{tmp}/run/predictions.jsonl",)),
    Case("eval-model-out-inside-the-model", evaluate("--model", "{model}", "--out", "{model}/eval", preds=None), 2,
         r"--out .*eval: is \(or contains, or lies inside\) the model folder"),
    Case("eval-task-unknown", evaluate("--task", "gqa"), 2, r"argument --task: invalid choice: 'gqa'"),
]

CHAT = [
    Case("chat-image-missing", chat(image="{tmp}/nope.png"), 2, r"image not found: .*nope\.png"),
    Case("chat-image-corrupt", chat(image="{tmp}/corrupt.png"), 2, r"unreadable or corrupt image .*corrupt\.png",
         write("{tmp}/corrupt.png", IMAGES["corrupt.png"])),
    Case("chat-image-truncated", chat(image="{tmp}/truncated.png"), 2, r"unreadable or corrupt image .*truncated\.png",
         write("{tmp}/truncated.png", IMAGES["truncated.png"])),
    Case("chat-image-animated", chat(image="{tmp}/anim.gif"), 2, r"image .*anim\.gif has 3 frames",
         write("{tmp}/anim.gif", IMAGES["anim.gif"])),
    Case("chat-image-bomb", chat(image="{tmp}/bomb.png"), 2, r"image .*bomb\.png is 10000x10000",
         write("{tmp}/bomb.png", IMAGES["bomb.png"])),
    Case("chat-image-is-a-folder", chat(image="{tmp}"), 2, r"image path is a folder, not an image file"),
    Case("chat-temperature-nan", chat("--temperature", "nan"), 2, r"argument --temperature: must be a finite number >= 0"),
    Case("chat-temperature-inf", chat("--temperature", "inf"), 2, r"argument --temperature: must be a finite number"),
    Case("chat-temperature-negative", chat("--temperature", "-1"), 2, r"argument --temperature: must be a finite number"),
    Case("chat-top-p-zero", chat("--top-p", "0"), 2, r"argument --top-p: must be .*in \(0, 1\], got '0'"),
    Case("chat-top-p-over-1", chat("--top-p", "1.5"), 2, r"argument --top-p: must be .*in \(0, 1\], got '1\.5'"),
    Case("chat-max-new-tokens-zero", chat("--max-new-tokens", "0"), 2, r"argument --max-new-tokens: must be (an integer )?>= 1, got '?0"),
    Case("chat-max-new-tokens-word", chat("--max-new-tokens", "many"), 2, r"argument --max-new-tokens: .*integer.*'many'"),
    Case("chat-max-new-tokens-over-context", chat("--max-new-tokens", "1000"), 2,
         r"prompt of \d+ tokens \+ 1000 new tokens exceeds"),
    Case("chat-seed-word", chat("--seed", "x"), 2, r"argument --seed: invalid int value: 'x'"),
    Case("chat-slot-char-in-question", chat(question=f"What is {SLOT} here?"), 2, r"U\+FFFC"),
    Case("chat-question-too-long", chat(question="why " * 60), 2, r"prompt of \d+ tokens \+ 64 new tokens exceeds"),
    Case("chat-rgba-image-is-fine", chat("--max-new-tokens", "4", image="{tmp}/rgba.png"), 0, r"",
         write("{tmp}/rgba.png", IMAGES["rgba.png"])),
    Case("chat-16-bit-image-is-fine", chat("--max-new-tokens", "4", image="{tmp}/deep.png"), 0, r"",
         write("{tmp}/deep.png", IMAGES["deep.png"])),
]

MERGE_EXPORT = [
    Case("merge-model-without-lora", ("merge", "{model}", "{tmp}/merged"), 2,
         r"model.*: the model has no LoRA adapters to merge \(model\.lora\.rank is 0\)", check=absent("{tmp}/merged")),
    Case("merge-missing-model", ("merge", "{tmp}/nope", "{tmp}/merged"), 2, r"nope: not a vitune model folder",
         check=absent("{tmp}/merged")),
    Case("merge-out-not-empty", ("merge", "{model}", "{tmp}/out"), 2,
         r"out: exists and is not empty; pass --overwrite", write("{tmp}/out/mine.txt", "mine"), keep=("{tmp}/out",)),
    Case("merge-out-is-the-model", ("merge", "{m}", "{m}"), 2,
         r"m: is \(or contains, or lies inside\) the model folder", model_with(), keep=("{m}",)),
    Case("merge-out-inside-the-model", ("merge", "{m}", "{m}/merged"), 2,
         r"merged: is \(or contains, or lies inside\) the model folder", model_with(), keep=("{m}",)),
    Case("merge-overwrite-onto-the-model", ("merge", "--overwrite", "{m}", "{m}"), 2,
         r"m: is \(or contains, or lies inside\) the model folder", model_with(), keep=("{m}",)),
    Case("merge-out-is-a-file", ("merge", "{model}", "{tmp}/out"), 2, r"out: exists and is not a folder",
         write("{tmp}/out", "mine"), keep=("{tmp}/out",)),
    Case("export-out-not-empty", ("export", "--format", "hf", "{model}", "{tmp}/out"), 2,
         r"out: exists and is not empty; pass --overwrite", write("{tmp}/out/mine.txt", "mine"), keep=("{tmp}/out",)),
    Case("export-out-is-the-model", ("export", "--format", "hf", "{m}", "{m}"), 2,
         r"m: is \(or contains, or lies inside\) the model folder", model_with(), keep=("{m}",)),
    Case("export-out-inside-the-model", ("export", "--format", "hf", "{m}", "{m}/hf"), 2,
         r"hf: is \(or contains, or lies inside\) the model folder", model_with(), keep=("{m}",)),
    Case("export-out-contains-the-model", ("export", "--format", "hf", "{tmp}/out/model", "{tmp}/out"), 2,
         r"out: is \(or contains, or lies inside\) the model folder", copy_run(), keep=("{tmp}/out",)),
    Case("export-overwrite-onto-the-model", ("export", "--format", "hf", "--overwrite", "{m}", "{m}"), 2,
         r"m: is \(or contains, or lies inside\) the model folder", model_with(), keep=("{m}",)),
    Case("export-out-is-a-file", ("export", "--format", "hf", "{model}", "{tmp}/out"), 2,
         r"out: exists and is not a folder", write("{tmp}/out", "mine"), keep=("{tmp}/out",)),
    Case("export-missing-model", ("export", "--format", "hf", "{tmp}/nope", "{tmp}/out"), 2,
         r"nope: not a vitune model folder", check=absent("{tmp}/out")),
    Case("export-no-format", ("export", "{model}", "{tmp}/out"), 2, r"the following arguments are required: --format"),
    Case("export-unknown-format", ("export", "--format", "onnx", "{model}", "{tmp}/out"), 2,
         r"argument --format: invalid choice: 'onnx'"),
]

DATA_COMMANDS = [
    Case("shapes-n-train-zero", ("data", "shapes", "--out", "{tmp}/s", "--n-train", "0"), 2,
         r"argument --n-train: must be >= 1, got 0", check=absent("{tmp}/s")),
    Case("shapes-n-test-negative", ("data", "shapes", "--out", "{tmp}/s", "--n-test", "-1"), 2,
         r"argument --n-test: must be >= 1, got -1"),
    Case("shapes-seed-negative", ("data", "shapes", "--out", "{tmp}/s", "--seed", "-1"), 2,
         r"argument --seed: must be >= 0, got -1"),
    Case("shapes-n-train-word", ("data", "shapes", "--out", "{tmp}/s", "--n-train", "lots"), 2,
         r"argument --n-train: expected an integer, got 'lots'"),
    Case("shapes-out-is-a-file", ("data", "shapes", "--out", "{tmp}/s", "--n-train", "1", "--n-test", "1"), 2,
         r"/s\b", write("{tmp}/s", "mine"), keep=("{tmp}/s",)),
    Case("easy-vqa-max-train-zero", ("data", "easy-vqa", "--out", "{tmp}/e", "--max-train", "0"), 2,
         r"argument --max-train: must be >= 1"),
    Case("text-chat-max-new-tokens-zero", ("data", "text-chat", "--out", "{tmp}/t.json", "--max-new-tokens", "0"), 2,
         r"argument --max-new-tokens: must be >= 1"),
    Case("inspect-missing-file", ("data", "inspect", "{tmp}/nope.json"), 2, r"nope\.json: file not found"),
    Case("inspect-empty-file", ("data", "inspect", "{bad}"), 2, rf"{BAD}: holds no records", raw("")),
    Case("inspect-malformed-file", ("data", "inspect", "{bad}"), 2, rf"{BAD}: malformed JSON", raw("[{")),
    Case("inspect-not-utf8", ("data", "inspect", "{bad}"), 2, rf"{BAD}: not UTF-8", raw(b"\xff\xfe[]")),
    Case("inspect-bad-record", ("data", "inspect", "{bad}"), 2, rf"{BAD}: record 'bad1': the last turn is from the human",
         records(rec(turns=turns(("human", "<image>\nWhat?"))))),
    Case("inspect-index-out-of-range", ("data", "inspect", "{bad}", "--index", "9"), 2,
         rf"{BAD}: --index 9 is out of range \(0\.\.1\)", records()),
    Case("inspect-index-negative", ("data", "inspect", "{bad}", "--index", "-1"), 2, r"argument --index: must be >= 0"),
    Case("inspect-unknown-preset", ("data", "inspect", "{bad}", "--preset", "huge"), 2, r"unknown preset 'huge'",
         records()),
    Case("inspect-unknown-template", ("data", "inspect", "{bad}", "--template", "alpaca"), 2,
         r"argument --template: invalid choice: 'alpaca'"),
    Case("quickstart-n-train-zero", ("quickstart", "--out", "{tmp}/qs", "--n-train", "0"), 2,
         r"argument --n-train: must be >= 1", check=absent("{tmp}/qs")),
]

CLI_PATHS = [
    Case("cli-no-command", (), 2, r"the following arguments are required: cmd"),
    Case("cli-unknown-command", ("trian",), 2, r"argument cmd: invalid choice: 'trian'"),
    Case("cli-data-without-subcommand", ("data",), 2, r"the following arguments are required: data_cmd"),
    Case("cli-unknown-data-subcommand", ("data", "coco"), 2, r"invalid choice: 'coco'"),
    Case("cli-train-without-out", ("train", "--preset", "tiny"), 2, r"the following arguments are required: --out"),
    Case("cli-unknown-option", train(data=("{data}/instruct.json",), opts=("--bogus",)), 2,
         r"unrecognized arguments: --bogus"),
    Case("cli-predict-without-questions", ("predict", "--model", "{model}", "--out", "{tmp}/p.jsonl"), 2,
         r"the following arguments are required: --questions"),
    Case("cli-chat-without-model", ("chat", "hello"), 2, r"the following arguments are required: --model"),
    Case("cli-merge-without-out", ("merge", "{model}"), 2, r"the following arguments are required: out"),
    Case("cli-convert-unknown-source", ("convert", "llama"), 2, r"argument source: invalid choice: 'llama'"),
]

CATEGORIES = {"data files": DATA_FILES, "config": CONFIG, "run folders": RUN_FOLDERS, "model folders": MODEL_FOLDERS,
              "predict": PREDICT, "eval": EVAL, "chat": CHAT, "merge/export": MERGE_EXPORT,
              "data commands": DATA_COMMANDS, "cli paths": CLI_PATHS}
CASES = [c for cases in CATEGORIES.values() for c in cases]


def test_the_corpus_is_large_and_its_ids_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    assert len(CASES) >= 150


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, env, tmp_path, capsys, monkeypatch):
    import re
    if case.skip:
        pytest.skip(case.skip)
    monkeypatch.delenv("VITUNE_DEBUG", raising=False)
    monkeypatch.delenv("VITUNE_MAX_IMAGE_PIXELS", raising=False)
    ctx = Ctx(tmp_path, *env, monkeypatch)
    if case.setup is not None:
        case.setup(ctx)
    before = {p: snapshot(ctx.path(p)) for p in case.keep}
    capsys.readouterr()
    argv = [ctx.sub(a) for a in case.argv]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out, err = capsys.readouterr()
    said = f"argv: {argv}\n--- exit {code}; stderr:\n{err[-3000:]}\n--- stdout:\n{out[-1500:]}"
    assert "Traceback" not in out + err, said
    assert "internal error" not in out + err, said
    assert code == case.code, said
    assert re.search(case.match, err if case.code else out + err), f"no match for {case.match!r}\n{said}"
    for p, was in before.items():
        assert snapshot(ctx.path(p)) == was, f"{ctx.sub(p)} changed (a lost or clobbered file)\n{said}"
    if case.check is not None:
        case.check(ctx)


def test_the_corpus_left_the_shared_data_and_model_untouched(env):
    for path, was in SHARED.items():
        assert snapshot(path) == was, f"{path} was changed by a case"
