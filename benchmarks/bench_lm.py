"""Benchmark Stage 2 training and generation speed on this machine against its measured matmul peak.

Usage::

    .venv/bin/python benchmarks/bench_lm.py [--llm smollm2-135m] [--rois 116] [--steps-per-scan 5]
                                            [--batch 1] [--text 96] [--iters 3] [--threads N]

Model: the backbone with its default LoRA adapters, an fMRI grid of ``rois x steps`` tokens (116 x 5 = 580
by default, the CPU setting of ``fmrilm align``) followed by ``text`` description tokens, plus a T2T batch of
the same size and ``text`` tokens. For fp32 and bf16 (autocast) it reports:

* training tokens/s: (fMRI + F2T + T2T tokens of a step) / median wall time of forward + backward + AdamW;
* achieved FLOP/s: FLOPs of one forward + backward counted by ``torch.utils.flop_counter.FlopCounterMode``
  (matmuls and attention) / the same time, and its share of the peak;
* peak: the best of a few 2048^3 matmuls in that dtype on the same threads;
* generation latency per scan: greedy decoding of 64 new tokens with the KV cache, batch 1 (eos ignored).

Prints a markdown table. Use ``--threads 1`` on a CPU shared with other jobs: oversubscribed OpenMP threads
spin and wait, which can make two threads several times slower than one.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

GEN_TOKENS = 64


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of a (size x size) @ (size x size) product in ``dtype``."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up: first call allocates and picks kernels
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def build(llm: str, rois: int, steps: int):
    from fmrilm.lm.model import FMRILanguageModel, FMRILMConfig

    torch.manual_seed(0)
    config = FMRILMConfig(llm=llm, n_rois=rois, n_steps=steps, feature_dim=64, codebook_size=512, lora_dropout=0.0)
    return FMRILanguageModel(config)


def batch(model, size: int, text: int) -> dict:
    c, vocab = model.config, model.tokenizer.vocab_size
    ids = torch.randint(0, vocab, (size, text))
    return {"features": torch.randn(size, c.n_steps, c.n_rois, c.feature_dim),
            "codes": torch.randint(0, c.codebook_size, (size, c.n_steps, c.n_rois)),
            "text_ids": ids, "text_attention": torch.ones_like(ids),
            "lm_ids": torch.randint(0, vocab, (size, text)), "lm_attention": torch.ones_like(ids)}


def train_step(model, optimizer, data: dict, bf16: bool) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(data)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_flops(model, data: dict, bf16: bool) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model(data)["loss"].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def generation_latency(model, bf16: bool, repeats: int = 2) -> float:
    c = model.config
    features = torch.randn(1, c.n_steps, c.n_rois, c.feature_dim)
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        run = lambda: model.generate(features, max_new_tokens=GEN_TOKENS, eos_token_id=-1)  # noqa: E731
        run()
        latency = min(_timed(run) for _ in range(repeats))
    model.train()
    return latency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm", default="smollm2-135m")
    parser.add_argument("--rois", type=int, default=116)
    parser.add_argument("--steps-per-scan", type=int, default=5, help="W, time steps of the fMRI grid")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--text", type=int, default=96, help="F2T and T2T tokens per sample")
    parser.add_argument("--iters", type=int, default=3, help="timed training steps per precision")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args.llm, args.rois, args.steps_per_scan).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    data = batch(model, args.batch, args.text)
    fmri = args.rois * args.steps_per_scan
    tokens = args.batch * (fmri + 2 * args.text)
    rows = []
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        bf16 = dtype == torch.bfloat16
        peak = matmul_peak(dtype)
        train_step(model, optimizer, data, bf16)  # warm-up
        seconds = statistics.median(_timed(lambda: train_step(model, optimizer, data, bf16)) for _ in range(args.iters))
        flops = step_flops(model, data, bf16)
        rows.append((name, tokens / seconds, seconds, flops / seconds, peak, generation_latency(model, bf16)))
    print(f"\n{args.llm} + LoRA, {args.rois} ROIs x W={args.steps_per_scan} = {fmri} fMRI tokens + {args.text} text "
          f"+ {args.text} T2T tokens, batch {args.batch}, {torch.get_num_threads()} thread(s)\n")
    print("| precision | train tokens/s | s/step | achieved GFLOP/s | matmul peak GFLOP/s | % of peak "
          f"| generation s/scan ({GEN_TOKENS} tokens) |")
    print("|---|---|---|---|---|---|---|")
    for name, rate, seconds, achieved, peak, latency in rows:
        print(f"| {name} | {rate:.0f} | {seconds:.2f} | {achieved / 1e9:.1f} | {peak / 1e9:.1f} "
              f"| {100 * achieved / peak:.0f} % | {latency:.2f} |")


if __name__ == "__main__":
    main()
