"""HFT's claims, one test each: the selection counts of every granularity, determinism, what
"frozen" means after backward and after AdamW steps across stages, the element-wise mask,
the 7B share (51.9%), and mask.json."""
import json
import os
import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import hft
from model import ModelArgs, Transformer, llama2_args

L = 32
PER_LAYER = {"attention": 4, "feed_forward": 3, "norm": 2}
# Exact totals over 32 layers, worked out by hand: round-half-up(r * n * 32).
EXPECTED = {0.25: {"attention": 32, "feed_forward": 24, "norm": 16},
            0.5: {"attention": 64, "feed_forward": 48, "norm": 32},
            0.75: {"attention": 96, "feed_forward": 72, "norm": 48}}
FLOOR = {0.25: {"attention": 1, "feed_forward": 0, "norm": 0},
         0.5: {"attention": 2, "feed_forward": 1, "norm": 1},
         0.75: {"attention": 3, "feed_forward": 2, "norm": 1}}


@pytest.fixture(scope="module")
def narrow32():
    """A 32-layer LLaMA, 32 wide, on the meta device: real names and shapes, no memory."""
    with torch.device("meta"):
        return Transformer(ModelArgs(dim=32, n_layers=L, n_heads=4, vocab_size=64, multiple_of=16))


def per_layer(names):
    """{(layer, category): count} of the layer tensors in names."""
    counts = Counter()
    for n in names:
        cat, layer = hft._classify(n)
        if layer is not None:
            counts[layer, cat] += 1
    return counts


def tiny_model(tiny_args, seed=0):
    torch.manual_seed(seed)
    m = Transformer(tiny_args)
    m.init_weights(seed)
    return m


def train_steps(model, opt, steps=3, element_mask=None, lr=1e-2, wd=0.1):
    gen = torch.Generator().manual_seed(123)
    for _ in range(steps):
        tokens = torch.randint(0, model.args.vocab_size, (2, 16), generator=gen)
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        if element_mask is not None:
            element_mask.mask_grads()
            element_mask.apply_weight_decay(lr, wd)
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_category_exact_totals_and_per_layer_balance(narrow32, ratio):
    chosen = hft.select_trainable(narrow32, "category", ratio, seed=0, stage=0)
    counts = per_layer(chosen)
    for cat, n in PER_LAYER.items():
        per = [counts[i, cat] for i in range(L)]
        assert sum(per) == EXPECTED[ratio][cat], cat
        assert set(per) <= {FLOOR[ratio][cat], FLOOR[ratio][cat] + 1}, (cat, per)
        plus = [i for i in range(L) if per[i] > FLOOR[ratio][cat]]
        if 0 < len(plus) < L:  # the layers that get one more are drawn, not the first ones
            assert plus != list(range(len(plus))) and plus != list(range(L - len(plus), L)), cat


def test_category_half_is_the_papers_rule(narrow32):
    chosen = hft.select_trainable(narrow32)
    counts = per_layer(chosen)
    assert all(counts[i, "attention"] == 2 for i in range(L))
    assert all(counts[i, "norm"] == 1 for i in range(L))
    ffn = [counts[i, "feed_forward"] for i in range(L)]
    assert ffn.count(2) == 16 and ffn.count(1) == 16
    assert ffn != [2, 1] * 16 and ffn != [1, 2] * 16  # a random half of layers, not an alternation
    # which matrices train varies from layer to layer
    assert len({frozenset(n.split(".")[3] for n in chosen if n.startswith(f"layers.{i}.attention."))
                for i in range(L)}) > 1


@pytest.mark.parametrize("ratio,layers", [(0.25, 8), (0.5, 16), (0.75, 24)])
def test_layer_level_trains_whole_layers(narrow32, ratio, layers):
    counts = per_layer(hft.select_trainable(narrow32, "layer", ratio))
    whole = [i for i in range(L) if all(counts[i, c] == n for c, n in PER_LAYER.items())]
    empty = [i for i in range(L) if all(counts[i, c] == 0 for c in PER_LAYER)]
    assert len(whole) == layers and len(empty) == L - layers
    assert whole != list(range(layers))


@pytest.mark.parametrize("ratio,tensors", [(0.25, 72), (0.5, 144), (0.75, 216)])
def test_model_level_draws_across_the_model(narrow32, ratio, tensors):
    counts = per_layer(hft.select_trainable(narrow32, "model", ratio))
    assert sum(counts.values()) == tensors  # of 9 * 32 = 288
    # no per-layer balance: some layer's attention share differs from r * 4
    assert any(counts[i, "attention"] != round(ratio * 4) for i in range(L))


@pytest.mark.parametrize("granularity", ["parameter", "none"])
def test_parameter_and_none_keep_every_tensor(narrow32, granularity):
    everything = {n for n, _ in narrow32.named_parameters()}
    assert hft.select_trainable(narrow32, granularity, 0.25) == everything


def test_rounding_is_half_up(narrow32):
    # 0.078125 * 32 layers = 2.5 -> 3 (Python's round would give 2); norms 0.0390625 * 64 = 2.5 -> 3
    assert sum(per_layer(hft.select_trainable(narrow32, "layer", 0.078125)).values()) == 3 * 9
    counts = per_layer(hft.select_trainable(narrow32, "category", 0.0390625))
    assert sum(counts[i, "norm"] for i in range(L)) == 3
    assert (hft.select_trainable(narrow32, "category", 1.0)
            == {n for n, _ in narrow32.named_parameters()})


def test_embeddings_switch(narrow32):
    on = hft.select_trainable(narrow32, train_embeddings=True)
    off = hft.select_trainable(narrow32, train_embeddings=False)
    assert {"tok_embeddings.weight", "output.weight", "norm.weight"} <= on
    assert "norm.weight" in off and not {"tok_embeddings.weight", "output.weight"} & off
    assert on - off == {"tok_embeddings.weight", "output.weight"}


def test_draw_depends_on_seed_and_stage_only(narrow32):
    random.seed(1), torch.manual_seed(1)
    state = random.getstate(), torch.get_rng_state()
    a = hft.select_trainable(narrow32, seed=7, stage=2)
    assert random.getstate() == state[0] and torch.equal(torch.get_rng_state(), state[1])
    random.seed(99), torch.manual_seed(99)
    assert hft.select_trainable(narrow32, seed=7, stage=2) == a
    assert hft.select_trainable(narrow32, seed=7, stage=3) != a
    assert hft.select_trainable(narrow32, seed=8, stage=2) != a
    # names behind a wrapper (torch.compile's _orig_mod) are read as Meta names
    wrapper = torch.nn.Module()
    wrapper._orig_mod = narrow32
    assert hft.select_trainable(wrapper, seed=7, stage=2) == a


@pytest.mark.parametrize("granularity,ratio,key",
                         [("random", 0.5, "hft.granularity"), ("category", 0, "hft.ratio"),
                          ("layer", 1.5, "hft.ratio"), ("model", -0.5, "hft.ratio")])
def test_bad_config_names_the_key(narrow32, granularity, ratio, key):
    with pytest.raises(ValueError, match=key):
        hft.select_trainable(narrow32, granularity, ratio)


def test_apply_mask_rejects_unknown_names(tiny_args):
    m = tiny_model(tiny_args)
    with pytest.raises(ValueError, match="layers.9.attention.wq.weight"):
        hft.apply_mask(m, {"layers.0.attention.wq.weight", "layers.9.attention.wq.weight"})


def test_frozen_get_no_grad(tiny_args):
    m = tiny_model(tiny_args)
    trainable = hft.select_trainable(m, seed=3)
    hft.apply_mask(m, trainable)
    m(torch.randint(0, tiny_args.vocab_size, (2, 8))).sum().backward()
    for name, p in m.named_parameters():
        assert (p.grad is not None) == (name in trainable), name


def test_param_groups(tiny_args):
    m = tiny_model(tiny_args)
    hft.apply_mask(m, hft.select_trainable(m))
    groups = hft.param_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decay | no_decay == {n for n, p in m.named_parameters() if p.requires_grad}
    assert {"tok_embeddings.weight", "output.weight"} <= decay
    assert all(n.endswith("norm.weight") for n in no_decay) and "norm.weight" in no_decay
    em = hft.ElementMask(m, 0.5)
    masked = {names[id(p)] for g in hft.param_groups(m, 0.1, em) if g["weight_decay"] == 0
              for p in g["params"]}
    assert {n for n in em.names if dict(m.named_parameters())[n].requires_grad} <= masked


def test_two_stages_leave_frozen_tensors_bitwise_unchanged(tiny_args):
    m = tiny_model(tiny_args)
    masks = [hft.select_trainable(m, seed=0, stage=s) for s in (0, 1)]
    assert masks[0] != masks[1]
    for stage, trainable in enumerate(masks):
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        hft.apply_mask(m, trainable)
        opt = torch.optim.AdamW(hft.param_groups(m, 0.1), lr=1e-2)  # fresh each stage
        train_steps(m, opt)
        for name, p in m.named_parameters():
            if name not in trainable:
                assert torch.equal(p, before[name]), (stage, name)
            elif name.startswith("layers."):
                assert not torch.equal(p, before[name]), (stage, name)
    # the second stage froze tensors the first had trained (and had Adam moments for)
    assert masks[0] - masks[1]


def test_parameter_granularity_masks_elements(tiny_args):
    m = tiny_model(tiny_args)
    hft.apply_mask(m, hft.select_trainable(m, "parameter", 0.5))
    em = hft.ElementMask(m, 0.5, seed=0, stage=0)
    assert em.names == {n for n in dict(m.named_parameters()) if n.startswith("layers.")}
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW(hft.param_groups(m, 0.1, em), lr=1e-2, weight_decay=0.1)
    train_steps(m, opt, steps=4, element_mask=em)
    frozen_total = 0
    for name, (p, frozen) in em.masks.items():
        assert torch.equal(p[frozen], before[name][frozen]), name
        moved = (p[~frozen] != before[name][~frozen]).float().mean()
        assert moved > 0.95, (name, moved)
        frozen_total += int(frozen.sum())
    total = sum(p.numel() for p, _ in em.masks.values())
    assert em.trainable_elements() == total - frozen_total
    assert abs(em.trainable_elements() / total - 0.5) < 0.02
    assert not torch.equal(before["output.weight"], m.output.weight)  # outside the layers: whole
    # same (seed, stage) -> same elements; a new stage -> new ones
    again, other = hft.ElementMask(m, 0.5, 0, 0), hft.ElementMask(m, 0.5, 0, 1)
    name = "layers.0.attention.wq.weight"
    assert torch.equal(again.masks[name][1], em.masks[name][1])
    assert not torch.equal(other.masks[name][1], em.masks[name][1])


def test_7b_default_share():
    with torch.device("meta"):
        m = Transformer(llama2_args("7B"))
    s = hft.make_mask(m)["summary"]
    assert abs(100 * s["total"]["trainable"] / s["total"]["total"] - 51.9) < 0.1
    assert (round(s["total"]["trainable"] / 1e9, 2) == 3.50
            and round(s["total"]["total"] / 1e9, 2) == 6.74)
    assert s["attention"]["fraction"] == 0.5 and s["feed_forward"]["fraction"] == 0.5
    table = hft.format_summary(s)
    assert "51.9" in table and "3,500,281,856" in table


def test_mask_json_round_trip_and_errors(tiny_args, tmp_path):
    m = tiny_model(tiny_args)
    mask = hft.make_mask(m, "category", 0.5, seed=4, stage=1)
    path = tmp_path / "mask.json"
    hft.save_mask(path, mask)
    assert os.listdir(tmp_path) == ["mask.json"]  # no temp file left behind
    loaded = hft.load_mask(path)
    assert (loaded == mask
            and loaded["trainable"] == sorted(hft.select_trainable(m, seed=4, stage=1)))
    bad = tmp_path / "bad.json"
    for text, why in [("{not json", "not valid JSON"),
                      (json.dumps({k: v for k, v in mask.items() if k != "trainable"}),
                       "trainable"),
                      (json.dumps({**mask, "ratio": 2}), "hft.ratio"),
                      (json.dumps({**mask, "trainable": "all"}), "trainable")]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=why) as e:
            hft.load_mask(bad)
        assert str(bad) in str(e.value)


def test_element_mask_on_fsdp_dtensors(tiny_args, tmp_path):
    """ElementMask after fully_shard (single-process gloo group): DTensor params and grads."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        m = tiny_model(tiny_args)
        plain_names = hft.select_trainable(m, seed=5)
        mesh = init_device_mesh("cpu", (1,))
        for layer in m.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
        assert hft.select_trainable(m, seed=5) == plain_names  # FSDP2 keeps the names
        before = {n: p.full_tensor().clone() for n, p in m.named_parameters()}
        em = hft.ElementMask(m, 0.5, seed=0, stage=0)
        # same draw, plain tensors
        ref = hft.ElementMask(tiny_model(tiny_args), 0.5, seed=0, stage=0)
        assert em.trainable_elements() == ref.trainable_elements()
        opt = torch.optim.AdamW(hft.param_groups(m, 0.1, em), lr=1e-2)
        train_steps(m, opt, steps=2, element_mask=em)
        for name, (p, frozen) in ref.masks.items():
            assert type(em.masks[name][0]).__name__ == "DTensor"
            after = dict(m.named_parameters())[name].full_tensor()
            assert torch.equal(after[frozen], before[name][frozen]), name
            assert not torch.equal(after[~frozen], before[name][~frozen]), name
    finally:
        dist.destroy_process_group()


WORKER = r'''
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[3])
import hft
from model import ModelArgs, Transformer
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
rank, world = int(sys.argv[1]), 2
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=world)
# ffn hidden 53: 27 + 26 rows
args = ModelArgs(dim=20, n_layers=2, n_heads=2, vocab_size=64, multiple_of=1)
m = Transformer(args)
m.init_weights(0)
ref = hft.ElementMask(Transformer(args), 0.5, seed=0, stage=0)
mesh = init_device_mesh("cpu", (world,))
for layer in m.layers:
    fully_shard(layer, mesh=mesh)
fully_shard(m, mesh=mesh)
em = hft.ElementMask(m, 0.5, seed=0, stage=0)
for name, (p, frozen) in em.masks.items():
    full = ref.masks[name][1]
    assert torch.equal(frozen, torch.chunk(full, world, 0)[rank]), name
assert em.trainable_elements() == ref.trainable_elements()
dist.destroy_process_group()
print("ok", rank)
'''


def test_element_mask_shards_match_the_full_mask(tmp_path):
    """Two gloo ranks, uneven FSDP2 shards (53 rows): each rank keeps exactly its rows of the
    mask."""
    import subprocess
    import sys
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path / "pg"), root],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"ok {rank}" in out, out[-2000:]


# The pilot: hft.py reset

def two_checkpoints(tmp_path, tiny_args, spm_path, base_fmt, tuned_fmt, dtype=None):
    """A base and a 'tuned' model whose every tensor differs, written in the given formats."""
    from checkpoint import save_model
    for seed, name, fmt in ((1, "base", base_fmt), (2, "tuned", tuned_fmt)):
        m = tiny_model(tiny_args, seed)
        with torch.no_grad():
            for p in m.parameters():  # norms too: init_weights sets them all to 1
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
        save_model(m, tmp_path / name, fmt, spm_path, dtype)
    return tmp_path / "base", tmp_path / "tuned"


def assert_reset(out, base, tuned, reset):
    """Every tensor of `out` equals base's bitwise if it is in `reset`, else tuned's."""
    from checkpoint import CheckpointReader
    o, b, t = CheckpointReader(out), CheckpointReader(base), CheckpointReader(tuned)
    o.validate()
    assert o.keys() == t.keys()
    for name in o.keys():
        got, want, other = o.get(name, None), (b if name in reset else t).get(name, None), \
            (t if name in reset else b).get(name, None)
        assert got.dtype == want.dtype and torch.equal(got, want), name
        assert not torch.equal(got, other), name


@pytest.mark.parametrize("base_fmt,tuned_fmt,out_fmt", [
    ("meta", "meta", None), ("hf", "meta", "hf"), ("meta", "hf", None), ("hf", "hf", "meta")])
def test_reset_half_takes_the_selected_layer_tensors_from_base(tmp_path, tiny_args, spm_path,
                                                               base_fmt, tuned_fmt, out_fmt):
    dtype = torch.bfloat16 if tuned_fmt == "hf" else None  # kept as stored: bf16 stays bf16
    base, tuned = two_checkpoints(tmp_path, tiny_args, spm_path, base_fmt, tuned_fmt, dtype)
    info = hft.reset_half(base, tuned, tmp_path / "out", format=out_fmt)
    want = {n for n in hft.select_trainable(Transformer(tiny_args), "category", 0.5, 0, 0)
            if n.startswith("layers.")}
    assert set(info["reset"]) == want and len(want) == 4 + 3 + 2  # attention, feed-forward, norms
    assert_reset(tmp_path / "out", base, tuned, want)  # embeddings, output, final norm: tuned's
    files = set(os.listdir(tmp_path / "out"))
    assert ("params.json" in files) == ((out_fmt or tuned_fmt) == "meta")
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == \
        (tuned / "tokenizer.model").read_bytes()
    recorded = json.loads((tmp_path / "out" / "reset.json").read_text())
    assert recorded == json.loads(json.dumps(info)) and recorded["reset"] == sorted(want)
    s = recorded["summary"]
    assert s["attention"]["fraction"] == 0.5 and s["norm"]["fraction"] == 0.5
    assert s["embeddings"]["reset"] == s["final_norm"]["reset"] == 0
    assert s["total"]["reset"] == sum(Transformer(tiny_args).get_parameter(n).numel() for n in want)


def test_reset_cli(tmp_path, tiny_args, spm_path):
    """The command as a user types it: layer granularity (one whole layer of two), seed 3, an HF
    checkpoint out of Meta ones."""
    import subprocess
    import sys
    base, tuned = two_checkpoints(tmp_path, tiny_args, spm_path, "meta", "meta")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, os.path.join(root, "hft.py"), "reset",
                          "--base", str(base), "--tuned", str(tuned),
                          "--out", str(tmp_path / "out"), "--ratio", "0.5",
                          "--seed", "3", "--granularity", "layer", "--format", "hf"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    want = {n for n in hft.select_trainable(Transformer(tiny_args), "layer", 0.5, 3, 0)
            if n.startswith("layers.")}
    assert len({n.split(".")[1] for n in want}) == 1 and len(want) == 9  # one whole layer of two
    assert f"{len(want)} tensors" in run.stdout
    assert_reset(tmp_path / "out", base, tuned, want)
    assert {"config.json", "tokenizer.json", "reset.json"} <= set(os.listdir(tmp_path / "out"))


def test_reset_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path, tiny_args, capsys):
    import dataclasses
    from checkpoint import save_model
    save_model(tiny_model(tiny_args), tmp_path / "base")
    save_model(tiny_model(dataclasses.replace(tiny_args, vocab_size=330)), tmp_path / "tuned", "hf")
    with pytest.raises(ValueError, match=r"tok_embeddings\.weight: \S*base has \[320, 64\], "
                                         r"\S*tuned has \[330, 64\]"):
        hft.reset_half(tmp_path / "base", tmp_path / "tuned", tmp_path / "out")
    args = ["reset", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"),
            "--out", str(tmp_path / "out")]
    assert hft.main(args) == 2
    assert "output.weight: " in capsys.readouterr().err and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="granularity 'parameter'"):
        hft.reset_half(tmp_path / "base", tmp_path / "base", tmp_path / "o",
                       granularity="parameter")
