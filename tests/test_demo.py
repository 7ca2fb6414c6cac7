"""`make demo`, reduced: the whole pipeline (synthetic world -> tokenizer -> random Meta checkpoint
-> torchrun `lm` pretraining and `sft` chat stage -> FFT and HFT chains of SFT stages -> combined
report) on a tiny world, with the real configs cut to two continual stages and a few steps."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, ROOT)
from demo import run, world  # noqa: E402

ARGS = ["--entities", "24", "--probes", "16", "--chat-per-task", "8", "--general-test", "4",
        "--train-per-task", "32", "--test-per-task", "8",
        "--vocab-size", "400", "--dim", "32", "--n-layers", "2", "--n-heads", "2",
        "--base-args", "--train.max_steps 4 --train.batch_size 8 --train.micro_batch_size 4",
        "--train-args", "--train.max_steps 3 --train.batch_size 8 --train.micro_batch_size 4 "
                        "--eval.max_new_tokens 4"]


def test_world_is_seeded_and_splits_are_disjoint():
    a, b, c = world.make_entities(50, 0), world.make_entities(50, 0), world.make_entities(50, 1)
    assert a == b and a != c
    assert len({p["name"] for p in a}) == 50
    docs = {d["text"] for d in world.pretrain_docs(a, 0)}
    # every probe is answered, in its format, in pretraining
    for q in world.knowledge_probes(a, 40, 0):
        assert f"Q: {q['question']}\nA: {q['answer']}" in docs
    prompts = lambda recs: {r["messages"][0]["content"] for r in recs}  # noqa: E731
    for name in [*world.TASKS, *world.GENERAL_TASKS]:
        train, test = world.task_split(name, 60, 20, 0)
        assert len(train) == 60 and len(test) == 20
        assert not prompts(train) & prompts(test), name
        assert all([m["role"] for m in r["messages"]] == ["user", "assistant"]
                   for r in train + test)
        # the record names its metric: train.py scores an eval or probe file by it
        assert {r["metric"] for r in train + test} == {world.METRICS.get(name, "accuracy")}
        assert (world.task_split(name, 60, 20, 0) == (train, test)
                != world.task_split(name, 60, 20, 1))
    chat = world.chat_mixture(30, 10, 0)
    assert len(chat) == 30 * len(world.GENERAL_TASKS) and chat == world.chat_mixture(30, 10, 0)
    assert not prompts(chat) & set().union(*(prompts(world.task_split(n, 30, 10, 0)[1])
                                             for n in world.GENERAL_TASKS))
    with pytest.raises(KeyError, match="no task 'nope'"):
        world.task_split("nope", 1, 1, 0)


def test_every_task_has_its_own_instruction():
    """A model that does several tasks has to read the instruction: every task's prompts begin with
    its own fixed wording, and no task's prompt begins with another task's."""
    def instruction(name):
        words = [r["messages"][0]["content"].split() for r in world.task_split(name, 50, 0, 0)[0]]
        n = 0
        while all(len(w) > n and w[n] == words[0][n] for w in words):
            n += 1
        return words[0][:n]
    names = [*world.TASKS, *world.GENERAL_TASKS]
    instr = {name: instruction(name) for name in names}
    for name in names:
        assert len(instr[name]) >= 3, (name, instr[name])
        for other in names:
            if other != name:
                assert instr[other][:len(instr[name])] != instr[name], (name, other)


def test_xychart_is_a_mermaid_line_chart_whose_title_names_the_lines():
    md = run.xychart("Knowledge", ["chat model", "a", "b"],
                     {"FFT": [50, 40.25, 30], "HFT": [50, 45, 44]}, "EM")
    lines = md.split("\n")
    assert lines[0] == "```mermaid" and lines[-1] == "```" and "xychart-beta" in lines
    assert '    title "Knowledge (FFT blue, HFT orange)"' in lines
    assert '    x-axis ["chat model", "a", "b"]' in lines and '    y-axis "EM" 0 --> 100' in lines
    assert [ln for ln in lines if ln.startswith("    line")] == ["    line [50.0, 40.2, 30.0]",
                                                                 "    line [50.0, 45.0, 44.0]"]
    palette = next(ln for ln in lines if "plotColorPalette" in ln)
    assert '"plotColorPalette": "#1f77b4, #ff7f0e"' in palette  # blue, orange: the title's order
    with pytest.raises(ValueError, match="line 'HFT' has 2 points for 3 x labels"):
        run.xychart("t", ["a", "b", "c"], {"FFT": [1, 2, 3], "HFT": [1, 2]}, "y")


def test_earlier_task_and_general_scores():
    R = [[90.0], [30.0, 80.0], [20.0, 40.0, 70.0]]
    assert run.earlier_task_scores(R) == [90.0, 30.0, 30.0]  # stage 0: the first task's own score
    probes = {run.KNOWLEDGE: {"base": 50.0, "stages": [{"score": 40.0}, {"score": 30.0}]},
              run.general_test("sort"): {"base": 80.0,
                                         "stages": [{"score": 60.0}, {"score": 20.0}]},
              run.general_test("count"): {"base": 100.0,
                                          "stages": [{"score": 90.0}, {"score": 50.0}]}}
    g = run.general_scores(probes)
    assert g["base"] == 90.0 and g["stages"] == [75.0, 35.0]
    assert g["tasks"] == {"sort": {"base": 80.0, "stages": [60.0, 20.0]},
                          "count": {"base": 100.0, "stages": [90.0, 50.0]}}


def test_tokenizer_has_llama_layout(tmp_path, monkeypatch):
    import data
    monkeypatch.chdir(tmp_path)
    a = run.parse_args(ARGS)
    run.train_tokenizer(run.write_data(a)[0], a.vocab_size)
    tok = data.Tokenizer(run.TOKENIZER)
    assert ((tok.sp_model.unk_id(), tok.bos_id, tok.eos_id, tok.pad_id, tok.n_words)
            == (0, 1, 2, -1, 400))
    for marker in run.CHAT_MARKERS:  # one token each, wherever they stand
        assert (len(tok.encode(f"x\n{marker}\ny", bos=False, eos=False))
                == len(tok.encode("x\n\ny", bos=False, eos=False)) + 1)
    assert tok.sp_model.encode("\n", out_type=str)[-1] == "<0x0A>"  # byte piece, never merged
    assert (tok.decode(tok.encode("Q: ünïcode\n  two spaces", bos=True, eos=False))
            == "Q: ünïcode\n  two spaces")
    for path in [os.path.join(run.DATA, "tasks", f"{name}_train.jsonl")
                 for name in world.TASKS] + [run.CHAT_TRAIN]:
        ex = data.load_examples(path, "sft", tok, 128)  # the chat-prefix check of data.py passes
        assert len(ex) == (32 if path != run.CHAT_TRAIN else 8 * len(world.GENERAL_TASKS))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    with open(os.path.join(ROOT, "configs", "demo.toml")) as f:
        head, *stages = f.read().split("[[stages]]")
    cfg = root / "demo_2stages.toml"
    cfg.write_text(head + "[[stages]]" + "[[stages]]".join(stages[:2]))
    cmd = [sys.executable, os.path.join(ROOT, "demo", "run.py"), *ARGS, "--config", str(cfg)]
    p = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    if p.returncode:
        raise AssertionError(f"demo/run.py failed ({p.returncode}):\n{p.stdout[-4000:]}\n"
                             f"{p.stderr[-4000:]}")
    return root, p.stdout


def continual_stages():
    import train
    return [s["name"]
            for s in train.load_config(os.path.join(ROOT, "configs", "demo.toml"))["stages"]]


def test_report_structure(demo):
    root, out = demo
    with open(root / "runs/demo/report.json") as f:
        rep = json.load(f)
    assert 0 <= rep["base_knowledge"] <= 100 and 0 <= rep["pretrain_knowledge"] <= 100
    assert (rep["general_tasks"] == list(world.GENERAL_TASKS)
            and rep["base_stages"] == ["pretrain", "chat"])
    for label in ("fft", "hft"):
        r = rep[label]
        for key in ("OP", "BWT", "knowledge", "general", "matrix", "seconds",
                    "optimizer_state_bytes"):
            assert key in r, (label, key)
        R = r["matrix"]
        assert [len(row) for row in R] == [1, 2]
        assert all(0 <= x <= 100 for row in R for x in row)
        assert r["OP"] == pytest.approx(sum(R[-1]) / 2)
        assert r["BWT"] == pytest.approx((R[1][0] - R[0][0]) / 2)
        assert r["earlier_tasks"] == [R[0][0], R[1][0]]
        assert 0 <= r["knowledge"] <= 100 and r["seconds"] > 0
        # general = the mean over the general test sets, after the last stage and before the first
        assert (set(r["general_tasks"]) == set(world.GENERAL_TASKS)
                and len(r["general_by_stage"]) == 2)
        assert r["general"] == r["general_by_stage"][-1] == pytest.approx(
            sum(g["stages"][-1] for g in r["general_tasks"].values()) / len(world.GENERAL_TASKS))
        assert r["base_general"] == rep["base_general"] == pytest.approx(
            rep["base_general_by_stage"][-1])
    # HFT trains about half the layer tensors: less optimizer state than full fine-tuning.
    assert 0 < rep["hft"]["optimizer_state_bytes"] < rep["fft"]["optimizer_state_bytes"]
    md = (root / "runs/demo/report.md").read_text()
    first, second = continual_stages()[:2]
    assert "| OP (mean of the last row) |" in md and f"| {first} |" in md and f"| {second} |" in md
    assert (md.count("```mermaid\n") == 3 and md.count("xychart-beta") == 3
            and "```mermaid" not in out)
    assert "OP (mean of the last row)" in out  # the comparison is printed


def test_base_is_an_official_checkpoint_the_runs_start_from(demo):
    root, _ = demo
    d = root / "runs/demo"
    for model_dir in ("init", "base/pretrain", "base/chat"):
        for f in ("params.json", "consolidated.00.pth", "tokenizer.model"):
            assert (d / model_dir / f).is_file(), (model_dir, f)
    base_log = (d / "logs/base.log").read_text()
    assert "== stage 0 'pretrain' (lm) from runs/demo/init" in base_log
    assert "== stage 1 'chat' (sft) from runs/demo/base/pretrain" in base_log
    first, second = continual_stages()[:2]
    for label in ("fft", "hft"):
        log = (d / f"logs/{label}.log").read_text()
        assert f"== stage 0 '{first}' (sft) from runs/demo/base/chat" in log
        assert f"== stage 1 '{second}' (sft) from runs/demo/{label}/{first}" in log
    # HFT's frozen half leaves the stage bitwise equal to the base it loaded; FFT trains everything.
    base = torch.load(d / "base/chat/consolidated.00.pth", weights_only=True)
    after = torch.load(d / f"hft/{first}/consolidated.00.pth", weights_only=True)
    with open(d / f"hft/{first}/mask.json") as f:
        trainable = set(json.load(f)["trainable"])
    frozen = [k for k in base if k not in trainable and k in after]
    assert frozen and all(torch.equal(base[k], after[k]) for k in frozen)
    assert any(not torch.equal(base[k], after[k]) for k in trainable)
    with open(d / f"fft/{first}/mask.json") as f:
        assert set(json.load(f)["trainable"]) >= set(trainable)
    # The chat stage trains everything: the base model is the chat stage's export, not
    # pretraining's.
    pre = torch.load(d / "base/pretrain/consolidated.00.pth", weights_only=True)
    assert all(not torch.equal(pre[k], base[k]) for k in base)


def test_second_run_reuses_the_cached_base(demo, monkeypatch):
    root, _ = demo
    monkeypatch.chdir(root)
    monkeypatch.setattr(run, "torchrun", lambda *a, **k: pytest.fail("the cached base was rebuilt"))
    a = run.parse_args(ARGS)
    files = run.write_data(a)
    assert run.build_base(a, files) == os.path.join(run.BASE, "chat")
    key = run.base_key(a, files)
    # A different world (seed) or chat mixture is a different key: the base would be rebuilt.
    for change in (["--seed", "1"], ["--chat-per-task", "9"], ["--general-test", "5"]):
        b = run.parse_args(ARGS + change)
        assert run.base_key(b, run.write_data(b)) != key, change
    run.write_data(a)  # leave the module's files as they were


def test_recipes_load_and_each_has_an_fft_twin():
    import glob
    import train
    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "*.toml")))
    # unknown keys would raise
    cfgs = {os.path.basename(p)[:-5]: train.load_config(p) for p in paths}
    assert {"demo", "demo_base"} <= set(cfgs)
    twins = [n for n in cfgs if n.endswith("_fft")]
    assert {"tulu_sft_7b_fft", "tulu_sft_13b_fft", "tulu_dpo_7b_fft", "tulu_dpo_13b_fft",
            "trace_7b_fft", "trace_13b_fft"} <= set(twins)
    for fft_name in twins:
        hft_cfg, fft_cfg = cfgs[fft_name[:-4]], cfgs[fft_name]
        assert ([s["hft"]["granularity"] for s in hft_cfg["stages"]]
                == ["category"] * len(hft_cfg["stages"]))
        assert ([s["hft"]["granularity"] for s in fft_cfg["stages"]]
                == ["none"] * len(fft_cfg["stages"]))
        for a, b in zip(hft_cfg["stages"], fft_cfg["stages"]):  # same data, same optimisation
            assert ((a["name"], a["data"], a["eval"], a["train"])
                    == (b["name"], b["data"], b["eval"], b["train"]))
        assert hft_cfg["out_dir"] != fft_cfg["out_dir"]
    trace = cfgs["trace_7b"]
    assert [s["name"] for s in trace["stages"]] == ["C-STANCE", "FOMC", "MeetingBank", "Py150",
                                                    "ScienceQA", "NumGLUE-cm", "NumGLUE-ds",
                                                    "20Minuten"]
    assert [s["train"]["epochs"] for s in trace["stages"]] == [5, 3, 7, 5, 3, 5, 5, 7]
    assert {s["train"]["lr"] for s in trace["stages"]} == {1e-5}
    sft, dpo = cfgs["tulu_sft_7b"]["stages"][0]["train"], cfgs["tulu_dpo_7b"]["stages"][0]["train"]
    assert (sft["lr"], sft["epochs"], sft["schedule"], sft["warmup_ratio"], sft["weight_decay"],
            sft["batch_size"]) == (2e-5, 2, "linear", 0.03, 0.0, 128)
    assert (dpo["lr"], dpo["epochs"], dpo["dpo_beta"], dpo["warmup_ratio"],
            dpo["batch_size"]) == (5e-7, 3, 0.1, 0.1, 32)
    assert (cfgs["tulu_dpo_7b"]["model"]["path"]
            == os.path.join(cfgs["tulu_sft_7b"]["out_dir"], "sft"))
    assert (cfgs["tulu_dpo_7b_fft"]["model"]["path"]
            == os.path.join(cfgs["tulu_sft_7b_fft"]["out_dir"], "sft"))


def test_study_methods_are_the_papers_rows_and_replay_as_in_trace():
    import train
    from demo import study
    assert study.replay_overrides(4) == ["--stages.1.replay", "0.1", "--stages.2.replay", "0.2",
                                         "--stages.3.replay", "0.3"]
    table = study.methods(4)
    assert list(table) == list(study.METHOD_NAMES)
    assert table["fft"] == run.METHODS["fft"] and table["hft"] == run.METHODS["hft"]
    want = {"fft": ("none", 0.5, [0] * 4), "hft": ("category", 0.5, [0] * 4),
            "hft_layer": ("layer", 0.5, [0] * 4), "hft_model": ("model", 0.5, [0] * 4),
            "hft_r25": ("category", 0.25, [0] * 4), "hft_r75": ("category", 0.75, [0] * 4),
            "fft_replay": ("none", 0.5, [0, 0.1, 0.2, 0.3]),
            "hft_replay": ("category", 0.5, [0, 0.1, 0.2, 0.3])}
    base = train.load_config(os.path.join(ROOT, "configs", "demo.toml"))
    for name, (granularity, ratio, replay) in want.items():
        cfg = train.load_config(os.path.join(ROOT, "configs", "demo.toml"), table[name])
        stages = cfg["stages"]
        assert [s["hft"]["granularity"] for s in stages] == [granularity] * 4, name
        if granularity != "none":
            assert {s["hft"]["ratio"] for s in stages} == {ratio}, name
        assert [s["train"]["replay"] for s in stages] == replay, name
        # nothing else moves: every other setting is configs/demo.toml's
        for s, b in zip(stages, base["stages"]):
            assert {k: v for k, v in s["train"].items() if k != "replay"} == \
                {k: v for k, v in b["train"].items() if k != "replay"}, name


def test_study_aggregates_are_the_seeds_own():
    import statistics
    from demo import study
    per_seed = {str(k): {"OP": op, "BWT": bwt, "knowledge": kn, "general": g,
                         "knowledge_retention": None, "seconds": 1.0, "cpu_seconds": 2.0,
                         "knowledge_by_stage": [kn, kn - 1], "general_by_stage": [g, g],
                         "earlier_tasks": [op, op], "own": [90.0, 80.0]}
                for k, (op, bwt, kn, g) in enumerate([(50, -10, 20, 30), (60, -4, 22, 35),
                                                      (55, -7, 27, 31)])}
    agg = study.aggregate(per_seed)
    assert agg["seeds"] is per_seed
    assert agg["mean"]["OP"] == 55 and agg["std"]["OP"] == pytest.approx(5.0)  # n - 1
    assert agg["std"]["BWT"] == pytest.approx(statistics.stdev([-10, -4, -7]))
    assert agg["mean"]["knowledge_by_stage"] == pytest.approx([23, 22])
    assert agg["std"]["own"] == [0.0, 0.0] and agg["mean"]["knowledge_retention"] is None
    other = study.aggregate({k: {**r, "OP": r["OP"] + 20} for k, r in per_seed.items()})
    d = study.differences({"fft": agg, "hft": other}, [("hft", "fft"), ("hft_layer", "fft")])
    assert list(d) == ["hft - fft"]  # a method not run is left out
    assert d["hft - fft"]["OP"] == {"diff": 20.0, "std": 5.0, "std_ref": 5.0, "exceeds": True}
    assert d["hft - fft"]["BWT"]["exceeds"] is False  # 0 is within any spread
    assert study.aggregate({"0": per_seed["0"]})["std"]["OP"] is None  # one seed: no spread


STUDY_ARGS = ["--study", "--methods", "fft,hft", "--seeds", "0,1", "--mask-seeds", "0,1"]


@pytest.fixture(scope="module")
def study_run(demo):
    """demo/run.py --study in the demo's directory, on the same reduced sizes and 2-stage config:
    it reuses the demo's cached base and runs fft and hft with seeds 0 and 1, and the pilot."""
    root, _ = demo
    cfg = root / "demo_2stages.toml"
    cmd = [sys.executable, os.path.join(ROOT, "demo", "run.py"), *ARGS, "--config", str(cfg),
           *STUDY_ARGS]
    p = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    if p.returncode:
        raise AssertionError(f"study failed ({p.returncode}):\n{p.stdout[-4000:]}\n"
                             f"{p.stderr[-4000:]}")
    with open(root / "runs/study/study.json") as f:
        return root, json.load(f), p.stdout


def test_study_json_contract_and_seed_statistics(study_run):
    import statistics
    root, s, out = study_run
    assert "reusing the cached tokenizer and base model" in out
    assert list(s["methods"]) == ["fft", "hft"]
    for name, r in s["methods"].items():
        assert list(r["seeds"]) == ["0", "1"]
        for seed in r["seeds"].values():
            assert {"OP", "BWT", "knowledge", "general", "matrix"} <= set(seed)
            assert [len(row) for row in seed["matrix"]] == [1, 2]
        for k in ("OP", "BWT", "knowledge", "general", "seconds", "cpu_seconds"):
            values = [seed[k] for seed in r["seeds"].values()]
            assert r["mean"][k] == pytest.approx(statistics.fmean(values)), (name, k)
            assert r["std"][k] == pytest.approx(statistics.stdev(values)), (name, k)
    assert s["settings"]["seeds"] == [0, 1] and s["settings"]["world_seed"] == 0
    md = (root / "runs/study/study.md").read_text()
    assert "| fft | " in md and "| hft | " in md and "| hft - fft |" in md
    assert md.count("xychart-beta") == 3 and '(FFT blue, HFT orange)"' in md
    assert "| FFT final, half reset to the chat model | 4 |" in md


def test_study_seed0_is_the_demo_run(study_run):
    """Seed 0 of fft and hft is `make demo`'s run: the same numbers and, bitwise, the same weights;
    seed 1 is another run (data order, masks)."""
    root, s, _ = study_run
    with open(root / "runs/demo/report.json") as f:
        demo_rep = json.load(f)
    last = continual_stages()[1]
    for name in ("fft", "hft"):
        seed0 = s["methods"][name]["seeds"]["0"]
        for k in ("OP", "BWT", "knowledge", "general", "matrix", "knowledge_by_stage",
                  "general_by_stage", "earlier_tasks", "general_tasks", "trainable_params"):
            assert seed0[k] == demo_rep[name][k], (name, k)
        weights = {d: torch.load(root / d / last / "consolidated.00.pth", weights_only=True)
                   for d in (f"runs/demo/{name}", f"runs/study/{name}/seed0",
                             f"runs/study/{name}/seed1")}
        demo_w, w0, w1 = weights.values()
        assert all(torch.equal(demo_w[k], w0[k]) for k in demo_w), name
        assert any(not torch.equal(demo_w[k], w1[k]) for k in demo_w), name
        losses = [[json.loads(ln)["loss"] for ln in open(root / d / last / "metrics.jsonl")]
                  for d in (f"runs/demo/{name}", f"runs/study/{name}/seed0")]
        assert losses[0] == losses[1]


def test_study_pilot_resets_half_of_each_fft_final(study_run):
    root, s, _ = study_run
    p = s["pilot"]
    assert (p["granularity"], p["ratio"]) == ("category", 0.5)
    assert (p["fft_seeds"], p["mask_seeds"]) == ([0, 1], [0, 1])
    resets = {k: v for k, v in p["models"].items() if k.startswith("reset/")}
    assert sorted(resets) == ["reset/seed0/mask0", "reset/seed0/mask1", "reset/seed1/mask0",
                              "reset/seed1/mask1"]
    assert {"chat", "fft/seed0", "fft/seed1"} <= set(p["models"])
    summary = p["summary"]
    assert [summary[k]["n"] for k in ("chat", "fft", "reset", "reset_minus_fft")] == [1, 2, 4, 4]
    tasks = continual_stages()[:2]
    # Scored in-process as train.py scores after a stage: the FFT final model gets its run's last
    # row, knowledge and general score; the chat model gets the run's base row.
    for seed in ("0", "1"):
        run_ = s["methods"]["fft"]["seeds"][seed]
        got = p["models"][f"fft/seed{seed}"]
        assert [got["tasks"][t] for t in tasks] == run_["matrix"][-1]
        assert got["knowledge"] == run_["knowledge"]
        assert got["general"] == pytest.approx(run_["general"])
        assert got["general_tasks"] == {k: v["stages"][-1]
                                        for k, v in run_["general_tasks"].items()}
    chat = p["models"]["chat"]
    assert [chat["tasks"][t] for t in tasks] == s["methods"]["fft"]["seeds"]["0"]["base_row"]
    assert chat["knowledge"] == s["base"]["base_knowledge"]
    # A reset model: the selected layer tensors are the chat model's, everything else FFT's.
    d = root / "runs/study/pilot/reset_fft_seed1_mask0"
    with open(d / "reset.json") as f:
        info = json.load(f)
    assert (info["seed"], info["ratio"], info["granularity"]) == (0, 0.5, "category")
    dirs = (d, root / "runs/demo/base/chat", root / f"runs/study/fft/seed1/{tasks[-1]}")
    w, chat_w, fft_w = (torch.load(x / "consolidated.00.pth", weights_only=True) for x in dirs)
    reset = set(info["reset"])
    assert reset and all(k.startswith("layers.") for k in reset)
    assert all(torch.equal(w[k], (chat_w if k in reset else fft_w)[k]) for k in w)


def test_study_rerun_reuses_finished_chains_and_reruns_changed_ones(study_run, monkeypatch):
    import shutil
    from demo import study
    root, s, _ = study_run
    monkeypatch.chdir(root)
    a = run.parse_args([*ARGS, "--config", str(root / "demo_2stages.toml"), *STUDY_ARGS])
    monkeypatch.setattr(run, "torchrun", lambda *x, **k: pytest.fail("a finished chain was rerun"))
    again = study.run_chain(a, "fft", 1, run.METHODS["fft"])
    assert again["matrix"] == s["methods"]["fft"]["seeds"]["1"]["matrix"]
    assert again["key"] == s["methods"]["fft"]["seeds"]["1"]["key"]

    # Another setting under the same name: the old chain is deleted, never continued.
    shutil.copytree("runs/study/fft/seed1", "runs/study/probe/seed1")
    shutil.copy("runs/study/fft/seed1.json", "runs/study/probe/seed1.json")
    calls = []

    def fake_torchrun(config, args, nproc, log_path, out_dir):
        calls.append((args, os.path.exists(os.path.join(out_dir, continual_stages()[0]))))
        time.sleep(0.01)
        raise KeyboardInterrupt  # killed mid-chain
    monkeypatch.setattr(run, "torchrun", fake_torchrun)
    changed = [*run.METHODS["fft"], "--train.lr", "1e-3"]
    with open("runs/study/probe/seed1.json") as f:
        old = json.load(f)
    with pytest.raises(KeyboardInterrupt):
        study.run_chain(a, "probe", 1, changed)
    assert calls[-1][1] is False  # started afresh
    with open("runs/study/probe/seed1.json") as f:
        meta = json.load(f)
    assert meta["key"] != old["key"] and meta["done"] is False and "1e-3" in meta["args"]
    assert meta["run_seconds"] >= 0.01  # an interrupted attempt's time counts
    # The same setting after the kill: train.py is called on the kept out_dir (it resumes).
    os.makedirs(f"runs/study/probe/seed1/{continual_stages()[0]}")
    with pytest.raises(KeyboardInterrupt):
        study.run_chain(a, "probe", 1, changed)
    assert calls[-1][1] is True
    with open("runs/study/probe/seed1.json") as f:
        assert json.load(f)["run_seconds"] >= meta["run_seconds"] + 0.01  # both attempts'
    # Other inputs are other keys too: the seed, the number of ranks, a task file's bytes.
    args = run.chain_args(a, "runs/study/fft/seed1", run.METHODS["fft"], 1)
    key = study.chain_key(a, args)
    seed2 = run.chain_args(a, "runs/study/fft/seed1", run.METHODS["fft"], 2)
    assert study.chain_key(a, seed2) != key
    # a setting, in the same out_dir (the probe above differs in its out_dir too)
    assert study.chain_key(a, run.chain_args(a, "runs/study/fft/seed1", changed, 1)) != key
    b = run.parse_args([*ARGS, "--config", str(root / "demo_2stages.toml"), "--nproc", "1"])
    assert study.chain_key(b, args) != key
    task = os.path.join(run.DATA, "tasks", f"{continual_stages()[0]}_train.jsonl")
    original = open(task).read()
    try:
        with open(task, "a") as f:
            f.write(original.splitlines()[0] + "\n")
        assert study.chain_key(a, args) != key
    finally:
        with open(task, "w") as f:
            f.write(original)
    assert study.chain_key(a, args) == key


def test_readme_study_tables_are_generated_from_results():
    """Every table row of the README's "The study" section is a row study.md's generator makes
    from the committed results/study.json: the README's numbers cannot drift from the study."""
    from demo import study
    with open(os.path.join(ROOT, "results", "study.json")) as f:
        generated = set(study.format_study(json.load(f)).splitlines())
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = readme[readme.index("## The study"):readme.index("## Recipes")]
    rows = [ln for ln in section.splitlines() if ln.startswith("|")]
    assert len(rows) >= 20
    assert [r for r in rows if r not in generated] == []


def test_readme_study_numbers_in_the_text_are_the_results():
    """The "The study" section's numbers outside its tables, from results/study.json: the chat
    model's scores, HFT minus FFT seed by seed, and the time of the chains and of the pilot."""
    from demo import study
    with open(os.path.join(ROOT, "results", "study.json")) as f:
        s = json.load(f)
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    text = " ".join(readme[readme.index("## The study"):readme.index("## Recipes")].split())
    b, t, seeds = s["base"], s["time"], s["settings"]["seeds"]
    assert (f"the chat model has knowledge {b['base_knowledge']:.1f} and general-task accuracy "
            f"{b['base_general']:.1f}") in text
    fft, hft = s["methods"]["fft"]["seeds"], s["methods"]["hft"]["seeds"]
    paired = "; ".join(f"{k} " + ", ".join(f"{hft[str(x)][k] - fft[str(x)][k]:+.1f}"
                                           for x in seeds) for k in study.METRICS)
    assert f"HFT minus FFT on seeds {', '.join(map(str, seeds))}: {paired}." in text
    chains = sum(len(m["seeds"]) for m in s["methods"].values())
    assert (f"the {chains} chains took {t['chains_cpu_seconds']:.0f} CPU-seconds "
            f"({t['chains_wall_seconds'] / 60:.0f} minutes of wall time") in text
    assert f"the pilot's evaluations {t['pilot_eval_cpu_seconds']:.0f} CPU-seconds" in text
