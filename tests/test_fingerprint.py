"""Cache keys survive the move of every hash into ``miadpo.fingerprint``: the values below were computed by the
functions it replaced (``reference_cache.digest``, ``select.stage._digest`` — now ``selection_key`` —,
``synthetic._fingerprint`` — now ``synthetic_key`` —, ``augment.runner.file_sha1``) before the move."""

from __future__ import annotations

from pathlib import Path

from miadpo.config import SyntheticConfig
from miadpo.data.pairs import ImageRoots
from miadpo.fingerprint import digest, file_sha1, selection_key
from miadpo.toyworld.synthetic import synthetic_cache

VALUE = {"b": [1, 2.5, "x"], "a": {"c": None, "d": True}}


def test_the_cache_keys_of_earlier_versions_are_unchanged(tmp_path: Path) -> None:
    assert digest(VALUE) == "a7afd88fc468512395679bd4"  # reference cache: SHA-256[:24]
    assert selection_key(VALUE) == "94fca53c8964dcfd"  # selection directories: SHA-1[:16]
    synthetic = synthetic_cache(SyntheticConfig(), ImageRoots(tmp_path, tmp_path / "out")).directory
    assert synthetic == tmp_path / "out" / "synthetic" / "eb712b7570"  # synthetic pairs: SHA-1[:10]
    path = tmp_path / "source.json"
    path.write_bytes(b"miadpo" * 1000)
    assert file_sha1(path) == "b00f490e30ab79cde80a534441e419829bffa241"  # augmentation source / records
