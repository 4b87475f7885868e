"""The toy world's classes of wrong answer: distractor / in no image / other (``miadpo.eval.scoring`` adds their
shares to each group of open toy questions)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from miadpo.eval.items import EvalItem
from miadpo.text import normalise_answer
from miadpo.toyworld.scenes import COLOURS, COUNTS, POSITIONS, SHAPES, scene_index

ATTRIBUTE_VALUES = {"colour": set(COLOURS), "shape": set(SHAPES), "position": set(POSITIONS), "count": set(COUNTS)}


def attribute_of(answer: str) -> str | None:
    """The attribute (colour, shape, position, count) that has the normalised ``answer`` among its values, or None."""
    value = normalise_answer(answer)
    return next((kind for kind, values in ATTRIBUTE_VALUES.items() if value in values), None)


class ToyErrors:
    """The class of a wrong answer to a toy question, from the objects of each image (``scene_index``)."""

    classes = ("distractor", "in no image", "other")

    def __init__(self, scenes: dict[str, list[dict[str, Any]]]) -> None:
        self.scenes = scenes

    @classmethod
    def of_source(cls, toy_source: str | Path) -> ToyErrors:
        """From a toy split's source JSON (``eval.toy_source``)."""
        return cls(scene_index(toy_source))

    def __call__(self, item: EvalItem, prediction: str) -> str:
        """distractor / in no image / other, for a wrong toy answer.

        distractor: the answer is the asked attribute (colour, shape, position) of an object in another image and
        not of the target's objects; in no image: no object of any image has it as any attribute; other: the rest
        (e.g. another attribute of the target image, or a wrong count).
        """
        kind = attribute_of(item.answer)
        value = normalise_answer(prediction)
        objects = [self.scenes.get(path, []) for path in item.image_paths]
        everything = {normalise_answer(str(o[k])) for image in objects for o in image for k in ("colour", "shape",
                                                                                                "position")}
        if kind in ("colour", "shape", "position") and objects:
            target = {o[kind] for o in objects[item.target - 1]}
            others = {o[kind] for i, image in enumerate(objects) if i != item.target - 1 for o in image}
            if value in others and value not in target:
                return "distractor"
        if value not in everything and value not in {"yes", "no", *COUNTS}:
            return "in no image"
        return "other"
