"""The model adapter interface: what every backbone provides to selection and training.

An adapter owns a Hugging Face model, its tokenizer and image processor, and a chat template. It turns
``(images, prompt, answer)`` into model inputs whose labels mask everything but the answer, and reports for
each image the positions of its tokens (``image_spans``) and its patch-grid geometry (``ImageGeometry``,
``geometry.py``: how a pixel box of the original image maps to those tokens through the model's own
preprocessing). It exposes the decoder layers (for attention capture), the module groups that can be frozen,
and LoRA targets. The containers it returns are in ``samples.py``; weight-path and dtype helpers in ``loading.py``.

A new backbone implements the abstract methods of :class:`ModelAdapter` (its image processor call, its
geometry, its saved processor) and overrides ``module_paths`` when its modules are laid out otherwise than
LLaVA's; everything else is shared.
"""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from PIL import Image
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from miadpo.config import LoraConfig, ModelConfig
from miadpo.models.geometry import ImageGeometry
from miadpo.models.loading import ProcessorFiles, check_weights_path, load_pretrained, torch_dtype
from miadpo.models.samples import IGNORE_INDEX, EncodedSample, ProcessedImages, SampleTooLongError
from miadpo.models.templates import ChatTemplate, get_template
from miadpo.text import IMAGE_TOKEN

log = logging.getLogger(__name__)


def unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (``model`` itself when it has none)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


class ModelAdapter(ABC):
    """Base class of all backbones. Subclasses implement the abstract methods below."""

    image_token: str = IMAGE_TOKEN
    # Where the freezable groups sit in the base model (dotted paths, in freezing order): transformers' LLaVA-style
    # layout; families laid out otherwise override it.
    module_paths: ClassVar[dict[str, str]] = {"vision_tower": "model.vision_tower",
                                              "projector": "model.multi_modal_projector",
                                              "llm": "model.language_model"}
    # The batch inputs the model's ``get_image_features`` reads (the vision path's inputs; families with image
    # grids or sizes add theirs). ``pixel_values`` is the one the forward no longer takes once features are given.
    image_feature_inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)
    # Whether the shared-prefix DPO forward is exact for this family: its decoder's cache can be repeated per answer
    # row (key/value caches can; a linear-attention layer's recurrent state cannot, today).
    shared_prefix_exact: ClassVar[bool] = True
    # Linear layers left out of the default LoRA targets (a family where peft would turn them into other targets).
    lora_excluded_leaves: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, template: ChatTemplate,
                 cfg: ModelConfig) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = template
        self.cfg = cfg
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(self.image_token))
        if tokenizer.pad_token_id is None:
            raise ValueError(f"model {cfg.name!r}: the tokenizer has no pad token")

    # ----- what a backbone implements -------------------------------------------------------------
    @classmethod
    @abstractmethod
    def from_config(cls, cfg: ModelConfig) -> ModelAdapter:
        """Build model, tokenizer and image processor from ``conf/model/<name>.yaml``."""

    @abstractmethod
    def pixel_inputs(self, images: list[Image.Image], geometries: list[ImageGeometry]
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The family's image processor on RGB images: pixel values and any extra model inputs (the step of
        :meth:`process_images` that differs per family; it may check its output against ``geometries``)."""

    @abstractmethod
    def image_geometry(self, image_size: tuple[int, int]) -> ImageGeometry:
        """Tokens and geometry of an image of ``(width, height)``, from its size alone (no pixels needed)."""

    @abstractmethod
    def processor_for_saving(self) -> Any:
        """A transformers processor (tokenizer + image processor + :meth:`chat_template`) saved beside the weights."""

    # ----- shared machinery -----------------------------------------------------------------------
    def module_groups(self) -> dict[str, nn.Module]:
        """The freezable parts of the base model: keys ``vision_tower``, ``projector``, ``llm`` (``module_paths``)."""
        return {group: self.base_model.get_submodule(path) for group, path in self.module_paths.items()}

    def process_images(self, images: Sequence[Image.Image]) -> ProcessedImages:
        """Run the model's image preprocessing (:meth:`pixel_inputs`) and compute each image's geometry."""
        if not images:
            return ProcessedImages(pixel_values=None, geometries=[])
        rgb = [image.convert("RGB") for image in images]
        geometries = self.plan_images([image.size for image in rgb])
        pixel_values, extra = self.pixel_inputs(rgb, geometries)
        return ProcessedImages(pixel_values=pixel_values.to(self.base_model.dtype), geometries=geometries, extra=extra)

    @property
    def base_model(self) -> nn.Module:
        """The transformers model without any peft wrapper."""
        return unwrapped(self.model)

    def decoder_layers(self) -> nn.ModuleList:
        """The LLM's decoder layers, for hooking one layer's attention."""
        return self.module_groups()["llm"].layers

    def attention_module(self, layer: nn.Module) -> nn.Module:
        """The self-attention module of one decoder layer (whose attention selection reads)."""
        return layer.self_attn

    def attention_layer_indices(self) -> list[int]:
        """The decoder layers with softmax attention over the whole sequence, whose weights selection can read: the
        text config's ``full_attention`` layers where it lists ``layer_types`` (a linear-attention layer has no
        weights, a sliding-window one sees only its window), else every layer."""
        types = getattr(self.base_model.config.get_text_config(), "layer_types", None)
        if types is None:
            return list(range(len(self.decoder_layers())))
        return [i for i, kind in enumerate(types) if kind == "full_attention"]

    def plan_images(self, image_sizes: Sequence[tuple[int, int]]) -> list[ImageGeometry]:
        """Geometries of all images of one prompt (backbones whose layout depends on the image count override)."""
        return [self.image_geometry(size) for size in image_sizes]

    @property
    def chat_image_marker(self) -> str:
        """What the saved chat template writes for one image: the text the family's processor expands into the
        image's tokens (families with wrapper tokens override it)."""
        return self.image_token

    def chat_template(self) -> str:
        """The Jinja chat template saved with every exported model: renders exactly miadpo's prompt."""
        return self.template.jinja(self.chat_image_marker)

    def image_placeholder(self, geometry: ImageGeometry) -> str:
        """Text that stands for one image (backbones with wrapper or marker tokens override it)."""
        return self.image_token * geometry.num_tokens

    def image_placeholders(self, geometries: Sequence[ImageGeometry]) -> list[str]:
        """The placeholders of a prompt's images, in order (backbones that number their images override it)."""
        return [self.image_placeholder(geometry) for geometry in geometries]

    @property
    def eos_token_id(self) -> int:
        """The token that ends an answer: the template's end token when it names one, else the tokenizer's EOS."""
        token = self.template.end_token
        return int(self.tokenizer.convert_tokens_to_ids(token)) if token else int(self.tokenizer.eos_token_id)

    def _prompt_ids(self, prompt: str, geometries: Sequence[ImageGeometry]) -> list[int]:
        pieces = self.template.render(prompt).split(IMAGE_TOKEN)
        if len(pieces) - 1 != len(geometries):
            raise ValueError(f"prompt has {len(pieces) - 1} {IMAGE_TOKEN} for {len(geometries)} images")
        text = pieces[0]
        for placeholder, piece in zip(self.image_placeholders(geometries), pieces[1:]):
            text += placeholder + piece
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        return ([bos] if bos is not None else []) + list(ids)

    def _answer_ids(self, answer: str) -> list[int]:
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        return list(ids) + [self.eos_token_id]

    def token_budget(self, max_length: int | None) -> int:
        """The tokens a sequence may take: ``max_length`` (a recipe's ``data.max_length``) or, when it is null, the
        model config's budget (``model.max_length``)."""
        return int(max_length) if max_length is not None else int(self.cfg.max_length)

    def count_tokens(self, prompt: str, answer: str, image_sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
        """(prompt length including image tokens, answer length including EOS) without image processing."""
        return len(self._prompt_ids(prompt, self.plan_images(image_sizes))), len(self._answer_ids(answer))

    def encode(self, images: ProcessedImages | Sequence[Image.Image], prompt: str, answer: str | None = None,
               max_length: int | None = None) -> EncodedSample:
        """Tokenize ``prompt`` (+ ``answer``) with each ``<image>`` expanded to its tokens.

        Labels are IGNORE_INDEX everywhere but the answer. With ``max_length``, the answer is cut to fit;
        a prompt that alone does not fit raises :class:`SampleTooLongError` (image tokens are never cut).
        """
        if not isinstance(images, ProcessedImages):
            images = self.process_images(images)
        prompt_ids = self._prompt_ids(prompt, images.geometries)
        answer_ids = self._answer_ids(answer) if answer is not None else []
        if max_length is not None and len(prompt_ids) + len(answer_ids) > max_length:
            if len(prompt_ids) >= max_length:
                raise SampleTooLongError(
                    f"prompt with its image tokens is {len(prompt_ids)} tokens; max_length (the token budget) is "
                    f"{max_length}"
                )
            answer_ids = answer_ids[: max_length - len(prompt_ids)]
        input_ids = torch.tensor(prompt_ids + answer_ids, dtype=torch.long)
        labels = input_ids.clone()
        labels[: len(prompt_ids)] = IGNORE_INDEX
        return EncodedSample(
            input_ids=input_ids,
            labels=labels,
            image_spans=self._image_spans(input_ids[: len(prompt_ids)], images.geometries),
            geometries=images.geometries,
            pixel_values=images.pixel_values,
            prompt_length=len(prompt_ids),
            extra=images.extra,
        )

    def _image_spans(self, prompt_ids: torch.Tensor, geometries: Sequence[ImageGeometry]) -> list[tuple[int, int]]:
        positions = (prompt_ids == self.image_token_id).nonzero().flatten().tolist()
        expected = sum(g.image_token_ids for g in geometries)
        if len(positions) != expected:
            raise ValueError(f"found {len(positions)} image tokens, expected {expected}")
        spans, cursor = [], 0
        for geometry in geometries:
            start, end = positions[cursor], positions[cursor + geometry.image_token_ids - 1] + 1
            if end - start != geometry.num_tokens:
                raise ValueError(f"an image's span is {end - start} tokens, its geometry says {geometry.num_tokens}")
            spans.append((start, end))
            cursor += geometry.image_token_ids
        return spans

    def collate(self, samples: Sequence[EncodedSample], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Pad a list of samples (any number of images each) into one batch of model inputs.

        Right padding for training and teacher-forced passes; left padding for batched generation.
        """
        def padded(rows: list[torch.Tensor], value: int) -> torch.Tensor:
            return pad_sequence(rows, batch_first=True, padding_value=value, padding_side=padding_side).long()

        batch = {
            "input_ids": padded([s.input_ids for s in samples], self.tokenizer.pad_token_id),
            "attention_mask": padded([torch.ones(int(s.input_ids.numel()), dtype=torch.long) for s in samples], 0),
            "labels": padded([s.labels for s in samples], IGNORE_INDEX),
        }
        batch.update(self.collate_images(samples))
        return batch

    def collate_images(self, samples: Sequence[EncodedSample]) -> dict[str, torch.Tensor]:
        """The image inputs of a batch: per-sample tensors concatenated along the first dimension."""
        batch: dict[str, torch.Tensor] = {}
        pixels = [s.pixel_values for s in samples if s.pixel_values is not None and len(s.pixel_values)]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels, dim=0)
        keys = {key for s in samples for key in s.extra}
        for key in sorted(keys):
            batch[key] = torch.cat([s.extra[key] for s in samples if s.extra.get(key) is not None], dim=0)
        return batch

    def prompt_position_ids(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Position ids of a (left-padded) batch, as the model computes them for right-padded rows: real tokens
        count from 0. Shape (B, L); backbones with multi-axis positions (Qwen's mRoPE) return (axes, B, L)."""
        return (batch["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)

    @torch.no_grad()
    def input_embeddings(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The embeddings the LLM receives (text embeddings with image features merged in)."""
        captured: dict[str, torch.Tensor] = {}

        def grab(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured["embeds"] = kwargs["inputs_embeds"]

        handle = self.module_groups()["llm"].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self.model(**{k: v for k, v in batch.items() if k != "labels"})
        finally:
            handle.remove()
        return captured["embeds"]

    def image_features(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any | None:
        """The vision path's output for a batch's images (``None`` when it has none), in the form the model's
        forward takes back as ``mm_encoder_outputs["image"]`` (:meth:`with_image_features`)."""
        if inputs.get("pixel_values") is None:
            return None
        return unwrapped(model).get_image_features(**{k: inputs[k] for k in self.image_feature_inputs if k in inputs},
                                                   return_dict=True)

    @staticmethod
    def with_image_features(inputs: dict[str, torch.Tensor], features: Any | None) -> dict[str, Any]:
        """Model inputs that pass precomputed image ``features`` instead of the pixels they came from (the other
        image inputs stay: the families' position rules read them)."""
        if features is None:
            return dict(inputs)
        rest: dict[str, Any] = {k: v for k, v in inputs.items() if k != "pixel_values"}
        rest["mm_encoder_outputs"] = {"image": features}
        return rest

    def language_model(self, model: nn.Module) -> nn.Module:
        """``model``'s decoder (the ``llm`` group of that model: the policy, its frozen copy or a reloaded one)."""
        return unwrapped(model).get_submodule(self.module_paths["llm"])

    def logits_of(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The logits ``model`` computes from its decoder's last hidden states: its LM head, and the final logit
        soft-capping where the text config has one."""
        base = unwrapped(model)
        logits = base.get_output_embeddings()(hidden)
        cap = getattr(base.config.get_text_config(), "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def hidden_forward(self, model: nn.Module, **inputs: Any) -> tuple[torch.Tensor, Any]:
        """``model(**inputs)`` with no logits computed: the decoder's last (normed) hidden states and the output
        (its cache). The LM head runs later, on the rows that need it (:meth:`logits_of`)."""
        captured: dict[str, torch.Tensor] = {}

        def grab(_module: nn.Module, _args: tuple, output: Any) -> None:
            captured["hidden"] = output if isinstance(output, torch.Tensor) else output[0]

        handle = self.language_model(model).register_forward_hook(grab)
        try:
            no_position = torch.zeros(0, dtype=torch.long, device=inputs["input_ids"].device)
            output = model(**inputs, logits_to_keep=no_position)
        finally:
            handle.remove()
        return captured["hidden"], output

    def generation_inputs(self, prompts: Sequence[EncodedSample]) -> dict[str, torch.Tensor]:
        """Prompts as one left-padded batch for ``generate``, labels dropped, on the model's device."""
        batch = self.collate(prompts, padding_side="left")
        batch.pop("labels")
        device = next(self.model.parameters()).device
        return {k: v.to(device) for k, v in batch.items()}

    @torch.no_grad()
    def generate_answers(self, prompts: Sequence[EncodedSample], max_new_tokens: int,
                         **sampling: Any) -> list[str]:
        """Decoded answers to a batch of prompts; greedy unless ``sampling`` (do_sample, temperature, top_p) says."""
        batch = self.generation_inputs(prompts)
        output = self.model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                     eos_token_id=self.eos_token_id, **(sampling or {"do_sample": False}))
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip()
                for row in output[:, batch["input_ids"].shape[1] :]]

    # ----- training set-up ------------------------------------------------------------------------
    def freeze(self, vision_tower: bool, projector: bool, llm: bool) -> None:
        """Freeze switches per group, applied in ``module_groups`` order. The LM head follows the LLM's switch;
        any other parameter outside the groups (e.g. LLaVA-OneVision's newline embedding) the projector's."""
        flags = {"vision_tower": vision_tower, "projector": projector, "llm": llm}
        seen: set[int] = set()
        for name, module in self.module_groups().items():
            for parameter in module.parameters():
                parameter.requires_grad_(not flags[name])
                seen.add(id(parameter))
        head = self.base_model.get_output_embeddings()
        for parameter in head.parameters() if head is not None else ():
            if id(parameter) not in seen:
                parameter.requires_grad_(not llm)
                seen.add(id(parameter))
        for parameter in self.base_model.parameters():
            if id(parameter) not in seen:
                parameter.requires_grad_(not projector)

    def module_name(self, module: nn.Module) -> str:
        """The dotted name of ``module`` in the base model; fails when it is not part of it."""
        for name, candidate in self.base_model.named_modules():
            if candidate is module:
                return name
        raise ValueError("module is not part of the model")

    def default_lora_targets(self) -> str:
        """Regex over module names: every linear layer of the LLM (lm_head is outside it) but
        ``lora_excluded_leaves``."""
        llm = self.module_groups()["llm"]
        prefix = self.module_name(llm)
        leaves = sorted({name.rsplit(".", 1)[-1] for name, m in llm.named_modules() if isinstance(m, nn.Linear)}
                        - self.lora_excluded_leaves)
        return rf"{re.escape(prefix)}\..*\.({'|'.join(leaves)})"

    def add_lora(self, lora: LoraConfig, trainable_groups: Sequence[str] = ()) -> None:
        """Wrap the model with peft LoRA; non-LLM groups named in ``trainable_groups`` are saved in full."""
        targets = lora.target_modules if lora.target_modules is not None else self.default_lora_targets()
        if not isinstance(targets, str):
            targets = list(targets)
        groups = self.module_groups()
        config = PeftLoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=targets,
            target_parameters=list(lora.target_parameters) if lora.target_parameters else None,
            modules_to_save=[self.module_name(groups[g]) for g in trainable_groups if g != "llm"] or None,
            bias="none",
        )
        self.model = get_peft_model(self.model, config)

    def prepare_for_training(self) -> None:
        """Apply the freeze switches, LoRA and gradient checkpointing from the model config."""
        cfg = self.cfg
        self.freeze(cfg.freeze_vision_tower, cfg.freeze_projector, cfg.freeze_llm)
        if cfg.lora.enabled:
            unfrozen = [g for g, frozen in (("vision_tower", cfg.freeze_vision_tower),
                                            ("projector", cfg.freeze_projector)) if not frozen]
            self.add_lora(cfg.lora, unfrozen)
        if cfg.gradient_checkpointing:
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if cfg.lora.enabled:
                self.base_model.enable_input_require_grads()

    def save_base(self, directory: str | Path) -> Path:
        """Save the base weights, config, tokenizer and processor as a standard transformers directory."""
        if isinstance(self.model, PeftModel):
            raise RuntimeError("save_base must run before LoRA is added (the base weights would carry it)")
        directory = Path(directory)
        self.model.save_pretrained(directory)
        self.processor_for_saving().save_pretrained(directory)
        return directory


class SeparatePartsAdapter(ModelAdapter):
    """Base of the families whose transformers processor class needs torchvision (a video processor): their
    tokenizer and PIL image processor are built, loaded and saved on their own (:class:`ProcessorFiles`).

    A subclass names ``model_class`` and ``image_processor_class`` and builds its tiny variant in ``build_tiny``.
    """

    model_class: Any
    image_processor_class: Any

    @classmethod
    @abstractmethod
    def build_tiny(cls, cfg: ModelConfig) -> tuple[nn.Module, Any, Any]:
        """(model, tokenizer, image processor) of the tiny in-code variant described by ``cfg.tiny``."""

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> ModelAdapter:
        """The tiny variant (:meth:`build_tiny`) when ``cfg.path`` is null, else ``model_class``, the tokenizer and
        ``image_processor_class`` loaded from the weights directory."""
        if cfg.path is None:
            model, tokenizer, image_processor = cls.build_tiny(cfg)
        else:
            from transformers import AutoTokenizer

            path = check_weights_path(cfg)
            model = load_pretrained(cls.model_class, path, dtype=torch_dtype(cfg.dtype),
                                    attn_implementation=cfg.attn_implementation)
            tokenizer = AutoTokenizer.from_pretrained(path)
            image_processor = cls.image_processor_class.from_pretrained(path)
        model.to(torch_dtype(cfg.dtype))
        return cls(model, tokenizer, image_processor, get_template(cfg.template), cfg)

    def processor_for_saving(self) -> ProcessorFiles:
        """The tokenizer and image processor as :class:`ProcessorFiles`, with :meth:`chat_template`."""
        return ProcessorFiles(self.tokenizer, self.image_processor, self.chat_template())
