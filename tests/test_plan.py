"""train.py --plan (bench.plan): per-rank memory of a run from the config and a params.json or
config.json alone, on fake tensors under a fake process group, against the arithmetic of sharded
fp32 master weights, gradients and Adam moments; the measurement itself against the CPU
allocator on a real run of the same step."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

import bench
import train
from checkpoint import read_model_args
from model import ModelArgs, Transformer, llama2_args

GIB = 2**30
# LLaMA-2's published config.json (meta-llama/Llama-2-{7b,13b}-hf); layers and length are set
# per test: the state arithmetic holds layer by layer, so 2 layers at full width test it in seconds.
HF_BASE = {"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
           "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 4096,
           "model_type": "llama", "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
           "tie_word_embeddings": False, "torch_dtype": "float16", "vocab_size": 32000}
HF = {"7b": dict(HF_BASE, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                 num_hidden_layers=32, num_key_value_heads=32),
      "13b": dict(HF_BASE, hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                  num_hidden_layers=40, num_key_value_heads=40)}


def hf_dir(root, size, layers=None):
    path = root / f"llama-2-{size}-{layers or 'all'}"
    path.mkdir(exist_ok=True)
    cfg = dict(HF[size], **({"num_hidden_layers": layers} if layers else {}))
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


def recipe(name, model_path, *overrides):
    return train.load_config(os.path.join(ROOT, "configs", name),
                             ["--model.path", model_path, *overrides])


def n_params(args: ModelArgs) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(args).parameters())


def assert_state_arithmetic(stage, world, total, rel=0.01):
    """fp32 master weights 4 bytes/param, gradients 4 and Adam's two moments 8 per trainable
    param, each sharded over the world (AdamW's step counters: 4 bytes per tensor on top)."""
    b, tr = stage["per_rank_bytes"], stage["trainable_params"]
    assert stage["total_params"] == total
    assert b["parameters"] == pytest.approx(4 * total / world, rel=rel)
    assert b["gradients"] == pytest.approx(4 * tr / world, rel=rel)
    assert b["optimizer"] == pytest.approx(8 * tr / world, rel=rel)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    return {"root": root, "7b": hf_dir(root, "7b", layers=2), "13b": hf_dir(root, "13b", layers=2)}


@pytest.mark.parametrize("size", ["7b", "13b"])
def test_state_bytes_are_the_arithmetic_of_sharded_fp32_state(shapes, size):
    total = n_params(read_model_args(shapes[size]))
    for name in (f"tulu_sft_{size}_fft.toml", f"tulu_sft_{size}.toml"):
        out = bench.plan(recipe(name, shapes[size], "--model.max_seq_len", "256"), 8)
        st = out["stages"][0]
        assert_state_arithmetic(st, 8, total)
        assert st["compute_dtype"] == "bfloat16" and st["simulated_micro_batches"] == 2
    fft, hft = (bench.plan(recipe(n, shapes[size], "--model.max_seq_len", "256"), 8)["stages"][0]
                for n in (f"tulu_sft_{size}_fft.toml", f"tulu_sft_{size}.toml"))
    assert fft["trainable_params"] == total > hft["trainable_params"]
    assert hft["per_rank_bytes"]["peak"] < fft["per_rank_bytes"]["peak"]


def test_hsdp_and_replicate_frozen_change_the_state_as_they_should(shapes):
    path = shapes["7b"]
    total = n_params(read_model_args(path))
    hsdp = bench.plan(recipe("tulu_sft_7b.toml", path, "--model.max_seq_len", "128",
                             "--train.replicate", "2"), 8)["stages"][0]
    assert_state_arithmetic(hsdp, 4, total)  # sharded over 4, replicated twice
    rep = bench.plan(recipe("tulu_sft_7b.toml", path, "--model.max_seq_len", "128",
                            "--train.replicate_frozen", "true"), 8)["stages"][0]
    frozen = total - rep["trainable_params"]
    b = rep["per_rank_bytes"]
    # Frozen tensors whole on every rank in bf16, trainable ones sharded in fp32.
    assert b["parameters"] == pytest.approx(2 * frozen + 4 * rep["trainable_params"] / 8, rel=0.01)
    assert b["optimizer"] == pytest.approx(8 * rep["trainable_params"] / 8, rel=0.01)


def test_accumulation_holds_no_unsharded_gradients(shapes):
    """Gradients are reduce-scattered after every micro-batch: the second micro-batch's backward
    holds at most the sharded gradients the first left (1/8 of them, in fp32) on top of what a
    step of one micro-batch holds. Keeping the unsharded fp32 gradients between micro-batches
    (no-sync accumulation) would add all of them, 8 times as much."""
    path = shapes["7b"]
    one, many = (bench.plan(recipe("tulu_sft_7b_fft.toml", path, "--model.max_seq_len", "128",
                                   "--train.batch_size", str(bs)), 8)["stages"][0]
                 for bs in (16, 128))
    assert (one["accumulation"], many["accumulation"]) == (1, 8)
    assert many["simulated_micro_batches"] == 2
    sharded = many["per_rank_bytes"]["gradients"]
    assert sharded == pytest.approx(4 * many["trainable_params"] / 8, rel=0.01)
    assert 0 <= many["per_rank_bytes"]["peak"] - one["per_rank_bytes"]["peak"] <= sharded
    block = 2 * n_params(read_model_args(path)) / 8  # far above one layer's bf16 gradients
    assert many["peak_breakdown_bytes"].get("unsharded_grad", 0) < block


def test_activations_halve_with_the_sequence(shapes):
    acts = {}
    for seq in (512, 256):
        for ac in ("true", "false"):
            cfg = recipe("tulu_sft_7b_fft.toml", shapes["7b"], "--model.max_seq_len", str(seq),
                         "--train.activation_checkpointing", ac)
            st = bench.plan(cfg, 8)["stages"][0]
            acts[seq, ac] = st["per_rank_bytes"]["activations"]
    for ac in ("true", "false"):
        assert acts[256, ac] / acts[512, ac] == pytest.approx(0.5, abs=0.01)
    assert acts[512, "true"] < acts[512, "false"]  # checkpointing keeps less


@pytest.mark.parametrize("precision,checkpointing", [("bf16", True), ("fp32", False)])
def test_tracker_matches_the_cpu_allocator_on_a_real_step(precision, checkpointing):
    """The same step on real tensors (fake process group, world 8): the tracker's peak above the
    step's start against the CPU allocator's, from torch.profiler's memory events; and the fake
    run's against the real run's (identical accounting)."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.profiler import ProfilerActivity, profile
    from torch.testing._internal.distributed.fake_pg import FakeStore
    args = ModelArgs(dim=256, n_layers=2, n_heads=4, vocab_size=1024, multiple_of=64,
                     max_seq_len=256)
    t = dict(train.DEFAULTS["train"], precision=precision, activation_checkpointing=checkpointing)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
    try:
        peaks = {}
        for mode in ("real", "fake"):
            with torch.device("meta"):
                model = Transformer(args)
            train.shard_model(model, t, torch.device("cpu"))
            fake = (FakeTensorMode(allow_non_fake_inputs=True) if mode == "fake"
                    else torch.device("cpu"))
            with fake, bench.untracked_propagation():
                opt = bench.materialize(model, t)
                bench.init_moments(opt)
                mbs, refs = bench.plan_batches("sft", 1, args.max_seq_len, 2)
                with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                    m = bench.track_step(model, opt, t, "sft", mbs, refs)
            peaks[mode] = m["peak"] - m["start"]
            if mode == "real":
                live = peak = 0
                events = [e for e in prof.profiler.kineto_results.events()
                          if e.name() == "[memory]"]
                for e in sorted(events, key=lambda e: e.start_ns()):
                    live += e.nbytes()
                    peak = max(peak, live)
                peaks["allocator"] = peak
    finally:
        dist.destroy_process_group()
    assert peaks["fake"] == peaks["real"]
    assert peaks["real"] == pytest.approx(peaks["allocator"], rel=0.001)


def test_dtensor_shape_propagation_is_not_counted(shapes):
    """DTensor works out an op's output shape by running the op on fake tensors of the global
    shape, once per process and op signature (then cached). In a fresh process the first plan
    runs those propagations under the tracker and must not count them (bench.untracked_
    propagation; without it this 2-layer 7B FFT plan counted a whole fp32 model as activations,
    2.5 GiB instead of 0.1): it equals the second plan, whose propagations are all cached."""
    cfg = os.path.join(ROOT, "configs", "tulu_sft_7b_fft.toml")
    code = ("import json, bench, train\n"
            f"cfg = train.load_config({cfg!r}, ['--model.path', {shapes['7b']!r}, "
            "'--model.max_seq_len', '128'])\n"
            "print(json.dumps([bench.plan(cfg, 8)['stages'][0]['per_rank_bytes'] "
            "for _ in range(2)]))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    first, cached = json.loads(p.stdout.splitlines()[-1])
    assert first == cached


def test_evaluations_hold_the_gathered_model_and_the_kv_cache(shapes):
    """After each stage train.py scores the model under eval.gathered: the whole model in bf16 on
    every rank beside its fp32 shards, and generation's KV cache; fits counts it when it is more
    than the training step's peak (here a batch of 512 sequences of 256 tokens: 4 GiB)."""
    path = shapes["7b"]
    args = read_model_args(path, max_seq_len=256)
    cfg = recipe("trace_7b.toml", path, "--model.max_seq_len", "256", "--eval.batch_size", "512",
                 "--eval.max_batch_tokens", "0", "--eval.max_new_tokens", "16")
    stages = bench.plan(cfg, 8)["stages"]
    kv = 512 * 256 * args.n_layers * 2 * args.n_kv_heads * args.head_dim * 2
    for st in stages:
        b = st["per_rank_bytes"]
        assert st["eval_bytes"] == b["parameters"] + 2 * n_params(args) + kv
        assert st["eval_bytes"] > b["peak"]
        assert st["needed_bytes"] == int(st["eval_bytes"] * (1 + bench.HEADROOM_FRACTION)
                                         + bench.HEADROOM_GIB * GIB)
    assert bench.plan(recipe("tulu_sft_7b.toml", path, "--model.max_seq_len", "256"),
                      8)["stages"][0]["eval_bytes"] is None  # no eval files, no probes


def test_model_args_from_config_json_alone(tmp_path):
    path = hf_dir(tmp_path, "13b")
    assert os.listdir(path) == ["config.json"]
    assert read_model_args(path) == llama2_args("13B", vocab_size=32000, max_seq_len=4096)
    assert read_model_args(path, max_seq_len=1024).max_seq_len == 1024


def test_model_args_from_params_json_alone(tmp_path, spm_path):
    import shutil
    meta = tmp_path / "meta"
    meta.mkdir()
    params = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
              "vocab_size": -1}  # LLaMA-2-7B's params.json
    (meta / "params.json").write_text(json.dumps(params))
    notes = []
    assert read_model_args(meta, log=notes.append) == llama2_args("7B", vocab_size=32000)
    assert "32000" in notes[0] and "no tokenizer" in notes[0]
    shutil.copy(spm_path, meta / "tokenizer.model")  # a tokenizer beside it: its piece count
    notes.clear()
    assert read_model_args(meta, log=notes.append).vocab_size == 320
    assert "320 pieces" in notes[0]


def write_tiny(root, spm_path=None, n_records=40):
    """A params.json-only model directory, a Tulu-format data file and a config for them."""
    import shutil
    model = root / "tiny"
    model.mkdir()
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-5,
              "vocab_size": -1}
    (model / "params.json").write_text(json.dumps(params))
    if spm_path:
        shutil.copy(spm_path, model / "tokenizer.model")
    with open(root / "sft.jsonl", "w", encoding="utf-8") as f:
        for i in range(n_records):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"add {i}"},
                                             {"role": "assistant", "content": f"{i + 1}"}]})
                    + "\n\n")
        f.write("\u00a0\n")  # blank to the loader too (str.strip), not to bytes.strip
    cfg = root / "plan.toml"
    cfg.write_text(f"""out_dir = "{root / 'out'}"
[model]
path = "{model}"
max_seq_len = 64
[train]
batch_size = 8
micro_batch_size = 1
epochs = 3
device = "cuda"
[eval]
max_new_tokens = 16
[[stages]]
name = "sft"
kind = "sft"
train = "{root / 'sft.jsonl'}"
[[stages]]
name = "dpo"
kind = "dpo"
train = "{root / 'missing.jsonl'}"
[[stages]]
name = "sft2"
kind = "sft"
train = "{root / 'sft.jsonl'}"
""")
    return cfg


def run_plan(*args):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)


def test_cli_prints_the_table_and_writes_the_json(tmp_path, spm_path):
    cfg = write_tiny(tmp_path, spm_path)
    out = tmp_path / "plan.json"
    p = run_plan("--config", cfg, "--plan", "--world-size", 4, "--gpu-memory-gib", 4,
                 "--plan-json", out)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "world size 4" in p.stdout and "peak" in p.stdout and "sft" in p.stdout
    res = json.loads(out.read_text())
    assert res["world_size"] == 4 and res["gpu_memory_gib"] == 4
    assert res["model"]["vocab_size"] == 320  # params.json's -1: the tokenizer's pieces
    assert [s["name"] for s in res["stages"]] == ["sft", "dpo", "sft2"]
    for st in res["stages"]:
        assert set(st) >= {"name", "trainable_params", "total_params", "per_rank_bytes", "fits"}
        b = st["per_rank_bytes"]
        assert set(b) == {"parameters", "gradients", "optimizer", "activations", "peak"}
        assert all(isinstance(v, int) and v > 0 for v in b.values())
        assert b["peak"] >= b["parameters"] + b["gradients"] + b["optimizer"]
        assert st["fits"] is True and st["accumulation"] == 2 == st["simulated_micro_batches"]
        assert st["eval_bytes"] is None  # nothing to evaluate: the model is never gathered
    sft, dpo, sft2 = res["stages"]
    # 40 records (blank lines skipped, as the loader skips them), 8 per step, 3 epochs; the dpo
    # file is missing.
    assert sft["data"]["examples"] == 40 and sft["data"]["steps"] == 15
    assert sft["data"]["tokens_max"] == 15 * 8 * 64
    assert dpo["data"]["steps"] is None and "missing.jsonl" in dpo["data"]["why_unknown"]
    assert sft["trainable_params"] < sft["total_params"]  # HFT: a new half per stage
    assert dpo["per_rank_bytes"]["activations"] > sft["per_rank_bytes"]["activations"]  # pairs
    # Another draw of the same sizes and settings: measured once.
    assert (sft["measured_in"], dpo["measured_in"], sft2["measured_in"]) == ("sft", "dpo", "sft")
    assert sft2["per_rank_bytes"] == sft["per_rank_bytes"] and "measured once" in p.stdout

    # A few MiB of tensors, but the CUDA context and NCCL's buffers need their headroom.
    small = run_plan("--config", cfg, "--plan", "--world-size", 4, "--gpu-memory-gib", 3)
    assert small.returncode == 0 and " NO " in small.stdout


def test_cli_errors_exit_2_naming_the_problem(tmp_path, capfd):
    cfg = str(write_tiny(tmp_path))
    assert train.main(["--config", cfg, "--plan"]) == 2  # train.py hands --plan to bench.py
    assert "--world-size" in capfd.readouterr().err
    assert train.main(["--config", cfg, "--plan", "--world-size", "3"]) == 2  # 8 % 3
    assert "train.batch_size = 8" in capfd.readouterr().err
    assert train.main(["--config", cfg, "--plan", "--world-size", "2",
                       "--model.path", str(tmp_path)]) == 2
    assert "unknown checkpoint format" in capfd.readouterr().err
    import torch.distributed as dist
    bad = train.load_config(cfg, ["--model.path", str(tmp_path)])
    assert (bench.plan_main(bad, 2, 80) == 2
            and "unknown checkpoint format" in capfd.readouterr().err)
    assert not dist.is_initialized()  # the fake process group is gone after an error too


def test_13b_fft_recipe_fits_an_80gb_gpu_at_world_8(tmp_path):
    """Full size, the shipped recipe (the one test here that takes tens of seconds)."""
    path = hf_dir(tmp_path, "13b")
    out = bench.plan(recipe("tulu_sft_13b_fft.toml", path), 8, 80)
    st = out["stages"][0]
    assert_state_arithmetic(st, 8, 13_015_864_320)
    assert st["fits"] and st["per_rank_bytes"]["peak"] < 40 * GIB
    assert st["peak_breakdown_bytes"].get("unsharded_grad", 0) < 1 * GIB


def test_gpu_recipes_say_cuda_and_bf16():
    import glob
    for path in glob.glob(os.path.join(ROOT, "configs", "*.toml")):
        name = os.path.basename(path)
        if name.startswith(("tulu_", "trace_")):
            t = train.load_config(path)["train"]
            assert (t["device"], t["precision"]) == ("cuda", "bf16"), name


def test_lm_steps_are_counted_exactly_and_element_masks_cost_their_bytes(tmp_path, spm_path):
    import data
    cfg = train.load_config(str(write_tiny(tmp_path, spm_path)), ["--hft.granularity", "parameter"])
    text = tmp_path / "corpus.txt"
    text.write_text("the river city was born in the year of the apple " * 60)
    lm = dict(cfg["stages"][0], kind="lm", data=str(text))
    got = bench.plan_data(cfg, lm, 4)
    windows = len(data.load_examples(str(text), "lm", data.Tokenizer(spm_path), 64,
                                     log=lambda *a: None))
    assert got["examples"] == windows > 8 and got["steps"] == windows // 8 * 3
    assert got["examples_are"].startswith("exact")
    cfg["stages"] = [cfg["stages"][0]]
    st = bench.plan(cfg, 4)["stages"][0]
    with torch.device("meta"):
        model = Transformer(read_model_args(cfg["model"]["path"]))
    layers = sum(p.numel() for n, p in model.named_parameters() if n.startswith("layers."))
    # Every layer tensor trains (a random half of its elements): FFT's gradients and moments,
    # plus one bool per layer element, sharded.
    assert st["element_mask_bytes"] == -(-layers // 4)
    assert st["per_rank_bytes"]["gradients"] == pytest.approx(4 * st["total_params"] / 4, rel=0.01)
    assert st["trainable_params"] < st["total_params"]
