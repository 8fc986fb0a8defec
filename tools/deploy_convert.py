"""Fuse a trained OREPA / DBB / RepVGG model into its plain deploy form.

    python tools/deploy_convert.py CONFIG CHECKPOINT OUTPUT [--out-config DEPLOY_CONFIG.py]
                                   [--input-shape N C H W] [--cfg-options k=v ...]

Writes OUTPUT (the fused checkpoint) and the deploy config (stock backbone, no mmorepa needed to
run it): ``--out-config``, by default OUTPUT with ``.py``, which replaces an existing file there
only if it is a deploy config this tool wrote (its first line says so); anything else there is
refused. Checks fused against un-fused on a random input and prints the relative error.
Arguments and output locations are checked before any work; an expected failure is one line on
stderr and exit status 1. Never overwrites its inputs; both outputs are written atomically, with
the permissions the umask gives.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmengine.config import DictAction  # noqa: E402

from mmorepa.cli import ArgumentParser, run_tool  # noqa: E402
from mmorepa.deploy import convert  # noqa: E402


def parse_args(argv=None):
    parser = ArgumentParser(description='Fuse a re-parameterized model for deployment')
    parser.add_argument('config', help='the training config')
    parser.add_argument('checkpoint', help='the trained checkpoint')
    parser.add_argument('output', help='the fused checkpoint to write (.pth)')
    parser.add_argument('--out-config', help='the deploy config to write (.py); default: '
                        'OUTPUT with .py, replacing only a deploy config written by this tool')
    parser.add_argument('--input-shape', type=int, nargs=4, default=[2, 3, 128, 128],
                        metavar=('N', 'C', 'H', 'W'), help='random input for the check')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out, cfg_path, err = convert(args.config, args.checkpoint, args.output,
                                 tuple(args.input_shape), args.cfg_options, args.out_config)
    print(f'fused checkpoint: {out}')
    print(f'deploy config:    {cfg_path}')
    print(f'fused vs un-fused relative error: {err:.3e}')
    return out, cfg_path, err


if __name__ == '__main__':
    run_tool(main)
