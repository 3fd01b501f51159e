"""ONNX export of a MegatronBERT model folder (or a loaded model), with dynamic batch and sequence axes.

The graph takes ``input_ids``, ``attention_mask`` and ``token_type_ids`` (int64, shape
(batch, sequence), or (batch, choices, sequence) for multiple choice) and returns the outputs
under the names of the `transformers` output fields: ``logits``; ``start_logits`` and
``end_logits``; ``last_hidden_state`` and ``pooler_output``; ``prediction_logits`` and
``seq_relationship_logits``.

It uses PyTorch's ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``,
which needs ``onnx`` and ``onnxscript``). While exporting, the model takes its masked padded
attention path (no data-dependent branches, no unpadding), so the graph computes the
reference's values at every position, pad positions included, for any batch and length up
to ``max_position_embeddings``. The legacy TorchScript exporter is not used: tracing would
bake this example's padding pattern into the graph.

The file is written atomically (a failed export or check leaves nothing behind) and, when
``onnxruntime`` is installed, checked before it is moved into place: onnxruntime runs a batch
of another shape, with padding, and must agree with PyTorch.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from megabert import task_table
from megabert.errors import UserError

logger = logging.getLogger(__name__)

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
INSTALL_HINT = "pip install 'megabert[onnx]'"
# Largest |onnxruntime - torch| accepted by the check, relative to the outputs' scale (float32).
VERIFY_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ExportTask:
    """What one ``--task`` exports: the model class, the head the checkpoint needs, the outputs."""

    model_task: str  # key of megabert.modeling.heads.MODEL_CLASSES
    head: str | None  # head name from heads_in_checkpoint that the folder must hold
    outputs: tuple[str, ...]  # output fields, in order (also the ONNX output names)
    pipeline_task: str | None = None  # for the classifier-architecture check of loading.check_head


# Views of megabert.task_table: export task -> what it exports; alias -> export task; the
# choices of `megabert export onnx --task` (commands/export.py builds the same without torch).
EXPORT_TASKS: dict[str, ExportTask] = {
    task.name: ExportTask(
        task.name, task.head, task.export_outputs,
        task.primary(task_table.PIPELINE) if "classifier" in task.heads else None,
    )
    for task in task_table.tasks(task_table.EXPORT)
}  # fmt: skip
TASK_ALIASES: dict[str, str] = task_table.aliases(task_table.EXPORT)
TASK_CHOICES = ("auto", *task_table.aliases(task_table.EXPORT_OPTION), *task_table.names(task_table.EXPORT_OPTION))


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote and how it was checked."""

    path: Path
    task: str
    opset: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic: bool
    external_data: Path | None  # the weights file beside ``path`` for models over ~1.5 GB
    max_abs_diff: float | None  # onnxruntime vs PyTorch on the check batch; None if not checked
    check_shape: tuple[int, ...] | None  # input shape of the check batch

    def summary(self) -> str:
        """One line for the CLI."""
        text = (
            f"wrote {self.path} (task {self.task}, opset {self.opset}, "
            f"{'dynamic batch and sequence' if self.dynamic else 'static shapes'}; "
            f"inputs {', '.join(self.inputs)}; outputs {', '.join(self.outputs)})"
        )
        if self.external_data is not None:
            text += f"; weights in {self.external_data.name}"
        if self.max_abs_diff is not None and self.check_shape is not None:
            shape = " x ".join(str(d) for d in self.check_shape)
            text += f"; onnxruntime matches PyTorch within {self.max_abs_diff:.1e} on a {shape} batch"
        return text


class ExportCheckError(UserError):
    """The exported graph failed a check (onnx's checker, or onnxruntime against PyTorch).

    A UserError so that the CLI reports it in one line; the message says what failed.
    """


# --------------------------------------------------------------------------- helpers
def canonical_export_task(task: str) -> str:
    """``task`` or its alias as a key of :data:`EXPORT_TASKS` ("auto" passes through)."""
    if task == "auto":
        return task
    try:
        return task_table.resolve_task(task, task_table.EXPORT).name
    except UserError:
        raise UserError(f"unknown export task {task!r}; choose one of {', '.join(TASK_CHOICES)}") from None


def require_onnx_exporter() -> None:
    """Raise a UserError with the install hint when the exporter's packages are missing."""
    missing = []
    for module in ("onnx", "onnxscript"):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UserError(
            f"ONNX export needs the packages onnx and onnxscript ({', '.join(missing)} not installed): {INSTALL_HINT}"
        )


def _onnxruntime() -> Any | None:
    try:
        return importlib.import_module("onnxruntime")
    except ImportError:
        return None


def task_of_model(model: nn.Module) -> str:
    """The export task of a loaded model, from its class."""
    from megabert.modeling.heads import MODEL_CLASSES

    for name, cls in MODEL_CLASSES.items():
        if type(model) is cls and name in EXPORT_TASKS:
            return name
    raise UserError(
        f"cannot export a {type(model).__name__} to ONNX; supported: "
        + ", ".join(MODEL_CLASSES[name].__name__ for name in EXPORT_TASKS)
    )


def task_from_config(folder: Path, config: Any) -> str:
    """The export task a folder's config.json names in ``architectures``."""
    from megabert.modeling.heads import MODEL_CLASSES

    by_class = {cls.__name__: name for name, cls in MODEL_CLASSES.items() if name in EXPORT_TASKS}
    for arch in config.architectures or ():
        if arch in by_class:
            return by_class[arch]
    named = ", ".join(config.architectures or ()) or "none"
    raise UserError(
        f"cannot tell which head to export from {folder / 'config.json'} (architectures: {named}); "
        f"pass a task ({', '.join(EXPORT_TASKS)})"
    )


class _OutputsAsTuple(nn.Module):
    """The model with positional inputs and a tuple of named outputs, as the exporter needs."""

    def __init__(self, model: nn.Module, outputs: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.output_names = outputs

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, return_dict=True
        )
        return tuple(getattr(out, name) for name in self.output_names)


def example_inputs(
    config: Any, shape: tuple[int, ...], seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ids, a mask whose first row is padded after its first half, token types 0 then 1."""
    generator = torch.Generator().manual_seed(seed)
    low = min(5, config.vocab_size - 1)  # past the usual special tokens
    ids = torch.randint(low, config.vocab_size, shape, generator=generator)
    seq = shape[-1]
    mask = torch.ones(shape, dtype=torch.long)
    if seq > 1:
        mask.view(-1, seq)[0, seq // 2 + 1 :] = 0
    ids = ids.masked_fill(mask == 0, config.pad_token_id if config.pad_token_id is not None else 0)
    types = torch.zeros(shape, dtype=torch.long)
    if config.type_vocab_size > 1:
        types[..., seq // 2 :] = 1
    return ids, mask, types


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's chatter (missing torchvision ops, opset conversion notes)."""
    names = ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir")
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _saved_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)


def _check_graph(path: Path, opset: int) -> None:
    """onnx's own validity check (op schemas, attributes, types) of the saved file."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = " (opsets below 18 are converted by onnx and may fail: try the default 18)" if opset < 18 else ""
        raise ExportCheckError(f"the exported graph is not valid ONNX: {first}{hint}; the file was not written") from None


def _check_with_onnxruntime(
    path: Path, wrapper: nn.Module, inputs: tuple[torch.Tensor, ...], outputs: tuple[str, ...]
) -> float:
    """Run the file with onnxruntime on ``inputs``; return the largest difference to PyTorch, or raise."""
    ort = _onnxruntime()
    assert ort is not None
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {name: tensor.numpy() for name, tensor in zip(INPUT_NAMES, inputs)}
    got = session.run(list(outputs), feeds)
    with torch.inference_mode():
        expected = [t.float().numpy() for t in wrapper(*inputs)]
    worst = 0.0
    for name, ours, theirs in zip(outputs, expected, got):
        if tuple(ours.shape) != tuple(theirs.shape):
            raise ExportCheckError(f"onnxruntime's {name} has shape {tuple(theirs.shape)}, PyTorch's {tuple(ours.shape)}")
        diff = float(abs(ours - theirs).max()) if ours.size else 0.0
        limit = VERIFY_TOLERANCE * max(1.0, float(abs(ours).max()) if ours.size else 1.0)
        if not diff <= limit:  # also catches NaN
            raise ExportCheckError(
                f"onnxruntime's {name} differs from PyTorch's by {diff:.3g} (limit {limit:.3g}) on a "
                f"{' x '.join(map(str, inputs[0].shape))} batch; the ONNX file was not written"
            )
        worst = max(worst, diff)
    return worst


def _check_output_path(output: Path, overwrite: bool) -> None:
    if output.is_dir():
        raise UserError(f"output {output} is a folder; give a file name such as {output / 'model.onnx'}")
    if output.exists() and not overwrite:
        raise FileExistsError(f"output {output} already exists (pass --overwrite to replace it)")
    if output.suffix != ".onnx":
        warnings.warn(f"output {output} does not end in .onnx", stacklevel=3)


def _move_into_place(tmp_dir: Path, output: Path) -> Path | None:
    """Move the exported file (and its external weights, first) from ``tmp_dir`` to ``output``."""
    data_name = f"{output.name}.data"
    data_file = tmp_dir / data_name
    final_data = output.with_name(data_name)
    if data_file.exists():
        os.replace(data_file, final_data)
    elif final_data.exists():
        final_data.unlink()  # an earlier, larger export's weights: this file does not use them
    os.replace(tmp_dir / output.name, output)
    return final_data if final_data.exists() else None


# ------------------------------------------------------------------------- exporting
def export_model_onnx(
    model: nn.Module,
    output_path: str | os.PathLike,
    task: str | None = None,
    opset: int = 18,
    dynamic: bool = True,
    *,
    batch_size: int = 2,
    sequence_length: int = 16,
    num_choices: int = 2,
    verify: bool = True,
    overwrite: bool = False,
    outputs: tuple[str, ...] | None = None,
    progress: bool = False,
) -> ExportResult:
    """Export a loaded float32 CPU model to ``output_path``; see :func:`export_onnx`.

    ``outputs`` overrides the output fields of the task (a subset, in order).
    """
    require_onnx_exporter()
    from megabert.modeling.pretrained import MegatronBertPreTrainedModel

    if not isinstance(model, MegatronBertPreTrainedModel):
        raise TypeError(f"model must be a megabert model, got {type(model).__name__}")
    own_task = task_of_model(model)
    if model.device.type != "cpu" or model.dtype != torch.float32:
        raise UserError(
            f"ONNX export takes a float32 model on the CPU, got {str(model.dtype).replace('torch.', '')} on "
            f"{model.device} (load it with dtype='float32', device='cpu')"
        )
    if task is not None:
        task = canonical_export_task(task)
        if task not in ("auto", own_task):
            raise UserError(f"task {task!r} does not fit a {type(model).__name__} (its task is {own_task!r})")
    task = own_task
    spec = EXPORT_TASKS[task]
    if outputs is None:
        outputs = spec.outputs
        if task == "base" and getattr(model, "pooler", None) is None:
            outputs = ("last_hidden_state",)
    if not isinstance(opset, int) or not 14 <= opset <= 23:
        raise UserError(f"opset {opset!r} is out of range; use 14 to 23 (default 18)")
    max_len = model.config.max_position_embeddings
    low = 2 if dynamic else 1  # torch.export treats sizes 0 and 1 as constants: trace with 2 or more
    for name, value, high in (
        ("batch_size", batch_size, None),
        ("sequence_length", sequence_length, max_len),
        ("num_choices", num_choices, None),
    ):
        if not isinstance(value, int) or value < low or (high is not None and value > high):
            limit = f"{low}..{high}" if high is not None else f">= {low}"
            raise UserError(f"{name} must be an integer in {limit}, got {value!r}")
    output = Path(output_path)
    _check_output_path(output, overwrite)

    multiple_choice = task == "multiple-choice"
    shape = (batch_size, num_choices, sequence_length) if multiple_choice else (batch_size, sequence_length)
    was_training = model.training
    model.eval()
    wrapper = _OutputsAsTuple(model, outputs).eval()
    inputs = example_inputs(model.config, shape)

    dynamic_shapes = None
    if dynamic:
        batch = torch.export.Dim("batch", min=1)
        sequence = torch.export.Dim("sequence", min=1, max=max_len)
        axes = {0: batch, 1: torch.export.Dim("choices", min=1), 2: sequence} if multiple_choice else {0: batch, 1: sequence}
        dynamic_shapes = {name: axes for name in INPUT_NAMES}

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    bar = tqdm(total=4, desc="export onnx", unit="step", disable=not progress, file=sys.stderr)
    try:
        bar.set_postfix_str("trace and convert")
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                wrapper,
                inputs,
                None,
                dynamo=True,
                opset_version=opset,
                input_names=list(INPUT_NAMES),
                output_names=list(outputs),
                dynamic_shapes=dynamic_shapes,
                verbose=False,
                optimize=True,
            )
            bar.update()
            bar.set_postfix_str("save")
            program.save(tmp_dir / output.name)
        bar.update()
        bar.set_postfix_str("check graph")
        _check_graph(tmp_dir / output.name, opset)
        bar.update()
        saved_opset = _saved_opset(tmp_dir / output.name)
        if saved_opset != opset:
            warnings.warn(
                f"the exporter could not convert the graph to opset {opset}; the file uses opset {saved_opset}",
                stacklevel=2,
            )

        max_diff = None
        check_shape = None
        if verify and _onnxruntime() is None:
            warnings.warn(f"the ONNX file was not checked: onnxruntime is not installed ({INSTALL_HINT})", stacklevel=2)
        elif verify:
            # Another shape than the traced one (when dynamic), with a padded row.
            if dynamic:
                check_shape = tuple(d + 1 for d in shape[:-1]) + (min(sequence_length + 3, max_len),)
            else:
                check_shape = shape
            check_inputs = example_inputs(model.config, check_shape, seed=1)
            bar.set_postfix_str("onnxruntime check")
            max_diff = _check_with_onnxruntime(tmp_dir / output.name, wrapper, check_inputs, outputs)
        external = _move_into_place(tmp_dir, output)
        bar.set_postfix_str("written")
        bar.update()
    finally:
        bar.close()
        shutil.rmtree(tmp_dir, ignore_errors=True)
        model.train(was_training)
    return ExportResult(
        path=output,
        task=task,
        opset=saved_opset,
        inputs=INPUT_NAMES,
        outputs=outputs,
        dynamic=dynamic,
        external_data=external,
        max_abs_diff=max_diff,
        check_shape=check_shape,
    )


def export_onnx(
    model_dir: str | os.PathLike,
    output_path: str | os.PathLike,
    task: str = "auto",
    opset: int = 18,
    dynamic: bool = True,
    *,
    batch_size: int = 2,
    sequence_length: int = 16,
    verify: bool = True,
    overwrite: bool = False,
    progress: bool = False,
) -> ExportResult:
    """Export the model in ``model_dir`` to an ONNX file at ``output_path``.

    ``task``: which model to build from the folder — "base", "masked-lm" (alias "fill-mask"),
    "pretraining", "next-sentence", "sequence-classification", "token-classification",
    "question-answering", "multiple-choice", or "auto" (the class config.json names).
    ``opset``: the ONNX operator set (default 18, the lowest the exporter writes natively; a
    lower one is converted by onnx's version converter, which can fail or produce an invalid
    graph: the file is then rejected by the checks below).
    ``dynamic``: batch and sequence (and choices) axes of any size up to
    max_position_embeddings; ``dynamic=False`` fixes them to ``batch_size`` x ``sequence_length``.
    ``verify``: check the file with onnxruntime (when installed) before moving it into place.
    ``overwrite``: replace an existing file (otherwise FileExistsError).
    ``progress``: a progress bar on stderr (tracing a large model takes minutes).

    The export runs in float32 on the CPU. Raises UserError for a bad folder, an unknown task,
    a checkpoint without the task's head, or missing onnx/onnxscript (with the install hint).
    """
    require_onnx_exporter()
    from megabert.inference.loading import check_head, check_model_folder, checkpoint_keys, load_model, read_config

    folder = check_model_folder(model_dir)
    _check_output_path(Path(output_path), overwrite)
    config = read_config(folder)
    task = canonical_export_task(task)
    if task == "auto":
        task = task_from_config(folder, config)
    spec = EXPORT_TASKS[task]
    keys = checkpoint_keys(folder)
    try:
        heads = check_head(folder, config, keys, spec.pipeline_task or task, spec.head)
    except UserError as exc:
        raise UserError(str(exc).replace(" pipeline needs", " export needs")) from None
    outputs = spec.outputs
    for needed in task_table.get_task(task).heads[1:]:  # the pretraining export: the NSP head too
        if needed not in heads:
            raise UserError(
                f"model folder {folder} has no {needed} head, which the {task} export needs "
                "(export its MLM head with task masked-lm)"
            )
    if task == "base" and "pooler" not in heads:
        outputs = ("last_hidden_state",)  # no trained pooler: export the hidden states only
    model, _ = load_model(
        folder, spec.model_task, task=spec.pipeline_task or task, head=None,
        dtype=torch.float32, device=torch.device("cpu"), unpad_inputs=False,
    )  # fmt: skip
    return export_model_onnx(
        model,
        output_path,
        task,
        opset,
        dynamic,
        batch_size=batch_size,
        sequence_length=sequence_length,
        verify=verify,
        overwrite=overwrite,
        outputs=outputs,
        progress=progress,
    )
