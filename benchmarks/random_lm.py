"""Build an LM folder with a real model's architecture and tokenizer but random weights, for latency runs.

A machine that cannot hold or reach the real weights (the GPU machine lent here takes at most 64 MiB
with each call, the embedded Gemma is 1 GB) can still time the real architecture: latency depends on
the shapes, not on the weights' values. The predictions of such a model are meaningless, so its
timings are quoted as such and never its accuracy.

    python benchmarks/random_lm.py --config CONFIG_DIR --tokenizer TOKENIZER_DIR --out /tmp/gemma-random
"""

from __future__ import annotations

import argparse
import logging
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


def main(argv: list[str] | None = None) -> int:
    """Command line: build the folder and print where it is."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="folder with the real model's config.json")
    parser.add_argument("--tokenizer", required=True, help="folder with the real model's tokenizer files")
    parser.add_argument("--out", required=True, help="where the random LM folder is written")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(build_random_lm(args.config, args.tokenizer, args.out, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
