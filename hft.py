"""Half Fine-Tuning (HFT): in every training stage, update a random half of the parameters and
leave the other half exactly where the stage found it.

Why. Sequential fine-tuning (pre-train -> SFT -> DPO -> task after task) overwrites what earlier
stages learned. The pilot of Hui et al. ("HFT: Half Fine-Tuning for Large Language Models",
arXiv 2404.18466): put half of LLaMA-2-Chat-7B's matrices back to their LLaMA-2-7B values, and
most of the lost world knowledge (NaturalQuestions, TriviaQA, HotpotQA) comes back while most of
the chat ability stays. So HFT freezes a random half in each stage and draws a new half for the
next one. `python hft.py reset` repeats that pilot on any two checkpoints (reset_half, at the end).

The rule (the paper's default, "category" level), per transformer layer:
    attention     wq wk wv wo              2 of 4 train, chosen at random per layer
    feed-forward  w1 w2 w3                 2 of 3 in a random half of the layers, 1 of 3 in the rest
    norms         attention_norm ffn_norm  1 of 2
tok_embeddings and output stay trainable (freezing them did worse in the paper), and so does the
final norm (not specified by the paper: our choice). At LLaMA-2-7B that is 3.50B of 6.74B (51.9%).

Why it works, the paper's reading. Write theta = theta0 + M*dtheta with a diagonal 0/1 mask M.
Training solves  min L(theta)  s.t.  ||(I-M)(theta-theta0)||^2 = 0,  bounded by the Lagrangian
min L(theta) + lambda*||(I-M)(theta-theta0)||^2: full fine-tuning plus an L2 penalty that pins the
frozen half to where the stage started.

Any ratio r (ours; r=0.5 is the paper's rule): in a category with n tensors per layer over L
layers exactly round(r*n*L) train, every layer gets floor(r*n) or one more, and the layers that get
one more are random. "round" is round-half-up, floor(x + 1/2), not Python's banker's round(); r is
read as the decimal it prints as (0.29 is 29/100), so no float error moves a count.

Other granularities, the paper's ablations and one beyond it:
    "layer"      round(r*L) whole layers train, chosen at random
    "model"      round(r*M) of all M layer tensors (norms included), anywhere, no per-layer balance
    "parameter"  every layer tensor trains, but only a random fraction r of its elements
                 (ElementMask; norms are masked too). It saves NO memory and NO time: gradients
                 and Adam state stay full size and are masked afterwards. It exists to answer the
                 paper's reviewers, who asked for element-wise masks, not to be fast.
    "none"       full fine-tuning (FFT), the baseline.
train_embeddings=False freezes tok_embeddings and output under every granularity.

What "frozen" means in code: requires_grad=False before FSDP wraps the model (no weight-gradient
GEMM, no gradient reduce-scatter) and no optimizer state, with a fresh optimizer each stage, so
every frozen tensor leaves the stage bitwise identical. The draw depends on (seed, stage) only, via
a private RNG: every rank and every process count get the same mask, and each stage a new one.

The trainer's order of calls:
    mask = make_mask(model, "category", 0.5, seed, stage)   # on resume: load_mask(path) instead
    save_mask(run_dir / "mask.json", mask)
    apply_mask(model, set(mask["trainable"]))               # before fully_shard
    emask = ElementMask(model, 0.5, seed, stage) if granularity == "parameter" else None
    opt = torch.optim.AdamW(param_groups(model, weight_decay, emask), lr=lr)
    loss.backward(); emask.mask_grads(); clip; emask.apply_weight_decay(lr, wd); opt.step()
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from fractions import Fraction

import torch
from torch import nn

GRANULARITIES = ("category", "layer", "model", "parameter", "none")
CATEGORIES = ("attention", "feed_forward", "norm")
EMBEDDINGS = ("tok_embeddings.weight", "output.weight")
FINAL_NORM = "norm.weight"
MASK_KEYS = ("granularity", "ratio", "seed", "stage", "trainable", "summary")

_LAYER_NAME = re.compile(
    r"layers\.(\d+)\.(?:(attention|feed_forward)\.w[qkvo123]|attention_norm|ffn_norm)\.weight")
# Module wrappers that insert a path segment: torch.compile, activation checkpointing, FSDP1, DDP.
_WRAPPERS = {"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module", "module"}


def meta_name(name: str) -> str:
    """The Meta checkpoint name of a parameter, with wrapper segments removed. FSDP2 keeps names."""
    return ".".join(s for s in name.split(".") if s not in _WRAPPERS)


def _classify(name: str) -> tuple[str, int | None]:
    """Meta name -> (category, layer index or None for the tensors outside the layers)."""
    m = _LAYER_NAME.fullmatch(name)
    if m:
        return (m[2] or "norm"), int(m[1])
    if name in EMBEDDINGS:
        return "embeddings", None
    if name == FINAL_NORM:
        return "final_norm", None
    raise ValueError(f"hft: parameter {name!r} is not a LLaMA-2 tensor HFT can place (expected "
                     "Meta names: layers.N.attention.wq.weight, layers.N.ffn_norm.weight, "
                     "output.weight, ...)")


def check_settings(granularity: str, ratio: float):
    """The [hft] settings, each error naming its key (train.py checks configs with it)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"hft.granularity = {granularity!r}: expected one of "
                         f"{', '.join(GRANULARITIES)}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"hft.ratio = {ratio!r}: expected a number in (0, 1]")


def _fraction(ratio: float) -> Fraction:
    return Fraction(repr(float(ratio)))  # 0.29 -> 29/100 exactly, not the binary float below it


def _round(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))  # round half up; Python's round(2.5) is 2


def _layers(names: list[str]) -> list[dict[str, list[str]]]:
    """Group the layer tensors: one {category: [sorted names]} per layer, in layer order."""
    by_layer: dict[int, dict[str, list[str]]] = {}
    for name in names:
        cat, layer = _classify(name)
        if layer is not None:
            by_layer.setdefault(layer, {c: [] for c in CATEGORIES})[cat].append(name)
    layers = [{c: sorted(v) for c, v in by_layer[i].items()} for i in sorted(by_layer)]
    for cat in CATEGORIES:
        sizes = {len(layer[cat]) for layer in layers}
        if len(sizes) > 1:
            raise ValueError(f"hft: layers hold different numbers of {cat} tensors "
                             f"({sorted(sizes)}); the per-layer rule needs the same set "
                             "in every layer")
    return layers


def _balanced(groups: list[list[str]], q: Fraction, rng: random.Random) -> list[str]:
    """round(q*n*L) names from L groups of n: floor(q*n) from each, one more from a random few."""
    L, n = len(groups), len(groups[0])
    base = math.floor(q * n)
    plus = set(rng.sample(range(L), _round(q * n * L) - base * L))
    return [name for i, g in enumerate(groups) for name in rng.sample(g, base + (i in plus))]


def select_trainable(model: nn.Module, granularity: str = "category", ratio: float = 0.5,
                     seed: int = 0, stage: int = 0, train_embeddings: bool = True) -> set[str]:
    """The Meta names of the parameters that train in this stage (see the module docstring)."""
    check_settings(granularity, ratio)
    names = [meta_name(n) for n, _ in model.named_parameters()]
    layers = _layers(names)
    q = _fraction(ratio)
    # A private RNG seeded from (seed, stage) alone: a str seed is hashed with SHA-512, so the draw
    # is the same in every process (PYTHONHASHSEED, rank, world size and global RNG play no part).
    rng = random.Random(f"hft:{seed}:{stage}")
    every = [n for layer in layers for c in CATEGORIES for n in layer[c]]
    if granularity in ("none", "parameter"):
        chosen = every
    elif granularity == "category":
        chosen = [n for c in CATEGORIES for n in _balanced([layer[c] for layer in layers], q, rng)]
    elif granularity == "layer":
        picked = rng.sample(range(len(layers)), _round(q * len(layers)))
        chosen = [n for i in picked for c in CATEGORIES for n in layers[i][c]]
    else:  # "model"
        chosen = rng.sample(every, _round(q * len(every)))
    outside = [n for n in names
               if _classify(n)[1] is None and (train_embeddings or n not in EMBEDDINGS)]
    return set(chosen) | set(outside)


def apply_mask(model: nn.Module, trainable: set[str]):
    """requires_grad=False on every parameter not in `trainable`. Call it before FSDP wraps the
    model, so frozen tensors get no gradient buffer and no reduce-scatter."""
    params = {meta_name(n): p for n, p in model.named_parameters()}
    unknown = sorted(set(trainable) - params.keys())
    if unknown:
        raise ValueError(f"hft: {len(unknown)} trainable name(s) are not parameters of the model: "
                         f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}")
    for name, p in params.items():
        p.requires_grad_(name in trainable)


def param_groups(model: nn.Module, weight_decay: float,
                 element_mask: "ElementMask | None" = None) -> list[dict]:
    """AdamW parameter groups from the trainable parameters only (frozen ones get no state).

    Weight decay on matrices and embeddings (ndim >= 2), none on norm weights: the common practice
    of nanoGPT- and torchtitan-style recipes (the paper's recipes use weight_decay 0 anyway).
    Tensors under an ElementMask get weight_decay 0 here: ElementMask.apply_weight_decay decays
    only their trainable elements."""
    masked = element_mask.names if element_mask is not None else set()
    decay, no_decay, by_mask = [], [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (by_mask if meta_name(name) in masked else decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0},
              {"params": by_mask, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (shares storage under no_grad), or the tensor itself."""
    return t.to_local() if hasattr(t, "device_mesh") and hasattr(t, "to_local") else t


class ElementMask:
    """The "parameter" granularity: every layer tensor trains, but only a random fraction `ratio`
    of its elements; the rest stay bitwise unchanged. Saves no memory and no time.

    Build it after FSDP sharding (parameters may be DTensors) and before the first forward. Each
    tensor's full mask is drawn on the CPU from (seed, stage, name), so it does not depend on the
    device, rank or world size; each rank keeps only its own shard of it.

    Why zeroing the gradient is enough for AdamW: with a fresh optimizer (m = v = 0) and g = 0 at
    an element on every step, m = b1*m + (1-b1)*0 stays 0 and v = b2*v + (1-b2)*0 stays 0, so the
    step lr * m_hat / (sqrt(v_hat) + eps) is 0 / eps = 0 exactly, and gradient clipping only
    scales zeros. The one other thing AdamW does to a parameter is decoupled weight decay
    p *= 1 - lr*wd, which would move frozen elements: so these tensors get weight_decay 0 in the
    optimizer and apply_weight_decay decays the trainable elements only.
    """

    def __init__(self, model: nn.Module, ratio: float, seed: int = 0, stage: int = 0):
        check_settings("parameter", ratio)
        self.ratio, self.seed, self.stage = ratio, seed, stage
        # name -> (param, frozen shard)
        self.masks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._trainable = 0
        for name, p in model.named_parameters():
            name = meta_name(name)
            if _classify(name)[1] is None:
                continue  # embeddings and final norm: trainable or frozen whole (train_embeddings)
            digest = hashlib.sha256(f"hft:{seed}:{stage}:{name}".encode()).digest()
            gen = torch.Generator(device="cpu").manual_seed(
                int.from_bytes(digest[:8], "little") >> 1)
            keep = torch.rand(tuple(p.shape), generator=gen) < ratio
            self._trainable += int(keep.sum())
            frozen = ~keep
            if hasattr(p, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor
                # Every rank holds the same full mask, so split locally (src_data_rank=None: no
                # scatter) with the parameter's own placements, e.g. FSDP2's Shard(0).
                frozen = distribute_tensor(frozen, p.device_mesh, p.placements,
                                           src_data_rank=None).to_local()
            self.masks[name] = (p, frozen.to(_local(p).device))

    @property
    def names(self) -> set[str]:
        return set(self.masks)

    def trainable_elements(self) -> int:
        """Trainable elements of the masked (layer) tensors, counted over the full, unsharded
        tensors."""
        return self._trainable

    @torch.no_grad()
    def mask_grads(self):
        """Zero the frozen elements' gradients. Call after the last backward of the step (FSDP2
        has reduce-scattered the gradients) and before gradient clipping."""
        for name, (p, frozen) in self.masks.items():
            if p.grad is None:
                continue
            g = _local(p.grad)
            if g.shape != frozen.shape:
                raise ValueError(f"hft: gradient of {name} has local shape {tuple(g.shape)} but "
                                 f"its element mask has {tuple(frozen.shape)}; "
                                 f"build ElementMask after sharding")
            g.masked_fill_(frozen, 0)  # masked_fill, not mul: 0 * inf would be nan

    @torch.no_grad()
    def apply_weight_decay(self, lr: float, weight_decay: float):
        """Decoupled weight decay on the trainable elements only, as AdamW would apply it (before
        its update, skipping tensors without a gradient, none on norms). Call just before
        optimizer.step() with that step's lr."""
        if lr * weight_decay == 0:
            return
        for p, frozen in self.masks.values():
            if p.ndim < 2 or p.grad is None:
                continue
            w = _local(p)
            # where() keeps frozen elements as they are, bit for bit (a factor of 1.0 would too).
            w.copy_(torch.where(frozen, w, w * (1 - lr * weight_decay)))


def summarize(model: nn.Module, trainable: set[str], element_ratio: float | None = None) -> dict:
    """Trainable and total parameters per category and overall (numel only: works on meta).
    With element_ratio (the "parameter" granularity) layer tensors count round(ratio * numel),
    the expected number of trainable elements."""
    rows = {c: {"trainable": 0, "total": 0}
            for c in (*CATEGORIES, "embeddings", "final_norm", "total")}
    q = _fraction(element_ratio) if element_ratio is not None else None
    for name, p in model.named_parameters():
        name = meta_name(name)
        cat, layer = _classify(name)
        n = p.numel()
        k = 0 if name not in trainable else n if q is None or layer is None else _round(q * n)
        for row in (rows[cat], rows["total"]):
            row["trainable"] += k
            row["total"] += n
    for row in rows.values():
        row["fraction"] = round(row["trainable"] / row["total"], 6) if row["total"] else 0.0
    return {**rows, "element_ratio": element_ratio}


def format_summary(summary: dict) -> str:
    """The summary as a small aligned table, e.g. for the training log."""
    lines = [f"{'category':<14}{'trainable':>17}{'total':>17}{'%':>8}"]
    for cat in (*CATEGORIES, "embeddings", "final_norm", "total"):
        r = summary[cat]
        pct = 100.0 * r["trainable"] / r["total"] if r["total"] else 0.0
        lines.append(f"{cat:<14}{r['trainable']:>17,}{r['total']:>17,}{pct:>8.1f}")
    if summary.get("element_ratio") is not None:
        lines.append(f"(element mask, ratio {summary['element_ratio']}: layer counts are "
                     f"expected values)")
    return "\n".join(lines)


def make_mask(model: nn.Module, granularity: str = "category", ratio: float = 0.5, seed: int = 0,
              stage: int = 0, train_embeddings: bool = True) -> dict:
    """The contents of mask.json for one stage: the draw, its inputs, and the summary."""
    trainable = select_trainable(model, granularity, ratio, seed, stage, train_embeddings)
    return {"granularity": granularity, "ratio": float(ratio), "seed": int(seed),
            "stage": int(stage), "train_embeddings": bool(train_embeddings),
            "trainable": sorted(trainable),
            "summary": summarize(model, trainable, ratio if granularity == "parameter" else None)}


def save_mask(path: str | os.PathLike, mask: dict):
    """Write mask.json atomically: a crash never leaves half a mask."""
    from checkpoint import write_json
    write_json(path, mask, indent=1)


def load_mask(path: str | os.PathLike) -> dict:
    """Read and check a mask.json written by save_mask; errors name the file and the key."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            mask = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: "
                         f"{e.msg})") from None
    if not isinstance(mask, dict):
        raise ValueError(f"{path}: expected a JSON object with keys {', '.join(MASK_KEYS)}")
    missing = [k for k in MASK_KEYS if k not in mask]
    if missing:
        raise ValueError(f"{path}: missing key(s) {', '.join(missing)}")
    try:
        check_settings(mask["granularity"], mask["ratio"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if (not isinstance(mask["trainable"], list)
            or not all(isinstance(n, str) for n in mask["trainable"])):
        raise ValueError(f"{path}: 'trainable' must be a list of parameter names")
    for key in ("seed", "stage"):
        if isinstance(mask[key], bool) or not isinstance(mask[key], int):
            raise ValueError(f"{path}: {key!r} must be an integer, got {mask[key]!r}")
    return mask


RESET_GRANULARITIES = ("category", "layer", "model")


def _shape_mismatches(a, b) -> list[str]:
    """'name: A has [shape], B has [shape]' for each tensor two CheckpointReaders disagree on."""
    def shape(reader, name):
        return str(list(reader.expected[name])) if name in reader.expected else "no such tensor"
    return [f"{n}: {a.path} has {shape(a, n)}, {b.path} has {shape(b, n)}"
            for n in {**a.expected, **b.expected} if a.expected.get(n) != b.expected.get(n)]


def reset_half(base, tuned, out, ratio: float = 0.5, seed: int = 0, granularity: str = "category",
               format: str | None = None) -> dict:
    """The paper's pilot (its Figure 1): put part of a fine-tuned model back to its base values.

    The layer tensors that select_trainable(granularity, ratio, seed, stage 0) picks come from
    `base`, the other layer tensors from `tuned`: at ratio 0.5, category level, the half HFT would
    train in stage 0 with that seed, per layer 2 of 4 attention matrices, 1 or 2 of 3
    feed-forward, 1 of 2 norms.
    Everything outside the layers (tok_embeddings, output, the final norm) comes from `tuned`: the
    pilot resets half of the transformer's matrices, and the category rule, which it motivated,
    places only layer tensors (HFT always trains the others). Either checkpoint may be Meta or HF,
    read one tensor at a time; they must have the same shapes. Written atomically to `out` in
    `format` (default: the tuned checkpoint's), in the tuned checkpoint's dtype, with the tuned
    tokenizer and reset.json (the reset names and a summary). Returns reset.json's contents.
    """
    from tqdm import tqdm
    from checkpoint import CheckpointError, CheckpointReader, save_checkpoint
    from model import Transformer
    if granularity not in RESET_GRANULARITIES:
        raise ValueError(f"reset: granularity {granularity!r}: expected one of "
                         f"{', '.join(RESET_GRANULARITIES)}")
    check_settings(granularity, ratio)
    b, t = CheckpointReader(base), CheckpointReader(tuned)
    t.validate()
    b.validate()
    bad = _shape_mismatches(b, t)
    if bad:
        raise CheckpointError("reset: base and tuned differ in shape:\n  " + "\n  ".join(bad[:20]))
    with torch.device("meta"):
        model = Transformer(t.args)
    selected = select_trainable(model, granularity, ratio, seed, stage=0)
    reset = {n for n in selected if _classify(n)[1] is not None}  # layer tensors only
    names = list(t.expected)
    # Meta files are memory-mapped: a tensor kept in its dtype is read only when it is written.
    dtype = t.get(names[0], None).dtype
    state = {n: (b if n in reset else t).get(n, dtype)
             for n in tqdm(names, desc="reset", leave=False)}
    rows = summarize(model, reset)
    info = {"base": str(base), "tuned": str(tuned), "granularity": granularity,
            "ratio": float(ratio), "seed": int(seed), "stage": 0, "reset": sorted(reset),
            "summary": {c: {"reset": r["trainable"], "total": r["total"], "fraction": r["fraction"]}
                        for c, r in rows.items() if isinstance(r, dict)}}
    tok = t.path / "tokenizer.model"
    save_checkpoint(state, t.args, out, format or t.format, tokenizer=tok if tok.exists() else None,
                    extra_json={"reset.json": info})
    return info


def main(argv=None) -> int:
    """python hft.py reset --base DIR --tuned DIR --out DIR [--ratio 0.5] [--seed 0]
    [--granularity category] [--format meta|hf]"""
    import argparse
    import sys
    ap = argparse.ArgumentParser(prog="hft.py", description="Half Fine-Tuning tools.")
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("reset", help="the paper's pilot: put the selected layer tensors of a "
                                     "fine-tuned checkpoint back to the base's (reset_half)")
    r.add_argument("--base", required=True, help="the model before fine-tuning (Meta or HF)")
    r.add_argument("--tuned", required=True, help="the fine-tuned model (Meta or HF)")
    r.add_argument("--out", required=True, help="the checkpoint directory to write")
    r.add_argument("--ratio", type=float, default=0.5, help="share of the layer tensors reset")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--granularity", default="category", choices=RESET_GRANULARITIES)
    r.add_argument("--format", choices=("meta", "hf"), help="default: the tuned checkpoint's")
    a = ap.parse_args(argv)
    try:
        info = reset_half(a.base, a.tuned, a.out, a.ratio, a.seed, a.granularity, a.format)
    except (ValueError, OSError) as e:
        print(f"hft.py reset: {e}", file=sys.stderr)
        return 2
    total = info["summary"]["total"]
    print(f"{a.out}: {len(info['reset'])} tensors ({total['reset']:,} of {total['total']:,} "
          f"parameters, {100 * total['fraction']:.1f}%) from {a.base}, the rest from {a.tuned}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
