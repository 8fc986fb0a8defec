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
import logging
from typing import Dict, List, Optional, Sequence

import torch.nn as nn
from mmcv.cnn import build_conv_layer
from mmengine.logging import print_log
from mmengine.registry import DefaultScope

from ...layers.base import ReparamConv2d
from ...layers.offline import DiverseBranchBlock
from ...reparameterize import fuse_convs_, norm_taking_bias
from .branch_seeding import seed_plain_convs

_CLASSES: Dict[type, type] = {}


def _owns_weight(module: nn.Module) -> bool:
    return isinstance(module._parameters.get('weight'), nn.Parameter)


def _is_bottleneck(module: nn.Module) -> bool:
    """A bottleneck block (``Bottleneck``, ``Bottle2neck``, ``SEBottleneck``, ...): its own 1x1
    convs and those of its ``downsample`` are the bottleneck 1x1s (Rep-1x1 in OREPA-ResNet)."""
    return 'Bottle' in type(module).__name__


def _conv_op_kernel(module: nn.Module) -> int:
    """The largest kernel side of a conv op that is not a plain ``nn.Conv2d`` (a deformable conv,
    an ``nn.Conv2d`` subclass, a 1-d / 3-d / transposed conv), else 0."""
    k = getattr(module, 'kernel_size', None)
    if not _owns_weight(module) or k is None or isinstance(module, ReparamConv2d):
        return 0
    return max(k) if isinstance(k, (tuple, list)) else int(k)


def swap_convs_(module: nn.Module, conv_cfg, prefix: str = '',
                kept: Optional[List[str]] = None, _bottleneck: bool = False,
                _outer=None) -> List[str]:
    """Replace, in place, every plain ``nn.Conv2d`` below ``module`` by
    ``build_conv_layer(conv_cfg, <the conv's geometry>)``; returns the names of those replaced.

    ``conv_cfg`` is a dict, or a function ``(conv, bottleneck) -> dict`` (``bottleneck``: the conv
    sits directly in a bottleneck block or in its ``downsample``). A conv the factory keeps plain
    (e.g. ``OREPA`` with ``rep_1x1=False`` for a 1x1) stays as it was. The new layer takes the old
    conv's training mode, device, dtype and ``requires_grad`` (frozen stages stay frozen). Modules
    that own a ``weight`` (deformable convs, norms) and re-parameterizable layers already there are
    not entered: their inner convs are part of them.

    ``kept``: where given, each k x k (k > 1) conv that stays plain is appended to it as
    ``'name (why)'`` (a padding mode other than zeros, a geometry the layer does not take, a DBB
    block whose bias no norm can take, a conv op of its own) instead of raising ``ValueError``.
    """
    swapped = []
    for name, child in list(module.named_children()):
        full = f'{prefix}{name}'
        if type(child) is nn.Conv2d:
            new, why = _reparam_layer(child, conv_cfg(child, _bottleneck) if callable(conv_cfg)
                                      else conv_cfg)
            if why is None and isinstance(new, DiverseBranchBlock) and not new.expects_bias and \
                    norm_taking_bias(module, name, new.out_channels, _outer) is None:
                why = 'DBB fuses to a conv with a bias, and no BatchNorm after it takes the bias'
            if why is not None:
                if kept is None:
                    raise ValueError(f'cannot re-parameterize {full} ({child}): {why}')
                if max(child.kernel_size) > 1:
                    kept.append(f'{full} ({why})')
                continue
            if type(new) is nn.Conv2d:
                continue
            new.to(device=child.weight.device, dtype=child.weight.dtype)
            new.train(child.training)
            new.requires_grad_(child.weight.requires_grad)
            setattr(module, name, new)
            swapped.append(full)
        elif _conv_op_kernel(child) > 1:
            if kept is not None:
                kept.append(f'{full} ({type(child).__name__}, a conv op of its own)')
        elif not (_owns_weight(child) or isinstance(child, ReparamConv2d)):
            swapped += swap_convs_(child, conv_cfg, f'{full}.', kept,
                                   _is_bottleneck(child) or (_bottleneck and name == 'downsample'),
                                   (module, name))
    return swapped


def _reparam_layer(conv: nn.Conv2d, conv_cfg: dict):
    """The layer ``conv_cfg`` builds for ``conv``'s geometry, or ``(None, why not)``."""
    if conv.padding_mode != 'zeros':
        return None, (f'padding_mode={conv.padding_mode!r}: only zero padding squeezes exactly')
    if isinstance(conv.padding, str):
        return None, f'padding={conv.padding!r}'
    try:
        return build_conv_layer(conv_cfg, conv.in_channels, conv.out_channels, conv.kernel_size,
                                stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                                groups=conv.groups, bias=conv.bias is not None), None
    except ValueError as e:
        return None, str(e)


def check_conv_cfg(conv_cfg) -> None:
    """A ``conv_cfg`` that builds no layer even for a plain 3x3 conv (8 -> 8 channels, which
    every re-parameterization takes) has a bad option (a misspelt branch, scaling, ...): a
    ``ValueError`` naming it, not a network whose convs all stay plain."""
    probe = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    cfg = conv_cfg(probe, False) if callable(conv_cfg) else conv_cfg
    _, why = _reparam_layer(probe, cfg)
    if why is not None:
        raise ValueError(f'conv_cfg {cfg!r} builds no layer, not even for a 3x3 conv: {why}')


class ReparamBackboneMixin:
    """What :func:`reparam_class` adds to a stock backbone class.

    Args (besides the stock class's own):
        reparam_conv_cfg: the ``conv_cfg`` of the layers swapped in for the plain convs (a dict,
            or a function of the conv, see :func:`swap_convs_`); ``None`` keeps the stock network.
            The k x k convs that stay plain are named in one log line.
        stage_blocks: blocks per stage instead of those of ``depth`` (ResNets; small models and
            the official checkpoints' shapes). Such a network has no stock config. A stock class
            that takes ``stage_blocks`` itself (mmdet's ``HourglassNet``) gets it.
        deploy: build the fused (stock) network directly.
    """

    def __init__(self, *args, reparam_conv_cfg=None,
                 stage_blocks: Optional[Sequence[int]] = None, deploy: bool = False, **kwargs):
        stock_args = inspect.signature(super().__init__).parameters
        if stage_blocks is not None and 'stage_blocks' in stock_args:
            kwargs['stage_blocks'] = stage_blocks
        elif stage_blocks is not None:
            depth = kwargs.get('depth')
            if depth not in getattr(self, 'arch_settings', {}) or not isinstance(depth, int):
                raise ValueError(f'stage_blocks={stage_blocks!r} is for ResNets built with a '
                                 f'depth; {type(self).__name__} got depth={depth!r}')
            if (not isinstance(stage_blocks, (list, tuple))
                    or not all(isinstance(n, int) and n >= 1 for n in stage_blocks)):
                raise ValueError(f'stage_blocks must be positive ints, got {stage_blocks!r}')
            # read by the stock constructor: self.arch_settings[depth] -> (block, stage_blocks)
            self.arch_settings = {depth: (self.arch_settings[depth][0], tuple(stage_blocks))}
        if 'deploy' in stock_args:
            kwargs['deploy'] = deploy
        super().__init__(*args, **kwargs)
        self.deploy = deploy
        self.register_load_state_dict_pre_hook(seed_plain_convs)
        if reparam_conv_cfg is not None and not deploy:
            check_conv_cfg(reparam_conv_cfg)
            kept = []
            swap_convs_(self, reparam_conv_cfg, kept=kept)
            if kept:
                print_log(f'{type(self).__name__}: k x k convs kept plain (not '
                          f're-parameterizable): {", ".join(kept)}', logger='current',
                          level=logging.WARNING)

    def init_weights(self):
        """The stock ``init_weights``; a ``Pretrained`` init with a ``prefix`` also takes a DDP
        checkpoint (keys ``module.<prefix>...``)."""
        top_level = not hasattr(self, '_params_init_info')
        try:
            return super().init_weights()
        except AssertionError as e:  # mmengine: '<prefix> is not in the pretrained model'
            retry = _ddp_init_cfg(self.init_cfg, str(e))
            if retry is None:
                raise
        saved, self.init_cfg = self.init_cfg, retry
        try:
            super().init_weights()
        except AssertionError as e:
            raise ValueError(f'{type(self).__name__}: the Pretrained checkpoint has no entries '
                             f'under the prefix, nor under module.<prefix> ({e})') from None
        finally:
            self.init_cfg = saved
            if top_level:  # what mmengine's top-level init_weights removes at its end
                for m in self.modules():
                    m.__dict__.pop('_params_init_info', None)

    def switch_to_deploy(self):
        """Fuse in place into the stock network (idempotent): every re-parameterized conv becomes
        a plain one, then the stock class fuses its own blocks if it has any (RepVGG)."""
        fuse_convs_(self)
        stock = getattr(super(), 'switch_to_deploy', None)
        if stock is not None:
            stock()
        self.deploy = True


def _ddp_init_cfg(init_cfg, message: str):
    """``init_cfg`` with ``module.`` put before the prefix of the ``Pretrained`` init that
    mmengine's ``message`` says is not in its checkpoint (a DDP checkpoint), else ``None``."""
    cfgs = init_cfg if isinstance(init_cfg, list) else [init_cfg]
    out, found = [], False
    for cfg in cfgs:
        prefix = cfg.get('prefix') if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained' \
            else None
        if prefix:
            prefix = prefix if prefix.endswith('.') else prefix + '.'
            if message == f'{prefix} is not in the pretrained model' and \
                    not prefix.startswith('module.'):
                cfg, found = dict(cfg, prefix='module.' + prefix), True
        out.append(cfg)
    if not found:
        return None
    return out if isinstance(init_cfg, list) else out[0]


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
