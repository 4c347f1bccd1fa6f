"""Where a model keeps its decode session (`cogvlm.generate.session_for`): a plain attribute, not a submodule, so
that modules which change the layers (quantization, compilation) can drop it without importing generation."""
from __future__ import annotations

KEPT_SESSION = "_decode_session"


def release_session(model) -> None:
    """Free the session kept on `model` (its KV caches and graph), e.g. between evaluations during training."""
    model.__dict__.pop(KEPT_SESSION, None)
