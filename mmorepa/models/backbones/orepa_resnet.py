"""OREPA-ResNet (Sec. 3.5) and its vanilla / DBB counterparts: one backbone, one key.

The module layout (``conv1``/``bn1`` or ``stem``, ``layer{i}.{j}.conv{k}``/``bn{k}``,
``downsample.{0,1}``) is that of the stock ResNets of mmpretrain, mmdet and mmseg, so after
:func:`mmorepa.reparameterize` the state dict loads with ``strict=True`` into the toolbox's own
``ResNet`` / ``ResNeXt`` (see :meth:`OREPAResNet.stock_cfg`).
"""
import copy
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from mmcv.cnn import build_conv_layer, build_norm_layer
from mmengine.model import BaseModule
from mmengine.registry import DefaultScope, MODELS
from torch.nn.modules.batchnorm import _BatchNorm

from ...layers import BRANCHES
from ...reparameterize import fuse_children

REPARAMS = ('none', 'dbb', 'orepa')


class _ConvFactory:
    """Which conv each role of the network gets, for a re-parameterization choice.

    Roles: ``'stem'`` (the 7x7), ``'kxk'`` (3x3 convs of blocks and of a deep stem), ``'1x1'``
    (bottleneck 1x1s and shortcut), ``'basic_shortcut'`` (BasicBlock shortcut, always plain).
    """

    def __init__(self, reparam: str, orepa_cfg: Optional[dict]):
        if reparam not in REPARAMS:
            raise ValueError(f'unknown reparam {reparam!r}; expected one of {list(REPARAMS)}')
        cfg = dict(branches=BRANCHES, scaling='vector', linear_deep_stem=True, rep_1x1=True)
        for key in orepa_cfg or {}:
            if key not in cfg:
                raise ValueError(f'unknown orepa_cfg key {key!r}; expected one of {list(cfg)}')
        cfg.update(orepa_cfg or {})
        self.reparam = reparam
        self.cfg = cfg

    def conv_cfg(self, role: str) -> Optional[dict]:
        c = self.cfg
        if self.reparam == 'dbb':
            return dict(type='DiverseBranchBlock') if role in ('stem', 'kxk') else None
        if self.reparam == 'orepa':
            if role == 'stem':
                return (dict(type='OREPALargeConv', generator_cfg=dict(
                    branches=c['branches'], scaling=c['scaling']))
                        if c['linear_deep_stem'] else None)
            if role == 'kxk':
                return dict(type='OREPAConv2d', branches=c['branches'], scaling=c['scaling'])
            if role == '1x1':
                return dict(type='OREPAConv1x1', scaling=c['scaling']) if c['rep_1x1'] else None
        return None

    def build(self, role, in_channels, out_channels, kernel_size, stride=1, padding=0,
              dilation=1, groups=1):
        return build_conv_layer(self.conv_cfg(role), in_channels, out_channels, kernel_size,
                                stride=stride, padding=padding, dilation=dilation, groups=groups,
                                bias=False)


class BasicBlock(BaseModule):
    expansion = 1

    def __init__(self, in_channels, out_channels, stride=1, dilation=1, downsample=None,
                 style='pytorch', with_cp=False, groups=1, width_per_group=64, base_channels=64,
                 convs: _ConvFactory = None, norm_cfg=dict(type='BN'), init_cfg=None):
        super().__init__(init_cfg)
        if groups != 1:
            raise ValueError(f'BasicBlock supports groups=1 only, got groups={groups}')
        self.conv1 = convs.build('kxk', in_channels, out_channels, 3, stride, dilation, dilation)
        self.bn1 = build_norm_layer(norm_cfg, out_channels)[1]
        self.conv2 = convs.build('kxk', out_channels, out_channels, 3, 1, 1, 1)
        self.bn2 = build_norm_layer(norm_cfg, out_channels)[1]
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.with_cp = with_cp

    def conv_norm_pairs(self):
        return [('conv1', 'bn1'), ('conv2', 'bn2')]

    def _residual(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))

    def forward(self, x):
        def inner(x):
            identity = x if self.downsample is None else self.downsample(x)
            return self._residual(x) + identity
        out = cp.checkpoint(inner, x, use_reentrant=False) if (
            self.with_cp and x.requires_grad) else inner(x)
        return self.relu(out)


class Bottleneck(BasicBlock):
    expansion = 4

    def __init__(self, in_channels, out_channels, stride=1, dilation=1, downsample=None,
                 style='pytorch', with_cp=False, groups=1, width_per_group=64, base_channels=64,
                 convs: _ConvFactory = None, norm_cfg=dict(type='BN'), init_cfg=None):
        BaseModule.__init__(self, init_cfg)
        mid = out_channels // self.expansion
        if groups != 1:  # ResNeXt: the same width as mmpretrain's / mmdet's ResNeXt
            mid = groups * width_per_group * mid // base_channels
        s1, s2 = (1, stride) if style == 'pytorch' else (stride, 1)
        self.conv1 = convs.build('1x1', in_channels, mid, 1, s1)
        self.bn1 = build_norm_layer(norm_cfg, mid)[1]
        self.conv2 = convs.build('kxk', mid, mid, 3, s2, dilation, dilation, groups)
        self.bn2 = build_norm_layer(norm_cfg, mid)[1]
        self.conv3 = convs.build('1x1', mid, out_channels, 1)
        self.bn3 = build_norm_layer(norm_cfg, out_channels)[1]
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.with_cp = with_cp

    def conv_norm_pairs(self):
        return [('conv1', 'bn1'), ('conv2', 'bn2'), ('conv3', 'bn3')]

    def _residual(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


def _fold_conv_bias_into_norm(conv: nn.Conv2d, norm: _BatchNorm):
    """``BN(W x + b) == BN'(W x)`` with the running mean shifted by ``-b``: lets a fused conv that
    carries a bias (DBB) sit in a stock network whose convs have none."""
    if getattr(conv, 'bias', None) is None:
        return
    with torch.no_grad():
        norm.running_mean.sub_(conv.bias)
    conv.bias = None


@MODELS.register_module()
class OREPAResNet(BaseModule):
    """ResNet / ResNeXt / wide ResNet with a choice of re-parameterization.

    Args:
        depth: 18, 34, 50, 101 or 152.
        reparam: ``'orepa'`` (OREPA-ResNet, Sec. 3.5: OREPA 3x3 convs, the linear deep stem,
            Rep-1x1 for the 1x1 convs of bottlenecks and their shortcut; a BasicBlock's shortcut
            stays a plain 1x1 conv + BN), ``'dbb'`` (offline DBB blocks for the 7x7 and 3x3 convs,
            followed by the network's BN) or ``'none'`` (the vanilla ResNet). The network's BN
            after each conv is the post-addition norm of Sec. 3.2.
        orepa_cfg: ablations of Tables 2 and 3 for ``reparam='orepa'``: ``branches``,
            ``scaling`` (``'vector' | 'scalar' | 'none'``), ``linear_deep_stem`` and ``rep_1x1``.
        groups, width_per_group: ResNeXt (e.g. 32 and 4 for ResNeXt-50 32x4d).
        base_channels, stem_channels: width (wide ResNet-18 1.5x: 96 and 96).
        stage_blocks: override the blocks per stage of ``depth`` (small models for tests).
        strides, dilations, contract_dilation, out_indices, style, deep_stem, avg_down,
        frozen_stages, norm_cfg, norm_eval, with_cp, zero_init_residual, init_cfg: as in the
            stock ResNets of mmpretrain, mmdet and mmseg.
        deploy: build the fused (plain) network directly.
    """

    arch_settings = {
        18: (BasicBlock, (2, 2, 2, 2)),
        34: (BasicBlock, (3, 4, 6, 3)),
        50: (Bottleneck, (3, 4, 6, 3)),
        101: (Bottleneck, (3, 4, 23, 3)),
        152: (Bottleneck, (3, 8, 36, 3)),
    }

    def __init__(self, depth: int, reparam: str = 'orepa', orepa_cfg: Optional[dict] = None,
                 in_channels: int = 3, stem_channels: Optional[int] = None,
                 base_channels: int = 64, groups: int = 1, width_per_group: int = 4,
                 num_stages: int = 4, stage_blocks: Optional[Sequence[int]] = None,
                 strides=(1, 2, 2, 2), dilations=(1, 1, 1, 1), contract_dilation: bool = False,
                 out_indices=(3, ), style: str = 'pytorch', deep_stem: bool = False,
                 avg_down: bool = False, frozen_stages: int = -1,
                 norm_cfg=dict(type='BN', requires_grad=True), norm_eval: bool = False,
                 with_cp: bool = False, zero_init_residual: bool = True, deploy: bool = False,
                 init_cfg=[dict(type='Kaiming', layer=['Conv2d']),
                           dict(type='Constant', val=1, layer=['_BatchNorm', 'GroupNorm'])]):
        super().__init__(init_cfg)
        if depth not in self.arch_settings:
            raise ValueError(f'invalid depth {depth!r} for OREPAResNet; expected one of '
                             f'{sorted(self.arch_settings)}')
        if style not in ('pytorch', 'caffe'):
            raise ValueError(f'unknown style {style!r}; expected pytorch or caffe')
        if not 1 <= num_stages <= 4:
            raise ValueError(f'num_stages must be in 1..4, got {num_stages!r}')
        if len(strides) != num_stages or len(dilations) != num_stages:
            raise ValueError(f'strides {strides!r} and dilations {dilations!r} need '
                             f'{num_stages} entries (num_stages)')
        if max(out_indices) >= num_stages:
            raise ValueError(f'out_indices {out_indices!r} out of range for {num_stages} stages')
        self.block, default_blocks = self.arch_settings[depth]
        if groups != 1 and self.block is BasicBlock:
            raise ValueError(f'groups={groups} (ResNeXt) needs a bottleneck depth, got {depth}')
        if stage_blocks is not None and len(stage_blocks) < num_stages:
            raise ValueError(f'stage_blocks {stage_blocks!r} has fewer than {num_stages} stages')
        self.depth = depth
        self.convs = _ConvFactory(reparam, orepa_cfg)
        if deploy:
            self.convs = _ConvFactory('none', None)
        self.stem_channels = stem_channels or base_channels
        self.base_channels = base_channels
        self.stage_blocks = tuple(stage_blocks or default_blocks)[:num_stages]
        self.num_stages, self.strides, self.dilations = num_stages, strides, dilations
        self.out_indices, self.style = out_indices, style
        self.deep_stem, self.avg_down = deep_stem, avg_down
        self.frozen_stages, self.norm_cfg, self.norm_eval = frozen_stages, norm_cfg, norm_eval
        self.with_cp, self.zero_init_residual = with_cp, zero_init_residual
        self.deploy = deploy

        self._make_stem(in_channels, self.stem_channels)
        in_ch = self.stem_channels
        self.res_layers = []
        for i, num_blocks in enumerate(self.stage_blocks):
            out_ch = base_channels * 2 ** i * self.block.expansion
            dilation = dilations[i]
            first_dilation = dilation // 2 if contract_dilation and dilation > 1 else dilation
            layer = self._make_layer(in_ch, out_ch, num_blocks, strides[i], dilation,
                                     first_dilation, groups, width_per_group)
            name = f'layer{i + 1}'
            self.add_module(name, layer)
            self.res_layers.append(name)
            in_ch = out_ch
        self.feat_dim = in_ch
        self._freeze_stages()

    # -- construction -------------------------------------------------------------------------------
    def _make_stem(self, in_channels, stem_channels):
        convs, norm = self.convs, self.norm_cfg
        if self.deep_stem:
            half = stem_channels // 2
            self.stem = nn.Sequential(
                convs.build('kxk', in_channels, half, 3, 2, 1),
                build_norm_layer(norm, half)[1], nn.ReLU(inplace=True),
                convs.build('kxk', half, half, 3, 1, 1),
                build_norm_layer(norm, half)[1], nn.ReLU(inplace=True),
                convs.build('kxk', half, stem_channels, 3, 1, 1),
                build_norm_layer(norm, stem_channels)[1], nn.ReLU(inplace=True))
        else:
            self.conv1 = convs.build('stem', in_channels, stem_channels, 7, 2, 3)
            self.bn1 = build_norm_layer(norm, stem_channels)[1]
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def _make_layer(self, in_ch, out_ch, num_blocks, stride, dilation, first_dilation, groups,
                    width_per_group):
        downsample = None
        if stride != 1 or in_ch != out_ch:
            role = 'basic_shortcut' if self.block is BasicBlock else '1x1'
            layers = []
            conv_stride = stride
            if self.avg_down and stride != 1:
                conv_stride = 1
                layers.append(nn.AvgPool2d(stride, stride, ceil_mode=True,
                                           count_include_pad=False))
            layers += [self.convs.build(role, in_ch, out_ch, 1, conv_stride),
                       build_norm_layer(self.norm_cfg, out_ch)[1]]
            downsample = nn.Sequential(*layers)
        common = dict(style=self.style, with_cp=self.with_cp, groups=groups,
                      width_per_group=width_per_group, base_channels=self.base_channels,
                      convs=self.convs, norm_cfg=self.norm_cfg)
        blocks = [self.block(in_ch, out_ch, stride, first_dilation, downsample, **common)]
        blocks += [self.block(out_ch, out_ch, 1, dilation, None, **common)
                   for _ in range(1, num_blocks)]
        return nn.Sequential(*blocks)

    # -- running ----------------------------------------------------------------------------------
    def forward(self, x):
        if self.deep_stem:
            x = self.stem(x)
        else:
            x = self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        outs = []
        for i, name in enumerate(self.res_layers):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)

    def _stem_modules(self):
        return [self.stem] if self.deep_stem else [self.conv1, self.bn1]

    def _freeze_stages(self):
        if self.frozen_stages >= 0:
            for m in self._stem_modules():
                m.eval()
                for p in m.parameters():
                    p.requires_grad = False
        for i in range(1, self.frozen_stages + 1):
            m = getattr(self, f'layer{i}')
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def init_weights(self):
        super().init_weights()
        if self.init_cfg is not None and any(
                c.get('type') == 'Pretrained' for c in (
                    self.init_cfg if isinstance(self.init_cfg, list) else [self.init_cfg])):
            return
        if self.zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    # -- deployment -------------------------------------------------------------------------------
    def switch_to_deploy(self):
        """Fuse every re-parameterized conv into a plain one (in place, idempotent); a fused
        conv's bias (DBB) goes into the BN that follows, so the keys are the stock ResNet's."""
        if self.deploy:
            return
        fuse_children(self)
        pairs = [] if self.deep_stem else [(self, 'conv1', 'bn1')]
        if self.deep_stem:
            pairs += [(self.stem, str(i), str(i + 1)) for i in (0, 3, 6)]
        for name in self.res_layers:
            for block in getattr(self, name):
                pairs += [(block, c, n) for c, n in block.conv_norm_pairs()]
                if block.downsample is not None:
                    idx = len(block.downsample) - 2
                    pairs.append((block.downsample, str(idx), str(idx + 1)))
        for owner, conv_name, norm_name in pairs:
            _fold_conv_bias_into_norm(getattr(owner, conv_name), getattr(owner, norm_name))
        self.deploy = True

    @classmethod
    def stock_cfg(cls, cfg: dict) -> dict:
        """The config of the toolbox's own ``ResNet`` / ``ResNeXt`` that a fused ``cfg`` model
        loads into (the toolbox is the current default scope: mmpretrain, mmdet or mmseg)."""
        cfg = copy.deepcopy(dict(cfg))
        scope = DefaultScope.get_current_instance()
        scope = scope.scope_name if scope is not None else 'mmpretrain'
        depth = cfg.pop('depth')
        stage_blocks = cfg.pop('stage_blocks', None)
        num_stages = cfg.get('num_stages', 4)
        if stage_blocks is not None and tuple(stage_blocks)[:num_stages] != tuple(
                cls.arch_settings[depth][1])[:num_stages]:
            raise ValueError(f'stage_blocks={stage_blocks!r} has no stock ResNet counterpart')
        groups = cfg.pop('groups', 1)
        width = cfg.pop('width_per_group', 4)
        for key in ('type', 'reparam', 'orepa_cfg', 'deploy', '_scope_'):
            cfg.pop(key, None)
        if cfg.get('contract_dilation') and scope != 'mmseg':
            raise ValueError(f'contract_dilation has no counterpart in {scope}\'s ResNet')
        if scope != 'mmseg':
            cfg.pop('contract_dilation', None)
        # mmpretrain's stem width defaults to 64 whatever base_channels is: always say it
        cfg['stem_channels'] = cfg.get('stem_channels') or cfg.get('base_channels', 64)
        out = dict(type='ResNet' if groups == 1 else 'ResNeXt', depth=depth, **cfg)
        if groups != 1:
            out['groups'] = groups
            out['width_per_group' if scope == 'mmpretrain' else 'base_width'] = width
        return out
