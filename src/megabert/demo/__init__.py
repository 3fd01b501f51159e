"""Quickstart: ``python -m megabert.demo`` (``make demo``) pretrains a tiny MegatronBERT from nothing.

On a fresh machine, with no data given, it:

1. writes a corpus from the Python language reference that every Python install carries
   (``pydoc_data.topics``): one document per section, one line per paragraph of prose;
2. trains a WordPiece vocabulary on it (:func:`megabert.train_tokenizer`);
3. tokenizes it into a Megatron indexed dataset with a validation split (``megabert preprocess``);
4. pretrains the ``tiny`` model (4 layers x 256, MLM + NSP) for a few minutes on the CPU
   through the same code as ``megabert pretrain``, with the learning rate decayed to zero when
   the time ends (the schedule follows the clock);
5. prints the validation accuracy before and after, fill-mask predictions for sentences of
   documents held back from training (drawn at random, one word masked), next-sentence
   probabilities of a true and a random pair from those documents, and where the model, the
   metrics and the curves are.

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

    # Cut to the model's positions (the demo's model may be small); the first sentence is kept whole.
    encoded = tokenizer(first, second, return_tensors="pt", truncation="only_second",
                        max_length=model.config.max_position_embeddings)
    with torch.no_grad():
        out = model(**{k: encoded[k] for k in ("input_ids", "token_type_ids", "attention_mask")})
    return float(out.seq_relationship_logits[0].softmax(-1)[0])


def held_back_probes(valid_prefix: str | Path, tokenizer: Any, count: int = 3, seed: int = 0) -> dict[str, Any]:
    """Probes drawn at random from documents held back from training (not picked by hand).

    Returns ``{"fill_mask": [(masked text, the hidden word)], "pairs": [(A, true next B, random B)]}``:
    sentences of 8-30 word-pieces with one whole word (letters only) replaced by [MASK], and a
    sentence followed by its true successor and by a sentence of another held-back document.
    """
    import numpy as np

    from megabert.data.indexed import IndexedDataset

    data = IndexedDataset(valid_prefix)
    rng = np.random.default_rng(seed)
    documents = [data.document(d) for d in range(data.num_documents)]
    tokens_of = tokenizer.convert_ids_to_tokens  # ids -> word-pieces
    probes: list[tuple[str, str]] = []
    for d in rng.permutation(len(documents)):
        sentences = [s for s in documents[d] if 8 <= len(s) <= 30]
        if not sentences or len(probes) == count:
            continue
        ids = [int(t) for t in sentences[int(rng.integers(len(sentences)))]]
        pieces = tokens_of(ids)
        # Whole words: a piece that is not a continuation and is not continued, letters only.
        words = [i for i, piece in enumerate(pieces) if piece.isalpha() and len(piece) > 2
                 and (i + 1 == len(pieces) or not pieces[i + 1].startswith("##"))]
        if not words:
            continue
        position = int(words[int(rng.integers(len(words)))])
        hidden = pieces[position]
        ids[position] = tokenizer.mask_token_id
        probes.append((tokenizer.decode(ids), hidden))
    pairs: list[tuple[str, str, str]] = []
    # Consecutive sentences of 30 word-pieces at most (a pair fits the demo's 64 positions).
    short = lambda doc: [i for i in range(len(doc) - 1) if len(doc[i]) <= 30 and len(doc[i + 1]) <= 30]  # noqa: E731
    order = [int(d) for d in rng.permutation(len(documents)) if short(documents[d])]
    if len(order) >= 2:
        first_doc, other_doc = documents[order[0]], documents[order[1]]
        i = int(rng.choice(short(first_doc)))
        j = int(rng.choice([k for k in range(len(other_doc)) if len(other_doc[k]) <= 30]))
        text = lambda ids: tokenizer.decode([int(t) for t in ids])  # noqa: E731
        pairs.append((text(first_doc[i]), text(first_doc[i + 1]), text(other_doc[j])))
    return {"fill_mask": probes, "pairs": pairs}


def _fill_mask_with_pipeline(model_dir: Path, text: str) -> list[tuple[str, float]] | None:
    """Use megabert's fill-mask pipeline when it is installed (None otherwise)."""
    try:
        from megabert.inference.pipelines import pipeline
    except ImportError:
        return None
    results = pipeline("fill-mask", model=str(model_dir))(text, top_k=5)
    return [(r["token_str"], float(r["score"])) for r in results]


# ------------------------------------------------------------------------------------- run
def calibrate_steps(
    config: Any, batch_size: int, seq_length: int, budget_s: float, limits: tuple[int, int] = (30, 5000),
    precision: str = "fp32",
) -> int:
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
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    for _ in range(6):
        start = time.perf_counter()
        with autocast:
            loss = objective(model, batch).loss
        loss.backward()
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
    lr: float = 5e-4,
    precision: str = "fp32",
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
    from megabert.train.jobs.pretrain import PretrainDataConfig, evaluate_model, run_pretraining
    from megabert.train.engine.trainer import TrainerConfig
    from megabert.train.jobs.recipes import resolve_precision

    output = Path(output)
    precision = resolve_precision(precision, "cpu")
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
    shape = build_model_config(model_config, len(MegatronBertTokenizer.from_pretrained(output / "tokenizer")), seq_length)
    if max_steps is None:
        max_steps = calibrate_steps(shape, batch_size, seq_length, max_minutes * 60, precision=precision)
    valid_prefix = output / "data" / "reference_valid"
    # The untrained model's validation scores, for the "before" line (same samples and masks as
    # the run's own evaluations).
    init_dir = output / "init"
    torch.manual_seed(seed)
    MegatronBertForPreTraining(shape).save_pretrained(init_dir)
    MegatronBertTokenizer.from_pretrained(output / "tokenizer").save_pretrained(init_dir)
    before = evaluate_model(init_dir, valid_prefix, seq_length=seq_length, batch_size=batch_size,
                            max_batches=10, seed=seed + 1, device="cpu")
    shutil.rmtree(init_dir)
    say(f"4/4  pretraining the {model_config} model (MLM + NSP, {precision}): up to {max_steps} steps, "
        f"at most {max_minutes:g} minutes (the learning rate decays to 0 by then)")
    result = run_pretraining(
        model_config,
        output / "tokenizer",
        PretrainDataConfig(
            data=str(output / "data" / "reference_train"), valid_data=str(valid_prefix),
            seq_length=seq_length, batch_size=batch_size, binary_task="nsp", eval_batches=10,
        ),
        TrainerConfig(
            output_dir=output / "run", max_steps=max_steps, eval_every=max(1, max_steps // 5), seed=seed,
            device="cpu", max_seconds=max_minutes * 60, precision=precision,
        ),
        optimizer=OptimizerConfig(lr=lr),
        schedule=ScheduleConfig("linear", warmup_steps=max(1, max_steps // 20), min_lr_ratio=0.0),
        checkpoints=CheckpointConfig(save_every=0, keep_last=1),
        metrics=MetricsConfig(log_every=max(1, max_steps // 30), progress=progress),
    )
    if result.final_dir is None:
        raise UserError("the demo's training was interrupted; run it again")

    model = MegatronBertForPreTraining.from_pretrained(result.final_dir).eval()
    tokenizer = MegatronBertTokenizer.from_pretrained(result.final_dir)
    probes = held_back_probes(valid_prefix, tokenizer, seed=seed)
    torch.manual_seed(seed)
    predictions = []
    for text, hidden in probes["fill_mask"]:
        top = _fill_mask_with_pipeline(result.final_dir, text) or fill_mask(model, tokenizer, text)
        predictions.append((text, hidden, top))
    nsp = []
    for a, true_b, random_b in probes["pairs"]:
        nsp.append((a, true_b, "true next sentence", next_sentence_probability(model, tokenizer, a, true_b)))
        nsp.append((a, random_b, "random sentence", next_sentence_probability(model, tokenizer, a, random_b)))

    say("")
    say(f"trained {result.train.step} steps in {time.perf_counter() - start:.0f}s "
        + (f"(stopped at the {max_minutes:g}-minute limit)" if result.train.stop_reason == "time limit" else ""))
    shown = ("mlm_accuracy", "nsp_accuracy", "mlm_loss")
    say("validation (held-back documents), before -> after training:")
    for key in shown:
        if key in before and key in result.eval_results:
            say(f"  {key:<13} {before[key]:.3f} -> {result.eval_results[key]:.3f}")
    say("\nfill-mask on held-back sentences (top 5; the hidden word in brackets):")
    for text, hidden, top in predictions:
        say(f"  {text}   [{hidden}]")
        say("    " + "  ".join(f"{token} {p:.2f}" for token, p in top))
    say("\nnext sentence (probability that B follows A), held-back documents:")
    for a, b, kind, p in nsp:
        say(f"  A: {a}\n  B ({kind}): {b}\n     -> {p:.2f}")
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
        "eval_before": before,
    }
