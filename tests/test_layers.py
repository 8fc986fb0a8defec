"""OREPA layers and blocks: online squeeze == explicit branches, fusion, cache, bad input."""
import copy
import itertools
import zlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mmorepa
from mmorepa.layers import (BRANCHES, OREPA, DiverseBranchBlock, OREPAConv1x1, OREPAConv2d,
                            OREPALargeConv)
from mmorepa.models.backbones.reparam_backbone import swap_convs_
from mmorepa.ops import branches as B

from helpers import bn_eval, conv, orepa_explicit, randomize_, rel_err

BN = dict(type='BN')


def scaled_sum(kernels, scales):
    """Eq. 4 with the linear scaling layers of Sec. 3.2 written plainly, ``sum_m gamma_m * W_m``:
    ``kernels`` same-shape ``(C_out, C_in // g, k, k)`` branch kernels; ``scales`` ``(M, C_out)``
    (vector scaling), ``(M, 1)`` (scalar scaling) or ``None`` (no scaling)."""
    stacked = torch.stack(list(kernels))
    if scales is None:
        return stacked.sum(0)
    return torch.einsum('mo,moihw->oihw', scales.expand(len(kernels), stacked.shape[1]), stacked)


def _input(c, size=9, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, c, size, size, generator=g).to(dtype)


# 1. Eq. 3-4: the online squeeze equals the explicit multi-branch block on feature maps ----------
@pytest.mark.parametrize('k,stride,groups,dilation,scaling', [
    (3, 1, 1, 1, 'vector'), (3, 2, 4, 1, 'vector'), (5, 1, 2, 2, 'scalar'), (3, 2, 8, 1, 'none'),
    (7, 2, 1, 1, 'vector'), (1, 1, 1, 1, 'vector'), (3, 1, 1, 2, 'vector')])
def test_online_squeeze_equals_explicit_branches(k, stride, groups, dilation, scaling):
    torch.manual_seed(k + stride + groups)
    layer = OREPAConv2d(8, 16, k, stride, groups=groups, dilation=dilation, bias=True,
                        scaling=scaling).double()
    randomize_(layer)
    x = _input(8, 13, dtype=torch.float64)
    ref = orepa_explicit(layer, x)
    kernel, bias = layer.squeezed_kernel_and_bias()
    out = F.conv2d(x, kernel, bias, layer.stride, layer.padding, layer.dilation, groups)
    assert rel_err(out, ref) <= 1e-10
    # and the module's own train-mode forward is that single conv
    assert rel_err(layer.train()(x), ref) <= 1e-10


@pytest.mark.parametrize('branches', [
    B.names(bs) for bs in ((B.KXK, ), (B.KXK, B.ONE_BY_ONE, B.ONE_BY_ONE_KXK, B.ONE_BY_ONE_AVG),
                           (B.ONE_BY_ONE_FREQ, B.DW_PW), (B.DW_PW, B.KXK))])
def test_branch_subsets_equal_explicit(branches):
    torch.manual_seed(1)
    layer = randomize_(OREPAConv2d(4, 8, 3, branches=branches).double())
    x = _input(4, dtype=torch.float64)
    assert layer.branches == tuple(b for b in BRANCHES if b in branches)
    assert rel_err(layer(x), orepa_explicit(layer, x)) <= 1e-10


def test_rep1x1_and_deep_stem_equal_explicit():
    torch.manual_seed(2)
    x = _input(6, 15, dtype=torch.float64)
    for cin, cout in ((6, 12), (6, 4)):
        rep = randomize_(OREPAConv1x1(cin, cout, stride=2).double())
        y = x[:, :cin]
        ref = (rep.scales[0].reshape(1, -1, 1, 1) * conv(y, rep.weight_1x1, 2)
               + rep.scales[1].reshape(1, -1, 1, 1)
               * conv(conv(y, rep.weight_1x1_1x1_conv1), rep.weight_1x1_1x1_conv2, 2))
        assert rel_err(rep(y), ref) <= 1e-10
    # deep stem: three stacked 3x3 OREPA generators, valid convs, == one 7x7 valid conv
    stem = randomize_(OREPALargeConv(3, 8, 7, stride=1, padding=0).double())
    y = x[:, :3]
    seq = y
    for gen in stem.generators:
        seq = conv(seq, gen.squeezed_kernel_and_bias()[0])
    assert rel_err(stem(y), seq) <= 1e-10


# 2. Fused == un-fused (eval), float32, over the geometry grid ------------------------------------
GRID = list(itertools.product([1, 3, 5, 7], [1, 2], [1, 4, 32, 'dw'], [1, 2], [False, True]))


@pytest.mark.parametrize('k,stride,groups,dilation,own_bn', GRID)
def test_fused_equals_unfused(k, stride, groups, dilation, own_bn):
    torch.manual_seed(zlib.crc32(repr((k, stride, groups, dilation, own_bn)).encode()))
    cin, cout = (32, 32) if groups == 'dw' else (32, 64)
    g = cin if groups == 'dw' else groups
    layer = OREPAConv2d(cin, cout, k, stride, dilation=dilation, groups=g,
                        norm_cfg=BN if own_bn else None)
    randomize_(layer).eval()
    x = _input(cin, 11)
    # ground truth: branches on feature maps, then the eval-mode BN, in float64
    ref_layer = copy.deepcopy(layer).double()
    ref = orepa_explicit(ref_layer, x.double())
    if own_bn:
        ref = bn_eval(ref, ref_layer.bn)
    with torch.no_grad():
        unfused = layer(x)
        fused_model = mmorepa.reparameterize(layer)
        fused = fused_model(x)
    assert type(fused_model) is nn.Conv2d
    assert rel_err(unfused, ref) <= 1e-5
    assert rel_err(fused, ref) <= 1e-5


@pytest.mark.parametrize('make', [
    lambda: OREPAConv1x1(32, 64, stride=2, groups=4, norm_cfg=BN),
    lambda: OREPAConv1x1(64, 32, norm_cfg=BN),
    lambda: OREPALargeConv(3, 16, 7, stride=2, padding=3, norm_cfg=BN),
    lambda: OREPALargeConv(8, 8, 5, stride=1, padding=2, dilation=2, groups=4),
    lambda: DiverseBranchBlock(16, 32, 3, 2, groups=4),
    lambda: DiverseBranchBlock(16, 16, 5, 1, dilation=2),
])
def test_other_layers_fused_equals_unfused(make):
    torch.manual_seed(3)
    layer = randomize_(make()).eval()
    x = _input(layer.in_channels, 12)
    ref_layer = copy.deepcopy(layer).double()
    with torch.no_grad():
        if isinstance(layer, DiverseBranchBlock):
            ref = ref_layer(x.double())  # DBB always computes its branches on feature maps
        else:
            kernel, bias = ref_layer.squeezed_kernel_and_bias()
            ref = F.conv2d(x.double(), kernel, bias, layer.stride, layer.padding, layer.dilation,
                           layer.groups)
            if ref_layer.bn is not None:
                ref = bn_eval(ref, ref_layer.bn)
        fused = mmorepa.reparameterize(layer)(x)
        unfused = layer(x)
    assert rel_err(unfused, ref) <= 1e-5
    assert rel_err(fused, ref) <= 1e-5


def test_dbb_train_mode_padding_is_exact_with_batch_statistics():
    """DBB's BN-and-pad: in train mode the 1x1-kxk branch equals the composed conv at the borders
    too (batch statistics), so the block is a true re-parameterization."""
    torch.manual_seed(4)
    dbb = randomize_(DiverseBranchBlock(4, 6, 3)).double().train()
    x = _input(4, dtype=torch.float64)
    mid = conv(x, dbb.identity + dbb.weight_1x1_kxk_idconv1)
    mean, var = mid.mean((0, 2, 3)), mid.var((0, 2, 3), unbiased=False)
    bn = dbb.bn_1x1_kxk_mid.bn
    t = bn.weight / torch.sqrt(var + bn.eps)
    w1 = (dbb.identity + dbb.weight_1x1_kxk_idconv1) * t.reshape(-1, 1, 1, 1)
    b1 = bn.bias - mean * t
    composed = conv(F.pad(x, [1, 1, 1, 1]), w1) + b1.reshape(1, -1, 1, 1)  # 1x1 then BN, padded
    padded = dbb.bn_1x1_kxk_mid(mid)
    assert rel_err(padded, composed) <= 1e-12


def _repvgg_block(cin, cout, stride=1, orepa=True):
    """mmpretrain's own RepVGG block; with ``orepa``, its 3x3 conv swapped for an OREPA one."""
    from mmpretrain.models.backbones.repvgg import RepVGGBlock
    block = RepVGGBlock(cin, cout, stride=stride)
    if orepa:
        assert swap_convs_(block, dict(type='OREPA', rep_1x1=False)) == ['branch_3x3.conv']
    return block


@pytest.mark.parametrize('orepa,stride,cin,cout', [(False, 1, 8, 8), (True, 1, 8, 8),
                                                   (True, 2, 8, 16), (False, 2, 8, 16)])
def test_repvgg_blocks_fuse(orepa, stride, cin, cout):
    torch.manual_seed(5)
    block = randomize_(_repvgg_block(cin, cout, stride, orepa)).eval()
    x = _input(cin, 10)
    with torch.no_grad():
        ref = copy.deepcopy(block).double()(x.double())
        fused = mmorepa.reparameterize(block)
        out = fused(x)
    assert fused.deploy and 'branch_reparam' in dict(fused.named_children())
    assert not any(type(m).__module__.startswith('mmorepa') for m in fused.modules())
    assert rel_err(block(x), ref) <= 1e-5
    assert rel_err(out, ref) <= 1e-5


def test_dbb_bias_fold_refuses_a_norm_that_runs_before_the_conv():
    from mmcv.cnn import ConvModule
    post = ConvModule(8, 8, 3, padding=1, conv_cfg=dict(type='DBB'), norm_cfg=BN)
    randomize_(post).eval()
    x = _input(8)
    with torch.no_grad():
        assert rel_err(mmorepa.reparameterize(post)(x), post(x)) <= 1e-5
    pre = ConvModule(8, 8, 3, padding=1, conv_cfg=dict(type='DBB'), norm_cfg=BN,
                     order=('norm', 'conv', 'act'))
    with pytest.raises(ValueError, match='^conv fuses to a conv with a bias'):
        mmorepa.reparameterize(nn.Sequential(pre).eval()[0])
    assert type(OREPA(4, 8, 3, padding=1, norm_cfg=BN, deploy=True).bias) is nn.Parameter


def test_reparameterize_syncbn_model():
    torch.manual_seed(6)
    model = nn.Sequential(OREPAConv2d(4, 8, 3, norm_cfg=dict(type='SyncBN')), nn.ReLU(),
                          OREPAConv2d(8, 8, 3, norm_cfg=dict(type='SyncBN')))
    randomize_(model).eval()
    x = _input(4)
    with torch.no_grad():
        ref = model(x)
        fused = mmorepa.reparameterize(model)
        assert all(type(m) in (nn.Conv2d, nn.ReLU, nn.Sequential) for m in fused.modules())
        assert rel_err(fused(x), ref) <= 1e-5


# 3. gradcheck of the squeeze ------------------------------------------------------------------------
@pytest.mark.parametrize('make', [
    lambda: OREPAConv2d(4, 4, 3, groups=2, dw_expansion=2),
    lambda: OREPAConv1x1(4, 6),
    lambda: OREPALargeConv(2, 3, 5, generator_cfg=dict(dw_expansion=1)),
])
def test_squeeze_gradcheck(make):
    torch.manual_seed(7)
    wrapper = _Squeeze(randomize_(make().double()))
    names = [n for n, _ in wrapper.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in wrapper.parameters())

    def squeeze(*ps):
        return torch.func.functional_call(wrapper, dict(zip(names, ps)), ())

    assert torch.autograd.gradcheck(squeeze, params)


class _Squeeze(nn.Module):
    """Exposes a layer's ``squeeze`` as ``forward`` for ``functional_call``."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self):
        return self.layer.squeezed_kernel_and_bias()[0]


# 4. Idempotence; reparameterize leaves its input untouched --------------------------------------
def test_switch_to_deploy_idempotent_and_plain_keys():
    torch.manual_seed(8)
    layer = randomize_(OREPAConv2d(4, 8, 3, norm_cfg=BN)).eval()
    x = _input(4)
    with torch.no_grad():
        ref = layer(x)
        layer.switch_to_deploy()
        keys = set(layer.state_dict())
        first = {k: v.clone() for k, v in layer.state_dict().items()}
        layer.switch_to_deploy()
        out = layer(x)
    assert keys == {'weight', 'bias'} == set(nn.Conv2d(4, 8, 3).state_dict())
    assert all(torch.equal(first[k], v) for k, v in layer.state_dict().items())
    assert rel_err(out, ref) <= 1e-5
    deploy = OREPAConv2d(4, 8, 3, norm_cfg=BN, deploy=True)
    deploy.load_state_dict(layer.state_dict(), strict=True)


def test_reparameterize_copies_by_default_and_is_idempotent():
    torch.manual_seed(9)
    model = nn.Sequential(OREPAConv2d(4, 8, 3, norm_cfg=BN), _repvgg_block(8, 8))
    randomize_(model).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types_before = [type(m) for m in model.modules()]
    fused = mmorepa.reparameterize(model)
    assert [type(m) for m in model.modules()] == types_before
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    again = mmorepa.reparameterize(fused)
    x = _input(4)
    with torch.no_grad():
        assert torch.equal(again(x), fused(x))
    assert set(again.state_dict()) == set(fused.state_dict())
    inplace = mmorepa.reparameterize(model, inplace=True)
    assert inplace is model and isinstance(model[0], nn.Conv2d)


# 5. The eval-mode kernel cache is never stale ----------------------------------------------------
def test_cache_after_optimizer_step_and_load_state_dict():
    torch.manual_seed(10)
    layer = randomize_(OREPAConv2d(4, 8, 3, norm_cfg=BN)).eval()
    x = _input(4)
    with torch.no_grad():
        y0 = layer(x)
        assert layer.eval_cache.filled
        assert torch.equal(layer(x), y0)  # served from the cache
    opt = torch.optim.SGD(layer.parameters(), lr=0.5, momentum=0.9)
    for foreach in (False, True):
        opt.param_groups[0]['foreach'] = foreach
        layer(x).square().mean().backward()  # eval mode, grad enabled: no cache used
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            y1 = layer(x)
            want = mmorepa.reparameterize(layer)(x)
        assert rel_err(y1, want) <= 1e-6 and rel_err(y1, y0) > 1e-3
        y0 = y1
    other = randomize_(OREPAConv2d(4, 8, 3, norm_cfg=BN)).eval()
    layer.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert rel_err(layer(x), other(x)) <= 1e-6
    # in-place edit of a BN statistic also invalidates
    with torch.no_grad():
        layer.bn.running_var.mul_(3)
        assert rel_err(layer(x), mmorepa.reparameterize(layer)(x)) <= 1e-6


def test_eval_forward_keeps_gradients_when_needed():
    layer = randomize_(OREPAConv2d(4, 8, 3)).eval()
    layer(_input(4)).sum().backward()
    assert layer.weight_kxk.grad is not None and layer.scales.grad is not None


# 6. Bad input fails at build time naming the value -----------------------------------------------
@pytest.mark.parametrize('kwargs,match', [
    (dict(kernel_size=4), 'kernel_size.*4'),
    (dict(kernel_size=(3, 5)), r'kernel_size.*\(3, 5\)'),
    (dict(groups=3), 'groups=3'),
    (dict(branches=('kxk', 'sobel')), "branch 'sobel'"),
    (dict(scaling='channel'), "scaling 'channel'"),
    (dict(stride=0), 'stride.*0'),
    (dict(branches=()), 'at least one'),
    (dict(scale_init={'avg': 0.1}), "'avg'"),
])
def test_bad_input_raises_value_error(kwargs, match):
    args = dict(in_channels=8, out_channels=16, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        OREPAConv2d(**args)


def test_bad_input_other_layers():
    with pytest.raises(ValueError, match='kernel_size.*2'):
        OREPA(4, 4, 2)
    with pytest.raises(ValueError, match="branch 'x'"):
        OREPAConv1x1(4, 4, branches=('x',))
    with pytest.raises(ValueError, match='>= 5.*3'):
        OREPALargeConv(3, 8, 3)
    with pytest.raises(ValueError, match='groups=2'):
        OREPAConv1x1(3, 4, groups=2)
    with pytest.raises(ValueError, match='padding=1'):
        DiverseBranchBlock(4, 4, 3, padding=0)


def test_silently_accepted_arguments_are_refused():
    # a bare string would read as the branches 'k', 'x', 'k'
    with pytest.raises(ValueError, match="branches must be a list or tuple.*'kxk'"):
        OREPAConv2d(4, 4, 3, branches='kxk')
    with pytest.raises(ValueError, match="'kxk'"):
        OREPA(4, 4, 3, branches='kxk')
    # a scale_init for a branch the layer does not build
    with pytest.raises(ValueError, match=f"scale_init names branch '{B.DW_PW.name}'"):
        OREPAConv2d(4, 4, 3, branches=B.names((B.KXK, B.ONE_BY_ONE)),
                    scale_init={B.DW_PW.name: 0.5})
    with pytest.raises(ValueError, match="scale_init names branch 'bogus'"):
        OREPAConv1x1(4, 4, scale_init={'bogus': 1.0})
    # unknown Rep-1x1 branches are refused whatever the kernel size
    with pytest.raises(ValueError, match="branch 'nope' in rep1x1_branches"):
        OREPA(4, 4, 3, padding=1, rep1x1_branches=('nope',))
    with pytest.raises(ValueError, match="branch 'nope' in branches"):
        OREPA(4, 4, 1, branches=('nope',))
    with pytest.raises(ValueError, match="scaling 'vectors'"):
        OREPA(4, 4, 1, scaling='vectors')


def test_orepa_factory_picks_by_kernel_size():
    assert type(OREPA(4, 8, 1, bias=False)) is OREPAConv1x1
    assert type(OREPA(4, 8, 3, padding=1, bias=False)) is OREPAConv2d
    assert type(OREPA(3, 8, 7, 2, 3, bias=False)) is OREPALargeConv
    layer = OREPA(4, 8, 3, branches=('kxk', '1x1'), scaling='scalar')
    assert layer.branches == ('kxk', '1x1') and layer.scales.shape == (2, 1)
    # options that keep a conv plain (BasicBlock shortcuts, Table 2 without the deep stem)
    plain = OREPA(4, 8, 1, stride=2, bias=False, rep_1x1=False)
    assert type(plain) is nn.Conv2d and plain.stride == (2, 2) and plain.bias is None
    plain = OREPA(3, 8, 7, 2, 3, bias=False, linear_deep_stem=False)
    assert type(plain) is nn.Conv2d and plain.kernel_size == (7, 7) and plain.padding == (3, 3)
    assert type(OREPA(4, 8, 3, padding=1, rep_1x1=False)) is OREPAConv2d
    assert type(mmorepa.DBB(4, 8, 1, bias=False)) is nn.Conv2d
    assert type(mmorepa.DBB(4, 8, 3, padding=1, bias=False)) is DiverseBranchBlock


def test_scale_inits_follow_supp_2_1():
    layer = OREPAConv2d(4, 8, 3)
    want = {B.ONE_BY_ONE: 1.0, B.KXK: 0.25, B.ONE_BY_ONE_KXK: 0.5, B.ONE_BY_ONE_AVG: 0.5,
            B.ONE_BY_ONE_FREQ: 0.0, B.DW_PW: 0.5}
    assert len(layer.branches) == len(want)
    for i, b in enumerate(want):
        assert torch.all(layer.scales[layer.branches.index(b.name)] == want[b]), b.name
    # the 1x1-kxk branch starts as a plain kxk conv (identity 1x1)
    pair = B.ONE_BY_ONE_KXK
    assert torch.equal(layer.branch_kernels()[pair.name], getattr(layer, pair.attrs()[1]))


def test_unfused_eval_is_an_independent_reference():
    torch.manual_seed(11)
    model = nn.Sequential(OREPAConv2d(4, 8, 3, norm_cfg=BN), nn.ReLU(),
                          OREPALargeConv(8, 8, 5, norm_cfg=BN))
    randomize_(model).eval()
    x = _input(4)
    with torch.no_grad():
        folded = model(x)
        assert model[0].eval_cache.filled
        with mmorepa.unfused_eval(model):
            ref = model(x)
            first = model[0](x)
            # squeeze -> conv -> BN on feature maps, by hand
            k, b = model[0].squeezed_kernel_and_bias()
            manual = bn_eval(F.conv2d(x, k, b, 1, 1), model[0].bn)
    assert model[0].fold_norm_in_eval and model[2].fold_norm_in_eval  # restored on exit
    assert rel_err(first, manual) <= 1e-6
    assert rel_err(ref, folded) <= 1e-5
    assert not torch.equal(ref, folded)  # a different computation, not the cached kernel


@pytest.mark.parametrize('scaling', ['vector', 'scalar', 'none'])
@pytest.mark.parametrize('groups', [1, 4])
def test_squeeze_equals_scaled_sum_of_branch_kernels(scaling, groups):
    """The cheap squeeze (scales on the last factors, no stacking) is Eq. 4 exactly."""
    torch.manual_seed(12)
    layer = randomize_(OREPAConv2d(8, 16, 3, groups=groups, scaling=scaling).double())
    reference = scaled_sum(layer.branch_kernels().values(), layer.scales)
    assert rel_err(layer.squeezed_kernel_and_bias()[0], reference) <= 1e-13


def test_scaled_sum_modes():
    g = torch.Generator().manual_seed(4)
    ks = [torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    vec = torch.randn(2, 3, generator=g, dtype=torch.float64)
    want = vec[0].reshape(-1, 1, 1, 1) * ks[0] + vec[1].reshape(-1, 1, 1, 1) * ks[1]
    assert rel_err(scaled_sum(ks, vec), want) < 1e-14
    sc = torch.randn(2, 1, generator=g, dtype=torch.float64)
    assert rel_err(scaled_sum(ks, sc), sc[0] * ks[0] + sc[1] * ks[1]) < 1e-14
    assert rel_err(scaled_sum(ks, None), ks[0] + ks[1]) == 0
