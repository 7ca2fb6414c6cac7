"""Shared fixtures: a tiny SentencePiece tokenizer with Meta's special ids, and tiny model shapes.

Everything a test needs is made here, on the fly: no downloads, no real weights.
"""
import json
import multiprocessing
import os
import random
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

WORDS = ("the a of to and in is was for on with as by at from that this it be are were "
         "user assistant system answer question model paris london river city year born "
         "works apple banana sort reverse add plus minus zero one two three four five six "
         "seven eight nine ten red green blue stance positive negative neutral code def "
         "return print python summary meeting").split()


def make_spm(prefix: str, vocab_size: int = 320, seed: int = 0) -> str:
    """Train a SentencePiece model laid out like LLaMA's: unk 0, bos 1, eos 2, no pad,
    byte fallback (so newlines and any unicode round-trip)."""
    import sentencepiece as spm
    rng = random.Random(seed)
    lines = []
    for _ in range(3000):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))))
    lines += ["<|user|>", "<|assistant|>", "<|system|>", "Q: A: 0123456789 .,!?:;()[]{}=+-*/"]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=vocab_size,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        character_coverage=1.0, num_threads=1, minloglevel=2,
        # LLaMA keeps text as is: no NFKC, whitespace and newlines preserved, digits split.
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True)
    return prefix + ".model"


@pytest.fixture(scope="session")
def spm_path(tmp_path_factory):
    return make_spm(str(tmp_path_factory.mktemp("spm") / "tokenizer"))


@pytest.fixture
def tiny_args():
    from model import ModelArgs
    return ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=320, multiple_of=32, max_seq_len=64)


@pytest.fixture
def one_rank(tmp_path):
    """A gloo process group of one, in this process (FSDP2 works on it)."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def tiny_ckpt(tmp_path, spm_path, tiny_args):
    """A tiny Meta-format checkpoint of tiny_args' shapes."""
    from checkpoint import save_model
    from model import Transformer
    m = Transformer(tiny_args)
    m.init_weights(seed=0)
    save_model(m, str(tmp_path / "ckpt"), format="meta", tokenizer=spm_path)
    return str(tmp_path / "ckpt")


def rank_main(rank, world, out_dir, body, args):
    """One spawned rank: a gloo group of `world` ranks, then body(*args)'s JSON result written to
    out_dir/rank{rank}.json."""
    import torch.distributed as dist

    import data
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/init", rank=rank,
                            world_size=world)
    try:
        result = body(*args)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    data.hard_exit(0)  # skip finalization: see data.hard_exit


def run_ranks(tmp_path, body, *args, world=2, timeout=120) -> list:
    """body(*args) on `world` spawned gloo ranks -> each rank's result. A rank still running after
    the timeout waits in a collective the others never made: every such rank is killed, not only
    the first, and the test fails naming them."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=rank_main, args=(r, world, str(tmp_path), body, args))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
    if hung:
        pytest.fail(f"rank(s) {hung} hung: the ranks made different collective calls")
    assert [p.exitcode for p in procs] == [0] * world
    return [json.load(open(tmp_path / f"rank{r}.json")) for r in range(world)]
