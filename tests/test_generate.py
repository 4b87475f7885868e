"""``python -m miadpo.generate``: one question answered by a base, adapter or merged model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, compose_train
from hydra import compose, initialize_config_dir
from PIL import Image

from miadpo.generate import CONFIG_DIR, answer, load, with_image_markers
from miadpo.text import normalise_answer
from miadpo.toyworld.scenes import write_split
from miadpo.train import train


def generate_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="generate", overrides=overrides)


@pytest.mark.slow
def test_the_toy_base_answers_toy_questions(tmp_path: Path) -> None:
    records = json.loads(write_split(tmp_path, "probe", 12, seed=11).read_text())
    adapter = load(generate_cfg([f"model.path={tmp_path / 'base'}", "prompt=x"]))
    right = 0
    for record in records:
        question = record["conversations"][0]["value"].replace("<image>\n", "")
        text = answer(adapter, [str(tmp_path / "images" / record["image"])], question, max_new_tokens=6)
        right += normalise_answer(text) == normalise_answer(record["conversations"][1]["value"])
    assert right >= 9  # the shipped base answers ~91% of single-image toy questions


def test_prompt_markers_are_added_or_checked() -> None:
    assert with_image_markers("What?", 2) == "Image1: <image>\nImage2: <image>\nWhat?"
    assert with_image_markers("<image> and <image>: which?", 2) == "<image> and <image>: which?"
    with pytest.raises(ValueError, match="1 <image> markers for 2 images"):
        with_image_markers("<image> which?", 2)


@pytest.mark.slow
def test_entry_point_with_a_trained_adapter(tmp_path: Path) -> None:
    result = train(compose_train(["trainer.max_steps=2", "data.synthetic.num_pairs=8", "data.batch_size=2"],
                                 tmp_path))
    for k in range(2):
        Image.new("RGB", (40, 40), (200, 40 * k, 30)).save(tmp_path / f"im{k}.png")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "miadpo.generate", "model=tiny_llava", f"model.path={result.run_dir / 'base_model'}",
            f"adapter={result.run_dir / 'adapter'}", f"images=[{tmp_path / 'im0.png'},{tmp_path / 'im1.png'}]",
            "prompt='In Image2, what colour is the square?'", "max_new_tokens=5", f"hydra.run.dir={tmp_path / 'g'}"]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The command prints the answer the same model and adapter give in process (greedy decoding is deterministic).
    cfg = generate_cfg(args[3:-1])
    expected = answer(load(cfg), list(cfg.images), cfg.prompt, cfg.max_new_tokens)
    assert expected.strip() and proc.stdout.endswith(expected + "\n"), (proc.stdout, expected)
    bad = subprocess.run(args[:5] + [f"adapter={tmp_path}"] + args[6:], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0 and "is not a peft adapter directory" in bad.stderr
