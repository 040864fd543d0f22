"""Image reading shared by validation, training and serving: header probe, full decode, normalisation.

Every image the product accepts (RGB, RGBA, palette, CMYK, 16-bit, greyscale) is normalised to
8-bit RGB the same way everywhere, so a model sees in serving exactly what it saw in training.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile

# Truncated files must fail loudly, never decode to a half-grey picture.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# The only decoders PIL may try (validate.allowed_formats is checked against these too). Without a list, PIL tries
# every plugin it has: an EPS file named .png would reach Ghostscript where it is installed.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "TIFF", "GIF")


def _reason(exc: Exception) -> str:
    """A decode error's reason without the file's name: names come from uploaders and end up on pages."""
    if isinstance(exc, Image.UnidentifiedImageError):
        return f"not an image in an accepted format ({', '.join(IMAGE_FORMATS)})"
    text = str(exc)
    for quote in ("'", '"'):  # PIL quotes the path it was given in some messages
        start = text.find(quote + "/")
        if start >= 0:
            end = text.find(quote, start + 1)
            text = text[:start] + "[file]" + text[end + 1 :] if end > start else text[:start] + "[file]"
    # Some messages quote bytes of the file itself (chunk names, modes): nothing that opens a tag or an entity
    # reaches GX Data Docs, which print these reasons unescaped; and no unbounded text.
    text = "".join("?" if c in "<>&" or not c.isprintable() else c for c in text)[:200]
    return f"{type(exc).__name__}: {text}"


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    mode: str
    format: str


def read_header(data: bytes | str) -> ImageInfo:
    """Read size, mode and format without decoding pixels (raises ValueError, without the file's name, on
    anything that is not an image in :data:`IMAGE_FORMATS`)."""
    src = io.BytesIO(data) if isinstance(data, bytes) else data
    with warnings.catch_warnings():  # a huge header is judged by validation's pixel limit, not by a warning
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(src, formats=IMAGE_FORMATS) as im:
                animated = getattr(im, "is_animated", False)
                info = ImageInfo(im.width, im.height, im.mode, im.format or "")
        except Exception as exc:  # noqa: BLE001 - PIL raises many types
            raise ValueError(_reason(exc)) from None
    if animated:  # an animation or a multi-page TIFF: which frame carries the label is anybody's guess
        raise ValueError(f"{info.format} with several frames (animated or multi-page): one picture per file")
    return info


def to_rgb(im: Image.Image) -> Image.Image:
    """Normalise any supported mode to 8-bit RGB (alpha composited on white, 16-bit scaled down)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float32)
        hi = float(arr.max()) or 1.0
        scale = 255.0 / (65535.0 if hi > 255 and im.mode.startswith("I;16") else max(hi, 255.0))
        return Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def decode_rgb(data: bytes | str, max_pixels: int | None = None) -> Image.Image:
    """Fully decode an image (bytes or path) to RGB; raises ValueError with a reason on any problem."""
    src = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        with warnings.catch_warnings():
            if max_pixels is not None:
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            with Image.open(src, formats=IMAGE_FORMATS) as im:
                if max_pixels is not None and im.width * im.height > max_pixels:
                    raise ValueError(
                        f"decompression bomb guard: {im.width}x{im.height} = "
                        f"{im.width * im.height} pixels > {max_pixels}"
                    )
                im.load()
                return to_rgb(im)
    except ValueError:
        raise
    except Image.DecompressionBombError as exc:
        raise ValueError(f"decompression bomb: {exc}") from None
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, struct.error, ...)
        raise ValueError(f"cannot decode image: {_reason(exc)}") from None


def check_decode(path: str, max_pixels: int) -> str:
    """Fully decode the file at ``path`` (raising ValueError with a reason) and return its dHash.

    Skips the RGB conversion that :func:`decode_rgb` does: validation only needs to know that every pixel
    decodes, and the hash works on grey levels anyway.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own pixel limit decides
            with Image.open(path, formats=IMAGE_FORMATS) as im:
                if im.width * im.height > max_pixels:
                    raise ValueError(
                        f"decompression bomb guard: {im.width}x{im.height} = "
                        f"{im.width * im.height} pixels > {max_pixels}"
                    )
                im.load()
                grey = im.convert("L") if im.mode in ("L", "RGB", "RGBA", "P", "CMYK", "LA", "PA") else to_rgb(im)
                return dhash(grey)
    except ValueError:
        raise
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, struct.error, ...)
        raise ValueError(f"cannot decode image: {_reason(exc)}") from None


def dhash(im: Image.Image, size: int = 8) -> str:
    """Difference hash (64 bits as 16 hex chars): equal for near-identical pictures."""
    small = np.asarray(im.convert("L").resize((size + 1, size), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):0{size * size // 4}x}"


def resize_uint8(im: Image.Image, size: int) -> np.ndarray:
    """Square-resize to ``size`` and return an HWC uint8 array (the decoded-image cache format)."""
    return np.asarray(im.resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)
