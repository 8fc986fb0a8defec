"""Training cost of re-parameterized models (paper Table 4, Fig. 8), measured in one run.

    python tools/analysis/benchmark_train_cost.py [--archs resnet18 resnet50 ...]
        [--reparams none dbb orepa] [--batch-size 32] [--input-size 224] [--steps 10]
        [--threads N ...] [--malloc default keep] [--sgd default|for-loop|foreach|fused]
        [--components] [--eval]
        [--profile STEPS] [--json OUT]

Each variant runs in its own process, ``--repeats`` times, interleaved with the others; the
table reports the fastest of those processes (its median step), which filters out a slow process
on a shared machine (all per-process medians are kept in the JSON); on the CPU it also gives the
CPU time of the process per step (median; the least over the processes), which other work on the
machine changes far less than the wall time (with ``--threads 1`` it is the step's own work).
``--threads`` (default: torch's default thread count on this machine, one per core) may list
several counts; each variant then runs at each, interleaved. ``--malloc`` likewise: ``default``
(the process's allocator as it comes) and ``keep`` (glibc keeps freed memory in the process: its
``GLIBC_TUNABLES`` get :data:`MALLOC_KEEP`); on the CPU the table gives the memory first
touched per step (minor page faults: pages the allocator had returned to the system).
A step is a full training step (forward, cross-entropy, backward, SGD with momentum); the table
gives the median step time and the peak memory, and their ratios to the plain model of the same
architecture. On a GPU: CUDA events and
``max_memory_allocated``; on the CPU: wall clock and the peak resident memory of the process.
``--components`` adds the OREPA components one at a time (Fig. 8); ``--eval`` times the eval-mode
forward of the un-fused model against the fused one.

``--regimes`` measures mmpretrain's ``ImageClassifier`` with the stock backbone class
(``ResNet_CIFAR`` / ``ResNet``) built plain, with ``conv_cfg=dict(type='DBB')``, with
``conv_cfg=dict(type='OREPA')`` (route ``'auto'``) and with ``route='kernel'`` (every pair
composed as kernels), in the regimes of :data:`REGIMES` (batch, image size); ``--compile`` runs
the training step through ``torch.compile`` (compile time is in the warm-up steps). ``--plot``
then draws OREPA's step-time ratio against batch x output pixels of the last stage.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from mmorepa.fileio import atomic_write  # noqa: E402
from mmorepa.ops import branches as B  # noqa: E402

# name: (backbone type, depth, batch, image size, classes, last stage's output pixels)
REGIMES = {
    'cifar-r18-b16': ('ResNet_CIFAR', 18, 16, 32, 10, 4 * 4),
    'cifar-r18-b128': ('ResNet_CIFAR', 18, 128, 32, 10, 4 * 4),
    'in-r18-64px': ('ResNet', 18, 32, 64, 1000, 2 * 2),
    'in-r18-224px': ('ResNet', 18, 32, 224, 1000, 7 * 7),
    'in-r50-224px': ('ResNet', 50, 32, 224, 1000, 7 * 7),
}
# --sgd: the keyword arguments of torch.optim.SGD; 'default' passes none, so torch picks as it
# does for users (the for-loop on the CPU, foreach on CUDA)
SGD_IMPLS = {'default': {}, 'for-loop': dict(foreach=False), 'foreach': dict(foreach=True),
             'fused': dict(fused=True)}
# --malloc keep: glibc's malloc neither returns freed memory to the system (trim) nor maps large
# blocks on their own (mmap), so a step reuses its pages instead of faulting them in again. A glibc
# that caps the mmap threshold at 32 MiB refuses this one: the faulted column then stays high.
MALLOC_KEEP = 'glibc.malloc.trim_threshold=1099511627776:glibc.malloc.mmap_threshold=4294967296'
MALLOC_SETTINGS = ('default', 'keep')
# variant label: conv_cfg of the stock backbone
REGIME_VARIANTS = {'plain': None, 'dbb': dict(type='DBB'), 'orepa': dict(type='OREPA'),
                   'orepa-kernel': dict(type='OREPA', route='kernel')}
ARCHS = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'repvgg-A0', 'repvgg-A1', 'repvgg-A2')
# Fig. 8 / Table 2: OREPA components added one at a time (ResNet).
_DBB_ONLINE = (B.KXK, B.ONE_BY_ONE, B.ONE_BY_ONE_KXK, B.ONE_BY_ONE_AVG)
COMPONENTS = [
    ('online DBB branches', dict(branches=B.names(_DBB_ONLINE),
                                 linear_deep_stem=False, rep_1x1=False)),
    ('+ frequency prior', dict(branches=B.names(_DBB_ONLINE + (B.ONE_BY_ONE_FREQ, )),
                               linear_deep_stem=False, rep_1x1=False)),
    ('+ linear dw-pw', dict(linear_deep_stem=False, rep_1x1=False)),
    ('+ linear deep stem', dict(rep_1x1=False)),
    ('+ Rep-1x1', dict()),
]


def build_model(arch: str, reparam: str, orepa_cfg=None):
    """A classifier (backbone, global pooling, 1000-way linear) for the benchmark."""
    import torch.nn as nn

    import mmorepa  # noqa: F401
    from mmorepa.models import OREPAResNet, OREPAVGG
    if arch.startswith('resnet'):
        depth = int(arch[len('resnet'):])
        backbone = OREPAResNet(depth, reparam=reparam, orepa_cfg=orepa_cfg, init_cfg=None)
    elif arch.startswith('repvgg-'):
        # 'none': the plain VGG, i.e. RepVGG's fused form (3x3 conv + bias, ReLU) trained as is
        vgg_reparam = {'none': 'repvgg', 'repvgg': 'repvgg', 'orepa': 'orepa',
                       'orepa-vgg': 'orepa'}.get(reparam)
        if vgg_reparam is None:
            raise ValueError(f'reparam {reparam!r} does not apply to {arch}')
        backbone = OREPAVGG(arch.split('-')[1], reparam=vgg_reparam, deploy=reparam == 'none',
                            init_cfg=None)
    else:
        raise ValueError(f'unknown arch {arch!r}; expected one of {list(ARCHS)}')

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = backbone
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.LazyLinear(1000)

        def forward(self, x):
            return self.fc(self.pool(self.backbone(x)[-1]).flatten(1))

    return Classifier()


def build_regime_model(regime: str, variant: str):
    """mmpretrain's ``ImageClassifier`` of ``regime`` with the stock backbone class and the
    ``conv_cfg`` of ``variant`` (:data:`REGIME_VARIANTS`); returns ``(model, batch, size)``."""
    import torch.nn as nn
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS

    import mmorepa  # noqa: F401
    backbone, depth, batch, size, classes, _ = REGIMES[regime]
    init_default_scope('mmpretrain')
    model = MODELS.build(dict(
        type='ImageClassifier',
        backbone=dict(type=backbone, depth=depth, conv_cfg=REGIME_VARIANTS[variant]),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=classes,
                  in_channels=512 if depth < 50 else 2048)))

    class Logits(nn.Module):  # the classifier's logits ('tensor' mode), a plain module
        def __init__(self):
            super().__init__()
            self.classifier = model

        def forward(self, x):
            return self.classifier(x, mode='tensor')

    return Logits(), batch, size, classes


def count_step(model, x, y):
    """Machine-independent counters of one training step (forward, cross-entropy, backward).

    ``flops``: ``torch.utils.flop_counter.FlopCounterMode`` (matrix products and convolutions,
    forward and backward). ``saved_bytes``: the bytes autograd keeps for backward, i.e. every
    tensor packed by ``torch.autograd.graph.saved_tensors_hooks`` counted once per storage,
    parameters and buffers excluded (the module state is there with or without autograd).
    ``param_state_bytes``: weights + gradients + SGD momentum.
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode
    state = set()
    for t in list(model.parameters()) + list(model.buffers()):
        state.add(t.untyped_storage().data_ptr())
    saved = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in state:
                saved[ptr] = max(saved.get(ptr, 0), storage.nbytes())
        except (RuntimeError, NotImplementedError):  # tensors without a storage (opaque layouts)
            saved[('opaque', id(t))] = t.numel() * t.element_size()
        return t

    model.zero_grad(set_to_none=True)
    counter = FlopCounterMode(display=False)
    with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(flops=counter.get_total_flops(), saved_bytes=sum(saved.values()),
                param_state_bytes=3 * params)


def _rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _faulted_mib() -> float:
    """The memory this process has first touched so far (minor page faults), MiB."""
    return _minor_faults() * resource.getpagesize() / 2 ** 20


def _build(spec: dict, device):
    """The model of ``spec`` on ``device`` and its number of classes; a regime also fixes
    ``spec``'s batch size and input size."""
    classes = 1000
    if spec.get('regime'):
        model, spec['batch_size'], spec['input_size'], classes = build_regime_model(
            spec['regime'], spec['reparam'])
        model = model.to(device)
    else:
        model = build_model(spec['arch'], spec['reparam'], spec.get('orepa_cfg')).to(device)
    if spec.get('squeeze', 'function') == 'autograd':  # the squeeze before the autograd node
        from mmorepa.ops.squeeze import squeezed_kernel_reference
        from mmorepa.layers import OREPAConv1x1, OREPAConv2d
        for m in model.modules():
            if isinstance(m, (OREPAConv1x1, OREPAConv2d)):
                m.squeeze_fn = squeezed_kernel_reference
    return model, classes


def _timer(cuda: bool):
    """``timed(fn, n, cpu_times=None)``: the seconds of each of ``n`` calls of ``fn`` (CUDA events
    on a GPU; wall clock on the CPU, with the process's CPU time per call in ``cpu_times``)."""
    import torch

    def timed(fn, n, cpu_times=None):
        times = []
        for _ in range(n):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            else:
                t, c = time.perf_counter(), time.process_time()
                fn()
                times.append(time.perf_counter() - t)
                if cpu_times is not None:
                    cpu_times.append(time.process_time() - c)
        return times
    return timed


def _time_eval(model, x, steps: int, timed) -> dict:
    """Median eval-mode forward time of the un-fused ``model`` (its kernel cache filled) and of
    its fused copy."""
    import mmorepa
    import torch
    model.eval()
    with torch.no_grad():
        fused = mmorepa.reparameterize(model)
        model(x)  # fill the kernel cache
        unfused_t = timed(lambda: model(x), steps)
        fused_t = timed(lambda: fused(x), steps)
    return dict(eval_unfused_s=statistics.median(unfused_t),
                eval_fused_s=statistics.median(fused_t))


def make_sgd(params, impl: str = 'default'):
    """The step's optimizer: SGD with momentum and weight decay, implementation ``impl`` of
    :data:`SGD_IMPLS`."""
    import torch
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4, **SGD_IMPLS[impl])


def worker(spec: dict) -> dict:
    """Measure one variant (runs in its own process)."""
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(spec['threads'])
    torch.manual_seed(0)
    cuda = spec['device'] == 'cuda'
    device = torch.device(spec['device'])
    base_rss = _rss_mb()
    model, classes = _build(spec, device)
    b, s = spec['batch_size'], spec['input_size']
    x = torch.randn(b, 3, s, s, device=device)
    y = torch.randint(0, classes, (b, ), device=device)
    model.eval()
    with torch.no_grad():
        model(x[:1])  # materialise the lazy head
    opt = make_sgd(model.parameters(), spec.get('sgd', 'default'))
    params = sum(p.numel() for p in model.parameters())
    timed = _timer(cuda)
    run = (torch.compile(model, options=spec.get('compile_options') or None)
           if spec.get('compile') else model)

    loss = []

    def forward():
        opt.zero_grad(set_to_none=True)
        loss.append(F.cross_entropy(run(x), y))

    phases = (('forward', forward), ('backward', lambda: loss.pop().backward()),
              ('optimizer', opt.step))

    def step():
        for _, phase in phases:
            phase()

    model.train()
    timed(step, spec['warmup'])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    cpu_times, faulted = [], _faulted_mib()
    times = timed(step, spec['steps'], cpu_times)
    faulted = (_faulted_mib() - faulted) / max(spec['steps'], 1)
    if cuda:
        torch.cuda.synchronize()
    out = dict(spec, params=params, step_times=times,
               step_s=statistics.median(times) if times else float('nan'))
    if cpu_times:  # CPU time of the process: what the step costs, whatever else runs
        out['cpu_step_s'] = statistics.median(cpu_times)
        out['faulted_mib'] = faulted
    if cuda:
        out['peak_mb'] = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        out['peak_mb'] = _rss_mb()
        out['base_mb'] = base_rss
    if spec.get('profile'):
        mark_feature_route()
        out['profile'] = profile_components(step, spec['profile'])
        if not cuda and not spec.get('compile'):
            out['profile']['faults'] = fault_profile(phases, spec['profile'])
    out.update(count_step(model, x, y))  # after the timed steps (eager): no effect on them
    out['routes'] = _routes(model, x)
    if spec.get('eval'):
        opt.zero_grad(set_to_none=True)
        out.update(_time_eval(model, x, spec['steps'], timed))
    return out


# the operator groups of the component profile, in table order
GROUPS = ('model convs', 'squeeze forward', 'squeeze backward', 'pair compositions',
          'feature-route convs', 'optimizer', 'allocation', 'other operators',
          'outside operators (Python)')
FEATURE_ROUTE = 'mmorepa.feature_route'
PRODUCTS = {'aten::convolution', 'aten::_convolution', 'aten::mkldnn_convolution',
            'aten::convolution_backward', 'aten::mm', 'aten::bmm', 'aten::matmul', 'aten::addmm',
            'aten::baddbmm'}
ALLOCATION = {'aten::empty', 'aten::empty_strided', 'aten::empty_like', 'aten::zeros',
              'aten::zeros_like', 'aten::zero_', 'aten::fill_', 'aten::resize_', 'aten::new_empty',
              'aten::new_zeros', 'aten::ones', 'aten::ones_like', 'aten::full'}


def mark_feature_route() -> None:
    """Mark each layer's feature-route convs (:meth:`PairRoutes._pair_on_features`) in the
    profile, in this process only."""
    from torch.profiler import record_function

    from mmorepa.layers.routes import PairRoutes
    on_features = PairRoutes._pair_on_features

    def marked(self, x):
        with record_function(FEATURE_ROUTE):
            return on_features(self, x)
    PairRoutes._pair_on_features = marked


def _chain(event) -> list:
    """``event`` and the profiled operators around it, outermost first."""
    chain = []
    while event is not None:
        chain.append(event)
        event = event.cpu_parent
    return chain[::-1]


def _group(event, feature_seqs: set) -> str:
    """The group of :data:`GROUPS` of one profiled operator: by its outermost marked ancestor
    (the optimizer's step, a squeeze operator, the feature route; a backward node by the
    sequence number of the forward operator it differentiates), else by its own name."""
    chain = _chain(event)
    for depth, e in enumerate(chain):
        if e.name.startswith('Optimizer.'):
            return 'optimizer'
        if e.name == FEATURE_ROUTE or (e.sequence_nr in feature_seqs and 'Backward' in e.name):
            return 'feature-route convs'
        if e.name.startswith('mmorepa::squeeze'):
            if any(n.name in PRODUCTS for n in chain[depth + 1:]):
                return 'pair compositions'
            return 'squeeze backward' if e.name.endswith('backward') else 'squeeze forward'
    if any(n.name in PRODUCTS or 'ConvolutionBackward' in n.name for n in chain):
        return 'model convs'
    return 'allocation' if chain[-1].name in ALLOCATION else 'other operators'


def profile_components(step, n: int) -> dict:
    """Seconds per training step spent in each group of :data:`GROUPS` over ``n`` profiled steps
    (``torch.profiler``, the self time of each operator, intra-op threads included;
    ``'outside operators (Python)'``: the profiled wall time no operator covers), and
    ``'top operators'``: the profiler's table of the operators with the most self time."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(n):
            step()
        wall = time.perf_counter() - start
    events = prof.events()
    # the forward operators of the feature route, whose backward nodes carry their number
    feature_seqs = {e.sequence_nr for e in events if e.sequence_nr >= 0
                    and any(a.name == FEATURE_ROUTE for a in _chain(e.cpu_parent))}
    seconds = dict.fromkeys(GROUPS, 0.0)
    for e in events:
        seconds[_group(e, feature_seqs)] += e.self_cpu_time_total / 1e6 / n
    seconds['outside operators (Python)'] = max(0.0, wall / n - sum(seconds.values()))
    return dict(groups=seconds, wall_s=wall / n, top=prof.key_averages().table(
        sort_by='self_cpu_time_total', row_limit=15))


def fault_profile(phases, n: int) -> dict:
    """MiB per training step that the process first touches (minor page faults: memory the
    allocator had returned to the system) in each phase of the step and each operator, over
    ``n`` steps; ``phases``: ``(name, function)`` pairs that make one step (the benchmark's
    ``forward`` phase starts with ``zero_grad``, which frees the gradients). A dispatch mode reads
    the process's fault count around every operator (one of mmorepa's own, the squeeze and its
    backward, counts as one), those of 0.05 MiB or more, the most first. ``'total'``: the whole
    step, outside operators included."""
    from torch.utils._python_dispatch import TorchDispatchMode
    faults = {}

    class CountFaults(TorchDispatchMode):
        phase = None

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            key = f'{self.phase}: {func.name()}'
            before = _minor_faults()
            result = func(*args, **(kwargs or {}))
            faults[key] = faults.get(key, 0) + _minor_faults() - before
            return result

    mib = resource.getpagesize() / 2 ** 20 / n
    mode, start = CountFaults(), _minor_faults()
    with mode:
        for _ in range(n):
            for name, phase in phases:
                mode.phase = name
                phase()
    by_op = sorted(((k, f * mib) for k, f in faults.items() if f * mib >= 0.05),
                   key=lambda kv: -kv[1])
    return dict(total=(_minor_faults() - start) * mib, by_op=dict(by_op))


def _routes(model, x) -> dict:
    """How many OREPA layers take each route for the pair in a training step on ``x``."""
    from mmorepa.layers import OREPAConv1x1, OREPAConv2d
    seen = {}

    def hook(module, args):
        route = module.pair_route(args[0])
        seen[route] = seen.get(route, 0) + 1
    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, (OREPAConv1x1, OREPAConv2d))]
    model.train()
    model(x)  # with autograd, as in a step (BN statistics move: counters and timings are done)
    for h in handles:
        h.remove()
    return seen


def run_variant(spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec['threads']),
               MKL_NUM_THREADS=str(spec['threads']))
    if spec.get('malloc') == 'keep':  # after the user's own tunables, which it overrides
        env['GLIBC_TUNABLES'] = ':'.join(
            t for t in (env.get('GLIBC_TUNABLES'), MALLOC_KEEP) if t)
    proc = subprocess.run([sys.executable, __file__, '--worker', json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f'variant {spec["arch"]}/{spec["reparam"]} failed:\n'
                         f'{proc.stderr[-3000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def variants(args):
    if getattr(args, 'regimes', None):
        for regime in args.regimes:
            for variant in args.variants or list(REGIME_VARIANTS):
                yield dict(arch=regime, regime=regime, reparam=variant, label=variant)
        return
    for arch in args.archs:
        vgg = arch.startswith('repvgg')
        reparams = args.reparams or (['none', 'repvgg', 'orepa'] if vgg else
                                     ['none', 'dbb', 'orepa'])
        for reparam in reparams:
            if vgg and reparam == 'dbb' or not vgg and reparam in ('repvgg', 'orepa-vgg'):
                continue
            yield dict(arch=arch, reparam=reparam, label=reparam)
        if args.components and not vgg:
            for label, cfg in COMPONENTS:
                if label == '+ Rep-1x1' and arch in ('resnet18', 'resnet34'):
                    continue
                yield dict(arch=arch, reparam='orepa', label=f'orepa: {label}', orepa_cfg=cfg)


def parse_args(argv=None):
    from mmorepa.cli import ArgumentParser
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--archs', nargs='+', default=['resnet18', 'resnet50'], choices=ARCHS)
    parser.add_argument('--reparams', nargs='+',
                        choices=['none', 'dbb', 'orepa', 'repvgg', 'orepa-vgg'])
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--input-size', type=int, default=224)
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--threads', type=int, nargs='+', default=None,
                        help='torch threads of each process (default: torch\'s default here, '
                        'one per core); several counts: each variant at each')
    parser.add_argument('--malloc', nargs='+', default=['default'], choices=MALLOC_SETTINGS,
                        help='the allocator of each process: default, or keep (glibc keeps '
                        'freed memory: no page faults on reuse); several: each variant under '
                        'each')
    parser.add_argument('--sgd', default='default', choices=list(SGD_IMPLS),
                        help='the implementation of torch.optim.SGD (default: torch\'s choice on '
                        'the device, the for-loop on the CPU)')
    parser.add_argument('--repeats', type=int, default=2,
                        help='processes per variant (interleaved); the fastest is reported')
    parser.add_argument('--device', default=None, help='cpu or cuda (default: cuda if present)')
    parser.add_argument('--components', action='store_true', help='Fig. 8: one at a time')
    parser.add_argument('--regimes', nargs='+', choices=list(REGIMES),
                        help="mmpretrain's ImageClassifier, stock backbone with conv_cfg, in "
                        "these regimes (batch and image size fixed by the regime)")
    parser.add_argument('--variants', nargs='+', choices=list(REGIME_VARIANTS),
                        help='with --regimes: the variants (default: all)')
    parser.add_argument('--profile', type=int, default=0, metavar='STEPS',
                        help='over this many steps after the timed ones: ms per step of each '
                        'operator group (torch.profiler) and, eager on the CPU, the memory '
                        'faulted in per step by phase and operator')
    parser.add_argument('--compile', action='store_true',
                        help='train through torch.compile (default backend)')
    parser.add_argument('--compile-options', nargs='+', default=[], metavar='KEY=VALUE',
                        help='with --compile: inductor options (torch.compile(options=...)), '
                        'VALUE a Python literal, e.g. layout_optimization=False')
    parser.add_argument('--eval', action='store_true', help='also time eval un-fused vs fused')
    parser.add_argument('--squeeze', default='function', choices=['function', 'autograd'],
                        help="the OREPA squeeze: one autograd node with its own backward "
                        "(default) or plain autograd through the kernel functions")
    parser.add_argument('--counters-only', action='store_true',
                        help='only the machine-independent counters: no timed steps, one process')
    parser.add_argument('--plot', help='write a Fig. 8-style PNG bar chart (memory and time per '
                        'variant, offline DBB against online OREPA) to this file')
    parser.add_argument('--json', help='write the results to this JSON file too')
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def measure(args, common: dict) -> list:
    """Run every variant ``args.repeats`` times, interleaved, each in its own process; per
    variant the fastest process, with every process's step time and the least peak memory and
    CPU time."""
    todo = [dict(v, threads=n, malloc=m) for m in args.malloc for n in args.threads
            for v in variants(args)]
    runs = [[] for _ in todo]
    for rep in range(args.repeats):
        for i, v in enumerate(todo):
            r = run_variant(dict(common, **v))
            runs[i].append(r)
            print(f'  [{rep + 1}/{args.repeats}] {r["arch"]:<10} {r["label"]:<28} '
                  f'{r["threads"]} thr, malloc {r["malloc"]}, '
                  f'{r["step_s"]:.3f} s/step, {r["flops"] / 1e9:.1f} GFLOP, '
                  f'{r["saved_bytes"] / 2 ** 20:.0f} MiB saved', file=sys.stderr, flush=True)
    results = []
    for measured in runs:
        best = dict(min(measured, key=lambda r: r['step_s']))
        best['step_s_all'] = [r['step_s'] for r in measured]
        best['peak_mb'] = min(r['peak_mb'] for r in measured)
        if all('cpu_step_s' in r for r in measured):
            best['cpu_step_s'] = min(r['cpu_step_s'] for r in measured)
            best['faulted_mib'] = min(r['faulted_mib'] for r in measured)
        if args.eval:
            best['eval_unfused_s'] = min(r['eval_unfused_s'] for r in measured)
            best['eval_fused_s'] = min(r['eval_fused_s'] for r in measured)
        results.append(best)
    return results


def add_ratios(results: list) -> None:
    """Each result's time, CPU time, memory, FLOPs and saved bytes over its plain model's."""
    plain = {(r['arch'], r['threads'], r['malloc']): r for r in results
             if r['reparam'] in ('none', 'plain')}
    for r in results:
        p = plain.get((r['arch'], r['threads'], r['malloc']))
        r['time_ratio'] = r['step_s'] / p['step_s'] if p else None
        r['cpu_time_ratio'] = (r['cpu_step_s'] / p['cpu_step_s']
                               if p and 'cpu_step_s' in r and 'cpu_step_s' in p else None)
        r['mem_ratio'] = r['peak_mb'] / p['peak_mb'] if p else None
        r['flops_ratio'] = r['flops'] / p['flops'] if p else None
        r['saved_ratio'] = r['saved_bytes'] / p['saved_bytes'] if p else None


def print_counters(results: list, args) -> None:
    """The table of machine-independent counters."""
    if args.regimes:
        print('counters of one training step per regime (the same on any machine)')
    else:
        print(f'counters of one training step, batch {args.batch_size}, input '
              f'{args.input_size} (the same on any machine)')
    head = ('| arch | re-param | params (M) | GFLOP | x plain | saved for backward MiB | x plain '
            '| weights+grads+momentum MiB |')
    print(head)
    print('|' + '---|' * (head.count('|') - 1))
    for r in results:
        routes = ', '.join(f'{n} {k}' for k, n in sorted(r.get('routes', {}).items()))
        print(f'| {r["arch"]} | {r["label"]}{" (" + routes + ")" if routes else ""} | '
              f'{r["params"] / 1e6:.2f} | {r["flops"] / 1e9:.1f} | '
              f'{_ratio(r["flops_ratio"], 3)} | {r["saved_bytes"] / 2 ** 20:.0f} | '
              f'{_ratio(r["saved_ratio"], 3)} | {r["param_state_bytes"] / 2 ** 20:.0f} |')


def print_timings(results: list, args, device: str, compile_options: dict) -> None:
    """The table of step times and peak memory (and eval times with ``--eval``)."""
    mem = 'peak GPU MiB' if device == 'cuda' else 'peak RSS MiB'
    shape = ('batch and input of each regime' if args.regimes else
             f'batch {args.batch_size}, input {args.input_size}')
    compiled = ''
    if args.compile:
        compiled = f'torch.compile{" " + str(compile_options) if compile_options else ""}, '
    threads = ', '.join(str(n) for n in args.threads)
    print(f'\ndevice: {device} ({threads} threads), {shape}, '
          f'{compiled}median of {args.steps} steps after '
          f'{args.warmup}, fastest of {args.repeats} processes per variant')
    head = (f'| arch | re-param | threads | malloc | s/step | x plain | all processes s/step '
            f'| {mem} | x plain |')
    cpu = any(r.get('cpu_step_s') for r in results)
    if cpu:
        head += ' CPU s/step | x plain | page-faulted MiB/step |'
    if args.eval:
        head += ' eval un-fused s | eval fused s | un-fused / fused |'
    print(head)
    print('|' + '---|' * (head.count('|') - 1))
    for r in results:
        every = ' '.join(f'{t:.3f}' for t in r['step_s_all'])
        line = (f'| {r["arch"]} | {r["label"]} | {r["threads"]} | {r["malloc"]} | '
                f'{r["step_s"]:.3f} | {_ratio(r["time_ratio"])} | {every} | '
                f'{r["peak_mb"]:.0f} | {_ratio(r["mem_ratio"])} |')
        if cpu:
            line += (f' {r["cpu_step_s"]:.3f} | {_ratio(r["cpu_time_ratio"])} | '
                     f'{r["faulted_mib"]:.0f} |')
        if args.eval:
            line += (f' {r["eval_unfused_s"]:.4f} | {r["eval_fused_s"]:.4f} | '
                     f'{r["eval_unfused_s"] / r["eval_fused_s"]:.2f}x |')
        print(line)


def print_components(results: list, steps: int) -> None:
    """The component profile: ms per step of each operator group (and the profiled step) per
    variant and thread count, and the speed-up of each from the fewest threads to the most;
    then the profiler's top operators of each."""
    counts = sorted({r['threads'] for r in results})
    print(f'\ncomponents: ms per training step over {steps} profiled steps (torch.profiler; '
          'self time of the operators of each group)')
    head = '| group | arch | re-param | malloc | ' + ' | '.join(f'{n} thr' for n in counts)
    if len(counts) > 1:
        head += f' | speed-up {counts[0]} -> {counts[-1]} thr'
    print(head + ' |')
    print('|' + '---|' * head.count('|'))
    keys = list(dict.fromkeys((r['arch'], r['label'], r['malloc']) for r in results))
    for arch, label, malloc in keys:
        by_threads = {r['threads']: r['profile'] for r in results
                      if (r['arch'], r['label'], r['malloc']) == (arch, label, malloc)}
        for group in GROUPS + ('step (profiled wall)',):
            ms = [1e3 * (p['wall_s'] if group.startswith('step') else p['groups'][group])
                  for p in (by_threads.get(n) for n in counts) if p]
            line = f'| {group} | {arch} | {label} | {malloc} | ' + ' | '.join(
                f'{t:.1f}' for t in ms)
            if len(counts) > 1 and len(ms) == len(counts):
                line += f' | {ms[0] / ms[-1]:.2f}x' if ms[-1] > 0 else ' | -'
            print(line + ' |')
    for r in results:
        print(f'\ntop operators: {r["arch"]} {r["label"]}, {r["threads"]} threads, malloc '
              f'{r["malloc"]}\n'
              f'{r["profile"]["top"]}')
        if 'faults' in r['profile']:
            print_faults(r, steps)


def print_faults(result: dict, steps: int, rows: int = 8) -> None:
    """The operators of :func:`fault_profile` that fault in the most memory, per step."""
    faults = result['profile']['faults']
    print(f'\npage-faulted MiB per step by phase and operator: {result["arch"]} '
          f'{result["label"]}, {result["threads"]} threads, malloc {result["malloc"]} '
          f'({steps} steps; {faults["total"]:.1f} MiB/step in all)')
    print('| phase: operator | MiB/step |\n|---|---|')
    for key, mib in list(faults['by_op'].items())[:rows]:
        print(f'| {key} | {mib:.1f} |')


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return None
    import torch
    compile_options = _compile_options(args.compile_options)
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    timing = not args.counters_only
    if not timing:
        args.steps, args.warmup, args.repeats, args.eval = 0, 0, 1, False
    args.threads = args.threads or [torch.get_num_threads()]
    common = dict(batch_size=args.batch_size, input_size=args.input_size, steps=args.steps,
                  warmup=args.warmup, sgd=args.sgd, device=device, eval=args.eval,
                  squeeze=args.squeeze, compile=args.compile, profile=args.profile,
                  compile_options=compile_options)
    results = measure(args, common)
    add_ratios(results)
    print_counters(results, args)
    if timing:
        print_timings(results, args, device, compile_options)
    if args.profile:
        print_components(results, args.profile)
    if args.plot and args.regimes:
        plot_regimes(results, args.plot, timing)
    elif args.plot:
        plot_fig8(results, args.plot, timing)
    if args.json:
        text = json.dumps(results, indent=1)
        atomic_write(args.json, lambda path: Path(path).write_text(text))
    return results


def plot_fig8(results, path, timing=True):
    """Fig. 8 of the paper as bars: per architecture, (a) memory and (b) time per step of each
    variant (plain, offline DBB, online OREPA and its components), offline bars hatched.
    Memory is the bytes saved for backward plus the parameter state (machine-independent); with
    timing, the peak memory and the step time are drawn too."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    archs = list(dict.fromkeys(r['arch'] for r in results))
    panels = [('saved for backward + weights/grads/momentum (MiB)',
               lambda r: (r['saved_bytes'] + r['param_state_bytes']) / 2 ** 20),
              ('GFLOP per step', lambda r: r['flops'] / 1e9)]
    if timing:
        panels = [('peak memory (MiB)', lambda r: r['peak_mb']),
                  ('time per step (s)', lambda r: r['step_s'])] + panels
    fig, axes = plt.subplots(len(archs), len(panels), squeeze=False,
                             figsize=(4.2 * len(panels), 3.6 * len(archs)))
    colours = {'none': '#9e9e9e', 'dbb': '#d9534f'}
    for row, arch in zip(axes, archs):
        rows = [r for r in results if r['arch'] == arch]
        labels = [r['label'].replace('orepa: ', '') for r in rows]
        for ax, (title, value) in zip(row, panels):
            vals = [value(r) for r in rows]
            bars = ax.bar(range(len(rows)), vals,
                          color=[colours.get(r['reparam'], '#337ab7') for r in rows])
            for bar, r in zip(bars, rows):
                if r['reparam'] == 'dbb':
                    bar.set_hatch('//')
            plain = next((v for v, r in zip(vals, rows) if r['reparam'] == 'none'), None)
            for i, v in enumerate(vals):
                text = f'{v / plain:.2f}x' if plain else f'{v:.3g}'
                ax.text(i, v, text, ha='center', va='bottom', fontsize=7)
            ax.set_xticks(range(len(rows)))
            ax.set_xticklabels(labels, rotation=35, ha='right', fontsize=7)
            ax.set_title(f'{arch}: {title}', fontsize=9)
    fig.suptitle('Training cost: plain, offline DBB (hatched), online OREPA (blue)', fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format='png'))
    plt.close(fig)
    return path


def plot_regimes(results, path, timing=True):
    """OREPA's step-time ratio to plain (FLOP ratio without timing), auto and kernel route,
    against batch x output pixels of the last stage (log scale), one point per regime."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    key = 'time_ratio' if timing else 'flops_ratio'
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, marker in (('orepa', 'o'), ('orepa-kernel', 's')):
        rows = sorted((REGIMES[r['regime']][2] * REGIMES[r['regime']][5], r[key], r['regime'])
                      for r in results if r['label'] == label and r.get(key))
        if rows:
            ax.plot([x for x, _, _ in rows], [y for _, y, _ in rows], marker=marker,
                    linestyle='', label='OREPA (auto)' if label == 'orepa' else 'OREPA (kernel)')
            for x, y, name in rows:
                ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords='offset points')
    ax.axhline(1.0, color='grey', linewidth=0.8)
    ax.set_xscale('log')
    ax.set_xlabel('batch x output pixels of the last stage')
    ax.set_ylabel('step time / plain' if timing else 'FLOPs / plain')
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format='png'))
    plt.close(fig)
    return path


def _compile_options(items) -> dict:
    """``KEY=VALUE`` items as inductor options; a bad item or an unknown key: one line on
    stderr, exit status 1."""
    import ast

    import torch._inductor.config as inductor_config
    options = {}
    for item in items:
        key, sep, value = item.partition('=')
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            sep = ''
        if not sep or not hasattr(inductor_config, key):
            sys.exit(f'benchmark_train_cost: bad --compile-options entry {item!r}: expected '
                     'KEY=VALUE with KEY an inductor option and VALUE a Python literal')
    return options


def _ratio(value, digits=2):
    return '-' if value is None else f'{value:.{digits}f}x'


if __name__ == '__main__':
    from mmorepa.cli import run_tool
    run_tool(main)
