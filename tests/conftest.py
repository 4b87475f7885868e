"""Shared fixtures: tiny adapters, composed configs and small pair files written on the fly."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from miadpo.config import ModelConfig
from miadpo.models import LlavaAdapter, build_adapter
from miadpo.train import CONFIG_DIR

os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(2)

REPO = Path(__file__).resolve().parent.parent
TEST_DEFAULTS = {"model": "tiny_llava", "data": "synthetic"}
PROMPT_HEADERS = {n: "".join(f"Image{k}: <image>\n" for k in range(1, n + 1)) for n in range(1, 6)}


# Where a run started from the checkout writes by default (hydra's outputs/, data.out_dir under data/).
WATCHED = ("outputs", "data")


def checkout_entries() -> set[str] | None:
    """Untracked files under ``WATCHED`` (ignored ones included) and the checkout's untracked top-level entries, as
    git lists them; ``None`` outside a git checkout."""
    def status(*args: str) -> list[str]:
        done = subprocess.run(["git", "status", "--porcelain", "--ignored", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        if done.returncode != 0:
            raise OSError(done.stderr)
        # Only files git does not track (new ones); edits of tracked files are not a test's doing.
        return [line[3:] for line in done.stdout.splitlines() if line[:2] in ("??", "!!")]

    try:
        watched = status("--untracked-files=all", "--", *WATCHED)
        top = [p for p in status("--untracked-files=normal") if "/" not in p.rstrip("/")]
    except (OSError, subprocess.SubprocessError):
        return None
    return set(watched) | {p for p in top if p.rstrip("/") not in {".pytest_cache", "__pycache__"}}


@pytest.fixture(scope="session", autouse=True)
def no_test_writes_into_the_checkout() -> Iterator[None]:
    """Fails the session if a test created files in the checkout (outputs/, data/ or a new top-level entry): every
    run writes under a tmp directory (``hydra.run.dir``, ``data.out_dir``, ``run_dir``, a tmp working directory).
    Files already there (users' runs) are compared as sets before and after the session."""
    before = checkout_entries()
    yield
    after = checkout_entries()
    if before is None or after is None:
        return
    created = sorted(after - before)
    assert not created, f"the tests wrote into the checkout {REPO}: {created[:20]}"


def model_config(**overrides: Any) -> ModelConfig:
    cfg = OmegaConf.structured(ModelConfig(name="tiny_llava"))
    cfg.merge_with(overrides)
    return cfg  # type: ignore[return-value]


@pytest.fixture
def make_adapter() -> Callable[..., LlavaAdapter]:
    def factory(**overrides: Any) -> LlavaAdapter:
        return build_adapter(model_config(**overrides))  # type: ignore[return-value]

    return factory


@pytest.fixture
def adapter(make_adapter: Callable[..., LlavaAdapter]) -> LlavaAdapter:
    return make_adapter()


def compose_train(overrides: list[str], tmp_path: Path) -> DictConfig:
    """The real entry config, composed in process, writing everything under ``tmp_path``."""
    # The tests' default job is the fast synthetic one (the entry's own default is the toy-world pipeline).
    groups = [f"{g}={d}" for g, d in TEST_DEFAULTS.items() if not any(o.startswith(f"{g}=") for o in overrides)]
    base = [*groups, f"run_dir={tmp_path / 'run'}", f"data.out_dir={tmp_path / 'data'}", "logger=csv",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=base + overrides)


def colour_image(size: tuple[int, int], colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", size, colour)


@pytest.fixture
def pair_files(tmp_path: Path) -> Callable[..., Path]:
    """Write images under ``tmp_path/images`` and a JSONL of the given records (dicts or raw lines)."""
    image_root = tmp_path / "images"
    image_root.mkdir(exist_ok=True)

    def write(records: list[dict[str, Any] | str], name: str = "pairs.jsonl") -> Path:
        path = tmp_path / name
        with path.open("w") as handle:
            for record in records:
                handle.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
        return path

    return write


def good_record(tmp_path: Path, index: int, n_images: int = 2, size: tuple[int, int] = (32, 32)) -> dict[str, Any]:
    """A valid pair with ``n_images`` small images written under ``tmp_path/images``."""
    image_root = tmp_path / "images"
    image_root.mkdir(exist_ok=True)
    paths = []
    for k in range(n_images):
        name = f"r{index}_{k}.png"
        colour_image(size, ((40 * k) % 256, (70 * index) % 256, 120)).save(image_root / name)
        paths.append(name)
    return {
        "id": f"pair-{index}",
        "images": paths,
        "prompt": PROMPT_HEADERS[n_images] + "In Image1, what colour is the circle?",
        "chosen": "The circle is red.",
        "rejected": "The circle is blue.",
        "meta": {"format": "sequence", "n_images": n_images, "target": 1},
    }
