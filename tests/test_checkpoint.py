"""Checkpoint I/O: mmengine Runner checkpoints load under torch's weights_only default and
resume; unreadable checkpoints are named with the reason; a fused (plain) checkpoint loads into
the training model exactly, or is refused where its layers cannot take it exactly."""
import argparse
import pickle

import pytest
import torch
import torch.nn as nn
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch.utils.data import Dataset

import mmorepa  # noqa: F401  (registers the safe globals)
from helpers import randomize_network_, rel_err
from mmorepa.checkpoint import load_checkpoint_strict, read_state_dict
from mmorepa.config import build_model, read_config
from mmorepa.errors import CheckpointError
from mmorepa.layers import OREPAConv2d


class _Tiny(BaseModel):
    def __init__(self):
        super().__init__()
        self.conv = OREPAConv2d(3, 4, 3, norm_cfg=dict(type='BN'))
        self.head = nn.Linear(4, 2)

    def forward(self, inputs, labels=None, mode='tensor'):
        logits = self.head(self.conv(inputs).mean((2, 3)))
        if mode == 'loss':
            return dict(loss=nn.functional.cross_entropy(logits, labels))
        return logits


class _Data(Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(16, 3, 8, 8, generator=g)
        self.y = torch.randint(0, 2, (16,), generator=g)

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return dict(inputs=self.x[i], labels=self.y[i])


def _runner(work_dir, max_iters, resume=False, name='r'):
    return Runner(
        model=_Tiny(), work_dir=str(work_dir), experiment_name=f'{name}{max_iters}{resume}',
        train_dataloader=dict(dataset=_Data(), batch_size=4, num_workers=0,
                              sampler=dict(type='DefaultSampler', shuffle=True),
                              collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9)),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False),
                           logger=dict(type='LoggerHook', interval=1)),
        randomness=dict(seed=0), resume=resume, default_scope=None)


def test_runner_checkpoint_loads_weights_only_and_resumes(tmp_path):
    _runner(tmp_path, 4).train()
    ckpt = tmp_path / 'iter_4.pth'
    # the checkpoint holds mmengine / numpy objects, yet loads with weights_only=True
    data = torch.load(ckpt, map_location='cpu', weights_only=True)
    assert data['meta']['iter'] == 4 and 'message_hub' in data
    assert any(type(v).__name__ == 'HistoryBuffer'
               for v in data['message_hub']['log_scalars'].values())
    # a fresh process has no HistoryBuffer yet, so its lazy method registry is empty
    from mmengine.logging import HistoryBuffer
    saved = dict(HistoryBuffer._statistics_methods)
    HistoryBuffer._statistics_methods.clear()
    try:
        torch.load(ckpt, map_location='cpu', weights_only=True)
    finally:
        HistoryBuffer._statistics_methods.update(saved)
    resumed = _runner(tmp_path, 6, resume=True)
    resumed.train()
    assert resumed.iter == 6
    final = torch.load(tmp_path / 'iter_6.pth', map_location='cpu', weights_only=True)
    assert final['meta']['iter'] == 6
    assert set(final['state_dict']) == set(data['state_dict'])


def test_arbitrary_pickles_stay_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ('pwned',))

    path = tmp_path / 'evil.pth'
    with open(path, 'wb') as f:
        pickle.dump({'state_dict': {}, 'x': Evil()}, f)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def test_getattr_is_limited_to_history_buffer_methods(tmp_path):
    class Sneaky:
        def __reduce__(self):
            return (getattr, (torch.Tensor, 'add_'))

    path = tmp_path / 'sneaky.pth'
    torch.save({'x': Sneaky()}, path)
    with pytest.raises(pickle.UnpicklingError, match='add_'):
        torch.load(path, weights_only=True)


def test_unreadable_checkpoint_reasons(tmp_path):
    torch.save(argparse.Namespace(lr=0.1), tmp_path / 'pickled_object.pth')
    with pytest.raises(CheckpointError, match='argparse.Namespace') as e:
        read_state_dict(tmp_path / 'pickled_object.pth')
    assert 'False' not in str(e.value)
    torch.save(dict(state_dict=dict(w=torch.ones(300))), tmp_path / 'good.pth')
    data = (tmp_path / 'good.pth').read_bytes()
    (tmp_path / 'truncated.pth').write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='truncated.pth: corrupt or truncated'):
        read_state_dict(tmp_path / 'truncated.pth')
    assert read_state_dict(tmp_path / 'good.pth')['w'].sum() == 300


def test_fused_checkpoint_loads_into_the_training_model_exactly(tiny_model, tiny_fused, tiny_cfg):
    model = build_model(read_config(tiny_cfg)).eval()
    load_checkpoint_strict(model, tiny_fused)  # the OREPA layers seed from the plain weights
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), mmorepa.unfused_eval(model), mmorepa.unfused_eval(tiny_model):
        assert rel_err(model(x, mode='tensor'), tiny_model(x, mode='tensor')) <= 1e-5
    # a fused checkpoint that does not fit names the key and the deploy config to use
    state = torch.load(tiny_fused, weights_only=True)
    state['state_dict']['backbone.extra'] = torch.ones(1)
    bad = tiny_fused.with_name('extra.pth')
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match="'backbone.extra'.*use the deploy config"):
        load_checkpoint_strict(build_model(read_config(tiny_cfg)), bad)


def test_fused_checkpoint_seeds_a_narrow_stem_exactly(tiny_cfg, tmp_path):
    """An 8-channel stem's 3x3 generators cannot compose every plain 7x7 kernel; the layer's
    ``seed_kernel`` takes the rest, so the fused checkpoint loads exactly."""
    cfg = read_config(tiny_cfg, {'model.backbone.stem_channels': 8})
    model = randomize_network_(build_model(cfg), torch.Generator().manual_seed(2)).eval()
    path = tmp_path / 'fused.pth'
    torch.save(dict(state_dict=mmorepa.reparameterize(model).state_dict(),
                    meta=dict(mmorepa_fused_from='x.pth')), path)
    loaded = load_checkpoint_strict(build_model(cfg), path).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), mmorepa.unfused_eval(model), mmorepa.unfused_eval(loaded):
        assert rel_err(loaded(x, mode='tensor'), model(x, mode='tensor')) <= 1e-5


def test_fused_checkpoint_that_seeds_inexactly_is_refused(tiny_cfg, tmp_path):
    """Layers trained on an 8-bit grid (fake_quant_bits=8) compute the seeded kernel rounded:
    loading a float fused checkpoint into them would change what the model computes."""
    model = randomize_network_(build_model(read_config(tiny_cfg)),
                               torch.Generator().manual_seed(2)).eval()
    path = tmp_path / 'fused.pth'
    torch.save(dict(state_dict=mmorepa.reparameterize(model).state_dict(),
                    meta=dict(mmorepa_fused_from='x.pth')), path)
    cfg = read_config(tiny_cfg, {'model.backbone.orepa_cfg': dict(fake_quant_bits=8)})
    with pytest.raises(CheckpointError, match=r'backbone\..* exactly.*use the deploy config'):
        load_checkpoint_strict(build_model(cfg), path)
