"""What an adapter hands to selection and training: processed images and encoded (images, prompt, answer) samples."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from miadpo.models.geometry import ImageGeometry

IGNORE_INDEX = -100  # the label of every token outside the answer


@dataclass
class ProcessedImages:
    """Images after the model's preprocessing, ready to be shared by several encodings of one prompt."""

    pixel_values: torch.Tensor | None
    geometries: list[ImageGeometry]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class EncodedSample:
    """One (images, prompt, answer) sequence as model inputs."""

    input_ids: torch.Tensor  # (L,)
    labels: torch.Tensor  # (L,), IGNORE_INDEX outside the answer
    image_spans: list[tuple[int, int]]  # [start, end) of each image's tokens, in prompt order
    geometries: list[ImageGeometry]
    pixel_values: torch.Tensor | None
    prompt_length: int
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def answer_length(self) -> int:
        """Tokens after the prompt: the answer with its EOS, as cut to ``max_length`` (0 without an answer)."""
        return int(self.input_ids.numel()) - self.prompt_length


class SampleTooLongError(ValueError):
    """The prompt (with its image tokens) alone does not fit in ``max_length``."""
