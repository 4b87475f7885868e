"""Loading InternLM-XComposer-2.5 weights by the checkpoint's own parameter names, checked.

Our modules carry the checkpoint's names, so a tensor loads into the parameter of the same name — except
inside the CLIP tower, whose transformers layout changed: the checkpoint's ``vit.vision_tower.vision_model.*``
is ``vit.vision_tower.*`` in transformers ≥ 5.2x (``TOWER_PREFIXES`` maps either way). The table below is the
contract: every checkpoint name must match one of its patterns (source = where the public
modeling code of ``internlm/internlm-xcomposer2d5-7b`` defines it), every model parameter must receive a
tensor, shapes must agree. Anything else is an error that lists the names. One exception is handled on
purpose: a vision tower whose position embeddings were trained at another resolution (e.g. CLIP-L/14-336's
24 × 24 grid) is interpolated bicubically to the tower's grid (40 × 40 at 560 px).

Directories written by ``save_pretrained`` of our model have the same names and load the same way.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch.nn import functional as F
from transformers.initialization import no_init_weights

from miadpo.models.internlm_xc25.modeling import (
    CLIP_L14_560,
    InternLMXComposer2Config,
    InternLMXComposer2ForCausalLM,
)
from miadpo.models.loading import weight_file_errors

log = logging.getLogger(__name__)

# (pattern over checkpoint names, where the public modeling code defines the tensor)
CHECKPOINT_NAMES: tuple[tuple[str, str], ...] = (
    (r"vit\.vision_tower\.(vision_model\.)?.+",
     "build_mlp.py: CLIPVisionTower.vision_tower, a transformers CLIPVisionModel (internlm-xcomposer2d5-clip)"),
    (r"vision_proj\.[02]\.(weight|bias)", "build_mlp.py: build_vision_projector(), mlp2x_gelu (Linear, GELU, Linear)"),
    (r"plora_glb_GN", "modeling_internlm_xcomposer2.py: InternLMXComposer2ForCausalLM.plora_glb_GN"),
    (r"plora_sub_GN", "modeling_internlm_xcomposer2.py: InternLMXComposer2ForCausalLM.plora_sub_GN"),
    (r"model\.tok_embeddings\.weight", "modeling_internlm2.py: InternLM2Model.tok_embeddings"),
    (r"model\.layers\.\d+\.attention\.(wqkv|wo)(\.Plora_[AB])?\.weight",
     "modeling_internlm2.py: InternLM2Attention.wqkv / wo, PLoRA layers of build_mlp.py"),
    (r"model\.layers\.\d+\.feed_forward\.w[123](\.Plora_[AB])?\.weight",
     "modeling_internlm2.py: InternLM2MLP.w1 / w3 / w2, PLoRA layers of build_mlp.py"),
    (r"model\.layers\.\d+\.(attention_norm|ffn_norm)\.weight", "modeling_internlm2.py: InternLM2DecoderLayer norms"),
    (r"model\.norm\.weight", "modeling_internlm2.py: InternLM2Model.norm"),
    (r"output\.weight", "modeling_internlm_xcomposer2.py: InternLMXComposer2ForCausalLM.output"),
)
# Buffers some checkpoints carry; recomputed here.
IGNORED_NAMES = (r".*\.rotary_emb\.inv_freq", r"vit\.vision_tower\.(vision_model\.)?embeddings\.position_ids")
# Tensors of the released checkpoint that this model does not use: skipped, counted in the load report.
# (pattern, the linear they belong to (\1), where the public modeling code defines them)
UNUSED_NAMES: tuple[tuple[str, str], ...] = (
    (r"(model\.layers\.\d+\.(?:attention\.(?:wqkv|wo)|feed_forward\.w[123]))\.lora_(?:sft|dpo|web)_[AB]\.weight",
     "build_mlp.py: PLoRA.lora_sft_A/B, lora_dpo_A/B (rank 256), lora_web_A/B (rank 512) — the article-writing "
     "and webpage task adapters, applied only by the original's infer_mode='write' / 'web'"),
)
POSITION_EMBEDDING = "embeddings.position_embedding.weight"  # ends the tower's position table name
# The CLIP tower's prefix in the checkpoint (transformers 4.x layout) and in current transformers.
TOWER_PREFIXES = ("vit.vision_tower.vision_model.", "vit.vision_tower.")
OFFICIAL_MODEL_TYPES = ("internlmxcomposer2", "internlm_xcomposer2", "internlmxcomposer2d5")
EXAMPLE_PLORA = "model.layers.0.attention.wqkv.Plora_A.weight"


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors and the model's parameters do not correspond one to one."""


def _match(name: str, patterns: tuple[str, ...]) -> bool:
    return any(re.fullmatch(pattern, name) for pattern in patterns)


def is_checkpoint_name(name: str) -> bool:
    """Whether ``name`` matches a pattern of ``CHECKPOINT_NAMES``."""
    return _match(name, tuple(pattern for pattern, _ in CHECKPOINT_NAMES))


def weight_files(directory: Path) -> list[Path]:
    """The directory's safetensors shards, else its PyTorch ``.bin`` shards."""
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        files = sorted(directory.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(f"{directory}: no *.safetensors or pytorch_model*.bin weight files")


def read_tensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight file, one file in memory at a time."""
    for path in weight_files(directory):
        if path.suffix == ".safetensors":
            with weight_file_errors(path), safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    yield name, handle.get_tensor(name)
        else:
            with weight_file_errors(path):
                tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            yield from tensors.items()


def tensor_shape(directory: Path, name: str) -> tuple[int, ...] | None:
    """Shape of the tensor ``name`` in the directory's weight files, or None when none holds it."""
    for path in weight_files(directory):
        if path.suffix == ".safetensors":
            with weight_file_errors(path), safe_open(str(path), framework="pt") as handle:
                if name in handle.keys():  # noqa: SIM118
                    return tuple(handle.get_slice(name).get_shape())
        else:
            with weight_file_errors(path):
                tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if name in tensors:
                return tuple(tensors[name].shape)
    return None


def model_name(name: str, expected: dict[str, torch.Tensor]) -> str:
    """The model's name for a checkpoint tensor: the same, or the tower prefix of the other layout."""
    if name in expected:
        return name
    nested, flat = TOWER_PREFIXES
    if name.startswith(nested):
        return flat + name[len(nested):]
    if name.startswith(flat):
        return nested + name[len(flat):]
    return name


def interpolate_positions(table: torch.Tensor, count: int) -> torch.Tensor:
    """(1 + g², C) class + grid position embeddings → (count, C), the grid resized bicubically."""
    old, new = int((table.shape[0] - 1) ** 0.5), int((count - 1) ** 0.5)
    if old * old + 1 != table.shape[0] or new * new + 1 != count:
        raise CheckpointMismatchError(
            f"vision tower position embeddings: {table.shape[0]} rows is not 1 + a square grid")
    grid = table[1:].float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([table[:1].float(), grid.permute(0, 2, 3, 1).reshape(new * new, -1)]).to(table.dtype)


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did: tensors loaded, position tables interpolated, known tensors skipped."""

    loaded: int
    interpolated: list[str]
    skipped: list[str] = field(default_factory=list)  # known tensors this model does not use (UNUSED_NAMES)


def unused_tensor_owner(name: str) -> str | None:
    """For a known-but-unused tensor (a task LoRA of a Partial-LoRA linear), the name of its linear's weight."""
    for pattern, _ in UNUSED_NAMES:
        match = re.fullmatch(pattern, name)
        if match:
            return f"{match.group(1)}.weight"
    return None


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:20])
    return shown + (f" … and {len(names) - 20} more" if len(names) > 20 else "")


def load_checkpoint(model: InternLMXComposer2ForCausalLM, directory: str | Path) -> LoadReport:
    """Copy every tensor of ``directory`` into the parameter of the same name; fail listing any name without
    a partner on the other side or with another shape. Known tensors the model does not use (the released
    checkpoint's task LoRAs, ``UNUSED_NAMES``) are skipped and counted — only where their linear exists."""
    directory = Path(directory)
    expected = model.state_dict()
    filled: set[str] = set()
    unexpected: list[str] = []
    mismatched: list[str] = []
    interpolated: list[str] = []
    skipped: list[str] = []
    for name, tensor in read_tensors(directory):
        if _match(name, IGNORED_NAMES):
            continue
        owner = unused_tensor_owner(name)
        if owner is not None:
            (skipped if owner in expected else unexpected).append(name)
            continue
        target_name = model_name(name, expected)
        if not is_checkpoint_name(name) or target_name not in expected:
            unexpected.append(name)
            continue
        target = expected[target_name]
        if tensor.shape != target.shape:
            if name.endswith(POSITION_EMBEDDING) and tensor.shape[1:] == target.shape[1:]:
                tensor = interpolate_positions(tensor, target.shape[0])
                interpolated.append(target_name)
            else:
                mismatched.append(f"{name} {tuple(tensor.shape)} vs model {tuple(target.shape)}")
                continue
        with torch.no_grad():
            target.copy_(tensor)
        filled.add(target_name)
    missing = sorted(set(expected) - filled)
    if missing or unexpected or mismatched:
        problems = [f"{label} ({len(names)}): {_listing(sorted(names))}"
                    for label, names in (("missing from the checkpoint", missing),
                                         ("unexpected in the checkpoint", unexpected),
                                         ("shape mismatch", mismatched)) if names]
        raise CheckpointMismatchError(f"{directory}: checkpoint does not match InternLM-XC2.5; " + "; ".join(problems))
    for name in interpolated:
        log.info("%s: interpolated %s to the tower's %d positions", directory, name, expected[name].shape[0])
    if skipped:
        log.info("%s: skipped %d task-LoRA tensors this model does not use (lora_sft / lora_dpo / lora_web)",
                 directory, len(skipped))
        log.debug("skipped: %s", ", ".join(skipped))
    return LoadReport(loaded=len(filled), interpolated=interpolated, skipped=skipped)


def official_config(values: dict, directory: Path) -> InternLMXComposer2Config:
    """Our config from the official ``config.json`` (InternLMXcomposer2Config); the Partial-LoRA rank is read
    off the checkpoint's tensors (alpha = rank, i.e. scaling 1, as the public code sets 256 / 256), the vision
    tower is CLIP ViT-L/14 at 560 px, ``<ImageHere>`` gets the first id after the vocabulary."""
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "rms_norm_eps")
    absent = [key for key in required if key not in values]
    if absent:
        raise ValueError(f"{directory / 'config.json'}: missing {absent} (not an InternLM-XComposer2 config?)")
    scaling = values.get("rope_scaling") or {}
    dynamic = scaling.get("type", scaling.get("rope_type")) == "dynamic"
    plora = tensor_shape(directory, EXAMPLE_PLORA)
    return InternLMXComposer2Config(
        vocab_size=values["vocab_size"], hidden_size=values["hidden_size"],
        intermediate_size=values["intermediate_size"], num_hidden_layers=values["num_hidden_layers"],
        num_attention_heads=values["num_attention_heads"],
        num_key_value_heads=values.get("num_key_value_heads", values["num_attention_heads"]),
        rms_norm_eps=values["rms_norm_eps"], rotary_base=values.get("rope_theta", 10000.0),
        rotary_dynamic_factor=float(scaling["factor"]) if dynamic else None,
        max_position_embeddings=values.get("max_position_embeddings", 32768),
        plora_r=plora[0] if plora else 256, plora_alpha=plora[0] if plora else 256,
        vision_config=CLIP_L14_560, image_placeholder_id=values["vocab_size"],
        bos_token_id=values.get("bos_token_id", 1), eos_token_id=values.get("eos_token_id", 2),
        pad_token_id=values.get("pad_token_id"))


def is_xcomposer_directory(directory: Path) -> bool:
    """Whether ``directory/config.json`` describes InternLM-XC2.5 (the official layout or ours)."""
    path = directory / "config.json"
    if not path.is_file():
        return False
    model_type = json.loads(path.read_text()).get("model_type")
    return model_type == InternLMXComposer2Config.model_type or model_type in OFFICIAL_MODEL_TYPES


def load_config(directory: str | Path) -> InternLMXComposer2Config:
    """Our config for the directory: its own when we saved it, else converted from the official ``config.json``."""
    directory = Path(directory)
    values = json.loads((directory / "config.json").read_text())
    if values.get("model_type") == InternLMXComposer2Config.model_type:
        return InternLMXComposer2Config.from_pretrained(directory)
    if values.get("model_type") not in OFFICIAL_MODEL_TYPES:
        raise ValueError(f"{directory / 'config.json'}: model_type {values.get('model_type')!r} is neither ours "
                         f"({InternLMXComposer2Config.model_type!r}) nor InternLM-XComposer2's {OFFICIAL_MODEL_TYPES}")
    return official_config(values, directory)


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Inside the block, ``dtype`` is torch's default dtype; the previous one is restored after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_model(directory: str | Path, dtype: torch.dtype = torch.bfloat16,
               attn_implementation: str = "sdpa") -> InternLMXComposer2ForCausalLM:
    """Our model with the directory's weights (official checkpoint or our own save), checked by name."""
    config = load_config(directory)
    config._attn_implementation = attn_implementation
    with no_init_weights(), default_dtype(dtype):
        model = InternLMXComposer2ForCausalLM(config)
    report = load_checkpoint(model, directory)
    log.info("%s: loaded %d tensors into InternLM-XC2.5 (%d unused skipped)", directory, report.loaded,
             len(report.skipped))
    return model.eval()
