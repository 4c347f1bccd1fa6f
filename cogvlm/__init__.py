"""cogvlm: a readable, fast PyTorch implementation of the CogVLM visual language model."""
from .config import CogVLMConfig, TextConfig, VisionConfig
from .model import CogVLM

__all__ = ["CogVLM", "CogVLMConfig", "TextConfig", "VisionConfig"]
__version__ = "0.1.0"
