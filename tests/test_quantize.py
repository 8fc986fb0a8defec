"""INT8: tools/quantize.py end to end on a tiny classifier, its refusals, the partly quantized
variants it analyses with, and the crest-factor training recipe (mmorepa.quantization)."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mmorepa
from mmorepa import quantization as Q
from mmorepa.layers import OREPAConv1x1, OREPAConv2d, OREPALargeConv

from helpers import bn_eval, randomize_network_, rel_err

pytest.importorskip('onnxruntime')
ROOT = Path(__file__).resolve().parents[1]
CLS_CFG = 'configs/demo/orepa_r18_shapes_cls.py'
TINY = {'model.backbone.base_channels': 8, 'model.backbone.stem_channels': 8,
        'model.head.in_channels': 64}


def _run(args):
    return subprocess.run([sys.executable, 'tools/quantize.py'] + [str(a) for a in args],
                          cwd=ROOT, capture_output=True, text=True)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A tiny OREPA-ResNet-18 classifier (random weights, random BN statistics), its
    checkpoint, a small shapes data set and the --cfg-options that point the config at them."""
    base = tmp_path_factory.mktemp('quantize')
    data = mmorepa.datasets.make_shapes_dataset(base / 'data', num_train=24, num_val=8)
    opts = [f'{k}={v}' for k, v in TINY.items()]
    opts += [f'{k}_dataloader.dataset.data_root={data}/cls' for k in ('train', 'val', 'test')]
    opts += ['train_dataloader.batch_size=12']
    cfg = mmorepa.config.read_config(CLS_CFG, TINY)
    model = randomize_network_(mmorepa.config.build_model(cfg), torch.Generator().manual_seed(0))
    ckpt = base / 'tiny.pth'
    torch.save({'state_dict': model.state_dict()}, ckpt)
    return base, ckpt, opts


@pytest.fixture(scope='module')
def quantized(tiny):
    base, ckpt, opts = tiny
    out, metrics = base / 'tiny_int8.onnx', base / 'metrics.json'
    proc = _run([CLS_CFG, ckpt, out, '--calib-batches', '2', '--out', metrics,
                 '--work-dir', base / 'work', '--cfg-options'] + opts)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(metrics.read_text()), proc.stdout


def test_quantize_writes_a_valid_int8_file_and_the_metrics(quantized, tiny):
    out, result, stdout = quantized
    import onnx
    import onnxruntime as ort
    graph = onnx.load(str(out)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count('QuantizeLinear') >= 20 and ops.count('Conv') >= 17
    weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(weights) >= 18  # int8 kernels (17 convs + fc), not float ones
    session = ort.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    logits = session.run(None, {'input': np.random.RandomState(0).randn(3, 3, 64, 64)
                                .astype(np.float32)})[0]
    assert logits.shape == (3, 3) and np.isfinite(logits).all()
    for kind in ('fp32', 'int8'):
        assert 0 <= result['metrics'][kind]['accuracy/top1'] <= 100
    assert result['calibration'] == dict(method='minmax', batches=2, images=24)
    assert 5 < result['sqnr_db'] < 80
    assert set(result['sqnr_db_by_side']) == {'weights only', 'activations only'}
    assert any(r['layer'].endswith('/head/fc/Gemm') for r in result['layers'])
    assert 'output SQNR, INT8 vs FP32' in stdout and 'accuracy/top1' in stdout
    # one summary: neither the runner's config dump nor per-batch log lines (--verbose)
    assert 'Config:' not in stdout and 'test set [' not in stdout


def _tool():
    """tools/quantize.py as a module (its sys.path additions undone)."""
    import importlib.util
    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location('quantize_tool', ROOT / 'tools/quantize.py')
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


def test_quantize_refusals_are_one_line(tiny, tmp_path, capsys):
    base, ckpt, opts = tiny
    kept = tmp_path / 'kept.onnx'
    kept.write_bytes(b'not mine')
    tool = _tool()
    for args, message in [
            ([CLS_CFG, base / 'missing.pth', kept], 'checkpoint not found'),
            ([CLS_CFG, ckpt, ckpt], 'refusing to overwrite the input'),
            ([CLS_CFG, ckpt, kept, '--calib-batches', '0'], '--calib-batches must be'),
            ([CLS_CFG, ckpt, kept, '--out', kept], 'is the INT8 output file'),
            ([CLS_CFG, ckpt, kept, '--input-shape', '1', '3', '0', '64'], '--input-shape')]:
        with pytest.raises(SystemExit) as exit_:
            tool.run_tool(tool.main, [str(a) for a in args])
        err = capsys.readouterr().err
        assert exit_.value.code == 1 and err.count('\n') == 1 and message in err, (args, err)
    assert kept.read_bytes() == b'not mine'
    assert ckpt.stat().st_size > 1000


def test_quantize_argument_errors_are_one_line(tiny, capsys):
    """argparse's own errors too: one line on stderr, exit status 1."""
    base, ckpt, _ = tiny
    tool = _tool()
    for args, message in [([CLS_CFG, ckpt], 'required: output'),
                          ([CLS_CFG, ckpt, base / 'a.onnx', '--bogus'], '--bogus'),
                          ([CLS_CFG, ckpt, base / 'a.onnx', '--calib-batches', 'x'], "'x'"),
                          ([CLS_CFG, ckpt, base / 'a.onnx', '--calib-method', 'mse'], "'mse'"),
                          ([CLS_CFG, ckpt, base / 'a.onnx', '--analysis-batches', '0'],
                           '--analysis-batches must be')]:
        with pytest.raises(SystemExit) as exit_:
            tool.run_tool(tool.main, [str(a) for a in args])
        err = capsys.readouterr().err
        assert exit_.value.code == 1 and err.count('\n') == 1 and message in err, (args, err)
    assert not (base / 'a.onnx').exists()


class _Recorded:
    """An :class:`mmorepa.quantization.OnnxGraph` that keeps every output it computes."""

    def __init__(self, graph):
        self.graph, self.outputs = graph, []

    def __call__(self, x):
        out = self.graph(x)
        self.outputs.append(out)
        return out


def _tiny_fused_classifier(tiny):
    """The tiny classifier of ``tiny`` (its data preprocessor, the config's test loader, two
    Accuracy evaluators), fused, in eval mode."""
    from mmengine.evaluator import Evaluator
    from mmengine.runner import Runner
    base, ckpt, opts = tiny
    data = {o.split('=')[0]: o.split('=')[1] for o in opts if 'data_root' in o}
    cfg = mmorepa.config.read_config(CLS_CFG, dict(TINY, **data))
    cfg.model.data_preprocessor = dict(cfg.data_preprocessor)
    cfg.test_dataloader.batch_size = 3  # 8 images: batches of 3, 3 and 2
    model = mmorepa.config.build_model(cfg)
    model.load_state_dict(torch.load(ckpt)['state_dict'])
    model = mmorepa.reparameterize(model).eval()
    loader = Runner.build_dataloader(cfg.test_dataloader)
    evaluators = {side: Evaluator(cfg.test_evaluator) for side in ('fp32', 'int8')}
    return model, loader, evaluators


def test_streaming_comparison_equals_all_outputs_at_once(tiny, tmp_path):
    """quantize.py's one pass over the test set (batch by batch into the evaluators and a
    running SQNR) gives the metrics and the SQNR computed over all outputs at once: top-1 from
    the concatenated logits of both sides, the SQNR from the concatenated outputs of both files
    as written; and the model's own modules are back after the INT8 predictions."""
    import onnx
    import onnxruntime as ort
    model, loader, evaluators = _tiny_fused_classifier(tiny)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    path = tmp_path / 'fp32.onnx'
    torch.onnx.export(_Logits(model), (x, ), str(path), input_names=['input'], dynamo=False,
                      dynamic_axes={'input': {0: 'batch'}}, opset_version=17)
    calib = [np.random.RandomState(i).randn(4, 3, 64, 64).astype(np.float32) for i in range(2)]
    fp32 = Q.quantize_int8(path, tmp_path / 'int8.onnx', iter(calib))
    qdq = onnx.load(str(tmp_path / 'int8.onnx'))
    int8 = ort.InferenceSession(str(tmp_path / 'int8.onnx'), providers=['CPUExecutionProvider'])
    graphs = _Recorded(Q.OnnxGraph(fp32)), _Recorded(Q.OnnxGraph(qdq))
    own = model.backbone, model.neck, model.head
    comparison = Q.Int8Comparison(model, int8, True, evaluators, *graphs)
    metrics, sqnr, inputs = Q.compare_on_batches(comparison, loader, len(loader.dataset), 10)
    assert (model.backbone, model.neck, model.head) == own
    assert [len(b) for b in inputs] == [3, 3, 2]
    # the SQNR over all outputs at once
    ref, test = (np.concatenate([o[0] for o in g.outputs]).astype(np.float64) for g in graphs)
    expected = 10 * np.log10((ref ** 2).sum() / ((ref - test) ** 2).sum())
    assert 5 < sqnr < 80 and abs(sqnr - expected) <= 1e-9 * expected
    # top-1 over all logits at once: FP32 from the fused PyTorch model, INT8 from the file
    labels = np.array([loader.dataset.get_data_info(i)['gt_label']
                       for i in range(len(loader.dataset))])
    with torch.no_grad():
        logits = {'fp32': np.concatenate([model(torch.from_numpy(b), mode='tensor').numpy()
                                          for b in inputs]),
                  'int8': np.concatenate([int8.run(None, {'input': b})[0] for b in inputs])}
    for side, value in logits.items():
        top1 = 100 * float((value.argmax(1) == labels).mean())
        assert metrics[side]['accuracy/top1'] == pytest.approx(top1, abs=1e-9), side
    assert not np.array_equal(logits['fp32'], logits['int8'])


class _Logits(nn.Module):
    """A classifier's logits from the data preprocessor's output (what is exported)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x, mode='tensor')


class _TinyNet(nn.Module):
    def __init__(self, fake_quant_bits=None):
        super().__init__()
        self.stem = OREPALargeConv(3, 8, 5, stride=2, padding=2, fake_quant_bits=fake_quant_bits)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv = OREPAConv2d(8, 8, 3, padding=1, fake_quant_bits=fake_quant_bits)
        self.bn1 = nn.BatchNorm2d(8)
        self.down = OREPAConv1x1(8, 16, 1, stride=2, padding=0, fake_quant_bits=fake_quant_bits)
        self.bn2 = nn.BatchNorm2d(16)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.conv(x)))
        return self.bn2(self.down(x))


def test_crest_penalty_reaches_every_branch_and_fusion_stays_exact():
    torch.manual_seed(0)
    model = randomize_network_(_TinyNet(), torch.Generator().manual_seed(1))
    penalty = Q.crest_penalty(Q.squeezed_kernels(model))
    penalty.backward()
    for name, p in model.named_parameters():
        if 'bn' not in name:  # every branch and scaling vector of the three OREPA layers
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the recipe's step is the plain step on loss + crest_weight * penalty
    x = torch.randn(4, 3, 16, 16)
    model.zero_grad(set_to_none=True)
    ref = copy.deepcopy(model)
    wrapper = Q.CrestPenaltyOptimWrapper(
        crest_weight=0.5, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with wrapper.optim_context(model):
        loss = model(x).square().mean()
    # every re-parameterized conv is penalized (the stem's generators are such convs too)
    assert len(wrapper._layers) == len(Q.squeezed_kernels(model)) == 5
    wrapper.update_params(loss)
    plain = copy.deepcopy(ref)
    for net, weight in ((ref, 0.5), (plain, 0.0)):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        opt.zero_grad()
        (net(x).square().mean() + weight * Q.crest_penalty(Q.squeezed_kernels(net))).backward()
        opt.step()
    assert rel_err(model.conv.weight_kxk.detach(), ref.conv.weight_kxk.detach()) < 1e-6
    assert rel_err(model.conv.weight_kxk.detach(), plain.conv.weight_kxk.detach()) > 1e-4
    before = Q.crest_factor(ref.conv.squeezed_kernel_and_bias()[0]).mean()
    # trained with the recipe, the fused model (plain convs) still equals the un-fused one
    model.eval().double()
    x = x.double()
    with torch.no_grad():
        with model.stem.unfolded(), model.conv.unfolded(), model.down.unfolded():
            unfused = model(x)
        fused = mmorepa.reparameterize(model)(x)
    assert rel_err(fused, unfused) < 1e-12
    assert before > 1


def _int8_rounded(weight):
    """Symmetric per-output-channel int8 rounding (step max|w| / 127), dequantized: onnxruntime's
    weight quantization, written out independently in numpy."""
    w = weight.detach().cpu().numpy()
    flat = w.reshape(w.shape[0], -1)
    step = np.abs(flat).max(1, keepdims=True) / 127
    return torch.from_numpy((np.clip(np.round(flat / step), -127, 127) * step).reshape(w.shape))


def _tiny_on_feature_maps(net, x, kernels):
    """_TinyNet computed with the given kernels (one per OREPA layer) on feature maps, its norms
    in the net's mode."""
    for layer, bn, kernel in zip((net.stem, net.conv, net.down), (net.bn0, net.bn1, net.bn2),
                                 kernels):
        x = F.conv2d(x, kernel, None, layer.stride, layer.padding)
        x = bn(x) if bn.training else bn_eval(x, bn)
        x = torch.relu(x) if layer is not net.down else x
    return x


def test_fake_quant_trains_on_the_int8_grid_with_straight_through_gradients():
    """OREPA layers with fake_quant_bits=8 train with their squeezed kernels rounded per output
    channel as onnxruntime rounds weights, and the gradient of the rounded kernel reaches every
    branch and scaling vector unchanged (straight through the rounding, back through the
    squeeze): compared with the kernels rounded by _int8_rounded on feature maps."""
    torch.manual_seed(0)
    net = randomize_network_(_TinyNet(fake_quant_bits=8), torch.Generator().manual_seed(1))
    net = net.double().train()
    ref = copy.deepcopy(net)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    layers = (ref.stem, ref.conv, ref.down)
    rounded = [_int8_rounded(m.squeezed_kernel_and_bias()[0]).requires_grad_() for m in layers]
    expected = _tiny_on_feature_maps(ref, x, rounded)
    out = net(x)
    assert rel_err(out, expected) < 1e-12
    # not the float kernels' output: the rounding acted
    assert rel_err(_tiny_on_feature_maps(ref, x, [m.squeezed_kernel_and_bias()[0] for m in layers]), out) > 1e-5
    out.square().mean().backward()
    expected.square().mean().backward()
    for ref_layer, layer, kernel in zip(layers, (net.stem, net.conv, net.down), rounded):
        names, params = zip(*ref_layer.named_parameters())
        grads = torch.autograd.grad(ref_layer.squeezed_kernel_and_bias()[0], params, kernel.grad)
        for name, p, g in zip(names, dict(layer.named_parameters()).values(), grads):
            assert g.abs().sum() > 0 and rel_err(p.grad, g) < 1e-10, name
    # the option reaches the layers through the backbone's orepa_cfg (every OREPA layer), and a
    # layer that would not form the full kernel is refused
    assert net.conv.pair_route(x[:, :1].expand(-1, 8, -1, -1)) == 'kernel'
    with pytest.raises(ValueError, match='route'):
        OREPAConv2d(8, 8, 3, route='feature', fake_quant_bits=8)
    cfg = mmorepa.config.read_config(CLS_CFG, dict(TINY, **{
        'model.backbone.orepa_cfg': dict(fake_quant_bits=8)}))
    model = mmorepa.config.build_model(cfg)
    reparam = [m for m in model.modules() if isinstance(m, mmorepa.layers.ReparamConv2d)]
    generators = {g for m in reparam if isinstance(m, OREPALargeConv) for g in m.generators}
    assert len(reparam) - len(generators) == 17 and generators  # the stem, 16 3x3 convs
    assert all((m.fake_quant_bits is None) == (m in generators) for m in reparam)


def test_fake_quant_fuses_exactly_onto_the_int8_grid():
    """Fused, a model with fake_quant_bits=8 equals the un-fused one in eval (random BN
    statistics, float64; the reference convolves the rounded kernels and normalizes on feature
    maps), and each fused kernel, the norm folded in, lies on its own per-channel int8 grid: the
    rounding of per-channel weight quantization leaves it unchanged."""
    torch.manual_seed(0)
    net = randomize_network_(_TinyNet(fake_quant_bits=8), torch.Generator().manual_seed(2))
    net = net.double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    fused = mmorepa.reparameterize(net)
    with torch.no_grad():
        expected = _tiny_on_feature_maps(net, x, [_int8_rounded(m.squeezed_kernel_and_bias()[0])
                                                  for m in (net.stem, net.conv, net.down)])
        assert rel_err(fused(x), expected) < 1e-12
        assert rel_err(net(x), expected) < 1e-12
    for conv in (fused.stem, fused.conv, fused.down):
        assert isinstance(conv, nn.Conv2d)
        w = conv.weight.detach()
        assert rel_err(_int8_rounded(w), w) < 1e-12
        assert rel_err(_int8_rounded(w.float()).double(), w) < 1e-6  # float32, as exported


def test_variants_bypass_exactly(tmp_path):
    """With nothing kept the INT8 file computes the FP32 model; with everything kept, itself; with
    one side kept, less noise than the whole INT8 model. (With onnxruntime's graph optimizations
    on, this net's activations-only variant came out noisier than the INT8 model, 48.17 against
    48.34 dB: Q.run_onnx computes graphs as written.)"""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.ReLU(),
                        nn.Conv2d(4, 4, 1)).eval()
    x = torch.randn(1, 3, 12, 12)
    torch.onnx.export(net, (x, ), str(tmp_path / 'fp32.onnx'), input_names=['input'],
                      dynamo=False, opset_version=17, dynamic_axes={'input': {0: 'batch'}})
    inputs = [np.random.RandomState(i).randn(4, 3, 12, 12).astype(np.float32) for i in range(3)]
    fp32 = Q.quantize_int8(tmp_path / 'fp32.onnx', tmp_path / 'int8.onnx', inputs)
    import onnx
    qdq = onnx.load(str(tmp_path / 'int8.onnx'))
    reference = Q.run_onnx(fp32, inputs)
    int8 = Q.run_onnx(qdq, inputs)
    none = Q.run_onnx(Q.variant(qdq, fp32, lambda e: False), inputs)
    assert all(rel_err(torch.from_numpy(a[0]), torch.from_numpy(b[0])) < 1e-6
               for a, b in zip(none, reference))
    assert Q.sqnr_db(int8, Q.run_onnx(Q.variant(qdq, fp32, lambda e: True), inputs)) == np.inf
    full = Q.sqnr_db(reference, int8)
    sides = {k: Q.sqnr_db(reference, Q.run_onnx(m, inputs))
             for k, m in Q.variants_by_side(qdq, fp32).items()}
    assert 10 < full < min(sides.values()) < np.inf
    # the per-channel rounding the kernel statistics assume is onnxruntime's
    w = torch.from_numpy(onnx.numpy_helper.to_array(fp32.graph.initializer[0]).copy())
    if w.dim() == 4:
        assert Q.weight_stats(nn.Sequential(net[0]))[0]['sqnr'] > 30
