"""Simulated cohorts: layout, determinism, BOLD realism, network structure, planted effects, oracle, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fmrilm.constants import SUBCORTICAL
from fmrilm.data.atlas import load_atlas
from fmrilm.data.readers import read_matrix
from fmrilm.data.simulate import list_presets, load_preset, scan_features, simulate_cohort
from fmrilm.errors import FmrilmError

pytestmark = pytest.mark.needs_atlas
ATLAS = "schaefer100_tian_s1"  # 116 ROIs: fast
PRESETS = ["abcd", "abide2", "adhd200", "adni", "hcp_aging", "ukb"]


def simulate(out: Path, preset: str = "adhd200", n: int = 8, seed: int = 0, **kwargs) -> dict:
    return simulate_cohort(preset, n, seed, out, atlas=ATLAS, **kwargs)


def read_outputs(out: Path) -> tuple[pd.DataFrame, dict]:
    table = pd.read_csv(out / "participants.tsv", sep="\t", dtype={"participant_id": str})
    return table, json.loads((out / "simulation.json").read_text())


def scan(out: Path, participant_id: str, fmt: str = "npy") -> np.ndarray:
    return read_matrix(out / "timeseries" / f"{participant_id[4:]}.{fmt}")


def network_index(record: dict) -> np.ndarray:
    rois = load_atlas(record["atlas"], with_image=False).rois
    return np.array([record["networks"].index(n) for n in rois["network"]])


@pytest.fixture(scope="module")
def sex_cohorts(tmp_path_factory) -> dict[float, Path]:
    """ABCD-like cohorts of 200 subjects with the planted effects on and off."""
    root = tmp_path_factory.mktemp("sex")
    runs = {scale: simulate(root / str(scale), "abcd", 200, seed=1, effect_scale=scale) for scale in (1.0, 0.0)}
    return {scale: Path(summary["out"]) for scale, summary in runs.items()}


def test_registry_lists_the_six_presets():
    assert list_presets() == PRESETS
    assert load_preset("adni")["targets"]["diagnosis"]["positive"] == "AD"


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_writes_the_documented_layout(tmp_path, preset):
    summary = simulate(tmp_path / "out", preset, n=7, seed=3)
    table, record = read_outputs(tmp_path / "out")
    assert summary["n_scans"] == len(table) == record["n_subjects"] == 7
    assert list(table.columns[:6]) == ["participant_id", "sex", "age", "site", "dataset", "tr"]
    assert set(record["tasks"]) - {"sex", "age"} <= set(table.columns)
    assert table["participant_id"].str.match(r"sub-[a-z]+\d{4}$").all() and set(table["sex"]) <= {"M", "F"}
    spec = load_preset(preset)
    assert table["age"].between(spec["age"]["min"], spec["age"]["max"]).all()
    sites = {s["name"]: s for s in record["sites"]}
    files = sorted(p.name for p in (tmp_path / "out" / "timeseries").iterdir())
    assert files == sorted(f"{pid[4:]}.npy" for pid in table["participant_id"])
    for pid, site, tr in zip(table["participant_id"], table["site"], table["tr"]):
        x = np.load(tmp_path / "out" / "timeseries" / f"{pid[4:]}.npy")
        assert x.dtype == np.float32 and x.shape == (sites[site]["length"], 116)
        assert tr == sites[site]["tr"] and 300 < x.mean() < 10000  # raw BOLD baseline, not demeaned
        assert sites[site]["length_at_target_tr"] >= 100
    assert set(summary["oracle"]) == set(record["tasks"]) == set(record["oracle"])


def test_presets_span_trs_and_lengths():
    sites = [s for name in PRESETS for s in load_preset(name)["sites"]]
    trs = [s["tr"] for s in sites]
    assert min(trs) == 0.72 and max(trs) == 3.0
    at_2s = [s["length"] * s["tr"] / 2.0 for s in sites]
    assert min(at_2s) >= 100 and sum(n < 160 for n in at_2s) >= 3
    for name in PRESETS:  # TR or length differs between sites of every preset
        assert len({(s["tr"], s["length"]) for s in load_preset(name)["sites"]}) > 1


def test_native_lengths_differ_by_site_and_match_the_site_table(tmp_path):
    simulate(tmp_path / "out", "abide2", n=24)
    table, record = read_outputs(tmp_path / "out")
    lengths = {pid: len(scan(tmp_path / "out", pid)) for pid in table["participant_id"]}
    assert len(set(lengths.values())) >= 3
    by_site = {s["name"]: s for s in record["sites"]}
    assert all(lengths[p] == by_site[s]["length"] for p, s in zip(table["participant_id"], table["site"]))
    assert sum(s["n_subjects"] for s in record["sites"]) == 24


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_text_formats_have_roi_header_and_match_npy(tmp_path, fmt):
    simulate(tmp_path / "npy", n=3)
    simulate(tmp_path / fmt, n=3, fmt=fmt)
    table, _ = read_outputs(tmp_path / fmt)
    pid = table["participant_id"][0]
    header = (tmp_path / fmt / "timeseries" / f"{pid[4:]}.{fmt}").read_text().splitlines()[0]
    names = list(load_atlas(ATLAS, with_image=False).rois["name"])
    assert header.split("," if fmt == "csv" else "\t") == names
    np.testing.assert_allclose(scan(tmp_path / fmt, pid, fmt), scan(tmp_path / "npy", pid), atol=1e-3)


def test_same_seed_identical_different_seed_different(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        simulate(tmp_path / name, "hcp_aging", n=4, seed=seed)
    files = [p.relative_to(tmp_path / "a") for p in sorted((tmp_path / "a").rglob("*")) if p.is_file()]
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert (tmp_path / "a" / files[-1]).read_bytes() != (tmp_path / "c" / files[-1]).read_bytes()
    assert not read_outputs(tmp_path / "a")[0].equals(read_outputs(tmp_path / "c")[0])


@pytest.mark.parametrize("preset, lag1_range", [("hcp_aging", (0.6, 0.92)), ("adni", (0.3, 0.65))])
def test_bold_like_spectrum_and_autocorrelation(tmp_path, preset, lag1_range):
    simulate(tmp_path / "out", preset, n=6)
    table, _ = read_outputs(tmp_path / "out")
    for pid, tr in zip(table["participant_id"], table["tr"]):
        x = scan(tmp_path / "out", pid)
        x = x - x.mean(0)
        freqs = np.fft.rfftfreq(len(x), tr)[1:]
        power = (np.abs(np.fft.rfft(x, axis=0)[1:]) ** 2).sum(1)
        assert power[freqs < 0.1].sum() / power.sum() > 0.6
        lag1 = np.mean((x[1:] * x[:-1]).sum(0) / (x * x).sum(0))
        assert lag1_range[0] < lag1 < lag1_range[1], (tr, lag1)


def test_within_network_exceeds_between_network_and_default_opposes_attention(sex_cohorts):
    table, record = read_outputs(sex_cohorts[1.0])
    index, nets = network_index(record), record["networks"]
    fc = np.mean([scan_features(scan(sex_cohorts[1.0], pid), index)[0] for pid in table["participant_id"][:20]], 0)
    cortical = [i for i, n in enumerate(nets) if n != SUBCORTICAL]
    block = fc[np.ix_(cortical, cortical)]
    assert np.diag(block).mean() > block[~np.eye(len(cortical), dtype=bool)].mean() + 0.08
    assert fc[nets.index("Default"), nets.index("DorsAttn")] < fc[nets.index("Default"), nets.index("Cont")]


def sex_accuracy(out: Path) -> float:
    """Cross-validated logistic regression on network-pair FC (36 features) of each scan."""
    table, record = read_outputs(out)
    index = network_index(record)
    upper = np.triu_indices(len(record["networks"]))
    features = np.array([scan_features(scan(out, pid), index)[0][upper] for pid in table["participant_id"]])
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=1000))
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    return cross_val_score(model, features, table["sex"] == "F", cv=folds).mean()


def test_planted_sex_effect_is_learnable_and_absent_at_scale_zero(sex_cohorts):
    with_effect, without = sex_accuracy(sex_cohorts[1.0]), sex_accuracy(sex_cohorts[0.0])
    assert with_effect > 0.62 and without < 0.6 and with_effect - without > 0.08


def test_oracle_is_between_chance_and_perfect_and_effects_are_documented(sex_cohorts):
    _, record = read_outputs(sex_cohorts[1.0])
    oracle = record["oracle"]["sex"]
    assert oracle["metric"] == "accuracy" and oracle["chance"] < oracle["value"] < 1
    for effect in record["effects"]:
        assert effect["applied_size"] == effect["size"] and effect["units"].endswith("female minus male")
        assert np.sign(effect["measured_slope"]) == np.sign(effect["size"])
    _, null = read_outputs(sex_cohorts[0.0])
    assert all(e["applied_size"] == 0 and e["direction"] == "none" for e in null["effects"])


def test_continuous_oracle_is_a_positive_correlation(tmp_path):
    summary = simulate(tmp_path / "out", "hcp_aging", n=80, seed=2)
    _, record = read_outputs(tmp_path / "out")
    assert record["oracle"]["age"]["metric"] == "pearson_r"
    assert all(0 < summary["oracle"][task] < 1 for task in ("age", "fluid_composite"))


def test_template_source_follows_use_hcp_fc(tmp_path):
    simulate(tmp_path / "blocks", n=2, use_hcp_fc=False)
    assert read_outputs(tmp_path / "blocks")[1]["template"] == "network_blocks"
    assert read_outputs(tmp_path / "blocks")[0].shape[0] == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"preset": "hcp"}, "unknown simulation preset 'hcp'; choose one of abcd"),
        ({"n_subjects": 1}, "n_subjects must be an integer >= 2, got 1"),
        ({"n_subjects": 2.5}, "n_subjects must be an integer >= 2, got 2.5"),
        ({"n_subjects": True}, "n_subjects must be an integer"),
        ({"fmt": "xlsx"}, "unknown time-series format 'xlsx'; use one of npy, csv, tsv"),
        ({"effect_scale": -1.0}, "effect_scale must be a finite number >= 0"),
        ({"seed": -3}, "seed must be a non-negative integer"),
    ],
)
def test_user_errors_name_the_value_and_the_fix(tmp_path, kwargs, match):
    args = {"preset": "adhd200", "n_subjects": 4, "seed": 0, "out": tmp_path / "out", "atlas": ATLAS, **kwargs}
    with pytest.raises(FmrilmError, match=match):
        simulate_cohort(**args)
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_untouched_then_replaced_with_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FmrilmError, match="already exists; choose another --out or pass --overwrite"):
        simulate(out, n=2)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    simulate(out, n=2, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "simulation.json").is_file()


def test_preset_file_with_missing_key_is_refused(tmp_path):
    spec = load_preset("abcd")
    del spec["sites"]
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(FmrilmError, match="mine.json: missing key 'sites'"):
        simulate(tmp_path / "out", str(path), n=2)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda s: s["effects"].append({"target": "sex", "kind": "pair", "networks": ["Vis"], "size": 0.1}),
         "pair effect .* needs exactly 2 networks"),
        (lambda s: s["effects"].append({"target": "sex", "kind": "pair", "networks": ["Vis", "Auditory"], "size": 0.1}),
         r"names networks \['Auditory'\] absent from the atlas"),
        (lambda s: s["targets"]["flanker"].update(depends_on={"iq": 0.3}), r"depends on \['iq'\]; use age"),
        (lambda s: s["effects"].append({"target": "sex", "kind": "twist", "size": 0.1}), "effect kind must be one of"),
    ],
)
def test_invalid_preset_content_is_refused(tmp_path, edit, match):
    spec = load_preset("hcp_aging")
    edit(spec)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(FmrilmError, match=match):
        simulate(tmp_path / "out", str(path), n=2)
    assert not (tmp_path / "out").exists()
