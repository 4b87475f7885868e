"""InternLM2's tokenizer from the checkpoint's ``tokenizer.model``, with our code: nothing in the weights directory
is imported or executed.

The released checkpoint ships a SentencePiece model and a Python class (``tokenization_internlm2.py``, loaded by
``trust_remote_code``). That class (public facts): encodes with ``SentencePieceProcessor.encode`` as it is (no
extra dummy-prefix handling), prepends ``<s>`` (``add_bos_token=True``) and no ``</s>``; unk ``<unk>``, pad
``</s>``; text is split around the added and special tokens first (transformers' slow-tokenizer rule). Here the
same on transformers' SentencePiece backend, reading only the JSON of ``tokenizer_config.json`` /
``special_tokens_map.json`` for the special tokens and added tokens (its ``auto_map`` is ignored). Needs
``sentencepiece`` (the ``internlm_xc25`` extra).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

VOCAB_FILE = "tokenizer.model"
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")


class InternLM2Tokenizer(SentencePieceBackend):
    """SentencePiece encoding as the original: ``[<s>] + sp.encode(text)`` between the added/special tokens;
    decoding joins SentencePiece runs (``sp.decode``, byte pieces included) and special tokens verbatim."""

    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, unk_token: str = "<unk>", bos_token: str = "<s>", eos_token: str = "</s>",
                 pad_token: str = "</s>", add_bos_token: bool = True, add_eos_token: bool = False,
                 **kwargs: Any) -> None:
        pattern = {(True, False): "bos", (True, True): "bos_eos", (False, True): "eos"}.get(
            (add_bos_token, add_eos_token), "none")
        kwargs.setdefault("special_tokens_pattern", pattern)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        super().__init__(vocab_file=vocab_file, legacy=True, unk_token=unk_token, bos_token=bos_token,
                         eos_token=eos_token, pad_token=pad_token, add_bos_token=add_bos_token,
                         add_eos_token=add_eos_token, **kwargs)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Runs of SentencePiece pieces decoded by ``sp_model``, special tokens verbatim between them."""
        specials = set(self.all_special_tokens)
        pieces: list[str] = []
        out: list[str] = []
        for token in tokens:
            if token in specials:
                out += [self.sp_model.decode(pieces), token]
                pieces = []
            else:
                pieces.append(token)
        out.append(self.sp_model.decode(pieces))
        return "".join(out)


def _token_string(value: Any) -> str | None:
    """A special token as ``tokenizer_config.json`` writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def load_internlm2_tokenizer(directory: str | Path) -> InternLM2Tokenizer:
    """The directory's ``tokenizer.model`` as :class:`InternLM2Tokenizer`, with the special-token strings and the
    ``added_tokens_decoder`` of its ``tokenizer_config.json`` (tokens never split, at their recorded ids), as the
    original class gets them from transformers."""
    if importlib.util.find_spec("sentencepiece") is None:
        raise ImportError("the InternLM2 tokenizer needs sentencepiece: pip install 'miadpo[internlm_xc25]'")
    directory = Path(directory)
    vocab = directory / VOCAB_FILE
    if not vocab.is_file():
        raise FileNotFoundError(f"{vocab}: no SentencePiece model (InternLM2 tokenizer) in the weights directory")
    settings: dict[str, Any] = {}
    added: dict[int, AddedToken] = {}
    config_path = directory / "tokenizer_config.json"
    for path in (directory / "special_tokens_map.json", config_path):
        if not path.is_file():
            continue
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from error
        settings.update({k: _token_string(values[k]) for k in SPECIAL_KEYS if _token_string(values.get(k))})
        settings.update({k: bool(values[k]) for k in ("add_bos_token", "add_eos_token") if k in values})
        for index, token in (values.get("added_tokens_decoder") or {}).items():
            added[int(index)] = AddedToken(**{k: token[k] for k in ADDED_TOKEN_FIELDS if k in token})
    tokenizer = InternLM2Tokenizer(str(vocab), **settings)
    for index in sorted(added):
        tokenizer.add_tokens([added[index]], special_tokens=added[index].special)
        if tokenizer.convert_tokens_to_ids(added[index].content) != index:
            raise ValueError(f"{config_path}: added token {added[index].content!r} is recorded at id {index} but "
                             f"gets id {tokenizer.convert_tokens_to_ids(added[index].content)} on {vocab}")
    return tokenizer
