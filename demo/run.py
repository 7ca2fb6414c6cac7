"""`make demo`: the paper's claims, tested end to end by the real pipeline on a model built here.

    python demo/run.py            # what `make demo` runs (from the repository root)

1. writes a seeded synthetic world under runs/demo/data/ (demo/world.py): biographies and
   closed-book questions (the base model's "knowledge"), general instruction tasks (the chat
   stage's mixture and held-out test sets), four continual tasks, all in Tulu's chat format, and
   the knowledge probes;
2. trains a SentencePiece tokenizer in LLaMA's layout and writes a randomly initialised tiny LLaMA
   as an official Meta checkpoint (params.json, consolidated.00.pth, tokenizer.model);
3. makes the base model with torchrun train.py --config configs/demo_base.toml: an `lm` stage on
   the world, then an `sft` chat stage on the general tasks (the stand-in for LLaMA-2-chat);
   steps 1-3 are cached in runs/demo/ and redone only when their inputs change;
4. runs the same chain of four SFT stages from the chat model twice, full fine-tuning and HFT
   (same seed, steps and learning rates): torchrun train.py --config configs/demo.toml ...;
   after every stage train.py scores the tasks so far, the knowledge probes and the general tests;
5. combines the two reports into runs/demo/report.json and report.md (tables and Mermaid charts)
   and prints the comparison.

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
KNOWLEDGE = os.path.join(DATA, "knowledge_probes.jsonl")
CHAT_TRAIN = os.path.join(DATA, "general", "chat_train.jsonl")
CHAT_MARKERS = ["<|user|>", "<|assistant|>", "<|system|>"]


def general_test(name: str) -> str:
    return os.path.join(DATA, "general", f"{name}_test.jsonl")


def write_data(a) -> list[str]:
    """The world's files; returns the paths the base model depends on (its cache key): the
    pretraining corpus, the chat mixture and every probe file (knowledge and general tests)."""
    people = world.make_entities(a.entities, a.seed)
    files = {os.path.join(DATA, "world.jsonl"): people,
             os.path.join(DATA, "pretrain.jsonl"): world.pretrain_docs(people, a.seed),
             KNOWLEDGE: world.knowledge_probes(people, a.probes, a.seed),
             CHAT_TRAIN: world.chat_mixture(a.chat_per_task, a.general_test, a.seed)}
    for name in world.GENERAL_TASKS:
        files[general_test(name)] = world.task_split(name, a.chat_per_task, a.general_test,
                                                     a.seed)[1]
    for name in world.TASKS:
        train, test = world.task_split(name, a.train_per_task, a.test_per_task, a.seed)
        files[os.path.join(DATA, "tasks", f"{name}_train.jsonl")] = train
        files[os.path.join(DATA, "tasks", f"{name}_test.jsonl")] = test
    for path, recs in files.items():
        world.write_jsonl(path, recs)
    return [os.path.join(DATA, "pretrain.jsonl"), CHAT_TRAIN, KNOWLEDGE,
            *(general_test(name) for name in world.GENERAL_TASKS)]


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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}",
           os.path.join(REPO, "train.py"), "--config", config, *overrides]
    shown = ["torchrun", *cmd[3:]]
    print("\n$ " + " ".join(os.path.relpath(c, REPO) if c.startswith(REPO) else c for c in shown),
          flush=True)
    # One thread per worker: with one worker per core, more threads only fight over the cores.
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONUNBUFFERED="1")
    t0 = time.time()
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "wb") as log:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        try:
            # Pass bytes through as they come: tqdm redraws its bar with "\r", never a newline.
            while chunk := os.read(p.stdout.fileno(), 4096):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                log.write(chunk)
        finally:  # on Ctrl-C too (torchrun gets it as well): its CPU time then counts (study.py)
            p.wait()
    if p.returncode:
        # train.py writes summary.json last, after every stage is exported and evaluated; a worker
        # that dies later, while gloo shuts down, has lost nothing (seen rarely on CPU).
        if not os.path.exists(os.path.join(out_dir, "summary.json")):
            sys.exit(f"demo: train.py failed (exit {p.returncode}); its output is in {log_path}")
        print(f"demo: warning: train.py exited with {p.returncode} after finishing every stage "
              f"({out_dir}/summary.json is written); a worker failed while shutting down, see "
              f"{log_path}")
    return time.time() - t0


def file_digest(h, path: str):
    """Feed a file's path and bytes to the hash `h`: the cache keys of the base and the study."""
    with open(path, "rb") as f:
        h.update(path.encode() + b"\0" + f.read() + b"\0")


def base_key(a, files: list[str]) -> str:
    h = hashlib.sha256()
    for path in files + [a.base_config]:
        file_digest(h, path)
    h.update(json.dumps([a.seed, a.vocab_size, a.dim, a.n_layers, a.n_heads, a.base_args]).encode())
    return h.hexdigest()[:16]


def build_base(a, files: list[str]) -> str:
    """Tokenizer, random init as a Meta checkpoint, then configs/demo_base.toml: `lm` pretraining
    and the `sft` chat stage; cached under runs/demo/ and redone only when base_key changes.
    Returns the base model's directory (the export of the config's last stage, the chat model)."""
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
        args = ModelArgs(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads,
                         vocab_size=a.vocab_size, multiple_of=32)
        with torch.device("cpu"):
            m = Transformer(args)
        m.init_weights(seed=a.seed)
        save_model(m, INIT, format="meta", tokenizer=TOKENIZER)
        n = sum(p.numel() for p in m.parameters())
        print(f"demo: tokenizer ({a.vocab_size} pieces) and a random {n / 1e6:.2f}M-parameter "
              f"LLaMA (dim {a.dim}, {a.n_layers} layers) written to {INIT} in "
              f"{time.time() - t0:.1f}s")
        torchrun(a.base_config, ["--seed", str(a.seed), *a.base_args.split()], a.nproc,
                 os.path.join(ROOT, "logs", "base.log"), BASE)
        with open(key_file, "w") as f:
            f.write(key + "\n")
    with open(summary, encoding="utf-8") as f:
        base_dir = os.path.join(BASE, json.load(f)["stages"][-1]["name"])
    with open(os.path.join(BASE, "report.json"), encoding="utf-8") as f:
        probes = json.load(f)["probes"]
    for row, general in zip(probes[KNOWLEDGE]["stages"], general_scores(probes)["stages"]):
        print(f"demo: base model after its stage '{row['stage']}': knowledge exact match "
              f"{row['score']:.1f}, general tasks {general:.1f}")
    if probes[KNOWLEDGE]["stages"][0]["score"] < 50:
        print("demo: warning: pretraining taught fewer than half of the knowledge questions; "
              "raise the pretrain stage's epochs in configs/demo_base.toml")
    return base_dir


def general_scores(probes: dict) -> dict:
    """The general-task score (mean over the general test sets) of the base and after each stage,
    and each general task's own scores, from a train.py report's "probes"."""
    files = [f for f in probes if f != KNOWLEDGE]
    if not files:
        raise ValueError(f"no general test sets among the probes {list(probes)}")
    per_task = {os.path.basename(f)[:-len("_test.jsonl")]: probes[f] for f in files}
    mean = lambda xs: None if None in xs else sum(xs) / len(xs)  # noqa: E731
    return {"base": mean([p["base"] for p in per_task.values()]),
            "stages": [mean([p["stages"][t]["score"] for p in per_task.values()])
                       for t in range(len(probes[files[0]]["stages"]))],
            "tasks": {name: {"base": p["base"], "stages": [r["score"] for r in p["stages"]]}
                      for name, p in per_task.items()}}


def earlier_task_scores(R: list[list[float]]) -> list[float]:
    """Mean score on the tasks learned before each stage, mean_{i<t} R[t][i]. After stage 0 no task
    is earlier: its point is R[0][0], the first task's own score, where retention starts from."""
    return [row[0] if t == 0 else sum(row[:t]) / t for t, row in enumerate(R)]


def read_run(out_dir: str, seconds: float) -> dict:
    """One run's numbers on a 0-100 scale, from train.py's report.json and summary.json."""
    with open(os.path.join(out_dir, "report.json"), encoding="utf-8") as f:
        rep = json.load(f)
    with open(os.path.join(out_dir, "summary.json"), encoding="utf-8") as f:
        stages = json.load(f)["stages"]
    know, general = rep["probes"][KNOWLEDGE], general_scores(rep["probes"])
    last = know["stages"][-1]
    return {"OP": rep["OP"], "BWT": rep["BWT"], "knowledge": last["score"],
            "knowledge_retention": last["retention"], "general": general["stages"][-1],
            "earlier_tasks": earlier_task_scores(rep["R"]),
            "knowledge_by_stage": [s["score"] for s in know["stages"]],
            "base_knowledge": know["base"],
            "general_by_stage": general["stages"], "base_general": general["base"],
            "general_tasks": general["tasks"], "matrix": rep["R"], "base_row": rep["base_row"],
            "tasks": [t["name"] for t in rep["tasks"]],
            # training (and export) time of the stages, without the evaluations between them
            "seconds": sum(s["wall_time_s"] for s in stages), "run_seconds": seconds,
            "optimizer_state_bytes": max(s["optimizer_state_bytes"] for s in stages),
            "trainable_params": max(s["trainable_params"] or 0 for s in stages)}


def format_report(rep: dict) -> str:
    runs = {"FFT": rep["fft"], "HFT": rep["hft"]}
    tasks = rep["fft"]["tasks"]
    metrics = "accuracy" + "".join(f", {t}: {world.METRICS[t]}" for t in tasks
                                   if t in world.METRICS)
    out = [f"Base model: pretrained on the world (knowledge exact match "
           f"{rep['pretrain_knowledge']:.1f} on {rep['probes']} closed-book questions), then "
           f"instruction-tuned on {len(rep['general_tasks'])} general tasks. The chat model, "
           f"where both runs start, has knowledge {rep['base_knowledge']:.1f} and general-task "
           f"accuracy {rep['base_general']:.1f}.", ""]
    for label, r in runs.items():
        out += [f"{label}: score on each task (columns) after each stage (rows); {metrics}", "",
                "| after stage | " + " | ".join(tasks) + " | knowledge | general |",
                "|---|" + "---:|" * (len(tasks) + 2)]
        if r["base_row"]:
            out.append("| (chat model) | " + " | ".join(f"{x:.1f}" for x in r["base_row"])
                       + f" | {r['base_knowledge']:.1f} | {r['base_general']:.1f} |")
        for t, (name, row) in enumerate(zip(tasks, r["matrix"])):
            cells = [f"{x:.1f}" for x in row] + [""] * (len(tasks) - len(row))
            out.append(f"| {name} | " + " | ".join(cells)
                       + f" | {r['knowledge_by_stage'][t]:.1f} | {r['general_by_stage'][t]:.1f} |")
        out.append("")
    out += ["| | FFT | HFT |", "|---|---:|---:|"]
    rows = [("OP (mean of the last row)", "OP", "{:.1f}"),
            ("BWT (TRACE's backward transfer)", "BWT", "{:+.1f}"),
            ("knowledge EM after the last stage", "knowledge", "{:.1f}"),
            ("knowledge retained (% of the chat model's)", "knowledge_retention", "{:.1f}"),
            ("general tasks after the last stage", "general", "{:.1f}"),
            ("training wall time, all stages (s)", "seconds", "{:.1f}"),
            ("whole run incl. evals (s)", "run_seconds", "{:.1f}"),
            ("trainable parameters", "trainable_params", "{:,}"),
            ("optimizer state (MiB)", "optimizer_state_bytes", None)]
    for label, key, fmt in rows:
        cells = ["n/a" if runs[k][key] is None else f"{runs[k][key] / 2**20:.2f}" if fmt is None
                 else fmt.format(runs[k][key]) for k in runs]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out += ["",
            "General tasks (held-out test sets, accuracy): the chat model and after the last stage",
            "", "| general task | chat model | FFT | HFT |", "|---|---:|---:|---:|"]
    for name, g in rep["fft"]["general_tasks"].items():
        out.append(f"| {name} | {g['base']:.1f} | {g['stages'][-1]:.1f} | "
                   f"{rep['hft']['general_tasks'][name]['stages'][-1]:.1f} |")
    return "\n".join(out)


# Named colors for chart lines, in order: xychart-beta draws no legend, so titles name them.
PALETTE = [("blue", "#1f77b4"), ("orange", "#ff7f0e"), ("green", "#2ca02c"), ("red", "#d62728"),
           ("purple", "#9467bd"), ("brown", "#8c564b"), ("pink", "#e377c2"), ("gray", "#7f7f7f")]


def xychart(title: str, x_labels: list[str], series: dict[str, list[float]], y_label: str,
            y_range: tuple[float, float] = (0, 100)) -> str:
    """A Mermaid `xychart-beta` line chart in a markdown code block (GitHub renders it; no
    dependency), one line per series. xychart-beta draws no legend, so each line gets the next
    color of PALETTE and the title says which is which: "title (FFT blue, HFT orange)"."""
    if len(series) > len(PALETTE):
        raise ValueError(f"xychart: {len(series)} lines, only {len(PALETTE)} colors "
                         f"to tell them apart")
    for name, ys in series.items():
        if len(ys) != len(x_labels):
            raise ValueError(f"xychart: line {name!r} has {len(ys)} points for {len(x_labels)} "
                             f"x labels")
    names = ", ".join(f"{name} {color}" for name, (color, _) in zip(series, PALETTE))
    palette = ", ".join(hex_ for _, hex_ in PALETTE[:len(series)])
    theme = ('{"theme": "base", "themeVariables": {"xyChart": {"plotColorPalette": "' + palette
             + '"}}}')
    out = ["```mermaid", "%%{init: " + theme + "}%%", "xychart-beta",
           f'    title "{title} ({names})"',
           "    x-axis [" + ", ".join(f'"{x}"' for x in x_labels) + "]",
           f'    y-axis "{y_label}" {y_range[0]:g} --> {y_range[1]:g}']
    out += ["    line [" + ", ".join(f"{y:.1f}" for y in ys) + "]" for ys in series.values()]
    return "\n".join(out + ["```"])


def format_charts(runs: dict[str, dict]) -> str:
    """Knowledge, general-task score and mean earlier-task score after each stage, one line per
    run (runs: label -> read_run's result)."""
    tasks = next(iter(runs.values()))["tasks"]
    x = ["chat model", *tasks]
    return "\n\n".join([
        xychart("Knowledge probes, exact match", x,
                {k: [r["base_knowledge"], *r["knowledge_by_stage"]] for k, r in runs.items()},
                "EM"),
        xychart("General tasks, mean accuracy", x,
                {k: [r["base_general"], *r["general_by_stage"]] for k, r in runs.items()},
                "accuracy"),
        xychart("Earlier tasks, mean score", tasks,
                {k: r["earlier_tasks"] for k, r in runs.items()}, "score"),
        "Earlier tasks: after stage t >= 1, the mean score on the tasks of stages 0..t-1; "
        f"after the first stage ({tasks[0]}) no task is earlier, and the point is that task's "
        "own score."])


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--entities", type=int, default=300, help="people in the synthetic world")
    ap.add_argument("--probes", type=int, default=200,
                    help="knowledge questions scored after each stage")
    ap.add_argument("--chat-per-task", type=int, default=200,
                    help="training conversations of each general task in the chat stage")
    ap.add_argument("--general-test", type=int, default=40,
                    help="held-out test conversations per general task")
    ap.add_argument("--train-per-task", type=int, default=384,
                    help="training conversations per continual task")
    ap.add_argument("--test-per-task", type=int, default=50,
                    help="test conversations per continual task")
    ap.add_argument("--vocab-size", type=int, default=768)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--nproc", type=int, default=2, help="torchrun processes")
    ap.add_argument("--base-config", default=os.path.join(REPO, "configs", "demo_base.toml"))
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "demo.toml"))
    ap.add_argument("--base-args", default="",
                    help="extra train.py overrides for the base model, e.g. '--train.max_steps 5'")
    ap.add_argument("--train-args", default="",
                    help="extra train.py overrides for both fine-tuning runs")
    ap.add_argument("--study", action="store_true",
                    help="run the study instead (demo/study.py, `make study`): every method x "
                         "seed on this world and base, and the pilot, into runs/study/")
    ap.add_argument("--seeds", default="0,1,2",
                    help="--study: train.py seeds (data order, HFT masks); world and base keep "
                         "--seed")
    ap.add_argument("--methods", default="",
                    help="--study: comma-separated subset of the methods (default: all, "
                         "demo/study.py METHOD_NAMES)")
    ap.add_argument("--mask-seeds", default="0,1,2", help="--study: the pilot's reset mask seeds")
    return ap.parse_args(argv)


# The two runs of `make demo`: train.py overrides on top of configs/demo.toml (same seed, data
# order, steps and learning rates; only the HFT selection differs).
METHODS = {"fft": ["--hft.granularity", "none"],
           "hft": ["--hft.granularity", "category", "--hft.ratio", "0.5"]}


def chain_args(a, out_dir: str, overrides: list[str], seed: int) -> list[str]:
    """train.py's overrides for one chain of continual stages from the chat model (configs/demo.toml
    plus these): `make demo` and `make study` build their runs here, so the study's seed 0 of
    `fft` and `hft` is the demo's run, argument for argument but the out_dir."""
    return ["--out_dir", out_dir, "--seed", str(seed), *overrides, *a.train_args.split()]


def run_method(a, label: str, overrides: list[str], seed: int | None = None) -> dict:
    """One chain of continual stages from the chat model into runs/demo/<label>, afresh; `seed`
    (default: the world's) sets train.py's data order and HFT masks."""
    out_dir = os.path.join(ROOT, label)
    shutil.rmtree(out_dir, ignore_errors=True)  # a fresh run each time (train.py would resume)
    args = chain_args(a, out_dir, overrides, a.seed if seed is None else seed)
    secs = torchrun(a.config, args, a.nproc, os.path.join(ROOT, "logs", f"{label}.log"), out_dir)
    return read_run(out_dir, secs)


def base_report() -> dict:
    """The base model's scores: knowledge and general tasks after each of its stages."""
    with open(os.path.join(BASE, "report.json"), encoding="utf-8") as f:
        probes = json.load(f)["probes"]
    return {"pretrain_knowledge": probes[KNOWLEDGE]["stages"][0]["score"],
            "base_stages": [r["stage"] for r in probes[KNOWLEDGE]["stages"]],
            "base_knowledge_by_stage": [r["score"] for r in probes[KNOWLEDGE]["stages"]],
            "base_general_by_stage": general_scores(probes)["stages"]}


def main(argv=None):
    from checkpoint import atomic_file, write_json  # a report is whole or absent
    a = parse_args(argv)
    if a.study:
        from demo import study
        return study.main(a)
    t0 = time.time()
    files = write_data(a)
    build_base(a, files)
    print(f"demo: {time.time() - t0:.0f}s so far")

    runs = {label: run_method(a, label, overrides) for label, overrides in METHODS.items()}
    report = {"base_knowledge": runs["fft"]["base_knowledge"],
              "base_general": runs["fft"]["base_general"], "probes": a.probes,
              "general_tasks": list(world.GENERAL_TASKS), **base_report(), **runs,
              "total_seconds": time.time() - t0}
    text, charts = format_report(report), format_charts({"FFT": runs["fft"], "HFT": runs["hft"]})
    write_json(os.path.join(ROOT, "report.json"), report)
    with atomic_file(os.path.join(ROOT, "report.md")) as f:
        f.write(f"# Demo: full fine-tuning (FFT) against Half Fine-Tuning (HFT)\n\n{text}\n\n"
                f"{charts}\n")
    print("\n" + "=" * 100 + f"\nFFT against HFT: {len(runs['fft']['tasks'])} SFT stages in a row "
          "from the chat model, same seed, steps and learning rates\n")
    print(text)
    print(f"\ndemo: done in {time.time() - t0:.0f}s; {ROOT}/report.md (with charts) and "
          f"report.json")


if __name__ == "__main__":
    main()
