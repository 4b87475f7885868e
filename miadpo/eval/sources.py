"""Where an evaluation item's images come from, decoded only when the item is answered.

A benchmark of thousands of items (MMMU, MVBench) is read as references: a file path, the encoded bytes of a
parquet image struct or a TSV's base64 cell, a video and the frames to take from it, a folder of frames. Each
source is checked cheaply when the benchmark is read (the file exists; a header opens) and decoded by
``miadpo.data.images`` when its item is answered, so at most one batch of decoded images is held at a time.

Video frames (MVBench's convention, read in the authors' OpenGVLab/Ask-Anything video_chat2 ``mvbench.ipynb``
and VLMEvalKit's ``vlmeval/dataset/mvbench.py``): the window is ``[round(start·fps), round(end·fps)]`` clipped
to the video (the whole video without a bound), split into ``n`` equal segments; frame ``i`` is
``int(first + seg/2 + round(seg·i))`` with ``seg = (last − first) / n``. Videos are decoded with PyAV (the
``video`` extra); a frame folder (``00001.jpg``, … numbered from 1) is read at an assumed 3 fps.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from miadpo.data.images import CORRUPT, MISSING, ImageError, ImageOptions, fit, image_size, load_image, to_rgb

FRAME_FOLDER_FPS = 3.0  # MVBench's tvqa frames_fps3_hq


class ImageSource(Protocol):
    """One reference in an item's image list: ``load`` gives its images (one, or a video's frames)."""

    label: str

    def check(self, options: ImageOptions) -> None:
        """ImageError if the source cannot be used, found without decoding it (missing file, unreadable header)."""

    def load(self, options: ImageOptions) -> list[Image.Image]:
        """The decoded images; ImageError if they cannot be."""


@dataclass(frozen=True)
class ImageFile:
    """An image file on disk (``where``: where it was looked for, for messages)."""

    path: Path
    where: str | None = None  # where it was looked for, for messages

    @property
    def label(self) -> str:
        """The file's path, naming the source in messages."""
        return str(self.path)

    def check(self, options: ImageOptions) -> None:
        """ImageError if the file cannot be opened from its header (or is too large under ``on_large_image=skip``)."""
        image_size(self.path, options, where=self.where)

    def load(self, options: ImageOptions) -> list[Image.Image]:
        """The decoded image, as a one-image list; ImageError if it cannot be."""
        return [load_image(self.path, options, where=self.where)]


@dataclass(frozen=True)
class EncodedImage:
    """Image file bytes held in memory (a parquet image struct's ``bytes``), or base64 text (``base64=True``)."""

    data: bytes | str
    label: str
    base64: bool = False

    def _bytes(self) -> bytes:
        if not self.base64:
            return bytes(self.data) if not isinstance(self.data, str) else self.data.encode()
        try:
            return base64.b64decode(self.data, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise ImageError(CORRUPT, self.label, detail=f"not base64 ({exc})") from exc

    def check(self, options: ImageOptions) -> None:
        """ImageError if the data is not base64 (with ``base64``) or cannot be opened as an image from its header."""
        image_size(io.BytesIO(self._bytes()), options, name=self.label)

    def load(self, options: ImageOptions) -> list[Image.Image]:
        """The decoded image, as a one-image list; ImageError if it cannot be."""
        return [load_image(io.BytesIO(self._bytes()), options, name=self.label)]


def segment_frames(first: int, last: int, count: int, fps: float, bound: tuple[float, float] | None = None
                   ) -> list[int]:
    """MVBench's frame indices: ``count`` segment midpoints of the window (frames ``first…last``, cut to
    ``bound`` seconds at ``fps``)."""
    start, end = bound if bound is not None else (-100_000.0, 100_000.0)
    low, high = max(first, round(start * fps)), min(round(end * fps), last)
    size = (high - low) / count
    return [int(low + size / 2 + round(size * i)) for i in range(count)]


@dataclass(frozen=True)
class VideoFrames:
    """``count`` frames of a video file (PyAV), by ``segment_frames`` over the video or its ``bound``."""

    path: Path
    count: int
    bound: tuple[float, float] | None = None

    @property
    def label(self) -> str:
        """The video's path, naming the source in messages."""
        return str(self.path)

    def check(self, options: ImageOptions) -> None:
        """ImageError if the video file does not exist (it is first opened by ``load``)."""
        if not self.path.is_file():
            raise ImageError(MISSING, self.label)

    def load(self, options: ImageOptions) -> list[Image.Image]:
        """The ``count`` frames as images; ImportError without PyAV, ImageError if the video cannot be decoded or lacks
        a frame wanted."""
        self.check(options)
        try:
            import av
        except ImportError as exc:
            raise ImportError("decoding videos needs PyAV: pip install 'miadpo[video]' (or give MVBench's frames "
                              "as folders of 00001.jpg, ...)") from exc
        try:
            total, fps = self._count(av)
            wanted = segment_frames(0, total - 1, self.count, fps, self.bound)
            kept, decoded = self._frames(av, set(wanted))
            if len(kept) < len(set(wanted)) and 0 < decoded < total:  # the header over-counted its frames
                wanted = segment_frames(0, decoded - 1, self.count, fps, self.bound)
                kept, decoded = self._frames(av, set(wanted))
        except (av.FFmpegError, IndexError, ValueError) as exc:
            raise ImageError(CORRUPT, self.label, detail=f"video not decodable ({exc})") from exc
        if decoded == 0:
            raise ImageError(CORRUPT, self.label, detail="video has no frames")
        if len(kept) < len(set(wanted)):
            raise ImageError(CORRUPT, self.label, detail=f"frames {sorted(set(wanted) - set(kept))} (of the bound "
                             f"{self.bound} s) are not in the video's {decoded} frames")
        return [_as_loaded(kept[i], options) for i in wanted]

    def _count(self, av: Any) -> tuple[int, float]:
        """The number of frames (the header's, else counted by decoding) and the frame rate."""
        with av.open(str(self.path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 1)
            return stream.frames or sum(1 for _ in container.decode(stream)), fps

    def _frames(self, av: Any, wanted: set[int]) -> tuple[dict[int, Image.Image], int]:
        """The frames at the ``wanted`` indices as images (only those are converted and kept, so a long video
        never sits decoded in memory) and how many frames were decoded, stopping after the last one wanted."""
        kept: dict[int, Image.Image] = {}
        decoded = 0
        with av.open(str(self.path)) as container:
            for index, frame in enumerate(container.decode(container.streams.video[0])):
                decoded = index + 1
                if index in wanted:
                    kept[index] = frame.to_image()
                    if len(kept) == len(wanted):
                        break
        return kept, decoded


@dataclass(frozen=True)
class FrameFolder:
    """``count`` frames of a folder of ``00001.jpg``, ``00002.jpg``, … (numbered from 1) at ``fps``."""

    path: Path
    count: int
    bound: tuple[float, float] | None = None
    fps: float = FRAME_FOLDER_FPS

    @property
    def label(self) -> str:
        """The folder's path, naming the source in messages."""
        return str(self.path)

    def check(self, options: ImageOptions) -> None:
        """ImageError if the folder does not exist."""
        if not self.path.is_dir():
            raise ImageError(MISSING, self.label, detail="frame folder not found")

    def load(self, options: ImageOptions) -> list[Image.Image]:
        """The ``count`` frames (the files at ``segment_frames``' indices) as images; ImageError if one cannot be
        loaded."""
        self.check(options)
        total = sum(1 for _ in self.path.iterdir())
        # Numbered from 1, the last index the folder's file count (as the authors' read_frame).
        wanted = segment_frames(1, total, self.count, self.fps, self.bound)
        return [load_image(self.path / f"{i:05d}.jpg", options) for i in wanted]


def _as_loaded(image: Image.Image, options: ImageOptions) -> Image.Image:
    """A decoded video frame by the image loader's rules for decoded pixels: RGB, downsized to the pixel cap."""
    size = fit(image.size, options.max_pixels)
    return to_rgb(image if size is None else image.resize(size, Image.Resampling.LANCZOS))


def load_sources(sources: Sequence[ImageSource], options: ImageOptions) -> list[Image.Image]:
    """The decoded images of ``sources`` in order (a video's frames in its place); ImageError if one cannot be."""
    return [image for source in sources for image in source.load(options)]
