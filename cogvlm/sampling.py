"""Logits processors, with the semantics and in the order of Hugging Face's `generate()`, and per-row generators.

Each processor takes the last-position logits (B, V) and returns new logits; the input is never modified in place
(with a CUDA graph it is the graph's static output buffer).
"""
from __future__ import annotations

import secrets

import torch


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF's RepetitionPenaltyLogitsProcessor: the logit of every id already present (prompt included; `seen` is a
    (B, V) bool mask) is divided by `penalty` where positive and multiplied by it where negative."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """HF's TopKLogitsWarper (min_tokens_to_keep=1): keep the k largest logits, ties with the k-th one included."""
    k = min(max(k, 1), logits.shape[-1])
    kth = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """HF's TopPLogitsWarper (min_tokens_to_keep=1): keep the smallest set of most likely ids whose probability sums
    to at least p. As HF: sort ascending and drop the ids whose cumulative probability is <= 1 - p."""
    sorted_logits, order = torch.sort(logits, descending=False)
    remove = sorted_logits.softmax(-1).cumsum(-1) <= 1 - p
    remove[..., -1] = False  # the most likely id always stays
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def process_logits(logits, seen, *, do_sample=False, temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0):
    """HF's order: repetition penalty (greedy too), then for sampling temperature, top-k, top-p. Neutral values
    (penalty 1, temperature 1, top_k 0, top_p 1) are skipped, as HF does."""
    if repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if do_sample:
        if temperature != 1.0:
            logits = logits / temperature
        if top_k:
            logits = apply_top_k(logits, top_k)
        if top_p < 1.0:
            logits = apply_top_p(logits, top_p)
    return logits


def check_sampling(temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (use do_sample=False for greedy decoding)")
    if not (isinstance(top_k, int) and top_k >= 0):
        raise ValueError(f"top_k must be an int >= 0 (0 turns it off), got {top_k!r}")
    if not 0 <= top_p <= 1:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 turns it off), got {repetition_penalty}")


def row_generators(batch_size: int, seed: int | None, device) -> list[torch.Generator]:
    """One generator per row, all seeded alike: a row's samples then depend on its own logits and the seed only, so
    a batch samples exactly what each conversation would alone. Without a seed each row draws a fresh one."""
    seeds = [seed if seed is not None else secrets.randbits(63) for _ in range(batch_size)]
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]
