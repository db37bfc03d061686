"""What ``fsserve bench`` times: the model and its graphs, and every backend as one callable.

Every backend is a :class:`BenchBackend` whose ``run(batch)`` takes the same padded int64 numpy
batch (``input_ids``, ``attention_mask``, ``answer_pos`` and maybe ``token_type_ids``) and returns
(B, num_labels) float32 label logits, so the bench feeds all of them the same inputs:

- ``transformers``: the baseline a user would write: the HF model's forward (vocabulary logits at
  every position), then the label words' logits at the answer position, averaged per class;
- ``torch``: fsserve's torch backend (label rows only; the fused op's torch reference on CPU);
- ``torch-triton``: the same on CUDA with the Triton label-logit kernel (``torch`` on CUDA then
  runs the plain torch head, so the two show what the kernel adds);
- ``onnx-fp32`` / ``onnx-int8``: fsserve's onnxruntime backend on the CPU provider;
- ``onnx-cuda`` / ``onnx-tensorrt``: the fp32 graph on the CUDA / TensorRT providers.

A backend this machine cannot run is reported with the reason, never silently dropped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fsserve.bench.memory import LoadMemory

logger = logging.getLogger(__name__)

BASELINE = "transformers"
ALL_BACKENDS = ("transformers", "torch", "torch-triton", "torch-graphs", "torch-graphs-compile", "onnx-fp32", "onnx-int8", "onnx-cuda",
                "onnx-tensorrt")
CPU_DEFAULT = ("transformers", "torch", "onnx-fp32", "onnx-int8")
GPU_DEFAULT = ("transformers", "torch", "torch-triton", "torch-graphs", "torch-graphs-compile", "onnx-cuda", "onnx-tensorrt")
_GPU_ONLY = {"torch-triton", "torch-graphs", "torch-graphs-compile", "onnx-cuda", "onnx-tensorrt"}
# torch.compile inside the captured graphs: the graphs are ours, so compile must not add its own.
GRAPH_COMPILE_MODE = "default"  # max-autotune compiles each bucket for minutes: past a GPU check's budget
VALIDATION_ATOL = 1e-2
_PROVIDER = {"onnx-cuda": "CUDAExecutionProvider", "onnx-tensorrt": "TensorrtExecutionProvider"}


@dataclass
class BenchBackend:
    """One way to compute label logits, with what its weights cost in memory.

    >>> backend = BenchBackend("numpy", lambda batch: np.zeros((len(batch["answer_pos"]), 2), np.float32), "cpu", 1.0)
    >>> backend.run({"answer_pos": np.zeros(3, np.int64)}).shape
    (3, 2)
    """

    name: str
    run: Callable[[dict[str, np.ndarray]], np.ndarray]
    device: str
    load_mb: float
    detail: str = ""
    sync: Callable[[], None] = field(default=lambda: None)


@dataclass
class Subject:
    """The model under test (torch), its fp32/int8 graphs, and where they came from."""

    model: Any
    source: str
    load_mb: float
    graphs: dict[str, Path] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)


# -- the subject ----------------------------------------------------------------------------
def _folder_key(path: Path) -> str:
    """A cheap identity of a saved model folder (names, sizes, mtimes), to key its cached graphs."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _default_prompt(source: str) -> Any:
    """SST-2's manual prompt (rewritten for decoders), for a bare LM name such as ``embedded``."""
    from transformers import AutoConfig

    from fsserve.config import PromptConfig
    from fsserve.data import get_task
    from fsserve.embedded import resolve_model_path
    from fsserve.modeling import detect_kind
    from fsserve.prompts import decoder_template

    task = get_task("SST-2")
    kind = detect_kind(AutoConfig.from_pretrained(resolve_model_path(source)))
    template = decoder_template(task.template) if kind == "causal" else task.template
    return PromptConfig(template=template, label_words=dict(task.label_words), labels=list(task.labels))


def _load_model(source: str | Path) -> tuple[Any, dict[str, Path], dict[str, Any], str]:
    """The PromptModel of a bundle, saved folder or LM name, the graphs it comes with, notes, and a cache key."""
    from fsserve.modeling import MODEL_CONFIG, PromptModel

    path = Path(source)
    if (path / "manifest.json").is_file():
        from fsserve.bundle import read_bundle_config

        manifest = read_bundle_config(path)["manifest"]
        if not manifest.get("torch"):
            raise ValueError(f"{path} carries no torch weights, which the transformers baseline needs: export it without --no-torch-weights")
        notes = {"bundle": {k: manifest.get(k) for k in ("precision", "model_name", "agreement_with_fp32", "quantization", "optimization")}}
        model = PromptModel.from_pretrained(path / manifest["torch"])
        return model, {str(manifest["precision"]): path / manifest["graph"]}, notes, str(manifest["manifest_sha256"])[:16]
    if (path / MODEL_CONFIG).is_file():
        return PromptModel.from_pretrained(path), {}, {}, _folder_key(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file; give a bundle folder, a saved model folder or an LM name")
    model = PromptModel.from_pretrained(str(source), prompt=_default_prompt(str(source)))
    return model, {}, {}, hashlib.sha256(f"{source}:{model.prompt_config.to_json()}".encode()).hexdigest()[:16]


def load_subject(source: str | Path, cache_dir: Path) -> Subject:
    """Load the torch model of a bundle, a saved model folder or a bare LM name (with SST-2's prompt)."""
    import torch
    import transformers

    # Import the model classes before measuring, so load_mb counts weights rather than Python modules.
    _ = (transformers.AutoModelForCausalLM, transformers.AutoModelForMaskedLM, transformers.AutoTokenizer)
    with LoadMemory() as loading:
        model, graphs, notes, key = _load_model(source)
        if model.method != "prompt":
            raise ValueError(f"{source} is a fine-tuned classification-head model; the bench compares label-word (prompt) models")
        model.eval()
        with torch.no_grad():  # fault in mmap-loaded weights now, so they count as load_mb, not as the first call's peak
            for param in model.parameters():
                param.detach().sum()
    subject = Subject(model, str(source), max(loading.mb, 1e-3), graphs, notes)
    subject.notes["cache"] = str(cache_dir / key)
    return subject


def _atomic_graph(target: Path, write: Callable[[Path], Any]) -> Any:
    """Write a graph through a temporary file in the same folder and rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        result = write(Path(tmp))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return result


def ensure_graphs(subject: Subject, need_int8: bool, int8_mode: str = "dynamic", per_channel: bool = False,
                  exclude_op_types: tuple[str, ...] = (), only_nodes: tuple[str, ...] = ()) -> dict[str, Path]:
    """Make the fp32 graph (exported, validated) and the int8 graph (quantised) the bench needs, cached by model identity."""
    from fsserve.exporters import onnx as ox

    cache = Path(subject.notes["cache"])
    model = subject.model
    if "fp32" not in subject.graphs:
        fp32 = cache / "fp32.onnx"
        if not fp32.is_file():
            logger.info("exporting the fp32 label-logits graph to %s", fp32)

            def export(tmp: Path) -> dict[str, Any]:
                ox.export_graph(model, tmp)
                ox.optimize_graph(tmp, model)
                # A loose bound: this only guards against a broken trace; the bench itself reports every
                # backend's largest difference from the baseline on the timed inputs.
                return ox.validate_graph(model, tmp, atol=VALIDATION_ATOL, batch_sizes=(1, 3), lengths=(5, 13))

            subject.notes["fp32_validation"] = _atomic_graph(fp32, export)
        subject.graphs["fp32"] = fp32
    recipe = (f"{int8_mode}{'-pc' if per_channel else ''}{''.join('-no' + op for op in exclude_op_types)}"
              f"{''.join('-only-' + re.sub(r'[^A-Za-z0-9_]', '_', n) for n in only_nodes)}")
    wanted = {"mode": int8_mode, "per_channel": per_channel, "excluded": list(exclude_op_types)} | ({"only_nodes": list(only_nodes)} if only_nodes else {})
    bundled = subject.notes.get("bundle", {})
    if int8_mode == "per-token":
        # Per-token int8 is calibrated on the task's training texts, which only `fsserve export` is given.
        if need_int8 and (bundled.get("quantization") or {}).get("mode") != "per-token":
            raise ValueError("--int8-mode per-token benches the int8 graph of a bundle exported with it: run `fsserve export MODEL BUNDLE "
                             "--quantize int8 --calibration-file TRAIN --with-torch` and bench that bundle")
        subject.notes["int8_recipe"] = bundled["quantization"] if need_int8 else {"mode": "per-token"}
        return subject.graphs
    same_recipe = bundled.get("quantization") in (None, wanted)
    if need_int8 and ("int8" not in subject.graphs or not same_recipe):
        int8 = cache / f"int8-{recipe}.onnx"
        if not int8.is_file():
            logger.info("quantising %s to int8 (%s) at %s", subject.graphs["fp32"], recipe, int8)
            _atomic_graph(int8, lambda tmp: ox.quantize_int8(subject.graphs["fp32"], tmp, int8_mode, per_channel, exclude_op_types, only_nodes))
        subject.graphs["int8"] = int8
    subject.notes["int8_recipe"] = wanted
    return subject.graphs


# -- the backends ---------------------------------------------------------------------------
def unavailable_reason(name: str, device: str) -> str | None:
    """Why this backend cannot run on this machine and device choice, or None when it can."""
    from fsserve.utils.device import cuda_available, triton_available

    if name not in ALL_BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose from {', '.join(ALL_BACKENDS)}")
    if name in _GPU_ONLY and not cuda_available():
        return "needs a CUDA GPU (none here)"
    if name == "torch-triton" and not triton_available():
        return "needs Triton (pip install 'fsserve[gpu]')"
    if name.startswith("onnx"):
        try:
            import onnxruntime as ort
        except ImportError:
            return "onnxruntime is not installed"
        provider = _PROVIDER.get(name)
        if provider and provider not in ort.get_available_providers():
            return f"this onnxruntime has no {provider} (it has {ort.get_available_providers()}); install onnxruntime-gpu"
    if name in ("transformers", "torch") and device.startswith("cuda") and not cuda_available():
        return "needs a CUDA GPU (none here)"
    return None


def _dtype_name(model: Any) -> str:
    """The torch model's weight dtype, as the table shows it (``float32``, ``bfloat16``)."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def _tensors(batch: dict[str, np.ndarray], device: str) -> dict[str, Any]:
    """The numpy batch as int64 torch tensors on the device."""
    import torch

    return {k: torch.as_tensor(np.ascontiguousarray(v), dtype=torch.long, device=device) for k, v in batch.items()}


def transformers_baseline(model: Any, device: str, chunk: Callable[[int, int], int] | None = None) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """The plain-transformers way: ``lm(**inputs).logits`` (B × seq × vocab), then the label words at the answer.

    ``chunk(batch_size, seq_len)`` gives the rows per forward: where a whole batch's vocabulary logits
    would not fit in memory, the batch goes through in slices, as a user of plain transformers would.
    """
    import torch

    lm = model.lm
    word_ids = torch.tensor(model.prompt.label_word_ids, dtype=torch.long, device=device)
    word_to_class = torch.tensor(model.prompt.word_to_class, dtype=torch.long, device=device)
    num_labels = len(model.labels)
    counts = torch.bincount(word_to_class, minlength=num_labels).clamp(min=1).float()
    uses_types = model.uses_token_types

    @torch.inference_mode()
    def run(batch: dict[str, np.ndarray]) -> np.ndarray:
        size, width = batch["input_ids"].shape
        step = chunk(size, width) if chunk is not None else size
        if step < size:
            return np.concatenate([run_rows({k: v[i : i + step] for k, v in batch.items()}) for i in range(0, size, step)])
        return run_rows(batch)

    def run_rows(batch: dict[str, np.ndarray]) -> np.ndarray:
        """One forward over these rows."""
        t = _tensors(batch, device)
        kwargs = {"input_ids": t["input_ids"], "attention_mask": t["attention_mask"]}
        if uses_types and "token_type_ids" in t:
            kwargs["token_type_ids"] = t["token_type_ids"]
        logits = lm(**kwargs).logits
        rows = torch.arange(logits.shape[0], device=logits.device)
        words = logits[rows, t["answer_pos"]][:, word_ids].float()
        scores = torch.zeros(words.shape[0], num_labels, device=words.device).index_add_(1, word_to_class, words)
        return (scores / counts).cpu().numpy()

    return run


def baseline_rows(model: Any, device: str) -> Callable[[int, int], int]:
    """How many rows the baseline can put through one forward: all, unless their vocabulary logits would not fit."""

    def rows(batch_size: int, seq_len: int) -> int:
        vocab = int(model.lm.get_output_embeddings().weight.shape[0])
        per_row = 2.2 * seq_len * vocab * 4  # float32 logits, plus the copy a soft-capping model makes
        if device.startswith("cuda"):
            import torch

            free = float(torch.cuda.mem_get_info()[0])
        else:
            import psutil

            free = float(psutil.virtual_memory().available)
        return max(1, min(batch_size, int(0.7 * free // per_row)))

    return rows


def build_backend(name: str, subject: Subject, device: str, threads: int | None, spinning: bool = True, trt_cache: Path | None = None) -> BenchBackend:
    """Construct one backend (loading its session where it has one) and measure what loading it cost."""
    model = subject.model
    if name.startswith(("transformers", "torch")):
        import torch

        from fsserve.runtime.torch import TorchBackend

        torch_device = "cuda" if name in _GPU_ONLY else device
        sync = torch.cuda.synchronize if torch_device.startswith("cuda") else (lambda: None)
        if name == "transformers":
            model.to(torch_device)
            run = transformers_baseline(model, torch_device, baseline_rows(model, torch_device))
            return BenchBackend(name, run, torch_device, subject.load_mb, f"HF forward, full logits, {_dtype_name(model)}", sync)
        if name.startswith("torch-graphs"):
            return _graph_backend(name, subject, sync)
        runner = TorchBackend(model, device=torch_device)
        fused = torch_device == "cpu" or name == "torch-triton"

        def run(batch: dict[str, np.ndarray]) -> np.ndarray:
            model.use_fused_head = fused  # shared model: each backend sets the head it measures
            return runner.label_logits(**batch)

        detail = "Triton label-logit kernel" if name == "torch-triton" else ("fused op, torch reference" if fused else "torch head")
        return BenchBackend(name, run, torch_device, subject.load_mb, f"{detail}, {_dtype_name(model)}", sync)
    import onnxruntime  # noqa: F401  (imported before measuring, so load_mb counts the session)

    from fsserve.runtime.onnx import OnnxBackend

    precision = "int8" if name == "onnx-int8" else "fp32"
    ort_device = {"onnx-cuda": "cuda", "onnx-tensorrt": "tensorrt"}.get(name, "cpu")
    kwargs: dict[str, Any] = {"intra_op_num_threads": threads} if threads else {}
    if not spinning:
        kwargs["session_config"] = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}
    if ort_device == "tensorrt" and trt_cache is not None:
        kwargs["trt_cache_dir"] = trt_cache
    with LoadMemory() as loading:
        runner = OnnxBackend(subject.graphs[precision], device=ort_device, **kwargs)
    return BenchBackend(name, lambda batch: runner.label_logits(**batch), runner.device, max(loading.mb, 1e-3), f"{precision} graph, {runner.session.get_providers()[0]}")


def _graph_backend(name: str, subject: Subject, sync: Callable[[], None]) -> BenchBackend:
    """The CUDA-graph backend on the subject's model (its dtype as the bench set it), the Triton head captured inside."""
    from fsserve.runtime.graphs import GraphBackend
    from fsserve.utils.device import triton_available

    model = subject.model
    model.use_fused_head = triton_available()
    compile_mode = GRAPH_COMPILE_MODE if name == "torch-graphs-compile" else None
    runner = GraphBackend(model, device="cuda", dtype=None, compile=compile_mode)
    fused = model.use_fused_head

    def run(batch: dict[str, np.ndarray]) -> np.ndarray:
        model.use_fused_head = fused  # the head a bucket's graph records on its first (capturing) call
        return runner.label_logits(**batch)

    head = "Triton head" if fused else "torch head"
    detail = f"CUDA graphs per bucket, {head}{', torch.compile ' + compile_mode if compile_mode else ''}, {_dtype_name(model)}"
    return BenchBackend(name, run, "cuda", subject.load_mb, detail, sync)
