"""OREPA-ResNet (Sec. 3.5) and its vanilla / DBB counterparts: the toolbox's own ResNet.

``dict(type='OREPAResNet', depth=50, ...)`` builds the current toolbox's ``ResNet`` (``ResNeXt``
when ``groups > 1``) with every argument that class accepts, then puts OREPA layers in place of its
plain convs (:func:`~.reparam_backbone.swap_convs_`). Its blocks and state-dict keys are the stock
ones, the same as a stock ResNet with ``conv_cfg=resnet_conv_cfg(...)``; deformable convs
(mmdet ``dcn``) stay deformable. Fused, it is the stock network (:func:`resnet_stock_cfg`).
"""
import copy
from typing import Optional

from mmengine.registry import MODELS

from ...layers import BRANCHES
from .reparam_backbone import reparam_class, stock_class

REPARAMS = ('none', 'dbb', 'orepa')
OREPA_OPTIONS = dict(branches=BRANCHES, scaling='vector', linear_deep_stem=True, rep_1x1=None,
                     route='auto', fake_quant_bits=None)
_OURS = ('type', '_scope_', 'reparam', 'orepa_cfg', 'deploy', 'stage_blocks')


def _stock_name(kwargs) -> str:
    return 'ResNeXt' if kwargs.get('groups', 1) != 1 else 'ResNet'


def resnet_conv_cfg(reparam: str = 'orepa', orepa_cfg: Optional[dict] = None,
                    bottleneck: bool = True) -> Optional[dict]:
    """The ``conv_cfg`` of a re-parameterization choice, the one swapped into the stock ResNet.

    ``'orepa'``: OREPA 3x3 blocks, the linear deep stem for the 7x7, Rep-1x1 for the 1x1 convs of
    bottleneck networks (a BasicBlock network's only 1x1s are its shortcuts: they stay plain).
    ``orepa_cfg`` holds the ablations of Tables 2 and 3: ``branches``, ``scaling``
    (``'vector' | 'scalar' | 'none'``), ``linear_deep_stem``, ``rep_1x1`` (default: bottleneck);
    ``route`` (``'auto' | 'kernel' | 'feature'``: how training computes the C^3 pairs); and
    ``fake_quant_bits`` (INT8 deployment: kernels on their per-channel grid, see ``OREPA``).
    ``'dbb'``: DBB blocks for the 7x7 and 3x3 convs. ``'none'``: the vanilla ResNet (``None``).
    """
    if reparam not in REPARAMS:
        raise ValueError(f'unknown reparam {reparam!r}; expected one of {list(REPARAMS)}')
    if orepa_cfg and reparam != 'orepa':
        raise ValueError(f'orepa_cfg {orepa_cfg!r} is for reparam=\'orepa\', got {reparam!r}')
    if reparam == 'none':
        return None
    if reparam == 'dbb':
        return dict(type='DBB')
    cfg = dict(OREPA_OPTIONS)
    for key in orepa_cfg or {}:
        if key not in cfg:
            raise ValueError(f'unknown orepa_cfg key {key!r}; expected one of {list(cfg)}')
    cfg.update(orepa_cfg or {})
    if cfg['rep_1x1'] is None:
        cfg['rep_1x1'] = bottleneck
    return dict(type='OREPA', **cfg)


@MODELS.register_module()
def OREPAResNet(depth: int, reparam: str = 'orepa', orepa_cfg: Optional[dict] = None,
                deploy: bool = False, **kwargs):
    """ResNet / ResNeXt / wide ResNet of the current toolbox with a choice of re-parameterization.

    Args:
        depth: 18, 34, 50, 101 or 152.
        reparam: ``'orepa'`` (OREPA-ResNet), ``'dbb'`` or ``'none'``; see :func:`resnet_conv_cfg`.
            The network's BN after each conv is the post-addition norm of Sec. 3.2.
        orepa_cfg: the ablations of Tables 2 and 3 (``reparam='orepa'`` only).
        deploy: build the fused form (the stock network) directly, as mmpretrain's re-param
            backbones do; ``switch_to_deploy()`` fuses a trained one in place.
        stage_blocks: blocks per stage instead of those of ``depth`` (no stock counterpart).
        **kwargs: every argument of the toolbox's ``ResNet`` (``ResNeXt`` when ``groups > 1``):
            ``deep_stem``, ``avg_down`` (ResNetV1c / V1d), ``dcn``, ``stage_with_dcn``,
            ``plugins`` (mmdet), ``drop_path_rate`` (mmpretrain), ``multi_grid`` (mmseg), ...
    """
    if not isinstance(depth, int) or isinstance(depth, bool):
        raise ValueError(f'depth must be an int, got {depth!r}')
    stock = stock_class(_stock_name(kwargs))
    if depth not in stock.arch_settings:
        raise ValueError(f'invalid depth {depth!r} for {stock.__name__}; expected one of '
                         f'{sorted(stock.arch_settings)}')
    bottleneck = stock.arch_settings[depth][0].__name__ == 'Bottleneck'
    conv_cfg = resnet_conv_cfg(reparam, orepa_cfg, bottleneck)
    if conv_cfg is not None and kwargs.get('conv_cfg') is not None:
        raise ValueError(f"conv_cfg={kwargs['conv_cfg']!r} and reparam={reparam!r} both choose "
                         "the convs: use reparam='none' with a conv_cfg")
    if tuple(kwargs.get('stage_blocks') or ()) == tuple(stock.arch_settings[depth][1]):
        kwargs.pop('stage_blocks')  # the depth's own: the stock network
    return reparam_class(stock)(depth=depth, reparam_conv_cfg=conv_cfg, deploy=deploy, **kwargs)


def resnet_stock_cfg(cfg: dict) -> dict:
    """The config of the toolbox's own ``ResNet`` / ``ResNeXt`` that a fused ``cfg`` model is
    (the toolbox is the current default scope: mmpretrain, mmdet or mmseg). ``stage_blocks``
    other than the depth's own has no stock counterpart: then the same ``OREPAResNet`` with
    ``deploy=True`` (plain convs, the stock blocks)."""
    cfg = copy.deepcopy(dict(cfg))
    stock = stock_class(_stock_name(cfg))
    own = stock.arch_settings.get(cfg.get('depth'), (None, ()))[1]
    out = {k: v for k, v in cfg.items() if k not in _OURS}
    if cfg.get('stage_blocks') is not None and tuple(cfg['stage_blocks']) != tuple(own):
        return dict(type=cfg.get('type', 'OREPAResNet'), deploy=True,
                    stage_blocks=cfg['stage_blocks'], **out)
    return dict(type=_stock_name(out), **out)


OREPAResNet.stock_cfg = resnet_stock_cfg
