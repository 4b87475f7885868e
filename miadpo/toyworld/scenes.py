"""Toy world: seeded scenes of coloured shapes with VQA whose answers are known exactly.

A scene is a 56 × 56 white image split into four 28 × 28 quadrants; one object (two scenes in three) or two
objects, each with its own shape and colour, sit in distinct quadrants. Every scene gets one question
(colour, shape, position, count or presence) with a one- or two-word answer. Records are ordinary LLaVA
format (``{id, image, conversations}``) plus a ``toy`` field describing the scene, so the normal augmentation
stage consumes them (source ``toy``) and the evaluator can tell a distractor's attribute from one that is in
no image.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

SIZE = 56
QUADRANT = SIZE // 2
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 180),
    "orange": (250, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
COUNTS = ("zero", "one", "two", "three")
# The default mix asks what the toy model's 14-px patches resolve reliably (colour, position, count); a
# first base trained on all five types answered shape questions at chance (15% on val), so shape and
# presence questions are available but off by default.
QUESTION_WEIGHTS = {"colour": 0.5, "position": 0.3, "count": 0.2, "shape": 0.0, "presence": 0.0}
ALL_QUESTIONS = {"colour": 0.4, "position": 0.15, "count": 0.1, "shape": 0.2, "presence": 0.15}


@dataclass(frozen=True)
class ToyObject:
    """One object of a scene: its shape, colour, quadrant (``position``) and pixel box."""

    shape: str
    colour: str
    position: str  # one of POSITIONS
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels


def paint_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float],
                fill: tuple[int, int, int]) -> None:
    """Fill one of SHAPES inside ``box`` (every shape covers the box centre)."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "cross":
        third = (x1 - x0) / 3
        draw.rectangle((x0, y0 + third, x1, y1 - third), fill=fill)
        draw.rectangle((x0 + third, y0, x1 - third, y1), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def draw_object(draw: ImageDraw.ImageDraw, obj: ToyObject) -> None:
    """Paint ``obj`` in its colour inside its box."""
    paint_shape(draw, obj.shape, obj.box, COLOURS[obj.colour])


def sample_scene(rng: random.Random) -> list[ToyObject]:
    """A random scene: one object (two scenes in three) or two, of distinct shapes and colours, in distinct
    quadrants."""
    count = rng.choice((1, 1, 2))
    quadrants = rng.sample(range(4), count)
    shapes = rng.sample(SHAPES, count)
    colours = rng.sample(sorted(COLOURS), count)
    objects = []
    for quadrant, shape, colour in zip(quadrants, shapes, colours):
        extent = rng.randint(18, 24)
        qx, qy = (quadrant % 2) * QUADRANT, (quadrant // 2) * QUADRANT
        x0 = qx + rng.randint(1, QUADRANT - extent - 1)
        y0 = qy + rng.randint(1, QUADRANT - extent - 1)
        objects.append(ToyObject(shape, colour, POSITIONS[quadrant], (x0, y0, x0 + extent, y0 + extent)))
    return objects


def render(objects: list[ToyObject]) -> Image.Image:
    """The scene as a white ``SIZE`` × ``SIZE`` RGB image with its objects painted."""
    image = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for obj in objects:
        draw_object(draw, obj)
    return image


def ask(objects: list[ToyObject], rng: random.Random, weights: dict[str, float] | None = None
        ) -> tuple[str, str, str]:
    """(question type, question, answer) about the scene."""
    weights = weights or QUESTION_WEIGHTS
    kind = rng.choices(list(weights), weights=list(weights.values()))[0]
    obj = rng.choice(objects)
    if kind == "colour":
        return kind, f"What colour is the object at the {obj.position}?", obj.colour
    if kind == "shape":
        return kind, f"What shape is the {obj.colour} object?", obj.shape
    if kind == "position":
        return kind, f"Where is the {obj.colour} object?", obj.position
    if kind == "count":
        return kind, "How many objects are there?", COUNTS[len(objects)]
    if rng.random() < 0.5:
        return kind, f"Is there a {obj.colour} {obj.shape}?", "yes"
    present = {(o.colour, o.shape) for o in objects}
    while True:
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        if (colour, shape) not in present:
            return kind, f"Is there a {colour} {shape}?", "no"


def write_split(out_dir: str | Path, split: str, count: int, seed: int,
                question_weights: dict[str, float] | None = None) -> Path:
    """Render ``count`` scenes under ``<out_dir>/images/toy/<split>/`` and write ``<out_dir>/<split>.json``."""
    out_dir = Path(out_dir)
    image_dir = out_dir / "images" / "toy" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records: list[dict[str, Any]] = []
    for index in range(count):
        objects = sample_scene(rng)
        kind, question, answer = ask(objects, rng, question_weights)
        name = f"{index:06d}.png"
        render(objects).save(image_dir / name)
        records.append({
            "id": f"toy-{split}-{index:06d}",
            "image": f"toy/{split}/{name}",
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}],
            "toy": {"question_type": kind, "objects": [asdict(o) for o in objects]},
        })
    path = out_dir / f"{split}.json"
    path.write_text(json.dumps(records))
    return path


def scene_index(source: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Image path → objects, from a toy source JSON (for telling distractor errors from collapse)."""
    return {r["image"]: r["toy"]["objects"] for r in json.loads(Path(source).read_text())}
