"""``fmrilm instruct``: Stage 3 multi-task, multi-paradigm instruction tuning of an aligned fMRI-LM.

Inputs: one or more prepared cohorts and a SOURCE model, an ``fmrilm align`` output (or an earlier
``fmrilm instruct`` output, e.g. for few-shot fine-tuning). The source's own Stage 1 tokenizer copy encodes
every scan (cached under ``OUT/cache/<i>/``); the LLM keeps the source's adaptation (its LoRA adapters stay
trainable, or every weight after full fine-tuning). Training data: :mod:`fmrilm.instruct.data`.

Outputs in ``INST`` (the layout of an align output, so ``AlignedModel(INST)`` also loads it)::

    config.json, fmri_modules.safetensors, llm/   the model (FMRILanguageModel.from_pretrained(INST))
    tokenizer/                                    the source's Stage 1 tokenizer (config + weights)
    preprocess.json                               the source's record that standardizes a new scan
    calibration.json                              class-prior calibration of the constrained answers, fitted on
                                                  training scans (fmrilm.instruct.calibration); before instruct.json
    instruct.json                                 the run (schema below); written LAST: marks a finished run
    run.json, train/, cache/                      settings compared on resume, Trainer checkpoints, features

With ``overwrite`` an existing ``INST`` is replaced only once the new run is complete (built in ``.INST.overwrite``
beside it, as for ``fmrilm align``).

``instruct.json`` (read it with ``InstructedModel(INST).info``)::

    format              "fmrilm.instruct/1"
    tasks               ["sex", "age", ...]       requested task names, in order
    question_tasks      {"sex": "sex", "age": "age_group"}   task asked in single / multi questions: the task,
                        or for a regression task its ordinal-bin task of the same column (open states values)
    paradigms           ["single", "multi", "open"]
    seed                protocol seed of the subject-level splits (and the default training seed)
    semantic            bool, semantic descriptions in the prompts
    cohorts             [{"path": abs path, "name": dataset name in prompts,
                          "split": Split.to_dict() (seed, train, val, test scan indices, task, n_scans),
                          "cuts": {cut task: [cut points in column units, fitted on split train]},
                          "n_train_scans": int, "train_scans": [scan indices trained on]}, ...]
    held_out_fraction   share of every paraphrase list held out (seed fmrilm.instruct.data.PARAPHRASE_SEED)
    held_out_paraphrases {"single": {question task: [questions]},
                          "multi": {question task: [items], "frames": [multi frames with {items} {labels}]},
                          "open": {"frames": [open frames with {fields}]}}   (only the trained paradigms)
    max_text_tokens     prompt + answer token budget of an example
    train_config        TrainConfig.to_dict(); model_config  FMRILMConfig.to_dict()
    source_model        abs path of the source; init_from  abs path or null; source_kind  "align" | "instruct"
    train_metrics       the last training metrics line; steps  optimizer steps done
    fmrilm_version, created

Evaluation uses ``split["test"]`` of each cohort, the fitted ``cuts`` (``y = searchsorted(cuts, value,
"right")``), and the held-out paraphrases only.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

from fmrilm import __version__
from fmrilm.errors import FmrilmError
from fmrilm.evaluate.protocol import Split
from fmrilm.instruct.calibration import CALIBRATION_FILE, check_method
from fmrilm.instruct.data import (
    InstructDataset, check_paradigms, check_tasks, cohort_targets, paraphrase_pools, question_task,
)
from fmrilm.instruct.prompts import PARADIGMS
from fmrilm.io import sha256_file, write_json_atomic
from fmrilm.lm.model import CONFIG_FILE, FMRI_FILE, LLM_DIR, FMRILanguageModel
from fmrilm.lm.objectives import collate
from fmrilm.lm.pipeline import (
    CACHE_DIR, META_FILE, PREPROCESS_FILE, RUN_FILE, TOKENIZER_DIR, TRAIN_DIR, AlignedModel, TokenCache, _check_out,
    _copy_tokenizer, _save_model, _start_run, _steps_done, encode_cohort, freeze_unused_head, stage_train_config,
)
from fmrilm.train import TrainConfig, Trainer, set_seed

INFO_FILE = "instruct.json"
FORMAT = "fmrilm.instruct/1"
MAX_TEXT_TOKENS = 192  # prompt (cohort sentence, semantic text, question) + answer, in LLM tokens
HELD_OUT_FRACTION = 0.2
_OWNED = (INFO_FILE, CALIBRATION_FILE, RUN_FILE, PREPROCESS_FILE, TOKENIZER_DIR, CONFIG_FILE, FMRI_FILE, LLM_DIR,
          TRAIN_DIR)


class InstructedModel:
    """An instruct output loaded for inference: ``model`` (FMRILanguageModel), ``tokenizer`` (Stage 1),
    ``preprocess`` (dict), ``info`` (instruct.json, schema in the module docstring), ``directory``."""

    def __init__(self, directory: str | os.PathLike):
        directory = Path(directory)
        if not (directory / INFO_FILE).is_file():
            raise FmrilmError(f"{directory} is not an 'fmrilm instruct' output ({INFO_FILE} is missing); run "
                              "'fmrilm instruct' first")
        self.info = json.loads((directory / INFO_FILE).read_text())
        aligned = AlignedModel(directory)
        self.directory, self.model, self.tokenizer = directory, aligned.model, aligned.tokenizer
        self.preprocess = aligned.preprocess
        self.max_new_tokens = int(self.info.get("max_text_tokens", MAX_TEXT_TOKENS))


def source_kind(directory: str | os.PathLike) -> str:
    """"align" or "instruct" for a finished source model directory; an error for anything else."""
    directory = Path(directory)
    needed = (CONFIG_FILE, FMRI_FILE, PREPROCESS_FILE, f"{TOKENIZER_DIR}/config.json",
              f"{TOKENIZER_DIR}/model.safetensors")
    missing = [name for name in needed if not (directory / name).is_file()]
    kind = "instruct" if (directory / INFO_FILE).is_file() else "align" if (directory / META_FILE).is_file() else None
    if missing or kind is None:
        what = missing[0] if missing else f"{META_FILE} (or {INFO_FILE})"
        raise FmrilmError(f"--model {directory} is not an 'fmrilm align' output ({what} is missing); run "
                          "'fmrilm align' first or pass its --out directory")
    return kind


def _check_grid(cohort, source: Path, preprocess: Mapping) -> None:
    """The cohort's ROI count, length and atlas must be those the source's tokenizer was trained on."""
    from fmrilm.data.cohort import load_cohort
    from fmrilm.tokenizer.config import TokenizerConfig

    config = TokenizerConfig.from_dict(json.loads((source / TOKENIZER_DIR / "config.json").read_text())["config"])
    with load_cohort(cohort) as opened:
        _, length, n_rois = opened.timeseries.shape
        atlas = opened.meta.get("atlas")
    expected = preprocess.get("atlas")
    if (n_rois, length) != (config.n_rois, config.length) or (atlas and expected and atlas != expected):
        raise FmrilmError(f"cohort {cohort} has {n_rois} ROIs x {length} time points (atlas {atlas!r}) but the "
                          f"model {source} expects {config.n_rois} x {config.length} (atlas {expected!r}); "
                          "prepare the cohort with the model's atlas and length")


def _init_weights(source: Path, init_from: str | os.PathLike | None) -> Path:
    """Where the starting weights come from: ``init_from`` (same tokenizer as the source) or the source."""
    if init_from is None:
        return source
    init = Path(init_from)
    source_kind(init)
    tok = f"{TOKENIZER_DIR}/model.safetensors"
    if sha256_file(init / tok) != sha256_file(source / tok):
        raise FmrilmError(f"init_from {init} was trained with another Stage 1 tokenizer than --model {source}; "
                          "initialise from a model derived from the same one")
    return init


# ------------------------------------------------------------------------------------------------- run
def run_instruct(
    cohorts: Sequence[str | os.PathLike] | str | os.PathLike, model: str | os.PathLike, out: str | os.PathLike, *,
    tasks: Sequence[str], paradigms: Sequence[str] = PARADIGMS, seed: int = 0,
    train: TrainConfig | Mapping | None = None, semantic: bool = False, max_text_tokens: int = MAX_TEXT_TOKENS,
    held_out_fraction: float = HELD_OUT_FRACTION, resume: bool = False, overwrite: bool = False,
    train_indices: Sequence[Sequence[int] | None] | None = None, init_from: str | os.PathLike | None = None,
    splits: Sequence[Split | None] | None = None, lora: bool | None = None, calibration: str | None = "bias",
) -> dict:
    """Instruction-tune a source fMRI-LM on cohorts' training subjects and write it to ``out`` (module docstring).

    Parameters
    ----------
    cohorts
        Prepared cohort directories (one or several), on the source tokenizer's atlas and length.
    model
        Source: an ``fmrilm align`` output, or an ``fmrilm instruct`` output.
    out
        Output directory; one holding a finished run is refused unless ``overwrite``.
    tasks, paradigms
        Registry task names (``fmrilm.evaluate.protocol.TASKS``) and paradigms among single, multi, open.
    seed
        Protocol seed of each cohort's subject-level split; also the training seed unless ``train`` sets one.
    train
        A TrainConfig used as is, or TrainConfig fields over the Stage 2 quick defaults.
    semantic
        Add the semantic description (never stating a target) to prompts with a cognition or diagnosis target.
    max_text_tokens, held_out_fraction
        Token budget of prompt + answer; share of every paraphrase list held out for evaluation.
    resume, overwrite
        Continue the run in ``out/train`` (or an interrupted overwrite) from its newest checkpoint; replace a
        finished output once the new one is complete.
    train_indices
        One entry per cohort: scan indices to train on (e.g. few-shot sets inside ``split.train``) or None.
    init_from
        Start from this model's weights (an align or instruct output with the same tokenizer) instead.
    splits
        One entry per cohort: a :class:`Split` to use instead of making one with ``seed``, or None.
    lora
        None or the source's adaptation (True: its LoRA adapters, False: full fine-tuning); Stage 3 keeps it.
    calibration
        Class-prior calibration fitted on the training scans at the end: "bias", "mean" or None (none).

    Returns
    -------
    dict
        The ``instruct.json`` record; for a run stopped by ``max_steps`` before its last step,
        ``{"finished": False, "steps_done": ..., "total_steps": ...}`` and only checkpoints are written.
    """
    cohorts = [cohorts] if isinstance(cohorts, (str, os.PathLike)) else list(cohorts)
    specs, paradigms = check_tasks(tasks), check_paradigms(paradigms)
    calibration = None if calibration is None else check_method(calibration)
    if not isinstance(max_text_tokens, int) or max_text_tokens < 16:
        raise FmrilmError(f"max_text_tokens must be an integer >= 16 (prompt + answer tokens), got {max_text_tokens!r}")
    source = Path(model)
    kind, weights = source_kind(source), _init_weights(source, init_from)
    final = Path(out)
    out = _check_out(final, resume, overwrite, marker=INFO_FILE, owned=_OWNED, what="an instruction-tuned fMRI-LM",
                     command="instruct")  # a staging directory when overwriting
    parts = _cohort_parts(cohorts, source, specs, seed, train_indices, splits)
    train_cfg = train if isinstance(train, TrainConfig) else stage_train_config({"seed": seed, **dict(train or {})})
    run = {"cohorts": [p.to_dict() for p in parts], "tasks": [s.name for s in specs], "paradigms": paradigms,
           "seed": seed, "semantic": semantic, "max_text_tokens": max_text_tokens,
           "held_out_fraction": held_out_fraction, "source_model": str(source.resolve()), "source_kind": kind,
           "init_from": None if init_from is None else str(Path(init_from).resolve())}
    pools, held = paraphrase_pools(specs, paradigms, held_out_fraction)
    set_seed(train_cfg.seed)
    lm = FMRILanguageModel.from_pretrained(weights)
    _check_adaptation(lm, weights, lora)
    freeze_unused_head(lm, trains_f2f=False)  # Stage 3 batches hold no fMRI codes
    caches = [TokenCache(out / CACHE_DIR / str(i)) for i in range(len(parts))]
    dataset = InstructDataset(parts, caches, specs, paradigms, pools, lm.tokenizer, max_text_tokens, semantic)
    collate_fn = partial(collate, pad_id=lm.tokenizer.pad_token_id)
    trainer = Trainer(lm, dataset, train_cfg, out / TRAIN_DIR, collate_fn=collate_fn)
    if trainer.accelerator.is_main_process:
        for part, cache in zip(parts, caches):
            encode_cohort(part.path, source / TOKENIZER_DIR, cache.directory)
    _start_run(trainer, out, run, resume, owned=_OWNED)  # waits for every process
    metrics, steps = trainer.fit(resume=resume), _steps_done(trainer)
    if steps < trainer.total_steps:
        return {"finished": False, "steps_done": steps, "total_steps": trainer.total_steps}
    info = {"format": FORMAT, **run, "question_tasks": {s.name: question_task(s).name for s in specs},
            "held_out_paraphrases": held, "train_config": train_cfg.to_dict(),
            "model_config": trainer.unwrapped_model.config.to_dict(), "train_metrics": metrics, "steps": steps}
    info = _finish(trainer, source, out, info, calibration)
    trainer.publish(out, final)
    return info


def _cohort_parts(cohorts: list, source: Path, specs: list, seed: int, train_indices: Sequence | None,
                  splits: Sequence | None) -> list:
    """Each cohort checked against the source's grid, split, and turned into its training rows."""
    preprocess = json.loads((source / PREPROCESS_FILE).read_text())
    indices, given = _per_cohort(train_indices, "train_indices", cohorts), _per_cohort(splits, "splits", cohorts)
    for cohort in cohorts:
        _check_grid(cohort, source, preprocess)
    return [cohort_targets(c, specs, seed, i, s) for c, i, s in zip(cohorts, indices, given)]


def _check_adaptation(lm: FMRILanguageModel, weights: Path, lora: bool | None) -> None:
    mode = "LoRA" if lm.config.lora else "full fine-tuning" if lm.config.full_finetune else "a frozen LLM"
    if lora is not None and bool(lora) != lm.config.lora:
        raise FmrilmError(f"lora={lora} but {weights} was trained with {mode}, which Stage 3 keeps; pass lora=None "
                          f"(or align again with the adaptation you want)")


def _per_cohort(values: Sequence | None, name: str, cohorts: list) -> list:
    values = list(values) if values is not None else [None] * len(cohorts)
    if len(values) != len(cohorts):
        raise FmrilmError(f"{name} has {len(values)} entries for {len(cohorts)} cohorts; give one per cohort")
    return values


def _finish(trainer: Trainer, source: Path, out: Path, info: dict, calibration: str | None) -> dict:
    """Main process: the model, preprocess.json and tokenizer/, calibration.json, then instruct.json last."""
    import shutil

    from accelerate.utils import broadcast_object_list

    box: list = [None]
    if trainer.accelerator.is_main_process:
        _save_model(trainer.unwrapped_model.eval(), out)
        shutil.copy2(source / PREPROCESS_FILE, out / PREPROCESS_FILE)
        _copy_tokenizer(source / TOKENIZER_DIR, out / TOKENIZER_DIR)
        if calibration is not None:
            from fmrilm.instruct.evaluate import calibrate_model

            calibrate_model(out, info, calibration)
        info = {**info, "fmrilm_version": __version__,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        write_json_atomic(out / INFO_FILE, info)
        box[0] = info
    broadcast_object_list(box)
    return box[0]


# ------------------------------------------------------------------------------------------------ few-shot
def few_shot_finetune(inst_dir: str | os.PathLike, cohort: str | os.PathLike, task: str, k: int, seed: int,
                      out: str | os.PathLike, budget_steps: int = 20, *, paradigms: Sequence[str] = ("single",),
                      train: Mapping | None = None, overwrite: bool = False) -> dict:
    """k-shot fine-tuning of a model on ``k`` labelled training scans, balanced by label, for a fixed budget.

    The split is the source's own split of ``cohort`` when it trained on it (so no test subject of that split
    was ever trained on), else a new one made with ``seed``; ``seed`` also picks the k scans
    (:func:`fmrilm.evaluate.protocol.few_shot_indices`, nested in k). One batch holds all k scans, so the
    run takes exactly ``budget_steps`` optimizer steps.

    Parameters
    ----------
    inst_dir : source model (an instruct or align output).
    cohort, task : the cohort and registry task of the shots (a regression task is balanced over its bins).
    k, seed : number of shots and the seed choosing them.
    out : output directory (an instruct output).
    budget_steps : optimizer steps.
    paradigms, train : paradigms to train and TrainConfig fields over the few-shot defaults.

    Returns
    -------
    dict, the ``instruct.json`` record (``cohorts[0]["train_scans"]`` are the k shots).
    """
    from fmrilm.evaluate.protocol import few_shot_indices, targets

    spec = check_tasks([task])[0]
    split = _source_split(Path(inst_dir), Path(cohort))
    part = cohort_targets(cohort, [spec], seed, split=split)
    y, mask = targets(cohort, question_task(spec), train=part.split.train)
    labelled = [i for i in part.split.train if mask[i]]
    shots = few_shot_indices(labelled, y, k, seed)
    settings = {"batch_size": int(k), "epochs": int(budget_steps), "warmup_ratio": 0.0, "log_every": 1,
                **dict(train or {})}
    return run_instruct(cohort, inst_dir, out, tasks=[spec.name], paradigms=paradigms, seed=seed, train=settings,
                        overwrite=overwrite, train_indices=[shots.tolist()], splits=[part.split])


def _source_split(source: Path, cohort: Path) -> Split | None:
    """The split of ``cohort`` the source instruct model trained on, or None."""
    if not (source / INFO_FILE).is_file():
        return None
    for record in json.loads((source / INFO_FILE).read_text())["cohorts"]:
        if Path(record["path"]) == cohort.resolve():
            return Split.from_dict(record["split"])
    return None
