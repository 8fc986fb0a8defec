"""The squeeze of one OREPA layer as an operator: Eq. 4 with the scaling layers of Sec. 3.2,
``sum_m gamma_m * W_m``, each branch kernel ``W_m`` by its record in :mod:`mmorepa.ops.branches`
(Eq. 3, supp Eq. 2).

:func:`squeezed_kernel` computes it in one autograd node that keeps only the leaves for backward:
two operators of their own (``mmorepa::squeeze`` and ``mmorepa::squeeze_backward``,
torch.library), with FLOP formulas for ``FlopCounterMode``. On the CPU the memory-bound branches
(kxk, the fixed-filter 1x1s, dw-pw) run in the optional extension (:mod:`mmorepa.ops.extension`),
one pass over the kernel each way; the conv pair (a matrix product) and every other device use
torch's operators. :func:`squeezed_kernel_reference` is the same value written with the branches'
kernel functions and differentiated by autograd (for comparisons).

Arguments shared by these functions: ``branches``, branch names in the row order of ``scales``
(``(M, C_out)``, ``(M, 1)`` or ``None``); ``leaves``, the tensors of those branches by their
layer attribute (:attr:`Leaf.attr`); ``identity``, added to the conv pair's first factor (or
``None``); ``freq_prior``, the ``(C_out, k, k)`` filters of the 1x1-frequency-prior branch.
"""
import functools
from typing import List, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from ..compat import torch_older_than
from . import extension
from .branches import Branch, SqueezeGrads, Terms, lookup

__all__ = ['squeezed_kernel', 'squeezed_kernel_reference']


def _scale_col(scales: Optional[Tensor], row: int) -> Optional[Tensor]:
    """Row ``row`` of the scaling layer as an output-channel column ``(C_out or 1, 1, 1, 1)``."""
    return None if scales is None else scales[row].reshape(-1, 1, 1, 1)


def _leaves_of(branch: Branch, leaves: dict):
    return [leaves[a] for a in branch.attrs()]


def _leaf_names(branches: Sequence[Branch]) -> List[str]:
    return [a for b in branches for a in b.attrs()]


def _out_channels(branches: Sequence[Branch], leaves: dict) -> int:
    """The output channels of a squeeze: the first dimension of each branch's last leaf."""
    return leaves[branches[0].leaves[-1].attr].shape[0]


def squeezed_kernel_reference(branches: Sequence[str], leaves: dict, scales: Optional[Tensor],
                              kernel_size: int, groups: int, in_channels: int,
                              identity: Optional[Tensor] = None,
                              freq_prior: Optional[Tensor] = None) -> Tensor:
    """Eq. 4 with the scaling layers of Sec. 3.2: the sum of each branch's :attr:`Branch.kernel`
    with its scale on its last factor (so no branch kernel is stacked), differentiated by
    autograd."""
    terms = Terms(kernel_size, groups, in_channels, identity, freq_prior)
    kernels = [b.kernel(_leaves_of(b, leaves), _scale_col(scales, row), terms)
               for row, b in enumerate(lookup(branches))]
    return sum(kernels[1:], kernels[0])


def _one_pass_operands(branches: Sequence[Branch], leaves, scales, terms: Terms):
    """The operands of the extension for the memory-bound branches of this squeeze
    (``(rows, scales, kxk, fixed 1x1s, filters, dw, pw)``, ``rows`` their rows of ``scales``, in
    the extension's order: kxk, the fixed-filter branches, dw-pw), or ``None`` where the extension
    does not apply: not built, not on the CPU (meta tensors, which count FLOPs, included), not
    float32 / float64, mixed dtypes, no such branch, or sizes beyond its registers (kernels above
    11 x 11, a dw-pw expansion above 64)."""
    rows = [r for r, b in enumerate(branches) if b.extension is not None]
    if not rows:
        return None
    names = [a for r in rows for a in branches[r].attrs()]
    tensors = [leaves[n] for n in names] + [
        t for t in (scales, terms.freq_prior) if t is not None]
    dtype = tensors[0].dtype
    if dtype not in (torch.float32, torch.float64) or any(
            t.dtype != dtype or t.device.type != 'cpu' for t in tensors):
        return None
    ext, k = extension.squeeze_cpu, terms.k
    if ext is None:
        extension.warn_unavailable()
        return None
    by_kind = {kind: [r for r in rows if branches[r].extension == kind]
               for kind in ('full', 'fixed', 'separable')}
    if k * k > ext.MAX_TAPS or any(
            leaves[branches[r].leaves[0].attr].shape[0] > ext.MAX_EXPANSION * terms.in_channels
            for r in by_kind['separable']):
        return None
    order = by_kind['full'] + by_kind['fixed'] + by_kind['separable']
    c_out = _out_channels(branches, leaves)
    if scales is None:
        rows_scales = leaves[names[0]].new_ones(len(order), c_out)
    else:
        rows_scales = scales[order].expand(len(order), c_out).contiguous()
    flat = lambda t: t.contiguous().reshape(t.shape[0], -1)  # noqa: E731
    full = [flat(leaves[branches[r].leaves[0].attr]) for r in by_kind['full']]
    separable = [flat(t) for r in by_kind['separable'] for t in _leaves_of(branches[r], leaves)]
    fixed = [branches[r] for r in by_kind['fixed']]
    filters = rows_scales.new_zeros(len(fixed), c_out, k * k)
    for j, b in enumerate(fixed):
        filters[j] = b.fixed_filter(c_out, k, terms.freq_prior, rows_scales)
    return (order, rows_scales, full[0] if full else None,
            [flat(leaves[b.leaves[0].attr]) for b in fixed], filters,
            *(separable if separable else (None, None)))


def _squeeze_accumulated(branches: Sequence[Branch], leaves, scales, terms: Terms) -> Tensor:
    """The value of :func:`squeezed_kernel_reference` (no autograd): each branch's
    :attr:`Branch.accumulate` scales its term and adds it into one kernel in the pass that writes
    it; on the CPU the extension forms the memory-bound branches in one pass."""
    k, c_out = terms.k, _out_channels(branches, leaves)
    one_pass = _one_pass_operands(branches, leaves, scales, terms)
    if one_pass is not None:
        # the pair composed (unscaled) by torch; the extension adds the rest over it
        _, rows_scales, *operands = one_pass
        cig, pair = terms.in_channels // terms.groups, None
        for row, b in enumerate(branches):
            if b.conv_pair:
                pair = b.kernel(_leaves_of(b, leaves), None, terms).reshape(
                    c_out, cig, k * k).contiguous()
                s = rows_scales.new_ones(1, c_out) if scales is None else scales[row:row + 1]
                rows_scales = torch.cat([rows_scales, s.expand(1, c_out)])
        return extension.squeeze_cpu.squeeze_forward(rows_scales, *operands, pair, c_out, cig,
                                                     terms.groups, k * k).view(c_out, cig, k, k)
    # start from a full-size kernel (kxk; the 1x1 itself when k = 1) or from zeros
    start = next((row for row, b in enumerate(branches) if b.full_size(k)), None)
    if start is None:
        total = next(iter(leaves.values())).new_zeros(c_out, terms.in_channels // terms.groups,
                                                      k, k)
    else:
        w, s = _leaves_of(branches[start], leaves)[0], _scale_col(scales, start)
        total = w * s if s is not None else w.clone()
    for row, b in enumerate(branches):
        if row != start:
            b.accumulate(total, _leaves_of(b, leaves), _scale_col(scales, row), terms)
    return total


def _fixed_products(fixed: Sequence[Branch], g3: Tensor, terms: Terms) -> dict:
    """``H[o, i] = sum_p G[o, i, p] f_o[p]`` of each fixed-filter branch: one batched product for
    all, ``[n_fixed, p] @ [p, i]`` per output channel (the long side last)."""
    if not fixed:
        return {}
    c_out = g3.shape[0]
    filters = torch.stack([b.fixed_filter(c_out, terms.k, terms.freq_prior, g3) for b in fixed],
                          1)  # (C_out, n_fixed, p)
    h = torch.bmm(filters, g3.transpose(1, 2)).transpose(0, 1)  # (n_fixed, C_out, C_in/g)
    return {b.fixed_filter: h[j] for j, b in enumerate(fixed)}


def _extension_backward(g3, branches, leaves, needs, one_pass, taps_outer, groups):
    """The extension's gradients of its rows: ``(leaf gradients by name, per-channel scale
    gradient by row)``."""
    order, *operands = one_pass
    names = [a for r in order for a in branches[r].attrs()]
    res = extension.squeeze_cpu.squeeze_backward(g3, *operands, groups,
                                                 [needs[n] for n in names], taps_outer)
    nf = len(operands[2])
    kinds = [branches[r].extension for r in order]
    by_name = ([res[1]] if 'full' in kinds else []) + res[2:2 + nf] + (
        res[-2:] if 'separable' in kinds else [])
    out = {n: t.view(leaves[n].shape) for n, t in zip(names, by_name) if t is not None}
    return out, dict(zip(order, res[0]))


def _squeeze_backward(grad, branches: Sequence[Branch], leaves, needs, need_scales, scales,
                      terms: Terms):
    """The backward of :func:`squeezed_kernel`: the gradients of the scales (``None`` unless
    ``need_scales``) and of the leaves (by name; absent where ``needs`` is false) for ``grad``,
    the gradient ``G`` of the squeezed kernel. Chain rule through Eq. 3, 4 and supp Eq. 2, per
    group, each branch's share by its :attr:`Branch.backward`; a scalar scale's gradient is the
    sum of the per-channel ones. The matrix products are those of autograd through
    :func:`squeezed_kernel_reference` (no more FLOPs); the element-wise work is one pass per
    layout change or scaling, scaling fused into the layout changes. On the CPU the memory-bound
    branches go to the extension (one pass over ``G``)."""
    c_out, cig = grad.shape[:2]
    p = terms.k * terms.k
    one_pass = _one_pass_operands(branches, leaves, scales, terms)
    # a channels-last gradient (torch.compile's layout) goes to the extension as it is, unless
    # the pair's products need it contiguous
    taps_outer = (one_pass is not None and not any(b.conv_pair for b in branches)
                  and not grad.is_contiguous()
                  and grad.is_contiguous(memory_format=torch.channels_last))
    if taps_outer:
        g3 = grad.permute(0, 2, 3, 1).reshape(c_out, p, cig)  # a view
    else:
        grad = grad.contiguous()
        g3 = grad.reshape(c_out, cig, p)
    out, done = {}, {}  # done: the extension's per-channel scale gradient of each of its rows
    if one_pass is not None:
        out, done = _extension_backward(g3, branches, leaves, needs, one_pass, taps_outer,
                                        terms.groups)
    fixed = [] if one_pass is not None else [b for b in branches if b.extension == 'fixed']
    grads = SqueezeGrads(grad, g3, _fixed_products(fixed, g3, terms), need_scales)
    scale_grads = []
    for row, b in enumerate(branches):
        s = _scale_col(scales, row)
        ds = done.get(row)
        if row not in done:
            leaf_grads, ds = b.backward(grads, _leaves_of(b, leaves),
                                        [needs[a] for a in b.attrs()], s, terms)
            out.update((a, t) for a, t in zip(b.attrs(), leaf_grads) if t is not None)
        if need_scales:
            scale_grads.append(ds.sum(0, keepdim=True) if s.numel() == 1 else ds)
    grad_scales = torch.stack(scale_grads).to(scales.dtype) if need_scales else None
    return grad_scales, out


# The squeeze and its backward as two operators of their own (torch.library), joined by one
# autograd node (``_Squeeze``; under no_grad the forward operator alone): eager they run the
# functions above; under torch.compile they stay opaque, so the compiler does not unfuse their
# passes, and reads their parameters in place (:func:`_pinned_layout`).
def _squeeze_impl(leaves: List[Tensor], scales: Optional[Tensor], identity: Optional[Tensor],
                  freq_prior: Optional[Tensor], branches: str, kernel_size: int, groups: int,
                  in_channels: int, out_channels: int) -> Tensor:
    """``branches``: the branch names joined by commas; ``leaves``: their tensors, in the order of
    the branches' :attr:`Branch.leaves`."""
    records = lookup(branches.split(','))
    terms = Terms(kernel_size, groups, in_channels, identity, freq_prior)
    # contiguous, as the fake says, whatever the leaves' memory format (channels-last models)
    kernel = _squeeze_accumulated(records, dict(zip(_leaf_names(records), leaves)), scales,
                                  terms)
    return kernel.contiguous()


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
    records = lookup(branches.split(','))
    names = _leaf_names(records)
    terms = Terms(kernel_size, groups, in_channels, identity, freq_prior)
    grad_scales, out = _squeeze_backward(grad, records, dict(zip(names, leaves)),
                                         dict(zip(names, needs)), need_scales, scales, terms)
    grads = [grad_scales] + [out.get(n) for n in names]
    return _own_memory(grads, [grad, *leaves], grad)


def _own_memory(grads, inputs, like: Tensor) -> List[Tensor]:
    """``grads`` as an operator may return them: contiguous, an empty tensor for ``None``, and
    none sharing memory with an input or another return (one output channel without scaling
    makes the fixed-filter branches' gradients contiguous views of one product)."""
    taken = {t.untyped_storage().data_ptr() for t in inputs if t is not None}
    result = []
    for g in grads:
        if g is None:
            result.append(like.new_empty(0))
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


def _pinned_layout(leaf: Tensor) -> Tensor:
    """``leaf`` as an ``as_strided`` view of itself, for the squeeze operator under torch.compile.

    Inductor's layout optimization gives every 4-D tensor upstream of a convolution channels-last
    strides, the parameters the backward keeps included: each step it would copy the squeeze's
    4-D leaves to channels-last and back to the operator's contiguous layout, in the forward and
    in the backward. It leaves the strides of a tensor that an ``as_strided`` reads, so with this
    view the operator reads the parameters where they are. The view is the identity (the leaf's
    own storage offset, which ``as_strided`` keeps when none is given): the operator's own
    backward gives the leaves' gradients."""
    return leaf.as_strided(leaf.shape, leaf.stride())


class _Squeeze(torch.autograd.Function):
    """One autograd node over the two operators: it saves only the leaves and calls the backward
    operator. (An autograd.Function rather than the operator's own autograd registration, so that
    ``torch.func`` transforms take gradients through it.)"""

    @staticmethod
    def forward(spec, scales, identity, freq_prior, *leaves):
        if torch.compiler.is_compiling():
            leaves = [_pinned_layout(t) for t in leaves]
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
if torch_older_than('2.5'):  # there it files them by overload; FlopCounterMode looks by packet
    for _op in (torch.ops.mmorepa.squeeze, torch.ops.mmorepa.squeeze_backward):
        torch.utils.flop_counter.flop_registry[_op] = torch.utils.flop_counter.flop_registry[
            _op.default]
# torch < 2.5 runs a custom operator's autograd even inside a backward under torch.func transforms,
# which refuse it: there the squeeze takes autograd through the reference (the same value).
_FUNC_TAKES_REFERENCE = torch_older_than('2.5')


def squeezed_kernel(branches: Sequence[str], leaves: dict, scales: Optional[Tensor],
                    kernel_size: int, groups: int, in_channels: int,
                    identity: Optional[Tensor] = None,
                    freq_prior: Optional[Tensor] = None) -> Tensor:
    """The squeezed kernel of one OREPA layer: the value of :func:`squeezed_kernel_reference`,
    computed by one operator (``mmorepa::squeeze``) in one autograd node that keeps only the
    leaves for backward and calls the backward operator (``mmorepa::squeeze_backward``). Traced
    for TorchScript / ONNX export it raises: export the fused model."""
    records = lookup(branches)
    if sum(b.conv_pair for b in records) > 1:
        raise ValueError(f'a squeeze takes at most one conv pair, got branches {list(branches)}')
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        # TorchScript tracing (the ONNX exporter) sees into no operator of its own, records
        # in-place updates of views wrongly and cannot export a conv of a computed kernel: say so
        raise RuntimeError('an un-fused OREPA layer cannot be traced for export: fuse the model '
                           'first (mmorepa.reparameterize(model), as tools/export_onnx.py does)')
    if (_FUNC_TAKES_REFERENCE and not torch.compiler.is_compiling()
            and torch._C._are_functorch_transforms_active()):
        return squeezed_kernel_reference(branches, leaves, scales, kernel_size, groups,
                                         in_channels, identity, freq_prior)
    spec = (','.join(branches), kernel_size, groups, in_channels,
            _out_channels(records, leaves))
    tensors = [leaves[n] for n in _leaf_names(records)]
    if not torch.is_grad_enabled():  # no autograd node: one graph under torch.compile too
        return _squeeze_op(tensors, scales, identity, freq_prior, *spec)
    return _Squeeze.apply(spec, scales, identity, freq_prior, *tensors)
