"""torch.compile of the re-parameterized layers: a training step (forward and backward) and eval
give eager's outputs and gradients, each is one graph (``fullgraph=True``: no graph break, eval
under no_grad too), the squeeze reads its parameters in place under inductor's layout
optimization, and mmengine's ``compile=True`` trains a tiny OREPA classifier. Small layers only:
compiling is slow on the CPU."""
import re

import pytest
import torch

from mmorepa.layers import DiverseBranchBlock, OREPAConv1x1, OREPAConv2d, OREPALargeConv

from helpers import randomize_, rel_err

LAYERS = {
    'orepa-3x3-kernel': lambda: OREPAConv2d(4, 8, 3, stride=2, groups=2,
                                            norm_cfg=dict(type='BN'), route='kernel'),
    'orepa-3x3-feature': lambda: OREPAConv2d(4, 8, 3, groups=2, route='feature'),
    'rep-1x1': lambda: OREPAConv1x1(4, 8, stride=2, norm_cfg=dict(type='BN')),
    'deep-stem': lambda: OREPALargeConv(3, 8, 5, stride=2, norm_cfg=dict(type='BN')),
    'dbb': lambda: DiverseBranchBlock(4, 8, 3),
}


def _layer(name):
    layer = randomize_(LAYERS[name](), torch.Generator().manual_seed(0)).double()
    return layer


def _train_step(fn, layer, x):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    (out.sin() * out).sum().backward()
    return [out.detach(), x.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize('name', list(LAYERS))
def test_compiled_training_step_and_eval_equal_eager(name):
    """aot_eager: the graphs autograd and the compiler trace, run by eager kernels."""
    torch._dynamo.reset()
    eager, compiled = _layer(name), _layer(name)
    x = torch.randn(2, eager.in_channels, 7, 7, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    run = torch.compile(compiled, backend='aot_eager', fullgraph=True)
    for _ in range(2):  # the second step after the parameters' gradients exist
        want = _train_step(eager, eager, x)
        got = _train_step(run, compiled, x)
        for w, g in zip(want, got):
            assert rel_err(g, w) <= 1e-12
    eager.eval(), compiled.eval()
    run_eval = torch.compile(compiled, backend='aot_eager', fullgraph=True)
    with torch.no_grad():
        assert rel_err(run_eval(x), eager(x)) <= 1e-12


@pytest.mark.parametrize('options', [None, {'layout_optimization': False}])
def test_inductor_training_step_equals_eager(options):
    """Inductor's defaults, and with its layout optimization off."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = OREPAConv2d(4, 8, 3, groups=2, route='kernel').train()
    compiled = OREPAConv2d(4, 8, 3, groups=2, route='kernel').train()
    compiled.load_state_dict(eager.state_dict())
    x = torch.randn(2, 4, 6, 6)
    want = _train_step(eager, eager, x)
    got = _train_step(torch.compile(compiled, fullgraph=True, options=options), compiled, x)
    for w, g in zip(want, got):
        assert rel_err(g, w) <= 1e-5


def _squeeze_calls(code: str):
    """The operand lists of the squeeze operators' calls in inductor's generated code."""
    call = r'torch\.ops\.mmorepa\.squeeze(?:_backward)?\.default\((?:buf\d+, )?'
    return re.findall(call + r'\[([^]]*)\]', code)


def test_inductor_default_layout_reads_the_leaves_in_place():
    """With inductor's defaults, layout optimization lays the network's convs out channels-last;
    the squeeze operators still read every leaf where it is, forward and backward: no copy of a
    parameter to channels-last and back each step. It reads inductor's generated code (the text
    of the operators' calls), so a change of inductor's code format fails it too."""
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(OREPAConv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16),
                                torch.nn.ReLU(), OREPAConv2d(16, 16, 3, padding=1)).train()
    run = torch.compile(model)
    x = torch.randn(2, 16, 8, 8)
    _, codes = run_and_get_code(lambda: run(x).sum().backward())
    code = '\n'.join(codes)
    assert re.search(r'empty_strided_cpu\(\(16, 16, 3, 3\), \(144, 1, 48, 16\)', code), \
        'layout optimization is on: the squeezed kernels go to the convs channels-last'
    calls = _squeeze_calls(code)
    assert len(calls) == 4  # two layers, forward and backward
    for operands in calls:  # parameters (or views of them, torch 2.4), never a buffer copied
        assert 'primals_' in operands and not re.search(r'\bbuf\d+', operands), \
            f'a squeeze reads a copy of its parameters: {operands}'


def test_mmengine_compile_trains_a_tiny_orepa_classifier(tmp_path):
    """``compile=True`` (here with the aot_eager backend) trains the same weights as eager."""
    from mmengine.config import Config
    from mmengine.runner import Runner

    from mmorepa.datasets import make_shapes_dataset
    data = make_shapes_dataset(tmp_path / 'data', num_train=8, num_val=4, size=16)
    weights = {}
    for compile_cfg in (False, dict(backend='aot_eager')):
        torch._dynamo.reset()
        cfg = Config(dict(
            default_scope='mmpretrain', custom_imports=dict(imports=['mmorepa']),
            model=dict(type='ImageClassifier',
                       backbone=dict(type='ResNet_CIFAR', depth=18, num_stages=1,
                                     strides=(1, ), dilations=(1, ), out_indices=(0, ),
                                     base_channels=4, stem_channels=4,
                                     conv_cfg=dict(type='OREPA')),
                       neck=dict(type='GlobalAveragePooling'),
                       head=dict(type='LinearClsHead', num_classes=3, in_channels=4)),
            data_preprocessor=dict(num_classes=3, mean=[127.5] * 3, std=[64.0] * 3),
            train_dataloader=dict(
                batch_size=4, num_workers=0,
                dataset=dict(type='CustomDataset', data_root=str(data / 'cls'), data_prefix='train',
                             pipeline=[dict(type='LoadImageFromFile'),
                                       dict(type='PackInputs')]),
                sampler=dict(type='DefaultSampler', shuffle=False)),
            optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9)),
            train_cfg=dict(by_epoch=True, max_epochs=1), compile=compile_cfg,
            default_hooks=dict(checkpoint=None, logger=dict(type='LoggerHook', interval=1)),
            randomness=dict(seed=0), work_dir=str(tmp_path / str(bool(compile_cfg))),
            env_cfg=dict(dist_cfg=dict(backend='gloo')), log_level='WARNING'))
        runner = Runner.from_cfg(cfg)
        runner.train()
        if compile_cfg:
            assert hasattr(runner.model.train_step, '_torchdynamo_orig_callable')
        weights[bool(compile_cfg)] = {k: v.detach().clone() for k, v in
                                      runner.model.state_dict().items()}
    assert weights[True].keys() == weights[False].keys()
    for k in weights[False]:
        if weights[False][k].is_floating_point():
            assert rel_err(weights[True][k], weights[False][k]) <= 1e-4, k
