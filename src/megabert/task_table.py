"""The one table of megabert's tasks: every name a task goes by, its model class, the heads it needs.

A task has several names, each at home somewhere else. The head that labels a text is the
model task ``sequence-classification`` (the canonical name: ``MODEL_CLASSES``, fine-tuning,
export, and every table inside megabert are keyed by it), the pipeline ``text-classification``
(transformers' pipeline name), the command ``megabert classify``, and its weights are the
``classifier`` head of ``heads_in_checkpoint``. Users may type any of them where they are
accepted today; :func:`resolve_task` turns each into its :class:`Task`.

Every other table of tasks in megabert is a view of :data:`TASKS` (a comprehension over it, or
one of the functions below). Data that belongs to one consumer (a pipeline class, a file
reader, a feature encoder, an output format) stays in that consumer, keyed by the canonical
name, and is checked against this table with :func:`check_covers` when the consumer is imported.

This module imports nothing from megabert but ``errors`` (no torch, no model code), so that
``megabert --help`` and the argument parsers can read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from megabert.errors import UserError

# --------------------------------------------------------------------------------- purposes
# Where a name is accepted. Each purpose takes some of the tasks and knows each by its
# primary name (the pipeline name for PIPELINE, the canonical name elsewhere) and by the
# aliases marked with that purpose.
MODEL = "model"  # model_class_for, MODEL_CLASSES: every task, by canonical name
PIPELINE = "pipeline"  # pipeline(), megabert serve: the tasks with a pipeline, by pipeline name
FINETUNE = "finetune"  # fine-tuning, evaluation, the task readers and feature encoders
METRICS = "metrics"  # compute_metrics
EXPORT = "export"  # export_onnx / export_model_onnx
EXPORT_OPTION = "export-option"  # the choices of `megabert export onnx --task` (fewer aliases than the API)
PURPOSES = (MODEL, PIPELINE, FINETUNE, METRICS, EXPORT, EXPORT_OPTION)
# How an error message calls a name of each purpose.
_WHAT = {MODEL: "model task", PIPELINE: "task", FINETUNE: "task", METRICS: "metric task",
         EXPORT: "export task", EXPORT_OPTION: "export task"}  # fmt: skip

# ------------------------------------------------------------------------------------ heads
# The head weights a checkpoint can hold, by the name heads_in_checkpoint reports (in the order
# it reports them), and the prefixes of their weight names.
HEADS: dict[str, tuple[str, ...]] = {
    "masked-lm": ("cls.predictions.",),
    "next-sentence": ("cls.seq_relationship.",),
    "classifier": ("classifier.",),
    "question-answering": ("qa_outputs.",),
    "pooler": ("pooler.", "bert.pooler."),
}


@dataclass(frozen=True)
class Alias:
    """Another name of a task, and the purposes that accept it."""

    name: str
    purposes: tuple[str, ...]


@dataclass(frozen=True)
class Task:
    """One task: its names, its model class, the heads it needs, what it exports."""

    name: str  # canonical: the model task (key of MODEL_CLASSES, fine-tuning and export tables)
    model_class: str  # the megabert model class (a name: this module imports no model code)
    heads: tuple[str, ...] = ()  # head weights (HEADS keys) the checkpoint must hold, first the main one
    pipeline: str | None = None  # transformers' pipeline task name; None: no pipeline
    command: str | None = None  # the `megabert COMMAND` that runs the pipeline; None: none
    aliases: tuple[Alias, ...] = ()  # every other accepted name, with where it is accepted
    export_outputs: tuple[str, ...] = ()  # ONNX outputs, in order (output fields); (): not exported
    finetune: bool = False  # `megabert finetune --task NAME` trains it
    also_runs_on: tuple[str, ...] = ()  # other tasks whose models carry this pipeline's head too

    @property
    def head(self) -> str | None:
        """The main head the checkpoint must hold (None: the encoder is enough)."""
        return self.heads[0] if self.heads else None

    def takes_part(self, purpose: str) -> bool:
        """Whether ``purpose`` knows this task at all."""
        if purpose == MODEL:
            return True
        if purpose == PIPELINE:
            return self.pipeline is not None
        if purpose in (FINETUNE, METRICS):
            return self.finetune
        if purpose in (EXPORT, EXPORT_OPTION):
            return bool(self.export_outputs)
        raise ValueError(f"unknown purpose {purpose!r}; one of {', '.join(PURPOSES)}")

    def primary(self, purpose: str) -> str:
        """The name ``purpose`` knows the task by (its pipeline name for PIPELINE)."""
        if purpose == PIPELINE:
            assert self.pipeline is not None, self.name
            return self.pipeline
        return self.name

    def alias_names(self, purpose: str) -> tuple[str, ...]:
        """The aliases ``purpose`` accepts for this task, in table order."""
        return tuple(alias.name for alias in self.aliases if purpose in alias.purposes)


_CLASSIFY = ("classifier",)
TASKS: tuple[Task, ...] = (
    Task(
        "base", "MegatronBertModel",
        pipeline="feature-extraction", command="embed",
        aliases=(Alias("embed", (PIPELINE,)), Alias("embeddings", (PIPELINE,))),
        export_outputs=("last_hidden_state", "pooler_output"),
    ),
    Task(
        "pretraining", "MegatronBertForPreTraining",
        heads=("masked-lm", "next-sentence"),
        export_outputs=("prediction_logits", "seq_relationship_logits"),
    ),
    Task(
        "masked-lm", "MegatronBertForMaskedLM",
        heads=("masked-lm",), pipeline="fill-mask", command="fill-mask",
        aliases=(Alias("fill-mask", (EXPORT, EXPORT_OPTION)),),
        export_outputs=("logits",), also_runs_on=("pretraining",),
    ),
    Task("causal-lm", "MegatronBertForCausalLM", heads=("masked-lm",)),
    Task(
        "next-sentence", "MegatronBertForNextSentencePrediction",
        heads=("next-sentence",), pipeline="next-sentence", command="next-sentence",
        aliases=(Alias("nsp", (PIPELINE,)),),
        export_outputs=("logits",), also_runs_on=("pretraining",),
    ),
    Task(
        "sequence-classification", "MegatronBertForSequenceClassification",
        heads=_CLASSIFY, pipeline="text-classification", command="classify",
        aliases=(
            Alias("sentiment-analysis", (PIPELINE,)),
            Alias("classify", (PIPELINE,)),
            Alias("sequence-classification", (PIPELINE,)),
            Alias("text-classification", (FINETUNE, METRICS, EXPORT)),
            Alias("classification", (FINETUNE,)),
        ),
        export_outputs=("logits",), finetune=True,
    ),
    Task(
        "token-classification", "MegatronBertForTokenClassification",
        heads=_CLASSIFY, pipeline="token-classification", command="tokens",
        aliases=(Alias("ner", (PIPELINE, FINETUNE, METRICS)), Alias("tokens", (PIPELINE,))),
        export_outputs=("logits",), finetune=True,
    ),
    Task(
        "question-answering", "MegatronBertForQuestionAnswering",
        heads=("question-answering",), pipeline="question-answering", command="qa",
        aliases=(Alias("qa", (PIPELINE, FINETUNE, METRICS, EXPORT)), Alias("squad", (FINETUNE, METRICS))),
        export_outputs=("start_logits", "end_logits"), finetune=True,
    ),
    Task(
        "multiple-choice", "MegatronBertForMultipleChoice",
        heads=_CLASSIFY, pipeline="multiple-choice", command="choices",
        aliases=(Alias("choices", (PIPELINE,)),),
        export_outputs=("logits",), finetune=True,
    ),
)  # fmt: skip

TASK_BY_NAME: dict[str, Task] = {task.name: task for task in TASKS}


def _names_by_purpose() -> dict[str, dict[str, Task]]:
    """purpose -> every name it accepts -> its task; an error when a name means two tasks."""
    table: dict[str, dict[str, Task]] = {}
    for purpose in PURPOSES:
        names: dict[str, Task] = {}
        for task in TASKS:
            if not task.takes_part(purpose):
                continue
            for name in (task.primary(purpose), *task.alias_names(purpose)):
                if names.setdefault(name, task) is not task:
                    raise RuntimeError(f"task table: {name!r} names both {names[name].name} and {task.name} ({purpose})")
        table[purpose] = names
    return table


def _check_table() -> None:
    """Raise RuntimeError for an entry that names an unknown head, task or purpose, or an alias no
    purpose of its task can use; or for two tasks sharing a name, model class, pipeline or command."""
    for task in TASKS:
        bad = [head for head in task.heads if head not in HEADS]
        bad += [name for name in task.also_runs_on if name not in TASK_BY_NAME]
        bad += [alias.name for alias in task.aliases
                if not alias.purposes or any(p not in PURPOSES or not task.takes_part(p) for p in alias.purposes)]
        if bad:
            raise RuntimeError(f"task table: bad entry {task.name}: {bad}")
    for field in ("name", "model_class", "pipeline", "command"):
        values = [getattr(task, field) for task in TASKS if getattr(task, field) is not None]
        if len(values) != len(set(values)):
            raise RuntimeError(f"task table: two tasks share a {field}")


_check_table()
_NAMES = _names_by_purpose()


# ------------------------------------------------------------------------------------ views
def tasks(purpose: str = MODEL) -> tuple[Task, ...]:
    """The tasks ``purpose`` knows, in table order."""
    return tuple(task for task in TASKS if task.takes_part(purpose))


def names(purpose: str = MODEL) -> tuple[str, ...]:
    """The primary names of the tasks ``purpose`` knows (pipeline names for PIPELINE)."""
    return tuple(task.primary(purpose) for task in tasks(purpose))


def aliases(purpose: str) -> dict[str, str]:
    """alias -> the primary name of its task, for the aliases ``purpose`` accepts."""
    return {alias: task.primary(purpose) for task in tasks(purpose) for alias in task.alias_names(purpose)}


def accepted_names(purpose: str) -> tuple[str, ...]:
    """Every name ``purpose`` accepts: the primary names, then the aliases."""
    return (*names(purpose), *aliases(purpose))


def resolve_task(name: str, purpose: str = MODEL) -> Task:
    """The task of ``name`` (a primary name or an alias ``purpose`` accepts).

    An unknown name is a UserError listing the names ``purpose`` accepts.
    """
    if purpose not in _NAMES:
        raise ValueError(f"unknown purpose {purpose!r}; one of {', '.join(PURPOSES)}")
    task = _NAMES[purpose].get(name) if isinstance(name, str) else None
    if task is None:
        raise UserError(unknown_task_message(name, purpose))
    return task


def unknown_task_message(name: object, purpose: str) -> str:
    """What :func:`resolve_task` says about a name ``purpose`` does not accept."""
    text = f"unknown {_WHAT[purpose]} {name!r}; choose one of {', '.join(names(purpose))}"
    others = aliases(purpose)
    return text + (f" (aliases: {', '.join(others)})" if others else "")


def get_task(name: str) -> Task:
    """The task of a canonical name (no aliases: for code, not for user input)."""
    return TASK_BY_NAME[name]


def task_of_class(class_name: str) -> Task | None:
    """The task whose model class is called ``class_name`` (None: no megabert task model)."""
    return next((task for task in TASKS if task.model_class == class_name), None)


def task_of_command(command: str) -> Task:
    """The task of a prediction command (``"classify"`` -> sequence-classification)."""
    for task in TASKS:
        if task.command == command:
            return task
    raise KeyError(f"no task runs the command {command!r}")


def commands() -> tuple[str, ...]:
    """The prediction commands, in table order."""
    return tuple(task.command for task in TASKS if task.command is not None)


def tasks_with_head(head: str) -> tuple[Task, ...]:
    """The tasks whose only head is ``head`` (e.g. the three models of the ``classifier`` head)."""
    return tuple(task for task in TASKS if task.heads == (head,))


def check_covers(keys: Iterable[str], purpose: str, what: str) -> None:
    """Raise RuntimeError unless ``keys`` are exactly the canonical names of the tasks ``purpose`` knows.

    For consumer tables keyed by task (a pipeline class per task, a reader per fine-tuning task):
    called where they are defined, so a task added to the table without its reader fails at import.
    """
    have, want = set(keys), {task.name for task in tasks(purpose)}
    if have != want:
        raise RuntimeError(
            f"{what} does not cover the {purpose} tasks of megabert.task_table: "
            f"missing {sorted(want - have)}, extra {sorted(have - want)}"
        )
