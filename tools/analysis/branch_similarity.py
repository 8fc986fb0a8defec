"""Branch analysis of a trained OREPA model (paper Fig. 7, supp Fig. 2 and Fig. 3).

    python tools/analysis/branch_similarity.py CONFIG CHECKPOINT --out-dir DIR
        [--layers SUBSTRING ...] [--unscaled]

For every OREPA layer (3x3 OREPA convs, Rep-1x1, the deep-stem generators): the cosine similarity
between the kernels its branches contribute (each branch's kernel times its scaling vector, as
squeezed; ``--unscaled`` for the raw branch kernels) as a PNG heatmap, and the per-output-channel
L1 norms of each branch, normalized and sorted (supp Fig. 3) as a PNG plot, and a JSON summary,
all in DIR, each file written atomically; nothing else is written, and never an input. Bad input
(a missing or broken config, a checkpoint that does not fit, an output that cannot be written):
one line on stderr, exit status 1.
"""
import json
import os.path as osp
import sys
from pathlib import Path

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import torch  # noqa: E402

from mmorepa.checkpoint import load_checkpoint_strict  # noqa: E402
from mmorepa.cli import ArgumentParser, ToolError, run_tool  # noqa: E402
from mmorepa.config import build_model_of, read_config  # noqa: E402
from mmorepa.fileio import (atomic_write, check_input_file, check_output_dir,  # noqa: E402
                            check_output_file)
from mmorepa.layers import OREPAConv1x1, OREPAConv2d  # noqa: E402


def branch_contributions(layer, scaled: bool = True):
    """``{branch: kernel}`` of one OREPA layer, each scaled by its scaling vector if asked."""
    kernels = layer.branch_kernels()
    if not scaled or layer.scales is None:
        return kernels
    return {b: layer.scales[i].reshape(-1, 1, 1, 1) * k
            for i, (b, k) in enumerate(kernels.items())}


def cosine_matrix(kernels):
    flat = torch.stack([k.reshape(-1) for k in kernels.values()]).double()
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return flat @ flat.T


def sorted_channel_norms(kernels):
    """Per branch, the L1 norm of each output channel's kernel over the largest over all
    branches, sorted in descending order (supp Fig. 3)."""
    norms = {b: k.abs().sum((1, 2, 3)).double() for b, k in kernels.items()}
    top = max(n.max() for n in norms.values()).clamp_min(1e-12)
    return {b: (n / top).sort(descending=True).values for b, n in norms.items()}


def analyse(model, layers=None, scaled=True):
    out = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if not isinstance(m, (OREPAConv2d, OREPAConv1x1)) or len(m.branches) < 2:
                continue
            if layers and not any(s in name for s in layers):
                continue
            kernels = branch_contributions(m, scaled)
            out[name] = dict(branches=list(kernels), cosine=cosine_matrix(kernels),
                             norms=sorted_channel_norms(kernels))
    return out


def _figure_writer(fig):
    """``write(path)`` for :func:`~mmorepa.fileio.atomic_write`: the figure as a PNG."""
    return lambda path: fig.savefig(path, dpi=100, format='png')


def _cosine_figure(plt, name, r):
    n = len(r['branches'])
    fig, ax = plt.subplots(figsize=(1.2 * n + 2, 1.2 * n + 1))
    im = ax.imshow(r['cosine'].numpy(), vmin=-1, vmax=1, cmap='RdBu_r')
    ax.set_xticks(range(n), r['branches'], rotation=45, ha='right')
    ax.set_yticks(range(n), r['branches'])
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f'{r["cosine"][i, j]:.2f}', ha='center', va='center', fontsize=8)
    ax.set_title(f'{name}: branch cosine similarity')
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def _norms_figure(plt, name, r):
    fig, ax = plt.subplots(figsize=(6, 4))
    for b, v in r['norms'].items():
        ax.plot(v.numpy(), label=b)
    ax.set_xlabel('output channel (sorted)')
    ax.set_ylabel('normalized L1 norm')
    ax.set_title(f'{name}: branch norms per channel')
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# the figures of each layer: (kind, builder); the files are out_dir/<layer>_<kind>.png
FIGURES = (('cosine', _cosine_figure), ('norms', _norms_figure))
SUMMARY = 'summary.json'


def _figure_path(out_dir: Path, name: str, kind: str) -> Path:
    return out_dir / f'{name}_{kind}.png'


def output_paths(results, out_dir: Path, inputs):
    """The files the tool writes (the :data:`FIGURES` of each layer and :data:`SUMMARY`), each
    checked before any is written: writable, and none of ``inputs``."""
    paths = [_figure_path(out_dir, name, kind) for name in results for kind, _ in FIGURES]
    paths.append(out_dir / SUMMARY)
    for path in paths:
        check_output_file(path, inputs)
    return paths


def save_plots(results, out_dir: Path):
    """The PNGs and :data:`SUMMARY` of ``results`` in ``out_dir``, each written atomically;
    returns the summary."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    summary = {}
    for name, r in results.items():
        for kind, figure in FIGURES:
            fig = figure(plt, name, r)
            try:
                atomic_write(_figure_path(out_dir, name, kind), _figure_writer(fig))
            finally:
                plt.close(fig)
        summary[name] = dict(branches=r['branches'], cosine=r['cosine'].tolist(),
                             mean_norm={b: float(v.mean()) for b, v in r['norms'].items()})
    text = json.dumps(summary, indent=1)
    atomic_write(out_dir / SUMMARY, lambda path: Path(path).write_text(text))
    return summary


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('--out-dir', required=True,
                        help='the folder to write the plots and summary.json in')
    parser.add_argument('--layers', nargs='+', help='only layers whose name contains one of these')
    parser.add_argument('--unscaled', action='store_true', help='raw branch kernels')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    inputs = (check_input_file(args.config, 'config'),
              check_input_file(args.checkpoint, 'checkpoint'))
    out_dir = check_output_dir(args.out_dir, '--out-dir')
    model = build_model_of(read_config(args.config), args.config)
    load_checkpoint_strict(model, args.checkpoint)
    results = analyse(model, args.layers, scaled=not args.unscaled)
    if not results:
        raise ToolError(f'the model of {args.config} has no multi-branch OREPA layer'
                        + (f' matching --layers {" ".join(args.layers)}' if args.layers else ''))
    output_paths(results, out_dir, inputs)
    summary = save_plots(results, out_dir)
    print(f'{len(summary)} layers -> {out_dir}')
    return out_dir, summary


if __name__ == '__main__':
    run_tool(main)
