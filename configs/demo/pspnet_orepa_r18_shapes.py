# Demo: PSPNet with the OREPA-ResNet-18 of ./_base_/orepa_r18.py (D8: mmseg's dilations), started
# from the demo classifier's checkpoint, on the generated shapes data set, CPU-sized.
# The real Cityscapes recipe is configs/pspnet_orepa_r50-d8_40k_cityscapes.py.
_base_ = ['mmseg::_base_/models/pspnet_r50-d8.py', 'mmseg::_base_/default_runtime.py',
          './_base_/orepa_r18.py']
custom_imports = dict(imports=['mmorepa'], allow_failed_imports=False)

data_root = 'data/shapes/seg'
metainfo = dict(classes=('background', 'circle', 'square', 'triangle'),
                palette=[[0, 0, 0], [220, 20, 60], [0, 128, 255], [0, 200, 0]])
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    pretrained=None,
    data_preprocessor=dict(size=(64, 64), mean=[127.5] * 3, std=[64.0] * 3),
    backbone={{_base_.orepa_r18_pretrained}},
    decode_head=dict(in_channels=256, channels=64, num_classes=4, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=128, channels=32, num_classes=4, norm_cfg=norm_cfg))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations'),
                 dict(type='PackSegInputs')]
dataset = dict(type='BaseSegDataset', data_root=data_root, metainfo=metainfo,
               img_suffix='.png', seg_map_suffix='.png', reduce_zero_label=False)
train_dataloader = dict(
    batch_size=16, num_workers=0, persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(dataset, data_prefix=dict(img_path='img_dir/train',
                                           seg_map_path='ann_dir/train'),
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=16, num_workers=0, persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(dataset, data_prefix=dict(img_path='img_dir/val', seg_map_path='ann_dir/val'),
                 pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=5e-4))
param_scheduler = [dict(type='PolyLR', eta_min=2e-4, power=0.9, begin=0, end=400,
                        by_epoch=False)]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=400, val_interval=400)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(logger=dict(type='LoggerHook', interval=25, log_metric_by_epoch=False),
                     checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=400),
                     visualization=dict(type='SegVisualizationHook', draw=False))
randomness = dict(seed=0)
env_cfg = dict(dist_cfg=dict(backend='gloo'))
