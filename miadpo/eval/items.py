"""Evaluation items: LLaVA-format test files and VLMEvalKit-style multiple-choice TSVs → ``EvalItem``.

Open questions keep their answer; multiple-choice rows are read, prompted and ordered by VLMEvalKit's rules
(base64 or shared images or image files, options A–Z, ``<image k>`` and ``<image>`` markers in place, circular
evaluation for MMBench-like names, per-category groups). An item holds references to its images
(``miadpo.eval.sources``), checked when read (file found, header readable) and decoded when answered; a record or
row whose image cannot be used goes to the ``BadRecordReport`` (skipped and counted, or an error).
"""

from __future__ import annotations

import ast
import csv
import logging
import re
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from miadpo.augment.registry import FORMATS
from miadpo.data.images import MISSING, ImageError, ImageOptions, resolve_record_image
from miadpo.data.jsonl import iter_raw_records
from miadpo.data.pairs import BadRecord, BadRecordError, BadRecordReport, ImageRoots
from miadpo.eval.sources import EncodedImage, ImageFile, ImageSource, load_sources

LETTERS = tuple(string.ascii_uppercase)  # option columns, in order
IMAGE_MARKER = "<image>"
NUMBERED_IMAGE = re.compile(r"<image (\d+)>")  # MMMU's references to the row's k-th image
CIRCULAR_NAMES = ("mmbench", "ccbench", "circular", "mmcr")
# pandas' default NA strings: VLMEvalKit reads TSVs with pd.read_csv, so these cells are NaN (empty) there.
NA_CELLS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                      "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})
csv.field_size_limit(sys.maxsize)
log = logging.getLogger(__name__)
_OUTSIDE_TSV_FOLDER: set[Path] = set()  # TSV folders an image_path was seen leaving (logged once each)


@dataclass
class EvalItem:
    """One evaluation question: its image sources, prompt and answer (an option letter with ``options``, else the open
    answer), and the groups it is scored in."""

    id: str
    group: str  # "single", "sequence N=3", "tsv:<name>", "mmmu", ...
    sources: list[ImageSource]  # the images in prompt order (a video source gives several frames)
    prompt: str
    answer: str  # an option letter when ``options``, else the open answer
    image_paths: list[str] = field(default_factory=list)
    target: int = 1
    options: dict[str, str] = field(default_factory=dict)
    extra_groups: tuple[str, ...] = ()  # further groups scored with this item ("tsv:<name>/<category>", ...)
    circular_group: str | None = None  # circular TSVs: the index of the row this one rotates (index % 1e6)
    # Open questions with several accepted answers (MMMU's list-literal answers), scored by MMMU's own open-answer
    # rule (``miadpo.eval.open_answers``) instead of exact match.
    accepted: tuple[str, ...] = ()
    # The benchmark's published item count (its items evaluated against it decide whether it counts in the
    # multi-image mean); None outside the paper's benchmarks.
    published: int | None = None
    where: str = ""  # file:line of the record, for messages

    def load_images(self, options: ImageOptions | None = None) -> list[Image.Image]:
        """The decoded images (``miadpo.data.images``); ImageError if one cannot be."""
        return load_sources(self.sources, options or ImageOptions())

    def bad(self, reason: str) -> BadRecord:
        """This item as a bad record (file:line (id): reason)."""
        file, _, line = self.where.rpartition(":")
        return BadRecord(file or self.where, int(line) if line.isdigit() else 0, self.id, reason)


def record_image(roots: ImageRoots, rel: str, options: ImageOptions) -> ImageFile:
    """A record's image path as a checked source (ImageError or ValueError if missing, unreadable or outside the
    roots)."""
    path, where = resolve_record_image(roots, rel)
    source = ImageFile(path, where)
    source.check(options)
    return source


def llava_items(path: Path, roots: ImageRoots, report: BadRecordReport | None = None,
                image_options: ImageOptions | None = None) -> list[EvalItem]:
    """First question of each record; augmented records are grouped by format and N.

    A record whose image cannot be used (``miadpo.data.images``: missing, corrupt, truncated, too large) goes to
    ``report`` (skipped and counted, or raised, by its policy; the caller calls ``report.finish()``); without a
    report it raises BadRecordError naming file:line (id) and the image."""
    items, options = [], image_options or ImageOptions()
    for raw in iter_raw_records(path):
        if raw.error is not None:
            raise ValueError(f"{path}:{raw.line}: {raw.error}")
        record = raw.value
        if report is not None:
            report.total += 1
        image = record.get("image")
        paths = [] if image is None else ([image] if isinstance(image, str) else list(image))
        meta = record.get("meta") or {}
        fmt = FORMATS.get(meta.get("format", ""))
        if meta and (fmt is None or fmt.multi_image):
            group = f"{meta['format']} N={meta['n_images']}"
        else:
            group = "single" if len(paths) == 1 else f"{len(paths)} images"
        target = meta.get("target", 1)
        try:
            sources = [record_image(roots, p, options) for p in paths]
        except ValueError as exc:  # ImageError, or a path refused by ImageRoots
            bad = BadRecord(str(path), raw.line, str(record.get("id")), str(exc))
            if report is None:
                raise BadRecordError(f"[eval] {bad}") from exc
            report.add(bad)
            continue
        items.append(EvalItem(str(record["id"]), group, sources,
                              record["conversations"][0]["value"], record["conversations"][1]["value"],
                              list(meta.get("inputs") or paths), target[0] if isinstance(target, list) else target,
                              where=f"{path}:{raw.line}"))
    return items


def _missing(cell: str | None) -> bool:
    """Whether a cell is empty, as pandas' ``read_csv`` (VLMEvalKit's TSV loader) reads it: "", "nan", "None"..."""
    return cell is None or cell in NA_CELLS


def _cell_list(cell: str) -> list[str]:
    """VLMEvalKit's ``toliststr``: a cell written as a Python list literal is a list, any other cell one item."""
    cell = cell.strip()
    if len(cell) > 1 and cell[0] == "[" and cell[-1] == "]":
        return [str(x) for x in ast.literal_eval(cell)]
    return [cell]


def _cell_sources(cell: str, name: str, options: ImageOptions) -> list[ImageSource]:
    """The base64 images of a cell as checked sources; ImageError naming ``name`` if one cannot be used."""
    sources: list[ImageSource] = []
    for k, data in enumerate(_cell_list(cell), start=1):
        source = EncodedImage(data, f"{name} (image {k})", base64=True)
        source.check(options)
        sources.append(source)
    return sources


def _image_file(value: str, tsv: Path) -> Path:
    """An ``image_path`` entry: absolute as given; relative to the TSV's folder, else to ``images/<stem>/`` beside
    it (VLMEvalKit's ``$LMUData/images/<dataset>`` next to ``$LMUData/<dataset>.tsv``); ImageError if none is."""
    given = Path(value)
    tried = [given] if given.is_absolute() else [tsv.parent / given, tsv.parent / "images" / tsv.stem / given]
    for candidate in tried:
        if candidate.is_file():
            folder = tsv.parent.resolve()
            if folder not in _OUTSIDE_TSV_FOLDER and not candidate.resolve().is_relative_to(folder):
                _OUTSIDE_TSV_FOLDER.add(folder)
                log.warning("%s: image_path %r is outside the TSV's folder (%s): used, as VLMEvalKit does (said "
                            "once per folder)", tsv, value, candidate.resolve())
            return candidate
    raise ImageError(MISSING, f"image_path {value!r} not found", f"tried {', '.join(str(p) for p in tried)}")


def _row_images(row: dict[str, str], cell: str | None, tsv: Path, row_number: int,
                options: ImageOptions) -> list[ImageSource]:
    if cell is not None:
        return _cell_sources(cell, f"{tsv}:{row_number} image cell", options)
    sources = [ImageFile(_image_file(p, tsv)) for p in _cell_list(row["image_path"])]
    for source in sources:
        source.check(options)
    return sources


def _image_cells(rows: list[tuple[int, dict[str, str]]], tsv: Path) -> dict[int, str]:
    """Row number → its image cell, with index references replaced by the referenced row's cell."""
    by_index = {(row.get("index") or "").strip(): row["image"] for _, row in rows}
    cells = {}
    for number, row in rows:
        cell = row["image"]
        if len(cell) <= 64:
            target = by_index.get(cell.strip())
            if target is None or len(target) <= 64:
                raise ValueError(f"{tsv}:{number}: image cell {cell!r} is no image and names no row with one")
            cell = target
        cells[number] = cell
    return cells


def place_images(text: str, images: list[Any]) -> tuple[str, list[Any]]:
    """The prompt with one ``<image>`` marker per image, and the images in marker order (rules in tsv_items).

    ``images[k - 1]`` is the row's image ``k``; ``None`` marks an empty slot (a null ``image_k`` column of a
    benchmark table), so ``<image k>`` stays bound to slot ``k`` whatever is empty before it; citing an empty slot
    is an error, and without references the empty slots are left out."""
    references = [int(k) for k in NUMBERED_IMAGE.findall(text)]
    if references:
        if IMAGE_MARKER in NUMBERED_IMAGE.sub("", text):
            raise ValueError("the prompt mixes <image k> references and bare <image> markers")
        if any(not 1 <= k <= len(images) for k in references):
            raise ValueError(f"the prompt refers to images {references} but the row has {len(images)}")
        empty = sorted({k for k in references if images[k - 1] is None})
        if empty:
            raise ValueError(f"the prompt cites {', '.join(f'<image {k}>' for k in empty)} but the row's "
                             f"image_{empty[0]} is empty (null)")
        return NUMBERED_IMAGE.sub(IMAGE_MARKER, text), [images[k - 1] for k in references]
    images = [image for image in images if image is not None]
    markers = text.count(IMAGE_MARKER)
    if markers:
        segments = text.split(IMAGE_MARKER)
        kept = min(markers, len(images))
        return IMAGE_MARKER.join(segments[: kept + 1]) + "".join(segments[kept + 1 :]), images[:kept]
    return f"{IMAGE_MARKER}\n" * len(images) + text, images


def mcq_text(row: dict[str, str], options: dict[str, str], muir: bool) -> str:
    """VLMEvalKit's multiple-choice prompt (rules in ``tsv_items``); ``row`` holds ``question`` and maybe ``hint``."""
    if muir:  # MUIRDataset.build_prompt
        text = f"{row['question']}\n"
        if options:
            text += "\n".join(f"{k}. {v}" for k, v in options.items())
            text += "\nAnswer with the option's letter from the given choices directly."
        return text
    text = "" if _missing(row.get("hint")) else f"Hint: {row['hint']}\n"  # ImageMCQDataset.build_prompt
    text += f"Question: {row['question']}\n"
    if options:
        text += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items())
        text += "Please select the correct answer from the options above. \n"
    return text


def is_circular(name: str) -> bool:
    """VLMEvalKit's test (ImageMCQDataset.evaluate_heuristic): the dataset name holds one of these words."""
    return any(word in name.lower() for word in CIRCULAR_NAMES)


def tsv_items(path: Path, report: BadRecordReport | None = None, image_options: ImageOptions | None = None
              ) -> list[EvalItem]:
    """The rows of a VLMEvalKit multiple-choice TSV, following VLMEvalKit's rules (read in open-compass/VLMEvalKit:
    vlmeval/dataset/image_base.py, vlmeval/dataset/image_mcq.py, vlmeval/dataset/utils/multiple_choice.py,
    vlmeval/smp/misc.py, vlmeval/smp/file.py). The dataset name is the file's stem.

    - Cells: tab-separated with a header (a UTF-8 BOM skipped, CRLF line ends read) (``index``, ``question``,
      ``answer``, options, images, optional ``hint``, ``category``, ``l2-category``, ``split``, ``g_index``); a cell
      pandas reads as NaN ("", "nan", "None", "NA", ...) is empty. Options: every single capital letter column A–Z
      with a non-empty cell, in letter order.
    - Images: an ``image`` cell is base64 or a list literal of base64 strings; a non-empty cell of at most 64
      characters is the ``index`` of another row, whose (long) cell it shares (MMBench stores each image once).
      With an ``image`` column, rows with an empty cell are skipped (``skip_noimg``). Without one, ``image_path``
      (a path or a list literal of paths) names files: absolute as given, relative to the TSV's folder, else to
      ``images/<stem>/`` beside it (VLMEvalKit reads them relative to the working directory or ``$LMUData/images/
      <dataset>``). With both columns the base64 ``image`` is used. Images are decoded by ``miadpo.data.images``; a row
      whose image cannot be used (a missing file, bad base64, a corrupt or too large image) goes to ``report``
      (skipped and counted, or raised, by its policy; id = the row's ``index``), else is an error naming file:row.
    - Prompt: ImageMCQDataset.build_prompt, ``Hint: <hint>\\n`` (if any) ``Question: <question>\\nOptions:\\nA.
      <A>\\n...Please select the correct answer from the options above. \\n`` (no Options part without options);
      for the dataset ``MUIRBench``, MUIRDataset's ``<question>\\nA. <A>\\n...\\nAnswer with the option's letter
      from the given choices directly.`` (no hint).
    - Image placement (our ``<image>`` marker stands for one image). ``<image k>`` references (MMMU,
      MMMUDataset.split_MMMU): each becomes a marker for image k, so images follow the order of the references,
      an image referenced twice is given twice and an unreferenced one is dropped. Else bare ``<image>`` markers
      (MUIRBench, MUIRDataset.split_MUIR): the i-th marker is the i-th image, markers beyond the images are
      removed, images beyond the markers dropped. Else one marker per image before the text, in cell order.
      VLMEvalKit does either split only for those datasets; we do it for any TSV whose prompt holds markers.
    - MMMU (``MMMU`` in the name; MMMU_preproc): a row with no option A is an open question scored as the
      options {A: <answer>, B: "Other Answers"} (the prompt keeps no options), and a non-letter answer is "A".
    - A row whose answer is none of its options (``E`` for A–D, empty, free text) could never be scored right: a
      bad row (``report``: skipped and counted, by its policy).
    - Circular evaluation (``mmbench``, ``ccbench``, ``circular`` or ``mmcr`` in the name, any case): ``index`` is
      an integer and the group is ``g_index`` if given, else ``index % 1e6``; ``score`` counts a group right
      only if all its rows are, over groups with a row whose index is the group (that row gives the category).
    - Groups: ``tsv:<stem>``, and ``tsv:<stem>/<value>`` for the ``category`` and ``l2-category`` values and
      ``tsv:<stem>/split=<value>`` for ``split`` values (VLMEvalKit's report_acc).
    """
    with path.open(newline="", encoding="utf-8-sig") as handle:  # a BOM is skipped, as VLMEvalKit's reader does
        reader = csv.DictReader(handle, delimiter="\t")
        rows = list(reader)
        columns = set(reader.fieldnames or ())
    name = path.stem
    circular, mmmu, muir = is_circular(name), "MMMU" in name, name == "MUIRBench"
    if "image" in columns:
        kept = [(n, row) for n, row in enumerate(rows, start=2) if not _missing(row["image"])]
        cells = _image_cells(kept, path)
        numbered = [(n, row, cells[n]) for n, row in kept]
    elif "image_path" in columns:
        numbered = [(n, row, None) for n, row in enumerate(rows, start=2)]
    else:
        raise ValueError(f"{path}: no image or image_path column")
    items, mains, image_options = [], {}, image_options or ImageOptions()
    for row_number, row, cell in numbered:
        if report is not None:
            report.total += 1
        try:
            images = _row_images(row, cell, path, row_number, image_options)
        except ImageError as exc:
            if report is None:
                raise ValueError(f"{path}:{row_number}: {exc}") from exc
            report.add(BadRecord(str(path), row_number, (row.get("index") or "").strip() or None, str(exc)))
            continue
        except (KeyError, ValueError, SyntaxError, TypeError) as exc:
            raise ValueError(f"{path}:{row_number}: {exc}") from exc
        try:
            options = {k: row[k] for k in LETTERS if k in columns and not _missing(row[k])}
            answer = row["answer"].strip()
            prompt, images = place_images(mcq_text(row, options, muir), images)
            if mmmu and "A" not in options:
                options = {"A": answer, "B": "Other Answers"}
            if mmmu and answer not in LETTERS:
                answer = "A"
            if options and answer not in options:
                reason = f"answer {answer!r} is not one of the options {', '.join(options)}"
                if report is None:
                    raise ValueError(reason)
                report.add(BadRecord(str(path), row_number, row["index"].strip() or None, reason))
                continue
            index, group = row["index"].strip(), None
            if circular:
                index = str(int(index))
                group = str(int(row["g_index"]) if not _missing(row.get("g_index")) else int(index) % 1_000_000)
            extra = [f"tsv:{name}/{row[c]}" for c in ("category", "l2-category") if not _missing(row.get(c))]
            extra += [f"tsv:{name}/split={row['split']}"] if not _missing(row.get("split")) else []
            item = EvalItem(index, f"tsv:{name}", images, prompt, answer, options=options,
                            extra_groups=tuple(dict.fromkeys(extra)), circular_group=group,
                            where=f"{path}:{row_number}")
            if circular and group == index:
                mains[index] = item
            items.append(item)
        except (KeyError, ValueError, OSError, SyntaxError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}:{row_number}: {exc}") from exc
    for item in items:  # a rotation is reported under its main row's category, as VLMEvalKit reports data_main
        if item.circular_group in mains:
            item.extra_groups = mains[item.circular_group].extra_groups
    return items
