"""Check real InternLM-XC2.5 weights in our implementation:
``python -m miadpo.models.verify model=internlm_xc25 model.path=/models/internlm-xcomposer2d5-7b``.

1. Loads the checkpoint through the adapter (every tensor checked by name; a mismatch stops here, listing names).
2. Answers a fixed two-image prompt (drawn images unless ``images=[...]``) greedily and prints the answer.
3. When ``reference=auto`` (or ``original``, which stops when it cannot), ``model.trust_remote_code=true`` (the
   original class is Python code in the weights directory; without consent none of it runs and the report names
   the files) and that class imports in this environment, feeds both implementations the same inputs and
   reports the largest difference of the projected image features (their ``vit`` + ``vision_proj`` on the same
   normalised canvases) and of the logits (their decoder and ``output`` on our input embeddings and image mask).
   When it does not import — the usual case on current transformers — the reason is reported and the check ends
   after step 2.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from PIL import Image, ImageDraw

from miadpo.config import VerifyJobConfig, check_keys, config_dir, read_only, register_configs
from miadpo.data.images import load_image
from miadpo.generate import with_image_markers
from miadpo.models import ModelAdapter, build_adapter

register_configs()
CONFIG_DIR = config_dir()
log = logging.getLogger(__name__)


def drawn_images() -> list[Image.Image]:
    """A wide image with a red square and a tall one with a blue disc (fixed, no files needed)."""
    wide = Image.new("RGB", (960, 540), (235, 235, 235))
    ImageDraw.Draw(wide).rectangle((380, 170, 580, 370), fill=(220, 30, 30))
    tall = Image.new("RGB", (480, 800), (235, 235, 235))
    ImageDraw.Draw(tall).ellipse((140, 300, 340, 500), fill=(30, 60, 220))
    return [wide, tall]


def remote_code_files(directory: Path) -> list[Path]:
    """The Python files of ``directory`` that transformers would import for its ``auto_map`` (remote code)."""
    config = directory / "config.json"
    auto_map = json.loads(config.read_text()).get("auto_map", {}) if config.is_file() else {}
    references = [v for value in auto_map.values() for v in (value if isinstance(value, list) else [value]) if v]
    modules = dict.fromkeys(reference.split("--")[-1].rsplit(".", 1)[0] for reference in references)
    return [directory / f"{module}.py" for module in modules]


def load_reference(path: str, dtype: torch.dtype, trust_remote_code: bool) -> tuple[Any | None, str]:
    """The checkpoint's original model class, or None and why it could not be used. Its code (the weights
    directory's Python files) runs only with ``model.trust_remote_code=true``."""
    files = remote_code_files(Path(path))
    if not trust_remote_code:
        named = ", ".join(str(f) for f in files) or f"the Python files of {path}"
        return None, (f"original not run: comparing would execute {named} (remote code from the weights "
                      "directory); set model.trust_remote_code=true to allow it")
    try:
        from transformers import AutoModel

        model = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=dtype)
    except Exception as error:  # remote code fails in many ways on current transformers; report, don't hide
        return None, f"original remote code not usable here: {type(error).__name__}: {error}"
    return model.eval(), "original remote code loaded"


def _hidden(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


@torch.no_grad()
def compare_with_reference(adapter: ModelAdapter, reference: Any, images: Sequence[Image.Image],
                           batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest absolute differences between our implementation and ``reference`` (the original class's
    interface: ``vit(canvases, glb_GN, sub_GN) → (features, lengths)``, ``vision_proj``, ``model(inputs_embeds,
    attention_mask, im_mask)``, ``output``) on the same inputs."""
    ours = adapter.base_model
    device = next(reference.parameters()).device
    canvases, _ = adapter.image_processor.canvases(images)
    features, _ = reference.vit([c[None].to(device, reference.vision_proj[0].weight.dtype) for c in canvases],
                                reference.plora_glb_GN, reference.plora_sub_GN)
    projected = reference.vision_proj(features)
    theirs_image = projected.reshape(-1, projected.shape[-1]).float().cpu()
    embeds, im_mask = ours.embed(batch["input_ids"], batch["pixel_values"], batch["image_layout"])
    ours_image = embeds[im_mask].float().cpu()  # the image features, in order (one vision pass, not two)
    ours_logits = ours(inputs_embeds=embeds, im_mask=im_mask, attention_mask=batch["attention_mask"]).logits
    hidden = _hidden(reference.model(inputs_embeds=embeds.to(device), im_mask=im_mask.to(device),
                                     attention_mask=batch["attention_mask"].to(device)))
    theirs_logits = reference.output(hidden)
    if theirs_image.shape != ours_image.shape:
        raise ValueError(f"image features: reference {tuple(theirs_image.shape)}, ours {tuple(ours_image.shape)}")
    return {"image_features_max_abs_diff": float((theirs_image - ours_image).abs().max()),
            "logits_max_abs_diff": float((theirs_logits.float().cpu() - ours_logits.float().cpu()).abs().max()),
            "same_next_token": bool(torch.equal(theirs_logits[:, -1].argmax(-1).cpu(),
                                                ours_logits[:, -1].argmax(-1).cpu()))}


def verify(cfg: DictConfig, reference: Any | None = None) -> dict[str, Any]:
    """Load the model, answer the prompt on the images and compare with the reference where there is one; the
    report (printed, and written as JSON when ``report`` is set)."""
    check_keys(cfg, VerifyJobConfig)
    cfg = read_only(cfg)
    adapter = build_adapter(cfg.model)
    adapter.model.eval()
    images = [load_image(Path(p)) for p in cfg.images] if cfg.images else drawn_images()
    sample = adapter.encode(adapter.process_images(images), with_image_markers(cfg.prompt, len(images)))
    batch = adapter.generation_inputs([sample])
    result: dict[str, Any] = {
        "model": cfg.model.name, "path": cfg.model.path,
        "parameters": sum(p.numel() for p in adapter.base_model.parameters()),
        "prompt_tokens": int(sample.input_ids.numel()),
        "image_tokens": [end - start for start, end in sample.image_spans],
        "answer": adapter.generate_answers([sample], cfg.max_new_tokens),
    }
    if reference is None and cfg.model.family != "internlm_xc25":
        result["reference"] = "no reference comparison for this family (load and answer only)"
    elif reference is None and cfg.reference in ("auto", "original"):
        reference, result["reference"] = load_reference(str(cfg.model.path), adapter.base_model.dtype,
                                                        cfg.model.trust_remote_code)
        if reference is None and cfg.reference == "original":
            raise RuntimeError(f"verify reference=original: {result['reference']}")
    elif reference is None:
        result["reference"] = "skipped (reference=none)"
    if reference is not None:
        result.update(compare_with_reference(adapter, reference, images, batch))
        result["match"] = result["logits_max_abs_diff"] <= cfg.atol and result["same_next_token"]
    for key, value in result.items():
        print(f"{key:>28}: {value}")
    if cfg.report:
        Path(cfg.report).write_text(json.dumps(result, indent=2) + "\n")
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="verify")
def main(cfg: DictConfig) -> None:
    """Command-line entry: :func:`verify`; exits with an error when the comparison does not match."""
    result = verify(cfg)
    if result.get("match") is False:
        raise SystemExit(f"our implementation differs from the original by {result['logits_max_abs_diff']:.4f} "
                         f"(atol {cfg.atol})")


if __name__ == "__main__":
    main()
