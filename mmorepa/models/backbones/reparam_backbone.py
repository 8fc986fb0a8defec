"""OREPA inside the toolboxes' own networks: build the stock backbone, then swap its plain convs.

One mechanism serves every backbone, whether or not it passes ``conv_cfg`` to its convs (mmdet's
DCN stages refuse ``conv_cfg``): :func:`swap_convs_` replaces each conv of a built network that
computes as a plain zero-padded conv (``nn.Conv2d``, mmcv's ``Conv2d`` and
``Conv2dAdaptivePadding``: :mod:`.plain_convs`) by the layer a ``conv_cfg`` builds for the same
geometry, which fuses back into the same conv class. Convs that belong to another conv op (the
offset conv of a deformable conv) are left alone, and so is the op itself.

:func:`reparam_class` gives, for a stock backbone class (mmpretrain's / mmdet's / mmseg's
``ResNet``, ``ResNeXt``, mmpretrain's ``RepVGG``, ...), a subclass that does the swap after the
stock constructor and fuses back with ``switch_to_deploy()``: its blocks, keys and options are the
stock network's, and its fused form is the stock network.
"""
import importlib
import inspect
import logging
from typing import Dict, List, Optional, Sequence

import torch.nn as nn
from mmcv.cnn import build_conv_layer
from mmengine.logging import print_log
from mmengine.registry import MODELS, DefaultScope

from ...compat import register_load_state_dict_pre_hook
from ...fusion import fuse_convs_, norm_taking_bias
from ...layers.base import ReparamConv2d
from ...layers.dbb import DiverseBranchBlock
from .plain_convs import PlainConvForm, plain_conv_form
from .branch_seeding import seed_plain_convs

_CLASSES: Dict[type, type] = {}


def _owns_weight(module: nn.Module) -> bool:
    return isinstance(module._parameters.get('weight'), nn.Parameter)


def _is_bottleneck(module: nn.Module) -> bool:
    """A bottleneck block (``Bottleneck``, ``Bottle2neck``, ``SEBottleneck``, ...): its own 1x1
    convs and those of its ``downsample`` are the bottleneck 1x1s (Rep-1x1 in OREPA-ResNet)."""
    return 'Bottle' in type(module).__name__


def _conv_op_kernel(module: nn.Module) -> int:
    """The largest kernel side of a conv op that does not compute as a plain conv (a deformable
    conv, another ``nn.Conv2d`` subclass, a 1-d / 3-d / transposed conv), else 0."""
    k = getattr(module, 'kernel_size', None)
    if not _owns_weight(module) or k is None or isinstance(module, ReparamConv2d):
        return 0
    return max(k) if isinstance(k, (tuple, list)) else int(k)


def swap_convs_(module: nn.Module, conv_cfg, prefix: str = '',
                kept: Optional[List[str]] = None, _bottleneck: bool = False,
                _outer=None) -> List[str]:
    """Replace, in place, every conv below ``module`` that computes as a plain conv
    (:func:`~.plain_convs.plain_conv_form`) by ``build_conv_layer(conv_cfg, <the conv's
    geometry>)``, made to fuse into the conv's own class; returns the names of those replaced.

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
        form = plain_conv_form(child)
        if form is not None:
            new, why = _reparam_layer(child, conv_cfg(child, _bottleneck) if callable(conv_cfg)
                                      else conv_cfg, form)
            if why is None and isinstance(new, DiverseBranchBlock) and not new.expects_bias and \
                    norm_taking_bias(module, name, new.out_channels, _outer) is None:
                why = 'DBB fuses to a conv with a bias, and no BatchNorm after it takes the bias'
            if why is not None:
                if kept is None:
                    raise ValueError(f'cannot re-parameterize {full} ({child}): {why}')
                if max(child.kernel_size) > 1:
                    kept.append(f'{full} ({why})')
                continue
            if not isinstance(new, ReparamConv2d):
                continue  # the factory keeps this geometry plain: the stock conv stays
            new = form.adopt(new, child)
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


def _reparam_layer(conv: nn.Conv2d, conv_cfg: dict, form: PlainConvForm):
    """The layer ``conv_cfg`` builds for ``conv``'s geometry (its padding as ``form`` gives
    it), or ``(None, why not)``."""
    if conv.padding_mode != 'zeros':
        return None, (f'padding_mode={conv.padding_mode!r}: only zero padding squeezes exactly')
    padding = form.padding(conv)
    if isinstance(padding, str):
        return None, (f'padding={padding!r} with kernel_size {conv.kernel_size} and dilation '
                      f'{conv.dilation} pads one side more than the other')
    try:
        return build_conv_layer(conv_cfg, conv.in_channels, conv.out_channels, conv.kernel_size,
                                stride=conv.stride, padding=padding, dilation=conv.dilation,
                                groups=conv.groups, bias=conv.bias is not None), None
    except ValueError as e:
        return None, str(e)


def check_conv_cfg(conv_cfg) -> None:
    """A ``conv_cfg`` that builds no layer even for a plain 3x3 conv (8 -> 8 channels, which
    every re-parameterization takes) has a bad option (a misspelt branch, scaling, ...): a
    ``ValueError`` naming it, not a network whose convs all stay plain."""
    probe = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    cfg = conv_cfg(probe, False) if callable(conv_cfg) else conv_cfg
    _, why = _reparam_layer(probe, cfg, plain_conv_form(probe))
    if why is not None:
        raise ValueError(f'conv_cfg {cfg!r} builds no layer, not even for a 3x3 conv: {why}')


class ReparamBackboneMixin:
    """What :func:`reparam_class` adds to a stock backbone class (``stock_backbone_class``).

    Args (besides the stock class's own):
        reparam_conv_cfg: the ``conv_cfg`` of the layers swapped in for the plain convs (a dict,
            or a function of the conv, see :func:`swap_convs_`); ``None`` keeps the stock network.
            The k x k convs that stay plain are named in one log line and in
            ``convs_kept_plain`` (``'name (why)'``).
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
        self.convs_kept_plain = ()
        register_load_state_dict_pre_hook(self, seed_plain_convs)
        if reparam_conv_cfg is not None and not deploy:
            check_conv_cfg(reparam_conv_cfg)
            kept = []
            swap_convs_(self, reparam_conv_cfg, kept=kept)
            self.convs_kept_plain = tuple(kept)
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

    def __reduce_ex__(self, protocol):
        return _new_backbone, (self.stock_backbone_class, ), self.__getstate__()

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
    ``OREPA<stock>``. Its instances pickle as ``stock`` and their state (``__reduce_ex__``), so
    they load wherever ``stock`` imports, in a fresh process too."""
    if stock not in _CLASSES:
        _CLASSES[stock] = type(f'OREPA{stock.__name__}', (ReparamBackboneMixin, stock), dict(
            __module__=__name__, stock_backbone_class=stock,
            __doc__=f'``{stock.__module__}.{stock.__name__}`` with OREPA layers swapped in for '
            'its plain convs (see :class:`ReparamBackboneMixin`).'))
    return _CLASSES[stock]


def _new_backbone(stock: type):
    """An empty instance of ``reparam_class(stock)`` (unpickling: its state follows)."""
    cls = reparam_class(stock)
    return cls.__new__(cls)


def default_registry():
    """The ``MODELS`` registry of the current default scope (mmpretrain's when none is set)."""
    scope = DefaultScope.get_current_instance()
    name = scope.scope_name if scope is not None else 'mmpretrain'
    registry = toolbox_registry(name)
    if registry is None or registry is MODELS:
        raise ValueError(f'default scope {name!r}: OREPA backbones are built in the MODELS '
                         'registry of a toolbox (mmpretrain, mmdet, mmseg, ...)')
    return registry


def toolbox_registry(scope: str):
    """The ``MODELS`` registry of ``scope`` (importing ``<scope>.registry``), or ``None``."""
    try:
        importlib.import_module(f'{scope}.registry')
    except ImportError:
        return None
    return find_registry(MODELS, scope)


def find_registry(registry, scope: str):
    """The registry of ``scope`` in the tree below ``registry`` (itself included), or ``None``."""
    if registry.scope == scope:
        return registry
    for child in registry.children.values():
        found = find_registry(child, scope)
        if found is not None:
            return found
    return None


def stock_class(name: str, registry=None) -> type:
    """The class ``name`` registered in ``registry`` (a toolbox's ``MODELS``, or the name of its
    scope; default: the current default scope's), its modules imported first."""
    if registry is None or isinstance(registry, str):
        scope = registry
        registry = default_registry() if scope is None else toolbox_registry(scope)
        if registry is None:
            raise ValueError(f'{scope} is not installed: no backbone {name!r}')
    registry.import_from_location()
    cls = registry.module_dict.get(name)
    if cls is None:
        raise ValueError(f'{registry.scope} has no backbone {name!r}{_why_missing(registry, name)}')
    return cls


def _why_missing(registry, name: str) -> str:
    """Why a toolbox that exports ``name`` from its backbones does not build it, or ``''``."""
    try:
        exported = importlib.import_module(f'{registry.scope}.models.backbones')
    except ImportError:
        return ''
    if name in getattr(exported, '__all__', ()):
        return (f' in its MODELS: {registry.scope}.models.backbones exports {name} without '
                f'registering it (type={name!r} does not build either)')
    return ''
