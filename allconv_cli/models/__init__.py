"""The paper's networks: the module built from a row of layer tokens (``net``), the registry of
rows registered with timm (``registry``), and how a run's convolutions start (``initialization``)."""

from allconv_cli.models.net import AllConvNet, ConvBlock, feature_layers
from allconv_cli.models.registry import (
    BUNDLED_MEAN,
    BUNDLED_STD,
    BUNDLED_WEIGHTS,
    CIFAR10_CLASSES,
    MODEL_OPTIONS,
    NETWORKS,
    Network,
    create_model,
    default_config,
    describe,
    list_models,
    model_options,
    network_name,
    pretrained_names,
    resolve_name,
)

__all__ = ["AllConvNet", "BUNDLED_MEAN", "BUNDLED_STD", "BUNDLED_WEIGHTS", "CIFAR10_CLASSES", "ConvBlock", "MODEL_OPTIONS",
           "NETWORKS", "Network", "create_model", "default_config", "describe", "feature_layers", "list_models",
           "model_options", "network_name", "pretrained_names", "resolve_name"]
