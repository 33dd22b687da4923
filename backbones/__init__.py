"""Feature-pyramid encoders (dilated ResNets, VGG-16) and strict checkpoint loading."""

from backbones.features import FeatureInfo, FeaturePyramid
from backbones.protocol import Backbone
from backbones.resnet import ARCHS, ResNet, build_backbone
from backbones.vgg import VGG
from backbones.weights import LoadReport, WeightsError, load_weights

__all__ = [
    "ARCHS",
    "VGG",
    "Backbone",
    "FeatureInfo",
    "FeaturePyramid",
    "LoadReport",
    "ResNet",
    "WeightsError",
    "build_backbone",
    "load_weights",
]
