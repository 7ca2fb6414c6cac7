"""checkpoint.py: loading and saving Meta and HF checkpoints (tiny random models written here,
both formats): round trips, shards, config variants, every error, atomic saves, refused pickles,
and the HF export's tokenizer.json."""
import json
import math
import os
import re
import shutil

import pytest
import torch

from checkpoint import (CheckpointError, CheckpointReader, ffn_args_for, load_model,
                        save_checkpoint, save_model)
from conftest import make_spm
from model import ModelArgs, Transformer, llama2_args
from test_model import GQA_ARGS, assert_same_weights, meta_reference_forward, random_model, tokens

# The test's own copy of Meta's model-parallel layout (dim 0: column-parallel, 1: row-parallel).
SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1,
             "tok_embeddings": 1}


def shard_meta(src, dst, n: int):
    """Split a single-file Meta checkpoint into n model-parallel shards, as Meta ships 13B/70B:
    split dims per SPLIT_DIM, norms replicated, a rope.freqs entry in each, vocab_size -1."""
    os.makedirs(dst)
    sd = torch.load(os.path.join(src, "consolidated.00.pth"), weights_only=True)
    for i in range(n):
        part = {}
        for name, t in sd.items():
            d = SPLIT_DIM.get(name.split(".")[-2])
            part[name] = t.clone() if d is None else t.chunk(n, dim=d)[i].clone()
        part["rope.freqs"] = torch.rand(8)
        torch.save(part, os.path.join(dst, f"consolidated.{i:02d}.pth"))
    params = json.load(open(os.path.join(src, "params.json")))
    json.dump(dict(params, vocab_size=-1), open(os.path.join(dst, "params.json"), "w"))
    for extra in ("tokenizer.model",):
        if os.path.exists(os.path.join(src, extra)):
            shutil.copy(os.path.join(src, extra), dst)


# The architecture


def test_meta_hf_round_trips_give_identical_logits(tmp_path, tiny_args, spm_path):
    model = random_model(tiny_args)
    toks = tokens(tiny_args)
    with torch.no_grad():
        want = model(toks)
    save_model(model, tmp_path / "meta", tokenizer=spm_path)
    assert sorted(os.listdir(tmp_path / "meta")) == ["consolidated.00.pth", "params.json",
                                                     "tokenizer.model"]
    from_meta = load_model(tmp_path / "meta", max_seq_len=tiny_args.max_seq_len)
    save_model(from_meta, tmp_path / "hf", format="hf", tokenizer=spm_path)
    assert {"config.json", "model.safetensors", "tokenizer.model",
            "tokenizer_config.json"} <= set(os.listdir(tmp_path / "hf"))
    from_hf = load_model(tmp_path / "hf")
    save_model(from_hf, tmp_path / "meta2", format="meta")
    back = load_model(tmp_path / "meta2", max_seq_len=tiny_args.max_seq_len)
    for m in (from_meta, from_hf, back):
        assert_same_weights(m, model)
        with torch.no_grad():
            assert torch.equal(m(toks), want)
    # HF stores q/k rows permuted for its rotate-half rotary: the file must differ from Meta's.
    from safetensors import safe_open
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        hf_q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        assert not torch.equal(hf_q, model.layers[0].attention.wq.weight.detach())
        assert torch.equal(f.get_tensor("model.layers.0.self_attn.v_proj.weight"),
                           model.layers[0].attention.wv.weight.detach())


def test_hf_permutation_turns_meta_rotary_into_rotate_half():
    """The q/k rows we write for HF, rotated HF's way (halves), give Meta's attention scores."""
    from checkpoint import hf_permute, hf_unpermute
    n_heads, n_kv, hd, dim, T = 4, 2, 16, 64, 9
    torch.manual_seed(0)
    wq, wk, x = torch.randn(n_heads * hd, dim), torch.randn(n_kv * hd, dim), torch.randn(T, dim)
    angles = torch.outer(torch.arange(T).float(),
                         1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd)))

    def meta_rotary(t):  # consecutive pairs as complex numbers
        tc = torch.view_as_complex(t.reshape(T, -1, hd // 2, 2))
        return torch.view_as_real(
            tc * torch.polar(torch.ones_like(angles), angles)[:, None]).flatten(2)

    def hf_rotary(t):  # transformers' rotate_half
        t = t.view(T, -1, hd)
        cos, sin = (torch.cat([angles, angles], -1).cos()[:, None],
                    torch.cat([angles, angles], -1).sin()[:, None])
        return t * cos + torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1) * sin

    def scores(q, k):
        k = k.repeat_interleave(n_heads // n_kv, dim=1)
        return torch.einsum("thd,shd->hts", q, k)
    meta = scores(meta_rotary(x @ wq.T), meta_rotary(x @ wk.T))
    hf = scores(hf_rotary(x @ hf_permute(wq, n_heads).T), hf_rotary(x @ hf_permute(wk, n_kv).T))
    assert (meta - hf).abs().max() < 1e-3 * meta.abs().max()
    assert torch.equal(hf_unpermute(hf_permute(wq, n_heads), n_heads), wq)


def test_sharded_hf_checkpoint_with_index(tmp_path, tiny_args):
    model = random_model(tiny_args)
    save_model(model, tmp_path / "hf", format="hf", max_shard_bytes=40_000)
    files = os.listdir(tmp_path / "hf")
    assert "model.safetensors.index.json" in files
    assert len([f for f in files if f.endswith(".safetensors")]) > 2
    assert_same_weights(load_model(tmp_path / "hf"), model)


@pytest.mark.parametrize("n, extra", [(2, GQA_ARGS), (8, dict(n_heads=8))])
def test_meta_shards_equal_single_file(tmp_path, tiny_args, spm_path, n, extra):
    args = ModelArgs(**{**tiny_args.__dict__, **extra})
    model = random_model(args)
    save_model(model, tmp_path / "one", tokenizer=spm_path)
    shard_meta(tmp_path / "one", tmp_path / "many", n)
    assert len([f for f in os.listdir(tmp_path / "many") if f.endswith(".pth")]) == n
    reader = CheckpointReader(tmp_path / "many")
    reader.validate()
    assert reader.format == "meta" and reader.args.vocab_size == 320  # -1 resolved
    assert reader.keys() == [name for name, _ in model.named_parameters()]
    assert torch.equal(reader.get("layers.1.feed_forward.w2.weight"),
                       model.layers[1].feed_forward.w2.weight)
    loaded = load_model(tmp_path / "many", max_seq_len=args.max_seq_len)
    assert_same_weights(loaded, load_model(tmp_path / "one", max_seq_len=args.max_seq_len))
    assert_same_weights(loaded, model)


def test_gqa_ffn_multiplier_rope_theta_config(tmp_path, spm_path):
    args = ModelArgs(**GQA_ARGS)
    assert args.ffn_hidden_dim == 224  # int(1.3 * 170) = 221, rounded up to 32
    model = random_model(args)
    toks = tokens(args, length=30)
    with torch.no_grad():
        want = meta_reference_forward(model.state_dict(), args, toks)
    for fmt in ("meta", "hf"):
        save_model(model, tmp_path / fmt, format=fmt, tokenizer=spm_path)
        loaded = load_model(tmp_path / fmt, max_seq_len=64)
        assert loaded.args.n_kv_heads == 2 and loaded.args.rope_theta == 500000.0
        assert loaded.args.ffn_hidden_dim == 224
        with torch.no_grad():
            assert (loaded(toks) - want).abs().max() < 1e-5
    params = json.load(open(tmp_path / "meta" / "params.json"))
    assert (params["n_kv_heads"] == 2 and params["ffn_dim_multiplier"] == 1.3
            and "max_seq_len" not in params)
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert config["intermediate_size"] == 224 and config["num_key_value_heads"] == 2
    assert config["rope_theta"] == 500000.0 and config["architectures"] == ["LlamaForCausalLM"]


def test_bf16_shards_load_as_float32(tmp_path, tiny_args):
    model = random_model(tiny_args)
    save_model(model, tmp_path / "bf16", dtype=torch.bfloat16)
    shard_meta(tmp_path / "bf16", tmp_path / "shards", 2)
    sd = torch.load(tmp_path / "shards" / "consolidated.01.pth", weights_only=True)
    assert sd["output.weight"].dtype == torch.bfloat16
    loaded = load_model(tmp_path / "shards")
    for name, p in loaded.named_parameters():
        assert p.dtype == torch.float32
        assert torch.equal(p, model.get_parameter(name).detach().bfloat16().float()), name
    assert loaded.rope.dtype == torch.float32
    as_bf16 = load_model(tmp_path / "shards", dtype=torch.bfloat16)
    assert as_bf16.output.weight.dtype == torch.bfloat16 and as_bf16.rope.dtype == torch.float32


def test_save_keeps_dtype_unless_asked(tmp_path, tiny_args):
    model = random_model(tiny_args).to(torch.bfloat16)
    save_model(model, tmp_path / "hf", format="hf")
    assert json.load(open(tmp_path / "hf" / "config.json"))["torch_dtype"] == "bfloat16"
    save_model(model, tmp_path / "meta", dtype=torch.float32)
    sd = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    assert all(t.dtype == torch.float32 for t in sd.values())


def test_max_seq_len_default_and_override(tmp_path, tiny_args):
    model = random_model(tiny_args)
    save_model(model, tmp_path / "meta")
    save_model(model, tmp_path / "hf", format="hf")
    assert load_model(tmp_path / "meta").args.max_seq_len == 4096  # LLaMA-2's, not in params.json
    assert load_model(tmp_path / "meta", max_seq_len=128).rope.shape[0] == 256
    # max_position_embeddings
    assert load_model(tmp_path / "hf").args.max_seq_len == tiny_args.max_seq_len
    assert CheckpointReader(tmp_path / "hf", max_seq_len=100).args.max_seq_len == 100


def test_reader_gets_one_unpermuted_tensor_in_the_requested_dtype(tmp_path, tiny_args):
    model = random_model(ModelArgs(**GQA_ARGS))
    save_model(model, tmp_path / "hf", format="hf")
    reader = CheckpointReader(tmp_path / "hf")
    assert reader.format == "hf" and reader.args.n_kv_heads == 2
    wk = reader.get("layers.0.attention.wk.weight", dtype=torch.bfloat16)
    assert wk.dtype == torch.bfloat16
    assert torch.equal(wk, model.layers[0].attention.wk.weight.detach().bfloat16())


def test_ffn_rule_is_recovered_from_intermediate_size():
    for size, (multiple_of, mult) in {"7B": (256, None), "13B": (256, None),
                                      "70B": (4096, 1.3)}.items():
        meta = llama2_args(size)
        got = ffn_args_for(llama2_args(size, multiple_of=1), meta.ffn_hidden_dim)
        assert (got.multiple_of, got.ffn_dim_multiplier) == (multiple_of, mult), size
    # Any intermediate_size: either reproduced exactly, or a clear error (never a silent misfit).
    args, errors = ModelArgs(dim=64, n_heads=4), 0
    for hidden in range(100, 400):
        try:
            assert ffn_args_for(args, hidden).ffn_hidden_dim == hidden
        except CheckpointError as e:
            assert f"intermediate_size={hidden}" in str(e)
            errors += 1
    assert 0 < errors < 100


def test_hf_config_variants(tmp_path, tiny_args):
    save_model(random_model(tiny_args), tmp_path / "hf", format="hf")
    cfg_file = tmp_path / "hf" / "config.json"
    cfg = json.load(open(cfg_file))
    # transformers 5 writes rope_parameters instead of rope_theta
    v5 = {k: v for k, v in cfg.items() if k not in ("rope_theta", "rope_scaling")}
    json.dump(dict(v5, rope_parameters={"rope_theta": 1234.0, "rope_type": "default"}),
              open(cfg_file, "w"))
    assert CheckpointReader(tmp_path / "hf").args.rope_theta == 1234.0
    for bad, match in ((dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope scaling"),
                       (dict(model_type="mistral"), "mistral"),
                       (dict(attention_bias=True), "attention_bias")):
        json.dump({**cfg, **bad}, open(cfg_file, "w"))
        with pytest.raises(CheckpointError, match=match):
            CheckpointReader(tmp_path / "hf")


# Errors

@pytest.fixture
def meta_dir(tmp_path, tiny_args):
    save_model(random_model(tiny_args), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _edit_state(meta_dir, edit):
    file = meta_dir / "consolidated.00.pth"
    sd = torch.load(file, weights_only=True)
    edit(sd)
    torch.save(sd, file)


def test_error_missing_params_json(meta_dir):
    os.remove(meta_dir / "params.json")
    with pytest.raises(CheckpointError, match="params.json is missing"):
        load_model(meta_dir)


def test_error_missing_consolidated_files(tmp_path, meta_dir):
    os.remove(meta_dir / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=r"no consolidated\.\*\.pth"):
        load_model(meta_dir)
    shard_dir = tmp_path / "shards"
    save_model(random_model(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=320)),
               tmp_path / "one")
    shard_meta(tmp_path / "one", shard_dir, 4)
    os.remove(shard_dir / "consolidated.02.pth")
    with pytest.raises(CheckpointError, match=r"consolidated\.02\.pth"):
        load_model(shard_dir)


def test_error_unknown_format_and_no_directory(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="unknown checkpoint format.*weights.bin"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_model(tmp_path / "nope")


def test_error_missing_key(meta_dir):
    _edit_state(meta_dir, lambda sd: sd.pop("layers.1.feed_forward.w3.weight"))
    with pytest.raises(CheckpointError,
                       match=r"missing keys \(1\): layers\.1\.feed_forward\.w3\.weight"):
        load_model(meta_dir)


def test_error_unexpected_key(meta_dir):
    _edit_state(meta_dir, lambda sd: sd.update({"layers.0.attention.wq.bias": torch.zeros(64)}))
    with pytest.raises(CheckpointError,
                       match=r"unexpected keys \(1\): layers\.0\.attention\.wq\.bias"):
        load_model(meta_dir)


def test_error_shape_mismatch_names_tensor_shapes_and_file(meta_dir):
    _edit_state(meta_dir,
                lambda sd: sd.update({"layers.0.attention.wq.weight": torch.zeros(64, 32)}))
    with pytest.raises(CheckpointError) as e:
        load_model(meta_dir)
    msg = str(e.value)
    assert "layers.0.attention.wq.weight" in msg and "[64, 32]" in msg and "[64, 64]" in msg
    assert "consolidated.00.pth" in msg


def test_hf_errors_name_hf_keys_and_files(tmp_path, tiny_args):
    from safetensors.torch import load_file, save_file
    save_model(random_model(tiny_args), tmp_path / "hf", format="hf")
    file = str(tmp_path / "hf" / "model.safetensors")
    sd = load_file(file)
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(192, 60)
    del sd["model.norm.weight"]
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(sd, file)
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "hf")
    msg = str(e.value)
    assert "missing keys (1): norm.weight" in msg
    assert "unexpected keys (1): model.layers.0.self_attn.q_proj.bias" in msg
    assert ("layers.1.feed_forward.w3.weight: shape [192, 60] in model.safetensors" in msg
            and "[192, 64]" in msg)


def test_error_tokenizer_does_not_match_embedding(tmp_path, meta_dir):
    big = make_spm(str(tmp_path / "big"), vocab_size=400)
    shutil.copy(big, meta_dir / "tokenizer.model")
    with pytest.raises(CheckpointError,
                       match="tokenizer has 400 pieces but the embedding has 320 rows"):
        load_model(meta_dir)
    with pytest.raises(CheckpointError, match="400 pieces, but vocab_size is 320"):
        save_model(Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=320)),
                   tmp_path / "out", tokenizer=big)
    (tmp_path / "junk.model").write_bytes(b"not a protobuf")
    with pytest.raises(CheckpointError, match=r"junk\.model: not a SentencePiece model"):
        save_model(Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=320)),
                   tmp_path / "out", tokenizer=tmp_path / "junk.model")
    assert not (tmp_path / "out").exists()


class Payload:
    """Unpickling this creates a file: stands in for any code a malicious checkpoint runs."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_that_would_run_code_is_refused(tmp_path, meta_dir):
    marker = tmp_path / "pwned"
    torch.save({"tok_embeddings.weight": Payload(str(marker))}, meta_dir / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="refused"):
        load_model(meta_dir)
    assert not marker.exists()
    # The payload is live: unpickling it without the weights_only guard runs it.
    import pickle
    pickle.loads(pickle.dumps(Payload(str(marker)))).close()
    assert marker.exists()


def _snapshot(d):
    return {f: (d / f).read_bytes() for f in sorted(os.listdir(d))}


@pytest.mark.parametrize("fmt", ["meta", "hf"])
def test_save_is_atomic(tmp_path, tiny_args, monkeypatch, fmt):
    old, new = random_model(tiny_args, seed=1), random_model(tiny_args, seed=2)
    dest = tmp_path / "ckpt"
    save_model(old, dest, format=fmt)
    before = _snapshot(dest)

    def fail(obj, f, *a, **k):  # half a file, then the disk fills up
        with open(f, "wb") as out:
            out.write(b"partial")
        raise OSError("No space left on device")
    if fmt == "meta":
        monkeypatch.setattr(torch, "save", fail)
    else:
        import safetensors.torch
        monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError, match="No space"):
        save_model(new, dest, format=fmt)
    assert _snapshot(dest) == before
    assert os.listdir(tmp_path) == ["ckpt"]  # no temporary directory left behind
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(dest).st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700
    monkeypatch.undo()
    assert_same_weights(load_model(dest), old)
    save_model(new, dest, format=fmt)  # a complete save does replace it
    assert_same_weights(load_model(dest), new)
    assert os.listdir(tmp_path) == ["ckpt"]


def test_failed_final_rename_keeps_the_old_checkpoint(tmp_path, tiny_args, monkeypatch):
    old = random_model(tiny_args, seed=1)
    dest = tmp_path / "ckpt"
    save_model(old, dest)
    before = _snapshot(dest)
    rename = os.rename

    def flaky(src, dst):  # the new directory cannot be moved into place
        if ".tmp-" in str(src):
            raise OSError("rename failed")
        return rename(src, dst)
    monkeypatch.setattr(os, "rename", flaky)
    with pytest.raises(OSError, match="rename failed"):
        save_model(random_model(tiny_args, seed=2), dest)
    assert _snapshot(dest) == before and os.listdir(tmp_path) == ["ckpt"]


def test_replace_dir_flushes_every_file_before_the_rename(tmp_path, monkeypatch):
    """Whoever wrote the directory (save_checkpoint, the trainer's step checkpoints, the data
    cache), each file in it is on disk before `dest` can be seen."""
    import checkpoint
    new, dest = tmp_path / "new", tmp_path / "dest"
    (new / "sub").mkdir(parents=True)
    for name in ("a.json", "sub/b.npy"):
        (new / name).write_text(name)
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    synced, fsync = {}, checkpoint.fsync

    def recording(path):  # path -> whether the new dest was visible when it was synced
        synced[os.path.relpath(path, tmp_path)] = (dest / "a.json").exists()
        fsync(path)
    monkeypatch.setattr(checkpoint, "fsync", recording)
    checkpoint.replace_dir(new, dest)
    assert sorted(os.listdir(dest)) == ["a.json", "sub"] and os.listdir(tmp_path) == ["dest"]
    assert synced == {"new": False, "new/a.json": False, "new/sub": False,
                      "new/sub/b.npy": False, ".": True}


def test_atomic_file_keeps_the_old_file_and_writes_utf8_in_any_locale(tmp_path):
    """The one file writer the project uses: a write that fails midway leaves the old file and
    no temporary; a complete one replaces it with the umask's permissions, in UTF-8 even where
    the locale is ASCII (write_json keeps non-ASCII text raw, as JSON files are UTF-8)."""
    import subprocess
    import sys
    from checkpoint import atomic_file, write_json
    path = tmp_path / "report.json"
    write_json(path, {"old": 1})
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_file(path) as f:
            f.write('{"half": ')
            raise RuntimeError("killed midway")
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["report.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
    text = "café ▁ 日本語"
    # An ASCII script (argv would be decoded as ASCII too): the text arrives as \u escapes.
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import checkpoint; "
              "from pathlib import Path; obj = {'t': %s}; checkpoint.write_json(sys.argv[2], obj); "
              "assert checkpoint._read_json(Path(sys.argv[2])) == obj" % ascii(text))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    run = subprocess.run([sys.executable, "-c", script, root, str(path)], env=env,
                         capture_output=True, text=True, errors="replace", timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert path.read_bytes() == f'{{\n  "t": "{text}"\n}}\n'.encode("utf-8")


def test_save_checkpoint_from_a_plain_state_dict(tmp_path, tiny_args):
    model = random_model(tiny_args)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_checkpoint(state, tiny_args, tmp_path / "ckpt", format="hf")
    assert_same_weights(load_model(tmp_path / "ckpt"), model)
    del state["norm.weight"]
    with pytest.raises(CheckpointError, match="norm.weight"):
        save_checkpoint(state, tiny_args, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


# tokenizer.json (the HF export's fast tokenizer)

TOKENIZER_TEXTS = [
    "the river city was born", "paris is a city on the river " * 4, " leading space", "trailing ",
    "two  spaces   three    four", " ", "  ", "\n", "a\nb\n\n\nc", "\t tab\tand\r\nwindows",
    "0123456789 and 42 + 7 = 49", "café, naïve, 日本語, emoji 🙂 and ▁ itself", "▁x",
    "<|user|>\nwhere is paris\n<|assistant|>\nparis is a city</s>\n<|user|>\nand london?\n",
    "answer</s> after the end", "", "ore, more ore",
    "the assistant's reply: def sort(x): return x[::-1]",
]


def demote_piece(model_file, piece: str, score: float, out_file):
    """A copy of a SentencePiece model with one piece's score changed in place (its fixed32
    field keeps its size): scores out of id order, which SentencePiece follows."""
    import struct
    raw = bytearray(open(model_file, "rb").read())
    key = b"\x0a" + bytes([len(piece.encode())]) + piece.encode() + b"\x15"
    at = raw.index(key) + len(key)
    raw[at:at + 4] = struct.pack("<f", score)
    with open(out_file, "wb") as f:
        f.write(raw)
    return str(out_file)


@pytest.fixture(scope="module")
def bpe_spm(tmp_path_factory):
    """512 pieces (about 200 merges) with one merge ("re", third by id) demoted to score -1e9:
    SentencePiece ranks merges by score, not id, and tokenizer.json must follow ("ore" then
    splits as "or" "e", not "o" "re")."""
    d = tmp_path_factory.mktemp("bpe_spm")
    return demote_piece(make_spm(str(d / "orig"), vocab_size=512), "re", -1e9,
                        d / "tokenizer.model")


def export_tokenizer(tmp_path, tokenizer, name="hf"):
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=512, multiple_of=32, max_seq_len=64)
    save_model(random_model(args), tmp_path / name, format="hf", tokenizer=tokenizer)
    return tmp_path / name


def bpe_encode(tj: dict, text: str) -> list[int]:
    """tokenizer.json applied by hand, as the `tokenizers` library applies this layout: special
    tokens split out, each stretch between them normalised, merged pair by pair (lowest rank,
    then leftmost), characters outside the vocabulary as their UTF-8 byte pieces."""
    vocab, model = tj["model"]["vocab"], tj["model"]
    assert model["type"] == "BPE" and model["byte_fallback"] and tj["pre_tokenizer"] is None
    rank = {tuple(m.split(" ") if isinstance(m, str) else m): r
            for r, m in enumerate(model["merges"])}
    special = {t["content"]: t["id"] for t in tj["added_tokens"] if t["special"]}
    ids = [tj["post_processor"]["special_tokens"][x["SpecialToken"]["id"]]["ids"][0]
           for x in tj["post_processor"]["single"] if "SpecialToken" in x]
    for chunk in re.split("(" + "|".join(map(re.escape, special)) + ")", text):
        if chunk in special:
            ids.append(special[chunk])
            continue
        for n in tj["normalizer"]["normalizers"] if chunk else []:
            if n["type"] == "Prepend":
                chunk = n["prepend"] + chunk
            else:
                assert n["type"] == "Replace", n
                chunk = chunk.replace(n["pattern"]["String"], n["content"])
        syms = list(chunk)
        while len(syms) > 1:
            r, i = min((rank.get(pair, math.inf), i) for i, pair in enumerate(zip(syms, syms[1:])))
            if r == math.inf:
                break
            syms[i:i + 2] = [syms[i] + syms[i + 1]]
        for s in syms:
            ids += [vocab[s]] if s in vocab else [vocab[f"<0x{b:02X}>"] for b in s.encode()]
    return ids


def test_hf_export_tokenizer_json_encodes_as_tokenizer_model(tmp_path, bpe_spm):
    """Checked in CI without the `tokenizers` package: the file's normalizer, merges, byte
    fallback, special tokens and <s> reproduce data.Tokenizer (SentencePiece, with "</s>" as
    the eos id, as HF's LlamaTokenizer reads it) on every text."""
    import data
    out = export_tokenizer(tmp_path, bpe_spm)
    assert {"tokenizer.json", "special_tokens_map.json", "tokenizer_config.json"} <= \
        set(os.listdir(out))
    tj = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    tok = data.Tokenizer(bpe_spm)
    assert tj["model"]["vocab"] == {tok.sp_model.id_to_piece(i): i for i in range(tok.n_words)}
    assert tj["model"]["merges"][-1] == "r e"  # the demoted piece's merge ranks last
    for text in TOKENIZER_TEXTS:
        assert bpe_encode(tj, text) == tok.encode(text, bos=True, eos=False), text
    assert [t["content"] for t in tj["added_tokens"]] == ["<unk>", "<s>", "</s>"]
    assert json.loads((out / "special_tokens_map.json").read_text()) == \
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "LlamaTokenizer" and cfg["legacy"] is True


def test_tokenizers_library_reads_our_tokenizer_json(tmp_path, bpe_spm):
    tokenizers = pytest.importorskip("tokenizers")
    import data
    fast = tokenizers.Tokenizer.from_file(str(export_tokenizer(tmp_path, bpe_spm)
                                              / "tokenizer.json"))
    tok = data.Tokenizer(bpe_spm)
    for text in TOKENIZER_TEXTS:
        ids = tok.encode(text, bos=True, eos=False)
        assert fast.encode(text).ids == ids, text
        assert fast.decode(ids[1:]) == tok.decode(ids[1:]), text


def test_hf_export_copies_the_source_tokenizer_json(tmp_path, bpe_spm):
    """An HF source's own tokenizer.json (here one with an extra, distinctive merge order) and
    special_tokens_map.json travel with its tokenizer.model, byte for byte."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(bpe_spm, src / "tokenizer.model")
    from checkpoint import hf_tokenizer_json
    theirs = hf_tokenizer_json(bpe_spm)
    theirs["model"]["merges"].reverse()
    (src / "tokenizer.json").write_text(json.dumps(theirs, indent=1), encoding="utf-8")
    (src / "special_tokens_map.json").write_text('{"bos_token": "<s>", "pad_token": "</s>"}')
    out = export_tokenizer(tmp_path, src / "tokenizer.model")
    for name in ("tokenizer.json", "special_tokens_map.json", "tokenizer.model"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    theirs["added_tokens"].append({"id": 512, "content": "<pad>", "special": True})
    (src / "tokenizer.json").write_text(json.dumps(theirs))
    with pytest.raises(CheckpointError, match=r"src/tokenizer\.json: has token id 512, but the "
                                              r"embedding has 512 rows"):
        export_tokenizer(tmp_path, src / "tokenizer.model", name="bad")
    assert not (tmp_path / "bad").exists()


def test_tokenizer_json_skipped_with_a_warning_for_another_layout(tmp_path):
    """A unigram model (not LLaMA's BPE layout) cannot be written as this tokenizer.json: the
    export goes without it, saying so, rather than shipping a file that tokenizes differently."""
    import sentencepiece as spm
    lines = [f"{w} and {w}s" for w in ("apple", "banana", "river", "city", "paris", "london")] * 50
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines),
                                   model_prefix=str(tmp_path / "uni"), vocab_size=24,
                                   model_type="unigram", minloglevel=2, num_threads=1)
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=24, multiple_of=32, max_seq_len=64)
    with pytest.warns(UserWarning,
                      match=r"uni\.model: not in LLaMA's SentencePiece layout \(lacks: "
                            r"a BPE model, byte fallback.*no tokenizer\.json"):
        save_model(random_model(args), tmp_path / "hf", format="hf",
                   tokenizer=tmp_path / "uni.model")
    assert {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"} <= \
        set(os.listdir(tmp_path / "hf")) and not (tmp_path / "hf" / "tokenizer.json").exists()


# transformers itself (skipped where it is not installed; the project does not depend on it)

def test_transformers_reads_our_export_and_we_read_theirs(tmp_path, spm_path):
    transformers = pytest.importorskip("transformers")
    args = ModelArgs(**GQA_ARGS)
    model = random_model(args)
    save_model(model, tmp_path / "ours", format="hf", tokenizer=spm_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").float().eval()
    toks = tokens(args, length=40)
    with torch.no_grad():
        assert (hf(toks).logits - model(toks)).abs().max() < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours")
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=spm_path)
    assert tok("the river city was born")["input_ids"] == [1] + sp.encode("the river city was born")

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=4, vocab_size=320,
                                   rope_theta=20000.0, max_position_embeddings=128,
                                   rms_norm_eps=1e-5)
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.mul_(5) if "norm" not in name else p.add_(0.1 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "theirs", safe_serialization=True)
    ours = load_model(tmp_path / "theirs")
    assert ours.args.ffn_hidden_dim == 176 and ours.args.max_seq_len == 128
    with torch.no_grad():
        assert (theirs(toks).logits - ours(toks)).abs().max() < 1e-4


def test_transformers_autotokenizer_reads_the_export_as_tokenizer_model(tmp_path, bpe_spm):
    """Without protobuf too (it reads tokenizer.json). transformers 5's LlamaTokenizer builds its
    own "▁" prefix (Metaspace), which skips it where a stretch of text already starts with a
    space or "▁"; SentencePiece does not. Those texts are left out here, not elsewhere."""
    transformers = pytest.importorskip("transformers")
    import data
    hf = transformers.AutoTokenizer.from_pretrained(export_tokenizer(tmp_path, bpe_spm))
    tok = data.Tokenizer(bpe_spm)
    texts = [t for t in TOKENIZER_TEXTS if not re.search("(^|</s>)[ ▁]", t)]
    assert len(texts) >= 12
    for text in texts:
        assert hf(text)["input_ids"] == tok.encode(text, bos=True, eos=False), text
