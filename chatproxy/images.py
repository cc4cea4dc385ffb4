"""Image content parts: checked from their bytes (data URLs only) and priced as prompt tokens (the request models,
schemas/parts.py and schemas/responses.py, call `check`; `pictures` gives what the model table prices per model).

A part is OpenAI's `{"type": "image_url", "image_url": {"url": "data:image/png;base64,...", "detail": ...}}`.
The type is read from the magic bytes and the pixel size from the header, never by decoding the image: a
decompression bomb (a small file claiming 100000 x 100000 pixels) is refused by its header alone.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol

from .errors import invalid

DATA_URL = re.compile(r"^data:(image/[a-z0-9.+-]+);base64,([A-Za-z0-9+/=]*)$", re.IGNORECASE)
KINDS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WebP", "image/gif": "GIF"}
DETAILS = ("auto", "low", "high")
# OpenAI's two ways of counting an image's tokens (docs/models.md "Images" cites the guide). Tiles: the image is
# scaled to fit 2048 x 2048, then its shorter side to 768, and each 512 px tile costs the model's tile tokens on
# top of its base (`low`: the base alone; `auto` is counted as its worst case, `high`). Patches: the 32 px patches
# that cover the image, at most 1,536, times the model's multiplier.
TILE = 512
FIT = 2048
SHORT_SIDE = 768
PATCH = 32
MAX_PATCHES = 1536
JPEG_FRAMES = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


class Caps(Protocol):
    """The image caps in force (Settings, or the request models' Policy)."""

    max_image_bytes: int
    max_image_side: int


@dataclass(frozen=True)
class Picture:
    """What an image costs by: its pixel size and the detail asked for."""

    width: int
    height: int
    detail: str = "auto"


@dataclass(frozen=True)
class Tiles:
    """A model that counts 512 px tiles: `base` tokens per image, plus `tile` per tile at detail high."""

    base: int
    tile: int


@dataclass(frozen=True)
class Patches:
    """A model that counts 32 px patches (at most 1,536 per image) times `multiplier`; detail changes nothing."""

    multiplier: Fraction


Rule = Tiles | Patches
GPT_4O = Tiles(85, 170)  # the count for a table that names no rule at all


@dataclass(frozen=True)
class Image:
    """What the header of a checked image says."""

    kind: str  # PNG, JPEG, WebP or GIF
    width: int
    height: int
    animated: bool = False  # OpenAI takes still GIFs and WebPs only


def check(url: str, where: str, caps: Caps) -> str:
    """The data URL of a good image as it is sent upstream (its media type in lower case), or the 400 naming
    what is wrong with it."""
    match = DATA_URL.match(url)
    if match is None:
        raise invalid(
            f"{where} must be a base64 data URL (data:image/png;base64,...): images are sent inline, "
            f"the server fetches no URL."
        )
    declared = match.group(1).lower()
    if declared not in KINDS:
        raise invalid(f"{where}: images must be PNG, JPEG, WebP or GIF, not {declared[:40]}.")
    encoded = match.group(2)
    if len(encoded) > (caps.max_image_bytes + 2) // 3 * 4:  # refused before decoding
        raise invalid(f"{where} is too large: at most {caps.max_image_bytes} bytes per image.")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{where} is not valid base64.") from None
    if len(data) > caps.max_image_bytes:
        raise invalid(f"{where} is too large: at most {caps.max_image_bytes} bytes per image.")
    image = read_header(data)
    if image is None:
        raise invalid(f"{where} is not a PNG, JPEG, WebP or GIF image (its bytes say otherwise).")
    if image.kind != KINDS[declared]:
        raise invalid(f"{where} says {declared} but its bytes are a {image.kind} image.")
    if image.animated:
        raise invalid(f"{where} is an animated {image.kind}: only still images are accepted.")
    side = caps.max_image_side
    if not (0 < image.width <= side and 0 < image.height <= side):
        raise invalid(
            f"{where} is {image.width} x {image.height} pixels: at most {side} x {side} (and at least 1 x 1)."
        )
    return f"data:{declared};base64,{encoded}"


def header_of(url: str) -> Image | None:
    """What the header of a data URL's image says, or None when it is not one (a remote URL, bad bytes)."""
    match = DATA_URL.match(url) if isinstance(url, str) else None
    try:
        return read_header(base64.b64decode(match.group(2), validate=True)) if match else None
    except (binascii.Error, ValueError):
        return None


def read_header(data: bytes) -> Image | None:
    """The kind and pixel size from an image's header (nothing is decoded), or None for other bytes."""
    try:
        if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR":
            width, height = struct.unpack(">II", data[16:24])
            return Image("PNG", width, height)
        if data[:6] in (b"GIF87a", b"GIF89a"):
            width, height = struct.unpack("<HH", data[6:10])
            return Image("GIF", width, height, _gif_frames(data) > 1)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp(data)
        if data[:3] == b"\xff\xd8\xff":
            return _jpeg(data)
    except (struct.error, IndexError):  # a header cut short
        return None
    return None


def _webp(data: bytes) -> Image | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return Image("WebP", width & 0x3FFF, height & 0x3FFF)
    if chunk == b"VP8L" and data[20:21] == b"\x2f":
        bits = int.from_bytes(data[21:25], "little")
        return Image("WebP", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X":
        width, height = int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
        return Image("WebP", width, height, bool(data[20] & 0x02))  # the animation flag
    return None


def _gif_frames(data: bytes) -> int:
    """How many images a GIF holds (at most 2: enough to tell a still one), walking its blocks undecoded."""
    at, frames = 13, 0
    if data[10] & 0x80:  # a global colour table
        at += 3 << ((data[10] & 0x07) + 1)
    while at < len(data) and frames < 2:
        block = data[at]
        if block == 0x3B:  # the trailer
            break
        if block == 0x2C:  # an image: its descriptor, a local colour table, the LZW code size, then data
            frames += 1
            packed = data[at + 9]
            at += 10 + ((3 << ((packed & 0x07) + 1)) if packed & 0x80 else 0) + 1
        elif block == 0x21:  # an extension: its label, then data
            at += 2
        else:
            break
        while at < len(data) and data[at]:  # sub-blocks, each led by its length, up to an empty one
            at += data[at] + 1
        at += 1
    return frames


def _jpeg(data: bytes) -> Image | None:
    """Walk the JPEG's segments to its frame header (SOFn), which holds the size."""
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            at += 2
            continue
        (length,) = struct.unpack(">H", data[at + 2 : at + 4])
        if marker in JPEG_FRAMES:
            height, width = struct.unpack(">HH", data[at + 5 : at + 9])
            return Image("JPEG", width, height)
        if marker == 0xDA or length < 2:  # scan data before any frame header: not a valid JPEG
            return None
        at += 2 + length
    return None


def text_of(content: str | list[dict[str, Any]] | None) -> str:
    """A message content's text: the string, or its text parts joined."""
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part["text"] for part in content if part.get("type") == "text")


def image_parts(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The image parts of checked messages, in order."""
    return [
        part
        for message in messages
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if part.get("type") == "image_url"
    ]


def pictures(messages: Iterable[Mapping[str, Any]]) -> tuple[Picture, ...]:
    """The size and detail of each readable image of `messages` (checked ones all are), for pricing per model."""
    found = []
    for part in image_parts(messages):
        image_url = part["image_url"]
        image = header_of(image_url.get("url"))
        if image is not None:
            found.append(Picture(image.width, image.height, image_url.get("detail") or "auto"))
    return tuple(found)


def tokens(rule: Rule, picture: Picture) -> int:
    """The prompt tokens one image costs on a model counting by `rule`, as OpenAI bills them (rounded up)."""
    if isinstance(rule, Patches):
        return math.ceil(patches(picture.width, picture.height) * rule.multiplier)
    if picture.detail == "low":
        return rule.base
    return rule.base + rule.tile * tiles(picture.width, picture.height)


def tiles(width: int, height: int) -> int:
    """The 512 px tiles of an image at detail high, after scaling it to fit 2048 x 2048 and its shorter side to 768."""
    scale = min(1.0, FIT / max(width, height))
    width, height = width * scale, height * scale
    scale = min(1.0, SHORT_SIDE / min(width, height))
    width, height = width * scale, height * scale
    return math.ceil(width / TILE) * math.ceil(height / TILE)


def patches(width: int, height: int) -> int:
    """The 32 px patches covering an image, at most 1,536: the guide scales a larger image down to fit (1800 x 2400
    to 1,452 patches), but measured bills reach the cap (docs/models.md), so the cap is the worst case counted."""
    return min(MAX_PATCHES, math.ceil(width / PATCH) * math.ceil(height / PATCH))
