"""Candidates: the base model's greedy answers to augmented prompts, with log-probs and attention statistics.

For a batch of augmented records: load (and optionally corrupt) the images and generate with left padding.
While generating, the selection layer alone records its attention rows (see ``capture``) and the raw logits
give each answer token's log-prob; nothing runs a second time.
"""

from __future__ import annotations

import hashlib
import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from miadpo.config import NoiseConfig, SelectionConfig
from miadpo.datamodule import load_image
from miadpo.models.base import EncodedSample, ModelAdapter
from miadpo.pairs import ImageRoots
from miadpo.select.capture import (
    AttentionRecorder,
    capture_attention,
    region_ratio,
    resolve_layer,
    sequence_ratio,
)

SELECTABLE_FORMATS = ("sequence", "grid", "pip", "single")
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise_answer(text: str) -> str:
    """Case, punctuation and whitespace removed, for "answer ≠ ground truth"."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


@dataclass(frozen=True)
class SelectionInput:
    """The first question of an augmented record, as the base model will see it."""

    id: str
    format: str
    n_images: int
    target: int
    images: tuple[str, ...]  # record paths (the clean images the pair will point at)
    prompt: str
    ground_truth: str
    box: tuple[float, ...] | None  # grid: the target tile; pip: the pasted box (pixels of the composed image)


def selection_inputs(records: Sequence[dict[str, Any]], max_answer_chars: int
                     ) -> tuple[list[SelectionInput], Counter[str]]:
    """Turn augmented records into selection inputs; count the ones set aside and why."""
    inputs: list[SelectionInput] = []
    skipped: Counter[str] = Counter()
    for record in records:
        meta = record["meta"]
        fmt = meta["format"]
        if fmt not in SELECTABLE_FORMATS:
            skipped[f"format {fmt} is not selected on"] += 1
            continue
        question, answer = record["conversations"][0]["value"], record["conversations"][1]["value"]
        if len(answer) >= max_answer_chars:
            skipped[f"ground truth of {max_answer_chars}+ characters"] += 1
            continue
        target = meta["target"][0] if isinstance(meta["target"], list) else meta["target"]
        images = record["image"] if isinstance(record["image"], list) else [record["image"]]
        box = None
        if fmt == "grid":
            box = tuple(meta["layout"]["tiles"][target - 1])
        elif fmt == "pip":
            box = tuple(meta["layout"]["box"])
        inputs.append(SelectionInput(str(record["id"]), fmt, int(meta["n_images"]), int(target), tuple(images),
                                     question, answer, box))
    return inputs, skipped


def add_noise(image: Image.Image, sigma: float, box: Sequence[float] | None, rng: np.random.Generator
              ) -> Image.Image:
    """Gaussian noise of std ``sigma`` inside ``box`` (or everywhere), in float, clipped to [0, 255]."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    if box is None:
        region = (slice(None), slice(None))
    else:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        region = (slice(y0, y1), slice(x0, x1))
    patch = pixels[region]
    pixels[region] = patch + rng.normal(0.0, sigma, size=patch.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def record_rng(seed: int, record_id: str) -> np.random.Generator:
    """A generator that depends only on (seed, record id): same noise whatever the batch or shard."""
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


@dataclass
class GeneratedAnswers:
    answers: list[list[int]]  # token ids, EOS and padding removed
    logps: list[float]  # summed log-probs of the answer tokens (and the EOS when generated)
    counts: list[int]  # tokens scored
    recorder: AttentionRecorder
    prompt_width: int  # padded prompt length (left padding)

    def image_rows(self, sample: int, prompt: EncodedSample) -> torch.Tensor:
        """Rows producing each answer token × the prompt's image-token columns (heads averaged)."""
        shift = self.prompt_width - int(prompt.input_ids.numel())
        columns = torch.cat([torch.arange(s, e) for s, e in prompt.image_spans]) + shift
        return self.recorder.rows(sample, len(self.answers[sample]), columns)


class CandidateGenerator:
    """Batch of SelectionInputs → candidate dicts (one generation that also records the selection layer)."""

    def __init__(self, adapter: ModelAdapter, cfg: SelectionConfig, roots: ImageRoots, seed: int) -> None:
        self.adapter = adapter
        self.cfg = cfg
        self.roots = roots
        self.seed = seed
        self.layer = resolve_layer(adapter, cfg.layer)

    def _images(self, item: SelectionInput) -> list[Image.Image]:
        images = [load_image(self.roots.resolve(p)) for p in item.images]
        noise: NoiseConfig | None = self.cfg.noise.get(item.format)
        if noise is None or noise.sigma <= 0:
            return images
        if noise.region not in ("target", "whole"):
            raise ValueError(f"selection.noise.{item.format}.region must be target or whole, not {noise.region!r}")
        rng = record_rng(self.seed, item.id)
        if item.format == "sequence":
            chosen = range(len(images)) if noise.region == "whole" else [item.target - 1]
            return [add_noise(im, noise.sigma, None, rng) if i in chosen else im for i, im in enumerate(images)]
        box = item.box if noise.region == "target" else None
        return [add_noise(images[0], noise.sigma, box, rng)]

    @torch.no_grad()
    def generate(self, prompts: Sequence[EncodedSample]) -> GeneratedAnswers:
        """Batched answers (left padding), their log-probs, and the selection layer's attention rows."""
        adapter, gen = self.adapter, self.cfg.generation
        batch = adapter.generation_inputs(prompts)
        sampling = {"do_sample": True, "temperature": gen.temperature, "top_p": gen.top_p} if gen.do_sample else \
            {"do_sample": False}
        recorder = AttentionRecorder(prompt_mask=batch["attention_mask"])
        with capture_attention(adapter, self.layer, recorder):
            output = adapter.model.generate(
                **batch, max_new_tokens=gen.max_new_tokens, min_new_tokens=gen.min_new_tokens,
                pad_token_id=adapter.tokenizer.pad_token_id, eos_token_id=adapter.eos_token_id,
                output_logits=True, return_dict_in_generate=True, **sampling)
        prompt_width = batch["input_ids"].shape[1]
        tokens = output.sequences[:, prompt_width:]
        logps = torch.stack(output.logits, dim=1).float().log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
        eos, pad = adapter.eos_token_id, adapter.tokenizer.pad_token_id
        answers, sums, counts = [], [], []
        for row, row_logps in zip(tokens.tolist(), logps.cpu()):
            length = row.index(eos) if eos in row else len(row)
            scored = length + (1 if length < len(row) else 0)  # the EOS, when generated, is scored too
            answers.append([t for t in row[:length] if t != pad])
            sums.append(float(row_logps[:scored].sum()))
            counts.append(scored)
        return GeneratedAnswers(answers, sums, counts, recorder, prompt_width)

    def __call__(self, items: Sequence[SelectionInput]) -> list[dict[str, Any]]:
        adapter = self.adapter
        processed = [adapter.process_images(self._images(item)) for item in items]
        prompts = [adapter.encode(images, item.prompt) for images, item in zip(processed, items)]
        generated = self.generate(prompts)
        candidates = []
        for b, (item, prompt, answer) in enumerate(zip(items, prompts, generated.answers)):
            text = adapter.tokenizer.decode(answer, skip_special_tokens=True).strip()
            rows = generated.image_rows(b, prompt)
            column_attention = rows.mean(0).numpy() if len(answer) else None
            ratio, image_scores = self._ratio(item, prompt, column_attention)
            candidates.append({
                "id": item.id, "format": item.format, "n_images": item.n_images, "target": item.target,
                "images": list(item.images), "prompt": item.prompt, "ground_truth": item.ground_truth,
                "answer": text, "answer_tokens": len(answer),
                "ground_truth_tokens": len(adapter.tokenizer(item.ground_truth, add_special_tokens=False)["input_ids"]),
                "logp": generated.logps[b],
                "perplexity": math.exp(-generated.logps[b] / max(1, generated.counts[b])),
                "correct": normalise_answer(text) == normalise_answer(item.ground_truth),
                "ratio": ratio, "image_scores": image_scores, "layer": self.layer,
            })
            if self.cfg.save_attention_maps and column_attention is not None:
                candidates[-1]["attention_maps"] = attention_maps(prompt, column_attention)
        return candidates

    def _ratio(self, item: SelectionInput, prompt: EncodedSample, column_attention: np.ndarray | None
               ) -> tuple[float | None, list[float] | None]:
        if column_attention is None:
            return None, None
        if item.format in ("sequence", "single"):
            offsets = np.cumsum([0] + [end - start for start, end in prompt.image_spans])
            ratio, scores = sequence_ratio(column_attention, list(zip(offsets[:-1], offsets[1:])), item.target)
            return ratio, scores
        assert item.box is not None
        coverage = prompt.geometries[0].token_coverage(item.box)
        return region_ratio(column_attention, coverage), None


def attention_maps(prompt: EncodedSample, column_attention: np.ndarray) -> list[dict[str, Any]]:
    """Each image's attention on its tokens, as row-major grids (one per view of the image)."""
    maps, offset = [], 0
    for (start, end), geometry in zip(prompt.image_spans, prompt.geometries):
        values = column_attention[offset : offset + end - start]
        maps.append({"grids": [{"rows": g.rows, "cols": g.cols, "values": values[g.token_positions()].ravel().tolist()}
                               for g in geometry.grids]})
        offset += end - start
    return maps
