#!/usr/bin/env python3
"""Checks that torch_gpt.py's model is ulysses' model: same weights, same tokens, same numbers.

On the CPU in fp32, for a learned-position GPT-2 and for a RoPE + GQA model (V padded to a
multiple of 128 in both): runs two steps of `ulysses train` on an llm.c token shard written here
(data.source: shards, one micro-batch of B sequences per step, in order), saving a checkpoint after
step 1; loads that checkpoint's parameters (model.bin: llm.c order) into torch_gpt.py's GPT and
compares the loss and gradient norm of step 2 (ulysses' metrics file) with PyTorch's on the same
B sequences. The parameter count in model.bin's header must equal PyTorch's exactly. The models are
initialised with std 0.3 (not GPT-2's 0.02), so attention is far from uniform and a wrong detail
(a RoPE sign, a GQA head mapping) moves the loss by much more than the tolerance.

  torch_equivalence.py --ulysses build/apps/ulysses [--keep DIR]
Exit status 0 when every count is equal and loss and gradient norm agree to 1e-5 relative.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_gpt import GPT, Shape, gqa_supported  # noqa: E402

SHARD_MAGIC, SHARD_VERSION = 20240520, 1
CHECKPOINT_HEADER_WORDS = 16  # core/checkpoint.cpp: int64 words; [3] = parameter count


def write_shard(path, tokens):
    # llm.c shard: 256 int32 header (magic, version, count), then uint16 tokens
    header = np.zeros(256, dtype=np.int32)
    header[:3] = [SHARD_MAGIC, SHARD_VERSION, len(tokens)]
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


def read_checkpoint_params(path):
    # model.bin of a ulysses checkpoint: 16 int64 header words, then the fp32 parameters
    raw = open(path, "rb").read()
    header = np.frombuffer(raw[: 8 * CHECKPOINT_HEADER_WORDS], dtype=np.int64)
    n = int(header[3])
    assert len(raw) == 8 * CHECKPOINT_HEADER_WORDS + 4 * n, (path, len(raw), n)
    return n, torch.from_numpy(np.frombuffer(raw, dtype=np.float32, offset=8 * CHECKPOINT_HEADER_WORDS).copy())


@torch.no_grad()
def load_flat(model, s, flat):
    # the 16 tensors of core/gpt.h in llm.c order; stacked [L, ...] ones go to the blocks
    L, C, qkv = s.L, s.C, (s.Hq + 2 * s.Hkv) * s.d
    specs = [("wte", (s.Vp, C)), ("wpe", (0 if s.rope else s.maxT, C)), ("ln1.weight", (L, C)), ("ln1.bias", (L, C)),
             ("qkv.weight", (L, qkv, C)), ("qkv.bias", (L, qkv)), ("attproj.weight", (L, C, C)),
             ("attproj.bias", (L, C)), ("ln2.weight", (L, C)), ("ln2.bias", (L, C)), ("fc.weight", (L, 4 * C, C)),
             ("fc.bias", (L, 4 * C)), ("fcproj.weight", (L, C, 4 * C)), ("fcproj.bias", (L, C)),
             ("lnf.weight", (C,)), ("lnf.bias", (C,))]
    off = 0
    for name, shape in specs:
        n = math.prod(shape)
        t = flat[off: off + n].view(shape)
        off += n
        if name == "wte":
            model.wte.copy_(t)
        elif name == "wpe":
            if model.wpe is not None:
                model.wpe.copy_(t)
        elif name.startswith("lnf"):
            model.get_parameter(name).copy_(t)
        else:
            for l, block in enumerate(model.blocks):
                block.get_parameter(name).copy_(t[l])
    assert off == flat.numel(), (off, flat.numel())


def check(ulysses, work, label, rope, Hkv):
    L, C, H, V, maxT, N, B = 2, 64, 4, 300, 64, 32, 2  # V = 300 -> Vp = 384; maxT > N
    s = Shape(L, C, H, Hkv, V, maxT, rope=rope, rope_theta=10000.0)
    os.makedirs(work, exist_ok=True)
    shard, metrics, ckpt_dir = (os.path.join(work, f) for f in ("train.bin", "metrics.jsonl", "checkpoints"))
    rng = np.random.default_rng(11)
    stream = rng.integers(0, V, size=2 * B * N + 1)  # sequence w = stream[w*N : w*N + N + 1]
    write_shard(shard, stream)
    if os.path.exists(metrics):
        os.remove(metrics)
    sets = [f"model.n_layer={L}", f"model.n_embd={C}", f"model.n_head={H}", f"model.n_kv_head={Hkv}",
            f"model.vocab_size={V}", f"model.max_seq_len={maxT}", "model.init_std=0.3",
            f"model.position_embedding={'rope' if rope else 'learned'}",
            "data.source=shards", f"data.train=[{shard}]", "data.tokenizer=byte",
            f"train.seq_len={N}", f"train.micro_batch_size={B}", "train.global_batch_tokens=0",
            "train.max_steps=2", "train.warmup_steps=0", "train.lr_schedule=constant", "train.eval_steps=0",
            "train.sample_tokens=0", "parallel.sequence=1", "runtime.device=cpu", "runtime.threads=1",
            f"checkpoint.dir={ckpt_dir}", "checkpoint.interval=1", "checkpoint.keep_last=5",
            f"logging.metrics_file={metrics}"]
    cmd = [ulysses, "train"] + [arg for kv in sets for arg in ("--set", kv)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{label}: ulysses train failed:\n" + " ".join(cmd) + "\n" + proc.stdout + proc.stderr)
        return False
    step2 = [json.loads(line) for line in open(metrics)][1]
    assert step2["step"] == 2, step2
    n_ours, flat = read_checkpoint_params(os.path.join(ckpt_dir, "step_00000001", "model.bin"))

    model = GPT(s, "none", sdpa_gqa=False)
    n_torch = sum(p.numel() for p in model.parameters())
    if n_ours != n_torch:
        print(f"{label}: parameter counts differ: ulysses {n_ours:,}, PyTorch {n_torch:,}")
        return False
    load_flat(model, s, flat)
    model.set_sequence_length(N, torch.device("cpu"))
    # step 2 reads sequences B .. 2B-1
    x = torch.tensor(np.stack([stream[w * N: w * N + N] for w in range(B, 2 * B)]), dtype=torch.int64)
    y = torch.tensor(np.stack([stream[w * N + 1: w * N + N + 1] for w in range(B, 2 * B)]), dtype=torch.int64)
    loss = model(x, y)  # mean over the B*N targets, fp32
    loss.backward()
    grad_norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters()))
    if Hkv != H and gqa_supported("cpu", torch.float32, "any"):
        # the benchmark's GQA path (SDPA's enable_gqa) must give what the spelled-out one gave
        for block in model.blocks:
            block.sdpa_gqa = True
        loss_gqa = model(x, y).item()
        if abs(loss_gqa - loss.item()) > 1e-6 * abs(loss.item()):
            print(f"{label}: SDPA enable_gqa gives loss {loss_gqa}, repeat_interleave {loss.item()}")
            return False
    rel_loss = abs(step2["loss"] - loss.item()) / abs(loss.item())
    rel_norm = abs(step2["grad_norm"] - grad_norm) / grad_norm
    ok = rel_loss < 1e-5 and rel_norm < 1e-5
    print(f"{label}: L={L} C={C} Hq={H} Hkv={Hkv} V={V} (Vp={s.Vp}) {'rope' if rope else 'learned maxT=%d' % maxT}; "
          f"B={B} N={N}")
    print(f"  parameters     ulysses {n_ours:,}  PyTorch {n_torch:,}  (torch_gpt formula {s.num_parameters():,})")
    print(f"  loss           ulysses {step2['loss']:.7f}  PyTorch {loss.item():.7f}  relative difference {rel_loss:.1e}"
          f"  (ln V = {math.log(V):.4f})")
    print(f"  gradient norm  ulysses {step2['grad_norm']:.7f}  PyTorch {grad_norm:.7f}  relative difference {rel_norm:.1e}")
    print(f"  {'PASS' if ok else 'FAIL'}")
    return ok


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ulysses", required=True, help="path of the ulysses executable (a CPU build is enough)")
    p.add_argument("--keep", help="write the shards, checkpoints and metrics under this folder and keep them")
    a = p.parse_args(argv)
    root = a.keep or tempfile.mkdtemp(prefix="torch-equivalence-")
    ok = check(a.ulysses, os.path.join(root, "learned"), "GPT-2, learned positions", rope=False, Hkv=4)
    ok &= check(a.ulysses, os.path.join(root, "rope-gqa"), "RoPE + GQA", rope=True, Hkv=2)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
