"""Loading and saving helpers shared by the families: the weights path check, dtype names, processor files, and
transformers' name for the key/value cache."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from miadpo.config import ModelConfig

# transformers 5.2x calls the key/value cache ``cache`` (forward argument and output field); earlier 5.x
# ``past_key_values``.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class ModelWeightsNotFoundError(FileNotFoundError):
    """``model.path`` does not point at local weights and downloading is not allowed."""


def check_weights_path(cfg: ModelConfig) -> str:
    """Return the path to load from, or fail with instructions instead of a hub stack trace: a path that is not a
    local directory (unless downloads are allowed), or a directory without a model config or weight files (an empty
    or unfinished download)."""
    assert cfg.path is not None
    directory = Path(cfg.path)
    if not directory.is_dir():
        if cfg.allow_download:
            return cfg.path
        raise ModelWeightsNotFoundError(
            f"model {cfg.name!r}: weights not found at model.path={cfg.path!r} (not a local directory). "
            f"Download them first (e.g. `huggingface-cli download {cfg.path} --local-dir /some/dir`) and pass "
            f"model.path=/some/dir, or set model.allow_download=true on a machine with hub access."
        )
    expected = (("config.json", ("config.json",)), ("weight files", ("*.safetensors", "*.bin")))
    missing = [what for what, patterns in expected if not any(any(directory.glob(p)) for p in patterns)]
    if missing:
        raise ModelWeightsNotFoundError(
            f"model {cfg.name!r}: weights not found at model.path={cfg.path!r}: the directory has no "
            f"{' and no '.join(missing)} (an empty or unfinished download?). Download the checkpoint into it (e.g. "
            f"`huggingface-cli download <checkpoint> --local-dir {cfg.path}`; conf/model/{cfg.name}.yaml names it)."
        )
    return cfg.path


@contextmanager
def weight_file_errors(where: Path | str) -> Iterator[None]:
    """Inside the block (reading weights), a pickle that safe loading refuses or an unreadable ``.safetensors`` file
    becomes a ValueError naming ``where`` (the file, or the directory and its files), never suggesting to load it
    unsafely."""
    from safetensors import SafetensorError

    try:
        yield
    except pickle.UnpicklingError:
        raise ValueError(f"{where}: a pickle that safe loading refuses (it holds objects other than tensors). miadpo "
                         "loads weights safely only: use .safetensors files, or convert this one with a tool you "
                         "trust") from None
    except SafetensorError as exc:
        raise ValueError(f"{where}: not a readable .safetensors file ({exc}): a corrupt or unfinished download? "
                         "Download it again") from None


def load_pretrained(model_class: Any, path: str | Path, **kwargs: Any) -> Any:
    """``model_class.from_pretrained(path, **kwargs)``, a weight file it cannot read named (``weight_file_errors``):
    a pickle (``pytorch_model*.bin``) that safe loading refuses, or a ``.safetensors`` file with a bad header."""
    from safetensors import SafetensorError

    try:
        return model_class.from_pretrained(path, **kwargs)
    except (pickle.UnpicklingError, SafetensorError) as exc:
        directory = Path(path)
        if isinstance(exc, SafetensorError):
            where = unreadable_safetensors(directory) or str(path)
        else:
            files = sorted(p.name for p in directory.glob("*.bin")) if directory.is_dir() else []
            where = f"{path} ({', '.join(files)})" if files else str(path)
        with weight_file_errors(where):
            raise


def unreadable_safetensors(directory: Path) -> str | None:
    """The first ``.safetensors`` file under ``directory`` whose header does not parse, or None."""
    from safetensors import safe_open

    for file in sorted(directory.glob("*.safetensors")) if directory.is_dir() else []:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception:  # safetensors raises its own error types for a bad header
            return str(file)
    return None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype named ``name`` (``float32``, ``bfloat16`` or ``float16``)."""
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"model.dtype must be float32, bfloat16 or float16, not {name!r}") from None


class ProcessorFiles:
    """Tokenizer + image processor saved side by side in their standard files.

    transformers' multimodal processors for the newer families insist on a video processor, which needs
    torchvision; adapters of those families save (and load) the two parts instead.
    """

    def __init__(self, tokenizer: Any, image_processor: Any, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template

    def save_pretrained(self, directory: str | Path) -> None:
        """Both parts; the chat template goes with the tokenizer (``tokenizer.apply_chat_template``)."""
        previous = getattr(self.tokenizer, "chat_template", None)
        if self.chat_template is not None:
            self.tokenizer.chat_template = self.chat_template
        try:
            self.tokenizer.save_pretrained(directory)
        finally:
            self.tokenizer.chat_template = previous
        self.image_processor.save_pretrained(directory)
