"""Reliability of the caches and stage directories: weights identified by content, skipped compositions retried
once their inputs are fixed, one writer per stage directory, empty augmentations never cached as finished."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import REPO, colour_image, model_config
from omegaconf import OmegaConf
from reliability import case
from test_augment import PHOTOS, TWO_TURNS, data_config, read_records, write_source

from miadpo.augment import runner
from miadpo.augment.runner import RECORDS_FILE, SKIPPED_FILE, SUMMARY_FILE, run_augmentation
from miadpo.config import DataConfig, SelectionConfig
from miadpo.data.pairs import BadRecordError
from miadpo.dpo.batch import PairLogps
from miadpo.dpo.reference_cache import ReferenceCache, fill_reference_cache, model_key, shard_of
from miadpo.fingerprint import selection_key
from miadpo.models import build_adapter
from miadpo.select import stage as stage_module
from miadpo.select.stage import CANDIDATES_FILE, candidates_identity, run_selection

TESTS = Path(__file__).resolve().parent
CPU = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "enable_model_summary": False}


# ----- helpers ---------------------------------------------------------------------------------------------------
class KeyedPairs(torch.utils.data.Dataset):
    """Stands for a pair dataset: the reference cache only needs ``keys`` and items the collate turns to keys."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> str:
        return self.keys[index]


class FakeForward:
    """A pair forward over keys alone: log-probs computed from each key's number."""

    def collate(self, keys: list[str]) -> SimpleNamespace:
        return SimpleNamespace(keys=list(keys), num_pairs=len(keys))

    def __call__(self, reference: torch.nn.Module, batch: SimpleNamespace) -> PairLogps:
        values = torch.tensor([float(int(key[1:])) for key in batch.keys])
        return PairLogps(chosen=-values, rejected=-2 * values, chosen_tokens=values + 1, rejected_tokens=values + 2)


fake_forward = FakeForward()


def fill(directory: Path, keys: list[str], forward: FakeForward = fake_forward, rank: int = 0) -> int:
    cache = ReferenceCache(directory, rank=rank)
    return fill_reference_cache(cache, [KeyedPairs(keys)], torch.nn.Linear(1, 1), forward, batch_size=2)


def cache_rows(directory: Path) -> list[str]:
    files = sorted(directory.glob("logps.*.jsonl"))
    return [json.loads(line)["key"] for file in files for line in file.read_text().splitlines()]


def selection_config() -> SelectionConfig:
    cfg = OmegaConf.structured(SelectionConfig)
    cfg.merge_with({"generation": {"max_new_tokens": 4, "batch_size": 2}})
    return cfg  # type: ignore[return-value]


def stage_data(tmp_path: Path) -> DataConfig:
    return data_config(tmp_path, tmp_path / "llava.json", formats={"sequence": 0, "grid": 0, "pip": 1},
                       augment={"workers": 1})


# ----- weights identity --------------------------------------------------------------------------------------------
class _PinnedStat:
    """A stat result whose modification and change times never move (a filesystem with coarse timestamps, or a
    re-save within one timestamp tick): only the content tells the files apart."""

    def __init__(self, stat: os.stat_result, ns: int) -> None:
        self._stat, self._ns = stat, ns

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stat, name)

    st_mtime_ns = st_ctime_ns = property(lambda self: self._ns)
    st_mtime = st_ctime = property(lambda self: self._ns / 1e9)


def cache_keys(adapter: Any, data: DataConfig) -> tuple[str, str]:
    """The reference-cache model key and the selection candidates fingerprint of ``adapter``."""
    return model_key(adapter, data), selection_key(candidates_identity(adapter, data, selection_config(), 0))


@pytest.mark.parametrize("where", [
    case("caches", "weights-same-names-and-sizes",
         "model.path weights overwritten with other values (same file names and sizes), within one file-timestamp "
         "tick (size, mtime, ctime and inode unchanged)",
         "new reference-cache and candidates keys: both are computed again; an identical re-save keeps the keys "
         "(cache reused)", "disk"),
    case("caches", "weights-changed-in-memory",
         "a model built in code (model.path=null) whose weights were changed in memory",
         "new reference-cache and candidates keys (the state dict is hashed); a fresh build of the same recipe "
         "reuses the cache", "memory"),
])
def test_other_weights_with_the_same_names_miss_the_caches(tmp_path: Path, make_adapter, monkeypatch,
                                                            where: str) -> None:
    data = OmegaConf.structured(DataConfig(out_dir=str(tmp_path / "out")))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / RECORDS_FILE).write_text("{}\n")
    keys = [f"k{i}" for i in range(4)]
    built = make_adapter()
    if where == "memory":
        first = cache_keys(built, data)
        assert fill(tmp_path / "ref" / first[0], keys) == 4
        with torch.no_grad():
            next(built.model.parameters()).add_(0.5)
        changed = cache_keys(built, data)
        assert changed[0] != first[0] and changed[1] != first[1]
        assert fill(tmp_path / "ref" / changed[0], keys) == 4  # recomputed
        assert cache_keys(make_adapter(), data) == first  # the same recipe, untouched: reused
        assert fill(tmp_path / "ref" / first[0], keys) == 0
        return
    weights = tmp_path / "weights"
    built.save_base(weights)
    adapter = build_adapter(model_config(path=str(weights)))
    tensors = weights / "model.safetensors"
    original = tensors.read_bytes()
    swapped = bytearray(original)
    swapped[-1] ^= 0x01  # a value of the last tensor: same names, shapes and size
    real_stat = Path.stat
    pinned = time.time_ns()

    def stat(self: Path, *, follow_symlinks: bool = True) -> Any:
        result = real_stat(self, follow_symlinks=follow_symlinks)
        return _PinnedStat(result, pinned) if self.is_relative_to(weights) else result

    monkeypatch.setattr(Path, "stat", stat)
    tensors.write_bytes(original)  # the save, then the cache keys, then another save within one tick
    first = cache_keys(adapter, data)
    assert fill(tmp_path / "ref" / first[0], keys) == 4
    tensors.write_bytes(bytes(swapped))
    changed = cache_keys(adapter, data)
    assert changed[0] != first[0] and changed[1] != first[1]
    assert fill(tmp_path / "ref" / changed[0], keys) == 4  # recomputed, not "0 computed, 4 cached"
    tensors.write_bytes(bytes(swapped))  # an identical re-save
    assert cache_keys(adapter, data) == changed
    assert fill(tmp_path / "ref" / changed[0], keys) == 0
    tensors.write_bytes(original)
    assert cache_keys(adapter, data) == first


# ----- skipped compositions --------------------------------------------------------------------------------------
def broken_source(tmp_path: Path) -> Path:
    (tmp_path / "images" / "coco").mkdir(parents=True, exist_ok=True)
    (tmp_path / "images" / "coco" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return write_source(tmp_path, extra=[{"id": "broken", "image": "coco/broken.jpg", "conversations": TWO_TURNS}])


def finished_files(out_dir: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(out_dir)): (p.read_bytes(), p.stat().st_mtime_ns) for p in out_dir.glob("images/*/*")}


@pytest.mark.parametrize("max_bad_fraction", [
    case("augmentation", "fixed-image-after-finished-run",
         "a corrupt source image, fixed after a run that finished with its compositions skipped",
         "the rerun composes exactly the compositions that used it (their input files changed); finished records and "
         "images stay byte-identical; the output equals a clean run's", 0.5),
    case("augmentation", "fixed-image-after-failed-run",
         "a corrupt source image that made the run fail (more failures than data.max_bad_fraction), then fixed",
         "the rerun composes the skipped compositions and finishes, instead of failing again with the same error; "
         "the output equals a clean run's", 0.0),
])
def test_a_fixed_image_is_composed_on_the_rerun(tmp_path: Path, max_bad_fraction: float) -> None:
    source = broken_source(tmp_path)
    cfg = data_config(tmp_path, source, formats={"sequence": 0, "grid": 0, "pip": 1}, max_bad_fraction=max_bad_fraction,
                      augment={"workers": 1})
    out = tmp_path / "out"
    if max_bad_fraction:
        first = run_augmentation(cfg, seed=0, progress=False)
        assert sum(first.skipped.values()) > 0
    else:
        with pytest.raises(BadRecordError, match="compositions failed"):
            run_augmentation(cfg, seed=0, progress=False)
    skipped_ids = {json.loads(line)["id"] for line in (out / SKIPPED_FILE).read_text().splitlines()}
    before_lines = (out / RECORDS_FILE).read_text().splitlines()
    before_files = finished_files(out)
    assert skipped_ids and before_lines
    colour_image((80, 60), (200, 30, 30)).save(tmp_path / "images" / "coco" / "broken.jpg")  # the fix

    again = run_augmentation(cfg, seed=0, progress=False)
    assert sum(again.written.values()) == len(PHOTOS) + 1 and not again.skipped
    after_lines = (out / RECORDS_FILE).read_text().splitlines()
    assert set(before_lines) <= set(after_lines)  # finished records untouched, byte for byte
    assert {json.loads(line)["id"] for line in after_lines} - {json.loads(line)["id"] for line in before_lines} \
        == skipped_ids
    after_files = finished_files(out)
    assert all(after_files[name] == value for name, value in before_files.items())
    clean = run_augmentation(data_config(tmp_path, source, "clean", formats={"sequence": 0, "grid": 0, "pip": 1},
                                         max_bad_fraction=max_bad_fraction, augment={"workers": 1}),
                             seed=0, progress=False)
    assert (out / RECORDS_FILE).read_bytes() == (tmp_path / "clean" / RECORDS_FILE).read_bytes()
    assert clean.written == again.written


@pytest.mark.parametrize("retry", [
    case("augmentation", "retry-skipped-on-request",
         "a composition skipped for a passing read error, its input files unchanged",
         "kept as skipped on reruns (nothing recomposed); data.augment.retry_skipped=true retries every skipped "
         "composition, finished records untouched", True),
])
def test_retry_skipped_recomposes_unchanged_inputs_on_request(tmp_path: Path, monkeypatch, retry: bool) -> None:
    source = write_source(tmp_path)
    cfg = data_config(tmp_path, source, formats={"sequence": 0, "grid": 0, "pip": 1}, augment={"workers": 1})
    real_load = runner.Composer._load

    def flaky(self: Any, rel: str, draft: Any = None) -> Any:
        if rel == "coco/moon.jpg":
            raise ValueError(f"unreadable or corrupt image: {rel} (I/O error)")
        return real_load(self, rel, draft)

    monkeypatch.setattr(runner.Composer, "_load", flaky)
    run_augmentation(cfg, seed=0, progress=False)
    monkeypatch.setattr(runner.Composer, "_load", real_load)
    out = tmp_path / "out"
    before = (out / RECORDS_FILE).read_bytes()
    assert (out / SKIPPED_FILE).read_text().strip()
    assert run_augmentation(cfg, seed=0, progress=False).skipped
    assert (out / RECORDS_FILE).read_bytes() == before  # unchanged inputs: not retried
    cfg.augment.retry_skipped = retry
    again = run_augmentation(cfg, seed=0, progress=False)
    assert sum(again.written.values()) == len(PHOTOS) and not again.skipped
    assert set(before.decode().splitlines()) <= set((out / RECORDS_FILE).read_text().splitlines())


@pytest.mark.parametrize("marked_before", [
    case("augmentation", "zero-records-written",
         "every composition fails (all source images unreadable) with data.max_bad_fraction=1",
         "an error saying no record was written and why; the output is not cached as finished, so the rerun after "
         "the fix composes every record", False),
    case("augmentation", "zero-records-marked-finished-before",
         "an output directory that an earlier version marked finished with 0 records",
         "not taken as finished: the next run composes it", True),
])
def test_an_augmentation_that_writes_nothing_is_not_finished(tmp_path: Path, marked_before: bool) -> None:
    source = write_source(tmp_path)
    for name in PHOTOS:
        (tmp_path / "images" / "coco" / f"{name}.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    cfg = data_config(tmp_path, source, formats={"sequence": 0, "grid": 0, "pip": 1}, max_bad_fraction=1.0,
                      augment={"workers": 1})
    with pytest.raises(BadRecordError, match=r"0 records written.*image corrupt or not an image"):
        run_augmentation(cfg, seed=0, progress=False)
    assert not (tmp_path / "out" / SUMMARY_FILE).exists()
    if marked_before:
        (tmp_path / "out" / SKIPPED_FILE).unlink()
        runner.AugmentSummary(tmp_path / "out").save()
    write_source(tmp_path)  # the photographs again
    summary = run_augmentation(cfg, seed=0, progress=False)
    assert sum(summary.written.values()) == len(PHOTOS) and not summary.skipped


# ----- one writer per stage directory -------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [
    case("concurrency", "ranks-started-together-before-augmentation",
         "the ranks of one selection run started all at once (torchrun, srun) with the augmentation not done yet",
         "ranks other than 0 stop with a message to augment first; only rank 0 writes the augmentation output", 1),
])
def test_only_rank_zero_augments(tmp_path: Path, make_adapter, rank: int) -> None:
    write_source(tmp_path)
    stage = stage_module.SelectionStage(make_adapter(), stage_data(tmp_path), selection_config(), 0)
    with pytest.raises(RuntimeError, match=rf"rank {rank}: the augmentation in .* is not finished"):
        stage.prepare(rank)
    assert not (tmp_path / "out" / RECORDS_FILE).exists()
    stage.prepare(0)
    cache, inputs = stage.prepare(rank)  # once rank 0 augmented, the other ranks read it
    assert inputs and cache.directory.is_dir()


def wait_for(path: Path, proc: subprocess.Popen | None = None, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the holder exited early: {proc.communicate()[1].decode()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.05)


def block_at(tmp_path: Path, call: int) -> Callable[[], None]:
    """A hook that, at its ``call``-th invocation, says so (``blocked``) and waits for ``go``."""
    calls = [0]

    def hook() -> None:
        calls[0] += 1
        if calls[0] == call:
            (tmp_path / "blocked").touch()
            wait_for(tmp_path / "go", timeout=300)

    return hook


def hold_augment(tmp_path: Path) -> None:
    hook, compose = block_at(tmp_path, 3), runner.Composer.__call__

    def slow(self: Any, job: Any) -> Any:
        hook()
        return compose(self, job)

    runner.Composer.__call__ = slow  # type: ignore[method-assign]
    run_augmentation(stage_data(tmp_path), seed=0, progress=False)


def hold_selection(tmp_path: Path) -> None:
    hook, generate = block_at(tmp_path, 2), stage_module.CandidateGenerator.__call__

    def slow(self: Any, batch: Any) -> Any:
        hook()
        return generate(self, batch)

    stage_module.CandidateGenerator.__call__ = slow  # type: ignore[method-assign]
    run_selection(build_adapter(model_config()), stage_data(tmp_path), selection_config(), 0, CPU)


def hold_reference(tmp_path: Path) -> None:
    hook = block_at(tmp_path, 2)

    class Slow(FakeForward):
        def __call__(self, reference: torch.nn.Module, batch: SimpleNamespace) -> PairLogps:
            hook()
            return super().__call__(reference, batch)

    fill(tmp_path / "ref", [f"k{i}" for i in range(6)], Slow())


HOLDERS = {"augment": hold_augment, "selection": hold_selection, "reference": hold_reference}


def start_holder(tmp_path: Path, stage: str) -> subprocess.Popen:
    script = (f"import sys, pathlib; sys.path[:0] = [{str(TESTS)!r}, {str(REPO)!r}]\n"
              f"import test_reliability_caches as t\nt.HOLDERS[{stage!r}](pathlib.Path({str(tmp_path)!r}))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


@pytest.mark.parametrize("stage", [
    case("concurrency", "two-augment-runs-one-out-dir",
         "a second, independent augmentation run into the data.out_dir another run is writing",
         "the second fails at once naming the holder (pid, host, start time, command); no record is written twice",
         "augment"),
    case("concurrency", "two-selection-runs-one-candidates-dir",
         "a second selection run generating the same candidates directory while another run generates it",
         "the second fails at once naming the holder; every candidate is written once; once finished, the candidates "
         "are read by any run without a lock", "selection"),
    case("concurrency", "two-runs-fill-one-reference-cache",
         "a second run filling the same reference-cache shard (same model key) while another run fills it",
         "the second fails at once naming the holder; every log-prob is written once; once filled, it is read "
         "without a lock", "reference"),
])
@pytest.mark.slow
def test_a_second_writer_of_a_stage_directory_fails_naming_the_holder(tmp_path: Path, make_adapter, monkeypatch,
                                                                      stage: str) -> None:
    write_source(tmp_path)
    holder = start_holder(tmp_path, stage)
    try:
        wait_for(tmp_path / "blocked", holder)
        with pytest.raises(RuntimeError, match=rf"being written by another run: pid {holder.pid} on .*command: "):
            if stage == "augment":
                run_augmentation(stage_data(tmp_path), seed=0, progress=False)
            elif stage == "selection":
                run_selection(make_adapter(), stage_data(tmp_path), selection_config(), 0, CPU)
            else:
                fill(tmp_path / "ref", [f"k{i}" for i in range(6)])
    finally:
        (tmp_path / "go").touch()
        _, err = holder.communicate(timeout=300)
    assert holder.returncode == 0, err.decode()[-3000:]
    out = tmp_path / "out"
    if stage == "augment":
        ids = [json.loads(line)["id"] for line in (out / RECORDS_FILE).read_text().splitlines()]
        assert len(ids) == len(set(ids)) == len(PHOTOS)
        assert sum(run_augmentation(stage_data(tmp_path), seed=0, progress=False).written.values()) == len(PHOTOS)
    elif stage == "selection":
        (directory,) = out.glob("selection/*")
        shard = [json.loads(line)["id"] for line in (directory / "candidates.rank0.jsonl").read_text().splitlines()]
        merged = [json.loads(line)["id"] for line in (directory / CANDIDATES_FILE).read_text().splitlines()]
        assert len(shard) == len(set(shard)) == len(merged) == len(set(merged)) > 0

        def no_generation(*args: Any, **kwargs: Any) -> None:
            raise AssertionError("generation ran again")

        monkeypatch.setattr(stage_module.CandidateGenerator, "__call__", no_generation)
        assert run_selection(make_adapter(), stage_data(tmp_path), selection_config(), 0, CPU).is_file()
    else:
        rows = cache_rows(tmp_path / "ref")
        assert sorted(rows) == [f"k{i}" for i in range(6)]
        assert fill(tmp_path / "ref", [f"k{i}" for i in range(6)]) == 0


@pytest.mark.parametrize("ranks", [
    case("concurrency", "reference-cache-read-while-appended",
         "two readers of a reference cache (a sweep job's ranks, all pairs cached) while another run appends to it "
         "(its last line half written)",
         "both read every complete row; neither truncates or trips on the half-written line, which the writer "
         "completes intact", (0, 1)),
])
def test_readers_of_a_reference_cache_leave_a_writer_alone(tmp_path: Path, ranks: tuple[int, ...]) -> None:
    directory = tmp_path / "ref"
    keys = [f"k{i}" for i in range(4)]
    assert fill(directory, keys) == 4
    row = json.dumps({"key": "k9", "logps": [-9.0, -18.0, 10.0, 11.0]}) + "\n"
    with (directory / "logps.0.jsonl").open("a", encoding="utf-8") as writer:
        writer.write(row[:20])
        writer.flush()  # another run, mid-line
        for rank in ranks:
            reader = ReferenceCache(directory, rank=rank)
            assert all(key in reader for key in keys) and "k9" not in reader
            assert fill(directory, keys, rank=rank) == 0
        writer.write(row[20:])
    assert sorted(cache_rows(directory)) == [*keys, "k9"]
    assert ReferenceCache(directory)["k9"] == [-9.0, -18.0, 10.0, 11.0]


def test_processes_started_together_share_the_prepass_each_pair_once(tmp_path: Path) -> None:
    """torchrun / srun ranks: each computes its hash share of the missing pairs, then waits for the others'."""
    from concurrent.futures import ThreadPoolExecutor

    keys = [f"k{i}" for i in range(40)]

    def rank_fill(rank: int) -> tuple[int, bool]:
        cache = ReferenceCache(tmp_path / "ref", rank=rank)
        computed = fill_reference_cache(cache, [KeyedPairs(keys)], torch.nn.Linear(1, 1), fake_forward,
                                        batch_size=4, rank=rank, world=2, wait_s=60)
        return computed, cache.covers(keys)

    with ThreadPoolExecutor(2) as pool:
        (first, first_all), (second, second_all) = pool.map(rank_fill, [0, 1])
    rows = cache_rows(tmp_path / "ref")
    assert first + second == len(rows) == len(set(rows)) == 40 and first > 0 and second > 0
    assert first_all and second_all  # each rank trains with every pair's reference
    assert {json.loads(line)["key"] for line in (tmp_path / "ref" / "logps.1.jsonl").read_text().splitlines()} \
        == {k for k in keys if shard_of(k, 2) == 1}
    alone = ReferenceCache(tmp_path / "alone", rank=0)
    with pytest.raises(TimeoutError, match=r"missing from the other processes' shards .*\(did every rank start\?\)"):
        fill_reference_cache(alone, [KeyedPairs(keys)], torch.nn.Linear(1, 1), fake_forward, batch_size=4, rank=0,
                             world=2, wait_s=1)


@pytest.mark.parametrize("bad_line", [
    case("caches", "reference-cache-torn-row", "a reference-cache shard with a line torn in the middle of the file "
         "(every later run died with a raw JSONDecodeError naming no file)", "that row is dropped with a warning "
         "naming the shard and line; its pair's reference log-probs are computed again, the other rows are used",
         '{"key": "k1", "logps": [-1.0, -2'),
    case("caches", "reference-cache-non-finite", "a reference-cache row holding NaN or Infinity", "that row is "
         "dropped with a warning naming the shard and line, and recomputed; the other rows are used",
         '{"key": "k1", "logps": [NaN, -2.0, 3, 4]}'),
    '{"key": "k1", "logps": [-1.0]}', '["k1"]', '\udcff',
])
def test_a_bad_reference_cache_row_is_dropped_and_recomputed(tmp_path: Path, caplog, bad_line: str) -> None:
    directory = tmp_path / "ref"
    directory.mkdir()
    shard = directory / "logps.0.jsonl"
    good = [json.dumps({"key": f"k{k}", "logps": [-1.0 * k, -2.0 * k, 3, 4]}) for k in (0, 2)]
    shard.write_bytes("\n".join([good[0], bad_line, good[1]]).encode("utf-8", "surrogateescape") + b"\n")
    with caplog.at_level("WARNING", logger="miadpo.dpo.reference_cache"):
        cache = ReferenceCache(directory)
    assert sorted(cache.values) == ["k0", "k2"] and "k1" not in cache
    assert f"reference cache {shard}:2: " in caplog.text and "computed again" in caplog.text
    with cache.writing():  # the next run appends the recomputed row and reads it back
        cache.add([("k1", [-1.0, -2.0, 3, 4])])
    assert ReferenceCache(directory)["k1"] == [-1.0, -2.0, 3, 4]


@pytest.mark.parametrize("name", [
    case("augmentation", "output-file-replaced-by-symlink", "an output file of an unfinished augmentation folder "
         "replaced by a symbolic link (a file outside data.out_dir was truncated on resume, then a raw "
         "JSONDecodeError)", "stops naming the link and its target before writing; the file it points at is left "
         "as it was", RECORDS_FILE),
    SKIPPED_FILE,
])
def test_an_output_file_that_is_a_symlink_is_never_written_through(tmp_path: Path, name: str) -> None:
    source = write_source(tmp_path)
    cfg = data_config(tmp_path, source, formats={"sequence": 0, "grid": 0, "pip": 1}, augment={"workers": 1})
    run_augmentation(cfg, seed=0, progress=False)
    (tmp_path / "out" / SUMMARY_FILE).unlink()  # as a run killed before it finished leaves it
    outside = tmp_path / "precious.txt"
    outside.write_text("someone else's file\nwithout a final newline")
    (tmp_path / "out" / name).unlink()
    (tmp_path / "out" / name).symlink_to(outside)
    with pytest.raises(ValueError, match=rf"{name} is a symbolic link \(to {outside}\): a stage writes its own"):
        run_augmentation(cfg, seed=0, progress=False)
    assert outside.read_text() == "someone else's file\nwithout a final newline"


@pytest.mark.parametrize("failure", [
    case("augmentation", "disk-full-short-write", "the disk fills while a composition is written (Pillow ignored the "
         "short write: the truncated JPEG was renamed into place and kept as finished by the rerun; or a raw 'No "
         "space left' with no path)", "the written file is decoded back before it takes its name: the run stops "
         "naming the composition's path, keeps every record written before, and the rerun composes the rest",
         "short"),
    "enospc",
])
def test_a_composition_that_did_not_fully_reach_the_disk_is_never_kept(tmp_path: Path, monkeypatch,
                                                                       failure: str) -> None:
    import errno

    from PIL import Image as PILImage

    source = write_source(tmp_path)
    cfg = data_config(tmp_path, source, formats={"sequence": 0, "grid": 0, "pip": 1}, augment={"workers": 1})
    save, calls = PILImage.Image.save, []

    def failing_save(image, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 2:  # the second composition hits the full disk
            if failure == "enospc":
                raise OSError(errno.ENOSPC, "No space left on device")
            save(image, fp, *args, **kwargs)
            Path(fp).write_bytes(Path(fp).read_bytes()[:200])
            return None
        return save(image, fp, *args, **kwargs)

    monkeypatch.setattr(PILImage.Image, "save", failing_save)
    with pytest.raises(OSError, match=r"writing the composition .*/out/images/pip/.*\.jpg failed \(full disk\?\)"):
        run_augmentation(cfg, seed=0, progress=False)
    written = read_records(tmp_path / "out")
    assert len(written) == 1  # the first composition is kept
    kept = {Path(p).name for p in (tmp_path / "out" / "images" / "pip").iterdir()}
    assert kept == {Path(written[0]["image"]).name}  # no truncated file took a name
    monkeypatch.setattr(PILImage.Image, "save", save)
    summary = run_augmentation(cfg, seed=0, progress=False)
    assert sum(summary.written.values()) == len(PHOTOS) and summary.resumed == 1
