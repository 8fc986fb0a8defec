"""Safe loading of mmengine checkpoints under torch's ``weights_only=True`` default.

mmengine 0.10.7 calls plain ``torch.load``; since torch 2.6 that means ``weights_only=True``, which
refuses the few non-tensor objects an mmengine ``Runner`` checkpoint holds (``HistoryBuffer`` in
``message_hub``, numpy arrays and scalars in ``meta``). Rather than turn ``weights_only`` off (which
would run arbitrary pickled code from a downloaded file), we allow exactly those types.
"""
import codecs
import pickle

import numpy as np
import torch

from mmorepa.compat import torch_older_than


def _numpy_globals():
    # _codecs.encode: how numpy pickles an array's bytes (newer torch allows it by default)
    out = [np.ndarray, np.dtype, codecs.encode]
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


def _builtins_getattr(obj, name):
    """:func:`_history_buffer_getattr` under the name ``builtins.getattr``, for torch < 2.6, whose
    ``add_safe_globals`` takes no ``(function, name)`` pairs and names a function by its
    ``__module__`` and ``__name__``."""
    return _history_buffer_getattr(obj, name)


_builtins_getattr.__module__, _builtins_getattr.__name__ = 'builtins', 'getattr'


def mmengine_safe_globals():
    """The types an mmengine Runner checkpoint holds besides tensors and builtins."""
    from mmengine.logging import HistoryBuffer
    getattr_ = (_builtins_getattr if torch_older_than('2.6')
                else (_history_buffer_getattr, 'builtins.getattr'))
    return [HistoryBuffer, getattr_] + _numpy_globals()


def allow_mmengine_checkpoints():
    """Let ``torch.load(..., weights_only=True)`` read mmengine checkpoints (idempotent)."""
    torch.serialization.add_safe_globals(mmengine_safe_globals())
