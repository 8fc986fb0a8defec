"""The eval-mode kernel cache of a :class:`~mmorepa.layers.ReparamConv2d`.

In eval mode (without gradients) a layer convolves once with its fused kernel and bias. The cache
keeps those two tensors and a key of what they were computed from, and nothing else (no copy of
the parameters):

- the layer's own settings: the type and every plain attribute (numbers, strings, tuples, ...) of
  the layer and each of its sub-modules, e.g. ``fake_quant_bits``, a norm's ``eps`` and
  ``momentum``, a parametrization's options, and the names of its parameters and buffers;
- per parameter and buffer: its storage address, version counter, shape, strides, dtype and
  device, and a fingerprint of its values read in one pass (:func:`fingerprint`: 64 wrapping
  sums of its bit pattern, position by position modulo 64).

Each call recomputes the key and serves the cached kernel only if nothing differs. So the cache
follows every change: in-place ops and ``copy_`` under ``no_grad`` and ``load_state_dict`` (version
counters), ``p.data = other`` and ``.to()`` (storage, dtype, device), and writes that no version
counter sees, through ``p.data`` (mmengine's EMA) or by fused and foreach optimizers (the
fingerprint: any change of a single element changes it, and a change of many elements leaves all
64 sums unchanged with probability about ``2**-32`` per sum it touches). Reading each tensor once
costs a small fraction of the squeeze it saves.

The cache is not the layer's state: it is absent from ``state_dict``, and pickling
(``torch.save(model)``) or ``copy.deepcopy`` carries an empty cache.

The interface the layer uses: ``EvalKernelCache()``, ``cache.fused(layer)`` (the layer's
``fused_kernel_and_bias()``, cached), ``cache.clear()`` and ``cache.filled``.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

LANES = 64
_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device)


def fingerprint(tensor: Tensor) -> Tensor:
    """``LANES`` int32 sums (wrapping) of the bit pattern of ``tensor`` read as 32-bit words
    (8- and 16-bit types: as 8- and 16-bit integers), lane ``i`` summing the words at flat
    positions ``i`` modulo ``LANES``. One read of the tensor; no copy unless it is not
    contiguous."""
    flat = tensor.detach().reshape(-1)
    words = _as_integers(flat)
    n = words.numel() // LANES * LANES
    lanes = words[:n].view(-1, LANES).sum(0, dtype=torch.int32)
    tail = words[n:]
    if tail.numel():
        lanes[:tail.numel()] += tail.to(torch.int32)
    return lanes


def _as_integers(flat: Tensor) -> Tensor:
    """The 1-D contiguous ``flat``'s bits as integers: 32-bit words where its element size allows,
    else its own element size."""
    size = flat.element_size()
    if size % 4 == 0 and flat.data_ptr() % 4 == 0:
        return flat.view(torch.int32)
    return flat.view({1: torch.uint8, 2: torch.int16}.get(size, torch.uint8))


def _version(tensor: Tensor) -> int:
    try:
        return tensor._version
    except RuntimeError:  # an inference tensor has no version counter
        return -1


def _identity(tensor: Tensor) -> tuple:
    """Where and what ``tensor`` is: storage address, version counter, shape, strides, dtype,
    device."""
    return (tensor.data_ptr(), _version(tensor), tuple(tensor.shape), tensor.stride(),
            tensor.dtype, tensor.device)


def _frozen(value):
    """``value`` as a comparable snapshot if it is plain data (numbers, strings, dtypes and
    tuples, lists and dicts of them), else ``None``."""
    if isinstance(value, _PLAIN):
        return (type(value), value)
    if isinstance(value, (tuple, list)):
        items = [_frozen(v) for v in value]
        return None if any(i is None for i in items) else (type(value), tuple(items))
    if isinstance(value, dict):
        items = [(k, _frozen(v)) for k, v in value.items()]
        return None if any(i is None for _, i in items) else (dict, tuple(items))
    return None


def settings(layer: nn.Module) -> tuple:
    """The layer's own settings: for the layer and each sub-module, its name, type, plain
    attributes and the names of its parameters and buffers."""
    key = []
    for name, module in layer.named_modules():
        plain = tuple((k, f) for k, f in ((k, _frozen(v)) for k, v in vars(module).items())
                      if f is not None)
        key.append((name, type(module), plain, tuple(module._parameters),
                    tuple(module._buffers)))
    return tuple(key)


def _same_fingerprints(a: List[Tensor], b: List[Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


class EvalKernelCache:
    """One layer's cached fused kernel and bias, with the key of what they were computed from."""

    def __init__(self):
        self._entry = None  # (settings, identities, fingerprints, (kernel, bias))

    @property
    def filled(self) -> bool:
        return self._entry is not None

    def clear(self):
        """Drop the cached kernel (train mode, fusion)."""
        self._entry = None

    def fused(self, layer: nn.Module) -> Tuple[Tensor, Optional[Tensor]]:
        """``layer.fused_kernel_and_bias()``, recomputed unless the layer's settings, and every
        parameter and buffer's identity and fingerprint, are those it was computed from. Cached
        tensors are ordinary tensors even when computed under ``torch.inference_mode`` (a later
        forward may save them for backward)."""
        tensors = list(layer.parameters()) + list(layer.buffers())
        with torch.no_grad():
            key = (settings(layer), [_identity(t) for t in tensors])
            prints = [fingerprint(t) for t in tensors]
        entry = self._entry
        if entry is not None and entry[0] == key and _same_fingerprints(entry[1], prints):
            return entry[2]
        with torch.inference_mode(False), torch.no_grad():
            fused = layer.fused_kernel_and_bias()
            # kept as copies made once the squeeze's temporaries are freed: the copies take the
            # memory those left behind, and the heap gives back the rest (OREPA-ResNet-50: the
            # resident memory after a first eval forward grows by the kernels' 90 MiB, not 134)
            fused = tuple(None if t is None else t.clone() for t in fused)
        self._entry = (key, prints, fused)
        return fused

    # the cache is never saved or copied with its layer
    def __getstate__(self):
        return {'_entry': None}

    def __deepcopy__(self, memo):
        return EvalKernelCache()
