"""Answer one multi-image question by hand: ``python -m miadpo.generate model=... images=[...] prompt=...``.

Works with a base model (``model.path`` or a tiny in-code model), a base plus a peft adapter (``adapter=<dir>``)
or a merged model (``model.path=<merged dir>``), through the same adapter interface as training and evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from peft import PeftModel

from miadpo.config import GenerateJobConfig, check_keys, config_dir, read_only, register_configs
from miadpo.data.images import ImageOptions, load_image
from miadpo.models import ModelAdapter
from miadpo.pipeline import prepare_model
from miadpo.text import IMAGE_TOKEN

register_configs()
CONFIG_DIR = config_dir()


def with_image_markers(prompt: str, n_images: int) -> str:
    """The prompt as given when it places its images; else one "Image{k}: <image>" line per image before it."""
    found = prompt.count(IMAGE_TOKEN)
    if found == n_images:
        return prompt
    if found:
        raise ValueError(f"the prompt has {found} {IMAGE_TOKEN} markers for {n_images} images")
    return "".join(f"Image{k}: {IMAGE_TOKEN}\n" for k in range(1, n_images + 1)) + prompt


def answer(adapter: ModelAdapter, image_paths: Sequence[str], prompt: str, max_new_tokens: int = 64,
           do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
           image_options: ImageOptions | None = None) -> str:
    """The model's answer; the images are loaded by ``miadpo.data.images`` (an unusable one raises ImageError naming
    the file and the reason: missing, corrupt or not an image, truncated, too large)."""
    images = [load_image(Path(path), image_options) for path in image_paths]
    sample = adapter.encode(adapter.process_images(images), with_image_markers(prompt, len(images)))
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {}
    adapter.model.eval()
    return adapter.generate_answers([sample], max_new_tokens, **sampling)[0]


def load(cfg: DictConfig) -> ModelAdapter:
    """The adapter of ``cfg.model`` (after ``model.prepare``), with the peft adapter ``cfg.adapter`` on top when set."""
    adapter = prepare_model(cfg.model)  # runs model.prepare (the toy base is copied on first use)
    if cfg.adapter:
        if not (Path(cfg.adapter) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"adapter={cfg.adapter!r} is not a peft adapter directory (no adapter_config.json)")
        adapter.model = PeftModel.from_pretrained(adapter.model, cfg.adapter)
    return adapter


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="generate")
def main(cfg: DictConfig) -> None:
    """Entry point of ``python -m miadpo.generate``: prints the model's answer to ``prompt`` about ``images``."""
    check_keys(cfg, GenerateJobConfig)
    cfg = read_only(cfg)
    torch.manual_seed(cfg.seed)
    text = answer(load(cfg), list(cfg.images), cfg.prompt, cfg.max_new_tokens, cfg.do_sample, cfg.temperature,
                  cfg.top_p)
    print(text)


if __name__ == "__main__":
    main()
