"""data.py: templates, label masks, readers, truncation, the step sampler, loss normalisation, DPO,
and every data error. Fixture files are written here in each format."""
import dataclasses
import hashlib
import json
import math
import mmap
import os
import random
import re
import shutil

import numpy as np
import pytest
import torch

import data
from conftest import WORDS, run_ranks
from data import IGNORE_INDEX, DataError


@pytest.fixture(scope="module")
def llama_spm(tmp_path_factory):
    """A tokenizer laid out like LLaMA-2's: no normalisation, whitespace kept, digits split, byte
    fallback, so "\\n" is the byte piece <0x0A> and decodes back to a newline."""
    import sentencepiece as spm
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(3000)]
    lines += ["<|user|>", "<|assistant|>", "<|system|>", "Q: A: 0123456789 .,!?:;()[]{}=+-*/"]
    prefix = str(tmp_path_factory.mktemp("llama_spm") / "tokenizer")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=512, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2)
    return prefix + ".model"


@pytest.fixture(scope="module")
def tok(llama_spm):
    return data.Tokenizer(llama_spm)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


SYS = {"role": "system", "content": "be brief"}
U1 = {"role": "user", "content": "where is paris"}
A1 = {"role": "assistant", "content": "paris is a city on the river"}
U2 = {"role": "user", "content": "and london?"}
A2 = {"role": "assistant", "content": "  london is a city too\n"}  # stripped, as open-instruct does
CONV = [SYS, U1, A1, U2, A2]


def target_spans(labels):
    """Contiguous runs of positions whose label is not IGNORE_INDEX."""
    spans, start = [], None
    for i, x in enumerate(labels + [IGNORE_INDEX]):
        if x != IGNORE_INDEX and start is None:
            start = i
        elif x == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_tokenizer_meta_api(tok, llama_spm, tmp_path):
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id) == (512, 1, 2, -1)
    s = "<|user|>\nthe city\n\n  of paris"
    ids = tok.encode(s, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids) == s
    # The eos piece written as text is the eos id (HF's LlamaTokenizer behaviour), unless
    # special=False.
    assert tok.encode("a city</s>", bos=False, eos=False)[-1] == tok.eos_id
    literal = tok.encode("a city</s>", bos=False, eos=False, special=False)
    assert tok.eos_id not in literal and tok.decode(literal) == "a city</s>"
    with pytest.raises(FileNotFoundError, match="nowhere/tokenizer.model"):
        data.Tokenizer(str(tmp_path / "nowhere" / "tokenizer.model"))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="junk.model"):
        data.Tokenizer(str(junk))


def test_chat_template_strings():
    assert data.chat_segments(CONV) == [
        ("<|system|>\nbe brief\n", False),
        ("<|user|>\nwhere is paris\n", False),
        ("<|assistant|>\n", False), ("paris is a city on the river</s>", True), ("\n", False),
        ("<|user|>\nand london?\n", False),
        ("<|assistant|>\n", False), ("london is a city too</s>", True), ("\n", False)]
    prompt = "<|system|>\nbe brief\n<|user|>\nwhere is paris\n<|assistant|>\n"
    assert data.chat_prompt([SYS, U1, A1]) == prompt
    assert data.chat_prompt([SYS, U1]) == prompt
    assert data.chat_prompt(CONV) == (prompt + "paris is a city on the river</s>\n"
                                      "<|user|>\nand london?\n<|assistant|>\n")


@pytest.mark.parametrize("messages", [[U1, A1], [SYS, U1, A1], CONV],
                         ids=["single", "system", "multi"])
def test_conversation_label_masks(tok, tmp_path, messages):
    path = write_jsonl(tmp_path / "tulu.jsonl", [{"dataset": "x", "id": "0", "messages": messages}])
    (ex,) = data.load_examples(path, "sft", tok, 512, log=lambda *a: None)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels)
    # The training ids are exactly the whole rendered conversation, tokenized at once.
    text = "".join(t for t, _ in data.chat_segments(messages)).removesuffix("\n")
    assert ids == tok.encode(text, bos=True, eos=False)
    assistants = [m["content"].strip() for m in messages if m["role"] == "assistant"]
    spans = target_spans(labels)
    assert len(spans) == len(assistants)
    for (s, e), content in zip(spans, assistants):
        assert labels[s:e] == ids[s:e]
        assert ids[e - 1] == tok.eos_id  # the real eos where the template says </s>
        assert tok.decode(ids[s:e - 1]) == content
    # Every position outside the spans is masked: the headers, system and user turns, and "\n".
    assert sum(x != IGNORE_INDEX for x in labels) == sum(e - s for s, e in spans)
    assert spans[-1][1] == len(ids)  # nothing after the last response is kept


@pytest.mark.parametrize("which", ["llama_like", "conftest_spm"])
def test_eval_prompt_is_prefix_of_training_tokens(which, llama_spm, spm_path, tmp_path):
    tk = data.Tokenizer(llama_spm if which == "llama_like" else spm_path)
    rng = random.Random(3)
    convs = []
    for _ in range(50):
        words = lambda: " ".join(rng.choice(WORDS + ["42", "?", "7.5"])
                                 for _ in range(rng.randint(1, 9)))
        msgs = [{"role": "system", "content": words()}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 3)):
            msgs += [{"role": "user", "content": words()},
                     {"role": "assistant", "content": words()}]
        convs.append(msgs)
    # A literal "</s>" inside a message is the eos id too (as in HF's tokenizer); spans still
    # line up.
    convs.append([{"role": "user", "content": "a </s> b"},
                  {"role": "assistant", "content": "c </s> d"},
                  {"role": "user", "content": "e"}, {"role": "assistant", "content": "f"}])
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in convs])
    examples = data.load_examples(path, "sft", tk, 4096, log=lambda *a: None)
    for msgs, ex in zip(convs, examples):
        starts = [s for s, _ in target_spans(ex["labels"])]
        turn_ends = [i + 1 for i, m in enumerate(msgs) if m["role"] == "assistant"]
        assert len(starts) == len(turn_ends)
        for k, start in zip(turn_ends, starts):
            # up to the last user
            prompt = tk.encode(data.chat_prompt(msgs[:k - 1]), bos=True, eos=False)
            assert ex["input_ids"][:len(prompt)] == prompt and len(prompt) == start


def test_tokenizer_merging_across_prompt_end_is_an_error(tmp_path):
    class MergingSP:  # merges a newline with the character after it, which no LLaMA piece does
        def encode(self, s):
            return [3 + ord(c[-1]) + 1000 * (len(c) - 1)
                    for c in re.findall(r"\n.|.", s, flags=re.S)]
    tk = object.__new__(data.Tokenizer)
    tk.sp_model, tk.n_words, tk.bos_id, tk.eos_id, tk.pad_id, tk.eos_piece = (MergingSP(), 5000,
                                                                              1, 2, -1, "</s>")
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [U1, A1]}])
    with pytest.raises(DataError, match=r"m\.jsonl: line 1: .*not a prefix"):
        data.load_examples(path, "sft", tk, 512, log=lambda *a: None)


def test_trace_rendering_and_mask(tok, tmp_path):
    recs = [{"prompt": "Q: what is two plus three? A:", "answer": "five"},
            {"prompt": "stance of the city", "answer": "positive"}]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(recs), encoding="utf-8")
    examples = data.load_examples(str(path), "sft", tok, 512, log=lambda *a: None)
    for r, ex in zip(recs, examples):
        p = tok.encode(r["prompt"], bos=True, eos=False)
        a = tok.encode(r["answer"], bos=False, eos=False)
        assert ex["input_ids"] == p + a + [tok.eos_id]
        assert ex["labels"] == [IGNORE_INDEX] * len(p) + a + [tok.eos_id]
        assert tok.decode(a) == r["answer"]


def test_lm_windows_lose_nothing(tok, tmp_path):
    text = (" ".join(random.Random(1).choice(WORDS) for _ in range(60))
            + "\nlast line</s> kept literally")
    doc = tok.encode(text, bos=False, eos=True, special=False)
    L = 16
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    jsonl = write_jsonl(tmp_path / "docs.jsonl", [{"text": text}, {"text": "a"}])
    for path, n_docs in ((str(tmp_path / "book.txt"), 1), (jsonl, 2)):
        examples = data.load_examples(path, "lm", tok, L, log=lambda *a: None)
        assert len(examples) == math.ceil(len(doc) / (L - 1)) + (n_docs - 1)
        for ex in examples:
            assert len(ex["input_ids"]) <= L and ex["input_ids"][0] == tok.bos_id
            assert ex["labels"] == [IGNORE_INDEX] + ex["input_ids"][1:]
        first = examples[:math.ceil(len(doc) / (L - 1))]
        assert [t for ex in first for t in ex["input_ids"][1:]] == doc


def test_truncation_drops_and_logs(tok, tmp_path):
    long = " ".join(["the city"] * 200)
    recs = [{"messages": [U1, A1]},  # fits
            # prompt alone exceeds L: dropped
            {"messages": [{"role": "user", "content": long}, A1]},
            {"messages": [U1, {"role": "assistant", "content": long}]},  # response cut, kept
            # both responses past L: dropped
            {"messages": [{"role": "user", "content": long}, A1, U2, A2]}]
    L = 64
    path = write_jsonl(tmp_path / "train.jsonl", recs)
    logged = []
    examples = data.load_examples(path, "sft", tok, L, log=logged.append)
    assert logged == [f"data: {path}: 2 examples, 2 dropped (no target tokens left after "
                      f"truncation to {L})"]
    cut = examples[1]
    full_ids, full_labels = data._encode_chat(tok, recs[2]["messages"])
    assert (len(full_ids) > L and cut["input_ids"] == full_ids[:L]
            and cut["labels"] == full_labels[:L])
    assert cut["labels"][-1] != IGNORE_INDEX and tok.eos_id not in cut["input_ids"]
    # TRACE and dpo truncate the same way.
    trace = write_jsonl(tmp_path / "t.jsonl", [{"prompt": long, "answer": "five"},
                                               {"prompt": "a", "answer": "b"}])
    logged.clear()
    assert (len(data.load_examples(trace, "sft", tok, L, log=logged.append)) == 1
            and "1 dropped" in logged[0])


def test_preference_pairs(tok, tmp_path):
    prompt_msgs = [U1]
    recs = [{"prompt": U1["content"], "chosen": prompt_msgs + [A1],
             "rejected": prompt_msgs + [{"role": "assistant", "content": "london"}],
             "score_chosen": 8.0},
            {"prompt": "two plus two", "chosen": "four", "rejected": "five"},
            {"prompt": "x", "chosen": [{"role": "user", "content": " ".join(["city"] * 200)}, A1],
             "rejected": [{"role": "user", "content": "y"}, A2]}]  # chosen truncated away: dropped
    path = write_jsonl(tmp_path / "uf.jsonl", recs)
    logged = []
    examples = data.load_examples(path, "dpo", tok, 64, log=logged.append)
    assert len(examples) == 2 and "1 dropped" in logged[0]
    (c, r), (c2, r2) = [(e["chosen"], e["rejected"]) for e in examples]
    prompt = tok.encode(data.chat_prompt(prompt_msgs), bos=True, eos=False)
    for side, answer in ((c, A1["content"]), (r, "london")):
        (s, e), = target_spans(side["labels"])  # only the final response
        assert side["input_ids"][:s] == prompt and side["input_ids"][e - 1] == tok.eos_id
        assert tok.decode(side["input_ids"][s:e - 1]) == answer
    # Strings: the prompt becomes one user turn.
    string_prompt = tok.encode(data.chat_prompt([{"role": "user", "content": "two plus two"}]),
                               bos=True, eos=False)
    assert c2["input_ids"][:len(string_prompt)] == string_prompt
    assert tok.decode(c2["input_ids"][len(string_prompt):-1]) == "four"
    # Multi-turn sides: only the last assistant message is a target.
    ids, labels = data._encode_chat(tok, CONV, last_only=True)
    (s, e), = target_spans(labels)
    assert tok.decode(ids[s:e - 1]) == A2["content"].strip()

    batch = data.collate(examples, pad_id=tok.pad_id)
    T = max(len(x["input_ids"]) for e in examples for x in (e["chosen"], e["rejected"]))
    for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
        assert batch[k].shape == (2, T) and batch[k].dtype == torch.long
    assert batch["rejected_labels"][1, len(r2["labels"]):].eq(IGNORE_INDEX).all()
    assert batch["rejected_input_ids"][1, :len(r2["input_ids"])].tolist() == r2["input_ids"]


def test_collate_right_pads():
    ex = [{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]},
          {"input_ids": [1, 7], "labels": [-100, 7]}]
    b = data.collate(ex, pad_id=-1)  # LLaMA has no pad id: any real id is fine, it carries no loss
    assert b["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert b["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]


def test_sampler_deterministic_and_private_rng():
    rng_state = torch.get_rng_state()
    a = data.StepSampler(100, 8, 2, 1, 0, seed=0, stage=0, epochs=3)
    b = data.StepSampler(100, 8, 2, 1, 0, seed=0, stage=0, epochs=3)
    assert torch.equal(rng_state, torch.get_rng_state())
    assert (a.steps_per_epoch, a.total_steps) == (12, 36)
    steps = [a.micro_batches(s) for s in range(a.total_steps)]
    assert steps == [b.micro_batches(s) for s in range(b.total_steps)]
    assert (all(len(mb) == 2 for step in steps for mb in step)
            and all(len(step) == 4 for step in steps))
    flat = lambda step: [i for mb in step for i in mb]
    epochs = [[i for s in steps[e * 12:(e + 1) * 12] for i in flat(s)] for e in range(3)]
    for ep in epochs:
        assert len(ep) == 96 == len(set(ep))  # no repeats within an epoch; the remainder is dropped
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    other_stage = data.StepSampler(100, 8, 2, 1, 0, seed=0, stage=1, epochs=3)
    other_seed = data.StepSampler(100, 8, 2, 1, 0, seed=1, stage=0, epochs=3)
    assert flat(other_stage.micro_batches(0)) != flat(steps[0])
    assert flat(other_seed.micro_batches(0)) != flat(steps[0])


def test_sampler_ranks_and_restart():
    kw = dict(seed=5, stage="sft", epochs=2)
    single = data.StepSampler(50, 8, 8, 1, 0, **kw)
    ranks = [data.StepSampler(50, 8, 2, 2, r, **kw) for r in range(2)]
    for step in range(single.total_steps):
        (global_batch,) = single.micro_batches(step)
        union = [i for s in ranks for mb in s.micro_batches(step) for i in mb]
        assert union == global_batch
    # Resume: a fresh sampler asked for step k gives the k-th step of an uninterrupted run.
    run = [ranks[1].micro_batches(s) for s in range(ranks[1].total_steps)]
    for k in (0, 5, 6, 11):
        assert data.StepSampler(50, 8, 2, 2, 1, **kw).micro_batches(k) == run[k]
    with pytest.raises(IndexError):
        single.micro_batches(single.total_steps)


def test_sampler_errors():
    with pytest.raises(ValueError, match=r"train\.batch_size=8 .*train\.micro_batch_size=3"):
        data.StepSampler(100, 8, 3, 1, 0, 0, 0, 1)
    with pytest.raises(ValueError, match=r"train\.batch_size=8 .*world size 3"):
        data.StepSampler(100, 8, 2, 3, 0, 0, 0, 1)
    with pytest.raises(DataError, match=r"7 examples, fewer than train\.batch_size=8"):
        data.StepSampler(7, 8, 2, 1, 0, 0, 0, 1)


def test_loss_normalised_by_global_target_count(tiny_args):
    from model import Transformer
    torch.manual_seed(0)
    model = Transformer(tiny_args)
    model.init_weights(seed=0)
    gen = torch.Generator().manual_seed(0)
    examples = []
    for n, n_targets in ((20, 1), (9, 8), (30, 25), (5, 2)):  # very different target counts
        ids = torch.randint(3, tiny_args.vocab_size, (n,), generator=gen).tolist()
        examples.append({"input_ids": ids,
                         "labels": [IGNORE_INDEX] * (n - n_targets) + ids[n - n_targets:]})
    # Reference: mean cross-entropy over every target token of the global batch.
    with torch.no_grad():
        per_ex = [data.token_loss_sum(model(torch.tensor([e["input_ids"]])),
                                      torch.tensor([e["labels"]]))
                  for e in examples]
        ref = (sum(l for l, _ in per_ex) / sum(c for _, c in per_ex)).item()
        # 1x4, 1x1, 2x2, 2x1 (ranks x micro-batches)
        for world, mbs in ((1, 1), (1, 4), (2, 1), (2, 2)):
            samplers = [data.StepSampler(4, 4, mbs, world, r, 0, 0, 1) for r in range(world)]
            batches = [data.collate([examples[i] for i in mb])
                       for s in samplers for mb in s.micro_batches(0)]
            # what the trainer all-reduces
            denom = sum(data.count_targets(b["labels"]) for b in batches)
            sums = [data.token_loss_sum(model(b["input_ids"]), b["labels"]) for b in batches]
            assert sum(l for l, _ in sums).item() / denom == pytest.approx(ref, rel=1e-5), \
                (world, mbs)
            if len(batches) > 1:  # a mean of per-micro-batch means would depend on the split
                naive = sum(l / c for l, c in sums).item() / len(batches)
                assert abs(naive - ref) > 1e-3


def test_token_loss_shift_and_logps():
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[1, 4, -100, 6, 7], [1, -100, -100, -100, 3]])
    loss, count = data.token_loss_sum(logits, labels)
    assert count.item() == data.count_targets(labels) == 4 and loss.dtype == torch.float32
    lp = torch.log_softmax(logits, -1)
    want = [lp[0, 0, 4] + lp[0, 2, 6] + lp[0, 3, 7], lp[1, 3, 3]]
    assert torch.allclose(data.sequence_logps(logits, labels), torch.stack(want))
    assert loss.item() == pytest.approx(-sum(w.item() for w in want), rel=1e-6)
    with pytest.raises(ValueError, match=r"\(2, 5, 11\).*\(2, 4\)"):
        data.token_loss_sum(logits, labels[:, :4])


def test_dpo_loss_values():
    pi = torch.tensor([-12.0, -30.0, -5.0])
    losses, m = data.dpo_loss(pi, pi - 3, pi, pi - 3, beta=0.1)
    assert torch.allclose(losses, torch.full((3,), math.log(2)))
    losses, m = data.dpo_loss(torch.tensor([-10.0]), torch.tensor([-20.0]), torch.tensor([-12.0]),
                              torch.tensor([-18.0]), beta=0.5)
    assert (m["chosen_reward"].item() == pytest.approx(1.0)
            and m["rejected_reward"].item() == pytest.approx(-1.0))
    assert m["reward_margin"].item() == pytest.approx(2.0) and m["reward_acc"].item() == 1.0
    assert losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-2.0))))


def test_dpo_step_raises_chosen_over_rejected(tok, tiny_args, tmp_path):
    from model import Transformer
    recs = [{"prompt": "the color of the apple", "chosen": "red", "rejected": "blue"},
            {"prompt": "two plus three", "chosen": "five", "rejected": "six"}]
    examples = data.load_examples(write_jsonl(tmp_path / "p.jsonl", recs), "dpo", tok, 64,
                                  log=lambda *a: None)
    args = dataclasses.replace(tiny_args, vocab_size=tok.n_words)
    model = Transformer(args)
    model.init_weights(seed=0)
    b = data.collate(examples)
    ids = torch.cat([b["chosen_input_ids"], b["rejected_input_ids"]])
    labels = torch.cat([b["chosen_labels"], b["rejected_labels"]])
    with torch.no_grad():
        ref = data.sequence_logps(model(ids), labels)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    logps = data.sequence_logps(model(ids), labels)
    losses, _ = data.dpo_loss(logps[:2], logps[2:], ref[:2], ref[2:], beta=0.1)
    assert torch.allclose(losses, torch.full((2,), math.log(2)))
    losses.mean().backward()
    opt.step()
    with torch.no_grad():
        after = data.sequence_logps(model(ids), labels)
    margin = (after[:2] - ref[:2]) - (after[2:] - ref[2:])
    assert (margin > 0).all(), margin


BAD_UTF8 = b'{"text": "ok"}\n{"text": "caf\xe9"}\n'


@pytest.mark.parametrize("name,content,kind,pattern", [
    ("bad.jsonl", '{"messages": []}\n\n{"messages": [}\n', "sft",
     r"bad\.jsonl: line 3: malformed JSON"),
    ("bad.json", '[{"prompt": "a", "answer": "b"},\n {"prompt": "a" "answer": "b"}]', "sft",
     r"bad\.json: line 2: malformed JSON"),
    ("miss.jsonl", '{"messages": [{"role": "user", "content": "a"}, '
                   '{"role": "assistant", "content": "b"}]}\n'
                   '{"id": 7}\n', "sft", r"miss\.jsonl: line 2: missing field 'messages'"),
    ("miss.json", '[{"prompt": "a", "answer": "b"}, {"prompt": "c"}]', "sft",
     r"miss\.json: record \[1\]: missing field 'answer'"),
    ("miss_dpo.jsonl", '{"prompt": "a", "chosen": "b"}\n', "dpo",
     r"miss_dpo\.jsonl: line 1: missing field 'rejected'"),
    ("miss_prompt.jsonl", '{"chosen": "b", "rejected": "c"}\n', "dpo",
     r"line 1: missing field 'prompt'"),
    ("miss_text.jsonl", '{"text": "a"}\n{"txt": "b"}\n', "lm",
     r"miss_text\.jsonl: line 2: missing field 'text'"),
    ("role.jsonl", '{"messages": [{"role": "user", "content": "a"}, '
                   '{"role": "bot", "content": "b"}]}\n', "sft",
     r"role\.jsonl: line 1: messages\[1\]\.role is 'bot'"),
    ("role_dpo.jsonl", '{"chosen": [{"role": "human", "content": "a"}, '
                       '{"role": "assistant", "content": "b"}],'
                       ' "rejected": [{"role": "assistant", "content": "c"}]}\n', "dpo",
     r"line 1: messages\[0\]\.role is 'human'"),
    ("last.jsonl", '{"chosen": [{"role": "user", "content": "a"}], "rejected": "c", '
                   '"prompt": "p"}\n', "dpo",
     r"line 1: field 'chosen': the last message must be the assistant response"),
    ("noasst.jsonl", '{"messages": [{"role": "system", "content": "a"}, '
                     '{"role": "user", "content": "b"}]}\n',
     "sft", r"noasst\.jsonl: line 1: conversation has no assistant turn"),
    ("type.jsonl", '{"prompt": "a", "answer": 3}\n', "sft",
     r"line 1: field 'answer' must be a string"),
    ("empty.jsonl", "\n  \n", "sft", r"empty\.jsonl: empty file"),
    ("empty.txt", "", "lm", r"empty\.txt: empty file"),
    ("empty.json", "[]", "sft", r"empty\.json: empty file"),
    ("dict.json", '{"prompt": "a", "answer": "b"}', "sft", r"dict\.json: .* must hold a list"),
    ("utf8.jsonl", BAD_UTF8, "lm", r"utf8\.jsonl: line 2: bytes that are not UTF-8"),
    ("utf8.txt", b"caf\xc3\xa9 \xff", "lm", r"utf8\.txt: line 1: bytes that are not UTF-8"),
    ("nouse.jsonl", '{"messages": [{"role": "user", "content": "' + "the city " * 100 + '"},'
                    ' {"role": "assistant", "content": "a"}]}\n', "sft",
     r"nouse\.jsonl: no usable example .*truncation to 32"),
    ("blank.jsonl", '{"text": ""}\n', "lm", r"blank\.jsonl: no usable example"),
    ("notobj.jsonl", '["a"]\n', "lm", r"notobj\.jsonl: line 1: a record must be a JSON object"),
    ("kind.jsonl", '{"prompt": "a", "chosen": "b", "rejected": "c"}\n', "sft",
     r"kind\.jsonl: line 1: a preference pair .*dpo stage"),
    ("data.csv", "a,b\n", "sft", r"data\.csv: unsupported file type"),
])
def test_data_errors(tok, tmp_path, name, content, kind, pattern):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    with pytest.raises(DataError, match=pattern):
        data.load_examples(str(p), kind, tok, 32, log=lambda *a: None)


def test_missing_file(tok, tmp_path):
    with pytest.raises(DataError, match="absent.jsonl"):
        data.load_examples(str(tmp_path / "absent.jsonl"), "sft", tok, 32)


@pytest.mark.parametrize("ch", ["\u2028", "\u2029", "\u0085", "\x0b", "\x0c", "\x1c", "\x1d",
                                "\x1e"])
def test_jsonl_lines_end_at_newline_only(tmp_path, ch):
    """str.splitlines() breaks at each of these; a JSON Lines record ends at "\\n" alone."""
    recs = [{"text": f"a{ch}b{ch}"}, {"text": ch}, {"text": "c"}]
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
    p = tmp_path / "x.jsonl"
    for text in (body, body.replace("\n", "\r\n")):
        p.write_bytes(text.encode("utf-8"))
        assert data.read_records(str(p)) == [(1, recs[0]), (2, recs[1]), (3, recs[2])]
    # The character raw inside a string on line 1, a malformed record on line 4.
    p.write_bytes(('{"text": "a' + ch + 'b"}\r\n\r\n{"text": "c"}\r\n{"text": }\r\n')
                  .encode("utf-8"))
    if ch in "\u2028\u2029\u0085":  # valid raw in JSON, and json.dumps / jq / Node write them raw
        assert ch in body
        with pytest.raises(DataError, match=r"x\.jsonl: line 4: malformed JSON"):
            data.read_records(str(p))
        p.write_bytes(('{"text": "a' + ch + 'b"}\n{"text": "c"}\n').encode("utf-8"))
        assert data.read_records(str(p)) == [(1, {"text": f"a{ch}b"}), (2, {"text": "c"})]
    else:  # JSON requires control characters escaped (json.dumps does): an error at their line
        assert ch not in body
        with pytest.raises(DataError, match=rf"x\.jsonl: line 1: malformed JSON \(raw control "
                                            rf"character U\+{ord(ch):04X} in a string"):
            data.read_records(str(p))


def test_record_slices_parse_only_their_own_lines(tmp_path):
    """Each rank of a first start parses only its own slice of a .jsonl file; the slices, in order,
    are read_records' records, counted over the whole file, blank lines skipped."""
    recs = [{"text": f"r{i}\u2028"} for i in range(7)]
    lines = [json.dumps(r, ensure_ascii=False) for r in recs]
    p = tmp_path / "x.jsonl"
    p.write_text("\n".join(lines[:3]) + "\n\n  \n" + "\n".join(lines[3:]) + "\n", "utf-8")
    whole = data.read_records(str(p))
    for parts in (1, 2, 3, 8):
        got = [data.read_record_slice(str(p), i, parts) for i in range(parts)]
        assert [r for mine, _, _ in got for r in mine] == whole
        assert all(n == 7 and first == whole[0] for _, n, first in got)
    # A malformed record on line 8 (the 6th) is only seen by the slice that holds it.
    p.write_text("\n".join(lines[:3]) + "\n\n  \n" + "\n".join(lines[3:5]) + "\n{oops\n"
                 + lines[6] + "\n", "utf-8")
    assert data.read_record_slice(str(p), 0, 2)[0] == whole[:3]
    with pytest.raises(DataError, match=r"x\.jsonl: line 8: malformed JSON"):
        data.read_record_slice(str(p), 1, 2)
    p.write_text("[1]\n" + lines[0] + "\n", "utf-8")  # the first record decides the format
    with pytest.raises(DataError, match=r"x\.jsonl: line 1: a record must be a JSON object"):
        data.read_record_slice(str(p), 1, 2)
    j = tmp_path / "x.json"
    j.write_text(json.dumps(recs), "utf-8")
    assert data.read_record_slice(str(j), 1, 2) == (list(enumerate(recs))[3:], 7, (0, recs[0]))


# The tokenized-data cache


class CountingTok:
    """The tokenizer, counting encode calls: proof that a reused cache tokenizes nothing."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0
        self.model_path, self.bos_id, self.eos_id, self.eos_piece = (tok.model_path, tok.bos_id,
                                                                     tok.eos_id, tok.eos_piece)

    def encode(self, *a, **k):
        self.calls += 1
        return self.tok.encode(*a, **k)


def _words(rng, lo=1, hi=12):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def cache_files(tmp_path, n=9, seed=0):
    """One file per format the cache stores, with dropped examples and multi-window documents."""
    rng = random.Random(seed)
    chats = []
    for i in range(n):
        msgs = [{"role": "system", "content": _words(rng)}] if i % 3 == 0 else []
        for _ in range(rng.randint(1, 3)):
            msgs += [{"role": "user", "content": _words(rng, 1, 60 if i == 4 else 12)},
                     {"role": "assistant", "content": _words(rng)}]
        chats.append({"id": str(i), "messages": msgs})
    pairs = [{"prompt": _words(rng, 1, 80 if i == 2 else 9), "chosen": _words(rng),
              "rejected": _words(rng)}
             for i in range(n)]
    pairs[1] = {"prompt": "x", "chosen": [U1, A1], "rejected": [SYS, U1, A2]}
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps([{"prompt": _words(rng, 1, 40), "answer": _words(rng)}
                                 for _ in range(n)]))
    return {"chat": (write_jsonl(tmp_path / "tulu.jsonl", chats), "sft"),
            "trace": (str(trace), "sft"),
            "pairs": (write_jsonl(tmp_path / "uf.jsonl", pairs), "dpo"),
            "text": (write_jsonl(tmp_path / "docs.jsonl",
                                 [{"text": _words(rng, 1, 90)} for _ in range(n)] + [{"text": ""}]),
                     "lm")}


def as_lists(ex):
    return {k: as_lists(v) if isinstance(v, dict) else [int(x) for x in v] for k, v in ex.items()}


def mapped(a) -> bool:
    while a is not None:
        if isinstance(a, (np.memmap, mmap.mmap)):
            return True
        a = getattr(a, "base", None)
    return False


@pytest.mark.parametrize("fmt", ["chat", "trace", "pairs", "text"])
def test_cached_examples_equal_load_examples(tok, tmp_path, fmt):
    path, kind = cache_files(tmp_path)[fmt]
    L = 48  # some sft/dpo records are cut or dropped, some lm documents span windows
    want_log, got_log = [], []
    want = data.load_examples(path, kind, tok, L, log=want_log.append)
    got = data.cached_examples(path, kind, tok, L, str(tmp_path / "cache"), log=got_log.append)
    assert len(got) == len(want) and [as_lists(e) for e in got] == want
    (d,) = os.listdir(tmp_path / "cache")
    assert got_log == [f"{want_log[0]}; tokenized data written to {tmp_path / 'cache' / d}"]
    assert "dropped (" in want_log[0] or fmt == "trace"
    seqs = [s for e in got for s in ((e["chosen"], e["rejected"]) if kind == "dpo" else (e,))]
    assert all(s[k].dtype == np.int32 and mapped(s[k])
               for s in seqs for k in ("input_ids", "labels"))
    for side in data._sides(kind):  # the flat arrays hold the examples' tokens in order, no more
        for name in ("input_ids", "labels"):
            flat = np.load(os.path.join(got.directory, f"{side}{name}.npy"))
            assert flat.tolist() == [t for e in want for t in (e[side[:-1]] if side else e)[name]]
    raw = open(path, "rb").read()
    assert got.fingerprint == {"path": path, "size": len(raw),
                               "sha256": hashlib.sha256(raw).hexdigest()}
    assert tok.model_path and got.meta["tokenizer"] == tok.model_path
    assert as_lists(got[-1]) == want[-1]
    with pytest.raises(IndexError):
        got[len(got)]
    for a, b in zip(data.collate(want[:3]).values(),
                    data.collate([got[i] for i in range(3)]).values()):
        assert torch.equal(a, b) and b.dtype == torch.long


def test_cache_reused_without_tokenizing(tok, tmp_path):
    path, _ = cache_files(tmp_path)["chat"]
    cache, counting, logged = str(tmp_path / "cache"), CountingTok(tok), []
    first = data.cached_examples(path, "sft", counting, 64, cache, log=logged.append)
    assert counting.calls > 0
    counting.calls = 0
    again = data.cached_examples(path, "sft", counting, 64, cache, log=logged.append)
    assert counting.calls == 0 and again.directory == first.directory
    assert (logged[1] == logged[0].replace("written to", "reused from")
            and first.directory in logged[1])
    assert [as_lists(e) for e in again] == [as_lists(e) for e in first]


def test_cache_key_file_tokenizer_and_length(tok, spm_path, tmp_path):
    path, _ = cache_files(tmp_path)["chat"]
    cache = tmp_path / "cache"
    counting = CountingTok(tok)

    def build(tk=counting, L=64):
        counting.calls = 0
        ex = data.cached_examples(path, "sft", tk, L, str(cache), log=lambda *a: None)
        return ex, counting.calls
    base, calls = build()
    assert calls > 0 and build()[1] == 0
    shorter, calls = build(L=32)
    assert calls > 0 and shorter.directory != base.directory
    other = data.Tokenizer(spm_path)  # another tokenizer.model
    by_other, _ = build(tk=other)
    assert by_other.directory not in (base.directory, shorter.directory)
    assert [as_lists(e) for e in by_other] == data.load_examples(path, "sft", other, 64,
                                                                 log=lambda *a: None)
    with open(path, "a") as f:  # the same path, other content
        f.write(json.dumps({"messages": [U1, A1]}) + "\n")
    changed, calls = build()
    assert calls > 0 and changed.directory != base.directory and len(changed) == len(base) + 1
    assert changed.fingerprint["sha256"] != base.fingerprint["sha256"]
    assert len(os.listdir(cache)) == 4
    with pytest.raises(DataError, match="absent.jsonl: cannot read data file"):
        data.cached_examples(str(tmp_path / "absent.jsonl"), "sft", tok, 64, str(cache))


def test_cache_stale_temp_and_crashed_writer(tok, tmp_path, monkeypatch):
    path, _ = cache_files(tmp_path)["pairs"]
    cache, logged = str(tmp_path / "cache"), []
    want = data.load_examples(path, "dpo", tok, 64, log=lambda *a: None)
    final = data.cached_examples(path, "dpo", tok, 64, cache, log=lambda *a: None).directory
    shutil.rmtree(final)
    # A writer killed half way left its temporary directory: ignored, replaced, never read.
    os.makedirs(final + ".tmp")
    np.save(os.path.join(final + ".tmp", "chosen_input_ids.npy"), np.zeros(3, np.int32))
    with open(os.path.join(final + ".tmp", "meta.json"), "w") as f:
        f.write('{"examples": 1')
    assert [as_lists(e) for e in data.cached_examples(path, "dpo", tok, 64, cache,
                                                      log=logged.append)] == want
    assert os.listdir(cache) == [os.path.basename(final)] and "written to" in logged[-1]
    # A final directory someone damaged is rebuilt, with a line saying so.
    os.remove(os.path.join(final, "rejected_labels.npy"))
    assert [as_lists(e) for e in data.cached_examples(path, "dpo", tok, 64, cache,
                                                      log=logged.append)] == want
    assert "rejected_labels.npy" in logged[-2] and "tokenizing again" in logged[-2]
    # A writer that fails while merging publishes nothing and leaves no temporary directory.
    shutil.rmtree(final)

    def crash(tmp, kind, world):
        np.save(os.path.join(tmp, "chosen_input_ids.npy"), np.zeros(3, np.int32))
        raise OSError("disk full")
    monkeypatch.setattr(data, "_merge_parts", crash)
    with pytest.raises(OSError, match="disk full"):
        data.cached_examples(path, "dpo", tok, 64, cache, log=lambda *a: None)
    assert os.listdir(cache) == []


def _cache_body(spm_path, jobs):
    tok = CountingTok(data.Tokenizer(spm_path))
    result = []
    for path, kind, L, cache in jobs:
        logged, runs = [], []
        for _ in range(2):  # build, then reuse
            tok.calls = 0
            try:
                ex = data.cached_examples(path, kind, tok, L, cache, log=logged.append)
                runs.append({"calls": tok.calls, "examples": [as_lists(e) for e in ex],
                             "dir": ex.directory})
            except DataError as e:
                runs.append({"error": str(e)})
        result.append({"runs": runs, "log": logged})
    return result


def test_two_ranks_cache_byte_identical_and_errors_reach_all(spm_path, tmp_path):
    files = cache_files(tmp_path, n=11)  # odd: the ranks' slices differ in size
    bad = [{"messages": [U1, A1]}] * 6 + [{"messages": [U1, {"role": "bot", "content": "b"}]},
                                          {"id": 7}]
    # lines 7 and 8 are bad, both in rank 1's slice
    bad_path = write_jsonl(tmp_path / "bad.jsonl", bad)
    # and line 2, rank 0's
    both = write_jsonl(tmp_path / "bad_both.jsonl", bad[:1] + [{"messages": []}] + bad[2:])
    one = tmp_path / "one"
    jobs = [(p, kind, 48, str(tmp_path / "two")) for p, kind in files.values()]
    jobs += [(bad_path, "sft", 48, str(tmp_path / "two")), (both, "sft", 48, str(tmp_path / "two"))]
    tk = CountingTok(data.Tokenizer(spm_path))
    single = {}
    for p, kind, L, _ in jobs[:-2]:
        tk.calls = 0
        single[p] = (data.cached_examples(p, kind, tk, L, str(one), log=lambda *a: None), tk.calls)
    r0, r1 = run_ranks(tmp_path, _cache_body, spm_path, jobs)
    for (p, kind, L, _), j0, j1 in zip(jobs[:-2], r0, r1):
        ex, calls = single[p]
        (built0, reused0), (built1, reused1) = j0["runs"], j1["runs"]
        assert (built0["examples"] == built1["examples"] == reused0["examples"]
                == [as_lists(e) for e in ex])
        # Each rank tokenized its own slice: together exactly what one process did; reuse
        # tokenizes nothing.
        assert (built0["calls"] > 0 and built1["calls"] > 0
                and built0["calls"] + built1["calls"] == calls)
        assert reused0["calls"] == reused1["calls"] == 0
        assert (os.path.basename(built0["dir"]) == os.path.basename(ex.directory)
                and built0["dir"] == built1["dir"])
        names = sorted(os.listdir(ex.directory))
        assert names == sorted(os.listdir(built0["dir"]))
        for name in names:  # the arrays and meta.json, byte for byte
            assert open(os.path.join(ex.directory, name), "rb").read() == \
                open(os.path.join(built0["dir"], name), "rb").read(), name
        assert len(j0["log"]) == 2 and j1["log"] == []  # once, on rank 0
        assert "written to" in j0["log"][0] and "reused from" in j0["log"][1]
    # every rank raises the first bad record's error, build and retry alike
    for j in (r0[-2], r1[-2]):
        for run in j["runs"]:
            assert re.fullmatch(r".*bad\.jsonl: line 7: messages\[1\]\.role is 'bot',.*",
                                run["error"])
    for j in (r0[-1], r1[-1]):
        for run in j["runs"]:
            assert re.fullmatch(r".*bad_both\.jsonl: line 2: conversation has no assistant turn.*",
                                run["error"])
    assert not [d for d in os.listdir(tmp_path / "two") if d.startswith("bad")]


def test_cache_part_parses_only_its_slice(tok, tmp_path, monkeypatch):
    """A rank of a first start tokenizes its slice read by read_record_slice: a malformed line in
    another rank's slice is not its error, and its part holds its slice's examples only."""
    recs = [{"messages": [U1, A1]}, {"messages": [SYS, U2, A2]}, {"messages": CONV}] * 2
    lines = [json.dumps(r) for r in recs]
    p = tmp_path / "x.jsonl"
    p.write_text("\n".join(lines[:1] + ["{oops"] + lines[2:]) + "\n", "utf-8")  # line 2: rank 0's
    want = data.load_examples(write_jsonl(tmp_path / "half.jsonl", recs[3:]), "sft", tok, 64,
                              log=lambda *a: None)
    monkeypatch.setattr(data, "rank_world", lambda: (1, 2))
    part = data._tokenize_part(str(p), "sft", tok, 64, str(tmp_path))
    assert (part["format"], part["records"], part["examples"]) == ("chat", 6, 3)
    for name in ("input_ids", "labels"):
        flat = np.load(tmp_path / f"part-00001.{name}.npy").tolist()
        assert flat == [t for e in want for t in e[name]]
    lengths = np.load(tmp_path / "part-00001.lengths.npy").tolist()
    assert lengths == [len(e["input_ids"]) for e in want]
    # A rank on a node that does not see the cache directory says so, before tokenizing.
    with pytest.raises(DataError, match=r"rank 1: .*elsewhere\.tmp, which rank 0 made, is not "
                                        r"there \(every rank must see .*a filesystem they share"):
        data._tokenize_part(str(p), "sft", tok, 64, str(tmp_path / "elsewhere.tmp"))
    monkeypatch.setattr(data, "rank_world", lambda: (0, 2))
    with pytest.raises(DataError, match=r"x\.jsonl: line 2: malformed JSON"):
        data._tokenize_part(str(p), "sft", tok, 64, str(tmp_path))


def test_replay_draw_counts_and_determinism():
    picks = data.replay_indices([40, 10, 30], 20, seed=1, stage=3)
    assert [len(p) for p in picks] == [7, 7, 6]  # equal shares, the first stages one more
    assert all(len(set(p)) == len(p) and all(0 <= i < n for i in p)
               for p, n in zip(picks, [40, 10, 30]))
    assert picks == data.replay_indices([40, 10, 30], 20, seed=1, stage=3)
    assert picks != data.replay_indices([40, 10, 30], 20, seed=1, stage=4)
    assert picks != data.replay_indices([40, 10, 30], 20, seed=2, stage=3)
    assert data.replay_indices([], 5, 0, 0) == []
    with pytest.raises(DataError, match="train.replay asks for 10 examples of earlier stage 1, "
                                        "which has only 4"):
        data.replay_indices([40, 4], 20, seed=1, stage=3)


def test_mixture_indexes_own_then_replayed():
    class Src(list):
        fingerprint = {"path": "p"}
    own, a, b = Src(["o0", "o1"]), Src(["a0", "a1", "a2"]), Src(["b0"])
    own.fingerprint, a.fingerprint, b.fingerprint = {"path": "own"}, {"path": "a"}, {"path": "b"}
    m = data.Mixture(own, [(a, [2, 0]), (b, [])])
    assert len(m) == 4 and [m[i] for i in range(4)] == ["o0", "o1", "a2", "a0"]
    assert m.fingerprints == [{"path": "own"}, {"path": "a"}]
    with pytest.raises(IndexError):
        m[4]


def test_control_group_is_one_gloo_twin_per_process_group(tmp_path, monkeypatch):
    """Under NCCL, all_sum's host-side numbers go over a gloo twin of the default group: made once
    per process group (new_group is collective), float64 CPU tensors. Here gloo poses as nccl."""
    import torch.distributed as dist
    new_group, all_reduce = dist.new_group, dist.all_reduce
    made, reduced = [], []

    def record(t, group=None, **kw):
        reduced.append((t.device, t.dtype, group))
        return all_reduce(t, group=group, **kw)
    for i in range(2):  # a second process group gets a twin of its own
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg{i}", rank=0,
                                world_size=1)
        try:
            assert data.control_group() is None  # under gloo: the default group itself
            with monkeypatch.context() as m:
                m.setattr(dist, "get_backend", lambda group=None: "nccl")
                m.setattr(dist, "new_group", lambda **kw: made.append(kw) or new_group(**kw))
                m.setattr(dist, "all_reduce", record)
                twin = data.control_group()
                assert data.all_sum(3) + data.all_sum(True) == 4.0
                assert twin is not None and data.control_group() is twin
                assert made == [{"backend": "gloo"}] * (i + 1)
                assert reduced[-2:] == [(torch.device("cpu"), torch.float64, twin)] * 2
        finally:
            dist.destroy_process_group()


def _reduce_body():
    import torch.distributed as dist
    r = dist.get_rank() + 1
    return [data.all_sum(r), data.all_sum(r, dist.ReduceOp.MAX)]


def test_all_sum_sums_or_takes_the_max_over_ranks(tmp_path):
    """The stage summary's peak memory is the largest rank's (ReduceOp.MAX), not a mean."""
    assert run_ranks(tmp_path, _reduce_body) == [[3.0, 2.0], [3.0, 2.0]]
