"""Evaluation: the shared protocol (tasks, subject-level splits, few-shot sets), metrics, results tables and
the baselines fMRI-LM is compared with on the same subjects and splits.

Typical use::

    from fmrilm.evaluate import make_splits, save_splits, write_results
    from fmrilm.evaluate.baselines import baseline_rows

    splits = make_splits(cohort, "sex", seeds=5)          # identical for every method
    save_splits("splits/sex.json", splits)
    rows = baseline_rows(["fc_logreg", "bnt"], cohort, "sex", splits, cohort_name="UKB")
    write_results("results/", rows)                       # results.json + results.md
"""

from fmrilm.evaluate.metrics import aggregate, classification_metrics, regression_metrics
from fmrilm.evaluate.protocol import (
    TASKS,
    Split,
    TaskSpec,
    few_shot_indices,
    get_task,
    load_splits,
    make_splits,
    save_splits,
    subject_splits,
    targets,
)
from fmrilm.evaluate.results import ResultRow, read_results, rows_from_seeds, write_results

__all__ = [
    "TASKS", "ResultRow", "Split", "TaskSpec", "aggregate", "classification_metrics", "few_shot_indices",
    "get_task", "load_splits", "make_splits", "read_results", "regression_metrics", "rows_from_seeds",
    "save_splits", "subject_splits", "targets", "write_results",
]
