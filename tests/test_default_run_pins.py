"""Cache directory names, pinned: the default run's (issue 31) and a ``data=mix`` run's (issue 36, before its
redesign moves config keys). Moving settings into other config files or classes must not change them, or users'
caches would silently stop being found. Each name is computed from the bare composed config, with small stand-ins
for the input files (their content is not what is pinned); the default run's values were computed on main 2772858,
the mix run's on main 69b9785, the rounds' keys (a finished round's ``round.json`` fingerprint: the whole resolved
round config) on main 5b91856, before issue 36 moved anything."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from miadpo.augment.runner import fingerprint
from miadpo.config import config_dir, register_configs
from miadpo.dpo.reference_cache import model_key
from miadpo.fingerprint import selection_key
from miadpo.models import build_adapter
from miadpo.rounds import fingerprint as round_fingerprint
from miadpo.rounds import round_config
from miadpo.select.stage import candidates_identity, rules_identity
from miadpo.toyworld.pipeline import ensure_toy_base

PINNED = {
    "default": {"augmentation": "ba9bfd5434e5721b", "candidates": "52233c8fbbe052b1", "rules": "554b03cf739b7f0a",
                "reference": "5c335213ad47bed7901c057d"},
    "data=mix": {"augmentation": "178b11c84817b92d", "candidates": "09d1b9cdeb7bd203", "rules": "c27aad942917d762",
                 "reference": "5c335213ad47bed7901c057d"},
}


@pytest.mark.parametrize("run", sorted(PINNED))
def test_the_cache_directory_names_are_unchanged(tmp_path: Path, monkeypatch, run: str) -> None:
    monkeypatch.chdir(tmp_path)
    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[] if run == "default" else [run])
    Path(cfg.data.source).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.data.out_dir).mkdir(parents=True, exist_ok=True)
    Path(cfg.data.source).write_text('[{"id": "1", "image": "toy/1.png", "conversations": []}]\n')
    (Path(cfg.data.out_dir) / "records.jsonl").write_text('{"id": "sequence-0000001"}\n')
    ensure_toy_base(cfg.model.path, tmp_path)
    adapter = build_adapter(cfg.model)
    names = {"augmentation": fingerprint(cfg.data, cfg.seed)["fingerprint"],
             "candidates": selection_key(candidates_identity(adapter, cfg.data, cfg.selection, cfg.seed)),
             "rules": selection_key(rules_identity(cfg.selection, cfg.seed)),
             "reference": model_key(adapter, cfg.data)}
    assert names == PINNED[run]


ROUNDS_PINNED = {"default": ["fed1c5af73361c43a9588f6a", "87244b885a662396b1a7f01b"],
                 "data=mix": ["2685c42d0618081f9b4e5c83", "9bd10014ded1d1a82ba3e737"]}


@pytest.mark.parametrize("run", sorted(ROUNDS_PINNED))
def test_the_rounds_keys_are_unchanged(run: str) -> None:
    """Rounds 1 and 2 of a three-round run with a fixed run directory: a rerun must find its finished rounds."""
    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=([] if run == "default" else [run]) + ["run_dir=/pinned/run",
                                                                                            "rounds.count=3"])
    keys = [round_fingerprint(round_config(cfg, index, policy, "/pinned/base"))
            for index, policy in ((1, cfg.model.path), (2, "/pinned/policy1"))]
    assert keys == ROUNDS_PINNED[run]
