"""Short "semantic" descriptions of a participant from the phenotype table, safe to pair with a task.

Design
------
* Only the fields in :data:`FIELDS` are ever written (sex and age in one noun phrase, the cohort, cognition
  scores, diagnosis); every other column is ignored, so a column nobody vetted can never leak a target.
* :data:`EXCLUDED_FIELDS` states per task which fields must not appear because they state or reveal the
  target (the target itself, fields derived from it, fields it is derived from). A task also removes
  *wording* that reveals it: for ``sex`` no gendered nouns or pronouns ("this participant"; no pronouns at all
  are ever used); for ``age`` no "woman/girl"-style nouns (they reveal adulthood), no cohort age range and
  the age-free cohort name; for diagnosis tasks the cohort name without disorder words.
* Wording is chosen by a seeded RNG from at least five templates per sentence; same seed, same text.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Mapping

from fmrilm.errors import FmrilmError

DIAGNOSIS_TASKS = ("diagnosis", "adhd", "autism", "ad")
TASKS = ("sex", "age", "fluid_intelligence", "fluid_composite", "flanker", *DIAGNOSIS_TASKS)
FIELDS = ("sex", "age", "dataset", "diagnosis", "fluid_intelligence", "fluid_composite", "flanker")

_DIAGNOSIS_FIELDS = {"diagnosis", "dx", "group", "diagnosis_group", "medication", "medication_status", "adhd",
                     "adhd_subtype", "adhd_index", "autism", "asd", "ados", "adi_r", "srs", "ad", "dementia",
                     "mci", "mmse", "cdr", "cdr_sb", "adas", "moca"}  # diagnoses are made from these scales
EXCLUDED_FIELDS: dict[str, set[str]] = {
    "sex": {"sex", "gender", "sex_code", "is_female", "is_male"},
    "age": {"age", "age_years", "age_months", "age_group", "age_bin", "age_decade", "age_category",
            "birth_year", "year_of_birth", "date_of_birth", "older_adult", "younger_adult", "life_stage"},
    "fluid_intelligence": {"fluid_intelligence", "fluid_intelligence_z", "fluid_intelligence_percentile"},
    # The NIH Toolbox fluid composite is computed from flanker (and four other tests), so each reveals the other.
    "fluid_composite": {"fluid_composite", "flanker", "dccs", "picture_sequence", "list_sorting",
                        "pattern_comparison", "total_composite"},
    "flanker": {"flanker", "fluid_composite", "total_composite"},
    **{task: set(_DIAGNOSIS_FIELDS) for task in DIAGNOSIS_TASKS},
}

# key: (full name, name without age or disorder words, population described by age).
COHORTS = {
    "ukb": ("the UK Biobank", "the UK Biobank", "middle-aged and older adults"),
    "abcd": ("the Adolescent Brain Cognitive Development (ABCD) study", "the ABCD study", "children aged 9 to 11"),
    "hcp": ("the Human Connectome Project Young Adult study", "the Human Connectome Project", "young adults aged 22 to 35"),
    "hcp_aging": ("the Human Connectome Project in Aging", "the HCP-A study", "adults aged 36 to 100"),
    "adni": ("the Alzheimer's Disease Neuroimaging Initiative (ADNI)", "the ADNI study", "older adults aged 55 to 90"),
    "adhd200": ("the ADHD-200 consortium", "a multi-site cohort", "children and young adults aged 7 to 21"),
    "abide2": ("the Autism Brain Imaging Data Exchange II (ABIDE-II)", "the ABIDE-II consortium", "participants aged 5 to 64"),
}
_ALIASES = {"ukbiobank": "ukb", "hcpya": "hcp", "hcpaging": "hcp_aging", "hcpa": "hcp_aging", "abideii": "abide2"}
_GENERIC = {"", "custom", "unknown", "none", "nan"}  # placeholder dataset names say nothing worth writing
COHORT_TEMPLATES = (
    "This scan comes from {c}.",
    "The data were collected in {c}.",
    "This resting-state scan is part of {c}.",
    "The recording was acquired as part of {c}.",
    "This scan belongs to {c}.",
)
PERSON_TEMPLATES = (  # {who} "a 63-year-old woman"; {traits} " with a fluid intelligence score of 6" or ""
    "This participant is {who}{traits}.",
    "The scan was acquired from {who}{traits}.",
    "These data belong to {who}{traits}.",
    "This recording comes from {who}{traits}.",
    "The person scanned is {who}{traits}.",
)
TRAIT_TEMPLATES = (  # nothing is known about age and sex: the traits carry the sentence
    "This participant has {traits}.",
    "The participant has {traits}.",
    "The person scanned has {traits}.",
    "Records for this participant show {traits}.",
    "The scanned participant has {traits}.",
)
NOTHING = "No further information is available about this participant."
SCORES = {"fluid_intelligence": "a fluid intelligence score of {}",
          "fluid_composite": "an NIH Toolbox fluid cognition composite score of {}",
          "flanker": "a flanker test score of {}"}
DIAGNOSES = {"asd": "autism spectrum disorder", "autism": "autism spectrum disorder", "adhd": "ADHD",
             "ad": "Alzheimer's disease", "alzheimer": "Alzheimer's disease", "dementia": "dementia",
             "mci": "mild cognitive impairment"}
_CONTROLS = {"control", "controls", "cn", "hc", "td", "tdc", "healthy", "nc", "typical"}
_SEX = {"f": "F", "female": "F", "woman": "F", "m": "M", "male": "M", "man": "M"}
# Words that reveal a task's target; a raw (unknown) dataset name containing one is not written for that task.
_REVEALING = {
    "sex": r"(?<![a-z])(?:male|female|man|woman|men|women|boys?|girls?|sex|gender)(?![a-z])",  # "_" separates words
    "age": r"(?<![a-z])(?:ag(?:e|ed|ing|eing)(?![a-z])|old|young|child|kid|teen|adolescen|adult|elder|senior|infant|p(?:a)?ediatric|lifespan)",
    "diagnosis": r"(?<![a-z])(?:adhd|autis|asd|alzheimer|dementia|mci|ad(?![a-z])|cn(?![a-z])|patient|control|clinic|disorder)",
}


def _check_task(task: str | None) -> None:
    if task is not None and task not in EXCLUDED_FIELDS:
        raise FmrilmError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")


def _cohort_key(dataset: object) -> str:
    key = re.sub(r"[^a-z0-9]", "", str(dataset).lower())
    return _ALIASES.get(key, key)


def _revealing(task: str | None, words: str) -> bool:
    kind = "diagnosis" if task in DIAGNOSIS_TASKS else task
    return kind in _REVEALING and re.search(_REVEALING[kind], words, re.I) is not None


def _cohort_phrase(dataset: object, task: str | None) -> str:
    """'the UK Biobank, a cohort of middle-aged and older adults' (no age range for task age)."""
    known = COHORTS.get(_cohort_key(dataset))
    if known is None:
        name = str(dataset).strip()
        return "a research dataset" if name.lower() in _GENERIC or _revealing(task, name) else f"the {name} dataset"
    full, neutral, population = known
    name = neutral if _revealing(task, full) else full
    if task == "age":
        return name
    return f"{name}, a cohort of {population}" if name.startswith("the ") else f"{name} of {population}"


def cohort_sentence(dataset: object, seed: int = 0, task: str | None = None) -> str:
    """One sentence naming the cohort, e.g. "This scan comes from the UK Biobank, a cohort of ...".

    Known keys (any case or punctuation): ukb, abcd, hcp, hcp_aging, adni, adhd200, abide2; other names are
    written as given unless they contain words revealing ``task``.
    """
    _check_task(task)
    return random.Random(f"{seed}:cohort").choice(COHORT_TEMPLATES).format(c=_cohort_phrase(dataset, task))


def _present(value: object) -> bool:
    if value is None:
        return False
    if isinstance(value, float):
        return not math.isnan(value)
    return str(value).strip().lower() not in ("", "nan", "none", "<na>", "n/a", "na")


def _number(value: object) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _score(value: object) -> str | None:
    """6 -> '6', 98.5 -> '98.5', 1/3 -> '0.33'; None for a missing or non-numeric value."""
    number = _number(value)
    if number is None:
        return None
    return str(int(number)) if number.is_integer() else f"{number:.2f}".rstrip("0").rstrip(".")


def _article(phrase: str) -> str:
    """'a' or 'an' by sound; the numbers that start these phrases sound like a vowel for 8, 11, 18, 80..."""
    return ("an " if re.match(r"(?:8|1[18]-|[aeiou])", phrase, re.I) else "a ") + phrase


def _who(values: dict) -> str | None:
    """'63-year-old woman', 'female individual', '12-year-old individual'; None when neither is known."""
    sex, years = _SEX.get(str(values.get("sex", "")).strip().lower()), _number(values.get("age"))
    if years is not None and years < 0:
        years = None
    if sex is None and years is None:
        return None
    if years is None:
        return f"{'female' if sex == 'F' else 'male'} individual"
    noun = "individual" if sex is None else ("woman" if sex == "F" else "man") if years >= 18 else ("girl" if sex == "F" else "boy")
    span = f"{round(years * 12)}-month-old" if years < 1 else f"{int(years)}-year-old"
    return f"{span} {noun}"


def _traits(values: dict) -> list[str]:
    traits = []
    if "diagnosis" in values:
        label = str(values["diagnosis"]).strip()
        if label.lower() in _CONTROLS:
            traits.append("no clinical diagnosis (a control participant)")
        else:
            traits.append(f"a diagnosis of {DIAGNOSES.get(label.lower(), label)}")
    for field, template in SCORES.items():
        score = _score(values.get(field))
        if score is not None:
            traits.append(template.format(score))
    return traits


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def semantic_description(row: Mapping, task: str | None = None, seed: int = 0, cohort_sentence: bool = True,
                         derived_from: Iterable[str] = ()) -> str:
    """Describe a participant without revealing ``task``'s target.

    Parameters
    ----------
    row : mapping
        Phenotype fields (a dict or a pandas row); missing values are skipped.
    task : str, optional
        One of :data:`TASKS`; its :data:`EXCLUDED_FIELDS` and revealing words are left out. None: everything.
    seed : int
        Chooses the wording.
    cohort_sentence : bool
        Start with a sentence naming the cohort (from the ``dataset`` field).
    derived_from : iterable of str
        Further fields to leave out because they are derived from the target.

    Returns
    -------
    str, e.g. "This scan comes from the UK Biobank, a cohort of middle-aged and older adults. The participant
    is a 63-year-old woman with a fluid intelligence score of 6."
    """
    _check_task(task)
    if isinstance(derived_from, str):
        derived_from = [derived_from]
    excluded = EXCLUDED_FIELDS.get(task, set()) | set(derived_from)
    # Without the age, sex is written "female/male participant": "woman" or "girl" would reveal the age group.
    values = {f: row.get(f) for f in FIELDS if f not in excluded and _present(row.get(f))}
    rng = random.Random(f"{seed}:semantic")
    out = []
    if cohort_sentence and "dataset" in values:
        out.append(rng.choice(COHORT_TEMPLATES).format(c=_cohort_phrase(values["dataset"], task)))
    who, traits = _who(values), _traits(values)
    if who is not None:
        with_traits = f" with {_join(traits)}" if traits else ""
        out.append(rng.choice(PERSON_TEMPLATES).format(who=_article(who), traits=with_traits))
    elif traits:
        out.append(rng.choice(TRAIT_TEMPLATES).format(traits=_join(traits)))
    return " ".join(out) if out else NOTHING
