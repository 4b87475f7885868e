"""The in-process tiny tokenizer: byte-identical to the one recorded, trained once per process, never shared."""

from __future__ import annotations

import ast
import hashlib
import inspect

from miadpo.models import tiny
from miadpo.models.tiny import build_tiny_tokenizer

# sha256 of ``backend_tokenizer.to_str()``, recorded from the tokenizer as it was trained before its corpus words
# moved into miadpo/models/tiny.py (they came from miadpo.toyworld.synthetic's COLOURS and SHAPES).
DEFAULT_SHA256 = "79da2b57e0218fc89f658306c7b1465a27ef9349cc2d9abf651e6b68f715ca24"
CHATML_300_SHA256 = "fc58b5feeb9fef63c51ed013cbb18ed8a1cfcba3b1731b6fc395dc28f7ff69f5"


def sha256(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def test_the_trained_tokenizer_is_byte_identical_to_the_recorded_one() -> None:
    assert sha256(build_tiny_tokenizer()) == DEFAULT_SHA256
    other = build_tiny_tokenizer(300, ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                 named={"pad_token": None}, extra={})
    assert sha256(other) == CHATML_300_SHA256 and len(other) == 300


def test_each_call_returns_its_own_tokenizer_from_one_training() -> None:
    first = build_tiny_tokenizer()
    hits = tiny._trained_bpe.cache_info().hits
    second = build_tiny_tokenizer()
    assert tiny._trained_bpe.cache_info().hits == hits + 1  # not trained again
    first.add_tokens(["<added>"], special_tokens=True)
    assert len(first) == len(second) + 1 and "<added>" not in second.get_vocab()
    assert sha256(build_tiny_tokenizer()) == DEFAULT_SHA256
    assert second.image_token == "<image>" and second.image_token_id == 4 and second.pad_token == "<pad>"


def test_the_model_code_does_not_import_the_data_code() -> None:
    tree = ast.parse(inspect.getsource(tiny))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert "miadpo.toyworld.synthetic" not in imported
