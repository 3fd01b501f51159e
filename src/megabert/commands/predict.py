"""The prediction commands: one subcommand per pipeline, JSON lines out.

``megabert fill-mask | next-sentence | classify | tokens | qa | choices | embed MODEL ...``

Each reads inline arguments or a file (``--input FILE``, ``-`` for stdin; plain text, JSONL,
CSV or TSV), runs the pipeline of :mod:`megabert.inference.pipelines` with batches sorted by
length, and writes one JSON object per input, in input order, to stdout or ``--output``
(written atomically). Errors name the file and line.
"""

from __future__ import annotations

import argparse
import sys
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from megabert import task_table
from megabert.errors import UserError

# (line number or None, fields echoed into the output, the pipeline's input)
Source = Iterator[tuple[int | None, dict[str, Any], Any]]


@dataclass(frozen=True)
class Command:
    """One prediction subcommand: its pipeline task, what an input is made of, and its help."""

    name: str
    task: str
    kind: str  # "text", "optional-pair", "pair", "qa", "choices"
    help: str
    description: str
    epilog: str


COMMON_EPILOG = """
input: inline arguments, or --input FILE (- for stdin), streamed in batches sorted by length.
  text   one input per line (blank lines skipped){pair_note}
  jsonl  one JSON object per line (.jsonl/.json){columns}
  csv    .csv with a header row; tsv: .tsv with a header row (fields taken verbatim)
output: one JSON object per input, in input order, to stdout or --output FILE (written
  atomically); inputs from a file carry their "line" (and "id" if the record has one).
torchrun: `torchrun --nproc-per-node N -m megabert {name} MODEL --input FILE -o OUT` splits the
  inputs into N contiguous shares, one per process (GPU cuda:LOCAL_RANK, or cores / N threads
  each on CPU); OUT is written once, by rank 0, in input order, as one process would write it.
"""

COMMANDS = (
    Command(
        "fill-mask", "fill-mask", "text",
        "the most likely tokens for each [MASK] in a text",
        "Predict the top-k tokens for every [MASK] token of each text with the masked-LM head.",
        """examples:
  megabert fill-mask my-model "The capital of France is [MASK]." --top-k 3
  megabert fill-mask my-model --input sentences.txt --output filled.jsonl

output: {"text": ..., "masks": [[{"token": id, "token_str": str, "score": p, "sequence": str}, ...], ...]}
  one list per [MASK] in text order, best first; a text without [MASK] is an error.
""",
    ),
    Command(
        "next-sentence", "next-sentence", "pair",
        "the probability that text B follows text A (NSP head)",
        "Score sentence pairs with the next-sentence-prediction head: P(B follows A).",
        """examples:
  megabert next-sentence my-model "He went to the store." --pair "He bought milk."
  megabert next-sentence my-model --input pairs.tsv --text-column first --pair-column second

output: {"text": A, "text_pair": B, "is_next": bool, "probability": P(B follows A)}
""",
    ),
    Command(
        "classify", "text-classification", "optional-pair",
        "labels and scores of texts or text pairs (sequence-classification head)",
        "Classify texts (or pairs) with a fine-tuned sequence-classification model. Scores are "
        "softmax probabilities (single-label), sigmoid probabilities (multi-label) or raw values "
        "(regression), as the model's config says; label names come from its id2label.",
        """examples:
  megabert classify sst2-model "a gripping, funny film" "a dull mess"
  megabert classify sst2-model --input /data/SST-2/dev.tsv --text-column sentence -o preds.jsonl
  megabert classify mrpc-model --input pairs.jsonl --top-k 0

output: {"text": ..., "label": best label, "score": its score} plus, with --top-k K > 1 (0 = all),
  "labels": [{"label", "score"}, ...] best first.
""",
    ),
    Command(
        "tokens", "token-classification", "text",
        "labels per token and grouped entities with character offsets (token-classification head)",
        "Tag the tokens of each text (NER, POS) and group BIO-tagged pieces into entities with "
        "character offsets into the text. Texts longer than the model are read in overlapping windows.",
        """examples:
  megabert tokens ner-model "John Smith works for Apple in Paris."
  megabert tokens ner-model --input news.txt --aggregation first -o entities.jsonl

output: {"text": ..., "entities": [{"entity_group": "PER", "score": p, "word": "john smith",
  "start": 0, "end": 10}, ...]}; with --aggregation none one entry per word-piece
  ({"entity", "score", "index", "word", "start", "end"}).
""",
    ),
    Command(
        "qa", "question-answering", "qa",
        "answer spans of questions in contexts (question-answering head)",
        "Extract the answer to each question from its context. Long contexts are read in "
        "overlapping windows; a span scores p_start * p_end as in transformers' pipeline.",
        """examples:
  megabert qa squad-model --question "Who wrote Hamlet?" --context "Hamlet was written by Shakespeare."
  megabert qa squad-model --input questions.jsonl --top-k 3 --max-answer-length 30

output: {"question": ..., "answer": text, "score": p, "start": i, "end": j} (context[start:end] is
  the answer) plus, with --top-k K > 1, "answers": [...] best first. The context is not echoed.
""",
    ),
    Command(
        "choices", "multiple-choice", "choices",
        "the best of several answers to a question (multiple-choice head)",
        "Score each (question, choice) pair with a multiple-choice model; the probabilities are "
        "a softmax over the choices of a question.",
        """examples:
  megabert choices copa-model --question "The man broke his toe. What was the cause?" \\
      --choice "He dropped a hammer on his foot." --choice "He got a hole in his sock."
  megabert choices piqa-model --input piqa.jsonl --question-column query

output: {"question": ..., "choices": [...], "label": best index, "choice": its text,
  "score": its probability, "scores": [probability of each choice]}
""",
    ),
    Command(
        "embed", "feature-extraction", "optional-pair",
        "vectors of texts: one per text (pooled) or one per token",
        "Compute text embeddings from the encoder's last layer: mean over the tokens (default), "
        "the [CLS] vector, the pooler output, or every token's vector.",
        """examples:
  megabert embed my-model "first sentence" "second sentence" --normalize
  megabert embed my-model --input corpus.txt --pooling cls -o vectors.jsonl

output: {"text": ..., "embedding": [floats]}; with --pooling none {"text": ..., "vectors": [[floats]
  per token, [CLS] and [SEP] included]}.
""",
    ),
)
_BY_NAME = {command.name: command for command in COMMANDS}
# Each command runs the pipeline the task table gives it (the help texts stay here).
if {c.name: c.task for c in COMMANDS} != {t.command: t.pipeline for t in task_table.TASKS if t.command}:
    raise RuntimeError("megabert.commands.predict.COMMANDS disagrees with megabert.task_table (command -> pipeline)")
_KIND_COLUMNS = {
    "text": "\n         keys/columns: text (or sentence); --text-column picks another",
    "optional-pair": "\n         keys/columns: text (or sentence, sentence1), optional text_pair (or sentence2)",
    "pair": "\n         keys/columns: text (or sentence1) and text_pair (or sentence2)",
    "qa": "\n         keys/columns: question and context (plain text is not accepted)",
    "choices": '\n         keys: question (or query) and choices (a list); CSV/TSV: --choices-column per choice',
}
_PAIR_NOTE = {
    "optional-pair": "; a tab separates the two texts of a pair",
    "pair": "; a tab separates text A and text B",
}


# ------------------------------------------------------------------------------- parsers
def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the seven prediction subcommands."""
    for command in COMMANDS:
        epilog = command.epilog + COMMON_EPILOG.format(
            name=command.name, pair_note=_PAIR_NOTE.get(command.kind, ""), columns=_KIND_COLUMNS[command.kind]
        )
        parser = subparsers.add_parser(
            command.name,
            help=command.help,
            description=command.description,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_common(parser, command)
        _add_task_options(parser, command)
        parser.set_defaults(run=run, command_spec=command)


def _add_common(parser: argparse.ArgumentParser, command: Command) -> None:
    parser.add_argument("model", metavar="MODEL", help="model folder (config.json, weights and tokenizer files)")
    if command.kind in ("text", "optional-pair", "pair"):
        parser.add_argument("texts", nargs="*", metavar="TEXT", help="texts to run on (instead of --input)")
    if command.kind in ("optional-pair", "pair"):
        parser.add_argument(
            "--pair", action="append", default=[], metavar="TEXT",
            help="second text of a pair, once per TEXT in the same order",
        )  # fmt: skip
    if command.kind in ("qa", "choices"):
        parser.add_argument(
            "--question", action="append", default=[], metavar="TEXT",
            help="a question (instead of --input)" + (", once per --context" if command.kind == "qa" else ""),
        )  # fmt: skip
    if command.kind == "qa":
        parser.add_argument("--context", action="append", default=[], metavar="TEXT", help="the context of each --question")
    if command.kind == "choices":
        parser.add_argument("--choice", action="append", default=[], metavar="TEXT", help="a choice for --question (repeat)")

    group = parser.add_argument_group("input and output")
    group.add_argument("--input", "-i", metavar="FILE", help="read inputs from FILE (- for stdin)")
    group.add_argument("--format", choices=("text", "jsonl", "csv", "tsv"), help="input format (default: from the extension; text for stdin)")
    if command.kind in ("text", "optional-pair", "pair"):
        group.add_argument("--text-column", metavar="NAME", help="JSONL key / CSV column of the text")
    if command.kind in ("optional-pair", "pair"):
        group.add_argument("--pair-column", metavar="NAME", help="JSONL key / CSV column of the second text")
    if command.kind in ("qa", "choices"):
        group.add_argument("--question-column", metavar="NAME", help="JSONL key / CSV column of the question")
    if command.kind == "qa":
        group.add_argument("--context-column", metavar="NAME", help="JSONL key / CSV column of the context")
    if command.kind == "choices":
        group.add_argument(
            "--choices-column", action="append", metavar="NAME",
            help="JSONL key holding the list of choices (default choices), or a CSV column per choice (repeat)",
        )  # fmt: skip
    group.add_argument("--id-column", default="id", metavar="NAME", help="key/column echoed as \"id\" when present (default id)")
    group.add_argument("--output", "-o", metavar="FILE", help="write JSON lines to FILE (atomically) instead of stdout")
    group.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    group = parser.add_argument_group("model and batching")
    group.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: the model folder)")
    group.add_argument("--batch-size", type=int, default=32, metavar="N", help="rows per forward pass (default 32)")
    group.add_argument("--device", default=None, metavar="DEV", help="cpu, cuda, cuda:1... (default: cuda if available)")
    group.add_argument(
        "--dtype", default=None, choices=("float32", "bfloat16", "float16", "auto"),
        help="weights and compute type (default float32; auto: as the folder records)",
    )  # fmt: skip
    group.add_argument(
        "--threads", type=int, default=None, metavar="N",
        help="CPU threads (default: torch's, from OMP_NUM_THREADS; under torchrun cores / processes per node)",
    )  # fmt: skip


def _add_task_options(parser: argparse.ArgumentParser, command: Command) -> None:
    group = parser.add_argument_group(f"{command.name} options")
    if command.name == "fill-mask":
        group.add_argument("--top-k", type=int, default=5, metavar="K", help="tokens per mask (default 5)")
        group.add_argument("--target", action="append", metavar="TOKEN", help="score only these vocabulary tokens (repeat)")
    elif command.name == "classify":
        group.add_argument("--top-k", type=int, default=1, metavar="K", help="also list the K best labels; 0 = all (default 1)")
        group.add_argument(
            "--function", choices=("softmax", "sigmoid", "none"),
            help="score function (default: from the config: softmax, sigmoid for multi-label, none for regression)",
        )  # fmt: skip
    elif command.name == "tokens":
        group.add_argument(
            "--aggregation", default="simple", choices=("none", "simple", "first", "average", "max"),
            help="none: every word-piece; simple: BIO groups of pieces; first/average/max: label words, then group (default simple)",
        )  # fmt: skip
        group.add_argument("--ignore-labels", nargs="*", default=["O"], metavar="LABEL", help="labels left out (default O)")
        group.add_argument("--stride", type=int, metavar="N", help="overlap in tokens of the windows over long texts (default: a quarter window)")
    elif command.name == "qa":
        group.add_argument("--top-k", type=int, default=1, metavar="K", help="answers per question (default 1)")
        group.add_argument("--max-answer-length", type=int, default=15, metavar="N", help="longest answer in tokens (default 15)")
        group.add_argument("--max-seq-length", type=int, metavar="N", help="window length in tokens, question included (default min(384, model))")
        group.add_argument("--doc-stride", type=int, metavar="N", help="overlap of the windows in tokens (default min(128, half a window))")
        group.add_argument("--handle-impossible", action="store_true", help="allow the empty answer (SQuAD v2 models)")
        group.add_argument("--no-align-to-words", action="store_true", help="keep the exact token span instead of whole words")
    elif command.name == "embed":
        group.add_argument("--pooling", default="mean", choices=("mean", "cls", "pooler", "none"), help="one vector per text, or none: per token (default mean)")
        group.add_argument("--normalize", action="store_true", help="scale vectors to unit L2 norm")
    if command.name in ("fill-mask", "next-sentence", "classify", "choices", "embed"):
        group.add_argument(
            "--truncate", action="store_true",
            help="cut inputs longer than the model (default: such an input is an error)",
        )  # fmt: skip


def _pipeline_params(command: Command, args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline call parameters the options ask for."""
    name = command.name
    params: dict[str, Any] = {}
    if hasattr(args, "truncate"):
        params["truncation"] = args.truncate
    if name == "fill-mask":
        params.update(top_k=args.top_k, targets=args.target)
    elif name == "classify":
        if args.top_k < 0:
            raise UserError(f"--top-k must be >= 0 (0 = all labels), got {args.top_k}")
        params.update(top_k=args.top_k or None, function_to_apply=args.function)
    elif name == "tokens":
        params.update(aggregation_strategy=args.aggregation, ignore_labels=args.ignore_labels, stride=args.stride)
    elif name == "qa":
        params.update(
            top_k=args.top_k,
            max_answer_len=args.max_answer_length,
            max_seq_len=args.max_seq_length,
            doc_stride=args.doc_stride,
            handle_impossible_answer=args.handle_impossible,
            align_to_words=not args.no_align_to_words,
        )
    elif name == "embed":
        params.update(pooling=None if args.pooling == "none" else args.pooling, normalize=args.normalize)
    return params


# ------------------------------------------------------------------------------- inputs
def _inline_inputs(command: Command, args: argparse.Namespace) -> list[tuple[None, dict[str, Any], Any]] | None:
    """Inputs given as arguments, or None when there are none."""
    kind = command.kind
    if kind in ("text", "optional-pair", "pair"):
        texts, pairs = args.texts, getattr(args, "pair", [])
        if not texts and not pairs:
            return None
        if kind == "pair" and len(pairs) != len(texts):
            raise UserError(f"give one --pair per TEXT: got {len(texts)} TEXT and {len(pairs)} --pair")
        if kind == "optional-pair" and pairs and len(pairs) != len(texts):
            raise UserError(f"give one --pair per TEXT, or none: got {len(texts)} TEXT and {len(pairs)} --pair")
        if not pairs:
            return [(None, {"text": t}, t) for t in texts]
        return [(None, {"text": t, "text_pair": p}, (t, p)) for t, p in zip(texts, pairs)]
    questions = args.question
    if kind == "qa":
        if not questions and not args.context:
            return None
        if len(questions) != len(args.context):
            raise UserError(f"give one --context per --question: got {len(questions)} and {len(args.context)}")
        return [(None, {"question": q}, {"question": q, "context": c}) for q, c in zip(questions, args.context)]
    if not questions and not args.choice:
        return None
    if len(questions) != 1 or len(args.choice) < 2:
        raise UserError("inline multiple choice takes one --question and at least two --choice")
    q, choices = questions[0], list(args.choice)
    return [(None, {"question": q, "choices": choices}, {"question": q, "choices": choices})]


# Default keys/columns, in order of preference, when no --*-column option names one.
_DEFAULT_COLUMNS = {
    "text": ("text", "sentence", "sentence1"),
    "pair": ("text_pair", "sentence2"),
    "question": ("question", "query"),
    "context": ("context",),
    "choices": ("choices",),
}
# The fields of an input of each kind; "?" marks an optional one.
_KIND_FIELDS = {
    "text": ("text",),
    "optional-pair": ("text", "pair?"),
    "pair": ("text", "pair"),
    "qa": ("question", "context"),
    "choices": ("question", "choices"),
}


class RecordConverter:
    """Turns JSONL/CSV/TSV records into pipeline inputs: finds each field's key/column, checks values.

    CSV/TSV columns are resolved once from the header (so a missing column is reported before
    the model loads); JSONL keys are resolved per record, and errors name the line.
    """

    def __init__(self, command: Command, args: argparse.Namespace, fmt: str) -> None:
        self.kind = command.kind
        self.fmt = fmt
        self.id_column = args.id_column
        self.options = {
            "text": getattr(args, "text_column", None),
            "pair": getattr(args, "pair_column", None),
            "question": getattr(args, "question_column", None),
            "context": getattr(args, "context_column", None),
        }
        self.choice_columns: list[str] | None = getattr(args, "choices_column", None)
        self.fixed: dict[str, Any] | None = None

    def set_header(self, header: list[str], where: str) -> None:
        """Resolve the columns of a CSV/TSV file once."""
        self.fixed = self.resolve(header, where, "column")

    def resolve(self, names: list[str], where: str, noun: str) -> dict[str, Any]:
        """Field -> key/column (a list of columns for choices given one per column)."""
        columns: dict[str, Any] = {}
        for spec in _KIND_FIELDS[self.kind]:
            field = spec.rstrip("?")
            if field == "choices" and (self.fmt in ("csv", "tsv") or len(self.choice_columns or ()) > 1):
                if not self.choice_columns:
                    raise UserError(f"{where}: CSV/TSV multiple choice needs --choices-column, once per choice column")
                missing = [c for c in self.choice_columns if c not in names]
                if missing:
                    raise UserError(f"{where}: no {noun} {missing[0]!r} for a choice ({noun}s present: {', '.join(names)})")
                columns[field] = list(self.choice_columns)
                continue
            option = self.choice_columns[0] if field == "choices" and self.choice_columns else self.options.get(field)
            columns[field] = _column(names, option, field, not spec.endswith("?"), where, noun)
        return columns

    def convert(self, record: dict[str, Any], line: int, where: str) -> tuple[dict[str, Any], Any]:
        """(fields echoed into the output, pipeline input) of one record."""
        columns = self.fixed if self.fixed is not None else self.resolve(list(record), where, "key")
        echo: dict[str, Any] = {"line": line}
        if self.id_column in record:
            echo["id"] = record[self.id_column]

        def text(column: str) -> str:
            value = record[column]
            if not isinstance(value, str):
                raise UserError(f"{where}: {column!r} must be a string, got {type(value).__name__}")
            return value

        if self.kind in ("text", "optional-pair", "pair"):
            echo["text"] = text(columns["text"])
            if not columns.get("pair"):
                return echo, echo["text"]
            echo["text_pair"] = text(columns["pair"])
            return echo, (echo["text"], echo["text_pair"])
        echo["question"] = text(columns["question"])
        if self.kind == "qa":
            return echo, {"question": echo["question"], "context": text(columns["context"])}
        if isinstance(columns["choices"], list):
            choices = [text(c) for c in columns["choices"]]
        else:
            choices = record[columns["choices"]]
            if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
                raise UserError(f"{where}: {columns['choices']!r} must be a non-empty list of strings")
        echo["choices"] = choices
        return echo, {"question": echo["question"], "choices": choices}


def _column(names: list[str], option: str | None, field: str, required: bool, where: str, noun: str) -> str | None:
    """The key/column to read ``field`` from, checked against the names present."""
    candidates = (option,) if option else _DEFAULT_COLUMNS[field]
    for candidate in candidates:
        if candidate in names:
            return candidate
    if not required and not option:
        return None
    wanted = " or ".join(repr(c) for c in candidates)
    present = ", ".join(names) if names else "none"
    raise UserError(f"{where}: no {noun} {wanted} for the {field} ({noun}s present: {present}); pick one with --{field}-column")


def _file_converter(command: Command, args: argparse.Namespace, source: str, fmt: str) -> RecordConverter:
    """Check what can be checked now (format, CSV header); the converter of the file's records."""
    from megabert.inference.io import table_header

    name = "<stdin>" if source == "-" else source
    if fmt == "text" and command.kind in ("qa", "choices"):
        raise UserError(f"{command.name} reads JSONL, CSV or TSV input (it needs named fields), not plain text: {name}")
    converter = RecordConverter(command, args, fmt)
    header = table_header(source, fmt)
    if header:  # an empty file is reported later as "no inputs"
        converter.set_header(header, name)
    return converter


def _file_inputs(command: Command, args: argparse.Namespace, source: str, fmt: str) -> Source:
    """Check what can be checked now (format, CSV header), then return the stream of (line, echo, input)."""
    converter = _file_converter(command, args, source, fmt)
    return _records(command.kind, converter, source, fmt, "<stdin>" if source == "-" else source)


def _records(
    kind: str, converter: RecordConverter, source: str, fmt: str, name: str, start: int = 0, stop: int | None = None
) -> Source:
    """The inputs ``start`` (0-based) to ``stop`` (excluded; None: to the end) of the file.

    The records before ``start`` are read (so line numbers, and errors of the file itself,
    stay those of the whole file) but not converted; reading ends at ``stop``.
    """
    from megabert.inference.io import read_records

    if stop is not None and stop <= start:
        return
    for index, (line, record) in enumerate(read_records(source, fmt)):
        if index < start:
            continue
        if stop is not None and index >= stop:
            return
        where = f"{name}:{line}"
        if fmt != "text":
            echo, value = converter.convert(record, line, where)
            yield line, echo, value
            continue
        text = record["text"]
        if kind == "pair" and "\t" not in text:
            raise UserError(f"{where}: expected two texts separated by a tab")
        if kind in ("pair", "optional-pair") and "\t" in text:
            first, second = text.split("\t", 1)
            yield line, {"line": line, "text": first, "text_pair": second}, (first, second)
        else:
            yield line, {"line": line, "text": text}, text


def _limit_input(value: Any, max_tokens: int, where: str, truncate: bool) -> Any:
    """``value`` with each of its texts within the character cap of ``max_tokens`` tokens (see text_limits).

    Applied before tokenizing, so that one huge line costs no more than the model can read of
    it: refused (naming ``where`` and the limit) unless ``truncate``, then cut.
    """
    from megabert.data.text_limits import limit_text

    if isinstance(value, str):
        return limit_text(value, max_tokens, where, truncate)
    if isinstance(value, tuple):
        return tuple(limit_text(t, max_tokens, where, truncate, "text pair" if i else "text") for i, t in enumerate(value))
    if isinstance(value, dict) and "choices" in value:
        return {
            **value,
            "question": limit_text(value["question"], max_tokens, where, truncate, "question"),
            "choices": [limit_text(c, max_tokens, where, truncate, f"choice {i + 1}") for i, c in enumerate(value["choices"])],
        }
    return value


# ------------------------------------------------------------------------------ outputs
def _format(command: Command, result: Any, params: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's result as the fields of an output line."""
    name = command.name
    if name == "fill-mask":
        # One mask gives a flat list in the Python API; the file format always nests per mask.
        masks = result if result and isinstance(result[0], list) else [result]
        return {"masks": masks}
    if name == "classify":
        if isinstance(result, dict):
            return result
        return {"label": result[0]["label"], "score": result[0]["score"], "labels": result}
    if name == "tokens":
        return {"entities": result}
    if name == "qa":
        if isinstance(result, dict):
            return result
        return {**result[0], "answers": result}
    if name == "embed":
        return {"vectors" if params.get("pooling") is None else "embedding": result}
    return result


def _progress(total: int | None, quiet: bool, desc: str | None = None) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit=" inputs", disable=quiet, file=sys.stderr, dynamic_ncols=True, mininterval=0.5,
    )  # fmt: skip


@dataclass
class Job:
    """A checked prediction run, before any model is loaded: the command, its parameters, its inputs."""

    command: Command
    params: dict[str, Any]
    source_name: str  # "arguments", "<stdin>" or the file name, as errors name it
    total: int | None  # inputs (a count of non-blank lines for a file); None for stdin
    quiet: bool
    inline: list[tuple[None, dict[str, Any], Any]] | None = None
    input: str | None = None
    fmt: str | None = None
    converter: RecordConverter | None = None

    def inputs(self, start: int = 0, stop: int | None = None) -> Source:
        """(line, echo, input) of inputs ``start`` to ``stop`` (0-based, stop excluded; None: to the end)."""
        if self.inline is not None:
            return iter(self.inline[start:stop])
        assert self.input is not None and self.fmt is not None and self.converter is not None
        return _records(self.command.kind, self.converter, self.input, self.fmt, self.source_name, start, stop)

    def no_inputs(self) -> UserError:
        return UserError(f"{self.source_name}: no inputs (the file is empty or has only blank lines)")


def prepare_job(args: argparse.Namespace) -> Job:
    """Check the arguments, the model folder and the input file (header included); load nothing."""
    from megabert.inference.io import check_source, count_records, detect_format
    from megabert.inference.loading import check_model_folder

    command: Command = args.command_spec
    inline = _inline_inputs(command, args)
    if inline is not None and args.input is not None:
        raise UserError("give inputs as arguments or with --input, not both")
    if inline is None and args.input is None:
        raise UserError(f"no input: give texts as arguments or --input FILE (- for stdin); see megabert {command.name} --help")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    params = _pipeline_params(command, args)
    check_model_folder(args.model)
    if inline is not None:
        return Job(command, params, "arguments", len(inline), True, inline=inline)
    check_source(args.input)
    fmt = detect_format(args.input, args.format)
    source_name = "<stdin>" if args.input == "-" else args.input
    converter = _file_converter(command, args, args.input, fmt)
    return Job(
        command, params, source_name, count_records(args.input, fmt), args.quiet,
        input=args.input, fmt=fmt, converter=converter,
    )  # fmt: skip


def load_pipeline(job: Job, args: argparse.Namespace, device: Any = None) -> Any:
    """The pipeline of the job's command (``device``: default ``--device``)."""
    from megabert.inference.pipelines import pipeline

    return pipeline(
        job.command.task, args.model, args.tokenizer, device=args.device if device is None else device,
        dtype=args.dtype, batch_size=args.batch_size,
    )  # fmt: skip


def predict_rows(
    job: Job,
    pipe: Any,
    out: Any,
    start: int = 0,
    stop: int | None = None,
    *,
    quiet: bool | None = None,
    desc: str | None = None,
    interrupt: Callable[[], None] | None = None,
) -> int:
    """Run inputs ``start`` to ``stop`` of ``job`` through ``pipe``, one JSON line each to ``out``, in order.

    Returns how many were written. A bad input is a UserError naming the file and line (or
    ``input N``, counted over all inputs). ``interrupt`` is called before each input is read and
    after each result is written; it stops the run by raising.
    """
    from megabert.inference.base import InputError
    from megabert.inference.io import write_jsonl

    command, params, source_name = job.command, job.params, job.source_name
    pending: deque[tuple[int | None, dict[str, Any]]] = deque()  # inputs in the pipeline, not yet answered
    capped = "truncation" in params  # commands that take an input whole or truncated (not in windows)
    truncate = bool(params.get("truncation"))

    def feed() -> Iterator[Any]:
        for number, (line, echo, value) in enumerate(job.inputs(start, stop), start=start + 1):
            if interrupt is not None:
                interrupt()
            if capped:
                where = f"{source_name}:{line}" if line is not None else f"input {number}"
                value = _limit_input(value, pipe.max_length, where, truncate)
            pending.append((line, echo))
            yield value

    if job.total is None:
        total = None
    else:
        total = max((job.total if stop is None else min(stop, job.total)) - start, 0)
    done = 0
    with _progress(total, job.quiet if quiet is None else quiet, desc) as bar:
        try:
            for result in pipe.stream(feed(), **params):
                _, echo = pending.popleft()
                write_jsonl(out, {**echo, **_format(command, result, params)})
                done += 1
                bar.update(1)
                if interrupt is not None:
                    interrupt()
        except InputError as exc:
            line, _ = pending[exc.index - done]
            where = f"{source_name}:{line}" if line is not None else f"input {start + exc.index + 1}"
            raise UserError(f"{where}: {exc.reason}") from None
    return done


def configure_threads(args: argparse.Namespace) -> None:
    """``--threads``; under torchrun without it, each rank takes its share of the cores.

    torchrun sets ``OMP_NUM_THREADS=1`` in its workers when it is not set, so under torchrun
    that value counts as unset; any other ``OMP_NUM_THREADS`` is kept (torch reads it itself).
    """
    import os

    threads = getattr(args, "threads", None)
    if threads is None:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return
        omp = os.environ.get("OMP_NUM_THREADS", "").strip()
        if omp and not (omp == "1" and "TORCHELASTIC_RUN_ID" in os.environ):
            return
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world) or world)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // max(local, 1))
    if threads >= 1:
        import torch

        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> int:
    """Check the inputs, load the pipeline, stream the results as JSON lines.

    Under torchrun (``WORLD_SIZE`` > 1) every rank runs a share of the inputs and rank 0 writes
    the one output (see :mod:`megabert.commands.predict_sharded`).
    """
    import os

    from megabert.inference.io import open_output

    configure_threads(args)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        from megabert.commands.predict_sharded import FileCommand, run_sharded

        return run_sharded(args, FileCommand(prepare_job, load_pipeline, predict_rows))
    job = prepare_job(args)
    pipe = load_pipeline(job, args)
    with open_output(args.output) as out:
        done = predict_rows(job, pipe, out)
        if done == 0:
            raise job.no_inputs()
    return 0


__all__ = ["COMMANDS", "Command", "Job", "load_pipeline", "predict_rows", "prepare_job", "register", "run"]
