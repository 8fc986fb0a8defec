"""Export a fused model to ONNX and check it with onnxruntime.

    python tools/export_onnx.py CONFIG CHECKPOINT OUTPUT.onnx [--input-shape N C H W]
                                [--static-shape] [--cfg-options k=v ...]

The model of CONFIG is loaded from CHECKPOINT (strictly), fused (plain convs: a stock backbone)
and exported (``mmorepa.export``): a classifier end to end (logits); a detector or segmentor as
its feature extractor (backbone + neck; box decoding and NMS are mmdeploy's business). The batch
and image axes are dynamic unless ``--static-shape`` is given; onnxruntime then runs the file at
``--input-shape`` and (dynamic axes) at one more batch and a larger image, and the largest
relative error against the fused PyTorch model is printed. Arguments and the output location are
checked before any work; an expected failure is one line on stderr and exit status 1. Never
overwrites its inputs; the file is written atomically, with the permissions the umask gives.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmengine.config import DictAction  # noqa: E402

from mmorepa.cli import ArgumentParser, run_tool  # noqa: E402
from mmorepa.export import check_shapes, export  # noqa: E402


def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('output')
    parser.add_argument('--input-shape', type=int, nargs=4, default=[1, 3, 224, 224],
                        metavar=('N', 'C', 'H', 'W'))
    parser.add_argument('--static-shape', action='store_true',
                        help='fix the batch and image size to --input-shape')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value')
    args = parser.parse_args(argv)
    out, err = export(args.config, args.checkpoint, args.output, tuple(args.input_shape),
                      dynamic=not args.static_shape, cfg_options=args.cfg_options)
    shapes = ', '.join('x'.join(map(str, s))
                       for s in check_shapes(tuple(args.input_shape), not args.static_shape))
    print(f'wrote {out}')
    print(f'onnxruntime at {shapes}')
    print(f'onnxruntime vs PyTorch (fused) relative error: {err:.3e}')
    return out, err


if __name__ == '__main__':
    run_tool(main)
