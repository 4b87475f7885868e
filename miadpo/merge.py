"""Merge a LoRA adapter into its base model and write a standard transformers directory.

    python -m miadpo.merge <run_dir>/adapter <out_dir> [--base /path/to/base/weights]

The output holds weights, config, tokenizer and processor, loadable with ``from_pretrained`` for evaluation or
serving. The base defaults to the path recorded in the adapter (``base_model_name_or_path``). The processor files
(and so the chat template) are the base's, which miadpo saved with the template it trains with; an adapter written
by another tool does not bring its own.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers
from peft import PeftConfig, PeftModel
from transformers import AutoConfig

from miadpo.export import export_model
from miadpo.models.internlm_xc25.checkpoint import is_xcomposer_directory, load_model
from miadpo.models.loading import load_pretrained


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, base: str | None = None) -> Path:
    """Merge the peft adapter ``adapter_dir`` into its base (``base``, else the path the adapter records) and
    write the merged model to ``out_dir``; returns the directory."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a peft adapter directory (no adapter_config.json)")
    base_path = base or PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    if not base_path or not Path(base_path).is_dir():
        raise FileNotFoundError(
            f"base weights {base_path!r} recorded in {adapter_dir} are not a local directory; pass --base PATH"
        )
    policy = PeftModel.from_pretrained(load_base(Path(base_path)), str(adapter_dir))
    # The processor (tokenizer, image processor, chat template) of the base, which miadpo saved with the template it
    # trains with; an adapter's own tokenizer files (another tool's chat template) only when the base has none.
    base_dir = Path(base_path)
    source = base_dir if (base_dir / "tokenizer_config.json").is_file() else adapter_dir
    return export_model(policy, out_dir, source, merge_lora=True)


def load_base(path: Path) -> torch.nn.Module:
    """The base model of a directory: InternLM-XC2.5 (official or ours) through our checked loader, any other
    family through its transformers class."""
    if is_xcomposer_directory(path):
        config = json.loads((path / "config.json").read_text())
        dtype = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
        return load_model(path, dtype=getattr(torch, dtype))
    config = AutoConfig.from_pretrained(path)
    return load_pretrained(getattr(transformers, config.architectures[0]), path, dtype=config.dtype)


def main(argv: list[str] | None = None) -> None:
    """Command line of ``python -m miadpo.merge``: merge an adapter and print where the model was written."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--base", default=None, help="base weights directory (default: recorded in the adapter)")
    args = parser.parse_args(argv)
    out = merge_adapter(args.adapter_dir, args.out_dir, args.base)
    print(f"merged model written to {out.resolve()}")


if __name__ == "__main__":
    main()
