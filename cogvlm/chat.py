"""Asking about images: conversations -> prompt tokens -> `generate_tokens` -> text, streamed and cut at stop strings.

    model.chat(image, query, history=None, template=None, **generation) -> str
    model.stream_chat(...) -> iterator of text pieces (they join to chat's answer)
    model.chat_batch(images, queries, histories=None, template=None, **generation) -> list of answers

`image` is a path, bytes, a binary file or a PIL image (anything `cogvlm.image` reads), None for a text-only prompt,
or a list holding at most one of those (the reference's `images=[image]`). `template` defaults to the checkpoint's
`template_version`. Generation keywords are those of `cogvlm.generate.generate_tokens` (max_new_tokens, do_sample,
temperature, top_k, top_p, repetition_penalty, seed) plus `stop`, a string or list of strings that end the answer
and are not part of it.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .generate import generate_tokens
from .image import preprocess
from .prompt import build_inputs, pad_batch
from .tokenizer import Tokenizer

__all__ = ["chat", "stream_chat", "chat_batch", "build_batch", "TextStream"]


def tokenizer_of(model) -> Tokenizer:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError(
            "this model has no tokenizer: its checkpoint folder holds no tokenizer.model. Convert with "
            "`cogvlm convert SRC DST --tokenizer PATH/tokenizer.model`, pass tokenizer=PATH to from_pretrained, or "
            "set model.tokenizer = cogvlm.tokenizer.Tokenizer(PATH)"
        )
    return tok


def one_image(image):
    """The conversation's image or None; the reference takes at most one image per conversation."""
    if isinstance(image, (list, tuple)):
        if len(image) > 1:
            raise ValueError(f"CogVLM takes at most one image per conversation, got {len(image)}")
        return image[0] if image else None
    return image


def build_batch(model, images: Sequence, queries: Sequence[str], histories: Sequence | None = None,
                template: str | Sequence[str] | None = None) -> dict[str, torch.Tensor | None]:
    """Conversations -> one left-padded batch (the reference's layout): input_ids, token_type_ids, attention_mask
    (B, L) and pixel_values (one per row that has an image, or None). `template` may also be one per row."""
    tok = tokenizer_of(model)
    B = len(queries)
    histories = [None] * B if histories is None else list(histories)
    templates = list(template) if isinstance(template, (list, tuple)) else [template] * B
    if not len(images) == len(histories) == len(templates) == B:
        raise ValueError(f"{len(images)} images, {B} queries, {len(histories)} histories, {len(templates)} "
                         "templates: give one per conversation")
    rows, pixels = [], []
    for image, query, history, tmpl in zip(images, queries, histories, templates):
        image = one_image(image)
        n_img = model.cfg.num_image_tokens if image is not None else 0
        # Tokenising first checks the template and the prompt length before any image work.
        rows.append(build_inputs(tok, query, history, tmpl or model.cfg.template_version, n_img,
                                 max_length=model.cfg.text.max_position_embeddings))
        if image is not None:
            pixels.append(pixels_of(image, model.cfg.vision.image_size))
    batch = pad_batch(rows, pad_id=tok.pad_id, side="left")
    batch["pixel_values"] = torch.stack(pixels) if pixels else None
    return batch


def pixels_of(image, size: int) -> torch.Tensor:
    """`preprocess(image)`, or the image itself when it is already such a (3, size, size) tensor (the caption job
    preprocesses in its decoding threads)."""
    if not isinstance(image, torch.Tensor):
        return preprocess(image, size)
    if tuple(image.shape) != (3, size, size) or not image.is_floating_point():
        raise ValueError(f"an image given as a tensor must be preprocessed pixels (3, {size}, {size}), as "
                         f"cogvlm.image.preprocess returns; got {image.dtype} {tuple(image.shape)}")
    return image


class TextStream:
    """One row's new tokens -> text pieces, ending before the first stop string.

    The tokenizer's StreamDecoder gives text as soon as it is final; a tail that might be the start of a stop string
    is held back until the next token decides it, so no piece ever shows part of a stop string.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.decoder = tokenizer.stream(skip_special_tokens=True)
        self.stop = [s for s in stop if s]
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of it already handed out
        self.stopped = False  # a stop string was found

    def put(self, token_id: int) -> str:
        self.text += self.decoder.put(token_id)
        return self._release(final=False)

    def end(self) -> str:
        self.text += self.decoder.end()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        # A stop string cannot begin before `sent`: anything that could was held back.
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            end = min(hits)
        elif final:
            end = len(self.text)
        else:
            held = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            end = max(len(self.text) - held, self.sent)
        piece, self.sent = self.text[self.sent:end], end
        return piece


def stream_rows(model, batch: dict, stop: str | Sequence[str] | None = None, **generation) -> Iterator[tuple[int, str]]:
    """(row, text piece) pairs as a batch decodes; a row ends at eos, at a stop string or after max_new_tokens."""
    tok = tokenizer_of(model)
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    B = batch["input_ids"].shape[0]
    eos_id = model.cfg.text.eos_token_id if generation.get("eos_id") is None else generation["eos_id"]
    finished = torch.zeros(B, dtype=torch.bool)  # shared with the decode loop: we set it at stop strings
    steps = generate_tokens(model, **batch, finished=finished, **generation)  # checks the request now
    return _pieces(steps, [TextStream(tok, stop) for _ in range(B)], finished, eos_id)


def _pieces(steps, streams: list[TextStream], finished: torch.Tensor, eos_id: int) -> Iterator[tuple[int, str]]:
    ended = [False] * len(streams)
    for tokens in steps:
        for row, token in enumerate(tokens.tolist()):
            if ended[row]:
                continue
            piece = streams[row].end() if token == eos_id else streams[row].put(token)
            if token == eos_id or streams[row].stopped:
                finished[row] = ended[row] = True
            if piece:
                yield row, piece
    for row, stream in enumerate(streams):
        piece = "" if ended[row] else stream.end()
        if piece:
            yield row, piece


def stream_chat(model, image, query: str, history=None, template: str | None = None, **generation) -> Iterator[str]:
    """The answer to one conversation, piece by piece. Bad input fails here, at the call, not at the first piece."""
    batch = build_batch(model, [image], [query], [history], template)
    return (piece for _, piece in stream_rows(model, batch, **generation))


def chat(model, image, query: str, history=None, template: str | None = None, **generation) -> str:
    """The answer to one conversation."""
    return "".join(stream_chat(model, image, query, history, template, **generation))


def chat_batch(model, images: Sequence, queries: Sequence[str], histories: Sequence | None = None,
               template: str | Sequence[str] | None = None, batch_size: int | None = None, **generation) -> list[str]:
    """Answers to many conversations (captioning): all in one batch, or `batch_size` at a time; each equals what
    `chat` gives for it alone (with sampling too: every row draws from its own generator seeded with `seed`).
    Images may be given already decoded (PIL), so a caller that has opened them does not decode them twice."""
    if len(images) != len(queries):
        raise ValueError(f"{len(images)} images but {len(queries)} queries: give one query per image")
    batch_size = batch_size or max(1, len(queries))
    answers: list[str] = []
    for start in range(0, len(queries), batch_size):
        part = slice(start, start + batch_size)
        batch = build_batch(model, images[part], queries[part], None if histories is None else histories[part],
                            template[part] if isinstance(template, (list, tuple)) else template)
        pieces = [[] for _ in range(len(queries[part]))]
        for row, piece in stream_rows(model, batch, **generation):
            pieces[row].append(piece)
        answers += ["".join(p) for p in pieces]
    return answers
