"""``OREPA<Name>``: every backbone class of mmpretrain, mmdet and mmseg with OREPA layers.

``dict(type='OREPA<Name>', ...)`` (``OREPAResNetV1c``, ``OREPAResNet_CIFAR``, ``OREPAHRNet``,
``OREPARegNet``, ...) builds the class ``<Name>`` of the current default scope (the config's
``default_scope``) with every argument it takes, then swaps OREPA layers in for its plain convs
(:class:`~.reparam_backbone.ReparamBackboneMixin`), so every k x k conv (k > 1) becomes
re-parameterizable; ``reparam='dbb'`` swaps in DBB blocks, ``reparam='none'`` keeps the stock
network. 1x1 convs: Rep-1x1 for the 1x1s of bottleneck blocks (and their shortcut), plain
elsewhere, as in OREPA-ResNet; ``orepa_cfg=dict(rep_1x1=True / False)`` sets all of them.
Fused (or built with ``deploy=True``) it is the stock ``<Name>``; its stock config is
``stock_cfg(cfg)``.

How the names resolve without importing the toolboxes: ``import mmorepa`` registers, in mmengine's
root ``MODELS`` (which mmpretrain's, mmdet's and mmseg's registries fall back on), one small
builder per name in the ``__all__`` of each installed toolbox's ``models/backbones/__init__.py``,
read as text (the toolbox is not imported). A builder imports the default scope's toolbox only
when it is called, and looks ``<Name>`` up in that toolbox's registry. ``OREPAResNet`` and
``OREPAVGG`` (the paper's OREPA-ResNet and OREPA-VGG, on ``ResNet`` and ``RepVGG``) keep their own
builders; mmpretrain's plain ``VGG`` therefore has no ``OREPA`` name.
"""
import ast
import copy
import importlib.util
from pathlib import Path
from typing import Optional, Tuple

from mmengine.registry import MODELS

from .orepa_resnet import resnet_conv_cfg
from .reparam_backbone import reparam_class, stock_class

TOOLBOXES = ('mmpretrain', 'mmdet', 'mmseg')
_OURS = ('type', 'reparam', 'orepa_cfg', 'deploy', 'stage_blocks')


def toolbox_backbone_names(toolbox: str) -> Tuple[str, ...]:
    """The backbone classes an installed toolbox exports (``models/backbones/__init__.py``'s
    ``__all__``), read without importing the toolbox; ``()`` if it is not installed."""
    spec = importlib.util.find_spec(toolbox)  # a top-level name: nothing is imported
    if spec is None or not spec.submodule_search_locations:
        return ()
    path = Path(list(spec.submodule_search_locations)[0]) / 'models' / 'backbones' / '__init__.py'
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return ()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, 'id', None) == '__all__'
                                                for t in node.targets):
            try:
                return tuple(n for n in ast.literal_eval(node.value) if isinstance(n, str))
            except ValueError:
                return ()
    return ()


def orepa_conv_cfgs(reparam: str = 'orepa', orepa_cfg: Optional[dict] = None):
    """The ``conv_cfg`` swapped into any backbone, as a function ``(conv, bottleneck) -> dict``
    (``bottleneck``: a 1x1 of a bottleneck block or its shortcut), or ``None`` for
    ``reparam='none'``. Options and checks are those of :func:`resnet_conv_cfg`."""
    in_block = resnet_conv_cfg(reparam, orepa_cfg, bottleneck=True)
    elsewhere = resnet_conv_cfg(reparam, orepa_cfg, bottleneck=False)
    if in_block is None:
        return None
    return lambda conv, bottleneck: in_block if bottleneck else elsewhere


def _check_kwargs(name: str, stock: type, kwargs: dict):
    """Arguments of the stock class only (following ``**kwargs`` up its bases): a wrong name
    fails here in one line naming it."""
    import inspect
    known = set()
    for cls in stock.__mro__:
        if '__init__' not in vars(cls):
            continue
        params = inspect.signature(cls.__init__).parameters
        known.update(params)
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    else:
        return  # **kwargs all the way up: the stock class decides
    for key in kwargs:
        if key not in known:
            raise TypeError(f'OREPA{name}: {stock.__module__}.{name} takes no argument {key!r}')


def backbone_builder(name: str):
    """The registered ``OREPA<name>``: builds ``<name>`` of the default scope with OREPA layers."""

    def build(*args, reparam: str = 'orepa', orepa_cfg: Optional[dict] = None,
              deploy: bool = False, **kwargs):
        stock = stock_class(name)
        conv_cfg = orepa_conv_cfgs(reparam, orepa_cfg)
        if conv_cfg is not None and kwargs.get('conv_cfg') is not None:
            raise ValueError(f"OREPA{name}: conv_cfg={kwargs['conv_cfg']!r} and "
                             f"reparam={reparam!r} both choose the convs: use reparam='none' "
                             'with a conv_cfg')
        kwargs.pop('_scope_', None)
        _check_kwargs(name, stock, {k: v for k, v in kwargs.items() if k != 'stage_blocks'})
        return reparam_class(stock)(*args, reparam_conv_cfg=conv_cfg, deploy=deploy, **kwargs)

    build.__name__ = build.__qualname__ = f'OREPA{name}'
    build.__module__ = __name__
    build.__doc__ = (f'``{name}`` of the default scope (mmpretrain, mmdet or mmseg) with OREPA '
                     'layers in place of its plain convs; see :mod:`' + __name__ + '`.')
    build.stock_cfg = lambda cfg: stock_cfg(name, cfg)
    return build


def stock_cfg(name: str, cfg: dict) -> dict:
    """The config of the stock ``<name>`` that a fused ``OREPA<name>`` model is: the same
    arguments, the base type (``deploy=True`` where the stock class has its own fused form, as
    mmpretrain's ``RepVGG``). ``stage_blocks`` that the stock class does not take has no stock
    counterpart: then the same ``OREPA<name>`` with ``deploy=True``."""
    import inspect
    cfg = copy.deepcopy(dict(cfg))
    stock = stock_class(name)
    params = inspect.signature(stock.__init__).parameters
    out = {k: v for k, v in cfg.items() if k not in _OURS}
    if 'stage_blocks' in cfg and 'stage_blocks' in params:
        out['stage_blocks'] = cfg['stage_blocks']
    elif cfg.get('stage_blocks') is not None:
        return dict(type=cfg['type'], deploy=True, stage_blocks=cfg['stage_blocks'], **out)
    if 'deploy' in params:
        out['deploy'] = True
    return dict(type=name, **out)


def register_backbones() -> Tuple[str, ...]:
    """Register ``OREPA<Name>`` in the root ``MODELS`` for every backbone of the installed
    toolboxes (names already registered, ``OREPAResNet`` and ``OREPAVGG``, are kept)."""
    names = []
    for toolbox in TOOLBOXES:
        for name in toolbox_backbone_names(toolbox):
            key = f'OREPA{name}'
            if key not in MODELS.module_dict:
                MODELS.register_module(name=key, module=backbone_builder(name))
                names.append(key)
    return tuple(names)
