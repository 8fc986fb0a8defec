from .backbones import OREPABuilder, OREPAResNet, OREPAVGG, stock_model_cfg

__all__ = ['OREPABuilder', 'OREPAResNet', 'OREPAVGG', 'stock_model_cfg']
