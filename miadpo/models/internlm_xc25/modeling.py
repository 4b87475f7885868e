"""InternLM-XComposer-2.5 as one transformers model: vision path + InternLM2 decoder + LM head.

Module names are the checkpoint's (``vit``, ``vision_proj``, ``plora_glb_GN``, ``plora_sub_GN``, ``model``,
``output``), so the official tensors load by name (``checkpoint.py``) and ``save_pretrained`` writes the same
layout back.

Inputs: ``input_ids`` in which every image token (separators included) is ``config.image_placeholder_id``, all
views of all images of the batch in ``pixel_values`` (global view then crops, image after image, row after row), and
each image's crop grid in ``image_layout`` (rows, cols). The image features replace the image tokens'
embeddings in order, and ``im_mask`` (= the image-token positions) switches Partial-LoRA on there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import CLIPVisionConfig, DynamicCache, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from miadpo.models.internlm_xc25.internlm2 import InternLM2Model
from miadpo.models.internlm_xc25.vision import VisionTower, layout_tokens, merge_2x2
from miadpo.models.loading import CACHE_NAME

# CLIP ViT-L/14 run at 560 px (internlm/internlm-xcomposer2d5-clip).
CLIP_L14_560 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                "image_size": 560, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
                "projection_dim": 768}


class InternLMXComposer2Config(PretrainedConfig):
    """Sizes of the decoder (InternLM2-7B by default), the Partial-LoRA rank and the vision tower."""

    model_type = "miadpo_internlm_xc25"
    sub_configs = {"vision_config": CLIPVisionConfig}

    def __init__(self, vocab_size: int = 92544, hidden_size: int = 4096, intermediate_size: int = 14336,
                 num_hidden_layers: int = 32, num_attention_heads: int = 32, num_key_value_heads: int = 8,
                 rms_norm_eps: float = 1e-5, rotary_base: float = 1_000_000.0,
                 rotary_dynamic_factor: float | None = 2.0,
                 max_position_embeddings: int = 24576, plora_r: int = 256, plora_alpha: int = 256,
                 vision_config: dict | CLIPVisionConfig | None = None, image_placeholder_id: int = 92544,
                 initializer_range: float = 0.02, **kwargs: Any) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.rms_norm_eps = rms_norm_eps
        self.rotary_base = rotary_base
        self.rotary_dynamic_factor = rotary_dynamic_factor
        self.max_position_embeddings = max_position_embeddings
        self.plora_r = plora_r
        self.plora_alpha = plora_alpha
        if not isinstance(vision_config, CLIPVisionConfig):
            vision_config = CLIPVisionConfig(**(vision_config or CLIP_L14_560))
        self.vision_config = vision_config
        # Not named *_token_id: for the official checkpoint it is past the vocabulary (92544) on purpose, as
        # its embedding is never looked up; transformers would warn about such a token id.
        self.image_placeholder_id = image_placeholder_id
        self.initializer_range = initializer_range
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class InternLMXComposer2ForCausalLM(PreTrainedModel, GenerationMixin):
    """The whole model: CLIP tower (``vit``), projector (``vision_proj``), separators, InternLM2 decoder (``model``)
    and LM head (``output``)."""

    config_class = InternLMXComposer2Config
    config: InternLMXComposer2Config
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _no_split_modules = ["DecoderLayer", "CLIPEncoderLayer"]

    def __init__(self, config: InternLMXComposer2Config) -> None:
        super().__init__(config)
        width, hidden = 4 * config.vision_config.hidden_size, config.hidden_size
        self.vit = VisionTower(config.vision_config)
        self.vision_proj = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.plora_glb_GN = nn.Parameter(torch.zeros(1, 1, width))
        self.plora_sub_GN = nn.Parameter(torch.zeros(1, 1, 1, width))
        self.model = InternLM2Model(config)
        self.output = nn.Linear(hidden, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self:
            init.normal_(self.plora_glb_GN, std=self.config.initializer_range)
            init.normal_(self.plora_sub_GN, std=self.config.initializer_range)

    def get_input_embeddings(self) -> nn.Embedding:
        """The decoder's ``tok_embeddings``."""
        return self.model.tok_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the decoder's ``tok_embeddings``."""
        self.model.tok_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        """The LM head, ``output``."""
        return self.output

    def get_image_features(self, pixel_values: torch.Tensor, image_layout: torch.Tensor) -> list[torch.Tensor]:
        """All views of the batch's images → one (tokens, hidden) tensor per image, in order."""
        merged = merge_2x2(self.vit(pixel_values.to(self.vit.vision_tower.dtype)))
        features, start = [], 0
        for rows, cols in image_layout.tolist():
            views = merged[start : start + 1 + rows * cols]
            tokens = layout_tokens(views, rows, cols, self.plora_sub_GN, self.plora_glb_GN)
            features.append(self.vision_proj(tokens))
            start += 1 + rows * cols
        if start != merged.shape[0]:
            raise ValueError(f"image_layout accounts for {start} views, pixel_values holds {merged.shape[0]}")
        return features

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_layout: torch.Tensor | None,
              image_features: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Text embeddings with the image features (``image_features``, or computed from the pixels) put at the
        image tokens, and the image-token mask."""
        im_mask = input_ids == self.config.image_placeholder_id
        embeds = self.model.tok_embeddings(input_ids.masked_fill(im_mask, 0))
        if pixel_values is not None and image_features is not None:
            raise ValueError("pass pixel_values or precomputed image features (mm_encoder_outputs), not both")
        if image_features is None:
            if pixel_values is None:
                return embeds, im_mask
            if image_layout is None:
                raise ValueError("pixel_values without image_layout (rows, cols of each image's crop grid)")
            image_features = self.get_image_features(pixel_values, image_layout)
        features = torch.cat(image_features)
        if features.shape[0] != int(im_mask.sum()):
            raise ValueError(f"{int(im_mask.sum())} image tokens in input_ids, the images give {features.shape[0]}")
        return embeds.masked_scatter(im_mask[..., None], features.to(embeds.dtype)), im_mask

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_layout: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: Any = None, cache: Any = None,
                labels: torch.Tensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0,
                inputs_embeds: torch.Tensor | None = None, im_mask: torch.Tensor | None = None,
                mm_encoder_outputs: dict[str, list[torch.Tensor]] | None = None, **_: Any) -> CausalLMOutputWithPast:
        """As transformers' VLMs: ``mm_encoder_outputs={"image": get_image_features(...)}`` passes precomputed
        image features in place of ``pixel_values``."""
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is None:
            inputs_embeds, im_mask = self.embed(input_ids, pixel_values, image_layout,
                                                (mm_encoder_outputs or {}).get("image"))
        if im_mask is not None and not bool(im_mask.any()):
            im_mask = None
        if use_cache and cache is None:
            cache = DynamicCache()
        hidden = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, im_mask=im_mask,
                            position_ids=position_ids, past_key_values=cache)
        # As transformers' models: the last ``logits_to_keep`` positions, or the positions a 1-D tensor lists.
        keep = logits_to_keep if isinstance(logits_to_keep, torch.Tensor) else slice(-logits_to_keep or None, None)
        logits = self.output(hidden[:, keep])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_NAME: cache if use_cache else None})

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, past_key_values: Any = None, cache: Any = None,
                                      attention_mask: torch.Tensor | None = None,
                                      pixel_values: torch.Tensor | None = None,
                                      image_layout: torch.Tensor | None = None, use_cache: bool = True,
                                      **_: Any) -> dict[str, Any]:
        """New tokens only once the cache holds the prompt; the images go in with the prompt (first step)."""
        cache = cache if cache is not None else past_key_values
        past = cache.get_seq_length() if cache is not None else 0
        inputs: dict[str, Any] = {"input_ids": input_ids[:, past:], "attention_mask": attention_mask,
                                  "use_cache": use_cache, "cache": cache}
        if attention_mask is not None:
            inputs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        if past == 0:
            inputs.update(pixel_values=pixel_values, image_layout=image_layout)
        return inputs
