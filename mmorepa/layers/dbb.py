"""The offline re-parameterization block of the paper's comparisons: DBB (Ding et al., CVPR
2021), and its ``conv_cfg`` type ``DBB``.

Its branches carry their own BatchNorms, so it computes every branch on feature maps during
training (the cost OREPA removes) and they are squeezed only at deploy time.
"""
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from torch import Tensor

from ..ops import algebra as K
from .base import ReparamConv2d, bn_fuse, pair_square, plain_conv


class _ConvBN(nn.Module):
    """``conv`` then ``bn``, the unit every offline branch is made of."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, norm_cfg=dict(type='BN')):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                              groups, bias=False)
        self.bn = build_norm_layer(norm_cfg, out_channels)[1]

    def forward(self, x):
        return self.bn(self.conv(x))

    def fuse(self) -> Tuple[Tensor, Tensor]:
        return bn_fuse(self.conv.weight, None, self.bn)


class _BNAndPad(nn.Module):
    """BN, then padding with the BN's output for a zero input, so that a following unpadded conv
    sees exactly what the fused conv sees at the borders (DBB's BN-and-pad)."""

    def __init__(self, channels, padding, norm_cfg):
        super().__init__()
        self.bn = build_norm_layer(norm_cfg, channels)[1]
        self.padding = padding

    def forward(self, x):
        out = self.bn(x)
        if self.padding == 0:
            return out
        if self.bn.training:
            # batch statistics: the zero input maps to (0 - batch mean) / batch std * w + b
            mean = x.mean((0, 2, 3))
            var = x.var((0, 2, 3), unbiased=False)
        else:
            mean, var = self.bn.running_mean, self.bn.running_var
        w = self.bn.weight if self.bn.weight is not None else torch.ones_like(mean)
        b = self.bn.bias if self.bn.bias is not None else torch.zeros_like(mean)
        pad_value = (b - mean * w / torch.sqrt(var + self.bn.eps)).reshape(1, -1, 1, 1)
        p = self.padding
        out = F.pad(out, [p, p, p, p])
        border = torch.ones_like(out[:1, :1])
        border[..., p:-p, p:-p] = 0
        return out + border * pad_value


class DiverseBranchBlock(ReparamConv2d):
    """The DBB block (Ding et al., CVPR 2021) in its offline form: four branches, each with its own
    norm, computed on feature maps and summed (no post-addition norm):
    ``kxk-BN``, ``1x1-BN``, ``1x1(identity init)-BN-kxk-BN`` and ``1x1-BN-avg-BN``.

    Only "same" padding (``dilation * (k - 1) / 2``) is supported, as in DBB. Fuses to one conv
    with a bias.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, padding=None,
                 dilation=1, groups: int = 1, bias: bool = False,
                 norm_cfg: dict = dict(type='BN'), deploy: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, deploy)
        k, d = self.kernel_size[0], self.dilation[0]
        if self.padding[0] != d * (k - 1) // 2:
            raise ValueError(f'DiverseBranchBlock needs padding={d * (k - 1) // 2} for '
                             f'kernel_size={k}, dilation={d}; got padding={padding!r}')
        if bias:
            raise ValueError('DiverseBranchBlock has branch norms; bias=True is not supported')
        if deploy:
            self._init_deploy(True)
            return
        p = self.padding[0]
        s = self.stride[0]
        self.branch_kxk = _ConvBN(in_channels, out_channels, k, s, p, d, groups, norm_cfg)
        self.branch_1x1 = _ConvBN(in_channels, out_channels, 1, s, 0, 1, groups, norm_cfg)
        # 1x1 (identity + zero-initialised delta) -> BN (pad) -> kxk -> BN
        self.weight_1x1_kxk_idconv1 = nn.Parameter(
            torch.zeros(in_channels, in_channels // groups, 1, 1))
        self.register_buffer('identity', K.identity_kernel(in_channels, groups), persistent=False)
        self.bn_1x1_kxk_mid = _BNAndPad(in_channels, p, norm_cfg)
        self.branch_1x1_kxk = _ConvBN(in_channels, out_channels, k, s, 0, d, groups, norm_cfg)
        # 1x1 -> BN (pad) -> kxk average -> BN
        self.conv_1x1_avg = nn.Conv2d(in_channels, out_channels, 1, 1, 0, groups=groups,
                                      bias=False)
        self.bn_1x1_avg_mid = _BNAndPad(out_channels, p, norm_cfg)
        self.bn_1x1_avg = build_norm_layer(norm_cfg, out_channels)[1]
        self.bias = None

    def _avg(self, x: Tensor) -> Tensor:
        c, k = x.shape[1], self.kernel_size[0]
        w = K.avg_kernel(k, x.dtype, x.device).expand(c, 1, k, k)
        return F.conv2d(x, w, None, self.stride, 0, self.dilation, c)

    def forward(self, x: Tensor) -> Tensor:
        """Every branch on feature maps (train and eval alike), as the offline method does."""
        if self.deploy:
            return self._conv(x, self.weight, self.bias)
        g = self.groups
        mid = F.conv2d(x, self.identity + self.weight_1x1_kxk_idconv1, None, 1, 0, 1, g)
        out = self.branch_kxk(x) + self.branch_1x1(x)
        out = out + self.branch_1x1_kxk(self.bn_1x1_kxk_mid(mid))
        avg = self._avg(self.bn_1x1_avg_mid(self.conv_1x1_avg(x)))
        return out + self.bn_1x1_avg(avg)

    def squeezed_kernel_and_bias(self):
        """DBB's own fusion of the four branches (eval-mode statistics)."""
        k, g = self.kernel_size[0], self.groups
        w_kxk, b_kxk = self.branch_kxk.fuse()
        w_1x1, b_1x1 = self.branch_1x1.fuse()
        # 1x1-kxk: compose kernels; the mid BN's bias passes through the kxk kernel's sum.
        w1, b1 = bn_fuse(self.identity + self.weight_1x1_kxk_idconv1, None, self.bn_1x1_kxk_mid.bn)
        w2, b2 = self.branch_1x1_kxk.fuse()
        w_seq = K.compose_1x1(w1, w2, g)
        b_seq = b2 + _bias_through(w2, b1, g)
        # 1x1-avg: BN, average (a constant stays constant), BN.
        wa, ba = bn_fuse(self.conv_1x1_avg.weight, None, self.bn_1x1_avg_mid.bn)
        wa = K.compose_1x1_depthwise(wa, K.avg_kernel(k, wa.dtype, wa.device))
        wa, ba = bn_fuse(wa, ba, self.bn_1x1_avg)
        kernel = w_kxk + K.pad_to(w_1x1, k) + w_seq + wa
        return kernel, b_kxk + b_1x1 + b_seq + ba


def _bias_through(kernel: Tensor, bias: Tensor, groups: int) -> Tensor:
    """The output of ``kernel`` (no padding) on a constant input equal to ``bias`` per channel."""
    c_out, cin_g = kernel.shape[:2]
    summed = kernel.sum((2, 3)).reshape(groups, c_out // groups, cin_g)
    return torch.einsum('goi,gi->go', summed, bias.reshape(groups, cin_g)).reshape(c_out)


def DBB(in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
        groups: int = 1, bias: bool = True, norm_cfg: dict = dict(type='BN'),
        deploy: bool = False) -> nn.Module:
    """The ``conv_cfg`` type of DBB-ResNet: a :class:`DiverseBranchBlock` for every ``k x k`` conv
    (k > 1), a plain ``nn.Conv2d`` for the 1x1 convs (as in DBB-ResNet)."""
    k = pair_square(kernel_size, 'kernel_size')
    common = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
    if k == 1 or deploy:
        return plain_conv(in_channels, out_channels, k, **common)
    return DiverseBranchBlock(in_channels, out_channels, k, norm_cfg=norm_cfg, **common)
