"""Continuous batching: every request being answered is one row of a shared decode batch.

One thread runs the loop below; requests come and go between its steps.

    admit   each waiting request takes a free row: its prompt is prefilled on its own (image and all), its keys and
            values written straight into its row's cache slots, ending at the shared current slot
    sample  the next token of every row from its last logits, with the row's own settings and generator
    step    one forward pass for all rows, queued now (on a GPU it runs while the next line happens): each row feeds
            its token at the shared slot, with its own rotary position
    emit    tokens -> text (stop strings held back, `cogvlm.chat.TextStream`); a row that ends (eos, stop string,
            max_tokens) or whose client has gone leaves and frees its row (its share of the queued step is wasted)

The cache has room for one context per row (`capacity` slots, by default max_position_embeddings). All rows end
at the shared slot `cur`; row r holds its tokens in slots [start_r, cur) and its key-validity mask is true there
only, so it attends to nothing of the other rows. A row that joins with a prompt of L tokens takes slots
[cur - L, cur) (if cur < L, all rows first move right by L - cur). When `cur` reaches the end of the cache, every
row moves left by the smallest start (the slots before it belong to nobody): a row never needs more slots than its
prompt plus its max_tokens, which fit in the capacity, so there is always room after the move. Rotary positions
are per row (`next_pos`), so moving a row's slots changes nothing it computes: each answer equals `model.chat` on
it alone.

On the CPU a step attends only over the slots in use and computes only the rows up to the last one in use; on a
single GPU the step is captured once as a CUDA graph over the whole batch and cache (fixed shapes, no host work per
kernel), as `cogvlm.generate.DecodeSession` does.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..chat import TextStream, tokenizer_of
from ..fusion import fused_kernels
from ..sampling import process_logits, row_generators
from ..layout import build_position_ids
from ..llm import KVCache


class Busy(Exception):
    """Too many requests are waiting for a batch row."""


@dataclass
class Job:
    """One request as the engine runs it. `emit(event)` is called from the engine thread with ("text", piece),
    then one last event: ("done", finish_reason, prompt_tokens, completion_tokens), ("error", message), or
    ("cancelled",) once a cancelled job has left."""

    input_ids: torch.Tensor  # (L,) the prompt, image placeholders included (`cogvlm.prompt.build_inputs`)
    token_type_ids: torch.Tensor  # (L,)
    pixel_values: torch.Tensor | None  # (3, S, S) preprocessed image, or None
    max_new_tokens: int
    emit: Callable[[tuple], None]
    sampling: dict = field(default_factory=dict)  # `process_logits` keywords (do_sample, temperature, ...)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Engine state, set when the job takes a row.
    start: int = 0  # cache slot of its first token
    generated: int = 0
    stream: TextStream | None = None
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Stop generating for this job (its client has gone); it leaves the batch at the next step boundary."""
        self.cancelled.set()


class CacheView:
    """Some rows and slots of one layer's cache, with the interface the attention uses (`KVCache.update`): a
    prefill writes straight into its row's slots, and a CPU step attends only over the slots in use."""

    update = KVCache.update  # it only reads self.k and self.v

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v


class Engine:
    def __init__(self, model, max_batch: int = 8, max_waiting: int = 256, capacity: int | None = None,
                 cuda_graph: bool | None = None):
        """`capacity`: cache slots per row, the longest prompt + max_tokens a request may have (default and at
        most the model's max_position_embeddings); the cache of max_batch x capacity is allocated here, once."""
        self.model = model
        self.tokenizer = tokenizer_of(model)
        text = model.cfg.text
        self.capacity = min(capacity or text.max_position_embeddings, text.max_position_embeddings)
        self.eos_id, self.pad_id = text.eos_token_id, text.pad_token_id
        self.max_batch, self.max_waiting = max_batch, max_waiting
        try:
            self.caches = model.new_kv_caches(max_batch, self.capacity)
        except torch.cuda.OutOfMemoryError:
            raise ValueError(f"no memory for the KV cache of {max_batch} rows x {self.capacity} tokens; "
                             "lower --max-batch or --max-context") from None
        self.device = device = self.caches[0].k.device
        self.key_valid = torch.zeros(max_batch, self.capacity, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(max_batch, 1, dtype=torch.long, device=device)  # rotary position of next token
        self.tokens = torch.full((max_batch, 1), self.pad_id, dtype=torch.long, device=device)  # step input
        self.cache_pos = torch.zeros(1, dtype=torch.long, device=device)  # slot of the step, in the attended window
        self.logits = torch.zeros(max_batch, text.vocab_size, device=device)  # each row's latest logits, fp32
        self.seen = torch.zeros(max_batch, text.vocab_size, dtype=torch.bool, device=device)  # repetition penalty
        self.rows: list[Job | None] = [None] * max_batch
        self.cur = 0  # the shared slot the next step writes
        one_device = len({p.device for p in model.parameters()}) == 1  # a CUDA graph cannot span a device map
        self.use_graph = (device.type == "cuda" and one_device) if cuda_graph is None else cuda_graph
        self.graph = self.graph_logits = None
        self.host_tokens = torch.empty(max_batch, dtype=torch.long, pin_memory=True) if device.type == "cuda" else None
        self.waiting: deque[Job] = deque()
        self.lock = threading.Condition()
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0, "steps": 0, "compactions": 0}
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="cogvlm-engine", daemon=True)
        self.thread.start()

    # -- the requests' side (any thread) -------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        need = job.input_ids.shape[0] + job.max_new_tokens
        if need > self.capacity:  # the server checks this first, with a message for its client
            raise ValueError(f"prompt + max_new_tokens is {need} tokens, over the engine's {self.capacity}")
        with self.lock:
            if self.closed:
                raise Busy("the server is shutting down")
            if len(self.waiting) >= self.max_waiting:
                raise Busy(f"{len(self.waiting)} requests are already waiting for one of the {self.max_batch} "
                           "batch rows; try again later")
            self.waiting.append(job)
            self.lock.notify()

    def status(self) -> dict:
        with self.lock:
            return {"active": sum(job is not None for job in self.rows), "waiting": len(self.waiting),
                    "max_batch": self.max_batch, **self.counts}

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.lock.notify()
        self.thread.join()

    # -- the loop (engine thread) --------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.no_grad():
            while self._admit():
                active = self._active()
                if not active:
                    continue
                try:
                    tokens = self._sample(active)
                    values = self._to_host(tokens)
                    self.seen[torch.arange(self.max_batch, device=self.device), tokens] = True
                    # The next step is queued before the text is made, so that the GPU computes it while this thread
                    # turns tokens into text and streams it; rows that end now took that step for nothing.
                    self._step(tokens)
                    self._emit(active, values())
                except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the server
                    for row, job in self._active():
                        self._leave(row, "failed", ("error", f"generation failed: {type(e).__name__}: {e}"))
        for job in [*self.waiting, *(j for j in self.rows if j is not None)]:
            job.emit(("error", "the server is shutting down"))

    def _active(self) -> list[tuple[int, Job]]:
        return [(row, job) for row, job in enumerate(self.rows) if job is not None]

    def _admit(self) -> bool:
        """Drop cancelled rows, move waiting jobs into free rows (waiting while there is nothing to do); False once
        the engine is closed."""
        for row, job in self._active():
            if job.cancelled.is_set():
                self._leave(row, "cancelled", ("cancelled",))
        with self.lock:
            while not self.closed and not self.waiting and not self._active():
                self.lock.wait()
            if self.closed:
                return False
            free = [row for row, job in enumerate(self.rows) if job is None]
            joining = []
            while self.waiting and len(joining) < len(free):
                job = self.waiting.popleft()
                if job.cancelled.is_set():  # its client left while it waited
                    self.counts["cancelled"] += 1
                    job.emit(("cancelled",))
                else:
                    joining.append(job)
        for row, job in zip(free, joining):
            try:
                self._prefill(row, job)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory for this prompt: refuse it, go on
                self._leave(row, "failed", ("error", f"prefill failed: {type(e).__name__}: {e}"))
        return True

    def _prefill(self, row: int, job: Job) -> None:
        L = job.input_ids.shape[0]
        if not self._active():
            self.cur = L  # an empty batch: start right after this prompt
        elif self.cur < L:
            self._move(0, self.cur, L - self.cur)  # make room on the left
        self.rows[row] = job  # from here on a failure frees the row
        lo, hi = self.cur - L, self.cur
        job.start = lo
        ids, types = job.input_ids[None].to(self.device), job.token_type_ids[None].to(self.device)
        pixels = None
        if job.pixel_values is not None:
            vision_device = self.model.vision.patch_embed.proj.weight.device
            pixels = job.pixel_values[None].to(device=vision_device, dtype=self.model.dtype)
        positions = build_position_ids(types)
        views = [CacheView(c.k[row:row + 1, :, lo:hi], c.v[row:row + 1, :, lo:hi]) for c in self.caches]
        # The same call as DecodeSession.prefill for an unpadded prompt: causal attention over the prompt itself.
        out = self.model(ids, types, None, pixels, positions, kv_caches=views, cache_pos=0, last_logits_only=True)
        job.pixel_values = None  # not needed any more: its features are in the cache
        self.logits[row] = out.logits[0, -1]
        self.key_valid[row] = False
        self.key_valid[row, lo:hi] = True
        self.next_pos[row] = positions.max() + 1
        self.seen[row] = False
        self.seen[row, ids[0]] = True  # HF's repetition penalty counts every prompt id
        job.stream = TextStream(self.tokenizer, job.stop)
        if job.sampling.get("do_sample"):
            job.generator = row_generators(1, job.seed, self.device)[0]

    def _sample(self, active: list[tuple[int, Job]]) -> torch.Tensor:
        """(B,) next tokens (pad for free rows); rows with the same settings are processed together, and each
        sampled row draws from its own generator, so a row samples what `model.chat` would with its seed."""
        tokens = torch.full((self.max_batch,), self.pad_id, dtype=torch.long, device=self.device)
        groups: dict[tuple, list[tuple[int, Job]]] = {}
        for row, job in active:
            groups.setdefault(tuple(sorted(job.sampling.items())), []).append((row, job))
        for members in groups.values():
            index = torch.tensor([row for row, _ in members], device=self.device)
            scores = process_logits(self.logits[index], self.seen[index], **members[0][1].sampling)
            if members[0][1].generator is None:
                tokens[index] = scores.argmax(-1)
            else:
                probs = scores.softmax(-1)
                tokens[index] = torch.cat([torch.multinomial(probs[i], 1, generator=job.generator)
                                           for i, (_, job) in enumerate(members)])
        return tokens

    def _to_host(self, tokens: torch.Tensor) -> Callable[[], list[int]]:
        """Start copying `tokens` to the host; the function returned waits for that copy only (not for work queued
        after it, such as the next step) and gives the list."""
        if self.host_tokens is None:
            return tokens.tolist
        self.host_tokens.copy_(tokens, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return lambda: (copied.synchronize(), self.host_tokens.tolist())[1]

    def _emit(self, active: list[tuple[int, Job]], values: list[int]) -> None:
        """Tokens -> text pieces; rows that end leave the batch. As `cogvlm.chat`: eos ends the text, a stop string
        cuts it, and max_tokens ends it with the held-back tail released."""
        for row, job in active:
            token = values[row]
            job.generated += 1
            reason = None
            if token == self.eos_id:
                piece, reason = job.stream.end(), "stop"
            else:
                piece = job.stream.put(token)
                if job.stream.stopped:
                    reason = "stop"
                elif job.generated == job.max_new_tokens:
                    piece += job.stream.end()
                    reason = "stop" if job.stream.stopped else "length"
            if piece:
                job.emit(("text", piece))
            if reason:
                self._leave(row, "completed", ("done", reason, job.input_ids.shape[0], job.generated))

    def _leave(self, row: int, outcome: str, event: tuple | None = None) -> None:
        job, self.rows[row] = self.rows[row], None
        self.key_valid[row] = False
        self.next_pos[row] = 0
        self.counts[outcome] += 1
        if event is not None:
            job.emit(event)

    def _step(self, tokens: torch.Tensor) -> None:
        if self.cur == self.capacity:
            self._compact()
        self.tokens.copy_(tokens.view(-1, 1))
        if self.use_graph:
            self.cache_pos.fill_(self.cur)
            if self.graph is None:
                self._capture()
            self.graph.replay()
            self.logits.copy_(self.graph_logits)
        else:
            active = self._active()
            lo, n = min(job.start for _, job in active), active[-1][0] + 1
            self.cache_pos.fill_(self.cur - lo)
            self.logits[:n] = self._forward(n, lo, self.cur + 1)
        self.next_pos += 1
        self.cur += 1
        self.counts["steps"] += 1

    def _forward(self, n: int, lo: int, hi: int) -> torch.Tensor:
        """One step for rows [0, n) over cache slots [lo, hi): (n, V) logits. Only in-place device work on fixed
        buffers, so that the whole-batch call can be graph-captured."""
        key_valid = self.key_valid[:n, lo:hi]
        key_valid.index_fill_(1, self.cache_pos, True)
        views = [CacheView(c.k[:n, :, lo:hi], c.v[:n, :, lo:hi]) for c in self.caches]
        return self.model(self.tokens[:n], attention_mask=key_valid, position_ids=self.next_pos[:n],
                          kv_caches=views, cache_pos=self.cache_pos).logits[:, -1]

    def _capture(self) -> None:
        # As DecodeSession._capture: warm up on a side stream, undo the warm-up's mask change (the slot it wrote is
        # written again by the real step), then record the whole-batch step with the fused kernels.
        saved = self.key_valid.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), fused_kernels():
            self._forward(self.max_batch, 0, self.capacity)
        torch.cuda.current_stream().wait_stream(stream)
        self.key_valid.copy_(saved)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), fused_kernels():
            self.graph_logits = self._forward(self.max_batch, 0, self.capacity)

    def _compact(self) -> None:
        """The shared slot reached the end of the cache: move every row left by the smallest start."""
        shift = min(job.start for _, job in self._active())
        self._move(shift, self.cur, -shift)
        self.counts["compactions"] += 1

    def _move(self, lo: int, hi: int, by: int) -> None:
        """Move cache slots [lo, hi) of every row by `by` slots (the active rows' starts and `cur` follow)."""
        for cache in self.caches:
            for t in (cache.k, cache.v):
                t[:, :, lo + by:hi + by] = t[:, :, lo:hi].clone()
        valid = self.key_valid[:, lo:hi].clone()
        self.key_valid[:, min(lo, lo + by):max(hi, hi + by)] = False
        self.key_valid[:, lo + by:hi + by] = valid
        for _, job in self._active():
            job.start += by
        self.cur += by
