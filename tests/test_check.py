"""The descriptor check: a planted effect shows up in the domain where it was planted."""

import json

import numpy as np
import pandas as pd
import pytest

from fmrilm.cli import main
from fmrilm.descriptors.check import descriptor_check, planted_domains
from fmrilm.errors import FmrilmError


def _table(n=120, seed=0):
    rng = np.random.default_rng(seed)
    sex = np.array(["M", "F"])[rng.integers(0, 2, n)]
    z = pd.DataFrame(rng.standard_normal((n, 8)), columns=["fc.pair.A.A", "fc.pair.A.B", "fg.g1.A", "fg.g1.range",
                                                           "ica.amplitude", "ica.amplitude.A", "graph.modularity", "graph.clustering"])
    z["fc.pair.A.B"] += 1.5 * (sex == "F")  # planted in fc only
    ids = [f"s{i:03d}" for i in range(n)]
    z.insert(0, "subject_id", ids)
    z.insert(0, "scan_id", ids)
    return z, pd.DataFrame({"subject_id": ids, "sex": sex, "age": rng.uniform(40, 80, n)})


def test_planted_domain_beats_chance_and_others_do_not():
    z, phenotypes = _table()
    result = descriptor_check(z, phenotypes, "sex", seeds=2).set_index("domain")
    assert result.loc["fc", "mean"] > 0.7 and result.loc["all", "mean"] > 0.7
    for domain in ("fg", "ica", "graph"):
        assert result.loc[domain, "mean"] < 0.62
    assert result.loc["fc", "metric"] == "accuracy" and 0.4 < result.loc["fc", "chance"] < 0.6


def test_continuous_target_reports_pearson_r():
    z, phenotypes = _table()
    z["graph.modularity"] = (phenotypes["age"] - 60) / 10 + 0.5 * z["graph.modularity"]
    result = descriptor_check(z, phenotypes, "age", seeds=1).set_index("domain")
    assert result.loc["graph", "metric"] == "pearson_r" and result.loc["graph", "mean"] > 0.8
    assert abs(result.loc["fg", "mean"]) < 0.3


def test_check_errors(tmp_path):
    z, phenotypes = _table(n=12)
    with pytest.raises(FmrilmError, match="target 'iq' is not a phenotype column"):
        descriptor_check(z, phenotypes, "iq")
    phenotypes.loc[:, "sex"] = ["M"] * 10 + ["F"] * 2
    with pytest.raises(FmrilmError, match="rarest class has fewer than 5 scans"):
        descriptor_check(z, phenotypes, "sex")
    with pytest.raises(FmrilmError, match="does not exist"):
        planted_domains(tmp_path / "none.json", "sex")


def test_planted_domains_read_simulation_json(tmp_path):
    path = tmp_path / "simulation.json"
    path.write_text(json.dumps({"effects": [{"target": "sex", "kind": "pair"}, {"target": "sex", "kind": "amplitude"},
                                            {"target": "age", "kind": "gradient"}]}))
    assert planted_domains(path, "sex") == {"fc", "ica"}
    assert planted_domains(path, "age") == {"fg"}


@pytest.mark.slow
@pytest.mark.needs_atlas
def test_every_planted_effect_shows_in_its_domain_on_a_simulated_ukb_cohort(tmp_path, capsys):
    """Issue acceptance: simulate -> prepare -> describe -> check on 200 subjects at 116 ROIs."""
    raw, cohort, desc = tmp_path / "raw", tmp_path / "cohort", tmp_path / "desc"
    assert main(["simulate", "--preset", "ukb", "--subjects", "200", "--atlas", "schaefer100_tian_s1", "--out", str(raw)]) == 0
    assert main(["prepare", "--timeseries", str(raw / "timeseries"), "--phenotypes", str(raw / "participants.tsv"),
                 "--atlas", "schaefer100_tian_s1", "--out", str(cohort)]) == 0
    assert main(["describe", str(cohort), "--out", str(desc), "--jobs", "2"]) == 0
    for target in ("sex", "age", "fluid_intelligence"):
        code = main(["check-descriptors", str(desc), "--cohort", str(cohort), "--target", target, "--simulation", str(raw / "simulation.json")])
        assert code == 0, capsys.readouterr().err
        rows = json.loads((desc / f"check_{target}.json").read_text())["rows"]
        assert any(row["planted"] for row in rows)
