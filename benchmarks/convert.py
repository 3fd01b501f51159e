"""Conversion cost: time and peak memory of `convert_megatron_to_hf` on a 345M-sized checkpoint.

Builds a synthetic checkpoint with the shapes of NVIDIA's MegatronBERT 345M (24 layers,
hidden 1024, 16 heads, uncased vocabulary padded to 30592 rows, fp16), then converts it in a
fresh process and reads that process's peak resident memory (``ru_maxrss`` from ``wait4``),
so the numbers cover only the conversion. Prints one JSON line per case:

    {"case": ..., "checkpoint_bytes": ..., "seconds": ..., "peak_rss_bytes": ...,
     "rss_ratio": peak / checkpoint, "import_rss_bytes": ..., "target_ratio": ..., "ok": ...}

Sources and their targets (peak RSS / checkpoint size):

* ``ngc-zip``, ``folder``: Megatron-LM legacy checkpoints (2.5: a legacy pickle is read whole);
* ``torch_dist``: a Megatron Core distributed checkpoint, written by
  ``megabert convert to-megatron --format torch_dist`` (1.5: tensors are read one at a time);
* ``nemo``: a NeMo ``.nemo`` archive (plain tar of model_config.yaml and model_weights.ckpt
  with NeMo's ``model.``-prefixed legacy keys) (1.5).

Usage:
    python benchmarks/convert.py                       # NGC-style zip, legacy (pre-1.6) torch file inside
    python benchmarks/convert.py --source folder --tp 2 --pp 2 --format zip
    python benchmarks/convert.py --source torch_dist
    python benchmarks/convert.py --source nemo
    python benchmarks/convert.py --quick               # a small model, to check the script
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

TARGET_RATIO = 2.5  # legacy pickles
STREAMED_TARGET_RATIO = 1.5  # torch_dist and .nemo (issue 14)
SIZES_345M = dict(
    vocab_size=30592, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
    intermediate_size=4096, max_position_embeddings=512,
)  # fmt: skip
SIZES_QUICK = dict(
    vocab_size=1024, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
    intermediate_size=512, max_position_embeddings=128,
)  # fmt: skip


def _random_state(sizes: dict):
    """(config, HF state dict with random fp16 weights of ``sizes``; tied output layer not repeated)."""
    import torch

    from megabert.config import MegatronBertConfig
    from megabert.modeling.heads import MegatronBertForPreTraining

    config = MegatronBertConfig(**sizes, layer_norm_eps=1e-5)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MegatronBertForPreTraining(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {
        k: torch.randn(shape, generator=generator, dtype=torch.float32).to(torch.float16)
        for k, shape in shapes.items() if not k.startswith("cls.predictions.decoder")
    }  # fmt: skip
    return config, state


def build_torch_dist(folder: Path, sizes: dict) -> None:
    """A torch_dist run folder (release/), written by megabert's own exporter from a random HF folder."""
    from safetensors.torch import save_file

    from megabert.convert.megatron_lm import convert_hf_to_megatron

    config, state = _random_state(sizes)
    hf = folder.with_name("hf-source")
    config.save_pretrained(hf)
    save_file(state, str(hf / "model.safetensors"), metadata={"format": "pt"})
    del state
    convert_hf_to_megatron(hf, folder, ckpt_format="torch_dist", tokenizer_type="BertWordPieceLowerCase")


NEMO_YAML = """\
target: nemo.collections.nlp.models.language_modeling.megatron_bert_model.MegatronBertModel
tensor_model_parallel_size: 1
pipeline_model_parallel_size: 1
encoder_seq_length: {positions}
max_position_embeddings: {positions}
num_layers: {layers}
hidden_size: {hidden}
ffn_hidden_size: {ffn}
num_attention_heads: {heads}
layernorm_epsilon: 1e-5
normalization: layernorm
activation: gelu
bert_binary_head: true
precision: 16
tokenizer:
  library: megatron
  type: BertWordPieceLowerCase
  vocab_file: nemo:3f2a9c1b_vocab.txt
"""


def build_nemo(path: Path, sizes: dict) -> None:
    """A .nemo archive (plain tar; TP = 1): NeMo's MegatronBertModel state dict, legacy keys under ``model.``."""
    import tarfile

    import torch

    from megabert.convert.reader import _flatten
    from megabert.convert.to_megatron import megatron_shard

    config, state = _random_state(sizes)
    model = megatron_shard(
        state, config, binary_head=True, write_token_types=True, version=3.0,
        tensor_rank=0, tensor_parallel=1, pipeline_rank=0, pipeline_parallel=1,
    )  # fmt: skip
    weights = path.with_name("model_weights.ckpt")
    torch.save({f"model.{k}": v for k, v in _flatten(model).items()}, weights)
    del model, state
    yaml = path.with_name("model_config.yaml")
    yaml.write_text(NEMO_YAML.format(
        positions=config.max_position_embeddings, layers=config.num_hidden_layers, hidden=config.hidden_size,
        ffn=config.intermediate_size, heads=config.num_attention_heads,
    ))  # fmt: skip
    with tarfile.open(path, "w") as archive:
        archive.add(yaml, "./model_config.yaml")
        archive.add(weights, "./model_weights.ckpt")
    weights.unlink()


def build_checkpoint(folder: Path, sizes: dict, tp: int, pp: int, version: float, legacy_format: bool) -> None:
    """A Megatron-LM save folder with random fp16 weights of the given sizes (runs in its own process)."""
    import torch

    from megabert.convert.megatron_args import config_to_args
    from megabert.convert.to_megatron import megatron_shard

    config, state = _random_state(sizes)
    args = config_to_args(
        config, tensor_parallel=tp, pipeline_parallel=pp, padded_vocab_size=config.vocab_size,
        binary_head=True, dtype=torch.float16, iteration=0, tokenizer_type="BertWordPieceLowerCase",
    )  # fmt: skip
    for p in range(pp):
        for t in range(tp):
            model = megatron_shard(
                state, config, binary_head=True, write_token_types=True, version=version,
                tensor_rank=t, tensor_parallel=tp, pipeline_rank=p, pipeline_parallel=pp,
            )  # fmt: skip
            name = f"mp_rank_{t:02d}" if pp == 1 else f"mp_rank_{t:02d}_{p:03d}"
            path = folder / "release" / name / "model_optim_rng.pt"
            path.parent.mkdir(parents=True)
            checkpoint = {"model": model, "iteration": 0}
            if version:  # NGC files carry neither a version nor args
                checkpoint.update(args=args, checkpoint_version=version)
            torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy_format)
    (folder / "latest_checkpointed_iteration.txt").write_text("release")


def run_measured(code: str) -> tuple[float, int, str]:
    """Run ``python -c code`` in a fresh process: (seconds, peak RSS in bytes, stderr tail)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    stderr = process.stderr.read() if process.stderr else ""
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"measured process failed ({process.returncode}):\n{stderr[-2000:]}")
    return seconds, usage.ru_maxrss * 1024, stderr[-500:]  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=("ngc-zip", "folder", "torch_dist", "nemo"), default="ngc-zip")
    parser.add_argument("--format", choices=("legacy", "zip"), default="legacy", help="torch file format of each shard")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="small model")
    parser.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temp folder)")
    opts = parser.parse_args()
    if opts.source != "folder" and (opts.tp, opts.pp) != (1, 1):
        parser.error("only --source folder is split by --tp/--pp")
    sizes = SIZES_QUICK if opts.quick else SIZES_345M
    version = 0.0 if opts.source == "ngc-zip" else 3.0

    with tempfile.TemporaryDirectory(dir=opts.workdir, prefix="megabert-bench-convert-") as tmp:
        root = Path(tmp)
        folder = root / "megatron"
        if opts.source in ("torch_dist", "nemo"):
            measure_streamed(opts.source, root, sizes, opts.quick)
            return
        build = (
            "import sys; sys.path.insert(0, %r); from convert import build_checkpoint; from pathlib import Path; "
            "build_checkpoint(Path(%r), %r, %d, %d, %r, %r)"
        ) % (str(Path(__file__).parent), str(folder), sizes, opts.tp, opts.pp, version, opts.format == "legacy")
        subprocess.run([sys.executable, "-c", build], check=True)
        shards = sorted(folder.glob("release/*/model_optim_rng.pt"))
        checkpoint_bytes = sum(p.stat().st_size for p in shards)
        src = folder
        if opts.source == "ngc-zip":
            src = root / "megatron_bert_345m_v0_1_uncased.zip"
            with zipfile.ZipFile(src, "w", compression=zipfile.ZIP_STORED) as archive:
                archive.write(shards[0], "release/mp_rank_00/model_optim_rng.pt")

        heads = sizes["num_attention_heads"]
        case = f"{'quick' if opts.quick else '345M'} fp16 {opts.source} {opts.format}-format tp{opts.tp} pp{opts.pp}"
        report_conversion(case, src, root, checkpoint_bytes, TARGET_RATIO, f", num_attention_heads={heads}")


def measure_streamed(source: str, root: Path, sizes: dict, quick: bool) -> None:
    """Build a torch_dist run folder or a .nemo archive in its own process, convert it in another; print the line."""
    if source == "torch_dist":
        src = root / "megatron"
        call = "build_torch_dist(Path(%r), %r)" % (str(src), sizes)
    else:
        src = root / "nemo" / "megatron_bert.nemo"
        src.parent.mkdir()
        call = "build_nemo(Path(%r), %r)" % (str(src), sizes)
    build = "import sys; sys.path.insert(0, %r); from convert import *; from pathlib import Path; %s" % (
        str(Path(__file__).parent), call,
    )  # fmt: skip
    subprocess.run([sys.executable, "-c", build], check=True)
    shutil.rmtree(root / "hf-source", ignore_errors=True)  # (torch_dist) its source; not read again
    files = [p for p in src.rglob("*") if p.is_file()] if src.is_dir() else [src]
    checkpoint_bytes = sum(p.stat().st_size for p in files)
    case = f"{'quick' if quick else '345M'} fp16 {source}" + (" (plain tar)" if source == "nemo" else "")
    report_conversion(case, src, root, checkpoint_bytes, STREAMED_TARGET_RATIO)


def report_conversion(case: str, src: Path, root: Path, checkpoint_bytes: int, target: float, extra: str = "") -> None:
    """Convert ``src`` into ROOT/hf in a fresh process (peak RSS measured) and print the JSON line."""
    _, import_rss, _ = run_measured("import megabert.convert.megatron_lm")
    seconds, peak_rss, _ = run_measured(
        "from megabert.convert.megatron_lm import convert_megatron_to_hf; "
        f"convert_megatron_to_hf({str(src)!r}, {str(root / 'hf')!r}{extra})"
    )
    ratio = peak_rss / checkpoint_bytes
    print(json.dumps({
        "case": case,
        "checkpoint_bytes": checkpoint_bytes,
        "output_bytes": (root / "hf" / "model.safetensors").stat().st_size,
        "seconds": round(seconds, 2),
        "peak_rss_bytes": peak_rss,
        "rss_ratio": round(ratio, 3),
        "import_rss_bytes": import_rss,
        "target_ratio": target,
        "ok": ratio <= target,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
