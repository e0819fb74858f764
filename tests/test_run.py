"""``fmrilm run``: a tiny configuration end to end, skipping by hash, reruns of what changed, --set, every error.

One module run (prepare + describe + tokenizer on a 12-scan, 11-ROI cohort brought as ROI files, the tiny random
GPT-2) is shared; tests that change it work on a copy of its folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import write_scans
from fmrilm.cli import main
from fmrilm.errors import FmrilmError
from fmrilm.run import STAGES, Progress, list_presets, load_config, parse_set, resolve, run_pipeline
from fmrilm.run_stages import RECORD_FILE, plan, read_record

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
TINY_TOKENIZER = {"hidden": 32, "heads": 4, "codebook_size": 64, "codebook_dim": 16, "decoder_layers": 1,
                  "shared_dim": 16, "domain_hidden": 32}
CONFIG = {
    "stages": ["prepare", "describe", "tokenizer"],
    "cohorts": {"toy": {"prepare": {"timeseries": "data/ts", "phenotypes": "data/participants.tsv",
                                    "atlas": "data/rois.csv", "tr": 2.0}}},
    "describe": {"ica_components": 4},
    "tokenizer": {"preset": "tiny", "llm": "tiny-gpt2", "overrides": TINY_TOKENIZER,
                  "train": {"epochs": 1, "batch_size": 4, "device": "cpu"}},
    "estimates": {"prepare": 2, "describe": 5, "tokenizer": 10},
}
OUTPUTS = {"prepare/toy": "cohorts/toy", "describe/toy": "descriptors/toy", "tokenizer": "tokenizer"}
LATER = {"stages": list(STAGES),  # Stages 2-3 and the benchmark, tiny
         "align": {"llm": "tiny-llama", "max_text_tokens": 48, "n_generate": 2,
                   "train": {"epochs": 1, "batch_size": 4}},
         "instruct": {"paradigms": ["single"], "train": {"epochs": 1, "batch_size": 4}},
         "benchmark": {"methods": ["fc_logreg"], "seeds": 2, "shots": [2]}}


def write_inputs(root: Path) -> Path:
    """ROI files of 12 subjects (11 ROIs, 170-181 points at TR 2 s), participants.tsv, an ROI table, a config."""
    subjects = [f"s{i:02d}" for i in range(12)]
    write_scans(root / "data" / "ts", subjects, n_time=(170, 181, 175))
    pd.DataFrame({"participant_id": subjects, "sex": ["M", "F"] * 6, "age": range(30, 42)}).to_csv(
        root / "data" / "participants.tsv", sep="\t", index=False)
    pd.DataFrame({"name": [f"roi{i}" for i in range(11)], "network": ["Vis"] * 6 + ["Default"] * 5}).to_csv(
        root / "data" / "rois.csv", index=False)
    (root / "run.yaml").write_text(yaml.safe_dump(CONFIG))
    return root / "run.yaml"


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    config_file = write_inputs(root)
    lines = []
    status = run_pipeline(load_config(config_file), root / "out", echo=lines.append)
    return {"root": root, "config": config_file, "out": root / "out", "status": status, "lines": lines}


def copy_run(first, tmp_path) -> tuple[Path, Path]:
    """The configuration and a copy of the finished run folder (which stays up to date where it is moved)."""
    shutil.copytree(first["out"], tmp_path / "out", symlinks=True)
    return first["config"], tmp_path / "out"


def rerun(config_file: Path, out: Path, sets=(), **kwargs) -> dict:
    return run_pipeline(load_config(config_file, list(sets)), out, echo=lambda line: None, **kwargs)


# ------------------------------------------------------------------------------------------ end to end
def test_first_run_writes_every_stage_output_with_its_record(first):
    out = first["out"]
    assert first["status"] == {name: "ran" for name in OUTPUTS}
    resolved = json.loads((out / "config.resolved.json").read_text())
    assert resolved == load_config(first["config"])
    for name, folder in OUTPUTS.items():
        record = read_record(out / folder)
        assert record["unit"] == name and len(record["hash"]) == 64 and record["config"] == resolved
        assert record["seconds"] >= 0 and record["cpu_seconds"] >= 0
    assert (out / "descriptors" / "toy" / "texts.jsonl").is_file()
    assert (out / "tokenizer" / "tokenizer_meta.json").is_file()
    # the tokenizer's record names the hashes of the cohort and descriptors it was trained on
    inputs = read_record(out / "tokenizer")["inputs"]
    assert inputs == {"describe/toy": read_record(out / "descriptors" / "toy")["hash"],
                      "prepare/toy": read_record(out / "cohorts" / "toy")["hash"]}
    assert not [p for p in out.rglob("*tmp-*")]  # no temporary folder left behind


def test_progress_lines_name_stage_i_of_n_elapsed_and_remaining(first):
    starts = [line for line in first["lines"] if line.startswith("[stage")]
    assert [s.split("]")[0] for s in starts] == ["[stage 1/3 prepare", "[stage 2/3 describe", "[stage 3/3 tokenizer"]
    assert all("elapsed" in s and "remaining ~" in s for s in starts)
    assert first["lines"][-1].startswith("finished in")


def test_second_run_skips_every_stage_and_touches_nothing(first):
    out = first["out"]
    before = {f: (out / f / RECORD_FILE).stat().st_mtime_ns for f in OUTPUTS.values()}
    assert rerun(first["config"], out) == {name: "skipped" for name in OUTPUTS}
    assert before == {f: (out / f / RECORD_FILE).stat().st_mtime_ns for f in OUTPUTS.values()}


def test_changing_one_setting_reruns_that_stage_and_those_after_it_only(first, tmp_path):
    config_file, out = copy_run(first, tmp_path)
    assert rerun(config_file, out) == {name: "skipped" for name in OUTPUTS}  # the moved copy is up to date
    status = rerun(config_file, out, ["describe.top_k=2"], overwrite=True)
    assert status == {"prepare/toy": "skipped", "describe/toy": "ran", "tokenizer": "ran"}
    status = rerun(config_file, out, ["describe.top_k=2", "describe.jobs=2"], overwrite=True)  # speed, not output
    assert set(status.values()) == {"skipped"}


def test_changing_a_late_setting_reruns_that_stage_alone(first, tmp_path):
    config_file, out = copy_run(first, tmp_path)
    status = rerun(config_file, out, ["tokenizer.train.lr=1e-3"], overwrite=True)
    assert status == {"prepare/toy": "skipped", "describe/toy": "skipped", "tokenizer": "ran"}
    assert read_record(out / "tokenizer")["settings"]["train"]["lr"] == 0.001


def test_a_changed_input_file_reruns_prepare_and_a_stage_subset_runs_alone(first, tmp_path):
    config_file, out = copy_run(first, tmp_path)
    table = config_file.parent / "data" / "participants.tsv"
    text, stat = table.read_text(), table.stat()
    try:
        table.write_text(text.replace("\t30\n", "\t31\n"))  # same size: only the modification time tells
        assert rerun(config_file, out, stages=["prepare", "describe"]) == {"prepare/toy": "ran", "describe/toy": "ran"}
        assert rerun(config_file, out, stages=["describe"]) == {"describe/toy": "skipped"}
    finally:  # the module's shared run stays up to date
        table.write_text(text)
        os.utime(table, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_cli_run_skips_and_reports_errors_on_one_line(first, tmp_path, capsys):
    config_file, out = copy_run(first, tmp_path)
    assert main(["run", str(config_file), "--out", str(out)]) == 0
    assert "up to date, skipped" in capsys.readouterr().out
    assert main(["run", str(config_file), "--out", str(out), "--set", "describe.top_k=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "different configuration" in err and "describe.top_k" in err


def test_plan_chains_the_later_stages_cohorts_tasks_and_inputs(first):
    config, out = resolve({**CONFIG, **LATER}, base=first["root"]), first["root"] / "planned"
    units = {u.name: u for u in plan(config, out, list(STAGES))}
    assert list(units) == ["prepare/toy", "describe/toy", "tokenizer", "align", "instruct", "evaluate/toy",
                           "benchmark", "report"]
    assert units["align"].settings["cohort"] == "toy" and units["align"].inputs[-1] == out / "tokenizer"
    assert units["instruct"].settings["cohorts"] == ["toy"] and out / "lm" in units["instruct"].inputs
    assert units["evaluate/toy"].settings["tasks"] == ["sex"]
    assert units["benchmark"].settings["tasks"] == {"toy": ["sex"]} and units["benchmark"].settings["with_fmrilm"]
    assert out / "evaluate" / "toy" in units["benchmark"].inputs
    # a benchmark task fMRI-LM was not evaluated on: baselines only, not waiting for evaluate
    config["benchmark"]["tasks"] = ["sex", "age"]
    bench = plan(config, out, ["benchmark"])[0]
    assert not bench.settings["with_fmrilm"] and out / "evaluate" / "toy" not in bench.inputs


@pytest.mark.slow
def test_every_stage_end_to_end_on_tiny_models(first, tmp_path):
    """About 25 s after the module's run (imports warm), up to 90 s alone, on the loaded 2-core CPU."""
    config_file = tmp_path / "full.yaml"
    full = {**CONFIG, **LATER, "cohorts": {"toy": {"prepare": {**CONFIG["cohorts"]["toy"]["prepare"]}, "check": "sex"}}}
    for key, value in full["cohorts"]["toy"]["prepare"].items():
        if key != "tr":
            full["cohorts"]["toy"]["prepare"][key] = str(first["root"] / value)
    config_file.write_text(yaml.safe_dump(full))
    status = rerun(config_file, tmp_path / "out")
    assert status == {name: "ran" for name in status} and len(status) == 8
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    # the calibrated answers and, for comparison, the raw ones (fmrilm.instruct.calibration)
    assert {(r["method"], r["cohort"]) for r in rows} == {("fmrilm", "toy"), ("fmrilm (uncalibrated)", "toy"),
                                                           ("fc_logreg", "toy")}
    assert (tmp_path / "out" / "report.html").is_file() and (tmp_path / "out" / "instruct" / "instruct.json").is_file()
    assert json.loads((tmp_path / "out" / "descriptors" / "toy" / "check_sex.json").read_text())["target"] == "sex"
    second = rerun(config_file, tmp_path / "out")
    assert second == {**{name: "skipped" for name in status}, "report": "ran"}  # the report is always rebuilt


def test_an_existing_cohort_is_linked_fingerprinted_and_described(first, tmp_path):
    cohort = tmp_path / "mine"
    shutil.copytree(first["out"] / "cohorts" / "toy", cohort)
    config = resolve({"cohorts": {"mine": {"path": str(cohort)}}, "describe": {"ica_components": 4},
                      "stages": ["prepare", "describe"]})
    assert run_pipeline(config, tmp_path / "out", echo=lambda line: None) == {"describe/mine": "ran"}
    assert (tmp_path / "out" / "cohorts" / "mine").resolve() == cohort.resolve()  # the layout is complete
    assert run_pipeline(config, tmp_path / "out", echo=lambda line: None) == {"describe/mine": "skipped"}
    os.utime(cohort / "meta.json", ns=(1, 1))  # the user's cohort changed
    assert run_pipeline(config, tmp_path / "out", echo=lambda line: None) == {"describe/mine": "ran"}


def test_report_command_calls_the_report_builder(tmp_path, monkeypatch, capsys):
    import fmrilm.report

    monkeypatch.setattr(fmrilm.report, "build_report", lambda run_dir: Path(run_dir) / "report.html")
    assert main(["report", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'report.html'}"


def test_demo_refuses_an_unknown_preset(tmp_path):
    from fmrilm.demo import run_demo

    with pytest.raises(FmrilmError, match=r"unknown demo preset 'huge'; choose one of quick, standard"):
        run_demo(tmp_path / "demo", preset="huge")


# ------------------------------------------------------------------------------------------ configuration
def test_set_values_are_typed_by_yaml():
    assert parse_set("describe.top_k=3") == (["describe", "top_k"], 3)
    assert parse_set("tokenizer.train.lr=1e-3") == (["tokenizer", "train", "lr"], 1e-3)
    assert parse_set("stages=[prepare, describe]") == (["stages"], ["prepare", "describe"])
    assert parse_set("align.lora=false") == (["align", "lora"], False)
    assert parse_set("tokenizer.llm=tiny-llama") == (["tokenizer", "llm"], "tiny-llama")


def test_set_overrides_the_file_and_paths_are_taken_from_the_config_folder(first):
    config = load_config(first["config"], ["describe.jobs=2", "cohorts.toy.describe.top_k=1"])
    assert config["describe"]["jobs"] == 2 and config["cohorts"]["toy"]["describe"] == {"top_k": 1}
    assert config["cohorts"]["toy"]["prepare"]["timeseries"] == str(first["root"] / "data" / "ts")
    assert config["cohorts"]["toy"]["prepare"]["atlas"] == str(first["root"] / "data" / "rois.csv")
    assert config["align"]["lora"] is True  # defaults fill what the file leaves out
    short = resolve({"cohorts": {"ukb": {"simulate": "ukb"}, "adni": {"simulate": {"subjects": 20}}}})["cohorts"]
    assert short["ukb"]["simulate"]["preset"] == "ukb" and short["adni"]["simulate"]["preset"] == "adni"
    assert short["adni"]["simulate"]["subjects"] == 20 and short["adni"]["simulate"]["seed"] == 0


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_resolves(name):
    config = load_config(name)
    assert config["cohorts"] and set(config["estimates"]) >= set(config["stages"])


def test_progress_scales_the_remaining_estimate_by_the_finished_stages():
    lines = []
    progress = Progress(["prepare", "describe"], {"prepare": 10, "describe": 30}, lines.append)
    assert 29 < progress.remaining() <= 40
    progress.took["prepare"] = (20.0, True)  # took twice its estimate: the rest should too
    assert 59 < progress.remaining() <= 60
    progress.start("describe")
    assert lines[0].startswith("[stage 2/2 describe] elapsed") and "remaining ~0:01:0" in lines[0]


# ------------------------------------------------------------------------------------------ errors
def test_missing_config_file_is_refused(tmp_path):
    with pytest.raises(FmrilmError, match=r"configuration .*nope.yaml not found; give a YAML or JSON file or a preset"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("cohorts:\n  toy: {path: x\ndescribe: {}\n")
    with pytest.raises(FmrilmError, match=r"bad.yaml line 3: invalid YAML"):
        load_config(path)


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "cohorts": {},\n  "describe": {"jobs": 2,}\n}\n')
    with pytest.raises(FmrilmError, match=r"bad.json line 3: invalid JSON"):
        load_config(path)


def test_a_config_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- prepare\n- describe\n")
    with pytest.raises(FmrilmError, match="must hold a mapping of settings"):
        load_config(path)


@pytest.mark.parametrize("config, message", [
    ({"descibe": {}}, r"unknown key 'descibe'; allowed keys: description, stages, estimates, cohorts, prepare"),
    ({"describe": {"icacomponents": 3}}, r"unknown key 'describe.icacomponents'; allowed keys in describe: density"),
    ({"tokenizer": {"train": {"epoch": 1}}}, r"unknown key 'tokenizer.train.epoch'; allowed keys in tokenizer.train"),
    ({"stages": ["prepare", "tokeniser"]}, r"unknown stage 'tokeniser' in stages; allowed stages are prepare,"),
    ({"cohorts": {"a": {"path": "x", "sample": "hcp"}}}, r"cohorts.a needs exactly one source"),
    ({"cohorts": {"a": {"sample": "ukb"}}}, r"cohorts.a.sample 'ukb' is unknown; allowed: hcp"),
    ({"cohorts": {"a": {"path": "x", "describe": {"top": 2}}}}, r"unknown key 'cohorts.a.describe.top'"),
    ({"cohorts": {"a": {"simulate": {"subject": 5}}}}, r"unknown key 'cohorts.a.simulate.subject'; allowed keys"),
    ({"cohorts": {"a": {"prepare": {"timeseries": "x", "atlass": "y"}}}}, r"unknown key 'cohorts.a.prepare.atlass'"),
    ({"describe": 3}, r"describe must be a mapping of settings"),
    ({"cohorts": {"../up": {"path": "x"}}}, r"cohort name '../up' must be a plain folder name"),
    ({"cohorts": {"a": {"simulate": "ukb", "sample": "hcp"}}}, r"cohorts.a needs exactly one source"),
])
def test_unknown_or_invalid_keys_are_refused_with_the_allowed_ones(config, message):
    with pytest.raises(FmrilmError, match=message):
        resolve(config)


@pytest.mark.parametrize("item, message", [
    ("describe.jobs", r"--set 'describe.jobs' is not KEY=VALUE"),
    ("describe..jobs=2", r"--set 'describe..jobs=2' is not KEY=VALUE"),
    ("=2", r"is not KEY=VALUE"),
    ("describe.jobs=[1", r"the value is not valid YAML"),
])
def test_bad_set_syntax_is_refused(item, message):
    with pytest.raises(FmrilmError, match=message):
        parse_set(item)


def test_set_below_a_value_and_unknown_set_keys_are_refused(first):
    with pytest.raises(FmrilmError, match=r"describe.jobs takes a value \(like 1\), not settings \{'n': 2\}"):
        load_config(first["config"], ["describe.jobs.n=2"])
    with pytest.raises(FmrilmError, match=r"--set 'describe.ica_components.n=2': ica_components holds a value"):
        load_config(first["config"], ["describe.ica_components.n=2"])
    with pytest.raises(FmrilmError, match=r"unknown key 'describe.job'; allowed keys in describe"):
        load_config(first["config"], ["describe.job=2"])


def test_unknown_stage_on_the_command_line_is_refused(first, tmp_path):
    with pytest.raises(FmrilmError, match=r"unknown stage 'tokeniser'; allowed stages are prepare"):
        run_pipeline(load_config(first["config"]), tmp_path / "o", stages=["tokeniser"])


def test_out_with_a_different_config_needs_overwrite(first):
    with pytest.raises(FmrilmError, match=r"holds a run with a different configuration \(describe.top_k: 3 before, "
                                          r"5 now\); pass --overwrite"):
        rerun(first["config"], first["out"], ["describe.top_k=5"])


def test_out_that_is_not_a_run_folder_or_a_file_is_refused(first, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FmrilmError, match=r"exists and is not an fmrilm run folder; choose another --out"):
        rerun(first["config"], tmp_path / "other")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FmrilmError, match=r"exists and is not a folder"):
        rerun(first["config"], tmp_path / "file")


def test_a_stage_whose_input_was_never_made_says_which_to_run(first, tmp_path):
    with pytest.raises(FmrilmError, match=r"stage describe needs .*cohorts/toy, which no earlier stage wrote"):
        rerun(first["config"], tmp_path / "fresh", stages=["describe"])


def test_unknown_stage_cohort_is_refused(first, tmp_path):
    with pytest.raises(FmrilmError, match=r"tokenizer.cohort 'ukb' is not a cohort of this configuration; choose "
                                          r"one of toy"):
        rerun(first["config"], tmp_path / "o", ["tokenizer.cohort=ukb"], stages=["tokenizer"])
    assert not (tmp_path / "o").exists()  # refused before anything is written
    with pytest.raises(FmrilmError, match=r"evaluate.cohorts 'adni' is not a cohort of this configuration"):
        rerun(first["config"], tmp_path / "o", ["evaluate.cohorts=[toy, adni]"], stages=["evaluate"])


# ------------------------------------------------------------------------------------------ acceptance
@pytest.mark.acceptance
@pytest.mark.needs_atlas
def test_quick_demo_writes_every_output(tmp_path):
    """The quick demo end to end (SmolLM2-135M; tens of minutes on a loaded 2-core CPU); run by hand with
    ``-m acceptance``. Prints the wall time of each stage output."""
    import time

    from fmrilm.demo import run_demo

    start = time.perf_counter()
    status = run_demo(tmp_path / "demo", preset="quick")
    assert set(status.values()) == {"ran"}
    out = tmp_path / "demo"
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {"fmrilm", "fc_logreg"} <= {r["method"] for r in rows}
    assert (out / "report.html").is_file()
    seconds = {r.parent.name: (json.loads(r.read_text())["seconds"], json.loads(r.read_text())["cpu_seconds"])
               for r in out.glob("**/" + RECORD_FILE)}
    print(seconds, f"wall {time.perf_counter() - start:.0f} s")
