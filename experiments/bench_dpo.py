"""DPO step cost: our fast path vs our plain path vs TRL's DPOTrainer, same model, same 5-image pairs.

    python experiments/bench_dpo.py [--steps 8] [--threads 1 2]        (needs `pip install -e ".[bench]"`)

Workload: a LLaVA (CLIP tower 2 layers / hidden 64, Llama 4 layers / hidden 192, 2.1M parameters) whose
images are 168 px → 144 tokens each; 5 images per prompt (~770 prompt tokens), answers of ~30 tokens; LoRA r8 on
every LLM linear layer; batch 2 pairs; fp32. Methods:
  fast  — ours: shared prefix (prompt + images once per pair, answers continue from its KV cache), answer-only
          logits, image features shared, reference log-probs from the cache (computed before timing);
  plain — ours: chosen and rejected concatenated, reference forward (LoRA disabled) every step;
  trl   — trl.DPOTrainer (plain model + peft_config, max_length=None, EOS appended), one `training_step` each.
Timing runs the three methods in one process with their steps interleaved (machine drift cancels) after one
warm-up step each; peak RSS and saved-for-backward activation bytes are measured per method in a fresh process.
Writes experiments/results/dpo_step.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "dpo_step.md"
METHODS = ("fast", "plain", "trl")
BATCH_PAIRS, N_IMAGES, LORA_R = 2, 5, 8
PALETTE = [(220, 30, 30), (30, 170, 60), (40, 70, 220), (240, 210, 20), (140, 50, 180), (20, 180, 190)]
NAMES = ["red", "green", "blue", "yellow", "purple", "cyan"]


def build_adapter():
    from omegaconf import OmegaConf

    from miadpo.config import ModelConfig
    from miadpo.models import build_adapter as build

    cfg = OmegaConf.structured(ModelConfig)
    cfg.merge_with({"name": "bench", "family": "llava", "lora": {"r": LORA_R, "alpha": 2 * LORA_R},
                    "tiny": {"image_size": 168, "patch_size": 14, "hidden_size": 192, "intermediate_size": 512,
                             "num_layers": 4, "num_heads": 4, "vision_hidden_size": 64, "vision_layers": 2}})
    torch.manual_seed(0)
    return build(cfg)


def pair_texts(index: int) -> dict[str, Any]:
    from PIL import Image

    colours = [(index + k) % len(PALETTE) for k in range(N_IMAGES)]
    images = [Image.new("RGB", (168, 168), PALETTE[c]) for c in colours]
    target = 1 + index % N_IMAGES
    prompt = "".join(f"Image{k}: <image>\n" for k in range(1, N_IMAGES + 1)) + \
        f"In Image{target}, what colour is the square and where is it?"
    right, wrong = NAMES[colours[target - 1]], NAMES[colours[target % N_IMAGES]]
    tail = "it sits in the middle of the image on a plain background"  # ~30 answer tokens with EOS
    return {"images": images, "prompt": prompt, "chosen": f"The square is {right} and {tail}.",
            "rejected": f"The square is {wrong} and {tail}."}


@contextmanager
def saved_bytes(counter: dict[str, int]):
    """Bytes of the distinct storages autograd saves for backward inside the block."""
    seen: set[int] = set()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            counter["bytes"] += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield


def our_step(fast: bool) -> Callable[[dict[str, int] | None], float]:
    from miadpo.config import DPOConfig, FastPathConfig, OptimConfig
    from miadpo.data.dataset import EncodedPair
    from miadpo.dpo.forward import ConcatenatedPairForward, SharedPrefixPairForward
    from miadpo.dpo.module import DPOModule

    adapter = build_adapter()
    pairs = []
    for i in range(BATCH_PAIRS):
        texts = pair_texts(i)
        images = adapter.process_images(texts["images"])
        pairs.append(EncodedPair(str(i), adapter.encode(images, texts["prompt"], texts["chosen"]),
                                 adapter.encode(images, texts["prompt"], texts["rejected"])))
    forward = SharedPrefixPairForward(adapter) if fast else ConcatenatedPairForward(adapter)
    batch = forward.collate(pairs)
    if fast:  # the reference cache: computed once with the base model, before LoRA, as miadpo.train does
        with torch.no_grad():
            reference = forward(adapter.model.eval(), batch)
        batch.reference = torch.stack([reference.chosen, reference.rejected, reference.chosen_tokens.float(),
                                          reference.rejected_tokens.float()], dim=1)
    adapter.prepare_for_training()
    dpo = DPOConfig(fast=FastPathConfig(shared_prefix=fast, shared_image_features=fast, reference_cache=fast))
    module = DPOModule(adapter, dpo, OptimConfig(lr=1e-4), pair_forward=forward, cached_reference=fast)
    module.policy.train()
    optimizer = torch.optim.AdamW([p for p in module.policy.parameters() if p.requires_grad], lr=1e-4)

    def step(counter: dict[str, int] | None = None) -> float:
        start = time.perf_counter()
        if counter is None:
            loss = module.training_step(batch, 0)
        else:
            with saved_bytes(counter):
                loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - start

    return step


def trl_step() -> Callable[[dict[str, int] | None], float]:
    """One ``DPOTrainer.training_step`` (policy forward, reference forward with the adapter disabled, backward)."""
    os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    adapter = build_adapter()
    eos = adapter.tokenizer.eos_token  # TRL does not add EOS to vision data
    rows: dict[str, list[Any]] = {"images": [], "prompt": [], "chosen": [], "rejected": []}
    for i in range(BATCH_PAIRS):
        texts = pair_texts(i)
        rows["images"].append(texts["images"])
        rows["prompt"].append(texts["prompt"])
        rows["chosen"].append(" " + texts["chosen"] + eos)
        rows["rejected"].append(" " + texts["rejected"] + eos)
    args = TRLConfig(output_dir=tempfile.mkdtemp(prefix="trl_bench_"), per_device_train_batch_size=BATCH_PAIRS,
                     learning_rate=1e-4, beta=0.1, max_length=None, bf16=False, fp16=False,
                     gradient_checkpointing=False, report_to="none", save_strategy="no", use_cpu=True,
                     dataloader_num_workers=0, lr_scheduler_type="constant", seed=0)
    lora = LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0.0, bias="none",
                      target_modules=adapter.default_lora_targets())
    trainer = DPOTrainer(model=adapter.model, ref_model=None, args=args, train_dataset=Dataset.from_dict(rows),
                         processing_class=adapter.processor_for_saving(), peft_config=lora)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop otherwise
    batch = next(iter(trainer.get_train_dataloader()))  # collated once, like ours

    def step(counter: dict[str, int] | None = None) -> float:
        start = time.perf_counter()
        if counter is None:
            trainer.training_step(trainer.model, batch)  # backward happens inside
        else:
            with saved_bytes(counter):
                trainer.training_step(trainer.model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        return time.perf_counter() - start

    return step


def build(method: str) -> Callable[[dict[str, int] | None], float]:
    return trl_step() if method == "trl" else our_step(method == "fast")


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if args.worker == "timing":
        steps = {m: build(m) for m in METHODS}
        for step in steps.values():
            step(None)  # warm-up
        times: dict[str, list[float]] = {m: [] for m in METHODS}
        for _ in range(args.steps):
            for method, step in steps.items():
                times[method].append(step(None))
        print(json.dumps({m: statistics.median(t) for m, t in times.items()}))
    else:
        step = build(args.method)
        step(None)
        counter = {"bytes": 0}
        step(counter)
        step(None)
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"saved_bytes": counter["bytes"], "peak_rss_mib": peak_kib / 1024}))


def run(*extra: str) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    out = subprocess.run([sys.executable, __file__, *extra], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-4000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--worker", choices=["timing", "memory"], default=None)
    parser.add_argument("--method", choices=METHODS, default="fast")
    args = parser.parse_args()
    if args.worker:
        args.threads = args.threads[0]
        worker(args)
        return
    lines = ["# DPO step: fast path vs plain path vs TRL DPOTrainer\n",
             f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores, torch {torch.__version__}; "
             f"batch {BATCH_PAIRS} pairs × {N_IMAGES} images × 144 tokens, answers ~30 tokens, LoRA r{LORA_R}, "
             f"fp32; median of {args.steps} interleaved steps after one warm-up.\n"]
    for threads in args.threads:
        timing = run("--worker", "timing", "--threads", str(threads), "--steps", str(args.steps))
        memory = {m: run("--worker", "memory", "--method", m, "--threads", str(threads)) for m in METHODS}
        lines += [f"\n## {threads} torch thread{'s' if threads > 1 else ''}\n",
                  "| method | s/step | pairs/s | × TRL pairs/s | saved for backward (MiB) | × TRL | peak RSS (MiB) "
                  "| × TRL |", "|---|---|---|---|---|---|---|---|"]
        for method in METHODS:
            t, m, base_t, base_m = timing[method], memory[method], timing["trl"], memory["trl"]
            lines.append(
                f"| {method} | {t:.3f} | {BATCH_PAIRS / t:.2f} | {base_t / t:.2f} | {m['saved_bytes'] / 2**20:.1f} | "
                f"{m['saved_bytes'] / base_m['saved_bytes']:.2f} | {m['peak_rss_mib']:.0f} | "
                f"{m['peak_rss_mib'] / base_m['peak_rss_mib']:.2f} |")
        print("\n".join(lines))
    text = "\n".join(lines) + "\n"
    RESULTS.write_text(text)
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
