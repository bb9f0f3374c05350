"""Response bodies in the live server's format.

The live server sent JSON with sorted keys, pretty-printed. The sandbox indents by two
spaces. A failure body always has `"success": false` and an `error_type`.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

SUCCESS: dict[str, bool] = {"success": True}

_JSON_OPTIONS = orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=_JSON_OPTIONS)


def failure(
    error_type: str, message: str | None = None, errors: dict[str, str] | None = None
) -> dict[str, Any]:
    """Return a failure body. `errors` is the validation map, `message` a plain text."""
    body: dict[str, Any] = {"error_type": error_type, "success": False}
    if message is not None:
        body["message"] = message
    if errors is not None:
        body["errors"] = errors
    return body


def validation_failure(errors: dict[str, str]) -> dict[str, Any]:
    return failure("validation", errors=errors)


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=dumps(body), content_type="application/json", headers=headers
    )


def _pixel_gif() -> bytes:
    """Build a 1x1 transparent GIF89a image (43 bytes)."""
    header = b"GIF89a"
    # Logical screen: width 1, height 1, a global colour table of 2 entries, background 0.
    screen = (1).to_bytes(2, "little") + (1).to_bytes(2, "little") + bytes([0x80, 0, 0])
    colours = bytes([0, 0, 0, 0xFF, 0xFF, 0xFF])
    # Graphic control extension: colour 0 is transparent.
    transparency = bytes([0x21, 0xF9, 4, 0x01, 0, 0, 0, 0])
    # Image descriptor at (0, 0), 1x1, no local colour table.
    descriptor = b"," + bytes([0, 0, 0, 0, 1, 0, 1, 0, 0])
    # LZW minimum code size 2, then one 2-byte sub-block (clear, pixel 0, end) and the block terminator.
    image_data = bytes([2, 2, 0x44, 0x01, 0])
    trailer = b";"
    return header + screen + colours + transparency + descriptor + image_data + trailer


PIXEL_GIF = _pixel_gif()
