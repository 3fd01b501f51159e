"""The pretraining job: model presets, the masked-position MLM (+ NSP/SOP) objective, evaluation, wiring.

Data path: ``PREFIX.bin/.idx`` (``megabert preprocess``) -> :class:`PretrainingDataset`
(``[CLS] A [SEP] B [SEP]`` samples, masking fixed by (seed, sample index)) ->
:class:`ResumableLoader` (micro-batch ``k`` holds samples ``k*B ... k*B + B - 1``, so a resume
continues at the exact sample) -> :class:`Trainer`.

The objective computes the vocabulary logits only at the masked positions: the encoder runs
on real tokens only (``unpad_inputs``), its hidden states are gathered where ``labels != -100``
(about 15% of tokens) and only those rows go through the MLM head. The loss is the same number
as the full-vocabulary loss of ``MegatronBertForPreTraining(labels=...)`` (cross-entropy over
the labelled positions), at a fraction of the cost of a ``(batch, seq, vocab)`` logits tensor.

Output folder::

    OUT/final/                 the trained model (config.json + model.safetensors) and the
                               tokenizer files: loads with megabert and transformers
    OUT/checkpoints/step-N/    the last K checkpoints (see megabert.train.engine.checkpoint)
    OUT/metrics.jsonl          train and valid records; OUT/curves.png (matplotlib);
    OUT/tensorboard/           (tensorboard installed); OUT/run_config.json (the settings)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from megabert.config import MegatronBertConfig
from megabert.errors import UserError
from megabert.tokenization import load_tokenizer
from megabert.train.engine.checkpoint import CheckpointConfig
from megabert.train.engine.logging import CURVES_FILE, METRICS_FILE, MetricsConfig
from megabert.train.engine.optim import OptimizerConfig, ScheduleConfig
from megabert.train.engine.trainer import (
    DistributedHooks,
    ResumableLoader,
    StepOutput,
    Trainer,
    TrainerConfig,
    TrainResult,
    move_to_device,
    seed_everything,
)
from megabert.utils import atomic_folder, atomic_write_text, lock_output_folder

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
VOCAB_MULTIPLE = 128  # Megatron pads the vocabulary to a multiple of 128 (fast matmuls)
FINAL_DIR = "final"
RUN_CONFIG_FILE = "run_config.json"
BINARY_TASK_CHOICES = ("nsp", "sop", "none")

# Model shapes: layers x hidden, heads; the MLP is 4 x hidden, 512 positions.
MODEL_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
    "large": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, intermediate_size=4096),
}


# ------------------------------------------------------------------------------- model config
def padded_vocab_size(size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """``size`` rounded up to a multiple of ``multiple`` (extra rows are never produced by the tokenizer)."""
    return -(-size // multiple) * multiple


def build_model_config(spec: str | os.PathLike, tokenizer_size: int, seq_length: int) -> MegatronBertConfig:
    """The model config of ``--model-config``: a preset name (tiny|base|large) or a config.json / model folder.

    Presets take the tokenizer's vocabulary padded to a multiple of 128 and 512 positions. A
    file must already fit: its vocabulary must hold every tokenizer id, and ``seq_length`` must
    not exceed its ``max_position_embeddings``; otherwise a UserError says which limit is hit.
    """
    spec_text = str(spec)
    if spec_text in MODEL_PRESETS:
        config = MegatronBertConfig(
            vocab_size=padded_vocab_size(tokenizer_size), max_position_embeddings=512, **MODEL_PRESETS[spec_text]
        )
        source = f"the {spec_text} preset"
    else:
        path = Path(spec_text)
        if not path.exists():
            raise UserError(
                f"--model-config {spec_text}: not a preset ({', '.join(MODEL_PRESETS)}) and no such file or folder"
            )
        try:
            config = MegatronBertConfig.from_pretrained(path)
        except (FileNotFoundError, ValueError) as exc:
            raise UserError(f"--model-config {spec_text}: {exc}") from None
        source = str(path)
        if config.vocab_size < tokenizer_size:
            raise UserError(
                f"the tokenizer has {tokenizer_size} ids but the model config {source} has vocab_size "
                f"{config.vocab_size}: tokenizer ids {config.vocab_size}..{tokenizer_size - 1} have no embedding. "
                f"Set vocab_size >= {tokenizer_size} (e.g. {padded_vocab_size(tokenizer_size)}) or use the matching tokenizer"
            )
    if seq_length > config.max_position_embeddings:
        raise UserError(
            f"--seq-length {seq_length} is above the model's max_position_embeddings "
            f"({config.max_position_embeddings}, from {source}): lower --seq-length"
        )
    if config.is_decoder:
        raise UserError(f"{source} is a decoder config (is_decoder=true); BERT pretraining needs an encoder")
    # Train on real tokens only: pad positions never reach a Linear layer (config.json omits this).
    config.unpad_inputs = True
    return config


def check_data_vocab(prefix: str | os.PathLike, vocab_size: int, what: str = "--data") -> tuple[int, int]:
    """Raise UserError if ``PREFIX`` does not exist or holds token ids >= ``vocab_size``.

    Returns (documents, tokens). Scans the token file once (memory-mapped, in chunks).
    """
    from megabert.data.indexed import IndexedDataset, bin_path, dataset_exists, idx_path

    if not dataset_exists(prefix):
        missing = [str(p) for p in (idx_path(prefix), bin_path(prefix)) if not p.is_file()]
        raise UserError(
            f"{what} {prefix}: no indexed dataset there ({', '.join(missing)} missing). Pass the prefix "
            "written by `megabert preprocess --output PREFIX` (without .bin/.idx; with --valid-fraction "
            "it is PREFIX_train / PREFIX_valid)"
        )
    data = IndexedDataset(prefix)
    tokens = np.memmap(bin_path(prefix), dtype=data.dtype, mode="r") if data.num_tokens else np.zeros(0, np.int64)
    chunk = 1 << 24
    for start in range(0, len(tokens), chunk):
        top = int(tokens[start : start + chunk].max())
        if top >= vocab_size:
            raise UserError(
                f"{what} {prefix} holds token id {top}, but the tokenizer/model vocabulary has {vocab_size} ids: "
                "the data was preprocessed with another tokenizer; preprocess it again with --tokenizer"
            )
    return data.num_documents, data.num_tokens


def data_fingerprint(prefix: str | os.PathLike) -> dict[str, str]:
    """What identifies an indexed dataset for a resume: its prefix (for the message) and contents.

    Contents: the sizes of PREFIX.idx and PREFIX.bin and a SHA-256 of the index (whole up to
    64 MiB; above that its first and last 16 MiB, which hold the sizes, the document index and
    the file's end). A resume compares the contents only, so a copy of the data elsewhere resumes.
    """
    import hashlib

    from megabert.data.indexed import bin_path, idx_path

    index, tokens = idx_path(prefix), bin_path(prefix)
    size = index.stat().st_size
    digest = hashlib.sha256()
    window = 16 << 20
    with open(index, "rb") as handle:
        if size <= 4 * window:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        else:
            digest.update(handle.read(window))
            handle.seek(size - window)
            digest.update(handle.read(window))
    return {
        "prefix": str(prefix),
        "content": f".idx {size:,} bytes sha256 {digest.hexdigest()[:16]}, .bin {tokens.stat().st_size:,} bytes",
    }


# ---------------------------------------------------------------------------------- objective
def pretraining_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], binary_task: str | None) -> Any:
    """``model.pretraining_loss`` on a batch of :func:`~megabert.data.pretraining.collate_pretraining`.

    The binary (NSP/SOP) labels are passed when the job has a binary task and the model its head.
    """
    with_binary = binary_task is not None and getattr(model, "add_binary_head", False)
    return model.pretraining_loss(
        batch["input_ids"], batch["labels"], attention_mask=batch.get("attention_mask"),
        token_type_ids=batch.get("token_type_ids"),
        next_sentence_label=batch["next_sentence_label"] if with_binary else None,
    )


class PretrainingObjective:
    """MLM loss at the masked positions only, plus the NSP/SOP loss when the model has the head.

    Called as ``objective(model, batch)`` with a ``MegatronBertForPreTraining`` and a batch of
    :func:`~megabert.data.pretraining.collate_pretraining`; the model computes the loss
    (:meth:`~megabert.modeling.heads.MegatronBertForPreTraining.pretraining_loss`), which
    equals ``model(...)(labels=..., next_sentence_label=...).loss``. This adds the metrics.
    """

    def __init__(self, binary_task: str | None = "nsp") -> None:
        self.binary_task = binary_task

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> StepOutput:
        result = pretraining_loss(model, batch, self.binary_task)
        mlm_acc = result.mlm_correct.float() / max(result.mlm_count, 1)
        metrics: dict[str, torch.Tensor] = {"mlm_loss": result.mlm_loss.detach(), "mlm_accuracy": mlm_acc}
        if result.binary_loss is not None:
            label = batch["next_sentence_label"]  # (B,)
            metrics[f"{self.binary_task}_loss"] = result.binary_loss.detach()
            metrics[f"{self.binary_task}_accuracy"] = (result.binary_logits.argmax(-1) == label).float().mean()
        loss = result.loss
        mask = batch.get("attention_mask")
        tokens = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        return StepOutput(loss=loss, metrics=metrics, tokens=tokens)


class PretrainingEvaluator:
    """Valid-set MLM loss / accuracy and NSP/SOP accuracy over the first ``max_batches`` batches.

    The loss is averaged over all predicted tokens of the evaluated batches (not per batch),
    so it does not depend on how the tokens fall into batches. The batches are the same at
    every evaluation (samples and masking are fixed by their index).
    """

    def __init__(
        self,
        batches: Callable[[], Iterable[Mapping[str, torch.Tensor]]],
        binary_task: str | None,
        max_batches: int,
        distributed: DistributedHooks | None = None,
    ) -> None:
        self.batches = batches
        self.binary_task = binary_task
        self.max_batches = max_batches
        self.hooks = distributed or DistributedHooks()

    def __call__(self, model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        sums = {"mlm_loss": 0.0, "mlm_correct": 0.0, "mlm_count": 0.0, "binary_correct": 0.0, "binary_count": 0.0}
        for number, batch in enumerate(self.batches()):
            if number >= self.max_batches:
                break
            batch = move_to_device(batch, device)
            result = pretraining_loss(model, batch, self.binary_task)
            sums["mlm_loss"] += float(result.mlm_loss) * result.mlm_count
            sums["mlm_correct"] += float(result.mlm_correct)
            sums["mlm_count"] += result.mlm_count
            if result.binary_logits is not None:
                label = batch["next_sentence_label"]
                predicted = result.binary_logits.argmax(-1)
                sums["binary_correct"] += float((predicted == label).sum())
                sums["binary_count"] += label.numel()
        sums = self.hooks.all_reduce(sums, op="sum")
        results = {}
        if sums["mlm_count"]:
            results["mlm_loss"] = sums["mlm_loss"] / sums["mlm_count"]
            results["mlm_accuracy"] = sums["mlm_correct"] / sums["mlm_count"]
            results["loss"] = results["mlm_loss"]
        if sums["binary_count"]:
            results[f"{self.binary_task}_accuracy"] = sums["binary_correct"] / sums["binary_count"]
        return results


# ------------------------------------------------------------------------------------ the job
@dataclass
class PretrainDataConfig:
    """Where the samples come from and how they are shaped."""

    data: str  # indexed dataset prefix (PREFIX.bin / PREFIX.idx)
    valid_data: str | None = None  # prefix of the validation split (None: no evaluation)
    seq_length: int = 128  # tokens per sample, [CLS] and [SEP]s included
    batch_size: int = 32  # samples per micro-batch (per rank)
    binary_task: str | None = "nsp"  # nsp | sop | None (MLM only)
    masked_lm_prob: float = 0.15
    short_seq_prob: float = 0.1
    eval_batches: int = 50  # validation micro-batches per evaluation
    num_workers: int = 0  # DataLoader worker processes

    def validate(self) -> None:
        if self.binary_task not in ("nsp", "sop", None):
            raise UserError(f"binary task must be nsp, sop or none, got {self.binary_task!r}")
        if self.batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {self.batch_size}")
        if self.seq_length < (5 if self.binary_task else 3):
            raise UserError(f"seq length {self.seq_length} is too short for [CLS] A [SEP] B [SEP]")
        if self.eval_batches < 1:
            raise UserError(f"eval batches must be >= 1, got {self.eval_batches}")
        if self.num_workers < 0:
            raise UserError(f"num workers must be >= 0, got {self.num_workers}")


@dataclass
class PretrainResult:
    """Where a pretraining run left its outputs."""

    output_dir: Path
    final_dir: Path | None  # OUT/final (None when the run was interrupted)
    metrics_file: Path
    curves_file: Path | None
    train: TrainResult
    eval_results: dict[str, float] = field(default_factory=dict)


def build_model(config: MegatronBertConfig, binary_task: str | None) -> nn.Module:
    """A freshly initialised MegatronBertForPreTraining (with the binary head unless binary_task is None)."""
    from megabert.modeling.heads import MegatronBertForPreTraining

    return MegatronBertForPreTraining(config, add_binary_head=binary_task is not None)


def _masking(probability: float) -> Any:
    from megabert.data.pretraining import MaskingConfig

    return MaskingConfig(probability=probability)


def run_pretraining(
    model_spec: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    data: PretrainDataConfig,
    trainer_config: TrainerConfig,
    *,
    optimizer: OptimizerConfig | None = None,
    schedule: ScheduleConfig | None = None,
    checkpoints: CheckpointConfig | None = None,
    metrics: MetricsConfig | None = None,
    distributed: DistributedHooks | None = None,
) -> PretrainResult:
    """Pretrain a MegatronBERT from scratch (or resume); see the module docstring for the outputs.

    Everything is checked before the first step: the tokenizer, both data prefixes and their
    token ids against the vocabulary, the model config (vocabulary, positions), the training
    settings, and a resumed checkpoint's config. The main rank holds the output folder's lock
    (:func:`megabert.utils.lock_output_folder`) for the whole run: a second run into the same
    ``output_dir`` stops at once with a UserError naming the holder's pid.
    """
    data.validate()
    trainer_config.validate()
    optimizer = optimizer or OptimizerConfig()
    optimizer.validate()
    schedule = schedule or ScheduleConfig()
    schedule.validate(schedule.total_steps or trainer_config.max_steps)
    checkpoints = checkpoints or CheckpointConfig()
    checkpoints.validate()
    metrics = metrics or MetricsConfig()
    hooks = distributed or DistributedHooks()
    # One run per output folder: the main rank (the only writer) holds the lock until the run
    # ends; a second run into the same folder stops here, before reading any data.
    lock = lock_output_folder(trainer_config.output_dir, "pretrain") if hooks.is_main else None
    try:
        return _run_pretraining_locked(
            model_spec, tokenizer_path, data, trainer_config, optimizer, schedule, checkpoints, metrics, hooks
        )
    finally:
        if lock is not None:
            lock.release()


def _run_pretraining_locked(
    model_spec: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    data: PretrainDataConfig,
    trainer_config: TrainerConfig,
    optimizer: OptimizerConfig,
    schedule: ScheduleConfig,
    checkpoints: CheckpointConfig,
    metrics: MetricsConfig,
    hooks: DistributedHooks,
) -> PretrainResult:
    """The body of :func:`run_pretraining` (settings validated, output folder locked)."""
    from megabert.data.pretraining import PretrainingCollator, PretrainingDataset

    tokenizer = load_tokenizer(tokenizer_path)
    model_config = build_model_config(model_spec, len(tokenizer), data.seq_length)
    for prefix, what in ((data.data, "--data"), (data.valid_data, "--valid-data")):
        if prefix is not None:
            check_data_vocab(prefix, len(tokenizer), what)

    world = hooks.world_size
    samples_needed = trainer_config.max_steps * trainer_config.grad_accum * data.batch_size * world
    masking = _masking(data.masked_lm_prob)
    train_set = PretrainingDataset(
        data.data, tokenizer, data.seq_length, binary_task=data.binary_task, short_seq_prob=data.short_seq_prob,
        masking=masking, num_samples=samples_needed, seed=trainer_config.seed,
    )
    collate = PretrainingCollator(pad_token_id=tokenizer.pad_token_id)
    # The dataset already shuffles per epoch: the loader walks it in order, so micro-batch k
    # is samples [k * global_batch, (k + 1) * global_batch).
    loader = ResumableLoader(
        train_set, data.batch_size, collate, shuffle=False, seed=trainer_config.seed,
        num_workers=data.num_workers, rank=hooks.rank, world_size=world,
    )
    eval_fn = None
    if data.valid_data is not None:
        valid_set = PretrainingDataset(
            data.valid_data, tokenizer, data.seq_length, binary_task=data.binary_task,
            short_seq_prob=data.short_seq_prob, masking=masking, seed=trainer_config.seed + 1,
        )
        # A small valid set gets smaller batches rather than none (each rank needs one sample).
        eval_batch = max(1, min(data.batch_size, len(valid_set) // world))
        valid_loader = ResumableLoader(
            valid_set, eval_batch, collate, shuffle=False, rank=hooks.rank, world_size=world
        )
        valid_batches = min(data.eval_batches, valid_loader.batches_per_epoch)
        eval_fn = PretrainingEvaluator(lambda: valid_loader.batches(0), data.binary_task, valid_batches, hooks)
    elif hooks.is_main:
        print("note: no --valid-data given: no evaluation during training", file=sys.stderr)

    output_dir = Path(trainer_config.output_dir)
    seed_everything(trainer_config.seed)  # the same initial weights for the same seed
    model = build_model(model_config, data.binary_task)
    signature = {
        "batch_size": data.batch_size,
        "seq_length": data.seq_length,
        "binary_task": data.binary_task,
        "masked_lm_prob": data.masked_lm_prob,
        "short_seq_prob": data.short_seq_prob,
        # The training data: a resume on another dataset would continue its position silently.
        "data": data_fingerprint(data.data),
    }
    trainer = Trainer(
        model, loader, trainer_config,
        optimizer=optimizer, schedule=schedule, checkpoints=checkpoints, metrics=metrics,
        loss_fn=PretrainingObjective(data.binary_task), eval_fn=eval_fn, distributed=hooks,
        save_extras=tokenizer.save_pretrained, run_signature=signature,
    )
    if hooks.is_main:
        _write_run_config(output_dir, model_spec, tokenizer_path, model_config, data, trainer_config,
                          optimizer, schedule, checkpoints, metrics)
        if trainer.resumed_from is not None:
            print(f"resuming from {trainer.resumed_from} (step {trainer.state.step})", file=sys.stderr)
    try:
        result = trainer.train()
    finally:
        trainer.close()

    final_dir = None
    if not result.interrupted:
        # Every rank enters full_weights (a sharded model gathers its weights there); one writes.
        with hooks.full_weights(trainer.model) as whole:
            if hooks.is_main:
                final_dir = output_dir / FINAL_DIR
                with atomic_folder(final_dir, overwrite=True) as tmp:
                    whole.save_pretrained(tmp)
                    tokenizer.save_pretrained(tmp)
        hooks.barrier()
    curves = output_dir / CURVES_FILE
    return PretrainResult(
        output_dir=output_dir,
        final_dir=final_dir,
        metrics_file=output_dir / METRICS_FILE,
        curves_file=curves if curves.is_file() else None,
        train=result,
        eval_results=result.eval_results,
    )


def evaluate_model(
    model_dir: str | os.PathLike,
    valid_data: str | os.PathLike,
    *,
    seq_length: int = 128,
    batch_size: int = 32,
    binary_task: str | None = "nsp",
    max_batches: int = 100,
    masked_lm_prob: float = 0.15,
    seed: int = 1235,
    precision: str = "fp32",
    device: str = "auto",
) -> dict[str, float]:
    """MLM loss / accuracy and NSP/SOP accuracy of a saved model (e.g. ``OUT/final``) on an indexed dataset.

    The model folder must hold the tokenizer too (``OUT/final`` does). Samples and masking are
    fixed by ``seed``, so two models evaluated with the same arguments see the same tokens
    (the default seed is the one the pretraining job's validation uses for ``--seed 1234``).
    """
    from megabert.data.pretraining import PretrainingCollator, PretrainingDataset
    from megabert.modeling.heads import MegatronBertForPreTraining
    from megabert.devices import resolve_device

    tokenizer = load_tokenizer(model_dir)
    config = MegatronBertConfig.from_pretrained(model_dir)
    if len(tokenizer) > config.vocab_size:
        raise UserError(f"{model_dir}: the tokenizer has {len(tokenizer)} ids, the model only {config.vocab_size}")
    if seq_length > config.max_position_embeddings:
        raise UserError(f"seq length {seq_length} is above the model's max_position_embeddings ({config.max_position_embeddings})")
    check_data_vocab(valid_data, len(tokenizer), "valid data")
    has_head = binary_task is not None
    model = MegatronBertForPreTraining.from_pretrained(model_dir, unpad_inputs=True)
    if has_head and not hasattr(model.cls, "seq_relationship"):
        binary_task = None
    target = resolve_device(device)
    model.to(target).eval()
    dataset = PretrainingDataset(
        valid_data, tokenizer, seq_length, binary_task=binary_task, masking=_masking(masked_lm_prob), seed=seed
    )
    loader = ResumableLoader(dataset, max(1, min(batch_size, len(dataset))), PretrainingCollator(tokenizer.pad_token_id), shuffle=False)
    evaluator = PretrainingEvaluator(lambda: loader.batches(0), binary_task, min(max_batches, loader.batches_per_epoch))
    if precision not in ("fp32", "bf16", "fp16"):
        raise UserError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    autocast = (
        contextlib.nullcontext() if precision == "fp32"
        else torch.autocast(target.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    )
    with torch.no_grad(), autocast:
        return evaluator(model)


def _write_run_config(output_dir: Path, model_spec: Any, tokenizer_path: Any, model_config: MegatronBertConfig,
                      *configs: Any) -> None:
    """OUT/run_config.json: every setting of the run, for the record."""
    record = {"model_spec": str(model_spec), "tokenizer": str(tokenizer_path), "model_config": model_config.to_dict()}
    for config in configs:
        record[type(config).__name__] = asdict(config)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / RUN_CONFIG_FILE, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
