"""Prompt templates and model inputs, matching the CogVLM reference.

Re-implements `_history_to_prompt` and `build_conversation_input_ids` of cogvlm-chat-hf:

    input_ids      = [bos] + [pad] * num_image_tokens + encode(prompt, add_special_tokens=False)
    token_type_ids = [0]   + [1]   * num_image_tokens + [0] * len(prompt ids)

Image placeholders use the pad id (`<unk>` = 0); the model overwrites their embeddings with
`boi, patch features..., eoi`. No eos is appended at inference. For training (the CogVLM finetune-demo
convention) the answer is encoded separately, also without special tokens, and eos is appended; labels
are -100 everywhere except on those answer ids + eos.

`build_inputs` returns 1-D `torch.long` tensors (as the reference does); `pad_batch` stacks them to [B, L].
"""

from __future__ import annotations

from typing import Sequence

import torch

from .layout import IGNORE_INDEX, LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE, image_token_count

__all__ = ["TEMPLATES", "IGNORE_INDEX", "format_prompt", "image_token_count", "build_inputs", "pad_batch"]

TEMPLATES = ("base", "chat", "vqa")


# The answer cue after each question (reference `_history_to_prompt`): vqa asks for a short answer.
_ANSWER_CUE = {"chat": "Answer:", "vqa": "Short answer:"}


def format_prompt(query: str, history: Sequence[tuple[str, str]] | None = None, template: str = "chat") -> str:
    """The prompt text of the reference's `_history_to_prompt(template, history, query)`.

    base: the query alone; the reference ignores the history for base models.
    chat: `Question: {q} Answer: {a}\\n` per history turn, then `Question: {query} Answer:`.
    vqa:  the same with `Short answer:` (history turns included).
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; valid templates are: {', '.join(TEMPLATES)}")
    if template == "base":
        return query
    cue = _ANSWER_CUE[template]
    turns = "".join(f"Question: {q} {cue} {a}\n" for q, a in (history or []))
    return f"{turns}Question: {query} {cue}"


def build_inputs(
    tokenizer,
    query: str,
    history: Sequence[tuple[str, str]] | None = None,
    template: str = "chat",
    num_image_tokens: int | None = None,
    answer: str | None = None,
    max_length: int = 2048,
) -> dict[str, torch.Tensor]:
    """Token ids for one conversation, as the reference's `build_conversation_input_ids`.

    `tokenizer` needs `encode(text, add_special_tokens=...) -> list[int]` and `bos_id`, `pad_id`
    (and `eos_id` when `answer` is given). `num_image_tokens` is None/0 for a text-only prompt, else
    `image_token_count(image_size, patch_size)`. With `answer` the result also holds `labels` for training.

    Returns 1-D long tensors `input_ids`, `token_type_ids`, `attention_mask` (all ones) [, `labels`].
    Raises ValueError when the sequence would exceed `max_length`, before any model work is done.
    """
    n_img = num_image_tokens or 0
    if n_img < 0:
        raise ValueError(f"num_image_tokens must be >= 0, got {n_img}")
    text_ids = list(tokenizer.encode(format_prompt(query, history, template), add_special_tokens=False))
    # Training target: the answer encoded on its own (its dummy-prefix space separates it from the prompt) + eos.
    answer_ids = [] if answer is None else list(tokenizer.encode(answer, add_special_tokens=False)) + [tokenizer.eos_id]

    prefix_len = 1 + n_img + len(text_ids)
    total = prefix_len + len(answer_ids)
    if total > max_length:
        parts = f"1 bos + {n_img} image + {len(text_ids)} prompt"
        what = "the query or the history"
        if answer is not None:
            parts += f" + {len(answer_ids)} answer"
            what += " or the answer"
        raise ValueError(f"input is {total} tokens ({parts}), over the limit of {max_length}; shorten {what}")

    input_ids = [tokenizer.bos_id] + [tokenizer.pad_id] * n_img + text_ids + answer_ids
    token_type_ids = [LANGUAGE_TOKEN_TYPE] + [VISION_TOKEN_TYPE] * n_img + [LANGUAGE_TOKEN_TYPE] * (len(text_ids) + len(answer_ids))
    out = {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "token_type_ids": torch.tensor(token_type_ids, dtype=torch.long),
        "attention_mask": torch.ones(total, dtype=torch.long),
    }
    if answer is not None:
        # The loss is on the answer only; the model shifts labels internally (reference CausalLM loss).
        out["labels"] = torch.tensor([IGNORE_INDEX] * prefix_len + answer_ids, dtype=torch.long)
    return out


def pad_batch(inputs: Sequence[dict], pad_id: int = 0, side: str = "left") -> dict[str, torch.Tensor]:
    """Pad single-sequence inputs (from `build_inputs`) to one [B, L] batch of long tensors.

    Pads get id `pad_id`, attention_mask 0 and token_type 0 (language), and labels -100. Left padding
    (the default, and what generation needs) is exactly the reference batch layout (fixture case 5).
    Sequences given as lists or 1-D tensors are accepted; a missing attention_mask means all ones.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not inputs:
        raise ValueError("pad_batch needs at least one input")
    has_labels = ["labels" in x for x in inputs]
    if any(has_labels) and not all(has_labels):
        raise ValueError("either all inputs or none must have labels")

    fill = {"input_ids": pad_id, "token_type_ids": LANGUAGE_TOKEN_TYPE, "attention_mask": 0, "labels": IGNORE_INDEX}
    keys = ["input_ids", "token_type_ids", "attention_mask"] + (["labels"] if has_labels[0] else [])
    rows = []
    for x in inputs:
        ids = torch.as_tensor(x["input_ids"], dtype=torch.long)
        row = {k: torch.as_tensor(x[k], dtype=torch.long) for k in keys if k in x}
        row.setdefault("attention_mask", torch.ones_like(ids))
        if any(v.shape != ids.shape or v.dim() != 1 for v in row.values()):
            raise ValueError("each input must hold 1-D sequences of equal length")
        rows.append(row)

    length = max(len(r["input_ids"]) for r in rows)
    out = {k: torch.full((len(rows), length), fill[k], dtype=torch.long) for k in keys}
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        span = slice(length - n, length) if side == "left" else slice(0, n)
        for k in keys:
            out[k][i, span] = r[k]
    return out
