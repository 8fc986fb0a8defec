"""Test a checkpoint with an mmpretrain, mmdet or mmseg config (chosen by its ``default_scope``).

    python tools/test.py CONFIG CHECKPOINT [--deploy] [--work-dir DIR] [--out FILE]
                         [--cfg-options k=v ...] [--launcher none|pytorch|slurm|mpi]

``--deploy`` fuses every re-parameterized block (a plain, fast model) after loading and before
testing; the checkpoint file is not touched. A fused checkpoint (deploy_convert's) loads into the
training config's model too (its OREPA layers seed from the plain weights, exactly). Arguments,
the work dir, ``--out`` and the model are checked before any work; ``--out`` writes every metric
(per-class lists too) as JSON. An expected failure is one line on stderr and exit status 1.
"""
import json
import os
import os.path as osp
import sys
from pathlib import Path

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmengine.config import DictAction  # noqa: E402

from mmorepa import cli  # noqa: E402  (importing mmorepa registers OREPA layers and backbones)
from mmorepa.fileio import atomic_write, check_input_file, check_output_file  # noqa: E402


def parse_args(argv=None):
    parser = cli.ArgumentParser(description='Test a checkpoint with mmengine\'s Runner')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--deploy', action='store_true',
                        help='fuse the re-parameterized blocks before testing')
    parser.add_argument('--work-dir', help='the dir to save logs and metrics')
    parser.add_argument('--out', help='write the metrics to this JSON file')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def main(argv=None):
    args = parse_args(argv)
    check_input_file(args.checkpoint, 'checkpoint')
    if args.out:
        check_output_file(args.out, (args.config, args.checkpoint), '--out file')
    cfg = cli.load_config(args.config, args.launcher, args.cfg_options, args.work_dir)
    cli.check_model_builds(cfg, args.config)
    runner = cli.build_runner(cfg, args.checkpoint, fuse=args.deploy)
    metrics = runner.test()
    if args.out:
        metrics = {k: as_json(v) for k, v in metrics.items()}
        atomic_write(args.out, lambda p: Path(p).write_text(json.dumps(metrics)))
    return metrics


def as_json(value):
    """A metric as JSON: numbers as floats, tensors, arrays and sequences as (nested) lists (a
    metric per class, ``average=None``), strings as they are."""
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): as_json(v) for k, v in value.items()}
    if hasattr(value, 'tolist'):  # a tensor, a numpy array or scalar
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [as_json(v) for v in value]
    return float(value)


if __name__ == '__main__':
    cli.run_tool(main)
