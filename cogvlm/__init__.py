"""cogvlm: a readable, fast PyTorch implementation of the CogVLM visual language model.

`from cogvlm import CogVLM` gives the model with its convenience API (`from_pretrained`, `chat`, ...). The names are
imported on first use, so that `import cogvlm` (and `cogvlm --help`) does not import torch.
"""
__version__ = "0.1.0"
__all__ = ["CogVLM", "CogVLMConfig", "TextConfig", "VisionConfig", "__version__"]

_LAZY = {"CogVLM": "api", "CogVLMConfig": "config", "TextConfig": "config", "VisionConfig": "config"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'cogvlm' has no attribute {name!r}")
