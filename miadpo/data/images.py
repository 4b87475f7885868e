"""The one image loader of every stage (training, SFT, selection, evaluation, generate, the data report).

``load_image(path)`` gives an RGB PIL image by these rules, the same everywhere:

1. Errors. An image that cannot be used raises ``ImageError`` (a ValueError) whose message starts with its reason
   and the resolved path — ``image missing: <path>``, ``image corrupt or not an image: <path>``, ``image
   truncated: <path>``, ``image too large: <path>``, ``image unreadable: <path>`` (no permission) — followed by
   the root it was searched under for a record path (``searched under image_root=<root>``; see
   ``load_record_image``) and PIL's own words. The stages make such a record a bad record (``file:line (id):
   reason``) under ``on_bad_record``.
2. Orientation. The EXIF orientation tag is applied (the table of ``PIL.ImageOps.exif_transpose``): a photo stored
   sideways is seen upright, and ``image_size`` is the upright size.
3. Modes → RGB, scaled to 8 bits by the value range of the mode:
   - 16-bit greyscale (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``): ÷ 257 (65535 → 255; PIL's own conversion
     clips them, so mid-grey came out white). ``I`` (32-bit integers, Pillow's mode for 16-bit PNG/TIFF data
     too) is read as 16-bit: clipped to 0–65535, then ÷ 257. ``F`` (float) is clipped to 0–255, as PIL does.
   - Transparency (``RGBA``, ``RGBa``, ``LA``, ``PA``, and ``P``/``L``/``RGB`` with a transparent colour):
     composited on white (a model sees no alpha; white is what a viewer shows on a page).
   - ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``P``, ``L``, ``1``: PIL's conversion to RGB (no ICC colour
     management; Adobe-inverted CMYK JPEGs are un-inverted by PIL's JPEG reader).
4. Pixel cap (``max_image_pixels``, default 40 MP, well below PIL's decompression-bomb limit of ~89 MP). An
   image above it is downsized to fit, aspect kept: a JPEG is first decoded at a reduced scale (``draft``, still
   at least the target size), then resized (Lanczos) to ``fit(size, cap)``; each such file is counted in
   ``COUNTS["downsized"]`` and logged once per process. With ``on_large_image=skip`` it raises ``ImageError``
   ("too large") instead. Images above twice PIL's limit (~179 MP) are "too large" whatever the policy (PIL
   refuses them before reading a pixel); PIL's DecompressionBombWarning (89–179 MP) is silenced, the cap being
   stricter.
5. Aspect ratio (``max_image_aspect_ratio``, default 100). An image whose long side is more than that many times
   its short side raises ``ImageError`` ("too elongated"), from the header alone: a 1×20000 strip would be padded
   to a 20000² canvas (LLaVA) or refused by the model's own resize (Qwen2-VL, GLM-4V: above 200).

Nothing from a later stage is imported here (only the config's enums), so every module may use it.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from miadpo.config import DEFAULT_MAX_IMAGE_ASPECT_RATIO, DEFAULT_MAX_IMAGE_PIXELS, ImageSourceConfig, LargeImagePolicy
from miadpo.text import shown

log = logging.getLogger(__name__)

MISSING = "missing"
CORRUPT = "corrupt or not an image"
TRUNCATED = "truncated"
TOO_LARGE = "too large"
ELONGATED = "too elongated"
UNREADABLE = "unreadable"
ORIENTATION_TAG = 0x0112
TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_90}  # as PIL.ImageOps.exif_transpose
ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "PA"})
COUNTS: Counter[str] = Counter()  # per process: "downsized" (distinct files)
_logged: set[str] = set()

Source = str | Path | IO[bytes]


class ImageError(ValueError):
    """An image that cannot be used; ``kind`` is one of missing, corrupt or not an image, truncated, too large,
    too elongated, unreadable."""

    def __init__(self, kind: str, path: Any, where: str | None = None, detail: str | None = None) -> None:
        self.kind, self.path, self.where, self.detail = kind, path, where, detail
        text = f"image {kind}: {shown(path)}"
        if where:
            text += f" ({where})"
        if detail:
            text += f" — {detail}"
        super().__init__(text)


@dataclass(frozen=True)
class ImageOptions:
    """The pixel cap and what to do above it (``max_image_pixels``, ``on_large_image`` of a data/eval config)."""

    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS  # None or 0: no cap
    on_large: LargeImagePolicy = LargeImagePolicy.downsize
    max_aspect: float | None = DEFAULT_MAX_IMAGE_ASPECT_RATIO  # None or 0: no limit

    @classmethod
    def of(cls, cfg: ImageSourceConfig | None) -> ImageOptions:
        """The options an image-source config sets (``data``, SFT data, ``eval``); the defaults for None."""
        if cfg is None:
            return cls()
        return cls(cfg.max_image_pixels, LargeImagePolicy(cfg.on_large_image), cfg.max_image_aspect_ratio)


def fit(size: tuple[int, int], max_pixels: int | None) -> tuple[int, int] | None:
    """The largest size of the same aspect with at most ``max_pixels`` pixels, or None if ``size`` fits."""
    width, height = size
    if not max_pixels or width * height <= max_pixels:
        return None
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, int(width * scale)), max(1, int(height * scale))


def to_rgb(image: Image.Image) -> Image.Image:
    """Rule 3: any mode → RGB, 8 bits by the mode's value range, transparency on white."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode.startswith("I;16") or mode == "I":
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1 when absent or unreadable: a broken EXIF block does not make the image unusable),
    from the header: PNG's reader would decode the whole image for an eXIf chunk placed after the pixel data
    (which the PNG specification places before it), so that one is not read."""
    try:
        exif = Image.Image.getexif(image) if image.format == "PNG" else image.getexif()
        value = int(exif.get(ORIENTATION_TAG, 1))
    except Exception:  # malformed EXIF: PIL raises many types
        return 1
    return value if value in TRANSPOSE else 1


def _failure(exc: BaseException, label: str, where: str | None) -> ImageError:
    text = "PIL knows no image format in it" if isinstance(exc, UnidentifiedImageError) else \
        f"{type(exc).__name__}: {exc}"
    if isinstance(exc, FileNotFoundError):
        return ImageError(MISSING, label, where)
    if isinstance(exc, PermissionError):
        return ImageError(UNREADABLE, label, where, text)
    if isinstance(exc, Image.DecompressionBombError):
        return ImageError(TOO_LARGE, label, where, text)
    if "truncat" in str(exc).lower() or isinstance(exc, EOFError):
        return ImageError(TRUNCATED, label, where, text)
    return ImageError(CORRUPT, label, where, text)


def _label(source: Source, name: str | None) -> str:
    return name or (str(source) if isinstance(source, (str, Path)) else "<image bytes>")


class _Opened:
    """An image opened lazily (header read) with its size rules applied; ``load`` decodes it by every rule."""

    def __init__(self, source: Source, options: ImageOptions | None, name: str | None, where: str | None) -> None:
        self.options = options or ImageOptions()
        self.label, self.where = _label(source, name), where
        self.owned: IO[bytes] | None = None  # the file this opened (and closes)
        if isinstance(source, (str, Path)):
            path = Path(source)
            if not path.exists():
                raise ImageError(MISSING, self.label, where)
            if not path.is_file():
                raise ImageError(CORRUPT, self.label, where, "not a file")
        try:
            if isinstance(source, (str, Path)):
                self.owned = fp = Path(source).open("rb")  # noqa: SIM115 (closed by load / close)
            else:
                fp = source
            with self._quiet():
                self.image = Image.open(fp)
            self.orientation = _orientation(self.image)
            self.raw_target = fit(self.image.size, self.options.max_pixels)
        except Exception as exc:  # PIL raises many types for files it cannot read
            self.close()
            raise _failure(exc, self.label, where) from exc
        if self.raw_target is not None:
            self._too_large()
        self._too_elongated()

    @contextmanager
    def _quiet(self) -> Iterator[None]:
        """Silence PIL's DecompressionBombWarning when our own (stricter) cap governs."""
        cap = self.options.max_pixels
        with warnings.catch_warnings():
            if cap and cap <= (Image.MAX_IMAGE_PIXELS or 0):
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield

    def _too_elongated(self) -> None:
        """ImageError when the long side is more than ``max_aspect`` times the short one."""
        width, height = self.image.size
        cap = self.options.max_aspect
        if cap and max(width, height) > cap * min(width, height):
            self.close()
            raise ImageError(ELONGATED, self.label, self.where,
                             f"{width}×{height} has an aspect ratio of {max(width, height) / min(width, height):.0f}:1 "
                             f"> max_image_aspect_ratio={cap:g}")

    def _too_large(self) -> None:
        width, height = self.image.size
        cap = self.options.max_pixels or 0
        what = f"{width}×{height} = {width * height / 1e6:.1f} MP > max_image_pixels={cap / 1e6:g} MP"
        if LargeImagePolicy(self.options.on_large) is LargeImagePolicy.skip:
            self.close()
            raise ImageError(TOO_LARGE, self.label, self.where, f"{what} (on_large_image=skip)")
        if self.label not in _logged:
            _logged.add(self.label)
            COUNTS["downsized"] += 1
            target = self.size
            log.warning("image %s is %s: downsized to %d×%d (aspect kept; on_large_image=skip makes it a bad record)",
                        self.label, what, target[0], target[1])

    @property
    def size(self) -> tuple[int, int]:
        """The size ``load`` returns: upright, capped."""
        width, height = self.raw_target or self.image.size
        return (height, width) if self.orientation in (5, 6, 7, 8) else (width, height)

    def load(self, reduce_to: tuple[int, int] | None = None) -> Image.Image:
        try:
            with self._quiet():
                image = self.image
                if reduce_to is not None and self.orientation in (5, 6, 7, 8):
                    reduce_to = (reduce_to[1], reduce_to[0])  # draft works on the stored orientation
                request = self.raw_target or reduce_to
                if request is not None:
                    image.draft(None, request)  # JPEG: decode at 1/2, 1/4 or 1/8 scale, still ≥ request
                image.load()
                if self.orientation != 1:
                    image = image.transpose(TRANSPOSE[self.orientation])
                rgb = to_rgb(image)
                if self.raw_target is not None and rgb.size != self.size:
                    rgb = rgb.resize(self.size, Image.Resampling.LANCZOS)
                return rgb
        except ImageError:
            raise
        except Exception as exc:  # PIL raises many types for corrupt or truncated data
            raise _failure(exc, self.label, self.where) from exc
        finally:
            self.close()

    def close(self) -> None:
        if self.owned is not None:
            self.owned.close()


def load_image(source: Source, options: ImageOptions | None = None, *, name: str | None = None,
               where: str | None = None, reduce_to: tuple[int, int] | None = None) -> Image.Image:
    """A file (path) or bytes (file object) → an RGB image by the module's rules; ImageError if unusable.

    ``name`` labels bytes in messages (e.g. ``bench.tsv:12 image cell``); ``where`` says where a path was
    looked for. ``reduce_to`` (upright width, height), for a caller that resizes anyway: a JPEG may be decoded
    2–8× smaller as long as it stays at least that size (the size then differs from ``image_size``)."""
    return _Opened(source, options, name, where).load(reduce_to)


def image_size(source: Source, options: ImageOptions | None = None, *, name: str | None = None,
               where: str | None = None) -> tuple[int, int]:
    """The size ``load_image`` returns (upright, capped), from the header alone; ImageError if it cannot be opened
    (or is too large under ``on_large_image=skip``)."""
    opened = _Opened(source, options, name, where)
    opened.close()
    return opened.size


def check_image(source: Source, options: ImageOptions | None = None, *, decode: bool = True,
                name: str | None = None, where: str | None = None) -> tuple[int, int]:
    """ImageError unless the image is usable: fully decoded (``decode``, catches truncation) or its header read.
    Returns its size as loaded."""
    if decode:
        return load_image(source, options, name=name, where=where).size
    return image_size(source, options, name=name, where=where)


def resolve_record_image(roots: Any, rel: str) -> tuple[Path, str]:
    """A record path → (resolved path, "searched under <root name>=<root>"), by ``roots.resolve`` (an
    ``miadpo.data.pairs.ImageRoots``: ValueError for absolute or escaping paths)."""
    path = roots.resolve(rel)
    candidates = [(name, Path(getattr(roots, name)).resolve()) for name in ("image_root", "out_dir")]
    inside = [(name, root) for name, root in candidates if Path(path).is_relative_to(root)]
    name, root = max(inside, key=lambda c: len(c[1].parts)) if inside else candidates[0]
    return path, f"searched under {name}={root}"


def load_record_image(roots: Any, rel: str, options: ImageOptions | None = None,
                      reduce_to: tuple[int, int] | None = None) -> Image.Image:
    """``load_image`` of a record path; errors name the resolved path and the root searched."""
    path, where = resolve_record_image(roots, rel)
    return load_image(path, options, where=where, reduce_to=reduce_to)


def record_image_size(roots: Any, rel: str, options: ImageOptions | None = None) -> tuple[int, int]:
    """``image_size`` of a record path."""
    path, where = resolve_record_image(roots, rel)
    return image_size(path, options, where=where)


def check_record_image(roots: Any, rel: str, options: ImageOptions | None = None, decode: bool = True
                       ) -> tuple[int, int]:
    """``check_image`` of a record path."""
    path, where = resolve_record_image(roots, rel)
    return check_image(path, options, decode=decode, where=where)
