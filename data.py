"""Data for every stage: the tokenizer, the formats users hold (Tulu V2 conversations, TRACE
prompt/answer, UltraFeedback preference pairs, plain text), batching across ranks, and the losses
over target tokens.

An example is {"input_ids", "labels"}: labels[i] = input_ids[i] where token i carries loss,
IGNORE_INDEX elsewhere. The model predicts token i from tokens < i; the loss functions shift.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter

import torch
import torch.nn.functional as F

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
            raise DataError(f"messages[{i}] is a {type(m).__name__}, expected an object with 'role' and 'content'")
        for key in ("role", "content"):
            if key not in m:
                raise DataError(f"messages[{i}]: missing field '{key}'")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise DataError(f"messages[{i}].role is {role!r}, expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"messages[{i}].content is a {type(content).__name__}, expected a string")
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
        raise DataError(f"the chat template ends assistant turns with {EOS_TEXT!r}, but the tokenizer's eos piece "
                        f"is {tok.eos_piece!r}")
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
            raise DataError("the tokens of the prompt ending in '<|assistant|>\\n' are not a prefix of the "
                            "conversation's tokens (the tokenizer merges across that newline), so eval prompts "
                            "would differ from training")
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


def read_records(path: str) -> list[tuple[int, dict]]:
    """(line number, record) for .jsonl (blank lines skipped), (list index, record) for a .json
    file holding a list, [(1, {"text": whole file})] for .txt.

    JSON Lines are split at "\n" (a "\r" before it is dropped) and each line is strict JSON: a
    raw control character (U+0000-U+001F) inside a string is an error naming it, as in json.loads,
    Node and jq; JSON writers escape those."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".jsonl", ".json", ".txt"):
        raise DataError(f"{path}: unsupported file type {ext or '(none)'}; expected .jsonl, .json (a list) or .txt")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read data file: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: bytes that are not UTF-8 (byte offset {e.start})") from None
    text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not content
    if not text.strip():
        raise DataError(f"{path}: empty file")
    if ext == ".txt":
        return [(1, {"text": text})]
    if ext == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno}: malformed JSON ({_json_error(e)}, "
                            f"column {e.colno})") from None
        if not isinstance(obj, list):
            raise DataError(f"{path}: a .json data file must hold a list of records, found a {type(obj).__name__}")
        if not obj:
            raise DataError(f"{path}: empty file (the list holds no records)")
        records = list(enumerate(obj))
    else:
        records = []
        # Records end at "\n" only. str.splitlines() also breaks at U+2028, U+2029 and U+0085,
        # which JSON allows raw in strings (json.dumps(ensure_ascii=False), jq -c, Node write
        # them so), and at \x0b \x0c \x1c-\x1e, which would shift the reported line numbers.
        for n, line in enumerate(text.split("\n"), 1):
            line = line.removesuffix("\r")  # CRLF files
            if not line.strip():
                continue
            try:
                records.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n}: malformed JSON ({_json_error(e)}, "
                                f"column {e.colno})") from None
    for n, rec in records:
        if not isinstance(rec, dict):
            raise DataError(f"{_where(path, n)}: a record must be a JSON object, found a {type(rec).__name__}")
    return records


def _json_error(e: json.JSONDecodeError) -> str:
    if e.msg.startswith("Invalid control character") and e.pos < len(e.doc):
        # JSON requires U+0000-U+001F escaped in strings; name the character, it may be invisible
        return f"raw control character U+{ord(e.doc[e.pos]):04X} in a string; JSON requires it escaped"
    return e.msg


def _where(path: str, n: int) -> str:
    return f"{path}: record [{n}]" if path.lower().endswith(".json") else f"{path}: line {n}"


def _field(rec: dict, name: str, where: str, types, what: str):
    if name not in rec:
        raise DataError(f"{where}: missing field '{name}'")
    if not isinstance(rec[name], types):
        raise DataError(f"{where}: field '{name}' must be {what}, found a {type(rec[name]).__name__}")
    return rec[name]


def _detect_format(path: str, kind: str, n: int, rec: dict) -> str:
    """The file's format, recognised from its first record; every record must then match it."""
    where = _where(path, n)
    if kind == "lm":
        if "text" not in rec:
            raise DataError(f"{where}: missing field 'text' (an lm stage reads {{\"text\"}} records or a .txt file)")
        return "text"
    if kind == "dpo":
        for name in ("chosen", "rejected"):
            if name not in rec:
                raise DataError(f"{where}: missing field '{name}' (a dpo stage reads preference pairs: "
                                f"'prompt', 'chosen', 'rejected')")
        return "pairs"
    if "messages" in rec:
        return "chat"
    if "chosen" in rec and "rejected" in rec:
        raise DataError(f"{where}: a preference pair ('chosen', 'rejected'), which a dpo stage reads, not an sft stage")
    if "prompt" in rec or "answer" in rec:
        return "prompt_answer"
    raise DataError(f"{where}: missing field 'messages' (Tulu conversation) or 'prompt' and 'answer' (TRACE)")


def _pair_messages(rec: dict, name: str, where: str) -> list[dict]:
    """One side of a preference pair as a conversation whose last message is the response."""
    side = _field(rec, name, where, (list, str), "a list of messages or a string")
    if isinstance(side, str):
        prompt = _field(rec, "prompt", where, str, "a string (needed when chosen/rejected are strings)")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": side}]
    if not side:
        raise DataError(f"{where}: field '{name}' is an empty list of messages")
    last = side[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        role = last.get("role") if isinstance(last, dict) else type(last).__name__
        raise DataError(f"{where}: field '{name}': the last message must be the assistant response, found {role!r}")
    return side


def _has_target(labels: list[int]) -> bool:
    return any(x != IGNORE_INDEX for x in labels[1:])  # token 0 is never predicted


def load_examples(path: str, kind: str, tokenizer: Tokenizer, max_seq_len: int, log=print) -> list[dict]:
    """Read, validate and tokenize a whole data file for a stage of kind "lm", "sft" or "dpo".

    - sft, Tulu conversations ({"messages": [{"role", "content"}]}): loss on each assistant content
      and the eos id that stands where the template says "</s>" (see _encode_chat).
    - sft, TRACE ({"prompt", "answer"}): loss on the answer and eos (see _encode_prompt_answer).
    - dpo, UltraFeedback binarized ({"prompt", "chosen", "rejected"}, each side a message list ending
      in the assistant response, or a plain string answering "prompt" as one user turn): labels mark
      the final response and its eos only.
    - lm, plain text ({"text"} records or a .txt file): each document is encoded literally, eos
      appended, and cut into consecutive windows of max_seq_len - 1 tokens, each example starting
      with bos: no token is lost, loss on every token but bos.
    sft/dpo sequences are right-truncated to max_seq_len; an example left with no target token is
    dropped and counted in the line logged per file.
    """
    if kind not in ("lm", "sft", "dpo"):
        raise ValueError(f"kind must be 'lm', 'sft' or 'dpo', got {kind!r}")
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2 (bos and one token), got {max_seq_len}")
    records = read_records(path)
    fmt = _detect_format(path, kind, *records[0])
    L = max_seq_len
    examples, dropped = [], Counter()
    for n, rec in records:
        where = _where(path, n)
        try:
            if fmt == "text":
                doc = tokenizer.encode(_field(rec, "text", where, str, "a string"), bos=False, eos=True, special=False)
                if len(doc) == 1:
                    dropped["empty text"] += 1
                    continue
                for i in range(0, len(doc), L - 1):
                    ids = [tokenizer.bos_id] + doc[i:i + L - 1]
                    examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]})
                continue
            if fmt == "pairs":
                ex = {}
                for side in ("chosen", "rejected"):
                    ids, labels = _encode_chat(tokenizer, _pair_messages(rec, side, where), last_only=True)
                    ex[side] = {"input_ids": ids[:L], "labels": labels[:L]}
                if not (_has_target(ex["chosen"]["labels"]) and _has_target(ex["rejected"]["labels"])):
                    dropped[f"no target tokens left after truncation to {L}"] += 1
                    continue
                examples.append(ex)
                continue
            if fmt == "chat":
                ids, labels = _encode_chat(tokenizer, _field(rec, "messages", where, list, "a list of messages"))
            else:
                ids, labels = _encode_prompt_answer(tokenizer, _field(rec, "prompt", where, str, "a string"),
                                                    _field(rec, "answer", where, str, "a string"))
        except DataError as e:
            msg = str(e)
            raise DataError(msg if msg.startswith(where) else f"{where}: {msg}") from None
        ids, labels = ids[:L], labels[:L]
        if not _has_target(labels):
            dropped[f"no target tokens left after truncation to {L}"] += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
    why = next(iter(dropped)) if len(dropped) == 1 else ", ".join(f"{k}: {v}" for k, v in dropped.items())
    if not examples:
        raise DataError(f"{path}: no usable example in {len(records)} records" + (f" ({why})" if why else ""))
    n_dropped = f"{sum(dropped.values())} dropped" + (f" ({why})" if why else "")
    if fmt == "text":
        log(f"data: {path}: {len(records)} documents -> {len(examples)} examples "
            f"(consecutive windows of at most {L} tokens), {n_dropped}")
    else:
        log(f"data: {path}: {len(examples)} examples, {n_dropped}")
    return examples


def _pad(seqs: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    T = max(len(s["input_ids"]) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s["input_ids"])] = torch.tensor(s["input_ids"], dtype=torch.long)
        labels[i, :len(s["labels"])] = torch.tensor(s["labels"], dtype=torch.long)
    return {"input_ids": ids, "labels": labels}


def collate(examples: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; labels are IGNORE_INDEX on padding. Right padding needs
    no attention mask: under causal attention no real token sees the padding after it.

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


class StepSampler:
    """Which examples each rank trains on at each optimizer step.

    Every epoch is a permutation drawn from (seed, stage, epoch) with a private generator, so the
    global RNG is untouched and micro_batches(step) is a pure function of its arguments: a resumed
    run picks up at any step. Step i of an epoch takes the permutation's i-th run of batch_size
    examples (the remainder of an epoch is dropped); rank r takes the r-th contiguous
    1/world_size share of it, split into micro-batches of micro_batch_size.
    """

    def __init__(self, n_examples: int, batch_size: int, micro_batch_size: int, world_size: int, rank: int,
                 seed: int, stage, epochs: int, source: str = "the stage's data"):
        if batch_size <= 0 or micro_batch_size <= 0 or batch_size % (world_size * micro_batch_size):
            raise ValueError(f"train.batch_size={batch_size} must be a positive multiple of "
                             f"train.micro_batch_size={micro_batch_size} x world size {world_size} "
                             f"= {world_size * micro_batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.n, self.batch_size, self.micro_batch_size = n_examples, batch_size, micro_batch_size
        self.world_size, self.rank, self.seed, self.stage, self.epochs = world_size, rank, seed, stage, epochs
        self.steps_per_epoch = n_examples // batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"{source}: {n_examples} examples, fewer than train.batch_size={batch_size}, "
                            f"so not one optimizer step")
        self.total_steps = self.steps_per_epoch * epochs
        self._perm = (None, None)

    def permutation(self, epoch: int) -> list[int]:
        if self._perm[0] != epoch:
            key = hashlib.sha256(f"{self.seed}/{self.stage}/{epoch}".encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
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
    """[B] float32: the summed log-probability of each sequence's target tokens (shifted as above)."""
    _check_shapes(logits, labels)
    B, T, V = logits.shape
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    logp = -F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                            reduction="none")  # 0 at ignored positions
    return logp.view(B, T - 1).sum(-1)


def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO (Rafailov et al. 2023): per-pair losses [B] = -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))),
    from summed sequence log-probs. Equal policy and reference give ln 2. Metrics are per pair."""
    chosen_reward = beta * (pi_chosen - ref_chosen)
    rejected_reward = beta * (pi_rejected - ref_rejected)
    losses = -F.logsigmoid(chosen_reward - rejected_reward)
    chosen_reward, rejected_reward = chosen_reward.detach(), rejected_reward.detach()
    metrics = {"reward_acc": (chosen_reward > rejected_reward).float(),
               "reward_margin": chosen_reward - rejected_reward,
               "chosen_reward": chosen_reward, "rejected_reward": rejected_reward}
    return losses, metrics
