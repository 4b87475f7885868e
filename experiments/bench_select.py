"""Selection cost: plain generation vs ours (generation + one-layer capture) vs the reference's method.

    python experiments/bench_select.py [--samples 96]

Fixed workload: the tiny LLaVA of `model=tiny_llava`, 5-image prompts, exactly 64 generated tokens per sample
(min = max new tokens), batch 8. Modes:
  (a) plain greedy generation (SDPA);
  (b) ours: the same generation with the middle layer alone recording the answer rows' attention (and the
      answer log-probs from the raw logits), then the per-image statistics;
  (c) the reference: eager attention with ``output_attentions=True`` during ``generate`` (every layer, every
      step), at batch 1 as the reference ran and at batch 8.
Each mode runs in a fresh process (peak RSS is per process); prompts are encoded before timing, one warm-up
batch is not timed. Writes the table to experiments/results/select.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "select.md"
NEW_TOKENS = 64
MODES = [("a", "plain generation", 8), ("b", "ours: generation + capture", 8),
         ("c", "reference: eager, all layers", 1), ("c", "reference: eager, all layers", 8)]


def run_mode(mode: str, batch_size: int, samples: int) -> dict[str, float]:
    from omegaconf import OmegaConf
    from PIL import Image

    from miadpo.augment.formats import sequence_conversations
    from miadpo.config import ModelConfig, SelectionConfig
    from miadpo.data.pairs import ImageRoots
    from miadpo.models import build_adapter
    from miadpo.select.candidates import CandidateGenerator
    from miadpo.select.capture import resolve_layer

    torch.manual_seed(0)
    model_cfg = OmegaConf.structured(ModelConfig)
    if mode == "c":
        model_cfg.attn_implementation = "eager"
    adapter = build_adapter(model_cfg)
    adapter.model.eval()
    cfg = OmegaConf.structured(SelectionConfig)
    cfg.generation.max_new_tokens = cfg.generation.min_new_tokens = NEW_TOKENS
    generator = CandidateGenerator(adapter, cfg, ImageRoots(Path("."), Path(".")), seed=0)
    question = [{"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": "Red."}]
    prompt = sequence_conversations(question, 5, 3)[0]["value"]
    prompts = []
    for i in range(samples + batch_size):
        images = [Image.new("RGB", (56, 56), ((37 * i + 50 * k) % 256, 90, 40 * k)) for k in range(5)]
        prompts.append(adapter.encode(adapter.process_images(images), prompt))
    layer = resolve_layer(adapter, None)

    def reference(batch_prompts: list) -> None:
        out = adapter.model.generate(**adapter.generation_inputs(batch_prompts), max_new_tokens=NEW_TOKENS,
                                     min_new_tokens=NEW_TOKENS, do_sample=False, output_attentions=True,
                                     return_dict_in_generate=True, pad_token_id=adapter.tokenizer.pad_token_id)
        # what the reference read: one layer's rows of each decoding step, heads averaged
        _ = [step[layer][:, :, -1].mean(1) for step in out.attentions[1:]]

    def plain(batch_prompts: list) -> None:
        adapter.model.generate(**adapter.generation_inputs(batch_prompts), max_new_tokens=NEW_TOKENS,
                               min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=adapter.tokenizer.pad_token_id)

    def ours(batch_prompts: list) -> None:
        generated = generator.generate(batch_prompts)
        for b, prompt in enumerate(batch_prompts):
            generated.image_rows(b, prompt).mean(0)

    work = {"a": plain, "b": ours, "c": reference}[mode]
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    with torch.no_grad():
        work(batches[0])  # warm-up
        start = time.perf_counter()
        for batch in batches[1:]:
            work(batch)
        seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"samples_per_s": samples / seconds, "peak_rss_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--mode", default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.batch_size, args.samples)))
        return
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    results = []
    for mode, name, batch_size in MODES:
        proc = subprocess.run([sys.executable, __file__, "--mode", mode, "--batch-size", str(batch_size),
                               "--samples", str(args.samples)], env=env, capture_output=True, text=True, check=True)
        results.append((mode, name, batch_size, json.loads(proc.stdout.strip().splitlines()[-1])))
    plain = results[0][3]["samples_per_s"]
    ours = results[1][3]["samples_per_s"]
    header = (f"Selection throughput: tiny LLaVA (`model=tiny_llava`), 5 images × 16 tokens per prompt, exactly "
              f"{NEW_TOKENS} new tokens, {args.samples} samples timed after one warm-up batch; "
              f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads.\n\n")
    table = "| mode | batch | samples/s | time vs (a) | (b) speed-up over it | peak RSS (MB) |\n"
    table += "|---|---|---|---|---|---|\n"
    for mode, name, batch_size, r in results:
        speed = r["samples_per_s"]
        table += (f"| ({mode}) {name} | {batch_size} | {speed:.2f} | {plain / speed:.2f}× | {ours / speed:.2f}× | "
                  f"{r['peak_rss_mb']:.0f} |\n")
    print(header + table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(header + table)


if __name__ == "__main__":
    main()
