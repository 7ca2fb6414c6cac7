"""model.py: the LLaMA-2 forward against an independent Meta-style reference, KV-cache decoding,
the published sizes, meta-device builds and bf16 casts (tiny random models built here)."""
import math

import pytest
import torch
import torch.nn.functional as F

from model import ModelArgs, Transformer, llama2_args

GQA_ARGS = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=320, multiple_of=32,
                ffn_dim_multiplier=1.3, rope_theta=500000.0, max_seq_len=64)


def random_model(args: ModelArgs, seed: int = 0) -> Transformer:
    """Weights large enough for sharp attention, norms away from one: a wrong rotary
    convention, head order or norm placement then changes the logits visibly."""
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model


def tokens(args, batch=2, length=24, seed=1):
    return torch.randint(0, args.vocab_size, (batch, length),
                         generator=torch.Generator().manual_seed(seed))


def meta_reference_forward(sd: dict, args: ModelArgs, toks: torch.Tensor) -> torch.Tensor:
    """Meta's llama/model.py transcribed on a state dict: complex rotary (polar), repeat_kv,
    explicit softmax attention with a -inf causal mask. Shares no code with model.py."""
    B, T = toks.shape
    hd, n_rep = args.dim // args.n_heads, args.n_heads // args.n_kv_heads
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    freqs_cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + args.norm_eps) * w

    def rotary(x):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis.view(1, T, 1, hd // 2)).flatten(3)

    def repeat_kv(x):
        b, s, n_kv, d = x.shape
        return x[:, :, :, None, :].expand(b, s, n_kv, n_rep, d).reshape(b, s, n_kv * n_rep, d)

    mask = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
    h = sd["tok_embeddings.weight"][toks]
    for i in range(args.n_layers):
        w = {k[len(f"layers.{i}."):]: v for k, v in sd.items() if k.startswith(f"layers.{i}.")}
        x = rms(h, w["attention_norm.weight"])
        q = (x @ w["attention.wq.weight"].T).view(B, T, args.n_heads, hd)
        k = (x @ w["attention.wk.weight"].T).view(B, T, args.n_kv_heads, hd)
        v = (x @ w["attention.wv.weight"].T).view(B, T, args.n_kv_heads, hd)
        q, k = rotary(q), rotary(k)
        q, k, v = q.transpose(1, 2), repeat_kv(k).transpose(1, 2), repeat_kv(v).transpose(1, 2)
        scores = F.softmax(q @ k.transpose(2, 3) / math.sqrt(hd) + mask, dim=-1)
        h = h + (scores @ v).transpose(1, 2).reshape(B, T, -1) @ w["attention.wo.weight"].T
        x = rms(h, w["ffn_norm.weight"])
        ffn = (F.silu(x @ w["feed_forward.w1.weight"].T) * (x @ w["feed_forward.w3.weight"].T))
        h = h + ffn @ w["feed_forward.w2.weight"].T
    return rms(h, sd["norm.weight"]) @ sd["output.weight"].T


def assert_same_weights(a: Transformer, b: Transformer):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("extra", [{}, GQA_ARGS])
def test_forward_matches_meta_reference(tiny_args, extra):
    args = ModelArgs(**extra) if extra else tiny_args
    model = random_model(args)
    toks = tokens(args, length=40)
    with torch.no_grad():
        ours = model(toks)
        ref = meta_reference_forward(model.state_dict(), args, toks)
    assert ours.dtype == torch.float32 and ours.shape == (2, 40, args.vocab_size)
    assert ref.abs().max() > 1  # sharp enough to see a wrong rotary or head layout
    assert (ours - ref).abs().max() < 1e-5


@pytest.mark.parametrize("extra", [{}, GQA_ARGS])
def test_kv_cache_decoding_equals_full_forward(tiny_args, extra):
    args = ModelArgs(**extra) if extra else tiny_args
    model = random_model(args)
    toks = tokens(args, length=12)
    with torch.no_grad():
        full = model(toks)
        cache = model.new_cache(2, 16)
        steps = [model(toks[:, :5], 0, cache)]  # prefill, then one token at a time
        steps += [model(toks[:, t:t + 1], t, cache) for t in range(5, 12)]
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5


def test_left_padded_batch_decoding_equals_single_sequences(tiny_args):
    model = random_model(ModelArgs(**GQA_ARGS))
    a, b = tokens(model.args, 1, 10, seed=2)[0], tokens(model.args, 1, 6, seed=3)[0]
    pad = 10 - 6
    prompt = torch.stack([a, torch.cat([torch.full((pad,), 7), b])])
    key_mask = torch.ones(2, 14, dtype=torch.bool)
    key_mask[1, :pad] = False
    nxt = tokens(model.args, 2, 4, seed=4)
    with torch.no_grad():
        cache = model.new_cache(2, 14)
        out = [model(prompt, 0, cache, key_mask[:, :10])]
        out += [model(nxt[:, i:i + 1], 10 + i, cache, key_mask[:, :11 + i]) for i in range(4)]
        out = torch.cat(out, dim=1)
        ref_a = model(torch.cat([a, nxt[0]])[None])[0]
        ref_b = model(torch.cat([b, nxt[1]])[None])[0]
    assert (out[0] - ref_a).abs().max() < 1e-4
    assert (out[1, pad:] - ref_b).abs().max() < 1e-4
    assert torch.isfinite(out).all()


def test_7b_13b_70b_presets_have_the_published_sizes():
    with torch.device("meta"):
        counts = {s: sum(p.numel() for p in Transformer(llama2_args(s)).parameters())
                  for s in ("7B", "13B", "70B")}
    assert counts == {"7B": 6_738_415_616, "13B": 13_015_864_320, "70B": 68_976_648_192}


def test_meta_device_build_then_to_empty_and_init_weights(tiny_args):
    with torch.device("meta"):
        model = Transformer(tiny_args)
    assert model.output.weight.is_meta
    model.to_empty(device="cpu")
    model.init_weights(seed=3)
    eager = Transformer(tiny_args)
    eager.init_weights(seed=3)
    assert_same_weights(model, eager)
    assert torch.equal(model.rope, eager.rope)
    toks = tokens(tiny_args)
    with torch.no_grad():
        assert torch.isfinite(model(toks)).all()
        assert torch.equal(model(toks), eager(toks))


def test_bf16_cast_keeps_rotary_table_float32_and_cache_casts(tiny_args):
    m = Transformer(tiny_args)
    m.init_weights(seed=0)
    ref = m.rope.clone()
    m = m.to(torch.bfloat16)
    assert m.rope.dtype == torch.float32 and torch.equal(m.rope, ref)
    assert m.tok_embeddings.weight.dtype == torch.bfloat16
    # A float32 cache under a bf16 model: attention casts what it reads (mixed precision decode).
    tokens = torch.randint(0, tiny_args.vocab_size, (2, 6))
    cache = m.new_cache(2, 16, dtype=torch.float32)
    with torch.no_grad():
        out = torch.cat([m(tokens[:, :4], 0, cache), m(tokens[:, 4:], 4, cache)], dim=1)
        full = m(tokens)
    assert cache.k[0].dtype == torch.float32
    assert (out.argmax(-1) == full.argmax(-1)).float().mean() > 0.9
