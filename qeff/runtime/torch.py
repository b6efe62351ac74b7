"""PyTorch session over a transformed model: the same interface as the compiled backends, so the
verification and the generation loop drive the retained-state module exactly as they drive ORT."""

from __future__ import annotations

import numpy as np
import torch

from qeff.transforms import QEffCausalLM

__all__ = ["TorchSession"]


class TorchSession:
    backend = "torch"
    prompt_len = None

    def __init__(self, qmodel: QEffCausalLM, *, batch_size: int, ctx_len: int):
        self.qmodel = qmodel
        self.batch_size, self.ctx_len = batch_size, ctx_len
        self.num_layers = qmodel.shape.num_layers
        self._cache = qmodel.empty_cache(batch_size, ctx_len)

    @torch.no_grad()
    def run(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        out = self.qmodel(torch.from_numpy(np.asarray(input_ids, np.int64)), torch.from_numpy(np.asarray(position_ids, np.int64)), *self._cache)
        self._cache = list(out[1:])
        return out[0][:, 0, :].numpy()

    def read_cache(self) -> list[np.ndarray]:
        return [c.numpy().copy() for c in self._cache]

    def close(self) -> None:
        self._cache = []
