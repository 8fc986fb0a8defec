"""Memory at the users' scale: tools/quantize.py's peak RSS against the size of the test set and
the number of calibration batches, and what the eval kernel cache costs.

    python tools/analysis/measure_memory.py quantize [--work-dir work_dirs/memory]
        [--val 96 768] [--calib 1 8] [--size 256]
    python tools/analysis/measure_memory.py cache [--depth 50] [--batch 8] [--input-size 224]

``quantize``: the demo classifier (configs/demo/orepa_r18_shapes_cls.py, random weights and BN
statistics) on generated shapes images of ``--size`` pixels; ``tools/quantize.py --metrics-only``
runs in a child process per setting (calibration batches of 8 images, the config's test batches
of 16) and the table gives each run's peak RSS (the child's ``ru_maxrss``): the test set at each
``--val`` size with the fewest calibration batches, and the calibration at each ``--calib`` with
the smallest test set. ``cache``: OREPA-ResNet-``--depth`` (mmorepa's OREPAResNet) in eval mode,
in a child process: RSS before and after one no-grad forward, the cache's own bytes, and the
size of ``torch.save(model)`` before and after, against the stock ResNet's parameter bytes.
"""
import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
CLS_CFG = 'configs/demo/orepa_r18_shapes_cls.py'
MIB = 2 ** 20


def _peak_rss_mib(cmd) -> tuple:
    """Run ``cmd`` (its output shown only if it fails); its peak resident memory in MiB and
    its wall time in seconds."""
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f'{" ".join(map(str, cmd))} failed:\n{out[-3000:]}')
    return usage.ru_maxrss / 1024, time.time() - start  # ru_maxrss: KiB on Linux


def _demo_checkpoint(work: Path) -> Path:
    """A checkpoint of the demo classifier with random weights and BN statistics."""
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    from mmorepa.config import build_model, read_config
    from mmorepa.fileio import atomic_write
    ckpt = work / 'demo_cls.pth'
    if ckpt.is_file():
        return ckpt
    model = build_model(read_config(CLS_CFG))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    atomic_write(ckpt, lambda p: torch.save({'state_dict': model.state_dict()}, p))
    return ckpt


def quantize_runs(args):
    from mmorepa.datasets import make_shapes_dataset
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    ckpt = _demo_checkpoint(work)
    settings = [(v, min(args.calib)) for v in args.val] + \
        [(min(args.val), c) for c in args.calib if c != min(args.calib)]
    rows = []
    for val, calib in settings:
        data = make_shapes_dataset(work / f'shapes_{args.size}_{val}', num_train=8 * calib,
                                   num_val=val, size=args.size)
        opts = [f'{k}_dataloader.dataset.data_root={data}/cls' for k in ('train', 'test')]
        opts += ['train_dataloader.batch_size=8']
        cmd = [sys.executable, 'tools/quantize.py', CLS_CFG, str(ckpt),
               str(work / f'int8_{val}_{calib}.onnx'), '--metrics-only', '--calib-batches',
               str(calib), '--work-dir', str(work / 'runs'), '--cfg-options'] + opts
        rss, seconds = _peak_rss_mib(cmd)
        rows.append(dict(val_images=val, calib_batches=calib, peak_rss_mib=rss, seconds=seconds))
        print(f'{val:>6} test images {calib:>3} calibration batches: peak RSS {rss:.0f} MiB, '
              f'{seconds:.0f} s', flush=True)
    base = rows[0]['peak_rss_mib']
    print(f'\n{"test images":>12}{"calib batches":>15}{"peak RSS MiB":>14}{"vs first":>10}'
          f'{"wall s":>8}')
    for r in rows:
        print(f'{r["val_images"]:>12}{r["calib_batches"]:>15}{r["peak_rss_mib"]:>14.0f}'
              f'{r["peak_rss_mib"] - base:>+10.0f}{r["seconds"]:>8.0f}')
    return rows


def _rss_mib() -> float:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / MIB


def _saved_mib(model) -> float:
    """The size of ``torch.save(model)``; NaN if the model cannot be pickled."""
    import pickle

    import torch
    buf = io.BytesIO()
    try:
        torch.save(model, buf)
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        print(f'torch.save(model) fails: {e}', file=sys.stderr)
        return float('nan')
    return buf.getbuffer().nbytes / MIB


def _cache_bytes(layer) -> int:
    """Bytes of the tensors the layer's eval kernel cache holds."""
    import torch
    cache = getattr(layer, 'eval_cache', None)
    entry = getattr(cache, '_entry', None) if cache is not None else getattr(
        layer, '_kernel_cache', None)  # a layer without EvalKernelCache
    seen, total, stack = set(), 0, [entry]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor) and id(item) not in seen:
            seen.add(id(item))
            total += item.numel() * item.element_size()
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
    return total


def cache_worker(depth: int, batch: int, size: int) -> dict:
    """In this process: the numbers of one OREPA-ResNet eval forward (see the module doc)."""
    import torch
    from mmpretrain.models import ResNet

    import mmorepa  # noqa: F401
    from mmorepa.layers import ReparamConv2d
    from mmorepa.models import OREPAResNet
    stock = sum(p.numel() * p.element_size() for p in ResNet(depth).parameters()) / MIB
    model = OREPAResNet(depth, init_cfg=None)
    model.eval()  # (mmpretrain's ResNet.train returns None)
    params = sum(p.numel() * p.element_size() for p in model.parameters()) / MIB
    x = torch.randn(batch, 3, size, size)
    saved_before = _saved_mib(model)
    rss_before = _rss_mib()
    with torch.no_grad():
        model(x)
    rss_after = _rss_mib()
    saved_after = _saved_mib(model)
    cached = sum(_cache_bytes(m) for m in model.modules() if isinstance(m, ReparamConv2d))
    return dict(stock_params_mib=stock, orepa_params_mib=params, cache_mib=cached / MIB,
                rss_before_mib=rss_before, rss_after_mib=rss_after,
                rss_growth_over_stock=(rss_after - rss_before) / stock,
                saved_before_mib=saved_before, saved_after_mib=saved_after,
                saved_ratio=saved_after / saved_before)


def cache_run(args):
    cmd = [sys.executable, __file__, 'cache', '--worker', '--depth', str(args.depth),
           '--batch', str(args.batch), '--input-size', str(args.input_size)]
    r = json.loads(subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True,
                                  text=True).stdout.splitlines()[-1])
    print(f'stock ResNet-{args.depth} parameters {r["stock_params_mib"]:.1f} MiB; '
          f'OREPA-ResNet-{args.depth} parameters {r["orepa_params_mib"]:.1f} MiB')
    print(f'one no-grad eval forward (batch {args.batch}, {args.input_size} px): RSS '
          f'{r["rss_before_mib"]:.0f} -> {r["rss_after_mib"]:.0f} MiB (+'
          f'{r["rss_after_mib"] - r["rss_before_mib"]:.0f} MiB = '
          f'{r["rss_growth_over_stock"]:.2f}x the stock parameters); cached kernels and biases '
          f'{r["cache_mib"]:.1f} MiB')
    print(f'torch.save(model): {r["saved_before_mib"]:.1f} MiB before, '
          f'{r["saved_after_mib"]:.1f} MiB after ({r["saved_ratio"]:.3f}x)')
    return r


def main(argv=None):
    from mmorepa.cli import ArgumentParser
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('what', choices=['quantize', 'cache'])
    parser.add_argument('--work-dir', default='work_dirs/memory')
    parser.add_argument('--val', type=int, nargs='+', default=[96, 768])
    parser.add_argument('--calib', type=int, nargs='+', default=[1, 8])
    parser.add_argument('--size', type=int, default=256)
    parser.add_argument('--depth', type=int, default=50)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--input-size', type=int, default=224)
    parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.what == 'cache' and args.worker:
        print(json.dumps(cache_worker(args.depth, args.batch, args.input_size)))
    elif args.what == 'cache':
        cache_run(args)
    else:
        quantize_runs(args)


if __name__ == '__main__':
    from mmorepa.cli import run_tool
    run_tool(main)
