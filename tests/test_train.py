"""The stage runner under torchrun on CPU (gloo, 2 processes), on a tiny official-format model."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

TRAIN = os.path.join(ROOT, "train.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(cfg_path, nproc=2, extra=(), env=None, check=True, nnodes_args=None, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    cmd += nnodes_args or ["--standalone", f"--nproc_per_node={nproc}"]
    cmd += [TRAIN, "--config", str(cfg_path), *extra]
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    p = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"torchrun failed ({p.returncode}):\n{p.stdout[-3000:]}\n"
                             f"{p.stderr[-5000:]}")
    return p


def load_weights(stage_dir):
    return torch.load(os.path.join(stage_dir, "consolidated.00.pth"), weights_only=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory, spm_path):
    """A tiny Meta-format base checkpoint and data files in the published layouts."""
    import shutil
    from checkpoint import save_model
    from model import ModelArgs, Transformer
    root = tmp_path_factory.mktemp("train")
    args = ModelArgs(dim=64, n_layers=4, n_heads=4, vocab_size=320, multiple_of=32, max_seq_len=64)
    m = Transformer(args)
    m.init_weights(seed=0)
    save_model(m, str(root / "base"), format="meta", tokenizer=spm_path)
    shutil.copy(spm_path, root / "tokenizer.model")

    def conv(i):
        msgs = [{"role": "user", "content": f"add {i % 10} plus {(i * 3) % 10}"},
                {"role": "assistant", "content": f"the answer is {(i % 10) + (i * 3) % 10}"}]
        if i % 3 == 0:
            msgs = [{"role": "system", "content": "be brief"}] + msgs
        return {"dataset": "toy", "id": f"c{i}", "messages": msgs}

    with open(root / "sft.jsonl", "w") as f:
        for i in range(48):
            f.write(json.dumps(conv(i)) + "\n")
    with open(root / "trace.json", "w") as f:
        json.dump([{"prompt": f"sort {i} {i + 2} {i + 1} :", "answer": f"{i} {i + 1} {i + 2}"}
                   for i in range(40)], f)
    with open(root / "trace_test.json", "w") as f:
        json.dump([{"prompt": f"sort {i} {i + 2} {i + 1} :", "answer": f"{i} {i + 1} {i + 2}"}
                   for i in range(6)], f)
    with open(root / "dpo.jsonl", "w") as f:
        for i in range(32):
            p = f"which color is {i}?"
            f.write(json.dumps({"prompt": p,
                                "chosen": [{"role": "user", "content": p},
                                           {"role": "assistant", "content": "red"}],
                                "rejected": [{"role": "user", "content": p},
                                             {"role": "assistant", "content": "blue green"}]})
                    + "\n")
    with open(root / "probes.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"question": f"where was {i} born", "answer": "paris"}) + "\n")
    return root


def toml_value(v):
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(v)


def write_cfg(root, name, stages, **over):
    t = {"lr": 1e-3, "warmup_ratio": 0.1, "batch_size": 8, "micro_batch_size": 2, "epochs": 1,
         "max_steps": 0, "grad_clip": 1.0, "precision": "fp32", "weight_decay": 0.1,
         "save_every": 0}
    t.update(over.pop("train", {}))
    h = {"granularity": "category", "ratio": 0.5, "train_embeddings": True}
    h.update(over.pop("hft", {}))
    lines = [f'out_dir = "{root / name}"', "seed = 1", "[model]", f'path = "{root / "base"}"',
             "max_seq_len = 64", "[hft]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in h.items()]
    lines += ["[train]"] + [f"{k} = {json.dumps(v)}" for k, v in t.items()]
    if "probes" in over:
        lines += ["[eval]", f"probes = {json.dumps(over.pop('probes'))}", "max_new_tokens = 4"]
    for s in stages:
        lines.append("[[stages]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in s.items()]
    path = root / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def two_stages(root):
    return [{"name": "sft", "kind": "sft", "train": str(root / "sft.jsonl")},
            {"name": "trace", "kind": "sft", "train": str(root / "trace.json"), "save_every": 2}]


@pytest.fixture(scope="module")
def hft2(world):
    """The reference run: two HFT stages on 2 ranks."""
    cfg = write_cfg(world, "hft2", two_stages(world))
    torchrun(cfg)
    return world / "hft2"


def test_two_stage_hft_freezes_exactly_the_mask(world, hft2):
    base = load_weights(world / "base")
    s1, s2 = load_weights(hft2 / "sft"), load_weights(hft2 / "trace")
    m1 = set(json.load(open(hft2 / "sft" / "mask.json"))["trainable"])
    m2 = set(json.load(open(hft2 / "trace" / "mask.json"))["trainable"])
    assert m1 != m2, "each stage draws its own mask"
    for before, after, mask in ((base, s1, m1), (s1, s2, m2)):
        for name in before:
            if name not in mask:
                assert torch.equal(before[name], after[name]), f"frozen {name} changed"
            else:
                assert not torch.equal(before[name], after[name]), \
                    f"trainable {name} did not change"
    for stage in ("sft", "trace"):
        lines = [json.loads(ln) for ln in open(hft2 / stage / "metrics.jsonl")]
        assert [r["step"] for r in lines] == list(range(1, len(lines) + 1))
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(lines[0])
        assert not (hft2 / stage / "checkpoints").exists()
        assert ((hft2 / stage / "params.json").exists()
                and (hft2 / stage / "tokenizer.model").exists())
    summary = json.load(open(hft2 / "summary.json"))
    assert [s["name"] for s in summary["stages"]] == ["sft", "trace"]
    assert all(s["optimizer_state_bytes"] > 0 for s in summary["stages"])


def test_one_rank_equals_two_ranks(world, hft2):
    cfg = write_cfg(world, "hft1", two_stages(world))
    torchrun(cfg, nproc=1)
    a, b = load_weights(hft2 / "trace"), load_weights(world / "hft1" / "trace")
    # Summation order differs between 1 and 2 ranks; Adam's m/sqrt(v) can turn a last-bit gradient
    # difference on a near-zero gradient into a visible one, so: bitwise-close on average, and no
    # element off by more than 2% of one step's size (lr 1e-3).
    for k in a:
        d = (a[k] - b[k]).abs()
        assert d.max() < 2e-5 and d.mean() < 1e-7, (k, d.max().item(), d.mean().item())
    for stage in ("sft", "trace"):
        la = [json.loads(x)["loss"] for x in open(hft2 / stage / "metrics.jsonl")]
        lb = [json.loads(x)["loss"] for x in open(world / "hft1" / stage / "metrics.jsonl")]
        assert len(la) == len(lb) and max(abs(x - y) for x, y in zip(la, lb)) < 1e-5, (la, lb)


def test_kill9_then_rerun_equals_uninterrupted(world, hft2):
    stages = two_stages(world)
    stages[1]["save_every"] = 1
    cfg = write_cfg(world, "crash", stages)
    # Rank 0 SIGKILLs itself right after optimizer step 4 of the second stage, before saving it.
    p = torchrun(cfg, env={"HFT_FAULT_AT": "trace:4"}, check=False)
    assert p.returncode != 0
    assert (world / "crash" / "sft" / "done.json").exists()
    assert not (world / "crash" / "trace" / "done.json").exists()
    ck = sorted(os.listdir(world / "crash" / "trace" / "checkpoints"))
    assert ck == ["step-00000002", "step-00000003"], ck  # complete ones only, the last two
    # The newest is damaged too (one shard truncated, as a full disk leaves it): the rerun falls
    # back to the one before it, with a warning naming the bad one.
    newest = world / "crash" / "trace" / "checkpoints" / "step-00000003"
    shard = sorted(f for f in os.listdir(newest) if f.endswith(".distcp"))[-1]
    data = (newest / shard).read_bytes()
    (newest / shard).write_bytes(data[:len(data) // 2])
    p = torchrun(cfg)
    assert "stage 'sft' is done" in p.stdout
    assert f"checkpoint {newest} does not load" in p.stdout, p.stdout[-3000:]
    assert "resuming stage 'trace' from step 2/" in p.stdout
    a, b = load_weights(hft2 / "trace"), load_weights(world / "crash" / "trace")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(ln)["step"] for ln in open(world / "crash" / "trace" / "metrics.jsonl")]
    assert steps == list(range(1, len(steps) + 1))


def test_fft_run_with_evals_writes_the_continual_report(world):
    stages = two_stages(world)
    stages[0]["eval"] = [str(world / "trace_test.json")]
    import shutil
    shutil.copy(world / "trace_test.json", world / "trace_test_b.json")
    stages[1]["eval"] = [{"path": str(world / "trace_test_b.json"), "metric": "rouge_l"}]
    cfg = write_cfg(world, "fft", stages, hft={"granularity": "none"},
                    probes=[str(world / "probes.jsonl")])
    torchrun(cfg)
    base, after = load_weights(world / "base"), load_weights(world / "fft" / "sft")
    assert all(not torch.equal(base[k], after[k]) for k in base)
    mask = json.load(open(world / "fft" / "sft" / "mask.json"))
    assert set(mask["trainable"]) == set(base)
    # The matrix: task i = stage i's eval files, scored after every later stage.
    report = json.load(open(world / "fft" / "report.json"))
    ev0 = json.load(open(world / "fft" / "sft" / "eval.json"))
    ev1 = json.load(open(world / "fft" / "trace" / "eval.json"))
    R = report["R"] if "R" in report else report["matrix"]
    assert len(R) == 2 and len(R[1]) == 2
    f, g = str(world / "trace_test.json"), str(world / "trace_test_b.json")
    assert R[0][0] == pytest.approx(ev0["evals"][f]["score"])
    assert R[1][0] == pytest.approx(ev1["evals"][f]["score"])
    assert R[1][1] == pytest.approx(ev1["evals"][g]["score"])
    assert ev1["evals"][f]["metric"] == "accuracy" and ev1["evals"][g]["metric"] == "rouge_l"
    assert (world / "fft" / "report.md").exists() and (world / "fft" / "base_eval.json").exists()
    # Re-running a finished run retrains nothing and rewrites the same report.
    p = torchrun(cfg, nproc=1)
    # The first line says what the run runs on.
    first = p.stdout.splitlines()[0]
    assert first.startswith("hft: world size 1, backend gloo, device cpu (1 threads), compute "
                            "float32 (train.precision = fp32)"), first
    assert "stage 'sft' is done" in p.stdout and "stage 'trace' is done" in p.stdout
    assert json.load(open(world / "fft" / "report.json")) == report


def test_tokens_per_s_counts_tokens_without_padding():
    import train
    ex = lambda n: {"input_ids": list(range(n)), "labels": list(range(n))}  # noqa: E731
    assert train.real_tokens([ex(3), ex(5)]) == 8  # collate pads them to 2 x 5 = 10
    assert train.real_tokens([{"chosen": ex(4), "rejected": ex(7)}]) == 11  # both sides


def _shared_dir_body(paths):
    import torch.distributed as dist

    import train
    try:
        train.check_shared_dir(paths[dist.get_rank()])
    except train.ConfigError as e:
        return str(e)
    return None


def test_out_dir_every_rank_cannot_see_stops_the_run_naming_the_ranks(tmp_path):
    """check_shared_dir: rank 0 writes a token into out_dir, every rank reads it back. Here
    rank 1's out_dir is another directory, as a node without the shared filesystem sees it."""
    from conftest import run_ranks
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (tmp_path / "run1").mkdir(), (tmp_path / "run2").mkdir()  # one process group each
    assert run_ranks(tmp_path / "run1", _shared_dir_body, [str(a), str(a)]) == [None, None]
    assert os.listdir(a) == []  # the token is removed
    errors = run_ranks(tmp_path / "run2", _shared_dir_body, [str(a), str(b)])
    host = socket.gethostname()
    for e in errors:  # every rank stops, each naming its own out_dir and the rank that is blind
        assert f"is not visible from rank 1 on {host}:" in e and "rank 0" not in e, e


def test_bad_data_line_stops_the_stage_before_anything_is_written(world):
    bad = world / "bad.jsonl"
    lines = open(world / "sft.jsonl").read().splitlines()
    lines[6] = lines[6][:-3]
    bad.write_text("\n".join(lines) + "\n")
    stages = two_stages(world)
    stages[1]["train"] = str(bad)
    cfg = write_cfg(world, "badline", stages)
    p = torchrun(cfg, check=False)
    assert p.returncode != 0 and "bad.jsonl" in p.stderr and "line 7" in p.stderr, p.stderr[-2000:]
    assert (world / "badline" / "sft" / "done.json").exists()
    assert not (world / "badline" / "trace").exists()


def test_non_finite_loss_stops_with_the_stage_and_step(world):
    cfg = write_cfg(world, "nan", two_stages(world)[:1], train={"lr": 1e30, "grad_clip": 0.0})
    p = torchrun(cfg, nproc=1, check=False)
    assert p.returncode != 0
    assert "stage 'sft' step" in p.stderr and "non-finite" in p.stderr, p.stderr[-2000:]
    assert not (world / "nan" / "sft" / "done.json").exists()
    assert not (world / "nan" / "sft" / "consolidated.00.pth").exists()


def test_sigterm_saves_a_checkpoint_and_exits(world):
    import time
    stages = two_stages(world)[:1]
    stages[0]["epochs"] = 40
    cfg = write_cfg(world, "term", stages)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           TRAIN, "--config", str(cfg)]
    p = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = world / "term" / "sft" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists()
                                          and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=120)[0]
    assert "SIGTERM: saved a checkpoint" in out, out[-3000:]
    ck = sorted(os.listdir(world / "term" / "sft" / "checkpoints"))
    assert len(ck) == 1 and not (world / "term" / "sft" / "done.json").exists()
    step = int(ck[0].split("-")[1])
    assert 3 <= step < 240
    assert len(metrics.read_text().splitlines()) == step


def test_dpo_stage_starts_at_ln2(world):
    cfg = write_cfg(world, "dpo", [{"name": "dpo", "kind": "dpo", "train": str(world / "dpo.jsonl"),
                                    "lr": 5e-4, "epochs": 2}])
    torchrun(cfg)
    lines = [json.loads(ln) for ln in open(world / "dpo" / "dpo" / "metrics.jsonl")]
    assert abs(lines[0]["loss"] - 0.6931) < 1e-3
    assert {"reward_acc", "reward_margin", "chosen_reward", "rejected_reward"} <= set(lines[0])
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert (world / "dpo" / "dpo" / "ref_logps.pt").exists()


def test_two_nodes_equal_one_node(world, hft2):
    cfg = write_cfg(world, "nodes", two_stages(world)[:1])
    port = free_port()
    procs = []
    for node in range(2):
        args = ["--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}", "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=hfttest"]
        cmd = [sys.executable, "-m", "torch.distributed.run", *args, TRAIN, "--config", str(cfg)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    a, b = load_weights(hft2 / "sft"), load_weights(world / "nodes" / "sft")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_unknown_config_key_is_rejected_before_compute(world, tmp_path):
    cfg = write_cfg(world, "bad", two_stages(world), train={"lrr": 1.0})
    p = torchrun(cfg, nproc=1, check=False)
    assert p.returncode != 0 and "train.lrr" in p.stderr
    assert not (world / "bad").exists()
    cfg = write_cfg(world, "bad2", two_stages(world))
    p = torchrun(cfg, nproc=1, extra=["--hft.granularity", "halves"], check=False)
    assert p.returncode != 0 and "hft.granularity" in p.stderr


def test_config_overrides(world):
    sys.path.insert(0, ROOT)
    import train
    cfg = write_cfg(world, "ov", two_stages(world))
    c = train.load_config(str(cfg), ["--train.lr", "3e-4", "--hft.granularity=none",
                                     "--stages.1.epochs", "2"])
    assert c["stages"][0]["train"]["lr"] == 3e-4 and c["stages"][1]["train"]["epochs"] == 2
    assert c["stages"][0]["train"]["epochs"] == 1 and c["stages"][0]["hft"]["granularity"] == "none"
    with pytest.raises(train.ConfigError, match="stages\\[0\\].bogus"):
        train.load_config(str(cfg), ["--stages.0.bogus", "1"])
    with pytest.raises(train.ConfigError, match="train.batch_size"):
        train.load_config(str(cfg), ["--train.batch_size", "'eight'"])


def test_activation_checkpointing_and_hsdp_match_plain_fsdp(world, hft2):
    # replicate = 2 on 2 ranks: a (replicate, shard) = (2, 1) mesh, i.e. HSDP across two "nodes".
    cfg = write_cfg(world, "hsdp", two_stages(world)[:1],
                    train={"activation_checkpointing": True, "replicate": 2})
    torchrun(cfg)
    a, b = load_weights(hft2 / "sft"), load_weights(world / "hsdp" / "sft")
    for k in a:
        d = (a[k] - b[k]).abs()
        assert d.max() < 2e-5 and d.mean() < 1e-7, (k, d.max().item(), d.mean().item())


def test_parameter_granularity_keeps_frozen_elements_and_exports_hf(world):
    import hft
    from checkpoint import load_model
    from model import Transformer
    stages = two_stages(world)[:1]
    cfg = write_cfg(world, "elem", stages, hft={"granularity": "parameter"},
                    train={"export_format": "hf"})
    torchrun(cfg)
    out = world / "elem" / "sft"
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    base, after = load_model(str(world / "base")), load_model(str(out))
    emask = hft.ElementMask(Transformer(base.args), 0.5, seed=1, stage=0)  # same (seed, stage) draw
    after_p = dict(after.named_parameters())
    for name, p in base.named_parameters():
        if name in emask.masks:
            frozen = emask.masks[name][1]
            assert torch.equal(p[frozen], after_p[name][frozen]), name
            assert not torch.equal(p[~frozen], after_p[name][~frozen]), name


def test_replicate_frozen_matches_sharded_frozen(world, hft2):
    cfg = write_cfg(world, "repfrozen", two_stages(world)[:1], train={"replicate_frozen": True})
    torchrun(cfg)
    base, a, b = (load_weights(world / "base"), load_weights(hft2 / "sft"),
                  load_weights(world / "repfrozen" / "sft"))
    mask = set(json.load(open(world / "repfrozen" / "sft" / "mask.json"))["trainable"])
    for k in a:
        d = (a[k] - b[k]).abs()
        assert d.max() < 2e-5 and d.mean() < 1e-7, (k, d.max().item(), d.mean().item())
        if k not in mask:
            assert torch.equal(base[k], b[k]), k


def test_settings_that_only_make_sense_together_fail_in_load_config(world):
    import train
    stages = two_stages(world)
    stages[0]["eval"] = [str(world / "trace_test.json")]
    cfg = write_cfg(world, "together", stages)
    with pytest.raises(train.ConfigError,
                       match=r"eval.max_new_tokens = 64 .* model.max_seq_len = 64"):
        train.load_config(str(cfg))
    train.load_config(str(cfg), ["--eval.max_new_tokens", "8"])
    with pytest.raises(train.ConfigError, match=r"train.batch_size = 8 is not a multiple of "
                                                r"train.micro_batch_size = 3"):
        train.load_config(str(cfg), ["--eval.max_new_tokens", "8",
                                     "--train.micro_batch_size", "3"])
    p = subprocess.run([sys.executable, TRAIN, "--config", str(cfg)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)  # the command line: exit 2 before anything is built
    assert (p.returncode == 2 and "eval.max_new_tokens" in p.stderr
            and not (world / "together").exists())


def test_a_later_stage_that_does_not_fit_the_world_size_stops_the_run_at_start(world):
    stages = two_stages(world)
    stages[1]["batch_size"] = 6  # a multiple of micro_batch_size = 2, not of 2 x 2 ranks
    cfg = write_cfg(world, "worldfit", stages)
    p = torchrun(cfg, check=False)
    assert p.returncode != 0 and ("stage 'trace': train.batch_size = 6 is not a multiple of "
                                  "train.micro_batch_size x world size = 4") in p.stderr, \
        p.stderr[-2000:]
    assert not (world / "worldfit").exists()  # the first stage did not train


@pytest.mark.parametrize("name", ["..", ".", "a/b", ".hidden", "-x", "x" * 101, "a b"])
def test_stage_names_are_plain_directory_names(world, name):
    import train
    stages = two_stages(world)
    stages[0]["name"] = name
    with pytest.raises(train.ConfigError, match=r"stages\[0\].name must be a unique plain name"):
        train.load_config(str(write_cfg(world, "names", stages)))


def test_a_rerun_with_other_settings_warns_about_each_changed_key(world, one_rank, capsys):
    import train
    cfg = train.load_config(str(write_cfg(world, "rerun", two_stages(world))))
    out = world / "rerun_cfg"
    out.mkdir()
    train.record_config(cfg, str(out))
    assert json.load(open(out / "run_config.json")) == json.loads(json.dumps(cfg))
    capsys.readouterr()
    changed = train.load_config(str(write_cfg(world, "rerun", two_stages(world))),
                                ["--train.lr", "2e-3", "--stages.1.micro_batch_size", "1"])
    train.record_config(changed, str(out))
    warnings = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 4, warnings  # train.lr, the lr of both stages, one micro_batch_size
    assert any("stages.1.train.micro_batch_size = 1 differs from 2" in w for w in warnings)
    assert json.load(open(out / "run_config.json"))["train"]["lr"] == 2e-3


def test_no_loadable_checkpoint_is_an_error_naming_the_stage(one_rank, tiny_ckpt, tmp_path):
    import train
    tcfg = dict(train.DEFAULTS["train"], precision="fp32")
    from checkpoint import CheckpointReader
    model = train.build_model(CheckpointReader(tiny_ckpt), tcfg, None, torch.device("cpu"))
    model.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stage_dir = str(tmp_path / "stage")
    for step in (1, 2):
        train.save_training_checkpoint(stage_dir, step, model, opt, torch.device("cpu"))
    assert train.resume(stage_dir, "s", model, opt, torch.device("cpu")) == 2
    for ckpt in train.checkpoint_dirs(stage_dir):
        for f in os.listdir(ckpt):
            if f.endswith(".distcp"):
                open(os.path.join(ckpt, f), "wb").close()
    with pytest.raises(train.ConfigError, match=r"stage 's': none of its 2 checkpoints .* loads"):
        train.resume(stage_dir, "s", model, opt, torch.device("cpu"))


def test_replay_counts_resume_and_a_changed_file_refused(world):
    """`replay = 0.5` on the second stage mixes 20 of the first stage's examples into its 40; a
    run killed in that stage and rerun equals the uninterrupted one; a training file edited
    between the kill and the rerun is refused, naming it."""
    import shutil
    shutil.copy(world / "trace.json", world / "trace_r.json")
    stages = two_stages(world)
    stages[1].update(train=str(world / "trace_r.json"), replay=0.5, save_every=1)
    ref = write_cfg(world, "replay", stages)
    p = torchrun(ref)
    assert "replay: 20 examples (train.replay = 0.5 x 40) from 'sft' 20" in p.stdout
    done = json.load(open(world / "replay" / "trace" / "done.json"))
    assert (done["examples"], done["replayed"], done["steps"]) == (60, 20, 7)  # 60 // batch 8
    crash = write_cfg(world, "replay_crash", stages)
    assert torchrun(crash, env={"HFT_FAULT_AT": "trace:3"}, check=False).returncode != 0
    original = (world / "trace_r.json").read_bytes()
    (world / "trace_r.json").write_bytes(original.replace(b'"sort 0 2 1 :"', b'"sort 0 1 2 :"'))
    cached = sorted(os.listdir(world / "replay_crash" / "tokenized"))
    p = torchrun(crash, check=False)
    assert p.returncode != 0 and "trace_r.json changed since the stage's checkpoints" in p.stderr, \
        p.stderr[-2000:]
    # refused once hashed: the changed file was not tokenized into a new cache
    assert sorted(os.listdir(world / "replay_crash" / "tokenized")) == cached
    (world / "trace_r.json").write_bytes(original)
    p = torchrun(crash)
    assert "resuming stage 'trace' from step 2/7" in p.stdout
    a, b = load_weights(world / "replay" / "trace"), load_weights(world / "replay_crash" / "trace")
    assert all(torch.equal(a[k], b[k]) for k in a)
