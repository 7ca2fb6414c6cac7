"""LLaMA-2 in plain PyTorch: the architecture, weight initialisation and KV-cache decoding.

Parameter names are exactly the keys of Meta's `consolidated.*.pth` files
(`layers.3.attention.wq.weight`, ...), so `named_parameters()` is the checkpoint and HFT selects
matrices by the names users already know. Reading and writing the Meta and Hugging Face checkpoint
files is checkpoint.py's job; nothing here needs it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None = n_heads (no grouped-query attention)
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads:
            raise ValueError(f"ModelArgs: dim={self.dim} is not divisible by "
                             f"n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelArgs: n_heads={self.n_heads} is not divisible by "
                             f"n_kv_heads={self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"ModelArgs: head_dim={self.dim // self.n_heads} must be even for "
                             f"rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        # Meta's rule: 2/3 of 4*dim (SwiGLU has three matrices), scaled, rounded up to multiple_of.
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# LLaMA-2 presets (vocab 32000; Meta's params.json says -1 and the tokenizer decides).
PRESETS = {
    "7B": dict(dim=4096, n_layers=32, n_heads=32, multiple_of=256, norm_eps=1e-5),
    "13B": dict(dim=5120, n_layers=40, n_heads=40, multiple_of=256, norm_eps=1e-5),
    "70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                ffn_dim_multiplier=1.3, norm_eps=1e-5),
}


def llama2_args(size: str, **overrides) -> ModelArgs:
    """ModelArgs for a published LLaMA-2 size ("7B", "13B", "70B")."""
    return ModelArgs(**{**PRESETS[size], **overrides})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in float32 as Meta does, then cast back before the (possibly bf16) scale.
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


def precompute_rope(head_dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    """cos and sin of the rotary angles, shape [end, head_dim // 2, 2] (float32)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(end, dtype=torch.float32), freqs)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) by the position's angles, as Meta does.

    x: [B, T, H, D]; rope: [T, D/2, 2]. Each pair is a complex number times e^(i*angle): one
    complex multiply forward and backward, faster on CPU than the same rotation written with
    real slices and a stack (which copies the interleaved halves several times).
    """
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    # .float(): view_as_complex has no bfloat16, and the angles deserve float32 anyway.
    freqs = torch.view_as_complex(rope.float())[None, :, None, :]
    return torch.view_as_real(xc * freqs).flatten(-2).type_as(x)


class KVCache:
    """Keys and values of past positions for incremental decoding: [B, n_kv_heads, max_len, D]
    per layer. Lives outside the modules, so training forward never carries one."""

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, dtype, device):
        shape = (batch_size, args.n_kv_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.max_len = max_len


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x, rope, cache: Optional[KVCache] = None, layer: int = 0, start_pos: int = 0,
                mask: Optional[torch.Tensor] = None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        if cache is not None:
            cache.k[layer][:B, :, start_pos:start_pos + T] = k
            cache.v[layer][:B, :, start_pos:start_pos + T] = v
            k = cache.k[layer][:B, :, :start_pos + T].to(q.dtype)
            v = cache.v[layer][:B, :, :start_pos + T].to(q.dtype)
        if self.n_kv_heads != self.n_heads:
            # Grouped-query attention (70B): kv head j serves query heads j*rep .. (j+1)*rep-1.
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 is the gate, w3 the up and w2 the down projection."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, rope, cache=None, start_pos=0, mask=None):
        h = x + self.attention(self.attention_norm(x), rope, cache, self.layer_id, start_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # Rotary table for 2*max_seq_len positions, as Meta's reference precomputes it. Not
        # persistent: it is derived from args, never read from or written to a checkpoint.
        self.register_buffer("rope", precompute_rope(args.head_dim, args.max_seq_len * 2,
                                                     args.rope_theta),
                             persistent=False)

    def init_buffers(self):
        """Recompute the rotary table (needed after building on the meta device and `to_empty`)."""
        a = self.args
        self.rope = precompute_rope(a.head_dim, a.max_seq_len * 2,
                                    a.rope_theta).to(self.rope.device)

    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None):
        """Initialise a model trained from scratch: N(0, 0.02) matrices and embeddings, output
        projections (wo, w2) scaled by 1/sqrt(2*n_layers) as GPT-2 does, norms at one."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device="cpu").manual_seed(seed)
        self.init_buffers()
        std_out = 0.02 / math.sqrt(2 * self.args.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            std = std_out if name.endswith(("wo.weight", "w2.weight")) else 0.02
            vals = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
            p.copy_(vals.to(p.dtype))

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) would round the rotary angles too; Meta keeps them in float32.
        super()._apply(fn, recurse)
        if self.rope.dtype != torch.float32 and not self.rope.is_meta:
            self.init_buffers()
        return self

    def new_cache(self, batch_size: int, max_len: int,
                  dtype: Optional[torch.dtype] = None) -> KVCache:
        """An empty KV cache, by default in the parameters' dtype (attention casts what it reads
        to its compute dtype, so a float32 cache under bf16 mixed precision is still correct)."""
        p = self.output.weight
        return KVCache(self.args, batch_size, max_len, dtype or p.dtype, p.device)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, cache: Optional[KVCache] = None,
                key_mask: Optional[torch.Tensor] = None, last_only: bool = False) -> torch.Tensor:
        """tokens [B, T] -> float32 logits [B, T, vocab] ([B, 1, vocab] with `last_only`).

        Training calls `model(tokens)`: plain causal attention, no cache. Decoding passes a
        `KVCache` and the position of tokens[:, 0]; `key_mask` [B, start_pos + T] (True = real
        token) hides left padding, so prompts of different lengths decode in one batch.
        `last_only` applies the final norm and output to the last position only: a prompt's
        prefill needs just the next token's logits, not T x vocab of them (16 prompts x 3584
        positions x 32000 x 4 bytes = 7 GiB in float32).
        """
        B, T = tokens.shape
        h = self.tok_embeddings(tokens)
        rope = self.rope[start_pos:start_pos + T]
        mask = None
        if cache is not None or key_mask is not None:
            S = start_pos + T
            if S > self.rope.shape[0]:
                raise ValueError(f"sequence of {S} positions exceeds the rotary table "
                                 f"({self.rope.shape[0]})")
            # Query i (absolute position start_pos+i) sees keys 0..start_pos+i.
            mask = torch.ones(T, S, dtype=torch.bool, device=tokens.device).tril(diagonal=start_pos)
            mask = mask[None, None]
            if key_mask is not None:
                # A padding query still sees itself, so no softmax row is empty (NaN); real
                # tokens never see padding.
                diag = torch.zeros(T, S, dtype=torch.bool, device=tokens.device)
                diag[torch.arange(T), start_pos + torch.arange(T)] = True
                mask = (mask & key_mask[:, None, None, :S].to(torch.bool)) | diag
        for layer in self.layers:
            h = layer(h, rope, cache, start_pos, mask)
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()
