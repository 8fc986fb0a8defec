"""The common shape of every re-parameterizable conv layer: :class:`ReparamConv2d`.

A layer computes one kernel (and bias) from its training-time parameters and convolves once. It
owns its fusion:

- ``fused_kernel_and_bias()`` gives the eval-mode kernel and bias (own norm folded in);
- ``switch_to_deploy()`` replaces the training-time parameters, in place and idempotently, by
  ``weight`` and ``bias``, so the layer's state-dict keys become those of a plain ``nn.Conv2d``;
- ``to_conv2d()`` returns that plain ``nn.Conv2d`` (what :func:`mmorepa.reparameterize` puts in
  the layer's place).

In eval mode (without gradients) it convolves with the fused kernel kept by its
:class:`~mmorepa.layers.eval_cache.EvalKernelCache`; train mode always regenerates the kernel;
under ``torch.compile`` tracing the kernel is computed in the graph. ``fake_quant_bits``: see
:mod:`mmorepa.layers.fake_quant`. Starting from a plain conv's weights:
:mod:`mmorepa.layers.seeding`.
"""
import contextlib
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from ..ops.algebra import fuse_bn
from .eval_cache import EvalKernelCache
from .fake_quant import check_fake_quant_bits, per_channel_fake_quant
from .seeding import SeedFromPlainConv


def pair_square(value, name: str) -> int:
    """An int from ``k`` or ``(k, k)``; non-square values are refused."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f'{name} must be an int or a square pair, got {value!r}')
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f'{name} must be an int, got {value!r}')
    return value


def check_conv_args(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                    odd_kernel=True):
    """Validate a conv's geometry; return ``(k, stride, padding, dilation)`` as ints.

    Raises ``ValueError`` naming the bad value.
    """
    k = pair_square(kernel_size, 'kernel_size')
    stride = pair_square(stride, 'stride')
    dilation = pair_square(dilation, 'dilation')
    if padding is None:
        padding = dilation * (k - 1) // 2
    padding = pair_square(padding, 'padding')
    for name, value in (('in_channels', in_channels), ('out_channels', out_channels),
                        ('groups', groups)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f'{name} must be a positive int, got {value!r}')
    if k < 1 or (odd_kernel and k % 2 == 0):
        raise ValueError(f'kernel_size must be a positive odd int, got {kernel_size!r}')
    if stride < 1:
        raise ValueError(f'stride must be >= 1, got {stride!r}')
    if dilation < 1:
        raise ValueError(f'dilation must be >= 1, got {dilation!r}')
    if padding < 0:
        raise ValueError(f'padding must be >= 0, got {padding!r}')
    if in_channels % groups or out_channels % groups:
        raise ValueError(f'groups={groups} must divide in_channels={in_channels} and '
                         f'out_channels={out_channels}')
    return k, stride, padding, dilation


def plain_conv(in_channels, out_channels, k, stride, padding, dilation, groups, bias) -> nn.Conv2d:
    """The plain ``nn.Conv2d`` a layer factory returns where it builds no re-parameterization
    (``padding=None``: "same" padding)."""
    if padding is None:
        padding = pair_square(dilation, 'dilation') * (k - 1) // 2
    return nn.Conv2d(in_channels, out_channels, k, stride, padding, dilation, groups, bias=bias)


def bn_fuse(kernel: Tensor, bias: Optional[Tensor], bn: _BatchNorm) -> Tuple[Tensor, Tensor]:
    """:func:`mmorepa.ops.algebra.fuse_bn` with the statistics of a BatchNorm module."""
    if not bn.track_running_stats or bn.running_mean is None:
        raise ValueError(f'cannot fuse {type(bn).__name__} without running statistics')
    return fuse_bn(kernel, bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


def autocast_off(device_type: str):
    """Autocast switched off for ``device_type`` (the kernel algebra runs in the parameters'
    precision), or nothing to do where autocast is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class ReparamConv2d(SeedFromPlainConv, nn.Module):
    """Base of the conv layers whose kernel is squeezed from training-time branches.

    Subclasses build their branches and compute the linear kernel (and bias, or ``None``) in
    ``squeezed_kernel_and_bias()``. A layer may own a post-addition norm ``self.bn``.
    Attributes mirror ``nn.Conv2d`` (``in_channels``, ``kernel_size``, ``stride``, ...), so code that
    inspects a host's conv keeps working. The layer's kernel is :meth:`kernel_and_bias` (the
    squeezed one, rounded to its grid when ``fake_quant_bits`` is set).
    """

    transposed = False

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=None,
                 dilation=1, groups: int = 1, bias: bool = False, deploy: bool = False,
                 fake_quant_bits: Optional[int] = None):
        super().__init__()
        k, stride, padding, dilation = check_conv_args(in_channels, out_channels, kernel_size,
                                                       stride, padding, dilation, groups)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = (k, k)
        self.stride = (stride, stride)
        self.padding = (padding, padding)
        self.dilation = (dilation, dilation)
        self.output_padding = (0, 0)
        self.groups = groups
        self.deploy = deploy
        self.fake_quant_bits = check_fake_quant_bits(fake_quant_bits)
        # What the host asked for: a layer that stands in for a bias-free conv (``bias=False``,
        # no norm of its own) but fuses to one with a bias (DBB) has that bias folded into the
        # norm that follows it (:func:`mmorepa.reparameterize`), so the host's keys stay plain.
        self.expects_bias = bias
        self.eval_cache = EvalKernelCache()
        self.fold_norm_in_eval = True
        self.bn = None

    def squeezed_kernel_and_bias(self) -> Tuple[Tensor, Optional[Tensor]]:
        """The single kernel (and bias) of the linear training-time block, norm excluded."""
        raise NotImplementedError

    def kernel_and_bias(self) -> Tuple[Tensor, Optional[Tensor]]:
        """The layer's kernel before its own norm: the squeezed one, rounded to its per-channel
        grid (straight-through gradient) when ``fake_quant_bits`` is set."""
        kernel, bias = self.squeezed_kernel_and_bias()
        if self.fake_quant_bits is not None:
            kernel = per_channel_fake_quant(kernel, self.fake_quant_bits)
        return kernel, bias

    def fused_kernel_and_bias(self) -> Tuple[Tensor, Optional[Tensor]]:
        """The kernel and bias of the equivalent plain conv in eval mode (differentiable)."""
        if self.deploy:
            return self.weight, self.bias
        kernel, bias = self.kernel_and_bias()
        if self.bn is not None:
            kernel, bias = bn_fuse(kernel, bias, self.bn)
        return kernel, bias

    def _init_deploy(self, bias: bool):
        k = self.kernel_size[0]
        self.weight = nn.Parameter(
            torch.empty(self.out_channels, self.in_channels // self.groups, k, k))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        self.bias = nn.Parameter(torch.zeros(self.out_channels)) if bias else None

    def _conv(self, x: Tensor, kernel: Tensor, bias: Optional[Tensor]) -> Tensor:
        return F.conv2d(x, kernel, bias, self.stride, self.padding, self.dilation, self.groups)

    def train(self, mode: bool = True):
        self.eval_cache.clear()
        return super().train(mode)

    def forward(self, x: Tensor) -> Tensor:
        """One conv with the squeezed kernel (train) or the cached fused one (eval). Under
        autocast the kernel algebra runs in full precision (squeezing in half precision would
        lose the small branches); only the final conv (and the norm) follow the ambient
        autocast."""
        if self.deploy:
            return self._conv(x, self.weight, self.bias)
        norm_frozen = self.bn is None or not self.bn.training
        if not self.training and norm_frozen and self.fold_norm_in_eval:
            needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
            with autocast_off(x.device.type):
                if needs_grad or torch.compiler.is_compiling():
                    kernel, bias = self.fused_kernel_and_bias()
                else:
                    kernel, bias = self.eval_cache.fused(self)
            return self._conv(x, kernel, bias)
        with autocast_off(x.device.type):
            kernel, bias = self.kernel_and_bias()
        out = self._conv(x, kernel, bias)
        return self.bn(out) if self.bn is not None else out

    @contextlib.contextmanager
    def unfolded(self):
        """Within this context, eval mode computes squeeze -> conv -> own norm on feature maps
        instead of one conv with the cached, norm-folded kernel (an independent reference)."""
        saved = self.fold_norm_in_eval
        self.fold_norm_in_eval = False
        try:
            yield self
        finally:
            self.fold_norm_in_eval = saved

    def switch_to_deploy(self):
        """Fuse in place: keep only ``weight`` and ``bias``, as a plain conv. Idempotent."""
        if self.deploy:
            return
        with torch.no_grad():
            kernel, bias = self.fused_kernel_and_bias()
            kernel, bias = kernel.detach().clone(), None if bias is None else bias.detach().clone()
        for name in list(self._parameters):
            delattr(self, name)
        for name in list(self._buffers):
            delattr(self, name)
        for name in list(self._modules):
            delattr(self, name)
        self.bn = None
        self.weight = nn.Parameter(kernel)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.eval_cache.clear()
        self.deploy = True

    def to_conv2d(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` equal to this layer in eval mode."""
        with torch.no_grad():
            kernel, bias = self.fused_kernel_and_bias()
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, self.groups, bias=bias is not None,
                         device=kernel.device, dtype=kernel.dtype)
        with torch.no_grad():
            conv.weight.copy_(kernel)
            if bias is not None:
                conv.bias.copy_(bias)
        return conv.train(self.training)

    def extra_repr(self) -> str:
        s = (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, '
             f'stride={self.stride}, padding={self.padding}')
        if self.dilation != (1, 1):
            s += f', dilation={self.dilation}'
        if self.groups != 1:
            s += f', groups={self.groups}'
        if self.deploy:
            s += ', deploy=True'
        return s
