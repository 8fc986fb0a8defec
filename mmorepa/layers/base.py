"""The common shape of every re-parameterizable conv layer.

A :class:`ReparamConv2d` computes one kernel (and bias) from its training-time parameters and
convolves once. It owns its fusion:

- ``fused_kernel_and_bias()`` gives the eval-mode kernel and bias (own norm folded in);
- ``switch_to_deploy()`` replaces the training-time parameters, in place and idempotently, by
  ``weight`` and ``bias``, so the layer's state-dict keys become those of a plain ``nn.Conv2d``;
- ``to_conv2d()`` returns that plain ``nn.Conv2d`` (what :func:`mmorepa.reparameterize` puts in
  the layer's place).

In eval mode (without gradients) the layer convolves once with its fused kernel, kept by its
:class:`~mmorepa.layers.eval_cache.EvalKernelCache` (the fused kernel and bias only, never stale);
train mode always regenerates the kernel; under ``torch.compile`` tracing the kernel is computed
in the graph.

``fake_quant_bits`` (INT8 deployment): the layer's kernel is its squeezed kernel rounded to the
symmetric per-output-channel grid of that many bits (:func:`per_channel_fake_quant`), in training
(straight-through gradient), in eval and when fused. A norm folded in afterwards scales whole
output channels, which moves each channel's grid with it, so the fused kernel lies on the grid
that per-channel weight quantization (onnxruntime, TensorRT) gives it: its rounding is exact.
"""
import contextlib
import logging
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from .. import kernels as K
from .eval_cache import EvalKernelCache


def _pair_square(value, name: str) -> int:
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
    k = _pair_square(kernel_size, 'kernel_size')
    stride = _pair_square(stride, 'stride')
    dilation = _pair_square(dilation, 'dilation')
    if padding is None:
        padding = dilation * (k - 1) // 2
    padding = _pair_square(padding, 'padding')
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


def bn_fuse(kernel: Tensor, bias: Optional[Tensor], bn: _BatchNorm) -> Tuple[Tensor, Tensor]:
    """:func:`mmorepa.kernels.fuse_bn` with the statistics of a BatchNorm module."""
    if not bn.track_running_stats or bn.running_mean is None:
        raise ValueError(f'cannot fuse {type(bn).__name__} without running statistics')
    return K.fuse_bn(kernel, bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


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


def _autocast_off(device_type: str):
    """Autocast switched off for ``device_type`` (the kernel algebra runs in the parameters'
    precision), or nothing to do where autocast is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class ReparamConv2d(nn.Module):
    """Base of the conv layers whose kernel is squeezed from training-time branches.

    Subclasses build their branches in ``_build_branches()`` and compute the linear kernel (and
    bias, or ``None``) in ``squeeze()``. A layer may own a post-addition norm ``self.bn``.
    Attributes mirror ``nn.Conv2d`` (``in_channels``, ``kernel_size``, ``stride``, ...), so code that
    inspects a host's conv keeps working. ``fake_quant_bits``: see the module docstring; the
    layer's kernel is :meth:`kernel_and_bias` (the squeezed one, rounded when it is set).
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

    # -- to be provided by subclasses -----------------------------------------------------------
    def squeeze(self) -> Tuple[Tensor, Optional[Tensor]]:
        """The single kernel (and bias) of the linear training-time block, norm excluded."""
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------------
    def kernel_and_bias(self) -> Tuple[Tensor, Optional[Tensor]]:
        """The layer's kernel before its own norm: the squeezed one, rounded to its per-channel
        grid (straight-through gradient) when ``fake_quant_bits`` is set."""
        kernel, bias = self.squeeze()
        if self.fake_quant_bits is not None:
            kernel = per_channel_fake_quant(kernel, self.fake_quant_bits)
        return kernel, bias

    def _init_deploy(self, bias: bool):
        k = self.kernel_size[0]
        self.weight = nn.Parameter(
            torch.empty(self.out_channels, self.in_channels // self.groups, k, k))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        self.bias = nn.Parameter(torch.zeros(self.out_channels)) if bias else None

    def fused_kernel_and_bias(self) -> Tuple[Tensor, Optional[Tensor]]:
        """The kernel and bias of the equivalent plain conv in eval mode (differentiable)."""
        if self.deploy:
            return self.weight, self.bias
        kernel, bias = self.kernel_and_bias()
        if self.bn is not None:
            kernel, bias = bn_fuse(kernel, bias, self.bn)
        return kernel, bias

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
            with _autocast_off(x.device.type):
                if needs_grad or torch.compiler.is_compiling():
                    kernel, bias = self.fused_kernel_and_bias()
                else:
                    kernel, bias = self.eval_cache.fused(self)
            return self._conv(x, kernel, bias)
        with _autocast_off(x.device.type):
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

    # -- starting from a plain conv's weights --------------------------------------------------------
    def seeded_state(self, weight: Tensor, bias: Optional[Tensor]) -> Tuple[Dict[str, Tensor],
                                                                             float]:
        """Values for some of this layer's state-dict entries (the others keep theirs) with which
        its squeezed kernel is ``weight`` (float64 ``(C_out, C_in // g, k, k)``) and its bias
        ``bias``; and the relative error of that kernel (0 where the inverse is exact). Layers
        that cannot start from a plain conv raise ``NotImplementedError``."""
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """A plain conv's ``weight`` (and ``bias``) in place of this layer's own entries (a stock
        checkpoint, a fused deploy checkpoint) sets the branches so that the squeezed kernel is
        that weight: the layer then computes what the plain conv computed. Works wherever
        ``_load_from_state_dict`` is used (``load_state_dict``, mmengine's ``load_checkpoint``,
        ``init_cfg=Pretrained`` with or without ``prefix``, ``load_from``)."""
        own = [k for k in self.state_dict() if k != 'bias']
        if (not self.deploy and self.bn is None and prefix + 'weight' in state_dict
                and not any(prefix + k in state_dict for k in own)):
            self._seed_from_plain(state_dict, prefix, error_msgs)
        else:
            self._check_own_entries(state_dict, prefix, error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _check_own_entries(self, state_dict, prefix, error_msgs):
        """A checkpoint of another re-parameterization (other OREPA branches, DBB, Rep-1x1 vs a
        plain 1x1, a fused layer ...) holds some of this layer's entries and others of its own:
        it does not load. Name the layer and the entries that differ (``error_msgs``: mmengine
        reports them with its key warnings, ``load_state_dict`` raises). Entries of inner
        re-parameterizable layers (the deep stem's generators) are checked by those layers."""
        inner = tuple(f'{n}.' for n, m in self.named_modules()
                      if n and isinstance(m, ReparamConv2d))
        given = {k[len(prefix):] for k in state_dict
                 if k.startswith(prefix) and not k[len(prefix):].startswith(inner)}
        if not given:
            return  # the layer is absent: the usual missing-key report
        expected = {k for k in self.state_dict() if not k.startswith(inner)}

        def names(keys):  # 'branch_kxk.bn.weight' -> 'branch_kxk'
            return ', '.join(sorted({k.split('.')[0] for k in keys})) or 'nothing'

        extra = given - expected
        missing = {k for k in expected - given if not k.endswith('num_batches_tracked')}
        if extra or missing:
            error_msgs.append(
                f'{prefix[:-1] or "layer"} ({type(self).__name__}): the checkpoint\'s entries '
                'are those of another re-parameterization (other branches, DBB, a fused or '
                f'plain layer): it has {names(extra)} that this layer lacks, and lacks '
                f'{names(missing)}; this layer is not loaded from it')

    def _seed_from_plain(self, state_dict, prefix, error_msgs):
        from mmengine.logging import print_log
        name = f'{prefix[:-1] or "layer"} ({type(self).__name__})'
        weight, bias = state_dict[prefix + 'weight'], state_dict.get(prefix + 'bias')
        k = self.kernel_size[0]
        shape = (self.out_channels, self.in_channels // self.groups, k, k)
        if tuple(weight.shape) != shape:
            error_msgs.append(f'size mismatch for {prefix}weight: a plain conv weight of shape '
                              f'{tuple(weight.shape)} cannot seed {name} {shape}')
            return
        if bias is not None and self.bias is None:
            error_msgs.append(f'{prefix}bias: the checkpoint\'s conv has a bias, {name} has none')
            return
        # the checkpoint may sit on another device than the model (mmengine loads it on the CPU)
        device = next(self.parameters()).device
        weight = weight.detach().to(device, torch.float64)
        bias = (torch.zeros(self.out_channels, dtype=torch.float64, device=device)
                if bias is None and self.bias is not None
                else None if bias is None else bias.detach().to(device, torch.float64))
        try:
            values, err = self.seeded_state(weight, bias)
        except NotImplementedError:
            return  # not seeded: the usual missing / unexpected key report follows
        except ValueError as e:
            error_msgs.append(f'{name} cannot start from the plain conv weight {prefix}weight: {e}')
            return
        del state_dict[prefix + 'weight']
        state_dict.pop(prefix + 'bias', None)
        for key, value in self.state_dict().items():
            state_dict[prefix + key] = values.get(key, value).detach().to(
                device=value.device, dtype=value.dtype).clone()
        what = 'squeezed kernel'
        if self.fake_quant_bits is not None:  # the layer's kernel is the seeded one rounded
            what = f'kernel (squeezed, rounded to {self.fake_quant_bits} bits)'
            err = max(err, float((per_channel_fake_quant(weight, self.fake_quant_bits) - weight)
                                 .norm() / weight.norm().clamp_min(1e-300)))
        exact = err <= 1e-6
        print_log(f'{name}: seeded from a plain {k}x{k} conv weight, {what} '
                  f'{"exact" if exact else "NOT exact"} (relative error {err:.1e} in float64)',
                  logger='current', level=logging.INFO if exact else logging.WARNING)

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
