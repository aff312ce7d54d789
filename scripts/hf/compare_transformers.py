#!/usr/bin/env python3
"""Checks ulysses' GPT-2 against transformers' GPT2LMHeadModel through Hugging Face checkpoints.

For each model shape (--shapes: "small" L2 C64 H4 V300 n_positions 64, random non-GPT-2 init so
biases, LayerNorm and attention all matter; "124m": GPT-2 124M's shape with transformers' own
init), all on the CPU in fp32:
  1. builds a random GPT2LMHeadModel locally (no downloads) and save_pretrained()s it;
  2. writes an llm.c token shard of 10 * B sequences; sequence w = stream[w*N : w*N + N + 1];
  3. `ulysses dump` from that checkpoint (checkpoint.init_from = the directory): the first
     micro-batch's logits, mean loss and every parameter's gradient (HF names), compared with
     transformers' on the same tokens;
  4. `ulysses train` for 10 steps (constant lr, no warmup, no clipping, AdamW with ulysses'
     decay rule: matrices and embeddings decay, biases and LayerNorm do not) with
     checkpoint.export_hf; the 10 losses (metrics file) against torch.optim.AdamW on the
     transformers model with the same hyper-parameters;
  5. the export: GPT2LMHeadModel.from_pretrained must report no missing / unexpected keys; its
     logits against `ulysses dump` of the same export, and its parameters against the torch-trained
     model.
--np 2 runs every ulysses command under `mpirun -np 2` with parallel.sequence=2.

Errors: logits, parameters and gradients are compared per tensor as max|a - b| / max|b| (an
element-wise relative error is meaningless for values near zero); losses as |a - b| / |b|.
Exit status 0 when logits, loss and the 10 losses agree to 1e-5 and gradients to --grad-tol.

  compare_transformers.py --ulysses build-cpu/apps/ulysses [--np 1|2] [--shapes small,124m] [--keep DIR]
                          [--plant-erf-gelu (a deliberate model difference: must FAIL)]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

SHARD_MAGIC, SHARD_VERSION = 20240520, 1
STEPS = 10
HP = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
SHAPES = {  # L, C, H, V, n_positions, N (seq_len), B
    "small": (2, 64, 4, 300, 64, 32, 2),
    "124m": (12, 768, 12, 50257, 1024, 64, 2),
}


def write_shard(path, tokens):
    header = np.zeros(256, dtype=np.int32)  # llm.c shard: magic, version, count; uint16 tokens
    header[:3] = [SHARD_MAGIC, SHARD_VERSION, len(tokens)]
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


def rel(a, b):
    a, b = a.double(), b.double()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def hf_model(name, seed):
    L, C, H, V, T, _, _ = SHAPES[name]
    cfg = GPT2Config(n_layer=L, n_embd=C, n_head=H, vocab_size=V, n_positions=T, activation_function="gelu_new",
                     layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=None, eos_token_id=None, attn_implementation="eager")
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    if name == "small":  # far from GPT-2's init: non-uniform attention, non-trivial LN and biases
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("ln_1.weight") or n.endswith("ln_2.weight") or n.endswith("ln_f.weight"):
                    p.copy_(1.0 + 0.2 * torch.randn_like(p))
                else:
                    p.copy_(0.15 * torch.randn_like(p))
    return model.float()


def ulysses_cmd(args, sub, sets):
    cmd = [args.ulysses, sub, "--log-level", "warn"] + [a for kv in sets for a in ("--set", kv)]
    if args.np > 1:
        cmd = ["mpirun", "--oversubscribe", "-np", str(args.np)] + cmd + ["--set", f"parallel.sequence={args.np}"]
    return cmd


def run(cmd, env):
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    return time.time() - t0


def check(args, name, work):
    L, C, H, V, T, N, B = SHAPES[name]
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
    init_dir, export_dir = os.path.join(work, "hf_init"), os.path.join(work, "hf_export")
    shard, metrics = os.path.join(work, "train.bin"), os.path.join(work, "metrics.jsonl")
    model = hf_model(name, seed=5)
    model.save_pretrained(init_dir, safe_serialization=True)
    if args.plant_erf_gelu:  # a model difference the comparison must catch: erf GELU in transformers only
        from transformers.activations import ACT2FN
        for block in model.transformer.h:
            block.mlp.act = ACT2FN["gelu"]
    stream = np.random.default_rng(17).integers(0, V, size=STEPS * B * N + 1)
    write_shard(shard, stream)
    sets = [f"model.n_layer={L}", f"model.n_embd={C}", f"model.n_head={H}", f"model.vocab_size={V}",
            f"model.max_seq_len={T}", "model.position_embedding=learned", "data.source=shards",
            f"data.train=[{shard}]", "data.shuffle=false", f"train.seq_len={N}", f"train.micro_batch_size={B}",
            "train.global_batch_tokens=0", f"train.max_steps={STEPS}", "train.warmup_steps=0",
            "train.lr_schedule=constant", f"train.lr={HP['lr']}", f"train.beta1={HP['beta1']}",
            f"train.beta2={HP['beta2']}", f"train.eps={HP['eps']}", f"train.weight_decay={HP['weight_decay']}",
            "train.grad_clip=0", "train.eval_steps=0", "train.sample_tokens=0", "runtime.device=cpu",
            f"runtime.threads={max(1, 2 // args.np)}"]
    seqs = [stream[w * N: w * N + N + 1] for w in range(STEPS * B)]
    batch = lambda s: (torch.tensor(np.stack([q[:-1] for q in seqs[s * B:(s + 1) * B]]), dtype=torch.int64),
                       torch.tensor(np.stack([q[1:] for q in seqs[s * B:(s + 1) * B]]), dtype=torch.int64))
    out = {"shape": name, "np": args.np}

    # 3. logits, loss, gradients of the first micro-batch from the saved checkpoint
    dump = os.path.join(work, "dump_init.safetensors")
    out["ulysses_dump_s"] = run(ulysses_cmd(args, "dump", sets + [f"checkpoint.init_from={init_dir}"]) + ["--out", dump], env)
    d = load_file(dump)
    x, y = batch(0)
    assert torch.equal(d["tokens"].long(), x) and torch.equal(d["targets"].long(), y), "ulysses read other tokens"
    model.train()
    model.zero_grad()
    res = model(input_ids=x, labels=None)
    loss = torch.nn.functional.cross_entropy(res.logits.reshape(-1, V), y.reshape(-1))
    loss.backward()
    out["logits"] = rel(d["logits"], res.logits.detach())
    with safe_open(dump, "pt") as f:  # the loss in full (double) precision, as ulysses computed it
        loss_u = float(f.metadata()["loss"])
    loss_t = loss.item()
    out["loss"] = abs(loss_u - loss_t) / abs(loss_t)
    grads = {n: p.grad for n, p in model.named_parameters()}  # lm_head.weight is wte: one tensor
    worst, worst_name = 0.0, ""
    for n, g in grads.items():
        key = "grad." + n
        if key not in d:
            sys.exit(f"{name}: the dump has no {key}")
        e = rel(d[key], g)
        if e > worst:
            worst, worst_name = e, n
    out["grads"], out["grads_worst"] = worst, worst_name
    out["grads_count"] = len(grads)

    # 4. 10 AdamW steps both sides
    out["ulysses_train_s"] = run(ulysses_cmd(args, "train", sets + [f"checkpoint.init_from={init_dir}",
                                                                     f"checkpoint.export_hf={export_dir}",
                                                                     f"logging.metrics_file={metrics}"]), env)
    ours = [json.loads(line)["loss"] for line in open(metrics)]
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": HP["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"], foreach=False)
    theirs = []
    for s in range(STEPS):
        x, y = batch(s)
        opt.zero_grad()
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
        loss.backward()
        opt.step()
        theirs.append(loss.item())
    out["losses"] = max(abs(a - b) / abs(b) for a, b in zip(ours, theirs))
    out["losses_ulysses"], out["losses_torch"] = ours, theirs

    # 5. the export in transformers
    back, info = GPT2LMHeadModel.from_pretrained(export_dir, output_loading_info=True, attn_implementation="eager")
    out["load_info"] = {k: sorted(v) if isinstance(v, set) else v for k, v in info.items()}
    out["clean_load"] = not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))
    trained = dict(model.named_parameters())
    # (not a pass criterion: Adam's m / sqrt(v) turns rounding-level gradient differences on elements
    # whose gradient is ~0 into whole lr-sized steps, so single elements drift apart; the losses do not)
    errs = {n: rel(p, trained[n]) for n, p in back.named_parameters()}
    out["export_params_worst"] = max(errs, key=errs.get)
    out["export_params"] = errs[out["export_params_worst"]]
    out["export_params_abs"] = max((p.double() - trained[n].double()).abs().max().item() for n, p in back.named_parameters())
    dump2 = os.path.join(work, "dump_export.safetensors")
    run(ulysses_cmd(args, "dump", sets + [f"checkpoint.init_from={export_dir}"]) + ["--out", dump2], env)
    d2 = load_file(dump2)
    back.eval()
    with torch.no_grad():
        out["export_logits"] = rel(d2["logits"], back(input_ids=d2["tokens"].long()).logits)
    ok = (out["logits"] <= 1e-5 and out["loss"] <= 1e-5 and out["grads"] <= args.grad_tol and out["losses"] <= 1e-5
          and out["clean_load"] and out["export_logits"] <= 1e-5)
    out["pass"] = ok
    print(f"{name} (L{L} C{C} H{H} V{V} n_positions {T}; B{B} N{N}), ulysses ranks {args.np} (SP {args.np}):")
    print(f"  logits           max rel {out['logits']:.2e}")
    print(f"  loss             rel {out['loss']:.2e}  (ulysses {loss_u:.9f}, transformers {loss_t:.9f} in fp32)")
    print(f"  gradients        max rel {out['grads']:.2e} over {len(grads)} tensors (worst {worst_name})")
    print(f"  10 AdamW losses  max rel {out['losses']:.2e}  (ulysses {ours[0]:.6f} .. {ours[-1]:.6f})")
    print(f"  export           transformers loads it {'cleanly' if out['clean_load'] else 'WITH PROBLEMS: ' + str(out['load_info'])};"
          f" logits max rel {out['export_logits']:.2e}")
    print(f"  parameters after 10 steps vs torch's: max rel {out['export_params']:.2e} ({out['export_params_worst']}),"
          f" max abs {out['export_params_abs']:.2e} (lr {HP['lr']})")
    print(f"  {'PASS' if ok else 'FAIL'}  (ulysses dump {out['ulysses_dump_s']:.1f} s, train {out['ulysses_train_s']:.1f} s)")
    return out


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ulysses", required=True, help="the ulysses executable (a CPU build)")
    p.add_argument("--np", type=int, default=1, choices=[1, 2], help="ulysses ranks; 2 runs with parallel.sequence=2")
    p.add_argument("--shapes", default="small,124m", help="comma-separated: small, 124m")
    p.add_argument("--grad-tol", type=float, default=1e-5, help="largest per-tensor relative gradient error")
    p.add_argument("--plant-erf-gelu", action="store_true",
                   help="sanity check: transformers computes the erf GELU, ulysses the tanh one; must FAIL")
    p.add_argument("--keep", help="work under this folder and keep it")
    p.add_argument("--json", help="append one JSON line per shape with every number here")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    root = a.keep or tempfile.mkdtemp(prefix="hf-compare-")
    ok = True
    for name in a.shapes.split(","):
        r = check(a, name, os.path.join(root, f"{name}-np{a.np}"))
        ok &= r["pass"]
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
