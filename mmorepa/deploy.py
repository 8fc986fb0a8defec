"""Turning a trained model into a deployable one: the stock-network deploy config, fusion
checked against an independent float64 reference, and :func:`convert`, which writes the fused
checkpoint and its deploy config."""
import copy
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn as nn
from mmengine.config import Config, ConfigDict
from mmengine.registry import init_default_scope

from .checkpoint import FUSED_FROM, check_state_dict_fits, load_checkpoint_strict
from .config import build_model, build_model_of, read_config
from .errors import ArgumentError, PathError
from .fileio import atomic_write, check_input_file, check_output_file
from .fusion import reparameterize, unfused_eval
from .models import resolved_types, stock_model_cfg

# conv_cfg types that exist only in mmorepa: a deploy config drops them (plain convs instead).
CONV_TYPES = ('OREPA', 'DBB', 'OREPAConv2d', 'OREPAConv1x1', 'OREPALargeConv',
              'DiverseBranchBlock')
# The first line of the deploy configs that convert() writes: only such a file is replaced
# without being named as the output. (No package name in it: the file needs none.)
DEPLOY_CONFIG_HEADER = '# deploy config written by tools/deploy_convert.py'


def _deploy_model_cfg(node):
    """mmorepa backbones replaced by their stock form (:func:`mmorepa.models.stock_model_cfg`)
    and mmorepa conv types dropped."""
    return _drop_conv_types(stock_model_cfg(node))


def _drop_conv_types(node):
    if isinstance(node, (list, tuple)):
        return type(node)(_drop_conv_types(v) for v in node)
    if not isinstance(node, dict):
        return node
    node = {k: _drop_conv_types(v) for k, v in node.items()}
    conv_cfg = node.get('conv_cfg')
    if isinstance(conv_cfg, dict) and conv_cfg.get('type') in CONV_TYPES:
        node['conv_cfg'] = None
    return node


def deploy_config(cfg: Config) -> Config:
    """The deploy form of a training config: the same network without OREPA. mmorepa backbones
    become the toolbox's own (``OREPAResNet`` -> ``ResNet`` / ``ResNeXt``, ``OREPAVGG`` ->
    ``RepVGG(deploy=True)``), mmorepa ``conv_cfg`` types become plain convs, and the pretrained
    initialisation goes (the fused checkpoint holds every weight). No mmorepa import is left
    (the whole config is converted, helper variables of the config files included), except
    where a backbone has no stock counterpart (``stage_blocks`` other than its depth's): that one
    stays the mmorepa backbone with ``deploy=True`` (the stock blocks, plain convs)."""
    cfg = copy.deepcopy(cfg)
    if cfg.get('default_scope'):  # none: each type names its toolbox ('mmdet.RetinaNet')
        init_default_scope(cfg.default_scope)
    needs_mmorepa = False
    for key in list(cfg.keys()):
        value = cfg[key].to_dict() if isinstance(cfg[key], ConfigDict) else cfg[key]
        converted = _deploy_model_cfg(value)
        if key == 'model' or converted != value:  # a network: its weights are in the checkpoint
            _drop_key(converted, 'init_cfg')
            needs_mmorepa = needs_mmorepa or _builds_mmorepa(converted)
        cfg[key] = converted
    imports = cfg.get('custom_imports')
    if imports and not needs_mmorepa:
        kept = [m for m in imports.get('imports', []) if m != 'mmorepa'
                and not m.startswith('mmorepa.')]
        if kept:
            cfg.custom_imports = dict(imports, imports=kept)
        else:
            cfg.pop('custom_imports')
    cfg.load_from = None
    return cfg


def _builds_mmorepa(node) -> bool:
    """Whether a config node still names a type that mmorepa registers, each type looked up in
    the registry that builds it (a toolbox's, where a scope is in play)."""
    return any(getattr(obj, '__module__', '').startswith('mmorepa')
               for obj in resolved_types(node))


def _drop_key(node, key):
    if isinstance(node, dict):
        node.pop(key, None)
        for v in node.values():
            _drop_key(v, key)
    elif isinstance(node, (list, tuple)):
        for v in node:
            _drop_key(v, key)


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``model`` computes from ``x``, flattened into one vector: the feature maps of its
    ``extract_feat`` (a toolbox's classifier, detector or segmentor), else its output."""
    out = model.extract_feat(x) if hasattr(model, 'extract_feat') else model(x)
    flat = []

    def collect(o):
        if isinstance(o, torch.Tensor):
            flat.append(o.flatten())
        elif isinstance(o, (list, tuple)):
            for v in o:
                collect(v)
        elif isinstance(o, dict):
            for v in o.values():
                collect(v)
    collect(out)
    return torch.cat(flat)


def fusion_error(model: nn.Module, fused: nn.Module, input_shape=(2, 3, 128, 128),
                 seed: int = 0) -> float:
    """Relative error between the features of ``fused`` (float32) and those of the un-fused
    ``model`` computed independently: in float64, every block's branches squeezed, convolved and
    normalized on feature maps (no eval-mode folding)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*input_shape, generator=g)
    reference = copy.deepcopy(model).double().eval()
    fused.eval()
    with torch.no_grad(), unfused_eval(reference):
        b = features(reference, x.double())
        a = features(fused, x)
    return ((a.double() - b).norm() / b.norm()).item()


def check_input_shape(shape) -> tuple:
    """An input shape ``(N, C, H, W)`` of positive ints, or :class:`ArgumentError` naming it."""
    shape = tuple(shape)
    if len(shape) != 4 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                              for v in shape):
        raise ArgumentError(f'--input-shape must be four positive ints N C H W, got '
                            f'{" ".join(str(v) for v in shape)}')
    return shape


def check_model_input(model: nn.Module, input_shape, source) -> None:
    """Run ``model`` (eval mode, no gradients) once on zeros of ``input_shape`` with batch 1; a
    shape the model cannot take (channels, too small an image) is an :class:`ArgumentError`."""
    n, c, h, w = check_input_shape(input_shape)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            features(model, torch.zeros(1, c, h, w))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ArgumentError(f'--input-shape {n} {c} {h} {w} does not fit the model of '
                            f'{source}: {first}') from None
    finally:
        model.train(was_training)


def _written_by_us(path: Path) -> bool:
    """Whether ``path`` is a deploy config that :func:`convert` wrote (its first line)."""
    with open(path, errors='replace') as f:
        return f.readline().startswith(DEPLOY_CONFIG_HEADER)


def _convert_outputs(config: Path, checkpoint: Path, output,
                     deploy_config_path) -> Tuple[Path, Path]:
    """The two outputs of :func:`convert`, checked: the fused checkpoint ``output`` (not a
    ``.py``, not an input) and the deploy config (``deploy_config_path``, a ``.py``; by default
    ``output`` with ``.py``, which must be absent or a deploy config we wrote)."""
    if Path(output).suffix == '.py':
        raise PathError(f'output {output} is where the deploy config (.py) goes: name the fused '
                        'checkpoint .pth')
    output = check_output_file(output, (config, checkpoint))
    if deploy_config_path is None:
        deploy_config_path = output.with_suffix('.py')
        if deploy_config_path.is_file() and not _written_by_us(deploy_config_path):
            raise PathError(f'refusing to overwrite {deploy_config_path}: it is no deploy config '
                            'written by mmorepa (name the deploy config with --out-config)')
    elif Path(deploy_config_path).suffix != '.py':
        raise PathError(f'deploy config {deploy_config_path} must end in .py')
    return output, check_output_file(deploy_config_path, (config, checkpoint, output),
                                     'deploy config')


def convert(config, checkpoint, output, input_shape=(2, 3, 128, 128),
            cfg_options: Optional[dict] = None,
            deploy_config_path=None) -> Tuple[Path, Path, float]:
    """Fuse ``checkpoint`` of ``config`` into a stock-backbone checkpoint ``output`` and write the
    deploy config to ``deploy_config_path`` (default: beside it, ``output`` with ``.py``, which
    is replaced only if it is a deploy config we wrote). Returns both paths and the fusion
    error. Arguments and both output locations are checked before any work; a bad one is a
    :class:`~mmorepa.errors.MMOrepaError` naming the value or path."""
    input_shape = check_input_shape(input_shape)
    config = check_input_file(config, 'config')
    checkpoint = check_input_file(checkpoint, 'checkpoint')
    output, deploy_cfg_path = _convert_outputs(config, checkpoint, output, deploy_config_path)
    cfg = read_config(config, cfg_options)
    model = build_model_of(cfg, config)
    check_model_input(model, input_shape, config)
    load_checkpoint_strict(model, checkpoint)
    model.eval()
    fused = reparameterize(model)
    err = fusion_error(model, fused, input_shape)
    stock_cfg = deploy_config(cfg)
    stock = build_model(stock_cfg)
    check_state_dict_fits(stock, fused.state_dict(), 'the fused model vs the deploy config')
    meta = {FUSED_FROM: str(checkpoint), 'config': str(config), 'fusion_rel_err': err}
    atomic_write(output, lambda p: torch.save(dict(state_dict=fused.state_dict(), meta=meta), p))
    atomic_write(deploy_cfg_path, lambda p: Path(p).write_text(
        f'{DEPLOY_CONFIG_HEADER}\n{stock_cfg.pretty_text}'))
    return output, deploy_cfg_path, err
