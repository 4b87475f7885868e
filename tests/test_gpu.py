"""What needs a CUDA GPU: bf16 on the device, NCCL, flash attention (where installed). Marked ``gpu``; they skip
without CUDA. ``experiments/gpu_check.sh`` runs them on a GPU machine (``pytest -m gpu tests/test_gpu.py``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import compose_train
from lightning.fabric.utilities import move_data_to_device
from test_fast_path import adapter_for, pairs

from miadpo.config import DPOConfig, OptimConfig
from miadpo.dpo.forward import ConcatenatedPairForward, SharedPrefixPairForward
from miadpo.dpo.module import DPOModule
from miadpo.train import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
GPU_RUN = ["trainer.accelerator=gpu", "trainer.devices=1", "trainer.max_steps=3", "data.synthetic.num_pairs=12",
           "data.batch_size=4", "data.val_fraction=0"]


def bf16_logps(attn_implementation: str = "sdpa", name: str = "tiny_llava") -> tuple[torch.Tensor, torch.Tensor]:
    """Policy log-probs of the same pairs by the plain and the shared-prefix forward, bf16 on the GPU."""
    adapter = adapter_for(name, dtype="bfloat16", attn_implementation=attn_implementation)
    adapter.model.to("cuda")
    items = pairs(adapter, [2, 5, 1])
    results = []
    for forward in (ConcatenatedPairForward(adapter), SharedPrefixPairForward(adapter)):
        module = DPOModule(adapter, DPOConfig(), OptimConfig(), pair_forward=forward)
        batch = move_data_to_device(forward.collate(items), "cuda")
        logps = module.policy_logps(batch)
        results.append(torch.cat([logps.chosen, logps.rejected]).float().cpu())
    return results[0], results[1]


@pytest.mark.parametrize("name", ["tiny_llava", "tiny_qwen3_vl"])
def test_the_shared_prefix_matches_the_plain_path_in_bf16_on_the_gpu(name: str) -> None:
    """Also Qwen3-VL (interleaved mRoPE, DeepStack features added in the first decoder layers)."""
    plain, fast = bf16_logps(name=name)
    assert torch.isfinite(plain).all()
    # bf16 keeps 8 bits of mantissa: sums of ~10 log-probs agree to about 1%.
    assert torch.allclose(plain, fast, rtol=2e-2, atol=0.2), (plain, fast)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
def test_flash_attention_gives_the_sdpa_log_probs() -> None:
    sdpa, _ = bf16_logps("sdpa")
    flash, _ = bf16_logps("flash_attention_2")
    assert torch.allclose(sdpa, flash, rtol=2e-2, atol=0.2), (sdpa, flash)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_training_on_the_gpu_in_bf16_with_the_reference_filled_in_the_step(tmp_path: Path, precision: str) -> None:
    result = train(compose_train(GPU_RUN + [f"trainer.precision={precision}", "dpo.fast.reference_prepass=false"],
                                 tmp_path))
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.metrics["loss"]))
    rows = sum(len(f.read_text().splitlines()) for f in (tmp_path / "data" / "reference_logps").glob("*/*.jsonl"))
    assert rows == 12  # each pair's reference once, written from the GPU steps


def test_ddp_on_one_gpu_uses_nccl(tmp_path: Path, monkeypatch) -> None:
    backends = []
    init = torch.distributed.init_process_group

    def recording(*args, **kwargs):
        backends.append(kwargs.get("backend", args[0] if args else None))
        return init(*args, **kwargs)

    monkeypatch.setattr(torch.distributed, "init_process_group", recording)
    result = train(compose_train(GPU_RUN + ["strategy=ddp"], tmp_path))
    assert result.global_step == 3 and backends == ["nccl"]
