"""Images from request URLs, decoded safely: every refusal an `ApiError` naming the field.

- `data:image/...;base64,...` URLs: the decoded size is checked against `max_image_bytes` from
  the base64 length, before decoding it; the pixel count against `max_image_pixels` from the
  image header, before any pixel is decoded (Pillow's own decompression-bomb limit applies too).
  Truncated or corrupt images, non-images and multi-frame files are refused.
- `http:` / `https:` URLs are refused: the server never fetches anything.
- `file:` URLs and plain paths are refused unless the server allows a folder (`--allow-file-dir`);
  then only regular files under one of them (after resolving `..` and symlinks) are read, a
  relative path being relative to the first allowed folder.

Decoded images become RGB as training reads them (`data.processor`: EXIF orientation applied,
16-bit and float scaled, transparency composited on white).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, ImageOps, UnidentifiedImageError

from vitune.data.processor import _DECODE_ERRORS, _to_rgb
from vitune.files import DataError
from vitune.serving.errors import ApiError, bad_request
from vitune.serving.settings import ServeSettings

_DATA_URL = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),(?P<payload>.*)", re.DOTALL)


def load_image_url(url: str, param: str, settings: ServeSettings) -> Image.Image:
    scheme = url.split(":", 1)[0].lower() if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", url) else ""
    if scheme == "data":
        return decode_image(_data_bytes(url, param, settings), param, settings)
    if scheme in ("http", "https"):
        raise bad_request(param, "remote image URLs are refused (the server does not fetch anything); send the "
                                 "image inline as a data:image/...;base64,... URL", "remote_url_refused")
    if scheme in ("file", ""):
        return decode_image(_file_bytes(url, scheme, param, settings), param, settings)
    raise bad_request(param, f"unsupported URL scheme {scheme!r}; send the image as a data:image/...;base64,... URL")


def _data_bytes(url: str, param: str, settings: ServeSettings) -> bytes:
    m = _DATA_URL.fullmatch(url)
    if m is None:
        raise bad_request(param, "malformed data URL; expected data:image/png;base64,<base64 bytes>")
    mime = m["mime"].strip().lower()
    if mime and not mime.startswith("image/") and mime != "application/octet-stream":
        raise bad_request(param, f"the data URL's media type is {mime!r}, not an image type (image/png, "
                                 "image/jpeg, ...)")
    if "base64" not in [p.strip().lower() for p in m["params"].split(";")]:
        raise bad_request(param, "the data URL must be base64-encoded (data:image/png;base64,...)")
    payload = "".join(m["payload"].split()).replace("-", "+").replace("_", "/")
    if len(payload) * 3 // 4 > settings.max_image_bytes:
        raise ApiError(413, f"{param}: the image is about {len(payload) * 3 // 4:,} bytes, over this server's "
                            f"limit of {settings.max_image_bytes:,} bytes per image", param, "image_too_large")
    try:
        data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(param, "the data URL's payload is not valid base64") from None
    if not data:
        raise bad_request(param, "the data URL holds no bytes (an empty image)")
    return data


def _file_bytes(url: str, scheme: str, param: str, settings: ServeSettings) -> bytes:
    if not settings.allow_file_dirs:
        raise bad_request(param, "file URLs and paths are refused: the server reads no local files unless started "
                                 "with --allow-file-dir DIR; send the image as a data:image/...;base64,... URL",
                          "file_url_refused")
    raw = unquote(urlparse(url).path) if scheme == "file" else url
    path = Path(raw)
    roots = [Path(d).resolve() for d in settings.allow_file_dirs]
    resolved = (path if path.is_absolute() else roots[0] / path).resolve()
    if not any(resolved.is_relative_to(r) for r in roots):
        raise bad_request(param, f"{raw} is outside the allowed image folder(s); allowed: "
                                 f"{', '.join(str(r) for r in roots)}", "file_url_refused")
    if not resolved.is_file():
        raise bad_request(param, f"{raw}: no such image file under the allowed folder(s)", "file_not_found")
    if resolved.stat().st_size > settings.max_image_bytes:
        raise ApiError(413, f"{param}: {raw} is {resolved.stat().st_size:,} bytes, over this server's limit of "
                            f"{settings.max_image_bytes:,} bytes per image", param, "image_too_large")
    return resolved.read_bytes()


def decode_image(data: bytes, param: str, settings: ServeSettings) -> Image.Image:
    """Bytes -> RGB PIL image, the pixel count checked from the header before decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our cap, below, decides
            im = Image.open(io.BytesIO(data))
            with im:
                _check_header(im, param, settings.max_image_pixels)
                im.load()
                return _to_rgb(ImageOps.exif_transpose(im), param, f"{param}: ")
    except ApiError:
        raise
    except DataError as e:
        raise ApiError(400, str(e), param, "invalid_image") from None
    except Image.DecompressionBombError:
        raise bad_request(param, "the image is too large to decode safely (over Pillow's decompression-bomb "
                                 "limit)", "image_too_large") from None
    except UnidentifiedImageError:
        raise bad_request(param, "the bytes are not an image in a format Pillow recognises", "invalid_image") from None
    except _DECODE_ERRORS as e:
        raise bad_request(param, f"the image is truncated or corrupt ({type(e).__name__}: {e})",
                          "invalid_image") from None


def _check_header(im: Image.Image, param: str, cap: int) -> None:
    w, h = im.size
    if w * h > cap:
        raise bad_request(param, f"the image is {w}x{h} = {w * h:,} pixels, over this server's limit of {cap:,} "
                                 "pixels (a guard against decompression bombs); send a smaller image",
                          "image_too_large")
    if w == 0 or h == 0:
        raise bad_request(param, f"the image has no pixels ({w}x{h})", "invalid_image")
    n = getattr(im, "n_frames", 1)
    if n > 1:
        raise bad_request(param, f"the image has {n} frames (an animation or a multi-page file); send one frame",
                          "invalid_image")
