"""Kernel algebra of OREPA: small pure, differentiable functions on conv kernels.

Shapes follow PyTorch: a kernel is ``(C_out, C_in // groups, k, k)`` and a conv is a cross-correlation.
Every function here works on kernels only (never on feature maps), is differentiable, and keeps the
dtype and device of its inputs. The layers in :mod:`mmorepa.layers` compose these functions; the
paper's equations are named in each docstring (``Eq.`` = main paper, ``supp`` = supplementary).
"""
import functools
import math
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

try:  # built by setup.py from mmorepa/csrc/squeeze_cpu.cpp (pip install -e .)
    from mmorepa import _squeeze_cpu
    _NOT_BUILT = None
except ImportError as err:  # a source tree used without its build step
    _squeeze_cpu, _NOT_BUILT = None, err

__all__ = [
    'fuse_bn', 'pad_to', 'compose', 'compose_1x1', 'compose_1x1_depthwise', 'avg_kernel',
    'frequency_prior', 'dw_pw_to_full', 'identity_kernel', 'scaled_sum', 'factor_into_3x3',
]


def fuse_bn(kernel: Tensor, bias: Optional[Tensor], running_mean: Tensor, running_var: Tensor,
            weight: Optional[Tensor], shift: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm that follows a conv into the conv's kernel and bias.

    ``BN(W * x + b) = (gamma / sigma) W * x + beta + (b - mu) gamma / sigma`` with
    ``sigma = sqrt(var + eps)``: the post-addition norm of Sec. 3.2 (and the branch-wise norms of
    DBB / RepVGG) become part of a single conv at deploy time.
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


def _pair_images(second: Tensor, groups: int) -> Tensor:
    """A ``(C2, C1 // g, k, k)`` kernel as a batch of ``C2 // g`` images with ``C1`` channels
    (group-major) of ``k^2 x 1`` pixels: the input of :func:`compose_1x1`'s 1x1 conv (a view
    when ``groups == 1``)."""
    c2, c1g, kh, kw = second.shape
    g = groups
    return second.reshape(g, c2 // g, c1g, kh * kw).transpose(0, 1).reshape(
        c2 // g, g * c1g, kh * kw, 1)


def _pair_kernel(images: Tensor, groups: int) -> Tensor:
    """The inverse of :func:`_pair_images`: ``(C2 // g, g * C, p, 1)`` images as the grouped
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
    out = _pair_kernel(F.conv2d(_pair_images(second, g), weight, groups=g), g)
    return _kernel_or_accumulate(out, (c2, c0g, kh, kw), scale, accumulate)


def _kernel_or_accumulate(out: Tensor, shape, scale: Optional[Tensor],
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
    out = torch.bmm(dw, _pw_by_input(pointwise, g, m))  # (i, p, o)
    out = out.transpose(1, 2).contiguous().reshape(g, cig, og, p).transpose(1, 2)  # (g, o, i, p)
    return _kernel_or_accumulate(out, (c_out, cig, kh, kw), scale, accumulate)


def _pw_by_input(pointwise: Tensor, groups: int, m: int) -> Tensor:
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


def scaled_sum(kernels: Sequence[Tensor], scales: Optional[Tensor]) -> Tensor:
    """Eq. 4 with the linear scaling layers of Sec. 3.2: ``sum_m gamma_m * W_m``.

    ``kernels`` are same-shape ``(C_out, C_in // g, k, k)`` branch kernels; ``scales`` is
    ``(M, C_out)`` (vector scaling), ``(M, 1)`` (scalar scaling) or ``None`` (no scaling).
    """
    stacked = torch.stack(list(kernels))
    if scales is None:
        return stacked.sum(0)
    return torch.einsum('mo,moihw->oihw', scales.expand(len(kernels), stacked.shape[1]), stacked)


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


# -- the online squeeze of one OREPA layer: Eq. 4 with scaling, with its own backward ----------------
SQUEEZE_BRANCHES = ('kxk', '1x1', '1x1_kxk', '1x1_avg', '1x1_freq', 'dw_pw')
# The leaf tensors of each branch, by name (``'1x1_kxk'``: the learnable first factor and the
# ``k x k`` second one; the first factor is ``identity + first`` when an identity is given).
SQUEEZE_LEAVES = {'kxk': ('kxk', ), '1x1': ('1x1', ), '1x1_kxk': ('1x1_kxk.first', '1x1_kxk.second'),
                  '1x1_avg': ('1x1_avg', ), '1x1_freq': ('1x1_freq', ), 'dw_pw': ('dw', 'pw')}


def _scale_col(scales: Optional[Tensor], row: int) -> Optional[Tensor]:
    """Row ``row`` of the scaling layer as an output-channel column ``(C_out or 1, 1, 1, 1)``."""
    return None if scales is None else scales[row].reshape(-1, 1, 1, 1)


def _first_factor(leaves, identity):
    first = leaves['1x1_kxk.first']
    return first if identity is None else identity + first


def squeeze_reference(branches: Sequence[str], leaves: dict, scales: Optional[Tensor],
                      kernel_size: int, groups: int, in_channels: int,
                      identity: Optional[Tensor] = None,
                      freq_prior: Optional[Tensor] = None) -> Tensor:
    """Eq. 4 with the scaling layers of Sec. 3.2, ``sum_m gamma_m * W_m``, each branch kernel
    ``W_m`` by Eq. 3 (supp Eq. 2 for the 1x1-kxk pair), written with the kernel functions above
    and differentiated by autograd. Each scaling vector goes on the branch's last factor (scaling
    output channels commutes with composing on the input side), so no branch kernel is stacked.

    ``branches``: names from :data:`SQUEEZE_BRANCHES`, in the row order of ``scales`` (``(M,
    C_out)``, ``(M, 1)`` or ``None``); ``leaves``: the tensors named in :data:`SQUEEZE_LEAVES` for
    those branches; ``identity``: added to the 1x1-kxk first factor (or ``None``);
    ``freq_prior``: the ``(C_out, k, k)`` filters of the 1x1-frequency-prior branch.
    """
    k = kernel_size
    terms = []

    def scaled(row, w):
        s = _scale_col(scales, row)
        return w if s is None else w * s

    for row, b in enumerate(branches):
        if b == 'kxk':
            terms.append(scaled(row, leaves['kxk']))
        elif b == '1x1':
            terms.append(pad_to(scaled(row, leaves['1x1']), k))
        elif b == '1x1_kxk':
            terms.append(compose_1x1(_first_factor(leaves, identity),
                                     scaled(row, leaves['1x1_kxk.second']), groups))
        elif b == '1x1_avg':
            w = scaled(row, leaves['1x1_avg'])
            terms.append(compose_1x1_depthwise(w, avg_kernel(k, w.dtype, w.device)))
        elif b == '1x1_freq':
            terms.append(compose_1x1_depthwise(scaled(row, leaves['1x1_freq']), freq_prior))
        elif b == 'dw_pw':
            terms.append(dw_pw_to_full(leaves['dw'], scaled(row, leaves['pw']), in_channels,
                                       groups))
        else:
            raise ValueError(f'unknown branch {b!r}; expected one of {list(SQUEEZE_BRANCHES)}')
    return sum(terms[1:], terms[0])


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``sum(a * b)`` over all but the first dimension: one dot product per row."""
    n = a.shape[0]
    return torch.linalg.vecdot(a.reshape(n, -1), b.reshape(n, -1))


def _out_channels(leaves: dict) -> int:
    """The output channels of a squeeze, from whichever of its leaves has them."""
    return next(leaves[n] for n in ('kxk', '1x1_kxk.second', 'pw', '1x1', '1x1_avg', '1x1_freq')
                if n in leaves).shape[0]


# The branches whose squeeze is memory-bound (O(C^2 k^2) per layer): on the CPU the extension
# mmorepa._squeeze_cpu forms them in one pass each way; the 1x1-kxk pair (a matrix product) stays
# with torch. ``_FIXED``: a 1x1 followed by a fixed per-output-channel filter.
_ONE_PASS = ('kxk', '1x1', '1x1_avg', '1x1_freq', 'dw_pw')
_FIXED = ('1x1', '1x1_avg', '1x1_freq')


def _fixed_filters(fixed, c_out, k, freq_prior, like: Tensor) -> Tensor:
    """The filters of the fixed-filter branches ``fixed``, ``(n_fixed, C_out, k^2)``: the centre
    tap (1x1, Eq. 4's padding), ``1/k^2`` (1x1-avg), the frequency prior (1x1-freq)."""
    p = k * k
    filters = like.new_zeros(len(fixed), c_out, p)
    for j, b in enumerate(fixed):
        if b == '1x1':
            filters[j, :, p // 2] = 1
        elif b == '1x1_avg':
            filters[j] = 1.0 / p
        else:
            filters[j] = freq_prior.reshape(-1, p)
    return filters


def _one_pass_operands(branches, leaves, scales, k, groups, in_channels, freq_prior):
    """The operands of :mod:`mmorepa._squeeze_cpu` for the memory-bound branches of this squeeze
    (``(rows, scales, kxk, fixed 1x1s, filters, dw, pw)``, ``rows`` their rows of ``scales``), or
    ``None`` where the extension does not apply: not built, not on the CPU (meta tensors, which
    count FLOPs, included), not float32 / float64, mixed dtypes, no such branch, or sizes beyond
    its registers (kernels above 11 x 11, a dw-pw expansion above 64)."""
    rows = [r for r, b in enumerate(branches) if b in _ONE_PASS]
    if not rows:
        return None
    names = [n for r in rows for n in SQUEEZE_LEAVES[branches[r]]]
    tensors = [leaves[n] for n in names] + [t for t in (scales, freq_prior) if t is not None]
    dtype = tensors[0].dtype
    if dtype not in (torch.float32, torch.float64) or any(
            t.dtype != dtype or t.device.type != 'cpu' for t in tensors):
        return None
    if _squeeze_cpu is not None and (
            k * k > _squeeze_cpu.MAX_TAPS or ('dw_pw' in branches and leaves['dw'].shape[0]
                                              > _squeeze_cpu.MAX_EXPANSION * in_channels)):
        return None
    if _squeeze_cpu is None:
        if _NOT_BUILT is not None:  # said once (the warning filters' default)
            warnings.warn(f'mmorepa._squeeze_cpu is not built ({_NOT_BUILT}): OREPA squeezes '
                          "run on torch's operators, several times slower on the CPU; "
                          'pip install -e . (tools/setup_env.sh) builds it', RuntimeWarning,
                          stacklevel=2)
        return None
    # rows in the extension's order: kxk, the fixed-filter branches, dw-pw
    kxk = [r for r in rows if branches[r] == 'kxk']
    fixed = [r for r in rows if branches[r] in _FIXED]
    dwpw = [r for r in rows if branches[r] == 'dw_pw']
    order = kxk + fixed + dwpw
    c_out = _out_channels(leaves)
    if scales is None:
        rows_scales = leaves[names[0]].new_ones(len(order), c_out)
    else:
        rows_scales = scales[order].expand(len(order), c_out).contiguous()
    flat = lambda t: t.contiguous().reshape(t.shape[0], -1)  # noqa: E731
    return (order, rows_scales, flat(leaves['kxk']) if kxk else None,
            [flat(leaves[branches[r]]) for r in fixed],
            _fixed_filters([branches[r] for r in fixed], c_out, k, freq_prior, rows_scales),
            flat(leaves['dw']) if dwpw else None, flat(leaves['pw']) if dwpw else None)


def _squeeze_accumulated(branches, leaves, scales, k, groups, in_channels, identity, freq_prior):
    """The value of :func:`squeeze_reference` (no autograd): the same kernel functions, each term
    scaled and added into one kernel in the pass that writes it."""
    ref = next(iter(leaves.values()))
    c_out = _out_channels(leaves)
    one_pass = _one_pass_operands(branches, leaves, scales, k, groups, in_channels, freq_prior)
    if one_pass is not None:
        # the pair composed (unscaled) by torch; the extension adds the rest over it
        _, rows_scales, *operands = one_pass
        cig, pair = in_channels // groups, None
        if '1x1_kxk' in branches:
            row = branches.index('1x1_kxk')
            pair = compose_1x1(_first_factor(leaves, identity), leaves['1x1_kxk.second'],
                               groups).reshape(c_out, cig, k * k).contiguous()
            s = rows_scales.new_ones(1, c_out) if scales is None else scales[row:row + 1]
            rows_scales = torch.cat([rows_scales, s.expand(1, c_out)])
        return _squeeze_cpu.squeeze_forward(rows_scales, *operands, pair, c_out, cig, groups,
                                            k * k).view(c_out, cig, k, k)
    # start from a full-size kernel (kxk; the 1x1 itself when k = 1) or from zeros
    total, start = None, 'kxk' if 'kxk' in branches else '1x1' if k == 1 else None
    for row, b in enumerate(branches):
        if b == start:
            s = _scale_col(scales, row)
            total = leaves[b] * s if s is not None else leaves[b].clone()
    if total is None:
        total = ref.new_zeros(c_out, in_channels // groups, k, k)
    for row, b in enumerate(branches):
        s = None if scales is None else scales[row]
        if b == start:
            continue
        if b == '1x1':
            w = leaves['1x1'] if s is None else leaves['1x1'] * s.reshape(-1, 1, 1, 1)
            total[:, :, k // 2, k // 2] += w[:, :, 0, 0]  # pad_to: the centre tap
        elif b == '1x1_kxk':
            compose_1x1(_first_factor(leaves, identity), leaves['1x1_kxk.second'], groups, s,
                        accumulate=total)
        elif b == '1x1_avg':
            compose_1x1_depthwise(leaves['1x1_avg'], avg_kernel(k, total.dtype, total.device), s,
                                  accumulate=total)
        elif b == '1x1_freq':
            compose_1x1_depthwise(leaves['1x1_freq'], freq_prior, s, accumulate=total)
        elif b == 'dw_pw':
            dw_pw_to_full(leaves['dw'], leaves['pw'], in_channels, groups, s, accumulate=total)
    return total


def _squeeze_backward(grad, branches, leaves, needs, need_scales, scales, k, groups, in_channels,
                      identity, freq_prior):
    """The backward of :func:`squeeze`: the gradients of the leaves (``None`` where ``needs`` is
    false) and of the scales (``None`` unless ``need_scales``) for ``grad``, the gradient of the
    squeezed kernel. With ``G`` the gradient of the squeezed kernel and ``s`` a branch's scaling
    vector (chain rule through Eq. 3, 4 and supp Eq. 2, per group; ``<., .>_o``: sum over all but
    the output channel):

    - kxk: ``dW = s G``; ``ds = <G, W>_o``.
    - 1x1, 1x1-avg, 1x1-freq (a 1x1 ``w`` then a fixed filter ``f_o``: the centre tap, ``1/k^2``,
      the prior): ``H[o, i] = sum_p G[o, i, p] f_o[p]``; ``dw = s H``; ``ds = <H, w>_o``.
    - 1x1-kxk (``K[o, i, p] = s_o sum_m B[o, m, p] A[m, i]``): ``T[o, m, p] = sum_i G[o, i, p]
      A[m, i]``; ``dB = s T``; ``ds = <T, B>_o``; ``dA[m, i] = sum_{o, p} s_o B[o, m, p]
      G[o, i, p]``.
    - dw-pw (``K[o, i, p] = s_o sum_m pw[o, i, m] dw[i, m, p]``): ``T[o, i, m] = sum_p G[o, i, p]
      dw[i, m, p]``; ``dpw = s T``; ``ds = <T, pw>_o``; ``ddw[i, m, p] = sum_o s_o pw[o, i, m]
      G[o, i, p]``.

    A scalar scale's gradient is the sum of the per-channel ones. The matrix products are those
    of autograd through :func:`squeeze_reference` (no more FLOPs); the element-wise work is one
    pass per layout change or scaling, scaling fused into the layout changes. On the CPU the
    branches other than 1x1-kxk go to :mod:`mmorepa._squeeze_cpu` (one pass over ``G``).
    """
    c_out, cig = grad.shape[:2]
    g, og, p = groups, c_out // groups, k * k
    out = {}
    scale_grads = []
    fixed, done = [], {}  # done: the extension's per-channel scale gradient of each of its rows
    one_pass = _one_pass_operands(branches, leaves, scales, k, groups, in_channels, freq_prior)
    # a channels-last gradient (torch.compile's layout) goes to the extension as it is, unless
    # the pair's products need it contiguous
    taps_outer = (one_pass is not None and '1x1_kxk' not in branches
                  and not grad.is_contiguous()
                  and grad.is_contiguous(memory_format=torch.channels_last))
    if taps_outer:
        g3 = grad.permute(0, 2, 3, 1).reshape(c_out, p, cig)  # a view
    else:
        grad = grad.contiguous()
        g3 = grad.reshape(c_out, cig, p)
    if one_pass is not None:
        order, *operands = one_pass
        names = [n for r in order for n in SQUEEZE_LEAVES[branches[r]]]
        res = _squeeze_cpu.squeeze_backward(g3, *operands, groups, [needs[n] for n in names],
                                            taps_outer)
        nf = len(operands[2])
        by_name = ([res[1]] if 'kxk' in names else []) + res[2:2 + nf] + (
            res[-2:] if 'dw' in names else [])
        for n, t in zip(names, by_name):
            if t is not None:
                out[n] = t.view(leaves[n].shape)
        done = dict(zip(order, res[0]))
    else:
        # the 1x1 branches followed by a fixed per-channel filter: one batched product for all,
        # [n_fixed, p] @ [p, i] per output channel (the long side last), read as (n_fixed, o, i)
        fixed = [b for b in branches if b in _FIXED]
    if fixed:
        filters = _fixed_filters(fixed, c_out, k, freq_prior, grad).transpose(0, 1)
        h = torch.bmm(filters, g3.transpose(1, 2)).transpose(0, 1)  # (n_fixed, C_out, C_in/g)
    for row, b in enumerate(branches):
        s = None if scales is None else scales[row]
        sv = None if s is None else s.reshape(-1).expand(c_out)  # per output channel
        ds = None
        if row in done:
            ds = done[row]
        elif b == 'kxk':
            w = leaves['kxk']
            if needs['kxk']:
                out['kxk'] = grad if s is None else grad * sv.reshape(-1, 1, 1, 1)
            if need_scales:
                ds = _rowdot(grad, w)
        elif b in fixed:
            w = leaves[b]
            hb = h[fixed.index(b)]
            if needs[b]:
                out[b] = (hb if s is None else hb * sv.reshape(-1, 1)).reshape(w.shape)
            if need_scales:
                ds = _rowdot(hb, w)
        elif b == '1x1_kxk':
            # the forward is a 1x1 conv (compose_1x1): its data gradient for G is the
            # unscaled gradient T of the second factor, its weight gradient with the scaled
            # second factor as input is the first factor's (transposed); one backward call
            first, second = _first_factor(leaves, identity), leaves['1x1_kxk.second']
            c1g = second.shape[1]
            need_t = needs['1x1_kxk.second'] or need_scales
            need_a = needs['1x1_kxk.first']
            scaled = second if s is None or not need_a else second * sv.reshape(-1, 1, 1, 1)
            weight = first.reshape(g, c1g, cig).transpose(1, 2).reshape(g * cig, c1g, 1, 1)
            t, da, _ = torch.ops.aten.convolution_backward(
                _pair_images(grad, g), _pair_images(scaled, g), weight, None, [1, 1],
                [0, 0], [1, 1], False, [0, 0], g, [need_t, need_a, False])
            if need_t:
                t = _pair_kernel(t, g).reshape(second.shape)
                if need_scales:
                    ds = _rowdot(t, second)
                if needs['1x1_kxk.second']:
                    out['1x1_kxk.second'] = t if s is None else t.mul_(
                        sv.reshape(-1, 1, 1, 1))
            if need_a:
                out['1x1_kxk.first'] = da.reshape(g, cig, c1g).transpose(1, 2).reshape(
                    first.shape)
        elif b == 'dw_pw':
            dw, pw = leaves['dw'], leaves['pw']
            m = dw.shape[0] // in_channels
            dw3 = dw.reshape(g * cig, m, p)
            if needs['pw'] or need_scales:
                # per input channel [m, p] @ [p, o] (G read in place when groups == 1), then
                # (i, o, m) and the pointwise layout (o, i, m) in two cheap transposes
                gt = grad.reshape(g, og, cig, p).permute(0, 2, 3, 1).reshape(g * cig, p, og)
                t = torch.bmm(dw3, gt).transpose(1, 2).contiguous()  # (i, o, m)
                t = t.reshape(g, cig, og, m).transpose(1, 2).reshape(pw.shape)
                if need_scales:
                    ds = _rowdot(t, pw)
                if needs['pw']:
                    out['pw'] = t if s is None else t.mul_(sv.reshape(-1, 1, 1, 1))
            if needs['dw']:
                pws = pw if s is None else pw * sv.reshape(-1, 1, 1, 1)
                gi = grad.reshape(g, og, cig, p).transpose(1, 2).reshape(g * cig, og, p)
                out['dw'] = torch.bmm(_pw_by_input(pws, g, m), gi).reshape(dw.shape)
        if need_scales:
            scale_grads.append(ds.sum(0, keepdim=True) if s.numel() == 1 else ds)
    grad_scales = torch.stack(scale_grads).to(scales.dtype) if need_scales else None
    return grad_scales, out


# The squeeze and its backward as two operators of their own (torch.library), joined by one
# autograd node (``_Squeeze``): eager they run the functions above; under torch.compile they stay
# opaque, so the compiler neither re-lays out their operands (which sent the batched products to a
# copy per matrix) nor unfuses their passes.
def _squeeze_impl(leaves: List[Tensor], scales: Optional[Tensor], identity: Optional[Tensor],
                  freq_prior: Optional[Tensor], branches: str, kernel_size: int, groups: int,
                  in_channels: int, out_channels: int) -> Tensor:
    """``branches``: the branch names joined by commas; ``leaves``: their tensors, in the order of
    :data:`SQUEEZE_LEAVES`."""
    branches = tuple(branches.split(','))
    # contiguous, as the fake says, whatever the leaves' memory format (channels-last models)
    kernel = _squeeze_accumulated(branches, dict(zip(_leaf_names(branches), leaves)), scales,
                                  kernel_size, groups, in_channels, identity, freq_prior)
    return kernel.contiguous()


def _leaf_names(branches):
    return [n for b in branches for n in SQUEEZE_LEAVES[b]]


_squeeze_op = torch.library.custom_op('mmorepa::squeeze', _squeeze_impl, mutates_args=())


@_squeeze_op.register_fake
def _(leaves, scales, identity, freq_prior, branches, kernel_size, groups, in_channels,
      out_channels):
    return leaves[0].new_empty(out_channels, in_channels // groups, kernel_size, kernel_size)


def _squeeze_backward_impl(grad: Tensor, leaves: List[Tensor], scales: Optional[Tensor],
                           identity: Optional[Tensor], freq_prior: Optional[Tensor],
                           branches: str, kernel_size: int, groups: int, in_channels: int,
                           needs: List[bool], need_scales: bool) -> List[Tensor]:
    """``[grad of scales] + [grad of each leaf]``, an empty tensor where none is needed (an
    operator returns tensors only, contiguous as its fake says, and none that aliases an
    input)."""
    branches = tuple(branches.split(','))
    names = _leaf_names(branches)
    grad_scales, out = _squeeze_backward(
        grad, branches, dict(zip(names, leaves)), dict(zip(names, needs)), need_scales, scales,
        kernel_size, groups, in_channels, identity, freq_prior)
    grads = [grad_scales] + [out.get(n) for n in names]
    # no return may share memory with an input or another return (one output channel without
    # scaling makes the fixed-filter branches' gradients contiguous views of one product)
    taken = {t.untyped_storage().data_ptr() for t in [grad, *leaves] if t is not None}
    result = []
    for g in grads:
        if g is None:
            result.append(grad.new_empty(0))
            continue
        g = g.contiguous()
        if g.untyped_storage().data_ptr() in taken:
            g = g.clone()
        taken.add(g.untyped_storage().data_ptr())
        result.append(g)
    return result


_squeeze_backward_op = torch.library.custom_op('mmorepa::squeeze_backward',
                                               _squeeze_backward_impl, mutates_args=())


@_squeeze_backward_op.register_fake
def _(grad, leaves, scales, identity, freq_prior, branches, kernel_size, groups, in_channels,
      needs, need_scales):
    return ([scales.new_empty(scales.shape) if need_scales else grad.new_empty(0)]
            + [t.new_empty(t.shape) if n else grad.new_empty(0) for t, n in zip(leaves, needs)])


class _Squeeze(torch.autograd.Function):
    """One autograd node over the two operators: it saves only the leaves and calls the backward
    operator. (An autograd.Function rather than the operator's own autograd registration, so that
    ``torch.func`` transforms take gradients through it.)"""

    @staticmethod
    def forward(spec, scales, identity, freq_prior, *leaves):
        return _squeeze_op(list(leaves), scales, identity, freq_prior, *spec)

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, scales, identity, freq_prior, *leaves = inputs
        ctx.spec = spec
        ctx.save_for_backward(scales, identity, freq_prior, *leaves)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        branches, kernel_size, groups, in_channels, _ = ctx.spec
        scales, identity, freq_prior, *leaves = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[4:])
        need_scales = ctx.needs_input_grad[1]
        grads = _squeeze_backward_op(grad, leaves, scales, identity, freq_prior, branches,
                                     kernel_size, groups, in_channels, needs, need_scales)
        return (None, grads[0] if need_scales else None, None, None,
                *[g if n else None for g, n in zip(grads[1:], needs)])


def _counted_flops(op, *args, out_val=None, **kwargs) -> int:
    """What ``FlopCounterMode`` counts inside an operator it cannot see into: ``op``, the
    operator's implementation, run on meta copies of its arguments under a counter of its own.
    So the FLOPs counted for an OREPA model include the squeeze's products, whatever they are."""
    meta = torch.utils._pytree.tree_map_only(Tensor, lambda t: t.to('meta'), (args, kwargs))
    with FlopCounterMode(display=False) as counter:
        op(*meta[0], **meta[1])
    return counter.get_total_flops()


register_flop_formula(torch.ops.mmorepa.squeeze, get_raw=True)(
    functools.partial(_counted_flops, _squeeze_impl))
register_flop_formula(torch.ops.mmorepa.squeeze_backward, get_raw=True)(
    functools.partial(_counted_flops, _squeeze_backward_impl))


def squeeze(branches: Sequence[str], leaves: dict, scales: Optional[Tensor], kernel_size: int,
            groups: int, in_channels: int, identity: Optional[Tensor] = None,
            freq_prior: Optional[Tensor] = None) -> Tensor:
    """The squeezed kernel of one OREPA layer (Eq. 4 with scaling; Eq. 3 / supp Eq. 2 per branch):
    the value of :func:`squeeze_reference`, computed by one operator (``mmorepa::squeeze``) in one
    autograd node that keeps only the leaves for backward and calls the backward operator
    (``mmorepa::squeeze_backward``, :func:`_squeeze_backward`). A layer whose ``squeeze_fn`` is
    set to :func:`squeeze_reference` uses plain autograd instead (for comparisons). Traced for
    TorchScript / ONNX export it raises: export the fused model."""
    for b in branches:
        if b not in SQUEEZE_LEAVES:
            raise ValueError(f'unknown branch {b!r}; expected one of {list(SQUEEZE_BRANCHES)}')
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        # TorchScript tracing (the ONNX exporter) sees into no operator of its own, records
        # in-place updates of views wrongly and cannot export a conv of a computed kernel: say so
        raise RuntimeError('an un-fused OREPA layer cannot be traced for export: fuse the model '
                           'first (mmorepa.reparameterize(model), as tools/export_onnx.py does)')
    spec = (','.join(branches), kernel_size, groups, in_channels, _out_channels(leaves))
    return _Squeeze.apply(spec, scales, identity, freq_prior,
                          *(leaves[n] for n in _leaf_names(branches)))
