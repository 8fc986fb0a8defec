# ImageNet recipe of the paper (Sec. 4.1): SGD lr 0.1, momentum 0.9, wd 1e-4, cosine annealing over
# 120 epochs after 5 epochs of linear warm-up, global batch 256 (4 GPUs x 64), standard augmentation
# (random resized crop 224, horizontal flip).
_base_ = [
    'mmpretrain::_base_/datasets/imagenet_bs64.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmorepa'], allow_failed_imports=False)

model = dict(
    type='ImageClassifier',
    backbone=dict(type='OREPAResNet', depth=18, reparam='orepa', out_indices=(3, )),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes=1000, in_channels=512,
              loss=dict(type='CrossEntropyLoss', loss_weight=1.0), topk=(1, 5)))

optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=True, begin=0, end=5,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=115, by_epoch=True, begin=5, end=120),
]
train_cfg = dict(by_epoch=True, max_epochs=120, val_interval=1)
val_cfg = dict()
test_cfg = dict()
auto_scale_lr = dict(base_batch_size=256)
