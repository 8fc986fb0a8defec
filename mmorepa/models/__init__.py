from .backbones import OREPAVGG, OREPAResNet

__all__ = ['OREPAResNet', 'OREPAVGG']
