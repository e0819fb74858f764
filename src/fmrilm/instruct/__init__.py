"""Stage 3 of fMRI-LM: multi-task, multi-paradigm instruction tuning.

* :mod:`~fmrilm.instruct.prompts`: template paraphrases per task and paradigm, the prompt format;
* :mod:`~fmrilm.instruct.paradigms`: (prompt, answer) examples of the single, multi and open paradigms;
* :mod:`~fmrilm.instruct.answer`: constrained decoding over the allowed answers, parsing of multi answers,
  the open-ended field extractor and its scores;
* :mod:`~fmrilm.instruct.data`: per-cohort splits, cuts and targets, paraphrase pools, the training dataset;
* :mod:`~fmrilm.instruct.pipeline`: ``run_instruct`` (``fmrilm instruct``) and ``InstructedModel`` (loaded
  lazily from here: they pull in the LLM stack).

Typical use::

    import random
    from fmrilm.instruct import paraphrases, split_paraphrases, single_example, class_probabilities

    train_q, held_out_q = split_paraphrases(paraphrases("sex", "single"))
    prompt, answer = single_example(row, "sex", random.Random(0), train_q)       # answer "female"
    probs = class_probabilities(model, features, prompts, "sex")                  # (B, 2): male, female
"""

from fmrilm.instruct.answer import (
    canonical_answer, class_probabilities, class_scores, encode_answer, encode_prompt, extract_fields, parse_multi,
    score_open, sentence_similarity,
)
from fmrilm.instruct.data import (
    CohortTargets, InstructDataset, check_tasks, cohort_targets, paraphrase_pools, question_task,
)
from fmrilm.instruct.paradigms import (
    answer_text, describe, encode_example, multi_example, open_example, semantic_text, single_example, target_value,
)
from fmrilm.instruct.prompts import (
    ANSWER_PREFIX, PARADIGMS, TASK_TEXT, answer_words, build_prompt, cohort_text, label_aliases, multi_frames,
    open_fields, open_frames, paraphrases, split_paraphrases, task_label,
)

__all__ = [
    "CohortTargets", "InstructDataset", "InstructedModel", "check_tasks", "cohort_targets", "few_shot_finetune",
    "paraphrase_pools", "question_task", "run_instruct",
    "ANSWER_PREFIX", "PARADIGMS", "TASK_TEXT", "answer_text", "answer_words", "build_prompt", "canonical_answer",
    "class_probabilities", "class_scores", "cohort_text", "describe", "encode_answer", "encode_example",
    "encode_prompt", "extract_fields", "label_aliases", "multi_example", "multi_frames", "open_example",
    "open_fields", "open_frames", "paraphrases", "parse_multi", "score_open", "semantic_text", "sentence_similarity",
    "single_example", "split_paraphrases", "target_value", "task_label",
]


def __getattr__(name: str):
    if name in ("InstructedModel", "run_instruct", "few_shot_finetune"):
        from fmrilm.instruct import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
