"""Decode and encode user images (method.md §9): 8/16-bit, gray, alpha, EXIF orientation, ICC.

Decoding: Pillow reads the header (decompression-bomb guard before any pixel is decoded), the EXIF
orientation, ICC profile and EXIF block, and fully decodes the file (which detects truncation).
Pillow reduces 16-bit RGB(A) PNGs to 8 bit, so those are decoded again with OpenCV
`IMREAD_UNCHANGED` (uint16, BGR(A) order -> RGB(A)). The EXIF orientation is applied to the pixels
(OpenCV ignores it), so a model always sees the image upright, and the output is written with
orientation 1.

The model-facing array is always float32 RGB HxWx3 in [0, 1] (gray replicated); alpha is split off
as its own HxW float32 plane so that it can be upscaled separately and recombined on encode.
"""

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from core.errors import ImageError, ImageTooLarge

ColourMode = Literal["gray", "gray_alpha", "rgb", "rgba"]
OutputFormat = Literal["png", "jpg", "webp"]

DEFAULT_MAX_PIXELS = 64_000_000  # e.g. 8000 x 8000; the API may pass a smaller limit
EXIF_ORIENTATION_TAG = 0x0112
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class DecodedImage:
    """An image ready for a model: upright float RGB plus what is needed to write it back faithfully."""

    rgb: np.ndarray  # float32 HxWx3 in [0, 1]; gray sources replicated to 3 channels
    alpha: np.ndarray | None  # float32 HxW in [0, 1], or None
    bit_depth: Literal[8, 16]
    mode: ColourMode  # the source's channels, which encode_image restores
    format: str  # Pillow's format name: "PNG", "JPEG", "WEBP", "BMP", ...
    icc_profile: bytes | None
    exif: bytes | None  # raw EXIF block as read (orientation not yet reset)
    orientation: int  # EXIF orientation that was applied to the pixels (1 = none)

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])


# ---------------------------------------------------------------------------------------------- decode


def _read_bytes(source: str | Path | bytes | bytearray | memoryview) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "uploaded image"
    path = Path(source)
    if not path.is_file():
        raise ImageError(f"image file not found: {path}")
    try:
        return path.read_bytes(), str(path)
    except OSError as err:
        raise ImageError(f"cannot read image file {path}: {err.strerror or err}") from err


def _png_bit_depth_and_colour_type(data: bytes) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR, or None for a non-PNG."""
    if len(data) < 26 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    return data[24], data[25]


def is_16bit(data: bytes) -> bool:
    """Whether an encoded image holds 16-bit samples, read from its header (nothing is decoded)."""
    png = _png_bit_depth_and_colour_type(data)
    if png is not None:
        return png[0] == 16
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.mode in ("I;16", "I;16B", "I;16L", "I")
    except Exception:
        return False  # not an image Pillow knows: the decoder gives the precise error


def apply_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
    """Make an HxW[xC] array upright for EXIF orientation 1-8 (same result as PIL.ImageOps.exif_transpose)."""
    if orientation == 2:
        return array[:, ::-1]
    if orientation == 3:
        return array[::-1, ::-1]
    if orientation == 4:
        return array[::-1]
    if orientation == 5:
        return np.swapaxes(array, 0, 1)
    if orientation == 6:
        return np.rot90(array, k=-1)
    if orientation == 7:
        return np.swapaxes(array[::-1, ::-1], 0, 1)
    if orientation == 8:
        return np.rot90(array, k=1)
    return array


def _pillow_pixels(image: Image.Image) -> tuple[np.ndarray, ColourMode]:
    """Pixels as uint8/uint16 HxW (gray) or HxWxC (C = 2 gray+alpha, 3 RGB, 4 RGBA)."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(image, dtype=np.uint16), "gray"
    if mode == "I":  # Pillow's 32-bit int, which is how it opens 16-bit gray PNGs
        array = np.asarray(image)
        if array.min() < 0 or array.max() > 65535:
            raise ImageError("unsupported image: 32-bit integer pixels")
        return array.astype(np.uint16), "gray"
    if mode == "F":
        raise ImageError("unsupported image: floating-point pixels")
    if mode == "P":
        has_alpha = "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
    elif mode in ("1", "L"):
        image = image.convert("L")
    elif mode in ("LA", "La", "PA"):
        image = image.convert("LA" if mode != "PA" else "RGBA")
    elif mode in ("RGBA", "RGBa"):
        image = image.convert("RGBA")
    elif mode != "RGB":
        image = image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, ...
    colour: ColourMode = {"L": "gray", "LA": "gray_alpha", "RGB": "rgb", "RGBA": "rgba"}[image.mode]
    return np.asarray(image, dtype=np.uint8), colour


def _opencv_pixels_16bit(data: bytes, colour_type: int) -> tuple[np.ndarray, ColourMode]:
    array = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None or array.dtype != np.uint16:
        raise ImageError("cannot decode 16-bit PNG (corrupt or truncated file)")
    if array.ndim == 2:
        return array, "gray"
    if array.shape[2] == 3:
        return cv2.cvtColor(array, cv2.COLOR_BGR2RGB), "rgb"
    rgba = cv2.cvtColor(array, cv2.COLOR_BGRA2RGBA)
    if colour_type == 4:  # PNG gray+alpha; OpenCV expands it to BGRA
        return np.ascontiguousarray(rgba[..., [0, 3]]), "gray_alpha"
    return rgba, "rgba"


@dataclass(frozen=True)
class DecodedPixels:
    """Upright integer pixels as stored (before normalisation) and the file's metadata."""

    array: np.ndarray  # uint8 or uint16; HxW gray, or HxWxC with C = 2 gray+alpha, 3 RGB, 4 RGBA
    bit_depth: Literal[8, 16]
    mode: ColourMode
    format: str
    icc_profile: bytes | None
    exif: bytes | None
    orientation: int


def decode_pixels(source: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedPixels:
    """Decode a path or bytes to upright integer pixels; ImageError for anything unreadable or too large."""
    data, label = _read_bytes(source)
    if not data:
        raise ImageError(f"{label} is empty")
    too_large = f"over the {max_pixels:,}-pixel limit"
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"{label} is {too_large}") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ImageError(f"{label} is not a readable image (png, jpg, webp, bmp, tiff)") from err

    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(f"{label} is {width}x{height} = {width * height:,} pixels, {too_large}")
    image_format = image.format or "unknown"
    try:
        image.load()  # decodes everything; raises on truncated or corrupt data
        exif = image.getexif()  # after load: a PNG's eXIf chunk may follow the pixel data
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"{label} is {too_large}") from None
    except (OSError, ValueError, SyntaxError, struct.error) as err:
        raise ImageError(f"{label} is truncated or corrupt: {err}") from err
    icc_profile = image.info.get("icc_profile") or None
    orientation = int(exif.get(EXIF_ORIENTATION_TAG, 1) or 1)
    if orientation not in range(1, 9):
        orientation = 1
    raw_exif = image.info.get("exif") or (exif.tobytes() if len(exif) else None)

    png_header = _png_bit_depth_and_colour_type(data)
    if png_header is not None and png_header[0] == 16:
        array, mode = _opencv_pixels_16bit(data, png_header[1])
        bit_depth: Literal[8, 16] = 16
    else:
        array, mode = _pillow_pixels(image)
        bit_depth = 16 if array.dtype == np.uint16 else 8
    array = np.ascontiguousarray(apply_orientation(array, orientation))
    return DecodedPixels(array, bit_depth, mode, image_format, icc_profile, raw_exif, orientation)


def read_image(source: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode a file path or bytes into an upright float RGB image plus alpha and metadata.

    Raises ImageError for a missing, empty, non-image, truncated or oversized file.
    """
    decoded = decode_pixels(source, max_pixels)
    mode = decoded.mode
    full_scale = 65535.0 if decoded.bit_depth == 16 else 255.0
    pixels = decoded.array.astype(np.float32) / np.float32(full_scale)
    if mode == "gray":
        rgb, alpha = np.repeat(pixels[..., None], 3, axis=2), None
    elif mode == "gray_alpha":
        rgb, alpha = np.repeat(pixels[..., :1], 3, axis=2), pixels[..., 1]
    elif mode == "rgb":
        rgb, alpha = pixels, None
    else:
        rgb, alpha = pixels[..., :3], pixels[..., 3]
    return DecodedImage(
        rgb=np.ascontiguousarray(rgb),
        alpha=None if alpha is None else np.ascontiguousarray(alpha),
        bit_depth=decoded.bit_depth,
        mode=mode,
        format=decoded.format,
        icc_profile=decoded.icc_profile,
        exif=decoded.exif,
        orientation=decoded.orientation,
    )


def to_rgb_uint8(array: np.ndarray, bit_depth: int) -> np.ndarray:
    """decode_pixels output -> HxWx3 uint8: gray replicated, alpha dropped (not composited), 16 -> 8 bit."""
    if bit_depth == 16:
        array = np.round(array.astype(np.float64) / 257.0).astype(np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[2] in (1, 2):  # gray, gray+alpha
        array = np.repeat(array[..., :1], 3, axis=2)
    return np.ascontiguousarray(array[..., :3])


def load_rgb_uint8(source: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An image as upright HxWx3 uint8 RGB for evaluation and training (gray -> 3 channels, alpha dropped)."""
    decoded = decode_pixels(source, max_pixels)
    return to_rgb_uint8(decoded.array, decoded.bit_depth)


# ---------------------------------------------------------------------------------------------- encode


def normalise_format(requested: str, input_format: str | None = None) -> OutputFormat:
    """'auto' keeps the input's format when it is png/jpg/webp, else png; aliases jpeg/JPEG -> jpg."""
    name = requested.lower()
    if name == "auto":
        name = (input_format or "png").lower()
        name = name if name in ("png", "jpeg", "jpg", "webp") else "png"
    name = "jpg" if name == "jpeg" else name
    if name not in ("png", "jpg", "webp"):
        raise ImageError(f"unsupported output format {requested!r}; use auto, png, jpg or webp")
    return name  # type: ignore[return-value]


def exif_with_upright_orientation(exif: bytes | None) -> bytes | None:
    """The EXIF block with orientation set to 1 (the pixels were already rotated), or None."""
    if not exif:
        return None
    parsed = Image.Exif()
    try:
        parsed.load(exif)
    except Exception:  # Pillow raises many types on malformed EXIF; drop it rather than fail the request
        return None
    if EXIF_ORIENTATION_TAG in parsed:
        parsed[EXIF_ORIENTATION_TAG] = 1
    return parsed.tobytes()


def _to_integer(x: np.ndarray, bit_depth: int) -> np.ndarray:
    full_scale = 65535.0 if bit_depth == 16 else 255.0
    dtype = np.uint16 if bit_depth == 16 else np.uint8
    return np.round(np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0) * full_scale).astype(dtype)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _add_png_metadata(png: bytes, icc_profile: bytes | None, exif: bytes | None) -> bytes:
    """Insert iCCP and eXIf chunks right after IHDR (OpenCV writes neither)."""
    chunks = b""
    if icc_profile:
        chunks += _png_chunk(b"iCCP", b"icc\x00\x00" + zlib.compress(icc_profile))
    if exif:
        tiff = exif[6:] if exif.startswith(b"Exif\x00\x00") else exif  # eXIf holds the bare TIFF block
        chunks += _png_chunk(b"eXIf", tiff)
    ihdr_end = len(PNG_SIGNATURE) + 8 + 13 + 4  # length, type, 13-byte payload, CRC
    return png[:ihdr_end] + chunks + png[ihdr_end:]


def encode_image(
    rgb: np.ndarray,
    output_format: str = "png",
    *,
    alpha: np.ndarray | None = None,
    mode: ColourMode = "rgb",
    bit_depth: int = 8,
    icc_profile: bytes | None = None,
    exif: bytes | None = None,
    quality: int = 95,
) -> bytes:
    """Encode float RGB HxWx3 in [0, 1] (plus optional alpha HxW) as png, jpg or webp bytes.

    - `mode` gray/gray_alpha writes one channel, the mean of the three outputs.
    - `bit_depth` 16 is kept for PNG (jpg/webp are 8-bit); values are clamped and rounded.
    - alpha is written for png/webp; jpg has none, so the image is composited over white.
    - ICC is kept; EXIF is kept with the orientation reset to 1 (pixels are already upright).
    """
    fmt = normalise_format(output_format)
    rgb = np.asarray(rgb, dtype=np.float64)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"encode_image expects HxWx3 RGB, got shape {rgb.shape}")
    if alpha is not None and alpha.shape != rgb.shape[:2]:
        raise ValueError(f"alpha {alpha.shape} does not match image {rgb.shape[:2]}")
    wants_alpha = mode in ("gray_alpha", "rgba") and alpha is not None
    if fmt == "jpg" and wants_alpha:
        a = np.clip(np.asarray(alpha, dtype=np.float64), 0.0, 1.0)[..., None]
        rgb, wants_alpha = rgb * a + (1.0 - a), False
    gray = mode in ("gray", "gray_alpha")
    depth = 16 if (bit_depth == 16 and fmt == "png") else 8
    exif_out = exif_with_upright_orientation(exif)

    colour = rgb.mean(axis=2, keepdims=True) if gray else rgb
    planes = (
        np.concatenate([colour, np.asarray(alpha, dtype=np.float64)[..., None]], 2) if wants_alpha else colour
    )
    pixels = _to_integer(planes, depth)

    if depth == 16:
        if pixels.shape[2] == 1:
            bgr = pixels[..., 0]
        elif pixels.shape[2] == 2:  # OpenCV cannot write gray+alpha; write RGBA
            bgr = cv2.cvtColor(np.repeat(pixels[..., :1], 3, 2), cv2.COLOR_RGB2BGR)
            bgr = np.concatenate([bgr, pixels[..., 1:]], axis=2)
        elif pixels.shape[2] == 3:
            bgr = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
        else:
            bgr = cv2.cvtColor(pixels, cv2.COLOR_RGBA2BGRA)
        ok, encoded = cv2.imencode(".png", np.ascontiguousarray(bgr))
        if not ok:
            raise ImageError("OpenCV could not encode the 16-bit PNG")
        return _add_png_metadata(encoded.tobytes(), icc_profile, exif_out)

    pil_mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[pixels.shape[2]]
    image = Image.fromarray(pixels[..., 0] if pil_mode == "L" else pixels)  # mode follows the shape
    options: dict[str, object] = {}
    if icc_profile:
        options["icc_profile"] = icc_profile
    if exif_out:
        options["exif"] = exif_out
    if fmt == "jpg":
        options.update(quality=quality, subsampling=0 if quality >= 90 else 2)  # alpha composited above
    elif fmt == "webp":
        options.update(quality=quality)
        if pil_mode in ("L", "LA"):  # WebP stores colour only
            image = image.convert("RGBA" if pil_mode == "LA" else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format={"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[fmt], **options)
    return buffer.getvalue()
