"""The analysis tools on tiny models: the training-cost benchmark and the branch analysis."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.registry import init_default_scope

import mmorepa  # noqa: F401
from mmorepa.ops import branches as B

from helpers import randomize_network_, without_python_warnings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools' / 'analysis'))


def test_benchmark_tool_runs_each_variant_in_its_own_process(tmp_path):
    out = tmp_path / 'bench.json'
    proc = subprocess.run(
        [sys.executable, 'tools/analysis/benchmark_train_cost.py', '--archs', 'resnet18',
         '--reparams', 'none', 'orepa', '--batch-size', '2', '--input-size', '32', '--steps',
         '2', '--warmup', '1', '--threads', '1', '--repeats', '2', '--eval', '--profile', '1',
         '--json', str(out), '--plot', str(tmp_path / 'fig8.png')],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r['reparam'] for r in rows] == ['none', 'orepa']
    plain, orepa = rows
    assert plain['time_ratio'] == 1.0 and plain['mem_ratio'] == 1.0
    assert orepa['time_ratio'] == pytest.approx(orepa['step_s'] / plain['step_s'])
    assert orepa['params'] > plain['params']  # the training-time branches
    assert all(r['peak_mb'] > 0 and r['eval_fused_s'] > 0 for r in rows)
    assert '| resnet18 | orepa | 1 | default |' in proc.stdout and 'x plain' in proc.stdout
    assert all(r['malloc'] == 'default' and 'faulted_mib' in r for r in rows)
    assert '| CPU s/step | x plain | page-faulted MiB/step |' in proc.stdout
    for r in rows:  # two processes per variant; the fastest is reported
        assert len(r['step_s_all']) == 2 and r['step_s'] == min(r['step_s_all'])
    # the machine-independent counters, with ratios, lead the output
    assert plain['flops_ratio'] == 1.0 and plain['saved_ratio'] == 1.0
    assert orepa['flops'] > plain['flops'] > 0 and orepa['saved_bytes'] > plain['saved_bytes'] > 0
    assert orepa['saved_ratio'] == pytest.approx(orepa['saved_bytes'] / plain['saved_bytes'])
    assert orepa['param_state_bytes'] == 3 * 4 * orepa['params']
    assert proc.stdout.index('GFLOP') < proc.stdout.index('s/step')
    assert (tmp_path / 'fig8.png').stat().st_size > 5000
    # --profile: the operator groups and, eager on the CPU, the faults by phase of the step
    for r in rows:
        faults = r['profile']['faults']
        assert faults['total'] >= 0 and all(
            k.split(':')[0] in ('forward', 'backward', 'optimizer') for k in faults['by_op'])
        assert (f'page-faulted MiB per step by phase and operator: resnet18 {r["label"]}'
                in proc.stdout)


def test_benchmark_sgd_default_leaves_the_choice_to_torch():
    """``--sgd default`` passes no implementation option: torch picks as it does for users
    (the for-loop on the CPU, foreach on CUDA); the other choices force theirs."""
    import benchmark_train_cost as bench
    params = [torch.nn.Parameter(torch.randn(3))]
    chosen = {impl: bench.make_sgd(params, impl).defaults for impl in bench.SGD_IMPLS}
    assert chosen['default']['foreach'] is None and not chosen['default']['fused']
    assert chosen['for-loop']['foreach'] is False and chosen['foreach']['foreach'] is True
    assert chosen['fused']['fused'] is True
    assert bench.parse_args(['--regimes', 'cifar-r18-b16']).sgd == 'default'


def test_benchmark_malloc_keep_sets_glibcs_tunables_for_its_processes(monkeypatch):
    """``--malloc keep`` runs a variant's process with glibc's trim and mmap thresholds out of
    reach (freed memory stays in the process); ``default`` leaves the environment as it is."""
    import benchmark_train_cost as bench
    monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.arena_max=2')
    envs = []

    def fake_run(cmd, env, **kwargs):
        envs.append(env)
        return subprocess.CompletedProcess(cmd, 0, stdout='{}\n', stderr='')
    monkeypatch.setattr(bench.subprocess, 'run', fake_run)
    for malloc in ('default', 'keep'):
        bench.run_variant(dict(arch='a', reparam='orepa', threads=1, malloc=malloc))
    assert envs[0]['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2'
    assert envs[1]['GLIBC_TUNABLES'] == ('glibc.malloc.arena_max=2:'
                                         'glibc.malloc.trim_threshold=1099511627776:'
                                         'glibc.malloc.mmap_threshold=4294967296')
    assert bench.parse_args(['--regimes', 'cifar-r18-b16']).malloc == ['default']


def test_benchmark_ratios_pair_each_variant_with_plain_under_its_own_malloc():
    import benchmark_train_cost as bench
    runs = (('plain', 'default', 2.0), ('orepa', 'default', 3.0), ('plain', 'keep', 1.0),
            ('orepa', 'keep', 1.5))
    rows = [dict(arch='a', reparam=r, threads=2, malloc=m, step_s=t, peak_mb=t, flops=1,
                 saved_bytes=1) for r, m, t in runs]
    bench.add_ratios(rows)
    assert [r['time_ratio'] for r in rows] == [1.0, 1.5, 1.0, 1.5]


def test_benchmark_counters_by_hand():
    """The counters on a model small enough to count by hand: a conv, a ReLU, a linear."""
    import benchmark_train_cost as bench
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
    fc = torch.nn.Linear(4 * 5 * 5, 10)
    model = torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.Flatten(), fc)
    x, y = torch.randn(2, 3, 5, 5), torch.tensor([1, 2])
    c = bench.count_step(model, x, y)
    conv_fwd = 2 * 2 * 4 * 5 * 5 * 3 * 9  # 2 flops per MAC
    fc_fwd = 2 * 2 * 100 * 10
    # backward: the conv needs only its weight gradient (the input needs none), the linear both
    assert c['flops'] == conv_fwd + conv_fwd + 3 * fc_fwd
    # saved: the conv keeps x (its weight is a parameter), ReLU its output, linear its input
    # (a view of the ReLU output: same storage), cross-entropy its log-softmax (2 x 10 floats),
    # the int64 targets and the loss's total weight (one float)
    assert c['saved_bytes'] == 4 * (2 * 3 * 5 * 5 + 2 * 4 * 5 * 5 + 2 * 10) + 8 * 2 + 4
    assert c['param_state_bytes'] == 3 * 4 * sum(p.numel() for p in model.parameters())


def test_benchmark_counters_squeeze_function_vs_autograd():
    """The OREPA squeeze operator keeps less for backward than autograd through the same math,
    at the same FLOPs up to the fixed filters' gradient it does as a (counted) batched product
    (the counter sees into the operator through its registered FLOP formula). The benchmark's
    own model builder and counter, in this process (``--counters-only --squeeze ...``)."""
    import benchmark_train_cost as bench
    from mmorepa.layers import OREPAConv1x1, OREPAConv2d
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 2])
    rows = {}
    for impl in ('autograd', 'function'):
        for reparam in ('none', 'orepa'):
            torch.manual_seed(0)
            model, _ = bench._build(dict(arch='resnet18', reparam=reparam, squeeze=impl), 'cpu')
            model(x)  # the lazy head
            rows[impl, reparam] = bench.count_step(model, x, y)
    a = {r: rows['autograd', r] for r in ('none', 'orepa')}
    f = {r: rows['function', r] for r in ('none', 'orepa')}
    assert a['none']['saved_bytes'] == f['none']['saved_bytes']  # plain: untouched
    assert f['orepa']['saved_bytes'] < a['orepa']['saved_bytes']
    # the operator does the fixed filters' gradient as a batched product, which the counter
    # sees, where autograd does it as uncounted element-wise multiply-and-sum: a few
    # multiply-adds per element of each layer's squeezed kernel
    kernel_elements = sum(
        m.out_channels * m.in_channels // m.groups * m.kernel_size[0] ** 2
        for m in bench.build_model('resnet18', 'orepa').modules()
        if isinstance(m, (OREPAConv2d, OREPAConv1x1)))
    assert 0 <= f['orepa']['flops'] - a['orepa']['flops'] <= 2 * 7 * kernel_elements


def test_benchmark_components_follow_fig8():
    import benchmark_train_cost as bench
    args = bench.argparse.Namespace(archs=['resnet18', 'resnet50'], reparams=None,
                                    components=True)
    labels = [(v['arch'], v['label']) for v in bench.variants(args)]
    r18 = [label for arch, label in labels if arch == 'resnet18']
    r50 = [label for arch, label in labels if arch == 'resnet50']
    assert r18[:3] == ['none', 'dbb', 'orepa'] and len(r18) == 7  # no Rep-1x1 in ResNet-18
    assert r50[-1] == 'orepa: + Rep-1x1' and len(r50) == 8
    first = bench.COMPONENTS[0][1]
    model = bench.build_model('resnet18', 'orepa', first)
    assert set(model.backbone.layer1[0].conv1.branches) == set(first['branches'])
    assert type(model.backbone.conv1) is torch.nn.Conv2d  # no linear deep stem yet


def test_branch_similarity_tool(tmp_path):
    import branch_similarity as bs
    cfg_path = tmp_path / 'tiny.py'
    cfg_path.write_text('''default_scope = 'mmpretrain'
custom_imports = dict(imports=['mmorepa'], allow_failed_imports=False)
model = dict(type='ImageClassifier',
    backbone=dict(type='OREPAResNet', depth=50, base_channels=8, stage_blocks=(1, 1, 1, 1)),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes=4, in_channels=256))
''')
    init_default_scope('mmpretrain')
    from mmpretrain.registry import MODELS
    torch.manual_seed(0)
    model = MODELS.build(dict(type='ImageClassifier', backbone=dict(
        type='OREPAResNet', depth=50, base_channels=8, stage_blocks=(1, 1, 1, 1)),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=4, in_channels=256)))
    randomize_network_(model)
    ckpt = tmp_path / 'model.pth'
    torch.save(dict(state_dict=model.state_dict()), ckpt)
    out_dir, summary = bs.main([str(cfg_path), str(ckpt), '--out-dir', str(tmp_path / 'out')])
    names = set(summary)
    assert 'backbone.layer1.0.conv2' in names and 'backbone.layer1.0.conv1' in names  # 3x3, 1x1
    assert 'backbone.conv1.generators.0' in names
    for name in names:
        assert (out_dir / f'{name}_cosine.png').stat().st_size > 1000
        assert (out_dir / f'{name}_norms.png').exists()
    r = summary['backbone.layer1.0.conv2']
    cos = torch.tensor(r['cosine'])
    assert r['branches'] == list(model.backbone.layer1[0].conv2.branches)
    assert torch.allclose(cos, cos.T) and torch.allclose(cos.diag(), torch.ones(len(cos)))
    # one entry by hand: cosine of the scaled kxk and 1x1 contributions
    layer = model.backbone.layer1[0].conv2
    with torch.no_grad():
        ks = layer.branch_kernels()
        kxk, one = B.KXK.name, B.ONE_BY_ONE.name
        a = (layer.scales[0].reshape(-1, 1, 1, 1) * ks[kxk]).flatten().double()
        i = layer.branches.index(one)
        b = (layer.scales[i].reshape(-1, 1, 1, 1) * ks[one]).flatten().double()
    assert cos[0, i].item() == pytest.approx((a @ b / a.norm() / b.norm()).item(), abs=1e-6)



def test_benchmark_regimes_build_the_stock_classifier_with_conv_cfg(tmp_path):
    """--regimes: mmpretrain's ImageClassifier with the stock backbone class, plain / DBB /
    OREPA (auto) / OREPA (kernel route) through conv_cfg; the ratio plot against batch x pixels."""
    import benchmark_train_cost as bench
    from mmpretrain.models.backbones import ResNet_CIFAR

    from mmorepa.layers import DiverseBranchBlock, OREPAConv2d
    args = bench.argparse.Namespace(regimes=['cifar-r18-b16', 'in-r50-224px'], variants=None)
    todo = list(bench.variants(args))
    assert [(v['regime'], v['label']) for v in todo] == [
        (r, v) for r in args.regimes for v in ('plain', 'dbb', 'orepa', 'orepa-kernel')]
    layers = {}
    for variant in bench.REGIME_VARIANTS:
        model, batch, size, classes = bench.build_regime_model('cifar-r18-b16', variant)
        assert (batch, size, classes) == (16, 32, 10)
        assert type(model.classifier.backbone) is ResNet_CIFAR
        layers[variant] = model.classifier.backbone.layer4[1].conv2
    assert type(layers['plain']) is torch.nn.Conv2d
    assert isinstance(layers['dbb'], DiverseBranchBlock)
    assert isinstance(layers['orepa'], OREPAConv2d) and layers['orepa'].route == 'auto'
    assert layers['orepa-kernel'].route == 'kernel'
    # layer4 of the CIFAR ResNet-18 at batch 16: 4 x 4 positions, the feature route is cheaper
    x = torch.randn(16, 512, 4, 4, requires_grad=True)
    assert layers['orepa'].pair_route(x) == 'feature'
    assert layers['orepa-kernel'].pair_route(x) == 'kernel'
    rows = [dict(regime=r, label=v, time_ratio=t, flops_ratio=1.0)
            for r, v, t in [('cifar-r18-b16', 'orepa', 1.3), ('cifar-r18-b16', 'orepa-kernel', 2.0),
                            ('in-r50-224px', 'orepa', 1.1)]]
    out = bench.plot_regimes(rows, str(tmp_path / 'ratio.png'))
    assert Path(out).stat().st_size > 5000


@pytest.mark.parametrize('entry', ['no_such_option=1', 'layout_optimization', 'layout_optimization=Fals'])
def test_benchmark_refuses_a_bad_compile_option_in_one_line(entry):
    r = subprocess.run([sys.executable, 'tools/analysis/benchmark_train_cost.py', '--regimes',
                        'cifar-r18-b16', '--compile', '--compile-options', entry],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and 'Traceback' not in r.stderr
    assert without_python_warnings(r.stderr).strip().splitlines() == [
        f"benchmark_train_cost: bad --compile-options entry {entry!r}: expected KEY=VALUE with "
        "KEY an inductor option and VALUE a Python literal"]


def test_benchmark_profile_puts_each_component_in_its_group(monkeypatch, capsys):
    """--profile: the squeeze's forward and backward, the pair's compositions (kernel route),
    the feature-route convs, the model's convs and the optimizer each get their own time; a
    plain model has none in the OREPA groups; the table gives the speed-up between thread
    counts."""
    import benchmark_train_cost as bench
    from mmorepa.layers import OREPAConv2d
    from mmorepa.layers.routes import PairRoutes
    monkeypatch.setattr(PairRoutes, '_pair_on_features', PairRoutes._pair_on_features)
    bench.mark_feature_route()
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)

    def profile(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            opt.step()
        step()
        return bench.profile_components(step, 2)
    orepa = profile(torch.nn.Sequential(OREPAConv2d(4, 8, 3, padding=1, route='kernel'),
                                        OREPAConv2d(8, 8, 3, padding=1, route='feature')))
    plain = profile(torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1),
                                        torch.nn.Conv2d(8, 8, 3, padding=1)))
    assert set(orepa['groups']) == set(bench.GROUPS)
    for group in ('model convs', 'squeeze forward', 'squeeze backward', 'pair compositions',
                  'feature-route convs', 'optimizer'):
        assert orepa['groups'][group] > 0, group
    for group in ('squeeze forward', 'squeeze backward', 'pair compositions',
                  'feature-route convs'):
        assert plain['groups'][group] == 0, group
    assert plain['groups']['model convs'] > 0 and plain['groups']['optimizer'] > 0
    rows = [dict(arch='a', label='orepa', threads=n, malloc='default', profile=orepa)
            for n in (1, 2)]
    bench.print_components(rows, 2)
    out = capsys.readouterr().out
    assert '| group | arch | re-param | malloc | 1 thr | 2 thr | speed-up 1 -> 2 thr |' in out
    assert '| squeeze backward | a | orepa | default |' in out and '1.00x |' in out


def _fresh_block(mib: int) -> torch.Tensor:
    """``mib`` MiB of freshly mapped memory in base pages, as a float32 tensor."""
    import mmap
    block = mmap.mmap(-1, mib * 2 ** 20)
    try:
        block.madvise(mmap.MADV_NOHUGEPAGE)
    except (AttributeError, OSError):  # a kernel without transparent huge pages
        pass
    return torch.frombuffer(block, dtype=torch.float32)


def test_benchmark_fault_profile_names_the_phase_and_operator_that_faults(capsys):
    """--profile's page faults: freshly mapped memory counts where an operator first writes it,
    in its phase, every step, the most first; a phase that writes memory it already holds counts
    none."""
    import benchmark_train_cost as bench
    kept = torch.zeros(2 ** 22)

    def fresh():
        _fresh_block(64).fill_(1.0)
        _fresh_block(16).add_(1.0)

    def reuse():
        kept.fill_(2.0)
    faults = bench.fault_profile((('reuse', reuse), ('fresh', fresh)), 2)
    fill, add = faults['by_op']['fresh: aten::fill_.Scalar'], faults['by_op'][
        'fresh: aten::add_.Tensor']
    assert 63 <= fill <= 65 and 15 <= add <= 17 and fill + add <= faults['total'], faults
    assert list(faults['by_op'])[:2] == ['fresh: aten::fill_.Scalar', 'fresh: aten::add_.Tensor']
    assert not [k for k in faults['by_op'] if k.startswith('reuse')], faults
    bench.print_faults(dict(arch='a', label='orepa', threads=2, malloc='default',
                            profile=dict(faults=faults)), 2)
    out = capsys.readouterr().out
    assert '| fresh: aten::fill_.Scalar | 6' in out
