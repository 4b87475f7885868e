"""Hardware strategies: FSDP (fully_shard) on 2 CPU processes matches DDP; DeepSpeed without a GPU says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from omegaconf import OmegaConf
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration

from miadpo.config import StrategyConfig
from miadpo.lightning_setup import build_strategy


def run_two_processes(strategy: str, tmp_path: Path, extra: tuple[str, ...] = ()) -> Path:
    run_dir = tmp_path / strategy
    args = [sys.executable, "-m", "miadpo.train", "model=tiny_llava", "data=synthetic", f"strategy={strategy}",
            "trainer.devices=2", "trainer.accelerator=cpu", "trainer.max_steps=3", "logger=csv",
            "data.synthetic.num_pairs=24", "optim.lr=5e-3", f"data.out_dir={tmp_path / 'data'}",
            f"hydra.run.dir={run_dir}", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_saves_the_adapter_ddp_trains(tmp_path: Path) -> None:
    fsdp, ddp = run_two_processes("fsdp", tmp_path), run_two_processes("ddp", tmp_path)
    a = load_file(fsdp / "adapter" / "adapter_model.safetensors")
    b = load_file(ddp / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    assert max(float(a[k].abs().max()) for k in a if "lora_B" in k) > 0  # trained, gathered from the shards
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    base = LlavaForConditionalGeneration.from_pretrained(fsdp / "base_model")
    reloaded = PeftModel.from_pretrained(base, fsdp / "adapter")
    assert any("lora_A" in n for n, _ in reloaded.named_parameters())
    assert (fsdp / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_computes_each_pairs_reference_once(tmp_path: Path) -> None:
    # 24 pairs, 4 a batch on each of 2 processes: 3 steps are one epoch, the reference computed in the step.
    run_two_processes("ddp", tmp_path, ("data.val_fraction=0", "data.batch_size=4",
                                        "dpo.fast.reference_prepass=false"))
    shards = sorted((tmp_path / "data" / "reference_logps").glob("*/logps.*.jsonl"))
    keys = {f.name: [json.loads(line)["key"] for line in f.read_text().splitlines()] for f in shards}
    assert {name: len(rows) for name, rows in keys.items()} == {"logps.0.jsonl": 12, "logps.1.jsonl": 12}
    assert len(set(keys["logps.0.jsonl"]) | set(keys["logps.1.jsonl"])) == 24  # each pair once, across processes


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_without_a_gpu_says_what_to_use(stage: int) -> None:
    cfg = OmegaConf.structured(StrategyConfig(name="deepspeed", stage=stage))
    with pytest.raises(ValueError, match=f"strategy=deepspeed_zero{stage} needs CUDA GPUs.*strategy=fsdp"):
        build_strategy(cfg)


def test_cpu_strategy_forces_the_cpu(tmp_path: Path) -> None:
    import lightning as L
    from conftest import compose_train

    from miadpo.train import train

    class Devices(L.Callback):
        """Where the step ran: the strategy's root device and the device of every parameter during the step."""

        def __init__(self) -> None:
            self.root: list[torch.device] = []
            self.parameters: set[torch.device] = set()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.root.append(trainer.strategy.root_device)
            self.parameters |= {p.device for p in pl_module.parameters()}

    devices = Devices()
    # The trainer asks for a GPU: strategy=cpu must override it (without a GPU, the request alone would fail).
    cfg = compose_train(["strategy=cpu", "trainer.accelerator=gpu", "trainer.max_steps=1",
                         "data.synthetic.num_pairs=8"], tmp_path)
    result = train(cfg, extra_callbacks=[devices])
    assert result.global_step == 1
    assert devices.root == [torch.device("cpu")]
    assert devices.parameters == {torch.device("cpu")}


DEEPSPEED_STEP = """
import os, sys
os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0", "WORLD_SIZE": "1",
                   "LOCAL_RANK": "0"})
import torch, deepspeed
from omegaconf import OmegaConf
from miadpo.config import DPOConfig, ModelConfig, OptimConfig, StrategyConfig
from miadpo.data.dataset import EncodedPair
from miadpo.lightning_setup import deepspeed_config
from miadpo.models import build_adapter
from miadpo.dpo.module import DPOModule
from PIL import Image
torch.distributed.init_process_group("gloo")
adapter = build_adapter(OmegaConf.structured(ModelConfig(name="tiny_llava")))
adapter.prepare_for_training()
module = DPOModule(adapter, DPOConfig(), OptimConfig())
config = deepspeed_config(OmegaConf.structured(StrategyConfig(name="deepspeed", stage=STAGE)), micro_batch=2)
params = [p for p in module.policy.parameters() if p.requires_grad]
engine, *_ = deepspeed.initialize(model=module.policy, model_parameters=params, config=config,
                                  optimizer=torch.optim.AdamW(params, lr=1e-2))
items = []
for i, n in enumerate([1, 3]):
    images = adapter.process_images([Image.new("RGB", (40, 40), (60 * k, 90, 30)) for k in range(n)])
    prompt = "".join(f"Image{k}: <image>\\n" for k in range(1, n + 1)) + "Which colour?"
    items.append(EncodedPair(str(i), adapter.encode(images, prompt, "Red."),
                             adapter.encode(images, prompt, "Blue and big.")))
batch = module.pair_forward.collate(items)
before = {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}
loss = module.training_step(batch, 0)
engine.backward(loss)
engine.step()
changed = [n for n, p in module.policy.named_parameters() if p.requires_grad and not torch.equal(before[n], p.detach())]
print("changed", len(changed), "of", len(before), "lora_B changed", sum("lora_B" in n for n in changed))
"""


@pytest.mark.parametrize("stage", [2])
@pytest.mark.slow
def test_deepspeed_zero_config_takes_a_step_on_cpu_outside_lightning(stage: int, tmp_path: Path) -> None:
    """The strategy's DeepSpeed configuration, with DeepSpeed itself on CPU (gloo): one DPO step moves LoRA."""
    pytest.importorskip("deepspeed")
    script = tmp_path / "step.py"
    script.write_text(DEEPSPEED_STEP.replace("STAGE", str(stage)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    changed = proc.stdout.strip().splitlines()[-1].split()
    assert changed[1] == changed[3] and int(changed[1]) > 0 and int(changed[-1]) > 0
