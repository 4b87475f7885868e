"""Cache keys survive the move of every hash into ``miadpo.fingerprint``: the values below were computed by the
functions it replaced (``reference_cache.digest``, ``select.stage._digest``, ``synthetic._fingerprint``,
``augment.runner.file_sha1``) before the move."""

from __future__ import annotations

from pathlib import Path

from miadpo.config import SyntheticConfig
from miadpo.fingerprint import digest, file_sha1
from miadpo.select.stage import _digest as selection_digest
from miadpo.toyworld.synthetic import _fingerprint as synthetic_fingerprint

VALUE = {"b": [1, 2.5, "x"], "a": {"c": None, "d": True}}


def test_the_cache_keys_of_earlier_versions_are_unchanged(tmp_path: Path) -> None:
    assert digest(VALUE) == "a7afd88fc468512395679bd4"  # reference cache: SHA-256[:24]
    assert selection_digest(VALUE) == "94fca53c8964dcfd"  # selection directories: SHA-1[:16]
    assert synthetic_fingerprint(SyntheticConfig()) == "eb712b7570"  # synthetic pairs: SHA-1[:10]
    path = tmp_path / "source.json"
    path.write_bytes(b"miadpo" * 1000)
    assert file_sha1(path) == "b00f490e30ab79cde80a534441e419829bffa241"  # augmentation source / records
