"""The OREPA-ResNet inside the toolboxes' own downstream networks: ImageNet checkpoints seed the
detectors and segmentors key for key, an mmdet DCN detector deploys into stock mmdet, and
mmpretrain's own re-parameterization tool handles this project's classifiers."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope, init_default_scope

import mmorepa
from mmorepa.config import build_model

from helpers import LogRecords, randomize_network_, rel_err
from test_toolbox_models import _det_data

ROOT = Path(__file__).resolve().parents[1]
DOWNSTREAM = ['configs/faster_rcnn_orepa_r50_1x_coco.py', 'configs/retinanet_orepa_r50_1x_coco.py',
              'configs/pspnet_orepa_r50-d8_40k_cityscapes.py',
              'configs/deeplabv3plus_orepa_r50-d8_40k_cityscapes.py']


@pytest.fixture(scope='module')
def imagenet_checkpoint(tmp_path_factory):
    """A checkpoint of configs/imagenet/orepa-resnet50 (random weights, non-trivial BN)."""
    cfg = Config.fromfile(str(ROOT / 'configs/imagenet/orepa-resnet50_4xb64-120e_in1k.py'))
    torch.manual_seed(0)
    model = randomize_network_(build_model(cfg))
    path = tmp_path_factory.mktemp('in1k') / 'orepa-resnet50_in1k.pth'
    torch.save(dict(state_dict=model.state_dict(), meta=dict()), path)
    return path, {k[len('backbone.'):]: v for k, v in model.state_dict().items()
                  if k.startswith('backbone.')}


@pytest.mark.parametrize('config', DOWNSTREAM)
def test_imagenet_checkpoint_seeds_downstream_backbones_key_for_key(config, imagenet_checkpoint):
    path, backbone_sd = imagenet_checkpoint
    cfg = Config.fromfile(str(ROOT / config))
    init_default_scope(cfg.default_scope)
    importlib.import_module(f'{cfg.default_scope}.models')
    from mmengine.registry import MODELS
    backbone = MODELS.build(dict(cfg.model.backbone,
                                 init_cfg=dict(cfg.model.backbone.init_cfg, checkpoint=str(path))))
    with LogRecords() as records:
        backbone.init_weights()
    assert any(f'load backbone. in model from: {path}' in m for m in records.messages)
    assert not any('do not match exactly' in m or 'missing keys' in m for m in records.messages)
    # every tensor of the backbone came from the checkpoint, and nothing else is in it
    own = backbone.state_dict()
    assert set(own) == set(backbone_sd)
    assert all(torch.equal(own[k], backbone_sd[k]) for k in own)


def test_dcn_detector_deploys_into_stock_mmdet(tmp_path):
    """Builds, trains one step, fuses with tools/deploy_convert.py; stock mmdet, without mmorepa,
    loads the result strictly and its features equal the float64 un-fused reference."""
    from mmcv.ops import DeformConv2dPack
    torch.manual_seed(0)
    cfg = Config.fromfile(str(ROOT / 'configs/faster_rcnn_orepa_r50-dconv-c3-c5_1x_coco.py'))
    cfg.merge_from_dict(dict(model=dict(
        backbone=dict(base_channels=16, init_cfg=None),
        neck=dict(in_channels=[64, 128, 256, 512]))))
    small = tmp_path / 'small_dcn.py'
    cfg.dump(str(small))
    model = randomize_network_(build_model(cfg))
    dcns = [m for m in model.modules() if isinstance(m, DeformConv2dPack)]
    assert len(dcns) == 13  # stages c3-c5 of ResNet-50: 4 + 6 + 3 blocks
    with torch.no_grad():
        for m in dcns:  # offsets that move: a non-trivial deformable conv
            m.conv_offset.weight.normal_(0, 0.01)
    from mmengine.optim import build_optim_wrapper
    wrapper = build_optim_wrapper(model, dict(optimizer=dict(type='SGD', lr=1e-3)))
    model.train()
    model.train_step(_det_data(), wrapper)
    ckpt = tmp_path / 'trained.pth'
    torch.save(dict(state_dict=model.state_dict(), meta=dict()), ckpt)
    out = tmp_path / 'deploy' / 'fused.pth'
    proc = subprocess.run([sys.executable, str(ROOT / 'tools/deploy_convert.py'), str(small),
                           str(ckpt), str(out), '--input-shape', '1', '3', '96', '96'],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    x = torch.randn(1, 3, 96, 96)  # the DCN of stage c5 needs maps at least as large as its kernel
    torch.save(x, tmp_path / 'x.pth')
    script = f'''
import sys, torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
cfg = Config.fromfile({str(out.with_suffix('.py'))!r})
assert 'mmorepa' not in str(cfg.get('custom_imports')), cfg.get('custom_imports')
init_default_scope('mmdet')
import mmdet.models
from mmdet.registry import MODELS
from mmcv.ops import DeformConv2dPack
model = MODELS.build(cfg.model)
sd = torch.load({str(out)!r}, map_location='cpu', weights_only=True)['state_dict']
model.load_state_dict(sd, strict=True)
assert 'mmorepa' not in sys.modules
assert sum(isinstance(m, DeformConv2dPack) for m in model.modules()) == 13
model.eval()
with torch.no_grad():
    feats = model.extract_feat(torch.load({str(tmp_path / 'x.pth')!r}))
torch.save(torch.cat([f.flatten() for f in feats]), {str(tmp_path / 'feats.pth')!r})
'''
    proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    stock_feats = torch.load(tmp_path / 'feats.pth', weights_only=True)
    reference = model.double().eval()
    with torch.no_grad(), mmorepa.unfused_eval(reference):
        ref = torch.cat([f.flatten() for f in reference.extract_feat(x.double())])
    assert rel_err(stock_feats, ref) <= 1e-5


def _mmpretrain_reparameterize_tool():
    import mmpretrain
    path = Path(mmpretrain.__file__).parent / '.mim/tools/model_converters/reparameterize_model.py'
    spec = importlib.util.spec_from_file_location('reparameterize_model', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CLASSIFIERS = ['imagenet/orepa-resnet18_4xb64-120e_in1k.py', 'imagenet/dbb-resnet18_4xb64-120e_in1k.py',
               'imagenet/orepavgg-A0_4xb64-120e_in1k.py', 'imagenet/repvgg-A0_4xb64-120e_in1k.py',
               'imagenet/orepa-resnext50-32x4d_4xb64-120e_in1k.py',
               'imagenet/ablations/orepa-resnet50_no-rep1x1.py', 'demo/orepa_r18_shapes_cls.py']


@pytest.mark.parametrize('config', CLASSIFIERS)
def test_mmpretrain_reparameterize_model_tool(config, tmp_path):
    """mmpretrain's tools/model_converters/reparameterize_model.py, then the config with
    ``model.backbone.deploy=True`` loads its output (mmpretrain's convention)."""
    torch.manual_seed(1)
    cfg = Config.fromfile(str(ROOT / 'configs' / config))
    model = randomize_network_(build_model(cfg)).eval()
    ckpt = tmp_path / 'trained.pth'
    torch.save(dict(state_dict=model.state_dict(), meta=dict(epoch=3)), ckpt)
    tool = _mmpretrain_reparameterize_tool()
    from mmpretrain.apis import init_model
    loaded = init_model(str(ROOT / 'configs' / config), checkpoint=str(ckpt), device='cpu')
    checkpoint = torch.load(ckpt)  # as the tool does: torch's default, weights_only=True
    out = tmp_path / 'deploy.pth'
    tool.convert_classifier_to_deploy(loaded, checkpoint, str(out))
    cfg.merge_from_dict({'model.backbone.deploy': True})
    deployed = build_model(cfg).eval()
    deployed.load_state_dict(torch.load(out, weights_only=True)['state_dict'], strict=True)
    x = torch.randint(0, 255, (2, 3, 64, 64)).float()
    with torch.no_grad():
        assert rel_err(deployed(x, mode='tensor'), model(x, mode='tensor')) <= 1e-5


def teardown_module():
    DefaultScope._instance_dict.clear()
