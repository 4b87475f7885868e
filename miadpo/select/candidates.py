"""Candidates: the base model's greedy answers to augmented prompts, with log-probs and attention statistics.

For a batch of augmented records: load (and optionally corrupt) the images and generate with left padding.
While generating, the selection layer alone records its attention rows (see ``capture``) and the raw logits
give each answer token's log-prob; nothing runs a second time.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from miadpo.augment.formats import retarget_question
from miadpo.augment.noise import record_rng
from miadpo.augment.records import AugmentedRecord
from miadpo.augment.registry import FORMATS, format_named
from miadpo.augment.runner import RECORDS_FILE
from miadpo.config import DataConfig, NoiseConfig, SelectionConfig
from miadpo.data.images import ImageOptions, check_record_image
from miadpo.data.pairs import BadRecord, BadRecordReport, ImageRoots, load_record_images
from miadpo.models.base import ModelAdapter
from miadpo.models.logprobs import token_logprobs
from miadpo.models.samples import IGNORE_INDEX, EncodedSample
from miadpo.select.capture import (
    AttentionRecorder,
    capture_attention,
    region_ratio,
    resolve_layer,
    sequence_ratio,
)
from miadpo.select.records import Candidate, ExtraAnswer
from miadpo.text import normalise_answer


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
    rejected_images: tuple[str, ...] | None = None  # the image-side negative (data.augment.negatives), if any


def selection_inputs(records: Sequence[dict[str, Any]], max_answer_chars: int, data: DataConfig | None = None
                     ) -> tuple[list[SelectionInput], Counter[str]]:
    """Turn augmented records into selection inputs; count the ones set aside and why.

    With ``data`` (the recipe whose ``records.jsonl`` these are), every image of a record to be answered is checked
    by the loader of ``miadpo.data.images`` (decoded under ``data.check_images``, else opened): a record with a missing,
    corrupt, truncated or (``on_large_image=skip``) too large image is a bad record (records.jsonl:line (id):
    reason) under ``data.on_bad_record`` / ``data.max_bad_fraction``, counted under its reason; the others proceed.
    """
    inputs: list[SelectionInput] = []
    skipped: Counter[str] = Counter()
    checker = _ImageChecker(data) if data is not None else None
    for line, record in enumerate(records, start=1):  # records.jsonl holds one record a line
        try:
            augmented = AugmentedRecord.from_json(record)
        except ValueError as error:
            raise ValueError(f"{RECORDS_FILE}:{line} (id={record.get('id')}): {error}") from None
        meta, fmt = augmented.meta, augmented.meta.format
        if fmt not in FORMATS or not FORMATS[fmt].selectable:
            skipped[f"format {fmt} is not selected on"] += 1
            continue
        question, answer = augmented.conversations[0]["value"], augmented.conversations[1]["value"]
        if len(answer) >= max_answer_chars:
            skipped[f"ground truth of {max_answer_chars}+ characters"] += 1
            continue
        target, images, rejected = meta.first_target, augmented.images, augmented.rejected_images
        if checker is not None and (reason := checker(line, augmented.id, [*images, *(rejected or ())])) is not None:
            skipped[reason] += 1
            continue
        box = FORMATS[fmt].selection_box(meta.layout, target)
        inputs.append(SelectionInput(augmented.id, fmt, int(meta.n_images), target, tuple(images), question, answer,
                                     box, None if rejected is None else tuple(rejected)))
    if checker is not None:
        checker.report.finish()
    return inputs, skipped


class _ImageChecker:
    """The images of augmented records, checked before generation; bad records to a "selection" report."""

    def __init__(self, data: DataConfig) -> None:
        self.roots = ImageRoots.of(data)
        self.options = ImageOptions.of(data)
        self.decode = bool(data.check_images)
        self.file = str(Path(data.out_dir) / RECORDS_FILE)
        self.report = BadRecordReport(data.on_bad_record, data.max_bad_fraction, stage="selection")

    def __call__(self, line: int, record_id: str, images: Sequence[str]) -> str | None:
        """None if every image is usable; else the reason (reported: raises under on_bad_record=error)."""
        self.report.total += 1
        try:
            for rel in images:
                check_record_image(self.roots, rel, self.options, decode=self.decode)
        except ValueError as exc:  # ImageError, or a path refused by ImageRoots
            self.report.add(BadRecord(self.file, line, record_id, str(exc)))
            return str(exc).split(":")[0]
        return None


@dataclass
class GeneratedAnswers:
    """One generation batch: the answers' token ids and log-probs, the captured attention and the first token's
    log-probs."""

    answers: list[list[int]]  # token ids, EOS and padding removed
    logps: list[float]  # summed log-probs of the answer tokens (and the EOS when generated)
    counts: list[int]  # tokens scored
    recorder: AttentionRecorder
    prompt_width: int  # padded prompt length (left padding)
    first_logps: torch.Tensor  # (batch, vocab): log-probs of the first answer token

    def image_rows(self, sample: int, prompt: EncodedSample) -> torch.Tensor:
        """Rows producing each answer token × the prompt's image-token columns (heads averaged)."""
        shift = self.prompt_width - int(prompt.input_ids.numel())
        columns = torch.cat([torch.arange(s, e) for s, e in prompt.image_spans]) + shift
        return self.recorder.rows(sample, len(self.answers[sample]), columns)


class CandidateGenerator:
    """Batch of SelectionInputs → Candidates (one generation that also records the selection layer)."""

    def __init__(self, adapter: ModelAdapter, cfg: SelectionConfig, roots: ImageRoots, seed: int,
                 images: ImageOptions | None = None) -> None:
        self.adapter = adapter
        self.cfg = cfg
        self.roots = roots
        self.seed = seed
        self.images = images or ImageOptions()  # the data recipe's pixel cap (ImageOptions.of(data))
        self.layer = resolve_layer(adapter, cfg.layer)

    def _images(self, item: SelectionInput) -> list[Image.Image]:
        images = load_record_images(self.roots, item.images, self.images, f"selection input {item.id}")
        noise: NoiseConfig | None = self.cfg.noise.get(item.format)
        if noise is None or noise.sigma <= 0:
            return images
        return format_named(item.format).noisy_inputs(images, noise, item.target, item.box,
                                                      record_rng(self.seed, item.id))

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
        logps = token_logprobs(torch.stack(output.logits, dim=1), tokens)
        eos, pad = adapter.eos_token_id, adapter.tokenizer.pad_token_id
        answers, sums, counts = [], [], []
        for row, row_logps in zip(tokens.tolist(), logps.cpu()):
            length = row.index(eos) if eos in row else len(row)
            scored = length + (1 if length < len(row) else 0)  # the EOS, when generated, is scored too
            answers.append([t for t in row[:length] if t != pad])
            sums.append(float(row_logps[:scored].sum()))
            counts.append(scored)
        first_logps = output.logits[0].float().log_softmax(-1).cpu()
        return GeneratedAnswers(answers, sums, counts, recorder, prompt_width, first_logps)

    def __call__(self, items: Sequence[SelectionInput]) -> list[Candidate]:
        """The candidate (answer, attention ratio, perplexity, extra answers) of each selection input."""
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
            candidates.append(Candidate(
                id=item.id, format=item.format, n_images=item.n_images, target=item.target,
                images=list(item.images), prompt=item.prompt, ground_truth=item.ground_truth,
                answer=text, answer_tokens=len(answer),
                ground_truth_tokens=len(adapter.tokenizer(item.ground_truth, add_special_tokens=False)["input_ids"]),
                logp=generated.logps[b],
                perplexity=math.exp(-generated.logps[b] / max(1, generated.counts[b])),
                correct=normalise_answer(text) == normalise_answer(item.ground_truth),
                ratio=ratio, image_scores=image_scores, layer=self.layer,
                rejected_images=None if item.rejected_images is None else list(item.rejected_images),
            ))
            if self.cfg.save_attention_maps and column_attention is not None:
                candidates[-1].attention_maps = attention_maps(prompt, column_attention)
        if self.cfg.right_answer_negatives == "other_image":
            self._add_other_image_answers(items, processed, candidates)
        elif self.cfg.right_answer_negatives == "runner_up":
            self._add_runner_up_answers(prompts, generated, candidates)
        return candidates

    def _add_runner_up_answers(self, prompts: Sequence[EncodedSample], generated: GeneratedAnswers,
                               candidates: list[Candidate]) -> None:
        """For right answers: the greedy answer that starts with the model's second most likely first token —
        its own strongest alternative (for a model torn between two images, the other image's answer)."""
        asked = [b for b, c in enumerate(candidates) if c.correct and generated.answers[b]]
        if not asked:
            return
        starts: list[tuple[int, float]] = []
        for b in asked:
            first = generated.first_logps[b].clone()
            first[generated.answers[b][0]] = -math.inf
            first[self.adapter.eos_token_id] = -math.inf
            token = int(first.argmax())
            starts.append((token, float(first[token])))
        extended = [replace(prompts[b], input_ids=torch.cat([prompts[b].input_ids, torch.tensor([token])]),
                            labels=torch.cat([prompts[b].labels, torch.tensor([IGNORE_INDEX])]))
                    for b, (token, _) in zip(asked, starts)]
        rest = self.generate(extended)
        for b, (token, first_logp), tail, logp, count in zip(asked, starts, rest.answers, rest.logps, rest.counts):
            answer = [token, *tail]
            total = first_logp + logp
            candidates[b].negative = ExtraAnswer(
                kind="runner_up", asked_about=None,
                answer=self.adapter.tokenizer.decode(answer, skip_special_tokens=True).strip(),
                answer_tokens=len(answer), logp=total, perplexity=math.exp(-total / (count + 1)))

    def _add_other_image_answers(self, items: Sequence[SelectionInput], processed: Sequence[Any],
                                 candidates: list[Candidate]) -> None:
        """For right answers (Sequence, Grid): the answer to the same question about another image, drawn per
        (seed, record) — the element-interference answer the pair will reject when it differs from the truth."""
        asked = [(b, item) for b, item in enumerate(items) if candidates[b].correct and item.n_images > 1
                 and format_named(item.format).interference]
        if not asked:
            return
        others = []
        for _, item in asked:
            choices = [k for k in range(1, item.n_images + 1) if k != item.target]
            others.append(choices[int(record_rng(self.seed, f"{item.id}:other_image").integers(len(choices)))])
        prompts = [self.adapter.encode(processed[b], retarget_question(item.prompt, item.target, other))
                   for (b, item), other in zip(asked, others)]
        generated = self.generate(prompts)
        for (b, _), other, answer, logp, count in zip(asked, others, generated.answers, generated.logps,
                                                      generated.counts):
            candidates[b].negative = ExtraAnswer(
                kind="other_image", asked_about=other,
                answer=self.adapter.tokenizer.decode(answer, skip_special_tokens=True).strip(),
                answer_tokens=len(answer), logp=logp, perplexity=math.exp(-logp / max(1, count)))

    def _ratio(self, item: SelectionInput, prompt: EncodedSample, column_attention: np.ndarray | None
               ) -> tuple[float | None, list[float] | None]:
        if column_attention is None:
            return None, None
        if not format_named(item.format).composite:
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
