"""Tiny models built entirely in code: real architectures, random weights, no download.

``build_tiny_tokenizer`` trains a small byte-level BPE in process (any text encodes; nothing is unknown).
``build_tiny_llava`` builds LlavaForConditionalGeneration from a CLIP vision config and a Llama text config.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from miadpo.config import TinyModelConfig
from miadpo.models.templates import TEMPLATES
from miadpo.text import IMAGE_TOKEN

M = TypeVar("M")
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN]

_CORPUS_WORDS = (
    "what", "is", "the", "colour", "of", "shape", "in", "image", "which", "picture", "shows", "a", "an",
    "there", "are", "how", "many", "objects", "left", "right", "top", "bottom", "centre", "center", "middle",
    "yes", "no", "answer", "question", "describe", "this", "photo", "man", "woman", "dog", "cat", "car", "bus",
    "tree", "person", "holding", "standing", "sitting", "on", "under", "next", "to", "one", "two", "three",
    "four", "five", "six", "seven", "eight", "nine", "ten", "only", "images", "were", "given", "for", "central",
    "subplot", "please", "look", "at",
)
# The colour and shape names of the corpus sentences, in this order (the trained merges depend on it). They are the
# synthetic data's names; kept here so that the model code does not depend on the data code.
_CORPUS_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "gray")
_CORPUS_SHAPES = ("circle", "square", "triangle", "diamond", "cross")


# The chat templates whose rendering the corpus holds, fixed (the trained merges depend on it): a template added later
# does not change the tiny tokenizers (tests/test_tiny_tokenizer.py pins them).
_CORPUS_TEMPLATES = ("vicuna_v1", "llava_v0", "llava_hf", "qwen2_vl", "chatml", "idefics3", "internlm_xc25", "plain")


def _corpus() -> list[str]:
    lines = [TEMPLATES[name].render("question") for name in _CORPUS_TEMPLATES]
    lines += [f"Image{i}: In Image{i}, in image{i}," for i in range(1, 10)]
    lines += [f"The {shape} is {colour}." for colour in _CORPUS_COLOURS for shape in _CORPUS_SHAPES]
    lines += [f"What colour is the {shape}?" for shape in _CORPUS_SHAPES]
    lines += [" ".join(_CORPUS_WORDS[i : i + 8]) for i in range(0, len(_CORPUS_WORDS), 4)]
    return lines


@functools.lru_cache(maxsize=32)
def _trained_bpe(vocab_size: int, special_tokens: tuple[str, ...], split_regex: str | None = None) -> str:
    """The trained tokenizer's JSON, once per process for each (vocab size, special tokens, pre-tokenizer)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    if split_regex is not None:  # a family's own pre-tokenization (Qwen's: NFC, regex split, bytes without a prefix)
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer)
    return tokenizer.to_str()


def build_tiny_tokenizer(vocab_size: int = 512, special_tokens: Sequence[str] = SPECIAL_TOKENS,
                         named: dict[str, str] | None = None, extra: dict[str, str] | None = None,
                         split_regex: str | None = None) -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE tokenizer trained in process (trained once per process; each call returns a
    new tokenizer, so callers may add tokens to it).

    ``special_tokens`` are added first (ids 0..); ``named`` sets bos/eos/unk/pad (LLaVA-style by default);
    ``extra`` names further special tokens (``tokenizer.<name>`` and ``tokenizer.<name>_id``). ``split_regex``: the
    family's pre-tokenizer regex, for families whose saved tokenizer transformers rebuilds with its own class
    (Qwen3.5's), so the rebuilt one splits text as this one does.
    """
    tokenizer = Tokenizer.from_str(_trained_bpe(vocab_size, tuple(special_tokens), split_regex))
    names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", **(named or {})}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        **names,
        extra_special_tokens=extra if extra is not None else {"image_token": IMAGE_TOKEN},
    )


def build_tiny_image_processor(image_size: int) -> CLIPImageProcessorPil:
    """A CLIP image processor for ``image_size``-px square inputs (shortest-edge resize, centre crop)."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )


def build_tiny_llava(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerFast,
                     attn_implementation: str = "sdpa") -> LlavaForConditionalGeneration:
    """A LLaVA-architecture model with random weights, seeded by ``cfg.init_seed``."""
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden_size,
        intermediate_size=cfg.vision_hidden_size * 2,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.num_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.vision_hidden_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(cfg.image_size // cfg.patch_size) ** 2,
    )
    config._attn_implementation = attn_implementation
    return seeded_init(LlavaForConditionalGeneration, config, cfg.init_seed)


def tiny_text_config(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerFast, **extra: Any) -> dict[str, Any]:
    """Decoder sizes of a tiny model (Llama/Qwen2-style text config keys), special ids from the tokenizer."""
    return {"vocab_size": len(tokenizer), "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": max(1, cfg.num_heads // 2), "max_position_embeddings": 4096,
            "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, **extra}


def tiny_layer_types(num_layers: int, local: str) -> list[str]:
    """A hybrid decoder's ``layer_types`` as the releases lay them out, shrunk: three ``local`` layers (linear or
    sliding-window attention), then a ``full_attention`` one, repeated."""
    return ["full_attention" if (i + 1) % 4 == 0 else local for i in range(num_layers)]


def seeded_init(model_class: type[M], config: PretrainedConfig, seed: int) -> M:
    """Random weights that depend only on ``seed`` (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config)
