"""Descriptor text: levels, templates, the parse round trip, the rewording check, and semantic leakage."""

from __future__ import annotations

import math
import random
import re

import numpy as np
import pandas as pd
import pytest

from fmrilm.descriptors import semantic, text
from fmrilm.descriptors.common import DESCRIPTORS, DOMAINS, network_pairs
from fmrilm.errors import FmrilmError

YEO = ["Vis", "SomMot", "DorsAttn", "SalVentAttn", "Limbic", "Cont", "Default", "Subcortical"]
LOBES = ["Frontal", "Temporal", "Parietal", "Occipital", "Cerebellum"]
NETWORK_MEASURES = ["fg.g1", "fg.g2", "fg.g3", "ica.amplitude", "ica.variability", "ica.spectral_ratio", "ica.fALFF", "graph.strength"]
GLOBALS = [d["columns"] for d in DESCRIPTORS if d["kind"] == "global"]


def nudge(z: float) -> float:
    """Keep z away from the thresholds by more than the printed rounding, so level(z) == level(round(z))."""
    for edge in (1.0, 2.0):
        if abs(abs(z) - edge) < 0.01:
            return z + math.copysign(0.02, z)
    return z


def make_z(rng: np.random.Generator, nets=YEO, nan_fraction: float = 0.0, scale: float = 1.3) -> dict[str, float]:
    z = {}
    for a, b in network_pairs(list(nets)):
        z[f"fc.pair.{a}.{b}"] = rng.normal() * scale
        z[f"ica.fnc.{a}.{b}"] = rng.normal() * scale
    z.update({f"{m}.{n}": rng.normal() * scale for m in NETWORK_MEASURES for n in nets})
    z.update({g: rng.normal() * scale for g in GLOBALS})
    return {k: (math.nan if rng.random() < nan_fraction else nudge(v)) for k, v in z.items()}


def check_facts(parsed: dict, z: dict, decimals: int = 2) -> None:
    for column, (level, direction, value) in parsed.items():
        assert column in z, column
        assert (level, direction) == text.level(z[column]), (column, parsed[column], z[column])
        if value is not None:
            assert value == round(z[column], decimals), (column, value, z[column])


# ------------------------------------------------------------------------------------------------ levels
@pytest.mark.parametrize("z, expected", [
    (2.5, ("markedly", "higher")), (-2.0001, ("markedly", "lower")), (2.0, ("somewhat", "higher")),
    (-2.0, ("somewhat", "lower")), (1.0001, ("somewhat", "higher")), (1.0, ("typical", None)), (-1.0, ("typical", None)),
    (0.0, ("typical", None)), (math.nan, ("unavailable", None)), (math.inf, ("unavailable", None)),
])
def test_level_thresholds(z, expected):
    assert text.level(z) == expected


def test_level_uses_config_thresholds():
    config = text.TextConfig(markedly=3.0, somewhat=0.5)
    assert text.level(2.5, config) == ("somewhat", "higher") and text.level(-0.6, config) == ("somewhat", "lower")


@pytest.mark.parametrize("kwargs, match", [
    ({"markedly": 1.0, "somewhat": 2.0}, "somewhat < markedly"), ({"somewhat": -1.0}, "somewhat < markedly"),
    ({"markedly": math.nan}, "somewhat < markedly"), ({"top_k": 0}, "top_k"), ({"top_k": 2.5}, "top_k"),
    ({"decimals": -1}, "decimals"), ({"decimals": 7}, "from 0 to 6"), ({"max_network_sentences": 0}, "max_network_sentences"),
    ({"top_k": True}, "top_k"),
])
def test_text_config_validation(kwargs, match):
    with pytest.raises(FmrilmError, match=match):
        text.TextConfig(**kwargs)


# ---------------------------------------------------------------------------------------------- describe
def test_every_sentence_type_and_domain_present():
    z = make_z(np.random.default_rng(0))
    sentences = text.sentences(z, seed=3)
    assert list(sentences) == [d["name"] for d in DESCRIPTORS]
    domains = text.describe(z, seed=3)
    assert list(domains) == list(DOMAINS) and all(domains.values())
    for d in DESCRIPTORS:
        assert sentences[d["name"]] in domains[d["domain"]]
        assert sentences[d["name"]][0].isupper() and sentences[d["name"]].endswith(".")


def test_same_seed_same_text_other_seed_other_words_same_facts():
    z = make_z(np.random.default_rng(1))
    raw = {k: 0.1 * i for i, k in enumerate(z)}
    first, again, other = (text.describe(z, raw, seed=s) for s in (5, 5, 6))
    assert first == again and first != other
    columns = list(z)
    assert text.parse(text.paragraph(first), columns) == text.parse(text.paragraph(other), columns)


@pytest.mark.parametrize("scale, sign", [(1.6, None), (0.3, None), (1.5, 1)])
def test_at_least_five_variants_per_sentence_type(scale, sign):
    z = make_z(np.random.default_rng(2), scale=scale)
    if sign:  # every pair above the mean: exercises the "no pair is reduced" sentence
        z = {k: abs(v) for k, v in z.items()}
    seen: dict[str, set[str]] = {}
    for seed in range(80):
        for name, sentence in text.sentences(z, seed=seed).items():
            seen.setdefault(name, set()).add(sentence)
    assert set(seen) == {d["name"] for d in DESCRIPTORS}
    assert {name: len(v) for name, v in seen.items() if len(v) < 5} == {}


def test_unavailable_global_has_five_variants():
    seen = {text.sentences({"graph.modularity": math.nan}, seed=s)["modularity"] for s in range(60)}
    assert len(seen) >= 5 and all("unavailable" in s for s in seen)


@pytest.mark.parametrize("value, pattern", [
    (2.5, r"markedly (higher|elevated|increased|above)"), (-2.5, r"markedly (lower|reduced|decreased|below)"),
    (1.5, r"somewhat (higher|elevated|increased|above)"), (-1.2, r"somewhat (lower|reduced|decreased|below)"),
])
def test_direction_words_follow_the_sign(value, pattern):
    for seed in range(20):
        graph = text.describe({"graph.modularity": value}, seed=seed)["graph"]
        assert re.search(pattern, graph), graph
        assert f"z = {value:.2f}" in graph
        assert not re.search(r"(higher|elevated|increased|lower|reduced|decreased)", re.sub(pattern, "", graph))


def test_connectivity_directions_and_typical_without_number():
    for seed in range(20):
        fc = text.describe({"fc.mean": -1.5, "fc.pair.Default.Vis": 2.31, "fc.pair.Vis.Vis": 0.2}, seed=seed)["fc"]
        assert re.search(r"somewhat (weaker|reduced|decreased)", fc) and "z = -1.50" in fc
        assert re.search(r"markedly (stronger|elevated|increased)", fc) and "default mode and visual" in fc
        assert "z = 0.20" in fc  # named by the ranked sentence only
    typical = text.describe({"graph.clustering": 0.4}, seed=1)["graph"]
    assert "typical" in typical and "z =" not in typical


def test_numbers_are_printed_as_computed():
    config = text.TextConfig(decimals=3, max_network_sentences=40)
    z = make_z(np.random.default_rng(3))
    paragraph = text.paragraph(text.describe(z, seed=0, config=config))
    printed = re.findall(r"z = (-?\d+\.\d+)\)", paragraph) + re.findall(r"z = (-?\d+\.\d+);", paragraph)
    assert printed and all(len(p.split(".")[1]) == 3 for p in printed)
    rounded = {f"{v:.3f}" for v in z.values()}
    assert set(printed) <= rounded


def test_raw_values_printed_for_deviating_globals_only():
    z = {"graph.modularity": 2.5, "graph.clustering": 0.1}
    graph = text.describe(z, {"graph.modularity": 0.5234, "graph.clustering": 0.2}, seed=0)["graph"]
    assert "value 0.523" in graph and "0.2" not in graph


def test_nan_handling():
    z = {f"graph.strength.{n}": 0.1 for n in YEO} | {"graph.strength.Limbic": math.nan, "graph.strength.Vis": 2.4,
                                                      "graph.modularity": None, "graph.clustering": pd.NA, "fc.pair.Default.Vis": math.nan,
                                                      "fc.pair.Vis.Vis": 1.5, "fg.g1.Vis": math.nan, "fg.g1.Default": math.nan}
    domains = text.describe(z, seed=0)
    assert "unavailable for the limbic network" in domains["graph"]
    assert "unavailable" in domains["fc"] and "unavailable for every network" in domains["fg"]
    parsed = text.parse(text.paragraph(domains), z)
    assert parsed["graph.strength.Limbic"] == ("unavailable", None, None)
    assert parsed["graph.modularity"] == parsed["graph.clustering"] == ("unavailable", None, None)
    assert parsed["fc.pair.Default.Vis"] == ("unavailable", None, None)
    assert parsed["fg.g1.Default"] == ("unavailable", None, None)
    assert parsed["graph.strength.Vis"] == ("markedly", "higher", 2.4)
    assert parsed["graph.strength.Default"] == ("typical", None, None)


def test_missing_domains_are_empty_and_other_keys_ignored():
    domains = text.describe({"graph.modularity": 1.5, "scan_id": "s1", "qc.motion": 0.3})
    assert domains["fc"] == domains["fg"] == domains["ica"] == "" and domains["graph"]
    assert text.paragraph(domains) == domains["graph"]


def test_paragraph_joins_in_fixed_order():
    assert text.paragraph({"graph": "D.", "fc": "A.", "ica": "C.", "fg": "B."}) == "A. B. C. D."
    assert text.paragraph({"ica": "C.", "fc": ""}) == "C."


@pytest.mark.parametrize("call, match", [
    (lambda: text.describe({"fc.pair.Default.and": 1.0}), "cannot be written unambiguously"),
    (lambda: text.describe({"graph.strength.visual": 1.0}), "cannot be written unambiguously"),
    (lambda: text.describe({"graph.strength.two words": 1.0}), "cannot be written unambiguously"),
    (lambda: text.describe({"graph.modularity": "high"}), "is not a number"),
    (lambda: text.describe({"graph.modularity": 1.0}, {"graph.modularity": "x"}), "is not a number"),
    (lambda: text.describe({"graph.modularity": 1.0}, seed="1"), "seed"),
    (lambda: text.paragraph({"fmri": "x"}), "unknown domain"),
    (lambda: text.reword("x", endpoint="ftp://host/v1"), "http"),
])
def test_user_errors(call, match):
    with pytest.raises(FmrilmError, match=match):
        call()


# ------------------------------------------------------------------------------------------------- parse
def test_parse_round_trip_recovers_every_column():
    rng = np.random.default_rng(4)
    for trial in range(40):
        nets = list(rng.choice(YEO + LOBES, size=int(rng.integers(2, 9)), replace=False))
        z = make_z(rng, nets, nan_fraction=0.05 if trial % 3 == 0 else 0.0)
        config = text.TextConfig(max_network_sentences=100, top_k=int(rng.integers(1, 5)))
        parsed = text.parse(text.paragraph(text.describe(z, seed=trial, config=config)), z, config)
        check_facts(parsed, z)
        assert set(parsed) == set(z), sorted(set(z) - set(parsed))[:5]
        assert all(parsed[c][2] is not None for c in z if text.level(z[c])[0] in ("markedly", "somewhat"))


def test_parse_round_trip_with_default_limits():
    rng = np.random.default_rng(5)
    for trial in range(40):
        z = make_z(rng, nan_fraction=0.03)
        paragraph = text.paragraph(text.describe(z, seed=trial))
        check_facts(text.parse(paragraph, z), z)
        named = text.parse(paragraph)  # no column list: only what is named explicitly
        check_facts(named, z)
        assert set(GLOBALS) <= set(named)


def test_parse_tolerates_order_missing_and_foreign_sentences():
    z = make_z(np.random.default_rng(6))
    full = text.parse(text.paragraph(text.describe(z, seed=2)), z)
    parts = re.split(r"(?<=\.)\s+", text.paragraph(text.describe(z, seed=2)))
    random.Random(0).shuffle(parts)
    kept = parts[::2] + ["The weather was fine.", "Nothing else of note."]
    partial = text.parse(" ".join(kept), z)
    assert partial and set(partial) < set(full)
    assert all(full[c] == v for c, v in partial.items())


def test_parse_reads_lenient_spacing_and_unicode_minus():
    parsed = text.parse("The modularity is markedly lower (z=\u22122.50). Node strength is somewhat higher in "
                        "the Frontal network ( z = 1.5 ); the rest are typical.", ["graph.strength.Frontal", "graph.strength.Default"])
    assert parsed == {"graph.modularity": ("markedly", "lower", -2.5), "graph.strength.Frontal": ("somewhat", "higher", 1.5),
                      "graph.strength.Default": ("typical", None, None)}
    pairs = text.parse("Functional connectivity is markedly stronger between the Visual and the Default Mode networks "
                       "(z = 2.2) and within the typical range elsewhere.")
    assert pairs == {"fc.pair.Default.Vis": ("markedly", "higher", 2.2)}


def test_word_counts_stay_bounded():
    rng = np.random.default_rng(7)
    for seed in range(10):
        for domain, paragraph in text.describe(make_z(rng, scale=1.0), seed=seed).items():
            assert 25 <= len(paragraph.split()) <= 300, (domain, paragraph)


# -------------------------------------------------------------------------------------------- rewording
def test_accept_rewrite_checks_every_fact():
    z = make_z(np.random.default_rng(8))
    original = text.paragraph(text.describe(z, seed=0))
    faithful = re.split(r"(?<=\.)\s+", text.paragraph(text.describe(z, seed=11)))
    faithful.reverse()  # other templates, other order: the same facts
    assert text.accept_rewrite(original, " ".join(faithful))
    number = re.search(r"z = (-?\d+\.\d+)", original)
    changed = original.replace(number.group(0), f"z = {float(number.group(1)) + 0.5:.2f}", 1)
    assert not text.accept_rewrite(original, changed)
    word = re.search(r"(markedly|somewhat) (higher|lower|elevated|reduced|increased|decreased|stronger|weaker)", original)
    opposite = dict(zip("higher lower elevated reduced increased decreased stronger weaker".split(),
                        "lower higher reduced elevated decreased increased weaker stronger".split()))
    flipped = original.replace(word.group(0), f"{word.group(1)} {opposite[word.group(2)]}", 1)
    assert not text.accept_rewrite(original, flipped)
    assert not text.accept_rewrite(original, " ".join(faithful[1:]))  # a dropped sentence loses facts
    assert not text.accept_rewrite(original, "A fluent but empty paraphrase.")


def test_reword_is_off_by_default():
    assert text.reword("Modularity is typical.") == "Modularity is typical."


# -------------------------------------------------------------------------------------------- semantic
UKB_ROW = {"subject_id": "1", "sex": "F", "age": 63.4, "dataset": "UKB", "fluid_intelligence": 6.0, "site": "cheadle"}
SEX_WORDS = r"\b(?:male|female|man|woman|men|women|boys?|girls?|he|she|his|her|hers|him|himself|herself|M|F|gender|sex)\b"
AGE_WORDS = (r"(?i)\b(?:year-old|month-old|years?|aged?|old|older|young|younger|child|children|kids?|adolescents?|"
             r"adults?|elderly|aging|ageing|teen\w*|boys?|girls?|man|woman|men|women|middle-aged|infants?|p(?:a)?ediatric)\b")
DIAGNOSIS_WORDS = (r"(?i)\b(?:asd|adhd|ad|cn|mci|control|controls|autism|autistic|alzheimer\w*|diagnos\w*|"
                   r"typically developing|patients?|disorder|dementia|medicat\w*)\b")
FORBIDDEN = {"sex": SEX_WORDS, "age": AGE_WORDS, **{t: DIAGNOSIS_WORDS for t in semantic.DIAGNOSIS_TASKS}}
DATASETS = ["UKB", "ABCD", "HCP", "HCP-Aging", "ADNI", "ADHD200", "ABIDE-II", "Oxford", "site_7", None]


def random_row(rng: random.Random) -> dict:
    def maybe(value):
        return None if rng.random() < 0.15 else value
    return {
        "subject_id": str(rng.randrange(10**6)), "sex": maybe(rng.choice(["M", "F", "male", "female"])),
        "age": maybe(round(rng.uniform(5, 95), 1)), "dataset": rng.choice(DATASETS),
        "diagnosis": maybe(rng.choice(["ASD", "ADHD", "AD", "CN", "control", "MCI"])),
        "fluid_intelligence": maybe(float(rng.randrange(14))), "fluid_composite": maybe(round(rng.uniform(40, 160), 1)),
        "flanker": maybe(round(rng.uniform(40, 160), 1)), "medication": rng.choice(["methylphenidate", "none"]),
        "group": rng.choice(["patient", "control"]), "age_group": rng.choice(["older adult", "child"]), "site": "nyu",
    }


def numbers(sentence: str) -> set[float]:
    return {float(n) for n in re.findall(r"(?<![\w.])\d+(?:\.\d+)?", sentence)}


def test_semantic_example_and_variants():
    first = semantic.semantic_description(UKB_ROW, task=None, seed=0)
    assert "63-year-old woman" in first and "UK Biobank" in first and "fluid intelligence score of 6" in first
    assert first == semantic.semantic_description(UKB_ROW, task=None, seed=0)
    persons = {semantic.semantic_description(UKB_ROW, seed=s, cohort_sentence=False) for s in range(60)}
    cohorts = {semantic.cohort_sentence("ukb", seed=s) for s in range(60)}
    traits = {semantic.semantic_description({"fluid_intelligence": 7}, seed=s) for s in range(60)}
    assert min(len(persons), len(cohorts), len(traits)) >= 5
    assert all("UK Biobank" not in p for p in persons)


@pytest.mark.parametrize("row, task, expected", [
    ({"sex": "M", "age": 8.2, "diagnosis": "ADHD"}, None, "an 8-year-old boy with a diagnosis of ADHD"),
    ({"sex": "F", "age": 71, "fluid_composite": 98.5, "flanker": 103.25}, None,
     "a 71-year-old woman with an NIH Toolbox fluid cognition composite score of 98.5 and a flanker test score of 103.25"),
    ({"sex": "F", "age": 30}, "age", "a female individual"),
    ({"sex": "F", "age": 30}, "sex", "a 30-year-old individual"),
    ({"sex": pd.NA, "age": float("nan"), "diagnosis": "CN"}, None, "no clinical diagnosis"),
    ({"age": 0.5}, None, "a 6-month-old individual"),
])
def test_semantic_wording(row, task, expected):
    assert expected in semantic.semantic_description(row, task=task, seed=1)


def test_semantic_nothing_known_and_derived_from():
    assert semantic.semantic_description({}, None) == semantic.NOTHING
    row = {"sex": "F", "age": 40, "fluid_intelligence": 9}
    assert "fluid" not in semantic.semantic_description(row, "sex", derived_from=["fluid_intelligence"])
    assert "fluid" not in semantic.semantic_description(row, None, derived_from="fluid_intelligence")


def test_cohort_sentences():
    assert "UK Biobank" in semantic.cohort_sentence("ukb") and "UK Biobank" in semantic.cohort_sentence("UKB")
    assert "ABIDE-II" in semantic.cohort_sentence("ABIDE-II") and "Aging" in semantic.cohort_sentence("HCP-Aging")
    for key in ("ukb", "abcd", "hcp", "hcp_aging", "adni", "adhd200", "abide2"):
        assert semantic.cohort_sentence(key).endswith(".") and "dataset" not in semantic.cohort_sentence(key)
    assert "the Oxford dataset" in semantic.cohort_sentence("Oxford")
    assert "a research dataset" in semantic.cohort_sentence("custom")
    assert "Aging" not in semantic.cohort_sentence("hcp_aging", task="age")
    assert "aging" not in semantic.cohort_sentence("my_aging_study", task="age").lower()
    assert "ADHD" not in semantic.cohort_sentence("adhd200", task="adhd")


def test_excluded_fields_cover_every_task():
    assert set(semantic.EXCLUDED_FIELDS) == set(semantic.TASKS)
    for task in semantic.DIAGNOSIS_TASKS:
        assert {"diagnosis", "medication", "group"} <= semantic.EXCLUDED_FIELDS[task]
    assert {"age", "age_group"} <= semantic.EXCLUDED_FIELDS["age"] and "sex" in semantic.EXCLUDED_FIELDS["sex"]
    assert "flanker" in semantic.EXCLUDED_FIELDS["fluid_composite"] and "fluid_composite" in semantic.EXCLUDED_FIELDS["flanker"]
    assert all(task in semantic.EXCLUDED_FIELDS[task] or task in semantic.DIAGNOSIS_TASKS for task in semantic.TASKS)


@pytest.mark.parametrize("task", ["bmi", "Age", "iq"])
def test_unknown_task_lists_known_ones(task):
    with pytest.raises(FmrilmError, match="unknown task .* known tasks: sex, age, fluid_intelligence"):
        semantic.semantic_description(UKB_ROW, task=task)
    with pytest.raises(FmrilmError, match="unknown task"):
        semantic.cohort_sentence("ukb", task=task)


@pytest.mark.parametrize("task", semantic.TASKS)
def test_semantic_description_never_reveals_the_target(task):
    rng = random.Random(task)
    target = "diagnosis" if task in semantic.DIAGNOSIS_TASKS else task
    excluded = semantic.EXCLUDED_FIELDS[task]
    for i in range(150):
        row = random_row(rng)
        described = semantic.semantic_description(row, task=task, seed=i)
        # The text must not change when the target (and every field excluded with it) changes.
        other = random_row(rng)
        changed = row | {f: other[f] for f in excluded if f in other} | {target: other[target]}
        assert semantic.semantic_description(changed, task=task, seed=i) == described, (row, changed)
        if task in FORBIDDEN:
            assert not re.search(FORBIDDEN[task], described), (task, described)
        # Every number of the participant sentence comes from a field that may be shown.
        person = semantic.semantic_description(row, task=task, seed=i, cohort_sentence=False)
        allowed = {float(v) for f, v in row.items() if f not in excluded and isinstance(v, float) and f in semantic.FIELDS}
        allowed |= {float(int(row["age"])) for _ in [0] if task != "age" and row["age"] is not None}
        assert numbers(person) <= allowed, (task, person, row)


def test_dataset_names_with_underscored_sex_words_are_not_written_for_the_sex_task():
    from fmrilm.descriptors.semantic import semantic_description

    text = semantic_description({"dataset": "women_study", "sex": "F", "age": 50}, task="sex")
    assert "women" not in text.lower()
