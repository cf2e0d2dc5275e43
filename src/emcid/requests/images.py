"""Reference images, checked when their requests load: a missing or unreadable file is named
with its request and line, not met by Stage I (a bare "[Errno 2]") after the model loaded."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import RequestError, quote


def _check_pixels(path: Path) -> None:
    """PIL's header and integrity check (``verify``), without decoding the pixels; an image
    over ``Image.MAX_IMAGE_PIXELS`` (a decompression bomb, or a scan far larger than any
    model draws) is refused rather than decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            image.verify()


def check_image(path: str, source: str) -> None:
    """Refuse a reference image of ``source`` that Stage I could not read."""
    file, what = Path(path), f"reference image {quote(path)} of {quote(source)}"
    if not file.exists():
        raise RequestError(f"{what} does not exist")
    if file.is_dir():
        raise RequestError(f"{what} is a folder, not an image file")
    if not file.is_file():
        raise RequestError(f"{what} is not a regular file")
    if file.stat().st_size == 0:
        raise RequestError(f"{what} is empty (0 bytes)")
    try:
        _check_pixels(file)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RequestError(f"{what} is over PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS"
                           f" = {Image.MAX_IMAGE_PIXELS}): {exc}") from None
    except UnidentifiedImageError:
        raise RequestError(f"{what} is not an image (PIL reads no image format in it)") from None
    except (OSError, SyntaxError, ValueError) as exc:  # what verify() raises for a damaged file
        raise RequestError(f"{what} is a damaged image: {quote(str(exc))}") from None
