"""The main job: the whole OREPA pipeline on data it generates, on the CPU, in a few minutes.

    python tools/demo.py [--quick] [--work-dir work_dirs/demo] [--data-root data/shapes]

The paper's pipeline on the generated shapes data set, with one OREPA-ResNet-18
(configs/demo/_base_/orepa_r18.py): the classifier trains it first; detection (Faster R-CNN) and
segmentation (PSPNet, D8) then start from the classifier's checkpoint (``init_cfg=Pretrained``,
``prefix='backbone.'``), and the job checks in their logs that every backbone weight loaded.
Each task: train (tools/train.py) -> evaluate -> fuse (tools/deploy_convert.py: the stock
backbone, no mmorepa needed) -> evaluate the fused model (tools/test.py with the deploy config)
-> quantize it to INT8 and evaluate that (tools/quantize.py), then a table of the metrics before
and after fusion and in INT8. ``--quick`` runs a few iterations only (CI).
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmorepa.cli import ArgumentParser, ToolError, run_tool  # noqa: E402
from mmorepa.fileio import atomic_write  # noqa: E402

TASKS = [
    dict(name='classification', config='configs/demo/orepa_r18_shapes_cls.py',
         model='OREPA-R18 classifier', metric='accuracy/top1', label='top-1 (%)',
         # percentile calibration: the smaller top-1 change in INT8 (docs/int8.md, "Measured
         # on the demo classifier")
         quantize=['--calib-method', 'percentile'],
         quick=['train_cfg.max_epochs=1', 'train_cfg.val_interval=1',
                'train_dataloader.dataset.indices=64']),
    dict(name='detection', config='configs/demo/faster_rcnn_orepa_r18_shapes.py',
         model='Faster R-CNN, OREPA-R18', metric='coco/bbox_mAP', label='bbox mAP',
         quick=['train_cfg.max_epochs=1', 'train_cfg.val_interval=1',
                'train_dataloader.dataset.indices=16', 'val_dataloader.dataset.indices=8']),
    dict(name='segmentation', config='configs/demo/pspnet_orepa_r18_shapes.py',
         model='PSPNet, OREPA-R18-D8', metric='mIoU', label='mIoU (%)',
         quick=['train_cfg.max_iters=4', 'train_cfg.val_interval=4',
                'default_hooks.checkpoint.interval=4', 'val_dataloader.dataset.indices=8']),
]
PROGRESS = re.compile(r'(Epoch|Iter)\(\w+\)|relative error|Error|error:|load backbone')


def run(cmd, log_path, prefix):
    """Run a tool, streaming its progress lines, keeping its whole output in ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, 'w') as log:
        proc = subprocess.Popen([sys.executable] + cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        lines = []
        for line in proc.stdout:
            log.write(line)
            lines.append(line)
            if PROGRESS.search(line):
                text = re.sub(r'^\S+ \S+ - mmengine - \w+ - ', '', line.rstrip())
                print(f'  [{prefix}] {text[:150]}', flush=True)
        proc.wait()
    if proc.returncode:
        tail = ''.join(lines[-15:])
        raise SystemExit(f'{" ".join(cmd[:2])} failed (exit {proc.returncode}); log: '
                         f'{log_path}\n{tail}')
    return ''.join(lines)


def check_backbone_loaded(log: str, checkpoint: str, name: str) -> str:
    """The training log of a task started from ``checkpoint`` must show the backbone loaded from it
    with no missing or unexpected key (mmengine reports any mismatch in the log)."""
    if f'load backbone. in model from: {checkpoint}' not in log:
        raise ToolError(f'{name}: the log does not show the backbone loaded from {checkpoint}')
    if 'do not match exactly' in log:
        detail = log[log.index('do not match exactly'):][:500]
        detail = ' '.join(detail.split())
        raise ToolError(f'{name}: the backbone checkpoint {checkpoint} did not fit: {detail}')
    import torch
    keys = [k for k in torch.load(ROOT / checkpoint, map_location='cpu', weights_only=True)[
        'state_dict'] if k.startswith('backbone.')]
    return (f'backbone <- {checkpoint} ({len(keys)} backbone tensors): mmengine reports no '
            'missing or unexpected key')


def run_task(task, work_dir: Path, data_root: str, quick: bool, backbone_ckpt=None):
    name = task['name']
    wd = work_dir / name
    opts = [f"train_dataloader.dataset.data_root={data_root}/{_sub(name)}",
            f"val_dataloader.dataset.data_root={data_root}/{_sub(name)}",
            f"test_dataloader.dataset.data_root={data_root}/{_sub(name)}"]
    if name == 'detection':
        opts += [f'val_evaluator.ann_file={data_root}/det/annotations/val.json',
                 f'test_evaluator.ann_file={data_root}/det/annotations/val.json']
    if quick:
        opts += task['quick']
    if backbone_ckpt is not None:
        opts.append(f'model.backbone.init_cfg.checkpoint={backbone_ckpt}')
    cfg_opts = ['--cfg-options'] + opts
    start = f' from {backbone_ckpt}' if backbone_ckpt else ''
    print(f'== {name}: train {task["model"]}{start}', flush=True)
    t0 = time.time()
    log = run(['tools/train.py', task['config'], '--work-dir', str(wd / 'train')] + cfg_opts,
              wd / 'train.log', name)
    train_s = time.time() - t0
    if backbone_ckpt is not None:
        print(f'== {name}: {check_backbone_loaded(log, backbone_ckpt, name)}', flush=True)
    ckpt = (wd / 'train' / 'last_checkpoint').read_text().strip()
    print(f'== {name}: evaluate the trained (un-fused) model', flush=True)
    run(['tools/test.py', task['config'], ckpt, '--work-dir', str(wd / 'test'),
         '--out', str(wd / 'metrics_unfused.json')] + cfg_opts, wd / 'test.log', name)
    print(f'== {name}: fuse into the stock backbone', flush=True)
    out = run(['tools/deploy_convert.py', task['config'], ckpt, str(wd / 'deploy' / 'fused.pth'),
               '--out-config', str(wd / 'deploy' / 'fused.py'),  # ours: replaced on reruns
               '--input-shape', '2', '3', '64', '64'] + cfg_opts, wd / 'convert.log', name)
    err = float(re.search(r'relative error: (\S+)', out).group(1))
    print(f'== {name}: evaluate the fused model with its deploy config', flush=True)
    run(['tools/test.py', str(wd / 'deploy' / 'fused.py'), str(wd / 'deploy' / 'fused.pth'),
         '--work-dir', str(wd / 'test_fused'), '--out', str(wd / 'metrics_fused.json')] +
        cfg_opts, wd / 'test_fused.log', name)
    print(f'== {name}: quantize the fused model to INT8 (tools/quantize.py)', flush=True)
    run(['tools/quantize.py', task['config'], ckpt, str(wd / 'deploy' / 'int8.onnx'),
         '--metrics-only', '--calib-batches', '1' if quick else '4', '--work-dir',
         str(wd / 'quantize'), '--out', str(wd / 'metrics_int8.json')] +
        task.get('quantize', []) + cfg_opts, wd / 'quantize.log', name)
    int8 = json.loads((wd / 'metrics_int8.json').read_text())
    before = json.loads((wd / 'metrics_unfused.json').read_text())[task['metric']]
    after = json.loads((wd / 'metrics_fused.json').read_text())[task['metric']]
    return dict(task=name, model=task['model'], label=task['label'], before=before, after=after,
                err=err, train_s=train_s, checkpoint=ckpt, sqnr=int8['sqnr_db'],
                int8=int8['metrics']['int8'][task['metric']])


def _sub(task_name):
    return {'classification': 'cls', 'detection': 'det', 'segmentation': 'seg'}[task_name]


def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='a few iterations only (CI)')
    parser.add_argument('--work-dir', default='work_dirs/demo')
    parser.add_argument('--data-root', default='data/shapes')
    parser.add_argument('--tasks', nargs='+', default=[t['name'] for t in TASKS],
                        choices=[t['name'] for t in TASKS])
    args = parser.parse_args(argv)
    from mmorepa.datasets import make_shapes_dataset
    t0 = time.time()
    # 960 validation images: one image is 0.1 point of top-1, so a metric's change after fusion or
    # in INT8 is measured to well under the 1-point / 2% the project holds it to
    n_train, n_val = (96, 24) if args.quick else (960, 960)
    print(f'== data: generating shapes under {args.data_root} ({n_train} train / {n_val} val '
          'images per task)', flush=True)
    make_shapes_dataset(ROOT / args.data_root, num_train=n_train, num_val=n_val)
    rows, backbone_ckpt = [], None
    previous = ROOT / args.work_dir / 'classification' / 'train' / 'last_checkpoint'
    if 'classification' not in args.tasks:
        if not previous.is_file():
            raise ToolError(f'detection and segmentation start from the classifier: run the '
                            f'classification task first (no {previous})')
        backbone_ckpt = os.path.relpath(previous.read_text().strip(), ROOT)
    for t in TASKS:  # classification first: its checkpoint starts the other two
        if t['name'] in args.tasks:
            rows.append(run_task(t, ROOT / args.work_dir, args.data_root, args.quick,
                                 backbone_ckpt))
            if t['name'] == 'classification':
                backbone_ckpt = os.path.relpath(rows[-1]['checkpoint'], ROOT)
    print()
    print(f'{"task":<15}{"model":<27}{"metric":<11}{"un-fused":>9}{"fused":>9}'
          f'{"feat. rel. err":>16}{"INT8":>9}{"SQNR dB":>9}{"train s":>9}')
    ok = True
    for r in rows:
        same = abs(r['before'] - r['after']) <= 1e-6 * max(1.0, abs(r['before']))
        ok &= same
        print(f'{r["task"]:<15}{r["model"]:<27}{r["label"]:<11}{r["before"]:>9.4f}'
              f'{r["after"]:>9.4f}{r["err"]:>16.2e}{r["int8"]:>9.4f}{r["sqnr"]:>9.1f}'
              f'{r["train_s"]:>9.0f}'
              f'{"" if same else "   <- differs"}')
    print(f'\nfused models: stock backbones (deploy configs under {args.work_dir}/*/deploy/); '
          f'total {time.time() - t0:.0f} s')
    text = json.dumps(rows, indent=1)
    atomic_write(ROOT / args.work_dir / 'summary.json', lambda path: Path(path).write_text(text))
    if not ok:
        raise ToolError('a fused model scored differently from its un-fused original')
    return rows


if __name__ == '__main__':
    run_tool(main)
