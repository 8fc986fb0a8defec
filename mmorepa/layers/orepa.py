"""OREPA conv layers: the OREPA block (Sec. 3.5, Fig. 6), Rep-1x1 and the linear deep stem."""
import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from torch import Tensor

from .. import kernels as K
from .base import ReparamConv2d, _autocast_off, _pair_square, check_fake_quant_bits
from .offline import DiverseBranchBlock

# Branch names, in the row order of the scaling vector (the order of the official checkpoints).
BRANCHES = ('kxk', '1x1_avg', '1x1_freq', '1x1_kxk', '1x1', 'dw_pw')
# Initial scaling factors, supp 2.1.
SCALE_INIT = {'1x1': 1.0, 'kxk': 0.25, '1x1_kxk': 0.5, '1x1_avg': 0.5, '1x1_freq': 0.0, 'dw_pw': 0.5}
SCALINGS = ('vector', 'scalar', 'none')
# Rep-1x1 branches (Sec. 3.5): a 1x1 and a 1x1-1x1 whose square factor starts as the identity.
REP1X1_BRANCHES = ('1x1', '1x1_1x1')
REP1X1_SCALE_INIT = {'1x1': 1.0, '1x1_1x1': 0.5}
# How a training step computes the branch whose kernel composition costs C^3 (the 1x1-kxk pair,
# Rep-1x1's 1x1-1x1): composing its kernels, on the feature maps, or whichever costs fewer
# multiply-adds (forward and backward) for the input's shape.
ROUTES = ('auto', 'kernel', 'feature')
# the kernel functions' name of that pair (Rep-1x1's 1x1-1x1 is their 1x1-kxk with k = 1)
PAIR = '1x1_kxk'


def _conv_init_(weight: Tensor) -> Tensor:
    """PyTorch's default conv initialisation (uniform in +-1/sqrt(fan_in)), supp Table 1 "Conv"."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return weight


def _check_choice(value, choices, name):
    if value not in choices:
        raise ValueError(f'unknown {name} {value!r}; expected one of {list(choices)}')


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


class _ScaledBranches:
    """Mixin: per-branch linear scaling layers (Sec. 3.2), ``(M, C_out)``, ``(M, 1)`` or none."""

    # the squeeze: one autograd node (default), or kernels.squeeze_reference (plain autograd) set
    # on a layer to compare costs (tools/analysis/benchmark_train_cost.py --squeeze autograd)
    squeeze_fn = staticmethod(K.squeeze)

    def _squeeze_terms(self):
        """The squeeze's inputs in the kernel functions' names: ``(branches, leaves, identity,
        freq_prior)`` (see :func:`mmorepa.kernels.squeeze`), branches in the rows' order."""
        raise NotImplementedError

    def squeeze(self, without_pair: bool = False) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """Eq. 4 with the scaling layers of Sec. 3.2, ``sum_m gamma_m * W_m``, computed cheaply:
        scaling output channels commutes with composing on the input side, so each branch's
        scaling vector goes onto its last (smallest) factor and no branch kernel is stacked.
        Equal to ``scaled_sum(branch_kernels(), scales)``; one autograd node
        (:func:`mmorepa.kernels.squeeze`) that keeps only the parameters for backward.

        ``without_pair``: the sum without the 1x1-kxk (Rep-1x1: 1x1-1x1) pair, which the feature
        route computes on the feature maps (kernel ``None`` if the pair is the only branch)."""
        branches, leaves, identity, prior = self._squeeze_terms()
        scales = self.scales
        if without_pair and PAIR in branches:
            rows = [i for i, b in enumerate(branches) if b != PAIR]
            if not rows:
                return None, self.bias
            scales = None if scales is None else scales[rows]
            branches = tuple(branches[i] for i in rows)
            leaves = {n: t for n, t in leaves.items() if not n.startswith(PAIR)}
            identity = None
        kernel = self.squeeze_fn(branches, leaves, scales, self.kernel_size[0], self.groups,
                                 self.in_channels, identity=identity, freq_prior=prior)
        return kernel, self.bias

    def _set_route(self, route: str):
        _check_choice(route, ROUTES, 'route')
        if route == 'feature' and self.fake_quant_bits is not None:
            raise ValueError("route='feature' never forms the kernel that fake_quant_bits rounds")
        self.route = route

    def pair_costs(self, input_shape, input_needs_grad: bool = True,
                   backward: bool = True) -> Dict[str, int]:
        """Multiply-adds of one training step (forward and backward) spent on the 1x1-kxk pair
        (``first`` ``(C_mid, C_in / g, 1, 1)`` then ``second`` ``(C_out, C_mid / g, k, k)``) for
        an input of ``input_shape`` ``(N, C_in, H, W)``, by route, from the shapes alone:

        - ``'kernel'``: composing them (Eq. 3, supp Eq. 2), ``C_out k^2 C_mid/g C_in/g``, and the
          two products of its backward (the rest is the conv every route runs once);
        - ``'feature'``: the 1x1 conv on the input and the ``k x k`` conv on its output, each
          with a weight gradient and a gradient of its input (the layer's input: if it needs one).

        ``backward=False``: the forward alone (a training-mode forward without autograd).
        """
        branches, leaves, _, _ = self._squeeze_terms()
        if PAIR not in branches:
            return dict(kernel=0, feature=0)
        first, second = leaves[PAIR + '.first'], leaves[PAIR + '.second']
        c_mid, c_in_g = first.shape[:2]
        c_out, c_mid_g, k = second.shape[0], second.shape[1], second.shape[-1]
        n, _, h, w = input_shape
        (s, p, d) = self.stride[0], self.padding[0], self.dilation[0]
        h_out = (h + 2 * p - d * (k - 1) - 1) // s + 1
        w_out = (w + 2 * p - d * (k - 1) - 1) // s + 1
        mid_positions = n * (h_out * w_out if self._stride_first() else h * w)
        mid = mid_positions * c_mid * c_in_g
        branch = n * h_out * w_out * c_out * c_mid_g * k * k
        kernel = c_out * k * k * c_mid_g * c_in_g
        if not backward:
            return dict(kernel=kernel, feature=mid + branch)
        return dict(kernel=3 * kernel, feature=(2 + bool(input_needs_grad)) * mid + 3 * branch)

    def pair_route(self, x: Tensor) -> str:
        """``'kernel'`` or ``'feature'``: how a training step on ``x`` computes the pair."""
        if PAIR not in self._squeeze_terms()[0] or self.fake_quant_bits is not None:
            return 'kernel'
        if self.route != 'auto':
            return self.route
        cost = self.pair_costs(x.shape, x.requires_grad, torch.is_grad_enabled())
        return 'feature' if cost['feature'] < cost['kernel'] else 'kernel'

    def _stride_first(self) -> bool:
        """A 1x1 pair without padding takes the stride in its first conv (fewer positions)."""
        return self.kernel_size[0] == 1 and self.padding[0] == 0

    def _pair_on_features(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """The 1x1-kxk pair applied to ``x`` as two convs (the feature route), and its scaling
        as a ``(1, C_out or 1, 1, 1)`` column for the output (or ``None``): at the sizes where
        this route is taken, the feature map is smaller than the kernel it would scale. Exact:
        the first factor is a 1x1 conv without bias, which commutes with zero padding."""
        branches, leaves, identity, _ = self._squeeze_terms()
        with _autocast_off(x.device.type):
            first = leaves[PAIR + '.first']
            first = first if identity is None else identity + first
        second = leaves[PAIR + '.second']
        scale = None if self.scales is None else self.scales[branches.index(PAIR)].reshape(
            1, -1, 1, 1)
        g = self.groups
        if self._stride_first():
            out = F.conv2d(F.conv2d(x, first, None, self.stride, 0, 1, g), second, None, 1, 0,
                           1, g)
        else:
            out = self._conv(F.conv2d(x, first, None, 1, 0, 1, g), second, None)
        return out, scale

    def forward(self, x: Tensor) -> Tensor:
        """In training, the pair on the feature maps where :meth:`pair_route` says so: the conv
        of the other branches' squeezed kernel plus the pair, the same sum before the norm.
        Otherwise (eval, deploy, the kernel route) :meth:`ReparamConv2d.forward`."""
        if not self.training or self.deploy or self.pair_route(x) == 'kernel':
            return super().forward(x)
        with _autocast_off(x.device.type):
            kernel, bias = self.squeeze(without_pair=True)
        pair, scale = self._pair_on_features(x)
        if kernel is not None:
            rest = self._conv(x, kernel, bias)
        elif bias is not None:
            rest = bias.reshape(1, -1, 1, 1)
        else:
            rest = torch.zeros((), dtype=pair.dtype, device=pair.device)
        # rest + scale * pair in one pass (and one pass for each gradient)
        out = rest + pair if scale is None else torch.addcmul(rest, pair, scale.to(pair.dtype))
        return self.bn(out) if self.bn is not None else out

    def _build_scales(self, branches, scaling, scale_init, defaults, out_channels):
        _check_choice(scaling, SCALINGS, 'scaling')
        init = dict(defaults)
        if scale_init is not None:
            for name in scale_init:
                if name not in branches:
                    raise ValueError(f'scale_init names branch {name!r}, which this layer does '
                                     f'not build (branches: {list(branches)})')
            init.update(scale_init)
        self.scaling = scaling
        if scaling == 'none':
            self.scales = None
            return
        width = out_channels if scaling == 'vector' else 1
        values = torch.tensor([init[b] for b in branches], dtype=torch.float32)
        self.scales = nn.Parameter(values.reshape(-1, 1).repeat(1, width))

    def _scaled(self, branch: str, weight: Tensor) -> Tensor:
        """``weight`` with its output channels scaled by the branch's scaling vector."""
        if self.scales is None:
            return weight
        return weight * self.scales[self.branches.index(branch)].reshape(-1, 1, 1, 1)

    def _absorbed(self, branch: str, weight: Tensor, bias: Optional[Tensor]):
        """:meth:`ReparamConv2d.seeded_state` for a layer whose ``branch`` is a free kernel
        (``weight_<branch>``): it absorbs the difference between ``weight`` and the squeezed
        kernel, the other branches keep their own (diverse) values. Exact."""
        if branch not in self.branches:
            raise ValueError(f'{type(self).__name__} without a {branch!r} branch (branches '
                             f'{self.branches}) cannot start from a plain conv weight')
        name = f'weight_{branch}'
        scale = torch.ones(()) if self.scales is None else self.scales[
            self.branches.index(branch)].detach().double()
        if bool((scale.abs() < 1e-12).any()):
            raise ValueError(f'the {branch!r} branch of {type(self).__name__} has a zero scale: '
                             'it cannot absorb a plain conv weight')
        with torch.no_grad():
            current = self.squeeze()[0].double()
            own = getattr(self, name).double()  # a full-size kernel: kxk, or the 1x1 of Rep-1x1
            values = {name: own + (weight - current) / scale.reshape(-1, 1, 1, 1)}
        if bias is not None:
            values['bias'] = bias
        return values, 0.0

    def _build_norm(self, norm_cfg, out_channels):
        if norm_cfg is not None:
            self.bn = build_norm_layer(norm_cfg, out_channels)[1]


class OREPAConv2d(_ScaledBranches, ReparamConv2d):
    """The OREPA block (Fig. 6): six linear branches squeezed online into one ``k x k`` conv.

    Branches (any subset, by name): ``'kxk'``; ``'1x1'`` (centred); ``'1x1_kxk'`` (an identity-
    initialised 1x1 then a ``k x k``); ``'1x1_avg'`` (1x1 then ``k x k`` average); ``'1x1_freq'``
    (1x1 then the frequency prior of supp Table 1); ``'dw_pw'`` (linear depthwise-separable,
    depthwise expansion ``dw_expansion``). Each is scaled per output channel (``scaling='vector'``),
    by one scalar (``'scalar'``) or not at all (``'none'``) (Table 3), then summed (Eq. 4); the sum is
    one kernel, convolved once.

    ``norm_cfg``: the layer owns the post-addition norm (Sec. 3.2) when given; used as a conv in a
    host network (``conv_cfg=dict(type='OREPA')``) it owns none and the host's norm plays that role.

    ``route`` (:data:`ROUTES`): how a training step computes the 1x1-kxk branch, by composing its
    kernels or on the feature maps; ``'auto'`` takes the one with fewer multiply-adds for the
    input's shape (:meth:`pair_costs`). Same function and gradients; eval always convolves once.
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
        self._set_route(route)
        if isinstance(dw_expansion, bool) or not isinstance(dw_expansion, int) or dw_expansion < 1:
            raise ValueError(f'dw_expansion must be a positive int, got {dw_expansion!r}')
        _check_choice(scaling, SCALINGS, 'scaling')
        self.dw_expansion = dw_expansion
        if deploy:
            self._init_deploy(bias or norm_cfg is not None)
            return
        k = self.kernel_size[0]
        cin_g = in_channels // groups
        ones_1x1 = (out_channels, cin_g, 1, 1)
        if 'kxk' in self.branches:
            self.weight_kxk = nn.Parameter(_conv_init_(torch.empty(out_channels, cin_g, k, k)))
        if '1x1' in self.branches:
            self.weight_1x1 = nn.Parameter(_conv_init_(torch.empty(ones_1x1)))
        if '1x1_kxk' in self.branches:
            # The 1x1 is identity + a learnable delta that starts at zero (supp Table 1, "iden.").
            self.weight_1x1_kxk_idconv1 = nn.Parameter(torch.zeros(in_channels, cin_g, 1, 1))
            self.register_buffer('identity', K.identity_kernel(in_channels, groups),
                                 persistent=False)
            self.weight_1x1_kxk_conv2 = nn.Parameter(
                _conv_init_(torch.empty(out_channels, cin_g, k, k)))
        if '1x1_avg' in self.branches:
            self.weight_1x1_avg = nn.Parameter(_conv_init_(torch.empty(ones_1x1)))
        if '1x1_freq' in self.branches:
            self.weight_1x1_freq = nn.Parameter(_conv_init_(torch.empty(ones_1x1)))
            self.register_buffer('freq_prior', K.frequency_prior(out_channels, k),
                                 persistent=False)
        if 'dw_pw' in self.branches:
            m = dw_expansion
            self.weight_dw = nn.Parameter(_conv_init_(torch.empty(in_channels * m, 1, k, k)))
            self.weight_pw = nn.Parameter(
                _conv_init_(torch.empty(out_channels, in_channels * m // groups, 1, 1)))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self._build_scales(self.branches, scaling, scale_init, SCALE_INIT, out_channels)
        self._build_norm(norm_cfg, out_channels)

    def branch_kernels(self) -> Dict[str, Tensor]:
        """Each branch's ``k x k`` kernel before scaling (Eq. 3 applied branch by branch)."""
        k, g = self.kernel_size[0], self.groups
        out = {}
        for b in self.branches:
            if b == 'kxk':
                out[b] = self.weight_kxk
            elif b == '1x1':
                out[b] = K.pad_to(self.weight_1x1, k)
            elif b == '1x1_kxk':
                first = self.identity + self.weight_1x1_kxk_idconv1
                out[b] = K.compose_1x1(first, self.weight_1x1_kxk_conv2, g)
            elif b == '1x1_avg':
                avg = K.avg_kernel(k, self.weight_1x1_avg.dtype, self.weight_1x1_avg.device)
                out[b] = K.compose_1x1_depthwise(self.weight_1x1_avg, avg)
            elif b == '1x1_freq':
                out[b] = K.compose_1x1_depthwise(self.weight_1x1_freq, self.freq_prior)
            elif b == 'dw_pw':
                out[b] = K.dw_pw_to_full(self.weight_dw, self.weight_pw, self.in_channels, g)
        return out

    def _squeeze_terms(self):
        b = self.branches
        names = {'kxk': 'weight_kxk', '1x1': 'weight_1x1',
                 '1x1_kxk.first': 'weight_1x1_kxk_idconv1',
                 '1x1_kxk.second': 'weight_1x1_kxk_conv2', '1x1_avg': 'weight_1x1_avg',
                 '1x1_freq': 'weight_1x1_freq', 'dw': 'weight_dw', 'pw': 'weight_pw'}
        leaves = {n: getattr(self, a) for n, a in names.items() if hasattr(self, a)}
        return (b, leaves, self.identity if '1x1_kxk' in b else None,
                self.freq_prior if '1x1_freq' in b else None)

    def seeded_state(self, weight, bias):
        """The kxk branch absorbs what the other branches do not give (Sec. 3.4: every branch
        keeps its own initialisation, so they stay diverse, Prop. 1 Condition 2)."""
        return self._absorbed('kxk', weight, bias)


class OREPAConv1x1(_ScaledBranches, ReparamConv2d):
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
        self._set_route(route)
        _check_choice(scaling, SCALINGS, 'scaling')
        if deploy:
            self._init_deploy(bias or norm_cfg is not None)
            return
        cin_g = in_channels // groups
        if '1x1' in self.branches:
            self.weight_1x1 = nn.Parameter(_conv_init_(torch.empty(out_channels, cin_g, 1, 1)))
        if '1x1_1x1' in self.branches:
            mid = min(in_channels, out_channels)
            conv1 = torch.empty(mid, cin_g, 1, 1)
            conv2 = torch.empty(out_channels, mid // groups, 1, 1)
            if in_channels <= out_channels:
                conv1.copy_(K.identity_kernel(mid, groups))
                _conv_init_(conv2)
            else:
                _conv_init_(conv1)
                conv2.copy_(K.identity_kernel(mid, groups))
            self.weight_1x1_1x1_conv1 = nn.Parameter(conv1)
            self.weight_1x1_1x1_conv2 = nn.Parameter(conv2)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self._build_scales(self.branches, scaling, scale_init, REP1X1_SCALE_INIT, out_channels)
        self._build_norm(norm_cfg, out_channels)

    def branch_kernels(self) -> Dict[str, Tensor]:
        out = {}
        if '1x1' in self.branches:
            out['1x1'] = self.weight_1x1
        if '1x1_1x1' in self.branches:
            out['1x1_1x1'] = K.compose_1x1(self.weight_1x1_1x1_conv1, self.weight_1x1_1x1_conv2,
                                           self.groups)
        return out

    def _squeeze_terms(self):
        """The 1x1-1x1 pair is the kernel functions' 1x1-kxk branch with k = 1, no identity."""
        leaves = {}
        if '1x1' in self.branches:
            leaves['1x1'] = self.weight_1x1
        if '1x1_1x1' in self.branches:
            leaves['1x1_kxk.first'] = self.weight_1x1_1x1_conv1
            leaves['1x1_kxk.second'] = self.weight_1x1_1x1_conv2
        return tuple(PAIR if b == '1x1_1x1' else b for b in self.branches), leaves, None, None

    def seeded_state(self, weight, bias):
        """The 1x1 branch absorbs the difference; the 1x1-1x1 pair keeps its values."""
        return self._absorbed('1x1', weight, bias)


class OREPALargeConv(ReparamConv2d):
    """The linear deep stem (Sec. 3.5): a ``k x k`` kernel (odd ``k >= 5``) squeezed from
    ``(k - 1) / 2`` stacked 3x3 OREPA generators (``C_in -> C_out -> ... -> C_out``, no norm of
    their own, grouped as the layer), composed with Eq. 3, plus the buffer ``seed_kernel``, and
    applied once with the layer's stride and padding.

    ``seed_kernel`` is zero unless the layer started from a plain conv's weight that the
    generators cannot compose exactly: a stack of 3x3 kernels spans only part of the ``k x k``
    kernels (a depthwise 7x7 has 49 taps, three depthwise 3x3s compose 27 numbers; a dense one
    needs ``C_out >= 9 C_in`` and ``k <= 9``). It then holds the weight minus the generators'
    composition, so the layer computes that weight exactly; it is not trained (the generators
    are, as in the paper), and weight decay on them pulls the kernel towards that weight. A
    checkpoint without the entry (official, or written before the buffer existed) loads it as
    zeros.

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
        self.register_buffer('seed_kernel', torch.zeros(out_channels, in_channels // groups, k, k))
        if norm_cfg is not None:
            self.bn = build_norm_layer(norm_cfg, out_channels)[1]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """A checkpoint with the generators but no ``seed_kernel`` has none: zeros."""
        if (not self.deploy and prefix + 'seed_kernel' not in state_dict
                and any(k.startswith(prefix + 'generators.') for k in state_dict)):
            state_dict[prefix + 'seed_kernel'] = torch.zeros_like(self.seed_kernel)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def seeded_state(self, weight, bias):
        """Generators and ``seed_kernel`` whose sum is ``weight`` exactly: for ``groups == 1``,
        ``weight`` factored into one kernel per generator (:func:`~mmorepa.kernels.
        factor_into_3x3`; channels it does not use keep the generators' current values), each
        generator seeded with its kernel; grouped and depthwise layers keep their generators.
        ``seed_kernel`` takes what the generators' composition leaves of ``weight`` (zero up
        to rounding where the factorisation is exact)."""
        with torch.no_grad():
            current = [g.squeeze()[0].double() for g in self.generators]
        values = {}
        stages = current
        if self.groups == 1:
            stages, _ = K.factor_into_3x3(weight, len(self.generators), self.out_channels,
                                          current)
            for i, (gen, stage) in enumerate(zip(self.generators, stages)):
                gen_values, _ = gen.seeded_state(stage, None)
                values.update({f'generators.{i}.{k}': v for k, v in gen_values.items()})
        composed = stages[0]
        for stage in stages[1:]:
            composed = K.compose(composed, stage, self.groups)
        values['seed_kernel'] = weight - composed
        if bias is not None:
            values['bias'] = bias
        return values, 0.0

    def squeeze(self) -> Tuple[Tensor, Optional[Tensor]]:
        kernel = None
        for gen in self.generators:
            w, _ = gen.squeeze()
            kernel = w if kernel is None else K.compose(kernel, w, self.groups)
        return kernel + self.seed_kernel.to(kernel.dtype), self.bias


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
    kernel rounded to its per-channel grid (:class:`~mmorepa.layers.ReparamConv2d`; the kernel
    route). Every option is checked whatever the kernel size.
    """
    k = _pair_square(kernel_size, 'kernel_size')
    check_branches(branches, BRANCHES)
    check_branches(rep1x1_branches, REP1X1_BRANCHES, 'rep1x1_branches')
    _check_choice(scaling, SCALINGS, 'scaling')
    _check_choice(route, ROUTES, 'route')
    check_fake_quant_bits(fake_quant_bits)
    common = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
    layer = dict(common, fake_quant_bits=fake_quant_bits)
    plain = (k == 1 and not rep_1x1) or (k >= 5 and not linear_deep_stem)
    if plain or deploy:  # deployed: a layer's own norm leaves a bias
        return _plain_conv(in_channels, out_channels, k,
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


def DBB(in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
        groups: int = 1, bias: bool = True, norm_cfg: dict = dict(type='BN'),
        deploy: bool = False) -> nn.Module:
    """The ``conv_cfg`` type of DBB-ResNet: a :class:`~mmorepa.layers.DiverseBranchBlock` for
    every ``k x k`` conv (k > 1), a plain ``nn.Conv2d`` for the 1x1 convs (as in DBB-ResNet)."""
    k = _pair_square(kernel_size, 'kernel_size')
    common = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
    if k == 1 or deploy:
        return _plain_conv(in_channels, out_channels, k, **common)
    return DiverseBranchBlock(in_channels, out_channels, k, norm_cfg=norm_cfg, **common)


def _plain_conv(in_channels, out_channels, k, stride, padding, dilation, groups, bias):
    if padding is None:
        padding = _pair_square(dilation, 'dilation') * (k - 1) // 2
    return nn.Conv2d(in_channels, out_channels, k, stride, padding, dilation, groups, bias=bias)
