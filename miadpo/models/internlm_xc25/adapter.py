"""The ``internlm_xc25`` adapter: our InternLM-XComposer-2.5 implementation behind the model adapter interface.

In the prompt an image is ``<ImageHere>`` repeated once per token of its span (global view, separators,
crops); the template is ``internlm_xc25``. The tokenizer is the checkpoint's InternLM2 SentencePiece model, read
by our own class (no code of the weights directory runs), with ``<ImageHere>`` added; the tiny variant builds a
BPE tokenizer in code. LoRA (peft) goes on the decoder's own linear layers, never on the Partial-LoRA branches.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from miadpo.config import ModelConfig
from miadpo.models.base import ModelAdapter, unwrapped
from miadpo.models.geometry import ImageGeometry
from miadpo.models.internlm_xc25.checkpoint import load_model
from miadpo.models.internlm_xc25.hd import HDImageProcessor, hd_geometry
from miadpo.models.internlm_xc25.modeling import InternLMXComposer2Config, InternLMXComposer2ForCausalLM
from miadpo.models.internlm_xc25.tokenizer import VOCAB_FILE, load_internlm2_tokenizer
from miadpo.models.loading import ProcessorFiles, check_weights_path, torch_dtype
from miadpo.models.templates import get_template
from miadpo.models.tiny import build_tiny_tokenizer, seeded_init

IMAGE_HERE = "<ImageHere>"
CHAT_TOKENS = ["[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_146]"]  # end / start of a chat turn
TINY_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", *CHAT_TOKENS, IMAGE_HERE]


class InternLMXC25Adapter(ModelAdapter):
    """Adapter for :class:`InternLMXComposer2ForCausalLM`."""

    image_token = IMAGE_HERE
    module_paths = {"vision_tower": "vit", "projector": "vision_proj", "llm": "model"}

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: HDImageProcessor, template: Any,
                 cfg: ModelConfig) -> None:
        super().__init__(model, tokenizer, image_processor, template, cfg)
        if self.image_token_id != model.config.image_placeholder_id:
            raise ValueError(f"model {cfg.name!r}: the tokenizer's {IMAGE_HERE} is id {self.image_token_id}, "
                             f"the model expects {model.config.image_placeholder_id}")

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> InternLMXC25Adapter:
        """The tiny variant when ``cfg.path`` is null, else our model, tokenizer and image processor from the checkpoint
        (a hub id downloaded when allowed), crop budgets from ``cfg.internlm_xc25``; only sdpa or eager attention."""
        if cfg.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"model {cfg.name!r}: attn_implementation must be sdpa or eager for InternLM-XC2.5, "
                             f"not {cfg.attn_implementation!r}")
        dtype = torch_dtype(cfg.dtype)
        if cfg.path is None:
            model, tokenizer, image_processor = build_tiny_xc25(cfg)
        else:
            path = Path(check_weights_path(cfg))
            if not path.is_dir():  # a hub id, allowed by model.allow_download
                from huggingface_hub import snapshot_download

                path = Path(snapshot_download(str(path)))
            model = load_model(path, dtype, cfg.attn_implementation)
            tokenizer = checkpoint_tokenizer(path, model.config.image_placeholder_id)
            image_processor = HDImageProcessor.from_pretrained(path)
        options = cfg.internlm_xc25
        image_processor.hd_num, image_processor.hd_num_multi = options.hd_num, options.hd_num_multi
        model.to(dtype)
        return cls(model, tokenizer, image_processor, get_template(cfg.template), cfg)

    def plan_images(self, image_sizes: Sequence[tuple[int, int]]) -> list[ImageGeometry]:
        """The crop budget depends on how many images the prompt has (``hd_num`` / ``hd_num_multi``)."""
        return [hd_geometry(self.image_processor.layout(size, len(image_sizes))) for size in image_sizes]

    def image_geometry(self, image_size: tuple[int, int]) -> ImageGeometry:
        """The geometry of an image alone in its prompt (``hd_num`` crops at most)."""
        return self.plan_images([image_size])[0]

    def pixel_inputs(self, images: list[Image.Image], geometries: list[ImageGeometry]
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """All views from the HD image processor, and ``image_layout``: each image's crop grid (rows, cols)."""
        pixels, layouts = self.image_processor(images)
        grid = torch.tensor([[layout.rows, layout.cols] for layout in layouts], dtype=torch.long)
        return pixels, {"image_layout": grid}

    def attention_module(self, layer: nn.Module) -> nn.Module:
        """The layer's ``attention`` (InternLM2's name for self-attention)."""
        return layer.attention

    def image_features(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor] | None:
        """Our model's ``get_image_features`` (one tensor per image), which its forward takes back."""
        if inputs.get("pixel_values") is None:
            return None
        return unwrapped(model).get_image_features(inputs["pixel_values"], inputs["image_layout"])

    def default_lora_targets(self) -> str:
        """The decoder's own linear layers (``wqkv``, ``wo``, ``w1``–``w3``), not their Partial-LoRA branches."""
        prefix = self.module_name(self.module_groups()["llm"])
        return rf"{prefix}\.layers\.\d+\.(attention\.(wqkv|wo)|feed_forward\.(w1|w2|w3))"

    def processor_for_saving(self) -> ProcessorFiles:
        """The tokenizer and HD image processor as :class:`ProcessorFiles`, with :meth:`chat_template`."""
        return ProcessorFiles(self.tokenizer, self.image_processor, self.chat_template())


def checkpoint_tokenizer(path: Path, image_token_id: int) -> Any:
    """The directory's tokenizer with ``<ImageHere>`` (id ``image_token_id``) and a pad token, loaded without
    running any code of the directory: ``tokenizer.model`` (the checkpoint's InternLM2 SentencePiece model) through
    our :class:`InternLM2Tokenizer`, else a ``tokenizer.json`` (our tiny models' saves)."""
    if (path / VOCAB_FILE).is_file():
        tokenizer = load_internlm2_tokenizer(path)
    elif (path / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    else:
        raise FileNotFoundError(f"{path}: no tokenizer.model (InternLM2 SentencePiece) or tokenizer.json")
    if IMAGE_HERE not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_HERE], special_tokens=True)
    if tokenizer.convert_tokens_to_ids(IMAGE_HERE) != image_token_id:
        raise ValueError(f"{path}: {IMAGE_HERE} got id {tokenizer.convert_tokens_to_ids(IMAGE_HERE)}, the model "
                         f"expects {image_token_id}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def build_tiny_xc25(cfg: ModelConfig) -> tuple[InternLMXComposer2ForCausalLM, Any, HDImageProcessor]:
    """The architecture with random weights: ``tiny.image_size``-px crops of ``tiny.patch_size`` patches."""
    tiny = cfg.tiny
    patches = tiny.image_size // tiny.patch_size
    if patches % 2 or tiny.image_size % tiny.patch_size:
        raise ValueError("tiny_internlm_xc25: image_size / patch_size must be an even whole number (2 × 2 merge)")
    tokenizer = build_tiny_tokenizer(tiny.vocab_size, TINY_SPECIALS, extra={"image_token": IMAGE_HERE})
    config = InternLMXComposer2Config(
        vocab_size=len(tokenizer), hidden_size=tiny.hidden_size, intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers, num_attention_heads=tiny.num_heads,
        num_key_value_heads=max(1, tiny.num_heads // 2), max_position_embeddings=4096, rotary_base=10000.0,
        plora_r=8, plora_alpha=16, image_placeholder_id=tokenizer.convert_tokens_to_ids(IMAGE_HERE),
        vision_config={"hidden_size": tiny.vision_hidden_size, "intermediate_size": 2 * tiny.vision_hidden_size,
                       "num_hidden_layers": tiny.vision_layers, "num_attention_heads": 2,
                       "image_size": tiny.image_size, "patch_size": tiny.patch_size, "hidden_act": "quick_gelu"},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config._attn_implementation = cfg.attn_implementation
    model = seeded_init(InternLMXComposer2ForCausalLM, config, tiny.init_seed)
    return model, tokenizer, HDImageProcessor(crop_size=tiny.image_size, cells=patches // 2)
