"""Triton Python-backend models for the text repository: what fsserve's Predictor does around the graph.

``fsserve.exporters.triton_text`` writes an ensemble ``TEXT[, TEXT_B] → LABEL, PROBS`` of three
steps; the first and the last are the classes here (each repository folder's ``model.py`` imports
one of them as ``TritonPythonModel``, so fsserve must be installed in the Python environment Triton
runs them with; torch is not needed):

* :class:`Preprocess` — the bundle's tokenizer (tokenizer.json), prompt and, when the bundle has a
  pool, its demonstrations (``fsserve.predictor.bundle_encoder``, as the onnx Predictor), then the
  padded int tensors the ONNX graph takes (``input_ids``, ``attention_mask``, ``answer_pos`` and
  ``token_type_ids`` when the graph has it). Rows are padded to a multiple of ``pad_to_multiple``
  so Triton's dynamic batcher can merge requests of similar length in front of the graph.
* :class:`Postprocess` — the graph's label logits to PROBS (softmax, or the sigmoid pair of a
  fine-tuned regression head) and LABEL (the most probable label's name), as ``fsserve serve``.

A request whose texts fail fsserve's checks (``texts.decode_texts``) gets an error response with
the same message as from ``fsserve serve``; the other requests of its batch are answered.
``triton_python_backend_utils`` exists only inside Triton, so it is imported when a model is built.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fsserve.serving.texts import decode_texts

logger = logging.getLogger(__name__)

TEXT, TEXT_B, LABEL, PROBS = "TEXT", "TEXT_B", "LABEL", "PROBS"
BUNDLE_DIR = "bundle"  # inside the preprocessing model's version folder


def backend_utils() -> Any:
    """Triton's ``triton_python_backend_utils`` (only importable inside Triton's Python backend, or a stand-in)."""
    try:
        import triton_python_backend_utils
    except ImportError as exc:
        raise ImportError("triton_python_backend_utils is provided by Triton's Python backend; these models run inside Triton") from exc
    return triton_python_backend_utils


def model_parameters(config: dict[str, Any]) -> dict[str, str]:
    """The ``parameters`` of a model config (as Triton passes it, JSON) as plain strings."""
    return {key: str(value.get("string_value", "")) for key, value in (config.get("parameters") or {}).items()}


def _padded(batch: dict[str, np.ndarray], pad_token_id: int, multiple: int, max_length: int) -> dict[str, np.ndarray]:
    """Widen a padded batch to the next multiple of ``multiple`` (never past the longer of its width and max_length)."""
    width = batch["input_ids"].shape[1]
    target = min(-(-width // multiple) * multiple, max(width, max_length))
    if target == width:
        return batch
    out = {}
    for name, array in batch.items():
        if array.ndim == 2:
            array = np.pad(array, ((0, 0), (0, target - width)), constant_values=pad_token_id if name == "input_ids" else 0)
        out[name] = array
    return out


class Preprocess:
    """``TEXT`` (and ``TEXT_B``) → the graph's padded inputs, for one bundle (Triton's ``TritonPythonModel``).

    >>> model = Preprocess()  # doctest: +SKIP
    >>> model.initialize({"model_config": config_json, "model_repository": "repo/sst2_preprocess", "model_version": "1"})  # doctest: +SKIP
    """

    def initialize(self, args: dict[str, str]) -> None:
        """Load the bundle's encoder (verified: manifest and checksums) and read the output names and types."""
        from fsserve.bundle import read_bundle_config
        from fsserve.config import PromptConfig
        from fsserve.predictor import bundle_encoder

        self.utils = backend_utils()
        config = json.loads(args["model_config"])
        parameters = model_parameters(config)
        folder = Path(parameters.get("bundle") or Path(args["model_repository"]) / args["model_version"] / BUNDLE_DIR)
        bundle = read_bundle_config(folder)
        if bundle.get("ensemble"):
            raise ValueError(f"{folder} is a prompt-ensemble bundle; the Triton text repository serves single-prompt bundles (serve ensembles with fsserve serve)")
        self.encode, self.num_sentences = bundle_encoder(folder, bundle)
        self.pad_token_id = int(bundle["pad_token_id"])
        self.max_length = int(PromptConfig.from_dict(bundle["prompt"]).max_length)
        self.max_text_bytes = int(parameters.get("max_text_bytes", "8192"))
        self.pad_to_multiple = int(parameters.get("pad_to_multiple", "8"))
        if self.pad_to_multiple < 1 or self.max_text_bytes < 1:
            raise ValueError("pad_to_multiple and max_text_bytes must be positive integers")
        self.inputs = [TEXT, TEXT_B] if self.num_sentences > 1 else [TEXT]
        declared = [spec["name"] for spec in config["input"]]
        if declared != self.inputs:
            raise ValueError(f"{args['model_repository']}: config.pbtxt declares inputs {declared}, but this bundle takes {self.inputs}")
        self.dtypes = {spec["name"]: self.utils.triton_string_to_numpy(spec["data_type"]) for spec in config["output"]}
        logger.info("event=triton_preprocess_ready bundle=%s outputs=%s sentences=%d", folder, list(self.dtypes), self.num_sentences)

    def _texts(self, request: Any, name: str) -> list[str]:
        """One input's texts, checked as fsserve serve checks them (ValueError naming the problem)."""
        tensor = self.utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            raise ValueError(f"input {name!r} is missing; this model takes {', '.join(self.inputs)}")
        items = [item if isinstance(item, bytes) else str(item).encode("utf-8") for item in tensor.as_numpy().reshape(-1)]
        return decode_texts(name, items, self.max_text_bytes)

    def _rows(self, request: Any) -> list[Any]:
        """A request's rows: texts, or (text, text_b) pairs for a sentence-pair bundle."""
        texts = self._texts(request, TEXT)
        if self.num_sentences == 1:
            return texts
        seconds = self._texts(request, TEXT_B)
        if len(seconds) != len(texts):
            raise ValueError(f"TEXT has {len(texts)} rows but TEXT_B has {len(seconds)}")
        return list(zip(texts, seconds))

    def _response(self, encoded: Sequence[Any]) -> Any:
        """The response carrying one request's padded tensors, in the config's output types."""
        from fsserve.predictor import pad_batch

        batch = pad_batch(list(encoded), self.pad_token_id, "token_type_ids" in self.dtypes)
        batch = _padded(batch, self.pad_token_id, self.pad_to_multiple, self.max_length)
        batch["answer_pos"] = batch["answer_pos"].reshape(-1, 1)  # dims [1]: the ONNX model reshapes it back to one per row
        return self.utils.InferenceResponse(output_tensors=[self.utils.Tensor(name, batch[name].astype(dtype)) for name, dtype in self.dtypes.items()])

    def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request: the rows of every valid request are encoded in one pass, then padded per request."""
        answers: list[Any] = [None] * len(requests)
        valid: list[tuple[int, list[Any]]] = []
        for k, request in enumerate(requests):
            try:
                valid.append((k, self._rows(request)))
            except ValueError as exc:
                answers[k] = self._error(str(exc))
        for k, encoded in self._encode(valid, answers):
            answers[k] = self._response(encoded)
        return answers

    def _error(self, message: str) -> Any:
        """A response that fails one request with ``message``."""
        return self.utils.InferenceResponse(output_tensors=[], error=self.utils.TritonError(message))

    def _encode(self, valid: list[tuple[int, list[Any]]], answers: list[Any]) -> list[tuple[int, list[Any]]]:
        """Each valid request's encoded rows: one pass for all, or, if that fails, request by request (failures answered)."""
        try:
            encoded = self.encode([row for _, rows in valid for row in rows]) if valid else []
        except Exception:  # noqa: BLE001 - one bad request must not fail the batch
            logger.warning("event=batch_encode_failed requests=%d retry=one_by_one", len(valid))
            parts = []
            for k, rows in valid:
                try:
                    parts.append((k, self.encode(rows)))
                except Exception as exc:  # noqa: BLE001 - answered as this request's error
                    answers[k] = self._error(f"could not encode the texts: {type(exc).__name__}: {exc}")
            return parts
        parts, offset = [], 0
        for k, rows in valid:
            parts.append((k, encoded[offset : offset + len(rows)]))
            offset += len(rows)
        return parts

    def finalize(self) -> None:
        """Nothing to release: the tokenizer, prompt and index go with the process."""
        logger.info("event=triton_preprocess_unloaded")


class Postprocess:
    """The graph's label logits → ``LABEL`` and ``PROBS``, as fsserve serve answers (Triton's ``TritonPythonModel``).

    >>> model = Postprocess()  # doctest: +SKIP
    >>> model.initialize({"model_config": config_json})  # doctest: +SKIP
    """

    def initialize(self, args: dict[str, str]) -> None:
        """Read the label names and the probability function from the config's parameters."""
        self.utils = backend_utils()
        config = json.loads(args["model_config"])
        parameters = model_parameters(config)
        self.labels: list[str] = json.loads(parameters.get("labels", "[]"))
        self.function = parameters.get("probabilities", "softmax")
        if not self.labels or self.function not in ("softmax", "sigmoid"):
            raise ValueError("the postprocessing config needs parameters 'labels' (a JSON list) and 'probabilities' (softmax or sigmoid)")
        (self.logits_name,) = [spec["name"] for spec in config["input"]]

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """(rows × labels) probabilities: softmax, or (1 − σ, σ) of a one-output regression head."""
        from fsserve.predictor import softmax

        logits = np.asarray(logits, dtype=np.float32)
        if self.function == "sigmoid":
            high = 1.0 / (1.0 + np.exp(-logits[:, 0].astype(np.float64)))
            return np.stack([1 - high, high], axis=-1).astype(np.float32)
        return softmax(logits)

    def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request: LABEL ([rows, 1] label names) and PROBS ([rows, labels] float32)."""
        answers = []
        for request in requests:
            probs = self.probabilities(self.utils.get_input_tensor_by_name(request, self.logits_name).as_numpy())
            names = np.array([[self.labels[i].encode("utf-8")] for i in probs.argmax(axis=-1)], dtype=np.object_).reshape(-1, 1)
            answers.append(self.utils.InferenceResponse(output_tensors=[self.utils.Tensor(LABEL, names), self.utils.Tensor(PROBS, probs)]))
        return answers

    def finalize(self) -> None:
        """Nothing to release."""
