"""Folders across both generations of transformers, through megabert, for all nine classes.

In the 4.37.2 environment: a folder saved by 4.37 loads in megabert, megabert saves it, 5.x loads
that (no missing or unexpected keys, the same outputs), 5.x saves it again, and megabert loads
that with the very same weights. In the 5.x environment the same runs the other way round. The
other generation runs in its own virtual environment (``.venv-tf5`` beside ``.venv``, both set
up by ``make test``; ``MEGABERT_OTHER_REFERENCE_PYTHON`` names another interpreter) through
tests/reference_worker.py, once for all cases.

Cases: each class, tied and untied where a class has an output layer, fp32 and bf16. Outputs
agree within 1e-5 in fp32; in bf16 the weights are bit-identical at every step and the outputs
agree within bf16 rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
import transformers

import megabert
from tests.reference import V5, to_tuple
from tests.reference_worker import flat_tensors
from tests.test_parity import CLASSES, _config_kwargs, _inputs
from tests.test_transformers_interop import MLM_CLASSES, _randomise_biases

pytestmark = pytest.mark.reference

ROOT = Path(__file__).resolve().parents[1]
OTHER_VENV = ".venv" if V5 else ".venv-tf5"
OTHER_PYTHON = Path(os.environ.get("MEGABERT_OTHER_REFERENCE_PYTHON") or ROOT / OTHER_VENV / "bin" / "python")

CASES = [
    (name, tied, dtype)
    for name in CLASSES
    for tied in ((True, False) if name in MLM_CLASSES else (True,))
    for dtype in ("float32", "bfloat16")
]


def _case_id(case: tuple) -> str:
    name, tied, dtype = case
    return f"{name.removeprefix('MegatronBert')}-{'tied' if tied else 'untied'}-{dtype}"


def _close(got: list[torch.Tensor], expected: list[torch.Tensor], dtype: str, what: str) -> None:
    assert len(got) == len(expected), what
    for index, (a, b) in enumerate(zip(got, expected)):
        a, b = a.float(), b.float()
        # bf16: the two run the same math in a different order; 3 bf16 steps of the largest value.
        atol = 1e-5 if dtype == "float32" else 3 * 2**-8 * max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m: f"{what}, output {index}: {m}")


@pytest.fixture(scope="module")
def crossed(tmp_path_factory):
    """Every case through this generation, megabert and the other generation; the records per case."""
    if not OTHER_PYTHON.is_file():
        pytest.skip(f"the other reference environment is not set up ({OTHER_PYTHON}; `make setup setup-tf5`)")
    root = tmp_path_factory.mktemp("cross")
    records, jobs = {}, []
    for case in CASES:
        name, tied, dtype = case
        folder = root / _case_id(case)
        torch.manual_seed(0)
        config = transformers.MegatronBertConfig(**_config_kwargs(name), tie_word_embeddings=tied)
        ref = getattr(transformers, name)(config).eval()
        _randomise_biases(ref, seed=1)
        ref = ref.to(getattr(torch, dtype))
        ref.save_pretrained(folder / "this")
        inputs = _inputs(name)
        with torch.no_grad():
            expected = flat_tensors(to_tuple(ref(**inputs)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours = getattr(megabert, name).from_pretrained(folder / "this", dtype="auto", unpad_inputs=False)
        with torch.no_grad():
            ours_outputs = flat_tensors(ours(**inputs).to_tuple())
        ours.save_pretrained(folder / "megabert")
        torch.save(inputs, folder / "inputs.pt")
        jobs.append({"class": name, "folder": str(folder / "megabert"), "inputs": str(folder / "inputs.pt"),
                     "outputs": str(folder / "other.pt"), "resave": str(folder / "other")})
        records[case] = dict(folder=folder, expected=expected, ours=ours, ours_outputs=ours_outputs,
                             load_warnings=[str(w.message) for w in caught])
    (root / "jobs.json").write_text(json.dumps(jobs))
    done = subprocess.run([str(OTHER_PYTHON), "-m", "tests.reference_worker", str(root / "jobs.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for case, record in records.items():
        record["other"] = torch.load(record["folder"] / "other.pt")
    return records


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_this_generation_to_megabert_to_the_other(crossed, case):
    """4.37 -> megabert -> 5.x (in the 5.x environment: 5.x -> megabert -> 4.37)."""
    record = crossed[case]
    dtype = case[2]
    assert not record["load_warnings"], record["load_warnings"]
    assert str(record["ours"].dtype) == f"torch.{dtype}"
    _close(record["ours_outputs"], record["expected"], dtype, f"megabert on {transformers.__version__}'s folder")
    other = record["other"]
    assert other["missing_keys"] == [] and other["unexpected_keys"] == [], other
    assert other["dtype"] == f"torch.{dtype}", other["dtype"]
    assert other["version"].split(".")[0] != transformers.__version__.split(".")[0]
    _close(other["outputs"], record["ours_outputs"], dtype, f"transformers {other['version']} on megabert's folder")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_megabert_to_the_other_generation_and_back(crossed, case):
    """megabert -> 5.x -> megabert (in the 5.x environment: megabert -> 4.37 -> megabert): the same weights."""
    name, _, dtype = case
    record = crossed[case]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        back = getattr(megabert, name).from_pretrained(record["folder"] / "other", dtype="auto", unpad_inputs=False)
    assert not [str(w.message) for w in caught]
    assert back.dtype == record["ours"].dtype
    mine = record["ours"].state_dict()
    theirs = back.state_dict()
    assert sorted(theirs) == sorted(mine)
    for key, tensor in mine.items():
        assert torch.equal(theirs[key], tensor), key
    with torch.no_grad():
        again = flat_tensors(back(**_inputs(name)).to_tuple())
    _close(again, record["ours_outputs"], dtype, "megabert after the round trip")
