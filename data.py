"""Data for every stage: the tokenizer, the formats users hold (Tulu V2 conversations, TRACE
prompt/answer, UltraFeedback preference pairs, plain text), batching across ranks, and the losses
over target tokens.

An example is {"input_ids", "labels"}: labels[i] = input_ids[i] where token i carries loss,
IGNORE_INDEX elsewhere. The model predicts token i from tokens < i; the loss functions shift.
"""
from __future__ import annotations

import hashlib
import json
import operator
import os
import shutil
import sys
from datetime import timedelta
from array import array
from collections import Counter

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import replace_dir

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
EOS_TEXT = "</s>"  # what open-instruct's template writes after each assistant turn


class DataError(ValueError):
    """A problem in a data file; the message names the file and the line, record or field."""


class Tokenizer:
    """Meta's tokenizer API over SentencePiece (LLaMA-2's tokenizer.model: bos 1, eos 2, no pad,
    so pad_id is -1).

    One addition to Meta's encode: the eos piece written as text ("</s>") encodes to eos_id, as
    Hugging Face's LlamaTokenizer does and open-instruct relies on. The Tulu template ends every
    assistant turn with the text "</s>"; raw SentencePiece would spell it as ordinary pieces, and
    the model must instead learn to emit the real eos id there, since that id is what stops
    generation. `special=False` keeps "</s>" literal (plain-text `lm` data does).
    """

    def __init__(self, model_path: str):
        from sentencepiece import SentencePieceProcessor
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer: no SentencePiece model at {model_path}")
        try:
            self.sp_model = SentencePieceProcessor(model_file=model_path)
        except Exception as e:  # sentencepiece raises a bare RuntimeError/OSError
            raise ValueError(f"tokenizer: cannot read SentencePiece model {model_path}: {e}") from e
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()
        self.eos_piece = self.sp_model.id_to_piece(self.eos_id) if self.eos_id >= 0 else None
        self.model_path = model_path  # cached_examples keys tokenized data by this file's bytes

    def encode(self, s: str, bos: bool, eos: bool, special: bool = True) -> list[int]:
        assert isinstance(s, str), type(s)
        if special and self.eos_piece:
            # Each chunk between "</s>" is encoded on its own, so it gets SentencePiece's dummy
            # prefix "▁" as text after a special token does in HF's (legacy) LlamaTokenizer.
            t = []
            for i, chunk in enumerate(s.split(self.eos_piece)):
                if i:
                    t.append(self.eos_id)
                t += self.sp_model.encode(chunk)
        else:
            t = self.sp_model.encode(s)
        if bos:
            t = [self.bos_id] + t
        if eos:
            t = t + [self.eos_id]
        return t

    def decode(self, ids: list[int]) -> str:
        return self.sp_model.decode([int(i) for i in ids])


def chat_segments(messages: list[dict]) -> list[tuple[str, bool]]:
    """open-instruct's Tulu template, as (text, is_target) pieces in order:
    "<|system|>\\n{c}\\n", "<|user|>\\n{c}\\n", "<|assistant|>\\n{c}</s>\\n".

    Only each assistant content and its "</s>" are targets; the role header and the newline after
    "</s>" are not. Contents are stripped, as open-instruct does.
    """
    segs = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"messages[{i}] is a {type(m).__name__}, expected an object with "
                            f"'role' and 'content'")
        for key in ("role", "content"):
            if key not in m:
                raise DataError(f"messages[{i}]: missing field '{key}'")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise DataError(f"messages[{i}].role is {role!r}, expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"messages[{i}].content is a {type(content).__name__}, "
                            f"expected a string")
        c = content.strip()
        if role == "assistant":
            segs += [("<|assistant|>\n", False), (c + EOS_TEXT, True), ("\n", False)]
        else:
            segs.append((f"<|{role}|>\n{c}\n", False))
    return segs


def chat_prompt(messages: list[dict]) -> str:
    """What the model is prompted with at eval: every message before the final assistant message
    (all of them if the last is not an assistant message), then "<|assistant|>\\n"."""
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    return "".join(t for t, _ in chat_segments(messages)) + "<|assistant|>\n"


def _encode_chat(tok: Tokenizer, messages: list[dict], last_only: bool = False):
    """Token ids and labels of a conversation, tokenized as open-instruct does: the whole rendered
    text at once (bos first), target spans found by tokenizing prefixes.

    Everything after the last assistant turn is left out: it carries no loss and, the model being
    causal, changes no earlier token's loss. For each assistant turn the prefix ending in
    "<|assistant|>\\n" is exactly chat_prompt(messages up to that turn), and its tokens must be a
    prefix of the training tokens, so eval prompts the model with the ids it was trained on. With
    LLaMA's tokenizer this holds because "\\n" is a byte-fallback piece no merge crosses; it is
    checked here for every turn, and a tokenizer that breaks it is an error, not a silent shift.
    """
    if tok.eos_piece != EOS_TEXT:
        raise DataError(f"the chat template ends assistant turns with {EOS_TEXT!r}, but the "
                        f"tokenizer's eos piece is {tok.eos_piece!r}")
    segs = chat_segments(messages)
    targets = [i for i, (_, is_t) in enumerate(segs) if is_t]
    if not targets:
        raise DataError("conversation has no assistant turn (nothing to train on)")
    segs = segs[:targets[-1] + 1]
    if last_only:
        segs = [(t, is_t and i == targets[-1]) for i, (t, is_t) in enumerate(segs)]
    ids = tok.encode("".join(t for t, _ in segs), bos=True, eos=False)
    labels = [IGNORE_INDEX] * len(ids)
    # encode() tokenizes the text between "</s>" pieces independently, so the tokens of a prefix
    # are ids[:pos] (bos .. the last eos before it) plus the tokens of its text since that eos.
    # Checking that part alone checks the whole prefix, in time linear in the conversation.
    pos, tail = 1, ""
    for text, is_target in segs:
        if not is_target:
            tail += text
            continue
        head = tok.encode(tail, bos=False, eos=False)
        start = pos + len(head)
        if ids[pos:start] != head:
            raise DataError("the tokens of the prompt ending in '<|assistant|>\\n' are not a "
                            "prefix of the conversation's tokens (the tokenizer merges across that "
                            "newline), so eval prompts would differ from training")
        end = start
        for _ in range(text.count(EOS_TEXT)):  # the response ends at its (last) eos
            end = ids.index(tok.eos_id, end) + 1
        labels[start:end] = ids[start:end]
        pos, tail = end, ""
    return ids, labels


def _encode_prompt_answer(tok: Tokenizer, prompt: str, answer: str):
    """TRACE: bos + encode(prompt) + encode(answer) + eos, loss on the answer and eos.

    TRACE concatenates the prompt and answer texts; encoding them separately instead makes the
    eval prompt (encode(prompt, bos=True)) a prefix of the training ids by construction. The answer
    then starts as a new word (SentencePiece's "▁" dummy prefix), which decoding drops again.
    """
    p = tok.encode(prompt, bos=True, eos=False)
    a = tok.encode(answer, bos=False, eos=True)
    return p + a, [IGNORE_INDEX] * len(p) + a


def _extension(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".jsonl", ".json", ".txt"):
        raise DataError(f"{path}: unsupported file type {ext or '(none)'}; expected .jsonl, "
                        f".json (a list) or .txt")
    return ext


def read_text(path: str, what: str = "data file") -> str:
    """A file's whole text (UTF-8, a byte-order mark dropped), with errors naming the file (and
    the line for bytes that are not UTF-8)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read {what}: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: bytes that are not UTF-8 "
                        f"(byte offset {e.start})") from None
    return text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not content


def _jsonl_lines(path: str):
    """Yield (line number, line) for each non-blank line of a JSON Lines file, one at a time."""
    # Records end at "\n" only (binary line iteration splits there). str.splitlines() also breaks
    # at U+2028, U+2029 and U+0085, which JSON allows raw in strings (json.dumps(ensure_ascii=
    # False), jq -c, Node write them so), and at \x0b \x0c \x1c-\x1e.
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read data file: {e.strerror or e}") from e
    with f:
        offset = 0
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {n}: bytes that are not UTF-8 "
                                f"(byte offset {offset + e.start})") from None
            offset += len(raw)
            if n == 1:
                line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not content
            line = line.removesuffix("\n").removesuffix("\r")  # CRLF files
            if line.strip():
                yield n, line


def parse_json_line(path: str, n: int, line: str):
    """json.loads(line), or a DataError naming the file and line n."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise malformed(path, n, e) from None


def malformed(path: str, n: int, e: json.JSONDecodeError) -> DataError:
    """The error for malformed JSON at line n of path (a raw control character named)."""
    return DataError(f"{path}: line {n}: malformed JSON ({_json_error(e)}, column {e.colno})")


def _check_objects(path: str, records: list[tuple[int, object]]):
    for n, rec in records:
        if not isinstance(rec, dict):
            raise DataError(f"{record_location(path, n)}: a record must be a JSON object, "
                            f"found a {type(rec).__name__}")


def read_records(path: str) -> list[tuple[int, dict]]:
    """(line number, record) for .jsonl (blank lines skipped), (list index, record) for a .json
    file holding a list, [(1, {"text": whole file})] for .txt.

    JSON Lines are split at "\n" (a "\r" before it is dropped) and each line is strict JSON: a
    raw control character (U+0000-U+001F) inside a string is an error naming it, as in json.loads,
    Node and jq; JSON writers escape those."""
    ext = _extension(path)
    if ext == ".jsonl":
        records = [(n, parse_json_line(path, n, line)) for n, line in _jsonl_lines(path)]
        if not records:
            raise DataError(f"{path}: empty file")
    else:
        text = read_text(path)
        if not text.strip():
            raise DataError(f"{path}: empty file")
        if ext == ".txt":
            return [(1, {"text": text})]
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise malformed(path, e.lineno, e) from None
        if not isinstance(obj, list):
            raise DataError(f"{path}: a .json data file must hold a list of records, found a "
                            f"{type(obj).__name__}")
        if not obj:
            raise DataError(f"{path}: empty file (the list holds no records)")
        records = list(enumerate(obj))
    _check_objects(path, records)
    return records


def read_record_slice(path: str, part: int, parts: int) -> tuple[list, int, tuple[int, dict]]:
    """Slice `part` of `parts` contiguous slices of read_records(path), with the number of records
    in the whole file and the first record (which decides the format).

    A .jsonl file is read twice, a line at a time: once to count the records, once to parse the
    first record and this slice's, and nothing else is kept. On a first start each rank so holds
    only its own slice (Tulu V2's 326k conversations as Python dicts are several GB). A .json list
    is parsed whole. A bad record is reported by the rank whose slice holds it."""
    if _extension(path) != ".jsonl":
        records = read_records(path)
        n = len(records)
        return records[part * n // parts:(part + 1) * n // parts], n, records[0]
    n = sum(1 for _ in _jsonl_lines(path))
    if not n:
        raise DataError(f"{path}: empty file")
    lo, hi = part * n // parts, (part + 1) * n // parts
    first, mine = None, []
    for i, (m, line) in enumerate(_jsonl_lines(path)):
        if i == 0:
            first = (m, parse_json_line(path, m, line))
        if i >= hi:
            break
        if i >= lo:
            mine.append(first if i == 0 else (m, parse_json_line(path, m, line)))
    _check_objects(path, [first] + mine)
    return mine, n, first


def _json_error(e: json.JSONDecodeError) -> str:
    if e.msg.startswith("Invalid control character") and e.pos < len(e.doc):
        # JSON requires U+0000-U+001F escaped in strings; name the character, it may be invisible
        return (f"raw control character U+{ord(e.doc[e.pos]):04X} in a string; "
                f"JSON requires it escaped")
    return e.msg


def record_location(path: str, n: int) -> str:
    """Where record n is, for errors: a .json list's index, else a line number."""
    return f"{path}: record [{n}]" if path.lower().endswith(".json") else f"{path}: line {n}"


def _field(rec: dict, name: str, where: str, types, what: str):
    if name not in rec:
        raise DataError(f"{where}: missing field '{name}'")
    if not isinstance(rec[name], types):
        raise DataError(f"{where}: field '{name}' must be {what}, found a "
                        f"{type(rec[name]).__name__}")
    return rec[name]


def _detect_format(path: str, kind: str, n: int, rec: dict) -> str:
    """The file's format, recognised from its first record; every record must then match it."""
    where = record_location(path, n)
    if kind == "lm":
        if "text" not in rec:
            raise DataError(f"{where}: missing field 'text' (an lm stage reads {{\"text\"}} "
                            f"records or a .txt file)")
        return "text"
    if kind == "dpo":
        for name in ("chosen", "rejected"):
            if name not in rec:
                raise DataError(f"{where}: missing field '{name}' (a dpo stage reads preference "
                                f"pairs: 'prompt', 'chosen', 'rejected')")
        return "pairs"
    if "messages" in rec:
        return "chat"
    if "chosen" in rec and "rejected" in rec:
        raise DataError(f"{where}: a preference pair ('chosen', 'rejected'), which a dpo stage "
                        f"reads, not an sft stage")
    if "prompt" in rec or "answer" in rec:
        return "prompt_answer"
    raise DataError(f"{where}: missing field 'messages' (Tulu conversation) or 'prompt' and "
                    f"'answer' (TRACE)")


def _pair_messages(rec: dict, name: str, where: str) -> list[dict]:
    """One side of a preference pair as a conversation whose last message is the response."""
    side = _field(rec, name, where, (list, str), "a list of messages or a string")
    if isinstance(side, str):
        prompt = _field(rec, "prompt", where, str,
                        "a string (needed when chosen/rejected are strings)")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": side}]
    if not side:
        raise DataError(f"{where}: field '{name}' is an empty list of messages")
    last = side[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        role = last.get("role") if isinstance(last, dict) else type(last).__name__
        raise DataError(f"{where}: field '{name}': the last message must be the assistant "
                        f"response, found {role!r}")
    return side


def _has_target(labels: list[int]) -> bool:
    return any(x != IGNORE_INDEX for x in labels[1:])  # token 0 is never predicted


def _record_examples(tok: Tokenizer, fmt: str, rec: dict, where: str, L: int,
                     dropped: Counter) -> list[dict]:
    """The examples of one record under the rules load_examples documents: none if it is dropped
    (the reason counted in `dropped`), several for an lm document longer than one window. The one
    copy of those rules, shared by load_examples and cached_examples."""
    try:
        if fmt == "text":
            text = _field(rec, "text", where, str, "a string")
            doc = tok.encode(text, bos=False, eos=True, special=False)
            if len(doc) == 1:
                dropped["empty text"] += 1
                return []
            windows = [doc[i:i + L - 1] for i in range(0, len(doc), L - 1)]
            return [{"input_ids": [tok.bos_id] + w, "labels": [IGNORE_INDEX] + w} for w in windows]
        if fmt == "pairs":
            ex = {}
            for side in ("chosen", "rejected"):
                ids, labels = _encode_chat(tok, _pair_messages(rec, side, where), last_only=True)
                ex[side] = {"input_ids": ids[:L], "labels": labels[:L]}
            keep = _has_target(ex["chosen"]["labels"]) and _has_target(ex["rejected"]["labels"])
        else:
            if fmt == "chat":
                messages = _field(rec, "messages", where, list, "a list of messages")
                ids, labels = _encode_chat(tok, messages)
            else:
                ids, labels = _encode_prompt_answer(tok,
                                                    _field(rec, "prompt", where, str, "a string"),
                                                    _field(rec, "answer", where, str, "a string"))
            ex = {"input_ids": ids[:L], "labels": labels[:L]}
            keep = _has_target(ex["labels"])
    except DataError as e:
        msg = str(e)
        raise DataError(msg if msg.startswith(where) else f"{where}: {msg}") from None
    if not keep:
        dropped[f"no target tokens left after truncation to {L}"] += 1
        return []
    return [ex]


def _summary(path: str, fmt: str, n_records: int, n_examples: int, dropped: dict, L: int) -> str:
    """The line logged per file; a file that gives no example at all is an error."""
    why = (next(iter(dropped)) if len(dropped) == 1
           else ", ".join(f"{k}: {v}" for k, v in dropped.items()))
    if not n_examples:
        raise DataError(f"{path}: no usable example in {n_records} records"
                        + (f" ({why})" if why else ""))
    n_dropped = f"{sum(dropped.values())} dropped" + (f" ({why})" if why else "")
    if fmt == "text":
        return (f"data: {path}: {n_records} documents -> {n_examples} examples "
                f"(consecutive windows of at most {L} tokens), {n_dropped}")
    return f"data: {path}: {n_examples} examples, {n_dropped}"


def _check_args(kind: str, max_seq_len: int):
    if kind not in ("lm", "sft", "dpo"):
        raise ValueError(f"kind must be 'lm', 'sft' or 'dpo', got {kind!r}")
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2 (bos and one token), got {max_seq_len}")


def load_examples(path: str, kind: str, tokenizer: Tokenizer, max_seq_len: int,
                  log=print) -> list[dict]:
    """Read, validate and tokenize a whole data file for a stage of kind "lm", "sft" or "dpo".

    - sft, Tulu conversations ({"messages": [{"role", "content"}]}): loss on each assistant content
      and the eos id that stands where the template says "</s>" (see _encode_chat).
    - sft, TRACE ({"prompt", "answer"}): loss on the answer and eos (see _encode_prompt_answer).
    - dpo, UltraFeedback binarized ({"prompt", "chosen", "rejected"}, each side a message list
      ending in the assistant response, or a plain string answering "prompt" as one user turn):
      labels mark the final response and its eos only.
    - lm, plain text ({"text"} records or a .txt file): each document is encoded literally, eos
      appended, and cut into consecutive windows of max_seq_len - 1 tokens, each example starting
      with bos: no token is lost, loss on every token but bos.
    sft/dpo sequences are right-truncated to max_seq_len; an example left with no target token is
    dropped and counted in the line logged per file.

    The trainer reads its data through cached_examples, which applies these same rules once and
    memory-maps the result; this in-memory form (lists of ints) is for tests and small tools.
    """
    _check_args(kind, max_seq_len)
    records = read_records(path)
    fmt = _detect_format(path, kind, *records[0])
    examples, dropped = [], Counter()
    for n, rec in records:
        examples += _record_examples(tokenizer, fmt, rec, record_location(path, n), max_seq_len,
                                     dropped)
    log(_summary(path, fmt, len(records), len(examples), dropped, max_seq_len))
    return examples


CACHE_VERSION = 1  # bump when the arrays' layout or the tokenization rules above change


def _sha256(path: str, what: str) -> tuple[int, str]:
    """(size, sha256 hex) of a file, read in chunks."""
    h, size = hashlib.sha256(), 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
                size += len(chunk)
    except OSError as e:
        raise DataError(f"{path}: cannot read {what}: {e.strerror or e}") from e
    return size, h.hexdigest()


def _on_ranks(fn, everyone: bool = True) -> list:
    """Run fn on every rank (or on rank 0 only) and return each rank's result, on every rank.

    An exception on any rank is raised on every rank, so none is left waiting in a collective: the
    lowest failing rank's DataError as a DataError (ranks hold contiguous slices of the file, so
    that is the first bad record), anything else as itself there and a RuntimeError elsewhere.
    Object collectives move their tensors to the rank's device themselves (NCCL needs that).
    """
    rank, world = rank_world()
    value, err = None, None
    if everyone or rank == 0:
        try:
            value = fn()
        except Exception as e:
            err = e
    if world == 1:
        if err is not None:
            raise err
        return [value]
    sent = (value, None if err is None else
            (isinstance(err, DataError), f"{type(err).__name__}: {err}", str(err)))
    results = [None] * world
    dist.all_gather_object(results, sent)
    failed = [(r, e) for r, (_, e) in enumerate(results) if e is not None]
    if failed:
        r, (is_data, described, msg) = failed[0]
        if is_data:
            raise DataError(msg) from (err if r == rank else None)
        if err is not None:
            raise err
        raise RuntimeError(f"tokenized data: rank {r} failed: {described}")
    return [v for v, _ in results]


def _sides(kind: str) -> tuple[str, ...]:
    """Array name prefixes: one set of arrays per sequence of an example."""
    return ("chosen_", "rejected_") if kind == "dpo" else ("",)


class Examples:
    """The tokenized examples of one data file, memory-mapped from a cache directory written by
    cached_examples: examples[i] is load_examples' dict, its sequences int32 numpy views into the
    maps (read-only; data.collate takes them as it takes lists), so no rank holds the set in its
    heap. `.fingerprint` ({"path", "size", "sha256"}) names the training file the arrays came
    from."""

    def __init__(self, directory: str):
        self.directory = directory
        try:
            with open(os.path.join(directory, "meta.json"), encoding="utf-8") as f:
                self.meta = json.load(f)
            self._n, self.kind = int(self.meta["examples"]), self.meta["kind"]
            self._arrays = {side: self._load(side) for side in _sides(self.kind)}
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            raise DataError(f"{directory}: unreadable tokenized data ({e}); "
                            f"delete the directory to rebuild it") from e
        self.fingerprint = {k: self.meta[k] for k in ("path", "size", "sha256")}

    def _load(self, side: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids, labels, offsets = (np.load(os.path.join(self.directory, f"{side}{name}.npy"),
                                        mmap_mode="r")
                                for name in ("input_ids", "labels", "offsets"))
        if not (ids.dtype == labels.dtype == np.int32 and offsets.dtype == np.int64
                and offsets.shape == (self._n + 1,) and offsets[0] == 0
                and ids.shape == labels.shape == (offsets[-1],)):
            raise ValueError(f"{side}input_ids {ids.dtype}{ids.shape}, {side}labels {labels.dtype}"
                             f"{labels.shape} and {side}offsets {offsets.dtype}{offsets.shape} do "
                             f"not hold meta.json's {self._n} examples")
        return tuple(a.view(np.ndarray) for a in (ids, labels, offsets))  # slicing is cheaper

    def __len__(self) -> int:
        return self._n

    def _seq(self, side: str, i: int) -> dict:
        ids, labels, offsets = self._arrays[side]
        a, b = offsets[i], offsets[i + 1]
        return {"input_ids": ids[a:b], "labels": labels[a:b]}

    def __getitem__(self, i: int) -> dict:
        i = operator.index(i)
        if not -self._n <= i < self._n:
            raise IndexError(f"example {i} of {self._n}")
        i %= self._n
        if self.kind == "dpo":
            return {"chosen": self._seq("chosen_", i), "rejected": self._seq("rejected_", i)}
        return self._seq("", i)

    def __iter__(self):
        return (self[i] for i in range(self._n))


def _tokenize_part(path: str, kind: str, tok: Tokenizer, L: int, tmp: str) -> dict:
    """Tokenize this rank's contiguous slice of the records into part-<rank> arrays under tmp."""
    rank, world = rank_world()
    if not os.path.isdir(tmp):  # checked before minutes of tokenizing, with the cause named
        raise DataError(f"rank {rank}: {tmp}, which rank 0 made, is not there (every rank must "
                        f"see {os.path.dirname(tmp)}: on several nodes, a filesystem they share)")
    mine, n_records, first = read_record_slice(path, rank, world)
    fmt = _detect_format(path, kind, *first)
    # array("i") holds 4 bytes per token where a list of ints holds 36
    bufs = {side: (array("i"), array("i"), array("q")) for side in _sides(kind)}
    dropped, n_examples = Counter(), 0
    for n, rec in tqdm(mine, desc=f"tokenize {os.path.basename(path)}", disable=rank != 0,
                       leave=False):
        for ex in _record_examples(tok, fmt, rec, record_location(path, n), L, dropped):
            n_examples += 1
            for side, (ids, labels, lengths) in bufs.items():
                seq = ex[side[:-1]] if side else ex
                ids.extend(seq["input_ids"])
                labels.extend(seq["labels"])
                lengths.append(len(seq["input_ids"]))
    for side, (ids, labels, lengths) in bufs.items():
        for name, buf, dtype in (("input_ids", ids, np.int32), ("labels", labels, np.int32),
                                 ("lengths", lengths, np.int64)):
            np.save(os.path.join(tmp, f"part-{rank:05d}.{side}{name}.npy"),
                    np.frombuffer(buf, dtype=dtype))
    return {"format": fmt, "records": n_records, "examples": n_examples, "dropped": dict(dropped)}


def _merge_parts(tmp: str, kind: str, world: int):
    """Concatenate the ranks' parts in rank order, which is record order, into the final arrays."""
    part = lambda r, name: os.path.join(tmp, f"part-{r:05d}.{name}.npy")
    for side in _sides(kind):
        lengths = np.concatenate([np.load(part(r, side + "lengths")) for r in range(world)])
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        np.save(os.path.join(tmp, side + "offsets.npy"), offsets)
        for name in ("input_ids", "labels"):
            out = np.lib.format.open_memmap(os.path.join(tmp, f"{side}{name}.npy"), mode="w+",
                                            dtype=np.int32, shape=(int(offsets[-1]),))
            pos = 0
            for r in range(world):
                p = np.load(part(r, side + name), mmap_mode="r")
                out[pos:pos + len(p)] = p
                pos += len(p)
            out.flush()
            del out
    for f in os.listdir(tmp):
        if f.startswith("part-"):
            os.remove(os.path.join(tmp, f))


def _build_cache(path: str, kind: str, tok: Tokenizer, L: int, final: str, meta: dict) -> None:
    """Tokenize on every rank, each a slice, and let rank 0 merge and publish `final` atomically:
    the arrays are written in a temporary directory renamed into place once complete, so a crash
    leaves no directory that a later start would read."""
    rank, world = rank_world()
    tmp = final + ".tmp"

    def fresh_tmp():
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed writer's leftovers
        os.makedirs(tmp)  # and cache_dir with it
    _on_ranks(fresh_tmp, everyone=False)
    try:
        parts = _on_ranks(lambda: _tokenize_part(path, kind, tok, L, tmp))
        dropped = Counter()
        for p in parts:
            dropped.update(p["dropped"])
        meta.update(format=parts[0]["format"], records=parts[0]["records"],
                    examples=sum(p["examples"] for p in parts), dropped=dict(dropped))
        # raises if none
        _summary(path, meta["format"], meta["records"], meta["examples"], dropped, L)

        def publish():
            _merge_parts(tmp, kind, world)
            with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=2)
            replace_dir(tmp, final)  # replaces only ever an unreadable one: see cached_examples
        _on_ranks(publish, everyone=False)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def cached_examples(path: str, kind: str, tokenizer: Tokenizer, max_seq_len: int, cache_dir: str,
                    log=print, check=None) -> Examples:
    """load_examples' examples, tokenized once per (file content, tokenizer, kind, max_seq_len)
    and memory-mapped on every later start. The arrays live in `<cache_dir>/<file stem>-<kind>-<max_seq_len>-<key>/`, the key hashing the
    data file's sha256, the tokenizer.model's sha256, kind, max_seq_len and CACHE_VERSION:
    `input_ids.npy` and `labels.npy` (flat int32, IGNORE_INDEX where no loss), `offsets.npy`
    (int64, examples + 1; example i is [offsets[i], offsets[i+1])), for dpo `chosen_*` and
    `rejected_*` sets, and `meta.json` (file path, size and sha256, tokenizer, counts, dropped
    counts). Under torch.distributed, rank 0 hashes the file once; on a miss each rank tokenizes a
    contiguous slice of the records and rank 0 merges the parts in record order, so the arrays are
    byte-identical to one process's. Any rank's DataError is raised on every rank with the file and
    line of the first bad record, and nothing is published. Every node must see cache_dir.
    `check(fingerprint)` ({"path", "size", "sha256"}), when given, runs on rank 0 as soon as the
    file is hashed, before anything is tokenized; its DataError stops every rank.
    """
    _check_args(kind, max_seq_len)
    rank, world = rank_world()

    def fingerprint():
        size, sha = _sha256(path, "data file")
        if check is not None:
            check({"path": path, "size": size, "sha256": sha})
        return {"path": path, "size": size, "sha256": sha, "tokenizer": tokenizer.model_path,
                "tokenizer_sha256": _sha256(tokenizer.model_path, "tokenizer model")[1]}
    meta = _on_ranks(fingerprint, everyone=False)[0]
    meta.update(version=CACHE_VERSION, kind=kind, max_seq_len=max_seq_len)
    key = {k: meta[k] for k in ("version", "sha256", "tokenizer_sha256", "kind", "max_seq_len")}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(path))[0]
    final = os.path.join(cache_dir, f"{stem}-{kind}-{max_seq_len}-{digest}")

    def reusable():
        if not os.path.isdir(final):
            return False
        try:
            return all(Examples(final).meta.get(k) == v for k, v in key.items())
        except DataError as e:  # a directory someone damaged; ours are only ever complete
            log(f"data: {e}: tokenizing again")
            return False
    reused = _on_ranks(reusable, everyone=False)[0]
    if not reused:
        _build_cache(path, kind, tokenizer, max_seq_len, final, meta)
    opened = {}

    def open_cache():
        try:
            opened["examples"] = Examples(final)
        except DataError as e:
            raise DataError(f"rank {rank}: {e} (every rank must see {cache_dir}: on several nodes, "
                            f"a filesystem they share)") from None
    _on_ranks(open_cache)
    examples = opened["examples"]
    # this file, as named now
    examples.fingerprint = {k: meta[k] for k in ("path", "size", "sha256")}
    m = examples.meta
    line = _summary(path, m["format"], m["records"], m["examples"], m["dropped"], max_seq_len)
    if rank == 0:
        log(f"{line}; tokenized data {'reused from' if reused else 'written to'} {final}")
    return examples


def _pad(seqs: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    # Filled in numpy, which copies lists and (read-only, memory-mapped) int32 arrays alike.
    T = max(len(s["input_ids"]) for s in seqs)
    ids = np.full((len(seqs), T), pad_id, dtype=np.int64)
    labels = np.full((len(seqs), T), IGNORE_INDEX, dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, :len(s["input_ids"])] = s["input_ids"]
        labels[i, :len(s["labels"])] = s["labels"]
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}


def collate(examples: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; labels are IGNORE_INDEX on padding. Right padding needs
    no attention mask: under causal attention no real token sees the padding after it. Sequences
    are lists of ints (load_examples) or int numpy arrays (cached_examples); the batch is int64.

    dpo examples give chosen_/rejected_ input_ids and labels, padded to one common length so one
    forward can take torch.cat([chosen, rejected]).
    """
    pad_id = max(pad_id, 0)  # LLaMA has no pad (-1); any real id works, padding carries no loss
    if "chosen" in examples[0]:
        both = _pad([e["chosen"] for e in examples] + [e["rejected"] for e in examples], pad_id)
        B = len(examples)
        return {"chosen_input_ids": both["input_ids"][:B], "chosen_labels": both["labels"][:B],
                "rejected_input_ids": both["input_ids"][B:], "rejected_labels": both["labels"][B:]}
    return _pad(examples, pad_id)


def _generator(key: str) -> torch.Generator:
    """A private CPU generator seeded from sha256(key): the global RNG is untouched, and every
    rank and every restart that names the same key draws the same numbers."""
    digest = hashlib.sha256(key.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def replay_indices(sizes: list[int], n: int, seed: int, stage: int) -> list[list[int]]:
    """Which examples of each earlier stage (of these sizes) a stage replays, n in all: an equal
    share from each (the first n % k stages one more), drawn without replacement within a stage
    by a private generator seeded from (seed, stage), so every rank and every restart agree."""
    k = len(sizes)
    shares = [n // k + (j < n % k) for j in range(k)] if k else []
    picks = []
    for j, (size, share) in enumerate(zip(sizes, shares)):
        if share > size:
            raise DataError(f"train.replay asks for {share} examples of earlier stage {j}, which "
                            f"has only {size}")
        g = _generator(f"replay/{seed}/{stage}/{j}")
        picks.append(sorted(torch.randperm(size, generator=g)[:share].tolist()))
    return picks


class Mixture:
    """A stage's own examples followed by the examples it replays from earlier stages:
    index i < len(own) is own[i]; the rest are (earlier stage, index) pairs in order."""

    def __init__(self, own, replayed: list[tuple[object, list[int]]]):
        self.own = own
        self.extra = [(src, i) for src, idx in replayed for i in idx]
        self.fingerprints = [own.fingerprint] + [src.fingerprint for src, idx in replayed if idx]

    def __len__(self) -> int:
        return len(self.own) + len(self.extra)

    def __getitem__(self, i: int) -> dict:
        i = operator.index(i)
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        if i < len(self.own):
            return self.own[i]
        src, j = self.extra[i - len(self.own)]
        return src[j]


class StepSampler:
    """Which examples each rank trains on at each optimizer step.

    Every epoch is a permutation drawn from (seed, stage, epoch) with a private generator, so the
    global RNG is untouched and micro_batches(step) is a pure function of its arguments: a resumed
    run picks up at any step. Step i of an epoch takes the permutation's i-th run of batch_size
    examples (the remainder of an epoch is dropped); rank r takes the r-th contiguous
    1/world_size share of it, split into micro-batches of micro_batch_size.
    """

    def __init__(self, n_examples: int, batch_size: int, micro_batch_size: int, world_size: int,
                 rank: int, seed: int, stage, epochs: int, source: str = "the stage's data"):
        if batch_size <= 0 or micro_batch_size <= 0 or batch_size % (world_size * micro_batch_size):
            raise ValueError(f"train.batch_size={batch_size} must be a positive multiple of "
                             f"train.micro_batch_size={micro_batch_size} x world size {world_size} "
                             f"= {world_size * micro_batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.n, self.batch_size, self.micro_batch_size = n_examples, batch_size, micro_batch_size
        self.world_size, self.rank, self.seed, self.stage, self.epochs = (world_size, rank, seed,
                                                                          stage, epochs)
        self.steps_per_epoch = n_examples // batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"{source}: {n_examples} examples, fewer than "
                            f"train.batch_size={batch_size}, so not one optimizer step")
        self.total_steps = self.steps_per_epoch * epochs
        self._perm = (None, None)

    def permutation(self, epoch: int) -> list[int]:
        if self._perm[0] != epoch:
            g = _generator(f"{self.seed}/{self.stage}/{epoch}")
            self._perm = (epoch, torch.randperm(self.n, generator=g).tolist())
        return self._perm[1]

    def micro_batches(self, step: int) -> list[list[int]]:
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} is outside the stage's {self.total_steps} steps")
        epoch, i = divmod(step, self.steps_per_epoch)
        batch = self.permutation(epoch)[i * self.batch_size:(i + 1) * self.batch_size]
        share = self.batch_size // self.world_size
        mine = batch[self.rank * share:(self.rank + 1) * share]
        return [mine[j:j + self.micro_batch_size] for j in range(0, share, self.micro_batch_size)]


def _check_shapes(logits: torch.Tensor, labels: torch.Tensor):
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)}: "
                         f"expected [B, T, V] and [B, T]")


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of cross-entropy over target tokens as a float32 scalar, number of target tokens).

    logits[:, :-1] predict labels[:, 1:]. The trainer divides each micro-batch's sum by the
    number of target tokens in the whole global batch (count_targets, summed over micro-batches and
    all-reduced over ranks), so each target token has the same weight and an optimizer step does not
    depend on the number of ranks or the micro-batch size.
    """
    _check_shapes(logits, labels)
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (labels != IGNORE_INDEX).sum()


def count_targets(labels: torch.Tensor) -> int:
    """Target tokens after the shift: what token_loss_sum counts."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B] float32: the summed log-probability of each sequence's target tokens (shifted as
    above)."""
    _check_shapes(logits, labels)
    B, T, V = logits.shape
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    logp = -F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                            reduction="none")  # 0 at ignored positions
    return logp.view(B, T - 1).sum(-1)


def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO (Rafailov et al. 2023): per-pair losses
    [B] = -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), from summed sequence log-probs.
    Equal policy and reference give ln 2. Metrics are per pair."""
    chosen_reward = beta * (pi_chosen - ref_chosen)
    rejected_reward = beta * (pi_rejected - ref_rejected)
    losses = -F.logsigmoid(chosen_reward - rejected_reward)
    chosen_reward, rejected_reward = chosen_reward.detach(), rejected_reward.detach()
    metrics = {"reward_acc": (chosen_reward > rejected_reward).float(),
               "reward_margin": chosen_reward - rejected_reward,
               "chosen_reward": chosen_reward, "rejected_reward": rejected_reward}
    return losses, metrics


# Ranks: the process group every entry point (train.py, eval.py, bench.py) sets up the same way.

def resolve_device(name: str) -> torch.device:
    """`[train] device`: "auto" is CUDA when this process sees a GPU, else the CPU. An explicit
    "cuda" without one is an error: a 7B recipe must not quietly "run" on the CPU for days."""
    if name == "cuda" and not torch.cuda.is_available():
        why = ("CUDA_VISIBLE_DEVICES is empty" if os.environ.get("CUDA_VISIBLE_DEVICES") == ""
               else f"torch {torch.__version__} sees no CUDA device (a CPU-only build, no GPU, or "
               "a driver too old for this wheel)")
        raise ValueError(f"train.device = \"cuda\", but {why}; set train.device = \"cpu\" "
                         "or \"auto\" to run on the CPU")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def setup_distributed(device_name: str = "auto") -> torch.device:
    """torchrun sets RANK/WORLD_SIZE; a plain `python train.py` runs as a world of one. NCCL on
    GPUs (bound to this rank's GPU), gloo on the CPU. Under NCCL a second, CPU (gloo) group
    carries host-side numbers (token counts, the SIGTERM flag), so reading them never waits
    for the GPU's queue."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 1000))
    device = resolve_device(device_name)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", timeout=timedelta(minutes=30), device_id=device)
        else:
            dist.init_process_group("gloo", timeout=timedelta(minutes=30))
    control_group()
    return device


_CONTROL: dict = {}


def control_group():
    """The group for host-side numbers: the default group under gloo; under NCCL a gloo twin
    of it, made once per process group (collectively: every rank calls this at the same point)."""
    if dist.get_backend() in ("gloo", "fake"):  # fake: --plan's simulated process group
        return None
    if _CONTROL.get("world") is not dist.group.WORLD:
        _CONTROL.update(world=dist.group.WORLD, group=dist.new_group(backend="gloo"))
    return _CONTROL["group"]


def all_sum(x: float, op=dist.ReduceOp.SUM) -> float:
    """Sum (or reduce with `op`) a host-side number over all ranks, over the CPU control group
    (no GPU sync)."""
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t, op=op, group=control_group())
    return t.item()


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def hard_exit(code: int):
    """Leave without interpreter finalization. gloo's worker threads may still hold work objects
    (FSDP keeps some) whose destruction while Python tears down aborts the process ("terminate
    called without an active exception", about one CPU run in twenty) after all work is done."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
