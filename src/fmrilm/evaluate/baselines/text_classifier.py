"""A text classifier over the descriptor texts: the paper's "descriptor check" with text.

TF-IDF of word uni- and bigrams (sublinear term frequency) of each scan's descriptor paragraph
(``DESC/texts.jsonl``, field ``text``), then L2 logistic regression (C by inner CV on the training scans,
subject-grouped) or ridge regression (alpha by inner CV). If a task can be read off the texts by a bag of
words, the language model has the information it needs in its input.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, clone
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline

from fmrilm.errors import FmrilmError
from fmrilm.evaluate.baselines.linear import tune

TEXTS_FILE = "texts.jsonl"
C_GRID = (0.1, 1.0, 10.0, 100.0)
ALPHA_GRID = (0.1, 1.0, 10.0)


def load_texts(path: str | Path, field: str = "text") -> pd.DataFrame:
    """``scan_id`` and ``text`` of a describe output's ``texts.jsonl`` (``path`` = the DESC directory or file)."""
    path = Path(path)
    path = path / TEXTS_FILE if path.is_dir() else path
    if not path.is_file():
        raise FmrilmError(f"{path} does not exist; run 'fmrilm describe COHORT --out DESC' and pass DESC")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if records and field not in records[0]:
        raise FmrilmError(f"{path}: records have no {field!r} field (fields: {', '.join(records[0])})")
    return pd.DataFrame({"scan_id": [str(r["scan_id"]) for r in records], "text": [r[field] for r in records]})


def text_inputs(texts: pd.DataFrame, scan_ids: Sequence[str]) -> list[str]:
    """The text of each of ``scan_ids`` (in that order) from a ``scan_id``/``text`` table."""
    lookup = dict(zip(texts["scan_id"].astype(str), texts["text"]))
    missing = [s for s in map(str, scan_ids) if s not in lookup]
    if missing:
        raise FmrilmError(f"the descriptor texts lack {len(missing)} scans of the cohort (e.g. {missing[0]!r}); "
                          "run 'fmrilm describe' on this cohort")
    return [lookup[str(s)] for s in scan_ids]


class _TextBase(BaseEstimator):
    _classification = True

    def _vectorizer(self) -> TfidfVectorizer:
        return TfidfVectorizer(ngram_range=tuple(self.ngram_range), sublinear_tf=True, min_df=self.min_df)

    def fit(self, X: Sequence[str], y: Sequence, *, groups: Sequence | None = None, X_val=None, y_val=None):
        """Fit on S texts and targets (S,); ``groups`` (S,) are subjects for the inner CV (validation
        arguments accepted for a common interface and not used)."""
        X, y = np.asarray(list(X), dtype=object), np.asarray(y)
        pipeline, grid = self._pipeline(), self._grid()
        self.best_params_ = tune(pipeline, grid, X, y, groups, self._classification, self.cv, self.seed)
        self.model_ = clone(pipeline).set_params(**self.best_params_).fit(X, y)
        if self._classification:
            self.classes_ = self.model_.classes_
        return self

    def predict(self, X: Sequence[str]) -> np.ndarray:
        """Predicted class or value per text: (S,)."""
        return self.model_.predict(np.asarray(list(X), dtype=object))


class TextClassifier(ClassifierMixin, _TextBase):
    """TF-IDF + L2 logistic regression over texts, any number of classes."""

    def __init__(self, Cs: Sequence[float] = C_GRID, ngram_range: tuple[int, int] = (1, 2), min_df: int = 1,
                 cv: int = 3, class_weight: str | None = "balanced", seed: int = 0):
        self.Cs, self.ngram_range, self.min_df, self.cv = Cs, ngram_range, min_df, cv
        self.class_weight, self.seed = class_weight, seed

    def _pipeline(self):
        return make_pipeline(self._vectorizer(), LogisticRegression(
            class_weight=self.class_weight, max_iter=2000, random_state=self.seed))

    def _grid(self) -> dict:
        return {"logisticregression__C": tuple(self.Cs)}

    def predict_proba(self, X: Sequence[str]) -> np.ndarray:
        """Class probabilities (S, C), columns in the order of ``classes_``."""
        return self.model_.predict_proba(np.asarray(list(X), dtype=object))


class TextRegressor(RegressorMixin, _TextBase):
    """TF-IDF + ridge regression over texts."""

    _classification = False

    def __init__(self, alphas: Sequence[float] = ALPHA_GRID, ngram_range: tuple[int, int] = (1, 2),
                 min_df: int = 1, cv: int = 3, seed: int = 0):
        self.alphas, self.ngram_range, self.min_df, self.cv, self.seed = alphas, ngram_range, min_df, cv, seed

    def _pipeline(self):
        return make_pipeline(self._vectorizer(), Ridge())

    def _grid(self) -> dict:
        return {"ridge__alpha": tuple(self.alphas)}
