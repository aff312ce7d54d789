#!/usr/bin/env python3
"""PyTorch baseline for causal attention: forward and backward TFLOP/s of
F.scaled_dot_product_attention(is_causal=True) at head dim 128, per SDPA backend (flash forced
with torch.nn.attention.sdpa_kernel, and cuDNN where this PyTorch has it).

Shapes and FLOP convention are those of tests/cuda/bench_cuda.cpp, so the numbers sit beside
its `attention fwd+bwd` lines:
  B = 1, H = 16 heads (8 from N = 64K on), d = 128, N = 4K, 16K, 64K; q, k, v, out: [B, H, N, d] bf16
  forward FLOPs  = 4 * B * H * N^2 * d / 2   (QK^T and PV over the causal half)
  backward FLOPs = 2.5 * forward             (FlashAttention's convention)
  fwd+bwd        = 3.5 * forward
(The model's MFU formula, core/gpt_params.cpp flops_per_token, counts attention backward as 2x forward
instead; this script follows the kernel benchmark, not the model.)
Timing: mean of `reps` calls between CUDA events after two warm-up calls; the backward is
torch.autograd.grad of the saved forward (dq, dk, dv returned, not accumulated).

  torch_attention.py [--quick] [--lengths 4096 16384 65536] [--backends flash cudnn]
  torch_attention.py --device cpu --lengths 128 256 --heads 2      (exercises the code path)

Prints one line per backend and length, `attention fwd+bwd N=... ... TFLOP/s`, and a
  RESULT {json}
line for each that scripts/device/check.sh tabulates.
"""
import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--quick", action="store_true", help="fewer repetitions, no length above 16K (as bench_cuda --quick)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=0, help="0: 16 heads, 8 from N = 64K on (bench_cuda's choice)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--backends", nargs="+", choices=["flash", "cudnn"], default=["flash", "cudnn"])
    a = p.parse_args(argv)
    if a.quick:
        a.lengths = [n for n in a.lengths if n <= 16384]
    if min(a.lengths + [a.batch, a.head_dim]) < 1 or a.heads < 0:
        p.error("lengths, batch, heads and head dim must be positive")
    return a


def sdpa_backend(name):
    from torch.nn.attention import SDPBackend
    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None)}[name]


class Timer:
    """Mean milliseconds per call of f over `reps` calls after two warm-up calls."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, f, reps):
        f()
        f()
        if self.cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                f()
            stop.record()
            stop.synchronize()
            return start.elapsed_time(stop) / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            f()
        return (time.perf_counter() - t0) * 1e3 / reps


def bench_one(device, dtype, backend, B, H, N, d, reps, timer):
    # q, k, v, dout: [B, H, N, d], fresh random values
    g = torch.Generator(device="cpu").manual_seed(N)
    q, k, v, dout = (torch.randn(B, H, N, d, generator=g).to(device=device, dtype=dtype) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)

    def forward():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    if backend is None:  # the CPU: whatever PyTorch picks
        fwd_ms = timer(forward, reps)
        out = forward()
        bwd_ms = timer(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), reps)
        return fwd_ms, bwd_ms
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel(backend):
        fwd_ms = timer(forward, reps)
        out = forward()
        bwd_ms = timer(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), reps)
    return fwd_ms, bwd_ms


def main(argv):
    a = parse_args(argv)
    device = torch.device(a.device)
    on_cuda = device.type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        print("torch_attention: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if on_cuda else torch.float32
    name = torch.cuda.get_device_name(device) if on_cuda else "cpu"
    print(f"torch_attention: torch {torch.__version__}, device {name}, {str(dtype).replace('torch.', '')}, causal, "
          f"d={a.head_dim}")
    backends = a.backends if on_cuda else ["cpu"]
    timer = Timer(device)
    failures = 0
    for bname in backends:
        backend = sdpa_backend(bname) if on_cuda else None
        for N in a.lengths:
            H = a.heads or (8 if N >= 65536 else 16)
            reps = 2 if N >= 65536 else (3 if a.quick else 10)
            shape = f"B={a.batch} H={H} N={N} d={a.head_dim}"
            result = dict(script="torch_attention", device=name, torch=torch.__version__, backend=bname,
                          batch=a.batch, heads=H, seq_len=N, head_dim=a.head_dim)
            try:
                if on_cuda and backend is None:
                    raise RuntimeError(f"this PyTorch has no SDPBackend for {bname}")
                fwd_ms, bwd_ms = bench_one(device, dtype, backend, a.batch, H, N, a.head_dim, reps, timer)
            except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
                # a backend that cannot take this shape here ("No available kernel"), or out of memory
                msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                print(f"  {bname:6s} {shape}: unavailable ({msg})")
                result.update(status="unavailable", error=msg)
                print("RESULT " + json.dumps(result), flush=True)
                failures += bname == "flash"
                if on_cuda:
                    torch.cuda.empty_cache()
                continue
            fwd_flops = 4.0 * a.batch * H * N * N * a.head_dim / 2
            fwd_tf = fwd_flops / (fwd_ms * 1e-3) / 1e12
            bwd_tf = 2.5 * fwd_flops / (bwd_ms * 1e-3) / 1e12
            both_tf = 3.5 * fwd_flops / ((fwd_ms + bwd_ms) * 1e-3) / 1e12
            print(f"  {bname:6s} {shape}: forward {fwd_ms:8.3f} ms {fwd_tf:7.1f} TFLOP/s | backward {bwd_ms:8.3f} ms "
                  f"{bwd_tf:7.1f} TFLOP/s | reps {reps}")
            print(f"attention fwd+bwd N={N} {both_tf:.1f} TFLOP/s ({bname})")
            result.update(status="ok", fwd_ms=round(fwd_ms, 4), bwd_ms=round(bwd_ms, 4), fwd_tflops=round(fwd_tf, 2),
                          bwd_tflops=round(bwd_tf, 2), fwdbwd_tflops=round(both_tf, 2), reps=reps)
            print("RESULT " + json.dumps(result), flush=True)
            if on_cuda:
                torch.cuda.empty_cache()
    # the flash backend is the baseline the check needs; cuDNN is reported where it runs
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
