"""The CUDA-graph torch backend: one captured graph per (batch bucket × sequence bucket), replayed per call.

Eager PyTorch launches every small kernel of every layer from Python, so a small model on a large
GPU waits on the host (RESULTS.md: ~23 ms per call on an H100 for Gemma 3 270M, whatever the batch).
A CUDA graph records those launches once and replays them in one call. Graphs need static shapes
and static memory, so each call is padded up to a bucket (:mod:`fsserve.runtime.buckets`), its
inputs are copied into that bucket's static buffers, the graph is replayed, and the real rows are
read from the static output. The whole forward is inside the graph, the label head too (the
Triton kernel where Triton runs; the fused op skips its host-side checks while capturing).

Graphs are captured lazily, on a bucket's first use, or all at once with :meth:`GraphBackend.warmup`;
they share one memory pool. Calls are serialised by a lock: the static buffers are shared.

On a CPU the same backend runs the same buckets eagerly (no capture): the CPU twin that tests the
padding, splitting and un-padding every GPU call goes through.

>>> backend = GraphBackend(PromptModel.from_pretrained("runs/sst2"), device="cuda")  # doctest: +SKIP
>>> backend.label_logits(input_ids, attention_mask, answer_pos).shape  # doctest: +SKIP
(2, 2)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fsserve.config import GRAPH_COMPILE_MODES as COMPILE_MODES
from fsserve.runtime.buckets import BucketPlan, pad_to_shape
from fsserve.utils.device import resolve_device, resolve_dtype

logger = logging.getLogger(__name__)


@dataclass
class _Captured:
    """One bucket's graph (None on a CPU) with the static tensors it reads and writes."""

    graph: Any
    inputs: dict[str, torch.Tensor]
    output: torch.Tensor


class GraphBackend:
    """Run ``label_logits`` through CUDA graphs captured per bucket (eagerly per bucket on a CPU).

    ``dtype``: ``"auto"`` (bfloat16 on CUDA, float32 on a CPU), a dtype name, or None to keep the
    model's. ``compile``: a ``torch.compile`` mode to compile the forward with before capture
    (``"max-autotune-no-cudagraphs"``: the graphs are ours), or None.
    """

    name = "torch-graphs"

    def __init__(
        self,
        model: Any,
        device: str | None = None,
        dtype: str | torch.dtype | None = "auto",
        batch_buckets: Sequence[int] | None = None,
        seq_buckets: Sequence[int] | None = None,
        warmup: bool = False,
        compile: str | None = None,
        num_threads: int | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.capture = self.device.startswith("cuda")
        if num_threads:
            torch.set_num_threads(int(num_threads))
        if compile is not None and compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)} or None, got {compile!r}")
        target = resolve_dtype(dtype, self.device) if dtype is not None else next(model.parameters()).dtype
        self.model = model.to(device=self.device, dtype=target).eval()
        self.dtype = target
        defaults = BucketPlan()
        plan = BucketPlan(batch_buckets or defaults.batch, seq_buckets or defaults.seq)
        self.plan = plan.covering(int(model.prompt_config.max_length))
        self.pad_token_id = int(model.pad_token_id)
        self.num_labels = int(model.head_outputs)
        self.uses_token_types = bool(model.uses_token_types)
        self.input_names = ["input_ids", "attention_mask", "answer_pos"] + (["token_type_ids"] if self.uses_token_types else [])
        self.forward = torch.compile(model.forward, mode=compile) if compile else model.forward
        self.graphs: dict[tuple[int, int], _Captured] = {}
        self._pool: Any = None
        self._lock = threading.Lock()
        self.graph_memory_bytes = 0
        if warmup:
            self.warmup()

    # -- capture --------------------------------------------------------------------------
    def warmup(self, shapes: Sequence[tuple[int, int]] | None = None) -> None:
        """Capture the graphs of ``shapes`` (default: every bucket) now, so no call pays for a capture."""
        if not self.capture:
            return
        with self._lock:
            for shape in shapes or self.plan.shapes:
                if shape not in self.graphs:
                    self._capture(*shape)

    def _static_inputs(self, rows: int, length: int) -> dict[str, torch.Tensor]:
        """Buffers for one bucket, filled with a valid batch (every token attended, answer at 0)."""
        long = {"dtype": torch.long, "device": self.device}
        inputs = {"input_ids": torch.full((rows, length), self.pad_token_id, **long), "attention_mask": torch.ones((rows, length), **long),
                  "answer_pos": torch.zeros(rows, **long)}
        if self.uses_token_types:
            inputs["token_type_ids"] = torch.zeros((rows, length), **long)
        return inputs

    @torch.inference_mode()
    def _capture(self, rows: int, length: int) -> _Captured:
        """Warm the forward up on a side stream (lazy inits, Triton compiles), then record it into a graph."""
        inputs = self._static_inputs(rows, length)
        # Cached blocks the warm-up passes leave behind are reusable by anything; only what the
        # graphs' private pool keeps counts as graph memory (the first H200 run counted both: 1418 MiB).
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.forward(**inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = self.forward(**inputs)
        captured = _Captured(graph, inputs, output)
        self.graphs[(rows, length)] = captured
        torch.cuda.empty_cache()
        self.graph_memory_bytes += max(0, torch.cuda.memory_reserved(self.device) - before)
        logger.info("captured the %d × %d graph (%.1f MiB reserved so far)", rows, length, self.graph_memory_bytes / 2**20)
        return captured

    # -- calls ----------------------------------------------------------------------------
    def label_logits(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, answer_pos: np.ndarray, token_type_ids: np.ndarray | None = None
    ) -> np.ndarray:
        """Return (B, num_labels) float32 label logits for one right-padded batch of any size."""
        batch = {"input_ids": np.asarray(input_ids, dtype=np.int64), "attention_mask": np.asarray(attention_mask, dtype=np.int64),
                 "answer_pos": np.asarray(answer_pos, dtype=np.int64)}
        if token_type_ids is not None and self.uses_token_types:
            batch["token_type_ids"] = np.asarray(token_type_ids, dtype=np.int64)
        rows, width = batch["input_ids"].shape
        if batch["attention_mask"].shape != (rows, width) or batch["answer_pos"].shape != (rows,):
            raise ValueError(f"input_ids {batch['input_ids'].shape}, attention_mask {batch['attention_mask'].shape} and "
                             f"answer_pos {batch['answer_pos'].shape} do not describe one batch")
        if rows and ((batch["answer_pos"] < 0) | (batch["answer_pos"] >= width)).any():
            raise ValueError(f"answer_pos must hold one position in [0, {width}) per row, got {batch['answer_pos'].tolist()}")
        out = np.empty((rows, self.num_labels), dtype=np.float32)
        with self._lock:
            for part in self.plan.chunks(rows):
                size = part.stop - part.start
                shape = self.plan.shape(size, width)
                padded = pad_to_shape({k: v[part] for k, v in batch.items()}, *shape, self.pad_token_id)
                out[part] = self._run(shape, padded)[:size]
        return out

    @torch.inference_mode()
    def _run(self, shape: tuple[int, int], padded: dict[str, np.ndarray]) -> np.ndarray:
        """One bucket-shaped batch through the bucket's static buffers: a graph replay, or an eager forward on a CPU."""
        bucket = self.graphs.get(shape) or self._bucket(*shape)
        for name, buffer in bucket.inputs.items():
            buffer.copy_(torch.from_numpy(padded[name]))
        if bucket.graph is not None:
            bucket.graph.replay()
        else:  # the CPU twin: the same buffers, so the same copy-in, run, read-out as a replay
            bucket.output.copy_(self.forward(**bucket.inputs))
        return bucket.output.float().cpu().numpy()

    def _bucket(self, rows: int, length: int) -> _Captured:
        """A bucket met for the first time: its graph on CUDA, its static buffers alone on a CPU."""
        if self.capture:
            return self._capture(rows, length)
        bucket = _Captured(None, self._static_inputs(rows, length), torch.empty(rows, self.num_labels, dtype=torch.float32))
        self.graphs[(rows, length)] = bucket
        return bucket
