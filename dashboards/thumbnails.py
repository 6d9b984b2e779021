"""Series thumbnails: the middle image of a series, windowed from its own data, as a small PNG.

Pure code (pydicom, numpy, Pillow). The bytes come from the center's object
store through `ObjectStore.read_verified` (never unverified bytes), so a PNG is
a function of the object's SHA-256 and is cached under that name: it never
goes stale. What cannot be decoded (a compressed transfer syntax without a
decoder, no pixel data) becomes a labelled placeholder, never a broken image.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image, ImageDraw
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut

from renkei.catalog.records import InstanceRow
from renkei.errors import RenkeiError

log = logging.getLogger(__name__)

THUMBNAIL_SIZE = 128  # pixels, the longer side
PLACEHOLDER = "placeholder"
RENDERED = "rendered"


class ThumbnailError(RenkeiError):
    """The image could not be decoded into a thumbnail (the reason says why)."""


@dataclass(frozen=True)
class Thumbnail:
    """A PNG and whether it shows the image ('rendered') or a labelled 'placeholder' (and why)."""

    png: bytes
    kind: str
    reason: str = ""


def middle_instance(instances: Sequence[InstanceRow]) -> InstanceRow:
    """The instance in the middle of a series, ordered by Instance Number (then SOP Instance UID)."""
    if not instances:
        raise ThumbnailError("the series has no instances")
    ordered = sorted(
        instances,
        key=lambda i: (i.get("instance_number") is None, i.get("instance_number") or 0, i["sop_instance_uid"]),
    )
    return ordered[len(ordered) // 2]


def _dataset(data: bytes, transfer_syntax_uid: str | None):
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, ValueError, EOFError, OSError) as exc:
        raise ThumbnailError(f"not a readable DICOM object: {exc}") from None
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        if not transfer_syntax_uid:
            raise ThumbnailError("the object has no transfer syntax")
        if meta is None:
            ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(transfer_syntax_uid)
    return ds


def _first_number(value: Any) -> float | None:
    if isinstance(value, (MultiValue, list, tuple)):
        value = value[0] if len(value) else None
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None


def window_of(ds: Any, values: np.ndarray) -> tuple[float, float]:
    """(low, high) of the display window: Window Center/Width when present, else the 1st-99th percentiles."""
    center = _first_number(ds.get("WindowCenter"))
    width = _first_number(ds.get("WindowWidth"))
    if center is not None and width is not None and width > 0:
        return center - width / 2.0, center + width / 2.0
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(finite, [1.0, 99.0])
    if high <= low:
        low, high = float(finite.min()), float(finite.max())
    if high <= low:
        high = low + 1.0
    return float(low), float(high)


def to_png(image: Any, size: int = THUMBNAIL_SIZE) -> bytes:
    """A Pillow image scaled to fit `size` (aspect kept), as PNG bytes."""
    image = image.copy()
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def render(data: bytes, transfer_syntax_uid: str | None = None, size: int = THUMBNAIL_SIZE) -> bytes:
    """The image in `data` (a DICOM object) as a windowed PNG thumbnail; ThumbnailError when impossible."""
    ds = _dataset(data, transfer_syntax_uid)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ThumbnailError("the object holds no image (no Pixel Data)")
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many kinds for missing decoders and bad data
        ts = ds.file_meta.get("TransferSyntaxUID", "")
        name = getattr(ts, "name", str(ts))
        raise ThumbnailError(f"cannot decode {name}: {str(exc).splitlines()[0][:160]}") from None
    try:
        return _to_thumbnail(ds, pixels, size)
    except ThumbnailError:
        raise
    except Exception as exc:  # odd attribute values: a placeholder, never a failed page
        raise ThumbnailError(f"cannot display the image: {str(exc).splitlines()[0][:160]}") from None


def _to_thumbnail(ds: Any, pixels: np.ndarray, size: int) -> bytes:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        pixels = pixels[frames // 2]
    if samples == 3:  # pydicom already converted YBR to RGB
        high = float(2 ** int(ds.get("BitsStored", 8) or 8) - 1)
        scaled = np.clip(pixels.astype(np.float64) / high * 255.0, 0, 255).astype(np.uint8)
        return to_png(Image.fromarray(scaled, "RGB"), size)
    if pixels.ndim != 2:
        raise ThumbnailError(f"unexpected pixel array shape {pixels.shape}")
    values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
    low, high = window_of(ds, values)
    unit = np.clip((values - low) / (high - low), 0.0, 1.0)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        unit = 1.0 - unit
    return to_png(Image.fromarray((unit * 255.0 + 0.5).astype(np.uint8), "L"), size)


def placeholder(reason: str, size: int = THUMBNAIL_SIZE) -> bytes:
    """A grey tile saying 'no preview' (and a short reason), as PNG bytes."""
    image = Image.new("RGB", (size, size), (72, 76, 84))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, size - 1, size - 1), outline=(140, 144, 152))
    lines = ["no preview"] + _wrap(reason, 20)[:4]
    y = 10
    for i, line in enumerate(lines):
        draw.text((8, y), line, fill=(235, 235, 235) if i == 0 else (200, 200, 200))
        y += 16 if i == 0 else 12
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _wrap(text: str, width: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        if len(line) + len(word) + 1 > width and line:
            lines.append(line)
            line = word[:width]
        else:
            line = f"{line} {word}".strip()[: width * 2]
    if line:
        lines.append(line)
    return lines


class ThumbnailCache:
    """PNG thumbnails on disk, named by the SHA-256 of the object they show (never stale).

    Placeholders are kept in memory only, so a decoder installed later is used
    on the next start.
    """

    def __init__(self, folder: Path, size: int = THUMBNAIL_SIZE) -> None:
        self.folder = Path(folder)
        self.size = size
        self._placeholders: dict[str, Thumbnail] = {}

    def _path(self, sha256: str) -> Path:
        return self.folder / sha256[:2] / f"{sha256}.{self.size}.png"

    def get(self, sha256: str, load: Callable[[], bytes], transfer_syntax_uid: str | None = None) -> Thumbnail:
        """The cached thumbnail of the object, or render it from `load()` (its verified bytes) and keep it."""
        path = self._path(sha256)
        if path.exists():
            return Thumbnail(path.read_bytes(), RENDERED)
        if sha256 in self._placeholders:
            return self._placeholders[sha256]
        try:
            thumb = Thumbnail(render(load(), transfer_syntax_uid, self.size), RENDERED)
        except ThumbnailError as exc:
            thumb = Thumbnail(placeholder(str(exc), self.size), PLACEHOLDER, str(exc))
            log.info("thumbnail of object %s...: placeholder (%s)", sha256[:12], exc)
            self._placeholders[sha256] = thumb
            return thumb
        self._store(path, thumb.png)
        return thumb

    def _store(self, path: Path, png: bytes) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "wb") as handle:
                handle.write(png)
            os.replace(tmp, path)
        except OSError as exc:  # a read-only data folder: serve without caching
            log.warning("cannot cache thumbnail in %s: %s", self.folder, exc)
