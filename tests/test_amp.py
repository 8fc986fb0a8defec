"""Mixed precision on the CPU: OREPA kernels are squeezed in float32 under autocast while the
convolution runs in bfloat16; ``CPUAutocastOptimWrapper``; ``tools/train.py --amp``."""
import json

import pytest
import torch

from helpers import (CLS_CFG, assert_clean_failure, randomize_network_, rel_err, run_python,
                     shapes_train_options)
from mmorepa.amp import CPUAutocastOptimWrapper
from mmorepa.layers import OREPAConv1x1, OREPAConv2d, OREPALargeConv


def _kernel_seen_by_conv(layer, x):
    seen = {}
    conv = layer._conv

    def spy(x, kernel, bias):
        out = conv(x, kernel, bias)
        seen.update(kernel=kernel.detach().clone(), out_dtype=out.dtype)
        return out
    layer._conv = spy
    with torch.autocast('cpu', dtype=torch.bfloat16):
        layer(x)
    del layer._conv
    return seen['kernel'], seen['out_dtype']


@pytest.mark.parametrize('make', [
    lambda: OREPAConv2d(8, 16, 3, norm_cfg=dict(type='BN')),
    lambda: OREPAConv1x1(8, 16, norm_cfg=dict(type='BN')),
    lambda: OREPALargeConv(8, 16, 5, norm_cfg=dict(type='BN')),
    lambda: OREPAConv2d(8, 16, 3, stride=2, groups=2, bias=True, scaling='scalar')])
@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_kernel_is_squeezed_in_float32_under_autocast(make, mode):
    torch.manual_seed(0)
    layer = randomize_network_(make(), torch.Generator().manual_seed(0)).train(mode == 'train')
    x = torch.randn(2, 8, 12, 12)
    kernel, out_dtype = _kernel_seen_by_conv(layer, x)
    with torch.no_grad():  # the same algebra without autocast (float32 throughout)
        ref = (layer.squeezed_kernel_and_bias()[0] if mode == 'train'
               else layer.fused_kernel_and_bias()[0])
    assert kernel.dtype == torch.float32
    assert rel_err(kernel, ref) <= 1e-6  # squeezing in bfloat16 gives about 1e-3
    assert out_dtype == torch.bfloat16  # the final conv does run in low precision


def test_cpu_autocast_optim_wrapper_context():
    model = torch.nn.Linear(4, 4)
    wrapper = CPUAutocastOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with wrapper.optim_context(model):
        assert torch.is_autocast_enabled('cpu')
        assert torch.get_autocast_dtype('cpu') == torch.bfloat16
        assert model(torch.randn(2, 4)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled('cpu')


@pytest.mark.skipif(torch.cuda.is_available(), reason='the CPU path of --amp')
def test_amp_on_the_cpu_trains_in_bfloat16(tmp_path, shapes_data):
    work = tmp_path / 'amp'
    proc = run_python(['tools/train.py', CLS_CFG, '--amp', '--work-dir', work,
                       '--cfg-options'] + shapes_train_options(shapes_data))
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = next(work.glob('*/vis_data/config.py')).read_text()
    assert "type='CPUAutocastOptimWrapper'" in config
    scalars = [json.loads(line) for line in next(work.glob('*/vis_data/scalars.json')).open()]
    losses = [s['loss'] for s in scalars if 'loss' in s]
    assert len(losses) == 4 and all(0 < v < 10 for v in losses), losses
    first, second = (torch.load(work / f'epoch_{i}.pth', weights_only=True)['state_dict']
                     for i in (1, 2))
    assert all(v.dtype != torch.bfloat16 for v in second.values())  # the weights stay float32
    moved = [k for k in first if first[k].is_floating_point()
             and not torch.equal(first[k], second[k])]
    assert any(k.endswith('.weight_kxk') for k in moved)
    assert any(k.endswith('.scales') for k in moved)


def test_amp_float16_on_the_cpu_is_refused(tmp_path):
    proc = run_python(['tools/train.py', CLS_CFG, '--amp', '--work-dir', tmp_path / 'w',
                       '--cfg-options', 'optim_wrapper.dtype=float16'])
    if torch.cuda.is_available():
        pytest.skip('float16 is fine on a GPU')
    assert_clean_failure(proc, 'float16')
