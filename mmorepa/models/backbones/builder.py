"""``OREPA<Name>`` builders: what a registered OREPA backbone name is.

An :class:`OREPABuilder` is the object registered under ``OREPA<Name>``: calling it builds the
stock class ``<Name>`` of its registry with every argument that class takes and swaps OREPA
layers in for its plain convs (:class:`~.reparam_backbone.ReparamBackboneMixin`);
:meth:`OREPABuilder.stock_cfg` gives the config of the stock network that the fused model is.
A builder bound to a toolbox's ``MODELS`` builds that toolbox's class; one in the root registry
(``registry=None``) builds the class of the current default scope (mmpretrain's when none is set).
"""
import copy
import inspect
from typing import Optional

from mmengine.registry import DefaultScope

from ...layers import BRANCHES
from .reparam_backbone import reparam_class, stock_class

REPARAMS = ('none', 'dbb', 'orepa')
OREPA_OPTIONS = dict(branches=BRANCHES, scaling='vector', linear_deep_stem=True, rep_1x1=None,
                     route='auto', fake_quant_bits=None)
OURS = ('type', '_scope_', 'reparam', 'orepa_cfg', 'deploy', 'stage_blocks')

# Arguments with which a stock class that fuses its own blocks (``switch_to_deploy``) builds its
# fused form, where it is not ``deploy=True``.
STOCK_DEPLOY_ARGS = {'RepLKNet': dict(small_kernel_merged=True)}


def resnet_conv_cfg(reparam: str = 'orepa', orepa_cfg: Optional[dict] = None,
                    bottleneck: bool = True) -> Optional[dict]:
    """The ``conv_cfg`` of a re-parameterization choice, the one swapped into the stock ResNet.

    ``'orepa'``: OREPA 3x3 blocks, the linear deep stem for the 7x7, Rep-1x1 for the 1x1 convs of
    bottleneck networks (a BasicBlock network's only 1x1s are its shortcuts: they stay plain).
    ``orepa_cfg`` holds the ablations of Tables 2 and 3: ``branches``, ``scaling``
    (``'vector' | 'scalar' | 'none'``), ``linear_deep_stem``, ``rep_1x1`` (default: bottleneck);
    ``route`` (``'auto' | 'kernel' | 'feature'``: how training computes the C^3 pairs); and
    ``fake_quant_bits`` (INT8 deployment: kernels on their per-channel grid, see ``OREPA``).
    ``'dbb'``: DBB blocks for the 7x7 and 3x3 convs. ``'none'``: the vanilla ResNet (``None``).
    """
    if reparam not in REPARAMS:
        raise ValueError(f'unknown reparam {reparam!r}; expected one of {list(REPARAMS)}')
    if orepa_cfg and reparam != 'orepa':
        raise ValueError(f'orepa_cfg {orepa_cfg!r} is for reparam=\'orepa\', got {reparam!r}')
    if reparam == 'none':
        return None
    if reparam == 'dbb':
        return dict(type='DBB')
    cfg = dict(OREPA_OPTIONS)
    for key in orepa_cfg or {}:
        if key not in cfg:
            raise ValueError(f'unknown orepa_cfg key {key!r}; expected one of {list(cfg)}')
    cfg.update(orepa_cfg or {})
    if cfg['rep_1x1'] is None:
        cfg['rep_1x1'] = bottleneck
    return dict(type='OREPA', **cfg)


def orepa_conv_cfgs(reparam: str = 'orepa', orepa_cfg: Optional[dict] = None):
    """The ``conv_cfg`` swapped into any backbone, as a function ``(conv, bottleneck) -> dict``
    (``bottleneck``: a 1x1 of a bottleneck block or its shortcut), or ``None`` for
    ``reparam='none'``. Options and checks are those of :func:`resnet_conv_cfg`."""
    in_block = resnet_conv_cfg(reparam, orepa_cfg, bottleneck=True)
    elsewhere = resnet_conv_cfg(reparam, orepa_cfg, bottleneck=False)
    if in_block is None:
        return None
    return lambda conv, bottleneck: in_block if bottleneck else elsewhere


def check_kwargs(name: str, stock: type, kwargs: dict):
    """Arguments of the stock class only (following ``**kwargs`` up its bases): a wrong name
    fails here in one line naming it."""
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


class OREPABuilder:
    """The registered ``OREPA<name>``: ``<name>`` of ``registry`` (a toolbox's ``MODELS``, the
    name of its scope, or ``None``: the current default scope's) with OREPA layers in place of
    its plain convs.

    Call arguments: every argument of the stock class, and ``reparam`` (``'orepa'``, ``'dbb'``,
    ``'none'``), ``orepa_cfg`` (options of :func:`resnet_conv_cfg`), ``deploy`` (build the fused
    form directly). 1x1 convs: Rep-1x1 for the 1x1s of bottleneck blocks (and their shortcut),
    plain elsewhere, as in OREPA-ResNet; ``orepa_cfg=dict(rep_1x1=True / False)`` sets all.
    """

    def __init__(self, name: str, registry=None):
        self.name = name
        self.registry = registry
        self.__name__ = self.__qualname__ = f'OREPA{name}'

    def __repr__(self) -> str:
        where = getattr(self.registry, 'scope', self.registry) or 'the default scope'
        return f'<{type(self).__name__} {self.__name__}: {self.name} of {where}>'

    def stock(self) -> type:
        """The stock class this name builds (now, in the current default scope if unbound)."""
        return stock_class(self.name, self.registry)

    def __call__(self, *args, reparam: str = 'orepa', orepa_cfg: Optional[dict] = None,
                 deploy: bool = False, **kwargs):
        stock = self.stock()
        conv_cfg = orepa_conv_cfgs(reparam, orepa_cfg)
        self._check_conv_cfg(conv_cfg, kwargs, reparam)
        kwargs.pop('_scope_', None)
        check_kwargs(self.name, stock, {k: v for k, v in kwargs.items() if k != 'stage_blocks'})
        return reparam_class(stock)(*args, reparam_conv_cfg=conv_cfg, deploy=deploy, **kwargs)

    def _check_conv_cfg(self, conv_cfg, kwargs, reparam):
        if conv_cfg is not None and kwargs.get('conv_cfg') is not None:
            raise ValueError(f"{self.__name__}: conv_cfg={kwargs['conv_cfg']!r} and "
                             f"reparam={reparam!r} both choose the convs: use reparam='none' "
                             'with a conv_cfg')

    def stock_type(self, name: str) -> str:
        """The config type of the stock class ``name``: scoped (``'mmpretrain.HRNet'``) where an
        unbound builder resolves with no default scope set, else the bare name."""
        if self.registry is None and DefaultScope.get_current_instance() is None:
            return f'mmpretrain.{name}'
        return name

    def stock_cfg(self, cfg: dict) -> dict:
        """The config of the stock network that a fused model of ``cfg`` is: the same arguments,
        the stock type, the stock class's own fused form where it has one (``deploy=True``;
        ``STOCK_DEPLOY_ARGS``). ``stage_blocks`` that the stock class does not take has no stock
        counterpart: then the same ``OREPA<name>`` with ``deploy=True``."""
        cfg = copy.deepcopy(dict(cfg))
        stock = self.stock()
        params = inspect.signature(stock.__init__).parameters
        out = {k: v for k, v in cfg.items() if k not in OURS}
        if 'stage_blocks' in cfg and 'stage_blocks' in params:
            out['stage_blocks'] = cfg['stage_blocks']
        elif cfg.get('stage_blocks') is not None:
            return dict(type=cfg['type'], deploy=True, stage_blocks=cfg['stage_blocks'], **out)
        if 'deploy' in params:
            out['deploy'] = True
        out.update(STOCK_DEPLOY_ARGS.get(stock.__name__, {}))
        return dict(type=self.stock_type(self.name), **out)
