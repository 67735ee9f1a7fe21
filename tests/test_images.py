"""Image decoding (`load_image`) and image-path containment (`parse_record`): every image is
decoded the way it displays, and every bad one is a `DataError` naming the file and the record.
All images are built here, in tmp_path."""

import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import write_json
from PIL import Image, features

from vitune.data.dataset import BadRecords, load_conversations
from vitune.data.llava import parse_record
from vitune.data.processor import MAX_IMAGE_PIXELS, MAX_PIXELS_ENV, _to_rgb, load_image
from vitune.files import DataError

RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)


def px(im: Image.Image, x: int, y: int) -> tuple[int, ...]:
    return im.convert("RGB").getpixel((x, y))


def close(got, want, tol=40) -> bool:
    return all(abs(int(g) - w) <= tol for g, w in zip(got, want))


# -- orientation ------------------------------------------------------------------------------------

def _top_red_bottom_blue(w=30, h=20) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2] = RED
    a[h // 2:] = BLUE
    return Image.fromarray(a)


def test_exif_orientation_is_applied(tmp_path):
    stored = _top_red_bottom_blue()  # 30 wide, 20 high: red on top, blue below
    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 90 degrees counter-clockwise to display": the top edge goes left
    stored.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    stored.save(tmp_path / "plain.jpg", quality=95)

    im = load_image(tmp_path / "rot.jpg")
    assert im.mode == "RGB" and im.size == (20, 30)
    assert close(px(im, 2, 15), RED) and close(px(im, 17, 15), BLUE)  # left half red, right half blue
    plain = load_image(tmp_path / "plain.jpg")  # the control: no tag, no rotation
    assert plain.size == (30, 20) and close(px(plain, 15, 2), RED) and close(px(plain, 15, 17), BLUE)


# -- bit depth ------------------------------------------------------------------------------------

def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    a = np.zeros((8, 12), np.uint16)
    a[:, 4:8] = 32768
    a[:, 8:] = 65535
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")  # really a 16-bit file
    im = load_image(tmp_path / "g16.png")
    assert im.mode == "RGB"
    assert px(im, 1, 1) == (0, 0, 0) and px(im, 5, 1) == (128, 128, 128) and px(im, 10, 1) == (255, 255, 255)


def test_16_bit_big_endian_and_32_bit_int_holding_16_bit_data(tmp_path):
    Image.fromarray(np.full((4, 4), 16384, ">u2")).save(tmp_path / "be.tif")
    Image.fromarray(np.full((4, 4), 49152, np.int32)).save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "be.tif").mode == "I;16B" and Image.open(tmp_path / "i32.tif").mode == "I"
    assert px(load_image(tmp_path / "be.tif"), 0, 0) == (64, 64, 64)
    assert px(load_image(tmp_path / "i32.tif"), 0, 0) == (191, 191, 191)


def test_16_bit_transparent_value_becomes_white(tmp_path):
    a = np.full((4, 4), 1000, np.uint16)
    a[:, :2] = 0
    Image.fromarray(a).save(tmp_path / "t16.png", transparency=0)
    im = load_image(tmp_path / "t16.png")
    assert px(im, 0, 0) == WHITE and px(im, 3, 0) == (4, 4, 4)


def test_float_images(tmp_path):
    unit = np.zeros((4, 4), np.float32)
    unit[:, 2:] = 0.5
    wide = np.zeros((4, 4), np.float32)
    wide[:, 2:] = 1000.0
    bad = np.zeros((4, 4), np.float32)
    bad[0, 0] = np.nan
    for name, a in (("unit", unit), ("wide", wide), ("nan", bad)):
        Image.fromarray(a).save(tmp_path / f"{name}.tif")
    u = load_image(tmp_path / "unit.tif")
    assert px(u, 0, 0) == (0, 0, 0) and px(u, 3, 0) == (128, 128, 128)  # [0, 1] intensities
    w = load_image(tmp_path / "wide.tif")
    assert px(w, 0, 0) == (0, 0, 0) and px(w, 3, 0) == (255, 255, 255)  # stretched min..max
    with pytest.raises(DataError, match=r"record 'f'.*nan\.tif.*NaN"):
        load_image(tmp_path / "nan.tif", "record 'f'")


@pytest.mark.parametrize("mode, value, want", [
    ("1", 1, WHITE), ("1", 0, (0, 0, 0)), ("L", 128, (128, 128, 128)),
    ("CMYK", (0, 255, 255, 0), RED), ("YCbCr", (76, 85, 255), RED), ("LAB", (135, 208, 195), RED),
    ("I;16B", 65535, WHITE), ("I;16L", 32768, (128, 128, 128)), ("HSV", (0, 255, 255), RED),
])
def test_other_modes_convert_to_the_right_rgb(mode, value, want):
    got = _to_rgb(Image.new(mode, (3, 2), value), "mem.png", "")
    assert got.mode == "RGB" and close(px(got, 1, 1), want, tol=12)


def test_cmyk_jpeg_file(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    assert close(px(load_image(tmp_path / "c.jpg"), 4, 4), RED, tol=12)


# -- transparency ---------------------------------------------------------------------------------

def test_rgba_is_composited_on_white(tmp_path):
    a = np.zeros((4, 6, 4), np.uint8)
    a[:, :2] = (*GREEN, 0)        # fully transparent, storing green: must not show
    a[:, 2:4] = (0, 0, 0, 128)    # half-transparent black: grey
    a[:, 4:] = (*RED, 255)        # opaque red
    Image.fromarray(a, "RGBA").save(tmp_path / "rgba.png")
    im = load_image(tmp_path / "rgba.png")
    assert im.mode == "RGB"
    assert px(im, 0, 0) == WHITE and close(px(im, 2, 0), (127, 127, 127), tol=2) and px(im, 5, 0) == RED


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    im = Image.new("P", (4, 2), 0)
    im.putpalette([*GREEN, *RED] + [0] * 762)
    im.paste(1, (2, 0, 4, 2))     # right half: index 1, red
    im.save(tmp_path / "p.png", transparency=0)  # index 0 (green) transparent
    im.save(tmp_path / "p.gif", transparency=0)
    for name in ("p.png", "p.gif"):
        got = load_image(tmp_path / name)
        assert px(got, 0, 0) == WHITE and px(got, 3, 1) == RED, name


def test_la_and_gray_with_transparency(tmp_path):
    a = np.zeros((2, 4, 2), np.uint8)
    a[:, 2:] = (0, 255)           # opaque black; the left half is transparent black
    Image.fromarray(a, "LA").save(tmp_path / "la.png")
    im = load_image(tmp_path / "la.png")
    assert px(im, 0, 0) == WHITE and px(im, 3, 0) == (0, 0, 0)
    g = Image.new("L", (4, 2), 10)
    g.paste(200, (2, 0, 4, 2))
    g.save(tmp_path / "l.png", transparency=10)
    im = load_image(tmp_path / "l.png")
    assert px(im, 0, 0) == WHITE and px(im, 3, 0) == (200, 200, 200)


# -- multi-frame ----------------------------------------------------------------------------------

def _frames():
    return [Image.new("RGB", (8, 8), c) for c in (RED, GREEN, BLUE)]


@pytest.mark.parametrize("name", ["anim.gif", "pages.tif", "anim.png"] + (["anim.webp"] if features.check("webp") else []))
def test_multi_frame_files_are_refused(tmp_path, name):
    first, *rest = _frames()
    first.save(tmp_path / name, save_all=True, append_images=rest)
    with pytest.raises(DataError, match=rf"record 'm': image .*{name} has 3 frames.*save the frame"):
        load_image(tmp_path / name, "record 'm'")


def test_a_single_frame_gif_is_fine(tmp_path):
    Image.new("RGB", (8, 8), RED).save(tmp_path / "one.gif")
    assert px(load_image(tmp_path / "one.gif"), 4, 4) == RED


# -- pixel cap --------------------------------------------------------------------------------------

def _png_header_only(path: Path, w: int, h: int) -> Path:
    """A PNG whose header claims w x h pixels (8-bit RGB) over a few bytes of pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [8000, 10_000, 100_000])  # under, over and far over Pillow's own limits
def test_huge_images_are_refused_from_the_header(tmp_path, side):
    path = _png_header_only(tmp_path / "bomb.png", side, side)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning leaks out either
        with pytest.raises(DataError) as e:
            load_image(path, "record 'b'")
    msg = str(e.value)
    assert msg.startswith("record 'b': ") and "bomb.png" in msg and MAX_PIXELS_ENV in msg
    assert f"{MAX_IMAGE_PIXELS:,}" in msg
    if side < 100_000:  # our cap decides, before decoding (decoding would say "corrupt")
        assert f"{side}x{side}" in msg and "over vitune's cap" in msg and "corrupt" not in msg


def test_the_cap_follows_the_environment_variable(tmp_path, monkeypatch):
    Image.new("RGB", (20, 20), RED).save(tmp_path / "small.png")
    monkeypatch.setenv(MAX_PIXELS_ENV, "100")
    with pytest.raises(DataError, match=r"small\.png is 20x20 = 400 pixels, over vitune's cap of 100 pixels"):
        load_image(tmp_path / "small.png")
    monkeypatch.setenv(MAX_PIXELS_ENV, "400")
    assert px(load_image(tmp_path / "small.png"), 0, 0) == RED
    for bad in ("lots", "0", "-5", "1e6"):
        monkeypatch.setenv(MAX_PIXELS_ENV, bad)
        with pytest.raises(ValueError, match=MAX_PIXELS_ENV) as e:
            load_image(tmp_path / "small.png")
        assert not isinstance(e.value, DataError)  # a setting, not a bad record: no skip policy hides it


def test_a_raised_cap_lets_a_large_image_through(tmp_path, monkeypatch):
    path = _png_header_only(tmp_path / "big.png", 8000, 8000)
    monkeypatch.setenv(MAX_PIXELS_ENV, str(8000 * 8000))
    with pytest.raises(DataError, match="corrupt"):  # past the cap, the (fake) pixel data is decoded
        load_image(path)


# -- broken files -----------------------------------------------------------------------------------

def test_broken_files_are_data_errors_naming_file_and_record(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("just some text, not an image\n")
    (tmp_path / "folder.png").mkdir()
    cases = {"truncated.png": "corrupt", "empty.png": "empty", "text.png": "not an image",
             "folder.png": "folder", "missing.png": "not found"}
    for name, what in cases.items():
        with pytest.raises(DataError) as e:
            load_image(tmp_path / name, "record 'x'")
        msg = str(e.value)
        assert msg.startswith("record 'x': ") and name in msg and what in msg, msg
        assert e.value.__context__ is None or e.value.__suppress_context__  # no chained PIL traceback
    assert load_image(tmp_path / "full.png").size == (64, 64)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    path = tmp_path / "locked.png"
    Image.new("RGB", (4, 4)).save(path)
    path.chmod(0)
    try:
        with pytest.raises(DataError, match=r"question 7: image .*locked\.png cannot be read"):
            load_image(path, "question 7")
    finally:
        path.chmod(0o644)


# -- image paths stay inside the image root -------------------------------------------------------

QA = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "red"}]


@pytest.fixture
def tree(tmp_path):
    """tmp/data: the data folder (a.png, sub/b.png, link.png -> ../outside.png, inlink.png -> a.png)."""
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    for p in (data / "a.png", data / "sub" / "b.png", tmp_path / "outside.png"):
        Image.new("RGB", (4, 4), RED).save(p)
    (data / "link.png").symlink_to(tmp_path / "outside.png")
    (data / "inlink.png").symlink_to(data / "a.png")
    return data


def rec(image: str, rid="r1") -> dict:
    return {"id": rid, "image": image, "conversations": QA}


def test_paths_inside_the_root_work(tree):
    for image in ("a.png", "sub/b.png", "sub/../a.png", "./sub/b.png", "inlink.png"):
        conv = parse_record(rec(image), 0, "d.json", tree)
        assert conv.images == (tree / image,) and conv.images[0].is_file()


@pytest.mark.parametrize("image, why", [
    ("../outside.png", "outside the image root"),
    ("sub/../../outside.png", "outside the image root"),
    ("link.png", "outside the image root"),   # a symlink inside the root leading out
    ("ABS", "absolute"),
    ("ABS_INSIDE", "absolute"),               # absolute is refused even when it lies inside
])
def test_paths_leaving_the_root_are_refused(tree, image, why):
    image = {"ABS": str(tree.parent / "outside.png"), "ABS_INSIDE": str(tree / "a.png")}.get(image, image)
    with pytest.raises(DataError) as e:
        parse_record(rec(image, "cat-7"), 0, "d.json", tree)
    msg = str(e.value)
    assert "record 'cat-7'" in msg and repr(image) in msg and why in msg and "--allow-outside-images" in msg
    conv = parse_record(rec(image, "cat-7"), 0, "d.json", tree, allow_outside_root=True)
    assert conv.images[0].resolve() in ((tree.parent / "outside.png").resolve(), (tree / "a.png").resolve())


def test_allowed_outside_paths_must_still_exist(tree):
    with pytest.raises(DataError, match="image not found"):
        parse_record(rec("../nope.png"), 0, "d.json", tree, allow_outside_root=True)


def test_load_conversations_threads_the_permission(tree):
    path = write_json(tree / "d.json", [rec("a.png", "in"), rec("../outside.png", "out")])
    with pytest.raises(DataError, match=r"record 'out'.*outside the image root"):
        load_conversations(path, None, BadRecords("error", print))
    logs = []
    kept = load_conversations(path, None, BadRecords("skip", logs.append))
    assert [c.id for c in kept] == ["in"] and len(logs) == 1 and "record 'out'" in logs[0]
    both = load_conversations(path, None, BadRecords("error", print), allow_outside_root=True)
    assert [c.id for c in both] == ["in", "out"]


def test_the_root_is_the_image_root_when_given(tree, tmp_path_factory):
    elsewhere = write_json(tmp_path_factory.mktemp("json") / "d.json", [rec("sub/b.png"), rec("../outside.png", "o")])
    bad = BadRecords("skip", lambda s: None)
    assert [c.id for c in load_conversations(elsewhere, tree, bad)] == ["r1"] and bad.skipped == 1
