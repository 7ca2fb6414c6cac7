"""LLaMA-2 checkpoints in and out: Meta's official format and Hugging Face's.

    Meta: params.json + consolidated.NN.pth (one file per model-parallel shard) + tokenizer.model
    HF:   config.json + *.safetensors (LlamaForCausalLM names, q/k rows permuted) + tokenizer.model
          (+ tokenizer.json, tokenizer_config.json, special_tokens_map.json when written)

Reading goes through CheckpointReader, one full tensor at a time from memory-mapped files
(`torch.load(weights_only=True, mmap=True)`, safetensors), so a loader (load_model, or the
trainer's FSDP one that keeps only its shard) never holds the checkpoint twice and a checkpoint
never runs code. Every write is atomic: `atomic_file` for a file, `replace_dir` for a directory,
the one implementation the whole project uses.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import struct
import tempfile
import warnings
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Optional

import torch

from model import ModelArgs, Transformer


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message names the file, tensor or key."""


# Atomic writes: a reader (a resumed run, another rank, a user's tool) sees the old version or the
# whole new one, never half a file or half a directory.

@contextlib.contextmanager
def atomic_file(path, mode: str = "w"):
    """Write a file through a hidden temporary beside it, flushed to disk and renamed over `path`
    on success; on an exception the temporary is removed and `path` is left as it was. Text is
    UTF-8 whatever the locale (JSON's encoding; write_json keeps non-ASCII characters as they are).
    """
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".",
                               prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make the file private
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path, obj, indent: int = 2):
    with atomic_file(path) as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")


def replace_dir(new, dest):
    """Move the complete directory `new` to `dest`, its files flushed to disk first (so a crash
    of the machine cannot leave `dest` with empty files). An existing `dest` is first renamed
    aside and deleted only once `new` is in place (POSIX cannot swap two directories in one
    rename): a process killed between the two renames leaves no `dest`, the old version in the
    hidden `.<dest>.old-*` beside it and the new one still at `new`."""
    new, dest = Path(new), Path(dest)
    for path in [*new.rglob("*"), new]:  # on disk before the rename makes them visible
        fsync(path)
    if not dest.exists():
        os.rename(new, dest)
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.rename(dest, old)  # replaces the empty directory mkdtemp made
        try:
            os.rename(new, dest)
        except BaseException:
            os.rename(old, dest)
            raise
        shutil.rmtree(old, ignore_errors=True)
    fsync(dest.parent)


def fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# Meta's model-parallel layout: column-parallel matrices are split on their output rows (dim 0),
# row-parallel ones and the embedding on their input columns (dim 1); norms are replicated.
META_SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,
                  "wo": 1, "w2": 1, "tok_embeddings": 1}
META_IGNORED = ("rope.freqs",)  # Meta's files carry their rotary table; we recompute ours
HF_IGNORED_SUFFIX = ".rotary_emb.inv_freq"  # older transformers saved it
HF_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
            "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
            "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
            "feed_forward.w3": "mlp.up_proj",
            "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
HF_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
          "output.weight": "lm_head.weight"}


def meta_shard_dim(name: str) -> Optional[int]:
    """Concatenation dim of a Meta tensor across consolidated.NN.pth files (None: replicated)."""
    return META_SHARD_DIM.get(name.split(".")[-2])


def hf_name(name: str) -> str:
    """Meta name -> transformers LlamaForCausalLM name."""
    if name in HF_TOP:
        return HF_TOP[name]
    _, layer, rest = name.split(".", 2)  # layers.N.attention.wq.weight
    module, leaf = rest.rsplit(".", 1)
    return f"model.layers.{layer}.{HF_NAMES[module]}.{leaf}"


# HF's rotary rotates the two halves of a head (x[i], x[i + D/2]); Meta's rotates consecutive
# pairs (x[2i], x[2i+1]). HF's conversion script therefore reorders each head's q and k rows so
# that pair members land in the two halves; the attention scores are unchanged.
def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta -> HF row order of wq (n_heads) or wk (n_kv_heads)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF -> Meta row order: the inverse of hf_permute."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def param_shapes(args: ModelArgs) -> dict[str, tuple]:
    """Every parameter name and shape of Transformer(args), from a build on the meta device."""
    with torch.device("meta"):
        model = Transformer(args)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _read_json(file: Path) -> dict:
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}:{e.lineno}: not valid JSON: {e.msg}") from None


def _torch_load(file: Path) -> dict:
    # weights_only: a checkpoint is data, and unpickling arbitrary objects would run its code.
    # mmap: tensors stay in the page cache until used, so a 13 GB file is not read into memory.
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{file}: refused: it holds more than tensors and loading it could "
                              f"run code (torch.load weights_only=True said: "
                              f"{str(e).splitlines()[0]})") from None
    except Exception as e:
        raise CheckpointError(f"{file}: cannot be read as a torch checkpoint: {e}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{file}: expected a dict of tensors, got {type(sd).__name__}")
    return sd


def _shape(shape) -> str:
    return str(list(shape))


def ffn_args_for(args: ModelArgs, hidden_dim: int) -> ModelArgs:
    """args with multiple_of / ffn_dim_multiplier chosen so that Meta's rule gives exactly
    hidden_dim (HF's config stores only the result, intermediate_size)."""
    base = int(2 * (4 * args.dim) / 3)
    multipliers = [None] + sorted({round(hidden_dim / base, d) for d in (1, 2, 3)})
    # LLaMA-2's own multiple_of first (256; 4096 for 70B), then powers of two, largest first.
    multiples = [256, 4096] + [2 ** k for k in range(13, -1, -1) if 2 ** k not in (256, 4096)]
    for mult in multipliers:
        for multiple_of in multiples:
            cand = replace(args, multiple_of=multiple_of, ffn_dim_multiplier=mult)
            if cand.ffn_hidden_dim == hidden_dim:
                return cand
    raise CheckpointError(f"intermediate_size={hidden_dim} with hidden_size={args.dim} fits no "
                          f"Meta FFN rule (multiple_of a power of two, "
                          f"ffn_dim_multiplier with 3 decimals)")


def args_from_hf_config(cfg: dict, file: Path, max_seq_len: Optional[int] = None) -> ModelArgs:
    """ModelArgs from a transformers LlamaConfig dict (4.x or 5.x layout)."""
    def need(key):
        if key not in cfg:
            raise CheckpointError(f"{file}: missing '{key}'")
        return cfg[key]
    if cfg.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{file}: model_type '{cfg['model_type']}' is not 'llama'")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(f"{file}: rope scaling {rope} is not supported (LLaMA-2 has none)")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if cfg.get(key, ok) != ok:
            raise CheckpointError(f"{file}: '{key}': {cfg[key]!r} is not supported "
                                  f"(LLaMA has {ok!r})")
    dim, n_heads = need("hidden_size"), need("num_attention_heads")
    if cfg.get("head_dim") not in (None, dim // n_heads):
        raise CheckpointError(f"{file}: head_dim={cfg['head_dim']} != "
                              f"hidden_size/num_attention_heads")
    try:
        args = ModelArgs(
            dim=dim, n_layers=need("num_hidden_layers"), n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads, vocab_size=need("vocab_size"),
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0))),
            max_seq_len=max_seq_len or cfg.get("max_position_embeddings", 4096))
    except ValueError as e:
        raise CheckpointError(f"{file}: {e}") from None
    try:
        return ffn_args_for(args, need("intermediate_size"))
    except CheckpointError as e:
        raise CheckpointError(f"{file}: {e}") from None


def checkpoint_format(path: Path) -> str:
    """"meta" (params.json) or "hf" (config.json): what the directory's JSON file says; weight
    files are not looked at. CheckpointError naming what is there when neither is."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if (path / "params.json").exists():
        return "meta"
    if (path / "config.json").exists():
        return "hf"
    if any(path.glob("consolidated.*.pth")):
        raise CheckpointError(f"{path}: consolidated.*.pth found but params.json is missing "
                              f"(Meta's checkpoints ship it beside the weights)")
    if any(path.glob("*.safetensors")):
        raise CheckpointError(f"{path}: *.safetensors found but config.json is missing")
    found = sorted(p.name for p in path.iterdir())[:10]
    raise CheckpointError(f"{path}: unknown checkpoint format: expected params.json + "
                          f"consolidated.*.pth (Meta) or config.json + *.safetensors (HF); "
                          f"found {found or 'nothing'}")


def _read_params(params_file: Path, max_seq_len: Optional[int]) -> dict:
    """Meta's params.json with max_seq_len added; vocab_size -1 (or absent) is left to the
    caller."""
    params = _read_json(params_file)
    for key in ("dim", "n_layers", "n_heads"):
        if key not in params:
            raise CheckpointError(f"{params_file}: missing '{key}'")
    # max_seq_len is not in params.json; LLaMA-2's is 4096.
    return dict(params, max_seq_len=max_seq_len or 4096, vocab_size=params.get("vocab_size", -1))


def _args_from_params(params: dict, params_file: Path) -> ModelArgs:
    try:
        return ModelArgs.from_dict(params)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{params_file}: {e}") from None


LLAMA2_VOCAB = 32000  # pieces in LLaMA-2's tokenizer.model


def _spm_pieces(file: Path) -> int:
    """The number of pieces of a SentencePiece model (CheckpointError naming the file if it is
    not one)."""
    import sentencepiece as spm
    try:
        return spm.SentencePieceProcessor(model_file=str(file)).vocab_size()
    except Exception as e:
        raise CheckpointError(f"{file}: not a SentencePiece model: {e}") from None


def read_model_args(path, max_seq_len: Optional[int] = None, tokenizer=None, log=None) -> ModelArgs:
    """The model's shapes from params.json (Meta) or config.json (HF) alone: no weight file is
    opened, so a directory holding only that file is enough (train.py --plan needs no weights).

    Meta's vocab_size -1 means "as many as the tokenizer has pieces" (the embedding decides when
    CheckpointReader opens the weights): the SentencePiece model at `tokenizer` (default
    <path>/tokenizer.model) when it exists, else LLaMA-2's 32000. `log` is told which."""
    path = Path(path)
    if checkpoint_format(path) == "hf":
        config_file = path / "config.json"
        return args_from_hf_config(_read_json(config_file), config_file, max_seq_len)
    params_file = path / "params.json"
    params = _read_params(params_file, max_seq_len)
    if params["vocab_size"] == -1:
        tok = Path(tokenizer) if tokenizer else path / "tokenizer.model"
        if tok.is_file():
            params["vocab_size"] = _spm_pieces(tok)
            how = f"the {params['vocab_size']} pieces of {tok}"
        else:
            params["vocab_size"] = LLAMA2_VOCAB
            how = f"{LLAMA2_VOCAB}, LLaMA-2's tokenizer (no tokenizer at {tok})"
        if log:
            log(f"{params_file}: vocab_size -1, taken as {how}")
    return _args_from_params(params, params_file)


class CheckpointReader:
    """Lazy, tensor-by-tensor access to a Meta or HF checkpoint directory, in Meta names.

    `get(name)` returns one full tensor (Meta shards concatenated, HF q/k un-permuted) built from
    memory-mapped files; nothing else is read. `validate()` checks every key and merged shape
    against `args` before anything is built. A tensor returned by `get` may share pages with the
    file (copy-on-write: writing to it never changes the file).
    """

    def __init__(self, path, max_seq_len: Optional[int] = None):
        self.path = Path(path)
        self.format = checkpoint_format(self.path)
        if self.format == "meta":
            self._open_meta(max_seq_len)
        else:
            self._open_hf(max_seq_len)
        self._check_tokenizer()

    def _open_meta(self, max_seq_len):
        files = sorted(self.path.glob("consolidated.*.pth"))
        if not files:
            raise CheckpointError(f"{self.path}: params.json but no "
                                  f"consolidated.*.pth weight files")
        try:
            numbers = sorted(int(f.name.split(".")[1]) for f in files)
        except ValueError:
            raise CheckpointError(f"{self.path}: cannot number the shards "
                                  f"{[f.name for f in files]}") from None
        if numbers != list(range(len(files))):
            missing = sorted(set(range(numbers[-1] + 1)) - set(numbers))
            raise CheckpointError(f"{self.path}: model-parallel shards missing: "
                                  f"{[f'consolidated.{i:02d}.pth' for i in missing]}")
        self.files = sorted(files, key=lambda f: int(f.name.split(".")[1]))
        self._shards = [_torch_load(f) for f in self.files]
        params_file = self.path / "params.json"
        params = _read_params(params_file, max_seq_len)
        if params["vocab_size"] == -1:
            # -1 means "from the tokenizer"; the embedding holds the full vocab on every shard.
            emb = self._shards[0].get("tok_embeddings.weight")
            if emb is None:
                raise CheckpointError(f"{self.files[0]}: vocab_size is -1 in params.json and "
                                      f"tok_embeddings.weight is missing")
            params["vocab_size"] = emb.shape[0]
        self.args = _args_from_params(params, params_file)

    def _open_hf(self, max_seq_len):
        from safetensors import safe_open  # only HF checkpoints need the package
        config_file = self.path / "config.json"
        index_file = self.path / "model.safetensors.index.json"
        if index_file.exists():
            names = sorted(set(_read_json(index_file).get("weight_map", {}).values()))
            for name in names:
                if not (self.path / name).exists():
                    raise CheckpointError(f"{index_file}: lists {name}, which is missing")
            self.files = [self.path / n for n in names]
        else:
            self.files = sorted(self.path.glob("*.safetensors"))
        if not self.files:
            raise CheckpointError(f"{self.path}: config.json but no *.safetensors weight files "
                                  f"(pytorch_model.bin is not read: "
                                  f"re-save with safe_serialization=True)")
        self._hf = {}  # HF name -> (file, open safetensors handle)
        for file in self.files:
            handle = safe_open(str(file), framework="pt")
            for key in handle.keys():
                self._hf[key] = (file, handle)
        self.config = _read_json(config_file)
        self.args = args_from_hf_config(self.config, config_file, max_seq_len)
        self._hf_of = {name: hf_name(name) for name in self.expected}
        if "lm_head.weight" not in self._hf and self.config.get("tie_word_embeddings"):
            self._hf_of["output.weight"] = "model.embed_tokens.weight"

    @cached_property
    def expected(self) -> dict[str, tuple]:
        """Meta name -> shape of every tensor Transformer(self.args) has."""
        return param_shapes(self.args)

    def _check_tokenizer(self):
        file = self.path / "tokenizer.model"
        if not file.exists():
            return
        n_words = _spm_pieces(file)
        # Meta's embedding has exactly one row per piece. HF checkpoints may add tokens
        # (tokenizer.json, added_tokens.json) or pad the vocabulary, so there it only must fit.
        ok = (n_words == self.args.vocab_size if self.format == "meta"
              else n_words <= self.args.vocab_size)
        if not ok:
            raise CheckpointError(f"{file}: tokenizer has {n_words} pieces but the embedding has "
                                  f"{self.args.vocab_size} rows: they belong to different models")

    def _shapes(self) -> tuple[dict, list, dict]:
        """Meta name -> (merged shape, where), unexpected names, and Meta name -> problem."""
        found, unexpected, problems = {}, [], {}
        if self.format == "meta":
            names = {k for sd in self._shards for k in sd if k not in META_IGNORED}
            where = self.files[0].name if len(self.files) == 1 else \
                f"{len(self.files)} shards {self.files[0].name}..{self.files[-1].name}"
            for name in sorted(names):
                if name not in self.expected:
                    unexpected.append(name)
                    continue
                lacking = [f.name for f, sd in zip(self.files, self._shards) if name not in sd]
                if lacking:
                    problems[name] = f"{name}: missing from {lacking}"
                    continue
                d = meta_shard_dim(name)
                first, merged = self._shards[0][name].shape, list(self._shards[0][name].shape)
                for f, sd in zip(self.files[1:], self._shards[1:]):
                    s = sd[name].shape
                    if len(s) != len(first) or any(s[i] != first[i] for i in range(len(s))
                                                   if i != d):
                        problems[name] = (f"{name}: {f.name} has {_shape(s)} but "
                                          f"{self.files[0].name} has {_shape(first)}")
                        break
                    if d is not None:
                        merged[d] += s[d]
                else:
                    found[name] = (tuple(merged), where)
        else:
            meta_of = {h: m for m, h in self._hf_of.items()}
            for key, (file, handle) in sorted(self._hf.items()):
                if key.endswith(HF_IGNORED_SUFFIX):
                    continue
                if key not in meta_of:
                    unexpected.append(f"{key} ({file.name})")
                    continue
                shape = tuple(handle.get_slice(key).get_shape())
                for name in [m for m, h in self._hf_of.items() if h == key]:  # two if tied
                    found[name] = (shape, f"{file.name} as {key}")
        return found, unexpected, problems

    def keys(self) -> list[str]:
        """Meta names of the model's tensors this checkpoint holds, in the model's order."""
        found = self._shapes()[0]
        return [name for name in self.expected if name in found]

    def validate(self):
        """Raise CheckpointError listing every missing / unexpected key and wrong shape."""
        found, unexpected, bad = self._shapes()
        missing = [name for name in self.expected if name not in found and name not in bad]
        problems = list(bad.values())
        problems += [f"{name}: shape {_shape(shape)} in {where}, but the model expects "
                     f"{_shape(self.expected[name])}"
                     for name, (shape, where) in found.items() if shape != self.expected[name]]
        for what, names in (("unexpected", unexpected), ("missing", missing)):
            if names:
                more = f" (+{len(names) - 20} more)" if len(names) > 20 else ""
                problems.insert(0, f"{what} keys ({len(names)}): {', '.join(names[:20])}{more}")
        if problems:
            config = "params.json" if self.format == "meta" else "config.json"
            raise CheckpointError(f"{self.path} ({self.format} checkpoint) does not match its "
                                  f"{config} ({self.args}):\n  " + "\n  ".join(problems))

    def get(self, name: str, dtype: Optional[torch.dtype] = torch.float32) -> torch.Tensor:
        """One full tensor by Meta name, on the CPU, in `dtype` (None: as stored)."""
        if self.format == "meta":
            parts = [sd.get(name) for sd in self._shards]
            if any(p is None for p in parts):
                raise CheckpointError(f"{self.path}: {name} is missing from "
                                      f"{[f.name for f, p in zip(self.files, parts) if p is None]}")
            dtype = dtype or parts[0].dtype
            d = meta_shard_dim(name)
            if d is None or len(parts) == 1:
                return parts[0].to(dtype)
            shape = list(parts[0].shape)
            shape[d] = sum(p.shape[d] for p in parts)
            # One allocation in the target dtype; each shard is copied (and converted) into place.
            out = torch.empty(shape, dtype=dtype)
            offset = 0
            for p in parts:
                out.narrow(d, offset, p.shape[d]).copy_(p)
                offset += p.shape[d]
            return out
        if name not in self._hf_of:
            raise CheckpointError(f"{name} is not a parameter of Transformer({self.args})")
        key = self._hf_of[name]
        if key not in self._hf:
            raise CheckpointError(f"{self.path}: {name} (HF {key}) is not in "
                                  f"{[f.name for f in self.files]}")
        w = self._hf[key][1].get_tensor(key)
        w = w.to(dtype) if dtype is not None else w
        if name.endswith("attention.wq.weight"):
            w = hf_unpermute(w, self.args.n_heads)
        elif name.endswith("attention.wk.weight"):
            w = hf_unpermute(w, self.args.n_kv_heads)
        return w


def load_model(path, dtype: torch.dtype = torch.float32, device="cpu",
               max_seq_len: Optional[int] = None) -> Transformer:
    """Load a Meta (params.json + consolidated.*.pth) or HF (config.json + *.safetensors)
    LLaMA checkpoint directory. `max_seq_len` defaults to 4096 for Meta (params.json has none)
    and to max_position_embeddings for HF."""
    reader = CheckpointReader(path, max_seq_len=max_seq_len)
    reader.validate()
    # Build without memory, allocate once on the device, then fill tensor by tensor: the
    # peak is the model plus one tensor, never two copies of the checkpoint.
    with torch.device("meta"):
        model = Transformer(reader.args).to(dtype)
    model.to_empty(device=device)
    model.init_buffers()
    fill_weights(model, reader)
    return model


@torch.no_grad()
def fill_weights(model: Transformer, reader: "CheckpointReader"):
    """Copy the checkpoint into a materialised model, one tensor at a time, in each parameter's
    own dtype. A sharded parameter (an FSDP2 DTensor) keeps only this rank's shard of it, so no
    rank ever holds the whole model twice."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    for name, p in model.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        full = reader.get(name, dtype=local.dtype).to(local.device)
        if isinstance(p, DTensor):  # every rank holds `full`: split it locally, no scatter
            local.copy_(distribute_tensor(full, p.device_mesh, p.placements,
                                          src_data_rank=None).to_local())
        else:
            p.copy_(full)
        del full


def _plain(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """A CPU tensor owning exactly its data (torch.save writes a view's whole storage, and
    safetensors refuses shared memory)."""
    t = t.detach().to("cpu", dtype or t.dtype).contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def _tokenizer_file(tokenizer) -> Optional[Path]:
    if tokenizer is None:
        return None
    if not isinstance(tokenizer, (str, os.PathLike)):
        raise TypeError(f"tokenizer must be a path to a tokenizer.model file, got "
                        f"{type(tokenizer).__name__}")
    file = Path(tokenizer)
    file = file / "tokenizer.model" if file.is_dir() else file
    if not file.is_file():
        raise CheckpointError(f"{file}: tokenizer file not found")
    return file


def meta_params(args: ModelArgs) -> dict:
    """params.json as Meta writes it. No max_seq_len: Meta's Llama.build passes that separately
    and would fail on a duplicate keyword."""
    params = dict(dim=args.dim, multiple_of=args.multiple_of, n_heads=args.n_heads,
                  n_layers=args.n_layers, norm_eps=args.norm_eps, vocab_size=args.vocab_size)
    if args.n_kv_heads != args.n_heads:
        params["n_kv_heads"] = args.n_kv_heads
    if args.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = args.ffn_dim_multiplier
    if args.rope_theta != 10000.0:
        params["rope_theta"] = args.rope_theta
    return params


def hf_config(args: ModelArgs, dtype: torch.dtype) -> dict:
    """config.json for transformers' LlamaForCausalLM, laid out like meta-llama/Llama-2-7b-hf's."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len, "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta, "rope_scaling": None, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": str(dtype).removeprefix("torch."),
    }


# tokenizer_class as meta-llama/Llama-2-7b-hf has it: AutoTokenizer then reads tokenizer.json as
# LlamaTokenizerFast (transformers 4; LlamaTokenizer with use_fast=False), and transformers 5 has
# one class under both names, so tools that check for a Llama tokenizer find one. legacy=True
# because the project tokenizes that way (data.Tokenizer: the text after "</s>" gets the "▁"
# prefix); legacy=False would make the slow and the 5.x tokenizers drop it.
HF_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
    "unk_token": "<unk>", "pad_token": None, "add_bos_token": True, "add_eos_token": False,
    "clean_up_tokenization_spaces": False, "legacy": True,
}


# Hugging Face's fast tokenizer. transformers' LlamaConverter turns LLaMA's tokenizer.model into a
# BPE tokenizer.json; meta-llama/Llama-2-7b-hf ships the result. The model file is a protobuf
# (sentencepiece_model.proto); the few fields needed are read here, so protobuf is not required.
SPM_NORMAL, SPM_UNKNOWN, SPM_CONTROL, SPM_BYTE = 1, 2, 3, 6  # SentencePiece.Type
SPM_BPE = 2  # TrainerSpec.ModelType


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    x = shift = 0
    while True:
        b = buf[i]
        x |= (b & 0x7F) << shift
        shift, i = shift + 7, i + 1
        if b < 0x80:
            return x, i


def _proto_fields(buf: bytes) -> list[tuple[int, object]]:
    """(field number, value) of a serialized protobuf message: int for varints, bytes otherwise."""
    out, i = [], 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire in (1, 5):  # fixed 64 / 32 bits
            n = 8 if wire == 1 else 4
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.append((key >> 3, value))
    return out


def _read_spm(file: Path) -> tuple[list[tuple[str, float, int]], dict, dict]:
    """A SentencePiece model's pieces as (piece, score, type), its TrainerSpec and NormalizerSpec
    (field number -> value; absent fields take the .proto defaults at the call sites)."""
    pieces, trainer, normalizer = [], {}, {}
    for field, value in _proto_fields(file.read_bytes()):
        if field == 1:  # repeated SentencePiece {piece = 1, score = 2, type = 3}
            p = dict(_proto_fields(value))
            score = struct.unpack("<f", p[2])[0] if 2 in p else 0.0
            pieces.append((p.get(1, b"").decode("utf-8"), score, p.get(3, SPM_NORMAL)))
        elif field == 2:
            trainer = dict(_proto_fields(value))
        elif field == 3:
            normalizer = dict(_proto_fields(value))
    return pieces, trainer, normalizer


def _llama_layout_lacks(pieces, trainer: dict, norm: dict) -> list[str]:
    """What a SentencePiece model lacks of LLaMA's layout (field numbers and defaults from
    sentencepiece_model.proto)."""
    checks = {"a BPE model": trainer.get(3, 1) == SPM_BPE,  # TrainerSpec.model_type
              "byte fallback": trainer.get(35, 0) == 1,  # TrainerSpec.byte_fallback
              "the dummy prefix": norm.get(3, 1) == 1,  # NormalizerSpec.add_dummy_prefix
              "extra whitespace kept": norm.get(4, 1) == 0,  # .remove_extra_whitespaces
              "whitespace escaped": norm.get(5, 1) == 1,  # .escape_whitespaces
              "no normalisation rules": not norm.get(2),  # .precompiled_charsmap (identity)
              "only normal, unknown, control and byte pieces":
                  all(t in (SPM_NORMAL, SPM_UNKNOWN, SPM_CONTROL, SPM_BYTE) for _, _, t in pieces)}
    return [what for what, ok in checks.items() if not ok]


def _bpe_merges(pieces) -> list[str]:
    """SentencePiece merges the adjacent pair whose concatenation is the highest-scoring piece
    (scores, not ids: the two need not agree). As BPE merges by rank:
    every split of a normal piece into two normal pieces, ranked by that piece's score. Written
    "left right", as in Llama-2-7b-hf (every tokenizers version reads it; pieces hold no spaces)."""
    normal = {p: (score, i) for i, (p, score, t) in enumerate(pieces) if t == SPM_NORMAL}
    ranked = sorted((-score, i, normal[p[:k]][1], normal[p[k:]][1])
                    for p, (score, i) in normal.items()
                    for k in range(1, len(p)) if p[:k] in normal and p[k:] in normal)
    return [f"{pieces[left][0]} {pieces[right][0]}" for _, _, left, right in ranked]


def hf_tokenizer_json(tokenizer_model) -> dict:
    """tokenizer.json for a SentencePiece model in LLaMA's layout, as transformers' LlamaConverter
    (legacy) writes it for meta-llama/Llama-2-7b-hf: BPE with byte fallback over the pieces and
    their ids, merges in SentencePiece's priority order, the dummy prefix and space escaping as a
    Prepend("▁") + Replace(" ", "▁") normalizer (applied to each stretch of text between special
    tokens, as SentencePiece applies it to a whole text), no pre-tokenizer, <s> prepended by the
    post-processor. Another layout (unigram, NFKC, whitespace removal, user-defined pieces) would
    tokenize differently: ValueError.
    """
    pieces, trainer, norm = _read_spm(Path(tokenizer_model))
    lacking = _llama_layout_lacks(pieces, trainer, norm)
    if lacking:
        raise ValueError(f"{tokenizer_model}: not in LLaMA's SentencePiece layout (lacks: "
                         f"{', '.join(lacking)}), which tokenizer.json would reproduce")
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    bos = pieces[trainer.get(41, 1)][0]  # TrainerSpec.bos_id
    unk = next(p for p, _, t in pieces if t == SPM_UNKNOWN)
    special = [{"id": i, "content": p, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True}
               for i, (p, _, t) in enumerate(pieces) if t in (SPM_UNKNOWN, SPM_CONTROL)]

    def seq(name, type_id):
        return {"Sequence": {"id": name, "type_id": type_id}}

    def bos_token(type_id):
        return {"SpecialToken": {"id": bos, "type_id": type_id}}

    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": special,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing", "single": [bos_token(0), seq("A", 0)],
                           "pair": [bos_token(0), seq("A", 0), bos_token(1), seq("B", 1)],
                           "special_tokens": {bos: {"id": bos, "ids": [vocab[bos]],
                                                    "tokens": [bos]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk,
                  "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True,
                  "vocab": vocab, "merges": _bpe_merges(pieces)},
    }


def save_checkpoint(state: dict, args: ModelArgs, path, format: str = "meta", tokenizer=None,
                    dtype: Optional[torch.dtype] = None, max_shard_bytes: int = 5 * 2 ** 30,
                    extra_json: Optional[dict] = None):
    """Write a full state dict (Meta names -> full tensors) as a Meta or HF checkpoint directory.

    Atomic: the files are written into a hidden sibling directory which then replaces `path`,
    so an interrupted save leaves the previous checkpoint (if any) as it was. `dtype=None` keeps
    each tensor's dtype (HF: the first tensor's). `tokenizer`: path to the tokenizer.model to ship
    with the weights; an HF export also gets transformers' tokenizer files (_write_hf_tokenizer).
    HF weights are split into files of at most `max_shard_bytes`. `extra_json`: file name ->
    object, JSON files that appear with the weights in the same rename (e.g. a provenance record).
    """
    if format not in ("meta", "hf"):
        raise ValueError(f"format must be 'meta' or 'hf', got {format!r}")
    expected = param_shapes(args)
    missing = [n for n in expected if n not in state]
    unexpected = [n for n in state if n not in expected]
    wrong = [f"{n}: {_shape(state[n].shape)}, args expect {_shape(s)}"
             for n, s in expected.items() if n in state and tuple(state[n].shape) != s]
    if missing or unexpected or wrong:
        raise CheckpointError(f"state dict does not match {args}: missing {missing}, "
                              f"unexpected {unexpected}, shapes {wrong}")
    tok_file = _tokenizer_file(tokenizer)
    if tok_file is not None:
        n_words = _spm_pieces(tok_file)
        if n_words != args.vocab_size:
            raise CheckpointError(f"{tok_file}: {n_words} pieces, but vocab_size is "
                                  f"{args.vocab_size}")

    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not dest.is_dir():
        raise CheckpointError(f"{dest} exists and is not a directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would make the checkpoint private
    try:
        if format == "meta":
            with open(tmp / "params.json", "w") as f:
                json.dump(meta_params(args), f, indent=2)
            torch.save({n: _plain(state[n], dtype) for n in expected}, tmp / "consolidated.00.pth")
        else:
            _write_hf(state, list(expected), args, tmp, dtype, max_shard_bytes)
        if tok_file is not None:
            shutil.copyfile(tok_file, tmp / "tokenizer.model")
            if format == "hf":
                _write_hf_tokenizer(tok_file, tmp, args)
        for name, obj in (extra_json or {}).items():
            with open(tmp / name, "w") as f:
                json.dump(obj, f, indent=1)
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_hf(state, names, args, out: Path, dtype, max_shard_bytes):
    from safetensors.torch import save_file  # only HF checkpoints need the package
    dtype = dtype or state[names[0]].dtype
    nbytes = {n: state[n].numel() * torch.empty(0, dtype=dtype).element_size() for n in names}
    groups, size = [[]], 0  # planned first, so each file is converted and written on its own
    for name in names:
        if groups[-1] and size + nbytes[name] > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes[name]
    files = ["model.safetensors"] if len(groups) == 1 else \
        [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map = {}
    for file, group in zip(files, groups):
        tensors = {}
        for name in group:
            t = _plain(state[name], dtype)
            if name.endswith("attention.wq.weight"):
                t = hf_permute(t, args.n_heads).contiguous()
            elif name.endswith("attention.wk.weight"):
                t = hf_permute(t, args.n_kv_heads).contiguous()
            tensors[hf_name(name)] = t
            weight_map[hf_name(name)] = file
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        del tensors
    with open(out / "config.json", "w") as f:
        json.dump(hf_config(args, dtype), f, indent=2)
    if len(files) > 1:
        with open(out / "model.safetensors.index.json", "w") as f:
            json.dump({"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map},
                      f, indent=2)


def _write_hf_tokenizer(tok_file: Path, out: Path, args: ModelArgs):
    """Beside tokenizer.model: tokenizer_config.json, and tokenizer.json + special_tokens_map.json
    copied from beside the source tokenizer.model when it has them (an HF checkpoint's own), else
    written from it (hf_tokenizer_json; skipped with a warning for a model it cannot reproduce)."""
    with open(out / "tokenizer_config.json", "w") as f:
        json.dump({**HF_TOKENIZER_CONFIG, "model_max_length": args.max_seq_len}, f, indent=2)
    src = tok_file.parent
    if (src / "tokenizer.json").is_file():
        _check_tokenizer_json(src / "tokenizer.json", args.vocab_size)
        shutil.copyfile(src / "tokenizer.json", out / "tokenizer.json")
    else:
        try:
            fast = hf_tokenizer_json(tok_file)
        except ValueError as e:
            fast = None
            warnings.warn(f"{e}; the export has no tokenizer.json (transformers converts "
                          f"tokenizer.model itself when protobuf is installed)")
        if fast is not None:
            with open(out / "tokenizer.json", "w", encoding="utf-8") as f:
                json.dump(fast, f, indent=2, ensure_ascii=False)
    if (src / "special_tokens_map.json").is_file():
        shutil.copyfile(src / "special_tokens_map.json", out / "special_tokens_map.json")
    else:
        with open(out / "special_tokens_map.json", "w") as f:
            names = ("bos_token", "eos_token", "unk_token")
            json.dump({k: HF_TOKENIZER_CONFIG[k] for k in names}, f, indent=2)


def _check_tokenizer_json(file: Path, vocab_size: int):
    """A tokenizer.json to ship must not name ids the embedding lacks (added tokens beyond it)."""
    tj = _read_json(file)
    vocab = tj.get("model", {}).get("vocab") or {}
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
    ids += [t["id"] for t in tj.get("added_tokens") or [] if isinstance(t.get("id"), int)]
    if ids and max(ids) >= vocab_size:
        raise CheckpointError(f"{file}: has token id {max(ids)}, but the embedding has "
                              f"{vocab_size} rows: the tokenizer belongs to another model")


def save_model(model: Transformer, path, format: str = "meta", tokenizer=None,
               dtype: Optional[torch.dtype] = None, **kwargs):
    """Save a Transformer as a Meta or HF checkpoint directory (see save_checkpoint)."""
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    save_checkpoint(model.state_dict(), model.args, path, format, tokenizer, dtype, **kwargs)
