"""Export a fused model to ONNX and check it with onnxruntime.

    python tools/export_onnx.py CONFIG CHECKPOINT OUTPUT.onnx [--input-shape N C H W]
                                [--static-shape] [--cfg-options k=v ...]

The model of CONFIG is loaded from CHECKPOINT (strictly), fused (plain convs: a stock backbone)
and exported: a classifier end to end (logits); a detector or segmentor as its feature extractor
(backbone + neck; box decoding and NMS are mmdeploy's business). The batch and image axes are
dynamic unless ``--static-shape`` is given; onnxruntime then runs the file at ``--input-shape`` and
(dynamic axes) at one more batch and a larger image, and the largest relative error against the
fused PyTorch model is printed. Arguments and the output location are checked before any work;
an expected failure is one line on stderr and exit status 1. Never overwrites its inputs; the file
is written atomically, with the permissions the umask gives.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from mmengine.config import DictAction  # noqa: E402

import mmorepa  # noqa: E402
from mmorepa.deploy import (atomic_write, build_model_of, check_model_input,  # noqa: E402
                            load_checkpoint_strict)
from mmorepa.runtime import (ToolError, check_input_file, check_input_shape,  # noqa: E402
                             check_output_file, read_config, run_tool)


class _Exported(nn.Module):
    """What gets exported: logits of a classifier, else the features (a tuple of maps)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.classifier = hasattr(model, 'head') and not hasattr(model, 'decode_head') and \
            not hasattr(model, 'rpn_head') and not hasattr(model, 'bbox_head')

    def forward(self, x):
        if self.classifier:
            return self.model(x, mode='tensor')
        return tuple(self.model.extract_feat(x))


def _as_list(out):
    return [out] if isinstance(out, torch.Tensor) else list(out)


def check_shapes(input_shape, dynamic=True):
    """The shapes onnxruntime checks: the export shape and, with dynamic axes, one more image in
    the batch and an image 32 pixels larger each way."""
    n, c, h, w = input_shape
    return [input_shape] + ([(n + 1, c, h + 32, w + 32)] if dynamic else [])


def _dynamic_axes(outputs):
    axes = {'input': {0: 'batch', 2: 'height', 3: 'width'}}
    for i, o in enumerate(outputs):
        axes[f'output{i}'] = {0: 'batch'} if o.dim() < 4 else {
            0: 'batch', 2: f'height{i}', 3: f'width{i}'}
    return axes


def onnxruntime_error(path, model, shape, seed=0) -> float:
    """Relative error of onnxruntime running ``path`` against ``model`` on a random input."""
    import onnxruntime as ort
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = _as_list(model(x))
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    outs = session.run(None, {'input': x.numpy()})
    num = sum(float(((torch.from_numpy(o) - r).double().norm()) ** 2) for o, r in zip(outs, ref))
    den = sum(float(r.double().norm() ** 2) for r in ref)
    return (num / den) ** 0.5


def export(config, checkpoint, output, input_shape=(1, 3, 224, 224), dynamic=True,
           cfg_options=None):
    """Export; returns the output path and the largest onnxruntime error over the checked
    shapes (:func:`check_shapes`). ``cfg_options`` are merged into the config as by the other
    tools' ``--cfg-options``."""
    input_shape = check_input_shape(input_shape)
    config = check_input_file(config, 'config')
    checkpoint = check_input_file(checkpoint, 'checkpoint')
    output = check_output_file(output, (config, checkpoint))
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ToolError('the check needs onnxruntime: pip install onnxruntime') from None
    model = build_model_of(read_config(config, cfg_options), config)
    for shape in check_shapes(input_shape, dynamic):
        check_model_input(model, shape, config)
    load_checkpoint_strict(model, checkpoint)
    model.eval()
    fused = _Exported(mmorepa.reparameterize(model)).eval()
    x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = _as_list(fused(x))

    def write(path):
        torch.onnx.export(fused, (x, ), path, input_names=['input'], dynamo=False,
                          output_names=[f'output{i}' for i in range(len(outputs))],
                          dynamic_axes=_dynamic_axes(outputs) if dynamic else None,
                          opset_version=17)

    atomic_write(output, write)
    err = max(onnxruntime_error(output, fused, shape, seed)
              for seed, shape in enumerate(check_shapes(input_shape, dynamic)))
    return output, err


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
