"""Model adapters. ``build_adapter(cfg.model)`` picks the adapter class by ``model.family``."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from miadpo.config import ModelConfig
from miadpo.models.base import ModelAdapter
from miadpo.models.gemma3 import Gemma3Adapter
from miadpo.models.gemma4 import Gemma4Adapter
from miadpo.models.geometry import ImageGeometry, PatchGrid
from miadpo.models.glm4v import Glm4vAdapter, Glm4vMoeAdapter, Glm46VAdapter
from miadpo.models.idefics3 import Idefics3Adapter, SmolVLMAdapter
from miadpo.models.internlm_xc25.adapter import InternLMXC25Adapter
from miadpo.models.internvl import InternVL35Adapter, InternVLAdapter
from miadpo.models.llava import LlavaAdapter
from miadpo.models.llava_onevision import LlavaOnevisionAdapter
from miadpo.models.loading import ModelWeightsNotFoundError
from miadpo.models.minicpmv import MiniCPMV46Adapter
from miadpo.models.qwen2_vl import Qwen25VLAdapter, QwenVLAdapter
from miadpo.models.qwen3_vl import Qwen3VLAdapter, Qwen3VLMoeAdapter, Qwen35Adapter, Qwen35MoeAdapter
from miadpo.models.samples import IGNORE_INDEX, EncodedSample, ProcessedImages, SampleTooLongError

ADAPTERS: dict[str, type[ModelAdapter]] = {
    "llava": LlavaAdapter,
    "qwen2_vl": QwenVLAdapter,
    "qwen2_5_vl": Qwen25VLAdapter,
    "qwen3_vl": Qwen3VLAdapter,
    "qwen3_vl_moe": Qwen3VLMoeAdapter,
    "qwen3_5": Qwen35Adapter,
    "qwen3_5_moe": Qwen35MoeAdapter,
    "internvl": InternVLAdapter,
    "internvl3_5": InternVL35Adapter,
    "idefics3": Idefics3Adapter,
    "smolvlm": SmolVLMAdapter,
    "llava_onevision": LlavaOnevisionAdapter,
    "internlm_xc25": InternLMXC25Adapter,
    "gemma3": Gemma3Adapter,
    "gemma4": Gemma4Adapter,
    "glm4v": Glm4vAdapter,
    "glm4v_moe": Glm4vMoeAdapter,
    "glm46v": Glm46VAdapter,
    "minicpm_v4_6": MiniCPMV46Adapter,
}


def check_model_config(cfg: ModelConfig) -> None:
    """Fail on a model config that is a shared base (``conf/model/_*.yaml``, ``name: ???``), not a model."""
    if isinstance(cfg, DictConfig) and OmegaConf.is_missing(cfg, "name"):
        raise ValueError("model.name is missing: the chosen model config is a shared base (conf/model/_*.yaml), "
                         "not a model; pick one that names itself, e.g. model=tiny_llava or model=llava15")


def build_adapter(cfg: ModelConfig) -> ModelAdapter:
    """The adapter of ``cfg.family`` (see ``ADAPTERS``) built from the model config; fails on an unknown family."""
    check_model_config(cfg)
    try:
        adapter_class = ADAPTERS[cfg.family]
    except KeyError:
        raise ValueError(f"unknown model.family {cfg.family!r}; known: {sorted(ADAPTERS)}") from None
    return adapter_class.from_config(cfg)


__all__ = [
    "ADAPTERS",
    "IGNORE_INDEX",
    "EncodedSample",
    "ImageGeometry",
    "LlavaAdapter",
    "ModelAdapter",
    "ModelWeightsNotFoundError",
    "PatchGrid",
    "ProcessedImages",
    "SampleTooLongError",
    "build_adapter",
    "check_model_config",
]
