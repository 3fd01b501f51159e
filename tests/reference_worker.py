"""Runs folders through the installed transformers, for tests that cross the two generations.

    python -m tests.reference_worker JOBS.json     (from the repository root)

JOBS.json is a list of jobs: ``{"class": "MegatronBertForMaskedLM", "folder": ..., "inputs":
FILE.pt, "outputs": FILE.pt, "resave": FOLDER or null}``. Each folder is loaded with
``dtype="auto"``; its outputs on the inputs (a flat list of tensors, caches included) are saved
with the loading report (missing / unexpected keys, dtype), and the model is saved again to
``resave`` when given. tests/test_cross_generation.py runs this in the *other* reference
environment (.venv-tf5 from .venv, and the other way round).
"""

from __future__ import annotations

import json
import sys

import torch
import transformers

from tests.reference import V5, to_tuple


def flat_tensors(value) -> list[torch.Tensor]:
    """Every tensor of a (nested) output tuple, in order."""
    if isinstance(value, torch.Tensor):
        return [value.detach()]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in flat_tensors(item)]
    return []


def run_job(job: dict) -> None:
    cls = getattr(transformers, job["class"])
    dtype_key = "dtype" if V5 else "torch_dtype"
    model, info = cls.from_pretrained(job["folder"], output_loading_info=True, **{dtype_key: "auto"})
    model.eval()
    inputs = torch.load(job["inputs"])
    with torch.no_grad():
        outputs = flat_tensors(to_tuple(model(**inputs)))
    torch.save({
        "outputs": outputs,
        "missing_keys": sorted(info["missing_keys"]),
        "unexpected_keys": sorted(info["unexpected_keys"]),
        "dtype": str(model.dtype),
        "version": transformers.__version__,
    }, job["outputs"])
    if job.get("resave"):
        model.save_pretrained(job["resave"])


def main(argv: list[str]) -> int:
    with open(argv[1], encoding="utf-8") as handle:
        jobs = json.load(handle)
    for job in jobs:
        run_job(job)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
