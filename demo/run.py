"""`make demo`: the paper's claim, tested end to end by the real pipeline on a model built here.

    python demo/run.py            # what `make demo` runs (from the repository root)

1. writes a seeded synthetic world under runs/demo/data/ (demo/world.py): biographies and
   closed-book questions (the base model's "knowledge"), four instruction tasks in Tulu's chat
   format, and the knowledge probes;
2. trains a SentencePiece tokenizer in LLaMA's layout and writes a randomly initialised tiny LLaMA
   as an official Meta checkpoint (params.json, consolidated.00.pth, tokenizer.model);
3. pretrains it on the world with an `lm` stage: torchrun train.py --config configs/demo_base.toml;
   steps 1-3 are cached in runs/demo/ and redone only when their inputs change;
4. runs the same chain of four SFT stages twice, full fine-tuning and HFT (same seed, steps and
   learning rates): torchrun train.py --config configs/demo.toml --hft.granularity none ...;
5. combines the two reports into runs/demo/report.json and report.md and prints the comparison.

Paths are relative to the working directory (the configs name runs/demo/...), so a test can run
the whole thing in a temporary directory.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from demo import world  # noqa: E402

ROOT = os.path.join("runs", "demo")
DATA = os.path.join(ROOT, "data")
TOKENIZER = os.path.join(ROOT, "tokenizer.model")
INIT = os.path.join(ROOT, "init")
BASE = os.path.join(ROOT, "base")
CHAT_MARKERS = ["<|user|>", "<|assistant|>", "<|system|>"]


def write_data(a) -> list[str]:
    """The world's files; returns the paths the base model depends on (its cache key): the
    pretraining corpus and the knowledge probes."""
    people = world.make_entities(a.entities, a.seed)
    files = {os.path.join(DATA, "world.jsonl"): people,
             os.path.join(DATA, "pretrain.jsonl"): world.pretrain_docs(people, a.seed),
             os.path.join(DATA, "knowledge_probes.jsonl"): world.knowledge_probes(people, a.probes, a.seed)}
    for name in world.TASKS:
        train, test = world.task_split(name, a.train_per_task, a.test_per_task, a.seed)
        files[os.path.join(DATA, "tasks", f"{name}_train.jsonl")] = train
        files[os.path.join(DATA, "tasks", f"{name}_test.jsonl")] = test
    for path, recs in files.items():
        world.write_jsonl(path, recs)
    return [os.path.join(DATA, "pretrain.jsonl"), os.path.join(DATA, "knowledge_probes.jsonl")]


def train_tokenizer(corpus: str, vocab_size: int):
    """BPE SentencePiece laid out like LLaMA's: unk 0, bos 1, eos 2, no pad, byte fallback, digits
    split, text kept as is (no normalisation), so "\\n" is a byte piece no merge crosses. The chat
    markers are user-defined symbols: one token each, as the Tulu template needs them compactly.
    Trained on the pretraining corpus only, as LLaMA's was on its pretraining data, so the tasks
    are spelled in pieces the base model has read (the chat markers excepted)."""
    import sentencepiece as spm
    lines = []
    with open(corpus) as f:
        for line in f:
            lines += [t for t in json.loads(line)["text"].split("\n") if t.strip()]
    prefix = TOKENIZER[:-len(".model")]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0,
        split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        user_defined_symbols=CHAT_MARKERS, num_threads=1, minloglevel=2)


def torchrun(config: str, overrides: list[str], nproc: int, log_path: str, out_dir: str) -> float:
    """One train.py run under torchrun (gloo on CPU) into a fresh out_dir; its output goes to the
    terminal and to log_path. Returns the wall time in seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(REPO, "train.py"), "--config", config, *overrides]
    shown = ["torchrun", *cmd[3:]]
    print("\n$ " + " ".join(os.path.relpath(c, REPO) if c.startswith(REPO) else c for c in shown), flush=True)
    # One thread per worker: with one worker per core, more threads only fight over the cores.
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    t0 = time.time()
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "wb") as log:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        # Pass bytes through as they come: tqdm redraws its bar with "\r", never a newline.
        while chunk := os.read(p.stdout.fileno(), 4096):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            log.write(chunk)
        p.wait()
    if p.returncode:
        # train.py writes summary.json last, after every stage is exported and evaluated; a worker
        # that dies later, while gloo shuts down, has lost nothing (seen rarely on CPU).
        if not os.path.exists(os.path.join(out_dir, "summary.json")):
            sys.exit(f"demo: train.py failed (exit {p.returncode}); its output is in {log_path}")
        print(f"demo: warning: train.py exited with {p.returncode} after finishing every stage "
              f"({out_dir}/summary.json is written); a worker failed while shutting down, see {log_path}")
    return time.time() - t0


def base_key(a, files: list[str]) -> str:
    h = hashlib.sha256()
    for path in files + [a.base_config]:
        with open(path, "rb") as f:
            h.update(path.encode() + b"\0" + f.read() + b"\0")
    h.update(json.dumps([a.seed, a.vocab_size, a.dim, a.n_layers, a.n_heads, a.base_args]).encode())
    return h.hexdigest()[:16]


def build_base(a, files: list[str]) -> str:
    """Tokenizer, random init as a Meta checkpoint, `lm` pretraining; cached under runs/demo/ and
    redone only when base_key changes. Returns the base model's directory (the lm stage's export)."""
    key = base_key(a, files)
    key_file, summary = os.path.join(ROOT, "base.key"), os.path.join(BASE, "summary.json")
    cached = os.path.exists(key_file) and os.path.exists(summary)
    if cached and open(key_file).read().strip() == key:
        print(f"demo: reusing the cached tokenizer and base model in {ROOT} (key {key})")
    else:
        for path in (key_file, TOKENIZER):
            if os.path.exists(path):
                os.remove(path)
        shutil.rmtree(INIT, ignore_errors=True)
        shutil.rmtree(BASE, ignore_errors=True)

        import torch
        from checkpoint import save_model
        from model import ModelArgs, Transformer
        t0 = time.time()
        train_tokenizer(files[0], a.vocab_size)
        # max_seq_len is the config's [model] max_seq_len: Meta's params.json does not store it.
        args = ModelArgs(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, vocab_size=a.vocab_size, multiple_of=32)
        with torch.device("cpu"):
            m = Transformer(args)
        m.init_weights(seed=a.seed)
        save_model(m, INIT, format="meta", tokenizer=TOKENIZER)
        n = sum(p.numel() for p in m.parameters())
        print(f"demo: tokenizer ({a.vocab_size} pieces) and a random {n / 1e6:.2f}M-parameter LLaMA "
              f"(dim {a.dim}, {a.n_layers} layers) written to {INIT} in {time.time() - t0:.1f}s")
        torchrun(a.base_config, ["--seed", str(a.seed), *a.base_args.split()], a.nproc,
                 os.path.join(ROOT, "logs", "base.log"), BASE)
        with open(key_file, "w") as f:
            f.write(key + "\n")
    with open(summary) as f:
        base_dir = os.path.join(BASE, json.load(f)["stages"][-1]["name"])
    with open(os.path.join(BASE, "report.json")) as f:
        probe = next(iter(json.load(f)["probes"].values()))
    em = probe["stages"][-1]["score"]
    print(f"demo: base model {base_dir}: knowledge exact match {em:.1f} (random init {probe['base']:.1f})")
    if em < 50:
        print("demo: warning: the base model answers fewer than half of the knowledge questions; "
              "raise [train] epochs in configs/demo_base.toml")
    return base_dir


def read_run(out_dir: str, seconds: float) -> dict:
    """One run's numbers on a 0-100 scale, from train.py's report.json and summary.json."""
    with open(os.path.join(out_dir, "report.json")) as f:
        rep = json.load(f)
    with open(os.path.join(out_dir, "summary.json")) as f:
        stages = json.load(f)["stages"]
    probe = next(iter(rep["probes"].values()))  # the knowledge probes: the config's only probe file
    last = probe["stages"][-1]
    return {"OP": rep["OP"], "BWT": rep["BWT"], "knowledge": last["score"], "knowledge_retention": last["retention"],
            "knowledge_by_stage": [s["score"] for s in probe["stages"]], "base_knowledge": probe["base"],
            "matrix": rep["R"], "base_row": rep["base_row"], "tasks": [t["name"] for t in rep["tasks"]],
            # training (and export) time of the stages, without the evaluations between them
            "seconds": sum(s["wall_time_s"] for s in stages), "run_seconds": seconds,
            "optimizer_state_bytes": max(s["optimizer_state_bytes"] for s in stages),
            "trainable_params": max(s["trainable_params"] or 0 for s in stages)}


def format_report(rep: dict) -> str:
    runs = {"FFT": rep["fft"], "HFT": rep["hft"]}
    tasks = rep["fft"]["tasks"]
    out = [f"Knowledge probes ({rep['probes']} closed-book questions, exact match): base model "
           f"{rep['base_knowledge']:.1f}", ""]
    for label, r in runs.items():
        out += [f"{label}: score on each task (columns) after each stage (rows)", "",
                "| after stage | " + " | ".join(tasks) + " | knowledge |", "|---|" + "---:|" * (len(tasks) + 1)]
        if r["base_row"]:
            out.append("| (base) | " + " | ".join(f"{x:.1f}" for x in r["base_row"]) + f" | {rep['base_knowledge']:.1f} |")
        for t, (name, row) in enumerate(zip(tasks, r["matrix"])):
            cells = [f"{x:.1f}" for x in row] + [""] * (len(tasks) - len(row))
            out.append(f"| {name} | " + " | ".join(cells) + f" | {r['knowledge_by_stage'][t]:.1f} |")
        out.append("")
    out += ["| | FFT | HFT |", "|---|---:|---:|"]
    rows = [("OP (mean of the last row)", "OP", "{:.1f}"), ("BWT (TRACE's backward transfer)", "BWT", "{:+.1f}"),
            ("knowledge EM after the last stage", "knowledge", "{:.1f}"),
            ("knowledge retained (% of base)", "knowledge_retention", "{:.1f}"),
            ("training wall time, all stages (s)", "seconds", "{:.1f}"),
            ("whole run incl. evals (s)", "run_seconds", "{:.1f}"),
            ("trainable parameters", "trainable_params", "{:,}"),
            ("optimizer state (MiB)", "optimizer_state_bytes", None)]
    for label, key, fmt in rows:
        cells = ["n/a" if runs[k][key] is None else f"{runs[k][key] / 2**20:.2f}" if fmt is None
                 else fmt.format(runs[k][key]) for k in runs]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--entities", type=int, default=300, help="people in the synthetic world")
    ap.add_argument("--probes", type=int, default=200, help="knowledge questions scored after each stage")
    ap.add_argument("--train-per-task", type=int, default=384)
    ap.add_argument("--test-per-task", type=int, default=50)
    ap.add_argument("--vocab-size", type=int, default=768)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--nproc", type=int, default=2, help="torchrun processes")
    ap.add_argument("--base-config", default=os.path.join(REPO, "configs", "demo_base.toml"))
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "demo.toml"))
    ap.add_argument("--base-args", default="", help="extra train.py overrides for pretraining, e.g. '--train.max_steps 5'")
    ap.add_argument("--train-args", default="", help="extra train.py overrides for both fine-tuning runs")
    return ap.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    t0 = time.time()
    files = write_data(a)
    build_base(a, files)
    print(f"demo: {time.time() - t0:.0f}s so far")

    runs = {}
    for label, granularity in (("fft", "none"), ("hft", "category")):
        out_dir = os.path.join(ROOT, label)
        shutil.rmtree(out_dir, ignore_errors=True)  # a fresh run each time (train.py would resume)
        secs = torchrun(a.config, ["--out_dir", out_dir, "--hft.granularity", granularity, "--seed", str(a.seed),
                                   *a.train_args.split()], a.nproc, os.path.join(ROOT, "logs", f"{label}.log"),
                        out_dir)
        runs[label] = read_run(out_dir, secs)

    report = {"base_knowledge": runs["fft"]["base_knowledge"], "probes": a.probes, **runs,
              "total_seconds": time.time() - t0}
    text = format_report(report)
    with open(os.path.join(ROOT, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(ROOT, "report.md"), "w") as f:
        f.write("# Demo: full fine-tuning (FFT) against Half Fine-Tuning (HFT)\n\n" + text + "\n")
    print("\n" + "=" * 100 + f"\nFFT against HFT: {len(runs['fft']['tasks'])} SFT stages in a row, "
          "same seed, steps and learning rates\n")
    print(text)
    print(f"\ndemo: done in {time.time() - t0:.0f}s; {os.path.join(ROOT, 'report.md')} and report.json")


if __name__ == "__main__":
    main()
