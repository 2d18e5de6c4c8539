"""Models: the built-in ``vit-digits`` / ``vgg-digits`` (trained on first use, cached), timm, local Hugging Face
folders, and ``load_model_and_data``: a model and its data from the names the command line takes."""

from .builtin import BUILTIN_MODELS, build_builtin
from .loading import build_model, load_checkpoint, load_state_dict_file
from .resolve import ModelAndData, ModelDataError, check_finite, load_model_and_data

__all__ = ["BUILTIN_MODELS", "ModelAndData", "ModelDataError", "build_builtin", "build_model", "check_finite",
           "load_checkpoint", "load_model_and_data", "load_state_dict_file"]
