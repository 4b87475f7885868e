"""Rows of a Hugging Face dataset split from local files, and the bad-row policy every benchmark reader shares.

Three local layouts are read, never downloaded:

- the dataset repository as published (``huggingface-cli download <repo> --repo-type dataset --local-dir D`` or a
  git clone): ``D/<config>/<split>-00000-of-00001.parquet`` (MMMU, BLINK, Mantis-Eval) or
  ``D/data/<split>-*.parquet`` (MuirBench);
- the hub cache of the same download, ``.../hub/datasets--<org>--<name>``: its ``snapshots/<revision>/`` (the one
  ``refs/main`` names, else the newest) is read as above;
- ``datasets``' own cache after ``load_dataset``: ``.../datasets/<org>___<name>/<config>/<version>/<hash>/
  <name>-<split>.arrow`` (or ``-<split>-00000-of-0000N.arrow``), Arrow stream files; where a config is cached in
  several ``<version>/<hash>`` folders, one is read (``eval.datasets_cache_version``, else the newest, with a
  warning naming them all).

Image columns hold ``datasets``' image structs ``{"bytes": ..., "path": ...}``: the bytes are kept (encoded) and
decoded when the item is answered; a struct with only a path names a file beside the table file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from miadpo.data.images import MISSING, ImageError, ImageOptions
from miadpo.data.pairs import BadRecord, BadRecordReport
from miadpo.eval.items import EvalItem
from miadpo.eval.sources import EncodedImage, ImageFile, ImageSource

log = logging.getLogger(__name__)


class BadRowError(ValueError):
    """A row a reader cannot turn into an item (its message is the reason)."""


def _import_pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError as exc:
        raise ImportError("reading the benchmarks' parquet / arrow files needs pyarrow: "
                          "pip install 'miadpo[benchmarks]'") from exc
    return pyarrow


def dataset_root(root: Path) -> Path:
    """``root``, or the snapshot it holds when ``root`` is a hub cache folder (``datasets--org--name``)."""
    snapshots = root / "snapshots"
    if not snapshots.is_dir():
        return root
    main = root / "refs" / "main"
    if main.is_file() and (snapshots / main.read_text().strip()).is_dir():
        return snapshots / main.read_text().strip()
    revisions = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    if not revisions:
        raise FileNotFoundError(f"{root}: a hub cache folder with no snapshot in {snapshots}")
    return revisions[-1]


def split_files(root: Path, split: str, benchmark: str, cache_version: str | None = None) -> list[Path]:
    """The parquet files of ``split`` under ``root`` (any layout above), else its arrow files, in path order;
    FileNotFoundError naming what was looked for. In ``datasets``' cache one config's split may be cached in several
    ``<version>/<hash>`` folders: one is read (``cache_version``, else the newest: :func:`one_cached_version`)."""
    if not root.is_dir():
        raise FileNotFoundError(f"{benchmark}: directory not found: {root}")
    base = dataset_root(root)
    parquet = sorted(p for p in base.rglob(f"{split}-*.parquet") if p.is_file())
    if parquet:
        return parquet
    arrow = sorted(p for p in base.rglob("*.arrow") if p.is_file() and (
        p.stem.endswith(f"-{split}") or f"-{split}-" in p.stem))
    if arrow:
        return one_cached_version(arrow, benchmark, cache_version)
    raise FileNotFoundError(f"{benchmark}: no {split!r} split under {base}: looked for {split}-*.parquet (the "
                            f"dataset repository's layout) and *-{split}.arrow (datasets' cache)")


def one_cached_version(files: list[Path], benchmark: str, cache_version: str | None) -> list[Path]:
    """Of arrow files laid out as ``<config>/<version>/<hash>/<file>``, those of one ``<version>/<hash>`` folder per
    config: the one ``cache_version`` names (its hash or ``<version>/<hash>``), else the newest by modification
    time, with a warning naming every folder found; ValueError if ``cache_version`` names none of them."""
    by_config: dict[Path, dict[Path, list[Path]]] = {}
    for path in files:
        folder = path.parent
        by_config.setdefault(folder.parent.parent, {}).setdefault(folder, []).append(path)
    chosen: list[Path] = []
    for config, folders in by_config.items():
        if len(folders) == 1:
            chosen += next(iter(folders.values()))
            continue
        names = {folder: f"{folder.parent.name}/{folder.name}" for folder in folders}
        if cache_version is not None:
            picked = [f for f in folders if cache_version in (f.name, names[f])]
            if not picked:
                raise ValueError(f"{benchmark}: eval.datasets_cache_version={cache_version!r} is none of the cached "
                                 f"versions of {config}: {', '.join(sorted(names.values()))}")
            folder = picked[0]
        else:
            folder = max(folders, key=lambda f: max(p.stat().st_mtime for p in folders[f]))
            log.warning("%s: %s holds %d cached versions (%s); reading the newest, %s (eval.datasets_cache_version "
                        "picks another)", benchmark, config, len(folders), ", ".join(sorted(names.values())),
                        names[folder])
        chosen += folders[folder]
    return sorted(chosen)


def _arrow_table(path: Path) -> Any:
    pa = _import_pyarrow()
    try:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_file(source).read_all()


def read_table(path: Path, columns: tuple[str, ...]) -> list[dict[str, Any]]:
    """The rows of one parquet or arrow file as dicts; ValueError naming the file if it cannot be read or lacks
    one of ``columns``."""
    pa = _import_pyarrow()
    try:
        table = pa.parquet.read_table(path) if path.suffix == ".parquet" else _arrow_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: not a readable {path.suffix[1:]} file ({exc})") from exc
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(map(repr, missing))} "
                         f"(columns: {', '.join(table.column_names)})")
    return table.to_pylist()


def image_cell(value: Any, file: Path, label: str, options: ImageOptions) -> ImageSource:
    """A ``datasets`` image struct (``{"bytes", "path"}``) as a checked source; ImageError if it holds no usable
    image."""
    if not isinstance(value, dict):
        raise ImageError(MISSING, label, detail=f"not an image struct ({type(value).__name__})")
    source: ImageSource
    if value.get("bytes"):
        source = EncodedImage(value["bytes"], label)
    elif value.get("path"):
        source = ImageFile(file.parent / value["path"], f"image struct path of {label}")
    else:
        raise ImageError(MISSING, label, detail="empty image struct")
    source.check(options)
    return source


def image_columns(row: dict[str, Any], count: int, file: Path, number: int, options: ImageOptions
                  ) -> list[ImageSource | None]:
    """The row's ``image_1`` … ``image_<count>`` as sources, ``None`` where a column is null or absent: slot ``k``
    is column ``image_k`` (``<image k>`` references are bound to it, ``miadpo.eval.items.place_images``)."""
    return [None if row.get(f"image_{k}") is None
            else image_cell(row[f"image_{k}"], file, f"{file}:{number} image_{k}", options)
            for k in range(1, count + 1)]


Row = tuple[Path, int, dict[str, Any]]  # file, row number (from 1), the row
Builder = Callable[[dict[str, Any], Path, int], "EvalItem | None"]


def collect(rows: Iterable[Row], build: Builder, report: BadRecordReport,
            id_key: str | Callable[[dict[str, Any], int], str]) -> list[EvalItem]:
    """``build(row, file, number)`` for each row. A row that raises BadRowError, ImageError or a malformed-value
    error goes to ``report`` as ``file:row (id=<id>): reason`` (skipped and counted, or stop, by its policy), the id
    being ``row[id_key]``, or ``id_key(row, number)`` for benchmarks whose item ids are not a column; a builder
    returning None leaves its row out uncounted (a row the benchmark itself excludes)."""
    items = []
    for file, number, row in rows:
        report.total += 1
        try:
            item = build(row, file, number)
        except (BadRowError, ImageError, KeyError, TypeError, ValueError, SyntaxError) as exc:
            reason = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            row_id = id_key(row, number) if callable(id_key) else row.get(id_key)
            report.add(BadRecord(str(file), number, None if row_id is None else str(row_id), reason))
            continue
        if item is None:
            report.total -= 1
            continue
        item.where = item.where or f"{file}:{number}"
        items.append(item)
    return items


def table_rows(files: list[Path], columns: tuple[str, ...]) -> Iterator[Row]:
    """(file, row number from 1, row) of each file in turn."""
    for file in files:
        for number, row in enumerate(read_table(file, columns), start=1):
            yield file, number, row


def text_cell(row: dict[str, Any], key: str) -> str:
    """A string cell; BadRowError if it is missing or not text."""
    value = row.get(key)
    if not isinstance(value, str):
        raise BadRowError(f"{key!r} is {'missing' if value is None else type(value).__name__}, not text")
    return value
