"""Models: the built-in ``vit-digits`` / ``vgg-digits`` (trained on first use, cached) and timm."""

from .builtin import BUILTIN_MODELS, build_builtin
from .loading import build_model, load_checkpoint, load_state_dict_file

__all__ = ["BUILTIN_MODELS", "build_builtin", "build_model", "load_checkpoint", "load_state_dict_file"]
