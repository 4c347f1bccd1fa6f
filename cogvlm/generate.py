"""Generation: prefill the prompt once, then one token per step against a preallocated (static) KV cache.

`DecodeSession` holds the cache and the captured decode step; it is kept on the model and reused by the next call
that fits it (same batch size, no longer), so captioning batch after batch allocates and captures once.
`generate_tokens` is the decode loop (greedy or sampled, with Hugging Face's logits processors, batches with left
padding whose rows finish independently); `generate` collects its token ids. Text, stop strings and streaming live in
`cogvlm.chat`.
"""
from __future__ import annotations

import warnings
from typing import Iterator

import torch

from .fusion import fused_kernels
from .kept import KEPT_SESSION
from .layout import VISION_TOKEN_TYPE, build_position_ids
from .model import CogVLM
from .sampling import check_sampling, process_logits, row_generators


class DecodeSession:
    """The state of a batch being decoded: per-layer KV caches, which cache slots hold real tokens, next positions.

    Cache slot t holds the t-th token fed (left padding included). Rotary positions are CogVLM's own: the image
    spans 3 positions, so after the prompt each new token takes the row's previous largest position + 1, as the
    reference recomputes them from the token types at every step.

    All per-step state lives in device tensors updated in place, so a decode step has no host sync and can be
    captured once as a CUDA graph and replayed (`cuda_graph=True`, the default on GPUs): at batch 1 a step is
    hundreds of small kernels, and replaying them as one graph removes the launch overhead between them.
    """

    def __init__(self, model: CogVLM, batch_size: int, max_len: int, cuda_graph: bool | None = None,
                 cache_dtype: torch.dtype | None = None):
        if max_len > model.cfg.text.max_position_embeddings:
            raise ValueError(
                f"{max_len} tokens (prompt + new tokens) exceed the model's max_position_embeddings "
                f"({model.cfg.text.max_position_embeddings}); shorten the prompt or lower max_new_tokens"
            )
        self.model, self.batch_size, self.capacity = model, batch_size, max_len
        self.cache_dtype = cache_dtype or model.dtype  # e.g. bf16 caches for an fp32 model trained under autocast
        self.caches = model.new_kv_caches(batch_size, max_len, dtype=self.cache_dtype)
        device = self.caches[0].k.device
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0  # cache slots used so far (host-side copy of cache_pos, for bounds checks)
        self.cache_pos = torch.zeros(1, dtype=torch.long, device=device)  # slot of the next token
        self.next_pos = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # its rotary position
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # its id (static input buffer)
        one_device = len({p.device for p in model.parameters()}) == 1  # a CUDA graph cannot span a device map
        self.use_graph = (device.type == "cuda" and one_device) if cuda_graph is None else cuda_graph
        # Over a device map, cuda_graph=True captures one graph per device segment (cogvlm.parallel.segments);
        # opt-in for now: it is checked token for token on the CPU but not yet measured on several GPUs.
        self.segmented = None
        if self.use_graph and not one_device:
            from .parallel.segments import SegmentedStep

            self.segmented = SegmentedStep(model, self.caches, self.key_valid, self.cache_pos, self.next_pos,
                                           self.tokens, cuda_graph=True)
        # The step in Triton kernels (cogvlm.fast_decode), with a graph only (eager, their launches cost more).
        self.fast = None
        if self.use_graph and self.segmented is None:
            from .fast_decode import FastStep
            from .vision_graph import graph_vision

            self.fast = FastStep.build(model, batch_size, self.caches)
            graph_vision(model)  # and the prefill's vision tower replayed from a graph too
        self.graph = None
        self.graph_logits = None
        self.owner = None  # the decode loop using the session now (a session serves one batch at a time)

    def claim(self) -> object:
        """Start a new use; an earlier decode loop still iterating on this session then fails at its next step
        instead of reading the new batch's cache."""
        self.owner = object()
        return self.owner

    def fits(self, batch_size: int, max_len: int, cuda_graph: bool | None = None, cache_dtype=None) -> bool:
        """Whether this session can serve a request of `batch_size` rows and `max_len` tokens with these options."""
        return (batch_size == self.batch_size and max_len <= self.capacity
                and (cuda_graph is None or cuda_graph == self.use_graph)
                and (cache_dtype or self.model.dtype) == self.cache_dtype)

    def reset(self) -> None:
        """Forget the batch decoded so far; buffers (and a captured graph, which reads them) are kept."""
        self.key_valid.zero_()
        self.cache_pos.zero_()
        self.next_pos.zero_()
        self.length = 0

    @torch.no_grad()
    def prefill(self, input_ids, token_type_ids=None, attention_mask=None, pixel_values=None) -> torch.Tensor:
        """Start a new batch: run the prompt (B, L) from slot 0; returns the last position's logits (B, V)."""
        B, L = input_ids.shape
        if B != self.batch_size or L > self.capacity:
            raise ValueError(f"a prompt of {B} x {L} tokens does not fit this session ({self.batch_size} x "
                             f"{self.capacity}); make a new DecodeSession")
        self.reset()
        device = self.key_valid.device
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids = build_position_ids(token_type_ids, attention_mask)
        self.key_valid[:, :L] = attention_mask.bool()
        padded = not bool(attention_mask.all())
        out = self.model(
            input_ids.to(device),
            token_type_ids.to(device),
            self.key_valid if padded else None,  # unpadded: plain causal attention over the prompt (flash)
            pixel_values,
            position_ids.to(device),
            kv_caches=self.caches,
            cache_pos=0,  # the prompt fills slots 0..L-1
            last_logits_only=True,
        )
        self.length = L
        self.cache_pos.fill_(L)
        self.next_pos.copy_(position_ids.max(dim=1, keepdim=True).values)
        self.next_pos += 1
        if self.segmented is not None:
            self.segmented.sync()
        return out.logits[:, -1]

    def _step(self) -> torch.Tensor:
        """One decode step on the static buffers; only in-place device work, so it can be graph-captured."""
        self.key_valid.index_fill_(1, self.cache_pos, True)
        if self.fast is not None:
            logits = self.fast.step(self.tokens, self.key_valid, self.next_pos, self.cache_pos)
        else:
            logits = self.model(self.tokens, attention_mask=self.key_valid, position_ids=self.next_pos,
                                kv_caches=self.caches, cache_pos=self.cache_pos).logits[:, -1]
        self.cache_pos += 1
        self.next_pos += 1
        return logits

    def _capture(self) -> None:
        # Warm up on a side stream (cuBLAS and allocator set-up must not happen during capture), then undo the
        # warm-up's state changes: the slot it wrote is written again by the first real step.
        # Fused kernels (cogvlm.fusion) are compiled during the warm-up and recorded into the graph.
        saved = (self.key_valid.clone(), self.cache_pos.clone(), self.next_pos.clone())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), fused_kernels():
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 - the fast step's kernels failed to build here: the model's step
                if self.fast is None:
                    raise
                warnings.warn(f"the decode kernels failed ({type(e).__name__}: {e}); using the model's decode step")
                self.fast = None
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        for buf, old in zip((self.key_valid, self.cache_pos, self.next_pos), saved):
            buf.copy_(old)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), fused_kernels():
            self.graph_logits = self._step()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,); returns the logits (B, V) for the next one. Every step is text.

        With a CUDA graph the returned tensor is a static buffer, overwritten by the next step."""
        if self.length >= self.capacity:
            raise ValueError(f"the KV cache is full ({self.length} tokens); allocate a longer session")
        self.tokens.copy_(tokens.view(-1, 1))
        self.length += 1
        if self.segmented is not None:
            return self.segmented.step(tokens)
        if not self.use_graph:
            return self._step()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.graph_logits

    @property
    def last_positions(self) -> torch.Tensor:
        """(B,) rotary position of the last token fed."""
        return self.next_pos[:, 0] - 1


def session_for(model: CogVLM, batch_size: int, max_len: int, cuda_graph: bool | None = None,
                cache_dtype: torch.dtype | None = None) -> DecodeSession:
    """The session kept on `model`, reused when it fits the request, else a new one (which replaces it).

    Lengths are rounded up to a multiple of SESSION_LENGTH_STEP, so prompts of slightly different lengths share one
    session and one captured graph; the extra slots are masked out and cost little. Only one session is kept: its
    KV cache is the largest allocation after the weights. Swapping modules (`cogvlm.swap`) drops it."""
    kept = model.__dict__.get(KEPT_SESSION)
    if kept is not None and kept.fits(batch_size, max_len, cuda_graph, cache_dtype):
        return kept
    model.__dict__.pop(KEPT_SESSION, None)  # free its caches before allocating the new ones
    kept = None
    session = DecodeSession(model, batch_size, session_length(model, max_len), cuda_graph, cache_dtype)
    model.__dict__[KEPT_SESSION] = session
    return session


def session_length(model: CogVLM, max_len: int) -> int:
    """The cache length `session_for` gives a request of `max_len` tokens: rounded up to SESSION_LENGTH_STEP, at
    most max_position_embeddings (a longer request is left as it is, for DecodeSession to refuse)."""
    limit = model.cfg.text.max_position_embeddings
    return max_len if max_len > limit else min(limit, -(-max_len // SESSION_LENGTH_STEP) * SESSION_LENGTH_STEP)


SESSION_LENGTH_STEP = 256


# -- The decode loop ------------------------------------------------------------------------------------------------


def generate_tokens(
    model: CogVLM,
    input_ids: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    *,
    max_new_tokens: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    finished: torch.Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 50,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    session: DecodeSession | None = None,
    cuda_graph: bool | None = None,
    cache_dtype: torch.dtype | None = None,
) -> Iterator[torch.Tensor]:
    """An iterator over the next token of every row, a (B,) CPU tensor, one step at a time.

    Inputs are a left-padded batch as `cogvlm.prompt.pad_batch` makes it (B, L); pixel_values (n, 3, S, S) hold one
    image per row that has image positions, in row order. max_new_tokens=None means as many as fit in
    max_position_embeddings. A row is finished after its eos, or once the caller sets `finished[row]` (a (B,) bool CPU
    tensor; the text layer does so at stop strings). Finished rows yield (and keep feeding) pad_id so the batch stays
    rectangular; the loop ends when every row is finished or after max_new_tokens steps.
    Sampling follows HF's generate(): greedy unless do_sample; top_k=50 is HF's default.
    `session`: the DecodeSession to decode in (it must fit B rows and L + max_new_tokens tokens); by default the one
    kept on the model (`session_for`), built with `cuda_graph` (default: on for a model on one GPU) and KV caches in
    `cache_dtype` (default: the model's compute dtype).
    Every check happens here, at the call, before any compute; the decoding starts with the iteration.
    """
    text = model.cfg.text
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    B, L = input_ids.shape
    token_type_ids = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids.view(B, L)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.view(B, L)
    check_images(model, token_type_ids, pixel_values)
    room = text.max_position_embeddings - L
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    max_new_tokens = room if max_new_tokens is None else max_new_tokens
    if max_new_tokens > room:
        raise ValueError(
            f"the prompt is {L} tokens (an image takes {model.cfg.num_image_tokens}) and {max_new_tokens} new tokens "
            f"are asked for: more than the model's max_position_embeddings ({text.max_position_embeddings}); "
            "shorten the query or history" + (f", or ask for at most {room} new tokens" if room > 0 else "")
        )
    check_sampling(temperature, top_k, top_p, repetition_penalty)
    sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                    repetition_penalty=repetition_penalty)
    if session is None:
        session = session_for(model, B, L + max_new_tokens, cuda_graph, cache_dtype)
    elif not session.fits(B, L + max_new_tokens):
        raise ValueError(f"the session holds {session.batch_size} x {session.capacity} tokens; this request needs "
                         f"{B} x {L + max_new_tokens}")
    return _decode(
        session, input_ids, token_type_ids, attention_mask, pixel_values, max_new_tokens,
        text.eos_token_id if eos_id is None else eos_id,
        text.pad_token_id if pad_id is None else pad_id,
        torch.zeros(B, dtype=torch.bool) if finished is None else finished,
        seed, sampling,
    )


@torch.no_grad()
def _decode(session, input_ids, token_type_ids, attention_mask, pixel_values, max_new_tokens, eos_id, pad_id, finished,
            seed, sampling) -> Iterator[torch.Tensor]:
    model = session.model
    ticket = session.claim()
    B, L = input_ids.shape
    if pixel_values is not None:
        pixel_values = pixel_values.to(device=model.vision.patch_embed.proj.weight.device, dtype=model.dtype)
    logits = session.prefill(input_ids, token_type_ids, attention_mask, pixel_values)
    device = logits.device
    # Ids already present, for the repetition penalty (kept only with one). HF counts every prompt id (the image
    # placeholders too) but, unlike HF, never the left padding: a row is then penalised the same in a batch as alone.
    seen = rows = None
    if sampling["repetition_penalty"] != 1.0:
        rows = torch.arange(B, device=device)
        seen = torch.zeros(B, logits.shape[-1], dtype=torch.bool, device=device)
        b, t = attention_mask.bool().nonzero(as_tuple=True)
        seen[b.to(device), input_ids[b, t].to(device)] = True
    generators = row_generators(B, seed, device) if sampling["do_sample"] else None

    # The next step is queued on the GPU before this step's tokens reach the caller, so that the GPU decodes while
    # the host reads, detokenizes and streams them (one step is decoded in vain when every row ends early).
    host = torch.empty(B, dtype=torch.long, pin_memory=device.type == "cuda")
    copied = torch.cuda.Event() if device.type == "cuda" else None  # (when the tokens reached `host`)
    finished_on_device, known = finished.to(device), finished.clone()
    for step in range(max_new_tokens):
        scores = process_logits(logits, seen, **sampling)
        if generators:
            probs = scores.softmax(-1)
            tokens = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])
        else:
            tokens = scores.argmax(-1)
        if not torch.equal(finished, known):  # (the caller marks rows at stop strings; copied only then)
            finished_on_device, known = finished.to(device), finished.clone()
        tokens = tokens.masked_fill(finished_on_device, pad_id)
        host.copy_(tokens, non_blocking=True)
        if copied is not None:
            copied.record(torch.cuda.current_stream(device))
        more = step < max_new_tokens - 1
        if more:
            if seen is not None:
                seen[rows, tokens] = True
            if session.owner is not ticket:
                raise RuntimeError("another generation started on this model's decode session while this one was "
                                   "still running; finish one before starting the next, or pass each its own "
                                   "session=DecodeSession(model, batch_size, max_len)")
            logits = session.step(tokens)
        if copied is not None:
            copied.synchronize()
        out = host.clone()
        yield out
        finished |= out == eos_id
        if bool(finished.all()) or not more:
            return


def generate(model: CogVLM, input_ids, token_type_ids=None, attention_mask=None, pixel_values=None,
             **kwargs) -> list[list[int]]:
    """The new token ids of every row, each list ending with eos when one came (keywords: `generate_tokens`)."""
    eos_id = model.cfg.text.eos_token_id if kwargs.get("eos_id") is None else kwargs["eos_id"]
    out: list[list[int]] = [[] for _ in range(1 if input_ids.dim() == 1 else input_ids.shape[0])]
    done = [False] * len(out)
    for tokens in generate_tokens(model, input_ids, token_type_ids, attention_mask, pixel_values, **kwargs):
        for row, token in enumerate(tokens.tolist()):
            if not done[row]:
                out[row].append(token)
                done[row] = token == eos_id
    return out


def check_images(model: CogVLM, token_type_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> None:
    """At most one image per conversation, as in the reference; pixel_values must hold one per row that has one."""
    per_image = model.cfg.num_image_tokens
    counts = (token_type_ids == VISION_TOKEN_TYPE).sum(dim=1).tolist()
    for row, n in enumerate(counts):
        if n not in (0, per_image):
            raise ValueError(
                f"row {row} has {n} image positions; CogVLM takes at most one image per conversation "
                f"({per_image} positions of token type {VISION_TOKEN_TYPE})"
            )
    with_image = sum(n > 0 for n in counts)
    given = 0 if pixel_values is None else pixel_values.shape[0]
    if given != with_image:
        raise ValueError(f"{with_image} row(s) have an image but pixel_values holds {given} image(s)")
