# Faster R-CNN with deformable convs in stages c3-c5 (mmdet's own DCN config) and OREPA-ResNet-50:
# the deformable 3x3 convs stay deformable, every other conv of the ResNet becomes an OREPA layer.
# supp 2.3: the pretrained stem (the linear deep stem) is not frozen; its learning rate is x0.1.
# Batch and lr: 8 GPUs x 2 images (batch 16), SGD lr 0.02. On another GPU count add
# --cfg-options auto_scale_lr.enable=True (mmdet's base_batch_size=16: lr x batch / 16), as
# mmdet's own configs leave it off and its train.py --auto-scale-lr turns it on.
# Pretrained backbone: checkpoints/orepa-resnet50_in1k.pth is the last checkpoint of the OREPA
# ImageNet run, as training wrote it (un-fused):
#     python tools/train.py configs/imagenet/orepa-resnet50_4xb64-120e_in1k.py
#     cp work_dirs/orepa-resnet50_4xb64-120e_in1k/epoch_120.pth checkpoints/orepa-resnet50_in1k.pth
# Its ``backbone.`` part is loaded: each OREPA layer takes its branches, each deformable conv
# (13 blocks) the fused kernel of the OREPA layer that stood there (one INFO line per conv:
# "layer2.0.conv2 (DeformConv2dPack): seeded with the fused kernel of the checkpoint's
# OREPAConv2d"); the offset convs start at zero, as in mmdet. A conv the checkpoint leaves at its
# initialisation is named in one WARNING line ("...; left at its initialisation").
_base_ = ['mmdet::dcn/faster-rcnn_r50-dconv-c3-c5_fpn_1x_coco.py', './_base_/orepa_stem_lr.py']
custom_imports = dict(imports=['mmorepa'], allow_failed_imports=False)
model = dict(backbone=dict(
    type='OREPAResNet', frozen_stages=-1,
    init_cfg=dict(type='Pretrained', checkpoint='checkpoints/orepa-resnet50_in1k.pth',
                  prefix='backbone.')))
optim_wrapper = dict(paramwise_cfg={{_base_.orepa_stem_lr}})
