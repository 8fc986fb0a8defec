"""OREPA inside the toolboxes' own networks: build the stock backbone, then swap its plain convs.

One mechanism serves every backbone, whether or not it passes ``conv_cfg`` to its convs (mmdet's
DCN stages refuse ``conv_cfg``): :func:`swap_convs_` replaces each plain ``nn.Conv2d`` of a built
network by the layer a ``conv_cfg`` builds for the same geometry. Convs that belong to another
conv op (the offset conv of a deformable conv) are left alone, and so is the op itself.

:func:`reparam_class` gives, for a stock backbone class (mmpretrain's / mmdet's / mmseg's
``ResNet``, ``ResNeXt``, mmpretrain's ``RepVGG``, ...), a subclass that does the swap after the
stock constructor and fuses back with ``switch_to_deploy()``: its blocks, keys and options are the
stock network's, and its fused form is the stock network.
"""
import inspect
from typing import Dict, List, Optional, Sequence

import torch.nn as nn
from mmcv.cnn import build_conv_layer
from mmengine.registry import DefaultScope

from ...layers.base import ReparamConv2d
from ...reparameterize import fuse_convs_

_CLASSES: Dict[type, type] = {}


def _owns_weight(module: nn.Module) -> bool:
    return isinstance(module._parameters.get('weight'), nn.Parameter)


def swap_convs_(module: nn.Module, conv_cfg: dict, prefix: str = '') -> List[str]:
    """Replace, in place, every plain ``nn.Conv2d`` below ``module`` by
    ``build_conv_layer(conv_cfg, <the conv's geometry>)``; returns the names of those replaced.

    A conv the factory keeps plain (e.g. ``OREPA`` with ``rep_1x1=False`` for a 1x1) stays as it
    was. The new layer takes the old conv's training mode, device, dtype and ``requires_grad``
    (frozen stages stay frozen). Modules that own a ``weight`` (deformable convs, norms) and
    re-parameterizable layers already there are not entered: their inner convs are part of them.
    """
    swapped = []
    for name, child in list(module.named_children()):
        full = f'{prefix}{name}'
        if type(child) is nn.Conv2d:
            if child.padding_mode != 'zeros':
                raise ValueError(f'cannot re-parameterize {full}: padding_mode='
                                 f'{child.padding_mode!r} (only zero padding squeezes exactly)')
            if isinstance(child.padding, str):
                raise ValueError(f'cannot re-parameterize {full}: padding={child.padding!r}')
            try:
                new = build_conv_layer(conv_cfg, child.in_channels, child.out_channels,
                                       child.kernel_size, stride=child.stride,
                                       padding=child.padding, dilation=child.dilation,
                                       groups=child.groups, bias=child.bias is not None)
            except ValueError as e:
                raise ValueError(f'cannot re-parameterize {full} ({child}): {e}') from None
            if type(new) is nn.Conv2d:
                continue
            new.to(device=child.weight.device, dtype=child.weight.dtype)
            new.train(child.training)
            new.requires_grad_(child.weight.requires_grad)
            setattr(module, name, new)
            swapped.append(full)
        elif not (_owns_weight(child) or isinstance(child, ReparamConv2d)):
            swapped += swap_convs_(child, conv_cfg, f'{full}.')
    return swapped


class ReparamBackboneMixin:
    """What :func:`reparam_class` adds to a stock backbone class.

    Args (besides the stock class's own):
        reparam_conv_cfg: the ``conv_cfg`` of the layers swapped in for the plain convs;
            ``None`` keeps the stock network.
        stage_blocks: blocks per stage instead of those of ``depth`` (ResNets; small models and
            the official checkpoints' shapes). Such a network has no stock config.
        deploy: build the fused (stock) network directly.
    """

    def __init__(self, *args, reparam_conv_cfg: Optional[dict] = None,
                 stage_blocks: Optional[Sequence[int]] = None, deploy: bool = False, **kwargs):
        if stage_blocks is not None:
            depth = kwargs.get('depth')
            if depth not in getattr(self, 'arch_settings', {}) or not isinstance(depth, int):
                raise ValueError(f'stage_blocks={stage_blocks!r} is for ResNets built with a '
                                 f'depth; {type(self).__name__} got depth={depth!r}')
            if (not isinstance(stage_blocks, (list, tuple))
                    or not all(isinstance(n, int) and n >= 1 for n in stage_blocks)):
                raise ValueError(f'stage_blocks must be positive ints, got {stage_blocks!r}')
            # read by the stock constructor: self.arch_settings[depth] -> (block, stage_blocks)
            self.arch_settings = {depth: (self.arch_settings[depth][0], tuple(stage_blocks))}
        if 'deploy' in inspect.signature(super().__init__).parameters:
            kwargs['deploy'] = deploy
        super().__init__(*args, **kwargs)
        self.deploy = deploy
        if reparam_conv_cfg is not None and not deploy:
            swap_convs_(self, reparam_conv_cfg)

    def switch_to_deploy(self):
        """Fuse in place into the stock network (idempotent): every re-parameterized conv becomes
        a plain one, then the stock class fuses its own blocks if it has any (RepVGG)."""
        fuse_convs_(self)
        stock = getattr(super(), 'switch_to_deploy', None)
        if stock is not None:
            stock()
        self.deploy = True


def reparam_class(stock: type) -> type:
    """The subclass of ``stock`` with :class:`ReparamBackboneMixin` (one per stock class), named
    ``OREPA<stock>`` and reachable as ``OREPA_<toolbox>_<stock>`` in this module (pickling)."""
    if stock not in _CLASSES:
        toolbox = stock.__module__.split('.')[0]
        cls = type(f'OREPA{stock.__name__}', (ReparamBackboneMixin, stock), dict(
            __module__=__name__, __qualname__=f'OREPA_{toolbox}_{stock.__name__}',
            __doc__=f'``{stock.__module__}.{stock.__name__}`` with OREPA layers swapped in for '
            'its plain convs (see :class:`ReparamBackboneMixin`).'))
        _CLASSES[stock] = cls
    return _CLASSES[stock]


def __getattr__(name: str):
    """``OREPA_<toolbox>_<stock>``: the class :func:`reparam_class` makes (for unpickling)."""
    parts = name.split('_', 2)
    if len(parts) == 3 and parts[0] == 'OREPA' and parts[1] in ('mmpretrain', 'mmdet', 'mmseg'):
        return reparam_class(stock_class(parts[2], parts[1]))
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def current_toolbox() -> str:
    """The toolbox of the current default scope: ``mmpretrain`` (also when none is set),
    ``mmdet`` or ``mmseg``."""
    scope = DefaultScope.get_current_instance()
    name = scope.scope_name if scope is not None else 'mmpretrain'
    if name not in ('mmpretrain', 'mmdet', 'mmseg'):
        raise ValueError(f'default scope {name!r}: OREPA backbones are built in mmpretrain, '
                         'mmdet or mmseg')
    return name


def stock_class(name: str, toolbox: Optional[str] = None) -> type:
    """The toolbox's own backbone class ``name`` (e.g. ``'ResNet'``, ``'ResNeXt'``)."""
    import importlib
    toolbox = toolbox or current_toolbox()
    registry = importlib.import_module(f'{toolbox}.registry').MODELS
    importlib.import_module(f'{toolbox}.models')
    cls = registry.get(f'{toolbox}.{name}')
    if cls is None:
        raise ValueError(f'{toolbox} has no backbone {name!r}')
    return cls
