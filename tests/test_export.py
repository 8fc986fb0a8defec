"""ONNX export (``tools/export_onnx.py``, ``mmorepa.export``): dynamic batch and image size
checked with onnxruntime at shapes other than the export shape, against an independent reference
(the un-fused model on feature maps); a static shape stays static."""
import pytest
import torch

import mmorepa
from helpers import CLS_CFG, rel_err, run_python
from mmorepa.config import build_model, read_config


def test_onnx_dynamic_axes_at_two_shapes(tmp_path, cls_ckpt):
    ort = pytest.importorskip('onnxruntime')
    out = tmp_path / 'cls.onnx'
    proc = run_python(['tools/export_onnx.py', CLS_CFG, cls_ckpt, out, '--input-shape', '1', '3',
                       '64', '64'], umask=0o022)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'onnxruntime at 1x3x64x64, 2x3x96x96' in proc.stdout
    assert out.stat().st_mode & 0o777 == 0o644
    # an independent reference: the un-fused model of the config, loaded from the checkpoint
    model = build_model(read_config(CLS_CFG))
    model.load_state_dict(torch.load(cls_ckpt, weights_only=True)['state_dict'])
    model.eval()
    session = ort.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    g = torch.Generator().manual_seed(1)
    for shape in [(3, 3, 48, 48), (2, 3, 80, 112)]:  # neither is the export shape
        x = torch.randn(*shape, generator=g)
        with torch.no_grad(), mmorepa.unfused_eval(model):
            ref = model(x, mode='tensor')
        got = torch.from_numpy(session.run(None, {'input': x.numpy()})[0])
        assert got.shape == ref.shape == (shape[0], 3)
        assert rel_err(got, ref) <= 1e-5


def test_onnx_static_shape_refuses_another_batch(tmp_path, cls_ckpt):
    ort = pytest.importorskip('onnxruntime')
    out = tmp_path / 'static.onnx'
    proc = run_python(['tools/export_onnx.py', CLS_CFG, cls_ckpt, out, '--static-shape',
                       '--input-shape', '1', '3', '32', '32'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    session = ort.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    with pytest.raises(Exception, match='(?i)dimension|shape'):
        session.run(None, {'input': torch.zeros(2, 3, 32, 32).numpy()})
