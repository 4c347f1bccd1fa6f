"""Speed of full-size CogVLM on one GPU, each figure next to its physical limit on the same card.

    python bench/bench.py [--preset cogvlm-chat-hf] [--text-tokens 24] [--decode-steps 128] [--json OUT.json]
    python bench/bench.py --accuracy        # = bench/accuracy.py: bf16 vs fp32 logits, eager and compiled
    (the speed run ends with bench/peer.py, transformers' compiled Llama on the same decode work, and our ratio to it)
    python bench/bench.py --caption-only --device cpu --preset examples/tiny-shapes \
        --caption-images 8 --caption-batch 4 --caption-tokens 4      # the captioning figure alone: a CPU smoke run

Random bf16 weights are made on the GPU (no checkpoint). The card's ceilings are measured in the same run: a
device-to-device copy (bytes read + written) and a bf16 8192^3 matrix product. Limits: a batch-1 decode step must
read the language-path weights once (+ the KV cache), so its floor is bytes / copy bandwidth; the prefill floor is
its FLOPs / matmul rate.

The captioning figure is measured as users run it: `cogvlm.caption.run_caption_job` (the job behind `cogvlm
caption`) on JPEG files this script writes (--caption-images of --caption-size), the default prompt, into a JSONL
file; images/s after the first batch, whose time (allocations, graph capture, compilation) is reported apart.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.random_weights import param_bytes, random_model  # noqa: E402
from cogvlm.caption import run_caption_job  # noqa: E402
from cogvlm.config import CogVLMConfig  # noqa: E402
from cogvlm.generate import DecodeSession  # noqa: E402
from cogvlm.speed import compile_layers  # noqa: E402
from cogvlm.tokenizer import Tokenizer  # noqa: E402
from cogvlm import CogVLM  # noqa: E402

TOKENIZER = Path(__file__).resolve().parent.parent / "examples" / "tiny-shapes" / "tokenizer.model"  # Llama-2's


def cuda_time(fn, warmup: int = 2, iters: int = 5) -> float:
    """Median seconds of fn() between CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def commit(cwd=None) -> str:
    """The checkout's commit, with "-dirty" when tracked files differ from it (a copied working tree, say)."""
    return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                          cwd=cwd).stdout.strip()


def copy_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(2**29, device="cuda")
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), warmup=3, iters=10)
    return 2 * src.numel() * src.element_size() / t


def matmul_rate() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192**3 / cuda_time(lambda: a @ b, warmup=3, iters=10)


def make_prompt(cfg: CogVLMConfig, batch: int, text_tokens: int, seed: int = 0, device: str = "cuda"):
    """[bos, image placeholders, text] rows with random text ids, and random normalised pixels."""
    g = torch.Generator().manual_seed(seed)
    n_img = cfg.num_image_tokens
    text = torch.randint(100, cfg.text.vocab_size, (batch, text_tokens), generator=g)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.zeros(batch, n_img, dtype=torch.long), text], 1)
    types = torch.zeros_like(ids)
    types[:, 1 : 1 + n_img] = 1
    return ids.to(device), types.to(device), synthetic_images(batch, cfg.vision.image_size, g).to(device).bfloat16()


def synthetic_images(batch: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Normalised pixels of picture-like images: smooth colour gradients with a few flat rectangles (white noise
    would be an unusually hard input for the ViT)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images = []
    for _ in range(batch):
        a = torch.rand(3, 3, generator=g) * 2 - 1
        img = a[:, 0, None, None] * xx + a[:, 1, None, None] * yy + a[:, 2, None, None] * xx * yy
        for _ in range(3):
            x0, y0 = torch.randint(0, size * 3 // 4, (2,), generator=g).tolist()
            w, h = torch.randint(size // 8, size // 3, (2,), generator=g).tolist()
            img[:, y0 : y0 + h, x0 : x0 + w] = (torch.rand(3, 1, 1, generator=g) * 3.6 - 1.8)
        images.append(img.clamp(-1.8, 2.1))
    return torch.stack(images)


def language_path_bytes(model: CogVLM) -> int:
    """Weights a text-only decode step reads, as held (bf16; int8 codes + scales; int4 packs + scales and zeros):
    language experts, norms, lm_head (not the embedding table)."""
    modules = [model.llm.lm_head, model.llm.norm]
    for layer in model.llm.layers:
        a = layer.attn
        modules += [a.language_expert_qkv, a.language_expert_dense, layer.mlp.language_expert, layer.attn_norm,
                    layer.mlp_norm]
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


def prefill_flops(model: CogVLM, ids: torch.Tensor) -> float:
    """2 * active parameters * tokens (+ attention) for the ViT and the decoder at this prompt."""
    cfg = model.cfg
    B, L = ids.shape
    n_vit = cfg.vision.num_patches + 1
    vit = 2 * sum(p.numel() for p in model.vision.layers.parameters()) * n_vit * B
    vit += 4 * cfg.vision.num_hidden_layers * n_vit**2 * cfg.vision.hidden_size * B
    per_layer_lang = sum(p.numel() for p in (model.llm.layers[0].attn.language_expert_qkv.weight,
                                             model.llm.layers[0].attn.language_expert_dense.weight))
    per_layer_lang += sum(p.numel() for p in model.llm.layers[0].mlp.language_expert.parameters())
    llm = 2 * per_layer_lang * cfg.text.num_hidden_layers * L * B  # each token uses one expert of equal size
    llm += 2 * cfg.text.num_hidden_layers * L**2 * cfg.text.hidden_size * B  # causal QK^T and PV
    adapter = 2 * sum(p.numel() for p in model.adapter.parameters()) * cfg.vision.num_patches * B
    return vit + llm + adapter + 2 * cfg.text.hidden_size * cfg.text.vocab_size * B


def generate(model, ids, types, pixels, new_tokens: int, session: DecodeSession | None = None) -> torch.Tensor:
    """Greedy, no early stop: prefill + new_tokens - 1 steps. Returns the token ids (B, new_tokens)."""
    B, L = ids.shape
    session = session or DecodeSession(model, B, L + new_tokens)
    tok = session.prefill(ids, types, pixel_values=pixels).argmax(-1)
    out = [tok]
    for _ in range(new_tokens - 1):
        tok = session.step(tok).argmax(-1)
        out.append(tok)
    return torch.stack(out, 1)


def run_speed(args) -> dict:
    r: dict = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "preset": args.preset}
    r["copy_GBps"] = copy_bandwidth() / 1e9
    r["matmul_TFLOPs"] = matmul_rate() / 1e12
    cfg = CogVLMConfig.from_name(args.preset)
    model = random_model(cfg)
    r["weights_GB"] = param_bytes(model) / 1e9
    r["lang_path_GB"] = language_path_bytes(model) / 1e9
    ids, types, pixels = make_prompt(cfg, 1, args.text_tokens)
    r["prompt_tokens"] = ids.shape[1]
    r["prefill_TFLOP"] = prefill_flops(model, ids) / 1e12
    r["ttft_floor_ms"] = r["prefill_TFLOP"] / r["matmul_TFLOPs"] * 1e3
    with torch.no_grad():
        measure(model, cfg, args, r, "", args.batches)  # eager layers
    if not args.eager_only:  # before the caption job: its batch-32 graphs slowed batch-1 prefills (66.6 vs 55.7 ms)
        t0 = time.perf_counter()
        compile_layers(model)
        with torch.no_grad():
            measure(model, cfg, args, r, "compiled_", args.compiled_batches)
        r["compiled_total_s"] = time.perf_counter() - t0
    else:
        os.environ["COGVLM_COMPILE"] = "0"  # the caption job too
    if args.caption_batch:  # through the job, which compiles the layers itself on a GPU (cogvlm.speed)
        r.update(run_caption(args, model))
        print(json.dumps({k: v for k, v in r.items() if k.startswith("caption")}), file=sys.stderr, flush=True)
    if not args.no_peer:
        r.update(run_peer(args, r["prompt_tokens"]))
    return r


def run_peer(args, context: int) -> dict:
    """bench/peer.py (transformers' compiled Llama on the same decode work) in a child process, batch 1."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peer.json"
        command = [sys.executable, str(Path(__file__).with_name("peer.py")), "--preset", args.preset, "--batches", "1",
                   "--context", str(context), "--new-tokens", str(args.decode_steps), "--json", str(out),
                   "--device", args.device] + (["--no-compile"] if args.device == "cpu" else [])
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not out.exists():
            return {"peer_error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
        peer = json.loads(out.read_text())
    return {"peer": peer["peer"], "peer_decode_b1_tok_s": peer["decode_b1_tok_s"]}


def measure(model, cfg, args, r: dict, key: str, batches) -> None:
    """ViT, time to first token and decode tok/s at each batch, into r[key + name]."""
    ids, types, pixels = make_prompt(cfg, 1, args.text_tokens)
    L = ids.shape[1]
    session = DecodeSession(model, 1, L + args.decode_steps)  # (first: it records the tower's CUDA graph)
    r[key + "vit_ms"] = cuda_time(lambda: model.encode_images(pixels)) * 1e3
    r[key + "ttft_ms"] = cuda_time(lambda: session.prefill(ids, types, pixel_values=pixels).argmax(-1)) * 1e3
    del session
    kv_bytes_per_token = 2 * cfg.text.num_hidden_layers * cfg.text.hidden_size * 2
    for batch in batches:
        ids_b, types_b, pixels_b = make_prompt(cfg, batch, args.text_tokens)
        torch.cuda.reset_peak_memory_stats()
        session = DecodeSession(model, batch, L + args.decode_steps + 1)
        session.prefill(ids_b, types_b, pixel_values=pixels_b)
        tok = torch.zeros(batch, dtype=torch.long, device="cuda")
        session.step(tok)  # captures the graph

        def steps(n=args.decode_steps - 8):
            session.length = L + 1  # rewind the host counter; slots past the prompt are simply rewritten
            session.cache_pos.fill_(L + 1)
            for _ in range(n):
                session.step(tok)

        t = cuda_time(steps, warmup=1, iters=3) / (args.decode_steps - 8)
        r[f"{key}decode_b{batch}_tok_s"] = batch / t
        ctx = L + args.decode_steps
        step_bytes = r["lang_path_GB"] * 1e9 + batch * ctx * kv_bytes_per_token
        r[f"{key}decode_b{batch}_GBps"] = step_bytes / t / 1e9
        r[f"decode_b{batch}_floor_tok_s"] = batch / (step_bytes / (r["copy_GBps"] * 1e9))
        r[f"{key}peak_b{batch}_GB"] = torch.cuda.max_memory_allocated() / 1e9  # weights included
        r[f"kv_b{batch}_GB"] = batch * (L + args.decode_steps + 1) * kv_bytes_per_token / 1e9
        del session
    print(json.dumps({k: round(v, 2) for k, v in r.items() if k.startswith(key) and isinstance(v, float)}),
          file=sys.stderr, flush=True)


def write_jpegs(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> None:
    """`n` picture-like JPEG files: a colour gradient with a few flat ellipses and boxes (quality 90, as cameras and
    the web write them; white noise would be an unusually hard input for the decoder and the ViT)."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    w, h = size
    for i in range(n):
        left, right = [tuple(rng.randrange(256) for _ in range(3)) for _ in range(2)]
        im = Image.linear_gradient("L").rotate(90).resize((w, h))  # 255 on the left .. 0 on the right
        im = Image.composite(Image.new("RGB", (w, h), left), Image.new("RGB", (w, h), right), im)
        draw = ImageDraw.Draw(im)
        for _ in range(4):
            x, y = rng.randrange(w * 3 // 4), rng.randrange(h * 3 // 4)
            box = (x, y, x + rng.randrange(w // 8, w // 3), y + rng.randrange(h // 8, h // 3))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape(box, fill=tuple(rng.randrange(256) for _ in range(3)))
        im.save(folder / f"{i:05d}.jpg", "JPEG", quality=90)


def run_caption(args, model=None) -> dict:
    """Images/s of `run_caption_job` on JPEG files, as `cogvlm caption` runs it; the first batch's time apart."""
    cuda = torch.device(args.device).type == "cuda"
    if model is None:
        cfg = CogVLMConfig.load(args.preset)
        model = random_model(cfg, device=args.device, dtype=torch.bfloat16 if cuda else torch.float32)
    model.tokenizer = Tokenizer(TOKENIZER)
    size = tuple(int(x) for x in args.caption_size.split("x"))
    with tempfile.TemporaryDirectory(prefix="cogvlm-bench-") as tmp:
        images = Path(tmp) / "images"
        images.mkdir()
        write_jpegs(images, args.caption_images, size)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        result = run_caption_job(model, [images], Path(tmp) / "captions.jsonl", batch_size=args.caption_batch,
                                 generation=dict(max_new_tokens=args.caption_tokens), model_name="random weights",
                                 progress=False)
    r = {"caption_images": result.captioned, "caption_batch": result.batch_size,
         "caption_batch_asked": args.caption_batch,
         "caption_tokens": args.caption_tokens, "caption_size": args.caption_size,
         "caption_first_batch_s": result.first_batch_seconds, "caption_total_s": result.seconds,
         "caption_images_s": result.steady_images_per_s}
    if cuda:
        r["caption_peak_GB"] = torch.cuda.max_memory_allocated() / 1e9
    return r


def print_table(r: dict) -> None:
    rows = [("card", r.get("card"), "")]
    if "copy_GBps" in r:
        rows += [
            ("copy bandwidth (measured)", f"{r['copy_GBps']:.0f} GB/s", ""),
            ("bf16 matmul 8192^3 (measured)", f"{r['matmul_TFLOPs']:.0f} TFLOP/s", ""),
            ("weights / language path", f"{r['weights_GB']:.1f} / {r['lang_path_GB']:.1f} GB", ""),
        ]
        for key, label in (("", "eager"), ("compiled_", "compiled")):
            if key + "ttft_ms" not in r:
                continue
            rows += [
                (f"ViT + adapter (one image), {label}", f"{r[key + 'vit_ms']:.1f} ms", "hub code 22.0 ms; target <= 18"),
                (f"time to first token, {label}", f"{r[key + 'ttft_ms']:.1f} ms",
                 f"floor {r['ttft_floor_ms']:.1f} ms ({r['prefill_TFLOP']:.1f} TFLOP); target <= 45"),
            ]
            for b in r.get("batches", []):
                if f"{key}decode_b{b}_tok_s" not in r:
                    continue
                floor = r[f"decode_b{b}_floor_tok_s"]
                rows.append((f"decode batch {b}, {label}", f"{r[f'{key}decode_b{b}_tok_s']:.1f} tok/s",
                             f"floor {floor:.1f} tok/s ({r[f'{key}decode_b{b}_tok_s'] / floor * 100:.0f} %); "
                             f"{r[f'{key}decode_b{b}_GBps']:.0f} GB/s; target >= {80 if b == 1 else 85} %"))
                rows.append((f"peak memory batch {b}, {label}", f"{r[f'{key}peak_b{b}_GB']:.1f} GB",
                             f"weights + KV = {r['weights_GB'] + r[f'kv_b{b}_GB']:.1f} GB"))
        if "compiled_total_s" in r:
            rows.append(("compiled: compile + timing runs", f"{r['compiled_total_s']:.0f} s", ""))
        if "peer_decode_b1_tok_s" in r:
            ours = r.get("compiled_decode_b1_tok_s") or r["decode_b1_tok_s"]
            rows.append(("peer decode batch 1", f"{r['peer_decode_b1_tok_s']:.1f} tok/s",
                         f"{r['peer']}; ours / peer = {ours / r['peer_decode_b1_tok_s']:.2f}x"))
        elif "peer_error" in r:
            rows.append(("peer decode batch 1", "not run", r["peer_error"]))
    if "caption_first_batch_s" in r:
        steady = r["caption_images_s"]
        rows += [
            (f"captioning (run_caption_job) batch {r['caption_batch']}, {r['caption_tokens']} tokens",
             f"{steady:.2f} images/s" if steady else "one batch only",
             f"after the first batch; {r['caption_images']} JPEG {r['caption_size']}; target >= 20 "
             "(the hub code: ~1.3 at batch 8)"),
            ("captioning, first batch", f"{r['caption_first_batch_s']:.2f} s",
             f"warm-up included; whole run {r['caption_total_s']:.1f} s"),
        ]
    w = max(len(a) for a, _, _ in rows)
    for a, b, c in rows:
        print(f"| {a:<{w}} | {b:>20} | {c}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cogvlm-chat-hf")
    ap.add_argument("--text-tokens", type=int, default=24)
    ap.add_argument("--decode-steps", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--compiled-batches", type=int, nargs="+", default=[1, 32], help="batches timed compiled too")
    ap.add_argument("--eager-only", action="store_true", help="no compiled layers (cogvlm.speed)")
    ap.add_argument("--no-peer", action="store_true", help="skip bench/peer.py (transformers' compiled Llama)")
    ap.add_argument("--caption-batch", type=lambda v: v if v == "auto" else int(v), default=32,
                    help="images per batch, or auto (cogvlm.batching, as `cogvlm caption` by default); 0: skip")
    ap.add_argument("--caption-tokens", type=int, default=64, help="new tokens per caption")
    ap.add_argument("--caption-images", type=int, default=256, help="JPEG files captioned")
    ap.add_argument("--caption-size", default="640x480", help="their width x height")
    ap.add_argument("--caption-only", action="store_true", help="only the captioning figure (runs on a CPU too)")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu with --caption-only")
    ap.add_argument("--accuracy", action="store_true", help="bf16 vs fp32 logits instead of speed (bench/accuracy.py)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.accuracy:  # its own script; the same options
        from bench.accuracy import main as accuracy

        return accuracy(["--preset", args.preset, "--device", args.device] + (["--json", args.json] if args.json else []))
    if args.caption_only:
        r = {"card": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
             "torch": torch.__version__, "preset": args.preset, **run_caption(args)}
    else:
        r = run_speed(args)
    r["batches"] = sorted(set(args.batches) | set(args.compiled_batches))
    r["date"] = time.strftime("%Y-%m-%d")
    r["commit"] = commit()
    r["command"] = " ".join(sys.argv)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    print_table(r)


if __name__ == "__main__":
    main()
