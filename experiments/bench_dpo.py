"""DPO cost: our fast path vs our plain path vs TRL's DPOTrainer, same model, same pairs; per step and end to end.

    python experiments/bench_dpo.py [--steps 8] [--threads 1 2]        (needs `pip install -e ".[bench]"`)
    python experiments/bench_dpo.py --end-to-end [--repeats 5]         (1 thread; both shapes)
    python experiments/bench_dpo.py --vocab [--steps 4]                (1 thread; 32k, 152k, 262k vocabularies)

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

End to end (``--end-to-end``, experiments/results/dpo_end_to_end.md): seconds per pair of whole runs over the same
8 pairs (4 batches) for 1 and 3 epochs, starting from an empty reference cache, every reference computation
included, for two shapes (``SHAPES``: 5 images with ~30-token answers, 2 images with short answers). Methods:
  fast (cache filled in the step) — epoch 1 computes the reference in the step (shared prompt pass and image
          features) and writes it to the cache (``InStepFilling``); later epochs read it;
  fast (pre-pass) — ``fill_reference_cache`` over the pairs first, then every epoch reads the cache;
  fast (no cache) — the reference in every step, sharing the prompt's image features;
  plain, trl — as above, the reference in every step (TRL cannot precompute reference log-probs for image data).
Vocabulary (``--vocab``, experiments/results/dpo_vocab.md): the benchmark's LLaVA with its embedding and LM head
resized to 32,000 (LLaVA-1.5), 151,669 (Qwen2/3) and 262,144 (Gemma 3) entries; 3 images per prompt, ~40-token
answers, batch 2 pairs, 1 thread. Methods: fast (as above: answer log-probs through the LM head 64 positions at a
time, recomputed in backward), fast (head on all answer positions at once: ``chunk=0``, the logits kept for
backward as before the chunking), trl. Peak RSS per method and vocabulary in a fresh process; pairs/s from
interleaved steps.

Each repetition runs every method once (interleaved, each from a fresh empty cache; the order rotated from one
repetition to the next, so no method always runs first) after one warm-up step on a batch outside the 8 pairs;
a 1-epoch run is the first epoch of the 3-epoch run (the same work from an empty cache). Medians over the
repetitions.
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
END_TO_END = Path(__file__).resolve().parent / "results" / "dpo_end_to_end.md"
METHODS = ("fast", "plain", "trl")
RUN_METHODS = ("fast (cache filled in the step)", "fast (pre-pass)", "fast (no cache)", "plain", "trl")
BATCH_PAIRS, N_IMAGES, LORA_R = 2, 5, 8
RUN_PAIRS, EPOCHS = 8, 3
LONG_TAIL = "it sits in the middle of the image on a plain background"  # ~30 answer tokens with EOS
# shape → (images per prompt, the words after the colour in each answer)
SHAPES = {"5 images, ~30-token answers": (5, f" and {LONG_TAIL}"), "2 images, short answers": (2, ""),
          "3 images, ~40-token answers": (3, f" and {LONG_TAIL}, with a thin grey border around its edges")}
VOCAB_SHAPE = "3 images, ~40-token answers"
VOCAB_SIZES = (32000, 151669, 262144)
VOCAB_METHODS = ("fast", "fast (chunk=0)", "trl")
VOCAB_RESULTS = Path(__file__).resolve().parent / "results" / "dpo_vocab.md"
GEMMA_VOCAB = 262208  # Gemma 3's vocabulary (262,144 + its specials)
DEFAULT_SHAPE = "5 images, ~30-token answers"
PALETTE = [(220, 30, 30), (30, 170, 60), (40, 70, 220), (240, 210, 20), (140, 50, 180), (20, 180, 190)]
NAMES = ["red", "green", "blue", "yellow", "purple", "cyan"]


BENCH_TINY = {"image_size": 168, "patch_size": 14, "hidden_size": 192, "intermediate_size": 512, "num_layers": 4,
              "num_heads": 4, "vision_hidden_size": 64, "vision_layers": 2}


def gemma_adapter(vocab_size: int = GEMMA_VOCAB):
    """The tiny Gemma 3 (``conf/model/tiny_gemma3.yaml``: 4 layers, hidden 64, 16 soft tokens per image) with its
    embedding and head resized to ``vocab_size``."""
    from hydra import compose, initialize_config_dir

    from miadpo.models import build_adapter as build
    from miadpo.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=tiny_gemma3", f"model.lora.r={LORA_R}",
                                                      f"model.lora.alpha={2 * LORA_R}"]).model
    torch.manual_seed(0)
    adapter = build(cfg)
    adapter.model.resize_token_embeddings(vocab_size, mean_resizing=False)
    return adapter


def build_adapter(tiny: dict[str, int] | None = None, dtype: str = "float32", vocab_size: int | None = None):
    """A LLaVA built in code with random weights: the benchmark's 2.1M-parameter one, or the sizes of ``tiny``;
    ``vocab_size``: its embedding and LM head resized to that many entries (the tokenizer's ids stay below)."""
    from omegaconf import OmegaConf

    from miadpo.config import ModelConfig
    from miadpo.models import build_adapter as build

    cfg = OmegaConf.structured(ModelConfig)
    cfg.merge_with({"name": "bench", "family": "llava", "dtype": dtype, "lora": {"r": LORA_R, "alpha": 2 * LORA_R},
                    "tiny": tiny or BENCH_TINY})
    torch.manual_seed(0)
    adapter = build(cfg)
    if vocab_size is not None:
        adapter.model.resize_token_embeddings(vocab_size, mean_resizing=False)
    return adapter


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def pair_texts(index: int, shape: str = DEFAULT_SHAPE) -> dict[str, Any]:
    from PIL import Image

    n_images, tail = SHAPES[shape]
    colours = [(index + k) % len(PALETTE) for k in range(n_images)]
    images = [Image.new("RGB", (168, 168), PALETTE[c]) for c in colours]
    target = 1 + index % n_images
    prompt = "".join(f"Image{k}: <image>\n" for k in range(1, n_images + 1)) + \
        f"In Image{target}, what colour is the square and where is it?"
    right, wrong = NAMES[colours[target - 1]], NAMES[colours[target % n_images]]
    return {"images": images, "prompt": prompt, "chosen": f"The square is {right}{tail}.",
            "rejected": f"The square is {wrong}{tail}."}


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


def our_step(fast: bool, adapter: Any = None, device: str = "cpu", shape: str = DEFAULT_SHAPE,
             chunk: int | None = None) -> Callable[[dict[str, int] | None], float]:
    """One training step of our fast path (reference log-probs cached) or plain path, on ``adapter`` (default: the
    benchmark's) moved to ``device``; ``chunk``: answer positions through the LM head at a time (default: ours)."""
    from lightning.fabric.utilities import move_data_to_device

    from miadpo.config import DPOConfig, FastPathConfig, OptimConfig
    from miadpo.dpo.forward import ConcatenatedPairForward, SharedPrefixPairForward
    from miadpo.dpo.module import DPOModule
    from miadpo.dpo.reference import CachedReference
    from miadpo.dpo.reference_cache import ReferenceCache

    adapter = adapter or build_adapter()
    adapter.model.to(device)
    pairs = encoded_pairs(adapter, shape, range(BATCH_PAIRS))
    forward_class = SharedPrefixPairForward if fast else ConcatenatedPairForward
    forward = forward_class(adapter) if chunk is None else forward_class(adapter, chunk=chunk)
    batch = move_data_to_device(forward.collate(pairs), device)
    if fast:  # the reference cache: computed once with the base model, before LoRA, as miadpo.train does
        with torch.no_grad():
            reference = forward(adapter.model.eval(), batch)
        batch.reference = reference.rows()
    adapter.prepare_for_training()
    dpo = DPOConfig(fast=FastPathConfig(shared_prefix=fast, shared_image_features=fast, reference_cache=fast))
    reference = CachedReference(ReferenceCache(tempfile.mkdtemp(prefix="bench_reference_"))) if fast else None
    module = DPOModule(adapter, dpo, OptimConfig(lr=1e-4), pair_forward=forward, reference=reference)
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
        synchronize(device)
        return time.perf_counter() - start

    return step


def trl_trainer(shape: str, n_pairs: int, adapter: Any = None, device: str = "cpu") -> Any:
    """``trl.DPOTrainer`` on the first ``n_pairs`` pairs of ``shape`` (plain model + peft_config, EOS appended: TRL
    does not add it to vision data), its optimizer created; on ``adapter`` (default: the benchmark's), in bf16 when
    the adapter's weights are."""
    os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    adapter = adapter or build_adapter()
    bf16 = adapter.model.dtype == torch.bfloat16
    eos = adapter.template.end_token or adapter.tokenizer.eos_token
    gemma = adapter.cfg.family == "gemma3"
    rows: dict[str, list[Any]] = {"images": [], "prompt": [], "chosen": [], "rejected": []}
    for i in range(n_pairs):
        texts = pair_texts(i, shape)
        rows["images"].append(texts["images"])
        rows["prompt"].append(texts["prompt"].replace("<image>", "<start_of_image>") if gemma else texts["prompt"])
        rows["chosen"].append(" " + texts["chosen"] + eos)
        rows["rejected"].append(" " + texts["rejected"] + eos)
    args = TRLConfig(output_dir=tempfile.mkdtemp(prefix="trl_bench_"), per_device_train_batch_size=BATCH_PAIRS,
                     learning_rate=1e-4, beta=0.1, max_length=None, bf16=bf16, fp16=False,
                     gradient_checkpointing=False, report_to="none", save_strategy="no", use_cpu=device == "cpu",
                     dataloader_num_workers=0, lr_scheduler_type="constant", seed=0)
    lora = LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0.0, bias="none",
                      target_modules=adapter.default_lora_targets())
    trainer = DPOTrainer(model=adapter.model, ref_model=None, args=args, train_dataset=Dataset.from_dict(rows),
                         processing_class=gemma_processor(adapter) if gemma else adapter.processor_for_saving(),
                         peft_config=lora)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop otherwise
    return trainer


def gemma_processor(adapter: Any) -> Any:
    """transformers' Gemma3Processor on the tiny Gemma's tokenizer and image processor (what TRL reads)."""
    from transformers import Gemma3Processor

    return Gemma3Processor(image_processor=adapter.image_processor, tokenizer=adapter.tokenizer,
                           image_seq_length=adapter.base_model.config.mm_tokens_per_image,
                           chat_template=adapter.chat_template())


def trl_step(adapter: Any = None, device: str = "cpu", shape: str = DEFAULT_SHAPE
             ) -> Callable[[dict[str, int] | None], float]:
    """One ``DPOTrainer.training_step`` (policy forward, reference forward with the adapter disabled, backward)."""
    trainer = trl_trainer(shape, BATCH_PAIRS, adapter, device)
    batch = next(iter(trainer.get_train_dataloader()))  # collated once, like ours (moved by the trainer)

    def step(counter: dict[str, int] | None = None) -> float:
        start = time.perf_counter()
        if counter is None:
            trainer.training_step(trainer.model, batch)  # backward happens inside
        else:
            with saved_bytes(counter):
                trainer.training_step(trainer.model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        synchronize(device)
        return time.perf_counter() - start

    return step


def encoded_pairs(adapter: Any, shape: str, indices: range | list[int]) -> list[Any]:
    """The pairs of ``indices``, encoded as the pair dataset encodes them, each with a reference-cache key."""
    from miadpo.data.dataset import EncodedPair

    pairs = []
    for i in indices:
        texts = pair_texts(i, shape)
        images = adapter.process_images(texts["images"])
        pairs.append(EncodedPair(str(i), adapter.encode(images, texts["prompt"], texts["chosen"]),
                                 adapter.encode(images, texts["prompt"], texts["rejected"]), key=f"{shape}/{i}"))
    return pairs


class KeyedPairs(list):
    """The pairs as ``fill_reference_cache`` reads a dataset: items and their ``keys``."""

    @property
    def keys(self) -> list[str]:
        return [pair.key for pair in self]


class OurRun:
    """Whole runs of one of our methods over the same pairs (``run``: seconds per epoch, from an empty cache)."""

    def __init__(self, method: str, shape: str) -> None:
        from miadpo.config import DPOConfig, FastPathConfig, OptimConfig
        from miadpo.dpo.forward import ConcatenatedPairForward, SharedPrefixPairForward
        from miadpo.dpo.module import DPOModule

        self.method = method
        self.adapter = build_adapter()
        fast = method != "plain"
        self.forward = SharedPrefixPairForward(self.adapter) if fast else ConcatenatedPairForward(self.adapter)
        self.pairs = KeyedPairs(encoded_pairs(self.adapter, shape, range(RUN_PAIRS)))
        self.batches = [self.forward.collate(self.pairs[i : i + BATCH_PAIRS])
                        for i in range(0, RUN_PAIRS, BATCH_PAIRS)]
        warm = self.forward.collate(encoded_pairs(self.adapter, shape, [100, 101]))
        self.adapter.prepare_for_training()
        self.dpo = DPOConfig(fast=FastPathConfig(shared_prefix=fast, shared_image_features=fast,
                                                 reference_cache=method.startswith("fast (") and "no" not in method))
        self.optim = OptimConfig(lr=1e-4)
        self.optimizer = torch.optim.AdamW([p for p in self.adapter.model.parameters() if p.requires_grad], lr=1e-4)
        # Warm-up (untimed): one forward and backward outside the measured pairs, weights left as they are.
        warm_module = DPOModule(self.adapter, DPOConfig(fast=FastPathConfig(shared_prefix=fast,
                                                                            shared_image_features=fast)),
                                self.optim, pair_forward=self.forward)
        warm_module.policy.train()
        warm_module.training_step(warm, 0).backward()
        self.optimizer.zero_grad()

    def run(self, epochs: int) -> list[float]:
        from miadpo.dpo.module import DPOModule
        from miadpo.dpo.reference import CachedReference, build_reference
        from miadpo.dpo.reference_cache import ReferenceCache, fill_reference_cache

        cache = ReferenceCache(tempfile.mkdtemp(prefix="bench_reference_"))  # empty
        prepass = self.method == "fast (pre-pass)"
        if prepass:  # filled below, before training: no reference model in the step
            reference = CachedReference(cache)
        else:
            reference = build_reference(self.adapter.model, cache if self.dpo.fast.reference_cache else None)
        module = DPOModule(self.adapter, self.dpo, self.optim, pair_forward=self.forward, reference=reference)
        module.policy.train()
        seconds = []
        for epoch in range(epochs):
            start = time.perf_counter()
            if prepass and epoch == 0:  # the reference is the policy with its adapter disabled (the base)
                with module.policy.disable_adapter():
                    fill_reference_cache(cache, [self.pairs], module.policy, self.forward, BATCH_PAIRS)
                module.policy.train()
            for batch in self.batches:
                module.training_step(batch, 0).backward()
                self.optimizer.step()
                self.optimizer.zero_grad()
            seconds.append(time.perf_counter() - start)
        filling = getattr(module.reference, "filling", None)
        if filling is not None:
            assert filling.written == RUN_PAIRS, filling.written  # each pair once, in epoch 1
            filling.close()
        return seconds


class TRLRun:
    """Whole runs of ``trl.DPOTrainer`` over the same pairs: the reference recomputed in every step."""

    def __init__(self, shape: str) -> None:
        self.trainer = trl_trainer(shape, RUN_PAIRS)
        self.batches = list(self.trainer.get_train_dataloader())
        self.trainer.training_step(self.trainer.model, self.batches[0])  # warm-up (untimed)
        self.trainer.optimizer.zero_grad()

    def run(self, epochs: int) -> list[float]:
        seconds = []
        for _ in range(epochs):
            start = time.perf_counter()
            for batch in self.batches:
                self.trainer.training_step(self.trainer.model, batch)
                self.trainer.optimizer.step()
                self.trainer.optimizer.zero_grad()
            seconds.append(time.perf_counter() - start)
        return seconds


def end_to_end_worker(shape: str, repeats: int) -> dict[str, list[list[float]]]:
    """Per method, the seconds of each epoch of each repetition (methods interleaved within a repetition)."""
    runs = {m: TRLRun(shape) if m == "trl" else OurRun(m, shape) for m in RUN_METHODS}
    seconds: dict[str, list[list[float]]] = {m: [] for m in RUN_METHODS}
    for repeat in range(repeats):
        order = RUN_METHODS[repeat % len(RUN_METHODS):] + RUN_METHODS[: repeat % len(RUN_METHODS)]
        for method in order:  # each method in each position of the order as often (5 repetitions: once each)
            seconds[method].append(runs[method].run(EPOCHS))
    return seconds


def end_to_end_table(shape: str, seconds: dict[str, list[list[float]]]) -> list[str]:
    """Seconds per pair and pairs/s relative to TRL, for 1 epoch and for all EPOCHS, medians over repetitions."""
    def per_pair(method: str, epochs: int) -> float:
        return statistics.median(sum(run[:epochs]) for run in seconds[method]) / (RUN_PAIRS * epochs)

    lines = [f"\n## {shape}\n", "| method | 1 epoch: s/pair | × TRL pairs/s | × fast (no cache) | "
             f"{EPOCHS} epochs: s/pair | × TRL pairs/s | × fast (no cache) |", "|---|---|---|---|---|---|---|"]
    for method in RUN_METHODS:
        cells = []
        for epochs in (1, EPOCHS):
            t = per_pair(method, epochs)
            no_cache = per_pair("fast (no cache)", epochs)
            cells += [f"{t:.3f}", f"{per_pair('trl', epochs) / t:.2f}", f"{no_cache / t:.2f}"]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def end_to_end(repeats: int) -> None:
    lines = ["# DPO runs end to end: fast path (three ways to get the reference) vs plain vs TRL DPOTrainer\n",
             f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores, torch {torch.__version__}, 1 torch thread; "
             f"{RUN_PAIRS} pairs in batches of {BATCH_PAIRS}, 144 tokens an image, LoRA r{LORA_R}, fp32; whole runs "
             f"from an empty reference cache, every reference computation included; medians of {repeats} "
             "repetitions, the methods interleaved in each (order rotated). 1 epoch = the first epoch of the "
             f"{EPOCHS}-epoch run.\n"]
    raw = {}
    for shape in SHAPES:
        raw[shape] = run("--worker", "end-to-end", "--shape", shape, "--repeats", str(repeats), "--threads", "1")
        lines += end_to_end_table(shape, raw[shape])
        print("\n".join(lines))
    END_TO_END.write_text("\n".join(lines) + "\n")
    END_TO_END.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    print(f"\nwritten to {END_TO_END}")


def build(method: str, vocab_size: int | None = None) -> Callable[[dict[str, int] | None], float]:
    if vocab_size is None:
        return trl_step() if method == "trl" else our_step(method == "fast")
    adapter = gemma_adapter() if vocab_size == GEMMA_VOCAB else build_adapter(vocab_size=vocab_size)
    if method == "trl":
        return trl_step(adapter, shape=VOCAB_SHAPE)
    return our_step(True, adapter, shape=VOCAB_SHAPE, chunk=0 if method == "fast (chunk=0)" else None)


def vocabulary(steps: int) -> None:
    """The vocabulary table: pairs/s (interleaved steps, one process per vocabulary) and peak RSS (one process per
    method and vocabulary) of our fast step, the fast step without chunking, and TRL's."""
    rows = []
    for size in (*VOCAB_SIZES, GEMMA_VOCAB):
        timing = run("--worker", "timing", "--threads", "1", "--steps", str(steps), "--vocab-size", str(size))
        memory = {m: run("--worker", "memory", "--method", m, "--threads", "1", "--vocab-size", str(size))
                  for m in VOCAB_METHODS}
        for method in VOCAB_METHODS:
            t, rss = timing[method], memory[method]["peak_rss_mib"]
            model = "tiny Gemma 3" if size == GEMMA_VOCAB else "LLaVA"
            rows.append(f"| {model} | {size:,} | {method} | {t:.3f} | {BATCH_PAIRS / t:.2f} | "
                        f"{timing['trl'] / t:.2f} | {rss:.0f} | {rss / memory['trl']['peak_rss_mib']:.2f} |")
            print(rows[-1], flush=True)
    lines = ["# DPO step by vocabulary size: fast path vs TRL DPOTrainer\n",
             f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores, torch {torch.__version__}, 1 torch thread; "
             f"the benchmark's LLaVA with its embedding and LM head resized to each vocabulary; batch {BATCH_PAIRS} "
             f"pairs × 3 images × 144 tokens, answers ~40 tokens, LoRA r{LORA_R}, fp32; median of {steps} "
             "interleaved steps after one warm-up; peak RSS of a fresh process running 3 steps.\n",
             f"The Gemma-shaped row: the tiny Gemma 3 (`model=tiny_gemma3`: 4 layers with a sliding window, hidden 64, "
             f"16 soft tokens per image) with Gemma 3's {GEMMA_VOCAB:,}-entry vocabulary; TRL given transformers' "
             "Gemma3Processor.\n",
             "| model | vocabulary | method | s/step | pairs/s | × TRL pairs/s | peak RSS (MiB) | × TRL |",
             "|---|---|---|---|---|---|---|---|", *rows]
    VOCAB_RESULTS.write_text("\n".join(lines) + "\n")
    print(f"\nwritten to {VOCAB_RESULTS}")


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if args.worker == "end-to-end":
        print(json.dumps(end_to_end_worker(args.shape, args.repeats)))
        return
    if args.worker == "timing":
        methods = VOCAB_METHODS if args.vocab_size else METHODS
        steps = {m: build(m, args.vocab_size) for m in methods}
        for step in steps.values():
            step(None)  # warm-up
        times: dict[str, list[float]] = {m: [] for m in methods}
        for _ in range(args.steps):
            for method, step in steps.items():
                times[method].append(step(None))
        print(json.dumps({m: statistics.median(t) for m, t in times.items()}))
    else:
        step = build(args.method, args.vocab_size)
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
    parser.add_argument("--worker", choices=["timing", "memory", "end-to-end"], default=None)
    parser.add_argument("--method", choices=METHODS + VOCAB_METHODS[1:], default="fast")
    parser.add_argument("--vocab", action="store_true", help="the vocabulary table (experiments/results/dpo_vocab.md)")
    parser.add_argument("--vocab-size", type=int, default=None)
    parser.add_argument("--end-to-end", action="store_true", help="whole 1- and 3-epoch runs instead of steps")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shape", choices=list(SHAPES), default=DEFAULT_SHAPE)
    args = parser.parse_args()
    if args.worker:
        args.threads = args.threads[0]
        worker(args)
        return
    if args.end_to_end:
        end_to_end(args.repeats)
        return
    if args.vocab:
        vocabulary(args.steps)
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
