"""Convert a checkpoint of the paper's official OREPA code for mmpretrain + mmorepa.

    python tools/convert_official_checkpoint.py SRC DST

DST loads with ``strict=True`` into an mmpretrain ``ImageClassifier`` with ``OREPAResNet``
(GlobalAveragePooling neck, LinearClsHead); the matching model config is printed. The backbone
part (``backbone.*``) serves as ``init_cfg=dict(type='Pretrained', prefix='backbone.', ...)`` for
detection and segmentation. Never overwrites SRC; DST is written atomically, with the permissions
the umask gives. An expected failure is one line on stderr and exit status 1.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import torch  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

from mmorepa.checkpoint import check_state_dict_fits, read_state_dict  # noqa: E402
from mmorepa.cli import ArgumentParser, run_tool  # noqa: E402
from mmorepa.fileio import atomic_write, check_input_file, check_output_file  # noqa: E402
from mmorepa.official import convert_state_dict, model_cfg  # noqa: E402


def convert(src, dst):
    src = check_input_file(src, 'checkpoint')
    dst = check_output_file(dst, (src, ))
    state_dict, arch = convert_state_dict(read_state_dict(src))
    cfg = model_cfg(arch)
    init_default_scope('mmpretrain')
    from mmpretrain.registry import MODELS
    model = MODELS.build(cfg)
    check_state_dict_fits(model, state_dict, 'the converted checkpoint')
    model.load_state_dict(state_dict, strict=True)
    meta = dict(converted_from=str(src), architecture=arch, model=cfg)
    atomic_write(dst, lambda p: torch.save(dict(state_dict=state_dict, meta=meta), p))
    return dst, cfg


def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', help='checkpoint of the official code')
    parser.add_argument('dst', help='converted checkpoint to write')
    args = parser.parse_args(argv)
    dst, cfg = convert(args.src, args.dst)
    print(f'wrote {dst}')
    print(f'model = {cfg}')
    return dst, cfg


if __name__ == '__main__':
    run_tool(main)
