"""RepVGG-A0/A1/A2 with RepVGG blocks, OREPA-VGG blocks (supp 2.4) or none: a thin subclass of
mmpretrain's ``RepVGG`` whose blocks are mmorepa's :class:`~mmorepa.layers.RepVGGBlock` under the
same names, so a fused model loads into mmpretrain's ``RepVGG(deploy=True)``."""
import copy
from typing import Optional

from mmengine.registry import MODELS
from mmpretrain.models.backbones.repvgg import RepVGG
from mmpretrain.models.backbones.repvgg import RepVGGBlock as _MMPretrainRepVGGBlock

from ...layers import RepVGGBlock
from ...reparameterize import fuse_children

REPARAMS = {'none': dict(branches=('kxk', )), 'repvgg': dict(), 'orepa': dict(orepa=True)}


@MODELS.register_module()
class OREPAVGG(RepVGG):
    """mmpretrain's ``RepVGG`` (any arch without SE blocks) with a choice of block.

    Args:
        arch: ``'A0'``, ``'A1'``, ``'A2'``, ... or an arch dict, as in mmpretrain.
        reparam: ``'orepa'`` (OREPA-VGG: RepVGG's three branches, the 3x3 one an OREPA conv),
            ``'repvgg'`` (RepVGG) or ``'none'`` (3x3-BN-ReLU, the plain VGG).
        orepa_cfg: options of the OREPA 3x3 branch (``branches``, ``scaling``, ...).
        Other arguments as mmpretrain's ``RepVGG``.
    """

    def __init__(self, arch, reparam: str = 'orepa', orepa_cfg: Optional[dict] = None,
                 deploy: bool = False, **kwargs):
        if reparam not in REPARAMS:
            raise ValueError(f'unknown reparam {reparam!r}; expected one of {list(REPARAMS)}')
        super().__init__(arch, deploy=deploy, **kwargs)
        if self.arch.get('se_cfg') is not None:
            raise ValueError(f'OREPAVGG does not support SE blocks (arch {arch!r})')
        if kwargs.get('with_cp'):
            raise ValueError('OREPAVGG does not support with_cp')
        if deploy:
            return
        options = dict(REPARAMS[reparam])
        if reparam == 'orepa':
            options['orepa_cfg'] = orepa_cfg
        for name, module in list(self.named_modules()):
            if isinstance(module, _MMPretrainRepVGGBlock):
                parent_name, _, child = name.rpartition('.')
                parent = self.get_submodule(parent_name) if parent_name else self
                setattr(parent, child, RepVGGBlock(
                    module.in_channels, module.out_channels, module.stride, module.padding,
                    module.dilation, module.groups, norm_cfg=self.norm_cfg,
                    act_cfg=self.act_cfg, **options))

    def switch_to_deploy(self):
        """Fuse every block into its ``branch_reparam`` conv (in place, idempotent)."""
        fuse_children(self)
        self.deploy = True

    @classmethod
    def stock_cfg(cls, cfg: dict) -> dict:
        """mmpretrain's ``RepVGG`` with ``deploy=True``: what a fused model loads into."""
        cfg = copy.deepcopy(dict(cfg))
        for key in ('type', 'reparam', 'orepa_cfg', '_scope_'):
            cfg.pop(key, None)
        return dict(type='mmpretrain.RepVGG', **dict(cfg, deploy=True))
