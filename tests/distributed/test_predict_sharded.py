"""The file commands under torchrun: each rank a share of the inputs, one output in input order.

Each test runs the real command line with ``python -m torch.distributed.run`` (2 CPU processes,
gloo) and the same command in one process; the outputs must be byte for byte the same file
(every input is computed alone or in the same length-sorted batches of its share, unpadded,
so its numbers do not depend on which other inputs run beside it).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from launcher import free_port  # noqa: E402

from megabert.commands.predict_sharded import shard_bounds  # noqa: E402
from tests.test_pipelines import NER_LABELS, build_model_folder  # noqa: E402

pytestmark = pytest.mark.distributed

WORDS = "the a cat dog sat on mat good bad movie very is was not".split()


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def megabert(args: list[str], cwd: Path, ranks: int) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "megabert"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(ranks),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "megabert",
    ]
    return subprocess.run(launcher + args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sharded")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = {
            "cls": build_model_folder(root / "cls", "MegatronBertForSequenceClassification",
                                      id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1}),
            "ner": build_model_folder(root / "ner", "MegatronBertForTokenClassification", id2label=NER_LABELS,
                                      label2id={v: k for k, v in NER_LABELS.items()}, seed=4, head_scale=10.0),
            "base": build_model_folder(root / "base", "MegatronBertForMaskedLM"),
        }
    rng = random.Random(3)
    for name, count in (("seven", 7), ("one", 1)):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 14))) for _ in range(count)]
        (root / f"{name}.txt").write_text("\n".join(lines) + "\n")
    models["root"] = root
    return models


def test_shares_cover_every_input_once():
    for total in (0, 1, 2, 7, 100):
        for world in (1, 2, 3, 8):
            taken = []
            for rank in range(world):
                start, stop = shard_bounds(total, rank, world)
                taken.extend(range(start, total if stop is None else stop))
            assert taken == list(range(total)), (total, world)
    assert shard_bounds(7, 0, 2) == (0, 4) and shard_bounds(7, 1, 2) == (4, None)


@pytest.mark.parametrize("command, model, inputs", [
    ("classify", "cls", "seven"),   # 7 inputs over 2 ranks: shares of 4 and 3
    ("embed", "base", "one"),       # fewer inputs than ranks: rank 1 has nothing to do
])
def test_two_ranks_write_what_one_process_writes(folders, command, model, inputs):
    root = folders["root"]
    one = root / f"{command}-{inputs}-1.jsonl"
    two = root / f"{command}-{inputs}-2.jsonl"
    for ranks, output in ((1, one), (2, two)):
        done = megabert([command, str(folders[model]), "--input", str(root / f"{inputs}.txt"), "-o", str(output)], root, ranks)
        assert done.returncode == 0, done.stderr[-3000:]
    assert two.read_bytes() == one.read_bytes()
    assert len(one.read_text().splitlines()) == (7 if inputs == "seven" else 1)
    leftovers = sorted(p.name for p in root.iterdir() if p.name.startswith("."))
    assert leftovers == []  # no part or temp file outlives the run


@pytest.mark.slow
def test_token_classification_and_errors_match_one_process(folders):
    root = folders["root"]
    outputs = {}
    for ranks in (1, 2):
        outputs[ranks] = root / f"tokens-{ranks}.jsonl"
        done = megabert(["tokens", str(folders["ner"]), "--input", str(root / "seven.txt"), "-o", str(outputs[ranks])],
                        root, ranks)
        assert done.returncode == 0, done.stderr[-3000:]
    assert outputs[2].read_bytes() == outputs[1].read_bytes()
    # an empty file: the one-line error of one process, exit 2, and no output file
    (root / "empty.txt").write_text("")
    errors = {}
    for ranks in (1, 2):
        done = megabert(["classify", str(folders["cls"]), "--input", str(root / "empty.txt"), "-o", str(root / "x.jsonl")],
                        root, ranks)
        assert done.returncode != 0
        errors[ranks] = [line for line in done.stderr.splitlines() if line.startswith("megabert classify: error:")]
        assert not (root / "x.jsonl").exists()
    assert errors[1] and errors[2] == errors[1]
