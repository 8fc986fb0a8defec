from .any_backbone import register_backbones, resolved_types, stock_model_cfg
from .builder import OREPABuilder
from .orepa_resnet import OREPAResNet
from .orepa_vgg import OREPAVGG

# OREPA<Name> in each toolbox's MODELS and, resolved when built, in the root MODELS
register_backbones()

__all__ = ['OREPABuilder', 'OREPAResNet', 'OREPAVGG', 'register_backbones', 'resolved_types',
           'stock_model_cfg']
