"""The model and its parts: the ResNet backbones (`resnet`, `batchnorm`), the MoCo model with
its key encoder and queue (`moco`), and the InfoNCE loss (`losses`)."""
