"""Each toolbox's models built from this project's configs (``custom_imports``), shrunk to CPU
size: a training step, a prediction, and the fused model loaded into the stock deploy config."""
import copy
import math

import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.structures import PixelData

import mmorepa
from mmorepa.config import build_model
from mmorepa.deploy import deploy_config

from helpers import randomize_network_, rel_err

SMALL_BACKBONE = dict(base_channels=16, init_cfg=None)  # real depth: stock ResNets fit
SIZE = 64


def _shrink(path, **model_overrides):
    cfg = Config.fromfile(path)
    backbone = dict(cfg.model.backbone, **SMALL_BACKBONE)
    if cfg.model.backbone.type == 'OREPAVGG':
        backbone = dict(cfg.model.backbone, arch=dict(
            num_blocks=[1, 1, 1, 1], width_factor=[0.25] * 4, group_layer_map=None,
            se_cfg=None))
    cfg.model.backbone = backbone
    cfg.merge_from_dict(dict(model=model_overrides))
    return cfg


def _cls_data():
    from mmpretrain.structures import DataSample
    inputs = [torch.randint(0, 255, (3, SIZE, SIZE), dtype=torch.uint8) for _ in range(2)]
    samples = [DataSample().set_gt_label(i) for i in (1, 3)]
    return dict(inputs=inputs, data_samples=samples)


def _det_data():
    from mmdet.testing import demo_mm_inputs
    return demo_mm_inputs(batch_size=2, image_shapes=[(3, SIZE * 2, SIZE * 2)] * 2,
                          num_items=[3, 2], num_classes=80, with_mask=False)


def _seg_data():
    from mmseg.structures import SegDataSample
    inputs, samples = [], []
    for _ in range(2):
        inputs.append(torch.randint(0, 255, (3, SIZE, SIZE), dtype=torch.uint8))
        s = SegDataSample(metainfo=dict(img_shape=(SIZE, SIZE), ori_shape=(SIZE, SIZE),
                                        pad_shape=(SIZE, SIZE)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, 19, (1, SIZE, SIZE)))
        samples.append(s)
    return dict(inputs=inputs, data_samples=samples)


SEG_SMALL = dict(data_preprocessor=dict(size=(SIZE, SIZE)),
                 auxiliary_head=dict(in_channels=256, channels=16))
CASES = {
    'imageclassifier': ('configs/imagenet/orepa-resnet18_4xb64-120e_in1k.py',
                        dict(head=dict(in_channels=128)), _cls_data),
    'imageclassifier-orepavgg': ('configs/imagenet/orepavgg-A0_4xb64-120e_in1k.py',
                                 dict(head=dict(in_channels=128)), _cls_data),
    'faster-rcnn': ('configs/faster_rcnn_orepa_r50_1x_coco.py',
                    dict(neck=dict(in_channels=[64, 128, 256, 512])), _det_data),
    'retinanet': ('configs/retinanet_orepa_r50_1x_coco.py',
                  dict(neck=dict(in_channels=[64, 128, 256, 512])), _det_data),
    'retinanet-dbb': ('configs/retinanet_dbb_r50_1x_coco.py',
                      dict(neck=dict(in_channels=[64, 128, 256, 512])), _det_data),
    'pspnet': ('configs/pspnet_orepa_r50-d8_40k_cityscapes.py',
               dict(decode_head=dict(in_channels=512, channels=32), **SEG_SMALL), _seg_data),
    'deeplabv3plus': ('configs/deeplabv3plus_orepa_r50-d8_40k_cityscapes.py',
                      dict(decode_head=dict(in_channels=512, channels=32, c1_in_channels=64,
                                            c1_channels=8), **SEG_SMALL), _seg_data),
}


@pytest.mark.parametrize('name', list(CASES))
def test_train_step_predict_and_deploy(name):
    torch.manual_seed(0)
    path, overrides, make_data = CASES[name]
    cfg = _shrink(path, **overrides)
    assert 'mmorepa' in cfg.custom_imports['imports']
    model = build_model(cfg)
    # the toolbox's own backbone class, with OREPA layers swapped in
    from mmorepa.models.backbones.reparam_backbone import ReparamBackboneMixin
    assert isinstance(model.backbone, ReparamBackboneMixin)
    assert type(model.backbone).__mro__[2].__module__.startswith(cfg.default_scope)
    randomize_network_(model)
    wrapper = build_optim_wrapper(model, copy.deepcopy(cfg.optim_wrapper))
    model.train()
    log_vars = model.train_step(make_data(), wrapper)
    assert log_vars and all(math.isfinite(float(v)) for v in log_vars.values())
    model.eval()
    data = make_data()
    with torch.no_grad():
        preds = model.test_step(data)
    assert len(preds) == 2
    # deploy: the stock-backbone config, no mmorepa layer inside, same features
    fused = mmorepa.reparameterize(model)
    stock = build_model(deploy_config(cfg))
    assert 'mmorepa' not in str(deploy_config(cfg).get('custom_imports', ''))
    assert not any(type(m).__module__.startswith('mmorepa') for m in stock.modules())
    stock.load_state_dict(fused.state_dict(), strict=True)
    stock.eval()
    x = model.data_preprocessor(data, False)['inputs']
    with torch.no_grad():
        ref = torch.cat([f.flatten() for f in model.extract_feat(x)])
        out = torch.cat([f.flatten() for f in stock.extract_feat(x)])
        assert rel_err(out, ref) <= 1e-5
        stock_preds = stock.test_step(make_data())
    assert len(stock_preds) == 2
