"""Branch analysis of a trained OREPA model (paper Fig. 7, supp Fig. 2 and Fig. 3).

    python tools/analysis/branch_similarity.py CONFIG CHECKPOINT [--out-dir DIR]
        [--layers SUBSTRING ...] [--unscaled]

For every OREPA layer (3x3 OREPA convs, Rep-1x1, the deep-stem generators): the cosine similarity
between the kernels its branches contribute (each branch's kernel times its scaling vector, as
squeezed; ``--unscaled`` for the raw branch kernels) as a PNG heatmap, and the per-output-channel
L1 norms of each branch, normalized and sorted (supp Fig. 3) as a PNG plot. A JSON summary goes
beside them. Never writes over its inputs.
"""
import argparse
import json
import os.path as osp
import sys
from pathlib import Path

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import torch  # noqa: E402

from mmorepa.checkpoint import load_checkpoint_strict  # noqa: E402
from mmorepa.config import build_model  # noqa: E402
from mmorepa.errors import CheckpointError  # noqa: E402
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


def save_plots(results, out_dir: Path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name, r in results.items():
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
        fig.savefig(out_dir / f'{name}_cosine.png', dpi=100)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(6, 4))
        for b, v in r['norms'].items():
            ax.plot(v.numpy(), label=b)
        ax.set_xlabel('output channel (sorted)')
        ax.set_ylabel('normalized L1 norm')
        ax.set_title(f'{name}: branch norms per channel')
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / f'{name}_norms.png', dpi=100)
        plt.close(fig)
        summary[name] = dict(branches=r['branches'], cosine=r['cosine'].tolist(),
                             mean_norm={b: float(v.mean()) for b, v in r['norms'].items()})
    (out_dir / 'summary.json').write_text(json.dumps(summary, indent=1))
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('--out-dir', default=None, help='default: beside the checkpoint')
    parser.add_argument('--layers', nargs='+', help='only layers whose name contains one of these')
    parser.add_argument('--unscaled', action='store_true', help='raw branch kernels')
    args = parser.parse_args(argv)
    from mmengine.config import Config
    if not osp.isfile(args.config):
        raise SystemExit(f'branch_similarity: config not found: {args.config}')
    out_dir = Path(args.out_dir or Path(args.checkpoint).with_suffix('')
                   .with_name(Path(args.checkpoint).stem + '_branches'))
    model = build_model(Config.fromfile(args.config))
    try:
        load_checkpoint_strict(model, args.checkpoint)
    except (FileNotFoundError, CheckpointError) as e:
        raise SystemExit(f'branch_similarity: {e}')
    results = analyse(model, args.layers, scaled=not args.unscaled)
    if not results:
        raise SystemExit('branch_similarity: the model has no multi-branch OREPA layer')
    summary = save_plots(results, out_dir)
    print(f'{len(summary)} layers -> {out_dir}')
    return out_dir, summary


if __name__ == '__main__':
    main()
