"""The eval-mode kernel cache never goes stale and is no state of the model.

Every re-parameterizable layer in eval mode serves one conv with a cached fused kernel. Whatever
changes a parameter or buffer in place, the next eval forward must equal the un-fused computation
(``mmorepa.unfused_eval``: squeeze -> conv -> own norm on feature maps, no cache): optimizer steps
of every implementation (plain, foreach, fused), writes through ``.data`` (mmengine's EMA),
``load_state_dict``, ``copy_`` under ``no_grad``, ``p.data = other``, dtype moves, and changes of
the layer's own settings (``fake_quant_bits``, a norm's ``eps``, a parametrization's state). The
cache holds the fused kernel and a small key, and is never saved or copied with the model.
"""
import copy

import pytest
import torch
import torch.nn as nn

import mmorepa
from mmorepa import DiverseBranchBlock, OREPAConv1x1, OREPAConv2d, OREPALargeConv
from mmorepa.layers.base import ReparamConv2d

from helpers import randomize_, rel_err

BN = dict(type='BN')


def _model(seed: int) -> nn.Module:
    """One layer of every kind, with random parameters and BN statistics, in float64."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        OREPALargeConv(3, 8, 5, norm_cfg=BN), nn.ReLU(),
        OREPAConv2d(8, 8, 3, norm_cfg=BN), nn.ReLU(),
        OREPAConv1x1(8, 8, norm_cfg=BN), nn.ReLU(),
        DiverseBranchBlock(8, 8, 3))  # computed on feature maps: its eval output must follow too
    return randomize_(model).double()


def _input(seed: int = 0):
    return torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def _cached_and_reference(model, x):
    """The eval output (cache) and the un-fused reference, both without gradients."""
    with torch.no_grad():
        cached = model(x)
        with mmorepa.unfused_eval(model):
            reference = model(x)
    return cached, reference


def _assert_fresh(model, x, before=None):
    cached, reference = _cached_and_reference(model, x)
    served = [m for m in model.children() if isinstance(m, ReparamConv2d)
              and not isinstance(m, DiverseBranchBlock)]  # DBB runs its branches on feature maps
    assert served and all(m.eval_cache.filled for m in served), 'cache not used'
    assert rel_err(cached, reference) <= 1e-10, 'stale eval kernel'
    if before is not None:
        assert rel_err(cached, before) > 1e-3, 'the change did not change the output'
    return cached


def _train_step(model, opt, x):
    """A step taken in eval mode (frozen norms, gradients on): no ``train()`` call drops the
    cache, so only the parameters' values can tell it that it is stale."""
    torch.tanh(model(x)).mean().backward()
    opt.step()
    opt.zero_grad()


OPTIMIZERS = [(name, impl) for name in ('SGD', 'Adam', 'AdamW')
              for impl in ('plain', 'foreach', 'fused')]


@pytest.mark.parametrize('name,impl', OPTIMIZERS, ids=[f'{n}-{i}' for n, i in OPTIMIZERS])
def test_cache_fresh_after_every_optimizer_step(name, impl):
    model = _model(1).eval()
    x = _input()
    before = _assert_fresh(model, x)  # fills the cache
    kwargs = dict(lr=0.05, momentum=0.9) if name == 'SGD' else dict(lr=0.05)
    kwargs.update(dict(foreach=False) if impl == 'plain' else
                  dict(foreach=True) if impl == 'foreach' else dict(fused=True))
    opt = getattr(torch.optim, name)(model.parameters(), **kwargs)
    for _ in range(2):
        _train_step(model, opt, x)
        before = _assert_fresh(model, x, before)


def test_cache_fresh_after_data_writes_load_and_copy():
    model = _model(2).eval()
    x = _input(1)
    before = _assert_fresh(model, x)
    with torch.no_grad():
        for p in model.parameters():
            p.data.mul_(0.9)  # bypasses the version counter
    before = _assert_fresh(model, x, before)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.data.add_(0.5)
    before = _assert_fresh(model, x, before)
    model.load_state_dict(_model(3).state_dict())
    before = _assert_fresh(model, x, before)
    other = _model(4)
    with torch.no_grad():
        for p, q in zip(model.parameters(), other.parameters()):
            p.copy_(q)
    _assert_fresh(model, x, before)


def test_ema_module_in_eval_follows_its_updates():
    """mmengine's ExponentialMovingAverage writes the averaged parameters through ``.data``."""
    from mmengine.model import ExponentialMovingAverage
    model = _model(5)
    ema = ExponentialMovingAverage(model, momentum=0.5)
    ema.module.eval()
    x = _input(2)
    before = _assert_fresh(ema.module, x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        _train_step(model, opt, x)
        ema.update_parameters(model)
        before = _assert_fresh(ema.module, x, before)


def test_stock_network_with_orepa_conv_cfg_after_fused_adam():
    """A whole mmpretrain ResNet built with the OREPA conv_cfg, in eval, after fused Adam."""
    from mmpretrain.models import ResNet
    torch.manual_seed(6)
    model = ResNet(depth=18, stem_channels=8, base_channels=8, conv_cfg=dict(type='OREPA'))
    randomize_(model).double().eval()  # (mmpretrain's ResNet.train returns None)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    def features(m):
        with torch.no_grad():
            return m(x)[-1]
    cached = features(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, fused=True)
    model(x)[-1].sum().backward()  # in eval mode: nothing but the values changes
    opt.step()
    after = features(model)
    with mmorepa.unfused_eval(model):
        reference = features(model)
    assert rel_err(after, reference) <= 1e-10 and rel_err(after, cached) > 1e-3


def test_inference_mode_then_forward_that_needs_grad():
    """A cache filled under ``torch.inference_mode`` holds ordinary tensors."""
    model = _model(7).eval().requires_grad_(False)
    x = _input(3)
    with torch.inference_mode():
        first = model(x)
    inp = x.clone().requires_grad_()
    out = model(inp)
    out.sum().backward()
    assert inp.grad is not None and torch.equal(out.detach(), first)
    # and the cache is still checked afterwards
    with torch.no_grad():
        for p in model.parameters():
            p.data.mul_(1.1)
    _assert_fresh(model, x, first)


def test_deepcopy_and_device_moves_keep_a_valid_cache():
    model = _model(8).eval()
    x = _input(4)
    before = _assert_fresh(model, x)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.data.add_(0.1)
    _assert_fresh(clone, x, before)
    _assert_fresh(model.float().double(), x)




def _kernels(model):
    """The cached fused kernel of each cache-served layer (after a no-grad eval forward)."""
    return [m.eval_cache.fused(m)[0] for m in model.children()
            if isinstance(m, ReparamConv2d) and not isinstance(m, DiverseBranchBlock)]


def test_cache_fresh_after_data_assignment_permutation_and_dtype_moves():
    """``p.data = other`` (new storage), a permutation written through ``.data`` (same storage,
    same values in other places, no version bump) and a float32 round trip."""
    model = _model(9).eval()
    x = _input(5)
    before = _assert_fresh(model, x)
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data * 1.1 + 0.01
    before = _assert_fresh(model, x, before)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 4:
                p.data.copy_(p.data.flip(0, 1))
    before = _assert_fresh(model, x, before)
    model.float()
    cached, reference = _cached_and_reference(model, x.float())
    assert cached.dtype == torch.float32 and rel_err(cached, reference) < 1e-5
    assert all(k.dtype == torch.float32 for k in _kernels(model))
    model.double()  # float64 again, the values rounded to float32: a stale kernel is 1e-7 off
    _assert_fresh(model, x)


class _Scale(nn.Module):
    """A parametrization whose state is a plain attribute."""

    def __init__(self):
        super().__init__()
        self.factor = 1.0

    def forward(self, w):
        return w * self.factor


def test_cache_follows_the_layers_own_settings():
    """fake_quant_bits, a norm's eps and a parametrization's state, changed after an eval
    forward, change the next eval output as they change the un-fused one; a norm's momentum
    (no effect in eval) recomputes the kernel too."""
    from torch.nn.utils import parametrize
    model = _model(10).eval()
    x = _input(6)
    before = _assert_fresh(model, x)
    model[2].fake_quant_bits = 4
    before = _assert_fresh(model, x, before)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 0.3
    before = _assert_fresh(model, x, before)
    kernels = _kernels(model)
    model[0].bn.momentum = 0.5
    _assert_fresh(model, x)
    assert _kernels(model)[0] is not kernels[0] and _kernels(model)[1] is kernels[1]
    scale = _Scale()
    parametrize.register_parametrization(model[2], 'weight_kxk', scale)
    before = _assert_fresh(model, x)
    scale.factor = 3.0
    _assert_fresh(model, x, before)


def test_cache_is_no_state_and_no_copy():
    """After an eval forward the cache holds the fused kernels only: state_dict and
    copy.deepcopy leave it out (a copy fills its own)."""
    model = _model(11).eval()
    x = _input(7)
    keys = list(model.state_dict())
    _assert_fresh(model, x)
    assert list(model.state_dict()) == keys
    clone = copy.deepcopy(model)
    assert not any(m.eval_cache.filled for m in clone.modules() if isinstance(m, ReparamConv2d))
    _assert_fresh(clone, x)


def test_cache_is_not_saved_with_the_model():
    """torch.save(model) after an eval forward writes what it wrote before (within 2 %), and the
    loaded model fills its own cache."""
    import io
    model = _model(11).eval()
    x = _input(7)

    def saved():
        buf = io.BytesIO()
        torch.save(model, buf)
        return buf

    size = saved().getbuffer().nbytes
    _assert_fresh(model, x)
    assert saved().getbuffer().nbytes <= size * 1.02
    loaded = torch.load(io.BytesIO(saved().getvalue()), weights_only=False)
    assert not any(m.eval_cache.filled for m in loaded.modules() if isinstance(m, ReparamConv2d))
    _assert_fresh(loaded, x)


def test_cache_holds_the_fused_kernel_and_a_small_key_only():
    """What the cache keeps per layer beside the kernel and bias: a fingerprint of 64 int32 per
    parameter and buffer, no copy of them."""
    model = _model(12).eval()
    _assert_fresh(model, _input(8))
    for m in model.children():
        if isinstance(m, ReparamConv2d) and m.eval_cache.filled:
            key, prints, fused = m.eval_cache._entry
            n_tensors = len(list(m.parameters())) + len(list(m.buffers()))
            assert len(prints) == n_tensors and all(
                t.dtype == torch.int32 and t.numel() == 64 for t in prints)
