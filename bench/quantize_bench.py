"""Weight-only int8/int4 quantization: memory, speed and quality per mode, beside bf16 / fp32.

    python bench/quantize_bench.py speed [--modes bf16 int8 int4-g128] [--json OUT]   # one GPU, full size, random weights
    python bench/quantize_bench.py memory                                           # arithmetic, no weights (CPU)
    python bench/quantize_bench.py accuracy [--n 300 --seed 1234]                   # tiny-shapes exact match (CPU)
    python bench/quantize_bench.py fixtures                                         # fixture-model logits (CPU)
    python bench/quantize_bench.py qlora [--modes int4-g128 int8]                   # QLoRA step memory (GPU)

`speed` builds full-size CogVLM with random bf16 weights on the GPU (bench/random_weights.py), computes the bf16
reference (text logits of the prompt, 128 greedy tokens), quantizes the same weights in place, and measures: weights
and peak allocated memory at batch 1 (one 490 px image + 24 text tokens + 128 new tokens), time to first token,
decode tok/s at each batch as a streaming caller sees it (`generate_tokens`: n tokens over the time from the first
token reaching the host to the (n + 1)-th; the JSON also has the older (T(1 + n new) - T(1 new)) / n through
`generate`, which carries the noise of two prefills), and the quality against
bf16 (logits relative error, greedy-token agreement). Each mode runs in its own process, so memory figures do not
mix. Inductor's coordinate-descent tuning is turned on (gpt-fast's setting, which an earlier compiled int8 product
needed; it matters now only with `--compiled`; `--no-coordinate-descent` to compare). `--compiled`: each ViT block and decoder layer compiled
(`cogvlm.speed.compile_layers`), as `cogvlm caption` runs on a GPU; bf16 is then compiled too.
`qlora` runs bench/finetune_step.py's step (one 490 px image + 24 prompt + 32 answer tokens, bf16 autocast, fused
AdamW, 3 steps) with `--preset lora` over the quantized base in the plain layout, gradient checkpointing on: peak
allocated memory (target for int4: <= 22 GB) and step time.
Modes: bf16, int8, int8-novit, int4-g32/64/128/256, int4-g128-novit ("-novit": the ViT stays bf16).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cogvlm import CogVLM  # noqa: E402
from cogvlm.config import CogVLMConfig  # noqa: E402
from cogvlm.model import CogVLM as Network  # noqa: E402
from cogvlm.quantize import LM_HEAD_TARGETS, QuantSpec, pack_model, quantize_model, target_patterns, weight_bytes  # noqa: E402
from cogvlm.swap import select  # noqa: E402
from cogvlm.meta import meta_device  # noqa: E402
from cogvlm.speed import compile_layers  # noqa: E402

GB = 1e9


def parse_mode(mode: str, modules=None) -> QuantSpec | None:
    """"bf16"/"fp32" -> None; "int8", "int4-g64", "int4-g128-novit" -> the spec."""
    if mode in ("bf16", "fp32"):
        return None
    parts = mode.split("-")
    group = next((int(p[1:]) for p in parts if p.startswith("g")), None)
    return QuantSpec(parts[0], group if parts[0] == "int4" else None, "novit" not in parts, modules)


# ------------------------------------------------------------------------------------------------ memory (CPU)
def memory_rows(preset: str = "cogvlm-chat-hf", text_tokens: int = 24, new_tokens: int = 128) -> list[dict]:
    """Bytes per mode from the meta model with the swap applied, plus the batch-1 KV cache the decode session
    allocates (its length rounded up to 256 slots, as `cogvlm.generate.session_for` does)."""
    cfg = CogVLMConfig.load(preset)
    tokens = 1 + cfg.num_image_tokens + text_tokens + new_tokens
    slots = -(-tokens // 256) * 256
    kv = 2 * cfg.text.num_hidden_layers * slots * cfg.text.hidden_size * 2
    rows = []
    for mode in ("bf16", "int8-novit", "int8", "int4-g128-novit", "int4-g32", "int4-g64", "int4-g128"):
        with meta_device():
            model = Network(cfg)
            spec = parse_mode(mode)
            if spec:
                quantize_model(model, spec)
        parts = {name: weight_bytes(getattr(model, name)) for name in ("vision", "adapter")}
        parts["decoder"] = weight_bytes(model.llm.layers)
        parts["embed+lm_head+norm"] = weight_bytes(model) - sum(parts.values())
        rows.append({"mode": mode, **parts, "weights": weight_bytes(model), "kv_b1": kv, "tokens": tokens,
                     "total": weight_bytes(model) + kv})
    return rows


def print_memory(rows: list[dict]) -> None:
    print(f"| mode | ViT | adapter | decoder | embed + lm_head + norms | weights | + KV cache ({rows[0]['tokens']} tokens)"
          " |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        cells = [r["vision"], r["adapter"], r["decoder"], r["embed+lm_head+norm"], r["weights"], r["total"]]
        print(f"| {r['mode']} | " + " | ".join(f"{c / GB:.2f} GB" for c in cells) + " |")


# ---------------------------------------------------------------------------------------------- accuracy (CPU)
def divisible_modules(cfg: CogVLMConfig, group: int, quantize_vision: bool) -> tuple[str, ...]:
    """The target layers whose input width `group` divides (a tiny model is too narrow for int4's larger groups), and
    lm_head (int8 under both modes: no groups)."""
    with meta_device():
        model = Network(cfg)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    names = select(target_patterns("int4", quantize_vision), linears)
    return tuple(n for n in names if n in LM_HEAD_TARGETS or model.get_submodule(n).in_features % group == 0)


def load_mode(path, mode: str):
    cfg = CogVLMConfig.load(path)
    spec = parse_mode(mode)
    if spec and spec.mode == "int4":
        modules = divisible_modules(cfg, spec.group_size, spec.quantize_vision)
        if len(modules) < len(divisible_modules(cfg, 32, spec.quantize_vision)):
            spec = parse_mode(mode, modules)
    model = CogVLM.from_pretrained(path, device="cpu", dtype=torch.float32)
    if spec:
        spec = quantize_model(model, spec)
        pack_model(model)
    return model, spec


def run_accuracy(args) -> list[dict]:
    from cogvlm.shapes import generate
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        data = generate(Path(tmp) / "shapes", args.n, args.seed)  # = python -m cogvlm.shapes --n N --seed S
        records = [json.loads(line) for line in data.read_text().splitlines()]
        images = {r["image"]: Image.open(data.parent / r["image"]).convert("RGB") for r in records}
    rows = []
    for mode in args.modes:
        model, spec = load_mode(args.model, mode)
        t0 = time.time()
        answers = model.chat_batch([images[r["image"]] for r in records],
                                   [r["conversations"][0]["content"] for r in records], batch_size=150,
                                   max_new_tokens=8)
        right: dict[str, list[bool]] = {}
        for r, a in zip(records, answers):
            right.setdefault(r["meta"]["question"], []).append(a.strip() == r["conversations"][1]["content"])
        row = {"mode": mode, "seconds": round(time.time() - t0, 1),
               "quantized": len(spec.modules) if spec else 0,
               "all": sum(sum(v) for v in right.values()) / len(records)}
        row.update({k: sum(v) / len(v) for k, v in right.items()})
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def run_fixtures(args) -> list[dict]:
    sys.path.insert(0, str(ROOT / "tests"))
    from cogvlm.convert import convert
    from test_quantize import FIXTURES, fixture_quality  # the test's own metric, so the doc and test agree

    with tempfile.TemporaryDirectory() as tmp:
        folder = convert(FIXTURES / "model", Path(tmp) / "m", dtype="fp32")
        reference = CogVLM.from_pretrained(folder, device="cpu", dtype=torch.float32)
        rows = []
        for mode in args.modes:
            model, _ = load_mode(folder, mode)
            rows.append({"mode": mode, **fixture_quality(model, reference)})
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


# ------------------------------------------------------------------------------------------------- speed (GPU)
class Device:
    """The GPU's clock and memory counters; on the CPU (`--device cpu`, a smoke test of this script) they read 0."""

    def __init__(self, name: str):
        self.device = torch.device(name)
        self.cuda = self.device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def allocated(self) -> float:
        return torch.cuda.memory_allocated() / GB if self.cuda else 0.0

    def peak(self) -> float:
        return torch.cuda.max_memory_allocated() / GB if self.cuda else 0.0

    def reset(self):
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def name(self) -> str:
        return torch.cuda.get_device_name() if self.cuda else "cpu"


def prompt(cfg: CogVLMConfig, batch: int, text_tokens: int, device: torch.device):
    """bench/bench.py's prompt: [bos, image placeholders, random text] and picture-like pixels, in bf16."""
    from bench.bench import synthetic_images

    g = torch.Generator().manual_seed(0)
    n = cfg.num_image_tokens
    text = torch.randint(100, cfg.text.vocab_size, (batch, text_tokens), generator=g)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.zeros(batch, n, dtype=torch.long), text], 1)
    types = torch.zeros_like(ids)
    types[:, 1:1 + n] = 1
    pixels = synthetic_images(batch, cfg.vision.image_size, g).bfloat16()
    return ids.to(device), types.to(device), pixels.to(device)


def run_speed_mode(args) -> dict:
    import torch._inductor.config as inductor

    from bench.random_weights import random_model
    from cogvlm.generate import generate_tokens

    inductor.coordinate_descent_tuning = not args.no_coordinate_descent
    dev = Device(args.device)
    t0 = time.perf_counter()

    def phase(name: str) -> None:  # on stderr as it happens, so a run cut short still shows where its time went
        print(f"[{args.one}] {time.perf_counter() - t0:7.1f} s  {name}", file=sys.stderr, flush=True)

    cfg = CogVLMConfig.load(args.preset)
    model = random_model(cfg, device=dev.device)  # bf16, the same weights for every mode (seed 0)
    phase("model made")
    ids, types, pixels = prompt(cfg, 1, args.text_tokens, dev.device)
    text = types[0] == 0
    never = -1  # no eos: every run decodes exactly the tokens asked for
    with torch.no_grad():
        ref_logits = model(ids, types, pixel_values=pixels).logits[0, text].float().cpu()
    ref_tokens = torch.tensor(model.generate(ids, types, pixel_values=pixels, max_new_tokens=args.decode_steps,
                                             eos_id=never)[0])
    phase("bf16 reference")
    spec = parse_mode(args.one)
    if spec:
        quantize_model(model, spec)
        pack_model(model, torch.bfloat16)
        phase("quantized")
    if args.compiled:  # as `cogvlm caption` runs on a GPU (cogvlm.speed); compiled by the first calls below
        compile_layers(model)
    model.__dict__.pop("_decode_session", None)
    dev.reset()
    r = {"mode": args.one, "compiled": args.compiled, "card": dev.name(), "torch": torch.__version__,
         "weights_GB": dev.allocated(),
         "prompt_tokens": ids.shape[1]}
    with torch.no_grad():
        logits = model(ids, types, pixel_values=pixels).logits[0, text].float().cpu()
    r["logits_rel_err_vs_bf16"] = ((logits - ref_logits).norm() / ref_logits.norm()).item()
    tokens = torch.tensor(model.generate(ids, types, pixel_values=pixels, max_new_tokens=args.decode_steps,
                                         eos_id=never)[0])
    r["greedy_agreement_vs_bf16"] = (tokens == ref_tokens).float().mean().item()
    r["greedy_first_divergence"] = int((tokens != ref_tokens).nonzero()[0]) if (tokens != ref_tokens).any() else None
    phase("quality against bf16 (first generate: compilation, graph capture)")

    def timed(batch_ids, batch_types, batch_pixels, new):
        dev.sync()
        t = time.perf_counter()
        model.generate(batch_ids, batch_types, pixel_values=batch_pixels, max_new_tokens=new, eos_id=never)
        dev.sync()
        return time.perf_counter() - t

    def streamed(batch_ids, batch_types, batch_pixels, new):
        """Seconds from the first token reaching the host to the last, as a streaming caller sees them."""
        stamps = [time.perf_counter() for _ in generate_tokens(model, batch_ids, batch_types,
                                                               pixel_values=batch_pixels, max_new_tokens=new,
                                                               eos_id=never)]
        return stamps[-1] - stamps[0]

    for batch in args.batches:
        b_ids, b_types, b_pixels = prompt(cfg, batch, args.text_tokens, dev.device)
        timed(b_ids, b_types, b_pixels, args.decode_steps)  # warm-up: compile, graph capture
        dev.reset()
        first = min(timed(b_ids, b_types, b_pixels, 1) for _ in range(3))
        full = min(timed(b_ids, b_types, b_pixels, 1 + args.decode_steps) for _ in range(2))
        stream = min(streamed(b_ids, b_types, b_pixels, 1 + args.decode_steps) for _ in range(2))
        r[f"ttft_b{batch}_ms"] = first * 1e3
        r[f"decode_b{batch}_tok_s"] = batch * args.decode_steps / stream
        r[f"decode_b{batch}_by_difference_tok_s"] = batch * args.decode_steps / (full - first)
        r[f"peak_b{batch}_GB"] = dev.peak()
        phase(f"batch {batch} timed")
    return r


def run_qlora_mode(args) -> dict:
    from bench.finetune_step import batch
    from bench.random_weights import random_model
    from cogvlm.finetune import TrainConfig, make_trainable, training_loss

    dev = Device(args.device)
    cfg = CogVLMConfig.load(args.preset)
    model = random_model(cfg, device=dev.device)
    spec = parse_mode(args.one)
    if spec:
        quantize_model(model, spec)
        pack_model(model, torch.bfloat16, kernels=False)  # what `cogvlm finetune --quantize` trains on
    trainable = make_trainable(model, TrainConfig(data="", out="", preset="lora", lora_dropout=0.0,
                                                  gradient_checkpointing=True))
    params = [p for n, p in model.named_parameters() if n in set(trainable)]
    dev.reset()
    r = {"mode": args.one, "card": dev.name(), "weights_GB": dev.allocated(),
         "trainable": sum(p.numel() for p in params)}
    opt = torch.optim.AdamW(params, lr=1e-4, fused=dev.cuda)
    data = batch(cfg, 1, args.text_tokens, 32, dev.device)
    times = []
    for _ in range(3):
        dev.sync()
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.device.type, dtype=torch.bfloat16):
            loss, _ = training_loss(model, data)
        loss.backward()
        opt.step()
        dev.sync()
        times.append(time.perf_counter() - t)
    r.update(peak_GB=dev.peak(), step_s=sum(times[1:]) / 2, loss=loss.item())
    return r


def run_children(args) -> list[dict]:
    rows = []
    for mode in args.modes:
        cmd = [sys.executable, __file__, args.what, "--one", mode, "--preset", args.preset, "--device", args.device,
               "--text-tokens", str(args.text_tokens), "--decode-steps", str(args.decode_steps),
               "--batches", *map(str, args.batches)]
        cmd += ["--no-coordinate-descent"] if args.no_coordinate_descent else []
        cmd += ["--compiled"] if args.compiled else []
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # its stderr (phases, errors) passes through
        if out.returncode:
            rows.append({"mode": mode, "error": f"exit status {out.returncode} (its messages are above)"})
        else:
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def print_speed(rows: list[dict], batches: list[int]) -> None:
    base = next((r for r in rows if r["mode"] == "bf16" and "error" not in r), None)
    first = batches[0]  # (peak memory and time to first token at the first batch size measured)
    head = ["mode", "weights", f"peak b{first}", f"TTFT b{first}"] + [f"decode b{b}" for b in batches]
    head += ["logits err", "greedy"]
    print("| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | failed: {r['error']} |")
            continue
        rel = (lambda k: f" ({r[k] / base[k]:.2f}x)") if base else (lambda k: "")
        cells = [r["mode"] + (" (compiled)" if r.get("compiled") else ""), f"{r['weights_GB']:.1f} GB",
                 f"{r[f'peak_b{first}_GB']:.1f} GB", f"{r[f'ttft_b{first}_ms']:.0f} ms{rel(f'ttft_b{first}_ms')}"]
        cells += [f"{r[f'decode_b{b}_tok_s']:.0f} tok/s{rel(f'decode_b{b}_tok_s')}" for b in batches]
        cells += [f"{r['logits_rel_err_vs_bf16'] * 100:.2f} %", f"{r['greedy_agreement_vs_bf16'] * 100:.0f} %"]
        print("| " + " | ".join(cells) + " |")


def print_rows(rows: list[dict], percent: bool = False) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
    for r in rows:
        cells = [(k, r.get(k, "")) for k in keys]
        print("| " + " | ".join(f"{v * 100:.1f} %" if percent and isinstance(v, float) and k != "seconds"
                                else f"{v:.3g}" if isinstance(v, float) else str(v) for k, v in cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["speed", "memory", "accuracy", "fixtures", "qlora"])
    ap.add_argument("--modes", nargs="+")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # speed, qlora: the single mode a child process measures
    ap.add_argument("--preset", default="cogvlm-chat-hf", help="a preset name or a config file/folder")
    ap.add_argument("--device", default="cuda", help="speed, qlora: cuda (cpu: a smoke test of the script)")
    ap.add_argument("--text-tokens", type=int, default=24)
    ap.add_argument("--decode-steps", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--no-coordinate-descent", action="store_true")
    ap.add_argument("--compiled", action="store_true", help="speed: compile the layers, as `cogvlm caption` does")
    ap.add_argument("--model", default=str(ROOT / "examples" / "tiny-shapes"), help="accuracy: the model folder")
    ap.add_argument("--n", type=int, default=300, help="accuracy: fresh Shapes images (3 questions each)")
    ap.add_argument("--seed", type=int, default=1234, help="accuracy: their seed (docs/finetune.md uses 1234)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_speed_mode(args) if args.what == "speed" else run_qlora_mode(args)))
        return
    default_modes = {"speed": ["bf16", "int8", "int4-g128", "int4-g64", "int8-novit", "int4-g128-novit"],
                     "accuracy": ["fp32", "int8", "int8-novit", "int4-g32", "int4-g32-novit", "int4-g64",
                                  "int4-g128"],
                     "fixtures": ["int8", "int8-novit", "int4-g32", "int4-g32-novit"],
                     "qlora": ["int4-g128", "int8", "bf16"]}
    args.modes = args.modes or default_modes.get(args.what)
    if args.what == "memory":
        rows = memory_rows(args.preset, args.text_tokens, args.decode_steps)
        print_memory(rows)
    elif args.what == "speed":
        rows = run_children(args)
        print_speed(rows, args.batches)
    elif args.what == "qlora":
        rows = run_children(args)
        print_rows(rows)
    else:
        rows = run_accuracy(args) if args.what == "accuracy" else run_fixtures(args)
        print_rows(rows, percent=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
