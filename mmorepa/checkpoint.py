"""Checkpoint I/O: reading state dicts, strict loading with errors that name the key, loading a
plain (stock or fused) checkpoint into re-parameterized layers, and safe mmengine checkpoints.

Checkpoints load with ``weights_only=True``. mmengine 0.10.7 calls plain ``torch.load``; since
torch 2.6 that means ``weights_only=True``, which refuses the few non-tensor objects an mmengine
``Runner`` checkpoint holds (``HistoryBuffer`` in ``message_hub``, numpy arrays and scalars in
``meta``). Rather than turn ``weights_only`` off (which would run arbitrary pickled code from a
downloaded file), :func:`allow_mmengine_checkpoints` allows exactly those types.
"""
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Dict

import numpy as np
import torch
import torch.nn as nn

from .errors import CheckpointError
from .layers import ReparamConv2d

# The ``meta`` entry that marks a fused checkpoint (written by :func:`mmorepa.deploy.convert`);
# its value is the checkpoint it was fused from.
FUSED_FROM = 'mmorepa_fused_from'


def _numpy_globals():
    out = [np.ndarray, np.dtype]
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct, scalar
        out += [_reconstruct, scalar]
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar
        out += [_reconstruct, scalar]
    # dtype classes pickled by numpy >= 1.25 (np.dtypes.Float64DType, ...)
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith('DType')]
    return out


def _history_buffer_getattr(obj, name):
    """Stands in for ``builtins.getattr`` while unpickling: mmengine pickles the statistics methods
    of ``HistoryBuffer`` as ``getattr(HistoryBuffer, 'mean')``; nothing else is resolved."""
    from mmengine.logging import HistoryBuffer

    # the built-in statistics are registered lazily (on the first instance), custom ones eagerly
    allowed = set(HistoryBuffer._statistics_methods) | {'min', 'max', 'mean', 'current'}
    if obj is HistoryBuffer and name in allowed:
        return getattr(obj, name)
    raise pickle.UnpicklingError(f'checkpoint asks for getattr({obj!r}, {name!r}); only '
                                 'HistoryBuffer statistics methods are allowed')


def mmengine_safe_globals():
    """The types an mmengine Runner checkpoint holds besides tensors and builtins."""
    from mmengine.logging import HistoryBuffer
    return [HistoryBuffer, (_history_buffer_getattr, 'builtins.getattr')] + _numpy_globals()


def allow_mmengine_checkpoints():
    """Let ``torch.load(..., weights_only=True)`` read mmengine checkpoints (idempotent)."""
    torch.serialization.add_safe_globals(mmengine_safe_globals())


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
    weights (their ``_load_from_state_dict``, exact); the first key that is still left over
    after seeding is named."""
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


def _plain_weights(model: nn.Module, state_dict) -> Dict[str, ReparamConv2d]:
    """The re-parameterized layers for which ``state_dict`` holds a plain conv ``weight``."""
    own, layers = model.state_dict(), {}
    for key in state_dict:
        if key not in own and key.endswith('.weight'):
            try:
                module = model.get_submodule(key[:-len('.weight')])
            except AttributeError:
                continue
            if isinstance(module, ReparamConv2d):
                layers[key[:-len('.weight')]] = module
    return layers


def _load_seeding(model: nn.Module, state_dict, seeded: Dict[str, ReparamConv2d],
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
    """What to do with a fused checkpoint (its ``meta`` has :data:`FUSED_FROM`) that does not
    fit."""
    meta = torch.load(path, map_location='cpu', weights_only=True).get('meta') or {}
    if FUSED_FROM not in meta:
        return ''
    return f'; {path} is a fused checkpoint: use the deploy config written beside it'
