"""Predictor: prompt + demonstrations + batching + a backend → labels and probabilities.

The loading dispatch lives here: a saved model folder (torch), a bundle on onnxruntime (no torch
at all: the bundle's tokenizer.json, prompt, demonstration pool and graph), or a bundle's torch copy;
prompt ensembles get an :class:`EnsemblePredictor`. Kept free of torch at import time: torch, the
model and the ensemble classes are imported only when the torch backend is asked for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fsserve.bundle import TOKENIZER_DIR, TORCH_DIR, BundleError, BundleTokenizer, read_bundle_config, verify_bundle
from fsserve.config import DemoConfig, PromptConfig
from fsserve.demos.index import DemoIndex
from fsserve.demos.prompting import demo_encoder
from fsserve.prompts import Prompt
from fsserve.prompts.plain import encode_plain
from fsserve.runtime.onnx import OnnxBackend

logger = logging.getLogger(__name__)

# Options only the CUDA-graph backend takes, and all the torch backends' own (refused for onnx).
GRAPH_OPTIONS = frozenset({"batch_buckets", "seq_buckets", "warmup", "compile"})
TORCH_OPTIONS = GRAPH_OPTIONS | {"cuda_graphs", "dtype"}


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis (float64 inside, float32 out)."""
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def pad_batch(encoded: Sequence[Any], pad_token_id: int, with_token_types: bool) -> dict[str, np.ndarray]:
    """Right-pad encoded prompts into int64 arrays: input_ids, attention_mask, answer_pos (+ token_type_ids)."""
    width = max(len(e.input_ids) for e in encoded)
    ids = np.full((len(encoded), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(encoded), width), dtype=np.int64)
    types = np.zeros((len(encoded), width), dtype=np.int64)
    answer = np.empty(len(encoded), dtype=np.int64)
    for i, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[i, :n] = e.input_ids
        mask[i, :n] = 1
        types[i, :n] = e.token_type_ids
        answer[i] = e.answer_pos
    batch = {"input_ids": ids, "attention_mask": mask, "answer_pos": answer}
    if with_token_types:
        batch["token_type_ids"] = types
    return batch


class Predictor:
    """Classify texts with a saved model or bundle, on the torch or onnxruntime backend.

    >>> predictor = Predictor.from_pretrained("runs/sst2")  # doctest: +SKIP
    >>> predictor.predict("A triumph.")  # doctest: +SKIP
    '1'
    >>> predictor.predict_proba(["A triumph.", "A mess."]).shape  # doctest: +SKIP
    (2, 2)
    """

    def __init__(
        self,
        backend: Any,
        encode: Any,
        labels: Sequence[str],
        pad_token_id: int,
        regression_range: Sequence[float] | None = None,
        num_sentences: int = 1,
        batch_size: int = 32,
        finetune_regression: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.backend = backend
        self.encode = encode
        self.labels = list(labels)
        self.pad_token_id = pad_token_id
        self.regression_range = list(regression_range) if regression_range else None
        self.num_sentences = num_sentences
        self.batch_size = batch_size
        self.finetune_regression = finetune_regression
        self.with_token_types = "token_type_ids" in getattr(backend, "input_names", [])

    @classmethod
    def from_pretrained(cls, path: str | Path, backend: str = "torch", device: str | None = None, batch_size: int = 32, **kwargs: Any) -> Predictor:
        """Load a saved model folder (torch) or an exported bundle (onnx or torch)."""
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"{path} is not a folder holding a saved fsserve model or bundle")
        if backend not in ("torch", "onnx"):
            raise ValueError(f"unknown backend {backend!r}: use 'torch' or 'onnx'")
        if (path / "manifest.json").is_file():
            return load_bundle_predictor(path, backend=backend, device=device, batch_size=batch_size, **kwargs)
        if backend == "onnx":
            raise ValueError(f"{path} is a saved model, not an exported bundle: run `fsserve export` first for the onnx backend")
        from fsserve.modeling import PromptModel

        model = PromptModel.from_pretrained(path)
        return cls.from_model(model, device=device, batch_size=batch_size, **kwargs)

    @classmethod
    def from_model(cls, model: Any, device: str | None = None, batch_size: int = 32, cuda_graphs: bool | None = None,
                   **kwargs: Any) -> Predictor:
        """Wrap an in-memory PromptModel (e.g. right after training), or a PromptEnsemble.

        On CUDA the model runs as captured CUDA graphs in bfloat16 (``cuda_graphs=False``: eager, in
        the model's dtype unless ``dtype`` says otherwise); ``kwargs`` go to the backend (``dtype``,
        ``batch_buckets``, ``seq_buckets``, ``warmup``, ``compile`` for the graphs; ``num_threads``).
        """
        if hasattr(model, "members"):
            return EnsemblePredictor.from_model(model, device=device, batch_size=batch_size, **kwargs)
        backend = torch_backend(model, device, cuda_graphs, max_rows=batch_size, **kwargs)
        cfg = model.prompt_config
        encode = model.encode
        if model.method == "prompt" and model.demo_index is not None:  # the bundle's encoder: LM-BFF's averaged draws included
            encode = demo_encoder(model.prompt, model.demo_index, model.demo_config)
        return cls(
            backend,
            encode,
            model.labels,
            model.pad_token_id,
            cfg.regression_range,
            model.prompt.template.num_sentences,
            batch_size,
            finetune_regression=model.head_outputs == 1,
        )

    # -- prediction -----------------------------------------------------------------------
    def _rows(self, texts: str | Sequence[Any], texts_b: str | Sequence[str] | None) -> tuple[list[Any], bool]:
        """Normalise the many accepted input shapes into a list of rows; remember if one str was given."""
        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        if texts_b is not None:
            seconds = [texts_b] if isinstance(texts_b, str) else list(texts_b)
            if len(seconds) != len(items):
                raise ValueError(f"got {len(items)} texts but {len(seconds)} texts_b")
            items = [(a, b) for a, b in zip(items, seconds)]
        elif self.num_sentences > 1:
            for item in items:
                if isinstance(item, str):
                    raise ValueError("this is a sentence-pair model: pass texts_b (or (text, text_b) tuples)")
        for item in items:
            parts = [item] if isinstance(item, str) else list(item) if isinstance(item, (tuple, list)) else [getattr(item, "text", None)]
            if not all(isinstance(p, str) and p.strip() for p in parts):
                raise ValueError(f"empty or non-string text in input: {item!r}")
        return items, single

    def label_logits(self, texts: str | Sequence[Any], texts_b: str | Sequence[str] | None = None) -> np.ndarray:
        """Raw (B, num_labels) label logits, batched by length."""
        rows, _ = self._rows(texts, texts_b)
        if not rows:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        encoded = self.encode(rows)  # several draws of demonstrations per row come as len(rows) * draws encodings
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
        out: np.ndarray | None = None
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = pad_batch([encoded[i] for i in idx], self.pad_token_id, self.with_token_types)
            logits = np.asarray(self.backend.label_logits(**batch), dtype=np.float32)
            if out is None:
                out = np.empty((len(encoded), logits.shape[1]), dtype=np.float32)
            out[idx] = logits
        assert out is not None
        return out.reshape(len(encoded) // len(rows), len(rows), -1).mean(axis=0)

    def _probs(self, logits: np.ndarray) -> np.ndarray:
        """Probabilities from logits (a sigmoid pair for a one-output regression head)."""
        if self.finetune_regression:
            high = 1.0 / (1.0 + np.exp(-logits[:, 0].astype(np.float64)))
            return np.stack([1 - high, high], axis=-1).astype(np.float32)
        return softmax(logits)

    def predict_proba(self, texts: str | Sequence[Any], texts_b: str | Sequence[str] | None = None) -> np.ndarray:
        """Class probabilities: (num_labels,) for one str, (B, num_labels) for a list."""
        _, single = self._rows(texts, texts_b)
        probs = self._probs(self.label_logits(texts, texts_b))
        return probs[0] if single else probs

    def predict(self, texts: str | Sequence[Any], texts_b: str | Sequence[str] | None = None) -> Any:
        """Predicted label (or regression value): one for a str, a list for a list."""
        _, single = self._rows(texts, texts_b)
        preds = self.labels_from_proba(self._probs(self.label_logits(texts, texts_b)))
        return preds[0] if single else preds

    def labels_from_proba(self, probs: np.ndarray) -> list[Any]:
        """Labels (or regression values) for (B, num_labels) probabilities, so callers need not run the model twice."""
        if self.regression_range:
            lo, hi = self.regression_range
            return [float(lo + (hi - lo) * p) for p in probs[:, 1]]
        return [self.labels[i] for i in probs.argmax(-1)]



def torch_backend(model: Any, device: str | None = None, cuda_graphs: bool | None = None, max_rows: int | None = None, **kwargs: Any) -> Any:
    """The torch backend for a model: CUDA graphs by default on a GPU, eager elsewhere or when asked.

    ``max_rows``: the most rows a call will carry (the Predictor's batch size): the graphs' batch
    buckets stop there unless ``batch_buckets`` names them.
    """
    from fsserve.utils.device import resolve_device

    resolved = resolve_device(device)
    on_cuda = resolved.startswith("cuda")
    if cuda_graphs and not on_cuda:
        raise ValueError(f"cuda_graphs=True needs a CUDA device, got device {resolved!r}")
    if on_cuda and cuda_graphs is not False:
        from fsserve.runtime.buckets import batch_buckets_up_to
        from fsserve.runtime.graphs import GraphBackend

        if max_rows is not None and kwargs.get("batch_buckets") is None:
            kwargs["batch_buckets"] = batch_buckets_up_to(max_rows)
        return GraphBackend(model, device=resolved, **kwargs)
    from fsserve.runtime.torch import TorchBackend

    graph_only = sorted(set(kwargs) & GRAPH_OPTIONS)
    if graph_only:
        raise ValueError(f"{', '.join(graph_only)} only apply to the CUDA-graph backend (device='cuda', cuda_graphs not False)")
    return TorchBackend(model, device=resolved, **kwargs)

class EnsemblePredictor(Predictor):
    """A Predictor whose backend takes P example-major rows per text and returns one row of logits per text.

    >>> predictor = Predictor.from_pretrained("bundles/sst2-ensemble", backend="onnx")  # doctest: +SKIP
    >>> predictor.predict("A triumph.")  # doctest: +SKIP
    '1'
    """

    def __init__(self, backend: Any, encoders: Sequence[Callable[[Sequence[Any]], list[Any]]], labels: Sequence[str], pad_token_id: int, num_sentences: int = 1, batch_size: int = 32) -> None:
        if not encoders:
            raise ValueError("an ensemble predictor needs at least one member prompt")
        super().__init__(backend, None, labels, pad_token_id, None, num_sentences, batch_size)
        self.encoders = list(encoders)

    @classmethod
    def from_model(cls, model: Any, device: str | None = None, batch_size: int = 32, **kwargs: Any) -> EnsemblePredictor:
        """Wrap an in-memory PromptEnsemble (fsserve.search.ensemble) with the torch backend."""
        from fsserve.runtime.torch import TorchBackend

        encoders = [m.prompt.encode for m in model.members]
        num_sentences = max(m.prompt.template.num_sentences for m in model.members)
        return cls(TorchBackend(model, device=device, **kwargs), encoders, model.labels, model.pad_token_id, num_sentences, batch_size)

    def label_logits(self, texts: str | Sequence[Any], texts_b: str | Sequence[str] | None = None) -> np.ndarray:
        """Ensemble (B, num_labels) logits: every text encoded by every prompt, batched by length."""
        rows, _ = self._rows(texts, texts_b)
        out = np.zeros((len(rows), len(self.labels)), dtype=np.float32)
        if not rows:
            return out
        per_prompt = [encode(rows) for encode in self.encoders]
        longest = [max(len(encoded[i].input_ids) for encoded in per_prompt) for i in range(len(rows))]
        order = sorted(range(len(rows)), key=longest.__getitem__)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            flat = [encoded[i] for i in idx for encoded in per_prompt]
            out[idx] = self.backend.label_logits(**pad_batch(flat, self.pad_token_id, self.with_token_types))
        return out


# -- loading bundles ----------------------------------------------------------------------
def load_bundle_predictor(path: str | Path, backend: str = "onnx", device: str | None = None, batch_size: int = 32, **kwargs: Any) -> Any:
    """Build a Predictor from a verified bundle: onnxruntime without torch, or the bundled torch model."""
    root = Path(path)
    config = read_bundle_config(root)
    if config.get("ensemble"):  # several prompts in one graph: each text is encoded once per prompt
        return load_ensemble_predictor(root, config, backend=backend, device=device, batch_size=batch_size, **kwargs)
    if backend == "torch":
        if not config["manifest"].get("torch"):
            raise BundleError(f"{root} carries no torch weights: export it with torch_weights=True to load it with backend='torch'")
        from fsserve.modeling import PromptModel

        return Predictor.from_model(PromptModel.from_pretrained(root / TORCH_DIR), device=device, batch_size=batch_size, **kwargs)
    if backend != "onnx":
        raise ValueError(f"unknown backend {backend!r}: use 'onnx' or 'torch'")
    encode, num_sentences = bundle_encoder(root, config, kwargs.get("intra_op_num_threads"))
    runner = OnnxBackend(root / config["manifest"]["graph"], device=device, **onnx_options(root, device, kwargs))
    prompt_config = PromptConfig.from_dict(config["prompt"])
    finetuned = config.get("method") == "finetune"
    return Predictor(runner, encode, config["labels"], int(config["pad_token_id"]), prompt_config.regression_range,
                     num_sentences, batch_size, finetune_regression=finetuned and prompt_config.is_regression)


def bundle_encoder(root: str | Path, config: dict[str, Any], num_threads: int | None = None) -> tuple[Callable[[Sequence[Any]], list[Any]], int]:
    """A (non-ensemble) bundle's ``encode(rows)`` and sentence count, torch-free and without its graph (Triton's preprocessing step reuses it).

    ``num_threads`` bounds the demonstration encoder's onnxruntime threads, as ``intra_op_num_threads`` does the graph's.
    """
    root = Path(root)
    tokenizer = BundleTokenizer.from_folder(root / TOKENIZER_DIR, config["tokenizer"])
    prompt_config = PromptConfig.from_dict(config["prompt"])
    prompt = Prompt(prompt_config, tokenizer, config["kind"])
    if prompt.label_word_ids != config["label_word_ids"]:
        raise BundleError(f"{root / TOKENIZER_DIR}: label words tokenize to {prompt.label_word_ids}, the graph was exported for {config['label_word_ids']}")
    encode = prompt.encode
    num_sentences = prompt.template.num_sentences
    if config.get("method") == "finetune":  # standard fine-tuning reads the plain text, not the prompt
        max_length = int(prompt_config.max_length)

        def encode(examples: Sequence[Any]) -> list[Any]:
            """Plain-text inputs, as the fine-tuned model was trained on."""
            return encode_plain(tokenizer, examples, num_sentences, max_length, config["kind"])
    if config["manifest"].get("demos"):
        demo_config = DemoConfig.from_dict((config.get("demos") or {}).get("config") or {})
        encode = demo_encoder(prompt, load_bundle_demos(root, num_threads), demo_config)
    return encode, num_sentences


def load_bundle_demos(path: str | Path, num_threads: int | None = None) -> Any:
    """The bundle's demonstration index (fsserve.demos.DemoIndex), or None when it has none; ``num_threads``: its ONNX encoder's."""
    root = Path(path)
    manifest = verify_bundle(root)
    if not manifest.get("demos"):
        return None
    return DemoIndex.load(root / manifest["demos"], num_threads=num_threads)


def load_ensemble_predictor(root: str | Path, config: dict[str, Any], backend: str = "onnx", device: str | None = None, batch_size: int = 32, **kwargs: Any) -> EnsemblePredictor:
    """Build the Predictor of a verified ensemble bundle (bundles whose fsserve.json has ``ensemble``)."""
    root = Path(root)
    if backend == "torch":
        if not config["manifest"].get("torch"):
            raise BundleError(f"{root} carries no torch weights: export it with torch_weights=True to load it with backend='torch'")
        from fsserve.search.ensemble import PromptEnsemble

        ensemble = PromptEnsemble.from_pretrained(root / config["manifest"]["torch"])
        return EnsemblePredictor.from_model(ensemble, device=device, batch_size=batch_size, **kwargs)
    if backend != "onnx":
        raise ValueError(f"unknown backend {backend!r}: use 'onnx' or 'torch'")
    tokenizer = BundleTokenizer.from_folder(root / TOKENIZER_DIR, config["tokenizer"])
    prompts = []
    for i, record in enumerate(config["ensemble"]["members"]):
        prompt = Prompt(PromptConfig.from_dict(record["prompt"]), tokenizer, config["kind"])
        if prompt.label_word_ids != record["label_word_ids"]:
            raise BundleError(f"{root / TOKENIZER_DIR}: member {i}'s label words tokenize to {prompt.label_word_ids}, the graph was exported for {record['label_word_ids']}")
        prompts.append(prompt)
    runner = OnnxBackend(root / config["manifest"]["graph"], device=device, **onnx_options(root, device, kwargs))
    num_sentences = max(p.template.num_sentences for p in prompts)
    return EnsemblePredictor(runner, [p.encode for p in prompts], config["labels"], int(config["pad_token_id"]), num_sentences, batch_size)


def trt_cache_dir(bundle: str | Path) -> Path:
    """Where TensorRT keeps the engines it builds for a bundle: beside it, so the bundle stays verified and portable."""
    root = Path(bundle).resolve()
    return root.parent / f"{root.name}.trt-cache"


def onnx_options(root: Path, device: str | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The OnnxBackend options for a bundle: TensorRT's engine cache beside it unless one is given."""
    options = dict(kwargs)
    torch_only = sorted(set(options) & TORCH_OPTIONS)
    if torch_only:
        raise ValueError(f"{', '.join(torch_only)} apply to the torch backend, not to onnx")
    if str(device or "").startswith("tensorrt") and options.get("trt_cache_dir") is None:
        options["trt_cache_dir"] = trt_cache_dir(root)
        options["trt_cache_dir"].mkdir(parents=True, exist_ok=True)
    return options
