"""The OREPA squeeze as one operator with its own backward
(:func:`mmorepa.ops.squeeze.squeezed_kernel`): same value as the reference written with the
branches' kernel functions, hand-written backward checked by gradcheck (float64) and against
autograd through the reference, it keeps only the leaves for backward, and torch.compile's view of
it (fake outputs) matches what it does. On the CPU the memory-bound branches run in the extension
``mmorepa._squeeze_cpu``; the tests marked with the ``path`` fixture run both it and torch's
operators (the path of every other device). Every test iterates over the branch registry."""
import io
import itertools

import pytest
import torch

from mmorepa.layers import OREPAConv1x1, OREPAConv2d
from mmorepa.ops import algebra as K
from mmorepa.ops import branches as B
from mmorepa.ops import extension
from mmorepa.ops import squeeze as S

from helpers import randomize_, rel_err

CIN, COUT = 4, 8
# every OREPA branch, in the registry's order; Rep-1x1's branches (a 1x1 and a 1x1-1x1 pair)
ALL = B.names(B.OREPA_BRANCHES)
REP1X1 = B.names(B.REP1X1_BRANCHES)
PAIR = B.ONE_BY_ONE_KXK.name


@pytest.fixture(params=['extension', 'operators'])
def path(request, monkeypatch):
    """The squeeze's CPU extension, or torch's operators alone (the extension hidden)."""
    if request.param == 'operators':
        monkeypatch.setattr(extension, 'squeeze_cpu', None)
    else:
        assert extension.squeeze_cpu is not None, \
            f'mmorepa._squeeze_cpu not loaded ({extension.unavailable_reason()})'
    return request.param


@pytest.fixture
def extension_calls(monkeypatch):
    """The calls of the extension's two functions, ``(name, args)`` in order (they still run)."""
    assert extension.squeeze_cpu is not None, 'mmorepa._squeeze_cpu is not built'
    calls = []
    for name in ('squeeze_forward', 'squeeze_backward'):
        fn = getattr(extension.squeeze_cpu, name)
        monkeypatch.setattr(extension.squeeze_cpu, name,
                            lambda *a, _f=fn, _n=name: calls.append((_n, a)) or _f(*a))
    return calls


def _case(branches, k, groups, scaling, identity=True, m=2, seed=0, cin=None, cout=None,
          dt=torch.float64):
    g = torch.Generator().manual_seed(seed)
    CIN, COUT = cin or globals()['CIN'], cout or globals()['COUT']

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=dt)

    geometry = B.Geometry(CIN, COUT, k, groups, m)
    leaves = {leaf.attr: rnd(*leaf.shape(geometry))
              for b in B.lookup(branches) for leaf in b.leaves}
    scales = {'vector': rnd(len(branches), COUT), 'scalar': rnd(len(branches), 1),
              'none': None}[scaling]
    ident = K.identity_kernel(CIN, groups, dtype=dt) if identity else None
    return leaves, scales, ident, K.frequency_prior(COUT, k, dtype=dt)


def _check(branches, k, groups, scaling, identity=True, fast_mode=True):
    leaves, scales, ident, prior = _case(branches, k, groups, scaling, identity)
    names = list(leaves)
    inputs = [leaves[n].requires_grad_() for n in names]
    if scales is not None:
        inputs.append(scales.requires_grad_())

    def call(fn):
        def f(*xs):
            s = xs[len(names)] if scales is not None else None
            return fn(branches, dict(zip(names, xs)), s, k, groups, CIN, ident, prior)
        return f

    fast, ref = call(S.squeezed_kernel), call(S.squeezed_kernel_reference)
    assert torch.autograd.gradcheck(fast, inputs, fast_mode=fast_mode)
    # against autograd through the reference (an independent derivation of the same gradient)
    out = fast(*inputs)
    assert rel_err(out, ref(*inputs)) <= 1e-13
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, inputs, g),
                    torch.autograd.grad(ref(*inputs), inputs, g)):
        assert rel_err(a, b) <= 1e-12


@pytest.mark.parametrize('branches', [bs for r in range(1, 7)
                                      for bs in itertools.combinations(ALL, r)
                                      if r in (1, 6) or bs in (
                                          B.names((B.ONE_BY_ONE_KXK, B.ONE_BY_ONE)),
                                          B.names((B.ONE_BY_ONE_FREQ, B.DW_PW)))])
@pytest.mark.parametrize('scaling', ['vector', 'scalar', 'none'])
def test_every_single_branch_and_all_k3_groups2(branches, scaling, path):
    _check(branches, 3, 2, scaling)


@pytest.mark.parametrize('k', [1, 5, 7])
@pytest.mark.parametrize('groups', [1, 4])
def test_all_branches_other_sizes(k, groups, path):
    _check(ALL, k, groups, 'vector')


def test_full_jacobian_all_branches():
    _check(ALL, 3, 2, 'vector', fast_mode=False)


def test_rep1x1_form_without_identity(path):
    _check(REP1X1, 1, 1, 'vector', identity=False)
    _check(REP1X1[1:], 1, 2, 'scalar', identity=False)


def test_frozen_leaves_get_no_gradient(path):
    leaves, scales, ident, prior = _case(ALL, 3, 1, 'vector')
    dw, kxk = B.DW_PW.leaves[0].attr, B.KXK.leaves[0].attr
    leaves[dw].requires_grad_()
    out = S.squeezed_kernel(ALL, leaves, scales, 3, 1, CIN, ident, prior)
    out.sum().backward()
    assert leaves[dw].grad is not None and leaves[kxk].grad is None


@pytest.mark.parametrize('make', [lambda: OREPAConv2d(8, 16, 3, groups=2),
                                  lambda: OREPAConv1x1(8, 12)])
def test_layer_keeps_only_its_parameters_for_backward(make):
    """The point of the node: nothing but the parameters (and buffers) is saved for backward,
    where autograd through the reference keeps scaled factors and composed intermediates."""
    layer = randomize_(make())
    state = {t.untyped_storage().data_ptr() for t in list(layer.parameters()) +
             list(layer.buffers())}

    def saved_bytes(impl):
        saved = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in state:
                saved[ptr] = t.untyped_storage().nbytes()
            return t

        for m in layer.modules():  # the deep stem's generators too
            if hasattr(m, 'squeeze_fn'):
                m.squeeze_fn = impl
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            kernel = layer.squeezed_kernel_and_bias()[0]
        return sum(saved.values()), kernel

    fast, k1 = saved_bytes(S.squeezed_kernel)
    slow, k2 = saved_bytes(S.squeezed_kernel_reference)
    assert fast == 0 and slow > 0
    assert rel_err(k1, k2) <= 1e-6


@pytest.mark.parametrize('branches, k, groups, identity, channels_last', [
    (ALL, 3, 2, True, False), (REP1X1, 1, 1, False, False), (ALL, 3, 1, True, True)])
def test_operators_pass_opcheck(branches, k, groups, identity, channels_last, path):
    """``mmorepa::squeeze`` and its backward as torch.compile sees them: the fake (meta) outputs
    have the real shapes and strides (also for leaves in channels-last memory format, as
    ``model.to(memory_format=torch.channels_last)`` leaves them), the schema holds, and a traced
    call equals an eager one (``torch.library.opcheck``; autograd is the node's, tested above)."""
    leaves, scales, ident, prior = _case(branches, k, groups, 'vector', identity)
    names = [leaf.attr for b in B.lookup(branches) for leaf in b.leaves]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    tensors = [leaves[n].contiguous(memory_format=fmt) for n in names]
    spec = ','.join(branches)
    torch.library.opcheck(S._squeeze_op, (tensors, scales, ident, prior, spec, k, groups, CIN,
                                          COUT))
    grad = torch.randn(COUT, CIN // groups, k, k, dtype=torch.float64)
    torch.library.opcheck(S._squeeze_backward_op,
                          (grad.contiguous(memory_format=fmt), tensors, scales, ident, prior,
                           spec, k, groups, CIN, [True] * len(tensors), True))


def test_torch_func_grad_through_the_squeeze():
    """``torch.func.grad`` takes gradients through the squeeze node, equal to autograd through
    the reference (float64)."""
    branches = ALL
    leaves, scales, ident, prior = _case(branches, 3, 2, 'vector')
    g = torch.randn(COUT, CIN // 2, 3, 3, dtype=torch.float64)

    def loss(fn):
        return lambda lv, s: (fn(branches, lv, s, 3, 2, CIN, ident, prior) * g).sum()
    fast = torch.func.grad(loss(S.squeezed_kernel), argnums=(0, 1))(leaves, scales)
    ref = torch.func.grad(loss(S.squeezed_kernel_reference), argnums=(0, 1))(leaves, scales)
    for n in leaves:
        assert rel_err(fast[0][n], ref[0][n]) <= 1e-12
    assert rel_err(fast[1], ref[1]) <= 1e-12


def test_onnx_export_of_an_unfused_layer_is_refused_and_the_fused_one_exports():
    """TorchScript tracing (``torch.onnx.export``) of a layer that was not fused first raises,
    saying to fuse it (its traced graph would be wrong: in-place updates of views); the fused
    layer exports and onnxruntime gives its output."""
    import onnxruntime as ort
    from mmorepa import reparameterize
    layer = randomize_(OREPAConv2d(4, 8, 3, padding=1)).eval()
    x = torch.randn(1, 4, 6, 6)
    with pytest.raises(RuntimeError, match='fuse the model first'):
        torch.onnx.export(layer, (x, ), io.BytesIO(), dynamo=False)
    fused = reparameterize(layer)
    f = io.BytesIO()
    torch.onnx.export(fused, (x, ), f, dynamo=False)
    sess = ort.InferenceSession(f.getvalue(), providers=['CPUExecutionProvider'])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert rel_err(torch.from_numpy(out).double(), layer(x).double()) <= 1e-5


@pytest.mark.parametrize('k, m, groups, threads', [
    (3, 8, 1, 1), (3, 8, 3, 2), (3, 16, 1, 2), (5, 8, 1, 1), (1, 8, 2, 2), (7, 3, 1, 2),
    (9, 8, 1, 2), (11, 8, 3, 1), (3, 8, 24, 2)])
def test_extension_vector_paths_against_the_reference(k, m, groups, threads, extension_calls):
    """The extension's compiled shapes (1x1, 3x3, 5x5 and 7x7 taps; dw-pw expansion 8 and 16 in
    vectors) and its general loops (9x9 and 11x11 taps, expansion 3), grouped and depthwise, one
    and two threads (the threads share the input channels and sum the scales' gradients), against
    autograd through the reference in float64: value and every gradient (the extension ran)."""
    cin = cout = 24
    branches = ALL
    leaves, scales, ident, prior = _case(branches, k, groups, 'vector', m=m, seed=k + m,
                                         cin=cin, cout=cout)
    inputs = [t.requires_grad_() for t in leaves.values()] + [scales.requires_grad_()]
    g = torch.randn(cout, cin // groups, k, k, dtype=torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = S.squeezed_kernel(branches, leaves, scales, k, groups, cin, ident, prior)
        grads = torch.autograd.grad(out, inputs, g)
    finally:
        torch.set_num_threads(before)
    assert [name for name, _ in extension_calls] == ['squeeze_forward', 'squeeze_backward']
    ref = S.squeezed_kernel_reference(branches, leaves, scales, k, groups, cin, ident, prior)
    assert rel_err(out, ref) <= 1e-13
    for a, b in zip(grads, torch.autograd.grad(ref, inputs, g)):
        assert rel_err(a, b) <= 1e-12


def test_extension_float32_against_the_float64_reference():
    """float32 (what models train in): within float32 rounding of the float64 reference."""
    branches = ALL
    leaves, scales, ident, prior = _case(branches, 3, 1, 'vector', m=8, cin=32, cout=48)
    single = {n: t.float().requires_grad_() for n, t in leaves.items()}
    s32 = scales.float().requires_grad_()
    out = S.squeezed_kernel(branches, single, s32, 3, 1, 32, ident.float(), prior.float())
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(single.values()) + [s32], g)
    inputs = [t.requires_grad_() for t in leaves.values()] + [scales.requires_grad_()]
    ref = S.squeezed_kernel_reference(branches, leaves, scales, 3, 1, 32, ident, prior)
    assert rel_err(out, ref) <= 1e-6
    for a, b in zip(grads, torch.autograd.grad(ref, inputs, g.double())):
        assert rel_err(a, b) <= 1e-5


def test_extension_runs_the_cpu_training_step_and_not_the_flop_count(extension_calls):
    """A CPU training step of an OREPA layer calls the extension forward and backward (so a
    broken build cannot leave every test on the operators); FLOP counting (meta tensors) and
    the other dtypes do not."""
    from torch.utils.flop_counter import FlopCounterMode
    calls = extension_calls  # (name, args) of each call
    layer = randomize_(OREPAConv2d(8, 16, 3, padding=1, route='kernel')).train()
    layer(torch.randn(2, 8, 6, 6)).sum().backward()
    assert [name for name, _ in calls] == ['squeeze_forward', 'squeeze_backward']
    calls.clear()
    with FlopCounterMode(display=False) as counter:
        layer(torch.randn(2, 8, 6, 6)).sum().backward()
    assert counter.get_total_flops() > 0
    assert [name for name, _ in calls] == ['squeeze_forward', 'squeeze_backward']
    calls.clear()
    layer.to(torch.bfloat16)(torch.randn(2, 8, 6, 6, dtype=torch.bfloat16)).sum().backward()
    assert calls == []


def test_a_missing_extension_is_said_and_the_operators_give_the_same_kernel(monkeypatch):
    """A source tree used without its build step: one warning naming the extension and how to
    build it, and torch's operators compute the same kernel."""
    leaves, scales, ident, prior = _case(ALL, 3, 1, 'vector', m=8)
    built = S.squeezed_kernel(ALL, leaves, scales, 3, 1, CIN, ident, prior)
    monkeypatch.setattr(extension, 'squeeze_cpu', None)
    monkeypatch.setattr(extension, '_reason', 'not built')
    monkeypatch.setattr(extension, '_warned', False)
    with pytest.warns(RuntimeWarning, match=r'_squeeze_cpu not loaded \(not built\).*pip install'):
        out = S.squeezed_kernel(ALL, leaves, scales, 3, 1, CIN, ident, prior)
    assert rel_err(out, built) <= 1e-13


@pytest.mark.parametrize('k, m, groups', [(3, 8, 1), (5, 3, 2)])
def test_channels_last_gradient_is_read_in_place(k, m, groups, extension_calls):
    """A channels-last gradient of the squeezed kernel (a channels-last model's conv, or
    torch.compile's layout on the CPU) goes to the extension as it is when there is no 1x1-kxk
    pair: the same gradients as autograd through the reference (float64)."""
    branches = tuple(b for b in ALL if b != PAIR)
    leaves, scales, ident, prior = _case(branches, k, groups, 'vector', m=m, cin=16, cout=24)
    inputs = [t.requires_grad_() for t in leaves.values()] + [scales.requires_grad_()]
    g = torch.randn(24, 16 // groups, k, k, dtype=torch.float64)
    g_cl = g.contiguous(memory_format=torch.channels_last)
    assert not g_cl.is_contiguous()
    out = S.squeezed_kernel(branches, leaves, scales, k, groups, 16, None, prior)
    grads = torch.autograd.grad(out, inputs, g_cl)
    # read as (C_out, k * k, C_in / g), not copied: the backward's last argument, taps_outer
    assert [a[-1] for name, a in extension_calls if name == 'squeeze_backward'] == [True]
    ref = S.squeezed_kernel_reference(branches, leaves, scales, k, groups, 16, None, prior)
    for a, b in zip(grads, torch.autograd.grad(ref, inputs, g)):
        assert rel_err(a, b) <= 1e-12


@pytest.mark.parametrize('k, m', [(13, 2), (3, 65)])
def test_sizes_beyond_the_extension_take_the_operators(k, m, extension_calls):
    """Kernels above 11 x 11 and dw-pw expansions above 64 (beyond the extension's registers)
    take torch's operators, with the reference's value and gradients."""
    leaves, scales, ident, prior = _case(ALL, k, 1, 'vector', m=m)
    inputs = [t.requires_grad_() for t in leaves.values()] + [scales.requires_grad_()]
    out = S.squeezed_kernel(ALL, leaves, scales, k, 1, CIN, ident, prior)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, g)
    assert extension_calls == []
    ref = S.squeezed_kernel_reference(ALL, leaves, scales, k, 1, CIN, ident, prior)
    assert rel_err(out, ref) <= 1e-13
    for a, b in zip(grads, torch.autograd.grad(ref, inputs, g)):
        assert rel_err(a, b) <= 1e-12


@pytest.mark.parametrize('branch', B.OREPA_BRANCHES + B.REP1X1_BRANCHES[1:],
                         ids=lambda b: b.name)
def test_each_branch_costs_the_multiply_adds_its_record_says(branch):
    """A squeeze of one branch costs (FlopCounterMode: 2 FLOPs per multiply-add) the
    multiply-adds of its record's ``macs``, grouped, forward alone."""
    from torch.utils.flop_counter import FlopCounterMode
    k, groups = (1, 2) if branch is B.ONE_BY_ONE_1X1 else (3, 2)
    leaves, scales, ident, prior = _case((branch.name, ), k, groups, 'vector', m=3, cin=8,
                                         cout=12)
    with FlopCounterMode(display=False) as counter:
        S.squeezed_kernel((branch.name, ), leaves, scales, k, groups, 8, ident, prior)
    shapes = [leaves[a].shape for a in branch.attrs()]
    assert counter.get_total_flops() == 2 * branch.macs(shapes)
    if branch.conv_pair or branch.extension == 'separable':
        assert branch.macs(shapes) > 0
