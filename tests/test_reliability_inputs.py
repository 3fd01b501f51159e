"""Issue 13, the input side: every bad input a clear one-line error, never a silent NaN.

Each test is one case of the issue and checks the message the user now gets: model inputs
(empty batch, head-mask and label shapes, NaN embeddings), model folders (damaged safetensors,
non-finite weights, shards outside the folder, refused pickles), pipelines (non-finite scores,
vocabulary padding) and misleading errors (a folder as --vocab-file, lone surrogates, the line
of a bad UTF-8 byte).
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import megabert
from megabert import MegatronBertConfig
from megabert.cli import main as cli_main
from megabert.errors import UserError
from megabert.modeling.pretrained import CheckpointError
from megabert.tokenization import MegatronBertTokenizer

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "cat", "dog", "sat", "on", "mat", "abc", "def", "."]
# The model: hidden 64, 2 layers (and 2 heads, for the head-mask cases).
SMALL = dict(
    vocab_size=len(VOCAB), hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
    max_position_embeddings=32,
)  # fmt: skip


@pytest.fixture(scope="module")
def mlm() -> megabert.MegatronBertForMaskedLM:
    torch.manual_seed(0)
    return megabert.MegatronBertForMaskedLM(MegatronBertConfig(**SMALL)).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.ones(2, 8, dtype=torch.long)


def tokenizer() -> MegatronBertTokenizer:
    return MegatronBertTokenizer.from_vocab(VOCAB, lowercase=True, model_max_length=32)


def save_folder(folder: Path, model: torch.nn.Module, safe: bool = True) -> Path:
    model.save_pretrained(folder, safe_serialization=safe)
    tokenizer().save_pretrained(folder)
    return folder


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """Exit code and stderr of an in-process CLI call; the error must be one line."""
    code = cli_main(list(args))
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 0 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


# =============================================================================== model inputs


def test_empty_batch_is_a_clear_error(mlm):
    with pytest.raises(UserError, match=re.escape("input_ids is an empty batch (shape (0, 8)): pass at least one sequence")):
        mlm(input_ids=torch.zeros(0, 8, dtype=torch.long))
    with pytest.raises(UserError, match=re.escape("inputs_embeds is an empty batch (shape (0, 8, 64))")):
        mlm(inputs_embeds=torch.zeros(0, 8, 64))


@pytest.mark.parametrize("shape", [(3,), (2, 3), (5, 2), (2, 2, 2), (1, 2)])
def test_head_mask_of_a_wrong_shape_names_both_shapes(mlm, ids, shape):
    expected = (
        f"head_mask has shape {shape}, but the model has 2 layers of 2 heads: expected (2,) (one value per head, "
        "for every layer), (2, 2) (per layer and head) or (2, 1 or 2, 2, 1 or 8, 1 or 8) (already expanded)"
    )
    with pytest.raises(UserError, match=re.escape(expected)):
        mlm(input_ids=ids, head_mask=torch.ones(shape))


def test_head_mask_accepted_forms_agree(mlm, ids):
    """(heads,), (layers, heads) and the 5-D expanded form of transformers' get_head_mask give one result."""
    per_head = torch.tensor([1.0, 0.0])
    a = mlm(input_ids=ids, head_mask=per_head).logits
    b = mlm(input_ids=ids, head_mask=per_head.expand(2, 2)).logits
    c = mlm(input_ids=ids, head_mask=per_head.expand(2, 2)[:, None, :, None, None]).logits
    d = mlm(input_ids=ids, head_mask=per_head.expand(2, 2)[:, None, :, None, None].expand(2, 2, 2, 8, 8)).logits
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    torch.testing.assert_close(a, d)
    with pytest.raises(UserError, match=r"head_mask: value nan at \[1\] is not a finite number"):
        mlm(input_ids=ids, head_mask=torch.tensor([1.0, float("nan")]))


def test_mlm_labels_shape(mlm, ids):
    with pytest.raises(
        UserError,
        match=re.escape("labels has shape (2, 7), expected (2, 8): one token id (or -100 to ignore it) per input position"),
    ):
        mlm(input_ids=ids, labels=torch.full((2, 7), 3))
    assert mlm(input_ids=ids, labels=torch.full((2, 8), 3, dtype=torch.int32)).loss.isfinite()  # int32 ids are fine


def test_causal_lm_labels_shape_is_checked_before_the_shift():
    model = megabert.MegatronBertForCausalLM(MegatronBertConfig(**SMALL, is_decoder=True)).eval()
    with pytest.raises(UserError, match=re.escape("labels has shape (2, 7), expected (2, 8)")):
        model(input_ids=torch.ones(2, 8, dtype=torch.long), labels=torch.ones(2, 7, dtype=torch.long))


def test_pretraining_labels_shapes(ids):
    model = megabert.MegatronBertForPreTraining(MegatronBertConfig(**SMALL)).eval()
    with pytest.raises(UserError, match=re.escape("labels has shape (2, 9), expected (2, 8)")):
        model(input_ids=ids, labels=torch.ones(2, 9, dtype=torch.long), next_sentence_label=torch.zeros(2, dtype=torch.long))
    with pytest.raises(UserError, match=re.escape("next_sentence_label has shape (3,), expected (2,): one label per example")):
        model(input_ids=ids, labels=torch.ones(2, 8, dtype=torch.long), next_sentence_label=torch.zeros(3, dtype=torch.long))


def test_next_sentence_labels_shape(ids):
    model = megabert.MegatronBertForNextSentencePrediction(MegatronBertConfig(**SMALL)).eval()
    with pytest.raises(UserError, match=re.escape("labels has shape (3,), expected (2,): one label per example")):
        model(input_ids=ids, labels=torch.zeros(3, dtype=torch.long))
    assert model(input_ids=ids, labels=torch.zeros(2, 1, dtype=torch.long)).loss.isfinite()  # (batch, 1) as the reference


def test_classifier_given_three_labels_for_a_batch_of_two(ids):
    model = megabert.MegatronBertForSequenceClassification(MegatronBertConfig(**SMALL, num_labels=3)).eval()
    with pytest.raises(UserError, match=re.escape("labels has shape (3,), expected (2,): one class id per example of the batch")):
        model(input_ids=ids, labels=torch.tensor([0, 1, 2]))
    regression = megabert.MegatronBertForSequenceClassification(MegatronBertConfig(**SMALL, num_labels=1)).eval()
    with pytest.raises(UserError, match=re.escape("labels has shape (3,), expected (2,): one target value per example")):
        regression(input_ids=ids, labels=torch.tensor([0.5, 1.0, 2.0]))
    multi = megabert.MegatronBertForSequenceClassification(
        MegatronBertConfig(**SMALL, num_labels=3, problem_type="multi_label_classification")
    ).eval()
    with pytest.raises(UserError, match=re.escape("labels has shape (2, 2), expected (2, 3): multi-label targets")):
        multi(input_ids=ids, labels=torch.ones(2, 2))


def test_token_classification_labels_shape(ids):
    model = megabert.MegatronBertForTokenClassification(MegatronBertConfig(**SMALL, num_labels=4)).eval()
    with pytest.raises(UserError, match=re.escape("labels has shape (2, 7), expected (2, 8): one label id (or -100")):
        model(input_ids=ids, labels=torch.zeros(2, 7, dtype=torch.long))


def test_question_answering_positions_shape(ids):
    model = megabert.MegatronBertForQuestionAnswering(MegatronBertConfig(**SMALL)).eval()
    good = torch.zeros(2, dtype=torch.long)
    with pytest.raises(UserError, match=re.escape("start_positions has shape (3,), expected (2,): one token position per example")):
        model(input_ids=ids, start_positions=torch.zeros(3, dtype=torch.long), end_positions=good)
    with pytest.raises(UserError, match=re.escape("end_positions has shape (2, 8), expected (2,)")):
        model(input_ids=ids, start_positions=good, end_positions=torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(UserError, match="start_positions must hold integer token positions, got dtype torch.float32"):
        model(input_ids=ids, start_positions=good.float(), end_positions=good)
    wrong = megabert.MegatronBertForQuestionAnswering(MegatronBertConfig(**SMALL, num_labels=3)).eval()
    with pytest.raises(UserError, match=re.escape("needs config.num_labels == 2 (start and end scores), got 3")):
        wrong(input_ids=ids)


def test_multiple_choice_labels_shape():
    model = megabert.MegatronBertForMultipleChoice(MegatronBertConfig(**SMALL)).eval()
    choices = torch.ones(2, 3, 8, dtype=torch.long)
    with pytest.raises(UserError, match=re.escape("labels has shape (3,), expected (2,): the index of the right choice")):
        model(input_ids=choices, labels=torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_embeds(mlm, bad):
    embeds = torch.zeros(2, 8, 64)
    embeds[1, 3, 5] = bad
    with pytest.raises(UserError, match=re.escape(f"inputs_embeds: value {bad} at [1, 3, 5] is not a finite number")):
        mlm(inputs_embeds=embeds)


def test_inputs_that_are_not_tensors(mlm):
    with pytest.raises(UserError, match="input_ids must be a torch.Tensor, got list"):
        mlm(input_ids=[[1, 2, 3]])
    with pytest.raises(UserError, match="labels must be a torch.Tensor, got list"):
        mlm(input_ids=torch.ones(1, 3, dtype=torch.long), labels=[[1, 2, 3]])


# =============================================================================== model folders


def _damaged(folder: Path, kind: str) -> Path:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # garbled header
        path.write_bytes(data[:8] + b"#" * 16 + data[24:])
    return path


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbled"])
def test_damaged_safetensors_is_one_line_everywhere(tmp_path, capsys, mlm, kind):
    folder = save_folder(tmp_path / "m", mlm)
    path = _damaged(folder, kind)
    expected = f"{path} is not a readable safetensors file: "
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        megabert.MegatronBertForMaskedLM.from_pretrained(folder)
    # every command that reads the folder goes through the same checked loader
    for args in (
        ["info", str(folder)],
        ["convert", "to-megatron", str(folder), str(tmp_path / "out"), "--tensor-parallel", "1"],
        ["fill-mask", str(folder), "the [MASK] sat"],
    ):
        assert_one_line(*run_cli(capsys, *args), expected)
    assert not (tmp_path / "out").exists()


def test_damaged_safetensors_reasons_in_words(tmp_path, mlm):
    folder = save_folder(tmp_path / "m", mlm)
    _damaged(folder, "truncated")
    with pytest.raises(CheckpointError, match=r"the file is shorter than its header says \(truncated download\?\)"):
        megabert.MegatronBertForMaskedLM.from_pretrained(folder)
    _damaged(folder, "empty")
    with pytest.raises(CheckpointError, match=r"too short to hold a safetensors header"):
        megabert.MegatronBertForMaskedLM.from_pretrained(folder)


def _with_nan_weight(folder: Path, key: str = "bert.encoder.layer.1.attention.self.query.weight") -> Path:
    """Garble a tensor's bytes, header intact: the file loads, the weight is NaN."""
    path = folder / "model.safetensors"
    state = load_file(str(path))
    state[key][0, :3] = float("nan")
    save_file(state, str(path), metadata={"format": "pt"})
    return path


def test_non_finite_weights_are_refused_on_load(tmp_path, capsys, mlm):
    folder = save_folder(tmp_path / "m", mlm)
    path = _with_nan_weight(folder)
    expected = (
        f"{path}: weight bert.encoder.layer.1.attention.self.query.weight holds 3 non-finite value(s) (NaN or inf) "
        "out of 4096: the file is damaged, or was saved from a run that diverged"
    )
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        megabert.MegatronBertForMaskedLM.from_pretrained(folder)
    loaded = megabert.MegatronBertForMaskedLM.from_pretrained(folder, check_finite=False)  # the opt-out
    assert loaded.bert.encoder.layer[1].attention.self.query.weight.isnan().sum() == 3
    # fill-mask exits non-zero with one line instead of printing "score": NaN
    assert_one_line(*run_cli(capsys, "fill-mask", str(folder), "the [MASK] sat"), expected)


def test_convert_refuses_non_finite_weights(tmp_path, capsys, mlm):
    folder = save_folder(tmp_path / "m", mlm)
    _with_nan_weight(folder)
    out = tmp_path / "out"
    code, err = run_cli(capsys, "convert", "to-megatron", str(folder), str(out), "--tensor-parallel", "1")
    assert_one_line(code, err, "holds 3 non-finite value(s)", "a checkpoint with non-finite weights is not converted")
    assert not out.exists()


def test_convert_from_megatron_refuses_non_finite_weights(tmp_path):
    from megabert.convert.megatron_lm import convert_megatron_to_hf
    from tests.convert.megatron_fixtures import Layout, megatron_shards, reference_model

    ckpt = megatron_shards(reference_model(), Layout())[(0, 0)]
    weights = ckpt["model"]["language_model"]["embedding"]["word_embeddings"]
    weights["weight"][2, 1] = float("inf")
    path = tmp_path / "model_optim_rng.pt"
    torch.save(ckpt, path)
    with pytest.raises(UserError, match=r"weight bert\.embeddings\.word_embeddings\.weight holds 1 non-finite value\(s\).*not converted"):
        convert_megatron_to_hf(path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("index_name, suffix", [("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "bin")])
@pytest.mark.parametrize("shard", ["../outside", "/tmp/outside", "sub/../../outside"])
def test_shards_outside_the_folder_are_refused(tmp_path, capsys, mlm, index_name, suffix, shard):
    folder = save_folder(tmp_path / "m", mlm, safe=suffix == "safetensors")
    single = folder / ("model.safetensors" if suffix == "safetensors" else "pytorch_model.bin")
    name = f"{shard}.{suffix}"
    outside = (folder / name) if not name.startswith("/") else Path(name)
    outside.parent.mkdir(parents=True, exist_ok=True)
    single.rename(tmp_path / f"outside.{suffix}")  # the weights exist, but outside the folder
    (folder / index_name).write_text(json.dumps({"weight_map": {"bert.embeddings.word_embeddings.weight": name}}))
    expected = f"the weight_map names shard {name!r}, which is outside the model folder {folder}"
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        megabert.MegatronBertForMaskedLM.from_pretrained(folder)
    assert_one_line(*run_cli(capsys, "info", str(folder)), expected)


def test_shards_inside_the_folder_still_load(tmp_path, mlm):
    folder = tmp_path / "m"
    mlm.save_pretrained(folder, max_shard_size=20_000)
    assert (folder / "model.safetensors.index.json").is_file()
    loaded = megabert.MegatronBertForMaskedLM.from_pretrained(folder)
    torch.testing.assert_close(loaded.cls.predictions.bias, mlm.cls.predictions.bias)


class _RunsShell:
    def __reduce__(self):
        return (os.system, ("true",))


class _Plain:
    pass


def _no_torch_advice(message: str) -> None:
    assert "weights_only" not in message and "\x1b" not in message and "file an issue" not in message, message


def test_bare_pickle_is_refused_in_plain_words(tmp_path, capsys, mlm):
    folder = save_folder(tmp_path / "m", mlm, safe=False)
    path = folder / "pytorch_model.bin"
    path.write_bytes(pickle.dumps(dict(mlm.state_dict())))
    expected = (
        f"refusing to load {path}: it is a bare pickle, not a file torch.save wrote (a zip archive); it is not "
        "loaded because unpickling a bare pickle can run any code stored in it"
    )
    with pytest.raises(CheckpointError, match=re.escape(expected)) as info:
        megabert.MegatronBertForMaskedLM.from_pretrained(folder)
    _no_torch_advice(str(info.value))
    assert_one_line(*run_cli(capsys, "info", str(folder)), expected)


@pytest.mark.parametrize(
    "payload, name", [(_RunsShell(), "posix.system"), (_Plain(), f"{__name__}._Plain")], ids=["os.system", "class"]
)
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_refused_pickle_names_the_global_and_why(tmp_path, mlm, payload, name, zip_format):
    folder = save_folder(tmp_path / "m", mlm, safe=False)
    path = folder / "pytorch_model.bin"
    torch.save({**mlm.state_dict(), "extra": payload}, path, _use_new_zipfile_serialization=zip_format)
    expected = (
        f"refusing to load {path}: its pickle refers to {name}, which is not allowed (a checkpoint may only hold "
        "tensors, storages, containers, numbers, strings, argparse.Namespace, numpy arrays and Megatron enums); "
        "it is not loaded because unpickling it would import and run code that the file names"
    )
    with pytest.raises(CheckpointError, match=re.escape(expected)) as info:
        megabert.MegatronBertForMaskedLM.from_pretrained(folder)
    _no_torch_advice(str(info.value))


def test_converter_unpickler_messages_are_plain(tmp_path):
    """The Megatron converter's allow-list unpickler: same words for a bare pickle and a refused global."""
    from megabert.safe_pickle import describe_load_error, safe_load

    path = tmp_path / "model_optim_rng.pt"
    path.write_bytes(pickle.dumps({"model": {"w": [1.0]}}, protocol=2))
    with pytest.raises(UserError, match=r"model_optim_rng\.pt: it is a bare pickle, not a file torch.save wrote") as info:
        safe_load(path)
    _no_torch_advice(str(info.value))
    torch.save({"x": _Plain()}, path)
    with pytest.raises(UserError, match=rf"its pickle refers to {re.escape(__name__)}\._Plain, which is not allowed") as info:
        safe_load(path)
    _no_torch_advice(str(info.value))
    path.write_bytes(b"")
    with pytest.raises(UserError, match=r"is empty \(0 bytes\): it is not a PyTorch checkpoint"):
        safe_load(path)
    # torch's own text, escape codes and advice included, comes out as one plain line
    noisy = pickle.UnpicklingError(
        "Weights only load failed. \x1b[1mdo those steps only if you trust the source\x1b[0m.\n\t(1) Re-running "
        "`torch.load` with `weights_only` set to `False` will likely succeed\n\tWeightsUnpickler error: Unsupported "
        "global: GLOBAL evil.thing was not an allowed global by default."
    )
    text = describe_load_error(path, noisy)
    assert "its pickle refers to evil.thing" in text and text.count("\n") == 0
    _no_torch_advice(text)


# =============================================================================== pipelines


def test_pipeline_never_returns_nan(tmp_path, mlm):
    from megabert.inference.pipelines import pipeline

    broken = megabert.MegatronBertForMaskedLM(MegatronBertConfig(**SMALL)).eval()
    broken.load_state_dict(mlm.state_dict())
    with torch.no_grad():
        broken.cls.predictions.transform.dense.weight[0, 0] = float("nan")
    fill = pipeline("fill-mask", broken, tokenizer())
    expected = "input 0: the model produced non-finite scores (NaN or inf), so there is no answer to give"
    with pytest.raises(UserError, match=re.escape(expected)):
        fill(["the cat [MASK]", "the [MASK] sat"], top_k=2)


def test_fill_mask_never_offers_vocabulary_padding(tmp_path):
    """A converted model pads its vocabulary rows past the tokenizer; a padding row must never be a candidate."""
    from megabert.inference.pipelines import pipeline

    torch.manual_seed(1)
    padded = megabert.MegatronBertForMaskedLM(MegatronBertConfig(**{**SMALL, "vocab_size": len(VOCAB) + 9})).eval()
    with torch.no_grad():
        padded.cls.predictions.bias[len(VOCAB):] = 5.0  # padding rows would win
    folder = save_folder(tmp_path / "padded", padded)
    fill = pipeline("fill-mask", str(folder), top_k=len(VOCAB) + 5)
    results = fill("the [MASK] sat")
    assert len(results) == len(VOCAB)  # every real token, and only those
    assert all(r["token"] < len(VOCAB) for r in results)
    # each score is the reference's: the softmax over every row, padding rows included
    ids = torch.tensor([tokenizer()("the [MASK] sat")["input_ids"]])
    with torch.no_grad():
        probs = padded(input_ids=ids).logits[0, 2].softmax(-1)
    for r in results:
        assert abs(r["score"] - float(probs[r["token"]])) < 1e-5
    top = fill("the [MASK] sat", top_k=3)
    assert [r["token"] for r in top] == [r["token"] for r in results[:3]]


# =============================================================================== misleading errors


def test_vocab_file_that_is_a_folder(tmp_path, capsys):
    from megabert.convert.megatron_lm import convert_megatron_to_hf
    from megabert.tokenization import read_vocab_file

    folder = tmp_path / "vocab"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    src = tmp_path / "model_optim_rng.pt"
    src.write_bytes(b"x")
    expected = f"vocabulary file {folder} is a folder, not a file; did you mean {folder / 'vocab.txt'}?"
    with pytest.raises(UserError, match=re.escape(expected)):
        convert_megatron_to_hf(src, tmp_path / "hf", vocab_file=folder)
    with pytest.raises(UserError, match=re.escape(expected)):
        read_vocab_file(folder)
    code, err = run_cli(capsys, "convert", "megatron", str(src), str(tmp_path / "hf"), "--vocab-file", str(folder))
    assert_one_line(code, err, expected)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_vocab_file(tmp_path / "nope.txt")


def test_lone_surrogate_is_named_by_position():
    tok = tokenizer()
    expected = "character 3 is a lone surrogate '\\udcff', which is not text"
    with pytest.raises(UserError, match=re.escape("text[0]: " + expected)):
        tok("abc\udcff def")
    with pytest.raises(UserError, match=re.escape("text[1]: " + expected)):
        tok(["fine", "abc\udcff def"])
    with pytest.raises(UserError, match=re.escape("text_pair: " + expected)):
        tok("fine", "abc\udcff def")
    with pytest.raises(UserError, match=re.escape("text[0][1]: character 0 is a lone surrogate")):
        tok(["abc", "\udcff"], is_split_into_words=True)
    with pytest.raises(UserError, match=re.escape("text: " + expected)):
        tok.tokenize("abc\udcff def")
    with pytest.raises(UserError, match=re.escape("texts[0]: " + expected)):
        tok.encode_plain(["abc\udcff def"])


def test_lone_surrogate_in_a_pipeline_names_the_input(tmp_path, mlm):
    from megabert.inference.pipelines import pipeline

    fill = pipeline("fill-mask", mlm, tokenizer())
    with pytest.raises(UserError, match=re.escape("input 1: text: character 4 is a lone surrogate '\\udcff'")):
        fill(["the [MASK]", "the \udcff[MASK]"])


def _bad_line_5(path: Path, lines: list[str]) -> Path:
    data = [line.encode() for line in lines]
    data[4] = data[4][:3] + b"\xff" + data[4][3:]  # line 5 (1-based): an invalid start byte
    path.write_bytes(b"\n".join(data) + b"\n")
    return path


UTF8_AT_LINE_5 = ":5: not valid UTF-8 text (invalid start byte at byte 4 of the line); the file may be binary"


@pytest.mark.parametrize("fmt", ["text", "tsv", "csv", "jsonl"])
def test_invalid_utf8_line_number_in_prediction_inputs(tmp_path, capsys, fmt):
    from megabert.inference.io import read_records

    # long lines, so that a block decoder would read past line 5 before the error
    if fmt == "jsonl":
        lines = [json.dumps({"text": "x" * 3000 + " [MASK]"})] * 8
    elif fmt in ("tsv", "csv"):
        lines = ["text"] + ["a" * 3000 + " [MASK]"] * 7
    else:
        lines = ["the cat " * 400 + "[MASK]"] * 8
    path = _bad_line_5(tmp_path / f"in.{fmt}", lines)
    with pytest.raises(UserError, match=re.escape(f"{path}{UTF8_AT_LINE_5}")):
        list(read_records(str(path), fmt))


def test_one_reader_for_finetune_and_preprocess(tmp_path):
    """The same line and the same words from the fine-tuning readers and preprocess."""
    from megabert.data.preprocess import read_documents
    from megabert.data.tasks import read_conll, read_sequence_classification

    tsv = _bad_line_5(tmp_path / "train.tsv", ["text\tlabel"] + ["a b\t1"] * 7)
    with pytest.raises(UserError, match=re.escape(f"{tsv}{UTF8_AT_LINE_5}")):
        read_sequence_classification(tsv)
    conll = _bad_line_5(tmp_path / "train.conll", ["word O"] * 8)
    with pytest.raises(UserError, match=re.escape(f"{conll}{UTF8_AT_LINE_5}")):
        read_conll(conll)
    text = _bad_line_5(tmp_path / "corpus.txt", ["one sentence here"] * 8)
    with pytest.raises(UserError, match=re.escape(f"{text}{UTF8_AT_LINE_5}")):
        list(read_documents(text))


def test_line_ends_and_bom(tmp_path):
    from megabert.lines import iter_lines

    path = tmp_path / "x.txt"
    path.write_bytes(b"\xef\xbb\xbfone\r\ntwo\rthree\nfour")
    assert list(iter_lines(path)) == [(1, "one"), (2, "two"), (3, "three"), (4, "four")]
    assert [line for _, line in iter_lines(path, keepends=True)] == ["one\r\n", "two\r", "three\n", "four"]
