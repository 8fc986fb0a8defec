# Faster R-CNN with deformable convs in stages c3-c5 (mmdet's own DCN config) and OREPA-ResNet-50:
# the deformable 3x3 convs stay deformable, every other conv of the ResNet becomes an OREPA layer.
# supp 2.3: the pretrained stem (the linear deep stem) is not frozen; its learning rate is x0.1.
_base_ = ['mmdet::dcn/faster-rcnn_r50-dconv-c3-c5_fpn_1x_coco.py', './_base_/orepa_stem_lr.py']
custom_imports = dict(imports=['mmorepa'], allow_failed_imports=False)
model = dict(backbone=dict(
    type='OREPAResNet', frozen_stages=-1,
    init_cfg=dict(type='Pretrained', checkpoint='checkpoints/orepa-resnet50_in1k.pth',
                  prefix='backbone.')))
optim_wrapper = dict(paramwise_cfg={{_base_.orepa_stem_lr}})
