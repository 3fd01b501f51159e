"""Quickstart: ``python -m megabert.demo`` (``make demo``) pretrains a tiny MegatronBERT from nothing.

On a fresh machine, with no data given, it:

1. writes a corpus from the Python language reference that every Python install carries
   (``pydoc_data.topics``): one document per section, one line per paragraph of prose;
2. trains a WordPiece vocabulary on it (:func:`megabert.train_tokenizer`);
3. tokenizes it into a Megatron indexed dataset with a validation split (``megabert preprocess``);
4. pretrains the ``tiny`` model (4 layers x 256, MLM + NSP) for a few minutes on the CPU
   through the same code as ``megabert pretrain``;
5. prints fill-mask and next-sentence predictions of the trained model, and where the model,
   the metrics and the curves are.

Everything goes into ``--output`` (default ``demo-output/``); running the demo again replaces
its previous output.
"""

from __future__ import annotations

import re
import shutil
import textwrap
import time
from pathlib import Path
from typing import Any

from megabert.errors import UserError

MARKER = ".megabert-demo"
# Held-out style probes: sentences in the reference's wording, one word masked.
FILL_MASK_TEXTS = (
    "The [MASK] statement is used to iterate over the elements of a sequence.",
    "A [MASK] statement executed in the first suite terminates the loop.",
    "The value of the [MASK] is returned to the caller.",
)
NEXT_SENTENCE_PAIRS = (
    (
        "The for statement is used to iterate over the elements of a sequence.",
        "The expression list is evaluated once; it should yield an iterable object.",
    ),
    (
        "The for statement is used to iterate over the elements of a sequence.",
        "Complex numbers have a real and imaginary part, which are each a floating point number.",
    ),
)
_HEADING_RULE = re.compile(r"^(\*{3,}|={3,}|-{3,}|\^{3,}|~{3,})\s*$")


# --------------------------------------------------------------------------------- corpus
def reference_documents() -> list[list[str]]:
    """The language reference as documents (sections) of paragraphs (prose only, code left out)."""
    from pydoc_data.topics import topics

    documents: list[list[str]] = []
    for name in sorted(topics):
        lines = topics[name].splitlines()
        paragraphs: list[str] = []
        current: list[str] = []

        def flush() -> None:
            if current:
                text = " ".join(current)
                if len(text.split()) >= 4:  # headings and fragments make poor sentences
                    paragraphs.append(text)
                current.clear()

        for index, line in enumerate(lines):
            nxt = lines[index + 1] if index + 1 < len(lines) else ""
            if _HEADING_RULE.match(nxt) or _HEADING_RULE.match(line):
                # A heading (title + underline) starts a new document.
                flush()
                if paragraphs:
                    documents.append(paragraphs)
                paragraphs = []
                continue
            if not line.strip() or line.startswith((" ", "\t")):  # blank or code/grammar block
                flush()
                continue
            current.append(line.strip())
        flush()
        if paragraphs:
            documents.append(paragraphs)
    return documents


def write_corpus(folder: Path) -> Path:
    """The corpus as a text file in ``megabert preprocess``'s format (blank line between documents)."""
    documents = reference_documents()
    path = folder / "python-reference.txt"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join("\n".join(doc) for doc in documents) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ predictions
def fill_mask(model: Any, tokenizer: Any, text: str, top_k: int = 5) -> list[tuple[str, float]]:
    """The ``top_k`` tokens (and probabilities) for the first [MASK] of ``text``, specials excluded."""
    import torch

    encoded = tokenizer(text, return_tensors="pt")
    positions = (encoded["input_ids"][0] == tokenizer.mask_token_id).nonzero()
    if len(positions) == 0:
        raise UserError(f"no {tokenizer.mask_token} in {text!r}")
    with torch.no_grad():
        out = model(input_ids=encoded["input_ids"], token_type_ids=encoded["token_type_ids"],
                    attention_mask=encoded["attention_mask"])
    logits = out.prediction_logits[0, int(positions[0])]  # (vocab,)
    logits[tokenizer.all_special_ids] = float("-inf")
    logits[len(tokenizer):] = float("-inf")  # padding rows of the embedding are not tokens
    probs = logits.softmax(-1)
    top = probs.topk(top_k)
    return [(tokenizer.convert_ids_to_tokens(int(i)), float(p)) for p, i in zip(top.values, top.indices)]


def next_sentence_probability(model: Any, tokenizer: Any, first: str, second: str) -> float:
    """P(``second`` follows ``first``) from the NSP head (label 0 = continuation)."""
    import torch

    encoded = tokenizer(first, second, return_tensors="pt")
    with torch.no_grad():
        out = model(**{k: encoded[k] for k in ("input_ids", "token_type_ids", "attention_mask")})
    return float(out.seq_relationship_logits[0].softmax(-1)[0])


def _fill_mask_with_pipeline(model_dir: Path, text: str) -> list[tuple[str, float]] | None:
    """Use megabert's fill-mask pipeline when it is installed (None otherwise)."""
    try:
        from megabert.inference.pipelines import pipeline
    except ImportError:
        return None
    results = pipeline("fill-mask", model=str(model_dir))(text, top_k=5)
    return [(r["token_str"], float(r["score"])) for r in results]


# ------------------------------------------------------------------------------------- run
def calibrate_steps(config: Any, batch_size: int, seq_length: int, budget_s: float, limits: tuple[int, int] = (30, 3000)) -> int:
    """How many training steps of this model fit in ``budget_s`` seconds on this machine.

    Times a few optimizer steps on a random batch of the demo's shape, so that the learning-rate
    schedule can run its full course (warmup, decay) within the time budget. The trainer's time
    limit still stops a run that runs late (a machine busier than while it was measured).
    """
    import torch

    from megabert.modeling.heads import MegatronBertForPreTraining
    from megabert.train.engine.optim import OptimizerConfig, build_optimizer
    from megabert.train.jobs.pretrain import PretrainingObjective

    generator = torch.Generator().manual_seed(0)
    model = MegatronBertForPreTraining(config)
    optimizer = build_optimizer(model, OptimizerConfig())
    ids = torch.randint(5, config.vocab_size, (batch_size, seq_length), generator=generator)  # (B, T)
    labels = torch.where(torch.rand(batch_size, seq_length, generator=generator) < 0.15, ids, -100)
    batch = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids),
             "labels": labels, "next_sentence_label": torch.zeros(batch_size, dtype=torch.long)}
    objective = PretrainingObjective("nsp")
    times = []
    for _ in range(6):
        start = time.perf_counter()
        objective(model, batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    # The fastest step says what the machine can do (the first pays one-time costs; others may
    # have waited for another process). If the machine is busier during training, the time limit
    # ends the run early instead.
    step_s = min(times[1:])
    # ~15% for data loading, logging and evaluations.
    return int(min(max(budget_s / (step_s * 1.15), limits[0]), limits[1]))


def _prepare_output(output: Path) -> None:
    if output.exists():
        if not (output / MARKER).is_file():
            if any(output.iterdir()):
                raise UserError(f"{output} exists and was not written by the demo; choose another --output")
        else:
            shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / MARKER).write_text("written by python -m megabert.demo; safe to delete\n")


def run_demo(
    output: str | Path = "demo-output",
    *,
    model_config: str = "tiny",
    vocab_size: int = 4000,
    max_steps: int | None = None,
    max_minutes: float = 4.0,
    batch_size: int = 16,
    seq_length: int = 64,
    lr: float = 1e-3,
    seed: int = 1234,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the quickstart (see the module docstring); returns paths and predictions."""
    import torch

    from megabert.data.preprocess import preprocess_corpus
    from megabert.modeling.heads import MegatronBertForPreTraining
    from megabert.tokenization import MegatronBertTokenizer, train_tokenizer
    from megabert.train.jobs.pretrain import build_model_config
    from megabert.train.engine.checkpoint import CheckpointConfig
    from megabert.train.engine.logging import MetricsConfig
    from megabert.train.engine.optim import OptimizerConfig, ScheduleConfig
    from megabert.train.jobs.pretrain import PretrainDataConfig, run_pretraining
    from megabert.train.engine.trainer import TrainerConfig

    output = Path(output)
    _prepare_output(output)
    start = time.perf_counter()
    say = print if progress else (lambda *a, **k: None)

    say("1/4  corpus: the Python language reference (pydoc_data.topics)")
    corpus = write_corpus(output / "corpus")
    say("2/4  training a WordPiece vocabulary")
    train_tokenizer([corpus], vocab_size=vocab_size, output_dir=output / "tokenizer", show_progress=progress)
    say("3/4  tokenizing into an indexed dataset (train/valid)")
    summary = preprocess_corpus(
        [corpus], output / "data" / "reference", output / "tokenizer", split_sentences=True,
        valid_fraction=0.05, seed=seed, progress=progress,
    )
    say(textwrap.indent(summary.format(), "     "))
    if max_steps is None:
        shape = build_model_config(model_config, len(MegatronBertTokenizer.from_pretrained(output / "tokenizer")), seq_length)
        max_steps = calibrate_steps(shape, batch_size, seq_length, max_minutes * 60)
    say(f"4/4  pretraining the {model_config} model (MLM + NSP): {max_steps} steps (at most {max_minutes:g} minutes)")
    result = run_pretraining(
        model_config,
        output / "tokenizer",
        PretrainDataConfig(
            data=str(output / "data" / "reference_train"), valid_data=str(output / "data" / "reference_valid"),
            seq_length=seq_length, batch_size=batch_size, binary_task="nsp", eval_batches=10,
        ),
        TrainerConfig(
            output_dir=output / "run", max_steps=max_steps, eval_every=max(1, max_steps // 5), seed=seed,
            device="cpu", max_seconds=max_minutes * 60,
        ),
        optimizer=OptimizerConfig(lr=lr),
        schedule=ScheduleConfig("linear", warmup_steps=max(1, max_steps // 10), min_lr_ratio=0.1),
        checkpoints=CheckpointConfig(save_every=0, keep_last=1),
        metrics=MetricsConfig(log_every=max(1, max_steps // 30), progress=progress),
    )
    if result.final_dir is None:
        raise UserError("the demo's training was interrupted; run it again")

    model = MegatronBertForPreTraining.from_pretrained(result.final_dir).eval()
    tokenizer = MegatronBertTokenizer.from_pretrained(result.final_dir)
    torch.manual_seed(seed)
    predictions = []
    for text in FILL_MASK_TEXTS:
        top = _fill_mask_with_pipeline(result.final_dir, text) or fill_mask(model, tokenizer, text)
        predictions.append((text, top))
    nsp = [(a, b, next_sentence_probability(model, tokenizer, a, b)) for a, b in NEXT_SENTENCE_PAIRS]

    say("")
    say(f"trained {result.train.step} steps in {time.perf_counter() - start:.0f}s "
        + (f"(stopped at the {max_minutes:g}-minute limit)" if result.train.stop_reason == "time limit" else ""))
    if result.eval_results:
        say("validation: " + "  ".join(f"{k} {v:.3f}" for k, v in sorted(result.eval_results.items())))
    say("\nfill-mask (top 5):")
    for text, top in predictions:
        say(f"  {text}")
        say("    " + "  ".join(f"{token} {p:.2f}" for token, p in top))
    say("\nnext sentence (probability that B follows A):")
    for a, b, p in nsp:
        say(f"  A: {a}\n  B: {b}\n     -> {p:.2f}")
    say("")
    say(f"model + tokenizer: {result.final_dir}   (megabert or transformers from_pretrained)")
    say(f"metrics: {result.metrics_file}")
    if result.curves_file is not None:
        say(f"curves:  {result.curves_file}")
    else:
        say("curves:  not drawn (pip install matplotlib, or the megabert[plot] extra)")
    return {
        "final_dir": result.final_dir,
        "metrics_file": result.metrics_file,
        "curves_file": result.curves_file,
        "fill_mask": predictions,
        "next_sentence": nsp,
        "steps": result.train.step,
        "eval": result.eval_results,
    }
