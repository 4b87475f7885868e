"""Qwen3-VL and Qwen3.5 (dense and MoE): ``qwen3_vl``, ``qwen3_vl_moe``, ``qwen3_5``, ``qwen3_5_moe`` from weights,
``tiny_*`` in code.

The token layout is Qwen2-VL's (:mod:`miadpo.models.qwen2_vl`: ``smart_resize``, ``<|vision_start|>`` + one
``<|image_pad|>`` per merged 2 × 2 patch block + ``<|vision_end|>``; the released vision towers use 16-px patches,
so a token covers 32 × 32 px). What differs, all computed by transformers' own classes:

- **Qwen3-VL**: interleaved mRoPE (``mrope_interleaved``: the temporal, height and width frequencies alternate
  instead of sitting in three blocks) and DeepStack — features of some vision layers (``deepstack_visual_indexes``)
  are added to the first decoder layers' hidden states at the image tokens. ``get_image_features`` returns them
  beside the merged features, so shared image features carry them too. The DeepStack mergers sit in the vision
  tower (they follow ``freeze_vision_tower``); the projector group is the final merger.
- **Qwen3.5**: a hybrid decoder — most layers are Gated DeltaNet linear attention, every
  ``full_attention_interval``-th (4th) layer softmax attention (``layer_types``). A linear-attention layer keeps a
  recurrent state, not keys and values, and transformers' cache cannot repeat or select that state per row, so
  the shared-prefix fast path falls back to the plain forward for this family (``shared_prefix_exact``).
  Selection reads attention at a full-attention layer (``layer_types``, ``attention_layer_indices``).
- **MoE** (Qwen3-VL-30B-A3B, Qwen3.5-35B-A3B): routed experts are fused 3-D parameters (``experts.gate_up_proj``,
  ``experts.down_proj``), not ``nn.Linear``. LoRA's default targets are the LLM's linear layers (attention,
  linear attention, Qwen3.5's shared expert and its gate); the routed experts and the router stay frozen unless
  ``model.lora.target_parameters`` names them (peft's ``target_parameters``).
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn
from transformers import (
    PreTrainedTokenizerFast,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeConfig,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)
from transformers.models.qwen3_5.tokenization_qwen3_5 import PRETOKENIZE_REGEX as QWEN3_5_SPLIT

from miadpo.config import TinyModelConfig
from miadpo.models.qwen2_vl import QwenVLAdapter
from miadpo.models.tiny import seeded_init, tiny_layer_types, tiny_text_config

# Tiny MoE sizes: 4 experts, 2 per token.
TINY_EXPERTS = {"num_experts": 4, "num_experts_per_tok": 2}


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3VLForConditionalGeneration: interleaved mRoPE and DeepStack on Qwen2-VL's token layout."""

    model_class = Qwen3VLForConditionalGeneration
    config_class: ClassVar[Any] = Qwen3VLConfig

    @classmethod
    def tiny_vision_config(cls, tiny: TinyModelConfig) -> dict[str, Any]:
        """A 16-position (4 × 4) learned position grid, interpolated per image as the released tower does."""
        return {"depth": tiny.vision_layers, "hidden_size": tiny.vision_hidden_size,
                "intermediate_size": 2 * tiny.vision_hidden_size, "num_heads": 2, "out_hidden_size": tiny.hidden_size,
                "patch_size": tiny.patch_size, "spatial_merge_size": 2, "temporal_patch_size": 2,
                "num_position_embeddings": 16, "deepstack_visual_indexes": [0]}

    @classmethod
    def tiny_text_config(cls, tiny: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
        """Interleaved mRoPE rotating the whole head, its split summing to half the head size."""
        head_dim = tiny.hidden_size // tiny.num_heads
        return tiny_text_config(tiny, tokenizer, head_dim=head_dim,
                                rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                                 "mrope_section": mrope_section(head_dim // 2),
                                                 "mrope_interleaved": True})

    @classmethod
    def tiny_model(cls, tiny: TinyModelConfig, tokenizer: PreTrainedTokenizerFast, attn: str) -> nn.Module:
        """``config_class`` from :meth:`tiny_text_config` and :meth:`tiny_vision_config`; random weights."""
        config = cls.config_class(text_config=cls.tiny_text_config(tiny, tokenizer),
                                  vision_config=cls.tiny_vision_config(tiny), **cls.vision_token_ids(tokenizer))
        config._attn_implementation = attn
        return seeded_init(cls.model_class, config, tiny.init_seed)


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    """Qwen3VLMoeForConditionalGeneration: Qwen3-VL with a routed-experts MLP in every decoder layer."""

    model_class = Qwen3VLMoeForConditionalGeneration
    config_class = Qwen3VLMoeConfig

    @classmethod
    def tiny_text_config(cls, tiny: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
        """Qwen3-VL's tiny text config with ``TINY_EXPERTS`` in every layer."""
        return {**super().tiny_text_config(tiny, tokenizer), **TINY_EXPERTS,
                "moe_intermediate_size": tiny.intermediate_size // 2, "decoder_sparse_step": 1}


class Qwen35Adapter(Qwen3VLAdapter):
    """Qwen3_5ForConditionalGeneration: a hybrid linear / full attention decoder (no DeepStack)."""

    model_class = Qwen3_5ForConditionalGeneration
    config_class = Qwen3_5Config
    shared_prefix_exact = False
    # Split as Qwen3.5's tokenizer splits: transformers reloads a saved ``qwen3_5`` tokenizer as ``Qwen3_5Tokenizer``,
    # which rebuilds its pre-tokenizer whatever ``tokenizer.json`` says.
    tiny_split_regex = QWEN3_5_SPLIT

    @classmethod
    def tiny_vision_config(cls, tiny: TinyModelConfig) -> dict[str, Any]:
        """Qwen3-VL's tiny vision config without DeepStack."""
        vision = super().tiny_vision_config(tiny)
        del vision["deepstack_visual_indexes"]
        return vision

    @classmethod
    def tiny_text_config(cls, tiny: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
        """Released layout: three linear-attention layers, then one full-attention layer (``tiny.num_layers`` a
        multiple of 4 keeps it); partial rotary (a quarter of the head in the release, half here) with an
        interleaved mRoPE split over the rotary half."""
        head_dim = tiny.hidden_size // tiny.num_heads
        rotary_half = head_dim // 4
        return tiny_text_config(
            tiny, tokenizer, head_dim=head_dim, layer_types=tiny_layer_types(tiny.num_layers, "linear_attention"),
            linear_key_head_dim=head_dim // 2, linear_value_head_dim=head_dim // 2, linear_num_key_heads=2,
            linear_num_value_heads=4, linear_conv_kernel_dim=4,
            rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.5,
                             "mrope_section": mrope_section(rotary_half), "mrope_interleaved": True})


class Qwen35MoeAdapter(Qwen35Adapter):
    """Qwen3_5MoeForConditionalGeneration: Qwen3.5 with routed experts and a gated shared expert."""

    model_class = Qwen3_5MoeForConditionalGeneration
    config_class = Qwen3_5MoeConfig

    @classmethod
    def tiny_text_config(cls, tiny: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
        """Qwen3.5's tiny text config with ``TINY_EXPERTS`` and a shared expert, no dense ``intermediate_size``."""
        config = {**super().tiny_text_config(tiny, tokenizer), **TINY_EXPERTS,
                  "moe_intermediate_size": tiny.intermediate_size // 2,
                  "shared_expert_intermediate_size": tiny.intermediate_size // 2}
        del config["intermediate_size"]
        return config


def mrope_section(half: int) -> list[int]:
    """(temporal, height, width) frequency counts summing to ``half``, the rotary half-width (the releases: Qwen3-VL
    24 / 20 / 20 of 64, Qwen3.5 11 / 11 / 10 of 32); here height and width equal, temporal the rest."""
    side = half // 3
    return [half - 2 * side, side, side]
