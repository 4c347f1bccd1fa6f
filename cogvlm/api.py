"""The convenience API: `CogVLM.from_pretrained(...).chat(...)`.

`cogvlm.model.CogVLM` is the network and nothing else; this subclass adds loading and the conversation helpers of
`cogvlm.chat` and `cogvlm.generate` as methods, so that the model files never import upwards.
"""
from __future__ import annotations

from . import chat as _chat
from . import explain as _explain
from . import generate as _generate
from . import grounding as _grounding
from .loading import load_model
from .model import CogVLM as _Network


class CogVLM(_Network):
    """CogVLM with loading, generation and chat. `from_pretrained` sets `self.tokenizer` when the checkpoint has one."""

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, **kwargs) -> "CogVLM":
        """Load a hub id, hub-layout folder or converted folder (see `cogvlm.loading.load_model`)."""
        return load_model(path, device=device, dtype=dtype, model_class=cls, **kwargs)

    def generate(self, input_ids, token_type_ids=None, attention_mask=None, pixel_values=None, **kwargs):
        """New token ids per row (list of lists, each ending with eos when one came); see `cogvlm.generate`."""
        return _generate.generate(self, input_ids, token_type_ids, attention_mask, pixel_values, **kwargs)

    def chat(self, image, query: str, history=None, template: str | None = None, **kwargs) -> str:
        """The answer to `query` about `image` (path, bytes, PIL image, or None); see `cogvlm.chat`."""
        return _chat.chat(self, image, query, history, template, **kwargs)

    def stream_chat(self, image, query: str, history=None, template: str | None = None, **kwargs):
        """The same answer as `chat`, yielded piece by piece as it is generated."""
        return _chat.stream_chat(self, image, query, history, template, **kwargs)

    def chat_batch(self, images, queries, histories=None, template=None, **kwargs) -> list[str]:
        """Answers to many conversations at once (e.g. captioning), each equal to `chat` on it alone."""
        return _chat.chat_batch(self, images, queries, histories, template, **kwargs)

    def ground(self, image, expression: str | None = None, template: str | None = None, **kwargs):
        """Where `expression` is in `image` (or, without one, a description with boxes): the answer with its boxes
        in the original image's pixels; `model.chat` answers stay unchanged. See `cogvlm.grounding`."""
        return _grounding.ground(self, image, expression, template, **kwargs)

    def explain(self, image, query: str, answer: str | None = None, layers=None, template: str | None = None,
                **kwargs):
        """The decoder's attention from the answer tokens to the image patches, as a grid; see `cogvlm.explain`."""
        return _explain.explain(self, image, query, answer, layers, template, **kwargs)
