# The one OREPA-ResNet-18 of the main job (half width, CPU-sized). The classifier trains it from
# scratch; the detector and the segmentor start from the classifier's checkpoint, as the paper's
# downstream experiments start from ImageNet weights. Each task's own settings (out_indices,
# dilations, ...) come from its toolbox's base config.
orepa_r18 = dict(type='OREPAResNet', depth=18, base_channels=32, stem_channels=32,
                 norm_cfg=dict(type='BN', requires_grad=True))
# tools/train.py configs/demo/orepa_r18_shapes_cls.py writes it here (tools/demo.py passes its own)
cls_checkpoint = 'work_dirs/orepa_r18_shapes_cls/epoch_8.pth'
orepa_r18_pretrained = dict(
    orepa_r18, init_cfg=dict(type='Pretrained', checkpoint=cls_checkpoint, prefix='backbone.'))
