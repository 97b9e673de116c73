"""The one image decoder: every image clipguard reads (folders, CSVs, webdataset members, pools)
goes through :func:`decode_image`.

An image reads as a viewer shows it: EXIF orientation applied, 16-bit and float pixels scaled
to 8 bits, palette and grey images in colour, CMYK converted, transparent pixels composited
over white. A file PIL cannot decode (truncated, corrupt, not an image) or one over PIL's
decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, 89.5 Mpx by default) is a
:class:`~clipguard.ClipguardError` that names it. Colour profiles (ICC) are not applied, as
open_clip's and CleanCLIP's loaders do not apply them.
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from clipguard import ClipguardError

FITS = ("crop", "squash")  # how an image becomes size x size (see decode_image)
WHITE = (255, 255, 255, 255)


def checked_fit(fit: str) -> str:
    """``fit`` if it is one of :data:`FITS`; otherwise a ValueError naming it."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    return fit


def resize_crop(im: Image.Image, size: int) -> Image.Image:
    """``im`` resized (shorter side to ``size``, bicubic) and centre-cropped to size x size."""
    scale = size / min(im.size)
    im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))), Image.BICUBIC)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    return im.crop((left, top, left + size, top + size))


def fit_square(im: Image.Image, size: int, fit: str = "crop") -> torch.Tensor:
    """uint8 (3, size, size) of an RGB image: ``fit`` "crop" (:func:`resize_crop`) or "squash" (the
    full frame resized to size x size, bicubic, aspect ratio not kept)."""
    im = resize_crop(im, size) if checked_fit(fit) == "crop" else im.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


def _scaled_to_8_bits(im: Image.Image, name: str) -> Image.Image:
    """An "L" image of a 16-bit ("I;16*"; "I", as older PIL opens 16-bit PNGs) or float ("F") grey
    image: v / 65535 for integers, v for floats in [0, 1], rounded to 8 bits."""
    pixels = np.asarray(im).astype(np.float64)  # (H, W); I;16B arrives big-endian, astype reads it right
    if im.mode == "F":
        if not np.all((pixels >= 0) & (pixels <= 1)):
            raise ClipguardError(f"image {name}: float pixels outside [0, 1] (min {np.nanmin(pixels):g}, max "
                                 f"{np.nanmax(pixels):g}) have no one way to be shown; save it as 8- or 16-bit")
        unit = pixels
    else:
        if pixels.min() < 0 or pixels.max() > 65535:
            raise ClipguardError(f"image {name}: {im.mode!r} pixels outside 0..65535 (min {pixels.min():g}, max "
                                 f"{pixels.max():g}) are not 16-bit grey; save it as an 8- or 16-bit image")
        unit = pixels / 65535
    return Image.fromarray(np.rint(unit * 255).astype(np.uint8))


def to_rgb(im: Image.Image, name: str) -> Image.Image:
    """An "RGB" image as a viewer shows ``im`` (modes in the module docstring); transparency over white."""
    if im.mode.startswith("I") or im.mode == "F":
        im = _scaled_to_8_bits(im, name)
    if im.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")  # a palette's or a colour key's transparency becomes alpha
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")
    if im.mode == "LAB":  # convert("RGB") would copy the channels as they are
        from PIL import ImageCms

        lab_to_srgb = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"),
                                              "LAB", "RGB")
        return ImageCms.applyTransform(im, lab_to_srgb)
    try:
        return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, HSV
    except ValueError as err:
        raise ClipguardError(f"image {name}: PIL cannot convert its {im.mode!r} pixels to RGB ({err}); save it as "
                             "an RGB image") from None


def jpeg_damage(data: bytes) -> str | None:
    """libjpeg's complaint about JPEG ``data`` whose scans are damaged, or None.

    PIL decodes a JPEG whose scan bytes were garbled into a plausible image: libjpeg only warns,
    and PIL drops its warnings. libjpeg-turbo through simplejpeg (strict) turns them into errors;
    the check decodes at 1/8 scale, which still reads every scan byte. Only damage is reported
    ("Corrupt JPEG data", "Premature end of JPEG file"); other warnings and formats libjpeg-turbo
    does not decode are left to PIL. JPEG has no checksum: damage that decodes cleanly passes.
    """
    import simplejpeg

    try:
        colorspace = simplejpeg.decode_jpeg_header(data)[2]
        simplejpeg.decode_jpeg(data, colorspace={"Gray": "GRAY", "CMYK": "CMYK"}.get(colorspace, "RGB"),
                               min_factor=8, strict=True)
    except ValueError as err:
        message = str(err)
        return message if "Corrupt JPEG data" in message or "Premature end of JPEG" in message else None
    return None


def _opened(source: Path | bytes, name: str, fix: str) -> Image.Image:
    """The decoded image (orientation applied) of a path or bytes, or a ClipguardError naming ``name``."""
    try:
        with warnings.catch_warnings():
            # PIL warns at MAX_IMAGE_PIXELS and raises at twice that; both are refused below, by name
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except FileNotFoundError:
        raise ClipguardError(f"image not found: {name}") from None
    except Image.DecompressionBombError as err:
        pixels = re.search(r"\((\d+) pixels\)", str(err))
        count = f"{int(pixels[1]):,} pixels" if pixels else f"over {2 * Image.MAX_IMAGE_PIXELS:,} pixels"
        raise ClipguardError(f"image {name} is {count}, over PIL's decompression-bomb limit "
                             f"({Image.MAX_IMAGE_PIXELS:,} pixels); downscale it or {fix}") from None
    except UnidentifiedImageError:
        raise ClipguardError(f"cannot read image {name} (not an image format PIL knows); {fix}") from None
    except Exception as err:  # a folder, no permission; PIL raises many types on bytes it cannot parse
        raise ClipguardError(f"cannot read image {name} ({type(err).__name__}: {err}); {fix}") from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and im.width * im.height > limit:
        im.close()
        raise ClipguardError(f"image {name} is {im.width}x{im.height} = {im.width * im.height:,} pixels, over PIL's "
                             f"decompression-bomb limit ({limit:,} pixels); downscale it or {fix}")
    try:
        with im:
            im.load()  # decode now: a truncated or corrupt file fails here, not half-grey later
            if im.format == "JPEG":
                problem = jpeg_damage(source if isinstance(source, bytes) else Path(source).read_bytes())
                if problem:
                    raise ClipguardError(f"image {name} is a damaged JPEG ({problem}); {fix}")
            return ImageOps.exif_transpose(im)  # a new image, independent of the file
    except ClipguardError:
        raise
    except Exception as err:
        raise ClipguardError(f"cannot read image {name} ({type(err).__name__}: {err}); {fix}") from None


def decode_image(source: Path | str | bytes, size: int, fit: str = "crop", name: str | None = None,
                 fix: str = "remove or replace the file") -> torch.Tensor:
    """uint8 (3, size, size) of an image file or its bytes, read as a viewer shows it.

    source: a path, or the bytes of an encoded image (a webdataset member).
    fit: "crop" resizes the shorter side to ``size`` and crops the centre (CLIP's preprocessing);
        "squash" resizes the whole frame to size x size, ignoring the aspect ratio (the public
        CleanCLIP code's triggered test images). Both bicubic.
    name: what error messages call the image (default: the path); fix: what they tell the user to do.

    Example: ``decode_image(Path("cat.png"), 224)`` -> uint8 tensor (3, 224, 224).
    """
    checked_fit(fit)
    if not isinstance(source, bytes):
        source = Path(source)
    name = str(source) if name is None else name
    im = to_rgb(_opened(source, name, fix), name)
    return fit_square(im, size, fit)


__all__ = ["FITS", "checked_fit", "decode_image", "fit_square", "resize_crop", "to_rgb"]
