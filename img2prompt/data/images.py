"""Opening any image file as an upright RGB picture, with errors that name the file."""

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from img2prompt.config import StudyConfig
from img2prompt.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = StudyConfig.max_pixels  # the config declares it
# The limit is the caller's (``max_pixels``), checked from the header before a byte is
# decoded, so a decompression bomb never reaches memory; PIL's own guard would fire first
# with a vaguer message.
Image.MAX_IMAGE_PIXELS = None


def pixel_limit_problem(width, height, max_pixels=DEFAULT_MAX_PIXELS):
    """What is wrong when an image of ``width`` x ``height`` is over the pixel limit, else None."""
    pixels = width * height
    if pixels <= max_pixels:
        return None
    return (f"image of {width}x{height} = {pixels:,} pixels is over the limit of "
            f"{max_pixels:,}. Resize it, or raise the limit with --max-pixels if the "
            "file is trusted.")


def open_image(path, max_pixels=DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``path`` into an RGB image with its EXIF orientation applied.

    Every PIL mode is handled: alpha is composited over white, 16-bit and float greys are
    rescaled (PIL's own ``convert`` would clip them to white), palette and CMYK images are
    converted; an animated GIF/WebP gives its first frame. The pixel count is checked
    against ``max_pixels`` before decoding. Raises DataError naming the
    file when it cannot be read.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            problem = pixel_limit_problem(image.width, image.height, max_pixels)
            if problem:
                raise DataError(f"{path}: {problem}")
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found.") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{path}: not a readable image ({error}). Replace the file with a valid "
                        "PNG/JPEG/WebP image.") from None



def to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return Image.fromarray(_grey_to_uint8(np.asarray(image), mode), mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def _grey_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    peak = float(values.max(initial=0))
    if mode.startswith("I;16") or peak > 255:
        scale = 255.0 / 65535.0  # 16-bit range
    elif mode == "F" and peak <= 1.0:
        scale = 255.0  # float image in [0, 1]
    else:
        scale = 1.0
    return np.clip(values.astype(np.float64) * scale, 0, 255).round().astype(np.uint8)
