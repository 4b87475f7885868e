"""GLM-4.1V, GLM-4.5V and GLM-4.6V: ``glm4_1v``, ``glm4_5v``, ``glm4_6v_flash`` from weights, ``tiny_glm4v``,
``tiny_glm4v_moe``, ``tiny_glm46v`` in code.

The token layout is Qwen2-VL's (:mod:`miadpo.models.qwen2_vl`) with GLM's own names and resize rule:

- Each image is resized by GLM's ``smart_resize`` (a still image counts as ``temporal_patch_size`` frames against
  ``[min_pixels, max_pixels]``; sides rounded to multiples of ``patch × merge``), cut into 14-px patches, and every
  ``merge × merge`` block of patches becomes one ``<|image|>`` token, row-major.
- In the prompt an image is ``<|begin_of_image|>`` + its ``<|image|>`` tokens + ``<|end_of_image|>``, as GLM's
  processor expands the chat template's ``<|begin_of_image|><|image|><|end_of_image|>``.
- 3-D rotary positions (``mrope_section``, summing to half the rotary width: GLM rotates half of each head,
  ``partial_rotary_factor`` 0.5) come from the model's own ``get_rope_index`` on ``mm_token_type_ids``.
- GLM-4.5V (``Glm4vMoeForConditionalGeneration``) routes through fused experts (``experts.gate_up_proj``,
  ``experts.down_proj``) after ``first_k_dense_replace`` dense layers: issue 33's LoRA rule holds (the routed experts
  and the router stay frozen unless ``model.lora.target_parameters`` names them); LoRA's default targets are the
  attention projections, since peft turns any MLP projection target of this family into the routed experts too.
  GLM-4.6V
  (``Glm46VForConditionalGeneration``) is GLM-4.1V's architecture under its own class.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn
from transformers import (
    Glm4vConfig,
    Glm4vForConditionalGeneration,
    Glm4vMoeConfig,
    Glm4vMoeForConditionalGeneration,
    Glm46VConfig,
    Glm46VForConditionalGeneration,
    PreTrainedTokenizerFast,
)
from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil, smart_resize

from miadpo.config import ModelConfig, TinyModelConfig
from miadpo.models.geometry import ImageGeometry
from miadpo.models.qwen2_vl import QwenVLAdapter
from miadpo.models.qwen3_vl import mrope_section
from miadpo.models.tiny import build_tiny_tokenizer, seeded_init, tiny_text_config

IMAGE, BEGIN_IMAGE, END_IMAGE = "<|image|>", "<|begin_of_image|>", "<|end_of_image|>"
VIDEO, BEGIN_VIDEO, END_VIDEO = "<|video|>", "<|begin_of_video|>", "<|end_of_video|>"
GLM_SPECIALS = ["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
                BEGIN_IMAGE, END_IMAGE, IMAGE, BEGIN_VIDEO, END_VIDEO, VIDEO, "<think>", "</think>"]
# The released tokenizers have no BOS (the chat template writes [gMASK]<sop>) and pad with <|endoftext|>.
GLM_NAMES = {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": None}
# Tiny MoE sizes: 4 routed experts, 2 per token, one shared expert, the first layer dense (as the release's).
TINY_GLM_EXPERTS = {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1}


class Glm4vAdapter(QwenVLAdapter):
    """Glm4vForConditionalGeneration (GLM-4.1V): Qwen2-VL's layout with GLM's markers and resize rule."""

    image_token = IMAGE
    model_class = Glm4vForConditionalGeneration
    image_processor_class = Glm4vImageProcessorPil
    config_class: ClassVar[Any] = Glm4vConfig

    @classmethod
    def build_tiny(cls, cfg: ModelConfig) -> tuple[nn.Module, PreTrainedTokenizerFast, Glm4vImageProcessorPil]:
        """(model, tokenizer, image processor) of ``tiny_glm4v``: GLM's specials, 2 × 2 merge, two-frame patches."""
        tiny = cfg.tiny
        tokenizer = build_tiny_tokenizer(tiny.vocab_size, GLM_SPECIALS, GLM_NAMES,
                                         extra={"image_token": IMAGE, "video_token": VIDEO})
        merge = 2 * tiny.patch_size
        image_processor = Glm4vImageProcessorPil(
            size={"shortest_edge": merge * merge, "longest_edge": tiny.image_size * tiny.image_size * tiny.max_tiles},
            patch_size=tiny.patch_size, merge_size=2, temporal_patch_size=2)
        return cls.tiny_model(tiny, tokenizer, cfg.attn_implementation), tokenizer, image_processor

    @classmethod
    def tiny_text_config(cls, tiny: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
        """Half of each head rotated (the release's ``partial_rotary_factor``), its 3-D split over that half."""
        head_dim = tiny.hidden_size // tiny.num_heads
        return tiny_text_config(tiny, tokenizer, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "mrope_section": mrope_section(head_dim // 4)})

    @classmethod
    def tiny_model(cls, tiny: TinyModelConfig, tokenizer: PreTrainedTokenizerFast, attn: str) -> nn.Module:
        """``config_class`` with :meth:`tiny_text_config`, a small vision tower and GLM's marker token ids; random
        weights."""
        ids = tokenizer.convert_tokens_to_ids
        config = cls.config_class(
            text_config=cls.tiny_text_config(tiny, tokenizer),
            # image_size sets the learned position grid (interpolated per image, as the released tower does).
            vision_config={"depth": tiny.vision_layers, "hidden_size": tiny.vision_hidden_size,
                           "intermediate_size": 2 * tiny.vision_hidden_size, "num_heads": 2,
                           "out_hidden_size": tiny.hidden_size, "patch_size": tiny.patch_size,
                           "image_size": 4 * tiny.patch_size, "spatial_merge_size": 2, "temporal_patch_size": 2},
            image_token_id=ids(IMAGE), video_token_id=ids(VIDEO), image_start_token_id=ids(BEGIN_IMAGE),
            image_end_token_id=ids(END_IMAGE), video_start_token_id=ids(BEGIN_VIDEO),
            video_end_token_id=ids(END_VIDEO))
        config._attn_implementation = attn
        return seeded_init(cls.model_class, config, tiny.init_seed)

    def _resized(self, image_size: tuple[int, int]) -> tuple[int, int]:
        processor = self.image_processor
        width, height = image_size
        new_h, new_w = smart_resize(processor.temporal_patch_size, height, width,
                                    temporal_factor=processor.temporal_patch_size,
                                    factor=processor.patch_size * processor.merge_size,
                                    min_pixels=processor.size["shortest_edge"],
                                    max_pixels=processor.size["longest_edge"])
        return new_w, new_h

    @property
    def chat_image_marker(self) -> str:
        """``<|begin_of_image|><|image|><|end_of_image|>``, as GLM's chat template writes an image."""
        return BEGIN_IMAGE + IMAGE + END_IMAGE  # as GLM's chat template writes an image

    def image_placeholder(self, geometry: ImageGeometry) -> str:
        """``<|begin_of_image|>`` + the image's ``<|image|>`` tokens + ``<|end_of_image|>``."""
        return BEGIN_IMAGE + IMAGE * geometry.num_tokens + END_IMAGE


class Glm4vMoeAdapter(Glm4vAdapter):
    """Glm4vMoeForConditionalGeneration (GLM-4.5V): GLM-4.1V's layout on a routed-experts decoder."""

    model_class = Glm4vMoeForConditionalGeneration
    config_class = Glm4vMoeConfig
    # peft (0.21) reads any gate_proj / up_proj / down_proj target of a ``glm4v_moe`` model as the transformers-v4
    # per-expert layers and adds the fused routed experts to it (at twice the rank): the default targets keep to
    # attention so that the experts stay frozen unless ``model.lora.target_parameters`` names them.
    lora_excluded_leaves = frozenset({"gate_proj", "up_proj", "down_proj"})

    @classmethod
    def tiny_text_config(cls, tiny: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
        """GLM-4.1V's tiny text config with ``TINY_GLM_EXPERTS`` and a ``moe_intermediate_size``."""
        return {**super().tiny_text_config(tiny, tokenizer), **TINY_GLM_EXPERTS,
                "moe_intermediate_size": tiny.intermediate_size // 2}


class Glm46VAdapter(Glm4vAdapter):
    """Glm46VForConditionalGeneration (GLM-4.6V-Flash): GLM-4.1V's architecture under its own class."""

    model_class = Glm46VForConditionalGeneration
    config_class = Glm46VConfig
