"""fmrilm benchmark: config and presets, the harness end to end on a tiny cohort (shared splits, mean and SD
in every cell, cache reuse, plots, tables), fMRI-LM rows merged from fmrilm evaluate, and every error."""

import json
import time

import numpy as np
import pandas as pd
import pytest

from fmrilm.cli import main
from fmrilm.data.atlas import Atlas, roi_table
from fmrilm.data.cohort import load_cohort
from fmrilm.data.prepare import prepare_cohort
from fmrilm.data.sources import ScanSource
from fmrilm.errors import FmrilmError
from fmrilm.evaluate import ResultRow, few_shot_indices, load_splits, make_splits, read_results, targets, write_results
from fmrilm.evaluate import benchmark as bench
from fmrilm.evaluate.benchmark import run_benchmark
from fmrilm.evaluate.benchmark_cohorts import BuiltCohort, cohort_tasks
from fmrilm.evaluate.benchmark_fmrilm import split_notes
from fmrilm.evaluate.benchmark_config import (BenchmarkConfig, CohortSpec, list_presets, load_benchmark_preset,
                                              resolve_config)
from fmrilm.evaluate.plots import mean_roc, roc_curve

PNG = b"\x89PNG\r\n\x1a\n"
N_ROIS = 12


def toy_cohort(path, n_subjects=40, seed=0):
    """A prepared cohort of 12 ROIs (two networks): females share a signal in ROIs 0-3 (FC up there) and age
    raises the coupling of ROIs 8-11."""
    rng = np.random.default_rng(seed)
    sex, age = np.array(["M", "F"])[np.arange(n_subjects) % 2], rng.uniform(20, 80, n_subjects)
    sources = []
    for i in range(n_subjects):
        x = rng.standard_normal((130, N_ROIS))
        x[:, :4] += (0.9 if sex[i] == "F" else 0.0) * rng.standard_normal((130, 1))
        x[:, 8:] += (age[i] - 20) / 40 * rng.standard_normal((130, 1))
        sources.append(ScanSource(f"t{i:02d}", f"t{i:02d}", path / f"t{i}.npy", (lambda x=1000 + 10 * x: x), tr=2.0))
    rois = roi_table([f"roi{i}" for i in range(N_ROIS)])
    rois["network"] = ["Vis"] * 6 + ["Default"] * 6
    phenotypes = pd.DataFrame({"subject_id": [f"t{i:02d}" for i in range(n_subjects)], "sex": sex, "age": age})
    prepare_cohort(sources, Atlas("toy", rois), path, phenotypes=phenotypes).close()
    return path


def toy_config(cohort, **changes):
    settings = dict(cohorts=(CohortSpec("toy", path=str(cohort), tasks=("sex", "age")),),
                    methods=("fc_logreg", "fc_svm"), seeds=2, shots=(4,))
    return BenchmarkConfig(**{**settings, **changes})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return toy_cohort(tmp_path_factory.mktemp("toy") / "cohort")


@pytest.fixture(scope="module")
def benchmark(cohort, tmp_path_factory):
    """One harness run: 2 baselines x 2 seeds x (full + 4-shot) x 2 tasks = 16 cells."""
    out = tmp_path_factory.mktemp("bench") / "B"
    lines = []
    rows = run_benchmark(toy_config(cohort), out, progress=lines.append)
    return out, rows, lines


@pytest.fixture
def rerun(benchmark, tmp_path, monkeypatch):
    """A copy of the benchmark directory to run again, without drawing plots (tested on the first run)."""
    import shutil

    import fmrilm.evaluate.plots

    monkeypatch.setattr(fmrilm.evaluate.plots, "write_plots", lambda rows, roc, out: out.mkdir(parents=True))
    return shutil.copytree(benchmark[0], tmp_path / "B"), benchmark[1]


# ---------------------------------------------------------------------------------------------- harness
def test_every_cell_has_mean_and_sd_over_the_seeds(benchmark):
    out, rows, lines = benchmark
    assert json.loads((out / "run.json").read_text())["computed"] == 16 and len(lines) > 16
    cells = {(r.method, r.task, r.shots) for r in rows}
    assert cells == {(m, t, k) for m in ("fc_logreg", "fc_svm") for t in ("sex", "age") for k in (None, 4)}
    assert all(r.n_seeds == 2 and np.isfinite(r.mean) and np.isfinite(r.std) for r in rows if r.metric != "auc")
    assert {r.metric for r in rows if r.task == "age"} == {"mae", "pearson_r"}
    assert {(r.setting, r.shots) for r in rows} == {("full", None), ("few-shot", 4)}
    assert read_results(out) == rows  # results.json holds the returned rows
    text = (out / "results.md").read_text()
    assert "## toy · supervised · full · all training subjects" in text
    assert "## toy · supervised · few-shot · 4-shot" in text
    assert text.count("**") >= 2 * 6 and "<u>" in text  # best bold and second underlined in every column


def test_the_planted_effects_are_learned_with_all_training_subjects(benchmark):
    _, rows, _ = benchmark
    value = {(r.method, r.task, r.metric): r.mean for r in rows if r.shots is None}
    for method in ("fc_logreg", "fc_svm"):
        assert value[(method, "sex", "auc")] >= 0.8 and value[(method, "age", "pearson_r")] >= 0.4


def test_cells_use_the_protocol_splits_and_the_shared_few_shot_sets(benchmark, cohort):
    out, _, _ = benchmark
    splits = load_splits(out / "splits" / "toy_sex.json")
    assert splits == make_splits(cohort, "sex", seeds=2)
    y, _ = targets(cohort, "sex")
    for path in (out / "cache" / "cells" / "toy" / "sex").rglob("*.json"):
        record = json.loads(path.read_text())
        split = splits[record["key"]["split"]["seed"]]
        assert record["key"]["split"] == split.to_dict() and record["test"] == list(split.test)
        assert record["y_true"] == y[list(split.test)].tolist()
        assert np.asarray(record["proba"]).shape == (len(split.test), 2)
    shots = json.loads(next((out / "cache" / "cells" / "toy" / "sex" / "fc_svm").glob("seed1_k4_*.json")).read_text())
    assert shots["key"]["shots"] == 4 and len(few_shot_indices(splits[1].train, y, 4, 1)) == 4


def test_a_rerun_computes_nothing_and_one_more_method_only_its_cells(rerun, cohort, monkeypatch):
    out, rows = rerun
    calls = []
    original = bench.predict_baseline
    monkeypatch.setattr(bench, "predict_baseline", lambda *a, **k: calls.append(a[0]) or original(*a, **k))
    stamp = {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*.json")}
    assert run_benchmark(toy_config(cohort), out) == rows and calls == []
    assert {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*.json")} == stamp
    assert json.loads((out / "run.json").read_text()) | {"seconds": 0} == {"computed": 0, "cached": 16, "seconds": 0,
                                                                             "rows": len(rows), "notes": []}
    more = toy_config(cohort, methods=("fc_logreg", "fc_svm", "brainnetcnn"), shots=(),
                      params={"brainnetcnn": {"epochs": 2}})
    with pytest.raises(FmrilmError, match="another configuration; pass --overwrite"):
        run_benchmark(more, out)
    run_benchmark(more, out, overwrite=True)
    assert calls == ["brainnetcnn"] * 4  # 2 tasks x 2 seeds, full data only
    assert not list((out / "plots").iterdir())  # the plots of this run replaced the old ones


def test_plots_are_valid_pngs(benchmark):
    out, _, _ = benchmark
    names = sorted(p.name for p in (out / "plots").iterdir())
    assert names == ["bars_toy_age.png", "bars_toy_sex.png", "fewshot_toy_age.png", "fewshot_toy_sex.png",
                     "roc_toy_sex.png"]
    import matplotlib.image

    for name in names:
        assert (out / "plots" / name).read_bytes()[:8] == PNG
        assert matplotlib.image.imread(out / "plots" / name).shape[0] > 100


def test_roc_curve_matches_scikit_learn_and_the_mean_curve_its_auc():
    from sklearn.metrics import auc, roc_curve as sk_roc

    rng = np.random.default_rng(3)
    positive = rng.random(57) < 0.4
    score = np.round(positive + rng.standard_normal(57), 1)  # rounded: ties
    fpr, tpr = roc_curve(positive, score)
    expected_fpr, expected_tpr, _ = sk_roc(positive, score, drop_intermediate=False)
    np.testing.assert_allclose(fpr, expected_fpr)
    np.testing.assert_allclose(tpr, expected_tpr)
    grid, mean, aucs = mean_roc([(positive.astype(int), score), (positive.astype(int), score)])
    assert aucs[0] == pytest.approx(auc(expected_fpr, expected_tpr))
    assert auc(grid, mean) == pytest.approx(aucs[0], abs=0.02) and mean[0] == 0 and mean[-1] == 1


# ------------------------------------------------------------------------------------------------ fmrilm
def fmrilm_results(path, pairs, paradigm="single"):
    rows = [ResultRow("fmrilm", c, t, paradigm, "full", None, m, 0.99, 0.01, 2)
            for c, t in pairs for m in (("accuracy", "auc") if t == "sex" else ("mae", "pearson_r"))]
    return write_results(path, rows) / "results.json"


def test_fmrilm_rows_merge_into_the_tables(rerun, cohort, tmp_path):
    out, rows = rerun
    pairs = [("custom", "sex"), ("custom", "age"), ("custom", "age_group")]  # named by the scans' dataset
    config = toy_config(cohort, methods=("fc_logreg", "fc_svm", "fmrilm"),
                        fmrilm={"results": str(fmrilm_results(tmp_path / "R", pairs))})
    merged = run_benchmark(config, out, overwrite=True)
    assert merged[:len(rows)] == rows and {r.method for r in merged[len(rows):]} == {"fmrilm"}
    assert {(r.cohort, r.task) for r in merged[len(rows):]} == {("toy", "sex"), ("toy", "age"), ("toy", "age_group")}
    assert "unknown whether fMRI-LM was tested" in json.loads((out / "run.json").read_text())["notes"][0]
    table = (out / "results.md").read_text().split("## toy · supervised · few-shot")[0]
    assert "| fmrilm (single) | **0.990 ± 0.010** | – | <u>0.990 ± 0.010</u> |" in table  # beside the baselines


def test_fmrilm_needs_matching_results(rerun, cohort, tmp_path):
    out, _ = rerun
    with pytest.raises(FmrilmError, match="method fmrilm needs --fmrilm-results"):
        run_benchmark(toy_config(cohort, methods=("fc_svm", "fmrilm")), out, overwrite=True)
    for pairs, have in (([("toy", "sex")], "toy/sex"), ([("TOY", "sex"), ("TOY", "age"), ("ukb", "sex")],
                                                         "toy/age, toy/sex, ukb/sex")):
        partial = fmrilm_results(tmp_path / have.replace("/", "_"), pairs)
        with pytest.raises(FmrilmError, match=f"cover {have} but the benchmark runs toy/age, toy/sex; evaluate"):
            run_benchmark(toy_config(cohort, methods=("fc_svm", "fmrilm"), fmrilm={"results": str(partial)}), out,
                          overwrite=True)


def test_split_notes_compare_fmrilm_test_subjects_with_the_benchmark_splits(cohort, tmp_path):
    config, settings = toy_config(cohort, methods=("fc_svm", "fmrilm")), tmp_path / "evaluate.json"
    plan = [(BuiltCohort(config.cohorts[0], cohort, "fingerprint"), ("sex",))]
    assert split_notes(config, plan, settings) == [f"fmrilm: no {settings}, so it is unknown whether fMRI-LM was "
                                                   "tested on the benchmark's subjects"]
    with load_cohort(cohort) as opened:
        subjects = opened.scans["subject_id"].to_numpy()
    runs = [{"model": "m", "seed": s.seed, "test_subjects": sorted(set(subjects[list(s.test)]))}
            for s in make_splits(cohort, "sex", seeds=2)]
    settings.write_text(json.dumps({"cohort": str(cohort), "runs": runs}))
    assert split_notes(config, plan, settings) == []
    runs[1]["test_subjects"] = runs[1]["test_subjects"][1:]
    settings.write_text(json.dumps({"cohort": str(cohort), "runs": runs}))
    assert split_notes(config, plan, settings) == ["fmrilm: toy/sex run m seed 1 was tested on other subjects than "
                                                   "the baselines' split of that seed"]


# ------------------------------------------------------------------------------------------ config, CLI
def test_presets_load_and_the_paper_preset_is_paper_scale():
    assert {"quick", "paper"} <= set(list_presets())
    quick, paper = load_benchmark_preset("quick"), load_benchmark_preset("paper")
    assert quick.seeds == 3 and quick.shots == (2, 4, 10) and {c.name for c in quick.cohorts} == {"ukb", "adni"}
    assert all(c.atlas == "schaefer100_tian_s1" for c in quick.cohorts)
    assert paper.seeds == 5 and all(c.atlas == "schaefer400_tian_s3" for c in paper.cohorts)
    assert paper.fmrilm["stages"]["tokenizer"]["patch_size"] == 32 and "fmrilm" in paper.methods
    assert BenchmarkConfig.from_dict(json.loads(json.dumps(paper.to_dict()))) == paper


def test_overrides_replace_the_preset_values(cohort):
    config = resolve_config("quick", cohorts=["adni", str(cohort), "hcp_aging"], tasks=["sex"], methods=["bnt"],
                            seeds=2, shots=[])
    assert [c.name for c in config.cohorts] == ["adni", "cohort", "hcp_aging"]
    assert config.cohorts[1].path == str(cohort) and config.cohorts[2].simulate == "hcp_aging"
    assert config.tasks == ("sex",) and config.methods == ("bnt",) and config.seeds == 2 and config.shots == ()


def test_a_cohort_without_listed_tasks_runs_every_task_it_has_targets_for(cohort):
    with load_cohort(cohort) as opened:
        table = opened.scan_phenotypes()
    spec = CohortSpec("toy", path=str(cohort))
    assert cohort_tasks(spec, table) == ("sex", "age")  # age_group (bins of age) only when listed
    assert cohort_tasks(spec, table, only=("age", "ad_vs_cn")) == ("age",)
    assert cohort_tasks(CohortSpec("toy", path=str(cohort), tasks=("age_group",)), table) == ("age_group",)


def test_cli_runs_the_benchmark_and_refuses_an_existing_out(cohort, tmp_path, capsys):
    preset = tmp_path / "tiny.json"
    preset.write_text(json.dumps({"cohorts": [{"name": "toy", "path": str(cohort), "tasks": ["sex"]}],
                                  "methods": ["fc_svm"], "seeds": 2, "shots": []}))
    assert main(["benchmark", "--preset", str(preset), "--out", str(tmp_path / "B")]) == 0
    assert "toy/sex fc_svm seed 1 all" in capsys.readouterr().out and (tmp_path / "B" / "results.md").is_file()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    assert main(["benchmark", "--preset", str(preset), "--out", str(tmp_path / "other")]) == 2
    assert "is not a benchmark directory; choose another --out" in capsys.readouterr().err


def test_config_errors_name_the_fix(cohort, tmp_path):
    with pytest.raises(FmrilmError, match="unknown method 'svm'; use one of fc_logreg, .*, fmrilm"):
        toy_config(cohort, methods=("svm",))
    with pytest.raises(FmrilmError, match="unknown task 'iq'; use one of sex, age"):
        toy_config(cohort, tasks=("iq",))
    with pytest.raises(FmrilmError, match="unknown benchmark preset 'fast'; choose one of .*paper, quick"):
        resolve_config("fast")
    with pytest.raises(FmrilmError, match="unknown cohort 'nowhere'; use a cohort of the preset .*simulation preset"):
        resolve_config("quick", cohorts=["nowhere"])
    with pytest.raises(FmrilmError, match="seeds must be an integer >= 1"):
        toy_config(cohort, seeds=0)
    with pytest.raises(FmrilmError, match=r"shots \[1, 4\] must be distinct integers >= 2"):
        toy_config(cohort, shots=(1, 4))
    with pytest.raises(FmrilmError, match="params of bnt: unknown \\['epoch'\\]"):
        toy_config(cohort, params={"bnt": {"epoch": 3}})
    with pytest.raises(FmrilmError, match="give exactly one of"):
        CohortSpec("x", simulate="ukb", path=str(cohort))
    with pytest.raises(FmrilmError, match="unknown keys \\['seed'\\]"):
        BenchmarkConfig.from_dict({"cohorts": [], "methods": ["bnt"], "seed": 1})


def test_task_errors_before_any_baseline_runs(cohort, tmp_path):
    with pytest.raises(FmrilmError, match="task ad_vs_cn is not in cohort toy: .*'diagnosis'"):
        run_benchmark(toy_config(cohort, cohorts=(CohortSpec("toy", path=str(cohort), tasks=("ad_vs_cn",)),)),
                      tmp_path / "B1")
    with pytest.raises(FmrilmError, match="task flanker is in none of the cohorts \\(toy: sex\\)"):
        run_benchmark(toy_config(cohort, tasks=("sex", "flanker")), tmp_path / "B2")
    with pytest.raises(FmrilmError, match="2 shots cannot cover the 3 classes of task age_group"):
        run_benchmark(toy_config(cohort, cohorts=(CohortSpec("toy", path=str(cohort), tasks=("age_group",)),),
                                 shots=(2,)), tmp_path / "B3")
    assert not list((tmp_path / "B3" / "cache").rglob("cells")) and not (tmp_path / "B3" / "config.json").exists()
    run_benchmark(toy_config(cohort, tasks=("sex",), methods=("fc_svm",), shots=()), tmp_path / "B2")  # fixed: resumes
    assert (tmp_path / "B2" / "results.md").is_file()


# ------------------------------------------------------------------------------------------- acceptance
@pytest.mark.acceptance
@pytest.mark.needs_atlas
def test_quick_preset_within_30_minutes_with_mean_and_sd_in_every_cell(tmp_path):
    """The README's quick benchmark (about 30 minutes of wall time on a busy 2-core CPU; run by hand)."""
    start = time.perf_counter()
    assert main(["benchmark", "--preset", "quick", "--out", str(tmp_path / "B")]) == 0
    assert time.perf_counter() - start < 30 * 60
    rows = read_results(tmp_path / "B")
    metrics = 4 + 2 + 4 + 4  # ukb sex, age; adni ad_vs_cn, sex
    assert len(rows) == metrics * 6 * 4 and all(r.n_seeds == 3 and r.std >= 0 for r in rows)  # 6 methods, 4 settings
    best = {}
    for r in (r for r in rows if r.shots is None):
        best[(r.cohort, r.task, r.metric)] = max(r.mean, best.get((r.cohort, r.task, r.metric), -1.0))
    assert best[("ukb", "sex", "auc")] > 0.6 and best[("adni", "ad_vs_cn", "auc")] > 0.65
    assert best[("ukb", "age", "pearson_r")] > 0.4  # planted effects are learned (chance: 0.5, 0.5, 0)
