"""The eval-mode kernel cache of a :class:`~mmorepa.layers.ReparamConv2d`.

In eval mode (without gradients) a layer's fused kernel and bias are cached together with a copy
of the values they were computed from, and every call compares the layer's parameters and
buffers with that copy (:func:`_same_values`). Any change of a value invalidates it, whatever made
it: an optimizer step of any kind (foreach and fused kernels do not always bump tensors' version
counters), writes through ``param.data`` (mmengine's EMA), ``load_state_dict``, ``copy_`` under
``no_grad``, ``.to()``. The check reads each parameter once, a small fraction of the squeeze it
saves.

The interface the layer uses: ``EvalKernelCache()``, ``cache.fused(layer)`` (the layer's
``fused_kernel_and_bias()``, cached), ``cache.clear()`` and ``cache.filled``.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality of two tensors of one shape and dtype (compared as integers: exact for
    NaN and signed zeros, and about twice as fast as a floating-point ``torch.equal``)."""
    bits = _BITS.get(a.element_size())
    if bits is None or a.is_complex():
        return torch.equal(a, b)
    return torch.equal(a.view(bits), b.view(bits))


def _same_values(snapshot, tensors) -> bool:
    """Whether ``tensors`` hold exactly the values (shape, dtype, device and bits) of
    ``snapshot``: the cache's validity check."""
    return len(snapshot) == len(tensors) and all(
        s.shape == t.shape and s.dtype == t.dtype and s.device == t.device and _same_bits(s, t)
        for s, t in zip(snapshot, tensors))


class EvalKernelCache:
    """One layer's cached fused kernel and bias, with the values they were computed from."""

    def __init__(self):
        self._entry = None  # (snapshot of the layer's tensors, (kernel, bias))

    @property
    def filled(self) -> bool:
        return self._entry is not None

    def clear(self):
        """Drop the cached kernel (train mode, fusion)."""
        self._entry = None

    def fused(self, layer) -> Tuple[Tensor, Optional[Tensor]]:
        """``layer.fused_kernel_and_bias()``, recomputed unless every parameter and buffer of
        ``layer`` still holds the values it was computed from. Cached tensors are ordinary
        tensors even when computed under ``torch.inference_mode`` (a later forward may save them
        for backward)."""
        tensors = list(layer.parameters()) + list(layer.buffers())
        if self._entry is not None and _same_values(self._entry[0], tensors):
            return self._entry[1]
        with torch.inference_mode(False), torch.no_grad():
            fused = layer.fused_kernel_and_bias()
            snapshot = [t.detach().clone() for t in tensors]
        self._entry = (snapshot, fused)
        return fused
