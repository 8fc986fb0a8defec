# OREPA in mmdet's own DCN config, its backbone kept: ResNet with deformable c3-c5 stages (they
# stay deformable, named in one log line); every other conv an OREPA layer.
_base_ = 'mmdet::dcn/faster-rcnn_r50-dconv-c3-c5_fpn_1x_coco.py'
custom_imports = dict(imports=['mmorepa'], allow_failed_imports=False)
model = dict(backbone=dict(type='OREPAResNet'))
