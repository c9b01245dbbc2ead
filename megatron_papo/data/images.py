"""Decode any dataset image form to an RGB PIL image, and PAPO's min/max-pixel resize.

Accepted forms: ``PIL.Image.Image`` (any mode), ``{"bytes": b, "path": p}`` dicts (HF ``Image``
feature with ``decode=False``; bytes win over path), file paths (``str``/``PathLike``, relative ones
resolved against ``base_dir``), raw ``bytes``, and ``HxW``/``HxWxC`` uint8 numpy arrays.

Mode handling (documented choices):

- ``RGBA``/``LA``/``PA``/``P`` with transparency: alpha is **dropped** by default, like PAPO's
  ``image.convert("RGB")`` (the colour under transparent pixels is kept as stored);
  ``alpha="white"`` composites on white instead.
- ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``1``, ``L``: PIL's own conversion to RGB.
- 16/32-bit integer and float greyscale (``I;16*``, ``I``, ``F``): rescaled to 0..255 (65535 -> 255 for
  16-bit; ``I``/``F`` values above 255 are divided by 257 if they fit in 16 bits, else by their max),
  because PIL's ``convert`` would clip them to 255.
- EXIF orientation is not applied (PAPO does not either).
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
from PIL import Image

ImageLike = Union[Image.Image, dict, str, os.PathLike, bytes, bytearray, np.ndarray]


class ImageDecodeError(ValueError):
    """An image could not be decoded; the message names the row/image and the cause."""


def _open_bytes(data: bytes, where: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        raise ImageDecodeError(f"{where}: cannot decode image bytes ({len(data)} bytes): {type(e).__name__}: {e}") from None
    return img


def _open_path(path: Union[str, os.PathLike], where: str, base_dir: Optional[Path]) -> Image.Image:
    p = Path(path)
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    if not p.is_file():
        raise ImageDecodeError(f"{where}: image file '{p}' does not exist")
    try:
        img = Image.open(p)
        img.load()
    except Exception as e:
        raise ImageDecodeError(f"{where}: cannot decode image file '{p}': {type(e).__name__}: {e}") from None
    return img


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """``I;16*``/``I``/``F`` greyscale -> 8-bit ``L`` by value rescaling (see module docstring)."""
    arr = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16"):
        arr = arr / 257.0
    else:
        hi = float(arr.max()) if arr.size else 0.0
        if hi > 255.0:
            arr = arr / (257.0 if hi <= 65535.0 else hi / 255.0)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def to_rgb(img: Image.Image, alpha: Literal["drop", "white"] = "drop") -> Image.Image:
    """Convert a PIL image of any mode to ``RGB`` (alpha dropped like PAPO, or composited on white)."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        return _high_bit_depth_to_l(img).convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        if alpha == "white":
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(bg, rgba).convert("RGB")
        return rgba.convert("RGB")
    return img.convert("RGB")


def decode_image(obj: Any, where: str = "image", base_dir: Optional[Union[str, os.PathLike]] = None,
                 alpha: Literal["drop", "white"] = "drop") -> Image.Image:
    """Decode one image in any accepted form to a fully loaded RGB PIL image.

    ``where`` names the image in error messages (e.g. ``"row 17 image 0"``).
    """
    base = Path(base_dir) if base_dir is not None else None
    if isinstance(obj, Image.Image):
        try:
            obj.load()
        except Exception as e:
            raise ImageDecodeError(f"{where}: cannot decode PIL image: {type(e).__name__}: {e}") from None
        img = obj
    elif isinstance(obj, dict):
        data, path = obj.get("bytes"), obj.get("path")
        if data:
            img = _open_bytes(bytes(data), where)
        elif path:
            img = _open_path(path, where, base)
        else:
            raise ImageDecodeError(f"{where}: image dict has neither 'bytes' nor 'path' (keys: {sorted(obj)})")
    elif isinstance(obj, (bytes, bytearray)):
        img = _open_bytes(bytes(obj), where)
    elif isinstance(obj, (str, os.PathLike)):
        img = _open_path(obj, where, base)
    elif isinstance(obj, np.ndarray):
        if obj.dtype != np.uint8 or obj.ndim not in (2, 3) or (obj.ndim == 3 and obj.shape[2] not in (1, 3, 4)):
            raise ImageDecodeError(f"{where}: numpy image must be uint8 HxW or HxWx{{1,3,4}}, got {obj.dtype} {obj.shape}")
        img = Image.fromarray(obj[..., 0] if obj.ndim == 3 and obj.shape[2] == 1 else obj)
    elif obj is None:
        raise ImageDecodeError(f"{where}: image is None")
    else:
        raise ImageDecodeError(f"{where}: unsupported image type {type(obj).__name__}; "
                               "expected PIL image, {bytes,path} dict, path, bytes or uint8 array")
    try:
        return to_rgb(img, alpha=alpha)
    except Exception as e:
        raise ImageDecodeError(f"{where}: cannot convert mode {img.mode} to RGB: {type(e).__name__}: {e}") from None


def resized_size(width: int, height: int, min_pixels: Optional[int], max_pixels: Optional[int]) -> tuple[int, int]:
    """``(W, H)`` that :func:`resize_by_pixels` produces for a ``width`` x ``height`` image (no pixels touched)."""
    w, h = width, height
    if max_pixels is not None and w * h > max_pixels:
        f = math.sqrt(max_pixels / (w * h))
        w, h = max(1, int(w * f)), max(1, int(h * f))
    if min_pixels is not None and w * h < min_pixels:
        f = math.sqrt(min_pixels / (w * h))
        w, h = max(1, int(w * f)), max(1, int(h * f))
    return w, h


def resize_by_pixels(img: Image.Image, min_pixels: Optional[int], max_pixels: Optional[int]) -> Image.Image:
    """PAPO/EasyR1 ``process_image`` sizing: shrink if W*H > max, grow if W*H < min, keep aspect.

    Factor ``sqrt(limit / (W*H))``, new size ``int(W*f), int(H*f)`` (truncation, as PAPO), PIL's default
    resample. The max check runs first, then the min check on the result. ``None`` disables a bound.
    Sides are floored at 1 px (only matters for degenerate aspect ratios, which the processor rejects anyway).
    """
    if max_pixels is not None and img.width * img.height > max_pixels:
        img = img.resize(resized_size(img.width, img.height, None, max_pixels))
    if min_pixels is not None and img.width * img.height < min_pixels:
        img = img.resize(resized_size(img.width, img.height, min_pixels, None))
    return img
