"""The two exact routes of the 1x1-kxk pair (Rep-1x1: 1x1-1x1) in training: composing kernels or
on the feature maps. Same function and gradients (float64), gradchecks of the feature route, the
cost estimate against counted FLOPs, and 'auto' picking the cheaper one."""
import pytest
import torch
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from mmorepa.layers import OREPA, OREPAConv1x1, OREPAConv2d
from mmorepa.ops import branches as B

from helpers import randomize_, rel_err

LAYERS = {
    '3x3 all branches, groups 2, stride 2, own BN': lambda route, scaling='vector': OREPAConv2d(
        4, 8, 3, stride=2, groups=2, scaling=scaling, norm_cfg=dict(type='BN'), route=route),
    '3x3 dilation 2, bias, pair + kxk only': lambda route, scaling='vector': OREPAConv2d(
        6, 4, 3, padding=2, dilation=2, bias=True, branches=B.names((B.KXK, B.ONE_BY_ONE_KXK)),
        scaling=scaling, route=route),
    '3x3 the pair alone': lambda route, scaling='vector': OREPAConv2d(
        4, 4, 3, branches=(B.ONE_BY_ONE_KXK.name, ), scaling=scaling, route=route),
    'Rep-1x1 stride 2': lambda route, scaling='vector': OREPAConv1x1(
        4, 8, stride=2, scaling=scaling, route=route),
    'Rep-1x1 narrowing, padding 1, own BN': lambda route, scaling='vector': OREPAConv1x1(
        8, 4, stride=2, padding=1, scaling=scaling, norm_cfg=dict(type='BN'), route=route),
}


def _layer(name, route, scaling='vector', seed=0):
    layer = LAYERS[name](route, scaling)
    randomize_(layer, torch.Generator().manual_seed(seed))
    return layer.double().train()


def _step(layer, x):
    """Output, input gradient and parameter gradients of a non-linear loss."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = layer(x)
    (out.tanh() * torch.linspace(-1, 2, out.numel(), dtype=out.dtype).reshape(out.shape)).sum(
    ).backward()
    return out.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


@pytest.mark.parametrize('scaling', ['vector', 'scalar', 'none'])
@pytest.mark.parametrize('name', list(LAYERS))
def test_feature_route_equals_kernel_route(name, scaling):
    x = torch.randn(3, LAYERS[name]('kernel').in_channels, 9, 9, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    results = {}
    for route in ('kernel', 'feature'):
        layer = _layer(name, route, scaling)
        assert layer.pair_route(x) == route
        results[route] = _step(layer, x)
    (yk, gxk, gpk), (yf, gxf, gpf) = results['kernel'], results['feature']
    assert rel_err(yf, yk) <= 1e-13
    assert rel_err(gxf, gxk) <= 1e-13
    assert gpk.keys() == gpf.keys()
    for n in gpk:
        assert rel_err(gpf[n], gpk[n]) <= 1e-12, n


@pytest.mark.parametrize('name', ['3x3 all branches, groups 2, stride 2, own BN',
                                  'Rep-1x1 narrowing, padding 1, own BN'])
def test_feature_route_gradcheck(name):
    layer = _layer(name, 'feature')
    names = [n for n, _ in layer.named_parameters()]
    x = torch.randn(2, layer.in_channels, 5, 5, dtype=torch.float64, requires_grad=True,
                    generator=torch.Generator().manual_seed(2))

    def f(x, *params):
        return functional_call(layer, dict(zip(names, params)), (x, ))
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)


def _counted_flops(layer, x):
    layer.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        layer(x.detach().clone().requires_grad_(x.requires_grad)).square().sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize('make, shape', [
    (lambda r: OREPAConv2d(8, 16, 3, route=r), (2, 8, 10, 10)),
    (lambda r: OREPAConv1x1(16, 8, route=r), (3, 16, 8, 8)),
    (lambda r: OREPAConv1x1(8, 16, padding=1, route=r), (1, 8, 5, 5)),
])
@pytest.mark.parametrize('input_grad', [True, False])
def test_pair_costs_are_the_counted_multiply_adds(make, shape, input_grad):
    """The shape-only estimate is what FlopCounterMode counts (2 FLOPs per multiply-add) as the
    difference between the routes (the kernel route composes with a 1x1 conv and one conv
    backward, which the counter charges as it charges any conv). Stride 1 and
    one group: the counter charges a strided conv's input gradient over the input's positions
    and a grouped conv's weight gradient once per group, more than the multiply-adds done."""
    x = torch.randn(shape, requires_grad=input_grad)
    layers = {r: make(r).train() for r in ('kernel', 'feature')}
    layers['feature'].load_state_dict(layers['kernel'].state_dict())
    cost = layers['kernel'].pair_costs(x.shape, input_grad)
    flops = {r: _counted_flops(m, x) for r, m in layers.items()}
    assert flops['feature'] - flops['kernel'] == 2 * (cost['feature'] - cost['kernel'])


def test_auto_takes_the_cheaper_route_for_the_input():
    layer = OREPAConv2d(64, 64, 3).train()
    small, large = torch.randn(1, 64, 2, 2), torch.randn(8, 64, 32, 32)
    assert layer.route == 'auto'
    for x in (small, large):
        cost = layer.pair_costs(x.shape, x.requires_grad)
        assert layer.pair_route(x) == min(cost, key=cost.get)
    assert layer.pair_route(small) == 'feature' and layer.pair_route(large) == 'kernel'
    with torch.no_grad():  # no backward to pay for: the forward's multiply-adds decide
        cost = layer.pair_costs(small.shape, backward=False)
        assert cost['kernel'] == 64 * 9 * 64 * 64
        assert cost['feature'] == 2 * 2 * 64 * 64 + 2 * 2 * 64 * 64 * 9
        assert layer.pair_route(small) == 'feature'
    # the route changes the work, not the function: same output either way
    with torch.no_grad():
        out = layer(small)
        layer.route = 'kernel'
        assert rel_err(layer(small), out) <= 1e-5
    # without the pair there is one route
    assert OREPAConv2d(4, 4, 3, branches=('kxk', '1x1'), route='feature').pair_route(small) == \
        'kernel'


def test_route_option_through_conv_cfg_keeps_keys_and_eval_cache():
    from mmcv.cnn import build_conv_layer
    import mmorepa  # noqa: F401
    layers = {r: build_conv_layer(dict(type='OREPA', route=r), 8, 8, 3, padding=1)
              for r in ('auto', 'kernel', 'feature')}
    assert {r: m.route for r, m in layers.items()} == {r: r for r in layers}
    assert build_conv_layer(dict(type='OREPA', route='feature'), 8, 16, 1).route == 'feature'
    keys = [sorted(m.state_dict()) for m in layers.values()]
    assert keys[0] == keys[1] == keys[2]
    with pytest.raises(ValueError, match="unknown route 'fast'"):
        OREPA(8, 8, 3, route='fast')
    with pytest.raises(ValueError, match="unknown route 'fast'"):
        OREPAConv2d(8, 8, 3, route='fast')
    # eval: the cached fused kernel, whatever the route
    layer = randomize_(layers['feature']).eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        fused = layer.to_conv2d()
        assert rel_err(layer(x), fused(x)) <= 1e-5


def test_orepa_resnet_takes_the_route_option():
    """``OREPAResNet(orepa_cfg=dict(route=...))`` reaches every OREPA layer; 'auto' by default."""
    from mmengine.registry import DefaultScope
    from mmorepa import OREPAResNet
    from mmorepa.layers.orepa import OREPAConv1x1
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        for route in ('kernel', 'feature', None):
            cfg = None if route is None else dict(route=route)
            model = OREPAResNet(depth=50, base_channels=8, stem_channels=8, orepa_cfg=cfg)
            routes = {m.route for n, m in model.named_modules() if isinstance(
                m, (OREPAConv2d, OREPAConv1x1)) and '.generators.' not in n}  # kernels only
            assert routes == {route or 'auto'}
