"""Quantize a fused model to INT8 (onnxruntime, static QDQ) and evaluate FP32 against INT8.

    python tools/quantize.py CONFIG CHECKPOINT OUTPUT.onnx [--calib-batches N]
                             [--calib-method minmax|entropy|percentile] [--input-shape N C H W]
                             [--out METRICS.json] [--metrics-only] [--top K] [--work-dir DIR]
                             [--cfg-options k=v ...]

The model of CONFIG is loaded from CHECKPOINT (strictly), fused (the stock network) and exported
as tools/export_onnx.py does (input: the data preprocessor's output; a classifier end to end, a
detector or segmentor as backbone + neck). N batches of the config's training data, through its
own pipeline and data preprocessor, calibrate onnxruntime's static quantization (QDQ, per-channel
symmetric int8 weights, int8 activations); OUTPUT.onnx is written atomically. Then the config's
test set and evaluator score the fused model in FP32 (PyTorch) and in INT8 (onnxruntime; for a
detector or segmentor the INT8 backbone + neck feed the PyTorch heads), and the tool prints both,
the output SQNR (INT8 against FP32; also with the weights only and the activations only
quantized), the layers whose quantization costs most (output SQNR with that layer alone
quantized), the fused kernels with the largest per-channel crest factors and the activations
whose own int8 rounding costs most. Errors: one line on stderr, exit status 1; nothing but
OUTPUT (and --out) is written, runner logs aside (work dir).
"""
import argparse
import json
import os.path as osp
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402

from mmorepa import quantization as Q  # noqa: E402
from mmorepa.cli import ToolError, build_runner, load_config, run_tool, runner_model  # noqa: E402
from mmorepa.deploy import check_input_shape  # noqa: E402
from mmorepa.export import export, is_classifier  # noqa: E402
from mmorepa.fileio import atomic_write, check_input_file, check_output_file  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('output', help='the INT8 ONNX file to write')
    parser.add_argument('--calib-batches', type=int, default=4,
                        help='training batches (config batch size) to calibrate on (default 4)')
    parser.add_argument('--calib-method', default='minmax', choices=Q.CALIBRATION_METHODS)
    parser.add_argument('--input-shape', type=int, nargs=4, metavar=('N', 'C', 'H', 'W'),
                        help='the shape to export at (default: one calibration image)')
    parser.add_argument('--out', help='write the metrics and SQNRs to this JSON file')
    parser.add_argument('--metrics-only', action='store_true',
                        help='metrics and output SQNR only, no per-side or per-layer analysis')
    parser.add_argument('--top', type=int, default=5, help='how many layers to list (default 5)')
    parser.add_argument('--work-dir', help='where the runner writes its logs')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value')
    return parser.parse_args(argv)


def preprocessed_batches(model, loader, limit=None):
    """The data preprocessor's output (float32 NCHW arrays) for the batches of ``loader``."""
    batches = []
    with torch.no_grad():
        for i, data in enumerate(loader):
            if limit is not None and i >= limit:
                break
            batches.append(model.data_preprocessor(data, False)['inputs'].float().numpy())
    return batches


def print_analysis(result, top):
    sides = ', '.join(f'{k} {v:.1f} dB' for k, v in result['sqnr_db_by_side'].items())
    print(f'output SQNR by side: {sides}')
    print('layers whose quantization costs most (output SQNR with only that layer quantized; '
          'only its weight):')
    for r in result['layers'][:top]:
        weight = '' if r['weight_sqnr'] is None else f'{r["weight_sqnr"]:>8.1f} dB'
        print(f'  {r["layer"]:<58}{r["sqnr"]:>7.1f} dB{weight}')
    print('fused kernels with the largest per-channel crest factor (max|w|/rms; median, max over '
          'output channels; SQNR of their int8 rounding):')
    for r in sorted(result['kernels'], key=lambda r: -r['crest_max'])[:top]:
        print(f'  {r["layer"]:<58}{r["crest_median"]:>6.2f}{r["crest_max"]:>7.2f}'
              f'{r["sqnr"]:>8.1f} dB')
    print('activations whose int8 rounding costs most (own SQNR; crest factor max|x|/rms; '
          'largest/median channel peak):')
    for r in sorted(result['activations'], key=lambda r: r['sqnr'])[:top]:
        spread = '' if r['channel_spread'] is None else f'{r["channel_spread"]:>7.1f}'
        print(f'  {r["tensor"]:<58}{r["sqnr"]:>5.1f} dB{r["crest"]:>7.2f}{spread}')


def main(argv=None):
    args = parse_args(argv)
    check_input_file(args.config, 'config')
    checkpoint = check_input_file(args.checkpoint, 'checkpoint')
    output = check_output_file(args.output, (args.config, checkpoint))
    if args.out:
        check_output_file(args.out, (args.config, checkpoint), '--out file')
        if Path(args.out).resolve() == output.resolve():
            raise ToolError(f'--out {args.out} is the INT8 output file')
    if args.calib_batches < 1:
        raise ToolError(f'--calib-batches must be a positive int, got {args.calib_batches}')
    if args.input_shape:
        check_input_shape(args.input_shape)
    try:
        import onnxruntime as ort
    except ImportError:
        raise ToolError('quantization needs onnxruntime: pip install onnxruntime') from None
    cfg = load_config(args.config, 'none', args.cfg_options, args.work_dir)
    runner = build_runner(cfg, checkpoint, fuse=True)
    model = runner_model(runner)
    model.eval()

    calib = preprocessed_batches(model, runner.build_dataloader(cfg.train_dataloader, seed=0),
                                 args.calib_batches)
    shape = tuple(args.input_shape or (1, ) + calib[0].shape[1:])
    with tempfile.TemporaryDirectory(prefix='mmorepa-quantize-') as tmp:
        fp32_path, export_err = export(args.config, checkpoint, Path(tmp) / 'fp32.onnx', shape,
                                       cfg_options=args.cfg_options)
        fp32 = Q.quantize_int8(fp32_path, output, calib, args.calib_method)
    import onnx
    qdq = onnx.load(str(output))
    n_quant = sum(n.op_type == 'QuantizeLinear' for n in qdq.graph.node)
    n_images = sum(len(b) for b in calib)
    print(f'wrote {output} (QDQ, {n_quant} QuantizeLinear nodes; calibrated by '
          f'{args.calib_method} on {len(calib)} training batches, {n_images} images)')
    print(f'FP32 export (tools/export_onnx.py): onnxruntime vs PyTorch (fused) relative error '
          f'{export_err:.3e}')
    if args.calib_method == 'entropy':
        print(f'note: onnxruntime {ort.__version__}\'s quantize_static runs its entropy calibrator '
              'with 128 histogram bins into 128 quantized bins: the only candidate threshold is '
              'the full range, i.e. the scales of minmax')

    metrics = {'fp32': runner.test()}
    session = ort.InferenceSession(str(output), providers=['CPUExecutionProvider'])
    with Q.onnx_features(model, session, is_classifier(model)):
        metrics['int8'] = runner.test()

    tests = preprocessed_batches(model, runner.build_dataloader(cfg.test_dataloader))
    reference = Q.run_onnx(fp32, tests)
    result = dict(
        metrics={k: {m: float(v) for m, v in d.items()} for k, d in metrics.items()},
        sqnr_db=Q.sqnr_db(reference, Q.run_onnx(qdq, tests)),
        calibration=dict(method=args.calib_method, batches=len(calib), images=n_images))
    if not args.metrics_only:
        result.update(
            sqnr_db_by_side={side: Q.sqnr_db(reference, Q.run_onnx(m, tests))
                             for side, m in Q.variants_by_side(qdq, fp32).items()},
            layers=Q.layer_costs(qdq, fp32, tests, reference),
            activations=Q.activation_stats(qdq, fp32, tests), kernels=Q.weight_stats(model))

    print(f'\n{"metric":<24}{"FP32":>10}{"INT8":>10}')
    for key, value in result['metrics']['fp32'].items():
        print(f'{key:<24}{value:>10.4f}{result["metrics"]["int8"][key]:>10.4f}')
    print(f'\noutput SQNR, INT8 vs FP32: {result["sqnr_db"]:.1f} dB')
    if not args.metrics_only:
        print_analysis(result, args.top)
    if args.out:
        atomic_write(args.out, lambda p: Path(p).write_text(json.dumps(result, indent=1)))
    return result


if __name__ == '__main__':
    run_tool(main)
