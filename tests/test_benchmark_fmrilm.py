"""fmrilm benchmark with method fmrilm evaluated here (--fmrilm-models): fmrilm evaluate runs per (cohort, task)
on the benchmark's own splits, its rows join the baselines', and a rerun reuses the evaluation."""

import json

import pytest

from test_instruct_evaluate import save_align_layout
from test_describe import make_cohort
from fmrilm.errors import FmrilmError
from fmrilm.evaluate import benchmark_fmrilm
from fmrilm.evaluate.benchmark import run_benchmark
from fmrilm.evaluate.benchmark_cohorts import BuiltCohort
from fmrilm.evaluate.benchmark_config import BenchmarkConfig, CohortSpec, resolve_config

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def config_for(cohort, lm, **fmrilm):
    return BenchmarkConfig(cohorts=(CohortSpec("toy", path=str(cohort), tasks=("sex",)),),
                           methods=("fc_svm", "fmrilm"), seeds=2, shots=(), fmrilm={"models": [str(lm)], **fmrilm})


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A random tiny-llama model in the layout of an align output (trained on no cohort) benchmarked on a
    30-scan cohort beside fc_svm."""
    root = tmp_path_factory.mktemp("bench_fmrilm")
    cohort = make_cohort(root / "cohort", n_scans=30)
    lm = save_align_layout(root, cohort)
    lines = []
    rows = run_benchmark(config_for(cohort, lm), root / "B", progress=lines.append)
    return root, cohort, lm, rows, lines


def test_fmrilm_is_evaluated_on_the_benchmark_splits(evaluated):
    root, cohort, _, rows, lines = evaluated
    ours = [r for r in rows if r.method == "fmrilm"]
    assert ours and {r.cohort for r in ours} == {"toy"} and {r.task for r in ours} == {"sex"}
    assert {(r.paradigm, r.setting, r.shots) for r in ours} == {("single", "new-task-new-cohort", 0)}
    assert all(r.n_seeds == 2 for r in ours if r.metric == "accuracy")  # one run per benchmark split
    run = json.loads((root / "B" / "run.json").read_text())
    assert run["notes"] == []  # fmrilm evaluate's test subjects are the baselines' test subjects
    assert any("fmrilm evaluate of 1 model(s)" in line for line in lines)
    assert "| fmrilm (single) |" in (root / "B" / "results.md").read_text()
    built = BuiltCohort(CohortSpec("toy", path=str(cohort)), cohort, "fingerprint")
    curves = benchmark_fmrilm.roc_pairs(root / "B" / "fmrilm" / "toy_sex", [(built, ("sex",))])
    pairs = curves[("toy", "sex")]["fmrilm (single)"]
    assert len(pairs) == 2 and all(len(y) == len(p) > 0 and set(y) <= {0, 1} for y, p in pairs)
    assert (root / "B" / "plots" / "roc_toy_sex.png").is_file()


def test_a_rerun_reuses_the_evaluation(evaluated, monkeypatch):
    root, cohort, lm, rows, _ = evaluated
    import fmrilm.instruct.evaluate

    monkeypatch.setattr(fmrilm.instruct.evaluate, "run_evaluate", lambda *a, **k: pytest.fail("evaluated again"))
    monkeypatch.setattr("fmrilm.evaluate.plots.write_plots", lambda rows, roc, out: out.mkdir(parents=True))
    assert run_benchmark(config_for(cohort, lm), root / "B") == rows


def test_fmrilm_source_errors(evaluated, tmp_path):
    root, cohort, lm, _, _ = evaluated
    with pytest.raises(FmrilmError, match="fmrilm model .*nowhere does not exist"):
        benchmark_fmrilm.model_fingerprint(tmp_path / "nowhere")
    with pytest.raises(FmrilmError, match="--fmrilm-results R/results.json .* or --fmrilm-models INST"):
        run_benchmark(config_for(cohort, lm, models=None), tmp_path / "B")
    with pytest.raises(FmrilmError, match="not both"):
        resolve_config("quick", fmrilm_results="R/results.json", fmrilm_models=[str(lm)])
    config = resolve_config("quick", fmrilm_models=[str(lm)])
    assert config.fmrilm["models"] == [str(lm)] and config.fmrilm["results"] is None
