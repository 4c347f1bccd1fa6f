"""Where a model keeps its decode session (`cogvlm.generate.session_for`) and its vision graphs
(`cogvlm.vision_graph`): plain attributes, not submodules, so that modules which change the layers (quantization,
compilation) can drop them without importing generation."""
from __future__ import annotations

KEPT_SESSION = "_decode_session"
KEPT_VISION_GRAPHS = "_vision_graphs"  # cogvlm.vision_graph.VisionGraphs


def release_session(model) -> None:
    """Free the session kept on `model` (its KV caches and graph) and its vision tower's graphs (they recorded the
    layers as they were), e.g. between evaluations during training or after the layers change."""
    model.__dict__.pop(KEPT_SESSION, None)
    graphs = model.__dict__.get(KEPT_VISION_GRAPHS)
    if graphs is not None:
        graphs.graphs.clear()
