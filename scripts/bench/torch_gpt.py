#!/usr/bin/env python3
"""PyTorch baseline: one training step of exactly ulysses' GPT (core/gpt.h), timed.

The model, written from scratch in plain PyTorch to match core/gpt.cpp layer for layer:
  GPT-2 pre-LN blocks: x + Wo . attn(LN1(x)), then x + W2 . gelu_tanh(W1 . LN2(x)); LayerNorm eps
  1e-5; fused QKV projection with bias, packed [Hq | Hkv | Hkv] heads of d = C / Hq; query head h
  uses key/value head h // (Hq / Hkv) (GQA); optional RoPE (rotate-half, theta_i = p * base^(-2i/d),
  on q and k); causal attention with scale 1/sqrt(d); 4C MLP; final LayerNorm; LM head tied to wte
  [Vp, C] with V padded to a multiple of 128 (the loss is over the real V only); learned position
  table [max_seq_len, C] unless RoPE. GPT-2 init: N(0, 0.02), residual projections (attproj, fcproj)
  scaled by 1/sqrt(2L), biases 0, LayerNorm weights 1. Weight decay on matrices and embeddings only.
The step: bf16 autocast over fp32 parameters, F.scaled_dot_product_attention(is_causal=True) with
the flash backend forced, fused AdamW on CUDA, optional torch.compile, optional per-block activation
checkpointing (--recompute full, the counterpart of runtime.recompute: full).

FLOPs: the formula of core/gpt_params.cpp flops_per_token(causal_halved = true):
  6 * (parameters - position table) + 6 * L * C * N      per token (recomputation not counted)
MFU divides by the dense bf16 peak of the GPU (PEAK_TFLOPS below; the same table as docs/benchmarks.md).

  torch_gpt.py --preset gpt2-124m                         (GPT-2 124M, N = 1024, B = 16)
  torch_gpt.py --preset gpt-1.3b --seq-len 32768 --recompute full
  torch_gpt.py --device cpu --n-layer 2 --n-embd 64 --n-head 4 --vocab 300 --seq-len 64 --batch 2

Prints the step time, tokens/s, TFLOP/s, MFU and peak memory, and last a line
  RESULT {json}
that scripts/device/check.sh tabulates. Exit status: 0 ok, 3 out of memory (RESULT says "oom").
"""
import argparse
import contextlib
import json
import math
import resource
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# Dense bf16 tensor-core peak in TFLOP/s (no sparsity), by the device name CUDA reports. Checked in
# order: the first key found in the name wins. Unknown GPUs get no MFU.
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0)]

PRESETS = {
    # configs/gpt2-124m.yaml
    "gpt2-124m": dict(n_layer=12, n_embd=768, n_head=12, vocab=50257, seq_len=1024, max_seq_len=1024, batch=16,
                      rope=False),
    # configs/paper/gpt-1.3b-256k.yaml's model (GPT-3 XL shape) on one GPU
    "gpt-1.3b": dict(n_layer=24, n_embd=2048, n_head=16, vocab=50257, seq_len=8192, batch=1, rope=True),
}


def peak_tflops(device_name):
    for key, tflops in PEAK_TFLOPS:
        if key in device_name:
            return tflops
    return None


def padded_vocab(V):
    return (V + 127) // 128 * 128


class Shape:
    """The model's shape, named as core/gpt.h's GPTShape."""

    def __init__(self, L, C, Hq, Hkv, V, max_seq_len, rope, rope_theta):
        self.L, self.C, self.Hq, self.Hkv, self.V = L, C, Hq, Hkv, V
        self.d = C // Hq
        self.Vp = padded_vocab(V)
        self.maxT = max_seq_len
        self.rope, self.rope_theta = rope, rope_theta

    def num_parameters(self):
        # core/gpt_params.cpp parameter_specs: the 16 tensors in llm.c order
        L, C, qkv = self.L, self.C, (self.Hq + 2 * self.Hkv) * self.d
        wpe = 0 if self.rope else self.maxT * C
        return (self.Vp * C + wpe + 2 * L * C + L * qkv * C + L * qkv + L * C * C + L * C + 2 * L * C
                + L * 4 * C * C + L * 4 * C + L * C * 4 * C + L * C + 2 * C)

    def flops_per_token(self, N):
        # core/gpt_params.cpp flops_per_token(s, N, causal_halved = true)
        matmul_params = self.num_parameters() - (0 if self.rope else self.maxT * self.C)
        attention = 12 * self.L * self.C * N
        return 6 * matmul_params + attention // 2


def rope_tables(N, d, theta, device):
    # cos, sin: [N, d/2] (fp32) with angle p * theta^(-2i/d), the convention of kernels/cpu/rope.cpp
    inv_freq = theta ** (-torch.arange(0, d // 2, dtype=torch.float64, device=device) * 2.0 / d)
    angle = torch.arange(N, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    return torch.cos(angle).float(), torch.sin(angle).float()


def apply_rope(x, cos, sin):
    # x: [B, N, h, d]; (x1, x2) = halves of d -> (x1 cos - x2 sin, x1 sin + x2 cos)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)


class Block(nn.Module):
    def __init__(self, s, sdpa_gqa):
        super().__init__()
        self.s, self.sdpa_gqa = s, sdpa_gqa
        C, qkv = s.C, (s.Hq + 2 * s.Hkv) * s.d
        self.ln1 = nn.LayerNorm(C, eps=1e-5)
        self.qkv = nn.Linear(C, qkv, bias=True)  # weight [ (Hq + 2 Hkv) d, C ] as qkvw
        self.attproj = nn.Linear(C, C, bias=True)
        self.ln2 = nn.LayerNorm(C, eps=1e-5)
        self.fc = nn.Linear(C, 4 * C, bias=True)
        self.fcproj = nn.Linear(4 * C, C, bias=True)

    def attention(self, x, cos, sin):
        s = self.s
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, s.Hq + 2 * s.Hkv, s.d)  # [B, N, Hq + 2Hkv, d]
        q, k, v = qkv.split([s.Hq, s.Hkv, s.Hkv], dim=2)
        if s.rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, h, N, d]
        extra = {}
        if s.Hkv != s.Hq:
            if self.sdpa_gqa:
                extra["enable_gqa"] = True
            else:  # the same head mapping, spelled out
                k = k.repeat_interleave(s.Hq // s.Hkv, dim=1)
                v = v.repeat_interleave(s.Hq // s.Hkv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, **extra)  # [B, Hq, N, d]
        return self.attproj(y.transpose(1, 2).reshape(B, N, C))

    def forward(self, x, cos, sin):
        x = x + self.attention(self.ln1(x), cos, sin)
        return x + self.fcproj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, s, recompute, sdpa_gqa):
        super().__init__()
        self.s, self.recompute = s, recompute
        self.wte = nn.Parameter(torch.empty(s.Vp, s.C))
        self.wpe = None if s.rope else nn.Parameter(torch.empty(s.maxT, s.C))
        self.blocks = nn.ModuleList(Block(s, sdpa_gqa) for _ in range(s.L))
        self.lnf = nn.LayerNorm(s.C, eps=1e-5)
        self.rope_cos = self.rope_sin = None  # [N, d/2] each, set by set_sequence_length

    def set_sequence_length(self, N, device):
        if self.s.rope:
            self.rope_cos, self.rope_sin = rope_tables(N, self.s.d, self.s.rope_theta, device)

    @torch.no_grad()
    def init_weights(self, std=0.02):
        residual_std = std / math.sqrt(2 * self.s.L)
        for name, p in self.named_parameters():
            if name.endswith("ln1.weight") or name.endswith("ln2.weight") or name == "lnf.weight":
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif name.endswith("attproj.weight") or name.endswith("fcproj.weight"):
                p.normal_(0.0, residual_std)
            else:  # wte, wpe, qkv.weight, fc.weight
                p.normal_(0.0, std)

    def forward(self, tokens, targets):
        # tokens, targets: [B, N] int64 -> mean cross-entropy over the B*N targets (real V only)
        s = self.s
        B, N = tokens.shape
        x = F.embedding(tokens, self.wte)  # [B, N, C]
        if self.wpe is not None:
            x = x + self.wpe[:N]
        cos, sin = self.rope_cos, self.rope_sin
        assert not s.rope or cos.shape[0] == N, "call set_sequence_length(N) first"
        for block in self.blocks:
            if self.recompute == "full":
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        x = self.lnf(x)
        # the tied LM head over the real V rows of wte [Vp, C] only: the padding rows' logits would be
        # discarded and their gradient is 0, as in ulysses; no [B, N, Vp] copy is made to slice them off
        logits = F.linear(x, self.wte[: s.V])  # [B, N, V]
        return F.cross_entropy(logits.reshape(B * N, s.V).float(), targets.reshape(B * N))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), help="model shape and default N, B of a named config")
    p.add_argument("--n-layer", type=int)
    p.add_argument("--n-embd", type=int)
    p.add_argument("--n-head", type=int)
    p.add_argument("--n-kv-head", type=int, help="key/value heads (GQA); default n_head")
    p.add_argument("--vocab", type=int, help="V, the real vocabulary (padded to a multiple of 128)")
    p.add_argument("--seq-len", type=int, help="N")
    p.add_argument("--max-seq-len", type=int, help="size of the learned position table (default N)")
    p.add_argument("--batch", type=int, help="B, sequences per step")
    p.add_argument("--rope", action=argparse.BooleanOptionalAction, default=None, help="RoPE instead of learned positions")
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (falls back with a note on failure)")
    p.add_argument("--recompute", choices=["none", "full", "auto"], default="none",
                   help="full: checkpoint every block; auto: none, and full if that runs out of GPU memory")
    p.add_argument("--sdpa-backend", choices=["flash", "cudnn", "any"], default="flash",
                   help="SDPA backend forced on CUDA (any: PyTorch chooses)")
    p.add_argument("--grad-clip", type=float, default=0.0,
                   help="clip by global norm (0: off, as `ulysses bench`, which does not clip)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="autocast dtype (default bf16 on cuda, fp32 on cpu)")
    p.add_argument("--seed", type=int, default=1337)
    a = p.parse_args(argv)
    base = dict(PRESETS[a.preset]) if a.preset else {}
    defaults = dict(n_layer=2, n_embd=64, n_head=4, vocab=256, seq_len=128, batch=4, rope=False)
    for key, value in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, base.get(key, value))
    if a.n_kv_head is None:
        a.n_kv_head = a.n_head
    if a.max_seq_len is None:
        a.max_seq_len = base.get("max_seq_len", a.seq_len)
    if a.dtype is None:
        a.dtype = "bf16" if a.device.startswith("cuda") else "fp32"
    errors = []
    if a.device.startswith("cuda") and a.dtype == "fp32" and a.sdpa_backend != "any":
        errors.append(f"--dtype fp32 on CUDA needs --sdpa-backend any (the {a.sdpa_backend} kernels take bf16 only)")
    if a.n_embd % a.n_head:
        errors.append(f"--n-embd {a.n_embd} must be a multiple of --n-head {a.n_head}")
    if a.n_head % a.n_kv_head:
        errors.append(f"--n-head {a.n_head} must be a multiple of --n-kv-head {a.n_kv_head}")
    if a.rope and (a.n_embd // a.n_head) % 2:
        errors.append("--rope needs an even head dimension")
    if a.seq_len > a.max_seq_len and not a.rope:
        errors.append(f"--seq-len {a.seq_len} exceeds --max-seq-len {a.max_seq_len} (the learned position table)")
    if min(a.n_layer, a.n_embd, a.n_head, a.n_kv_head, a.vocab, a.seq_len, a.batch, a.steps) < 1 or a.warmup < 0:
        errors.append("sizes and --steps must be positive, --warmup non-negative")
    if errors:
        p.error("; ".join(errors))
    return a


def sdpa_context(device, backend):
    # the forced SDPA backend (flash / cudnn) on CUDA; nothing on the CPU
    if not device.startswith("cuda") or backend == "any":
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.FLASH_ATTENTION if backend == "flash" else SDPBackend.CUDNN_ATTENTION)


def gqa_supported(device, dtype, backend):
    # Whether SDPA takes enable_gqa under the forced backend (PyTorch >= 2.5; not every backend).
    try:
        q = torch.randn(1, 4, 16, 64, device=device, dtype=dtype, requires_grad=True)
        kv = torch.randn(1, 2, 16, 64, device=device, dtype=dtype, requires_grad=True)
        with sdpa_context(device, backend) or contextlib.nullcontext():
            F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True).sum().backward()
        return True
    except (RuntimeError, TypeError):
        return False


def main(argv):
    a = parse_args(argv)
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    on_cuda = device.type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        print("torch_gpt: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    amp_dtype = torch.bfloat16 if a.dtype == "bf16" else None
    s = Shape(a.n_layer, a.n_embd, a.n_head, a.n_kv_head, a.vocab, a.max_seq_len, a.rope, a.rope_theta)
    B, N = a.batch, a.seq_len
    device_name = torch.cuda.get_device_name(device) if on_cuda else "cpu"
    peak = peak_tflops(device_name) if on_cuda else None
    if on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # only the fp32 path uses it
        torch.backends.cudnn.allow_tf32 = True

    use_gqa = s.Hkv != s.Hq and gqa_supported(a.device, amp_dtype or torch.float32, a.sdpa_backend)
    with device:  # built where it runs: PyTorch's default init of 1.3B parameters on the host is slow
        model = GPT(s, "none" if a.recompute == "auto" else a.recompute, use_gqa)
    model.init_weights()
    model.set_sequence_length(N, device)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == s.num_parameters(), (n_params, s.num_parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]  # matrices and embeddings
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]  # biases, LayerNorm
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.95), eps=1e-8, fused=on_cuda)

    gen = torch.Generator(device="cpu").manual_seed(a.seed)
    tokens = torch.randint(0, s.V, (B, N), generator=gen).to(device)
    targets = torch.randint(0, s.V, (B, N), generator=gen).to(device)

    print(f"torch_gpt: torch {torch.__version__}, device {device_name}, {a.dtype}, "
          f"{'fused' if on_cuda else 'foreach'} AdamW, SDPA backend {a.sdpa_backend if on_cuda else 'cpu'}, "
          f"recompute {a.recompute}")
    print(f"  model: L={s.L} C={s.C} Hq={s.Hq} Hkv={s.Hkv} d={s.d} V={s.V} (Vp={s.Vp}) "
          f"{'rope theta=%g' % s.rope_theta if s.rope else 'learned positions maxT=%d' % s.maxT}; "
          f"parameters {n_params:,}; B={B} N={N}")

    state = dict(step_fn=model, compiled=False)
    if a.compile:
        if on_cuda:
            state.update(step_fn=torch.compile(model), compiled=True)
        else:
            print("  note: --compile is ignored on the CPU")

    def train_step():
        opt.zero_grad(set_to_none=True)
        # backward inside the SDPA context too: with --recompute full it re-runs the forward
        with sdpa_context(a.device, a.sdpa_backend) or contextlib.nullcontext():
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = state["step_fn"](tokens, targets)
            loss.backward()
        if a.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        return loss

    def sync():
        if on_cuda:
            torch.cuda.synchronize(device)

    def measure():
        # warm-up steps (compilation happens in the first), then `steps` steps timed one by one
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        first_loss = None
        t0 = time.perf_counter()
        for _ in range(a.warmup):
            try:
                loss = train_step()
            except Exception as e:  # noqa: BLE001 -- a compiler failure, reported and worked around
                if not state["compiled"] or isinstance(e, torch.cuda.OutOfMemoryError):
                    raise
                print(f"  note: torch.compile failed ({type(e).__name__}: {str(e).strip()[:200]}); running eagerly")
                state.update(step_fn=model, compiled=False)
                loss = train_step()
            if first_loss is None:
                first_loss = loss.item()
        sync()
        warmup_s = time.perf_counter() - t0
        step_ms = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            loss = train_step()
            if first_loss is None:
                first_loss = loss.item()  # (only with --warmup 0: one host sync more in that step)
            sync()
            step_ms.append((time.perf_counter() - t0) * 1e3)
        return first_loss, loss.item(), warmup_s, step_ms

    result = dict(script="torch_gpt", preset=a.preset, device=device_name, torch=torch.__version__,
                  n_layer=s.L, n_embd=s.C, n_head=s.Hq, n_kv_head=s.Hkv, vocab=s.V, rope=s.rope,
                  batch=B, seq_len=N, dtype=a.dtype, sdpa_backend=a.sdpa_backend if on_cuda else "cpu",
                  params=n_params, flops_per_token=s.flops_per_token(N))
    # --recompute auto: without recompute first; out of memory there, again with every block checkpointed
    model.recompute = "none" if a.recompute == "auto" else a.recompute
    oom_without_recompute = False
    while True:
        oom = None
        try:
            first_loss, last_loss, warmup_s, step_ms = measure()
            break
        except torch.cuda.OutOfMemoryError as e:
            oom = str(e).strip().splitlines()[0][:300]
        # (outside the except block, so the exception's frames and their tensors are gone)
        opt.zero_grad(set_to_none=True)
        if on_cuda:
            torch.cuda.empty_cache()
        if a.recompute == "auto" and model.recompute == "none":
            print(f"  out of GPU memory without recompute ({oom}); again with --recompute full")
            model.recompute, oom_without_recompute = "full", True
            continue
        print(f"torch_gpt: out of GPU memory at B={B} N={N} with recompute {model.recompute}: {oom}")
        result.update(status="oom", recompute=model.recompute, oom_without_recompute=oom_without_recompute)
        print("RESULT " + json.dumps(result), flush=True)
        return 3

    ms = statistics.median(step_ms)
    tokens_per_s = B * N / (ms / 1e3)
    tflops = s.flops_per_token(N) * B * N / (ms / 1e3) / 1e12
    if on_cuda:
        peak_mem_gib = torch.cuda.max_memory_allocated(device) / 2**30
    else:  # peak resident set of the process (ru_maxrss is in KiB on Linux)
        peak_mem_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    mfu = tflops / peak if peak else None
    print(f"  initial loss {first_loss:.4f} (ln V = {math.log(s.V):.4f}), last {last_loss:.4f}; "
          f"compile {'on' if state['compiled'] else 'off'}; recompute {model.recompute}; "
          f"warm-up {a.warmup} steps in {warmup_s:.1f} s")
    print(f"  step {ms:.2f} ms (median of {a.steps}; mean {statistics.fmean(step_ms):.2f}) | "
          f"{tokens_per_s:,.0f} tokens/s | {tflops:.4g} TFLOP/s | "
          f"MFU {'%.1f%%' % (100 * mfu) if mfu is not None else 'n/a'}"
          f"{' of %.0f' % peak if peak else ''} | peak {'GPU' if on_cuda else 'RSS'} memory {peak_mem_gib:.2f} GiB")
    result.update(status="ok", compile=state["compiled"], recompute=model.recompute,
                  oom_without_recompute=oom_without_recompute, step_ms=round(ms, 3),
                  tokens_per_s=round(tokens_per_s, 1), tflops=round(tflops, 6), peak_tflops=peak,
                  mfu=None if mfu is None else round(mfu, 4), peak_mem_gib=round(peak_mem_gib, 3),
                  initial_loss=round(first_loss, 5), steps=a.steps)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
