"""The optional C++ extension ``mmorepa._squeeze_cpu`` (mmorepa/csrc/squeeze_cpu.cpp).

``squeeze_cpu``: the loaded module, or ``None`` where it is not built; ``unavailable_reason()``
says why (``None`` when loaded); ``warn_unavailable()`` says it once, as one warning line.
"""
import warnings
from typing import Optional

try:  # built by setup.py from mmorepa/csrc/squeeze_cpu.cpp (pip install -e .)
    from mmorepa import _squeeze_cpu as squeeze_cpu
    _NOT_BUILT = None
except ImportError as err:  # a source tree used without its build step
    squeeze_cpu, _NOT_BUILT = None, err

__all__ = ['squeeze_cpu', 'unavailable_reason', 'warn_unavailable']


def unavailable_reason() -> Optional[str]:
    """Why the extension is not loaded, or ``None`` when it is."""
    return None if _NOT_BUILT is None else str(_NOT_BUILT)


def warn_unavailable():
    """A ``RuntimeWarning`` naming the extension, why it is missing and how to build it (said
    once: the warning filters' default), where it did not load."""
    reason = unavailable_reason()
    if reason is not None:
        warnings.warn(f'mmorepa._squeeze_cpu is not built ({reason}): OREPA squeezes '
                      "run on torch's operators, several times slower on the CPU; "
                      'pip install -e . (tools/setup_env.sh) builds it', RuntimeWarning,
                      stacklevel=3)
