"""INT8 post-training quantization of fused models, and what tells why one quantizes worse.

The quantizer is onnxruntime's static quantization (QDQ format, symmetric per-output-channel int8
weights, int8 activations calibrated on real inputs). Around it:

- :func:`variant`: the INT8 model with only some of its quantization kept (weights only,
  activations only, one layer only): every ``DequantizeLinear`` edge not kept is bypassed, its
  consumer reads the float tensor instead. One calibration serves every variant.
- :func:`sqnr_db`, :func:`layer_costs`: output signal-to-quantization-noise ratios.
- :func:`weight_stats`: per layer, the per-output-channel crest factor (``max|w| / rms(w)``) of the
  fused kernel and the SQNR of its per-channel int8 rounding (for a uniform quantizer with step
  ``max|w| / 127`` the rounding SQNR is about ``20 log10(127 sqrt(12) / crest)``: the crest factor
  is what the kernel's own shape costs).
- :class:`CrestPenaltyOptimWrapper`: an optional training penalty on the crest factors of OREPA's
  squeezed kernels. The recommended INT8 recipe is not here but in the layers:
  ``fake_quant_bits=8`` (``orepa_cfg`` / ``conv_cfg``) trains, evaluates and fuses each OREPA
  kernel on its per-channel int8 grid (:class:`mmorepa.layers.ReparamConv2d`), docs/int8.md.
"""
import contextlib
import copy
import math
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from mmengine.logging import MessageHub
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS

from .errors import MMOrepaError
from .fileio import atomic_write
from .layers.base import ReparamConv2d
from .layers.fake_quant import per_channel_fake_quant

CALIBRATION_METHODS = ('minmax', 'entropy', 'percentile')


# -- quantize ---------------------------------------------------------------------------------------
def quantize_int8(fp32_path, output, inputs: Iterable[np.ndarray], method: str = 'minmax'):
    """Quantize the ONNX file ``fp32_path`` with onnxruntime (QDQ, int8 per-channel symmetric
    weights, int8 activations calibrated by ``method`` on ``inputs``: float32 arrays for the
    graph's one input, read one at a time as the calibrator asks for them) and write ``output``
    atomically. Returns the float model that was quantized (``fp32_path`` after onnxruntime's
    pre-processing), an ``onnx.ModelProto``."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    calibrate = _calibration_method(method)
    reader = _calibration_reader(_input_name(fp32_path), inputs)
    with tempfile.TemporaryDirectory(prefix='mmorepa-quantize-') as tmp:
        pre = str(Path(tmp) / 'preprocessed.onnx')
        quant_pre_process(str(fp32_path), pre, skip_symbolic_shape=True)
        atomic_write(output, lambda path: quantize_static(
            pre, path, reader, quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            calibrate_method=calibrate))
        return onnx.load(pre)


def _calibration_method(method: str):
    """onnxruntime's ``CalibrationMethod`` named by ``method`` (one of CALIBRATION_METHODS)."""
    from onnxruntime.quantization import CalibrationMethod
    if method not in CALIBRATION_METHODS:
        raise MMOrepaError(f'unknown calibration method {method!r}; expected one of '
                           f'{list(CALIBRATION_METHODS)}')
    return {'minmax': CalibrationMethod.MinMax, 'entropy': CalibrationMethod.Entropy,
            'percentile': CalibrationMethod.Percentile}[method]


def _calibration_reader(name: str, inputs: Iterable[np.ndarray]):
    """onnxruntime's ``CalibrationDataReader`` over ``inputs``, fed to the input ``name``: each
    array is read when the calibrator asks for it."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(inputs)

        def get_next(self):
            x = next(self.batches, None)
            return None if x is None else {name: x}

    return Reader()


def _input_name(path) -> str:
    import onnx
    return onnx.load(str(path), load_external_data=False).graph.input[0].name


# -- run and compare --------------------------------------------------------------------------------
class OnnxGraph:
    """An ONNX model (a path or an ``onnx.ModelProto``) in one onnxruntime session on the CPU;
    calling it on an input batch returns the list of its outputs.

    ``as_written=True`` (the analysis): onnxruntime's graph optimizations are off. They leave a
    whole QDQ model's outputs as they are, but rewrite the partly quantized variants (a float
    Conv fed by ``DequantizeLinear``) into something that computes otherwise: on the demo
    classifier the activations-only variant came out at 23.4 dB with them, below the whole INT8
    model's 31.3 dB, and at 32.8 dB without them. ``as_written=False``: onnxruntime's defaults,
    as a deployment runs the file."""

    def __init__(self, model, as_written: bool = True):
        import onnxruntime as ort
        source = model.SerializeToString() if hasattr(model, 'SerializeToString') else str(model)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if as_written:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(source, options, providers=['CPUExecutionProvider'])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> List[np.ndarray]:
        return self.session.run(None, {self.input_name: x})


def run_onnx(model, inputs: Iterable[np.ndarray]) -> List[List[np.ndarray]]:
    """Outputs of ``model`` (a path or an ``onnx.ModelProto``) on each input batch, computed as
    the graph says (:class:`OnnxGraph`)."""
    graph = OnnxGraph(model)
    return [graph(x) for x in inputs]


class RunningSqnr:
    """Output SQNR accumulated batch by batch: the sums of signal and noise energy (float64)
    over every output of every batch given to :meth:`update`."""

    def __init__(self):
        self.signal = self.noise = 0.0

    def update(self, reference: Sequence[np.ndarray], test: Sequence[np.ndarray]) -> None:
        """Add one batch: ``reference`` and ``test`` are the same outputs of two models."""
        for r, t in zip(reference, test):
            r = np.asarray(r, np.float64)
            self.signal += float((r ** 2).sum())
            self.noise += float(((r - np.asarray(t, np.float64)) ** 2).sum())

    @property
    def db(self) -> float:
        """``10 log10(signal / noise)``; infinite without noise."""
        return math.inf if self.noise == 0 else 10 * math.log10(self.signal / self.noise)


def sqnr_db(reference: Iterable[Sequence[np.ndarray]],
            test: Iterable[Sequence[np.ndarray]]) -> float:
    """``10 log10(sum ref^2 / sum (ref - test)^2)`` over all batches and outputs (float64)."""
    sqnr = RunningSqnr()
    for refs, tests in zip(reference, test):
        sqnr.update(refs, tests)
    return sqnr.db


# -- partly quantized variants ----------------------------------------------------------------------
def dequantize_edges(qdq) -> List[dict]:
    """Every use of a ``DequantizeLinear`` output in the QDQ model ``qdq``: ``dict(dq, consumer,
    kind, layer)``; ``consumer`` is a node name or ``None`` for a graph output, ``kind`` is
    ``'weight'`` (a constant: a weight or bias) or ``'activation'``, ``layer`` the node whose
    quantization the edge is (its consumer; for a graph output, the node that produced it)."""
    graph = qdq.graph
    inits = {i.name for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    edges = []
    for dq in graph.node:
        if dq.op_type != 'DequantizeLinear':
            continue
        kind = 'weight' if dq.input[0] in inits else 'activation'
        for node in graph.node:
            if dq.output[0] in node.input:
                edges.append(dict(dq=dq.name, consumer=node.name, kind=kind, layer=node.name))
        if dq.output[0] in outputs:
            q = producer.get(dq.input[0])
            source = producer.get(q.input[0]) if q is not None else None
            edges.append(dict(dq=dq.name, consumer=None, kind=kind,
                              layer=source.name if source is not None else dq.name))
    return edges


def variant(qdq, fp32, keep: Callable[[dict], bool]):
    """A copy of the QDQ model ``qdq`` in which each ``DequantizeLinear`` edge (see
    :func:`dequantize_edges`) with ``keep(edge)`` false is bypassed: its consumer reads the float
    tensor (an activation: the ``QuantizeLinear``'s input; a weight or bias: the float initializer
    of ``fp32``, the model that was quantized, found by onnxruntime's ``<name>_quantized``)."""
    import onnx
    from onnx import helper
    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    floats = {i.name: i for i in fp32.graph.initializer}
    nodes = {n.name: n for n in graph.node}
    added = {i.name for i in graph.initializer}
    values = {i.name: i for i in graph.initializer}
    made = {}
    for edge in dequantize_edges(qdq):
        if keep(edge):
            continue
        dq = nodes[edge['dq']]
        if edge['kind'] == 'activation':
            source = _float_activation(graph, producer[dq.input[0]], dq, values, made)
        else:
            source = dq.input[0][:-len('_quantized')] if dq.input[0].endswith('_quantized') \
                else None
            if source not in floats:
                raise MMOrepaError(f'cannot find the float value of {dq.input[0]} in the model '
                                   'that was quantized')
            float_name = source + '_float'
            if float_name not in added:
                graph.initializer.append(floats[source])
                graph.initializer[-1].name = float_name
                added.add(float_name)
            source = float_name
        if edge['consumer'] is None:  # a graph output: keep its name, feed it the float tensor
            name = dq.output[0]
            for node in graph.node:
                node.input[:] = [name + '_kept' if i == name else i for i in node.input]
            dq.output[0] = name + '_kept'
            graph.node.append(helper.make_node('Identity', [source], [name],
                                               name=dq.name + '_bypass'))
            continue
        node = nodes[edge['consumer']]
        node.input[:] = [source if i == dq.output[0] else i for i in node.input]
    return model


def _float_activation(graph, q, dq, values, made) -> str:
    """The float tensor to read instead of ``dq``'s output: the ``QuantizeLinear``'s input, through
    a ReLU where the quantized range starts at 0 (the zero point is the lowest code): onnxruntime
    drops a ReLU whose output is quantized, the quantized range being the clamp."""
    from onnx import helper, numpy_helper
    if dq.name in made:
        return made[dq.name]
    source = q.input[0]
    zero = values.get(q.input[2]) if len(q.input) > 2 else None
    if zero is not None:
        zp = numpy_helper.to_array(zero)
        if zp.size == 1 and int(zp) == np.iinfo(zp.dtype).min:
            graph.node.append(helper.make_node('Relu', [source], [dq.name + '_float'],
                                               name=dq.name + '_float'))
            source = dq.name + '_float'
    made[dq.name] = source
    return source


def variants_by_side(qdq, fp32) -> Dict[str, object]:
    """The INT8 model with its weights only and its activations only quantized."""
    return {'weights only': variant(qdq, fp32, lambda e: e['kind'] == 'weight'),
            'activations only': variant(qdq, fp32, lambda e: e['kind'] == 'activation')}


def layer_costs(qdq, fp32, inputs, reference) -> List[dict]:
    """Per node with quantized inputs (Conv, Gemm, Add, pooling, ...): the output SQNR with only
    that node's inputs quantized (weight, bias, activations; for the node producing a graph output
    that output too), and with only its weight (None for a node without one),
    against the FP32 outputs ``reference`` (:func:`run_onnx` of ``fp32`` on ``inputs``). Sorted,
    the costliest (lowest SQNR) first."""
    edges = dequantize_edges(qdq)
    layers = sorted({e['layer'] for e in edges})
    rows = []
    for layer in layers:
        alone = variant(qdq, fp32, lambda e: e['layer'] == layer)
        has_weight = any(e['layer'] == layer and e['kind'] == 'weight' for e in edges)
        weight = variant(qdq, fp32, lambda e: e['layer'] == layer and e['kind'] == 'weight')
        rows.append(dict(layer=layer, sqnr=sqnr_db(reference, run_onnx(alone, inputs)),
                         weight_sqnr=sqnr_db(reference, run_onnx(weight, inputs))
                         if has_weight else None))
    return sorted(rows, key=lambda r: r['sqnr'])


def activation_stats(qdq, fp32, inputs) -> List[dict]:
    """Per quantized activation tensor of the QDQ model, on ``inputs``: the SQNR of its own int8
    quantize-dequantize (its calibrated scale and zero point, clipping included), its crest factor
    ``max|x| / rms(x)`` (what a per-tensor scale pays for) and the spread of its channels (the
    largest per-channel ``max|x|`` over the median one)."""
    from onnx import helper, numpy_helper
    model = variant(qdq, fp32, lambda e: False)
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    quants, seen = [], set()
    for q in model.graph.node:
        if q.op_type == 'QuantizeLinear' and q.input[0] not in seen and q.input[1] in values:
            seen.add(q.input[0])
            quants.append(q)
    del model.graph.output[:]
    model.graph.output.extend(helper.make_empty_tensor_value_info(q.input[0]) for q in quants)
    runs = run_onnx(model, inputs)
    rows = []
    for i, q in enumerate(quants):
        scale = float(values[q.input[1]])
        zp = values[q.input[2]] if len(q.input) > 2 else np.zeros((), np.int8)
        lo, hi = np.iinfo(zp.dtype).min, np.iinfo(zp.dtype).max
        signal = noise = 0.0
        peak, per_channel = 0.0, None
        for outs in runs:
            x = outs[i].astype(np.float64)
            if int(zp) == lo:  # a ReLU onnxruntime folded into this quantization
                x = np.maximum(x, 0)
            deq = (np.clip(np.round(x / scale) + int(zp), lo, hi) - int(zp)) * scale
            signal += float((x ** 2).sum())
            noise += float(((x - deq) ** 2).sum())
            peak = max(peak, float(np.abs(x).max()))
            if x.ndim >= 2:
                m = np.abs(x).reshape(x.shape[0], x.shape[1], -1).max(axis=(0, 2))
                per_channel = m if per_channel is None else np.maximum(per_channel, m)
        count = sum(outs[i].size for outs in runs)
        rms = math.sqrt(signal / max(count, 1))
        rows.append(dict(tensor=q.input[0],
                         sqnr=math.inf if noise == 0 else 10 * math.log10(signal / noise),
                         crest=peak / rms if rms else math.inf,
                         channel_spread=float(per_channel.max() / max(np.median(per_channel),
                                                                       1e-12))
                         if per_channel is not None else None))
    return rows


# -- the fused kernels ------------------------------------------------------------------------------
def per_channel_int8(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric per-output-channel int8 rounding (scale ``max|w| / 127``), dequantized: what
    onnxruntime's per-channel weight quantization does to ``weight``."""
    return per_channel_fake_quant(weight.detach(), 8)


def crest_factor(weight: torch.Tensor) -> torch.Tensor:
    """Per output channel, ``max|w| / rms(w)`` (1 for a constant channel; ``sqrt(n)`` for one
    non-zero entry). Differentiable."""
    flat = weight.flatten(1)
    rms = flat.pow(2).mean(1).clamp_min(1e-24).sqrt()
    return flat.abs().amax(1) / rms


def weight_stats(fused: nn.Module) -> List[dict]:
    """Per conv / linear layer of the fused model (its kernel before the norm that follows it:
    per-channel crest factors and per-channel rounding do not change when each output channel
    is scaled, so folding the norm changes neither): the median and largest crest factor over
    output channels and the SQNR of the kernel's per-channel int8 rounding."""
    rows = []
    for name, m in fused.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        w = m.weight.detach().double()
        crest = crest_factor(w)
        noise = float((w - per_channel_int8(w)).pow(2).sum())
        rows.append(dict(layer=name, crest_median=float(crest.median()),
                         crest_max=float(crest.max()),
                         sqnr=10 * math.log10(float(w.pow(2).sum()) / max(noise, 1e-300))))
    return rows


# -- INT8 inside the toolbox's model ----------------------------------------------------------------
class OnnxFeatures(nn.Module):
    """Computes with onnxruntime's ``session`` what the exported file computes from the data
    preprocessor's output: the feature maps of backbone and neck (or a classifier's logits), as
    a tuple of tensors on the input's device."""

    def __init__(self, session):
        super().__init__()
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def forward(self, inputs: torch.Tensor) -> tuple:
        outs = self.session.run(None, {self.input_name: inputs.detach().cpu().float().numpy()})
        return tuple(torch.from_numpy(o).to(inputs.device) for o in outs)


class ExportedLogits(nn.Module):
    """A classifier's head when its backbone is the exported file (:class:`OnnxFeatures`),
    which computed the head's logits already: ``forward`` passes them on (the last of the
    features), ``predict`` gives them to the head's own post-processing (mmpretrain's
    ``ClsHead._get_predictions``: scores, labels, multi-label thresholds)."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, feats) -> torch.Tensor:
        return feats[-1]

    def predict(self, feats, data_samples=None, **kwargs):
        # mmpretrain has no public call from logits to predictions (ClsHead.predict runs the
        # head's layers first); _get_predictions is each head class's own post-processing
        return self.head._get_predictions(self(feats), data_samples)


@contextlib.contextmanager
def onnx_features(model: nn.Module, session, classifier: bool):
    """Within the context ``model`` (a toolbox model: backbone, optional neck, heads) computes
    its backbone and neck with onnxruntime's ``session`` of the exported file: ``model.backbone``
    is an :class:`OnnxFeatures`, ``model.neck`` (if any) an ``nn.Identity`` and, for a
    classifier (whose file ends with the head's logits), ``model.head`` an
    :class:`ExportedLogits`. The toolbox's own ``predict`` and the config's evaluator run
    unchanged; on exit the model's own modules are back in place."""
    swaps = {'backbone': OnnxFeatures(session)}
    if getattr(model, 'neck', None) is not None:
        swaps['neck'] = nn.Identity()
    if classifier:
        swaps['head'] = ExportedLogits(model.head)
    own = {name: getattr(model, name) for name in swaps}
    try:
        for name, module in swaps.items():
            setattr(model, name, module)
        yield model
    finally:
        for name, module in own.items():
            setattr(model, name, module)


# -- FP32 against INT8 on a data set, batch by batch ------------------------------------------------
class Int8Comparison:
    """What :func:`compare_on_batches` needs besides the data: the fused toolbox ``model`` (its
    data preprocessor, FP32 predictions), ``int8`` (an onnxruntime session of the INT8 file, as
    deployed: onnxruntime's defaults), whether the model is a ``classifier``, one ``evaluators``
    entry per side (``'fp32'``, ``'int8'``: mmengine ``Evaluator`` objects, their
    ``dataset_meta`` set), and the two files as written (:class:`OnnxGraph`: ``fp32_graph``,
    ``int8_graph``) whose outputs give the output SQNR."""

    def __init__(self, model, int8, classifier, evaluators, fp32_graph, int8_graph):
        self.model, self.int8, self.classifier = model, int8, classifier
        self.evaluators = evaluators
        self.fp32_graph, self.int8_graph = fp32_graph, int8_graph
        self.sqnr = RunningSqnr()

    def add(self, data_batch) -> np.ndarray:
        """One batch of the data loader: both sides' predictions go to their evaluators, both
        files' outputs to the running SQNR. Returns the preprocessed inputs (float32 NCHW)."""
        data = self.model.data_preprocessor(data_batch, False)
        samples = data.get('data_samples')
        with torch.no_grad():  # the heads write their predictions into the samples they get
            fp32 = self.model(**dict(data, data_samples=copy.deepcopy(samples)), mode='predict')
            self.evaluators['fp32'].process(data_samples=fp32, data_batch=data_batch)
            with onnx_features(self.model, self.int8, self.classifier):
                int8 = self.model(**data, mode='predict')
            self.evaluators['int8'].process(data_samples=int8, data_batch=data_batch)
        x = data['inputs'].detach().cpu().float().numpy()
        self.sqnr.update(self.fp32_graph(x), self.int8_graph(x))
        return x

    def metrics(self, size: int) -> Dict[str, Dict[str, float]]:
        """Each side's metrics over the ``size`` images of the data set."""
        return {side: {k: float(v) for k, v in e.evaluate(size).items()}
                for side, e in self.evaluators.items()}


def compare_on_batches(comparison: Int8Comparison, batches: Iterable, size: int,
                       sample_batches: int = 0):
    """Run ``comparison`` over ``batches`` (the test data loader's, one at a time): returns the
    metrics of each side over the ``size`` images, the output SQNR over all outputs and the
    preprocessed inputs of the first ``sample_batches`` batches (what the per-layer analysis
    runs on). Memory holds one batch, the sample and what the evaluators keep."""
    sample = []
    for data_batch in batches:
        x = comparison.add(data_batch)
        if len(sample) < sample_batches:
            sample.append(x)
    return comparison.metrics(size), comparison.sqnr.db, sample


# -- the training recipe ----------------------------------------------------------------------------
def squeezed_kernels(model) -> List[torch.Tensor]:
    """The squeezed kernel of every re-parameterized conv of ``model`` (a module, or a list of
    re-parameterized convs), nested ones (a large-kernel stem's generators) included: the
    kernels :class:`CrestPenaltyOptimWrapper` penalizes."""
    layers = _reparam_layers(model) if isinstance(model, nn.Module) else model
    return [m.squeezed_kernel_and_bias()[0] for m in layers]


def _reparam_layers(model: nn.Module) -> List[ReparamConv2d]:
    """The re-parameterized convs of ``model`` that are not deployed, nested ones included."""
    return [m for m in model.modules() if isinstance(m, ReparamConv2d) and not m.deploy]


def crest_penalty(kernels: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over ``kernels`` of the mean squared per-output-channel crest factor, normalised by
    the fan-in (``crest^2 / n`` lies in ``[1/n, 1]``). For a squeezed kernel this is also the fused
    kernel's (the norm after it scales whole output channels). The expected relative noise power
    of per-channel int8 rounding is ``crest^2 / (12 * 127^2)``: this is what the penalty lowers.
    Gradients reach every branch and scaling vector through the squeeze."""
    kernels = list(kernels)
    if not kernels:
        raise MMOrepaError('the crest-factor penalty found no re-parameterized conv in the model')
    return torch.stack([(crest_factor(k) ** 2 / k[0].numel()).mean() for k in kernels]).mean()


@OPTIM_WRAPPERS.register_module()
class CrestPenaltyOptimWrapper(OptimWrapper):
    """mmengine's ``OptimWrapper`` that adds ``crest_weight * crest_penalty(kernels)`` to the loss
    at each step, ``kernels`` being the squeezed kernels of every re-parameterized conv of the
    model whose forward pass ran in :meth:`optim_context` (each squeezed once more for the
    penalty, which exists at every OREPA training step). The fused kernels come out with flatter
    output channels, which per-channel int8 rounds more finely. Nothing changes at inference;
    the deployed model is the stock network."""

    def __init__(self, crest_weight: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if not crest_weight >= 0:
            raise MMOrepaError(f'crest_weight must be >= 0, got {crest_weight!r}')
        self.crest_weight = float(crest_weight)
        self._layers = []

    @contextlib.contextmanager
    def optim_context(self, model: nn.Module):
        """The forward pass; the re-parameterized convs of ``model`` are the ones the next
        :meth:`update_params` penalizes."""
        self._layers = _reparam_layers(model)
        with super().optim_context(model):
            yield

    def update_params(self, loss: torch.Tensor, **kwargs) -> None:
        if self.crest_weight and self._layers:
            penalty = crest_penalty(squeezed_kernels(self._layers))
            MessageHub.get_current_instance().update_scalar('train/crest_penalty',
                                                            penalty.item())
            loss = loss + self.crest_weight * penalty
        self._layers = []
        super().update_params(loss, **kwargs)
