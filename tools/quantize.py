"""Quantize a fused model to INT8 (onnxruntime, static QDQ) and evaluate FP32 against INT8.

    python tools/quantize.py CONFIG CHECKPOINT OUTPUT.onnx [--calib-batches N]
                             [--calib-method minmax|entropy|percentile] [--input-shape N C H W]
                             [--out METRICS.json] [--metrics-only] [--analysis-batches N]
                             [--top K] [--work-dir DIR] [--verbose] [--cfg-options k=v ...]

The model of CONFIG is loaded from CHECKPOINT (strictly), fused (the stock network) and exported
as tools/export_onnx.py does (input: the data preprocessor's output; a classifier end to end, a
detector or segmentor as backbone + neck). N batches of the config's training data, through its
own pipeline and data preprocessor, calibrate onnxruntime's static quantization (QDQ, per-channel
symmetric int8 weights, int8 activations); OUTPUT.onnx is written atomically. Then one pass over
the config's test set, batch by batch, scores the fused model in FP32 (PyTorch) and in INT8
(onnxruntime; for a detector or segmentor the INT8 backbone + neck feed the PyTorch heads) with
the config's evaluator, and sums the output SQNR (INT8 against FP32): memory holds one batch and
what the evaluators keep, whatever the size of the test set. Unless --metrics-only, the first
--analysis-batches test batches (default 2) then tell the output SQNR with the weights only and
the activations only quantized, the layers whose quantization costs most (output SQNR with that
layer alone quantized), the fused kernels with the largest per-channel crest factors and the
activations whose own int8 rounding costs most. Progress bars on stderr, one summary at the end
(--verbose: the runner's log lines, one per batch, instead of the bars). Errors, bad arguments
included: one line on stderr, exit status 1; nothing but OUTPUT (and --out) is written, runner
logs aside (work dir).
"""
import ctypes
import itertools
import json
import os.path as osp
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402
from mmengine.logging import print_log  # noqa: E402
from mmengine.utils import ProgressBar  # noqa: E402

from mmorepa import quantization as Q  # noqa: E402
from mmorepa.cli import (ArgumentParser, ToolError, build_runner, load_config,  # noqa: E402
                         run_tool, runner_model)
from mmorepa.deploy import check_input_shape  # noqa: E402
from mmorepa.export import export, is_classifier  # noqa: E402
from mmorepa.fileio import atomic_write, check_input_file, check_output_file  # noqa: E402


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
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
    parser.add_argument('--analysis-batches', type=int, default=2,
                        help='test batches the per-side and per-layer analysis runs on '
                             '(default 2)')
    parser.add_argument('--top', type=int, default=5, help='how many layers to list (default 5)')
    parser.add_argument('--work-dir', help='where the runner writes its logs')
    parser.add_argument('--verbose', action='store_true',
                        help='the runner\'s log lines (config, one per batch) instead of '
                             'progress bars')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value')
    return parser.parse_args(argv)


def check_args(args):
    """The checkpoint and output paths, checked before any work (one-line errors)."""
    check_input_file(args.config, 'config')
    checkpoint = check_input_file(args.checkpoint, 'checkpoint')
    output = check_output_file(args.output, (args.config, checkpoint))
    if args.out:
        check_output_file(args.out, (args.config, checkpoint), '--out file')
        if Path(args.out).resolve() == output.resolve():
            raise ToolError(f'--out {args.out} is the INT8 output file')
    for name in ('calib_batches', 'analysis_batches', 'top'):
        if getattr(args, name) < 1:
            raise ToolError(f'--{name.replace("_", "-")} must be a positive int, got '
                            f'{getattr(args, name)}')
    if args.input_shape:
        check_input_shape(args.input_shape)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ToolError('quantization needs onnxruntime: pip install onnxruntime') from None
    return checkpoint, output


def fused_model_runner(args, checkpoint):
    """The config, its Runner and the Runner's model loaded from ``checkpoint`` and fused (in
    eval mode). Without --verbose the Runner's logger shows warnings and errors only."""
    cfg = load_config(args.config, 'none', args.cfg_options, args.work_dir)
    if not args.verbose:
        cfg.log_level = 'WARNING'
    runner = build_runner(cfg, checkpoint, fuse=True)
    return cfg, runner, runner_model(runner).eval()


def progress(items, total: int, what: str, verbose: bool):
    """``items`` one by one, with mmengine's progress bar on stderr, or (``verbose``) a log line
    per item."""
    if not verbose:
        sys.stderr.write(f'{what}:\n')
    bar = None if verbose else ProgressBar(total, file=sys.stderr)
    for i, item in enumerate(items, 1):
        yield item
        if bar is not None:
            bar.update()
        else:
            print_log(f'{what} [{i}/{total}]', logger='current')
    if bar is not None:
        sys.stderr.write('\n')


def calibration_inputs(model, loader, batches: int, counts: list):
    """The data preprocessor's output (float32 NCHW arrays) for the first ``batches`` batches of
    ``loader``, produced one at a time; ``counts`` gets each batch's image count."""
    with torch.no_grad():
        for data in itertools.islice(loader, batches):
            x = model.data_preprocessor(data, False)['inputs'].detach().cpu().float().numpy()
            counts.append(len(x))
            yield x


def calibrate(args, cfg, runner, model, checkpoint, output):
    """Export the fused model, calibrate on ``--calib-batches`` training batches and write the
    INT8 file ``output``. Returns the float model that was quantized, the INT8 model (both
    ``onnx.ModelProto``), the FP32 export's onnxruntime error and the calibration summary."""
    import onnx
    loader = runner.build_dataloader(cfg.train_dataloader, seed=0)
    batches = min(args.calib_batches, len(loader))
    counts = []
    inputs = progress(calibration_inputs(model, loader, batches, counts), batches,
                      'calibration', args.verbose)
    first = next(inputs)
    shape = tuple(args.input_shape or (1, ) + first.shape[1:])
    with tempfile.TemporaryDirectory(prefix='mmorepa-quantize-') as tmp:
        fp32_path, export_err = export(args.config, checkpoint, Path(tmp) / 'fp32.onnx', shape,
                                       cfg_options=args.cfg_options)
        fp32 = Q.quantize_int8(fp32_path, output, itertools.chain([first], inputs),
                               args.calib_method)
    del first
    calibration = dict(method=args.calib_method, batches=len(counts), images=sum(counts))
    return fp32, onnx.load(str(output)), export_err, calibration


def evaluate(args, cfg, runner, model, output, fp32, qdq):
    """One pass over the test set: each side's metrics, the output SQNR, the preprocessed inputs
    of the first ``--analysis-batches`` batches (none with --metrics-only) and the number of
    test images."""
    import onnxruntime as ort
    loader = runner.build_dataloader(cfg.test_dataloader)
    evaluators = {side: runner.build_evaluator(cfg.test_evaluator) for side in ('fp32', 'int8')}
    for evaluator in evaluators.values():
        evaluator.dataset_meta = getattr(loader.dataset, 'metainfo', None)
    comparison = Q.Int8Comparison(
        model, ort.InferenceSession(str(output), providers=['CPUExecutionProvider']),
        is_classifier(model), evaluators, Q.OnnxGraph(fp32), Q.OnnxGraph(qdq))
    batches = progress(loader, len(loader), 'FP32 and INT8 on the test set', args.verbose)
    size = len(loader.dataset)
    metrics, sqnr, sample = Q.compare_on_batches(
        comparison, batches, size, 0 if args.metrics_only else args.analysis_batches)
    return metrics, sqnr, sample, size


def analyse(model, fp32, qdq, sample) -> dict:
    """The per-side and per-layer analysis on ``sample`` (a few preprocessed test batches)."""
    reference = Q.run_onnx(fp32, sample)
    return dict(
        analysis=dict(batches=len(sample), images=sum(len(x) for x in sample)),
        sqnr_db_by_side={side: Q.sqnr_db(reference, Q.run_onnx(m, sample))
                         for side, m in Q.variants_by_side(qdq, fp32).items()},
        layers=Q.layer_costs(qdq, fp32, sample, reference),
        activations=Q.activation_stats(qdq, fp32, sample), kernels=Q.weight_stats(model))


def print_summary(result, output, n_quant, export_err, ort_version, top):
    calib = result['calibration']
    print(f'wrote {output} (QDQ, {n_quant} QuantizeLinear nodes; calibrated by '
          f'{calib["method"]} on {calib["batches"]} training batches, {calib["images"]} images)')
    print(f'FP32 export (tools/export_onnx.py): onnxruntime vs PyTorch (fused) relative error '
          f'{export_err:.3e}')
    if calib['method'] == 'entropy':
        print(f'note: onnxruntime {ort_version}\'s quantize_static runs its entropy calibrator '
              'with 128 histogram bins into 128 quantized bins: the only candidate threshold is '
              'the full range, i.e. the scales of minmax')
    print(f'\n{"metric":<24}{"FP32":>10}{"INT8":>10}')
    for key, value in result['metrics']['fp32'].items():
        print(f'{key:<24}{value:>10.4f}{result["metrics"]["int8"][key]:>10.4f}')
    print(f'\noutput SQNR, INT8 vs FP32: {result["sqnr_db"]:.1f} dB '
          f'({result["images"]} test images)')
    if 'layers' in result:
        print_analysis(result, top)


def print_analysis(result, top):
    sides = ', '.join(f'{k} {v:.1f} dB' for k, v in result['sqnr_db_by_side'].items())
    print(f'\nanalysis on the first {result["analysis"]["images"]} test images '
          f'(--analysis-batches {result["analysis"]["batches"]})')
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


def fix_mmap_threshold(size: int = 128 * 1024) -> None:
    """Blocks of ``size`` bytes and more come from ``mmap`` and go back to the system when freed.
    glibc's default raises that threshold each time such a block is freed; the test loop's
    tensors, of many sizes, then fragment the heap, and the resident memory grew by about
    4 MiB with every batch (16 images of 256 px), without bound. Nothing to do where the C
    library has no ``mallopt``."""
    mallopt = getattr(ctypes.CDLL(None), 'mallopt', None)
    if mallopt is not None:
        mallopt(-3, size)  # M_MMAP_THRESHOLD


def main(argv=None):
    args = parse_args(argv)
    fix_mmap_threshold()
    checkpoint, output = check_args(args)
    cfg, runner, model = fused_model_runner(args, checkpoint)
    fp32, qdq, export_err, calibration = calibrate(args, cfg, runner, model, checkpoint, output)
    metrics, sqnr, sample, images = evaluate(args, cfg, runner, model, output, fp32, qdq)
    import onnxruntime as ort
    result = dict(metrics=metrics, sqnr_db=sqnr, calibration=calibration, images=images)
    if not args.metrics_only:
        result.update(analyse(model, fp32, qdq, sample))
    n_quant = sum(n.op_type == 'QuantizeLinear' for n in qdq.graph.node)
    print_summary(result, output, n_quant, export_err, ort.__version__, args.top)
    if args.out:
        atomic_write(args.out, lambda p: Path(p).write_text(json.dumps(result, indent=1)))
    return result


if __name__ == '__main__':
    run_tool(main)
