"""Remote code only with consent: nothing of a weights directory runs unless ``model.trust_remote_code=true``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from reliability import case
from test_internlm_xc25 import sentencepiece_weights_directory, verify_config
from test_zoo import model_cfg

from miadpo.models import build_adapter

EVIL = "import pathlib\npathlib.Path(__file__).with_name('EXECUTED').write_text('remote code ran')\n"


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    """A saved tiny XC2.5 whose config.json maps AutoModel to a Python file that records being imported."""
    torch.manual_seed(0)
    directory = build_adapter(model_cfg("tiny_internlm_xc25")).save_base(tmp_path / "weights")
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}
    (directory / "config.json").write_text(json.dumps(config))
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (directory / name).write_text(EVIL)
    return directory


@pytest.mark.parametrize("reference", [
    case("remote code", "verify-without-consent",
         "`miadpo.models.verify` on a weights directory whose original class is Python code, "
         "`model.trust_remote_code=false` (the default)",
         "none of it runs; the report names the files that would run and `model.trust_remote_code=true`", "auto"),
    case("remote code", "verify-original-without-consent",
         "`verify reference=original` (the comparison required) without consent",
         "stops before running anything, naming the files and how to opt in", "original"),
])
def test_verify_runs_no_code_of_the_weights_directory_without_consent(weights: Path, tmp_path: Path,
                                                                       reference: str) -> None:
    from miadpo.models.verify import verify

    cfg = verify_config(tmp_path, f"model.path={weights}", f"reference={reference}")
    assert cfg.model.trust_remote_code is False
    if reference == "original":
        with pytest.raises(RuntimeError, match="modeling_evil.py.*model.trust_remote_code=true"):
            verify(cfg)
    else:
        result = verify(cfg)
        assert "modeling_evil.py" in result["reference"] and "model.trust_remote_code=true" in result["reference"]
        assert "configuration_evil.py" in result["reference"] and "match" not in result
    assert not (weights / "EXECUTED").exists()


@pytest.mark.parametrize("model", [
    case("remote code", "xc25-tokenizer-without-consent",
         "`model=internlm_xc25` on the official layout, whose tokenizer is a Python file beside `tokenizer.model`",
         "the tokenizer is read from `tokenizer.model` by miadpo's own code; the file never runs", "internlm_xc25"),
])
def test_every_model_config_defaults_to_no_remote_code(tmp_path: Path, model: str) -> None:
    from miadpo.models.internlm_xc25.adapter import checkpoint_tokenizer

    assert model_cfg(model).trust_remote_code is False
    sp = sentencepiece_weights_directory(tmp_path)
    checkpoint_tokenizer(tmp_path, image_token_id=sp.get_piece_size())
    assert not (tmp_path / "EXECUTED").exists()


def test_with_consent_the_original_is_tried(weights: Path, tmp_path: Path) -> None:
    from miadpo.models.verify import verify

    result = verify(verify_config(tmp_path, f"model.path={weights}", "model.trust_remote_code=true"))
    assert not result["reference"].startswith("original not run")
