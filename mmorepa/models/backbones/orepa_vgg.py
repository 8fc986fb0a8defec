"""OREPA-VGG (supp 2.4) and RepVGG: mmpretrain's own ``RepVGG`` with OREPA 3x3 convs.

The 3x3 conv of each RepVGG block's 3x3 branch becomes an :class:`~mmorepa.layers.OREPAConv2d`
(the branch's BN is its post-addition norm); the 1x1 branch and the identity BN stay as they are.
Fused, it is mmpretrain's ``RepVGG(deploy=True)``.
"""
import copy
from typing import Optional

from .builder import OREPABuilder
from .reparam_backbone import reparam_class

__all__ = ['VGGBuilder', 'OREPAVGG', 'vgg_conv_cfg']

REPARAMS = ('orepa', 'repvgg')
_OURS = ('type', '_scope_', 'reparam', 'orepa_cfg', 'deploy')


def vgg_conv_cfg(reparam: str = 'orepa', orepa_cfg: Optional[dict] = None) -> Optional[dict]:
    """The ``conv_cfg`` swapped into RepVGG: OREPA for the 3x3 convs (``orepa_cfg``: ``branches``,
    ``scaling``), the 1x1 convs plain; ``None`` for RepVGG itself."""
    if reparam not in REPARAMS:
        raise ValueError(f'unknown reparam {reparam!r}; expected one of {list(REPARAMS)}')
    if reparam == 'repvgg':
        if orepa_cfg:
            raise ValueError(f"orepa_cfg {orepa_cfg!r} is for reparam='orepa'")
        return None
    cfg = dict(orepa_cfg or {})
    for key in cfg:
        if key not in ('branches', 'scaling'):
            raise ValueError(f"unknown orepa_cfg key {key!r}; expected 'branches' or 'scaling'")
    return dict(type='OREPA', rep_1x1=False, **cfg)


class VGGBuilder(OREPABuilder):
    """``OREPAVGG``: mmpretrain's ``RepVGG`` (any arch without SE blocks) with OREPA-VGG or
    RepVGG blocks, in every scope.

    Args:
        arch: ``'A0'``, ``'A1'``, ``'A2'``, ... or an arch dict, as in mmpretrain.
        reparam: ``'orepa'`` (OREPA-VGG) or ``'repvgg'`` (mmpretrain's RepVGG unchanged).
        orepa_cfg: options of the OREPA 3x3 convs (``branches``, ``scaling``).
        deploy: build the fused form (``RepVGG(deploy=True)``) directly.
        **kwargs: every other argument of mmpretrain's ``RepVGG``.
    """

    def __init__(self):
        super().__init__('RepVGG', 'mmpretrain')
        self.__name__ = self.__qualname__ = 'OREPAVGG'

    def __call__(self, arch, reparam: str = 'orepa', orepa_cfg: Optional[dict] = None,
                 deploy: bool = False, **kwargs):
        conv_cfg = vgg_conv_cfg(reparam, orepa_cfg)
        kwargs.pop('_scope_', None)
        return reparam_class(self.stock())(arch, reparam_conv_cfg=conv_cfg, deploy=deploy,
                                           **kwargs)

    def stock_cfg(self, cfg: dict) -> dict:
        """mmpretrain's ``RepVGG`` with ``deploy=True``: what a fused model is."""
        cfg = copy.deepcopy(dict(cfg))
        return dict(type='mmpretrain.RepVGG', deploy=True,
                    **{k: v for k, v in cfg.items() if k not in _OURS})


OREPAVGG = VGGBuilder()
