"""The one cache-directory helper (``miadpo.data.stage_cache``) and the stages that use it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from miadpo.config import SyntheticConfig
from miadpo.data.pairs import ImageRoots
from miadpo.data.stage_cache import StageCache
from miadpo.fingerprint import selection_key
from miadpo.locks import StageLocked
from miadpo.toyworld.synthetic import ensure_synthetic_pairs, synthetic_cache

REPO = Path(__file__).resolve().parents[1]


def test_a_keyed_cache_names_its_directory_records_its_identity_once_and_finishes_atomically(tmp_path: Path) -> None:
    identity = {"b": [1, 2.5], "a": "x"}
    cache = StageCache.keyed(tmp_path / "stage", identity, selection_key, lock_name="s.lock", done_name="out.jsonl")
    assert cache.directory == tmp_path / "stage" / selection_key(identity) and not cache.is_done()
    cache.record_identity()
    assert cache.manifest.read_text() == json.dumps(identity, indent=2, sort_keys=True) + "\n"
    StageCache(cache.directory, {"other": 1}).record_identity()  # an existing manifest is left as it is
    assert cache.stored_identity() == identity
    cache.finish("done\n")
    assert cache.is_done() and cache.done.read_text() == "done\n" and not list(cache.directory.glob("*.tmp*"))


def test_a_second_writer_fails_at_once_naming_the_holder_and_each_shard_has_its_own_lock(tmp_path: Path) -> None:
    cache = StageCache(tmp_path / "stage", what="the test stage")
    with cache.writing():
        with pytest.raises(StageLocked, match="the test stage"), cache.writing():
            pass
        with cache.writing("shard.1.lock"):  # another rank's shard: another lock
            (cache.directory / "part.1.jsonl").write_text("")
    with cache.writing():  # released
        pass
    (cache.directory / "part.0.jsonl").write_text("")
    assert [p.name for p in cache.shards("part.*.jsonl")] == ["part.0.jsonl", "part.1.jsonl"]


def test_synthetic_pairs_are_written_once_under_the_lock(tmp_path: Path, monkeypatch) -> None:
    """One process draws; another one started beside it (a rank of torchrun) waits for its pairs."""
    roots = ImageRoots(tmp_path / "images", tmp_path / "out")
    cfg = SyntheticConfig(num_pairs=3)
    cache = synthetic_cache(cfg, roots)
    monkeypatch.setattr("miadpo.toyworld.synthetic.WAIT_FOR_OTHER_WRITER_S", 0.2)
    with cache.writing(), pytest.raises(TimeoutError, match="synthetic.lock"):  # the other never finishes here
        ensure_synthetic_pairs(cfg, roots)
    assert not cache.is_done()
    finished = []

    def finish_meanwhile(timeout_s: float, poll_s: float = 1.0) -> None:
        finished.append(timeout_s)
        cache.finish("")

    monkeypatch.setattr(StageCache, "wait_until_done", lambda self, *a, **k: finish_meanwhile(*a, **k))
    with cache.writing():
        assert ensure_synthetic_pairs(cfg, roots) == cache.done and finished == [0.2]
    cache.done.unlink()
    monkeypatch.undo()
    pairs = ensure_synthetic_pairs(cfg, roots)
    assert pairs == cache.done and len(pairs.read_text().splitlines()) == 3
    drawn = []
    monkeypatch.setattr("miadpo.toyworld.synthetic.draw_pairs", lambda *args: drawn.append(args))
    assert ensure_synthetic_pairs(cfg, roots) == pairs and drawn == []  # finished: read, not drawn again


def test_every_stage_lock_goes_through_the_stage_cache() -> None:
    """Augmentation, selection, the reference cache, rounds and synthetic pairs hold their locks through
    ``StageCache.writing``: no other module takes a stage lock itself."""
    takers = [str(path.relative_to(REPO)) for path in sorted((REPO / "miadpo").rglob("*.py"))
              if re.search(r"\bstage_lock\(", path.read_text()) and path.name not in ("locks.py", "stage_cache.py")]
    assert takers == []
    users = [name for name in ("augment/runner.py", "select/stage.py", "dpo/reference_cache.py", "rounds.py",
                               "toyworld/synthetic.py") if "StageCache" in (REPO / "miadpo" / name).read_text()]
    assert len(users) == 5, users
