"""OREPA conv layers: the OREPA block (Sec. 3.5, Fig. 6), Rep-1x1 and the linear deep stem.

Their branches are the records of :mod:`mmorepa.ops.branches`; each layer builds the leaves and
fixed tensors its records name, scales each branch (Sec. 3.2) and squeezes them into one kernel
(:func:`mmorepa.ops.squeeze.squeezed_kernel`).
"""
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmcv.cnn import build_norm_layer
from torch import Tensor

from ..ops import branches as B
from ..ops.algebra import compose, factor_into_3x3
from ..ops.squeeze import squeezed_kernel
from .base import ReparamConv2d, pair_square, plain_conv
from .fake_quant import check_fake_quant_bits
from .routes import ROUTES, PairRoutes, check_choice
from .seeding import absorbed_state

# Branch names, in the row order of the scaling vector (the order of the official checkpoints).
BRANCHES = B.names(B.OREPA_BRANCHES)
# Initial scaling factors, supp 2.1.
SCALE_INIT = {b.name: b.scale_init for b in B.OREPA_BRANCHES}
SCALINGS = ('vector', 'scalar', 'none')
# Rep-1x1 branches (Sec. 3.5): a 1x1 and a 1x1-1x1 whose square factor starts as the identity.
REP1X1_BRANCHES = B.names(B.REP1X1_BRANCHES)
REP1X1_SCALE_INIT = {b.name: b.scale_init for b in B.REP1X1_BRANCHES}


def check_branches(branches, choices, name='branches') -> Tuple[str, ...]:
    """A non-empty sequence of distinct branch names from ``choices``, in ``choices``' order.

    A bare string is refused (``'kxk'`` would otherwise read as the branches 'k', 'x', 'k')."""
    if isinstance(branches, str) or not isinstance(branches, (list, tuple)):
        raise ValueError(f'{name} must be a list or tuple of branch names, got {branches!r}')
    if not branches:
        raise ValueError(f'{name} must name at least one branch')
    for b in branches:
        if b not in choices:
            raise ValueError(f'unknown branch {b!r} in {name}; expected one of {list(choices)}')
    if len(set(branches)) != len(branches):
        raise ValueError(f'{name} has duplicates: {tuple(branches)!r}')
    return tuple(b for b in choices if b in branches)


class ScaledBranches(PairRoutes):
    """Mixin: the branches of :mod:`mmorepa.ops.branches` named in ``self.branches``, each with a
    linear scaling layer (Sec. 3.2; ``scales`` ``(M, C_out)``, ``(M, 1)`` or none), squeezed into
    one kernel; the route of their conv pair (:class:`~mmorepa.layers.routes.PairRoutes`)."""

    # the squeeze: one autograd node (default), or ops.squeeze.squeezed_kernel_reference (plain
    # autograd) set on a layer to compare costs (benchmark_train_cost.py --squeeze autograd)
    squeeze_fn = staticmethod(squeezed_kernel)

    def _build_branches(self, names, choices, geometry: B.Geometry):
        """The leaves (initialised as supp Table 1 says) and fixed tensors of ``names``."""
        self.branches = check_branches(names, choices)
        self.branch_records = tuple(B.lookup(self.branches))
        for record in self.branch_records:
            for leaf in record.leaves:
                weight = leaf.init(torch.empty(leaf.shape(geometry)), geometry)
                self.register_parameter(leaf.attr, nn.Parameter(weight))
            for name, build in record.buffers:
                self.register_buffer(name, build(geometry), persistent=False)

    def fixed_tensors(self) -> Dict[str, Tensor]:
        """The fixed tensors of the layer's branches by name (``identity``, ``freq_prior``)."""
        return {n: getattr(self, n) for b in self.branch_records for n, _ in b.buffers}

    def branch_kernels(self) -> Dict[str, Tensor]:
        """Each branch's ``k x k`` kernel before scaling (Eq. 3 applied branch by branch)."""
        terms = B.Terms(self.kernel_size[0], self.groups, self.in_channels,
                        **self.fixed_tensors())
        return {b.name: b.kernel([getattr(self, a) for a in b.attrs()], None, terms)
                for b in self.branch_records}

    def squeezed_kernel_and_bias(self, without_pair: bool = False
                                 ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """Eq. 4 with the scaling layers of Sec. 3.2, ``sum_m gamma_m * W_m``, computed cheaply:
        scaling output channels commutes with composing on the input side, so each branch's
        scaling vector goes onto its last (smallest) factor and no branch kernel is stacked.
        Equal to the scaled sum of :meth:`branch_kernels`; one autograd node
        (:func:`mmorepa.ops.squeeze.squeezed_kernel`) that keeps only the parameters for backward.

        ``without_pair``: the sum without the conv pair, which the feature route computes on the
        feature maps (kernel ``None`` if the pair is the only branch)."""
        rows = [row for row, b in enumerate(self.branch_records)
                if not (without_pair and b.conv_pair)]
        if not rows:
            return None, self.bias
        records = [self.branch_records[row] for row in rows]
        scales = self.scales
        if scales is not None and len(rows) < len(self.branch_records):
            scales = scales[rows]
        leaves = {a: getattr(self, a) for b in records for a in b.attrs()}
        fixed = {n: getattr(self, n) for b in records for n, _ in b.buffers}
        kernel = self.squeeze_fn(B.names(records), leaves, scales, self.kernel_size[0],
                                 self.groups, self.in_channels, **fixed)
        return kernel, self.bias

    def _build_scales(self, scaling, scale_init, defaults, out_channels):
        check_choice(scaling, SCALINGS, 'scaling')
        init = dict(defaults)
        if scale_init is not None:
            for name in scale_init:
                if name not in self.branches:
                    raise ValueError(f'scale_init names branch {name!r}, which this layer does '
                                     f'not build (branches: {list(self.branches)})')
            init.update(scale_init)
        self.scaling = scaling
        if scaling == 'none':
            self.scales = None
            return
        width = out_channels if scaling == 'vector' else 1
        values = torch.tensor([init[b] for b in self.branches], dtype=torch.float32)
        self.scales = nn.Parameter(values.reshape(-1, 1).repeat(1, width))

    def _build_norm(self, norm_cfg, out_channels):
        if norm_cfg is not None:
            self.bn = build_norm_layer(norm_cfg, out_channels)[1]


class OREPAConv2d(ScaledBranches, ReparamConv2d):
    """The OREPA block (Fig. 6): six linear branches squeezed online into one ``k x k`` conv.

    Branches (any subset, by name, :data:`BRANCHES`): the kxk conv; the 1x1 (centred); the 1x1-kxk
    pair (an identity-initialised 1x1 then a ``k x k``); 1x1 then ``k x k`` average; 1x1 then the
    frequency prior of supp Table 1; dw-pw (linear depthwise-separable, depthwise expansion
    ``dw_expansion``). Each is scaled per output channel (``scaling='vector'``), by one scalar
    (``'scalar'``) or not at all (``'none'``) (Table 3), then summed (Eq. 4); the sum is one kernel,
    convolved once.

    ``norm_cfg``: the layer owns the post-addition norm (Sec. 3.2) when given; used as a conv in a
    host network (``conv_cfg=dict(type='OREPA')``) it owns none and the host's norm plays that role.

    ``route`` (:data:`~mmorepa.layers.routes.ROUTES`): how a training step computes the 1x1-kxk
    pair, by composing its kernels or on the feature maps; ``'auto'`` takes the one with fewer
    multiply-adds for the input's shape (:meth:`pair_costs`). Same function and gradients; eval
    always convolves once.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, padding=None,
                 dilation=1, groups: int = 1, bias: bool = False,
                 branches: Sequence[str] = BRANCHES, scaling: str = 'vector',
                 scale_init: Optional[Dict[str, float]] = None, norm_cfg: Optional[dict] = None,
                 dw_expansion: int = 8, deploy: bool = False, route: str = 'auto',
                 fake_quant_bits: Optional[int] = None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, deploy, fake_quant_bits)
        # Canonical order, whatever order the caller used.
        self.branches = check_branches(branches, BRANCHES)
        self.branch_records = tuple(B.lookup(self.branches))
        self._set_route(route)
        if isinstance(dw_expansion, bool) or not isinstance(dw_expansion, int) or dw_expansion < 1:
            raise ValueError(f'dw_expansion must be a positive int, got {dw_expansion!r}')
        check_choice(scaling, SCALINGS, 'scaling')
        self.dw_expansion = dw_expansion
        if deploy:
            self._init_deploy(bias or norm_cfg is not None)
            return
        self._build_branches(branches, BRANCHES, B.Geometry(
            in_channels, out_channels, self.kernel_size[0], groups, dw_expansion))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self._build_scales(scaling, scale_init, SCALE_INIT, out_channels)
        self._build_norm(norm_cfg, out_channels)

    def seeded_state(self, weight, bias):
        """The kxk branch absorbs what the other branches do not give (Sec. 3.4: every branch
        keeps its own initialisation, so they stay diverse, Prop. 1 Condition 2)."""
        return absorbed_state(self, B.KXK.name, weight, bias)


class OREPAConv1x1(ScaledBranches, ReparamConv2d):
    """Rep-1x1 (Sec. 3.5): a 1x1 conv plus a 1x1-1x1 sequence, each scaled, squeezed online.

    The square factor of the 1x1-1x1 pair (``weight_1x1_1x1_conv1`` when ``C_in <= C_out``, else
    ``weight_1x1_1x1_conv2``) starts as the identity, so the pair starts as a plain learnable 1x1;
    the intermediate width is ``min(C_in, C_out)``. ``route``: as in :class:`OREPAConv2d`, for
    the 1x1-1x1 pair.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=1, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = False,
                 branches: Sequence[str] = REP1X1_BRANCHES, scaling: str = 'vector',
                 scale_init: Optional[Dict[str, float]] = None, norm_cfg: Optional[dict] = None,
                 deploy: bool = False, route: str = 'auto', fake_quant_bits: Optional[int] = None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, deploy, fake_quant_bits)
        if self.kernel_size != (1, 1):
            raise ValueError(f'OREPAConv1x1 needs kernel_size=1, got {kernel_size!r}')
        self.branches = check_branches(branches, REP1X1_BRANCHES)
        self.branch_records = tuple(B.lookup(self.branches))
        self._set_route(route)
        check_choice(scaling, SCALINGS, 'scaling')
        if deploy:
            self._init_deploy(bias or norm_cfg is not None)
            return
        self._build_branches(branches, REP1X1_BRANCHES,
                             B.Geometry(in_channels, out_channels, 1, groups))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self._build_scales(scaling, scale_init, REP1X1_SCALE_INIT, out_channels)
        self._build_norm(norm_cfg, out_channels)

    def seeded_state(self, weight, bias):
        """The 1x1 branch absorbs the difference; the 1x1-1x1 pair keeps its values."""
        return absorbed_state(self, B.ONE_BY_ONE.name, weight, bias)


class OREPALargeConv(ReparamConv2d):
    """The linear deep stem (Sec. 3.5): a ``k x k`` kernel (odd ``k >= 5``) squeezed from
    ``(k - 1) / 2`` stacked 3x3 OREPA generators (``C_in -> C_out -> ... -> C_out``, no norm of
    their own), composed with Eq. 3 and applied once with the layer's stride and padding.

    ``generator_cfg`` is passed to each :class:`OREPAConv2d` generator (branches, scaling, ...).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=7, stride=1, padding=None,
                 dilation=1, groups: int = 1, bias: bool = False, norm_cfg: Optional[dict] = None,
                 generator_cfg: Optional[dict] = None, deploy: bool = False,
                 fake_quant_bits: Optional[int] = None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, deploy, fake_quant_bits)
        k = self.kernel_size[0]
        if k < 5:
            raise ValueError(f'OREPALargeConv needs an odd kernel_size >= 5, got {kernel_size!r}')
        if deploy:
            self._init_deploy(bias or norm_cfg is not None)
            return
        cfg = dict(generator_cfg or {})
        for key in ('norm_cfg', 'bias', 'deploy', 'kernel_size', 'fake_quant_bits'):
            if key in cfg:
                raise ValueError(f'generator_cfg may not set {key!r}')
        channels = [in_channels] + [out_channels] * ((k - 1) // 2)
        self.generators = nn.ModuleList(
            OREPAConv2d(cin, cout, 3, groups=groups, **cfg)
            for cin, cout in zip(channels[:-1], channels[1:]))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        if norm_cfg is not None:
            self.bn = build_norm_layer(norm_cfg, out_channels)[1]

    def seeded_state(self, weight, bias):
        """``weight`` factored into one kernel per generator (:func:`~mmorepa.ops.algebra.
        factor_into_3x3`, exact when ``C_out >= 9 C_in`` and ``k <= 9``), each generator then
        seeded with its kernel; channels the factorisation does not use keep the generators'
        current values."""
        if self.groups != 1:
            raise ValueError(f'OREPALargeConv with groups={self.groups} cannot start from a '
                             'plain conv weight')
        with torch.no_grad():
            current = [g.squeezed_kernel_and_bias()[0].double() for g in self.generators]
        stages, err = factor_into_3x3(weight, len(self.generators), self.out_channels, current)
        values = {}
        for i, (gen, stage) in enumerate(zip(self.generators, stages)):
            gen_values, _ = gen.seeded_state(stage, None)
            values.update({f'generators.{i}.{k}': v for k, v in gen_values.items()})
        if bias is not None:
            values['bias'] = bias
        return values, err

    def squeezed_kernel_and_bias(self) -> Tuple[Tensor, Optional[Tensor]]:
        """The generators' squeezed kernels composed in sequence (Eq. 3)."""
        kernel = None
        for gen in self.generators:
            w, _ = gen.squeezed_kernel_and_bias()
            kernel = w if kernel is None else compose(kernel, w, self.groups)
        return kernel, self.bias


def OREPA(in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
          groups: int = 1, bias: bool = True, branches: Sequence[str] = BRANCHES,
          rep1x1_branches: Sequence[str] = REP1X1_BRANCHES, scaling: str = 'vector',
          rep_1x1: bool = True, linear_deep_stem: bool = True, norm_cfg: Optional[dict] = None,
          deploy: bool = False, route: str = 'auto',
          fake_quant_bits: Optional[int] = None) -> nn.Module:
    """The ``conv_cfg`` type: ``nn.Conv2d``'s signature, the OREPA layer chosen by kernel size.

    1: :class:`OREPAConv1x1` (Rep-1x1, branches ``rep1x1_branches``; a plain ``nn.Conv2d`` with
    ``rep_1x1=False``); 3: :class:`OREPAConv2d` (``branches``); odd >= 5: :class:`OREPALargeConv`
    (the linear deep stem, generators with ``branches``; a plain ``nn.Conv2d`` with
    ``linear_deep_stem=False``). ``conv_cfg=dict(type='OREPA')`` turns a stock ResNet into an
    OREPA-ResNet; the other keys (``branches``, ``scaling``, ``rep_1x1``, ``linear_deep_stem``)
    select the ablations of Tables 2 and 3; ``route`` (``'auto' | 'kernel' | 'feature'``) how
    training computes the 1x1-kxk and 1x1-1x1 pairs (the deep stem's generators are kernels only,
    always composed); ``fake_quant_bits`` (e.g. 8) trains, evaluates and fuses each OREPA layer's
    kernel rounded to its per-channel grid (:mod:`mmorepa.layers.fake_quant`; the kernel
    route). Every option is checked whatever the kernel size.
    """
    k = pair_square(kernel_size, 'kernel_size')
    check_branches(branches, BRANCHES)
    check_branches(rep1x1_branches, REP1X1_BRANCHES, 'rep1x1_branches')
    check_choice(scaling, SCALINGS, 'scaling')
    check_choice(route, ROUTES, 'route')
    check_fake_quant_bits(fake_quant_bits)
    common = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
    layer = dict(common, fake_quant_bits=fake_quant_bits)
    plain = (k == 1 and not rep_1x1) or (k >= 5 and not linear_deep_stem)
    if plain or deploy:  # deployed: a layer's own norm leaves a bias
        return plain_conv(in_channels, out_channels, k,
                          **dict(common, bias=bias or (deploy and norm_cfg is not None)))
    if k == 1:
        return OREPAConv1x1(in_channels, out_channels, 1, branches=rep1x1_branches,
                            scaling=scaling, norm_cfg=norm_cfg, route=route, **layer)
    if k == 3:
        return OREPAConv2d(in_channels, out_channels, 3, branches=branches, scaling=scaling,
                           norm_cfg=norm_cfg, route=route, **layer)
    if k >= 5 and k % 2:
        return OREPALargeConv(in_channels, out_channels, k, norm_cfg=norm_cfg, **layer,
                              generator_cfg=dict(branches=branches, scaling=scaling))
    raise ValueError(f'OREPA supports kernel_size 1, 3 or odd >= 5, got {kernel_size!r}')
