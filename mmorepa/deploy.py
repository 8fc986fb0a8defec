"""Turning a trained model into a deployable one: strict checkpoint loading with clear errors,
fusion, the stock-backbone deploy config, and atomic writes."""
import copy
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from mmengine.config import Config, ConfigDict
from mmengine.registry import MODELS, init_default_scope

from .models import stock_model_cfg
from .reparameterize import reparameterize, unfused_eval
from .runtime import ToolError, check_input_file, check_input_shape, check_output_file, read_config

# conv_cfg types that exist only in mmorepa: a deploy config drops them (plain convs instead).
CONV_TYPES = ('OREPA', 'DBB', 'OREPAConv2d', 'OREPAConv1x1', 'OREPALargeConv',
              'DiverseBranchBlock')
# The first line of the deploy configs that convert() writes: only such a file is replaced
# without being named as the output. (No package name in it: the file needs none.)
DEPLOY_CONFIG_HEADER = '# deploy config written by tools/deploy_convert.py'


class CheckpointError(ToolError, ValueError):
    """A checkpoint that is missing, unreadable or does not fit the model."""


def _unreadable_reason(path: Path, error: Exception) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in words that fit the file (never
    torch's advice to turn ``weights_only`` off: loading stays safe)."""
    with open(path, 'rb') as f:
        head = f.read(4)
    if head != b'PK\x03\x04' and not zipfile.is_zipfile(path) and head[:1] != b'\x80':
        return 'not a PyTorch checkpoint (neither a zip archive nor a pickle)'
    text = str(error)
    if 'Unsupported global' in text:
        name = text.split('Unsupported global:', 1)[1].split()[1]
        return (f'it holds an object of type {name}, which mmorepa does not unpickle '
                '(checkpoints load with weights_only=True)')
    if 'WeightsUnpickler error:' in text:
        text = text.split('WeightsUnpickler error:', 1)[1].split('Check the documentation')[0]
    detail = ' '.join(text.split())
    return f'corrupt or truncated ({type(error).__name__}: {detail})'


def read_state_dict(path) -> Dict[str, torch.Tensor]:
    """The state dict of a checkpoint file (``state_dict`` / ``model`` entry, or the file itself),
    loaded with ``weights_only=True``; ``module.`` prefixes of DDP checkpoints are removed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint not found: {path}')
    try:
        with warnings.catch_warnings():  # a pickle that is no checkpoint: said below, in one line
            warnings.filterwarnings('ignore', message='Detected pickle protocol')
            data = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # corrupt, truncated, or holding objects we refuse to unpickle
        raise CheckpointError(f'cannot read checkpoint {path}: {_unreadable_reason(path, e)}') \
            from None
    if isinstance(data, dict):
        for key in ('state_dict', 'model'):
            if isinstance(data.get(key), dict):
                data = data[key]
                break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f'{path} holds no state dict of tensors')
    if data and all(k.startswith('module.') for k in data):
        data = {k[len('module.'):]: v for k, v in data.items()}
    return data


def check_state_dict_fits(model: nn.Module, state_dict: Dict[str, torch.Tensor], source='') -> None:
    """Raise :class:`CheckpointError` naming the first key that does not fit ``model``."""
    own = model.state_dict()
    where = f' in {source}' if source else ''
    for key, value in state_dict.items():
        if key not in own:
            raise CheckpointError(f'unexpected key {key!r}{where}: the model has no such entry')
        if tuple(own[key].shape) != tuple(value.shape):
            raise CheckpointError(f'size mismatch for {key!r}{where}: checkpoint '
                                  f'{tuple(value.shape)}, model {tuple(own[key].shape)}')
    for key in own:
        if key not in state_dict:
            raise CheckpointError(f'missing key {key!r}{where}: the checkpoint lacks it')


def load_checkpoint_strict(model: nn.Module, path) -> nn.Module:
    """Load a checkpoint into ``model`` with ``strict=True`` and errors that name the bad key.
    A checkpoint in plain form (a stock checkpoint, or a fused deploy checkpoint given with the
    training config) loads where the model's re-parameterized layers seed from its plain conv
    weights (``ReparamConv2d._load_from_state_dict``, exact); the first key that is still left
    over after seeding is named."""
    state_dict = read_state_dict(path)
    try:
        check_state_dict_fits(model, state_dict, str(path))
    except CheckpointError as mismatch:
        seeded = _plain_weights(model, state_dict)
        if not seeded:
            raise CheckpointError(f'{mismatch}{_fused_hint(Path(path))}') from None
        return _load_seeding(model, state_dict, seeded, Path(path))
    model.load_state_dict(state_dict, strict=True)
    return model


def _plain_weights(model: nn.Module, state_dict) -> Dict[str, nn.Module]:
    """The re-parameterized layers for which ``state_dict`` holds a plain conv ``weight``."""
    own, layers = model.state_dict(), {}
    for key in state_dict:
        if key not in own and key.endswith('.weight'):
            try:
                module = model.get_submodule(key[:-len('.weight')])
            except AttributeError:
                continue
            if hasattr(module, 'seeded_state'):
                layers[key[:-len('.weight')]] = module
    return layers


def _load_seeding(model: nn.Module, state_dict, seeded: Dict[str, nn.Module],
                  path: Path) -> nn.Module:
    """Load ``state_dict`` with plain conv weights for re-parameterized layers, which seed from
    them; a layer whose kernel then differs from its plain weight (a factorisation that is not
    exact) is refused: the loaded model would not compute what the checkpoint does.
    ``seeded``: the layers that take a plain weight (:func:`_plain_weights`)."""
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # a size mismatch, or a plain weight that cannot seed its layer
        lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        raise CheckpointError(f'cannot load {path}: {lines[0]}{_fused_hint(path)}') from None
    if result.unexpected_keys:
        raise CheckpointError(f'unexpected key {result.unexpected_keys[0]!r} in {path}: the '
                              f'model has no such entry{_fused_hint(path)}')
    if result.missing_keys:
        raise CheckpointError(f'missing key {result.missing_keys[0]!r} in {path}: the '
                              f'checkpoint lacks it{_fused_hint(path)}')
    with torch.no_grad():
        for name, layer in seeded.items():
            kernel = layer.fused_kernel_and_bias()[0].double()
            weight = state_dict[f'{name}.weight'].double()
            err = ((kernel - weight).norm() / weight.norm().clamp_min(1e-300)).item()
            if err > 1e-5:
                raise CheckpointError(
                    f'{name} ({type(layer).__name__}) cannot compute the plain conv {name}.weight '
                    f'of {path} exactly (relative error {err:.1e}){_fused_hint(path)}')
    return model


def _fused_hint(path: Path) -> str:
    """What to do with a fused checkpoint (written by :func:`convert`) that does not fit."""
    meta = torch.load(path, map_location='cpu', weights_only=True).get('meta') or {}
    if 'mmorepa_fused_from' not in meta:
        return ''
    return f'; {path} is a fused checkpoint: use the deploy config written beside it'


def build_model(cfg: Config) -> nn.Module:
    """Build ``cfg.model`` in the config's toolbox (its ``default_scope``)."""
    cfg = copy.deepcopy(cfg)
    if cfg.get('custom_imports'):
        from mmengine.utils import import_modules_from_strings
        import_modules_from_strings(**cfg.custom_imports)
    if cfg.get('default_scope'):  # none: each type names its toolbox ('mmdet.RetinaNet')
        init_default_scope(cfg.default_scope)
    model = cfg.model
    if isinstance(model, (dict, ConfigDict)):
        model = MODELS.build(model)
    return model


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
        value = cfg[key].to_dict() if hasattr(cfg[key], 'to_dict') else cfg[key]
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
    """Whether a config node still names a type that mmorepa registers."""
    if isinstance(node, (list, tuple)):
        return any(_builds_mmorepa(v) for v in node)
    if not isinstance(node, dict):
        return False
    if isinstance(node.get('type'), str):
        try:
            obj = MODELS.get(node['type'])
        except Exception:  # noqa: BLE001 - not a model type (a transform, a hook, ...)
            obj = None
        if getattr(obj, '__module__', '').startswith('mmorepa'):
            return True
    return any(_builds_mmorepa(v) for v in node.values())


def _drop_key(node, key):
    if isinstance(node, dict):
        node.pop(key, None)
        for v in node.values():
            _drop_key(v, key)
    elif isinstance(node, (list, tuple)):
        for v in node:
            _drop_key(v, key)


def _umask() -> int:
    """The process's umask: read from /proc where it can be (setting it to read it back would
    briefly change it for other threads)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, write_fn) -> Path:
    """Write ``path`` through ``write_fn(tmp_path)`` and rename into place: readers never see a
    partial file, and an interrupted write leaves the old one. The file gets the permissions the
    umask gives any new file (``0o666 & ~umask``), not the temporary file's 0600. A failure to
    write is a :class:`ToolError` naming ``path``."""
    path = Path(path)
    if path.is_dir():
        raise ToolError(f'cannot write {path}: it is a directory')
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # a short temporary name: any legal output name fits (NAME_MAX)
        fd, tmp = tempfile.mkstemp(prefix='.mmorepa-', suffix=path.suffix[:16],
                                   dir=path.parent)
    except OSError as e:
        raise ToolError(f'cannot write {path}: {e.strerror or e}') from None
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        write_fn(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise ToolError(f'cannot write {path}: {e.strerror or e}') from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
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
        b = _features(reference, x.double())
        a = _features(fused, x)
    return ((a.double() - b).norm() / b.norm()).item()


def build_model_of(cfg: Config, source) -> nn.Module:
    """:func:`build_model`, with a model config that does not build (an unknown type, a bad layer
    argument) reported as a :class:`ToolError` naming ``source``."""
    try:
        return build_model(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise ToolError(f'cannot build the model of {source}: {e}') from None


def check_model_input(model: nn.Module, input_shape, source) -> None:
    """Run ``model`` (eval mode, no gradients) once on zeros of ``input_shape`` with batch 1; a
    shape the model cannot take (channels, too small an image) is a :class:`ToolError`."""
    n, c, h, w = check_input_shape(input_shape)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _features(model, torch.zeros(1, c, h, w))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ToolError(f'--input-shape {n} {c} {h} {w} does not fit the model of {source}: '
                        f'{first}') from None
    finally:
        model.train(was_training)


def _written_by_us(path: Path) -> bool:
    """Whether ``path`` is a deploy config that :func:`convert` wrote (its first line)."""
    with open(path, errors='replace') as f:
        return f.readline().startswith(DEPLOY_CONFIG_HEADER)


def convert(config, checkpoint, output, input_shape=(2, 3, 128, 128),
            cfg_options: Optional[dict] = None,
            deploy_config_path=None) -> Tuple[Path, Path, float]:
    """Fuse ``checkpoint`` of ``config`` into a stock-backbone checkpoint ``output`` and write the
    deploy config to ``deploy_config_path`` (default: beside it, ``output`` with ``.py``, which
    is replaced only if it is a deploy config we wrote). Returns both paths and the fusion
    error. Arguments and both output locations are checked before any work; expected failures
    are :class:`ToolError` (``CheckpointError`` included) naming the bad value or path."""
    input_shape = check_input_shape(input_shape)
    config = check_input_file(config, 'config')
    checkpoint = check_input_file(checkpoint, 'checkpoint')
    if Path(output).suffix == '.py':
        raise ToolError(f'output {output} is where the deploy config (.py) goes: name the fused '
                        'checkpoint .pth')
    output = check_output_file(output, (config, checkpoint))
    if deploy_config_path is None:
        deploy_config_path = output.with_suffix('.py')
        if deploy_config_path.is_file() and not _written_by_us(deploy_config_path):
            raise ToolError(f'refusing to overwrite {deploy_config_path}: it is no deploy config '
                            'written by mmorepa (name the deploy config with --out-config)')
    elif Path(deploy_config_path).suffix != '.py':
        raise ToolError(f'deploy config {deploy_config_path} must end in .py')
    deploy_cfg_path = check_output_file(deploy_config_path, (config, checkpoint, output),
                                        'deploy config')
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
    meta = dict(mmorepa_fused_from=str(checkpoint), config=str(config), fusion_rel_err=err)
    atomic_write(output, lambda p: torch.save(dict(state_dict=fused.state_dict(), meta=meta), p))
    atomic_write(deploy_cfg_path, lambda p: Path(p).write_text(
        f'{DEPLOY_CONFIG_HEADER}\n{stock_cfg.pretty_text}'))
    return output, deploy_cfg_path, err
