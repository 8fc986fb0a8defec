"""How a training step computes a layer's conv pair (the 1x1-kxk branch, Rep-1x1's 1x1-1x1: a
1x1 conv then a ``k x k`` one, :attr:`~mmorepa.ops.branches.Branch.conv_pair`): composing its
kernels (Eq. 3, supp Eq. 2), on the feature maps, or whichever costs fewer multiply-adds
(forward and backward) for the input's shape. The same function and gradients either way; eval
always convolves once. :class:`PairRoutes` is mixed into the OREPA layers.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import autocast_off

ROUTES = ('auto', 'kernel', 'feature')


def check_choice(value, choices, name):
    if value not in choices:
        raise ValueError(f'unknown {name} {value!r}; expected one of {list(choices)}')


class PairRoutes:
    """Mixin of a layer of scaled branches (``branch_records``, ``scales``,
    ``squeezed_kernel_and_bias(without_pair)``): the route of its conv pair in training."""

    def _set_route(self, route: str):
        check_choice(route, ROUTES, 'route')
        if route == 'feature' and self.fake_quant_bits is not None:
            raise ValueError("route='feature' never forms the kernel that fake_quant_bits rounds")
        self.route = route

    def _pair_row(self) -> Optional[int]:
        """The row of the conv pair among the layer's branches, or ``None``."""
        for row, b in enumerate(self.branch_records):  # a loop: torch 2.4's dynamo has no next()
            if b.conv_pair:
                return row
        return None

    def pair_costs(self, input_shape, input_needs_grad: bool = True,
                   backward: bool = True) -> Dict[str, int]:
        """Multiply-adds of one training step (forward and backward) spent on the conv pair
        (``first`` ``(C_mid, C_in / g, 1, 1)`` then ``second`` ``(C_out, C_mid / g, k, k)``) for
        an input of ``input_shape`` ``(N, C_in, H, W)``, by route, from the shapes alone:

        - ``'kernel'``: composing them (the pair's :attr:`~mmorepa.ops.branches.Branch.macs`,
          ``C_out k^2 C_mid/g C_in/g``), and the two products of its backward (the rest is the
          conv every route runs once);
        - ``'feature'``: the 1x1 conv on the input and the ``k x k`` conv on its output, each
          with a weight gradient and a gradient of its input (the layer's input: if it needs one).

        ``backward=False``: the forward alone (a training-mode forward without autograd).
        """
        row = self._pair_row()
        if row is None:
            return dict(kernel=0, feature=0)
        pair = self.branch_records[row]
        first, second = (getattr(self, a) for a in pair.attrs())
        c_mid, c_in_g = first.shape[:2]
        c_out, c_mid_g, k = second.shape[0], second.shape[1], second.shape[-1]
        n, _, h, w = input_shape
        (s, p, d) = self.stride[0], self.padding[0], self.dilation[0]
        h_out = (h + 2 * p - d * (k - 1) - 1) // s + 1
        w_out = (w + 2 * p - d * (k - 1) - 1) // s + 1
        mid_positions = n * (h_out * w_out if self._stride_first() else h * w)
        mid = mid_positions * c_mid * c_in_g
        branch = n * h_out * w_out * c_out * c_mid_g * k * k
        kernel = pair.macs((first.shape, second.shape))
        if not backward:
            return dict(kernel=kernel, feature=mid + branch)
        return dict(kernel=3 * kernel, feature=(2 + bool(input_needs_grad)) * mid + 3 * branch)

    def pair_route(self, x: Tensor) -> str:
        """``'kernel'`` or ``'feature'``: how a training step on ``x`` computes the pair."""
        if self._pair_row() is None or self.fake_quant_bits is not None:
            return 'kernel'
        if self.route != 'auto':
            return self.route
        cost = self.pair_costs(x.shape, x.requires_grad, torch.is_grad_enabled())
        return 'feature' if cost['feature'] < cost['kernel'] else 'kernel'

    def _stride_first(self) -> bool:
        """A 1x1 pair without padding takes the stride in its first conv (fewer positions)."""
        return self.kernel_size[0] == 1 and self.padding[0] == 0

    def _pair_on_features(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """The conv pair applied to ``x`` as two convs (the feature route), and its scaling
        as a ``(1, C_out or 1, 1, 1)`` column for the output (or ``None``): at the sizes where
        this route is taken, the feature map is smaller than the kernel it would scale. Exact:
        the first factor is a 1x1 conv without bias, which commutes with zero padding."""
        row = self._pair_row()
        first, second = (getattr(self, a) for a in self.branch_records[row].attrs())
        identity = self.fixed_tensors().get('identity')
        with autocast_off(x.device.type):
            first = first if identity is None else identity + first
        scale = None if self.scales is None else self.scales[row].reshape(1, -1, 1, 1)
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
        with autocast_off(x.device.type):
            kernel, bias = self.squeezed_kernel_and_bias(without_pair=True)
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
