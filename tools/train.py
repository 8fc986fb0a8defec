"""Train a model from an mmpretrain, mmdet or mmseg config (chosen by its ``default_scope``).

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp]
                          [--cfg-options k=v ...] [--launcher none|pytorch|slurm|mpi]

``--amp`` trains in mixed precision: mmengine's ``AmpOptimWrapper`` on a GPU, bfloat16 autocast
(``mmorepa.amp.CPUAutocastOptimWrapper``) on the CPU; OREPA kernels are computed in float32
either way. Arguments, the work dir and the model (built once before the Runner) are checked
first; an expected failure is one line on stderr and exit status 1.
"""
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402

from mmorepa import cli  # noqa: E402  (importing mmorepa registers OREPA layers and backbones)
from mmorepa.amp import amp_optim_wrapper  # noqa: E402
from mmorepa.fileio import check_input_file  # noqa: E402


def parse_args(argv=None):
    parser = cli.ArgumentParser(description='Train a model with mmengine\'s Runner')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and checkpoints')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from CKPT, or from the latest checkpoint of the work dir '
                        'when no CKPT is given')
    parser.add_argument('--amp', action='store_true',
                        help='mixed precision: mmengine\'s AmpOptimWrapper on a GPU, bfloat16 '
                        'autocast on the CPU')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def setup_cfg(args) -> Config:
    if args.resume not in (None, 'auto'):
        check_input_file(args.resume, 'checkpoint to resume from')
    cfg = cli.load_config(args.config, args.launcher, args.cfg_options, args.work_dir)
    cuda = torch.cuda.is_available()
    if args.amp and cfg.get('optim_wrapper') is None:
        raise cli.ToolError(f'--amp: {args.config} has no optim_wrapper')
    asks_amp = cfg.get('optim_wrapper', {}).get('type') == 'AmpOptimWrapper'
    if args.amp or (asks_amp and not cuda):
        cfg.optim_wrapper = amp_optim_wrapper(cfg.optim_wrapper, cuda)
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume
    return cfg


def main(argv=None):
    args = parse_args(argv)
    cfg = setup_cfg(args)
    cli.check_model_builds(cfg, args.config)
    runner = cli.build_runner(cfg)
    runner.train()
    return runner


if __name__ == '__main__':
    cli.run_tool(main)
