"""OREPA-ResNet (Sec. 3.5) and its vanilla / DBB counterparts: the toolbox's own ResNet.

``dict(type='OREPAResNet', depth=50, ...)`` builds the toolbox's ``ResNet`` (``ResNeXt`` when
``groups > 1``) with every argument that class accepts, then puts OREPA layers in place of its
plain convs (:func:`~.reparam_backbone.swap_convs_`). Its blocks and state-dict keys are the stock
ones, the same as a stock ResNet with ``conv_cfg=resnet_conv_cfg(...)``; deformable convs
(mmdet ``dcn``) stay deformable. Fused, it is the stock network (:meth:`ResNetBuilder.stock_cfg`).
"""
import copy
from typing import Optional

from .builder import OURS, OREPABuilder, resnet_conv_cfg
from .reparam_backbone import reparam_class, stock_class

__all__ = ['ResNetBuilder', 'OREPAResNet', 'resnet_conv_cfg']


def _stock_name(kwargs) -> str:
    return 'ResNeXt' if kwargs.get('groups', 1) != 1 else 'ResNet'


class ResNetBuilder(OREPABuilder):
    """``OREPAResNet``: the ``ResNet`` / ``ResNeXt`` of a registry (see :class:`OREPABuilder`)
    with a choice of re-parameterization.

    Args:
        depth: 18, 34, 50, 101 or 152.
        reparam: ``'orepa'`` (OREPA-ResNet), ``'dbb'`` or ``'none'``; see
            :func:`~.builder.resnet_conv_cfg`. The BN after each conv is the post-addition norm
            of Sec. 3.2.
        orepa_cfg: the ablations of Tables 2 and 3 (``reparam='orepa'`` only).
        deploy: build the fused form (the stock network) directly, as mmpretrain's re-param
            backbones do; ``switch_to_deploy()`` fuses a trained one in place.
        stage_blocks: blocks per stage instead of those of ``depth`` (no stock counterpart).
        **kwargs: every argument of the toolbox's ``ResNet`` (``ResNeXt`` when ``groups > 1``):
            ``deep_stem``, ``avg_down`` (ResNetV1c / V1d), ``dcn``, ``stage_with_dcn``,
            ``plugins`` (mmdet), ``drop_path_rate`` (mmpretrain), ``multi_grid`` (mmseg), ...
    """

    def __init__(self, registry=None):
        super().__init__('ResNet', registry)

    def __call__(self, depth: int, reparam: str = 'orepa', orepa_cfg: Optional[dict] = None,
                 deploy: bool = False, **kwargs):
        if not isinstance(depth, int) or isinstance(depth, bool):
            raise ValueError(f'depth must be an int, got {depth!r}')
        kwargs.pop('_scope_', None)
        stock = stock_class(_stock_name(kwargs), self.registry)
        if depth not in stock.arch_settings:
            raise ValueError(f'invalid depth {depth!r} for {stock.__name__}; expected one of '
                             f'{sorted(stock.arch_settings)}')
        bottleneck = stock.arch_settings[depth][0].__name__ == 'Bottleneck'
        conv_cfg = resnet_conv_cfg(reparam, orepa_cfg, bottleneck)
        self._check_conv_cfg(conv_cfg, kwargs, reparam)
        if tuple(kwargs.get('stage_blocks') or ()) == tuple(stock.arch_settings[depth][1]):
            kwargs.pop('stage_blocks')  # the depth's own: the stock network
        return reparam_class(stock)(depth=depth, reparam_conv_cfg=conv_cfg, deploy=deploy,
                                    **kwargs)

    def stock_cfg(self, cfg: dict) -> dict:
        """The config of the toolbox's own ``ResNet`` / ``ResNeXt`` that a fused ``cfg`` model is.
        ``stage_blocks`` other than the depth's own has no stock counterpart: then the same
        ``OREPAResNet`` with ``deploy=True`` (plain convs, the stock blocks)."""
        cfg = copy.deepcopy(dict(cfg))
        stock = stock_class(_stock_name(cfg), self.registry)
        own = stock.arch_settings.get(cfg.get('depth'), (None, ()))[1]
        out = {k: v for k, v in cfg.items() if k not in OURS}
        if cfg.get('stage_blocks') is not None and tuple(cfg['stage_blocks']) != tuple(own):
            return dict(type=cfg.get('type', 'OREPAResNet'), deploy=True,
                        stage_blocks=cfg['stage_blocks'], **out)
        return dict(type=self.stock_type(_stock_name(out)), **out)


OREPAResNet = ResNetBuilder()
