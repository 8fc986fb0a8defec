"""mmorepa: Online Convolutional Re-parameterization (OREPA, CVPR 2022) for OpenMMLab.

``import mmorepa`` registers the OREPA conv layers (``conv_cfg=dict(type='OREPA')``), blocks and
backbones in mmengine's root ``MODELS`` (found by mmpretrain, mmdet and mmseg): ``OREPAResNet``,
``OREPAVGG`` and ``OREPA<Name>`` for every backbone class of the installed toolboxes, resolved in
the config's default scope when built (no toolbox is imported here); registers
``CPUAutocastOptimWrapper`` (mixed precision on the CPU); and lets mmengine checkpoints load
under torch's ``weights_only=True`` default.
"""
from . import ops
from .checkpoint import allow_mmengine_checkpoints
from .layers import (DBB, OREPA, DiverseBranchBlock, OREPAConv1x1, OREPAConv2d, OREPALargeConv,
                     ReparamConv2d)
from .fusion import reparameterize, unfused_eval
from . import amp, config, datasets, deploy  # noqa: E402
from .models import OREPAVGG, OREPAResNet  # noqa: E402

__version__ = '0.1.0'
__all__ = ['ops', 'amp', 'config', 'datasets', 'deploy', 'reparameterize', 'unfused_eval',
           'OREPA', 'DBB', 'OREPAConv2d', 'OREPAConv1x1', 'OREPALargeConv', 'DiverseBranchBlock',
           'ReparamConv2d', 'allow_mmengine_checkpoints', 'OREPAResNet', 'OREPAVGG']

allow_mmengine_checkpoints()
