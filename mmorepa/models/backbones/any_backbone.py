"""``OREPA<Name>``: every model class of mmpretrain, mmdet, mmseg (and any other registry below
mmengine's ``MODELS``, a user's included) with OREPA layers.

``dict(type='OREPA<Name>', ...)`` (``OREPAResNetV1c``, ``OREPAResNet_CIFAR``, ``OREPAHRNet``,
``OREPARegNet``, a user's ``OREPAMyNet``, ...) builds the class ``<Name>`` with every argument it
takes, then swaps OREPA layers in for its plain convs (:class:`~.builder.OREPABuilder`), so every
k x k conv (k > 1) becomes re-parameterizable; ``reparam='dbb'`` swaps in DBB blocks,
``reparam='none'`` keeps the stock network. Fused (or built with ``deploy=True``) it is the stock
``<Name>``; :func:`stock_model_cfg` turns a config into the stock one.

Where the names live (mmengine's registries have no hook for unknown names):

- **In each toolbox's** ``MODELS``: every ``nn.Module`` class registered there gets
  ``OREPA<Name>`` in the same registry when it is registered (:func:`name_registered_classes`
  watches mmengine's ``MODELS`` tree: the registries below it register as before, each
  registration also adds the OREPA name). A model built from a toolbox's registry (its default
  scope, or a scoped type such as ``'mmdet.RetinaNet'`` whose children its own registry builds)
  finds that toolbox's class. A class registered later under a name we gave replaces ours.
- **In the root** ``MODELS``, for builds with no toolbox registry in play and before any toolbox
  is imported: one builder per name in the ``__all__`` of each installed toolbox's
  ``models/backbones/__init__.py``, read as text (``import mmorepa`` imports no toolbox), that
  resolves the name in the current default scope when called.

``OREPAResNet`` (``ResNet`` / ``ResNeXt`` by ``groups``) and ``OREPAVGG`` (mmpretrain's
``RepVGG``; the paper's OREPA-VGG) have builders of their own; the plain ``VGG`` therefore has no
``OREPA`` name.
"""
import ast
import importlib.util
from pathlib import Path
from typing import Iterator, Optional, Tuple

import torch.nn as nn
from mmengine.registry import MODELS, DefaultScope, Registry

from .builder import OREPABuilder
from .orepa_resnet import OREPAResNet, ResNetBuilder
from .orepa_vgg import OREPAVGG
from .reparam_backbone import toolbox_registry

TOOLBOXES = ('mmpretrain', 'mmdet', 'mmseg')
# stock names whose OREPA name is a builder of its own: ResNet's, or reserved (OREPAVGG is RepVGG)
SPECIAL = {'ResNet': ResNetBuilder, 'VGG': None}


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


def builder_for(name: str, registry=None) -> Optional[OREPABuilder]:
    """The builder of ``OREPA<name>`` (bound to ``registry``), or ``None`` where the name is
    reserved."""
    if name in SPECIAL:
        special = SPECIAL[name]
        return None if special is None else special(registry)
    return OREPABuilder(name, registry)


def register_root_names() -> Tuple[str, ...]:
    """Register ``OREPAResNet``, ``OREPAVGG`` and ``OREPA<Name>`` for every exported backbone of
    the installed toolboxes in the root ``MODELS`` (resolved in the default scope when built)."""
    names = []
    for key, builder in (('OREPAResNet', OREPAResNet), ('OREPAVGG', OREPAVGG)):
        if key not in MODELS.module_dict:
            MODELS.register_module(name=key, module=builder)
            names.append(key)
    for toolbox in TOOLBOXES:
        for name in toolbox_backbone_names(toolbox):
            builder = builder_for(name)
            key = f'OREPA{name}'
            if builder is not None and key not in MODELS.module_dict:
                MODELS.register_module(name=key, module=builder)
                names.append(key)
    return tuple(names)


def _orepa_name(registry: Registry, name: str, module) -> Optional[Tuple[str, OREPABuilder]]:
    """The OREPA name and builder ``registry`` gets for ``module`` registered as ``name``."""
    if not (isinstance(module, type) and issubclass(module, nn.Module)) or \
            module.__module__.split('.')[0] == 'mmorepa':
        return None
    builder = builder_for(name, registry)
    return None if builder is None else (f'OREPA{name}', builder)


def _add_orepa_names(registry: Registry, items):
    for name, module in items:
        named = _orepa_name(registry, name, module)
        if named is not None and named[0] not in registry.module_dict:
            registry.module_dict[named[0]] = named[1]


def _names_of(module, module_name):
    if module_name is None:
        return [module.__name__]
    return [module_name] if isinstance(module_name, str) else list(module_name)


def _watch(registry: Registry):
    """Give ``registry`` (and the registries below it, now and later) OREPA names for its
    classes, those registered so far and those registered from now on."""
    if getattr(registry, '_mmorepa_watched', False):
        return
    register, add_child = registry._register_module, registry._add_child

    def register_module(module, module_name=None, force=False):
        for name in _names_of(module, module_name):  # a class's own name replaces ours
            if isinstance(registry.module_dict.get(name), OREPABuilder):
                del registry.module_dict[name]
        register(module=module, module_name=module_name, force=force)
        _add_orepa_names(registry, [(n, module) for n in _names_of(module, module_name)])

    def add_child_registry(child):
        add_child(child)
        _watch(child)

    registry._register_module = register_module
    registry._add_child = add_child_registry
    registry._mmorepa_watched = True
    _add_orepa_names(registry, list(registry.module_dict.items()))
    for child in list(registry.children.values()):
        _watch(child)


def name_registered_classes():
    """Watch the registries below mmengine's root ``MODELS`` (see the module docstring): the
    root's own entries are not named; its children, and theirs, are."""
    if getattr(MODELS, '_mmorepa_watched', False):
        return
    add_child = MODELS._add_child

    def add_child_registry(child):
        add_child(child)
        _watch(child)

    MODELS._add_child = add_child_registry
    MODELS._mmorepa_watched = True
    for child in list(MODELS.children.values()):
        _watch(child)


def register_backbones() -> Tuple[str, ...]:
    """Both kinds of names (see the module docstring); returns those registered in the root."""
    name_registered_classes()
    return register_root_names()


# -- the stock config of a model config -----------------------------------------------------------
def _lookup(type_name: str, scope: Optional[str]):
    """What ``type_name`` is in the registry of ``scope`` (the root's when ``None``), and the
    scope whose registry builds the object's children (that of a scoped type, else ``scope``)."""
    type_scope, bare = Registry.split_scope_key(type_name)
    if '.' in bare:  # an import path, not a registered name
        return None, scope
    scope = type_scope or scope
    registry = MODELS if scope is None else toolbox_registry(scope)
    if registry is None:
        return None, scope
    registry.import_from_location()
    while registry is not None and bare not in registry.module_dict:
        registry = registry.parent
    return (None if registry is None else registry.module_dict[bare]), scope


def _resolve(node: dict, scope: Optional[str]):
    """What the ``type`` of config ``node`` is (``None``: no type, or none a registry has) and
    the scope its children are built in. The node is built in its ``_scope_``, else the default
    scope, else ``scope`` (that of the enclosing model), as mmengine builds it."""
    if node.get('_scope_'):
        scope = node['_scope_']
    elif DefaultScope.get_current_instance() is not None:
        scope = DefaultScope.get_current_instance().scope_name
    if not isinstance(node.get('type'), str):
        return None, scope
    return _lookup(node['type'], scope)


def resolved_types(node, scope: Optional[str] = None) -> Iterator:
    """What each ``type`` in ``node`` (a model config: dicts and lists) is in the registry that
    builds it (``None`` where that registry has no such name), resolved as in
    :func:`stock_model_cfg`."""
    if isinstance(node, (list, tuple)):
        for v in node:
            yield from resolved_types(v, scope)
    elif isinstance(node, dict):
        found, child_scope = _resolve(node, scope)
        if isinstance(node.get('type'), str):
            yield found
        for v in node.values():
            yield from resolved_types(v, child_scope)


def stock_model_cfg(node, scope: Optional[str] = None):
    """``node`` (a model config: dicts and lists) with every OREPA backbone replaced by the
    config of the stock network its fused form is (:meth:`OREPABuilder.stock_cfg`), each
    resolved as mmengine builds it: in the default scope's registry when one is set, else in the
    registry of the enclosing model's scope (``'mmdet.RetinaNet'`` -> mmdet's), a node's
    ``_scope_`` first."""
    if isinstance(node, (list, tuple)):
        return type(node)(stock_model_cfg(v, scope) for v in node)
    if not isinstance(node, dict):
        return node
    found, child_scope = _resolve(node, scope)
    node = {k: stock_model_cfg(v, child_scope) for k, v in node.items()}
    if isinstance(found, OREPABuilder):
        stock = found.stock_cfg(node)
        type_scope = Registry.split_scope_key(node['type'])[0]
        if type_scope and '.' not in stock['type']:
            stock['type'] = f'{type_scope}.{stock["type"]}'
        return stock
    return node
