"""Deployment paths: ONNX export and int8 dynamic quantization.

ONNX: onnxruntime agrees with our model at shapes other than the exported one, with padding.
Exports take a few seconds each, so the default tests export three models (masked LM through
the CLI, question answering and multiple choice through the API); every task is exported in
the slow test. The ONNX tests skip without the [onnx] extra; the int8 tests always run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megabert import MegatronBertConfig
from megabert.cli import main as cli_main
from megabert.errors import UserError
from megabert.inference import export as export_module
from megabert.inference.export import EXPORT_TASKS, TASK_CHOICES, ExportCheckError, export_model_onnx, export_onnx
from megabert.inference.quantize import count_quantized_linears, quantize_dynamic_int8
from megabert.modeling.heads import MODEL_CLASSES
from tests.conftest import TINY, padded_batch

try:
    import onnx  # noqa: F401
    import onnxruntime as ort
    import onnxscript  # noqa: F401
except ImportError:  # the [onnx] extra is not installed: only the int8 and missing-package tests run
    ort = None
needs_onnx = pytest.mark.skipif(ort is None, reason="needs the [onnx] extra: onnx, onnxscript, onnxruntime")

# (batch, seq) pairs unlike the export's example (2 x 16), both with padded rows.
CHECK_SHAPES = ((1, 7), (4, 23))
ATOL = 1e-4


def save_model(folder: Path, task: str, **overrides) -> Path:
    torch.manual_seed(0)
    if task in ("sequence-classification", "token-classification"):
        overrides.setdefault("num_labels", 3)
    model = MODEL_CLASSES[task](MegatronBertConfig(**{**TINY, **overrides}))
    model.save_pretrained(folder)
    return folder


def padded_inputs(shape: tuple[int, ...], seed: int) -> dict[str, np.ndarray]:
    """Random ids; every other row padded after a random length >= 1; token types 0 then 1."""
    g = torch.Generator().manual_seed(seed)
    seq = shape[-1]
    ids = torch.randint(1, TINY["vocab_size"], shape, generator=g)
    flat_mask = torch.ones(ids.numel() // seq, seq, dtype=torch.long)
    for row in range(0, flat_mask.shape[0], 2):
        flat_mask[row, int(torch.randint(1, seq + 1, (1,), generator=g)) :] = 0
    if seq > 1:
        flat_mask[0, -1] = 0  # at least one pad in every batch
    mask = flat_mask.view(shape)
    types = torch.zeros(shape, dtype=torch.long)
    types[..., seq // 2 :] = 1
    return {"input_ids": (ids * mask).numpy(), "attention_mask": mask.numpy(), "token_type_ids": types.numpy()}


def run_both(onnx_path: Path, folder: Path, task: str, feeds: dict[str, np.ndarray], unpad: bool = False):
    """(onnxruntime outputs, our outputs) by output name."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    theirs = dict(zip(names, session.run(None, feeds)))
    model = MODEL_CLASSES[EXPORT_TASKS[task].model_task].from_pretrained(folder, unpad_inputs=unpad)
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    ours = {name: getattr(out, name).numpy() for name in names}
    return theirs, ours


def assert_dynamic_io(onnx_path: Path, outputs: tuple[str, ...], rank: int = 2) -> None:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    assert [i.name for i in inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    for i in inputs:
        assert i.type == "tensor(int64)"
        assert len(i.shape) == rank and all(isinstance(d, str) for d in i.shape), i.shape  # symbolic axes
    assert tuple(o.name for o in session.get_outputs()) == outputs


# ------------------------------------------------------------------------- agreement
@needs_onnx
def test_cli_fill_mask_export_matches_our_model(tmp_path: Path, capsys) -> None:
    folder = save_model(tmp_path / "mlm", "masked-lm")
    out = tmp_path / "onnx" / "mlm.onnx"
    assert cli_main(["export", "onnx", str(folder), str(out), "--task", "fill-mask"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "onnxruntime matches PyTorch" in printed
    assert sorted(p.name for p in out.parent.iterdir()) == ["mlm.onnx"]  # no temp files left
    assert_dynamic_io(out, ("logits",))
    for seed, shape in enumerate(CHECK_SHAPES):
        feeds = padded_inputs(shape, seed)
        theirs, ours = run_both(out, folder, "masked-lm", feeds)
        assert theirs["logits"].shape == shape + (TINY["vocab_size"],)
        np.testing.assert_allclose(theirs["logits"], ours["logits"], rtol=0, atol=ATOL)
        # The pipelines' unpadded model gives the same values at real tokens.
        _, unpadded = run_both(out, folder, "masked-lm", feeds, unpad=True)
        real = feeds["attention_mask"].astype(bool)
        np.testing.assert_allclose(theirs["logits"][real], unpadded["logits"][real], rtol=0, atol=ATOL)


@needs_onnx
def test_question_answering_export_from_config(tmp_path: Path) -> None:
    folder = save_model(tmp_path / "qa", "question-answering")
    result = export_onnx(folder, tmp_path / "qa.onnx")  # task from config.json's architectures
    assert result.task == "question-answering" and result.opset == 18 and result.dynamic
    assert result.max_abs_diff is not None and result.max_abs_diff < ATOL
    assert_dynamic_io(result.path, ("start_logits", "end_logits"))
    for seed, shape in enumerate(CHECK_SHAPES):
        theirs, ours = run_both(result.path, folder, "question-answering", padded_inputs(shape, seed))
        for name in ("start_logits", "end_logits"):
            assert theirs[name].shape == shape
            np.testing.assert_allclose(theirs[name], ours[name], rtol=0, atol=ATOL)


@needs_onnx
def test_multiple_choice_export_has_a_choices_axis(tmp_path: Path, monkeypatch) -> None:
    """Also: without onnxruntime the file is written unchecked, with a warning that says so."""
    folder = save_model(tmp_path / "mc", "multiple-choice")
    monkeypatch.setattr(export_module, "_onnxruntime", lambda: None)
    with pytest.warns(UserWarning, match=r"not checked: onnxruntime is not installed \(pip install 'megabert\[onnx\]'\)"):
        result = export_onnx(folder, tmp_path / "mc.onnx", task="multiple-choice")
    assert result.max_abs_diff is None and result.check_shape is None
    assert_dynamic_io(result.path, ("logits",), rank=3)
    for seed, shape in enumerate(((1, 3, 7), (3, 2, 12))):
        theirs, ours = run_both(result.path, folder, "multiple-choice", padded_inputs(shape, seed))
        assert theirs["logits"].shape == shape[:2]
        np.testing.assert_allclose(theirs["logits"], ours["logits"], rtol=0, atol=ATOL)


@needs_onnx
@pytest.mark.slow
@pytest.mark.parametrize("task", [t for t in TASK_CHOICES if t != "auto"])
def test_every_task_exports(tmp_path: Path, task: str) -> None:
    model_task = EXPORT_TASKS[export_module.canonical_export_task(task)].model_task
    folder = save_model(tmp_path / "model", model_task)
    result = export_onnx(folder, tmp_path / "model.onnx", task=task)
    assert result.outputs == EXPORT_TASKS[model_task].outputs
    shapes = ((1, 3, 7), (3, 2, 12)) if model_task == "multiple-choice" else CHECK_SHAPES
    for seed, shape in enumerate(shapes):
        theirs, ours = run_both(result.path, folder, model_task, padded_inputs(shape, seed))
        for name in result.outputs:
            np.testing.assert_allclose(theirs[name], ours[name], rtol=0, atol=ATOL, err_msg=name)


@needs_onnx
@pytest.mark.slow
def test_static_export_fixes_the_shapes(tmp_path: Path) -> None:
    folder = save_model(tmp_path / "cls", "sequence-classification")
    result = export_onnx(folder, tmp_path / "cls.onnx", dynamic=False, batch_size=1, sequence_length=12)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert [i.shape for i in session.get_inputs()] == [[1, 12]] * 3
    theirs, ours = run_both(result.path, folder, "sequence-classification", padded_inputs((1, 12), 0))
    np.testing.assert_allclose(theirs["logits"], ours["logits"], rtol=0, atol=ATOL)


# ------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("base") / "base", "base")


@needs_onnx
def test_unknown_task(base_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"unknown export task 'summarize'; choose one of auto, fill-mask"):
        export_onnx(base_folder, tmp_path / "x.onnx", task="summarize")


@needs_onnx
def test_folder_without_the_head(base_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"has no masked-lm head, which the masked-lm export needs"):
        export_onnx(base_folder, tmp_path / "x.onnx", task="fill-mask")
    assert not (tmp_path / "x.onnx").exists()


@needs_onnx
def test_pretraining_needs_the_nsp_head(tmp_path: Path) -> None:
    folder = save_model(tmp_path / "mlm", "masked-lm")
    with pytest.raises(UserError, match=r"no next-sentence head, which the pretraining export needs.*task masked-lm"):
        export_onnx(folder, tmp_path / "x.onnx", task="pretraining")


@needs_onnx
def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"model folder .*nope does not exist"):
        export_onnx(tmp_path / "nope", tmp_path / "x.onnx")


@needs_onnx
def test_auto_task_without_architectures(base_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    for name in ("model.safetensors", "config.json"):
        (folder / name).write_bytes((base_folder / name).read_bytes())
    config = MegatronBertConfig.from_pretrained(folder)
    config.architectures = None
    config.save_pretrained(folder)
    with pytest.raises(UserError, match=r"cannot tell which head to export from .*config.json \(architectures: none\)"):
        export_onnx(folder, tmp_path / "x.onnx")


@needs_onnx
def test_existing_output_and_folder_output(base_folder: Path, tmp_path: Path) -> None:
    existing = tmp_path / "old.onnx"
    existing.write_bytes(b"old")
    with pytest.raises(FileExistsError, match=r"old.onnx already exists \(pass --overwrite to replace it\)"):
        export_onnx(base_folder, existing)
    assert existing.read_bytes() == b"old"
    with pytest.raises(UserError, match=r"is a folder; give a file name such as"):
        export_onnx(base_folder, tmp_path)


@needs_onnx
def test_bad_export_options(base_folder: Path, tmp_path: Path) -> None:
    model = MODEL_CLASSES["base"].from_pretrained(base_folder)
    with pytest.raises(UserError, match=r"opset 9 is out of range; use 14 to 23"):
        export_model_onnx(model, tmp_path / "x.onnx", opset=9)
    with pytest.raises(UserError, match=r"sequence_length must be an integer in 2\.\.64, got 65"):
        export_model_onnx(model, tmp_path / "x.onnx", sequence_length=65)
    with pytest.raises(UserError, match=r"batch_size must be an integer in >= 2, got 1"):
        export_model_onnx(model, tmp_path / "x.onnx", batch_size=1)  # dynamic axes need 2+ to trace
    with pytest.raises(UserError, match=r"task 'question-answering' does not fit a MegatronBertModel"):
        export_model_onnx(model, tmp_path / "x.onnx", task="question-answering")
    with pytest.raises(UserError, match=r"takes a float32 model on the CPU, got bfloat16 on cpu"):
        export_model_onnx(model.to(torch.bfloat16), tmp_path / "x.onnx")


def test_missing_onnx_packages_give_the_install_hint(base_folder: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # makes `import onnxscript` fail
    with pytest.raises(UserError, match=r"needs the packages onnx and onnxscript \((onnx, )?onnxscript not installed\): "
                                        r"pip install 'megabert\[onnx\]'"):
        export_onnx(base_folder, tmp_path / "x.onnx")


@needs_onnx
def test_invalid_graph_leaves_no_file(base_folder: Path, tmp_path: Path, monkeypatch) -> None:
    """A graph that fails onnx's checker is not moved into place, and the temp folder is removed."""

    class BrokenProgram:
        def save(self, path: Path) -> None:
            import onnx

            node = onnx.helper.make_node("Split", ["x"], ["a", "b"], num_outputs=2)  # attribute of opset 18+
            graph = onnx.helper.make_graph(
                [node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
                [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [2]) for n in "ab"],
            )  # fmt: skip
            onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(path))

    monkeypatch.setattr(torch.onnx, "export", lambda *args, **kwargs: BrokenProgram())
    out = tmp_path / "out" / "m.onnx"
    with pytest.raises(ExportCheckError, match=r"not valid ONNX: .*Split.*opsets below 18.*the file was not written"):
        export_onnx(base_folder, out, opset=17)
    assert list(out.parent.iterdir()) == []


@needs_onnx
def test_cli_errors_are_one_line(base_folder: Path, tmp_path: Path, capsys) -> None:
    assert cli_main(["export", "onnx", str(tmp_path / "missing"), str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megabert export: error: model folder") and "does not exist" in err
    assert "\n" not in err


def test_cli_help_has_an_example(capsys) -> None:
    with pytest.raises(SystemExit):
        cli_main(["export", "onnx", "--help"])
    text = capsys.readouterr().out
    assert "megabert export onnx my-mlm/ my-mlm.onnx --task fill-mask" in text
    from megabert.commands.export import TASK_CHOICES as CLI_CHOICES

    assert set(CLI_CHOICES) == set(TASK_CHOICES)


# ------------------------------------------------------------------ int8 quantization


def tiny_model(task: str) -> torch.nn.Module:
    """A random model that runs padded, so that pad positions hold values to compare too."""
    torch.manual_seed(0)
    return MODEL_CLASSES[task](MegatronBertConfig(**TINY, unpad_inputs=False)).eval()


@pytest.mark.parametrize("task", ["masked-lm", "base"])
def test_int8_model_stays_close_to_float(task: str) -> None:
    model = tiny_model(task)
    ids, mask, types = padded_batch()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, token_type_ids=types)[0]
    quantized = quantize_dynamic_int8(model)
    # 2 layers x 6 Linears, + pooler (base) or + head transform and vocabulary projection (MLM).
    assert count_quantized_linears(quantized) == ((13, 0) if task == "base" else (14, 0))
    assert count_quantized_linears(model) == ((0, 13) if task == "base" else (0, 14))  # the original is untouched
    weight = (quantized.bert if task == "masked-lm" else quantized).encoder.layer[0].attention.self.query.weight()
    assert weight.dtype == torch.qint8 and weight.qscheme() == torch.per_channel_affine
    for grad in (False, True):  # no_grad skips the fused-QKV path, which int8 Linears cannot use
        with torch.set_grad_enabled(grad):
            got = quantized(ids, attention_mask=mask, token_type_ids=types)[0].detach()
        diff = (got - expected).abs().max()
        assert 0 < diff < 0.05 * expected.abs().max()  # changed (it is int8), but only a little
        cosine = torch.nn.functional.cosine_similarity(got.flatten(0, -2), expected.flatten(0, -2), dim=-1)
        assert cosine.min() > 0.999
    with torch.no_grad():
        again = model(ids, attention_mask=mask, token_type_ids=types)[0]
    torch.testing.assert_close(again, expected, rtol=0, atol=0)


def test_int8_can_keep_the_vocabulary_projection_float() -> None:
    quantized = quantize_dynamic_int8(tiny_model("masked-lm"), quantize_output_layer=False)
    assert count_quantized_linears(quantized) == (13, 1)
    assert type(quantized.cls.predictions.decoder) is torch.nn.Linear


def test_int8_bad_models() -> None:
    with pytest.raises(UserError, match=r"int8 quantization needs a float32 model, got bfloat16 weights"):
        quantize_dynamic_int8(tiny_model("base").to(torch.bfloat16))
    with pytest.raises(UserError, match=r"the model has no parameters to quantize"):
        quantize_dynamic_int8(torch.nn.ReLU())
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got str"):
        quantize_dynamic_int8("model")  # type: ignore[arg-type]
