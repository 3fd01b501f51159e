"""`megabert export onnx`: write a model folder as an ONNX file (see megabert.inference.export)."""

from __future__ import annotations

import argparse

from megabert import task_table

DESCRIPTION = """\
Export a model folder to ONNX for onnxruntime, TensorRT and other runtimes.

The graph takes input_ids, attention_mask and token_type_ids (int64, (batch, sequence); for
multiple-choice (batch, choices, sequence)) with dynamic batch and sequence axes (sequence up
to max_position_embeddings), and returns the outputs named as in transformers: logits,
start_logits/end_logits, last_hidden_state/pooler_output, prediction_logits/
seq_relationship_logits. It computes the reference's values at every position, pads included.

Needs the onnx and onnxscript packages (pip install 'megabert[onnx]'). With onnxruntime
installed, the file is checked against PyTorch on a batch of another shape before it is
written; a failed export or check leaves no file behind."""

EPILOG = """\
example:
  megabert export onnx my-mlm/ my-mlm.onnx --task fill-mask
  megabert export onnx squad-model/ qa.onnx                    # task from config.json
  megabert export onnx sst2-model/ sst2.onnx --static --batch-size 1 --seq-length 128

  python -c "import onnxruntime as ort; s = ort.InferenceSession('my-mlm.onnx'); \\
      print([i.name for i in s.get_inputs()], [o.name for o in s.get_outputs()])"
"""

# The same as megabert.inference.export.TASK_CHOICES, built here from the task table (which
# imports no torch) so that `megabert --help` stays fast (tests/test_export.py checks that the two agree).
TASK_CHOICES = (
    "auto", *task_table.aliases(task_table.EXPORT_OPTION), *task_table.names(task_table.EXPORT_OPTION),
)
TASK_HELP = "which model to export: auto (the class named in config.json; default), " + ", ".join(
    " / ".join((*task.alias_names(task_table.EXPORT_OPTION), task.name))
    for task in task_table.tasks(task_table.EXPORT_OPTION)
)

def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export`` subcommand and its ``onnx`` format."""
    parser = subparsers.add_parser(
        "export",
        help="export a model to another format (onnx)",
        description="Export a model folder to another format. Formats: onnx.",
        epilog="example:\n  megabert export onnx my-mlm/ my-mlm.onnx --task fill-mask",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    formats = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)
    onnx = formats.add_parser(
        "onnx",
        help="an ONNX file with dynamic batch and sequence axes",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    onnx.add_argument("model", metavar="MODEL", help="model folder (config.json + weights)")
    onnx.add_argument("output", metavar="OUT.onnx", help="the ONNX file to write")
    onnx.add_argument("--task", choices=TASK_CHOICES, default="auto", metavar="TASK", help=TASK_HELP)
    onnx.add_argument("--opset", type=int, default=18, metavar="N", help="ONNX operator set, 14-23 (default 18)")
    onnx.add_argument(
        "--static", action="store_true",
        help="fixed input shapes (--batch-size x --seq-length) instead of dynamic axes",
    )  # fmt: skip
    onnx.add_argument(
        "--batch-size", type=int, default=2, metavar="B",
        help="batch of the example input (the fixed batch with --static; default 2)",
    )  # fmt: skip
    onnx.add_argument(
        "--seq-length", type=int, default=16, metavar="L",
        help="length of the example input (the fixed length with --static; default 16)",
    )  # fmt: skip
    onnx.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    onnx.add_argument("--overwrite", action="store_true", help="replace OUT.onnx if it exists")
    onnx.add_argument("--quiet", action="store_true", help="no progress bar")
    onnx.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Export, then print one line saying what was written and how it was checked."""
    from megabert.inference.export import export_onnx

    result = export_onnx(
        args.model,
        args.output,
        task=args.task,
        opset=args.opset,
        dynamic=not args.static,
        batch_size=args.batch_size,
        sequence_length=args.seq_length,
        verify=not args.no_verify,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(result.summary())
    return 0
