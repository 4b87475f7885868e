"""The three augmentation formats: prompt rewriting and image composition (plain functions, no randomness).

Beside them, ``single`` keeps a source record as the single-image question it is (the prompt in LLaVA's form
``<image>\n<question>``): single-image pairs selected beside the multi-image ones, so that DPO also sees the
prompts whose ability it must keep.

Randomness (which companions, which N, which position) is decided by the planner; these functions turn a
decision into conversations and pixels.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from miadpo.config import GridAugmentConfig
from miadpo.text import IMAGE_TOKEN

Conversation = list[dict[str, str]]

# A list of four numbers in square brackets: the region coordinates of VG / RefCOCO-style questions.
_NUMBER = r"-?\d*\.?\d+"
BBOX_PATTERN = re.compile(rf"\[\s*{_NUMBER}\s*,\s*{_NUMBER}\s*,\s*{_NUMBER}\s*,\s*{_NUMBER}\s*\]")

# Rows × cols per N: the reference layouts for 2, 3, 4, 6, 9; ours for 5 (2×3), 7 and 8 (3×3), blanks last.
GRID_LAYOUTS: dict[int, tuple[int, int]] = {2: (1, 2), 3: (1, 3), 4: (2, 2), 5: (2, 3), 6: (2, 3), 7: (3, 3),
                                            8: (3, 3), 9: (3, 3)}

_PIP_LEADS = ("For", "Regarding", "Looking at", "Concerning", "About", "Considering", "Focusing on",
              "With respect to", "As for")
_PIP_SUBJECTS = ("the image in the center", "the central image", "the picture in the middle",
                 "the middle picture", "the central subplot", "the image placed in the centre",
                 "the inset picture in the middle", "the smaller image in the center", "the centred photo",
                 "the photo in the middle")
# 90 phrases naming the centre image of a pic-in-pic composite.
PIP_PHRASES: tuple[str, ...] = tuple(f"{lead} {subject}" for lead, subject in itertools.product(_PIP_LEADS,
                                                                                                 _PIP_SUBJECTS))


def has_bbox(conversations: Sequence[dict[str, str]]) -> bool:
    """Whether a turn holds box coordinates (``[x0, y0, x1, y1]``): such questions stay out of grid and pip."""
    return any(BBOX_PATTERN.search(turn["value"]) for turn in conversations)


def strip_image_marker(text: str) -> str:
    """Remove the question's own ``<image>`` marker and its adjacent newline (start or end)."""
    if text.startswith(IMAGE_TOKEN + "\n"):
        text = text[len(IMAGE_TOKEN) + 1 :]
    elif text.endswith("\n" + IMAGE_TOKEN):
        text = text[: -len(IMAGE_TOKEN) - 1]
    return text.replace(IMAGE_TOKEN, "").strip()


def lower_first(text: str) -> str:
    """``text`` with its first character lower-cased."""
    return text[:1].lower() + text[1:]


def relabel(conversations: Sequence[dict[str, str]], first_prefix: str, later_prefix: str) -> Conversation:
    """Prefix every human turn (first turn: ``first_prefix``) and lower-case the question's first character."""
    out: Conversation = []
    for position, turn in enumerate(conversations):
        if turn["from"] == "human":
            prefix = first_prefix if position == 0 else later_prefix
            out.append({"from": "human", "value": prefix + lower_first(strip_image_marker(turn["value"]))})
        else:
            out.append({"from": turn["from"], "value": turn["value"]})
    return out


def single_conversations(conversations: Sequence[dict[str, str]]) -> Conversation:
    """The record as one single-image question: ``<image>`` leads the first turn, later turns have none."""
    return [{"from": t["from"], "value": (f"{IMAGE_TOKEN}\n" if i == 0 else "") + strip_image_marker(t["value"])}
            if t["from"] == "human" else dict(t) for i, t in enumerate(conversations)]


def sequence_header(n_images: int) -> str:
    """``Image1:<image>\n…ImageN:<image>\n``: the labelled images leading a Sequence prompt."""
    return "".join(f"Image{i}:{IMAGE_TOKEN}\n" for i in range(1, n_images + 1))


def question_prefix(target: int) -> str:
    """How a Sequence or Grid question names its image (first turn)."""
    return f"In Image{target}, "


def retarget_question(prompt: str, target: int, other: int) -> str:
    """The same first-turn question asked about image ``other`` instead of ``target`` (Sequence, Grid)."""
    old = question_prefix(target)
    if prompt.count(old) != 1:
        raise ValueError(f"the prompt does not name Image{target} exactly once as {old!r}: {prompt!r}")
    return prompt.replace(old, question_prefix(other))


def sequence_conversations(conversations: Sequence[dict[str, str]], n_images: int, target: int) -> Conversation:
    """The record's turns as a Sequence of ``n_images`` images asking about ``Image{target}``."""
    return relabel(conversations, sequence_header(n_images) + question_prefix(target), f"In image{target}, ")


def grid_conversations(parts: Sequence[tuple[Sequence[dict[str, str]], int]]) -> Conversation:
    """Turns of one or more source records, each relabelled with its own tile; the image marker leads."""
    out: Conversation = []
    for number, (conversations, tile) in enumerate(parts):
        lead = f"{IMAGE_TOKEN}\n" if number == 0 else ""
        out += relabel(conversations, lead + question_prefix(tile), question_prefix(tile))
    return out


def pip_conversations(conversations: Sequence[dict[str, str]], phrase: str) -> Conversation:
    """The record's turns asking about the centre picture, named by ``phrase``."""
    return relabel(conversations, f"{IMAGE_TOKEN}\n{phrase}, ", f"{phrase}, ")


def refusal_conversations(conversations: Sequence[dict[str, str]], n_images: int) -> Conversation:
    """Ask about Image{N+1} of an N-image sequence; the answer says only N images were given."""
    question = lower_first(strip_image_marker(conversations[0]["value"]))
    return [
        {"from": "human", "value": f"{sequence_header(n_images)}In Image{n_images + 1}, {question}"},
        {"from": "gpt", "value": f"Only {n_images} images were given, so there is no Image{n_images + 1}."},
    ]


def fit_within(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize (up or down), aspect kept, to the largest size inside width × height."""
    scale = min(width / image.width, height / image.height)
    size = (max(1, min(width, round(image.width * scale))), max(1, min(height, round(image.height * scale))))
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


@lru_cache(maxsize=8)
def label_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled scalable font: present wherever Pillow is, no file or download needed."""
    return ImageFont.load_default(size=size)


def grid_canvas_size(n_images: int, cfg: GridAugmentConfig) -> tuple[int, int]:
    """(width, height) of the grid canvas of ``n_images`` tiles: cells, gaps and label bands."""
    rows, cols = GRID_LAYOUTS[n_images]
    return cols * cfg.cell_size + (cols - 1) * cfg.gap, rows * (cfg.band + cfg.cell_size)


def compose_grid(images: Sequence[Image.Image], cfg: GridAugmentConfig) -> tuple[Image.Image, dict[str, Any]]:
    """Tiles row-major, each fitted to a cell at its top-left, on white; ``Image{i}`` in the band above."""
    n_images = len(images)
    if n_images not in GRID_LAYOUTS:
        raise ValueError(f"a grid holds 2 to 9 images, not {n_images}")
    rows, cols = GRID_LAYOUTS[n_images]
    canvas = Image.new("RGB", grid_canvas_size(n_images, cfg), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = label_font(cfg.font_size)
    tiles, labels = [], []
    for i, image in enumerate(images):
        row, col = divmod(i, cols)
        x = col * (cfg.cell_size + cfg.gap)
        band_top = row * (cfg.band + cfg.cell_size)
        y = band_top + cfg.band
        tile = fit_within(image, cfg.cell_size, cfg.cell_size)
        canvas.paste(tile, (x, y))
        tiles.append([x, y, x + tile.width, y + tile.height])
        text = f"Image{i + 1}"
        _, top, _, bottom = draw.textbbox((0, 0), text, font=font)
        origin = (x + cfg.label_x, band_top + (cfg.band - (bottom - top)) // 2 - top)  # centred in the band
        draw.text(origin, text, fill=(0, 0, 0), font=font)
        labels.append(list(draw.textbbox(origin, text, font=font)))
    layout = {"rows": rows, "cols": cols, "canvas": list(canvas.size), "tiles": tiles, "labels": labels}
    return canvas, layout


def compose_pip(target: Image.Image, background: Image.Image, scale: float) -> tuple[Image.Image, dict[str, Any]]:
    """Paste the target, scaled to ``scale`` of the background's width (or height if too tall), centred."""
    width, height = background.size
    new_w = scale * width
    new_h = target.height * new_w / target.width
    if new_h > scale * height:
        new_h = scale * height
        new_w = target.width * new_h / target.height
    size = (max(1, round(new_w)), max(1, round(new_h)))
    x0, y0 = (width - size[0]) // 2, (height - size[1]) // 2
    canvas = background.copy()
    canvas.paste(target.resize(size, Image.Resampling.BICUBIC), (x0, y0))
    return canvas, {"canvas": [width, height], "box": [x0, y0, x0 + size[0], y0 + size[1]]}
