"""ServedModel: one loaded Predictor with its batcher, its KServe metadata and its readiness."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fsserve.serving.batcher import DynamicBatcher
from fsserve.serving.config import ServerConfig
from fsserve.serving.tensors import LABEL, PROBS, TEXT, TEXT_B

logger = logging.getLogger(__name__)

VERSION = "1"


@dataclass(frozen=True)
class TensorSpec:
    """Name, datatype and shape (-1: any size) of one model input or output, as ModelMetadata reports it."""

    name: str
    datatype: str
    shape: tuple[int, ...]


class ServedModel:
    """A model under a name, answering classification requests through its own dynamic batcher.

    >>> model = ServedModel.load("sst2", "runs/sst2", ServerConfig(models={"sst2": "runs/sst2"}))  # doctest: +SKIP
    >>> [spec.name for spec in model.inputs]  # doctest: +SKIP
    ['TEXT']
    """

    def __init__(self, name: str, predictor: Any, config: ServerConfig, platform: str = "fsserve_torch", metrics: Any = None) -> None:
        self.name = name
        self.predictor = predictor
        self.platform = platform
        self.version = VERSION
        self.labels: list[str] = list(predictor.labels)
        self.num_sentences = int(getattr(predictor, "num_sentences", 1))
        self.max_rows = config.max_batch_size
        self.batcher = DynamicBatcher(
            self._predict_proba, config.max_batch_size, config.max_queue_delay_ms, config.max_queue_size, metrics=metrics, model=name
        )
        self.ready = False

    @classmethod
    def load(cls, name: str, path: str | Path, config: ServerConfig, metrics: Any = None) -> ServedModel:
        """Load a saved model folder or an exported bundle; ``backend="auto"`` picks onnx for bundles, torch otherwise."""
        from fsserve.predictor import Predictor

        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"model {name!r}: {path} is not a folder holding a saved fsserve model or bundle")
        backend = config.backend
        if backend == "auto":
            backend = "onnx" if (path / "manifest.json").is_file() else "torch"
        start = time.perf_counter()
        predictor = Predictor.from_pretrained(path, backend=backend, device=config.device, batch_size=config.max_batch_size)
        logger.info("event=model_loaded model=%s path=%s backend=%s labels=%d seconds=%.2f", name, path, backend, len(predictor.labels), time.perf_counter() - start)
        return cls(name, predictor, config, platform=f"fsserve_{backend}", metrics=metrics)

    @property
    def inputs(self) -> list[TensorSpec]:
        """TEXT (and TEXT_B for sentence-pair models): one UTF-8 string per row."""
        names = [TEXT, TEXT_B] if self.num_sentences > 1 else [TEXT]
        return [TensorSpec(n, "BYTES", (-1,)) for n in names]

    @property
    def outputs(self) -> list[TensorSpec]:
        """LABEL (the predicted label name per row) and PROBS (one probability per label per row)."""
        return [TensorSpec(LABEL, "BYTES", (-1,)), TensorSpec(PROBS, "FP32", (-1, len(self.labels)))]

    def _predict_proba(self, texts: list[str], texts_b: list[str] | None) -> np.ndarray:
        """Run the predictor on one batch (called in the batcher's model thread)."""
        return np.asarray(self.predictor.predict_proba(texts, texts_b), dtype=np.float32)

    async def start(self) -> None:
        """Start the batcher; the model is ready from then on."""
        await self.batcher.start()
        self.ready = True

    async def classify(self, texts: list[str], texts_b: list[str] | None = None, timeout: float | None = None) -> np.ndarray:
        """Probabilities (rows × labels) for one request, batched with whatever else is in flight."""
        return await self.batcher.submit(texts, texts_b, timeout)

    async def stop(self) -> None:
        """Answer everything queued, then stop the batcher; the model is no longer ready."""
        self.ready = False
        await self.batcher.close()
