from .orepa_resnet import OREPAResNet
from .orepa_vgg import OREPAVGG

__all__ = ['OREPAResNet', 'OREPAVGG']
