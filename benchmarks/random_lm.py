"""Build an LM folder with a real model's architecture and tokenizer but random weights, for latency runs.

A machine that cannot hold or reach the real weights (the GPU machine lent here takes at most 64 MiB
with each call, the embedded Gemma is 1 GB) can still time the real architecture: latency depends on
the shapes, not on the weights' values. The predictions of such a model are meaningless, so its
timings are quoted as such and never its accuracy.

    python benchmarks/random_lm.py --config CONFIG_DIR --tokenizer TOKENIZER_DIR --out /tmp/gemma-random
    python benchmarks/random_lm.py --encoder MINILM_DIR_WITHOUT_WEIGHTS --out /tmp/minilm-random   # a sentence encoder
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def build_random_lm(config_dir: str | Path, tokenizer_dir: str | Path, out: str | Path, seed: int = 0) -> Path:
    """Save a randomly initialised LM of ``config_dir``'s architecture with ``tokenizer_dir``'s tokenizer."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(config_dir))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the config only {config.vocab_size}")
    torch.manual_seed(seed)
    masked = any(name.endswith("ForMaskedLM") for name in (config.architectures or []))
    auto = transformers.AutoModelForMaskedLM if masked else transformers.AutoModelForCausalLM
    model = auto.from_config(config, dtype=torch.float32)
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    logger.info("saved a random %s (%.0fM parameters) to %s", config.model_type, sum(p.numel() for p in model.parameters()) / 1e6, out)
    return out


def build_random_encoder(model_dir: str | Path, out: str | Path, seed: int = 0) -> Path:
    """Copy a sentence-transformers folder without its weights and give it random ones of the same architecture."""
    import torch
    import transformers

    src, out = Path(model_dir), Path(out)
    if not (src / "modules.json").is_file():
        raise ValueError(f"{src} is not a sentence-transformers folder (no modules.json)")
    shutil.copytree(src, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx"))
    torch.manual_seed(seed)
    transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(str(src))).save_pretrained(out)
    logger.info("saved a random sentence encoder to %s", out)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: build the folder and print where it is."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="folder with the real model's config.json")
    parser.add_argument("--tokenizer", help="folder with the real model's tokenizer files")
    parser.add_argument("--encoder", help="a sentence-transformers folder (weights not needed): build a random encoder instead")
    parser.add_argument("--out", required=True, help="where the random LM folder is written")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.encoder:
        print(build_random_encoder(args.encoder, args.out, args.seed))
    elif args.config and args.tokenizer:
        print(build_random_lm(args.config, args.tokenizer, args.out, args.seed))
    else:
        parser.error("give --config and --tokenizer (an LM), or --encoder (a sentence encoder)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
