"""The GPU benchmarks of ``experiments/gpu_check.sh``: a LLaVA-1.5-7B-shaped slice, the strategies, selection.

    python experiments/gpu_bench.py [--dry-run] [--out experiments/results/gpu.md]

1. **DPO step** on a slice of LLaVA-1.5-7B with random weights: the LLM at its real widths (hidden 4096, MLP
   11008, 32 heads, vocabulary 32064) with ``--layers`` (2) decoder layers; a CLIP-L/336-wide vision tower (hidden
   1024, 576 tokens an image, 2 layers; its MLP 2048 and 32 heads by the in-code builder's rules, against CLIP-L's
   4096 and 16); bf16 weights, SDPA attention; 5 images per prompt, ~30-token answers, batch 2 pairs, LoRA r8.
   Our fast path (reference cached) and plain path against ``trl.DPOTrainer``: pairs/s (median of interleaved
   steps after warm-ups), peak GPU memory (each method alone, after a reset), and MFU: the FLOPs one step really
   executes (``torch.utils.flop_counter``: matrix products of every forward and backward) per second over the
   H200's dense bf16 peak (989 TFLOP/s).
2. **Strategies**: ``python -m miadpo.train`` one-GPU smoke runs with ``strategy=fsdp`` and ``deepspeed_zero2``
   (2 steps of the tiny LLaVA): exit status, seconds, the last line of an error.
3. **Selection**: tokens/s of the selection stage's generation (``CandidateGenerator.generate``: greedy, logits and
   the selection layer's attention recorded) against plain ``model.generate`` on the same prompts (2 images each,
   16 new tokens forced), batches of 1, 8 and 32.

``--dry-run`` runs the same code on CPU at tiny shapes (fp32, 1 layer, 56-px images, fewer steps, batches 1/2/4),
in well under a minute; its numbers mean nothing beyond "every part runs".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dpo  # noqa: E402 (the benchmark's pairs, steps and TRL trainer)

REPO = Path(__file__).resolve().parents[1]
H200_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H200 (SXM), NVIDIA's datasheet
LLAVA_7B_VOCAB = 32064


def slice_shape(dry_run: bool, layers: int) -> dict[str, int]:
    if dry_run:
        return {"image_size": 56, "patch_size": 14, "hidden_size": 64, "intermediate_size": 128, "num_layers": 1,
                "num_heads": 4, "vision_hidden_size": 32, "vision_layers": 1}
    return {"image_size": 336, "patch_size": 14, "hidden_size": 4096, "intermediate_size": 11008,
            "num_layers": layers, "num_heads": 32, "vision_hidden_size": 1024, "vision_layers": 2}


def slice_adapter(args: argparse.Namespace) -> Any:
    adapter = bench_dpo.build_adapter(slice_shape(args.dry_run, args.layers),
                                      "float32" if args.dry_run else "bfloat16")
    if not args.dry_run:
        adapter.model.resize_token_embeddings(LLAVA_7B_VOCAB)  # LLaVA-1.5's vocabulary: its embedding and LM head
    return adapter


def step_flops(step: Any) -> float:
    """Floating-point operations one call of ``step`` executes (forward and backward matrix products)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(None)
    return float(counter.get_total_flops())


def dpo_step(args: argparse.Namespace, device: str) -> list[str]:
    builders = {"fast": lambda: bench_dpo.our_step(True, slice_adapter(args), device),
                "plain": lambda: bench_dpo.our_step(False, slice_adapter(args), device),
                "trl": lambda: bench_dpo.trl_step(slice_adapter(args), device)}
    steps, peaks, flops = {}, {}, {}
    for method, build in builders.items():
        steps[method] = build()
        steps[method](None)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        steps[method](None)
        peaks[method] = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
        flops[method] = step_flops(steps[method])
    times: dict[str, list[float]] = {m: [] for m in steps}
    for _ in range(args.steps):
        for method, step in steps.items():
            times[method].append(step(None))
    median = {m: statistics.median(t) for m, t in times.items()}
    lines = ["| method | s/step | pairs/s | × TRL pairs/s | peak GPU memory (GiB) | TFLOP executed a step | MFU |",
             "|---|---|---|---|---|---|---|"]
    for method, t in median.items():
        peak = "n/a (CPU)" if peaks[method] is None else f"{peaks[method]:.1f}"
        mfu = flops[method] / t / H200_BF16_PEAK
        lines.append(f"| {method} | {t:.4f} | {bench_dpo.BATCH_PAIRS / t:.2f} | {median['trl'] / t:.2f} | {peak} | "
                     f"{flops[method] / 1e12:.2f} | {100 * mfu:.1f}% |")
    return lines


def strategy_smoke(args: argparse.Namespace, device: str) -> list[str]:
    lines = ["| strategy | exit | seconds | note |", "|---|---|---|---|"]
    for strategy in ("fsdp", "deepspeed_zero2"):
        work = Path(tempfile.mkdtemp(prefix=f"gpu_{strategy}_"))
        command = [sys.executable, "-m", "miadpo.train", "model=tiny_llava", "data=synthetic", f"strategy={strategy}",
                   "trainer.devices=1", f"trainer.accelerator={'cpu' if device == 'cpu' else 'gpu'}",
                   "trainer.max_steps=2", "logger=csv", "data.synthetic.num_pairs=8",
                   "trainer.enable_progress_bar=false", f"data.out_dir={work / 'data'}",
                   f"hydra.run.dir={work / 'run'}"]
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get(
                                  "PYTHONPATH", "")]), "WANDB_MODE": "disabled"})
        seconds = time.perf_counter() - start
        errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line]
        note = "trained 2 steps" if proc.returncode == 0 else (errors[-1] if errors else proc.stderr[-200:])
        lines.append(f"| {strategy} | {proc.returncode} | {seconds:.0f} | {note.strip()[:200].replace('|', '/')} |")
    return lines


def selection_throughput(args: argparse.Namespace, device: str) -> list[str]:
    from omegaconf import OmegaConf

    from miadpo.config import SelectionConfig
    from miadpo.select.candidates import CandidateGenerator

    adapter = slice_adapter(args)
    adapter.model.to(device).eval()
    new_tokens = 16
    cfg = OmegaConf.structured(SelectionConfig)
    cfg.generation.max_new_tokens = cfg.generation.min_new_tokens = new_tokens
    cfg.generation.do_sample = False
    generator = CandidateGenerator(adapter, cfg, roots=None, seed=0)  # type: ignore[arg-type]

    def prompts(count: int) -> list[Any]:
        encoded = []
        for i in range(count):
            texts = bench_dpo.pair_texts(i, "2 images, short answers")
            encoded.append(adapter.encode(adapter.process_images(texts["images"]), texts["prompt"]))
        return encoded

    @torch.no_grad()
    def plain(batch: list[Any]) -> None:
        inputs = adapter.generation_inputs(batch)
        adapter.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=adapter.tokenizer.pad_token_id, eos_token_id=adapter.eos_token_id)

    def timed(run: Any, batch: list[Any]) -> float:
        run(batch)  # warm-up
        bench_dpo.synchronize(device)
        start = time.perf_counter()
        run(batch)
        bench_dpo.synchronize(device)
        return time.perf_counter() - start

    lines = ["| batch | selection tokens/s | plain generate tokens/s | selection / plain |", "|---|---|---|---|"]
    for size in (1, 2, 4) if args.dry_run else (1, 8, 32):
        batch = prompts(size)
        selection, reference = timed(generator.generate, batch), timed(plain, batch)
        tokens = size * new_tokens
        lines.append(f"| {size} | {tokens / selection:.0f} | {tokens / reference:.0f} | {reference / selection:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dry-run", action="store_true", help="the same code at tiny shapes on CPU")
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "results" / "gpu.md")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    args.steps = args.steps or (2 if args.dry_run else 6)
    device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run on CPU")
    torch.set_num_threads(1 if args.dry_run else torch.get_num_threads())
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    lines = [f"# GPU check{' (dry run: tiny shapes on CPU, numbers meaningless)' if args.dry_run else ''}\n",
             f"{name}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}.\n",
             f"\n## DPO step: LLaVA-1.5-7B-shaped slice ({args.layers} decoder layers), 5 images × 576 tokens, "
             f"batch {bench_dpo.BATCH_PAIRS} pairs, median of {args.steps} interleaved steps\n"]
    started = time.perf_counter()
    sections = [("", dpo_step), ("\n## Strategies: one-GPU smoke runs (tiny LLaVA, 2 steps)\n", strategy_smoke),
                ("\n## Selection generation throughput (2 images a prompt, 16 new tokens)\n", selection_throughput)]
    timings = {}
    for title, section in sections:
        begun = time.perf_counter()
        lines += ([title] if title else []) + section(args, device)
        timings[section.__name__] = round(time.perf_counter() - begun, 1)
        print("\n".join(lines), flush=True)
    lines.append(f"\nSeconds per section: {json.dumps(timings)}; total {time.perf_counter() - started:.0f} s.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
