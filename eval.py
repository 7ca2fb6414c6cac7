"""Evaluation: how much a fine-tuned model forgets, in the numbers the paper reports.

    python eval.py --model runs/trace/FOMC --data trace/C-STANCE/test.json nq.jsonl [--out r.json]
    torchrun --nproc_per_node=8 eval.py --model ... --data ...   # examples split over ranks
    python eval.py --data trace/Py150/test.json --predictions vllm.jsonl  # made elsewhere, no model

- metrics: `exact_match` (SQuAD), `accuracy`, `rouge_l` (rouge-score), `edit_similarity`
  (rapidfuzz fuzz.ratio / 100), `sari` (Xu et al. 2016, as HF evaluate computes it), per example
  in [0, 1]; TRACE's tasks are scored as TRACE's own scripts score them (`TRACE_METRICS`):
  `trace_accuracy` (`==`, nothing stripped), `trace_scienceqa` (the first character),
  `trace_rouge_l` (the `rouge` package 1.0.1), `trace_edit_similarity` (Py150's literals
  replaced, then fuzzywuzzy's rounded ratio) and `sari`; `continual_metrics(R)` gives OP and BWT;
- `generate`: batched greedy decoding through the model's KV cache, batches bounded in tokens;
- `gathered`: an FSDP2-sharded model all-gathered once for a whole evaluation, not per token;
- `evaluate_file`: one TRACE / conversation / knowledge-probe / multiple-choice / text file ->
  score, per-example predictions; `score_predictions`: the same for predictions made elsewhere;
- `write_report`: the stage runner's R matrix, OP, BWT and probe retention, as JSON and markdown.

Every model call is made the same number of times on every rank, so neither an FSDP-sharded
model's forward (which all-gathers parameters across ranks, outside `gathered`) nor the decode
loop's stop vote deadlocks on a rank that ran out of examples.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import math
import os
import re
import string
import sys
import weakref
from collections import Counter

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
from checkpoint import atomic_file, load_model, write_json
from data import rank_world

# Metrics, one example at a time, each in [0, 1].


def _lcs_length(a, b) -> int:
    """Length of the longest common subsequence of two sequences (characters or tokens).

    Bit-parallel (Hyyro 2004, as rapidfuzz does it): bit i of `v` is 0 where row i of the usual
    DP table steps up, so one big-integer update per element of `b` replaces a row of len(a)
    cells; Py150 code completions are long enough for the plain O(n*m) table to be slow."""
    if not a or not b:
        return 0
    positions = {}
    for i, x in enumerate(a):
        positions[x] = positions.get(x, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for y in b:
        u = v & positions.get(y, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def _as_list(refs) -> list[str]:
    return [refs] if isinstance(refs, str) else list(refs)


_PUNCTUATION = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD's normalisation: lowercase, drop punctuation, drop articles, squeeze whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(pred: str, refs) -> float:
    """1.0 if the prediction equals any reference after SQuAD normalisation."""
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(r) for r in _as_list(refs)))


def accuracy(pred: str, ref) -> float:
    """Exact string match after stripping whitespace (TRACE's classification tasks)."""
    return float(any(pred.strip() == r.strip() for r in _as_list(ref)))


def _rouge_tokens(s: str) -> list[str]:
    # rouge-score's default tokenizer: lowercase, anything outside [a-z0-9] is a separator.
    return re.sub(r"[^a-z0-9]+", " ", s.lower()).split()


def rouge_l(pred: str, ref) -> float:
    """ROUGE-L F1 as Google's rouge-score computes it (no stemming); best over references."""
    p = _rouge_tokens(pred)
    best = 0.0
    for r in _as_list(ref):
        t = _rouge_tokens(r)
        lcs = _lcs_length(t, p)
        if lcs:
            prec, rec = lcs / len(p), lcs / len(t)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best


def edit_similarity(pred: str, ref) -> float:
    """1 - Indel distance / (len(pred) + len(ref)) over characters, i.e. rapidfuzz's unrounded
    fuzz.ratio / 100 (TRACE's Py150 metric; fuzzywuzzy's ratio is the same number rounded to an
    int). Two empty strings are identical: 1.0, as rapidfuzz says. Best over references."""
    best = 0.0
    for r in _as_list(ref):
        total = len(pred) + len(r)
        best = max(best, 1.0 if total == 0 else 2 * _lcs_length(pred, r) / total)
    return best


# TRACE's own scoring (BeyonderXX/TRACE, evaluations/eval_<task>.py over metrics.py, with the
# packages its requirements pin: rouge==1.0.1, fuzzywuzzy without python-Levenshtein). Its
# scripts skip an empty prediction or answer but still divide by the number of examples, so an
# empty one scores 0 and counts in the mean; where its script would raise instead (an empty
# ScienceQA prediction, a MeetingBank text of only dots), these score 0 too.


def trace_accuracy(pred: str, ref) -> float:
    """TRACE's `caculate_accuracy` (C-STANCE, FOMC, NumGLUE-cm/ds): `prediction == answer`, no
    whitespace stripped, so "A\n" is wrong for "A"; empty scores 0. Best over references."""
    return float(pred != "" and any(pred == r for r in _as_list(ref)))


def trace_scienceqa(pred: str, ref) -> float:
    """TRACE's eval_ScienceQA: accuracy of the first character only, the answer letter of
    "B\nBecause ..."; an empty prediction scores 0 (TRACE's `datium[0]` would raise)."""
    return float(pred != "" and any(pred[0] == r[:1] for r in _as_list(ref)))


_PY150_LITERAL = re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S)


def _py150_postprocess(code: str) -> str:
    """eval_Py150.postprocess, step for step (the order matters when a literal's own text
    looks like a placeholder): bare placeholders first, then each <KIND_LIT:text> -> text."""
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    for kind, text in _PY150_LITERAL.findall(code):
        code = code.replace(f"<{kind}_LIT:{text}>", text)
    return code


def trace_edit_similarity(pred: str, ref) -> float:
    """TRACE's Py150 score / 100: literals replaced in prediction and answer alike, then
    fuzzywuzzy's fuzz.ratio(prediction, answer). Without python-Levenshtein that is difflib's
    SequenceMatcher(None, pred, ref).ratio() (autojunk and its asymmetry included) x 100,
    rounded to an int by Python's round (half to even); 100 for equal strings, 0 when either is
    empty after the replacement. Best over references."""
    p = _py150_postprocess(pred)
    best = 0
    for r in map(_py150_postprocess, _as_list(ref)):
        if p and r:
            ratio = 100 if p == r else round(100 * difflib.SequenceMatcher(None, p, r).ratio())
            best = max(best, ratio)
    return best / 100


def _rouge_sentences(text: str) -> list[str]:
    # rouge 1.0.1: split on ".", drop empty pieces, squeeze whitespace (a blank piece stays "").
    return [" ".join(s.split()) for s in text.split(".") if s]


def _recon_lcs_words(x: list[str], y: list[str]) -> set[str]:
    """The words of the one LCS of x and y that rouge 1.0.1's `_recon_lcs` backtracks to: on a
    match go diagonally, else up when the cell above is strictly larger, else left. Which LCS
    it finds matters: ROUGE-L counts the distinct words of the union of these."""
    table = [[0] * (len(y) + 1)]
    for a in x:
        prev, row = table[-1], [0]
        for j, b in enumerate(y):
            row.append(prev[j] + 1 if a == b else max(prev[j + 1], row[j]))
        table.append(row)
    words, i, j = set(), len(x), len(y)
    while i and j:
        if x[i - 1] == y[j - 1]:
            words.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def _rouge_pkg_l(pred: str, ref: str) -> float:
    """rouge 1.0.1's `Rouge(metrics=["rouge-l"]).get_scores(ref, pred)["rouge-l"]["f"]`, the
    arguments in TRACE's order (its `score_rouge(target, prediction)` passes the answer as the
    hypothesis). Summary-level ROUGE-L over sentences split on ".", tokens split on spaces, case
    kept: the union of per-sentence-pair LCS words, counted as distinct words, as are both
    lengths (the package's `exclusive=True` sets)."""
    if pred == "" or ref == "":
        return 0.0
    hyp, refs = _rouge_sentences(ref), _rouge_sentences(pred)
    if not hyp or not refs:  # only dots: the package raises "Collections must contain ..."
        return 0.0
    m = len({w for s in refs for w in s.split(" ")})
    n = len({w for s in hyp for w in s.split(" ")})
    union = set()
    for r in refs:
        for h in hyp:
            union |= _recon_lcs_words(r.split(" "), h.split(" "))
    r_lcs, p_lcs = len(union) / m, len(union) / n
    return 2.0 * ((p_lcs * r_lcs) / (p_lcs + r_lcs + 1e-8))


def trace_rouge_l(pred: str, ref) -> float:
    """TRACE's MeetingBank score: the `rouge` package's ROUGE-L F (see `_rouge_pkg_l`); empty
    scores 0. Best over references."""
    return max((_rouge_pkg_l(pred, r) for r in _as_list(ref)), default=0.0)


def _tokenize_13a(line: str) -> str:
    """sacrebleu's 13a tokenizer (mteval-v13a), which HF evaluate's SARI applies before
    splitting."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = (line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<")
                .replace("&gt;", ">"))
    line = f" {line} "
    line = re.sub(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])", r" \1 ", line)
    line = re.sub(r"([^0-9])([\.,])", r"\1 \2 ", line)  # period and comma unless after a digit
    line = re.sub(r"([\.,])([^0-9])", r" \1 \2", line)  # ... or unless before a digit
    line = re.sub(r"([0-9])(-)", r"\1 \2 ", line)       # dash after a digit
    return " ".join(line.split())


def _ngrams(tokens: list[str], n: int) -> list[str]:
    return [" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def _sari_ngram(src: list[str], pred: list[str],
                refs: list[list[str]]) -> tuple[float, float, float]:
    """Keep F1, deletion precision and addition F1 for one n-gram order.

    Counts of source and prediction n-grams are scaled by the number of references, so a
    reference count r out of R references means "r/R of the references keep it". 0/0 counts as
    1 (a prediction that changes nothing it should not gets full marks), as HF evaluate does."""
    nref = len(refs)
    ref_c = Counter(g for r in refs for g in r)
    src_c = Counter({g: c * nref for g, c in Counter(src).items()})
    pred_c = Counter({g: c * nref for g, c in Counter(pred).items()})

    keep = src_c & pred_c                # kept by the system
    keep_good = keep & ref_c             # ... and by the references
    keep_all = src_c & ref_c             # kept by the references
    keep_p = sum(keep_good[g] / keep[g] for g in keep_good) / len(keep) if keep else 1.0
    keep_r = sum(keep_good.values()) / sum(keep_all.values()) if keep_all else 1.0
    keep_f = 2 * keep_p * keep_r / (keep_p + keep_r) if keep_p + keep_r > 0 else 0.0

    delete = src_c - pred_c              # deleted by the system
    delete_good = delete - ref_c         # ... and by the references
    del_p = sum(delete_good[g] / delete[g] for g in delete_good) / len(delete) if delete else 1.0

    add = set(pred_c) - set(src_c)       # additions are scored as sets, not counts
    add_all = set(ref_c) - set(src_c)
    add_good = len(add & set(ref_c))
    add_p = add_good / len(add) if add else 1.0
    add_r = add_good / len(add_all) if add_all else 1.0
    add_f = 2 * add_p * add_r / (add_p + add_r) if add_p + add_r > 0 else 0.0
    return keep_f, del_p, add_f


def sari(source: str, pred: str, refs) -> float:
    """SARI (Xu et al. 2016): mean over n = 1..4 of keep F1, deletion precision and addition
    F1, averaged; text lowercased and 13a-tokenized as HF evaluate's `sari` does (its
    score / 100)."""
    tok = lambda s: _tokenize_13a(s.lower()).split(" ")  # noqa: E731  "" -> [""] as in HF
    s, p, rs = tok(source), tok(pred), [tok(r) for r in _as_list(refs)]
    parts = [_sari_ngram(_ngrams(s, n), _ngrams(p, n), [_ngrams(r, n) for r in rs])
             for n in range(1, 5)]
    return sum(sum(x) for x in parts) / 12


def continual_metrics(R) -> dict:
    """TRACE's overall performance and backward transfer from R[t][i] = score on task i after
    stage t (0-100; rows of growing length, or a full square matrix).

    OP = mean_i R[T][i];  BWT = (1/T) * sum_i (R[T][i] - R[i][i])  (the i = T term is 0)."""
    T = len(R)
    if T == 0:
        raise ValueError("continual_metrics: R is empty")
    for t, row in enumerate(R):
        if len(row) < t + 1:
            raise ValueError(f"continual_metrics: row {t} has {len(row)} scores, needs at least "
                             f"{t + 1} (tasks 0..{t} after stage {t})")
    last = [float(x) for x in R[-1][:T]]
    return {"OP": sum(last) / T, "BWT": sum(last[i] - float(R[i][i]) for i in range(T)) / T}


GEN_METRICS = {
    "em": lambda ex, pred: exact_match(pred, ex["reference"]),
    "accuracy": lambda ex, pred: accuracy(pred, ex["reference"]),
    "rouge_l": lambda ex, pred: rouge_l(pred, ex["reference"]),
    "edit_sim": lambda ex, pred: edit_similarity(pred, ex["reference"]),
    "sari": lambda ex, pred: sari(ex["prompt"], pred, ex["reference"]),
    "trace_accuracy": lambda ex, pred: trace_accuracy(pred, ex["reference"]),
    "trace_scienceqa": lambda ex, pred: trace_scienceqa(pred, ex["reference"]),
    "trace_rouge_l": lambda ex, pred: trace_rouge_l(pred, ex["reference"]),
    "trace_edit_sim": lambda ex, pred: trace_edit_similarity(pred, ex["reference"]),
}
METRICS = (*GEN_METRICS, "mc", "ppl")

# TRACE's eight tasks and the metric its paper reports for each, computed as TRACE's scripts do
# (the trace_* metrics above), keyed by the task name with anything but letters and digits
# dropped (files live in C-STANCE/test.json, NumGLUE-cm/...). 20Minuten's SARI is HF's, as TRACE
# computes it (sources are the prompts, one reference each), which `sari` already is.
TRACE_METRICS = {"cstance": "trace_accuracy", "fomc": "trace_accuracy",
                 "meetingbank": "trace_rouge_l", "py150": "trace_edit_sim",
                 "scienceqa": "trace_scienceqa", "numgluecm": "trace_accuracy",
                 "numglueds": "trace_accuracy", "20minuten": "sari"}

# Running the model: every rank makes the same calls.

# The default bound on the positions one batch holds (prompts padded to the longest, plus the
# new tokens when generating), which bounds the KV cache: 2 (k, v) x n_layers x n_kv_heads x
# head_dim values per position, in bf16 512 KiB at 7B and 800 KiB at 13B, so 16384 positions
# are 8 GiB and 12.5 GiB (TRACE's 16 prompts x 4096 positions were 32 and 50 GiB). Short prompts
# still go 16 at a time (16 x (512 + 512)), full-length ones 4. Scoring (mc, ppl) holds float32
# logits for every position, 16384 x 32000 x 4 bytes = 2 GiB, and data.sequence_logps as much
# again twice over (the shifted copy, the log-softmax): 6 GiB at its peak.
MAX_BATCH_TOKENS = 16384

_HELD = weakref.WeakSet()  # FSDP modules that a `gathered` block keeps unsharded


@contextlib.contextmanager
def gathered(model):
    """Keep an FSDP2 model's parameters unsharded for the block: one all-gather per parameter
    group on entry instead of one per block in every forward (each decode step is a forward).
    On exit, an exception included, every module is resharded and its reshard_after_forward
    setting restored, so training goes on as before. Meanwhile every rank holds the whole model
    in its compute dtype (13.5 GB at 7B in bf16). It all-gathers: every rank must enter it.
    Nested blocks and a plain module: no-op."""
    from torch.distributed.fsdp import FSDPModule
    modules = [m for m in model.modules() if isinstance(m, FSDPModule) and m not in _HELD]
    if not modules:
        yield model
        return
    settings = _reshard_settings(modules)
    _HELD.update(modules)
    try:
        for m in modules:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        yield model
    finally:
        for m, (auto, infos) in zip(modules, settings):
            state = m._get_fsdp_state()
            state._auto_reshard_after_forward = auto
            for group, info in zip(state._fsdp_param_groups, infos):
                group.post_forward_mesh_info = info
            m.reshard()
        _HELD.difference_update(modules)


def _reshard_settings(modules) -> list:
    """Each FSDP module's reshard-after-forward setting. FSDP2 has a setter but no getter, so
    this reads torch 2.13's private state (test_eval's `gathered` tests fail if it moves)."""
    covered = set()
    for m in modules:  # pre-order: a root comes before the modules it holds
        if m not in covered:
            # A root turns its own resharding off at its first forward; done now, so that a
            # first forward inside the block cannot make the saved setting stale.
            m._get_fsdp_state()._lazy_init()
            covered.update(m.modules())
    states = [m._get_fsdp_state() for m in modules]
    return [(s._auto_reshard_after_forward,
             [g.post_forward_mesh_info for g in s._fsdp_param_groups])
            for s in states]


@contextlib.contextmanager
def _evaluating(model):
    """Eval mode, no autograd and the weights gathered for the block; train mode restored."""
    was_training = model.training
    model.eval()
    try:
        with gathered(model), torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _plan(lengths: list[int], batch_size: int, max_tokens: int, extra: int = 0) -> list[list[int]]:
    """Indices in batches, longest first (little padding), each with at most batch_size items and,
    when max_tokens > 0, at most max_tokens positions: len(batch) x (its longest + extra). A
    sequence that alone exceeds max_tokens still runs, as a batch of one."""
    if batch_size < 1:
        raise ValueError(f"eval: batch_size must be >= 1, got {batch_size}")
    if max_tokens < 0:
        raise ValueError(f"eval: max_batch_tokens must be >= 0 (0: no bound), got {max_tokens}")
    batches = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        last = batches[-1] if batches else []
        fits = last and (not max_tokens
                         or (len(last) + 1) * (lengths[last[0]] + extra) <= max_tokens)
        if fits and len(last) < batch_size:
            last.append(i)
        else:
            batches.append([i])
    return batches


def _run_batches(batches: list[list[int]], run, desc: str) -> list:
    """`run(indices, real)` -> one result per index, on this rank's share of the batches (every
    world-th, so loads are alike). A rank with one batch fewer runs a filler (the shortest
    sequence, `real` False), so every rank makes the same model calls. Every rank gets all
    results, in index order."""
    rank, world = rank_world()
    mine = batches[rank::world]
    mine += [None] * (-(-len(batches) // world) - len(mine))
    results = {}
    for idx in tqdm(mine, desc=desc, leave=False, disable=rank != 0):
        out = run(idx or batches[-1][-1:], idx is not None)
        if idx is not None:
            results.update(zip(idx, out))
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, results)
        for part in parts:
            results.update(part)
    return [results[i] for i in range(len(results))]


def _all_ranks(flag: bool, device) -> bool:
    """True when `flag` is true on every rank."""
    if rank_world()[1] == 1:
        return flag
    t = torch.tensor([0 if flag else 1], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() == 0


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _fit_prompt(ids: list[int], limit: int, bos_id: int) -> list[int]:
    """Left-truncate to `limit` tokens, keeping the end of the prompt (where the question is) and
    the leading bos the model always saw first."""
    if len(ids) <= limit:
        return ids
    head = ids[:1] if ids and ids[0] == bos_id else []
    return head + ids[len(ids) - (limit - len(head)):]


def _greedy_batch(model, batch: list[list[int]], max_new_tokens: int, eos_id: int, device, dtype,
                  real: bool = True) -> list[list[int]]:
    """Greedy continuation of left-padded prompts; returns the new tokens up to (not with) eos.
    A filler batch (`real` False) is done from the start: it only steps with the other ranks."""
    B, P = len(batch), max(len(ids) for ids in batch)
    tokens = torch.zeros(B, P, dtype=torch.long, device=device)  # pad id 0: masked out anyway
    key_mask = torch.zeros(B, P + max_new_tokens, dtype=torch.bool, device=device)
    for b, ids in enumerate(batch):
        tokens[b, P - len(ids):] = torch.tensor(ids, dtype=torch.long)
        key_mask[b, P - len(ids):P] = True
    cache = model.new_cache(B, P + max_new_tokens, dtype=dtype)
    logits = model(tokens, 0, cache, key_mask[:, :P], last_only=True)
    done = torch.full((B,), not real, dtype=torch.bool, device=device)
    out = []
    for step in range(max_new_tokens):
        next_tok = logits[:, -1].argmax(-1)
        out.append(next_tok)
        done |= next_tok == eos_id
        # Stop only when every rank is done: a rank that left early would strand the others
        # in a collective (the vote itself, or an FSDP all-gather outside `gathered`).
        if step == max_new_tokens - 1 or _all_ranks(bool(done.all()), device):
            break
        pos = P + step
        key_mask[:, pos] = True
        logits = model(next_tok[:, None], pos, cache, key_mask[:, :pos + 1])
    rows = torch.stack(out, dim=1).tolist()
    return [row[:row.index(eos_id)] if eos_id in row else row for row in rows]


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 8,
             max_batch_tokens: int = MAX_BATCH_TOKENS,
             dtype: torch.dtype | None = None) -> list[str]:
    """Greedy decoding of each prompt (bos prepended; left-truncated to fit max_seq_len together
    with max_new_tokens) through the KV cache, batched with left padding, longest first: at most
    batch_size prompts and max_batch_tokens positions (prompt length + max_new_tokens, each;
    0: no bound) a batch. Returns the decoded new tokens without eos, in prompt order.

    `dtype` is the compute dtype, which the KV cache is kept in (default: the dtype of the
    parameters as `gathered` holds them, which for FSDP2 mixed precision is its param_dtype).
    The model is gathered for the call. Under torch.distributed the batches are split over ranks
    and every rank gets all results."""
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    limit = model.args.max_seq_len - max_new_tokens
    if limit < 2:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} leaves {limit} of the model's "
                         f"max_seq_len={model.args.max_seq_len} positions for the prompt "
                         f"(need >= 2)")
    if not prompts:
        return []
    encoded = [_fit_prompt(tokenizer.encode(p, bos=True, eos=False), limit, tokenizer.bos_id)
               for p in prompts]
    batches = _plan(list(map(len, encoded)), batch_size, max_batch_tokens, extra=max_new_tokens)
    device, eos = _device(model), tokenizer.eos_id

    def run(idx, real):
        outs = _greedy_batch(model, [encoded[i] for i in idx], max_new_tokens, eos, device, dtype,
                             real)
        return [tokenizer.decode(ids) for ids in outs]

    with _evaluating(model):
        return _run_batches(batches, run, "generate")


def _logprobs_batch(model, batch: list[tuple[list[int], int]], device) -> list[float]:
    T = max(len(ids) for ids, _ in batch)
    tokens = torch.zeros(len(batch), T, dtype=torch.long, device=device)
    labels = torch.full((len(batch), T), data.IGNORE_INDEX, dtype=torch.long, device=device)
    for b, (ids, n) in enumerate(batch):
        tokens[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[b, len(ids) - n:len(ids)] = tokens[b, len(ids) - n:len(ids)]  # the scored tokens
    return data.sequence_logps(model(tokens), labels).tolist()


def score_continuations(model, seqs: list[tuple[list[int], int]], batch_size: int = 8,
                        max_batch_tokens: int = MAX_BATCH_TOKENS) -> list[float]:
    """Sum of log p(token | all tokens before it) over the last n tokens of each (ids, n).

    Right padding with plain causal attention: a real token never sees the padding after it.
    Batches, longest first, hold at most batch_size sequences and max_batch_tokens positions
    (0: no bound); the model is gathered for the call."""
    if not seqs:
        return []
    max_len = model.args.max_seq_len
    for ids, n in seqs:
        if not 1 <= n < len(ids) or len(ids) > max_len:
            raise ValueError(f"score_continuations: cannot score the last {n} of {len(ids)} tokens "
                             f"(need 1 <= n < len and len <= max_seq_len={max_len})")
    batches = _plan([len(ids) for ids, _ in seqs], batch_size, max_batch_tokens)
    device = _device(model)

    def run(idx, real):
        return _logprobs_batch(model, [seqs[i] for i in idx], device)

    with _evaluating(model):
        return _run_batches(batches, run, "score")


# Files: records -> examples -> scores.


def _default_metric(path: str, rec: dict) -> str:
    """TRACE's metric when the file or its folder is named after a TRACE task, else by shape."""
    stem = os.path.splitext(os.path.basename(path))[0]
    for name in (stem, os.path.basename(os.path.dirname(os.path.abspath(path)))):
        key = re.sub(r"[^a-z0-9]", "", name.lower())
        # "numgluecm" before a shorter key
        for task in sorted(TRACE_METRICS, key=len, reverse=True):
            if task in key:
                return TRACE_METRICS[task]
    if "choices" in rec:
        return "mc"
    if "text" in rec and not ("prompt" in rec or "messages" in rec or "question" in rec):
        return "ppl"
    if "question" in rec:
        return "em"
    return "accuracy"


def _reference(rec: dict, where: str, text: bool = True):
    """The record's 'answers' or 'answer'; for generation a string or a list of strings (numbers,
    as NumGLUE answers may be, are compared as their text)."""
    key = "answers" if "answers" in rec else "answer" if "answer" in rec else None
    if key is None:
        raise data.DataError(f"{where}: no 'answer' or 'answers' field (keys: {sorted(rec)})")
    ref = rec[key]
    if not text:
        return ref
    refs = ref if isinstance(ref, list) else [ref]
    if not refs or any(isinstance(r, bool) or not isinstance(r, (str, int, float)) for r in refs):
        raise data.DataError(f"{where}: '{key}' must be a string or a non-empty list of strings, "
                             f"got {ref!r}")
    refs = [r if isinstance(r, str) else str(r) for r in refs]
    return refs if isinstance(ref, list) else refs[0]


def _example(rec: dict, metric: str, where: str) -> dict:
    """One record in any supported format -> the prompt/reference (or choices, or text) it is
    scored on."""
    if metric == "ppl":
        if not isinstance(rec.get("text"), str):
            raise data.DataError(f"{where}: metric 'ppl' needs a 'text' string "
                                 f"(keys: {sorted(rec)})")
        return {"text": rec["text"]}
    if metric == "mc":
        question = rec.get("question", rec.get("prompt"))
        choices = rec.get("choices")
        if not isinstance(question, str) or not isinstance(choices, list) or not choices:
            raise data.DataError(f"{where}: metric 'mc' needs 'question' and a non-empty "
                                 f"'choices' list")
        choices = [str(c) for c in choices]
        ans = _reference(rec, where, text=False)
        if isinstance(ans, bool) or not isinstance(ans, (int, str)):
            raise data.DataError(f"{where}: 'answer' must be a choice index or a choice text, "
                                 f"got {ans!r}")
        if isinstance(ans, int):
            idx = ans
        elif ans in choices:
            idx = choices.index(ans)
        elif len(ans) == 1 and "A" <= ans.upper() <= "Z":  # MMLU letters A, B, C, D
            idx = ord(ans.upper()) - ord("A")
        else:
            raise data.DataError(f"{where}: answer {ans!r} is not one of the choices {choices}")
        if not 0 <= idx < len(choices):
            raise data.DataError(f"{where}: answer index {idx} is out of range for "
                                 f"{len(choices)} choices")
        return {"prompt": f"{question}\nAnswer:", "choices": choices, "answer": idx}
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs or not isinstance(msgs[-1], dict) \
                or msgs[-1].get("role") != "assistant":
            raise data.DataError(f"{where}: 'messages' must end with an assistant message "
                                 f"(the reference)")
        if not isinstance(msgs[-1].get("content"), str):
            raise data.DataError(f"{where}: the final assistant message has no 'content' string")
        return {"prompt": data.chat_prompt(msgs), "reference": msgs[-1]["content"].strip()}
    if "prompt" in rec:
        return {"prompt": rec["prompt"], "reference": _reference(rec, where)}
    if "question" in rec:
        return {"prompt": f"Q: {rec['question']}\nA:", "reference": _reference(rec, where)}
    raise data.DataError(f"{where}: metric {metric!r} needs 'prompt', 'question' or 'messages' "
                         f"(keys: {sorted(rec)})")


def read_eval_file(path: str, metric: str | None = None) -> tuple[str, list[dict]]:
    """Read an evaluation file. The metric is the caller's, else the records' `metric` field
    (one per file), else TRACE's for a TRACE task name, else chosen by the records' shape."""
    records = data.read_records(path)
    if not records:
        raise ValueError(f"{path}: no records to evaluate")
    if metric is None:
        named = {rec.get("metric") for _, rec in records}
        if len(named) > 1:
            raise data.DataError(f"{path}: records name different metrics "
                                 f"{sorted(map(str, named))}; one file is scored with one metric")
        metric = named.pop() or _default_metric(path, records[0][1])
    if metric not in METRICS:
        raise data.DataError(f"{path}: unknown metric {metric!r} "
                             f"(choose from {', '.join(METRICS)})")
    return metric, [_example(rec, metric, data.record_location(path, n))
                    for n, rec in records]


def _score_texts(examples, metric, texts) -> list[dict]:
    """Score generated texts against their examples: the one path for evaluate_file's own
    generations and score_predictions' texts from elsewhere."""
    fn = GEN_METRICS[metric]
    return [{"prompt": ex["prompt"], "prediction": p, "reference": ex["reference"],
             "score": fn(ex, p)}
            for ex, p in zip(examples, texts)]


def _result(path: str, metric: str, preds: list[dict], score: float) -> dict:
    return {"file": path, "metric": metric, "score": score, "n": len(preds),
            "higher_is_better": metric != "ppl", "predictions": preds}


def _mean_score(preds: list[dict]) -> float:
    return 100.0 * sum(p["score"] for p in preds) / len(preds)


def _score_choices(model, tokenizer, examples, batch_size, max_batch_tokens):
    """Pick the choice with the highest summed log-probability after the question prompt."""
    max_len = model.args.max_seq_len
    seqs = []
    for ex in examples:
        n_ctx = len(tokenizer.encode(ex["prompt"], bos=True, eos=False))
        for choice in ex["choices"]:
            # Encode prompt and choice together and score what follows the prompt's tokens, so
            # the choice is tokenized as it appears after the prompt (as lm-eval-harness does).
            whole = tokenizer.encode(f"{ex['prompt']} {choice}", bos=True, eos=False)
            n = max(1, len(whole) - n_ctx)
            if len(whole) > max_len:  # keep the end: the choice and the question before it
                whole = whole[-max_len:]
            seqs.append((whole, min(n, len(whole) - 1)))
    logps = iter(score_continuations(model, seqs, batch_size, max_batch_tokens))
    out = []
    for ex in examples:
        lp = [next(logps) for _ in ex["choices"]]
        pick = max(range(len(lp)), key=lambda i: lp[i])  # first of equal scores
        out.append({"prompt": ex["prompt"], "choices": ex["choices"],
                    "prediction": ex["choices"][pick], "reference": ex["choices"][ex["answer"]],
                    "logprobs": lp, "score": float(pick == ex["answer"])})
    return out


def _score_text(model, tokenizer, examples, batch_size, max_batch_tokens):
    """Per-text token NLL. Texts longer than max_seq_len are cut into windows overlapping by one
    token, so every token after bos is predicted exactly once."""
    L = model.args.max_seq_len
    seqs, owner = [], []
    for k, ex in enumerate(examples):
        ids = tokenizer.encode(ex["text"], bos=True, eos=False)
        for s in range(0, max(len(ids) - 1, 0), L - 1):
            window = ids[s:s + L]
            seqs.append((window, len(window) - 1))
            owner.append(k)
    nll, ntok = [0.0] * len(examples), [0] * len(examples)
    for k, (_, n), lp in zip(owner, seqs,
                             score_continuations(model, seqs, batch_size, max_batch_tokens)):
        nll[k] -= lp
        ntok[k] += n
    return [{"text": ex["text"][:200], "nll": nll[k], "tokens": ntok[k],
             "score": math.exp(nll[k] / ntok[k]) if ntok[k] else None}
            for k, ex in enumerate(examples)]


def evaluate_file(model, tokenizer, path: str, metric: str | None = None, max_new_tokens: int = 64,
                  batch_size: int = 8, max_batch_tokens: int = MAX_BATCH_TOKENS,
                  dtype: torch.dtype | None = None) -> dict:
    """Score a model on one file. `score` is 0-100 (mean of the per-example metric), or the
    perplexity exp(total NLL / total tokens) for 'ppl', where lower is better. Batching and
    `dtype` (the compute dtype) as in `generate`; the model is gathered once for the file (by the
    one `generate` or `score_continuations` call that scores it)."""
    metric, examples = read_eval_file(path, metric)
    if metric == "ppl":
        preds = _score_text(model, tokenizer, examples, batch_size, max_batch_tokens)
    elif metric == "mc":
        preds = _score_choices(model, tokenizer, examples, batch_size, max_batch_tokens)
    else:
        texts = generate(model, tokenizer, [ex["prompt"] for ex in examples], max_new_tokens,
                         batch_size, max_batch_tokens, dtype)
        preds = _score_texts(examples, metric, texts)
    if metric == "ppl":
        tokens = sum(p["tokens"] for p in preds)
        if tokens == 0:
            raise ValueError(f"{path}: no tokens to score (every text is empty)")
        return _result(path, metric, preds, math.exp(sum(p["nll"] for p in preds) / tokens))
    return _result(path, metric, preds, _mean_score(preds))


def score_predictions(path: str, predictions: list[str], metric: str | None = None) -> dict:
    """Score predictions made elsewhere (vLLM, HF generate, TRACE's own inference), one string
    per record in the file's order, exactly as `evaluate_file` scores a model that generated
    them: same metric choice, references and per-example metric, same result dict."""
    metric, examples = read_eval_file(path, metric)
    if metric not in GEN_METRICS:
        raise ValueError(f"{path}: metric {metric!r} scores the model's log-probabilities, not "
                         "generated text; run evaluate_file (eval.py --model) for it")
    if isinstance(predictions, str):
        raise ValueError(f"{path}: predictions must be a list of strings, got one string")
    predictions = list(predictions)
    if len(predictions) != len(examples):
        raise ValueError(f"{path}: {len(examples)} records but {len(predictions)} predictions "
                         "(one per record, in the file's order)")
    for i, p in enumerate(predictions):
        if not isinstance(p, str):
            raise ValueError(f"{path}: prediction [{i}] must be a string, got {type(p).__name__}")
    preds = _score_texts(examples, metric, predictions)
    return _result(path, metric, preds, _mean_score(preds))


def _checked_strings(path: str, items, where) -> list[str]:
    for i, p in enumerate(items):
        if not isinstance(p, str):
            raise data.DataError(f"{path}: {where(i)}: a prediction must be a string, "
                                 f"found {type(p).__name__}")
    return items


def read_predictions(path: str) -> list[str]:
    """Predictions made elsewhere, in record order: JSON Lines with one {"prediction": "..."} per
    line (blank lines skipped; lines split at "\n" only, as JSON may hold U+2028 raw), a JSON
    list of strings, or TRACE's inference output (an object whose "results" list holds them)."""
    text = data.read_text(path, "predictions")
    head = text.lstrip()[:1]
    if head in ("[", "{"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as e:
            if head == "[":
                raise data.malformed(path, e.lineno, e) from None
            whole = None  # JSON Lines: one value per line, read below
        if isinstance(whole, list):
            return _checked_strings(path, whole, lambda i: f"item [{i}]")
        if (isinstance(whole, dict) and "prediction" not in whole
                and isinstance(whole.get("results"), list)):
            return _checked_strings(path, whole["results"], lambda i: f"'results' [{i}]")  # TRACE's
    preds = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        rec = data.parse_json_line(path, n, line)
        if not isinstance(rec, dict) or "prediction" not in rec:
            raise data.DataError(f"{path}: line {n}: expected an object with a 'prediction' "
                                 f"string, found {json.dumps(rec, ensure_ascii=False)[:80]}")
        preds.append(_checked_strings(path, [rec["prediction"]], lambda i: f"line {n}")[0])
    if not preds:
        raise data.DataError(f"{path}: no predictions (empty file)")
    return preds


# The stage runner's report.


def _higher_is_better(result: dict) -> bool:
    return result.get("higher_is_better", result.get("metric") != "ppl")


def _num(x, digits: int = 2) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def write_report(out_dir: str, base: dict | None, stages: list[dict]) -> dict:
    """R matrix, OP and BWT over the stages that introduce eval files, and every probe's score
    and retention against the base model after each stage -> <out_dir>/report.json and report.md.

    Task i is stage i's eval files (their scores averaged). Retention is score / base score as a
    percentage; for lower-is-better metrics (perplexity) it is base / score, so 100% always
    means "as good as the base model" and less means forgotten."""
    base = base or {}
    base_evals = base.get("evals") or {}
    tasks = [s for s in stages if s.get("eval_files")]
    R = [[_task_score(t["evals"], tasks[i], f"stage {t['name']!r}") for i in range(k + 1)]
         for k, t in enumerate(tasks)]
    base_row = None
    if tasks and all(f in base_evals for t in tasks for f in t["eval_files"]):
        base_row = [_task_score(base_evals, t, "base") for t in tasks]
    cm = continual_metrics(R) if R else {"OP": None, "BWT": None}
    report = {
        "tasks": [{"name": t["name"], "eval_files": list(t["eval_files"])} for t in tasks],
        "R": R, "base_row": base_row, "OP": cm["OP"], "BWT": cm["BWT"],
        "probes": _probe_rows(base.get("probes") or {}, stages),
        "stages": [{"name": s["name"], "eval_files": list(s.get("eval_files") or []),
                    "evals": {f: r["score"] for f, r in (s.get("evals") or {}).items()},
                    "probes": {f: r["score"] for f, r in (s.get("probes") or {}).items()}}
                   for s in stages],
    }
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "report.json"), report)
    with atomic_file(os.path.join(out_dir, "report.md")) as f:
        f.write(_report_md(report, [s["name"] for s in stages]))
    return report


def _task_score(results: dict, task: dict, where: str) -> float:
    missing = [f for f in task["eval_files"] if f not in results]
    if missing:
        raise ValueError(f"write_report: {where} has no result for {missing} "
                         f"(eval files of stage {task['name']!r})")
    return sum(results[f]["score"] for f in task["eval_files"]) / len(task["eval_files"])


def _probe_rows(base_probes: dict, stages: list[dict]) -> dict:
    """Each probe file's score and retention after every stage."""
    files = list(dict.fromkeys([*base_probes, *(f for s in stages for f in s.get("probes") or {})]))
    probes = {}
    for f in files:
        b = base_probes.get(f)
        first = b or next(s["probes"][f] for s in stages if f in (s.get("probes") or {}))
        hib = _higher_is_better(first)
        rows = []
        for s in stages:
            r = (s.get("probes") or {}).get(f)
            score = None if r is None else r["score"]
            ret = None
            if score is not None and b is not None:
                num, den = (score, b["score"]) if hib else (b["score"], score)
                ret = 100.0 * num / den if den else None
            rows.append({"stage": s["name"], "score": score, "retention": ret})
        probes[f] = {"metric": first.get("metric"), "higher_is_better": hib,
                     "base": None if b is None else b["score"], "stages": rows}
    return probes


def _report_md(report: dict, stage_names: list[str]) -> str:
    tasks, R, base_row = report["tasks"], report["R"], report["base_row"]
    md = ["# Continual-learning report", ""]
    if tasks:
        md += ["## R: score on task i (columns) after stage t (rows)", "",
               "| after stage | " + " | ".join(t["name"] for t in tasks) + " |",
               "|---|" + "---|" * len(tasks)]
        if base_row is not None:
            md.append("| (base) | " + " | ".join(_num(x) for x in base_row) + " |")
        for t, row in zip(tasks, R):
            cells = [_num(x) for x in row + [None] * (len(tasks) - len(row))]
            md.append(f"| {t['name']} | " + " | ".join(cells) + " |")
        md += ["", f"**OP** {_num(report['OP'])}  **BWT** {_num(report['BWT'])}  (OP = mean of the "
               "last row; BWT = (1/T) sum_i (R[T][i] - R[i][i]), TRACE's definition)", "",
               "Task files: " + "; ".join(f"{t['name']}: {', '.join(t['eval_files'])}"
                                          for t in tasks), ""]
    if report["probes"]:
        md += ["## Probes: score after each stage (retention vs the base model)", "",
               "| probe | metric | base | " + " | ".join(stage_names) + " |",
               "|---|---|---|" + "---|" * len(stage_names)]
        for f, p in report["probes"].items():
            cells = [("" if r["score"] is None else _num(r["score"]) +
                      ("" if r["retention"] is None else f" ({r['retention']:.1f}%)"))
                     for r in p["stages"]]
            metric = f"{p['metric']}" + ("" if p["higher_is_better"] else " (lower is better)")
            md.append(f"| {os.path.basename(f)} | {metric} | {_num(p['base'])} | "
                      + " | ".join(cells) + " |")
        md.append("")
    return "\n".join(md)


# Command line.


def _print_results(results: list[dict]):
    width = max(len(r["file"]) for r in results)
    mwidth = max(9, *(len(r["metric"]) + 2 for r in results))
    print(f"{'file':<{width}}  {'metric':<{mwidth}}{'n':>7}{'score':>10}")
    for r in results:
        note = "" if r["higher_is_better"] else "  (perplexity, lower is better)"
        print(f"{r['file']:<{width}}  {r['metric']:<{mwidth}}{r['n']:>7}{r['score']:>10.2f}{note}")


def _parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--model",
                        help="model directory (Meta or HF format, see checkpoint.load_model)")
    source.add_argument("--predictions", help="score these predictions, made elsewhere, against "
                        "the one --data file without a model: JSON Lines of {\"prediction\": ...} "
                        "in record order, or a JSON list of strings")
    ap.add_argument("--data", required=True, nargs="+",
                    help="evaluation files (.jsonl / .json / .txt)")
    ap.add_argument("--metric", choices=METRICS, help="override the metric for every file")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-batch-tokens", type=int, default=MAX_BATCH_TOKENS,
                    help="positions a batch holds at most, padding and new tokens included "
                         "(0: no bound)")
    ap.add_argument("--out", help="write results (with per-example predictions) to this JSON file")
    ap.add_argument("--tokenizer", help="SentencePiece model (default: MODEL/tokenizer.model)")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="as train.py's train.device: auto = CUDA when present")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"),
                    help="default: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--max-seq-len", type=int,
                    help="context length (default: the checkpoint's, see checkpoint.load_model)")
    args = ap.parse_args(argv)
    if args.predictions and len(args.data) != 1:
        ap.error(f"--predictions scores exactly one --data file, got {len(args.data)}")
    return args


def _main_predictions(args) -> int:
    try:
        result = score_predictions(args.data[0], read_predictions(args.predictions), args.metric)
    except (ValueError, OSError) as e:  # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_results([result])
    if args.out:
        saved = {"predictions": args.predictions, "results": [result]}
        write_json(args.out, saved)
    return 0


def main(argv=None) -> int:
    args = _parse_args(argv)
    if args.predictions:
        return _main_predictions(args)

    try:  # torchrun: each rank holds a whole model and evaluates its share of the examples
        device = (data.setup_distributed(args.device) if int(os.environ.get("WORLD_SIZE", "1")) > 1
                  else data.resolve_device(args.device))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dtype = (getattr(torch, args.dtype) if args.dtype
             else (torch.bfloat16 if device.type == "cuda" else torch.float32))
    rank = rank_world()[0]

    tok_path = args.tokenizer or os.path.join(args.model, "tokenizer.model")
    try:
        tokenizer = data.Tokenizer(tok_path)
        model = load_model(args.model, dtype=dtype, device=device, max_seq_len=args.max_seq_len)
        results = [evaluate_file(model, tokenizer, f, metric=args.metric,
                                 max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                 max_batch_tokens=args.max_batch_tokens)
                   for f in args.data]
    except (ValueError, OSError) as e:  # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        _print_results(results)
        if args.out:
            write_json(args.out, {"model": args.model, "results": results})
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    data.hard_exit(main())  # exit without interpreter finalization (gloo teardown abort)
