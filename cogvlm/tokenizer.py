"""SentencePiece tokenizer for CogVLM's language model (Vicuna-7B-v1.5 / Llama-2 vocabulary).

Reproduces Hugging Face's *slow* ``LlamaTokenizer`` as CogVLM loads it (transformers 4.35,
``legacy=False``, ``add_bos_token=True``, pad = ``<unk>``) on top of plain ``sentencepiece``.
The behaviours that plain ``SentencePieceProcessor`` does not give and that are rebuilt here
(see ``tests/fixtures/tokenizer/README.md`` for the full list):

* ``▁`` (U+2581) typed in the text is treated as a space.
* The special-token strings ``<s>``, ``</s>``, ``<unk>`` inside text are split out and mapped to
  their ids, even with ``add_special_tokens=False``. Text right after one of them gets *no*
  dummy-prefix ``▁``; a single space after one is absorbed into the next word.
* Decoding removes exactly one leading space when the first token starts with ``▁``, writes special
  tokens literally, and keeps the space of a ``▁word`` that follows a special token.

HF implements the last two points with a second sentencepiece model whose ``add_dummy_prefix`` is
switched off. Doing that needs protobuf, so we get the same effect from the ordinary model with a
sentinel in front (see ``_encode_no_prefix`` and ``_surface``).
"""

from __future__ import annotations

import os
import re
from typing import Iterable

import sentencepiece as spm

SPIECE_UNDERLINE = "\u2581"  # "▁", sentencepiece's visible space
REPLACEMENT_CHAR = "\ufffd"  # what sentencepiece decodes each bad UTF-8 byte to


class TokenizerError(ValueError):
    """The tokenizer model file is not a usable sentencepiece model."""


def _check_unicode(text: str) -> None:
    """sentencepiece takes UTF-8 only; a str with lone surrogates (how Python hands over bytes that are not UTF-8,
    e.g. from argv or a file read with errors="surrogateescape") cannot be encoded: say so, with where."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text is not valid Unicode: lone surrogate U+{ord(text[e.start]):04X} at character "
                         f"{e.start + 1} (bytes that are not UTF-8?); decode the text as UTF-8 first") from None


class Tokenizer:
    """Vicuna / Llama-2 tokenizer matching transformers 4.35 ``LlamaTokenizer(legacy=False)``.

    Attributes: ``bos_id`` (1), ``eos_id`` (2), ``unk_id`` (0), ``pad_id`` (0, pad is ``<unk>``),
    ``vocab_size`` (32000) and ``special_ids`` (ids dropped by ``skip_special_tokens``).
    """

    def __init__(self, model_path: str | os.PathLike):
        path = os.fspath(model_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"not a sentencepiece model: {path} ({e})") from e
        self.model_path = path
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        if min(self.bos_id, self.eos_id, self.unk_id) < 0:
            raise TokenizerError(f"sentencepiece model lacks <s>, </s> or <unk>: {path}")
        self.pad_id = self.unk_id  # vicuna's special_tokens_map.json sets pad_token = "<unk>"
        self.special_ids = frozenset((self.bos_id, self.eos_id, self.unk_id))
        self._special_by_text = {self.sp.id_to_piece(i): i for i in self.special_ids}
        # Longest first so that the alternation never prefers a shorter overlapping token.
        names = sorted(self._special_by_text, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, names)) + ")")
        # Sentinels (see _encode_no_prefix / _surface): "\n" is not in the vocabulary as text, so
        # it encodes as ["▁", "<0x0A>"] and no BPE merge can cross it; "a" is a plain piece.
        self._nl_prefix = self.sp.encode("\n")
        self._sentinel_id = self.sp.piece_to_id("a")
        if self._sentinel_id == self.unk_id or len(self._nl_prefix) != 2:
            raise TokenizerError(f"unexpected vocabulary in {path}: expected a Llama-style model")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        return cls(path)

    # ----------------------------------------------------------------- encoding
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` prepends ``bos_id`` (never appends eos)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() expects str, got {type(text).__name__}")
        _check_unicode(text)
        ids: list[int] = []
        # re.split with one group alternates text, special, text, ... ("" -> [""], no ids)
        parts = self._special_re.split(text.replace(SPIECE_UNDERLINE, " "))
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self._special_by_text[part])
            elif not part:
                continue
            elif k == 0:
                # Start of the text: HF prepends "▁", which is exactly sentencepiece's own
                # dummy prefix. (If the text starts with a special token, HF drops that lone
                # "▁" again; part is then empty and skipped above.)
                ids += self.sp.encode(part)
            elif part[0] == " ":
                # After a special token a leading space becomes the word's own "▁", i.e. the
                # rest is encoded with the dummy prefix standing in for that space.
                ids += self.sp.encode(part[1:]) if len(part) > 1 else self._nl_prefix[:1]  # lone "▁"
            else:
                ids += self._encode_no_prefix(part)  # "<s>Hello" -> [1, "Hello"], not "▁Hello"
        return [self.bos_id] + ids if add_special_tokens else ids

    def _encode_no_prefix(self, text: str) -> list[int]:
        # Encode "\n" + text and drop the ["▁", "<0x0A>"] sentinel: BPE merges are local and none
        # spans the newline, so the rest is what a model with add_dummy_prefix=False would give.
        ids = self.sp.encode("\n" + text)
        if ids[:2] != self._nl_prefix:  # cannot happen with a Llama-style vocabulary (checked in __init__)
            raise TokenizerError(f"unexpected encoding of the newline sentinel: {ids[:2]}")
        return ids[2:]

    def tokenize(self, text: str) -> list[str]:
        """Pieces of ``text`` (no bos), e.g. ``["▁Question", ":"]``."""
        return self.convert_ids_to_tokens(self.encode(text, add_special_tokens=False))

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self.sp.id_to_piece(i) for i in self._check_ids(ids)]

    # ----------------------------------------------------------------- decoding
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``. ``skip_special_tokens`` drops ``<s>``, ``</s>`` and ``<unk>`` (= pad)."""
        ids = self._check_ids(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        text = self._surface(ids)
        # HF strips the "▁" of the first (kept) token only: the dummy prefix it assumes was added.
        if ids and self.sp.id_to_piece(ids[0]).startswith(SPIECE_UNDERLINE):
            text = text[1:]
        return text

    def _surface(self, ids: list[int]) -> str:
        """Text of ``ids`` with every "▁" as a space, special tokens written literally."""
        out, run = [], []
        for i in ids + [None]:  # None flushes the last run
            if i is None or i in self.special_ids:
                if run:
                    # sentencepiece drops a leading "▁" of the first piece it decodes; the sentinel
                    # "a" takes that place so nothing is lost, and is cut off again.
                    out.append(self.sp.decode([self._sentinel_id] + run)[1:])
                    run = []
                if i is not None:
                    out.append(self.sp.id_to_piece(i))
            else:
                run.append(i)
        return "".join(out)

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]  # also accepts torch / numpy integers
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return ids

    def stream(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Incremental decoding for generation: ``put(id)`` returns the newly printable text.

    Text is released as soon as it is final, so joining all ``put``/``end`` results gives exactly
    ``decode(ids, skip_special_tokens)``. Text ending in U+FFFD after a byte token is held back,
    because the byte run may still become a valid character (an emoji arrives as 4 byte tokens).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tok, self.skip_special_tokens = tokenizer, skip_special_tokens
        self._pending: list[int] = []  # ids whose text has not been released yet
        self._started = False  # whether the sequence's first token has been released

    def _text(self) -> str:
        # Only the very first token of the sequence loses its leading "▁" (Tokenizer.decode).
        return self.tok._surface(self._pending) if self._started else self.tok.decode(self._pending)

    def put(self, token_id: int) -> str:
        token_id = int(token_id)
        if self.skip_special_tokens and token_id in self.tok.special_ids:
            return ""  # skipped tokens vanish, so byte runs on both sides still join
        self._pending.append(token_id)
        text = self._text()
        if text.endswith(REPLACEMENT_CHAR) and self.tok.sp.is_byte(token_id):
            return ""
        # Safe to split here: a byte run that decoded without a trailing U+FFFD is complete, and
        # UTF-8 decoding of later bytes cannot change it.
        self._pending, self._started = [], True
        return text

    def end(self) -> str:
        """Flush what is held back (a truly broken byte run shows as U+FFFD) and reset."""
        text = self._text() if self._pending else ""
        self._pending, self._started = [], False
        return text


def _is_cjk(ch: str) -> bool:
    # CJK Unified Ideographs blocks; the set transformers' TextStreamer flushes on.
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in (
        (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
        (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


class TextStreamer:
    """Chunking of ``transformers.TextStreamer`` (4.35), one ``put`` per token id.

    Re-decodes its cache each step and prints up to the last space, everything at a CJK character,
    and everything at a trailing newline, after which the cache is cleared. Because the cache
    restarts after a newline, a "▁word" there loses its space: unlike ``StreamDecoder``, the
    chunks need not join to the full decode. Use it to match HF demo output exactly.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tok, self.skip_special_tokens = tokenizer, skip_special_tokens
        self._cache: list[int] = []
        self._printed = 0  # characters of decode(cache) already returned

    def put(self, token_id: int) -> str:
        self._cache.append(int(token_id))
        text = self.tok.decode(self._cache, self.skip_special_tokens)
        if text.endswith("\n"):
            chunk, self._cache, self._printed = text[self._printed:], [], 0
            return chunk
        stop = len(text) if text and _is_cjk(text[-1]) else text.rfind(" ") + 1
        chunk = text[self._printed:stop]
        self._printed += len(chunk)
        return chunk

    def end(self) -> str:
        text = self.tok.decode(self._cache, self.skip_special_tokens)[self._printed:] if self._cache else ""
        self._cache, self._printed = [], 0
        return text
