"""Safety: pickles run no code, zip paths cannot escape, and bad sources get a clear one-line error."""

from __future__ import annotations

import argparse
import enum
import os
import sys
import types
import zipfile

import numpy as np
import pytest
import torch

from megabert.cli import main as cli_main
from megabert.convert.megatron_lm import convert_megatron_to_hf
from megabert.safe_pickle import MegatronObject, globals_in_checkpoint, safe_load
from megabert.convert.sources import find_shards
from megabert.errors import UserError
from tests.convert.megatron_fixtures import Layout, megatron_shards, reference_model, write_save_folder


class _CreatesFile:
    """Unpickling this runs ``open(path, "w")``: creates the file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class _RunsShell:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("payload", [_CreatesFile, _RunsShell], ids=["open", "os.system"])
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_malicious_checkpoint_is_refused(tmp_path, payload, zip_format):
    planted = tmp_path / "pwned"
    ckpt = megatron_shards(reference_model(), Layout())[(0, 0)]
    ckpt["args"].evil = payload(str(planted))  # hidden deep inside the args
    path = tmp_path / "model_optim_rng.pt"
    torch.save(ckpt, path, _use_new_zipfile_serialization=zip_format)
    name = "io.open" if payload is _CreatesFile else "posix.system"
    with pytest.raises(UserError, match=rf"refusing to load .*model_optim_rng\.pt: its pickle refers to {name}"):
        convert_megatron_to_hf(path, tmp_path / "hf")
    assert not planted.exists()
    assert not (tmp_path / "hf").exists()
    # the CLI reports it as one line
    code = cli_main(["convert", "megatron", str(path), str(tmp_path / "hf")])
    assert code == 2 and not planted.exists()


def test_other_libraries_allowlists_do_not_apply(tmp_path):
    """A library that allowlisted `open` globally (megatron-core does allowlist its own types) changes nothing."""
    planted = tmp_path / "pwned"
    path = tmp_path / "model_optim_rng.pt"
    torch.save({"model": {}, "x": _CreatesFile(str(planted))}, path)
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([(open, "io.open")])
    try:
        with pytest.raises(UserError, match=r"its pickle refers to io\.open"):
            safe_load(path)
        assert (open, "io.open") in torch.serialization.get_safe_globals()  # restored afterwards
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)
    assert not planted.exists()


def test_allowed_types_load(tmp_path):
    """Namespace, numpy RNG state, BytesIO extra state, CUDA-free tensors: what real files hold."""
    state = {
        "args": argparse.Namespace(hidden_size=8, params_dtype=torch.float16),
        "np_rng_state": np.random.RandomState(3).get_state(),
        "extra": {"x._extra_state": __import__("io").BytesIO(b"te")},
        "model": {"w": torch.arange(4.0)},
        "scalar": np.float32(2.5),
    }
    for zip_format in (True, False):
        path = tmp_path / f"ok{zip_format}.pt"
        torch.save(state, path, _use_new_zipfile_serialization=zip_format)
        loaded = safe_load(path)
        assert loaded["args"].params_dtype is torch.float16
        assert np.array_equal(loaded["np_rng_state"][1], state["np_rng_state"][1])
        assert torch.equal(loaded["model"]["w"], torch.arange(4.0))
        assert loaded["scalar"] == np.float32(2.5)


def test_megatron_enums_become_inert_placeholders(tmp_path, monkeypatch):
    """args.model_type = ModelType.encoder_or_decoder: loads without Megatron installed, runs nothing."""
    module = types.ModuleType("megatron.core.enums")

    class ModelType(enum.Enum):
        encoder_or_decoder = 1

    ModelType.__module__ = "megatron.core.enums"
    ModelType.__qualname__ = "ModelType"
    module.ModelType = ModelType
    monkeypatch.setitem(sys.modules, "megatron.core.enums", module)
    path = tmp_path / "enum.pt"
    torch.save({"args": argparse.Namespace(model_type=ModelType.encoder_or_decoder)}, path)
    monkeypatch.delitem(sys.modules, "megatron.core.enums")
    assert "megatron.core.enums.ModelType" in globals_in_checkpoint(path)
    loaded = safe_load(path)["args"].model_type
    assert isinstance(loaded, MegatronObject)
    assert loaded.megatron_name == "megatron.core.enums.ModelType" and loaded.value == 1


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "model_optim_rng.pt"
    path.write_text("hello")
    with pytest.raises(UserError, match=r"is not a PyTorch checkpoint \(neither a zip archive nor a pickle\)"):
        safe_load(path)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_truncated_checkpoint(tmp_path, zip_format):
    full = tmp_path / "full.pt"
    torch.save({"model": {"w": torch.randn(1000)}}, full, _use_new_zipfile_serialization=zip_format)
    path = tmp_path / "model_optim_rng.pt"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    expected = r"damaged zip archive \(truncated download\?\)" if zip_format else r"is not a readable PyTorch checkpoint \(unexpected EOF"
    with pytest.raises(UserError, match=expected):
        safe_load(path)


# ------------------------------------------------------------------------------ zips


def _zip(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data)
    return path


@pytest.mark.parametrize(
    "bad_name",
    ["../evil/model_optim_rng.pt", "release/../../model_optim_rng.pt", "/abs/model_optim_rng.pt", "C:/x/model_optim_rng.pt"],
)
def test_zip_path_traversal_is_refused(tmp_path, bad_name):
    src = _zip(tmp_path / "ngc.zip", {"release/mp_rank_00/model_optim_rng.pt": b"x", bad_name: b"y"})
    with pytest.raises(UserError, match=r"zip entry .* has an absolute path or '\.\.'"):
        convert_megatron_to_hf(src, tmp_path / "out" / "hf")
    assert not (tmp_path / "evil").exists() and not (tmp_path / "out" / "hf").exists()
    assert list((tmp_path / "out").iterdir()) == []  # no partial folder left either


def test_zip_without_checkpoint(tmp_path):
    src = _zip(tmp_path / "ngc.zip", {"README.txt": b"hi", "release/notes.md": b"x"})
    with pytest.raises(UserError, match=r"ngc\.zip holds no Megatron checkpoint: no model_optim_rng\.pt inside \(it has: README\.txt"):
        convert_megatron_to_hf(src, tmp_path / "hf")


def test_cli_error_is_one_line(tmp_path, capsys):
    src = _zip(tmp_path / "ngc.zip", {"README.txt": b"hi"})
    assert cli_main(["convert", "megatron", str(src), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("megabert convert: error:") and "no model_optim_rng.pt" in err


# ------------------------------------------------------------------------------ save folders


def test_tracker_names_missing_iteration(tmp_path):
    root = write_save_folder(tmp_path / "m", megatron_shards(reference_model(), Layout()), tracker="300")
    (root / "latest_checkpointed_iteration.txt").write_text("400\n")
    with pytest.raises(UserError, match=r"names iteration '400', but .*iter_0000400 does not exist"):
        find_shards(root, tmp_path / "scratch")
    (root / "latest_checkpointed_iteration.txt").write_text("latest please")
    with pytest.raises(UserError, match=r"expected an iteration number or 'release', found 'latest please'"):
        find_shards(root, tmp_path / "scratch")


def test_several_iterations_without_tracker(tmp_path):
    shards = megatron_shards(reference_model(), Layout())
    write_save_folder(tmp_path / "m", shards, tracker="100")
    write_save_folder(tmp_path / "m", shards, tracker="200")
    (tmp_path / "m" / "latest_checkpointed_iteration.txt").unlink()
    with pytest.raises(UserError, match=r"several iterations \(iter_0000100, iter_0000200\) and no latest_checkpointed"):
        find_shards(tmp_path / "m", tmp_path / "scratch")


def test_rank_folder_without_file(tmp_path):
    root = write_save_folder(tmp_path / "m", megatron_shards(reference_model(), Layout(), tp=2))
    (root / "release" / "mp_rank_01" / "model_optim_rng.pt").unlink()
    with pytest.raises(UserError, match=r"mp_rank_01 has no model_optim_rng\.pt"):
        find_shards(root, tmp_path / "scratch")


def test_distributed_checkpoint_is_explained(tmp_path):
    folder = tmp_path / "iter_0000010"
    folder.mkdir()
    (folder / "__0_0.distcp").write_bytes(b"")
    (folder / ".metadata").write_bytes(b"")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("10")
    with pytest.raises(UserError, match=r"distributed \(torch_dist\) checkpoint"):
        find_shards(tmp_path, tmp_path / "scratch")


def test_folder_without_checkpoint(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(UserError, match=r"no Megatron checkpoint in"):
        find_shards(tmp_path, tmp_path / "scratch")
