"""Export a fused model to ONNX and check it with onnxruntime.

    python tools/export_onnx.py CONFIG CHECKPOINT OUTPUT.onnx [--input-shape N C H W]

The model of CONFIG is loaded from CHECKPOINT (strictly), fused (plain convs: a stock backbone)
and exported: a classifier end to end (logits); a detector or segmentor as its feature extractor
(backbone + neck; box decoding and NMS are mmdeploy's business). onnxruntime then runs the file on a
random input and the relative error against the fused PyTorch model is printed. Never overwrites
its inputs; the file is written atomically.
"""
import argparse
import os.path as osp
import sys
from pathlib import Path

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from mmengine.config import Config  # noqa: E402

import mmorepa  # noqa: E402
from mmorepa.deploy import (CheckpointError, atomic_write, build_model,  # noqa: E402
                            load_checkpoint_strict)


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


def export(config, checkpoint, output, input_shape=(1, 3, 224, 224)):
    config, checkpoint, output = Path(config), Path(checkpoint), Path(output)
    for src in (config, checkpoint):
        if not src.is_file():
            raise FileNotFoundError(f'not found: {src}')
        if output.exists() and output.resolve() == src.resolve():
            raise ValueError(f'refusing to overwrite the input {src}')
    model = build_model(Config.fromfile(str(config)))
    load_checkpoint_strict(model, checkpoint)
    model.eval()
    fused = _Exported(mmorepa.reparameterize(model)).eval()
    x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = fused(x)
    ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)

    def write(path):
        torch.onnx.export(fused, (x, ), path, input_names=['input'], dynamo=False,
                          output_names=[f'output{i}' for i in range(len(ref))], opset_version=17)

    atomic_write(output, write)
    import onnxruntime as ort
    session = ort.InferenceSession(str(output), providers=['CPUExecutionProvider'])
    outs = session.run(None, {'input': x.numpy()})
    num = sum(float(((torch.from_numpy(o) - r).double().norm()) ** 2) for o, r in zip(outs, ref))
    den = sum(float(r.double().norm() ** 2) for r in ref)
    return output, (num / den) ** 0.5


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('output')
    parser.add_argument('--input-shape', type=int, nargs=4, default=[1, 3, 224, 224],
                        metavar=('N', 'C', 'H', 'W'))
    args = parser.parse_args(argv)
    try:
        out, err = export(args.config, args.checkpoint, args.output, tuple(args.input_shape))
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        raise SystemExit(f'export_onnx: {e}')
    print(f'wrote {out}')
    print(f'onnxruntime vs PyTorch (fused) relative error: {err:.3e}')
    return out, err


if __name__ == '__main__':
    main()
