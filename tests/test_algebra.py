"""The kernel algebra against explicit feature-map computations, float64."""
import math

import pytest
import torch
import torch.nn.functional as F

from mmorepa.ops import algebra as K

from helpers import rel_err

torch.set_default_dtype(torch.float32)


def _x(c, size=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, c, size, size, generator=g, dtype=torch.float64)


@pytest.mark.parametrize('k1,k2,groups', [(1, 3, 1), (3, 3, 1), (3, 5, 2), (1, 7, 4), (5, 3, 4)])
def test_compose_equals_sequential_convs(k1, k2, groups):
    g = torch.Generator().manual_seed(k1 * 10 + k2)
    first = torch.randn(8, 8 // groups, k1, k1, generator=g, dtype=torch.float64)
    second = torch.randn(12, 8 // groups, k2, k2, generator=g, dtype=torch.float64)
    x = _x(8)
    # sequential convs with zero padding; the composed kernel sees the summed padding
    p1, p2 = k1 // 2, k2 // 2
    seq = F.conv2d(F.conv2d(x, first, padding=p1, groups=groups), second, padding=p2, groups=groups)
    # interior pixels only: padding the intermediate map is not padding the input
    composed = K.compose(first, second, groups)
    assert composed.shape == (12, 8 // groups, k1 + k2 - 1, k1 + k2 - 1)
    full = F.conv2d(x, composed, padding=p1 + p2, groups=groups)
    m = p1 + p2
    assert rel_err(full[..., m:-m, m:-m], seq[..., m:-m, m:-m]) < 1e-12
    # without intermediate padding the whole map matches
    seq_valid = F.conv2d(F.conv2d(x, first, groups=groups), second, groups=groups)
    assert rel_err(F.conv2d(x, composed, groups=groups), seq_valid) < 1e-12


def test_compose_1x1_matches_general_compose():
    g = torch.Generator().manual_seed(1)
    first = torch.randn(8, 2, 1, 1, generator=g, dtype=torch.float64)
    second = torch.randn(12, 2, 3, 3, generator=g, dtype=torch.float64)
    via_conv = F.conv2d(first.transpose(0, 1), second.flip(-1, -2), padding=2, groups=4)
    assert rel_err(K.compose_1x1(first, second, 4), via_conv.transpose(0, 1)) < 1e-13


@pytest.mark.parametrize('groups', [1, 2, 4])
def test_dw_pw_to_full(groups):
    g = torch.Generator().manual_seed(groups)
    cin, cout, m, k = 4, 8, 3, 3
    dw = torch.randn(cin * m, 1, k, k, generator=g, dtype=torch.float64)
    pw = torch.randn(cout, cin * m // groups, 1, 1, generator=g, dtype=torch.float64)
    x = _x(cin)
    ref = F.conv2d(F.conv2d(x, dw, padding=1, groups=cin), pw, groups=groups)
    out = F.conv2d(x, K.dw_pw_to_full(dw, pw, cin, groups), padding=1, groups=groups)
    assert rel_err(out, ref) < 1e-12
    with pytest.raises(ValueError, match='do not fit'):
        K.dw_pw_to_full(dw, pw[:, :-1], cin, groups)


@pytest.mark.parametrize('k', [1, 3, 5, 7])
def test_frequency_prior_table1(k):
    for channels in (6, 7):
        prior = K.frequency_prior(channels, k, dtype=torch.float64)
        half = channels // 2
        for c in range(channels):
            for h in range(k):
                for w in range(k):
                    if c < half:
                        want = math.cos((c + 1) * (h + 0.5) * math.pi / k)
                    else:
                        want = math.cos((c - half + 1) * (w + 0.5) * math.pi / k)
                    assert abs(prior[c, h, w].item() - want) < 1e-12


def test_avg_kernel_is_avg_pool():
    x = _x(3)
    w = K.avg_kernel(3, torch.float64).expand(3, 1, 3, 3)
    assert rel_err(F.conv2d(x, w, padding=1, groups=3),
                   F.avg_pool2d(x, 3, 1, 1, count_include_pad=True)) < 1e-14


@pytest.mark.parametrize('groups,k', [(1, 1), (2, 3), (4, 3), (1, 5)])
def test_identity_kernel(groups, k):
    x = _x(4)
    ident = K.identity_kernel(4, groups, k, dtype=torch.float64)
    assert rel_err(F.conv2d(x, ident, padding=k // 2, groups=groups), x) == 0


def test_pad_to_centres_and_refuses_even_offsets():
    w = torch.randn(2, 2, 1, 1, dtype=torch.float64)
    x = _x(2)
    assert rel_err(F.conv2d(x, K.pad_to(w, 5), padding=2), F.conv2d(x, w)) < 1e-14
    with pytest.raises(ValueError, match='cannot centre'):
        K.pad_to(torch.zeros(1, 1, 3, 3), 4)


def test_fuse_bn():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    mean, var = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
    gamma, beta = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    x = _x(3)
    ref = F.batch_norm(F.conv2d(x, w, b, padding=1), mean, var, gamma, beta, False, 0.0, 1e-5)
    fw, fb = K.fuse_bn(w, b, mean, var, gamma, beta, 1e-5)
    assert rel_err(F.conv2d(x, fw, fb, padding=1), ref) < 1e-13


def test_kernel_functions_gradcheck():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, v: K.compose(u, v, 2), (a, b))
    dw = torch.randn(8, 1, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    pw = torch.randn(6, 4, 1, 1, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, v: K.dw_pw_to_full(u, v, 4, 2), (dw, pw))
