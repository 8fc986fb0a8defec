"""Shared test functions: random non-trivial parameters and statistics, explicit references, the
toolboxes' registries, and running the tools. The shared fixtures are in ``conftest.py``."""
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from mmengine.registry import init_default_scope
from torch.nn.modules.batchnorm import _BatchNorm

from mmorepa.ops import branches as B

ROOT = Path(__file__).resolve().parents[1]
CLS_CFG = ROOT / 'configs/demo/orepa_r18_shapes_cls.py'  # the demo classifier


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def randomize_(module: torch.nn.Module, generator=None) -> torch.nn.Module:
    """Give every parameter random values and every BN random running statistics (never zeros)."""
    g = generator
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
        for m in module.modules():
            if isinstance(m, _BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
    return module


def randomize_network_(model: torch.nn.Module, generator=None) -> torch.nn.Module:
    """For whole networks: keep the (random) default conv init, which keeps activations in range,
    and draw random BN statistics and affine parameters and random scaling vectors."""
    g = generator
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('scales'):
                p.mul_(torch.rand(p.shape, generator=g) + 0.5)
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def conv(x, w, stride=1, padding=0, dilation=1, groups=1):
    return F.conv2d(x, w, None, stride, padding, dilation, groups)


def bn_eval(x, bn):
    return F.batch_norm(x, bn.running_mean.to(x.dtype), bn.running_var.to(x.dtype),
                        None if bn.weight is None else bn.weight.to(x.dtype),
                        None if bn.bias is None else bn.bias.to(x.dtype), False, 0.0, bn.eps)


def orepa_explicit(layer, x):
    """The OREPA block of Fig. 6 computed branch by branch on feature maps (no squeezing), with
    the layer's own parameters: the reference for Eq. 3-4. Needs "same" padding."""
    k, s, d, g = layer.kernel_size[0], layer.stride[0], layer.dilation[0], layer.groups
    p = layer.padding[0]
    assert p == d * (k - 1) // 2
    c_out = layer.out_channels
    outs = {}
    for b in layer.branches:
        if b == B.KXK.name:
            y = conv(x, layer.weight_kxk, s, p, d, g)
        elif b == B.ONE_BY_ONE.name:
            y = conv(x, layer.weight_1x1, s, 0, 1, g)
        elif b == B.ONE_BY_ONE_KXK.name:
            mid = conv(x, layer.identity.to(x.dtype) + layer.weight_1x1_kxk_idconv1, 1, 0, 1, g)
            y = conv(mid, layer.weight_1x1_kxk_conv2, s, p, d, g)
        elif b == B.ONE_BY_ONE_AVG.name:
            mid = conv(x, layer.weight_1x1_avg, 1, 0, 1, g)
            if d == 1:
                y = F.avg_pool2d(mid, k, s, p, count_include_pad=True)
            else:
                avg = torch.full((c_out, 1, k, k), 1.0 / k ** 2, dtype=x.dtype)
                y = conv(mid, avg, s, p, d, c_out)
        elif b == B.ONE_BY_ONE_FREQ.name:
            mid = conv(x, layer.weight_1x1_freq, 1, 0, 1, g)
            y = conv(mid, layer.freq_prior.to(x.dtype).unsqueeze(1), s, p, d, c_out)
        elif b == B.DW_PW.name:
            mid = conv(x, layer.weight_dw, s, p, d, layer.in_channels)
            y = conv(mid, layer.weight_pw, 1, 0, 1, g)
        outs[b] = y
    total = 0
    for i, b in enumerate(layer.branches):
        scale = 1.0 if layer.scales is None else layer.scales[i].reshape(1, -1, 1, 1)
        total = total + scale * outs[b]
    if layer.bias is not None:
        total = total + layer.bias.reshape(1, -1, 1, 1)
    return total


class LogRecords:
    """Collects what mmengine's current logger emits (``with LogRecords() as log: ...``)."""

    def __init__(self):
        import logging

        class _Handler(logging.Handler):
            def emit(inner, record):
                self.messages.append(record.getMessage())
        self.messages = []
        self._handler = _Handler()

    def __enter__(self):
        from mmengine.logging import MMLogger
        self._logger = MMLogger.get_current_instance()
        self._logger.addHandler(self._handler)
        return self

    def __exit__(self, *exc):
        self._logger.removeHandler(self._handler)

    def text(self) -> str:
        return '\n'.join(self.messages)


def toolbox_registry(toolbox: str):
    """``toolbox``'s ``MODELS`` registry, with ``toolbox`` as mmengine's default scope."""
    init_default_scope(toolbox)
    return importlib.import_module(f'{toolbox}.registry').MODELS


def eval_features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``model`` (put in eval mode) computes from ``x`` without gradients, its outputs (a
    tensor, or a tuple or list of them) flattened into one vector."""
    model.eval()  # mmpretrain's ResNet.train() returns None: no chaining
    with torch.no_grad():
        out = model(x)
    return torch.cat([o.flatten() for o in (out if isinstance(out, (tuple, list)) else [out])])


def run_python(args, check: bool = False, umask=None, cwd=ROOT,
               **kwargs) -> subprocess.CompletedProcess:
    """``python ARGS`` (a tool, by its path from the repository root) in a fresh process, its
    output captured as text; with ``umask``, under that umask. ``check``: a failure raises an
    ``AssertionError`` with the end of its output."""
    proc = subprocess.run([sys.executable] + [str(a) for a in args], cwd=cwd,
                          capture_output=True, text=True,
                          preexec_fn=None if umask is None else (lambda: os.umask(umask)),
                          **kwargs)
    if check and proc.returncode:
        raise AssertionError(f'{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    return proc


def without_python_warnings(stderr: str) -> str:
    """``stderr`` without the records of Python warnings (``FILE:LINE: CategoryWarning: ...``
    and the source line after it), which installed packages may print at import (mmengine 0.10.0
    under torch 2.4, the oldest stack, forces one): what the tool itself wrote."""
    lines, skip = [], False
    for line in stderr.splitlines():
        if re.match(r'\S+\.py:\d+: \w*Warning: ', line):
            skip = True
            continue
        if skip and line.startswith(' '):
            continue
        skip = False
        lines.append(line)
    return '\n'.join(lines) + ('\n' if lines else '')


def assert_clean_failure(proc: subprocess.CompletedProcess, *names) -> str:
    """Exit status 1, no traceback, and the last stderr line (the error) names every one of
    ``names``; returns that line."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert 'error:' in line, proc.stderr[-3000:]
    for name in names:
        assert str(name) in line, (name, line)
    return line


def load_tool(name: str):
    """``tools/<name>.py`` as a module (its ``main`` is what ``python tools/<name>.py`` runs)."""
    spec = importlib.util.spec_from_file_location(f'mmorepa_tools_{name}',
                                                  ROOT / 'tools' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shapes_train_options(shapes) -> list:
    """``--cfg-options`` entries that train the demo classifier for two short epochs on the
    generated data set ``shapes`` (``make_shapes_dataset``, 16 training images)."""
    return [f'{split}_dataloader.dataset.data_root={shapes}/cls'
            for split in ('train', 'val', 'test')] + [
        'train_dataloader.batch_size=8', 'train_dataloader.dataset.indices=16',
        'train_cfg.max_epochs=2', 'train_cfg.val_interval=10', 'default_hooks.logger.interval=1',
        'default_hooks.checkpoint.interval=1']
