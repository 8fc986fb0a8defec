"""The squeeze operator's backward on torch's path (kernels above the extension's 11 x 11, or
half precision, or no extension) for one output channel without scaling: each gradient is a
tensor of its own (an operator may not return two views of one tensor), equal to autograd's
through the reference in float64."""
import pytest
import torch

from mmorepa.ops import branches as B
from mmorepa.ops.algebra import frequency_prior
from mmorepa.ops.squeeze import squeezed_kernel, squeezed_kernel_reference

from helpers import rel_err


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('k', [13, 3])
def test_one_output_channel_without_scaling(dtype, k):
    g = torch.Generator().manual_seed(0)
    records = (B.KXK, B.ONE_BY_ONE, B.ONE_BY_ONE_AVG, B.ONE_BY_ONE_FREQ)
    branches = B.names(records)
    c_in = 4
    geometry = B.Geometry(c_in, 1, k)
    leaves = {leaf.attr: torch.randn(leaf.shape(geometry), generator=g)
              for r in records for leaf in r.leaves}
    prior = frequency_prior(1, k)
    upstream = torch.randn(1, c_in, k, k, generator=g)

    def grads(fn, dt):
        ls = {n: t.detach().to(dt).requires_grad_() for n, t in leaves.items()}
        out = fn(branches, ls, None, k, 1, c_in, None, prior.to(dt))
        (out * upstream.to(dt)).sum().backward()
        return {n: t.grad for n, t in ls.items()}

    ours = grads(squeezed_kernel, dtype)
    reference = grads(squeezed_kernel_reference, torch.float64)
    storages = {t.untyped_storage().data_ptr() for t in ours.values()}
    assert len(storages) == len(ours)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for n in leaves:
        assert rel_err(ours[n], reference[n]) <= tol, n
