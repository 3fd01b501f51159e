"""`megabert pretrain` and `megabert finetune` under torchrun against the same commands in one process.

Each test launches the real command line with ``python -m torch.distributed.run`` (2 CPU
processes, gloo) on a tiny generated corpus/tokenizer, and runs the same command in this
process as the reference. With dropout off, the losses the trainer logs in ``metrics.jsonl``
must agree within 1e-5: the layouts only change the order of some floating-point sums.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))

from launcher import free_port  # noqa: E402
from trainkit import WORDS, tiny_config, write_tiny_corpus, write_tiny_tokenizer  # noqa: E402

from megabert.cli import main as cli_main  # noqa: E402

pytestmark = pytest.mark.distributed

TOL = 1e-5
# hidden 32, 2 layers, 4 heads; sizes TP=2 divides (heads, MLP, vocabulary); no dropout (exact comparisons).
MODEL = dict(vocab_size=128, intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def torchrun(args: list[str], cwd: Path, timeout: float = 240.0) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 -m megabert ARGS`` on this machine; fails the test on a non-zero exit."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "megabert", *args,
    ]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"torchrun exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def records(output: Path, split: str) -> list[dict]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def assert_close(actual: list[float], expected: list[float], what: str) -> None:
    assert len(actual) == len(expected) and len(expected) > 0, f"{what}: {len(actual)} values, expected {len(expected)}"
    diff = float(np.abs(np.asarray(actual) - np.asarray(expected)).max())
    assert diff <= TOL, f"{what}: differs from the single-process run by {diff:.3g} (> {TOL}): {actual} vs {expected}"


# --------------------------------------------------------------------------------- pretrain
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer, train/valid indexed datasets and a tiny model config.json."""
    from megabert.data.preprocess import preprocess_corpus

    root = tmp_path_factory.mktemp("cli-corpus")
    write_tiny_tokenizer(root / "tokenizer")
    preprocess_corpus(write_tiny_corpus(root / "text"), root / "data" / "tiny", root / "tokenizer",
                      valid_fraction=0.25, seed=1, progress=False)
    tiny_config(max_position_embeddings=64, **MODEL).save_pretrained(root / "model")
    return {"root": root, "tokenizer": root / "tokenizer", "train": root / "data" / "tiny_train",
            "valid": root / "data" / "tiny_valid", "model": root / "model" / "config.json"}


def pretrain_args(corpus: dict[str, Path], output: Path) -> list[str]:
    return [
        "pretrain", "--data", str(corpus["train"]), "--valid-data", str(corpus["valid"]),
        "--tokenizer", str(corpus["tokenizer"]), "--model-config", str(corpus["model"]), "--output", str(output),
        "--max-steps", "3", "--batch-size", "4", "--seq-length", "32", "--lr", "3e-3", "--warmup-steps", "1",
        "--eval-batches", "2", "--log-every", "1", "--device", "cpu", "--quiet",
    ]


def test_pretrain_cli_tensor_parallel_2_equals_one_process(corpus, tmp_path):
    from megabert import MegatronBertForPreTraining

    single, parallel = tmp_path / "single", tmp_path / "tp2"
    assert cli_main(pretrain_args(corpus, single)) == 0
    done = torchrun([*pretrain_args(corpus, parallel), "--tensor-parallel", "2"], cwd=tmp_path)
    # Rank 0 prints the summary, once.
    assert done.stdout.count("model: ") == 1 and str(parallel / "final") in done.stdout

    train_single, train_parallel = records(single, "train"), records(parallel, "train")
    assert [r["step"] for r in train_parallel] == [1, 2, 3]
    assert_close([r["loss"] for r in train_parallel], [r["loss"] for r in train_single], "train loss per step")
    assert_close([r["grad_norm"] for r in train_parallel], [r["grad_norm"] for r in train_single], "gradient norm")
    valid_single, valid_parallel = records(single, "valid")[-1], records(parallel, "valid")[-1]
    assert_close([valid_parallel["mlm_loss"]], [valid_single["mlm_loss"]], "validation MLM loss")

    # final/ is one whole model (gathered from the shards) that loads in megabert, with the
    # tokenizer, and computes what the single-process model computes.
    assert {"config.json", "model.safetensors", "vocab.txt"} <= {p.name for p in (parallel / "final").iterdir()}
    ours = MegatronBertForPreTraining.from_pretrained(parallel / "final").eval()
    reference = MegatronBertForPreTraining.from_pretrained(single / "final").eval()
    assert ours.state_dict().keys() == reference.state_dict().keys()
    ids = torch.tensor([[2, 10, 11, 12, 4, 13, 3, 14, 15, 3]])
    with torch.no_grad():
        a, b = ours(input_ids=ids), reference(input_ids=ids)
    torch.testing.assert_close(a.prediction_logits, b.prediction_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.seq_relationship_logits, b.seq_relationship_logits, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------- finetune
def write_sentences(path: Path, n: int, seed: int) -> None:
    """A GLUE SST-2 style TSV: label 1 when the sentence holds "happy" or "warm"."""
    rng = random.Random(seed)
    filler = [w for w in WORDS if w not in ("happy", "warm", "sad", "cold")]
    lines = ["sentence\tlabel"]
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.choices(filler, k=rng.randint(3, 8))
        words.insert(rng.randint(0, len(words)), rng.choice(("happy", "warm") if label else ("sad", "cold")))
        lines.append(f"{' '.join(words)}\t{label}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def classification(tmp_path_factory) -> dict[str, Path]:
    """A model folder (config + tokenizer; --random-init) and train/dev files."""
    root = tmp_path_factory.mktemp("cli-classification")
    write_tiny_tokenizer(root / "model")
    tiny_config(max_position_embeddings=64, **MODEL).save_pretrained(root / "model")
    write_sentences(root / "train.tsv", 64, seed=1)  # 64 = 4 steps of 16 (8 per rank, or 2 x 8 accumulated)
    write_sentences(root / "dev.tsv", 24, seed=2)
    return {"model": root / "model", "train": root / "train.tsv", "dev": root / "dev.tsv"}


def finetune_args(data: dict[str, Path], output: Path) -> list[str]:
    return [
        "finetune", "--task", "sequence-classification", "--model", str(data["model"]), "--random-init",
        "--train", str(data["train"]), "--validation", str(data["dev"]), "--output", str(output),
        "--max-steps", "4", "--eval-every", "2", "--batch-size", "8", "--lr", "1e-2", "--warmup-steps", "1",
        "--max-length", "16", "--seed", "0", "--log-every", "1", "--device", "cpu", "--quiet",
    ]


def test_finetune_cli_data_parallel_2_equals_one_process_with_accumulation(classification, tmp_path):
    """DP=2 with batch 8 per rank is one process with batch 8 and --grad-accum 2."""
    single, parallel = tmp_path / "single", tmp_path / "dp2"
    assert cli_main([*finetune_args(classification, single), "--grad-accum", "2"]) == 0
    done = torchrun(finetune_args(classification, parallel), cwd=tmp_path)
    assert done.stdout.count("best accuracy") == 1

    train_single, train_parallel = records(single, "train"), records(parallel, "train")
    assert [r["step"] for r in train_parallel] == [1, 2, 3, 4]
    assert_close([r["loss"] for r in train_parallel], [r["loss"] for r in train_single], "train loss per step")
    results_single = json.loads((single / "eval_results.json").read_text())
    results_parallel = json.loads((parallel / "eval_results.json").read_text())
    assert [h["step"] for h in results_parallel["history"]] == [2, 4]
    for h_par, h_single in zip(results_parallel["history"], results_single["history"]):
        assert_close([h_par["loss"], h_par["accuracy"]], [h_single["loss"], h_single["accuracy"]],
                     f"validation at step {h_par['step']}")
    assert results_parallel["best_step"] == results_single["best_step"]
    assert results_parallel["stop_reason"] == "max_steps"

    # best/ holds the model of the best step, loadable, with the labels.
    from megabert import MegatronBertForSequenceClassification

    best = MegatronBertForSequenceClassification.from_pretrained(parallel / "best").eval()
    assert best.config.id2label == {0: "0", 1: "1"}
    reference = MegatronBertForSequenceClassification.from_pretrained(single / "best").eval()
    ids = torch.tensor([[2, 10, 11, 12, 13, 3]])
    with torch.no_grad():
        torch.testing.assert_close(best(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
