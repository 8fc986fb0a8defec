"""Reading a config file and building its model in the config's toolbox."""
import copy
from typing import Optional

import torch.nn as nn
from mmengine.config import Config, ConfigDict
from mmengine.registry import MODELS, init_default_scope

from .errors import ConfigError
from .fileio import check_input_file


def read_config(path, cfg_options: Optional[dict] = None) -> Config:
    """``Config.fromfile(path)`` with ``cfg_options`` (``--cfg-options``) merged; a missing file is
    a :class:`~mmorepa.errors.PathError`, a broken one a :class:`ConfigError` naming it. A config
    without ``default_scope`` gets the scope its model type names (:func:`_scope_of_model`)."""
    path = check_input_file(path, 'config')
    try:
        cfg = Config.fromfile(str(path))
    except Exception as e:  # the user's file: a syntax error, a bad _base_, a missing import
        first = str(e).strip().splitlines()[0] if str(e).strip() else ''
        raise ConfigError(f'cannot read config {path}: {type(e).__name__}: {first}') from None
    if cfg_options:
        try:
            cfg.merge_from_dict(cfg_options)
        except Exception as e:
            raise ConfigError(f'cannot apply --cfg-options {cfg_options} to {path}: {e}') \
                from None
    if cfg.get('default_scope', None) is None and isinstance(cfg.get('model', None), dict):
        cfg.default_scope = _scope_of_model(cfg.model)
    return cfg


def _scope_of_model(model: dict) -> str:
    """The scope of a config without ``default_scope``: the toolbox of its fully qualified model
    type (``'mmpretrain.ImageClassifier'`` -> ``'mmpretrain'``), else ``'mmengine'`` (the root
    registries, which is what no scope means to mmengine)."""
    kind = model.get('type')
    if isinstance(kind, str) and '.' in kind:
        return kind.split('.', 1)[0]
    return 'mmengine'


def build_model(cfg: Config) -> nn.Module:
    """Build ``cfg.model`` in the config's toolbox (its ``default_scope``)."""
    cfg = copy.deepcopy(cfg)
    if cfg.get('custom_imports'):
        from mmengine.utils import import_modules_from_strings
        import_modules_from_strings(**cfg.custom_imports)
    init_default_scope(cfg.get('default_scope', None))
    model = cfg.model
    if isinstance(model, (dict, ConfigDict)):
        model = MODELS.build(model)
    return model


def build_model_of(cfg: Config, source) -> nn.Module:
    """:func:`build_model`, with a model config that does not build (an unknown type, a bad layer
    argument) reported as a :class:`ConfigError` naming ``source``."""
    try:
        return build_model(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f'cannot build the model of {source}: {e}') from None
