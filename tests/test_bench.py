"""bench.py: a tiny smoke run (its JSON, and the byte ratios that are facts, not timings) and the
cost model's bookkeeping."""
import json
import os
import subprocess
import sys
from fractions import Fraction

from conftest import ROOT

FIELDS = ("step_time_s", "tokens_per_s", "peak_mem_bytes", "optimizer_state_bytes", "grad_bytes",
          "trainable_params")


def test_smoke_run_json_and_exact_ratios(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench.py"), "--nproc", "1", "--preset", "tiny",
           "--steps", "2", "--warmup", "0", "--threads", "1", "--no-calibrate", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    assert "hft/fft: step" in p.stdout and "FLOPs alone" in p.stdout  # the table was printed
    res = json.loads(out.read_text())
    for mode in ("fft", "hft"):
        for k in FIELDS:
            assert isinstance(res[mode][k], (int, float)) and res[mode][k] > 0, \
                (mode, k, res[mode].get(k))
        assert len(res[mode]["step_times_s"]) == 2
        # Frozen tensors got no gradient, trainable ones all did.
        assert res[mode]["frozen_params_with_grad"] == 0
        assert res[mode]["trainable_params_without_grad"] == 0
        # The GEMMs the dispatcher ran are exactly the cost model's: backward skipped the
        # weight-gradient GEMM of every frozen matrix and nothing else.
        assert res[mode]["gemm_flops_counted"] == res[mode]["gemm_flops_predicted"], mode
    assert isinstance(res["predicted_step_ratio"], float) and 0 < res["predicted_step_ratio"] < 1
    assert res["machine"]["world_size"] == 1 and res["settings"]["model"]["dim"] == 64
    fft, hft = res["fft"], res["hft"]
    assert fft["trainable_params"] == fft["total_params"]  # FFT trains everything
    assert hft["trainable_params"] < fft["trainable_params"]
    trainable = Fraction(hft["trainable_params"], fft["trainable_params"])
    # Exactly, as integers: Adam moments and gradients exist for trainable elements only.
    assert Fraction(hft["optimizer_state_bytes"], fft["optimizer_state_bytes"]) == trainable
    assert Fraction(hft["grad_bytes"], fft["grad_bytes"]) == trainable
    assert fft["optimizer_state_bytes"] == 8 * fft["total_params"]  # exp_avg + exp_avg_sq, fp32
    assert fft["grad_bytes"] == 4 * fft["total_params"]


def test_cost_model_counts_only_the_work_a_mask_leaves():
    import torch
    import bench
    from model import ModelArgs, Transformer
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=256, multiple_of=32, max_seq_len=32)
    with torch.device("meta"):
        m = Transformer(args)
    numel = {n: p.numel() for n, p in m.named_parameters()}
    every = set(numel)
    mats = bench.matrices(args)
    n_mat = sum(o * i for o, i in mats.values())
    gathered = {"blocks": sum(v for k, v in numel.items() if k.startswith("layers.")), "root": 0}
    seq, batch = 32, 2
    tokens = seq * batch

    def cost(trainable, ckpt=False):
        return bench.cost_model(args, seq, batch, 1, 2, trainable, numel, gathered, 4, ckpt)

    fft = cost(every)
    assert fft["flops"]["fwd"] == fft["flops"]["dx"] == fft["flops"]["dw"] == 2 * n_mat * tokens
    assert fft["bytes"]["reduce_scatter"] == 0.5 * 4 * sum(numel.values())
    # Freeze wq of layer 1: one weight-gradient GEMM fewer, every input gradient still needed.
    wq = "layers.1.attention.wq.weight"
    one = cost(every - {wq})
    assert one["flops"]["dw"] == fft["flops"]["dw"] - 2 * numel[wq] * tokens
    assert one["flops"]["dx"] == fft["flops"]["dx"]
    assert one["bytes"]["optimizer"] == fft["bytes"]["optimizer"] - 4 * 18 * numel[wq] / 2
    # Embeddings and all of layer 0 frozen: nothing below layer 1 needs a gradient, so layer 0
    # has no input-gradient GEMMs and no attention backward.
    low = {n for n in every if n.startswith("layers.0.") or n == "tok_embeddings.weight"}
    top = cost(every - low)
    layer0 = sum(o * i for n, (o, i) in mats.items() if n.startswith("layers.0."))
    assert top["flops"]["dx"] == fft["flops"]["dx"] - 2 * layer0 * tokens
    assert top["flops"]["attn_bwd"] == fft["flops"]["attn_bwd"] / 2
    # Activation checkpointing repeats the layers' forward but not the output projection's.
    ck = cost(every, ckpt=True)
    assert ck["flops"]["fwd"] == 2 * fft["flops"]["fwd"] - 2 * args.vocab_size * args.dim * tokens
