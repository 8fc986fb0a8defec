# DeepLabV3+ with ResNet-50-D8 (vanilla)
# (paper Table 5; supp 2.3: 40k iterations, SGD lr 0.02, poly lr power 0.9 down to 2e-4,
# wd 5e-4, crop 512x1024, plain BN rather than SyncBN).
_base_ = ['mmseg::deeplabv3plus/deeplabv3plus_r50-d8_4xb2-40k_cityscapes-512x1024.py']
custom_imports = dict(imports=['mmorepa'], allow_failed_imports=False)
pretrained = 'checkpoints/resnet50_in1k.pth'
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True, type='OREPAResNet', depth=50, reparam='none', num_stages=4,
        out_indices=(0, 1, 2, 3), dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1),
        contract_dilation=True, norm_cfg=norm_cfg, norm_eval=False, style='pytorch',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    decode_head=dict(norm_cfg=norm_cfg),
    auxiliary_head=dict(norm_cfg=norm_cfg))
optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=5e-4))
param_scheduler = [dict(type='PolyLR', eta_min=2e-4, power=0.9, begin=0, end=40000, by_epoch=False)]
