"""Benchmark: what Half Fine-Tuning saves per training step, against full fine-tuning (FFT).

    python bench.py                                  # CPU: 2 ranks x 1 thread, dim 512, 8 layers
    python bench.py --modes fft,hft,hft-rep --steps 20 --out bench.json
    python bench.py --nproc 1 --preset tiny --steps 3
    python bench.py --predict-only --preset 7b       # the cost model alone, any shape
    torchrun --nproc_per_node=8 bench.py --preset 7b # GPUs: bf16, MFU against --peak-tflops

Every mode (fft; hft = the paper's category-level HFT; optionally layer, model, and hft-rep =
hft with the frozen tensors replicated instead of sharded) gets its own sharded model and AdamW,
built once up front (one at a time with --sequential, chosen by itself on a GPU when they do not
fit together), and the steps alternate between the modes (A B A B ...) so that drift of the
machine lands on every mode alike. A step is the trainer's own: train.train_step (forward,
backward, reduce-scatter, clipping) + AdamW.step + zero_grad, timed like train.run_stage times it,
in wall time and in the process's CPU time (honest on a machine shared with other work). Memory
is measured afterwards, one step per mode: that mode's resident state plus the step's high-water
mark above its start (measure_memory), so the other modes' models do not count against it.

Beside the measurement: a cost model from first principles (cost_model: FLOPs and bytes per step
from the shapes and the mask), turned into seconds with this machine's own GEMM, attention,
memory and collective speeds (calibrate), and the predicted step-time ratio to FFT next to the
measured one. counted_gemm_flops checks the GEMM part against what torch actually ran.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import (_TOTAL_KEY, FSDPMemTracker, _FSDPRefType,
                                                        _FSDPState)
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._sharding_prop import ShardingPropagator

import data
import hft
import checkpoint
import model as llama
import train
from model import ModelArgs, Transformer

# Shapes. "cpu" keeps 7B's proportions where it matters for HFT: the layers hold most of the
# parameters (87% here, 96% at 7B), so the trainable share is close to 7B's 51.9%.
PRESETS = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, vocab_size=256, multiple_of=32, seq=32, batch=2),
    "cpu": dict(dim=512, n_layers=8, n_heads=8, vocab_size=4096, multiple_of=256, seq=256, batch=2),
    "7b": dict(**llama.PRESETS["7B"], vocab_size=32000, seq=2048, batch=1),
    "13b": dict(**llama.PRESETS["13B"], vocab_size=32000, seq=2048, batch=1),
}
# mode -> HFT granularity. "hft-rep" is hft with the frozen tensors kept whole on every rank
# instead of sharded (see shard): they then cost no all-gather at all, for their memory.
MODES = {"fft": "none", "hft": "category", "layer": "layer", "model": "model",
         "hft-rep": "category"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS),
                    help="model shape (default: cpu on CPU, 7b on GPU)")
    for k in ("dim", "n_layers", "n_heads", "vocab_size", "seq", "batch"):
        ap.add_argument("--" + k.replace("_", "-"), dest=k, type=int, default=None,
                        help="override the preset")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per step (per rank)")
    ap.add_argument("--modes", default="fft,hft", help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--ratio", type=float, default=0.5,
                    help="HFT ratio for the hft/layer/model modes")
    ap.add_argument("--steps", type=int, default=10, help="measured steps per mode")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps per mode first")
    ap.add_argument("--precision", default=None, choices=("bf16", "fp32"),
                    help="train.precision (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="dense bf16 peak per GPU for MFU (H100/H200 SXM: 989)")
    ap.add_argument("--nproc", type=int, default=None, help="ranks (default: 2 on CPU, all GPUs)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per rank (default: cores / ranks)")
    ap.add_argument("--sequential", action="store_true",
                    help="one mode at a time (build, steps, free) when all modes do not fit at "
                         "once; chosen by itself on a GPU when they would not")
    ap.add_argument("--malloc", default="reuse", choices=("reuse", "default"),
                    help="CPU: 'reuse' keeps freed memory in the heap (glibc mallopt) so that a "
                         "step's buffers do not pay first-touch page faults again each step, as a "
                         "GPU caching allocator would not; 'default' measures glibc as it comes")
    ap.add_argument("--profile", action="store_true",
                    help="print torch.profiler's top ops for one step per mode")
    ap.add_argument("--no-calibrate", action="store_true",
                    help="skip the speed microbenchmarks (FLOP ratio only)")
    ap.add_argument("--predict-only", action="store_true",
                    help="print the cost model's FLOP and byte ratios for the shape (no run, no "
                         "device; world size from --nproc, default 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    return ap.parse_args(argv)


def launch(args, argv):
    """Re-run this script under torchrun with `args.nproc` workers, each with its own share of the
    cores (OMP_NUM_THREADS), and return torchrun's exit code."""
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.nproc)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    # --nproc is dropped: under torchrun the world size says it (and torchrun's own parser would
    # take "--nproc" for an abbreviation of its --nproc-per-node).
    rest, skip = [], False
    for a in argv:
        if skip or a.startswith("--nproc="):
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={args.nproc}", os.path.abspath(__file__), *rest]
    return subprocess.call(cmd, env=env)


# Building one mode: the trainer's own path (meta device -> HFT mask -> fully_shard -> to_empty).

def build(mode: str, margs: ModelArgs, tcfg: dict, device, args) -> dict:
    with torch.device("meta"):
        model = Transformer(margs)
    mask = hft.make_mask(model, MODES[mode], args.ratio, args.seed, 0, True)
    hft.apply_mask(model, set(mask["trainable"]))  # before sharding, as train.build_model does
    shard(model, tcfg, device, replicate_frozen=mode.endswith("-rep"))
    model.to_empty(device=device)
    model.init_buffers()
    # Random weights, each rank filling its own shards (a 7B model is never whole on one rank);
    # replicated tensors (hft-rep) from one generator shared by all ranks, so they agree.
    shards = torch.Generator(device).manual_seed(args.seed + 1000 * dist.get_rank())
    whole = torch.Generator(device).manual_seed(args.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            local, g = (p.to_local(), shards) if isinstance(p, DTensor) else (p, whole)
            (local.fill_(1.0) if name.endswith("norm.weight")
             else local.normal_(0.0, 0.02, generator=g))
    opt = torch.optim.AdamW(hft.param_groups(model, tcfg["weight_decay"]), lr=tcfg["lr"],
                            betas=tuple(tcfg["betas"]), foreach=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {"mode": mode, "model": model, "opt": opt, "trainable": trainable, "mask": mask,
            "times": [], "cpu_times": []}


def shard(model: Transformer, tcfg: dict, device, replicate_frozen: bool = False):
    """train.shard_model; `replicate_frozen` (hft-rep) is train.py's `[train] replicate_frozen`:
    every frozen tensor left out of FSDP, whole on every rank, never all-gathered."""
    return train.shard_model(model, dict(tcfg, replicate_frozen=replicate_frozen), device)


def make_batches(n: int, margs: ModelArgs, seq: int, batch: int, accum: int, seed: int) -> list:
    """n steps of random tokens, `accum` micro-batches of [batch, seq] each: the same for every
    mode, different on every rank. Every position is a target (labels = input_ids)."""
    g = torch.Generator().manual_seed(seed * 7919 + dist.get_rank())
    out = []
    for _ in range(n):
        mbs = []
        for _ in range(accum):
            ids = torch.randint(3, margs.vocab_size, (batch, seq), generator=g)
            mbs.append({"input_ids": ids, "labels": ids.clone()})
        out.append(mbs)
    return out


def run_step(run: dict, mbs: list, tcfg: dict, device, between=None) -> tuple[float, float]:
    """One optimizer step exactly as train.run_stage takes it. Returns (wall seconds, CPU seconds
    of this process): on a machine shared with other work the CPU time stays honest when the
    wall time does not. `between(run)` runs after backward, before the optimizer."""
    model, opt = run["model"], run["opt"]
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for g in opt.param_groups:
        g["lr"] = tcfg["lr"]
    denom = data.all_sum(sum(data.count_targets(b["labels"]) for b in mbs))
    train.train_step(model, run["trainable"], mbs, "lm", [None] * len(mbs), denom, tcfg, None,
                     device)
    if between is not None:
        between(run)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Memory: resident state (exact, from the tensors) + the step's high-water mark above its start.

def state_bytes(run: dict) -> dict:
    """This rank's bytes of parameters, Adam moments (exp_avg, exp_avg_sq) and step counters."""
    moments, counters = 0, 0
    for st in run["opt"].state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                n = train.local_bytes([v])
                if k == "step":
                    counters += n
                else:
                    moments += n
    params = (train.local_bytes(run["model"].parameters())
              + train.local_bytes(run["model"].buffers()))
    return {"params": params, "moments": moments, "counters": counters}


_libc = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_hwm() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read())[1]) * 1024


def reuse_heap():
    """Serve every allocation up to 32 MiB (glibc's largest M_MMAP_THRESHOLD) from the heap and
    never trim it: freed pages are reused, not returned and faulted in again next step."""
    if _libc is not None:
        _libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD
        _libc.mallopt(-1, 2**40)  # M_TRIM_THRESHOLD


def track_rss():
    """From now on every allocation of 64 KiB or more is its own mapping, returned to the system
    when freed (glibc mallopt), so the process RSS follows the live tensors."""
    if _libc is not None:
        _libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD, fixed (no dynamic raise)
        _libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD: give back the top of the heap at once


def measure_memory(runs: list, batches: list, tcfg: dict, device) -> dict:
    """Per mode: one step's transient high-water (activations, unsharded parameters and gradients,
    the reduce-scatter buffers) above the memory at its start.

    CPU: glibc keeps freed heap memory (and reuse_heap asks it to), so after another mode's step
    the RSS would not grow. Here, after the timed steps, every allocation of 64 KiB or more is
    made its own mapping (track_rss), returned to the system on free: RSS then follows the live
    tensors and VmHWM - RSS_start is the step's transient peak. GPU: max_memory_allocated."""
    out = {}
    if device.type == "cpu":
        track_rss()
    for run in runs:
        grads = {}

        def count_grads(r):  # after the reduce-scatter: each rank's gradient shards
            tr = r["trainable"]
            grads["bytes"] = train.local_bytes(p.grad for p in tr)
            grads["missing"] = sum(p.grad is None for p in tr)
            grads["frozen_with_grad"] = sum(p.grad is not None for p in r["model"].parameters()
                                            if not p.requires_grad)

        gc.collect()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device)
            run_step(run, batches[0], tcfg, device, count_grads)
            transient = torch.cuda.max_memory_allocated(device) - start
        else:
            if _libc is not None:
                _libc.malloc_trim(0)
            start = rss_bytes()
            ok = reset_hwm()
            run_step(run, batches[0], tcfg, device, count_grads)
            transient = hwm_bytes() - start if ok else 0
        out[run["mode"]] = {"transient": transient, **grads}
    return out


# The cost model: what a step must do, from the shapes and the mask alone.

def matrices(margs: ModelArgs) -> dict[str, tuple[int, int]]:
    """Meta name -> (out, in) of every weight a token multiplies by (the embedding is a gather)."""
    d, hd = margs.dim, margs.head_dim
    f = margs.ffn_hidden_dim
    shapes = {"attention.wq": (margs.n_heads * hd, d), "attention.wk": (margs.n_kv_heads * hd, d),
              "attention.wv": (margs.n_kv_heads * hd, d), "attention.wo": (d, margs.n_heads * hd),
              "feed_forward.w1": (f, d), "feed_forward.w2": (d, f), "feed_forward.w3": (f, d)}
    out = {f"layers.{i}.{k}.weight": v for i in range(margs.n_layers) for k, v in shapes.items()}
    out["output.weight"] = (margs.vocab_size, d)
    return out


def backward_needs(margs: ModelArgs, trainable: set[str]) -> tuple[set[str], list[bool]]:
    """Which matmuls need their input gradient (dX = dY W), and which layers' attention needs a
    backward: autograd computes a gradient only toward something that requires one. With the
    embeddings trainable (the paper's HFT and FFT) that is everything; with them frozen, nothing
    below the lowest trainable tensor."""
    need_dx, attn_bwd = set(), []
    h = "tok_embeddings.weight" in trainable  # does the residual stream require grad?
    for i in range(margs.n_layers):
        p = f"layers.{i}."
        a = h or p + "attention_norm.weight" in trainable  # attention_norm(h)
        if a:
            need_dx |= {p + f"attention.w{x}.weight" for x in "qkv"}
        qkv = a or any(p + f"attention.w{x}.weight" in trainable for x in "qkv")
        attn_bwd.append(qkv)
        if qkv:
            need_dx.add(p + "attention.wo.weight")
        h = h or qkv or p + "attention.wo.weight" in trainable
        n = h or p + "ffn_norm.weight" in trainable
        if n:
            need_dx |= {p + "feed_forward.w1.weight", p + "feed_forward.w3.weight"}
        if n or any(p + f"feed_forward.w{x}.weight" in trainable for x in "13"):
            need_dx.add(p + "feed_forward.w2.weight")
        h = h or n or p + "feed_forward.w2.weight" in trainable
    if h or "norm.weight" in trainable:
        need_dx.add("output.weight")
    return need_dx, attn_bwd


def cost_model(margs: ModelArgs, seq: int, batch: int, accum: int, world: int, trainable: set[str],
               param_numel: dict[str, int], gathered: dict[str, int], elt: int, ckpt: bool) -> dict:
    """What one step must do on one rank, from the shapes and the mask alone.

    GEMMs, per token: forward 2*n FLOPs for every n-element weight a token multiplies by (the
    layers' seven matrices and `output`; the embedding is a gather, 0 FLOPs); backward 2*n for the
    input gradient where autograd needs one (backward_needs: all of them while the embedding
    trains) and 2*n for the weight gradient of trainable weights only; the embedding's weight
    gradient is a scatter-add (0 FLOPs). Activation checkpointing repeats the layers' forward.
    Attention core (QK^T and AV, no weights): 2 matmuls * 2 FLOPs * dim * (seq+1)/2 keys per
    query (causal: the kernels skip masked blocks) per layer forward, twice that backward.
    Collectives (FSDP2, ring, per rank): all-gather of every FSDP-managed parameter in forward and
    again in backward (the root's once) per micro-batch, (world-1)/world of their bytes at the
    compute dtype; reduce-scatter of the fp32 gradients of trainable parameters only, once per
    step. FSDP copies them into and out of its flat buffers (2 passes of gathered + shard bytes).
    AdamW (foreach, no weight decay): per trainable element of this rank's shard 18 fp32 tensor
    reads+writes (lerp 3, mul 2, addcmul 3, sqrt 2, div 2, add 2, addcdiv 4); clipping 3 (norm 1,
    scale 2). Element-wise work (norms, rotary, SwiGLU, residuals, the loss) is the same in every
    mode: about 33*dim + 5*ffn fp32 reads+writes per token per layer forward, twice that
    backward, and 8*vocab for the loss."""
    mats = matrices(margs)
    need_dx, attn_bwd = backward_needs(margs, trainable)
    tokens = batch * seq * accum
    gemms = {}  # (out, in, kind) -> GEMMs per step
    for name, (o, i) in mats.items():
        kinds = ["fwd"] * (2 if ckpt and name != "output.weight" else 1)
        kinds += ["dx"] * (name in need_dx) + ["dw"] * (name in trainable)
        for k in kinds:
            gemms[(o, i, k)] = gemms.get((o, i, k), 0) + accum
    flops = {"fwd": 0, "dx": 0, "dw": 0}
    for (o, i, k), n in gemms.items():
        flops[k] += 2 * o * i * batch * seq * n
    attn = 4 * margs.dim * (seq + 1) / 2 * tokens
    flops["attn_fwd"] = attn * margs.n_layers * (2 if ckpt else 1)
    flops["attn_bwd"] = 2 * attn * sum(attn_bwd)
    n_tr = sum(param_numel[n] for n in trainable)
    frac = (world - 1) / world
    full_gathered = accum * elt * (2 * gathered["blocks"] + gathered["root"])
    layer = 33 * margs.dim + 5 * margs.ffn_hidden_dim
    return {
        "gemms": gemms, "micro_batches": accum, "flops": flops, "flops_total": sum(flops.values()),
        "attn_layers": {"fwd": margs.n_layers * (2 if ckpt else 1), "bwd": sum(attn_bwd)},
        "bytes": {
            "allgather": frac * full_gathered,
            "reduce_scatter": frac * 4 * n_tr,
            "fsdp_copies": 2 * (full_gathered + 4 * n_tr) * (1 + 1 / world),
            "optimizer": 72 * n_tr / world,
            "clip": 4 * 3 * n_tr / world,
            "elementwise": 4 * tokens * (layer * margs.n_layers + 2 * layer * sum(attn_bwd)
                                         + 8 * margs.vocab_size)}}


# Calibration: this machine's speed for each kind of work the cost model counts.

def _time(fn, reps=5) -> float:
    """Fastest of `reps` runs after one warm-up: the machine's speed, not its neighbours'."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def calibrate(margs: ModelArgs, seq: int, batch: int, dtype, device) -> dict:
    """Seconds for each GEMM shape the step runs (forward Y = X W^T, input gradient dX = dY W,
    weight gradient dW = dY^T X, at one micro-batch's tokens), for the attention core forward and
    backward and for AdamW per element; bytes/s of element-wise traffic (activation-sized tensors,
    parameter-sized ones, and parameter-sized new ones) and of all-gather / reduce-scatter. All
    ranks run it at once, as they train."""
    m = batch * seq
    mk = lambda *s: torch.randn(*s, device=device, dtype=dtype)
    timed = lambda fn: _time(lambda: (fn(), sync(device)))
    gemm = {}
    for o, i in sorted(set(matrices(margs).values())):
        x, w, dy = mk(m, i), mk(o, i), mk(m, o)
        gemm[(o, i, "fwd")] = timed(lambda: F.linear(x, w))
        gemm[(o, i, "dx")] = timed(lambda: dy @ w)
        gemm[(o, i, "dw")] = timed(lambda: dy.t() @ x)
        del x, w, dy
    q = mk(batch, margs.n_heads, seq, margs.head_dim).requires_grad_()
    kv = mk(batch, margs.n_kv_heads, seq, margs.head_dim).requires_grad_()
    go = mk(batch, margs.n_heads, seq, margs.head_dim)
    t_af = timed(lambda: F.scaled_dot_product_attention(q, kv, kv, is_causal=True))
    t_afb = timed(lambda: F.scaled_dot_product_attention(q, kv, kv, is_causal=True).backward(go))

    def bandwidth(n):  # c = a * b into an existing tensor: 3 fp32 accesses per element
        a, b, c = (torch.randn(n, device=device) for _ in range(3))
        return 12 * n / timed(lambda: torch.mul(a, b, out=c))
    n = 4 * 2**20  # 16 MiB of fp32: past the caches, the size of a block's gradients
    x = torch.randn(n, device=device)
    p = torch.nn.Parameter(torch.randn(n, device=device))
    p.grad = torch.randn(n, device=device)
    adamw = torch.optim.AdamW([p], lr=1e-5, foreach=True)
    out = {"gemm_s": gemm, "attn_fwd_s": t_af, "attn_bwd_s": max(t_afb - t_af, 0.0),
           "act_bps": bandwidth(m * margs.dim), "mem_bps": bandwidth(n),
           # A new tensor per call, as FSDP's gradient and collective buffers are every step.
           "fresh_bps": 8 * n / timed(lambda: x * 1.0),
           "adamw_s_per_element": timed(adamw.step) / n,
           "allgather_bps": float("inf"), "reduce_scatter_bps": float("inf")}
    world = dist.get_world_size()
    if world > 1:
        k = 4 * 2**20 // world * world  # 16 MiB of fp32: about one block of the cpu preset
        full, part = torch.randn(k, device=device), torch.randn(k // world, device=device)
        dist.barrier()
        moved = 4 * k * (world - 1) / world  # bytes in and out of each rank, ring
        out["allgather_bps"] = moved / timed(lambda: dist.all_gather_single(full, part))
        out["reduce_scatter_bps"] = moved / timed(lambda: dist.reduce_scatter_single(part, full))
    return out


def predict_seconds(cost: dict, cal: dict, overlap: bool) -> dict:
    """The cost model in seconds on this machine: every GEMM at its calibrated time, the attention
    at its calibrated time, bytes at the measured bandwidths. On CPU one core per rank does the
    compute and the collectives (gloo), so they add; on GPU FSDP overlaps them with compute."""
    t = {"fwd": 0.0, "dx": 0.0, "dw": 0.0}
    for (o, i, k), n in cost["gemms"].items():
        t[k] += n * cal["gemm_s"][(o, i, k)]
    a = cost["attn_layers"]
    t["attn"] = cost["micro_batches"] * (cal["attn_fwd_s"] * a["fwd"]
                                         + cal["attn_bwd_s"] * a["bwd"])
    b = cost["bytes"]
    t["elementwise"] = b["elementwise"] / cal["act_bps"]
    t["fsdp_copies"] = b["fsdp_copies"] / cal["fresh_bps"]
    t["optimizer"] = b["optimizer"] / 72 * cal["adamw_s_per_element"] + b["clip"] / cal["mem_bps"]
    t["allgather"] = b["allgather"] / cal["allgather_bps"]
    t["reduce_scatter"] = b["reduce_scatter"] / cal["reduce_scatter_bps"]
    comm = t["allgather"] + t["reduce_scatter"]
    compute = sum(v for k, v in t.items() if k not in ("allgather", "reduce_scatter"))
    t["total"] = max(compute, comm) if overlap else compute + comm
    return t


def counted_gemm_flops(run: dict, mbs: list, tcfg: dict, device) -> int:
    """GEMM FLOPs the dispatcher actually ran in one step (forward + backward), counted by
    torch's FlopCounterMode: the check that autograd skips frozen weights' gradient GEMMs."""
    from torch.utils.flop_counter import FlopCounterMode
    try:
        with FlopCounterMode(display=False) as fc:
            run_step(run, mbs, tcfg, device)
    except Exception as e:  # a diagnostic: never lose the measurement to it
        train.log(f"bench: FlopCounterMode failed on {run['mode']} ({type(e).__name__}: {e}); "
                  f"counted = -1")
        return -1
    counts = fc.get_flop_counts().get("Global", {})
    return int(sum(v for k, v in counts.items() if str(k) in ("aten.mm", "aten.addmm", "aten.bmm")))


def machine(device) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.*)", f.read())[1].strip()
    except (OSError, TypeError):
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
           "world_size": dist.get_world_size(), "threads_per_rank": torch.get_num_threads()}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def model_shape(args, device_type: str) -> tuple[ModelArgs, int, int]:
    preset = dict(PRESETS[args.preset or ("7b" if device_type == "cuda" else "cpu")])
    for k in ("dim", "n_layers", "n_heads", "vocab_size", "seq", "batch"):
        if getattr(args, k) is not None:
            preset[k] = getattr(args, k)
    seq, batch = preset.pop("seq"), preset.pop("batch")
    return ModelArgs(**preset, max_seq_len=seq), seq, batch


def predict_only(args, modes: list[str]) -> dict:
    """The cost model alone, on a meta-device model: FLOPs, collective and optimizer bytes per
    mode and their ratios to FFT, for shapes this machine cannot run (7B, 13B)."""
    margs, seq, batch = model_shape(args, "cuda" if args.preset in ("7b", "13b") else "cpu")
    world = args.nproc or 8
    with torch.device("meta"):
        m = Transformer(margs)
    numel = {n: p.numel() for n, p in m.named_parameters()}
    ckpt = args.activation_checkpointing
    elt = (2 if (args.precision or ("bf16" if args.preset in ("7b", "13b") else "fp32")) == "bf16"
           else 4)
    out = {}
    for mode in modes:
        tr = set(hft.make_mask(m, MODES[mode], args.ratio, args.seed, 0, True)["trainable"])
        kept = [n for n in numel if not mode.endswith("-rep") or n in tr]  # what FSDP gathers
        gathered = {"blocks": sum(numel[n] for n in kept if n.startswith("layers.")),
                    "root": sum(numel[n] for n in kept if not n.startswith("layers."))}
        c = cost_model(margs, seq, batch, args.accum, world, tr, numel, gathered, elt, ckpt)
        out[mode] = {"trainable": sum(numel[n] for n in tr), "flops": c["flops_total"],
                     **c["bytes"]}
    print(f"cost model, {args.preset or 'cpu'}: {sum(numel.values()):,} parameters, seq {seq}, "
          f"{batch}x{args.accum} sequences/rank, world {world}, activation checkpointing {ckpt}")
    keys = ("trainable", "flops", "allgather", "reduce_scatter", "optimizer")
    print(f"{'mode':<9}" + "".join(f"{k:>16}" for k in keys) + "   (ratios to fft)")
    for mode in modes:
        print(f"{mode:<9}" + "".join(f"{out[mode][k] / out['fft'][k]:>16.4f}" for k in keys))
    return out


def time_steps(runs: list, batches: list, args, tcfg: dict, device):
    """Warm-up and measured steps, interleaved: step s of every mode, then step s+1. The order
    within a round rotates, so no mode always runs right after the same other one."""
    for s in range(len(batches)):
        for run in runs[s % len(runs):] + runs[:s % len(runs)]:
            t = torch.tensor(run_step(run, batches[s], tcfg, device), dtype=torch.float64,
                             device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
            run["last"] = t.tolist()
            if s >= args.warmup:
                run["times"].append(run["last"][0])
                run["cpu_times"].append(run["last"][1])
        train.log(f"  step {s + 1}/{len(batches)}: " + "  ".join(
            f"{r['mode']} {r['last'][0]:.3f}s (cpu {r['last'][1]:.3f}s)" for r in runs))


def measure_run(run: dict, mem: dict, batches: list, args, margs, seq, batch, tcfg, device,
                base_rss) -> dict:
    """Everything about one mode that needs its model alive, summed over ranks where it is bytes."""
    world = dist.get_world_size()
    tr = set(run["mask"]["trainable"])
    numel = {hft.meta_name(n): p.numel() for n, p in run["model"].named_parameters()}
    st = state_bytes(run)
    p_bytes, moments, counters, grad_bytes, transient, missing, frozen_grad = (
        all_reduce_int(x) for x in (st["params"], st["moments"], st["counters"], mem["bytes"],
                                    mem["transient"], mem["missing"], mem["frozen_with_grad"]))
    counted = all_reduce_int(counted_gemm_flops(run, batches[0], tcfg, device))
    gathered = {"blocks": 0, "root": 0}  # what FSDP all-gathers: frozen tensors too, unless hft-rep
    for name, p in run["model"].named_parameters():
        if isinstance(p, DTensor):
            gathered["blocks" if name.startswith("layers.") else "root"] += p.numel()
    elt = train.compute_dtype(tcfg, device).itemsize
    cost = cost_model(margs, seq, batch, args.accum, world, tr, numel, gathered, elt,
                      tcfg["activation_checkpointing"])
    n_tr, total = sum(numel[n] for n in tr), sum(numel.values())
    step_time = statistics.median(run["times"])
    return {"step_time_s": step_time, "step_times_s": run["times"],
            "cpu_time_s": statistics.median(run["cpu_times"]), "cpu_times_s": run["cpu_times"],
            "tokens_per_s": batch * seq * args.accum * world / step_time, "world_size": world,
            # Per rank (mean over ranks): the process before any model + this mode's resident
            # state (parameters, Adam state) + its step's transient high-water.
            "peak_mem_bytes": int(base_rss + (p_bytes + moments + counters + transient) / world),
            "optimizer_state_bytes": moments, "optimizer_step_counter_bytes": counters,
            "grad_bytes": grad_bytes, "trainable_params": n_tr, "total_params": total,
            "trainable_fraction": n_tr / total,
            "frozen_params_with_grad": frozen_grad, "trainable_params_without_grad": missing,
            "gemm_flops_counted": counted // world,
            "gemm_flops_predicted": int(sum(cost["flops"][k] for k in ("fwd", "dx", "dw"))),
            "flops_predicted": cost["flops_total"], "cost_model": cost}


# the rest is per step: collectives, optimizer
PER_TOKEN = ("fwd", "dx", "dw", "attn", "elementwise")


def tokens_for_ratio(r: dict, f: dict, target: float) -> int:
    """Tokens per rank per step up to which the cost model puts this mode's step at or below
    `target` times FFT's: the per-token work shrinks to (4+2f)/6 at best, the per-step work
    (collectives, optimizer) to the trainable share, so fewer tokens per step favour HFT.
    0 when no token count gets there (additive model, no overlap)."""
    tokens = r["tokens_per_s"] * r["step_time_s"] / r["world_size"]
    split = lambda t: (sum(t[k] for k in PER_TOKEN),
                       sum(v for k, v in t.items() if k not in PER_TOKEN + ("total",)))
    (c_m, s_m), (c_f, s_f) = split(r["predicted_times_s"]), split(f["predicted_times_s"])
    if c_m - target * c_f <= 0:
        return 10**12  # any number of tokens
    k = (target * s_f - s_m) / (c_m - target * c_f)
    return max(0, int(k * tokens))


def ratios(results: dict, cal) -> dict:
    f = results["fft"]
    out = {}
    for m, r in results.items():
        if m == "fft":
            continue
        # Paired: each step against the fft step of the same round (same batch, adjacent in
        # time), then the median, so drift that spans a round cancels.
        q = {"measured_step":
                 statistics.median(a / b for a, b in zip(r["step_times_s"], f["step_times_s"])),
             "measured_cpu":
                 statistics.median(a / b for a, b in zip(r["cpu_times_s"], f["cpu_times_s"])),
             "flops": r["flops_predicted"] / f["flops_predicted"]}
        if cal is not None:
            q["predicted_step"] = r["predicted_step_time_s"] / f["predicted_step_time_s"]
            q["max_tokens_per_rank_for_0.70"] = tokens_for_ratio(r, f, 0.70)
        for k in ("trainable_params", "optimizer_state_bytes", "grad_bytes", "peak_mem_bytes"):
            q[k] = r[k] / f[k]
        out[m] = q
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--plan" in argv:
        return plan_cli(argv)
    args = parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or modes[0] != "fft" or any(m not in MODES for m in modes):
        raise SystemExit(f"bench.py: --modes {args.modes!r}: fft first, then any of "
                         f"{', '.join(MODES)}")
    if args.predict_only:
        predict_only(args, modes)
        return 0
    if "LOCAL_WORLD_SIZE" not in os.environ:  # not under torchrun
        if args.nproc is None:
            args.nproc = torch.cuda.device_count() if torch.cuda.is_available() else 2
        if args.nproc > 1:
            return launch(args, argv)
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = data.setup_distributed()
    out = benchmark(args, modes, device)
    if dist.get_rank() == 0:
        print(report(out, modes))
        if args.out:
            checkpoint.write_json(args.out, jsonable(out), indent=1)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def benchmark(args, modes: list[str], device) -> dict:
    """Every mode built, stepped, measured and predicted; the JSON report."""
    world = dist.get_world_size()
    if device.type == "cpu" and args.malloc == "reuse":
        reuse_heap()
    base_rss = rss_bytes() if device.type == "cpu" else 0
    load_before = os.getloadavg()
    margs, seq, batch = model_shape(args, device.type)
    tcfg = dict(train.DEFAULTS["train"])
    tcfg.update(precision=args.precision or ("bf16" if device.type == "cuda" else "fp32"),
                activation_checkpointing=args.activation_checkpointing)
    sequential = args.sequential
    if device.type == "cuda" and not sequential:  # do all modes' states fit at once?
        with torch.device("meta"):
            n = sum(p.numel() for p in Transformer(margs).parameters())
        need = sum(16 if m == "fft" else 10 for m in modes) * n / world
        sequential = need > 0.6 * torch.cuda.get_device_properties(device).total_memory
    if sequential and device.type == "cpu":
        track_rss()  # one allocator setting for every mode's timing alike
    batches = make_batches(args.warmup + args.steps, margs, seq, batch, args.accum, args.seed)
    train.log(f"bench: modes {', '.join(modes)} "
              f"({'one after another' if sequential else 'interleaved'}), "
              f"{args.warmup}+{args.steps} steps, world {world}, "
              f"{torch.get_num_threads()} thread(s)/rank, "
              f"dim {margs.dim} layers {margs.n_layers} vocab {margs.vocab_size} seq {seq} "
              f"batch {batch}x{args.accum}/rank on {device.type}")
    results = {}
    for group in ([[m] for m in modes] if sequential else [modes]):
        runs = [build(m, margs, tcfg, device, args) for m in group]
        time_steps(runs, batches, args, tcfg, device)
        mem = measure_memory(runs, batches, tcfg, device)
        for run in runs:
            results[run["mode"]] = measure_run(run, mem[run["mode"]], batches, args, margs, seq,
                                               batch, tcfg, device, base_rss)
        if args.profile:
            profile(runs, batches, tcfg, device)
        del runs
        train.release_memory(device)
    cal = predict_all(results, args, margs, seq, batch, tcfg, device)
    out = {"machine": machine(device),
           "settings": {"preset": args.preset, "model": {k: getattr(margs, k) for k in
                        ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                         "ffn_hidden_dim")},
                        "seq": seq, "micro_batch": batch, "accum": args.accum, "world_size": world,
                        "tokens_per_step": batch * seq * args.accum * world, "steps": args.steps,
                        "warmup": args.warmup, "ratio": args.ratio, "precision": tcfg["precision"],
                        "activation_checkpointing": tcfg["activation_checkpointing"],
                        "seed": args.seed, "interleaved": not sequential,
                        "malloc": args.malloc if device.type == "cpu" else None},
           "base_rss_bytes": base_rss,
           "load_average": {"before": load_before, "after": os.getloadavg()},
           "calibration": cal, **results, "ratios": ratios(results, cal)}
    if "hft" in out["ratios"]:
        h = out["ratios"]["hft"]
        out.update(predicted_step_ratio=h.get("predicted_step", h["flops"]), flop_ratio=h["flops"],
                   measured_step_ratio=h["measured_step"], measured_cpu_ratio=h["measured_cpu"])
    return out


def predict_all(results: dict, args, margs, seq, batch, tcfg, device):
    """The cost model's seconds per mode from this machine's calibration, and MFU on a GPU."""
    cal = None
    if not args.no_calibrate:
        cal = calibrate(margs, seq, batch, train.compute_dtype(tcfg, device), device)
        for r in results.values():
            r["predicted_times_s"] = predict_seconds(r["cost_model"], cal,
                                                     overlap=device.type == "cuda")
            r["predicted_step_time_s"] = r["predicted_times_s"]["total"]
    if device.type == "cuda":
        for r in results.values():
            r["mfu"] = r["flops_predicted"] / r["step_time_s"] / (args.peak_tflops * 1e12)
    return cal


def all_reduce_int(x) -> int:
    return int(round(data.all_sum(x)))


def jsonable(x):
    """JSON-ready copy: GEMM keys (out, in, kind) become "outxin kind"."""
    if isinstance(x, dict):
        return {(f"{k[0]}x{k[1]} {k[2]}" if isinstance(k, tuple) else k): jsonable(v)
                for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def report(out: dict, modes: list[str]) -> str:
    m, s, la = out["machine"], out["settings"], out["load_average"]
    lines = [f"\n{m.get('gpu', m['cpu'])}, {m['world_size']} rank(s) x "
             f"{m['threads_per_rank']} thread(s), "
             f"torch {m['torch']}; {s['tokens_per_step']} tokens/step, {s['precision']}; "
             f"load average {la['before'][0]:.1f} -> {la['after'][0]:.1f}"]
    head = (f"{'mode':<8}{'step s':>8}{'cpu s':>8}{'pred s':>8}{'tok/s':>8}{'peak MiB':>9}"
            f"{'optim MiB':>10}{'grad MiB':>9}{'trainable':>12}{'GFLOP':>8}{'counted':>8}")
    lines += [head, "-" * len(head)]
    for mode in modes:
        r = out[mode]
        lines.append(f"{mode:<8}{r['step_time_s']:>8.3f}{r['cpu_time_s']:>8.3f}"
                     f"{r.get('predicted_step_time_s', float('nan')):>8.3f}"
                     f"{r['tokens_per_s']:>8.0f}{r['peak_mem_bytes'] / 2**20:>9.0f}"
                     f"{r['optimizer_state_bytes'] / 2**20:>10.1f}"
                     f"{r['grad_bytes'] / 2**20:>9.1f}{r['trainable_params']:>12,}"
                     f"{r['gemm_flops_predicted'] / 1e9:>8.2f}{r['gemm_flops_counted'] / 1e9:>8.2f}"
                     + (f"  MFU {r['mfu']:.1%}" if "mfu" in r else ""))
    lines.append("(GFLOP: GEMM FLOPs per rank per step, cost model; counted: the same, counted "
                 "by torch)")
    for mode, q in out["ratios"].items():
        lines.append(f"{mode}/fft: step {q['measured_step']:.3f} measured, "
                     f"{q['measured_cpu']:.3f} in CPU time, "
                     f"{q.get('predicted_step', float('nan')):.3f} predicted "
                     f"({q['flops']:.3f} FLOPs alone); "
                     f"trainable {q['trainable_params']:.4f}, "
                     f"Adam state {q['optimizer_state_bytes']:.4f}, "
                     f"grads {q['grad_bytes']:.4f}, peak memory {q['peak_mem_bytes']:.3f}")
    return "\n".join(lines)


def profile(runs, batches, tcfg, device, steps=3, rows=24) -> dict:
    """`steps` steps per mode under torch.profiler: self time per step and calls per step of each
    op, side by side, so a cost that a frozen parameter still causes shows up as an op whose time
    does not drop under HFT (rank 0 prints)."""
    from torch.profiler import ProfilerActivity, profile as tprofile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    table = {}
    for run in runs:
        with tprofile(activities=acts) as prof:
            for s in range(steps):
                run_step(run, batches[s % len(batches)], tcfg, device)
        for e in prof.key_averages():
            t = e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total
            table.setdefault(e.key, {})[run["mode"]] = (t / 1e3 / steps, e.count // steps)
    modes = [r["mode"] for r in runs]
    if dist.get_rank() == 0:
        print("\nprofile, rank 0, per step (self time ms / calls):")
        print(f"{'op':<58}" + "".join(f"{m:>18}" for m in modes))
        top = sorted(table, key=lambda k: -table[k].get(modes[0], (0, 0))[0])[:rows]
        for k in top:
            print(f"{k[:57]:<58}" + "".join(
                f"{table[k].get(m, (0, 0))[0]:>11.1f} /{table[k].get(m, (0, 0))[1]:>5}"
                for m in modes))
    return table


# The plan (train.py --plan): will a run fit, and how long is it. One CPU process, no GPU, no
# weights: the trainer's own model, sharding, step and optimizer on fake tensors (shapes, no
# data) under a fake process group of the run's world size, with every tensor's bytes tracked.

# Beyond the tensors the step holds (peak): the CUDA context, cuBLAS/cuDNN workspaces and NCCL's
# buffers (about 1 GiB each on an 8-GPU node: HEADROOM_GIB covers them) and the caching
# allocator's fragmentation, which grows with what is allocated (HEADROOM_FRACTION of the peak).
HEADROOM_FRACTION, HEADROOM_GIB = 0.10, 3.0


class PlanTracker(FSDPMemTracker):
    """torch's FSDP2 memory tracker (live bytes of every tensor storage, by kind, over the step),
    fixed for a run under an outer FakeTensorMode and for accumulation:
    - DTensor computes each op's output shape by running it at the *global* shape on fake tensors;
      with our fake mode active it uses ours, so the tracker took those full-size shadow tensors for
      real memory (a whole unsharded model during the foreach optimizer step). untracked_propagation
      hides them;
    - the root's forward runs once per micro-batch (FSDPMemTracker refuses a second one);
    - the most activation bytes held at once, leaving out FSDP's all-gather buffers (tagged
      "Activation" until the all-gather claims them), and the phase of the peak are kept;
      per-module peaks are not.
    Checked against the CPU allocator (torch.profiler's memory events) on a real run of the same
    step at small shapes: equal to within 0.1% (tests/test_plan.py). What it cannot see is scratch
    memory inside kernels (CPU bf16 GEMMs can add one fp32 output: 3% of a tiny model's peak)."""

    propagating = False

    def __init__(self, model, opt):
        super().__init__(model, opt)
        self.act_peak, self.peak_phase = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if PlanTracker.propagating and DTensor not in types:
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)

    def _update_peak_stats(self, peak_state):
        # The whole step's peak only: the per-module peaks FSDPMemTracker keeps as well cost a
        # walk over every module after every op (a third of the plan's time at 7B).
        for dev, snap in self._curr_mem_snap.items():
            # FSDP's all-gather buffers pass as "ACT" there
            if self._fsdp_state != _FSDPState.PRE_FW:
                self.act_peak = max(self.act_peak, snap[_FSDPRefType.ACT])
            if snap[_TOTAL_KEY] > self._peak_mem.get(dev, 0):
                self.peak_phase = ("optimizer step" if self._in_opt else
                                   "backward" if self._mod_tracker.is_bw else "forward")
                self._peak_mem[dev], self._peak_mem_snap[dev] = snap[_TOTAL_KEY], dict(snap)

    def track_params(self, tensors):
        """Parameters outside FSDP (train.replicate_frozen), which FSDPMemTracker does not see."""
        for t in tensors:
            self._update_and_maybe_create_winfos(t, _FSDPRefType.SHARDED_PARAM)

    def __enter__(self):
        super().__enter__()
        # The root's forward starts each micro-batch: start the per-module statistics anew.
        self._reset_hook = self._root_mod.register_forward_pre_hook(
            lambda *a: self.reset_mod_stats(), prepend=True)
        return self

    def __exit__(self, *args):
        self._reset_hook.remove()
        super().__exit__(*args)

    def now(self) -> dict:
        snap = self.get_tracker_snapshot()
        return next(iter(snap.values()), {})


@contextlib.contextmanager
def untracked_propagation():
    orig = ShardingPropagator._propagate_tensor_meta_non_cached

    def propagate(self, op_schema):
        before, PlanTracker.propagating = PlanTracker.propagating, True
        try:
            return orig(self, op_schema)
        finally:
            PlanTracker.propagating = before

    ShardingPropagator._propagate_tensor_meta_non_cached = propagate
    try:
        yield
    finally:
        ShardingPropagator._propagate_tensor_meta_non_cached = orig


def plan(cfg: dict, world_size: int, gpu_memory_gib: float = 80.0) -> dict:
    """What train.py would hold per rank at each stage of `cfg` on `world_size` GPUs, and whether it
    fits `gpu_memory_gib` GiB. Shapes from params.json / config.json alone
    (checkpoint.read_model_args); steps from the data files when they and the tokenizer are there.
    Runs the trainer's own code: HFT mask (hft.make_mask, the stage's seed and index),
    train.shard_model (replicate/HSDP, replicate_frozen, activation checkpointing), train.train_step
    on min(accumulation, 2) micro-batches of full-length sequences (max_seq_len tokens, the worst
    case: later ones hold what the second does) and AdamW as train.prepare_stage builds it, on fake
    CPU tensors in the dtype a GPU run computes in (precision "auto" is bf16 there). Rank 0 is
    measured: with FSDP's padding it holds the largest shards."""
    t0 = time.process_time()
    notes = []
    mcfg = cfg["model"]
    margs = checkpoint.read_model_args(mcfg["path"], mcfg["max_seq_len"], mcfg["tokenizer"],
                                       log=notes.append)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in Transformer(margs).parameters())
    if dist.is_initialized():
        raise RuntimeError("bench.plan makes its own (fake) process group: call it without one")
    train.check_world(cfg, world_size)
    # registers the "fake" backend
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    measured = {}
    try:
        stages = [plan_stage(cfg, idx, stage, margs, world_size, gpu_memory_gib, measured)
                  for idx, stage in enumerate(cfg["stages"])]
    finally:
        dist.destroy_process_group()
    notes += [
        f"memory: rank 0, one step of full-length sequences ({mcfg['max_seq_len']} tokens), "
        "simulated on fake CPU tensors; GPU kernels differ a little (attention's saved statistics, "
        "workspaces, 512-byte allocation rounding)",
        "eval: the evaluations after each stage (and of the base model), at least: the whole "
        "model gathered in the compute dtype beside its shards and the KV cache of one eval "
        "batch (eval_bytes; '-': the config evaluates nothing)",
        f"fits: max(peak, eval) x {1 + HEADROOM_FRACTION:.2f} + {HEADROOM_GIB:g} GiB <= "
        f"{gpu_memory_gib:g} GiB (CUDA context, NCCL buffers, allocator fragmentation)",
        "steps: records counted in the data file (an upper bound: loading drops examples that "
        "truncation leaves without a target token); lm stages are tokenized exactly"]
    return {"world_size": world_size, "gpu_memory_gib": gpu_memory_gib,
            "model": {"path": mcfg["path"], "params": n_params, "max_seq_len": margs.max_seq_len,
                      **{k: getattr(margs, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads",
                                                         "vocab_size", "ffn_hidden_dim")}},
            "stages": stages, "assumptions": notes,
            "cpu_seconds": round(time.process_time() - t0, 1)}


def plan_settings(stage: dict, world: int) -> tuple[dict, int]:
    """The stage's [train] settings as a GPU run resolves them, and its micro-batches per step."""
    t = dict(stage["train"])
    t["precision"] = "bf16" if t["precision"] == "auto" else t["precision"]
    return t, t["batch_size"] // (world * t["micro_batch_size"])  # train.check_world: divides


# The [train] settings a step's memory depends on (besides the micro-batches per step).
MEMORY_KEYS = ("micro_batch_size", "activation_checkpointing", "replicate", "replicate_frozen",
               "precision")


def plan_stage(cfg: dict, idx: int, stage: dict, margs: ModelArgs, world: int, gib: float,
               measured: dict) -> dict:
    """One stage of the plan. A stage whose settings and trainable sizes (per HFT category)
    equal an earlier stage's reuses its measurement (`measured`), as TRACE's eight tasks do: only
    which tensors of a layer train differs between them, which moves the peak by about 1% (seven
    TRACE draws at 7B: 11.72 to 11.88 GiB) and the rest not at all."""
    t, accum = plan_settings(stage, world)
    h = stage["hft"]
    with torch.device("meta"):
        model = Transformer(margs)
    mask = hft.make_mask(model, h["granularity"], h["ratio"], cfg["seed"], idx,
                         h["train_embeddings"])
    key = json.dumps([stage["kind"], accum, mask["summary"], h, [t[k] for k in MEMORY_KEYS]])
    if key not in measured:
        hft.apply_mask(model, set(mask["trainable"]))  # before sharding, as train.build_model does
        measured[key] = dict(measure_stage(model, t, stage["kind"], margs.max_seq_len, accum),
                             measured_in=stage["name"])
    m = measured[key]
    per_rank = dict(m["per_rank_bytes"])
    element_mask = 0
    if h["granularity"] == "parameter":  # hft.ElementMask: a bool per layer element, sharded
        element_mask = math.ceil(sum(p.numel() for n, p in model.named_parameters()
                                     if n.startswith("layers.")) / (world // t["replicate"]))
        per_rank["peak"] += element_mask
    evals = eval_bytes(cfg, idx, model, set(mask["trainable"]), t, per_rank["parameters"])
    need = (max(per_rank["peak"], evals or 0) * (1 + HEADROOM_FRACTION)
            + HEADROOM_GIB * 2**30)
    summary = mask["summary"]["total"]
    return {"name": stage["name"], "kind": stage["kind"], "trainable_params": summary["trainable"],
            "total_params": summary["total"], **m, "per_rank_bytes": per_rank,
            "element_mask_bytes": element_mask, "eval_bytes": evals, "needed_bytes": int(need),
            "fits": need <= gib * 2**30, "micro_batch_size": t["micro_batch_size"],
            "accumulation": accum, "seq_len": margs.max_seq_len,
            "compute_dtype": str(train.compute_dtype(t, torch.device("cpu")))[6:],
            **{k: t[k] for k in ("activation_checkpointing", "replicate", "replicate_frozen")},
            "granularity": h["granularity"], "data": plan_data(cfg, stage, world)}


def eval_bytes(cfg: dict, idx: int, model: Transformer, trainable: set[str], t: dict,
               params: int) -> int | None:
    """Per rank, the least the evaluations around stage `idx` hold (None: the config evaluates
    nothing). train.py scores the stage's model under eval.gathered: every tensor FSDP manages
    whole, in the compute dtype, on every rank beside `params` (its sharded parameters); and
    generation's KV cache, in the compute dtype, of at most eval.batch_size sequences and
    max_batch_tokens positions (one sequence may pass that). The prefill's activations are not
    counted. The base model's evaluation (before stage 0) holds no more than stage 0's."""
    e, stages = cfg["eval"], cfg["stages"]
    if not e["probes"] and not any(s["eval"] for s in stages):
        return None
    elt = train.compute_dtype(t, torch.device("cpu")).itemsize
    whole = sum(p.numel() for n, p in model.named_parameters()
                if not t["replicate_frozen"] or n in trainable)
    a = model.args
    positions = e["batch_size"] * a.max_seq_len
    if e["max_batch_tokens"]:
        positions = min(positions, max(e["max_batch_tokens"], a.max_seq_len))
    # Files to score: after stage idx its own and the earlier stages' and the probes; before
    # stage 0 (the base model) all of them. Without files the model is still gathered.
    files = idx == 0 or e["probes"] or any(s["eval"] for s in stages[:idx + 1])
    kv = positions * a.n_layers * 2 * a.n_kv_heads * a.head_dim * elt if files else 0
    return params + whole * elt + kv


def measure_stage(model: Transformer, t: dict, kind: str, seq: int, accum: int) -> dict:
    """Shard the masked meta model, then one tracked step on fake tensors (see plan)."""
    train.shard_model(model, t, torch.device("cpu"))  # outside FakeTensorMode: it builds the mesh
    with FakeTensorMode(allow_non_fake_inputs=True), untracked_propagation():
        opt = materialize(model, t)
        init_moments(opt)
        mbs, refs = plan_batches(kind, t["micro_batch_size"], seq, min(accum, 2))
        m = track_step(model, opt, t, kind, mbs, refs)
    del opt
    gc.collect()  # the FSDP modules of the model sit in reference cycles
    return {"per_rank_bytes": {k: m[k] for k in ("parameters", "gradients", "optimizer",
                                                 "activations", "peak")},
            "peak_breakdown_bytes": m["breakdown"], "peak_phase": m["phase"],
            "simulated_micro_batches": len(mbs)}


def materialize(model: Transformer, t: dict):
    """Storage for the sharded meta model, as train.build_model makes it (frozen tensors that
    replicate_frozen keeps out of FSDP: whole, in the compute dtype), and the AdamW that
    train.prepare_stage builds. Under FakeTensorMode the storage is only shapes."""
    model.to_empty(device="cpu")
    model.init_buffers()
    return torch.optim.AdamW(hft.param_groups(model, t["weight_decay"]), lr=t["lr"],
                             betas=tuple(t["betas"]), foreach=True)


def init_moments(opt):
    """AdamW's moments exist from the first step on: make them (a step on zero gradients), so a
    step measured after this holds them through its forward and backward as every later step
    does."""
    params = [p for g in opt.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def track_step(model, opt, t: dict, kind: str, mbs: list, refs: list) -> dict:
    """One training step (train.train_step over `mbs`, AdamW.step, zero_grad) under PlanTracker:
    this rank's bytes of sharded parameters, gradients (after the last micro-batch), optimizer
    state (after the step), the most activation bytes held at once, the peak of everything live,
    and the peak's composition and phase. `start`: bytes live before the step."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    tracker = PlanTracker(model, opt)
    tracker.track_params(p for p in model.parameters() if not isinstance(p, DTensor))
    tracker.track_inputs((mbs, refs))
    with tracker:
        start = tracker.now()[_TOTAL_KEY]
        train.train_step(model, trainable, mbs, kind, refs, 1.0, t, None, torch.device("cpu"))
        grads = tracker.now()[_FSDPRefType.SHARDED_GRAD]
        opt.step()
        after = tracker.now()
        opt.zero_grad(set_to_none=True)
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    return {"parameters": after[_FSDPRefType.SHARDED_PARAM], "gradients": grads,
            "optimizer": after[_FSDPRefType.OPT], "activations": tracker.act_peak,
            "peak": peak[_TOTAL_KEY], "start": start, "phase": tracker.peak_phase,
            "breakdown": {k.name.lower(): v for k, v in peak.items() if k != _TOTAL_KEY and v}}


def plan_batches(kind: str, mb: int, seq: int, n: int) -> tuple[list, list]:
    """n micro-batches of mb full-length sequences (pairs for dpo, with reference log-probs)."""
    def seqs():
        return torch.zeros(mb, seq, dtype=torch.long), torch.zeros(mb, seq, dtype=torch.long)
    if kind != "dpo":
        return [dict(zip(("input_ids", "labels"), seqs())) for _ in range(n)], [None] * n
    mbs = [dict(zip(("chosen_input_ids", "chosen_labels"), seqs()),
                **dict(zip(("rejected_input_ids", "rejected_labels"), seqs()))) for _ in range(n)]
    return mbs, [torch.zeros(mb, 2) for _ in range(n)]


def count_records(path: str) -> int:
    """Records of a data file as data.read_records counts them; a .jsonl file's lines are
    counted as the loader reads them (data._jsonl_lines: a line at a time, not parsed)."""
    if path.lower().endswith(".jsonl"):
        return sum(1 for _ in data._jsonl_lines(path))
    return len(data.read_records(path))


def plan_data(cfg: dict, stage: dict, world: int) -> dict:
    """Optimizer steps of the stage, when its data file and the tokenizer are both there.
    sft/dpo: from the number of records, an upper bound (tokenizing Tulu V2 takes minutes; the
    loader drops what truncation leaves without a target token). lm: exact, from tokenizing the
    documents into windows as data.load_examples does."""
    t, path, tok = stage["train"], stage["data"], cfg["model"]["tokenizer"]
    out = {"path": path, "examples": None, "examples_are": None, "steps": None, "tokens_max": None}
    missing = [f for f in (path, tok) if not os.path.isfile(f)]
    if missing:
        out.update(missing=missing, why_unknown=" and ".join(
            f"no {what} at {f}" for what, f in (("data file", path), ("tokenizer", tok))
            if f in missing))
        return out
    if stage["kind"] == "lm":
        seqs = data.load_examples(path, "lm", data.Tokenizer(tok), cfg["model"]["max_seq_len"],
                                  log=lambda *a, **k: None)
        out.update(examples=len(seqs), examples_are="exact (tokenized windows)")
    else:
        out.update(examples=count_records(path), examples_are="records (an upper bound)")
    steps = out["examples"] // t["batch_size"] * t["epochs"]
    steps = min(steps, t["max_steps"]) if t["max_steps"] else steps
    per_example = 2 if stage["kind"] == "dpo" else 1  # a preference pair is two sequences
    tokens = steps * t["batch_size"] * per_example * cfg["model"]["max_seq_len"]
    out.update(steps=steps, tokens_max=tokens)
    return out


def format_plan(out: dict) -> str:
    """The plan as a table for people (GiB per rank)."""
    m, gib = out["model"], out["gpu_memory_gib"]
    lines = [f"plan: world size {out['world_size']}, {m['params'] / 1e9:.2f}B parameters "
             f"(dim {m['dim']}, {m['n_layers']} layers, vocab {m['vocab_size']}), max_seq_len "
             f"{m['max_seq_len']}; GiB per rank; fits = max(peak, eval) x "
             f"{1 + HEADROOM_FRACTION:.2f} + {HEADROOM_GIB:g} GiB <= {gib:g} GiB"]
    head = (f"{'stage':<14}{'kind':<5}{'trainable':>16}{'mb x acc':>9}{'params':>8}{'grads':>7}"
            f"{'optim':>7}{'activ':>7}{'peak':>7}  {'peak in':<15}{'eval':>6}  {'fits':<5}"
            f"{'steps':>8}")
    lines += [head, "-" * len(head)]
    for s in out["stages"]:
        b = {k: v / 2**30 for k, v in s["per_rank_bytes"].items()}
        steps, evals = s["data"]["steps"], s["eval_bytes"]
        lines.append(f"{s['name'][:13]:<14}{s['kind']:<5}{s['trainable_params']:>16,}"
                     f"{s['micro_batch_size']:>5} x{s['accumulation']:<2}{b['parameters']:>8.2f}"
                     f"{b['gradients']:>7.2f}{b['optimizer']:>7.2f}{b['activations']:>7.2f}"
                     f"{b['peak']:>7.2f}  "
                     f"{s['peak_phase']:<15}"
                     f"{'-' if evals is None else f'{evals / 2**30:.2f}':>6}  "
                     f"{'yes' if s['fits'] else 'NO':<5}"
                     f"{steps if steps is not None else '?':>8}")
    lines += [f"- {n}" for n in out["assumptions"]]
    same = [s["name"] for s in out["stages"] if s["measured_in"] != s["name"]]
    if same:
        lines.append(f"- measured once for stages of the same settings and trainable sizes: "
                     f"{', '.join(same)} (their mask draws move the peak by about 1%)")
    unknown = [s for s in out["stages"] if "missing" in s["data"]]
    if unknown:
        missing = list(dict.fromkeys(f for s in unknown for f in s["data"]["missing"]))
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        lines.append(f"- steps unknown for {', '.join(s['name'] for s in unknown)}: missing "
                     f"{', '.join(missing[:3])}{more} "
                     f"(the data files and the tokenizer count them)")
    lines.append(f"({out['cpu_seconds']:.1f} s of CPU time)")
    return "\n".join(lines)


def plan_cli(argv) -> int:
    """`python train.py --plan ...` (or bench.py --plan ...): the config's keys and overrides as
    train.py reads them, plus --world-size, --gpu-memory-gib and --plan-json."""
    ap = argparse.ArgumentParser(description="train.py --plan: will a run fit, and how long is it")
    ap.add_argument("--config", required=True)
    ap.add_argument("--plan", action="store_true")
    ap.add_argument("--world-size", type=int)
    ap.add_argument("--gpu-memory-gib", type=float, default=80.0)
    ap.add_argument("--plan-json")
    args, overrides = ap.parse_known_args(argv)
    try:
        cfg = train.load_config(args.config, overrides)
    except train.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return plan_main(cfg, args.world_size, args.gpu_memory_gib, args.plan_json)


def plan_main(cfg: dict, world_size, gpu_memory_gib: float, json_path=None) -> int:
    """train.py --plan: print the table, write the JSON (atomically) when asked; 2 on bad input."""
    if not world_size or world_size < 1:
        print("error: --plan needs --world-size N (the number of GPUs of the run)", file=sys.stderr)
        return 2
    try:
        out = plan(cfg, world_size, gpu_memory_gib)
    except (train.ConfigError, checkpoint.CheckpointError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_plan(out))
    if json_path:
        checkpoint.write_json(json_path, out)
    return 0


if __name__ == "__main__":
    data.hard_exit(main())  # exit without interpreter finalization (gloo teardown abort)
