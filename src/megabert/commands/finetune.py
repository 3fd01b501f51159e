"""`megabert finetune`, `megabert evaluate`, `megabert predict-file`: task heads on files.

Thin wrappers over :func:`megabert.train.jobs.finetune.finetune` and
:func:`megabert.train.jobs.finetune.evaluate`.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from dataclasses import fields, replace
from typing import Any

from megabert import task_table

TASK_CHOICES = task_table.names(task_table.FINETUNE)  # the task heads `megabert finetune` trains

FINETUNE_DESCRIPTION = """\
Fine-tune a MegatronBERT model folder (pretrained, or only its config and tokenizer with
--random-init) for one task head, evaluating on --validation every --eval-every steps (default:
once per epoch) and at the end, and keep the best model by the validation metric.

Tasks and files:
  sequence-classification  GLUE TSV (SST-2, MRPC, STS-B, CoLA recognised by their header or
                           shape), TSV/CSV with a header, JSONL; single sentences or pairs;
                           labels from the training file (regression: --problem-type regression
                           or STS-B; multi-label: --problem-type multi_label_classification)
  token-classification     CoNLL: `word ... TAG` per line, blank line between sentences
  question-answering       SQuAD v1.1 / v2.0 JSON (long contexts in windows of --max-length
                           sharing --doc-stride tokens)
  multiple-choice          JSONL {"query", "choices", "gold"} or SWAG CSV

Validation metric (the best model's): accuracy (classification, multiple choice), F1 (MRPC,
entities, SQuAD), MCC (CoLA), mean of Pearson and Spearman (regression); --metric picks another.

Outputs in --output: best/ (the best model with its tokenizer and id2label: loads with megabert
and transformers; `megabert evaluate` it), eval_results.json (its metrics, the history, data
counts), eval_predictions.jsonl, metrics.jsonl, run_config.json, checkpoints/ (resume).

Several processes (GPUs, or CPU processes with --device cpu): launch the same command with
torchrun. --tensor-parallel T splits each layer over T ranks; the world / T data-parallel
replicas (--data-parallel ddp or fsdp) each take --batch-size examples of every step, so a
step sees batch size x replicas examples. Every rank evaluates the whole validation set; rank 0
writes best/ (one whole model) and the other outputs. See docs/distributed.md."""

FINETUNE_EPILOG = """\
examples:
  megabert finetune --task sequence-classification --model runs/tiny/final \\
      --train glue/SST-2/train.tsv --validation glue/SST-2/dev.tsv --output ft/sst2 \\
      --epochs 3 --batch-size 32 --lr 5e-5 --max-length 128 --early-stopping-patience 2
  megabert finetune --task token-classification --model runs/tiny/final \\
      --train conll2003/train.txt --validation conll2003/dev.txt --output ft/ner --bf16
  megabert finetune --task question-answering --model runs/tiny/final \\
      --train squad/train-v2.0.json --validation squad/dev-v2.0.json --output ft/squad \\
      --max-length 384 --doc-stride 128
  megabert evaluate ft/sst2/best --data glue/SST-2/dev.tsv --output ft/sst2/dev-eval
  # 2 GPUs, data parallel (16 examples per GPU = 32 per step)
  torchrun --nproc-per-node 2 -m megabert finetune --task sequence-classification \\
      --model runs/large/final --train glue/SST-2/train.tsv --validation glue/SST-2/dev.tsv \\
      --output ft/sst2-dp2 --batch-size 16
  # 4 GPUs: tensor parallel 2 x data parallel 2
  torchrun --nproc-per-node 4 -m megabert finetune --tensor-parallel 2 --task question-answering ..."""

EVALUATE_DESCRIPTION = """\
Score a fine-tuned model folder (`megabert finetune`'s best/) on a labelled file: prints the
metrics as JSON; with --output DIR also writes eval_results.json and eval_predictions.jsonl.
The task and the data options (format, columns, max length, QA windows) default to those the
model was fine-tuned with; labels must be among the model's id2label."""

EVALUATE_EPILOG = """\
example:
  megabert evaluate ft/mrpc/best --data glue/MRPC/dev.tsv --output ft/mrpc/dev-eval"""

PREDICT_DESCRIPTION = """\
Predict with a fine-tuned model folder on a whole data file in a task format (labels, if any,
are ignored): one JSON line per example, to --output or stdout. For texts on the command line
use the pipeline commands (classify, tokens, qa, choices)."""

PREDICT_EPILOG = """\
example:
  megabert predict-file ft/ner/best --data conll2003/test.txt --output ner-test.jsonl"""


# ---------------------------------------------------------------------------------- parsers
def _add_data_options(p: argparse.ArgumentParser, defaults_from_model: bool) -> None:
    """Reader and encoding options (None = the default, or the fine-tuned model's setting)."""
    note = " (default: as fine-tuned)" if defaults_from_model else ""
    g = p.add_argument_group("data format" + note)
    g.add_argument("--format", metavar="FMT",
                   help="auto (default), tsv, csv, jsonl, glue-sst2, glue-mrpc, glue-stsb, glue-cola; "
                        "multiple choice: jsonl, swag")
    g.add_argument("--text-column", metavar="COL", help="column name or 0-based index of the text")
    g.add_argument("--text-pair-column", metavar="COL", help="column of the second text of a pair")
    g.add_argument("--label-column", metavar="COL", help="column of the label")
    g.add_argument("--problem-type", choices=("single_label_classification", "regression",
                                              "multi_label_classification"),
                   help="sequence classification target (default: single label; STS-B: regression)")
    g.add_argument("--label-separator", metavar="SEP", help="multi-label separator in a text cell (default ,)")
    g.add_argument("--no-header", dest="has_header", action="store_const", const=False,
                   help="the TSV/CSV file has no header line")
    g.add_argument("--on-bad", choices=("error", "skip"),
                   help="a bad record stops with file:line (error, default) or is skipped and counted")
    g.add_argument("--max-length", type=int, metavar="N", help="word-pieces per input (default 128, or the model's positions if fewer)")
    g.add_argument("--doc-stride", type=int, metavar="N",
                   help="QA: context tokens shared by consecutive windows (default max-length/4)")
    g.add_argument("--max-question-length", type=int, metavar="N", help="QA: question word-pieces kept (default 64)")
    g.add_argument("--max-answer-length", type=int, metavar="N", help="QA: longest answer in tokens (default 30)")
    g.add_argument("--n-best", type=int, metavar="N", help="QA: candidate spans per question (default 20)")
    g.add_argument("--null-threshold", type=float, metavar="X",
                   help="QA v2: answer empty when null score - best span score > X (default 0)")
    g.add_argument("--version-2", action="store_const", const=True,
                   help="QA: allow the empty answer (default: when the data has unanswerable questions)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``finetune``, ``evaluate`` and ``predict-file`` subcommands."""
    p = subparsers.add_parser(
        "finetune", help="fine-tune a task head on a data file, keeping the best model",
        description=FINETUNE_DESCRIPTION, epilog=FINETUNE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io = p.add_argument_group("task, model and files")
    io.add_argument("--task", required=True, choices=TASK_CHOICES, help="the task head")
    io.add_argument("--model", required=True, metavar="DIR", help="model folder (config.json, weights, tokenizer)")
    io.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder, if not in --model")
    io.add_argument("--train", required=True, metavar="FILE", help="training data")
    io.add_argument("--validation", required=True, metavar="FILE", help="validation data (selects the best model)")
    io.add_argument("--output", required=True, metavar="DIR", help="output folder")
    io.add_argument("--random-init", action="store_true", help="use --model's config and tokenizer, not its weights")
    _add_data_options(p, defaults_from_model=False)

    opt = p.add_argument_group("training")
    opt.add_argument("--epochs", type=float, default=3.0, help="passes over the training data (default 3)")
    opt.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps (overrides --epochs)")
    opt.add_argument("--batch-size", type=int, default=32, metavar="B", help="examples per batch (default 32)")
    opt.add_argument("--eval-batch-size", type=int, metavar="B", help="examples per evaluation batch (default 2B)")
    opt.add_argument("--lr", type=float,
                     help="peak learning rate (default by the model's width: 3e-4 up to hidden 256, 1e-4 up to 512, "
                          "5e-5 above)")
    opt.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    opt.add_argument("--warmup-ratio", type=float, default=0.1, metavar="R", help="warmup share of the steps (default 0.1)")
    opt.add_argument("--warmup-steps", type=int, metavar="N", help="warmup steps (overrides --warmup-ratio)")
    opt.add_argument("--schedule", choices=("linear", "cosine", "constant"), default="linear",
                     help="decay after warmup (default linear)")
    opt.add_argument("--grad-accum", type=int, default=1, metavar="K", help="micro-batches per step (default 1)")
    opt.add_argument("--clip-grad", type=float, default=1.0, metavar="NORM", help="max gradient norm (0: off; default 1)")
    opt.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU and CUDA)")
    opt.add_argument("--reference-loss", action="store_true",
                     help="train on padded batches, on exactly transformers' loss (slower). By default "
                          "training skips pad tokens, which changes only the question-answering loss: "
                          "pads are left out of its start/end softmax")
    opt.add_argument("--seed", type=int, default=42, help="seed of the head init, data order and dropout (default 42)")
    opt.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    opt.add_argument("--max-train-examples", type=int, metavar="N", help="train on a random subset of N examples")
    opt.add_argument("--max-eval-examples", type=int, metavar="N", help="validate on a random subset of N examples")

    ev = p.add_argument_group("evaluation and stopping")
    ev.add_argument("--eval-every", type=int, metavar="N", help="steps between evaluations (default: once per epoch)")
    ev.add_argument("--metric", help="validation metric that picks the best model (default: by task, see above)")
    ev.add_argument("--early-stopping-patience", type=int, metavar="N",
                    help="stop after N evaluations without improvement (default: off)")
    ev.add_argument("--early-stopping-threshold", type=float, default=0.0, metavar="X",
                    help="an improvement must exceed X (default 0)")
    run_group = p.add_argument_group("run")
    run_group.add_argument("--resume", metavar="CKPT", help="'auto' (the checkpoint in --output) or a checkpoint folder")
    run_group.add_argument("--overwrite", action="store_true", help="replace an earlier run's outputs in --output")
    run_group.add_argument("--log-every", type=int, default=10, metavar="N", help="steps between train records")
    run_group.add_argument("--plot", action="store_true", help="draw curves.png (needs matplotlib)")
    run_group.add_argument("--quiet", action="store_true", help="no progress bars")
    from megabert.commands.training_options import add_training_run_arguments

    # --release-memory; --tensor-parallel, --data-parallel, --replicate-vocab, timeouts
    add_training_run_arguments(p, run_group)
    p.set_defaults(run=run_finetune)

    for name, help_text, description, epilog, labeled in (
        ("evaluate", "score a fine-tuned model on a labelled file (metrics JSON + predictions JSONL)",
         EVALUATE_DESCRIPTION, EVALUATE_EPILOG, True),
        ("predict-file", "predict with a fine-tuned model on a whole task-format file (JSONL out)",
         PREDICT_DESCRIPTION, PREDICT_EPILOG, False),
    ):
        e = subparsers.add_parser(name, help=help_text, description=description, epilog=epilog,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        e.add_argument("model", metavar="MODEL", help="fine-tuned model folder (e.g. OUT/best)")
        e.add_argument("--data", required=True, metavar="FILE", help="the data file")
        e.add_argument("--task", choices=TASK_CHOICES, help="the task head (default: the model's)")
        e.add_argument("--output", metavar="DIR" if labeled else "FILE",
                       help="folder for eval_results.json + eval_predictions.jsonl" if labeled
                       else "predictions JSONL (default: stdout)")
        _add_data_options(e, defaults_from_model=True)
        e.add_argument("--batch-size", type=int, default=64, metavar="B", help="examples per batch (default 64)")
        e.add_argument("--max-examples", type=int, metavar="N", help="a random subset of N examples")
        e.add_argument("--bf16", action="store_true", help="bf16 autocast")
        e.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
        e.add_argument("--quiet", action="store_true", help="no progress bars")
        e.set_defaults(run=run_evaluate if labeled else run_predict)


# ------------------------------------------------------------------------------------ runs
def _data_options(args: argparse.Namespace, base: Any) -> Any:
    """``base`` with every data option given on the command line replaced."""
    given = {f.name: getattr(args, f.name) for f in fields(base) if getattr(args, f.name, None) is not None}
    return replace(base, **given)


def _show(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def run_finetune(args: argparse.Namespace) -> int:
    """Build the options from the arguments, fine-tune (on every rank under torchrun), print the best metrics."""
    from megabert.commands.training_options import run_training_command

    return run_training_command(args, lambda hooks: _finetune(args, hooks), _report_finetune)


def _finetune(args: argparse.Namespace, hooks: Any) -> Any:
    """finetune() with the settings of the parsed arguments, on this rank (``hooks``)."""
    from megabert.train.jobs.finetune import DataOptions, FinetuneConfig, finetune

    config = FinetuneConfig(
        epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio, warmup_steps=args.warmup_steps, schedule=args.schedule,
        grad_accum=args.grad_accum, clip_grad=args.clip_grad if args.clip_grad and args.clip_grad > 0 else None,
        bf16=args.bf16, seed=args.seed, eval_every=args.eval_every, metric=args.metric,
        early_stopping_patience=args.early_stopping_patience,
        early_stopping_threshold=args.early_stopping_threshold,
        max_train_examples=args.max_train_examples, max_eval_examples=args.max_eval_examples,
        random_init=args.random_init, reference_loss=args.reference_loss, device=args.device, log_every=args.log_every, progress=not args.quiet,
        plot=args.plot, resume=args.resume, overwrite=args.overwrite,
    )
    return finetune(args.task, args.model, args.train, args.validation, args.output,
                    data=_data_options(args, DataOptions()), config=config, tokenizer=args.tokenizer,
                    distributed=hooks)


def _report_finetune(result: Any) -> int:
    """Print the data counts, the best metrics and the outputs (main rank); the exit status."""
    if result.interrupted:
        print(f"stopped by {result.stop_reason} at step {result.steps}; the same command with --resume auto "
              "continues", file=sys.stderr)
        return 128 + int(getattr(signal, result.stop_reason))
    for split, counts in result.data.items():
        line = f"{split}: {counts['examples']} examples"
        notes = []
        if counts["skipped"]:
            notes.append(f"{counts['skipped']} bad record{'s' if counts['skipped'] > 1 else ''} skipped, the first:"
                         f" {counts['first_skipped']}")
        if counts["truncated"]:
            notes.append(f"{counts['truncated']} cut to --max-length")
        print(line + (f" ({'; '.join(notes)})" if notes else ""))
    best = result.best_metrics.get(result.metric)
    print(f"best {result.metric} {best:.4f} at step {result.best_step} "
          f"(ran {result.steps} steps; stopped: {result.stop_reason})" if best is not None else
          f"no best {result.metric} (ran {result.steps} steps)")
    print(f"valid: {_show(result.best_metrics)}")
    print(f"model: {result.best_dir}")
    print(f"results: {result.results_file}  predictions: {result.predictions_file}")
    return 0


def _evaluate(args: argparse.Namespace, labeled: bool) -> Any:
    from megabert.train.jobs.finetune import evaluate, saved_data_options

    return evaluate(
        args.model, args.data, task=args.task, output=args.output if labeled else None,
        data=_data_options(args, saved_data_options(args.model)), labeled=labeled, batch_size=args.batch_size,
        bf16=args.bf16, device=args.device, max_examples=args.max_examples, progress=not args.quiet,
    )


def run_evaluate(args: argparse.Namespace) -> int:
    """Score the model; print the metrics as JSON."""
    result = _evaluate(args, labeled=True)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(json.dumps({"task": result.task, **result.metrics}, indent=2))
    if result.metrics_file is not None:
        print(f"results: {result.metrics_file}  predictions: {result.predictions_file}", file=sys.stderr)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    """Predict; write JSON lines to --output or stdout."""
    from megabert.train.jobs.finetune_eval import json_safe, write_jsonl

    result = _evaluate(args, labeled=False)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.output:
        path = write_jsonl(args.output, result.records)
        print(f"predictions: {path} ({len(result.records)} lines)", file=sys.stderr)
    else:
        for record in result.records:
            sys.stdout.write(json.dumps(json_safe(record), ensure_ascii=False) + "\n")
    return 0
