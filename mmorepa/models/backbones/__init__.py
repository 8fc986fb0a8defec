from .any_backbone import register_backbones
from .orepa_resnet import OREPAResNet
from .orepa_vgg import OREPAVGG

# OREPA<Name> for every backbone of the installed toolboxes, resolved when built (any_backbone)
register_backbones()

__all__ = ['OREPAResNet', 'OREPAVGG', 'register_backbones']
