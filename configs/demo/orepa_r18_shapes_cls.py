# Demo: the OREPA-ResNet-18 classifier (./_base_/orepa_r18.py), trained from scratch on the
# generated shapes data set (mmorepa.datasets.make_shapes_dataset) on the CPU.
_base_ = ['mmpretrain::_base_/default_runtime.py', './_base_/orepa_r18.py']

custom_imports = dict(imports=['mmorepa'], allow_failed_imports=False)

data_root = 'data/shapes/cls'
num_classes = 3

model = dict(
    type='ImageClassifier',
    backbone={{_base_.orepa_r18}},
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes=num_classes, in_channels=256,
              loss=dict(type='CrossEntropyLoss'), topk=(1, )))

data_preprocessor = dict(num_classes=num_classes, mean=[127.5] * 3, std=[64.0] * 3, to_rgb=True)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
train_dataloader = dict(
    batch_size=64, num_workers=0, persistent_workers=False,
    dataset=dict(type='CustomDataset', data_root=data_root, data_prefix='train',
                 pipeline=train_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True))
val_dataloader = dict(
    batch_size=16, num_workers=0, persistent_workers=False,
    dataset=dict(type='CustomDataset', data_root=data_root, data_prefix='val',
                 pipeline=test_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False))
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_dataloader = val_dataloader
test_evaluator = val_evaluator

optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.05, momentum=0.9, weight_decay=1e-4))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=10),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=0, T_max=8),
]
train_cfg = dict(by_epoch=True, max_epochs=8, val_interval=8)
val_cfg = dict()
test_cfg = dict()
default_hooks = dict(logger=dict(type='LoggerHook', interval=5),
                     checkpoint=dict(type='CheckpointHook', interval=8))
randomness = dict(seed=0)
env_cfg = dict(dist_cfg=dict(backend='gloo'))
