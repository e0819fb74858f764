"""The phenotype table: one row per subject, keyed by ``subject_id``.

Recognised columns are normalised (``sex`` to ``M``/``F``, ``age`` and ``fluid_intelligence`` to numbers,
``site``/``dataset``/``diagnosis`` to text); every other column is kept as read.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from fmrilm.data.readers import read_csv_table
from fmrilm.data.sources import check_identifier
from fmrilm.errors import FmrilmError, FmrilmWarning

RECOGNISED = ("sex", "age", "site", "dataset", "diagnosis", "fluid_intelligence")
NUMERIC = ("age", "fluid_intelligence", "tr")
_SEX_WORDS = {"m": "M", "male": "M", "man": "M", "f": "F", "female": "F", "woman": "F"}


def parse_sex_coding(coding: str | None) -> dict[str, str]:
    """Parse ``--sex-coding`` such as ``0=F,1=M`` into a mapping from the stored value to ``M``/``F``."""
    if not coding:
        return {}
    mapping = {}
    for item in coding.split(","):
        key, _, value = item.partition("=")
        if value.strip().upper() not in ("M", "F"):
            raise FmrilmError(f"--sex-coding {coding!r}: each item must be VALUE=M or VALUE=F, e.g. 0=F,1=M")
        mapping[key.strip()] = value.strip().upper()
    return mapping


def normalise_sex(values: pd.Series, coding: dict[str, str], source: str) -> pd.Series:
    """Map sex values to ``M``/``F`` (missing stays missing); numeric codes need an explicit ``coding``."""
    def one(value: object) -> object:
        if pd.isna(value) or str(value).strip() == "":
            return pd.NA
        text = str(value).strip()
        if text.endswith(".0"):
            text = text[:-2]
        if text in coding:
            return coding[text]
        if text.lower() in _SEX_WORDS:
            return _SEX_WORDS[text.lower()]
        hint = "pass --sex-coding 0=F,1=M (or the mapping your table uses)"
        raise FmrilmError(f"{source}: unknown sex value {text!r}; use M/F or male/female, or {hint}")

    return values.map(one).astype("string")


def _key_column(table: pd.DataFrame, source: str) -> str:
    for name in ("subject_id", "participant_id"):
        if name in table.columns:
            return name
    raise FmrilmError(
        f"{source}: no subject_id or participant_id column (columns: {', '.join(map(str, table.columns[:8]))})"
    )


def bare_subject_id(value: object) -> str:
    """Subject id as text without a BIDS ``sub-`` prefix."""
    text = str(value).strip()
    return text[4:] if text.startswith("sub-") else text


def read_phenotypes(path: str | Path, sex_coding: str | None = None) -> pd.DataFrame:
    """Read a csv/tsv phenotype table and normalise it.

    Returns
    -------
    DataFrame with ``subject_id`` (text, no ``sub-`` prefix) first, one row per subject.
    """
    path = Path(path)
    if not path.is_file():
        raise FmrilmError(f"--phenotypes {path}: file does not exist")
    sep = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
    table = read_csv_table(path, f"--phenotypes {path}", sep=sep, dtype=str, keep_default_na=True, na_values=["n/a", "NA", ""])
    return normalise_phenotypes(table, str(path), parse_sex_coding(sex_coding))


def normalise_phenotypes(table: pd.DataFrame, source: str, sex_coding: dict[str, str] | None = None) -> pd.DataFrame:
    """Key the table by ``subject_id`` and normalise the recognised columns (see module docstring)."""
    table = table.copy()
    key = _key_column(table, source)
    missing = table[key].isna()
    if missing.any():
        raise FmrilmError(f"{source}: row {int(missing.to_numpy().argmax()) + 1} has no {key}; fill it in or remove the row")
    table.insert(0, "subject_id", table.pop(key).map(bare_subject_id).astype("string"))
    for subject in table["subject_id"]:
        check_identifier(subject, f"{source}: subject")
    duplicated = table["subject_id"][table["subject_id"].duplicated()]
    if len(duplicated):
        raise FmrilmError(f"{source}: subject {duplicated.iloc[0]!r} appears {int((table['subject_id'] == duplicated.iloc[0]).sum())} times; keep one row per subject")
    if "sex" in table:
        table["sex"] = normalise_sex(table["sex"], sex_coding or {}, source)
    for column in NUMERIC:
        if column in table:
            table[column] = _numeric(table[column], column, source)
    for column in ("site", "dataset", "diagnosis"):
        if column in table:
            table[column] = table[column].astype("string")
    return table.reset_index(drop=True)


def _numeric(values: pd.Series, column: str, source: str) -> pd.Series:
    numbers = pd.to_numeric(values, errors="coerce").astype(np.float64)
    for bad, what in ((numbers.isna() & values.notna(), "non-numeric"), (np.isinf(numbers), "infinite")):
        if bad.any():
            raise FmrilmError(f"{source}: column {column!r} has {what} value {values[bad].iloc[0]!r}; "
                              "use finite numbers or leave empty")
    return numbers


def report_unmatched(scan_subjects: set[str], phenotype_subjects: set[str]) -> dict[str, int]:
    """Warn with counts about subjects with scans but no phenotypes, and the reverse."""
    counts = {
        "subjects_without_phenotypes": len(scan_subjects - phenotype_subjects),
        "phenotypes_without_scans": len(phenotype_subjects - scan_subjects),
    }
    if counts["subjects_without_phenotypes"]:
        example = sorted(scan_subjects - phenotype_subjects)[0]
        warnings.warn(f"{counts['subjects_without_phenotypes']} subjects have scans but no phenotype row (e.g. {example!r})", FmrilmWarning, stacklevel=2)
    if counts["phenotypes_without_scans"]:
        warnings.warn(f"{counts['phenotypes_without_scans']} phenotype rows have no scan; they are kept in the table", FmrilmWarning, stacklevel=2)
    return counts
