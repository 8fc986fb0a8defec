"""The branch registry: one record per linear branch of OREPA's layers (Fig. 6, supp Table 1).

A :class:`Branch` holds everything a branch is: its name, its learnable leaves (the layer's
parameters: shape, initialisation from supp Table 1, key in the official checkpoints), the fixed
tensor it reads (the identity, the frequency prior), its initial scaling factor (supp 2.1), its
kernel as a pure function (the equation it implements), its share of the squeeze forward and
backward (:mod:`mmorepa.ops.squeeze`, Eq. 4 with the scaling of Sec. 3.2), its role in the CPU
extension, and the multiply-adds its kernel costs. The squeeze, the layers, their routes, the
official import and the tests iterate over :data:`OREPA_BRANCHES` and :data:`REP1X1_BRANCHES`;
adding a branch adds a record here (and to the C++ extension only if it gets a fast path there).

:data:`OREPA_BRANCHES` is in the row order of the OREPA block's scaling vector, which is the order
of the official checkpoints (and of every checkpoint of :class:`~mmorepa.layers.OREPAConv2d`).

Terms of a squeeze (:class:`Terms`): ``k`` the kernel size, ``groups``, ``in_channels``,
``identity`` (added to a conv pair's first factor, or ``None``), ``freq_prior`` (the
``(C_out, k, k)`` filters). A branch's ``scale`` is its row of the scaling layer as an
output-channel column ``(C_out or 1, 1, 1, 1)`` (or ``None``); it goes on the branch's last factor,
since scaling output channels commutes with composing on the input side.
"""
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .algebra import (avg_kernel, compose_1x1, compose_1x1_depthwise, dw_pw_to_full,
                      frequency_prior, identity_kernel, pad_to, pair_images, pair_kernel,
                      pointwise_by_input, rowdot)


@dataclass(frozen=True)
class Geometry:
    """What the leaves' shapes and the fixed tensors depend on."""
    in_channels: int
    out_channels: int
    kernel_size: int
    groups: int = 1
    dw_expansion: int = 8


@dataclass(frozen=True)
class Terms:
    """The fixed inputs of one squeeze (see the module docstring)."""
    k: int
    groups: int
    in_channels: int
    identity: Optional[Tensor] = None
    freq_prior: Optional[Tensor] = None


@dataclass(frozen=True)
class Leaf:
    """A learnable tensor of a branch: the layer's parameter ``attr``."""
    attr: str
    shape: Callable[[Geometry], Tuple[int, ...]]
    init: Callable[[Tensor, Geometry], Tensor]  # fills its argument in place (supp Table 1)
    official: Optional[str] = None  # its key in the official checkpoints' block


@dataclass(frozen=True)
class Branch:
    """One linear branch (see the module docstring).

    ``kernel(leaves, scale, terms)``: the branch's ``k x k`` kernel, scaled when ``scale`` is given.
    ``accumulate(total, leaves, scale, terms)``: adds that kernel into ``total`` in place (no
    autograd), in the pass that writes it. ``backward(grads, leaves, needs, scale, terms)``: the
    gradients of the leaves (``None`` where ``needs`` is false) and the per-output-channel gradient
    of the scale (``None`` unless ``grads.need_scales``) for the gradient of the squeezed kernel
    (:class:`SqueezeGrads`). ``macs(shapes)``: multiply-adds of forming the kernel from leaves of
    ``shapes`` (matrix products; element-wise work counts 0). ``extension``: the branch's kind in
    the CPU extension (``'full'``: a full-size kernel; ``'fixed'``: a 1x1 followed by the fixed
    per-output-channel filter ``fixed_filter(c_out, k, freq_prior, like)`` ``(C_out, k^2)``;
    ``'separable'``: a depthwise then a pointwise kernel), ``None`` for torch's operators.
    ``full_size(k)``: the kernel is the leaf itself (the squeeze's sum starts from it).
    ``conv_pair``: a 1x1 conv then a ``k x k`` conv, whose composition costs ``C^3 k^2``; the
    layers' routes may compute it on the feature maps instead. ``buffers``: the fixed tensors the
    layer registers for it (name, builder).
    """
    name: str
    leaves: Tuple[Leaf, ...]
    scale_init: float
    kernel: Callable
    accumulate: Callable
    backward: Callable
    macs: Callable[[Sequence[Tuple[int, ...]]], int] = lambda shapes: 0
    extension: Optional[str] = None
    fixed_filter: Optional[Callable] = None
    full_size: Callable[[int], bool] = lambda k: False
    conv_pair: bool = False
    buffers: Tuple[Tuple[str, Callable[[Geometry], Tensor]], ...] = field(default=())

    def attrs(self) -> Tuple[str, ...]:
        return tuple(leaf.attr for leaf in self.leaves)

    def __reduce__(self):
        # pickled by name (torch.save(model), deepcopy): the record is rebuilt from the registry
        return (_branch_by_name, (self.name, ))


@dataclass
class SqueezeGrads:
    """What every branch's backward reads: ``grad`` (contiguous) and ``g3`` (its
    ``(C_out, C_in / g, k^2)`` view), ``fixed`` (a fixed-filter branch's ``fixed_filter`` ->
    ``H[o, i] = sum_p G[o, i, p] f_o[p]``), ``need_scales``."""
    grad: Tensor
    g3: Tensor
    fixed: Dict[Callable, Tensor]
    need_scales: bool


# -- initialisation (supp Table 1) -----------------------------------------------------------------
def conv_init_(weight: Tensor, geometry: Optional[Geometry] = None) -> Tensor:
    """PyTorch's default conv initialisation (uniform in +-1/sqrt(fan_in)), supp Table 1 "Conv"."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return weight


def zeros_init_(weight: Tensor, geometry: Optional[Geometry] = None) -> Tensor:
    """Zeros: the learnable delta of an identity-initialised 1x1 (supp Table 1, "Conv 1x1
    iden.")."""
    return weight.zero_()


def _rep1x1_mid(g: Geometry) -> int:
    return min(g.in_channels, g.out_channels)


def _rep1x1_first_init_(weight: Tensor, g: Geometry) -> Tensor:
    """Rep-1x1's first factor: the identity when it is square (``C_in <= C_out``)."""
    if g.in_channels <= g.out_channels:
        return weight.copy_(identity_kernel(_rep1x1_mid(g), g.groups))
    return conv_init_(weight)


def _rep1x1_second_init_(weight: Tensor, g: Geometry) -> Tensor:
    """Rep-1x1's second factor: the identity when it is square (``C_in > C_out``)."""
    if g.in_channels <= g.out_channels:
        return conv_init_(weight)
    return weight.copy_(identity_kernel(_rep1x1_mid(g), g.groups))


def _full(g: Geometry):
    return (g.out_channels, g.in_channels // g.groups, g.kernel_size, g.kernel_size)


def _one_by_one(g: Geometry):
    return (g.out_channels, g.in_channels // g.groups, 1, 1)


# -- shared pieces ---------------------------------------------------------------------------------
def _scaled(w: Tensor, scale: Optional[Tensor]) -> Tensor:
    return w if scale is None else w * scale


def _by_channel(scale: Optional[Tensor], c_out: int) -> Optional[Tensor]:
    """A scale column as one factor per output channel ``(C_out,)``."""
    return None if scale is None else scale.reshape(-1).expand(c_out)


def _add_scaled_(total: Tensor, w: Tensor, scale: Optional[Tensor]) -> Tensor:
    return total.add_(w) if scale is None else total.addcmul_(w, scale)


def _first_factor(first: Tensor, identity: Optional[Tensor]) -> Tensor:
    return first if identity is None else identity + first


# -- kxk: a full k x k conv ------------------------------------------------------------------------
def _kxk_kernel(leaves, scale, t: Terms) -> Tensor:
    """The kernel itself (Eq. 4's ``W_m``)."""
    return _scaled(leaves[0], scale)


def _kxk_accumulate(total, leaves, scale, t: Terms):
    _add_scaled_(total, leaves[0], scale)


def _kxk_backward(gr: SqueezeGrads, leaves, needs, scale, t: Terms):
    """``dW = s G``; ``ds = <G, W>_o``."""
    sv = _by_channel(scale, gr.grad.shape[0])
    dw = None
    if needs[0]:
        dw = gr.grad if sv is None else gr.grad * sv.reshape(-1, 1, 1, 1)
    return [dw], rowdot(gr.grad, leaves[0]) if gr.need_scales else None


# -- the 1x1 branches followed by a fixed filter: 1x1 (centre tap), 1x1-avg, 1x1-freq ------------
def _one_by_one_kernel(leaves, scale, t: Terms) -> Tensor:
    """The 1x1 centred in ``k x k`` (Eq. 4's alignment, :func:`pad_to`)."""
    return pad_to(_scaled(leaves[0], scale), t.k)


def _one_by_one_accumulate(total, leaves, scale, t: Terms):
    w = _scaled(leaves[0], scale)
    total[:, :, t.k // 2, t.k // 2] += w[:, :, 0, 0]  # pad_to: the centre tap


def _avg_kernel(leaves, scale, t: Terms) -> Tensor:
    """1x1 then ``k x k`` average pooling (Eq. 3 with supp Table 1 "Pooling")."""
    w = _scaled(leaves[0], scale)
    return compose_1x1_depthwise(w, avg_kernel(t.k, w.dtype, w.device))


def _avg_accumulate(total, leaves, scale, t: Terms):
    compose_1x1_depthwise(leaves[0], avg_kernel(t.k, total.dtype, total.device), scale,
                          accumulate=total)


def _freq_kernel(leaves, scale, t: Terms) -> Tensor:
    """1x1 then the frequency prior (Eq. 3 with supp Table 1 "Filtering")."""
    return compose_1x1_depthwise(_scaled(leaves[0], scale), t.freq_prior)


def _freq_accumulate(total, leaves, scale, t: Terms):
    compose_1x1_depthwise(leaves[0], t.freq_prior, scale, accumulate=total)


def _centre_filter(c_out, k, freq_prior, like):
    filters = like.new_zeros(c_out, k * k)
    filters[:, k * k // 2] = 1
    return filters


def _avg_filter(c_out, k, freq_prior, like):
    return like.new_full((c_out, k * k), 1.0 / (k * k))


def _freq_filter(c_out, k, freq_prior, like):
    return freq_prior.reshape(-1, k * k).to(like)


def _fixed_backward(fixed_filter: Callable):
    def backward(gr: SqueezeGrads, leaves, needs, scale, t: Terms):
        """A 1x1 ``w`` then the fixed filter ``f_o``: ``H[o, i] = sum_p G[o, i, p] f_o[p]``;
        ``dw = s H``; ``ds = <H, w>_o``."""
        w, h = leaves[0], gr.fixed[fixed_filter]
        sv = _by_channel(scale, gr.grad.shape[0])
        dw = None
        if needs[0]:
            dw = (h if sv is None else h * sv.reshape(-1, 1)).reshape(w.shape)
        return [dw], rowdot(h, w) if gr.need_scales else None
    return backward


# -- a conv pair: 1x1 then k x k (1x1-kxk; Rep-1x1's 1x1-1x1 with k = 1) -------------------------
def _pair_kernel(leaves, scale, t: Terms) -> Tensor:
    """``K[o, i] = s_o sum_m B[o, m] A[m, i]`` (Eq. 3 in the pixel-wise form of supp Eq. 2), ``A``
    the first factor (plus the identity when given), ``B`` the second."""
    return compose_1x1(_first_factor(leaves[0], t.identity), _scaled(leaves[1], scale), t.groups)


def _pair_accumulate(total, leaves, scale, t: Terms):
    compose_1x1(_first_factor(leaves[0], t.identity), leaves[1], t.groups, scale,
                accumulate=total)


def _pair_backward(gr: SqueezeGrads, leaves, needs, scale, t: Terms):
    """``T[o, m, p] = sum_i G[o, i, p] A[m, i]``; ``dB = s T``; ``ds = <T, B>_o``;
    ``dA[m, i] = sum_{o, p} s_o B[o, m, p] G[o, i, p]``. The forward is a 1x1 conv
    (:func:`compose_1x1`): its data gradient for ``G`` is ``T``, its weight gradient with the
    scaled second factor as input is ``dA`` (transposed); one backward call."""
    grad, g = gr.grad, t.groups
    first, second = _first_factor(leaves[0], t.identity), leaves[1]
    sv = _by_channel(scale, grad.shape[0])
    cig, c1g = grad.shape[1], second.shape[1]
    need_t, need_a = needs[1] or gr.need_scales, needs[0]
    scaled = second if sv is None or not need_a else second * sv.reshape(-1, 1, 1, 1)
    weight = first.reshape(g, c1g, cig).transpose(1, 2).reshape(g * cig, c1g, 1, 1)
    tt, da, _ = torch.ops.aten.convolution_backward(
        pair_images(grad, g), pair_images(scaled, g), weight, None, [1, 1], [0, 0], [1, 1],
        False, [0, 0], g, [need_t, need_a, False])
    d_first = d_second = ds = None
    if need_t:
        tt = pair_kernel(tt, g).reshape(second.shape)
        if gr.need_scales:
            ds = rowdot(tt, second)
        if needs[1]:
            d_second = tt if sv is None else tt.mul_(sv.reshape(-1, 1, 1, 1))
    if need_a:
        d_first = da.reshape(g, cig, c1g).transpose(1, 2).reshape(first.shape)
    return [d_first, d_second], ds


def _pair_macs(shapes) -> int:
    """``C_out k^2 C_mid/g C_in/g``: the product of the composition."""
    (_, c_in_g, _, _), (c_out, c_mid_g, kh, kw) = shapes
    return c_out * kh * kw * c_mid_g * c_in_g


# -- dw-pw: a linear depthwise-separable pair ------------------------------------------------------
def _dw_pw_kernel(leaves, scale, t: Terms) -> Tensor:
    """``K[o, i] = s_o sum_m pw[o, i * M + m] dw[i * M + m]`` (Sec. 3.5, Eq. 3)."""
    return dw_pw_to_full(leaves[0], _scaled(leaves[1], scale), t.in_channels, t.groups)


def _dw_pw_accumulate(total, leaves, scale, t: Terms):
    dw_pw_to_full(leaves[0], leaves[1], t.in_channels, t.groups, scale, accumulate=total)


def _dw_pw_backward(gr: SqueezeGrads, leaves, needs, scale, t: Terms):
    """``T[o, i, m] = sum_p G[o, i, p] dw[i, m, p]``; ``dpw = s T``; ``ds = <T, pw>_o``;
    ``ddw[i, m, p] = sum_o s_o pw[o, i, m] G[o, i, p]``."""
    grad, g = gr.grad, t.groups
    dw, pw = leaves
    c_out, cig = grad.shape[:2]
    og, p = c_out // g, t.k * t.k
    sv = _by_channel(scale, c_out)
    m = dw.shape[0] // t.in_channels
    dw3 = dw.reshape(g * cig, m, p)
    d_dw = d_pw = ds = None
    if needs[1] or gr.need_scales:
        # per input channel [m, p] @ [p, o] (G read in place when groups == 1), then
        # (i, o, m) and the pointwise layout (o, i, m) in two cheap transposes
        gt = grad.reshape(g, og, cig, p).permute(0, 2, 3, 1).reshape(g * cig, p, og)
        tt = torch.bmm(dw3, gt).transpose(1, 2).contiguous()  # (i, o, m)
        tt = tt.reshape(g, cig, og, m).transpose(1, 2).reshape(pw.shape)
        if gr.need_scales:
            ds = rowdot(tt, pw)
        if needs[1]:
            d_pw = tt if sv is None else tt.mul_(sv.reshape(-1, 1, 1, 1))
    if needs[0]:
        pws = pw if sv is None else pw * sv.reshape(-1, 1, 1, 1)
        gi = grad.reshape(g, og, cig, p).transpose(1, 2).reshape(g * cig, og, p)
        d_dw = torch.bmm(pointwise_by_input(pws, g, m), gi).reshape(dw.shape)
    return [d_dw, d_pw], ds


def _fixed_filter_branch(fixed_filter: Callable, **record) -> Branch:
    """The record of a 1x1 followed by the fixed per-output-channel filter ``fixed_filter``: its
    backward reads that filter's product ``H`` and the extension takes it as a ``'fixed'``
    branch."""
    return Branch(backward=_fixed_backward(fixed_filter), extension='fixed',
                  fixed_filter=fixed_filter, **record)


def _dw_pw_macs(shapes) -> int:
    """``C_out C_in/g M k^2``: one product per input channel."""
    (_, _, kh, kw), (c_out, c_in_m_g, _, _) = shapes
    return c_out * c_in_m_g * kh * kw


# -- the records -----------------------------------------------------------------------------------
KXK = Branch(
    name='kxk', scale_init=0.25,
    leaves=(Leaf('weight_kxk', _full, conv_init_, 'weight_orepa_origin'), ),
    kernel=_kxk_kernel, accumulate=_kxk_accumulate, backward=_kxk_backward,
    extension='full', full_size=lambda k: True)

ONE_BY_ONE = _fixed_filter_branch(
    _centre_filter, name='1x1', scale_init=1.0,
    leaves=(Leaf('weight_1x1', _one_by_one, conv_init_, 'weight_orepa_1x1'), ),
    kernel=_one_by_one_kernel, accumulate=_one_by_one_accumulate, full_size=lambda k: k == 1)

ONE_BY_ONE_KXK = Branch(
    name='1x1_kxk', scale_init=0.5,
    leaves=(Leaf('weight_1x1_kxk_idconv1', lambda g: (g.in_channels, g.in_channels // g.groups,
                                                       1, 1),
                 zeros_init_, 'weight_orepa_1x1_kxk_idconv1'),
            Leaf('weight_1x1_kxk_conv2', _full, conv_init_, 'weight_orepa_1x1_kxk_conv2')),
    kernel=_pair_kernel, accumulate=_pair_accumulate, backward=_pair_backward,
    macs=_pair_macs, conv_pair=True,
    buffers=(('identity', lambda g: identity_kernel(g.in_channels, g.groups)), ))

ONE_BY_ONE_AVG = _fixed_filter_branch(
    _avg_filter, name='1x1_avg', scale_init=0.5,
    leaves=(Leaf('weight_1x1_avg', _one_by_one, conv_init_, 'weight_orepa_avg_conv'), ),
    kernel=_avg_kernel, accumulate=_avg_accumulate)

ONE_BY_ONE_FREQ = _fixed_filter_branch(
    _freq_filter, name='1x1_freq', scale_init=0.0,
    leaves=(Leaf('weight_1x1_freq', _one_by_one, conv_init_, 'weight_orepa_pfir_conv'), ),
    kernel=_freq_kernel, accumulate=_freq_accumulate,
    buffers=(('freq_prior', lambda g: frequency_prior(g.out_channels, g.kernel_size)), ))

DW_PW = Branch(
    name='dw_pw', scale_init=0.5,
    leaves=(Leaf('weight_dw', lambda g: (g.in_channels * g.dw_expansion, 1, g.kernel_size,
                                         g.kernel_size), conv_init_, 'weight_orepa_gconv_dw'),
            Leaf('weight_pw', lambda g: (g.out_channels, g.in_channels * g.dw_expansion // g.groups,
                                         1, 1), conv_init_, 'weight_orepa_gconv_pw')),
    kernel=_dw_pw_kernel, accumulate=_dw_pw_accumulate, backward=_dw_pw_backward,
    macs=_dw_pw_macs, extension='separable')

# Rep-1x1's pair (Sec. 3.5): a 1x1-1x1 sequence of intermediate width min(C_in, C_out) whose
# square factor starts as the identity, so that the pair starts as a plain learnable 1x1.
ONE_BY_ONE_1X1 = Branch(
    name='1x1_1x1', scale_init=0.5,
    leaves=(Leaf('weight_1x1_1x1_conv1', lambda g: (_rep1x1_mid(g), g.in_channels // g.groups,
                                                     1, 1),
                 _rep1x1_first_init_, 'weight_or1x1_l2i_conv1'),
            Leaf('weight_1x1_1x1_conv2', lambda g: (g.out_channels, _rep1x1_mid(g) // g.groups,
                                                     1, 1),
                 _rep1x1_second_init_, 'weight_or1x1_l2i_conv2')),
    kernel=_pair_kernel, accumulate=_pair_accumulate, backward=_pair_backward,
    macs=_pair_macs, conv_pair=True)

# The OREPA block's branches (Fig. 6) in the row order of its scaling vector (the checkpoints').
OREPA_BRANCHES = (KXK, ONE_BY_ONE_AVG, ONE_BY_ONE_FREQ, ONE_BY_ONE_KXK, ONE_BY_ONE, DW_PW)
# Rep-1x1's branches (Sec. 3.5), in the row order of its scaling vector.
REP1X1_BRANCHES = (ONE_BY_ONE, ONE_BY_ONE_1X1)
# Every branch by name.
BRANCHES: Dict[str, Branch] = {b.name: b for b in OREPA_BRANCHES + REP1X1_BRANCHES}


def _branch_by_name(name: str) -> Branch:
    return BRANCHES[name]


def names(branches: Sequence[Branch]) -> Tuple[str, ...]:
    return tuple(b.name for b in branches)


def lookup(names_: Sequence[str]) -> List[Branch]:
    """The records of ``names_``; a ``ValueError`` names an unknown one."""
    for n in names_:
        if n not in BRANCHES:
            raise ValueError(f'unknown branch {n!r}; expected one of {list(BRANCHES)}')
    return [BRANCHES[n] for n in names_]
