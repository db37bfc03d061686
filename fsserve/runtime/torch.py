"""The eager torch backend: a PromptModel behind the one backend interface (numpy in, numpy out).

On a GPU the default is :class:`fsserve.runtime.graphs.GraphBackend` (CUDA graphs); this eager
backend is what ``cuda_graphs=False`` (``--no-cuda-graphs``) and the CPU use.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fsserve.utils.device import resolve_device, resolve_dtype


class TorchBackend:
    """Run ``label_logits`` with the PyTorch model (CPU or CUDA).

    >>> backend = TorchBackend(PromptModel.from_pretrained("runs/sst2"), device="cpu")  # doctest: +SKIP
    """

    name = "torch"

    def __init__(self, model: Any, device: str | None = None, num_threads: int | None = None, dtype: str | torch.dtype | None = None) -> None:
        self.device = resolve_device(device)
        if num_threads:
            torch.set_num_threads(int(num_threads))
        # dtype None keeps the model's weights as they are; "auto" is bfloat16 on CUDA, float32 on a CPU.
        self.model = (model.to(self.device) if dtype is None else model.to(device=self.device, dtype=resolve_dtype(dtype, self.device))).eval()
        self.input_names = ["input_ids", "attention_mask", "answer_pos"] + (["token_type_ids"] if model.uses_token_types else [])

    @torch.inference_mode()
    def label_logits(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, answer_pos: np.ndarray, token_type_ids: np.ndarray | None = None
    ) -> np.ndarray:
        """Return (B, num_labels) float32 label logits for one padded batch."""
        def as_tensor(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.long, device=self.device)

        types = as_tensor(token_type_ids) if token_type_ids is not None and self.model.uses_token_types else None
        out = self.model(as_tensor(input_ids), as_tensor(attention_mask), as_tensor(answer_pos), types)
        return out.float().cpu().numpy()
