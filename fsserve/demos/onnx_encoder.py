"""The sentence encoder as ONNX, so a bundle picks similar demonstrations on onnxruntime, without torch.

A bundle with demonstrations needs to embed each query at predict time. With the encoder exported
next to the pool (``demos/encoder/``: ``model.onnx``, ``tokenizer.json``, ``encoder.json``) the
torch-free install embeds on onnxruntime with the ``tokenizers`` library, and picks what the
sentence-transformers model picks (the export checks the vectors against it). The graph is the
encoder's transformer, its pooling (mean over the attention mask, or the first token) and the L2
normalisation, so one run gives the vectors FAISS compares.

>>> export_sentence_encoder("sentence-transformers/all-MiniLM-L6-v2", "bundle/demos/encoder")  # doctest: +SKIP
>>> OnnxSentenceEncoder("bundle/demos/encoder").encode(["A fine film."]).shape  # doctest: +SKIP
(1, 384)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fsserve.utils.atomic import atomic_directory, write_json_atomic

logger = logging.getLogger(__name__)

CONFIG = "encoder.json"
GRAPH = "model.onnx"
TOKENIZER = "tokenizer.json"
EXPORT_ATOL = 1e-4
_PROBES = ("A fine film.", "so dull", "The plot never comes together, and the acting is flat; an hour too long.", "naïve café, 3.5/10")


class OnnxSentenceEncoder:
    """The slice of SentenceTransformer that DemoIndex uses (``encode``, ``get_embedding_dimension``), on onnxruntime."""

    def __init__(self, directory: str | Path, num_threads: int | None = None) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        root = Path(directory)
        config_path = root / CONFIG
        if not config_path.is_file():
            raise ValueError(f"{root} holds no exported sentence encoder ({CONFIG} is missing)")
        self.config = json.loads(config_path.read_text(encoding="utf-8"))
        self.name = self.config["name"]
        self.tokenizer = Tokenizer.from_file(str(root / TOKENIZER))
        self.tokenizer.enable_truncation(int(self.config["max_seq_length"]))
        self.tokenizer.enable_padding(pad_id=int(self.config["pad_token_id"]), pad_token=self.config["pad_token"])
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = int(num_threads)
        self.session = ort.InferenceSession(str(root / GRAPH), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def get_embedding_dimension(self) -> int:
        """The vectors' dimension, as SentenceTransformer reports it."""
        return int(self.config["dim"])

    def encode(self, texts: Sequence[str], batch_size: int = 64, **_: Any) -> np.ndarray:
        """L2-normalised float32 vectors, ``batch_size`` texts per run (other SentenceTransformer options are implied)."""
        out = []
        for start in range(0, len(texts), batch_size):
            encodings = self.tokenizer.encode_batch(list(texts[start : start + batch_size]))
            feed = {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                    "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
                    "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64)}
            out.append(self.session.run(None, {name: feed[name] for name in self.input_names})[0])
        if not out:
            return np.zeros((0, self.get_embedding_dimension()), dtype=np.float32)
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


def export_sentence_encoder(name: str, directory: str | Path) -> Path:
    """Export a sentence-transformers encoder (transformer, pooling, normalisation) to ONNX and check it against torch."""
    import torch

    from fsserve.demos.encoder import load_encoder
    from fsserve.demos.graph_encoder import PooledEncoder, pooling_mode

    model = load_encoder(name, "cpu")
    transformer = model[0].auto_model.eval()
    tokenizer = model.tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"the encoder {name!r} has no fast tokenizer (tokenizer.json): it cannot embed without torch")
    mode = pooling_mode(model)
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer.model_input_names]

    sample = tokenizer(list(_PROBES), padding=True, return_tensors="pt")
    args = tuple(sample[n] for n in names)
    axes = {n: {0: "batch_size", 1: "sequence_length"} for n in names} | {"sentence_embedding": {0: "batch_size"}}
    dim = int(model.get_embedding_dimension())
    with atomic_directory(directory) as tmp, torch.inference_mode():
        torch.onnx.export(PooledEncoder(transformer, mode).eval(), args, str(tmp / GRAPH), input_names=names, output_names=["sentence_embedding"],
                          dynamic_axes=axes, opset_version=17, do_constant_folding=True, dynamo=False)
        tokenizer.backend_tokenizer.save(str(tmp / TOKENIZER))
        write_json_atomic(tmp / CONFIG, {"name": name, "dim": dim, "pooling": mode, "max_seq_length": int(model.max_seq_length),
                                         "pad_token_id": int(tokenizer.pad_token_id), "pad_token": str(tokenizer.pad_token)})
        expected = model.encode(list(_PROBES), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        got = OnnxSentenceEncoder(tmp).encode(list(_PROBES))
        diff = float(np.abs(got - expected).max())
        if not diff < EXPORT_ATOL:
            raise ValueError(f"the ONNX encoder of {name!r} differs from sentence-transformers by {diff:.2g} (>= {EXPORT_ATOL}): not exported")
    logger.info("exported the sentence encoder %s to %s (max abs diff %.2g)", name, directory, diff)
    return Path(directory)
