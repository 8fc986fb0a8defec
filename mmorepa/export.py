"""ONNX export of a fused model, checked with onnxruntime.

What is exported (:class:`ExportedModel`): a classifier end to end (logits); a detector or
segmentor as its feature extractor (backbone + neck; box decoding and NMS are mmdeploy's
business). The batch and image axes are dynamic unless ``dynamic=False``."""
from pathlib import Path
from typing import List, Tuple

import torch
import torch.nn as nn

from .checkpoint import load_checkpoint_strict
from .config import build_model_of, read_config
from .deploy import check_input_shape, check_model_input
from .errors import MMOrepaError
from .fileio import atomic_write, check_input_file, check_output_file
from .fusion import reparameterize


def is_classifier(model: nn.Module) -> bool:
    """Whether ``model`` is a classifier (a head, and no decode, RPN or box head): exported end
    to end, where detectors and segmentors export their features."""
    return hasattr(model, 'head') and not hasattr(model, 'decode_head') and \
        not hasattr(model, 'rpn_head') and not hasattr(model, 'bbox_head')


class ExportedModel(nn.Module):
    """What gets exported: logits of a classifier, else the features (a tuple of maps)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.classifier = is_classifier(model)

    def forward(self, x):
        if self.classifier:
            return self.model(x, mode='tensor')
        return tuple(self.model.extract_feat(x))


def _as_list(out) -> List[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else list(out)


def check_shapes(input_shape, dynamic: bool = True) -> List[Tuple[int, ...]]:
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


def onnxruntime_error(path, model: nn.Module, shape, seed: int = 0) -> float:
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


def export(config, checkpoint, output, input_shape=(1, 3, 224, 224), dynamic: bool = True,
           cfg_options=None) -> Tuple[Path, float]:
    """Load ``checkpoint`` into the model of ``config`` (strictly), fuse it and export it to
    ``output`` (written atomically); returns the output path and the largest onnxruntime error
    over the checked shapes (:func:`check_shapes`). ``cfg_options`` are merged into the config.
    Arguments and the output location are checked before any work."""
    input_shape = check_input_shape(input_shape)
    config = check_input_file(config, 'config')
    checkpoint = check_input_file(checkpoint, 'checkpoint')
    output = check_output_file(output, (config, checkpoint))
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise MMOrepaError('the check needs onnxruntime: pip install onnxruntime') from None
    model = build_model_of(read_config(config, cfg_options), config)
    for shape in check_shapes(input_shape, dynamic):
        check_model_input(model, shape, config)
    load_checkpoint_strict(model, checkpoint)
    model.eval()
    fused = ExportedModel(reparameterize(model)).eval()
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
