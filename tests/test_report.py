"""The HTML report: every section filled on a tiny complete run, "stage not run" on partial ones, and the page
opened in headless Chromium (screenshot, no missing image, no console error, no network request).

The run directory is built once per module with the real stage functions on tiny data: a 24-scan, 38-ROI
cohort, Stage 0 descriptors, a tiny tokenizer (tiny random GPT-2 text side), a tiny-llama alignment run, and two
baselines (full and 2/4-shot, two seeds) whose per-scan predictions and results rows go to DIR/evaluate/toy/.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from test_describe import CONFIG, make_cohort
from fmrilm.data.cohort import load_cohort
from fmrilm.descriptors.check import run_check
from fmrilm.descriptors.pipeline import run_describe
from fmrilm.errors import FmrilmError, FmrilmWarning
from fmrilm.evaluate.baselines import FeatureCache, predict_baseline
from fmrilm.evaluate.metrics import classification_metrics
from fmrilm.evaluate.protocol import make_splits
from fmrilm.evaluate.results import ResultRow, rows_from_seeds, write_results
from fmrilm.lm.pipeline import run_align
from fmrilm.report import build_report, figures
from fmrilm.report.html import SECTIONS, render_page
from fmrilm.report.common import RunDir
from fmrilm.report.sections_data import _pair_matrix
from fmrilm.report.sections_models import _curves, generations
from fmrilm.report.sections_models import tokenizer as tokenizer_section
from fmrilm.report.sections_results import _curve_label, few_shot_curves, results_tables, roc_curves
from fmrilm.tokenizer.pipeline import run_train_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars")
METHODS, SHOTS = ("fc_logreg", "text_clf"), (None, 2, 4)
TINY_TOKENIZER = {"hidden": 32, "heads": 4, "codebook_size": 16, "codebook_dim": 16, "decoder_layers": 1,
                  "shared_dim": 16, "domain_hidden": 32}


def write_baseline_results(cohort: Path, desc: Path, out: Path) -> None:
    """Two baselines x two seeds x (full, 2-, 4-shot): results rows and the per-scan predictions they come from."""
    rows, predictions = [], []
    with load_cohort(cohort) as opened:
        splits, cache = make_splits(opened.scan_phenotypes(), "sex", seeds=2), FeatureCache(opened, desc)
        for method in METHODS:
            for shots in SHOTS:
                per_seed = []
                for split in splits:
                    p = predict_baseline(method, opened, "sex", split, desc, shots=shots, params={"Cs": (1.0,)}, cache=cache)
                    per_seed.append(classification_metrics(p["y_true"], p["y_pred"], p["proba"], p["task"].classes))
                    predictions.append(pd.DataFrame({"method": method, "cohort": "toy", "task": "sex", "seed": split.seed,
                                                     "shots": shots, "y_true": p["y_true"], "score": p["proba"][:, 1]}))
                rows += rows_from_seeds(per_seed, method=method, cohort="toy", task="sex", shots=shots)
    write_results(out, rows)
    pd.concat(predictions).to_csv(out / "predictions.csv", index=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    cohort = make_cohort(root / "cohorts" / "toy", n_scans=24)
    desc = run_describe(cohort, root / "descriptors" / "toy", config=CONFIG)
    run_check(desc, cohort, "sex", folds=2, seeds=1)
    train = {"epochs": 1, "batch_size": 8, "lr": 2e-3, "device": "cpu", "log_every": 1}
    run_train_tokenizer(cohort, desc, root / "tokenizer", preset="tiny", llm="tiny-gpt2",
                        overrides=TINY_TOKENIZER, train=train)
    run_align(cohort, root / "tokenizer", desc, root / "lm", llm="tiny-llama", held_out_fraction=0.2, max_text_tokens=64,
              n_generate=3, train={"epochs": 1, "batch_size": 4, "log_every": 1})
    write_baseline_results(cohort, desc, root / "evaluate" / "toy")
    return root


@pytest.fixture(scope="module")
def report(run_dir) -> tuple[str, dict]:
    """(the text of DIR/report.html, {section: status} read back from its data-status attributes)."""
    page = build_report(run_dir).read_text()
    return page, statuses_of(page)


def statuses_of(page: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="([^"]+)" data-status="([^"]+)"', page))


def images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


# ------------------------------------------------------------------------------------------------ content
def test_every_section_is_filled_on_a_complete_run(report):
    page, statuses = report
    assert statuses == {key: "ok" for key, _, _ in SECTIONS}
    assert "could not be drawn" not in page
    pngs = images(page)
    # every image is an inline PNG: 2 FC, 1 gradient, 2 tokenizer, 2 training curves, 1 few-shot, 1 ROC
    assert page.count("<img ") == len(pngs) == 9
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 2000 for png in pngs)


def test_the_page_needs_no_network_and_no_script(report):
    page, _ = report
    assert "<script" not in page.lower()
    assert not re.search(r'(src|href)="(?!data:|#)', page)  # only data URIs and in-page anchors
    assert "http://" not in page and "https://" not in page


def test_sections_show_the_run_outputs(report, run_dir):
    page, _ = report
    record = json.loads((run_dir / "descriptors/toy/texts.jsonl").read_text().splitlines()[0])
    assert record["text"][:80].replace("'", "&#x27;") in page
    examples = json.loads((run_dir / "lm/eval.json").read_text())["examples"]
    assert len(examples) == 3 and all(f"<td>{e['scan_id']}</td>" in page for e in examples)
    assert "Stage 3 instruction tuning: stage not run" in page  # no instruct/ in this run
    assert "codes used in all 24 scans (Stage 2 token cache)" in page
    check = json.loads((run_dir / "descriptors/toy/check_sex.json").read_text())["rows"]
    assert "toy: sex from each descriptor domain" in page and len(check) >= 4
    assert all(f"<td>{r['domain']}</td><td>{r['metric']}</td><td>{r['mean']:.3f} ± " in page for r in check)
    for shots in ("all training subjects", "2-shot", "4-shot"):
        assert f"toy · full · {shots}" in page


def test_best_cell_is_bold_in_each_results_column(run_dir, report):
    page, _ = report
    results = json.loads((run_dir / "evaluate/toy/results.json").read_text())["rows"]
    full = [r for r in results if r["shots"] is None and r["metric"] == "auc"]
    best = max(r["mean"] for r in full)
    first = page.split("toy · full · all training subjects")[1].split("<h3>")[0]
    assert f"<strong>{best:.3f} ± " in first


def test_fmrilm_rows_share_the_baselines_table_and_few_shot_axis(tmp_path):
    rows = [ResultRow("fc_logreg", "ukb", "sex", "supervised", "full", None, "accuracy", 0.70, 0.02, 3),
            ResultRow("fmrilm", "ukb", "sex", "single", "full", None, "accuracy", 0.80, 0.01, 3),
            ResultRow("fmrilm", "ukb", "sex", "single", "new-cohort", 0, "accuracy", 0.55, 0.05, 3),
            ResultRow("fc_logreg", "ukb", "sex", "supervised", "few-shot", 2, "accuracy", 0.60, 0.04, 3)]
    write_results(tmp_path, rows)
    body = results_tables(RunDir(tmp_path))
    full = body.split("ukb · full · all training subjects")[1].split("<h3>")[0]
    assert "<strong>0.800 ± 0.010</strong>" in full and "<u>0.700 ± 0.020</u>" in full and "fmrilm (single)" in full
    assert "ukb · new-cohort · 0-shot" in body and "ukb · few-shot · 2-shot" in body
    assert len(images(few_shot_curves(RunDir(tmp_path)))) == 1  # one (cohort, task): 0-shot and 2-shot on one axis


def test_network_pair_matrix_reads_the_pair_columns():
    row = pd.Series({"scan_id": "s0", "fc.pair.Default.Vis": 1.5, "fc.pair.Vis.Vis": -2.0, "fc.mean": 0.3})
    m = _pair_matrix(row, ["Vis", "Default"])
    assert m[0, 1] == m[1, 0] == 1.5 and m[0, 0] == -2.0 and np.isnan(m[1, 1])


def test_roc_reads_fmrilm_evaluate_predictions(tmp_path):
    """predictions.jsonl as fmrilm evaluate writes it: proba lists, the method in evaluate.json, 0-shot runs,
    generated answers without probabilities; k-shot runs are left out."""
    folder = tmp_path / "evaluate" / "ukb"
    folder.mkdir(parents=True)
    (folder / "evaluate.json").write_text(json.dumps({"method": "fmrilm-B"}))
    y = [0, 1, 0, 1, 1, 0]
    records = [{"task": "sex", "paradigm": "single", "shots": shots, "seed": 0, "y_true": t, "proba": [1 - p, p]}
               for shots in (None, 0, 4) for t, p in zip(y, (0.2, 0.9, 0.4, 0.6, 0.3, 0.1))]
    records.append({"task": "sex", "paradigm": "multi", "shots": None, "y_true": 1, "answer": "female"})
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    body = roc_curves(RunDir(tmp_path))
    assert len(images(body)) == 1 and "evaluate/ukb/predictions.jsonl" in body
    assert _curve_label("fmrilm-B", 0) == "fmrilm-B (0-shot)" and _curve_label("fmrilm-B", np.nan) == "fmrilm-B"


def test_generations_show_open_ended_answers_of_fmrilm_evaluate(tmp_path):
    folder = tmp_path / "evaluate" / "ukb"
    folder.mkdir(parents=True)
    records = [{"paradigm": "open", "task": t, "scan_id": s, "answer": f"answer {s}", "reference": f"reference {s}"}
               for s in ("a1", "a2", "a3", "a4") for t in ("sex", "age")]
    records.insert(0, {"paradigm": "single", "task": "sex", "scan_id": "z9", "y_true": 1, "proba": [0.3, 0.7]})
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    body = generations(RunDir(tmp_path))
    assert "Stage 3 open-ended answers (ukb)" in body and "z9" not in body and "a4" not in body
    assert body.count("<tr><td>a1</td><td>reference a1</td><td>answer a1</td></tr>") == 1


def test_training_curves_of_a_run_shorter_than_log_every():
    records = [{"event": "epoch", "epoch": 0, "step": 3, "train_loss": 2.0, "train_f2t_loss": 1.5, "val_acc": 0.4},
               {"event": "epoch", "epoch": 1, "step": 6, "train_loss": 1.0, "train_f2t_loss": 0.5, "val_acc": 0.6}]
    steps, epochs = _curves(records)
    assert steps == {"loss": ([3, 6], [2.0, 1.0]), "f2t_loss": ([3, 6], [1.5, 0.5])}
    assert epochs == {"val_acc": ([0, 1], [0.4, 0.6])}
    logged = [{"step": 1, "epoch": 0, "lr": 0.1, "loss": 3.0}, *records]
    assert _curves(logged)[0] == {"loss": ([1], [3.0])}  # step records win when there are any


def test_roc_falls_back_to_the_benchmark_plots(tmp_path):
    plots = tmp_path / "benchmark" / "plots"
    plots.mkdir(parents=True)
    png = base64.b64decode(figures.roc({"m": (np.array([0, 1]), np.array([0, 1]), 0.5)}, "t").split(",")[1])
    (plots / "roc_ukb_sex.png").write_bytes(png)
    (plots / "bars_ukb_sex.png").write_bytes(png)
    body = roc_curves(RunDir(tmp_path))
    assert images(body) == [png] and "benchmark/plots/roc_ukb_sex.png" in body


# ------------------------------------------------------------------------------------------ partial runs
def test_a_partial_run_says_which_stages_did_not_run(run_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(run_dir / "cohorts", partial / "cohorts")
    shutil.copytree(run_dir / "descriptors", partial / "descriptors")
    (partial / "config.resolved.json").write_text(json.dumps({"stages": ["prepare", "describe"]}))
    meta = json.loads((partial / "descriptors/toy/meta.json").read_text())
    meta["cohort"] = str(tmp_path / "gone" / ".toy.tmp-1")  # a moved run: the cohort is found by name
    (partial / "descriptors/toy/meta.json").write_text(json.dumps(meta))
    out = build_report(partial)
    page = out.read_text()
    statuses = statuses_of(page)
    assert out == partial / "report.html"
    assert [k for k, s in statuses.items() if s == "ok"] == ["cohorts", "connectivity", "gradients", "descriptors",
                                                             "configuration"]
    assert page.count("stage not run") >= 6 and "could not be drawn" not in page


def test_codebook_usage_without_the_stage2_cache_encodes_held_out_scans(run_dir, tmp_path):
    for part in ("cohorts", "tokenizer"):
        shutil.copytree(run_dir / part, tmp_path / part, ignore=shutil.ignore_patterns("checkpoints"))
    body = tokenizer_section(RunDir(tmp_path))
    held = len(json.loads((run_dir / "tokenizer/tokenizer_meta.json").read_text())["held_out_subjects"])
    assert f"codes used in {held} held-out scans" in body and len(images(body)) == 2


def test_an_empty_directory_gives_a_report_of_missing_stages(tmp_path):
    page = build_report(tmp_path, tmp_path / "r.html").read_text()
    assert set(statuses_of(page).values()) == {"missing"} and page.count("stage not run") >= len(SECTIONS)


def test_a_damaged_input_warns_and_keeps_the_rest(run_dir, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir / "cohorts", damaged / "cohorts")
    shutil.copytree(run_dir / "lm", damaged / "lm", ignore=shutil.ignore_patterns("cache", "checkpoints"))
    (damaged / "lm" / "eval.json").write_text("{not json")
    with pytest.warns(FmrilmWarning, match="Generated and true descriptions.*JSONDecodeError"):
        _, statuses = render_page(RunDir(damaged))
    assert statuses["generations"] == "failed" and statuses["cohorts"] == "ok"


def test_report_errors(tmp_path):
    with pytest.raises(FmrilmError, match="run directory .*nowhere does not exist"):
        build_report(tmp_path / "nowhere")
    with pytest.raises(FmrilmError, match="folder .*missing does not exist"):
        build_report(tmp_path, tmp_path / "missing" / "report.html")


# --------------------------------------------------------------------------------------- headless browser
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || (e.target && e.target.src) || e)), true);
window.addEventListener('load', () => {
  const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length;
  const remote = performance.getEntriesByType('resource').map(r => r.name).filter(n => !n.startsWith('data:'));
  document.documentElement.setAttribute('data-probe', JSON.stringify(
    {images: document.images.length, broken: broken, errors: window.__errors, remote: remote}));
});
</script>"""


def open_in_chromium(page: Path, work: Path) -> dict:
    """Load ``page`` (a copy with a probe script added) in headless Chromium once and return what it saw: image
    count, broken images, error events, non-data resource requests, console lines, and a 1200 x 2400 screenshot."""
    probed, shot = work / "probed.html", work / "screenshot.png"
    probed.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    command = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={work / 'profile'}", "--enable-logging=stderr", "--v=0",
               "--window-size=1200,2400", f"--screenshot={shot}", "--dump-dom", probed.as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    found = re.search(r'data-probe="([^"]*)"', done.stdout)
    assert found, f"chromium did not load the page: {done.stderr[-2000:]}"
    seen = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    seen["console"] = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    seen["screenshot"] = shot
    return seen


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium)")
def test_chromium_renders_every_image_without_errors(report, run_dir, tmp_path):
    import matplotlib.image

    seen = open_in_chromium(run_dir / "report.html", tmp_path)
    assert seen["images"] == 9 and seen["broken"] == 0, seen
    assert seen["errors"] == [] and seen["remote"] == [] and seen["console"] == [], seen
    pixels = matplotlib.image.imread(seen["screenshot"])
    assert pixels.shape[:2] == (2400, 1200) and pixels.std() > 0.05  # a rendered page, not a blank one


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium)")
def test_chromium_check_catches_a_broken_image_and_a_console_error(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head></head><body><img src="data:image/png;base64,AAAA">'
                    "<script>console.error('boom')</script></body></html>")
    seen = open_in_chromium(page, tmp_path)
    assert seen["broken"] == 1 and seen["errors"] and any("boom" in line for line in seen["console"])
