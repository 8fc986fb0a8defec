"""Kernel algebra of OREPA: small pure, differentiable functions on conv kernels.

Shapes follow PyTorch: a kernel is ``(C_out, C_in // groups, k, k)`` and a conv is a cross-correlation.
Every function here works on kernels only (never on feature maps), is differentiable, and keeps the
dtype and device of its inputs. The branch registry (:mod:`mmorepa.ops.branches`) and the layers
compose these functions; the paper's equations are named in each docstring (``Eq.`` = main paper,
``supp`` = supplementary).
"""
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    'fuse_bn', 'pad_to', 'compose', 'compose_1x1', 'compose_1x1_depthwise', 'avg_kernel',
    'frequency_prior', 'dw_pw_to_full', 'identity_kernel', 'factor_into_3x3', 'pair_images',
    'pair_kernel', 'kernel_or_accumulate', 'pointwise_by_input', 'rowdot',
]


def fuse_bn(kernel: Tensor, bias: Optional[Tensor], running_mean: Tensor, running_var: Tensor,
            weight: Optional[Tensor], shift: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm that follows a conv into the conv's kernel and bias.

    ``BN(W * x + b) = (gamma / sigma) W * x + beta + (b - mu) gamma / sigma`` with
    ``sigma = sqrt(var + eps)``: the post-addition norm of Sec. 3.2 (and the branch-wise norms of
    DBB / RepVGG) become part of a single conv at deploy time. The formula of
    ``torch.nn.utils.fusion.fuse_conv_bn_weights``, kept differentiable: that function returns new
    ``nn.Parameter`` leaves, which cut the gradient to the branches that an eval-mode forward with
    gradients (and the INT8 straight-through rounding) needs.
    """
    std = torch.sqrt(running_var + eps)
    t = (weight if weight is not None else torch.ones_like(std)) / std
    b = bias if bias is not None else torch.zeros_like(running_mean)
    beta = shift if shift is not None else torch.zeros_like(running_mean)
    return kernel * t.reshape(-1, 1, 1, 1), beta + (b - running_mean) * t


def pad_to(kernel: Tensor, size: int) -> Tensor:
    """Centre a ``k x k`` kernel inside a ``size x size`` one (zeros around it).

    Eq. 4 adds branch kernels of different sizes: "an 1x1 kernel should be aligned with the centre
    of a 3x3 kernel". Both sizes must be odd so that the centres coincide.
    """
    k = kernel.shape[-1]
    if kernel.shape[-2] != k:
        raise ValueError(f'pad_to expects a square kernel, got spatial shape {tuple(kernel.shape[-2:])}')
    if size < k or (size - k) % 2:
        raise ValueError(f'cannot centre a {k}x{k} kernel in a {size}x{size} one')
    p = (size - k) // 2
    return F.pad(kernel, [p, p, p, p]) if p else kernel


def compose(first: Tensor, second: Tensor, groups: int = 1) -> Tensor:
    """The kernel of two sequential convs: ``second * (first * x) == compose(first, second) * x``.

    Eq. 3 (sequential squeezing) in the pixel-wise form of supp Eq. 2: the spatial part is a full
    (not cross-) correlation, size ``k1 + k2 - 1``. ``first`` is ``(C1, C0 // g, k1, k1)``,
    ``second`` is ``(C2, C1 // g, k2, k2)``, both with the same ``groups``; the result is
    ``(C2, C0 // g, k1 + k2 - 1, k1 + k2 - 1)``. Exact for convs with zero padding and no bias when
    the composed kernel is applied with the summed padding (or for any padding when ``first`` is 1x1).
    """
    if first.shape[-1] == 1 and first.shape[-2] == 1:
        return compose_1x1(first, second, groups)
    k2 = second.shape[-1]
    out = F.conv2d(first.transpose(0, 1), second.flip(-1, -2), padding=k2 - 1, groups=groups)
    return out.transpose(0, 1)


def pair_images(second: Tensor, groups: int) -> Tensor:
    """A ``(C2, C1 // g, k, k)`` kernel as a batch of ``C2 // g`` images with ``C1`` channels
    (group-major) of ``k^2 x 1`` pixels: the input of :func:`compose_1x1`'s 1x1 conv (a view
    when ``groups == 1``)."""
    c2, c1g, kh, kw = second.shape
    g = groups
    return second.reshape(g, c2 // g, c1g, kh * kw).transpose(0, 1).reshape(
        c2 // g, g * c1g, kh * kw, 1)


def pair_kernel(images: Tensor, groups: int) -> Tensor:
    """The inverse of :func:`pair_images`: ``(C2 // g, g * C, p, 1)`` images as the grouped
    product ``(g, C2 // g, C, p)`` (a view)."""
    c2g, gc, p = images.shape[:3]
    return images.reshape(c2g, groups, gc // groups, p).transpose(0, 1)


def compose_1x1(first: Tensor, second: Tensor, groups: int = 1, scale: Optional[Tensor] = None,
                accumulate: Optional[Tensor] = None) -> Tensor:
    """Eq. 3 for a 1x1 conv followed by any ``k x k`` conv (the 1x1-kxk branch, Rep-1x1).

    ``K[o, i] = sum_m second[o, m] first[m, i]`` per group: a 1x1 conv whose input is ``second``
    read as ``C2 / g`` images of ``C1`` channels and ``k^2`` pixels, and whose weight is
    ``first`` transposed; its output is ``K`` in the kernel layout (no reordering when
    ``groups == 1``), and the conv libraries run it, with its backward, as fast as a matrix
    product gets. The same result as :func:`compose` with far less work.
    ``scale`` (``(C2,)`` or ``(1,)``) multiplies the output channels (a scaling layer after the
    pair). ``accumulate`` (a kernel of the result's shape, no autograd): the scaled result is
    added to it in place, in one pass.
    """
    c1, c0g = first.shape[:2]
    c2, c1g, kh, kw = second.shape
    if c1 != c1g * groups:
        raise ValueError(f'compose_1x1: {c1} intermediate channels do not match '
                         f'{c1g} x {groups} groups of the second kernel')
    g = groups
    if scale is not None and accumulate is None:
        second = second * scale.reshape(-1, 1, 1, 1)
    weight = first.reshape(g, c1g, c0g).transpose(1, 2).reshape(g * c0g, c1g, 1, 1)
    out = pair_kernel(F.conv2d(pair_images(second, g), weight, groups=g), g)
    return kernel_or_accumulate(out, (c2, c0g, kh, kw), scale, accumulate)


def kernel_or_accumulate(out: Tensor, shape, scale: Optional[Tensor],
                          accumulate: Optional[Tensor]) -> Tensor:
    """A grouped product ``out`` ``(g, C_out // g, C_in // g, k * k)`` as the kernel of ``shape``,
    or added into ``accumulate`` (that kernel's shape), scaled per output channel by ``scale``
    on the way (one pass: Eq. 4's sum with the scaling of Sec. 3.2)."""
    if accumulate is None:
        return out.reshape(shape)
    g, og = out.shape[:2]
    acc = accumulate.view(out.shape)
    if scale is None:
        acc.add_(out)
    else:
        acc.addcmul_(out, scale.reshape(-1).expand(g * og).reshape(g, og, 1, 1))
    return accumulate


def compose_1x1_depthwise(first: Tensor, filters: Tensor, scale: Optional[Tensor] = None,
                          accumulate: Optional[Tensor] = None) -> Tensor:
    """A 1x1 conv followed by a fixed depthwise ``k x k`` filter per output channel (Eq. 3).

    ``first`` is ``(C_out, C_in // g, 1, 1)``; ``filters`` is ``(C_out, k, k)`` or ``(k, k)``
    (shared). Used for the 1x1-avg branch (filter :func:`avg_kernel`) and the 1x1-frequency-prior
    branch (filter :func:`frequency_prior`) of Fig. 6. ``scale`` and ``accumulate`` as in
    :func:`compose_1x1` (one pass over ``accumulate``).
    """
    if filters.dim() == 2:
        filters = filters.unsqueeze(0)
    if scale is not None:
        first = first * scale.reshape(-1, 1, 1, 1)
    if accumulate is None:
        return first * filters.unsqueeze(1)
    return accumulate.addcmul_(first, filters.unsqueeze(1))


def avg_kernel(k: int, dtype=None, device=None) -> Tensor:
    """The ``k x k`` average-pooling filter, ``1 / k^2`` everywhere (supp Table 1, "Pooling").

    Average pooling with ``count_include_pad=True`` and the conv's padding is a depthwise conv with
    this kernel.
    """
    return torch.full((k, k), 1.0 / (k * k), dtype=dtype, device=device)


def frequency_prior(channels: int, k: int, dtype=None, device=None) -> Tensor:
    """The fixed frequency-prior filters of supp Table 1 ("Filtering"), ``(channels, k, k)``.

    For ``c < C // 2``: ``cos((c + 1)(k_h + 0.5) pi / K)`` (varies along rows); otherwise
    ``cos((c - C // 2 + 1)(k_w + 0.5) pi / K)`` (varies along columns). Any odd ``k``.
    """
    c = torch.arange(channels, dtype=torch.float64).reshape(-1, 1, 1)
    pos = torch.arange(k, dtype=torch.float64) + 0.5
    half = channels // 2
    rows = torch.cos((c + 1) * pos.reshape(1, k, 1) * math.pi / k).expand(channels, k, k)
    cols = torch.cos((c - half + 1) * pos.reshape(1, 1, k) * math.pi / k).expand(channels, k, k)
    prior = torch.where(c < half, rows, cols)
    return prior.to(dtype=dtype or torch.get_default_dtype(), device=device)


def dw_pw_to_full(depthwise: Tensor, pointwise: Tensor, in_channels: int, groups: int = 1,
                  scale: Optional[Tensor] = None, accumulate: Optional[Tensor] = None) -> Tensor:
    """A linear depthwise-separable pair as one full kernel (Sec. 3.5, DO-Conv; Eq. 3).

    ``depthwise`` is ``(C_in * M, 1, k, k)`` (groups ``C_in``, expansion ``M``: input channel ``i``
    feeds channels ``i * M .. i * M + M - 1``); ``pointwise`` is ``(C_out, C_in * M // g, 1, 1)``
    with ``groups``. ``K[o, i] = sum_m pw[o, i * M + m] dw[i * M + m]`` within each group, one
    matrix product ``[p, m] @ [m, o]`` per input channel (``p`` the ``k^2`` taps); the result is
    ``(C_out, C_in // g, k, k)``.
    ``scale`` and ``accumulate`` as in :func:`compose_1x1`.
    """
    cim, _, kh, kw = depthwise.shape
    c_out, cimg = pointwise.shape[:2]
    if cim % in_channels or cimg * groups != cim:
        raise ValueError(f'dw_pw_to_full: depthwise kernel {tuple(depthwise.shape)} and pointwise '
                         f'kernel {tuple(pointwise.shape)} do not fit {in_channels} input channels '
                         f'in {groups} groups')
    m = cim // in_channels
    cig = in_channels // groups
    g, og, p = groups, c_out // groups, kh * kw
    if scale is not None and accumulate is None:
        pointwise = pointwise * scale.reshape(-1, 1, 1, 1)
    # per input channel [p, m] @ [m, o]: the long output-channel side last, which the batched
    # product runs far faster than [o, m] @ [m, p]; then (i, o, p) and the kernel's (o, i, p)
    # in two cheap transposes (one (i, p, o) -> (o, i, p) pass is several times slower)
    dw = depthwise.reshape(g * cig, m, p).transpose(1, 2)
    out = torch.bmm(dw, pointwise_by_input(pointwise, g, m))  # (i, p, o)
    out = out.transpose(1, 2).contiguous().reshape(g, cig, og, p).transpose(1, 2)  # (g, o, i, p)
    return kernel_or_accumulate(out, (c_out, cig, kh, kw), scale, accumulate)


def pointwise_by_input(pointwise: Tensor, groups: int, m: int) -> Tensor:
    """The pointwise kernel ``(C_out, C_in * M // g, 1, 1)`` as ``(C_in, M, C_out // g)`` per
    input channel (a strided view when ``groups == 1``)."""
    c_out, cimg = pointwise.shape[:2]
    g = groups
    return pointwise.reshape(g, c_out // g, cimg // m, m).permute(0, 2, 3, 1).reshape(
        g * (cimg // m), m, c_out // g)


def identity_kernel(channels: int, groups: int = 1, k: int = 1, dtype=None, device=None) -> Tensor:
    """The kernel of the identity map, ``(channels, channels // groups, k, k)``, 1 at the centre.

    The identity-initialised 1x1 of the 1x1-kxk branch (supp Table 1, "Conv 1x1 iden.") and
    RepVGG's identity branch.
    """
    cpg = channels // groups
    kernel = torch.zeros(channels, cpg, k, k, dtype=dtype, device=device)
    idx = torch.arange(channels, device=device)
    kernel[idx, idx % cpg, k // 2, k // 2] = 1
    return kernel


def factor_into_3x3(kernel: Tensor, num_stages: int, width: int,
                    fill: Optional[Sequence[Tensor]] = None) -> Tuple[Sequence[Tensor], float]:
    """Stage kernels whose sequential composition (Eq. 3) is ``kernel``: the inverse of the linear
    deep stem's squeeze (Sec. 3.5), used to start it from a plain ``k x k`` conv.

    ``kernel`` is ``(C_out, C_in, k, k)`` with ``k = 2 * num_stages + 1``; the stages are
    ``(width, C_in, 3, 3)``, ``(width, width, 3, 3)`` ..., ``(C_out, width, 3, 3)``. Input channel
    ``c`` at the shift ``(i, j)`` (``i, j`` in 0..2) gets an intermediate channel ``n`` that every
    stage but the last shifts by ``(i, j)`` once more, so it carries ``c`` shifted by
    ``(s i, s j)``, ``s = num_stages - 1``; the last stage's taps ``(r, t)`` then reach the offset
    ``(s i + r, s j + t)`` of ``kernel``. Every offset is reached once when ``s <= 3`` (k <= 9)
    and ``width >= 9 C_in``: the factorisation is exact. With fewer channels the shifts whose taps
    carry the least energy are left out, and the returned relative error says what was lost.

    The remaining intermediate channels take the values of ``fill`` (the current stage kernels,
    or zeros) where that does not change the composition: rows of the first stages (channels no
    later stage reads), never the last stage's columns for them. So no stage kernel is zero where
    it could be trained (Prop. 1, Condition 2, holds for the stem's branches as well).

    Returns ``(stages, relative error of their composition against kernel)``.
    """
    c_out, c_in, k, _ = kernel.shape
    if k != 2 * num_stages + 1 or num_stages < 2:
        raise ValueError(f'a {k}x{k} kernel does not factor into {num_stages} stacked 3x3 kernels')
    s = num_stages - 1
    # the stage shift i and last-stage tap r that reach each offset p: i = min(p // s, 2), r = p - s i
    route = [(min(p // s, 2), p - s * min(p // s, 2)) for p in range(k)]
    offsets = [[p for p, (i, r) in enumerate(route) if i == shift and r <= 2] for shift in range(3)]
    # the intermediate channels (c, i, j), the most energetic first when they do not all fit
    energy = {(c, i, j): kernel[:, c][:, offsets[i]][:, :, offsets[j]].square().sum().item()
              for c in range(c_in) for i in range(3) for j in range(3)
              if offsets[i] and offsets[j]}
    chosen = sorted(energy, key=lambda n: -energy[n])[:width]
    dtype, device = kernel.dtype, kernel.device
    shapes = [(width, c_in)] + [(width, width)] * (num_stages - 2) + [(c_out, width)]
    stages = []
    for idx, (o, i_) in enumerate(shapes):
        base = fill[idx].to(dtype) if fill is not None else torch.zeros(o, i_, 3, 3, dtype=dtype)
        stages.append(base.detach().clone().to(device))
    used = len(chosen)
    # first stage: channel n = (c, i, j) is input c shifted by (i, j); rows >= used keep fill
    stages[0][:used] = 0
    for n, (c, i, j) in enumerate(chosen):
        stages[0][n, c, i, j] = 1
    # middle stages: channel n shifted by (i, j) again; rows >= used keep fill, their columns
    # < used are read by nothing that reaches the output
    for st in stages[1:-1]:
        st[:used] = 0
        for n, (c, i, j) in enumerate(chosen):
            st[n, n, i, j] = 1
    # last stage: the taps of kernel, routed; no column for the unused channels
    last = stages[-1]
    last.zero_()
    for n, (c, i, j) in enumerate(chosen):
        for p in offsets[i]:
            for q in offsets[j]:
                last[:, n, route[p][1], route[q][1]] = kernel[:, c, p, q]
    composed = stages[0]
    for st in stages[1:]:
        composed = compose(composed, st)
    err = ((composed - kernel).norm() / kernel.norm().clamp_min(1e-300)).item()
    return stages, err



def rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``sum(a * b)`` over all but the first dimension: one dot product per row."""
    n = a.shape[0]
    return torch.linalg.vecdot(a.reshape(n, -1), b.reshape(n, -1))
