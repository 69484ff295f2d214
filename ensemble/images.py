"""One image in: open it as RGB whatever its mode (16-bit, float, alpha, palette, EXIF-rotated),
refuse what cannot be used with an :class:`ImageError` naming why, and cut and resize a face.

A leaf: numpy and Pillow only, so that predicting a photo never imports pandas.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}  # JAFFE, some lab sets: TIFF

# Pillow raises DecompressionBombError past 2x this many pixels and warns past it: we refuse both.
Image.MAX_IMAGE_PIXELS = 64_000_000


class ImageError(Exception):
    """An image that cannot be used; the message names why."""


def open_image(source) -> Image.Image:
    """A PIL image in RGB, EXIF orientation applied. ``source``: path or PIL image."""
    try:
        if isinstance(source, Image.Image):
            im = source
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(source) as f:
                    if getattr(f, "n_frames", 1) > 1:  # an animated GIF/WebP/PNG or a multi-page TIFF
                        name = source if isinstance(source, (str, Path)) else "image"
                        warnings.warn(f"{name}: {f.n_frames} frames; only the first is used", stacklevel=2)
                    f.load()
                    im = f.copy() if f.mode not in ("I;16", "I;16B", "I;16L", "I") else f.convert("I")
        im = ImageOps.exif_transpose(im)
        if im.mode == "F":
            im = _float_to_gray(im)
        if im.mode in ("I", "I;16", "I;16B", "I;16L"):
            arr = np.asarray(im, dtype=np.float64)
            hi = 65535.0 if arr.max(initial=0) > 255 else 255.0
            im = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8), "L")
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (0, 0, 0, 255))
            im = Image.alpha_composite(bg, im)
        im = im.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image too large (decompression bomb guard): {exc}") from None
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except (OSError, ValueError, SyntaxError, TypeError) as exc:
        raise ImageError(f"cannot decode image: {exc}") from None
    if im.width < 2 or im.height < 2:
        raise ImageError(f"image too small ({im.width}x{im.height})")
    return im


def _float_to_gray(im: Image.Image) -> Image.Image:
    """A 32-bit float image scaled to 8 bits: [0, 1] (the usual convention) or [0, 255];
    any other range is refused rather than guessed."""
    arr = np.asarray(im, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ImageError("float image with NaN or infinite values")
    lo, hi = float(arr.min(initial=0)), float(arr.max(initial=0))
    if lo >= 0 and hi <= 1:
        arr = arr * 255.0
    elif not (lo >= 0 and hi <= 255):
        raise ImageError(f"float image with values in [{lo:g}, {hi:g}]: expected [0, 1] or [0, 255]")
    return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L")


def face_array(source, box, size: int) -> np.ndarray:
    """(size, size, 3) uint8: the image (or its face box) resized. Raises ImageError."""
    im = open_image(source)
    if box is not None and all(np.isfinite(box)) and box[2] > 1 and box[3] > 1:
        x, y, w, h = box
        left, top = max(0, int(round(x))), max(0, int(round(y)))
        right, bottom = min(im.width, int(round(x + w))), min(im.height, int(round(y + h)))
        if right - left >= 2 and bottom - top >= 2:
            im = im.crop((left, top, right, bottom))
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def uint8_to_input(batch: np.ndarray, mean, std) -> np.ndarray:
    """(n, H, W, 3) uint8 faces -> (n, 3, H, W) float32 normalised."""
    x = batch.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    return (x - np.array(mean, np.float32)[:, None, None]) / np.array(std, np.float32)[:, None, None]


def as_image_list(images) -> list:
    """One image (a path, a PIL image, an (H, W[, C]) uint8 array) or a sequence of them."""
    if isinstance(images, (str, Path, Image.Image)) or (isinstance(images, np.ndarray) and images.ndim in (2, 3)):
        images = [images]
    out = []
    for im in images:
        if isinstance(im, np.ndarray):
            if im.dtype != np.uint8 or im.ndim not in (2, 3) or (im.ndim == 3 and im.shape[2] not in (1, 3, 4)):
                raise UserError(f"an array image must be uint8 (H, W) or (H, W, 1|3|4), got {im.dtype} {im.shape}")
            im = Image.fromarray(im[..., 0] if im.ndim == 3 and im.shape[2] == 1 else im)
        out.append(im)
    return out
