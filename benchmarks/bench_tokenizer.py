"""Benchmark Stage 1 training throughput: scans/s and achieved FLOP/s against this machine's matmul peak.

Usage::

    .venv/bin/python benchmarks/bench_tokenizer.py [--presets tiny S] [--precisions fp32 bf16] [--steps 2]
        [--batch tiny=8 S=2] [--rois 450] [--length 160]

For each preset and precision, one full training step of :class:`FMRITokenizerForTraining` (reconstruction,
commitment, SigLIP and domain-adversarial losses; AdamW) on random standardized scans of N x T (patch 32) is
run once as a warm-up (which also runs the codebook's one-off k-means initialisation), once under
``torch.utils.flop_counter.FlopCounterMode`` to count its FLOPs (matmuls and attention, forward + backward), then
``--steps`` times to time it. bf16 uses ``torch.autocast("cpu")`` as the
shared Trainer does. The peak is the best of a few 2048 x 2048 matmuls in the same precision with the same
threads (``torch.get_num_threads()``). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from fmrilm.tokenizer import FMRITokenizerForTraining, load_preset

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TEXT_DIM = 576  # SmolLM2-135M, the default LLM


def matmul_peak(precision: str, size: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of a (size x size) @ (size x size) matmul in this precision."""
    a = torch.randn(size, size, dtype=DTYPES[precision])
    b = torch.randn(size, size, dtype=DTYPES[precision])
    a @ b  # warm-up: thread pool and kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def make_step(preset: str, precision: str, batch: int, n_rois: int, length: int):
    """A closure running one training step, and the model's parameter count."""
    torch.manual_seed(0)
    config = load_preset(preset, n_rois=n_rois, length=length, text_dim=TEXT_DIM, llm_embed_dim=TEXT_DIM)
    model = FMRITokenizerForTraining(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = {"x": torch.randn(batch, length, n_rois), "text_features": torch.randn(batch, TEXT_DIM),
            "text_token_embeddings": torch.randn(4 * batch, TEXT_DIM), "progress": 0.5}

    def step() -> None:
        autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                    else contextlib.nullcontext())
        with autocast:
            loss = model(data)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model.tokenizer.num_parameters()


def measure(preset: str, precision: str, batch: int, steps: int, n_rois: int, length: int) -> dict:
    step, params = make_step(preset, precision, batch, n_rois, length)
    step()  # warm-up; the codebook's one-off k-means initialisation happens here, neither counted nor timed
    counter = FlopCounterMode(display=False)
    with counter:
        step()  # counted: one ordinary training step
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    flops = counter.get_total_flops()
    return {"preset": preset, "precision": precision, "batch": batch, "params_m": params / 1e6,
            "step_s": seconds, "scans_per_s": batch / seconds, "gflop_per_step": flops / 1e9,
            "achieved_gflops": flops / seconds / 1e9}


def table(rows: list[dict], peaks: dict[str, float]) -> str:
    lines = ["| preset | precision | batch | params (M) | s/step | scans/s | GFLOP/step | GFLOP/s | % of matmul peak |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = 100 * r["achieved_gflops"] * 1e9 / peaks[r["precision"]]
        lines.append(f"| {r['preset']} | {r['precision']} | {r['batch']} | {r['params_m']:.2f} | {r['step_s']:.2f} | "
                     f"{r['scans_per_s']:.2f} | {r['gflop_per_step']:.0f} | {r['achieved_gflops']:.1f} | {share:.0f} % |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "S"])
    parser.add_argument("--precisions", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration")
    parser.add_argument("--batch", nargs="+", default=["tiny=8", "S=2"], help="PRESET=scans per step")
    parser.add_argument("--rois", type=int, default=450)
    parser.add_argument("--length", type=int, default=160)
    args = parser.parse_args()
    batches = {k: int(v) for k, v in (item.split("=") for item in args.batch)}
    peaks = {p: matmul_peak(p) for p in args.precisions}
    threads = torch.get_num_threads()
    print(f"matmul peak ({threads} threads): " + ", ".join(f"{p} {v / 1e9:.0f} GFLOP/s" for p, v in peaks.items()))
    rows = []
    for preset in args.presets:
        for precision in args.precisions:
            rows.append(measure(preset, precision, batches.get(preset, 2), args.steps, args.rois, args.length))
            print(f"  {preset} {precision}: {rows[-1]['step_s']:.2f} s/step", flush=True)
    print(f"\nN={args.rois}, T={args.length}, P=32, {threads} threads, torch {torch.__version__}\n")
    print(table(rows, peaks))


if __name__ == "__main__":
    main()
