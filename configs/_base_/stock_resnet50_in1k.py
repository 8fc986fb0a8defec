# mmpretrain's own ImageNet ResNet-50 (model zoo entry `resnet50_8xb32_in1k`, configs/resnet/
# metafile.yml of mmpretrain; 76.55 top-1): an ImageClassifier checkpoint, its `backbone.` part is
# a stock ResNet-50. Every OREPA layer starts from the plain conv it replaces, exactly (the
# linear deep stem too), so training starts from the stock network's function.
stock_resnet50_in1k = ('https://download.openmmlab.com/mmclassification/v0/resnet/'
                       'resnet50_8xb32_in1k_20210831-ea4938fc.pth')
