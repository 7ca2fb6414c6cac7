"""eval.py: metric values computed by hand, decoding against full forwards, mc / ppl against
log-probabilities taken by hand, FSDP-safe evaluation over two ranks, and the report."""
import json
import math
import os
import random

import pytest
import torch

import eval as ev
from conftest import run_ranks


# Metrics


def test_exact_match_squad_normalisation():
    assert ev.exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
    assert ev.exact_match("an apple", ["a pear", "Apple."]) == 1.0  # any reference
    assert ev.exact_match("apples", "apple") == 0.0
    assert ev.exact_match("theater", "ater") == 0.0  # articles are whole words only
    assert ev.exact_match("  Paris,   France ", "paris france") == 1.0
    assert ev.exact_match("ÜBER straße", "über Straße") == 1.0
    assert ev.exact_match("", "") == 1.0
    assert ev.exact_match("the", "") == 1.0  # nothing left after removing the article
    assert ev.exact_match("x", []) == 0.0


def test_accuracy_strips_whitespace_only():
    assert ev.accuracy(" A\n", "A") == 1.0
    assert ev.accuracy("a", "A") == 0.0
    assert ev.accuracy("A.", "A") == 0.0
    assert ev.accuracy("", "  ") == 1.0


def test_rouge_l_hand_cases():
    # LCS "the cat on the mat" = 5 of 6 tokens on both sides.
    assert ev.rouge_l("the cat sat on the mat", "the cat was on the mat") == pytest.approx(5 / 6)
    # Ties: "a b c d" vs "b a d c" has four LCS alignments of length 2; P = R = 1/2.
    assert ev.rouge_l("a b c d", "b a d c") == pytest.approx(0.5)
    # P = 2/2, R = 2/4 -> F = 2/3
    assert ev.rouge_l("a b", "a b c d") == pytest.approx(2 / 3)
    # rouge-score's tokenizer keeps [a-z0-9] only: "Über café" -> "ber caf"
    assert ev.rouge_l("Über café", "uber cafe") == 0.0
    assert ev.rouge_l("über, CAFÉ!", "Über café") == 1.0
    assert (ev.rouge_l("", "x") == 0.0 and ev.rouge_l("", "") == 0.0
            and ev.rouge_l("...", "x") == 0.0)
    assert ev.rouge_l("a", ["b", "a c"]) == pytest.approx(2 / 3)  # best reference


def _lcs_table(a, b):
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a)):
        for j in range(len(b)):
            t[i + 1][j + 1] = t[i][j] + 1 if a[i] == b[j] else max(t[i][j + 1], t[i + 1][j])
    return t[-1][-1]


def test_lcs_bit_parallel_matches_the_dp_table():
    rng = random.Random(0)
    for _ in range(200):
        a = "".join(rng.choice("abcé\n") for _ in range(rng.randint(0, 150)))
        b = "".join(rng.choice("abcé\n") for _ in range(rng.randint(0, 150)))
        assert ev._lcs_length(a, b) == _lcs_table(a, b)


def test_edit_similarity_known_values():
    # kitten / sitting: LCS "ittn" = 4, Indel distance 13 - 8 = 5 -> 8/13 (rapidfuzz: 61.538...)
    assert ev.edit_similarity("kitten", "sitting") == pytest.approx(8 / 13)
    assert ev.edit_similarity("", "") == 1.0  # rapidfuzz's fuzz.ratio("", "") is 100
    assert ev.edit_similarity("abc", "") == 0.0
    assert ev.edit_similarity("café", "cafe") == pytest.approx(6 / 8)
    # past one machine word
    assert ev.edit_similarity("a" * 100, "a" * 50) == pytest.approx(100 / 150)
    assert ev.edit_similarity("def f(x):", "def f(x):") == 1.0


def test_sari_hand_cases():
    # Xu et al.'s example sentence, as HF evaluate's sari docstring scores it: 26.9536...
    src = "About 95 species are currently accepted ."
    refs = ["About 95 species are currently known .", "About 95 species are now accepted .",
            "95 species are now accepted ."]
    assert ev.sari(src, "About 95 you now get in .", refs) == pytest.approx(0.26953601953601954,
                                                                            abs=1e-12)
    # A perfect deletion: every keep, delete and add score is 1 (empty n-gram sets count 0/0 = 1).
    assert ev.sari("a b c", "a c", ["a c"]) == pytest.approx(1.0)
    # source "a b", prediction "a c", reference "a b":
    #  1-grams keep P 1, R 1/2 -> F 2/3; deleted "b" is kept by the reference -> del P 0; added
    #  "c" is not in the reference -> add F 0. 2-grams: all 0. 3- and 4-grams: none -> 1, 1, 1.
    assert ev.sari("a b", "a c", "a b") == pytest.approx((2 / 3 + 6) / 12)
    # Two references scale the source/prediction counts by 2:
    #  1-grams: keep P 1, R 2/3 -> F 4/5; "b" deleted twice, kept once by refs -> del P 1/2; add 1.
    #  2-grams: keep R 0 -> F 0; "a b" deleted twice, kept once -> 1/2; add 1. 3/4-grams 1, 1, 1.
    assert ev.sari("a b", "a", ["a", "a b"]) == pytest.approx((0.8 + 0.5 + 1 + 0 + 0.5 + 1 + 6)
                                                              / 12)
    # Lowercased and 13a-tokenized before n-grams: these three are the same sentence.
    assert ev.sari("Hello, world.", "hello , world .", ["HELLO, WORLD."]) == pytest.approx(1.0)


def test_metrics_against_reference_packages_if_installed():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    fuzz = pytest.importorskip("rapidfuzz.fuzz")
    rng = random.Random(1)
    words = "the cat sat on über mat 42 , . café a b".split()
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for _ in range(100):
        p = " ".join(rng.choice(words) for _ in range(rng.randint(0, 12)))
        r = " ".join(rng.choice(words) for _ in range(rng.randint(0, 12)))
        assert ev.rouge_l(p, r) == pytest.approx(scorer.score(r, p)["rougeL"].fmeasure, abs=1e-12)
        assert ev.edit_similarity(p, r) == pytest.approx(fuzz.ratio(p, r) / 100, abs=1e-12)


def test_trace_accuracy_compares_with_equals_and_no_strip():
    # TRACE's caculate_accuracy: prediction == answer; empty prediction or answer skipped but
    # still divided by the number of examples, i.e. 0.
    assert ev.trace_accuracy("A", "A") == 1.0
    assert ev.trace_accuracy("A\n", "A") == 0.0 and ev.trace_accuracy(" A", "A") == 0.0
    assert ev.trace_accuracy("a", "A") == 0.0 and ev.trace_accuracy("12", "12.0") == 0.0
    assert ev.trace_accuracy("", "") == 0.0 and ev.trace_accuracy("", "A") == 0.0
    assert ev.trace_accuracy("B", ["A", "B"]) == 1.0


def test_trace_scienceqa_compares_the_first_character():
    assert ev.trace_scienceqa("B\nBecause plants make food.", "B\nBecause of the sun.") == 1.0
    assert (ev.trace_scienceqa("B", "B\nBecause ...") == 1.0
            and ev.trace_scienceqa("BA", "B\n") == 1.0)
    assert ev.trace_scienceqa("C\nBecause of the sun.", "B\nBecause of the sun.") == 0.0
    assert ev.trace_scienceqa(" B", "B\n") == 0.0 and ev.trace_scienceqa("b\n", "B\n") == 0.0
    assert ev.trace_scienceqa("", "B\n") == 0.0  # TRACE's datium[0] would raise; 0 here
    assert ev.trace_scienceqa("B", "") == 0.0
    # what it was
    assert ev.accuracy("B\nBecause plants make food.", "B\nBecause of the sun.") == 0.0


def test_py150_literals_replaced_as_trace_does():
    pp = ev._py150_postprocess
    assert pp("x = <NUM_LIT> + len(<STR_LIT>) + ord(<CHAR_LIT>)") == "x = 0 + len() + ord()"
    assert pp("f(<STR_LIT:hi>, <NUM_LIT:3>, <CHAR_LIT:c>)") == "f(hi, 3, c)"
    # re.S: across lines; every copy
    assert pp("<STR_LIT:a\nb> == <STR_LIT:a\nb>") == "a\nb == a\nb"
    # Bare placeholders first, then <KIND_LIT:text> non-greedy up to the first ">":
    assert pp("<STR_LIT:<NUM_LIT>>") == "0"
    assert pp("<STR_LIT:<STR_LIT:a>>") == "<STR_LIT:a>"
    assert pp("<NUM_LIT:1><NUM_LIT:1>>") == "11>"
    assert pp("<STR_LIT:>") == "" and pp("<EOL> <INDENT>") == "<EOL> <INDENT>"


def test_trace_edit_similarity_is_fuzzywuzzy_on_difflib():
    # difflib's matching blocks "itt" + "n" = 4 of 13 -> 61.5 -> 62 (rapidfuzz's unrounded 61.54)
    assert ev.trace_edit_similarity("kitten", "sitting") == 0.62
    assert ev.edit_similarity("kitten", "sitting") == pytest.approx(8 / 13)
    # Python's round is half to even: 2/16 -> 12.5 -> 12; 6/16 -> 37.5 -> 38.
    assert ev.trace_edit_similarity("abcdefgh", "aijklmno") == 0.12
    assert ev.trace_edit_similarity("abcdefgh", "abcijklm") == 0.38
    # Literals are replaced in both before comparing; empty afterwards scores 0.
    assert ev.trace_edit_similarity("x = <NUM_LIT>", "x = 0") == 1.0
    assert ev.trace_edit_similarity("f(<STR_LIT:a>)", "f(<STR_LIT>a)") == 1.0
    assert ev.trace_edit_similarity("<STR_LIT>", "<STR_LIT>") == 0.0
    assert ev.trace_edit_similarity("", "") == 0.0
    assert ev.trace_edit_similarity("abc", "") == 0.0
    # difflib's autojunk: in a reference of 200+ characters, a character making up more than 1%
    # of it is "popular" and never starts a match; difflib then finds nothing here.
    assert ev.trace_edit_similarity("x" + "ab" * 100, "ab" * 100) == 0.0
    assert ev.edit_similarity("x" + "ab" * 100, "ab" * 100) == pytest.approx(400 / 401)
    # ... which makes the score depend on which side is the reference (TRACE: ratio(pred, ref)).
    assert ev.trace_edit_similarity("x" + "a" * 199, "a" * 150) == 0.86  # 300/350 = 85.7 -> 86
    assert ev.trace_edit_similarity("a" * 150, "x" + "a" * 199) == 0.0


def _rouge_f(llcs, m, n):
    """rouge 1.0.1's F from the union LCS word count and the two distinct-word counts."""
    r, p = llcs / m, llcs / n
    return 2.0 * ((p * r) / (p + r + 1e-8))


def test_trace_rouge_l_is_the_rouge_package_summary_level():
    assert ev.trace_rouge_l("the cat sat", "the cat sat") == _rouge_f(3, 3, 3)
    # Words are counted as sets: repeats do not count, and "a a b" / "a b b" share both words.
    assert ev.trace_rouge_l("a a a", "a a a") == _rouge_f(1, 1, 1)
    assert ev.trace_rouge_l("a a b", "a b b") == _rouge_f(2, 2, 2)
    assert ev.rouge_l("a a b", "a b b") == pytest.approx(2 / 3)  # rouge-score: sequences
    # Sentences split on ".": each prediction sentence is matched against every answer sentence.
    assert ev.trace_rouge_l("a b. c d", "c d. a b") == _rouge_f(4, 4, 4)
    assert ev.rouge_l("a b. c d", "c d. a b") == pytest.approx(0.5)
    # The backtracked LCS of "a b c d" (prediction) and "b a d c" is {b, d}: 2 of 4 each.
    assert ev.trace_rouge_l("a b c d", "b a d c") == _rouge_f(2, 4, 4)
    # Which LCS is backtracked matters: "a b" vs "b a" ties; going left first finds {b}, which
    # with {a} from the second sentence makes both words: 2 of 2 (going up would give 1).
    assert ev.trace_rouge_l("a b", "b a. a") == _rouge_f(2, 2, 2)
    # Case kept, punctuation other than "." kept in the word.
    assert ev.trace_rouge_l("The cat", "the cat") == _rouge_f(1, 2, 2)
    assert ev.trace_rouge_l("cat, sat", "cat sat") == _rouge_f(1, 2, 2)
    # A blank piece between dots is a sentence holding the word "": {"a", ""} vs {"a"}.
    assert ev.trace_rouge_l("a. .", "a") == _rouge_f(1, 2, 1)
    # Empty scores 0 (TRACE skips it); only dots scores 0 (the package raises).
    assert ev.trace_rouge_l("", "a") == 0.0 and ev.trace_rouge_l("a", "") == 0.0
    assert ev.trace_rouge_l("...", "a b.") == 0.0 and ev.trace_rouge_l("a b.", ".") == 0.0
    assert ev.trace_rouge_l("a", ["b", "a"]) == _rouge_f(1, 1, 1)  # best reference


def _trace_rouge(pred, ref):
    """TRACE's metrics.caculate_rouge for one example, with its rouge 1.0.1."""
    from rouge import Rouge
    if pred == "" or ref == "":
        return 0.0
    try:
        return Rouge(metrics=["rouge-l"]).get_scores(ref, pred, avg=True)["rouge-l"]["f"]
    except ValueError:  # only dots: TRACE's script stops here; eval.py scores 0
        return 0.0


def test_trace_metrics_against_the_packages_trace_pins_if_installed():
    pytest.importorskip("rouge.rouge_score")  # the `rouge` package (pip install rouge==1.0.1)
    fuzz = pytest.importorskip("fuzzywuzzy.fuzz")
    import difflib
    if fuzz.SequenceMatcher is not difflib.SequenceMatcher:
        pytest.skip("python-Levenshtein is installed: fuzzywuzzy then uses its ratio, not TRACE's "
                    "difflib")
    rng = random.Random(2)
    words = ["the", "The", "cat", "a", "über", "42", "x.y", ".", "..", " ", "\n", "<NUM_LIT>",
             "<STR_LIT:a b>"]
    for _ in range(150):
        p = " ".join(rng.choice(words) for _ in range(rng.randint(0, 15)))
        r = " ".join(rng.choice(words) for _ in range(rng.randint(0, 15)))
        assert ev.trace_rouge_l(p, r) == _trace_rouge(p, r)
        pp, rr = ev._py150_postprocess(p), ev._py150_postprocess(r)
        assert ev.trace_edit_similarity(p, r) == (fuzz.ratio(pp, rr) if pp and rr else 0) / 100
    long_ref = "".join(rng.choice("ab (x)") for _ in range(300))  # past difflib's autojunk length
    assert (ev.trace_edit_similarity(long_ref[5:250], long_ref)
            == fuzz.ratio(long_ref[5:250], long_ref) / 100)


def test_continual_metrics_worked_example():
    # OP = (65 + 55 + 90) / 3 = 70; BWT = ((65 - 80) + (55 - 60) + (90 - 90)) / 3 = -20/3
    R = [[80], [70, 60], [65, 55, 90]]
    cm = ev.continual_metrics(R)
    assert cm["OP"] == pytest.approx(70.0) and cm["BWT"] == pytest.approx(-20 / 3)
    square = [[80, 10, 5], [70, 60, 7], [65, 55, 90]]  # entries above the diagonal are ignored
    assert ev.continual_metrics(square) == cm
    assert ev.continual_metrics([[42.0]]) == {"OP": 42.0, "BWT": 0.0}
    with pytest.raises(ValueError, match="row 1 has 1 scores"):
        ev.continual_metrics([[1], [2]])


# Running a tiny model


@pytest.fixture(scope="module")
def tok(spm_path):
    import data
    return data.Tokenizer(spm_path)


def _tiny_model(tiny_args, seed=0):
    from model import Transformer
    model = Transformer(tiny_args)
    model.init_weights(seed)
    return model


@pytest.fixture
def tiny_model(tiny_args):
    return _tiny_model(tiny_args)


def _greedy_by_full_forwards(model, ids, n, eos_id):
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            if nxt == eos_id:
                break
            out.append(nxt)
    return out


PROMPTS = ["the river is", "paris london city of the year born in", "one",
           "<|user|>\nadd two plus three\n<|assistant|>\n"]


def test_generate_equals_argmax_of_full_forwards(tiny_model, tok):
    tiny_model.train()
    expected = [tok.decode(_greedy_by_full_forwards(tiny_model, tok.encode(p, True, False), 7,
                                                    tok.eos_id))
                for p in PROMPTS]
    # batches of 3 and 1
    got = ev.generate(tiny_model, tok, PROMPTS, max_new_tokens=7, batch_size=3)
    assert got == expected
    assert tiny_model.training  # train mode restored
    assert (ev.generate(tiny_model, tok, PROMPTS[::-1], max_new_tokens=7, batch_size=4)
            == expected[::-1])


def test_generate_stops_at_eos(tiny_model, tok):
    ids = tok.encode(PROMPTS[1], True, False)
    free = _greedy_by_full_forwards(tiny_model, ids, 6, eos_id=-1)
    stop = next(t for t in free[1:] if t != free[0])  # pretend this token is eos

    expected = [tok.decode(_greedy_by_full_forwards(tiny_model, tok.encode(p, True, False), 6,
                                                    stop))
                for p in PROMPTS]
    assert expected[1] == tok.decode(free[:free.index(stop)])
    assert (ev.generate(tiny_model, _EosAs(tok, stop), PROMPTS, max_new_tokens=6, batch_size=4)
            == expected)


def test_generate_left_truncates_long_prompts(tiny_model, tok):
    rng = random.Random(3)
    words = ["red", "green", "blue", "code", "def", "one", "river", "paris"]
    long_prompt = " ".join(rng.choice(words) for _ in range(150))
    ids = tok.encode(long_prompt, True, False)
    max_new = 8
    limit = tiny_model.args.max_seq_len - max_new
    assert len(ids) > limit
    kept = [tok.bos_id] + ids[len(ids) - (limit - 1):]  # bos, then the end of the prompt
    expected = tok.decode(_greedy_by_full_forwards(tiny_model, kept, max_new, tok.eos_id))
    assert ev.generate(tiny_model, tok, [long_prompt, "one"], max_new_tokens=max_new)[0] == expected
    assert ev._fit_prompt([1, 5, 6, 7, 8], 3, bos_id=1) == [1, 7, 8]
    assert ev._fit_prompt([5, 6, 7, 8], 3, bos_id=1) == [6, 7, 8]
    assert ev._fit_prompt([1, 5, 6], 3, bos_id=1) == [1, 5, 6]
    with pytest.raises(ValueError, match="max_new_tokens=63"):
        ev.generate(tiny_model, tok, ["x"], max_new_tokens=63)


def test_forward_last_only_is_the_last_row(tiny_model, tok):
    rows = [tok.encode(p, True, False)[:6] for p in PROMPTS[:2]]
    tokens = torch.tensor(rows)
    key_mask = torch.ones(2, 6, dtype=torch.bool)
    key_mask[0, :2] = False  # the prefill's path too: a cache, and row 0 left-padded by two
    with torch.no_grad():
        full = tiny_model(tokens)
        last = tiny_model(tokens, last_only=True)
        full_c = tiny_model(tokens, 0, tiny_model.new_cache(2, 8), key_mask)
        last_c = tiny_model(tokens, 0, tiny_model.new_cache(2, 8), key_mask, last_only=True)
    assert last.shape == last_c.shape == (2, 1, tiny_model.args.vocab_size)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(last_c, full_c[:, -1:], rtol=1e-6, atol=1e-6)


def test_plan_batches_longest_first_within_the_budget():
    assert ev._plan([5, 9, 3, 9, 1], batch_size=2, max_tokens=0) == [[1, 3], [0, 2], [4]]
    # 2 x 9 = 18 positions fit 20, 3 x 9 do not; then 3 x 5 = 15 do.
    assert ev._plan([5, 9, 3, 9, 1], batch_size=8, max_tokens=20) == [[1, 3], [0, 2, 4]]
    # Each 9 alone exceeds 8 and still runs, alone; generation counts the new tokens too.
    assert ev._plan([5, 9, 3, 9, 1], batch_size=8, max_tokens=8) == [[1], [3], [0], [2, 4]]
    assert (ev._plan([5, 9, 3, 9, 1], batch_size=8, max_tokens=20, extra=2)
            == [[1], [3], [0, 2], [4]])
    with pytest.raises(ValueError, match="max_batch_tokens must be >= 0"):
        ev._plan([1], batch_size=1, max_tokens=-1)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ev._plan([1], batch_size=0, max_tokens=0)


def _prefill_shapes(model):
    """Record [B, T] of every prefill (a cached forward from position 0) and every plain forward."""
    shapes = []

    def hook(module, args):
        if len(args) == 1 or args[1] == 0:
            shapes.append(tuple(args[0].shape))

    model.register_forward_pre_hook(hook)
    return shapes


def test_token_budget_bounds_batches_and_changes_no_result(tiny_model, tok):
    prompts = PROMPTS + ["two", "red green blue code def one river paris london"]
    new = 5
    gen = lambda budget: ev.generate(tiny_model, tok, prompts, new, batch_size=8,  # noqa: E731
                                     max_batch_tokens=budget)
    free = gen(0)
    longest = max(len(tok.encode(p, True, False)) for p in prompts)
    budget = 2 * (longest + new)  # the two longest prompts and their new tokens fit exactly
    shapes = _prefill_shapes(tiny_model)
    rows = []  # positions each prefill's logits hold: the last only, not P x vocab of them
    tiny_model.register_forward_hook(
        lambda m, args, out: rows.append(out.shape[1]) if args[1:2] == (0,) else None)
    assert gen(budget) == free
    assert rows == [1] * len(shapes)
    assert shapes[0][0] == 2 and sum(B for B, _ in shapes) == len(prompts)
    for k, (B, P) in enumerate(shapes):
        assert B * (P + new) <= budget  # the KV cache holds B x (P + new) positions
        if k + 1 < len(shapes):  # ... and each batch is as large as the budget allows
            assert (B + 1) * (P + new) > budget
    shapes.clear()  # a budget below every prompt: each runs alone
    assert gen(1) == free
    assert [B for B, _ in shapes] == [1] * len(prompts)

    seqs = [(tok.encode(p, True, False), 1) for p in prompts]
    whole = ev.score_continuations(tiny_model, seqs, batch_size=8, max_batch_tokens=0)
    shapes.clear()
    budget = 3 * max(len(ids) for ids, _ in seqs)
    got = ev.score_continuations(tiny_model, seqs, batch_size=8, max_batch_tokens=budget)
    assert got == pytest.approx(whole, abs=1e-5)
    assert [B for B, _ in shapes] == [3, 3]  # one batch of 6 without the budget
    assert all(B * T <= budget for B, T in shapes)  # float32 logits B x T x vocab


def test_generation_with_a_bf16_cache(tiny_args, tok):
    model = _tiny_model(tiny_args).to(torch.bfloat16)
    cache_dtypes, new_cache = [], model.new_cache
    model.new_cache = lambda *a, **k: cache_dtypes.append(new_cache(*a, **k)) or cache_dtypes[-1]
    expected = [tok.decode(_greedy_by_full_forwards(model, tok.encode(p, True, False), 7,
                                                    tok.eos_id))
                for p in PROMPTS]
    assert ev.generate(model, tok, PROMPTS, max_new_tokens=7, batch_size=3) == expected
    # the parameters' dtype by default
    assert {c.k[0].dtype for c in cache_dtypes} == {torch.bfloat16}
    x = torch.tensor([tok.encode(PROMPTS[1], True, False)])
    with torch.no_grad():  # and bf16 really computes differently from float32
        assert not torch.equal(model(x), _tiny_model(tiny_args)(x))


def _logprob(model, ids, n):
    """log p of the last n tokens of ids, one full forward, summed token by token."""
    with torch.no_grad():
        lp = model(torch.tensor([ids]))[0].log_softmax(-1)
    return sum(float(lp[j - 1, ids[j]]) for j in range(len(ids) - n, len(ids)))


def _write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_multiple_choice_picks_the_highest_summed_logprob(tiny_model, tok, tmp_path):
    questions = [("Which city?", ["paris", "london river", "apple"]),
                 ("Two plus two?", ["four", "five", "six seven"])]
    picks = []
    for q, choices in questions:
        ctx = f"{q}\nAnswer:"
        n_ctx = len(tok.encode(ctx, True, False))
        lps = []
        for c in choices:
            whole = tok.encode(f"{ctx} {c}", True, False)
            lps.append(_logprob(tiny_model, whole, len(whole) - n_ctx))
        picks.append((max(range(3), key=lambda i: lps[i]), lps))
    (p0, lp0), (p1, _) = picks
    wrong = (p1 + 1) % 3
    path = _write_jsonl(tmp_path / "mmlu.jsonl", [
        {"question": questions[0][0], "choices": questions[0][1],
         "answer": questions[0][1][p0]},  # right, by text
        {"question": questions[1][0], "choices": questions[1][1],
         "answer": "ABC"[wrong]},  # wrong, by letter
    ])
    res = ev.evaluate_file(tiny_model, tok, path, batch_size=2)
    assert res["metric"] == "mc" and res["n"] == 2 and res["higher_is_better"]
    assert res["score"] == pytest.approx(50.0)
    assert res["predictions"][0]["logprobs"] == pytest.approx(lp0, abs=1e-4)
    assert res["predictions"][1]["reference"] == questions[1][1][wrong]


def test_perplexity_is_exp_mean_token_nll(tiny_model, tok, tmp_path):
    texts = ["the river is blue", "one two three four five six", "apple"]
    path = _write_jsonl(tmp_path / "wiki.jsonl", [{"text": t} for t in texts])
    nll = ntok = 0
    for t in texts:
        ids = tok.encode(t, True, False)
        nll -= _logprob(tiny_model, ids, len(ids) - 1)
        ntok += len(ids) - 1
    res = ev.evaluate_file(tiny_model, tok, path, batch_size=2)
    assert res["metric"] == "ppl" and not res["higher_is_better"]
    assert res["score"] == pytest.approx(math.exp(nll / ntok), rel=1e-5)
    assert res["score"] > 1.0
    # A .txt file longer than max_seq_len: windows overlapping by one predict each token once.
    long_text = " ".join(["red green blue code"] * 30)
    (tmp_path / "long.txt").write_text(long_text)
    ids = tok.encode(long_text, True, False)
    L = tiny_model.args.max_seq_len
    assert len(ids) > 2 * L
    starts = range(0, len(ids) - 1, L - 1)
    nll = -sum(_logprob(tiny_model, ids[s:s + L], len(ids[s:s + L]) - 1) for s in starts)
    res = ev.evaluate_file(tiny_model, tok, str(tmp_path / "long.txt"))
    assert res["predictions"][0]["tokens"] == len(ids) - 1
    assert res["score"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)


def test_record_formats_and_metric_choice(tiny_model, tok, tmp_path):
    prompts = ["the river is", "one two"]
    preds = ev.generate(tiny_model, tok, prompts, max_new_tokens=5)
    (tmp_path / "C-STANCE").mkdir()
    trace = tmp_path / "C-STANCE" / "test.json"
    trace.write_text(json.dumps([{"prompt": prompts[0], "answer": preds[0]},
                                 {"prompt": prompts[1], "answer": preds[1] + " no"}]))
    res = ev.evaluate_file(tiny_model, tok, str(trace), max_new_tokens=5)
    assert preds[0] != ""  # TRACE's accuracy scores an empty prediction 0
    assert res["metric"] == "trace_accuracy" and res["score"] == pytest.approx(50.0)
    assert [p["prediction"] for p in res["predictions"]] == preds
    # The caller's metric overrides the file name; rouge_l gives partial credit.
    res = ev.evaluate_file(tiny_model, tok, str(trace), metric="rouge_l", max_new_tokens=5)
    assert res["metric"] == "rouge_l"
    assert res["predictions"][1]["score"] == pytest.approx(ev.rouge_l(preds[1], preds[1] + " no"))

    import data
    msgs = [{"role": "user", "content": "add two plus three"},
            {"role": "assistant", "content": " five "}]
    qa = _write_jsonl(tmp_path / "probe.jsonl", [
        {"messages": msgs, "metric": "em"},
        {"question": "where is paris", "answers": ["london", "x"], "metric": "em"}])
    res = ev.evaluate_file(tiny_model, tok, qa, max_new_tokens=4)
    assert res["metric"] == "em"
    assert res["predictions"][0]["prompt"] == data.chat_prompt(msgs)
    assert res["predictions"][0]["reference"] == "five"
    assert res["predictions"][1]["prompt"] == "Q: where is paris\nA:"
    assert res["predictions"][1]["reference"] == ["london", "x"]
    expected = ev.generate(tiny_model, tok, [data.chat_prompt(msgs), "Q: where is paris\nA:"],
                           max_new_tokens=4)
    assert [p["prediction"] for p in res["predictions"]] == expected

    (tmp_path / "20Minuten").mkdir()
    sari_file = _write_jsonl(tmp_path / "20Minuten" / "test.jsonl",
                             [{"prompt": "der Hund", "answer": "Hund"}])
    res = ev.evaluate_file(tiny_model, tok, sari_file, max_new_tokens=4)
    assert res["metric"] == "sari"
    p = res["predictions"][0]
    assert p["score"] == pytest.approx(ev.sari("der Hund", p["prediction"], "Hund"))

    bad = _write_jsonl(tmp_path / "bad.jsonl",
                       [{"prompt": "a", "answer": "b"}, {"prompt": "no answer"}])
    with pytest.raises(data.DataError, match=r"bad.jsonl: line 2: no 'answer'"):
        ev.evaluate_file(tiny_model, tok, bad)


@pytest.mark.parametrize("path,metric", [
    ("trace/C-STANCE/test.json", "trace_accuracy"), ("trace/FOMC/test.json", "trace_accuracy"),
    ("MeetingBank.jsonl", "trace_rouge_l"), ("trace/Py150/test.json", "trace_edit_sim"),
    ("trace/ScienceQA/test.json", "trace_scienceqa"),
    ("trace/NumGLUE-cm/test.json", "trace_accuracy"),
    ("numglue_ds_test.jsonl", "trace_accuracy"), ("trace/20Minuten/test.json", "sari"),
])
def test_trace_task_names_map_to_their_metrics(path, metric):
    assert ev._default_metric(path, {"prompt": "p", "answer": "a"}) == metric


def test_default_metric_by_record_shape():
    assert ev._default_metric("x/probe.jsonl", {"question": "q", "answer": "a"}) == "em"
    assert ev._default_metric("x/mmlu.jsonl",
                              {"question": "q", "choices": ["a"], "answer": 0}) == "mc"
    assert ev._default_metric("x/wiki.txt", {"text": "t"}) == "ppl"
    assert ev._default_metric("x/chat.jsonl", {"messages": []}) == "accuracy"
    assert ev._default_metric("x/task.json", {"prompt": "p", "answer": "a"}) == "accuracy"


# Two ranks, FSDP2-sharded: same results as one process, same forward count on every rank.


class _EosAs:
    """The tokenizer, with another token playing eos (a random tiny model never emits the real
    one)."""

    def __init__(self, tok, eos_id):
        self.bos_id, self.eos_id, self.encode, self.decode = (tok.bos_id, eos_id, tok.encode,
                                                              tok.decode)


DIST_PROMPTS = PROMPTS + ["two"]


def _dist_body(args_dict, spm_path, files, stop):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    import data
    from model import ModelArgs, Transformer
    tok = data.Tokenizer(spm_path)
    result = {}
    for name, mp in (("fp32", MixedPrecisionPolicy()),
                     ("bf16", MixedPrecisionPolicy(param_dtype=torch.bfloat16))):
        model = Transformer(ModelArgs(**args_dict))
        model.init_weights(0)
        for block in model.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        calls = []
        model.register_forward_pre_hook(lambda m, a: calls.append(1))
        if name == "bf16":  # mixed precision: the cache must hold bf16, as attention computes
            result[name] = {"gen": ev.generate(model, tok, DIST_PROMPTS[:2], max_new_tokens=3)}
            continue
        result[name] = {
            "gen": ev.generate(model, tok, DIST_PROMPTS, max_new_tokens=6, batch_size=2),
            # Rank 0's first prompt ends at once, rank 1's runs on: rank 0 must keep stepping
            # in step with it, or its later forwards pair with rank 1's and the counts differ.
            "eos": ev.generate(model, _EosAs(tok, stop), DIST_PROMPTS[:4], max_new_tokens=6,
                               batch_size=1),
            "evals": {f: ev.evaluate_file(model, tok, f, batch_size=2)["score"] for f in files},
            "calls": len(calls)}
    return result


def test_two_ranks_fsdp_match_one_process(tiny_args, tok, spm_path, tmp_path):
    from dataclasses import asdict
    model = _tiny_model(tiny_args)
    mc = _write_jsonl(tmp_path / "mc.jsonl", [{"question": f"q{i}", "choices": ["one", "two three"],
                                               "answer": i % 2}
                                              for i in range(3)])
    ppl = _write_jsonl(tmp_path / "text.jsonl", [{"text": "the river is blue"}, {"text": "one two"},
                                                 {"text": " ".join(["red green"] * 40)}])
    files = [mc, ppl]
    free = [_greedy_by_full_forwards(model, tok.encode(p, True, False), 6, -1)
            for p in DIST_PROMPTS]
    stop = free[0][0]
    assert stop not in free[1] and stop not in free[3], \
        "pick other prompts: rank 1's must not stop early"
    single = {"gen": ev.generate(model, tok, DIST_PROMPTS, max_new_tokens=6, batch_size=2),
              "eos": ev.generate(model, _EosAs(tok, stop), DIST_PROMPTS[:4], max_new_tokens=6),
              "evals": {f: ev.evaluate_file(model, tok, f, batch_size=2)["score"] for f in files}}
    assert single["eos"][0] == "" and single["eos"][1] == single["gen"][1]
    r0, r1 = run_ranks(tmp_path, _dist_body, asdict(tiny_args), spm_path, files, stop)
    assert r0 == r1  # every rank gets all results, and made the same number of calls
    assert r0["fp32"]["gen"] == single["gen"] and r0["fp32"]["eos"] == single["eos"]
    for f in files:
        assert r0["fp32"]["evals"][f] == pytest.approx(single["evals"][f], rel=1e-5)
    assert len(r0["bf16"]["gen"]) == 2


def _gathered_body(args_dict, spm_path):
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    import data
    from model import ModelArgs, Transformer
    gathers = []  # FSDP2's parameter all-gathers (all_gather_single in torch 2.13)
    for name in ("all_gather_single", "all_gather_into_tensor"):
        setattr(dist, name,
                lambda *a, _f=getattr(dist, name), **k: gathers.append(1) or _f(*a, **k))
    tok = data.Tokenizer(spm_path)

    def sharded(mp=MixedPrecisionPolicy()):
        model = Transformer(ModelArgs(**args_dict))
        model.init_weights(0)
        for block in model.layers:
            fully_shard(block, mp_policy=mp)
        return fully_shard(model, mp_policy=mp)

    def counted(fn):
        n = len(gathers)
        out = fn()
        return out, len(gathers) - n

    def train_step(model):  # gradients of one step, and the all-gathers it took
        tokens = torch.tensor([[1, 5, 9, 13, 17, 21, 25], [1, 22, 18, 14, 10, 6, 2]])
        logits = model(tokens)
        F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
        return torch.cat([p.grad.to_local().flatten() for p in model.parameters()])

    def local_shapes(model):
        return [tuple(p.to_local().shape) if isinstance(p, DTensor) else None
                for p in model.parameters()]

    result = {}
    model = sharded()
    shapes = local_shapes(model)
    result["gen"], result["gathers_2"] = counted(
        lambda: ev.generate(model, tok, DIST_PROMPTS, 2, batch_size=2))
    result["gen_budget"], result["gathers_6"] = counted(
        lambda: ev.generate(model, tok, DIST_PROMPTS, 6, batch_size=8, max_batch_tokens=60))
    result["sharded_after"] = local_shapes(model) == shapes and None not in shapes
    with ev.gathered(model):
        p = model.layers[0].attention.wq.weight
        result["inside"] = [isinstance(p, DTensor), list(p.shape)]
        with ev.gathered(model):  # nested: gathers nothing, and leaves the outer block gathered
            pass
        result["inside_after_nested"] = isinstance(model.layers[0].attention.wq.weight, DTensor)
        result["nested_gathers"] = counted(
            lambda: ev.generate(model, tok, DIST_PROMPTS[:2], 3))[1]
    try:
        with ev.gathered(model):
            raise KeyError("a bad eval file")
    except KeyError:
        result["sharded_after_error"] = local_shapes(model) == shapes
    grads, result["step_gathers_after_eval"] = counted(lambda: train_step(model))
    fresh = sharded()
    fresh_grads, result["step_gathers"] = counted(lambda: train_step(fresh))
    result["grads_equal"] = torch.equal(grads, fresh_grads)

    bf16 = sharded(MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    caches, new_cache = [], bf16.new_cache
    bf16.new_cache = lambda *a, **k: caches.append(new_cache(*a, **k)) or caches[-1]
    result["bf16_default"] = ev.generate(bf16, tok, DIST_PROMPTS, 6, batch_size=2)
    result["bf16_explicit"] = ev.generate(bf16, tok, DIST_PROMPTS, 6, batch_size=2,
                                          dtype=torch.bfloat16)
    result["bf16_caches"] = sorted({str(c.k[0].dtype) for c in caches})
    with ev.gathered(bf16):  # full forwards, the same calls on every rank
        result["bf16_param"] = str(bf16.output.weight.dtype)
        result["bf16_full"] = [
            tok.decode(_greedy_by_full_forwards(bf16, tok.encode(p, True, False), 6, tok.eos_id))
            for p in DIST_PROMPTS]
    return result


def test_gathered_all_gathers_once_per_evaluation(tiny_args, tok, spm_path, tmp_path):
    from dataclasses import asdict
    model = _tiny_model(tiny_args)
    single = {"gen": ev.generate(model, tok, DIST_PROMPTS, 2, batch_size=2),
              "gen_budget": ev.generate(model, tok, DIST_PROMPTS, 6, batch_size=2)}
    r0, r1 = run_ranks(tmp_path, _gathered_body, asdict(tiny_args), spm_path)
    assert r0 == r1
    groups = tiny_args.n_layers + 1  # a group per block, and the root's (embeddings, norm, output)
    # One all-gather per parameter group per evaluation, however many tokens it generates
    # (outside `gathered` every block is gathered again in every forward).
    assert r0["gathers_2"] == r0["gathers_6"] == groups
    # The budget makes batches [3], [1], [0, 2, 4] of DIST_PROMPTS: rank 1 runs a filler third.
    assert r0["gen"] == single["gen"] and r0["gen_budget"] == single["gen_budget"]
    assert r0["sharded_after"] and r0["sharded_after_error"]  # DTensors, local shapes as before
    assert r0["inside"] == [False, [tiny_args.dim, tiny_args.dim]]
    assert r0["inside_after_nested"] is False and r0["nested_gathers"] == 0
    # Training after an evaluation: the same gradients, and the same all-gathers as a fresh model
    # (blocks in forward and again in backward, the root once), so resharding was restored.
    assert r0["grads_equal"]
    assert r0["step_gathers_after_eval"] == r0["step_gathers"] == 2 * tiny_args.n_layers + 1
    # Mixed precision: the cache is bf16 as attention computes, by default and when passed, and
    # decoding through it equals the argmax of full bf16 forwards.
    assert r0["bf16_caches"] == ["torch.bfloat16"] and r0["bf16_param"] == "torch.bfloat16"
    assert r0["bf16_default"] == r0["bf16_explicit"] == r0["bf16_full"]


# Report


def test_write_report_two_stages(tmp_path):
    def r(score, metric="accuracy"):
        return {"score": score, "metric": metric}

    base = {"evals": {"a.json": r(10), "b.json": r(20), "c.json": r(30)},
            "probes": {"nq.jsonl": r(40, "em"),
                       "wiki.txt": {"score": 10.0, "metric": "ppl", "higher_is_better": False}}}
    stages = [
        {"name": "A", "eval_files": ["a.json"], "evals": {"a.json": r(80)},
         "probes": {"nq.jsonl": r(30, "em"),
                    "wiki.txt": {"score": 20.0, "metric": "ppl", "higher_is_better": False}}},
        {"name": "B", "eval_files": ["b.json", "c.json"],
         "evals": {"a.json": r(70), "b.json": r(60), "c.json": r(40)},
         "probes": {"nq.jsonl": r(20, "em"),
                    "wiki.txt": {"score": 12.5, "metric": "ppl", "higher_is_better": False}}},
    ]
    rep = ev.write_report(str(tmp_path), base, stages)
    # Task B is the mean of b and c: R = [[80], [70, 50]]; OP = 60; BWT = ((70 - 80) + 0) / 2 = -5
    assert rep["R"] == [[80.0], [70.0, 50.0]]
    assert rep["base_row"] == [10.0, 25.0]
    assert rep["OP"] == pytest.approx(60.0) and rep["BWT"] == pytest.approx(-5.0)
    nq = rep["probes"]["nq.jsonl"]
    assert [s["retention"] for s in nq["stages"]] == pytest.approx([75.0, 50.0])
    wiki = rep["probes"]["wiki.txt"]  # perplexity: retention is base / score
    assert [s["retention"] for s in wiki["stages"]] == pytest.approx([50.0, 80.0])
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(rep))
    md = (tmp_path / "report.md").read_text()
    assert "| after stage | A | B |" in md
    assert "| (base) | 10.00 | 25.00 |" in md
    assert "| A | 80.00 |  |" in md and "| B | 70.00 | 50.00 |" in md
    assert "**OP** 60.00" in md and "**BWT** -5.00" in md
    assert "| nq.jsonl | em | 40.00 | 30.00 (75.0%) | 20.00 (50.0%) |" in md
    assert "| wiki.txt | ppl (lower is better) | 10.00 | 20.00 (50.0%) | 12.50 (80.0%) |" in md
    assert sorted(os.listdir(tmp_path)) == ["report.json", "report.md"]  # no temp files left
    with pytest.raises(ValueError, match=r"stage 'B' has no result for \['a.json'\]"):
        ev.write_report(str(tmp_path), base,
                        [stages[0], {**stages[1], "evals": {"b.json": r(1), "c.json": r(1)}}])


# Command line


def test_cli_on_a_saved_tiny_model(tiny_args, tok, spm_path, tmp_path, capsys):
    import shutil

    import checkpoint
    m = _tiny_model(tiny_args)
    model_dir = tmp_path / "tiny"
    checkpoint.save_model(m, str(model_dir))
    shutil.copy(spm_path, model_dir / "tokenizer.model")
    qa = _write_jsonl(tmp_path / "probe.jsonl",
                      [{"question": "where is paris", "answer": "london"}])
    out = tmp_path / "results.json"
    assert ev.main(["--model", str(model_dir), "--data", qa, "--max-new-tokens", "4",
                    "--max-seq-len", "64", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["results"][0]
    assert res["metric"] == "em" and res["n"] == 1
    assert (res["predictions"][0]["prediction"]
            == ev.generate(m, tok, ["Q: where is paris\nA:"], 4)[0])
    assert "probe.jsonl" in capsys.readouterr().out


def test_cli_reports_a_bad_file_and_fails(tiny_args, spm_path, tmp_path, capsys):
    import checkpoint
    model_dir = tmp_path / "tiny"
    checkpoint.save_model(_tiny_model(tiny_args), str(model_dir))
    missing = str(tmp_path / "nope.jsonl")
    assert ev.main(["--model", str(model_dir), "--tokenizer", spm_path, "--data", missing]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


# Predictions made elsewhere


def _task_file(tmp_path, task, records):
    (tmp_path / task).mkdir(exist_ok=True)
    path = tmp_path / task / "test.json"
    path.write_text(json.dumps(records, ensure_ascii=False))
    return str(path)


def test_score_predictions_equals_evaluate_file(tiny_model, tok, tmp_path):
    prompts = ["the river is", "one two", "code def", "paris london"]
    gen = ev.generate(tiny_model, tok, prompts, max_new_tokens=5)
    assert all(gen)
    # The first answer is what the model says, so each file scores above 0.
    answers = [gen[0], "B\nBecause of the sun.", "x = <NUM_LIT>", "The council met. It voted."]
    records = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)]
    files = {task: _task_file(tmp_path, task, records) for task in
             ("C-STANCE", "ScienceQA", "Py150", "MeetingBank", "20Minuten")}
    said = ev.generate(tiny_model, tok, ["Q: where is paris\nA:"], max_new_tokens=5)[0]
    chat = [{"role": "user", "content": "add two"}, {"role": "assistant", "content": "four"}]
    files["probe"] = _write_jsonl(tmp_path / "probe.jsonl", [
        {"messages": chat, "metric": "em"},
        {"question": "where is paris", "answers": ["london", said], "metric": "em"}])
    metrics = {}
    for name, path in files.items():
        res = ev.evaluate_file(tiny_model, tok, path, max_new_tokens=5)
        again = ev.score_predictions(path, [p["prediction"] for p in res["predictions"]])
        assert again == res, name
        assert res["score"] > 0 and res["n"] == len(res["predictions"]), name
        metrics[name] = res["metric"]
    assert metrics == {"C-STANCE": "trace_accuracy", "ScienceQA": "trace_scienceqa",
                       "Py150": "trace_edit_sim", "MeetingBank": "trace_rouge_l",
                       "20Minuten": "sari", "probe": "em"}


SCIENCEQA = [{"prompt": "Which is a plant?", "answer": "A\nBecause it makes food."},
             {"prompt": "Which is hot?", "answer": "B\nBecause of the sun."},
             {"prompt": "Which is cold?", "answer": "C\nBecause of ice."}]


def test_score_predictions_hand_computed(tmp_path):
    path = _task_file(tmp_path, "ScienceQA", SCIENCEQA)
    res = ev.score_predictions(path, ["A\nBecause it is green.", "B", "D\nBecause of ice."])
    assert res["metric"] == "trace_scienceqa" and res["n"] == 3 and res["higher_is_better"]
    assert res["score"] == pytest.approx(200 / 3)
    assert [p["score"] for p in res["predictions"]] == [1.0, 1.0, 0.0]
    assert res["predictions"][1] == {"prompt": "Which is hot?", "prediction": "B",
                                     "reference": "B\nBecause of the sun.", "score": 1.0}
    # The caller's metric wins, as for evaluate_file: whole strings differ.
    assert ev.score_predictions(path, ["A\nx", "B", "C"], metric="accuracy")["score"] == 0.0
    exact = [r["answer"] for r in SCIENCEQA]
    assert ev.score_predictions(path, exact, metric="accuracy")["score"] == 100.0


def test_score_predictions_rejects_what_it_cannot_score(tmp_path):
    path = _task_file(tmp_path, "ScienceQA", SCIENCEQA)
    with pytest.raises(ValueError, match=r"ScienceQA/test.json: 3 records but 2 predictions"):
        ev.score_predictions(path, ["A", "B"])
    with pytest.raises(ValueError, match=r"prediction \[1\] must be a string, got int"):
        ev.score_predictions(path, ["A", 2, "C"])
    with pytest.raises(ValueError, match="a list of strings, got one string"):
        ev.score_predictions(path, "ABC")
    mc = _write_jsonl(tmp_path / "mmlu.jsonl",
                      [{"question": "q", "choices": ["a", "b"], "answer": 0}])
    with pytest.raises(ValueError,
                       match=r"mmlu.jsonl: metric 'mc' scores the model's log-probabilities"):
        ev.score_predictions(mc, ["a"])
    ppl = _write_jsonl(tmp_path / "wiki.jsonl", [{"text": "the river"}])
    with pytest.raises(ValueError, match=r"wiki.jsonl: metric 'ppl' scores"):
        ev.score_predictions(ppl, ["x"])


def test_read_predictions_formats(tmp_path):
    # JSON allows these raw inside strings; only "\n" ends a line. CRLF and blank lines are fine.
    odd = ["a\u2028b", "c\u2029d\x85", "e\x0bf\x0c\x1c\x1d\x1e", "", "B\nBecause"]
    lines = [json.dumps({"prediction": p, "id": i}, ensure_ascii=False) for i, p in enumerate(odd)]
    text = "\r\n".join(lines[:3]) + "\r\n\n" + "\n".join(lines[3:]) + "\n"
    (tmp_path / "p.jsonl").write_bytes(text.encode())
    assert ev.read_predictions(str(tmp_path / "p.jsonl")) == odd
    (tmp_path / "l.json").write_text(json.dumps(odd, indent=2, ensure_ascii=False))
    assert ev.read_predictions(str(tmp_path / "l.json")) == odd
    # TRACE's inference output (infer_single.py's save_inference_results): the "results" list.
    trace_out = {"eval": {"accuracy": 0.5}, "prompts": ["p1", "p2"], "results": ["A", "B\n"],
                 "labels": ["A", "C"]}
    (tmp_path / "t.json").write_text(json.dumps(trace_out, ensure_ascii=False))
    assert ev.read_predictions(str(tmp_path / "t.json")) == ["A", "B\n"]
    (tmp_path / "one.jsonl").write_text('{"prediction": "x"}')
    assert ev.read_predictions(str(tmp_path / "one.jsonl")) == ["x"]


@pytest.mark.parametrize("text,match", [
    ('{"prediction": "a"}\n\n{"prediction": "b"\n', r"bad.jsonl: line 3: malformed JSON"),
    ('{"prediction": "a"}\n{"text": "b"}\n',
     r"bad.jsonl: line 2: expected an object with a 'prediction'"),
    ('{"prediction": "a"}\n"b"\n', r"bad.jsonl: line 2: expected an object"),
    ('{"prediction": 3}\n', r"bad.jsonl: line 1: a prediction must be a string, found int"),
    ('["a",\n "b",\n]', r"bad.jsonl: line 3: malformed JSON"),
    ('["a", null]', r"bad.jsonl: item \[1\]: a prediction must be a string, found NoneType"),
    ('{"results": ["a", 1]}', r"bad.jsonl: 'results' \[1\]: a prediction must be a string"),
    ("\n\n", r"bad.jsonl: no predictions"),
])
def test_read_predictions_errors_name_file_and_line(tmp_path, text, match):
    import data
    (tmp_path / "bad.jsonl").write_text(text)
    with pytest.raises(data.DataError, match=match):
        ev.read_predictions(str(tmp_path / "bad.jsonl"))


def test_read_predictions_unreadable_files(tmp_path):
    import data
    with pytest.raises(data.DataError, match=r"nope.jsonl: cannot read predictions"):
        ev.read_predictions(str(tmp_path / "nope.jsonl"))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prediction": "a"}\n{"prediction": "caf\xe9"}\n')
    with pytest.raises(data.DataError, match=r"latin1.jsonl: line 2: bytes that are not UTF-8"):
        ev.read_predictions(str(tmp_path / "latin1.jsonl"))


def test_cli_scores_predictions_without_a_model(tmp_path, capsys):
    path = _task_file(tmp_path, "ScienceQA", SCIENCEQA)
    said = ["A\nBecause it is green.", "B", "D\nBecause of ice."]
    preds = _write_jsonl(tmp_path / "vllm.jsonl", [{"prediction": p} for p in said])
    out = tmp_path / "results.json"
    assert ev.main(["--data", path, "--predictions", preds, "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["predictions"] == preds
    assert saved["results"] == [ev.score_predictions(path, said)]
    assert saved["results"][0]["score"] == pytest.approx(200 / 3)
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.split()[-3:] == ["trace_scienceqa", "3", "66.67"]
    # A JSON list of strings, and the caller's metric.
    listed = tmp_path / "hf.json"
    listed.write_text(json.dumps(said))
    assert ev.main(["--data", path, "--predictions", str(listed), "--metric", "accuracy"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split()[-3:] == ["accuracy", "3", "0.00"]


def test_cli_predictions_errors(tmp_path, capsys):
    path = _task_file(tmp_path, "ScienceQA", SCIENCEQA)
    short = _write_jsonl(tmp_path / "short.jsonl", [{"prediction": "A"}])
    assert ev.main(["--data", path, "--predictions", short]) == 2
    assert "ScienceQA/test.json: 3 records but 1 predictions" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"prediction": "A"}\n{"prediction": \n')
    assert ev.main(["--data", path, "--predictions", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl: line 2: malformed JSON" in capsys.readouterr().err
    for argv, message in [([path, path, "--predictions", short], "exactly one --data file, got 2"),
                          ([path, "--predictions", short, "--model", "m"],
                           "not allowed with argument"),
                          ([path], "one of the arguments --model --predictions is required")]:
        with pytest.raises(SystemExit) as e:
            ev.main(["--data", *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_max_batch_tokens(tiny_args, tok, spm_path, tmp_path, capsys):
    import checkpoint
    m = _tiny_model(tiny_args)
    model_dir = tmp_path / "tiny"
    checkpoint.save_model(m, str(model_dir))
    qa = _write_jsonl(tmp_path / "probe.jsonl",
                      [{"question": q, "answer": "x"} for q in ("where is paris", "one")])
    out = tmp_path / "results.json"
    common = ["--model", str(model_dir), "--tokenizer", spm_path, "--data", qa,
              "--max-new-tokens", "3"]
    # one prompt a batch
    assert ev.main(common + ["--max-batch-tokens", "1", "--out", str(out)]) == 0
    preds = [p["prediction"] for p in json.loads(out.read_text())["results"][0]["predictions"]]
    assert preds == ev.generate(m, tok, ["Q: where is paris\nA:", "Q: one\nA:"], 3)
    assert ev.main(common + ["--max-batch-tokens", "-1"]) == 2
    assert "max_batch_tokens must be >= 0" in capsys.readouterr().err
