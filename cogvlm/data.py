"""Fine-tuning data: JSONL conversations -> model inputs, with the same prompt templates as inference.

One record per line (blank lines are skipped):

    {"image": "images/0001.png", "conversations": [
        {"role": "user", "content": "What colour is the shape?"},
        {"role": "assistant", "content": "red"}]}

- `image`: a path relative to the JSONL file's folder, an absolute path, or null (a text-only conversation).
  A missing key means null as well.
- `conversations`: user and assistant turns, alternating, starting with a user turn and ending with an assistant
  turn. Earlier turns become the prompt's history; the loss is on the last assistant turn only (its tokens + eos),
  exactly the sequence `prompt.build_inputs(tokenizer, query, history, template, answer=...)` builds.
  With `all_turns=True` a conversation of k exchanges becomes k examples, one per assistant turn, each labelled on
  that turn with the earlier ones as history, so every answer is learned in the layout inference will see.
- Other keys (e.g. `meta`) are ignored.

Every problem in the file is reported up front with its line number (bad JSON, bad roles, a conversation that
does not end with an assistant turn, a missing image file, a sequence too long for `max_length`), in one
`DataError` that lists up to 20 of them. Images are decoded when used; a broken one raises a `DataError` naming
its line.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .image import ImageError, preprocess
from .layout import image_token_count
from .prompt import TEMPLATES, build_inputs, pad_batch

MAX_REPORTED_ERRORS = 20


class DataError(ValueError):
    """A fine-tuning data file that cannot be used; the message names the file and line of every problem."""


@dataclass
class Example:
    """One training example: the prompt (query + history), the labelled answer, the image path."""

    query: str
    answer: str
    history: list[tuple[str, str]] = field(default_factory=list)
    image: str | None = None  # resolved path, or None for text-only
    source: str = ""  # "file:line", for error messages


def read_jsonl(path: str | os.PathLike, all_turns: bool = False, check_images: bool = True) -> list[Example]:
    """Parse and validate a JSONL data file; raises DataError listing every bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist" if not path.exists() else f"{path} is not a file")
    base = path.parent
    examples: list[Example] = []
    errors: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                examples += _parse_record(line, where, base, all_turns, check_images)
            except DataError as e:
                errors.append(str(e))
    if errors:
        shown = errors[:MAX_REPORTED_ERRORS]
        more = f"\n  ... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
        raise DataError(f"{len(errors)} bad record(s) in {path}:\n  " + "\n  ".join(shown) + more)
    if not examples:
        raise DataError(f"data file {path} holds no records")
    return examples


def _parse_record(line: str, where: str, base: Path, all_turns: bool, check_images: bool) -> list[Example]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    image = record.get("image")
    if image is not None:
        if not isinstance(image, str) or not image:
            raise DataError(f"{where}: 'image' must be a path string or null, got {image!r}")
        image_path = Path(image) if os.path.isabs(image) else base / image
        if check_images and not image_path.is_file():
            raise DataError(f"{where}: image file not found: {image_path}")
        image = str(image_path)
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of {{role, content}} objects")
    for i, turn in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise DataError(f"{where}: conversation turn {i + 1} must be an object with 'role' and 'content'")
        if turn["role"] not in ("user", "assistant"):
            raise DataError(f"{where}: turn {i + 1} has role {turn['role']!r}; roles are 'user' and 'assistant'")
        if turn["role"] != expected:
            raise DataError(f"{where}: turn {i + 1} is {turn['role']!r} but should be {expected!r} "
                            "(turns alternate user, assistant, user, ..., starting with user)")
        if not isinstance(turn["content"], str) or not turn["content"].strip():
            raise DataError(f"{where}: turn {i + 1} ({turn['role']}) has empty or non-string content")
    if turns[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation must end with an assistant turn (the answer to learn); "
                        f"it ends with a {turns[-1]['role']!r} turn")
    pairs = [(turns[i]["content"], turns[i + 1]["content"]) for i in range(0, len(turns), 2)]
    ends = range(len(pairs)) if all_turns else [len(pairs) - 1]
    return [Example(pairs[k][0], pairs[k][1], pairs[:k], image, where) for k in ends]


class ConversationDataset:
    """Examples tokenised up front (so length errors come before training); images preprocessed when used.

    `image_cache_mb` bounds an in-memory cache of preprocessed images (many records often share one image, and
    small data sets are read many times); 0 disables it.
    """

    def __init__(
        self,
        examples: Sequence[Example] | str | os.PathLike,
        tokenizer,
        image_size: int,
        patch_size: int,
        template: str = "chat",
        max_length: int = 2048,
        all_turns: bool = False,
        image_cache_mb: float = 1024,
    ):
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; valid templates are: {', '.join(TEMPLATES)}")
        if isinstance(examples, (str, os.PathLike)):
            examples = read_jsonl(examples, all_turns=all_turns)
        self.examples = list(examples)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.template = template
        self.num_image_tokens = image_token_count(image_size, patch_size)
        self.items = []
        errors = []
        for ex in self.examples:
            try:
                self.items.append(self.encode(ex, max_length))
            except ValueError as e:
                errors.append(f"{ex.source}: {e}")
        if errors:
            shown = errors[:MAX_REPORTED_ERRORS]
            more = f"\n  ... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
            raise DataError(f"{len(errors)} record(s) cannot be encoded:\n  " + "\n  ".join(shown) + more)
        self._cache: dict[str, torch.Tensor] = {}
        self._cache_budget = int(image_cache_mb * 2**20)
        self._cache_bytes = 0

    def encode(self, ex: Example, max_length: int = 2048) -> dict[str, torch.Tensor]:
        """input_ids, token_type_ids, attention_mask, labels of one example, via `prompt.build_inputs`."""
        return build_inputs(
            self.tokenizer, ex.query, ex.history, self.template,
            num_image_tokens=self.num_image_tokens if ex.image is not None else None,
            answer=ex.answer, max_length=max_length,
        )

    def __len__(self) -> int:
        return len(self.items)

    def pixels(self, ex: Example) -> torch.Tensor:
        """(3, S, S) preprocessed image of an example (which must have one)."""
        cached = self._cache.get(ex.image)
        if cached is not None:
            return cached
        try:
            x = preprocess(ex.image, self.image_size)
        except ImageError as e:
            raise DataError(f"{ex.source}: {e}") from None
        nbytes = x.numel() * x.element_size()
        if self._cache_bytes + nbytes <= self._cache_budget:
            self._cache[ex.image] = x
            self._cache_bytes += nbytes
        return x

    def __getitem__(self, i: int) -> dict:
        ex = self.examples[i]
        item = dict(self.items[i])
        item["pixel_values"] = None if ex.image is None else self.pixels(ex)
        return item

    def batch(self, indices: Sequence[int], pad_id: int | None = None, side: str = "right") -> dict:
        """A padded (B, L) batch of the given examples; see `collate`."""
        return collate([self[i] for i in indices], self.tokenizer.pad_id if pad_id is None else pad_id, side)


def collate(items: Sequence[dict], pad_id: int = 0, side: str = "right") -> dict:
    """Pad items to one batch (right padding for training); pixel_values stacks the images of the rows that have
    one, in row order (what `CogVLM.forward` expects), or is None when no row has an image."""
    batch = pad_batch(items, pad_id=pad_id, side=side)
    images = [it["pixel_values"] for it in items if it.get("pixel_values") is not None]
    batch["pixel_values"] = torch.stack(images) if images else None
    return batch
