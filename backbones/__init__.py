"""Dilated ResNet feature-pyramid encoders and strict checkpoint loading."""

from backbones.protocol import Backbone, FeatureInfo
from backbones.resnet import ARCHS, ResNet, build_backbone
from backbones.weights import LoadReport, WeightsError, load_weights

__all__ = [
    "ARCHS",
    "Backbone",
    "FeatureInfo",
    "LoadReport",
    "ResNet",
    "WeightsError",
    "build_backbone",
    "load_weights",
]
