from .backbones import OREPABuilder, OREPAResNet, OREPAVGG, resolved_types, stock_model_cfg

__all__ = ['OREPABuilder', 'OREPAResNet', 'OREPAVGG', 'resolved_types', 'stock_model_cfg']
