"""Writing a model for other tools: the one export path of training, SFT, merging and rounds.

``export_model`` writes a directory transformers and peft load as they are: a LoRA policy as a peft adapter
(``adapter_model.safetensors`` + ``adapter_config.json`` recording the base weights as an absolute path), or a
whole model (LoRA merged when asked) as a transformers directory; beside either the processor — saved from the
adapter's processor (tokenizer, image processor, chat template) or copied from a directory that has one. Weights
holding a NaN or an infinity are refused before anything is written.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

# Files of a model directory that are not the processor's (copy_processor_files leaves them out).
NOT_PROCESSOR_FILES = {"config.json", "generation_config.json", "adapter_config.json", "README.md",
                       "model.safetensors.index.json"}


class NonFiniteWeightsError(FloatingPointError):
    """The weights to export or checkpoint hold a NaN or an infinity."""


def nonfinite_names(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity (sharded DTensors are skipped: each rank holds a shard)."""
    named = [(name, t) for name, t in tensors if isinstance(t, torch.Tensor) and not hasattr(t, "device_mesh")]
    if not named:
        return []
    flags = [torch.isfinite(t).all() for _, t in named]
    finite = torch.stack([f.to(flags[0].device) for f in flags]).tolist()  # one device-to-host copy
    return [name for (name, _), ok in zip(named, finite) if not ok]


def copy_processor_files(source: Path, out_dir: Path) -> None:
    """Tokenizer, image processor and chat template files, copied as they are (no processor class is loaded:
    several families' processors need torchvision for their video part)."""
    for path in sorted(source.iterdir()):
        if path.is_file() and path.name not in NOT_PROCESSOR_FILES and path.suffix not in (".safetensors", ".bin"):
            shutil.copy2(path, out_dir / path.name)


def export_model(model: torch.nn.Module, directory: str | Path, processor: Any, *, merge_lora: bool = False,
                 base_model_path: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` to ``directory`` with its processor; returns the directory.

    ``processor``: an object with ``save_pretrained`` (an adapter's ``processor_for_saving()``) or a directory whose
    processor files are copied. A peft model is written as an adapter, with ``base_model_path`` (a local directory
    made absolute) recorded, unless ``merge_lora`` merges it into a whole model. ``state_dict``: the full state
    gathered from sharded parameters (FSDP, DeepSpeed), used instead of the model's own.
    """
    directory = Path(directory)
    if isinstance(model, PeftModel) and merge_lora:
        model = model.merge_and_unload()
    trainable = state_dict.items() if state_dict is not None else (
        (name, p) for name, p in model.named_parameters() if p.requires_grad)
    bad = nonfinite_names(trainable)
    if bad:
        raise NonFiniteWeightsError(f"the trainable weights are not finite ({len(bad)} tensors, e.g. {bad[0]}), so "
                                    f"the export to {directory} is refused")
    if isinstance(model, PeftModel) and base_model_path is not None:
        local = Path(base_model_path)
        for peft_config in model.peft_config.values():
            peft_config.base_model_name_or_path = str(local.resolve()) if local.is_dir() else base_model_path
    model.save_pretrained(directory, **({"state_dict": state_dict} if state_dict is not None else {}))
    if isinstance(processor, str | Path):
        copy_processor_files(Path(processor), directory)
    else:
        processor.save_pretrained(directory)
    return directory
