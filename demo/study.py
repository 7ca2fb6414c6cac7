"""`make study` (python demo/run.py --study): the paper's continual-learning comparisons on the
demo's world, each method run with several train.py seeds, and the paper's pilot (Figure 1).

    python demo/run.py --study [--seeds 0,1,2] [--methods fft,hft,...] [--mask-seeds 0,1,2]

1. The demo's world and its cached chat model (demo/run.py: world seed --seed, built once and
   shared by every run, the same files `make demo` uses).
2. Every method x seed: one chain of configs/demo.toml's continual stages from the chat model,
   every setting as in the config (chosen by FFT; nothing tuned here), the method's train.py
   overrides (METHODS) and `--seed <seed>` (data order and HFT masks). The chain's arguments are
   built by demo/run.py's chain_args, as `make demo`'s are, so seed 0 of `fft` and `hft` is the
   demo's run. Each chain lives in runs/study/<method>/seed<k>/ beside seed<k>.json, which holds
   the key of every setting and input the chain read (chain_key): a finished chain with the same
   key is reused, an unfinished one is resumed by train.py, and any other is deleted and rerun.
3. The pilot: each seed's FFT final model with half of its layer tensors put back to the chat
   model's (hft.reset_half, category level, ratio 0.5) under each mask seed, scored in-process with
   eval.evaluate_file on the knowledge probes, the general tests and every continual task's test
   set, beside the FFT final models and the chat model, with the config's [eval] settings.
4. runs/study/study.json and study.md: per method the seeds' own numbers, their mean and sample
   standard deviation (n - 1), the differences from FFT, the pilot, Mermaid charts.

Code is not part of the cache keys (as for the demo's base): after changing train.py, eval.py or
the model, delete runs/study/.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from demo import run  # noqa: E402

STUDY = os.path.join("runs", "study")
PILOT = os.path.join(STUDY, "pilot")
METHOD_NAMES = ("fft", "hft", "hft_layer", "hft_model", "hft_r25", "hft_r75", "fft_replay",
                "hft_replay")
METRICS = ("OP", "BWT", "knowledge", "general")
SCALARS = METRICS + ("knowledge_retention", "seconds", "cpu_seconds")
CURVES = ("knowledge_by_stage", "general_by_stage", "earlier_tasks", "own")
PILOT_SETTINGS = {"granularity": "category", "ratio": 0.5}


def replay_overrides(n_stages: int) -> list[str]:
    """TRACE's replay baseline samples 10% of each past task's training data. train.replay is a
    fraction of the stage's own size drawn in equal shares from the earlier stages, and the demo's
    tasks are all the same size, so stage t (t earlier stages) gets replay = 0.1 x t."""
    return [x for t in range(1, n_stages) for x in (f"--stages.{t}.replay", f"{t / 10:g}")]


def methods(n_stages: int) -> dict[str, list[str]]:
    """Each method's train.py overrides on top of configs/demo.toml. fft and hft are demo/run.py's
    own (make demo's runs); the ablations are the paper's table (layer and model level) and the
    ratio sweep; replay adds replay_overrides to fft and hft."""
    fft, hft = run.METHODS["fft"], run.METHODS["hft"]
    half = lambda g, r="0.5": ["--hft.granularity", g, "--hft.ratio", r]  # noqa: E731
    replay = replay_overrides(n_stages)
    return {"fft": fft, "hft": hft, "hft_layer": half("layer"), "hft_model": half("model"),
            "hft_r25": half("category", "0.25"), "hft_r75": half("category", "0.75"),
            "fft_replay": fft + replay, "hft_replay": hft + replay}


def int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sys.exit(f"study: {flag} {text!r}: expected comma-separated integers, e.g. 0,1,2")
    if not values or len(set(values)) != len(values):
        sys.exit(f"study: {flag} {text!r}: expected distinct integers, e.g. 0,1,2")
    return values


def model_files(path: str) -> list[str]:
    """A checkpoint directory's model: weights, shapes and tokenizer (not the logs and scores a
    train.py stage directory also holds, whose timings differ between identical runs)."""
    keep = ("params.json", "config.json", "tokenizer.model")
    return sorted(os.path.join(path, f) for f in os.listdir(path)
                  if f in keep or f.endswith((".pth", ".safetensors")))


def chain_key(a, args: list[str]) -> str:
    """A chain's settings and inputs: train.py's resolved config (every key, defaults included),
    the bytes of every file it reads (the chat model, the tokenizer, each stage's training and
    test files, the probes) and the number of ranks."""
    import train
    cfg = train.load_config(a.config, args)
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    files = model_files(cfg["model"]["path"]) + [cfg["model"]["tokenizer"], *cfg["eval"]["probes"]]
    files += [f for s in cfg["stages"] for f in [s["data"], *map(train._eval_path, s["eval"])]]
    for path in files:
        run.file_digest(h, path)
    h.update(f"nproc={a.nproc}".encode())
    return h.hexdigest()[:16]


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)  # the waited-for torchrun and its workers
    return r.ru_utime + r.ru_stime


def run_chain(a, method: str, seed: int, overrides: list[str]) -> dict:
    """One method x seed chain (cached, see the module docstring): demo/run.py's read_run numbers
    plus `own` (each task's score right after its stage), CPU seconds and the directory."""
    from checkpoint import write_json
    from train import read_json
    out_dir = os.path.join(STUDY, method, f"seed{seed}")
    meta_path = f"{out_dir}.json"
    args = run.chain_args(a, out_dir, overrides, seed)
    key = chain_key(a, args)
    meta = read_json(meta_path)
    done = os.path.exists(os.path.join(out_dir, "summary.json"))
    if meta and meta["key"] == key and meta["done"] and done:
        print(f"study: {method} seed {seed}: reusing the finished chain in {out_dir} (key {key})")
    else:
        if not meta or meta["key"] != key:  # other settings or inputs: never continued
            shutil.rmtree(out_dir, ignore_errors=True)
            os.makedirs(os.path.dirname(out_dir), exist_ok=True)
            meta = {"key": key, "args": args, "done": False, "run_seconds": 0.0,
                    "cpu_seconds": 0.0}
            write_json(meta_path, meta)
        t0, cpu0 = time.time(), children_cpu()
        try:
            run.torchrun(a.config, args, a.nproc,
                         os.path.join(STUDY, "logs", f"{method}_seed{seed}.log"), out_dir)
            meta["done"] = True
        finally:  # an interrupted attempt counts too: a resumed chain's time is all its attempts'
            meta.update(run_seconds=meta["run_seconds"] + time.time() - t0,
                        cpu_seconds=meta["cpu_seconds"] + children_cpu() - cpu0)
            write_json(meta_path, meta)
    r = run.read_run(out_dir, meta["run_seconds"])
    return {**r, "own": [row[i] for i, row in enumerate(r["matrix"])],
            "cpu_seconds": meta["cpu_seconds"], "out_dir": out_dir, "key": key}


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """The mean and the sample standard deviation (n - 1; None for a single value). None when a
    value is None (knowledge retention of a chat model that knows nothing)."""
    if None in values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(per_seed: dict[str, dict], scalars=SCALARS, curves=CURVES) -> dict:
    """{"seeds": per_seed, "mean": ..., "std": ...}: each scalar's mean and sample std over the
    seeds' own values, and each curve's point by point."""
    mean, std = {}, {}
    for k in scalars:
        mean[k], std[k] = mean_std([r[k] for r in per_seed.values()])
    for k in curves:
        points = [mean_std(list(p)) for p in zip(*(r[k] for r in per_seed.values()))]
        mean[k], std[k] = [m for m, _ in points], [s for _, s in points]
    return {"seeds": per_seed, "mean": mean, "std": std}


def differences(results: dict[str, dict], pairs: list[tuple[str, str]]) -> dict:
    """For each (method, reference) pair and metric: the difference of the means, both standard
    deviations, and whether the difference exceeds their sum (the mean +- std ranges do not
    overlap), the study's test of a difference larger than the seeds' spread."""
    out = {}
    for m, ref in pairs:
        if m not in results or ref not in results:
            continue
        row = {}
        for k in METRICS:
            d = results[m]["mean"][k] - results[ref]["mean"][k]
            sa, sb = results[m]["std"][k], results[ref]["std"][k]
            row[k] = {"diff": d, "std": sa, "std_ref": sb,
                      "exceeds": None if sa is None or sb is None else abs(d) > sa + sb}
        out[f"{m} - {ref}"] = row
    return out


def eval_files(cfg: dict) -> tuple[list[str], dict[str, str]]:
    """The pilot's files: the probes (knowledge and general tests), and each stage's test file."""
    import train
    tasks = {}
    for s in cfg["stages"]:
        if len(s["eval"]) != 1:
            raise ValueError(f"study: stage '{s['name']}' has {len(s['eval'])} eval files; the "
                             "pilot scores each continual task on exactly one")
        tasks[s["name"]] = train._eval_path(s["eval"][0])
    return list(cfg["eval"]["probes"]), tasks


def score_model(path: str, cfg: dict, label: str) -> dict:
    """One checkpoint's knowledge, general and task scores, computed in-process as train.py scores
    after a stage (greedy, the config's [eval] settings, fp32), cached under runs/study/pilot/
    scores/ by the bytes of the model, the files and the settings."""
    import torch
    import data
    import eval as ev
    from checkpoint import load_model, write_json
    from train import read_json
    probes, tasks = eval_files(cfg)
    e = cfg["eval"]
    settings = {k: e[k] for k in ("max_new_tokens", "batch_size", "max_batch_tokens")}
    h = hashlib.sha256(json.dumps([settings, cfg["model"]["max_seq_len"]]).encode())
    for f in model_files(path) + [cfg["model"]["tokenizer"], *probes, *tasks.values()]:
        run.file_digest(h, f)
    cache = os.path.join(PILOT, "scores", label.replace("/", "_") + ".json")
    cached = read_json(cache)
    if cached and cached["key"] == h.hexdigest()[:16]:
        return cached["scores"]
    t0, cpu0 = time.time(), sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    tok = data.Tokenizer(cfg["model"]["tokenizer"])
    model = load_model(path, max_seq_len=cfg["model"]["max_seq_len"])
    score = {f: ev.evaluate_file(model, tok, f, dtype=torch.float32, **settings)["score"]
             for f in [*probes, *tasks.values()]}
    general = {os.path.basename(f)[:-len("_test.jsonl")]: score[f] for f in probes
               if f != run.KNOWLEDGE}
    task_scores = {name: score[f] for name, f in tasks.items()}
    scores = {"knowledge": score[run.KNOWLEDGE], "general": statistics.fmean(general.values()),
              "tasks_mean": statistics.fmean(task_scores.values()), "tasks": task_scores,
              "general_tasks": general, "model": path, "eval_seconds": time.time() - t0,
              "eval_cpu_seconds": sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - cpu0}
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    write_json(cache, {"key": h.hexdigest()[:16], "scores": scores})
    print(f"study: pilot: {label}: knowledge {scores['knowledge']:.1f}, general "
          f"{scores['general']:.1f}, tasks {scores['tasks_mean']:.1f}")
    return scores


def pilot_summary(entries: list[dict], tasks: list[str]) -> dict:
    """Mean and sample std of the pilot's scores over the entries (each task's too)."""
    flat = [{"knowledge": e["knowledge"], "general": e["general"], "tasks_mean": e["tasks_mean"],
             **{f"task:{t}": e["tasks"][t] for t in tasks}} for e in entries]
    mean, std = {}, {}
    for k in flat[0]:
        mean[k], std[k] = mean_std([f[k] for f in flat])
    return {"n": len(entries), "mean": mean, "std": std}


def run_pilot(a, cfg: dict, base_dir: str, fft: dict[str, dict], mask_seeds: list[int]) -> dict:
    """The paper's Figure 1 on each FFT chain's final model (see the module docstring). Every
    (FFT seed, mask seed) reset model is one entry; the summaries give mean and sample std over
    all of them, over each FFT seed's masks, over each mask's FFT seeds, and of the paired
    difference to that seed's FFT."""
    import torch
    import hft
    torch.set_num_threads(1)  # as train.py's workers evaluate: one thread each
    tasks = list(eval_files(cfg)[1])
    models = {"chat": score_model(base_dir, cfg, "chat")}
    resets, deltas, by_seed, by_mask = {}, [], {}, {}
    for s, chain in fft.items():
        final = os.path.join(chain["out_dir"], tasks[-1])
        f = models[f"fft/seed{s}"] = score_model(final, cfg, f"fft_seed{s}")
        for m in mask_seeds:
            out = os.path.join(PILOT, f"reset_fft_seed{s}_mask{m}")
            info = hft.reset_half(base=base_dir, tuned=final, out=out, seed=m, **PILOT_SETTINGS)
            r = score_model(out, cfg, f"reset_fft_seed{s}_mask{m}")
            resets[f"seed{s}/mask{m}"] = {**r, "fft_seed": int(s), "mask_seed": m,
                                          "reset_tensors": len(info["reset"])}
            by_seed.setdefault(s, []).append(r)
            by_mask.setdefault(str(m), []).append(r)
            deltas.append({k: r[k] - f[k] for k in ("knowledge", "general", "tasks_mean")}
                          | {"tasks": {t: r["tasks"][t] - f["tasks"][t] for t in tasks}})
    summary = {"chat": pilot_summary([models["chat"]], tasks),
               "fft": pilot_summary([models[f"fft/seed{s}"] for s in fft], tasks),
               "reset": pilot_summary(list(resets.values()), tasks),
               "reset_by_fft_seed": {s: pilot_summary(v, tasks) for s, v in by_seed.items()},
               "reset_by_mask_seed": {m: pilot_summary(v, tasks) for m, v in by_mask.items()},
               "reset_minus_fft": pilot_summary(deltas, tasks)}
    return {**PILOT_SETTINGS, "base": base_dir, "fft_seeds": [int(s) for s in fft],
            "mask_seeds": mask_seeds, "tasks": tasks,
            "aggregation": "one entry per (FFT seed, mask seed); mean and sample std (n-1) over "
                           "all entries, over each FFT seed's mask seeds, over each mask seed's "
                           "FFT seeds, and of each entry minus its own FFT final model (paired)",
            "models": {**models, **{f"reset/{k}": v for k, v in resets.items()}},
            "summary": summary}


def cell(mean: float, std: float | None, fmt: str = "{:.1f}") -> str:
    return fmt.format(mean) + ("" if std is None else " ± " + "{:.1f}".format(std))


def format_methods(study: dict) -> list[str]:
    res, seeds = study["methods"], study["settings"]["seeds"]
    out = [f"Continual stages of configs/demo.toml from the chat model (knowledge "
           f"{study['base']['base_knowledge']:.1f}, general tasks "
           f"{study['base']['base_general']:.1f}); mean ± sample standard deviation over train.py "
           f"seeds {', '.join(map(str, seeds))}.", "",
           "| method | OP | BWT | knowledge | general | training s | CPU s |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in res.items():
        m, s = r["mean"], r["std"]
        out.append(f"| {name} | {cell(m['OP'], s['OP'])} | {cell(m['BWT'], s['BWT'], '{:+.1f}')} "
                   f"| {cell(m['knowledge'], s['knowledge'])} | {cell(m['general'], s['general'])}"
                   f" | {m['seconds']:.0f} | {m['cpu_seconds']:.0f} |")
    t = study["time"]
    out += ["", "Training s: wall seconds of the stages' training, CPU s: CPU seconds of the "
            "whole chain (2 ranks, evaluations included), on a shared machine. All "
            f"{sum(len(r['seeds']) for r in res.values())} chains: {t['chains_cpu_seconds']:.0f} "
            f"CPU s, {t['chains_wall_seconds']:.0f} wall s; the pilot's evaluations: "
            f"{t['pilot_eval_cpu_seconds']:.0f} CPU s."]
    out += format_curves(study)
    out += ["", "Difference of the means; * where it exceeds the sum of the two standard "
            "deviations.", "", "| | OP | BWT | knowledge | general |", "|---|---:|---:|---:|---:|"]
    for pair, row in study["differences"].items():
        out.append(f"| {pair} | " + " | ".join(
            f"{row[k]['diff']:+.1f}{' *' if row[k]['exceeds'] else ''}" for k in METRICS) + " |")
    out += ["", "Each method's train.py overrides on top of configs/demo.toml:", "",
            "| method | overrides |", "|---|---|"]
    out += [f"| {name} | `{' '.join(o)}` |" for name, o in study["settings"]["methods"].items()]
    return out


def format_curves(study: dict) -> list[str]:
    """Per stage, mean ± std over seeds: each task's own score after its stage (did the method
    learn it), the mean earlier-task score and the knowledge."""
    tasks, out = study["tasks"], []
    for key, caption in (("own", "Own task: score on each stage's task right after it"),
                         ("earlier_tasks", "Earlier tasks: mean score on the tasks of the stages "
                                           "before (after the first stage, its own task)"),
                         ("knowledge_by_stage", "Knowledge after each stage"),
                         ("general_by_stage", "General tasks after each stage")):
        out += ["", f"{caption}; mean ± std over seeds.", "",
                "| method | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
        for name, r in study["methods"].items():
            out.append(f"| {name} | " + " | ".join(
                cell(m, sd) for m, sd in zip(r["mean"][key], r["std"][key])) + " |")
    return out


def format_pilot(p: dict) -> list[str]:
    tasks, s = p["tasks"], p["summary"]
    cols = ["knowledge", "general", "tasks_mean", *(f"task:{t}" for t in tasks)]
    out = [f"The pilot: each FFT final model with half of its layer tensors reset to the chat "
           f"model ({p['granularity']} level, ratio {p['ratio']}, mask seeds "
           f"{', '.join(map(str, p['mask_seeds']))}); mean ± sample standard deviation over n "
           "models.", "",
           "| model | n | knowledge | general | tasks (mean) | " + " | ".join(tasks) + " |",
           "|---|---:|" + "---:|" * (len(cols))]
    rows = [("chat model", s["chat"]), ("FFT final", s["fft"]),
            ("FFT final, half reset to the chat model", s["reset"])]
    rows += [(f"FFT seed {k} only, half reset", v) for k, v in s["reset_by_fft_seed"].items()]
    rows += [(f"mask seed {k} only, half reset", v) for k, v in s["reset_by_mask_seed"].items()]
    rows.append(("reset minus its own FFT final (paired)", s["reset_minus_fft"]))
    for label, r in rows:
        fmt = "{:+.1f}" if label.startswith("reset minus") else "{:.1f}"
        out.append(f"| {label} | {r['n']} | "
                   + " | ".join(cell(r["mean"][c], r["std"][c], fmt) for c in cols) + " |")
    return out


def format_study(study: dict) -> str:
    out = ["# Study: FFT against HFT, its ablations and replay, over seeds", "",
           *format_methods(study), ""]
    if study["pilot"]:
        out += [*format_pilot(study["pilot"]), ""]
    res = study["methods"]
    if "fft" in res and "hft" in res:
        base = study["base"]
        runs = {label: {"tasks": study["tasks"], "base_knowledge": base["base_knowledge"],
                        "base_general": base["base_general"], **{k: res[name]["mean"][k] for k in
                        ("knowledge_by_stage", "general_by_stage", "earlier_tasks")}}
                for label, name in (("FFT", "fft"), ("HFT", "hft"))}
        out += [f"Means over seeds {', '.join(map(str, study['settings']['seeds']))}.", "",
                run.format_charts(runs), ""]
    return "\n".join(out)


def process_cpu() -> float:
    return sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) + children_cpu()


def study_time(results: dict, pilot: dict | None, t0: float, cpu0: float) -> dict:
    """Seconds: the chains' and the pilot's evaluations, summed over the runs that made them
    (cached ones included), and this invocation's, which a rerun from the caches makes small."""
    chains = [r for m in results.values() for r in m["seeds"].values()]
    models = pilot["models"].values() if pilot else []
    return {"chains_wall_seconds": sum(r["run_seconds"] for r in chains),
            "chains_cpu_seconds": sum(r["cpu_seconds"] for r in chains),
            "pilot_eval_seconds": sum(m["eval_seconds"] for m in models),
            "pilot_eval_cpu_seconds": sum(m["eval_cpu_seconds"] for m in models),
            "this_invocation": {"wall_seconds": time.time() - t0,
                                "cpu_seconds": process_cpu() - cpu0}}


def main(a):
    """The study (see the module docstring); `a` is demo/run.py's parsed arguments."""
    import train
    from checkpoint import atomic_file, write_json
    t0, cpu0 = time.time(), process_cpu()
    seeds = int_list(a.seeds, "--seeds")
    mask_seeds = int_list(a.mask_seeds, "--mask-seeds")
    cfg = train.load_config(a.config, a.train_args.split())  # as every chain's, but out_dir
    n_stages = len(cfg["stages"])
    table = methods(n_stages)
    names = a.methods.split(",") if a.methods else list(METHOD_NAMES)
    unknown = [n for n in names if n not in table]
    if unknown:
        sys.exit(f"study: --methods: unknown {unknown}; the methods are {', '.join(table)}")
    base_dir = run.build_base(a, run.write_data(a))
    results = {}
    for name in names:
        per_seed = {str(s): run_chain(a, name, s, table[name]) for s in seeds}
        results[name] = aggregate(per_seed)
    any_run = next(iter(results.values()))["seeds"][str(seeds[0])]
    pilot = (run_pilot(a, cfg, base_dir, results["fft"]["seeds"], mask_seeds)
             if "fft" in results else None)
    pairs = [(n, "fft") for n in names if n != "fft"] + [("hft_replay", "fft_replay")]
    study = {"methods": results, "pilot": pilot, "differences": differences(results, pairs),
             "tasks": any_run["tasks"],
             "base": {"base_knowledge": any_run["base_knowledge"],
                      "base_general": any_run["base_general"], **run.base_report()},
             "settings": {"config": os.path.relpath(a.config, REPO), "world_seed": a.seed,
                          "seeds": seeds, "mask_seeds": mask_seeds, "nproc": a.nproc,
                          "methods": {n: table[n] for n in names},
                          "train_args": a.train_args, "base_args": a.base_args},
             "time": study_time(results, pilot, t0, cpu0)}
    write_json(os.path.join(STUDY, "study.json"), study)
    with atomic_file(os.path.join(STUDY, "study.md")) as f:
        f.write(format_study(study))
    print("\n" + "\n".join(format_methods(study)))
    print(f"\nstudy: done in {time.time() - t0:.0f}s; {STUDY}/study.md (with charts) and "
          "study.json")


if __name__ == "__main__":
    run.main(["--study", *sys.argv[1:]])
