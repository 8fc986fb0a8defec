"""Fake quantization of a layer's kernel (INT8 deployment, ``fake_quant_bits``).

The layer's kernel is its squeezed kernel rounded to the symmetric per-output-channel grid of
``fake_quant_bits`` bits (:func:`per_channel_fake_quant`), in training (straight-through gradient),
in eval and when fused. A norm folded in afterwards scales whole output channels, which moves each
channel's grid with it, so the fused kernel lies on the grid that per-channel weight quantization
(onnxruntime, TensorRT) gives it: its rounding is exact.
"""
from typing import Optional

import torch
from torch import Tensor


def per_channel_fake_quant(weight: Tensor, bits: int = 8) -> Tensor:
    """``weight`` rounded per output channel to ``bits``-bit symmetric integers (step
    ``max|w| / (2^(bits-1) - 1)``, the scale of per-channel weight quantization), dequantized;
    the gradient passes straight through (identity). The value is exactly the rounded one."""
    flat = weight.flatten(1)
    qmax = 2 ** (bits - 1) - 1
    step = flat.detach().abs().amax(1, keepdim=True).clamp_min(1e-30) / qmax
    rounded = torch.round(flat.detach() / step).clamp(-qmax, qmax) * step
    return (rounded + (flat - flat.detach())).reshape(weight.shape)


def check_fake_quant_bits(bits) -> Optional[int]:
    """``None`` or an int in 2..16; a ``ValueError`` naming the value otherwise."""
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int)
                             or not 2 <= bits <= 16):
        raise ValueError(f'fake_quant_bits must be None or an int in 2..16, got {bits!r}')
    return bits
