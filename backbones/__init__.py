"""Dilated ResNet feature-pyramid encoders and strict checkpoint loading."""

from backbones.resnet import ARCHS, FeatureInfo, ResNet, build_backbone
from backbones.weights import LoadReport, WeightsError, load_weights

__all__ = [
    "ARCHS",
    "FeatureInfo",
    "LoadReport",
    "ResNet",
    "WeightsError",
    "build_backbone",
    "load_weights",
]
