"""Role/content chat messages -> CogVLM's (image, history, query).

The layout is OpenAI's chat messages, which the fine-tuning data (`cogvlm.data`) also uses:

    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
                                  {"type": "text", "text": "What is this?"}]},
     {"role": "assistant", "content": "A cat."},
     {"role": "user", "content": "What colour is it?"}]

CogVLM's prompt knows only (question, answer) turns and one image per conversation (`cogvlm.prompt`), so:
- user and assistant turns alternate after any system messages and the last one is the user's question; several
  messages of one role in a row are one turn (their texts joined by newlines), as clients that send the image and
  the question as two user messages expect;
- `content` is a string or a list of `{"type": "text", "text": ...}` and (user turns only)
  `{"type": "image_url", "image_url": {"url": ...}}` parts; at most one image in the whole conversation, wherever it
  is, because the reference places it before all text;
- system (and "developer") text has no slot in CogVLM's templates: it is put before the first question, on its own
  line, so that it still reaches the model.

The image comes back as the part's URL string, unresolved: fetching and decoding it (and deciding which URLs are
allowed) is the caller's job. Every problem is a `ConversationError` naming the offending field (`param`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Conversation", "ConversationError", "from_messages"]

SYSTEM_ROLES = ("system", "developer")


class ConversationError(ValueError):
    """Messages that do not make a CogVLM conversation; `param` is the JSON path of the field at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class Conversation:
    query: str  # the last user turn's text
    history: list[tuple[str, str]] = field(default_factory=list)  # earlier (question, answer) turns
    image: str | None = None  # the URL of the conversation's one image part, if any
    image_param: str | None = None  # where that URL was, e.g. "messages[0].content[1].image_url.url"


def from_messages(messages) -> Conversation:
    """Validate `messages` and turn them into a `Conversation`."""
    if not isinstance(messages, list) or not messages:
        raise ConversationError("'messages' must be a non-empty list of {role, content} objects", "messages")
    system: list[str] = []
    turns: list[tuple[str, list[str]]] = []  # (role, texts) with consecutive messages of one role merged
    image = image_param = None
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ConversationError(f"{where} must be an object with 'role' and 'content'", where)
        role = message.get("role")
        if role not in (*SYSTEM_ROLES, "user", "assistant"):
            raise ConversationError(f"{where}.role is {role!r}; supported roles are system, user and assistant",
                                    f"{where}.role")
        texts, images = _content(message.get("content"), f"{where}.content", allow_image=role == "user")
        for url, param in images:
            if image is not None:
                raise ConversationError(
                    f"{param}: a second image; CogVLM takes one image per conversation (the first is at "
                    f"{image_param}); start a new conversation for another image", param)
            image, image_param = url, param
        if role in SYSTEM_ROLES:
            system += texts
        elif turns and turns[-1][0] == role:
            turns[-1][1].extend(texts)
        else:
            turns.append((role, list(texts)))
    if not turns or turns[0][0] != "user":
        raise ConversationError("the conversation must start with a user message (after any system messages)",
                                "messages")
    if turns[-1][0] != "user":
        raise ConversationError("the last message must be the user's question; this one is an assistant message",
                                f"messages[{len(messages) - 1}]")
    questions = ["\n".join(texts) for role, texts in turns[0::2]]
    answers = ["\n".join(texts) for role, texts in turns[1::2]]
    if system:
        questions[0] = "\n".join(system + [questions[0]])
    return Conversation(questions[-1], list(zip(questions[:-1], answers)), image, image_param)


def _content(content, where: str, allow_image: bool) -> tuple[list[str], list[tuple[str, str]]]:
    """A message's content -> its texts and its (image URL, param) pairs."""
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise ConversationError(f"{where} must be a string or a list of content parts, got {_kind(content)}", where)
    texts, images = [], []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ConversationError(f"{at}.text must be a string", f"{at}.text")
            texts.append(part["text"])
        elif kind == "image_url":
            if not allow_image:
                raise ConversationError(f"{at}: only user messages may hold an image", at)
            images.append(_image_url(part.get("image_url"), f"{at}.image_url"))
        elif isinstance(part, dict):
            raise ConversationError(f"{at}.type is {kind!r}; supported content parts are 'text' and 'image_url'",
                                    f"{at}.type")
        else:
            raise ConversationError(f"{at} must be an object with a 'type', got {_kind(part)}", at)
    return texts, images


def _image_url(value, where: str) -> tuple[str, str]:
    # OpenAI nests the URL in an object ({"url": ..., "detail": ...}); some clients send the string itself.
    if isinstance(value, dict):
        value, where = value.get("url"), f"{where}.url"
    if not isinstance(value, str) or not value:
        raise ConversationError(f"{where} must be a non-empty URL string", where)
    return value, where


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__
