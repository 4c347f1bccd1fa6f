"""The peer: Hugging Face transformers' own Llama on the same decode work, at its fastest (static KV cache +
torch.compile), for bench/bench.py to print our ratio to it.

    python bench/peer.py [--preset cogvlm-chat-hf] [--batches 1 8] [--context 1252] [--new-tokens 128] [--json OUT]

CogVLM's decode step reads only its language path, which has Vicuna-7B's shapes; so the peer is `LlamaForCausalLM`
with the preset's text sizes, random bf16 weights made on the GPU, and a prompt of `--context` text tokens (the KV
cache then holds as many positions as ours after one image and 24 text tokens). Decode rate, greedy, in gpt-fast's
loop: a `StaticCache`, the prefill eager, every decode step through `torch.compile(forward, mode="reduce-overhead")`
(transformers' documented way to compile a static-cache model): (T(1 + N new) - T(1 new)) / N after two warm-up runs.
(`generate(cache_implementation="static")` with a compiled `forward` failed with transformers 5.17 on an H200,
CUDA-graph outputs overwritten at the cache's `index_copy_`; leaving the compilation to `generate` ran at 4.3 tok/s:
docs/benchmarks.md.) Needs transformers (the device's image has it; it is no dependency of this project).
`--no-compile --device cpu` is a smoke run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cogvlm.config import CogVLMConfig  # noqa: E402


def build(text, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
                         num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
                         num_key_value_heads=text.num_attention_heads, vocab_size=text.vocab_size,
                         max_position_embeddings=text.max_position_embeddings, rms_norm_eps=text.rms_norm_eps,
                         rope_theta=text.rope_theta, bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
                         pad_token_id=text.pad_token_id, tie_word_embeddings=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # made in bf16 on the GPU directly (transformers' own random init)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    return model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode_rate(model, batch: int, context: int, new_tokens: int, device: str, compile: bool) -> float:
    """gpt-fast's loop on transformers' model: a StaticCache, the prefill eager, each decode step through
    `torch.compile(forward, mode="reduce-overhead")` (CUDA graphs), greedy. (T(1 + N new) - T(1 new)) / N."""
    from transformers import StaticCache

    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(100, model.config.vocab_size, (batch, context), generator=g).to(device)
    cache = StaticCache(config=model.config, max_cache_len=context + new_tokens + 1)
    step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True) if compile else model.forward

    def run(n: int) -> float:
        cache.reset()
        sync(device)
        start = time.perf_counter()
        out = model(ids, past_key_values=cache, cache_position=torch.arange(context, device=device), use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for i in range(n - 1):
            if compile:
                torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed: reuse its buffers
            out = step(token, past_key_values=cache, cache_position=torch.tensor([context + i], device=device),
                       use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        return time.perf_counter() - start

    run(new_tokens), run(1)  # warm-up: compilation, graph capture
    first, full = min(run(1) for _ in range(3)), min(run(1 + new_tokens) for _ in range(2))
    return batch * new_tokens / (full - first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cogvlm-chat-hf", help="a preset name or a config file/folder")
    ap.add_argument("--batches", type=int, nargs="+", default=[1])
    ap.add_argument("--context", type=int, default=1252, help="prompt tokens (ours: one image + 24 text tokens)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-compile", action="store_true", help="eager (a CPU smoke run)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    import transformers

    text = CogVLMConfig.load(args.preset).text
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = build(text, args.device, dtype)
    r = {"peer": f"transformers {transformers.__version__} LlamaForCausalLM, static cache"
         + ("" if args.no_compile else " + torch.compile (reduce-overhead) decode step"), "context": args.context,
         "new_tokens": args.new_tokens}
    with torch.no_grad():
        for batch in args.batches:
            r[f"decode_b{batch}_tok_s"] = decode_rate(model, batch, args.context, args.new_tokens, args.device,
                                                        compile=not args.no_compile)
    print(json.dumps(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
