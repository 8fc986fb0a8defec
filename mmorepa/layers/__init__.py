"""Re-parameterizable conv layers, registered in mmengine's root ``MODELS``."""
from mmengine.registry import MODELS

from .base import ReparamConv2d
from .dbb import DBB, DiverseBranchBlock
from .orepa import (BRANCHES, OREPA, SCALE_INIT, OREPAConv1x1, OREPAConv2d, OREPALargeConv)

__all__ = ['ReparamConv2d', 'OREPAConv2d', 'OREPAConv1x1', 'OREPALargeConv', 'OREPA', 'DBB',
           'DiverseBranchBlock', 'BRANCHES', 'SCALE_INIT']

# The root registry: mmcv.cnn.build_conv_layer and the child registries of mmpretrain, mmdet and
# mmseg all find these names.
for _module in (OREPAConv2d, OREPAConv1x1, OREPALargeConv, DiverseBranchBlock):
    MODELS.register_module(module=_module)
MODELS.register_module(name='OREPA', module=OREPA)
MODELS.register_module(name='DBB', module=DBB)
