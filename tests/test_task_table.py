"""megabert.task_table: the one table of tasks, and the tables elsewhere that are views of it."""

from __future__ import annotations

import pytest

from megabert import task_table
from megabert.errors import UserError


def test_every_name_resolves_to_its_task():
    # Hand-written: the names users type today, per place they type them.
    expected = {
        (task_table.PIPELINE, "sentiment-analysis"): "sequence-classification",
        (task_table.PIPELINE, "text-classification"): "sequence-classification",
        (task_table.PIPELINE, "embeddings"): "base",
        (task_table.PIPELINE, "nsp"): "next-sentence",
        (task_table.PIPELINE, "ner"): "token-classification",
        (task_table.FINETUNE, "squad"): "question-answering",
        (task_table.FINETUNE, "classification"): "sequence-classification",
        (task_table.FINETUNE, "ner"): "token-classification",
        (task_table.EXPORT, "fill-mask"): "masked-lm",
        (task_table.EXPORT, "qa"): "question-answering",
        (task_table.MODEL, "multiple-choice"): "multiple-choice",
    }
    for (purpose, name), task in expected.items():
        assert task_table.resolve_task(name, purpose).name == task, (purpose, name)


def test_unknown_names_are_user_errors_listing_the_choices():
    with pytest.raises(UserError, match=r"unknown task 'sentiment'.*text-classification.*aliases: .*sentiment-analysis"):
        task_table.resolve_task("sentiment", task_table.PIPELINE)
    # A pipeline-only alias is not a fine-tuning task.
    with pytest.raises(UserError, match="unknown task 'embeddings'"):
        task_table.resolve_task("embeddings", task_table.FINETUNE)
    with pytest.raises(UserError):
        task_table.resolve_task(None, task_table.MODEL)  # type: ignore[arg-type]


def test_consumer_tables_are_views_of_the_table():
    from megabert.commands import export as export_command
    from megabert.commands import finetune as finetune_command
    from megabert.data import tasks as data_tasks
    from megabert.inference import export, loading, pipelines
    from megabert.modeling.heads import MODEL_CLASSES

    assert set(MODEL_CLASSES) == {task.name for task in task_table.TASKS}
    assert {name: cls.__name__ for name, cls in MODEL_CLASSES.items()} == {
        task.name: task.model_class for task in task_table.TASKS
    }
    assert set(pipelines.TASKS) == {
        "feature-extraction", "fill-mask", "next-sentence", "text-classification",
        "token-classification", "question-answering", "multiple-choice",
    }  # fmt: skip
    assert pipelines.TASKS["text-classification"][1:] == ("sequence-classification", "classifier")
    assert data_tasks.TASKS == finetune_command.TASK_CHOICES == (
        "sequence-classification", "token-classification", "question-answering", "multiple-choice",
    )  # fmt: skip
    assert set(export.TASK_CHOICES) == set(export_command.TASK_CHOICES)
    assert export.EXPORT_TASKS["pretraining"].outputs == ("prediction_logits", "seq_relationship_logits")
    assert set(loading.CLASSIFIER_MODELS) == {
        "MegatronBertForSequenceClassification", "MegatronBertForTokenClassification", "MegatronBertForMultipleChoice",
    }  # fmt: skip


def test_check_covers_names_what_is_missing():
    with pytest.raises(RuntimeError, match=r"missing \['multiple-choice'\], extra \['regression'\]"):
        task_table.check_covers(
            ["sequence-classification", "token-classification", "question-answering", "regression"],
            task_table.FINETUNE, "a reader table",
        )  # fmt: skip


def test_heads_in_checkpoint_reads_the_table():
    from megabert.modeling.heads import heads_in_checkpoint

    keys = ["bert.embeddings.word_embeddings.weight", "cls.predictions.bias", "classifier.weight", "bert.pooler.dense.weight"]
    assert heads_in_checkpoint(keys) == ["masked-lm", "classifier", "pooler"]


def test_serve_picks_the_classifier_model_from_the_architecture():
    from megabert.serving.app import _model_task

    assert _model_task(["classifier"], ["MegatronBertForMultipleChoice"]) == "multiple-choice"
    assert _model_task(["classifier"], ["MegatronBertForTokenClassification"]) == "token-classification"
    assert _model_task(["classifier"], None) == "sequence-classification"
    assert _model_task(["masked-lm", "next-sentence"], None) == "pretraining"
