"""The default run's cache directory names, pinned (issue 31): moving the toy recipe's settings into other config
files must not change them, or users' caches would silently stop being found. Each name is computed from the bare
default config, with small stand-ins for the toy world's files (their content is not what is pinned); the values
were computed on main 2772858, before the move."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from miadpo.augment.runner import fingerprint
from miadpo.config import config_dir, register_configs
from miadpo.dpo.reference_cache import model_key
from miadpo.models import build_adapter
from miadpo.select.stage import _digest, candidates_identity, rules_identity
from miadpo.toyworld.pipeline import ensure_toy_base

PINNED = {"augmentation": "ba9bfd5434e5721b", "candidates": "52233c8fbbe052b1", "rules": "554b03cf739b7f0a",
          "reference": "5c335213ad47bed7901c057d"}


def test_the_default_runs_cache_directory_names_are_unchanged(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train")
    (tmp_path / "data" / "toyworld" / "dpo").mkdir(parents=True)
    Path(cfg.data.source).write_text('[{"id": "1", "image": "toy/1.png", "conversations": []}]\n')
    (Path(cfg.data.out_dir) / "records.jsonl").write_text('{"id": "sequence-0000001"}\n')
    ensure_toy_base(cfg.model.path, tmp_path)
    adapter = build_adapter(cfg.model)
    names = {"augmentation": fingerprint(cfg.data, cfg.seed)["fingerprint"],
             "candidates": _digest(candidates_identity(adapter, cfg.data, cfg.selection, cfg.seed)),
             "rules": _digest(rules_identity(cfg.selection, cfg.seed)),
             "reference": model_key(adapter, cfg.data)}
    assert names == PINNED
