"""Serving throughput and latency: `megabert serve` vs a FastAPI app over `transformers`' pipeline.

A random MegatronBERT (base size by default, 12 x 768; the BERT uncased vocabulary from
../shared/data when present, else a generated one) is saved by `transformers` into a temp
folder. Two servers load it, each in its own process with the same torch thread count:

- ours: ``megabert serve FOLDER`` (dynamic batching, unpadded forward), route ``/embed``;
- the baseline, the server users write today: a FastAPI route that runs
  ``transformers.pipeline("feature-extraction")`` on each request alone (a lock: one forward at
  a time, so threads do not fight over the cores) and mean-pools the token vectors.

A load generator in a third process (async httpx, one connection per client) sends mixed-length
SST-2 sentences (a seeded sample of ../shared/data/glue/SST-2/train.tsv; generated ones when that
is absent), one text per request, at 1, 8 and 64 concurrent clients to each server, and
``megabert embed`` runs over the same texts from a file (its rate without the model load: the
difference with a one-line run). One JSON line per case: texts/s, p50/p99 latency (ms) and
real tokens/s for ours and the baseline, their ratios, and the CPU model; then one line for
``megabert embed`` with the server's 64-client throughput as a fraction of it.

    python benchmarks/serve.py            # base size, 600 texts per case (a few minutes on 2 cores)
    python benchmarks/serve.py --quick    # small model (4 x 256), 150 texts per case
    python benchmarks/serve.py --size tiny --texts 300 --clients 1,8,64 --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SIZES = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
}
WORDS = ("the a movie film story is was not very good bad funny dull actors plot and but of to in with "
         "its it this that one best worst character music ending director script").split()  # fmt: skip

BASELINE_APP = '''
import os, sys, threading
import torch, transformers
from fastapi import FastAPI
from pydantic import BaseModel

torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
pipe = transformers.pipeline("feature-extraction", model=sys.argv[1], framework="pt", device="cpu")
lock = threading.Lock()
app = FastAPI()


class Body(BaseModel):
    inputs: list[str]


@app.get("/health")
def health():
    return {"status": "ok"}


@app.post("/embed")
def embed(body: Body):
    with lock, torch.inference_mode():
        out = pipe(body.inputs, return_tensors=True)  # each text alone: [1, tokens, hidden]
    return [o[0].mean(dim=0).tolist() for o in out]


if __name__ == "__main__":
    import uvicorn
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False)
'''


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_texts(n: int, seed: int = 0) -> tuple[list[str], str]:
    path = DATA / "glue" / "SST-2" / "train.tsv"
    rng = random.Random(seed)
    if path.exists():
        with open(path, encoding="utf-8") as handle:
            next(handle)
            sentences = [line.split("\t")[0].strip() for line in handle]
        sentences = [s for s in sentences if s]
        return rng.sample(sentences, n), "SST-2 train.tsv"
    # SST-2-like: phrases of 1..50 words (SST-2's train set mixes short phrases and full sentences).
    return [" ".join(rng.choice(WORDS) for _ in range(max(1, int(rng.expovariate(1 / 10))) % 50 + 1)) for _ in range(n)], "generated"


def build_model(folder: Path, size: str) -> None:
    import torch
    import transformers

    vocab = DATA / "vocab" / "bert-uncased" / "vocab.txt"
    if not vocab.exists():
        vocab = folder / "vocab.txt"
        folder.mkdir(parents=True, exist_ok=True)
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        pieces = sorted(set(WORDS) | set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"))
        vocab.write_text("\n".join(specials + pieces + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]) + "\n")
    tokenizer = transformers.BertTokenizerFast(str(vocab), do_lower_case=True, model_max_length=512)
    tokenizer.save_pretrained(folder)
    config = transformers.MegatronBertConfig(vocab_size=tokenizer.vocab_size, **SIZES[size])
    torch.manual_seed(0)
    transformers.MegatronBertModel(config).eval().save_pretrained(folder)


def wait_health(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url} not healthy after {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------- the load generator
async def _load(https: list, url: str, texts: list[str], body_extra: dict) -> dict:
    """Send every text (one per request), one client per connection; wall time and latencies."""
    import httpx

    queue = list(reversed(texts))
    latencies: list[float] = []
    errors = 0

    async def client(http) -> None:  # noqa: ANN001
        nonlocal errors
        while queue:
            text = queue.pop()
            start = time.perf_counter()
            for attempt in range(2):
                # A keep-alive connection left idle past the server's keep-alive timeout (uvicorn: 5 s)
                # can be closed just as a request goes out: send it again once on a new one.
                try:
                    response = await http.post(url + "/embed", json={"inputs": [text], **body_extra})
                    ok = response.status_code == 200
                    break
                except httpx.TransportError:
                    ok = False
            latencies.append(time.perf_counter() - start)
            if not ok:
                errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(client(http) for http in https))
    return {"seconds": time.perf_counter() - start, "latencies": latencies, "errors": errors}


async def _loadgen(url: str, texts: list[str], clients: int, body_extra: dict, warmup: int) -> dict:
    import httpx

    # One httpx client (one keep-alive connection) per simulated client, opened by the warm-up,
    # which is not timed. (One shared pool of 64 connections is itself the bottleneck: httpx's
    # pool bookkeeping caps it near 170 requests/s on 2 cores, against ~800 with a pool each.)
    https = [httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=1)) for _ in range(clients)]
    try:
        if warmup:
            await _load(https, url, (texts * (1 + clients // len(texts)))[: max(warmup, clients)], body_extra)
        return await _load(https, url, texts, body_extra)
    finally:
        for http in https:
            await http.aclose()


def loadgen_main(url: str, texts_file: str, clients: int, extra: str, warmup: int) -> None:
    """The load generator's own process: prints one JSON object (wall time, latencies, errors)."""
    texts = json.loads(Path(texts_file).read_text())
    print(json.dumps(asyncio.run(_loadgen(url, texts, clients, json.loads(extra), warmup))))


def run_load(url: str, texts_file: Path, clients: int, extra: dict, warmup: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--loadgen", url, str(texts_file), str(clients), json.dumps(extra), str(warmup)],
        capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"load generator failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(result: dict, n_texts: int, n_tokens: int) -> dict:
    lat = sorted(result["latencies"])
    p99 = lat[min(len(lat) - 1, max(0, int(round(0.99 * len(lat))) - 1))]
    return {
        "texts_per_s": round(n_texts / result["seconds"], 2),
        "tokens_per_s": round(n_tokens / result["seconds"], 1),
        "p50_ms": round(statistics.median(lat) * 1000, 1),
        "p99_ms": round(p99 * 1000, 1),
        "errors": result["errors"],
    }


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model, 150 texts per case")
    parser.add_argument("--size", choices=SIZES, default=None, help="model size (default base; small with --quick)")
    parser.add_argument("--texts", type=int, default=None, help="texts per case (default 600; 150 with --quick)")
    parser.add_argument("--clients", default="1,8,64", help="concurrent clients, comma-separated (default 1,8,64)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of each server (default: all cores)")
    parser.add_argument("--loadgen", nargs=5, metavar=("URL", "TEXTS", "CLIENTS", "EXTRA", "WARMUP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loadgen:
        url, texts_file, clients, extra, warmup = args.loadgen
        loadgen_main(url, texts_file, int(clients), extra, int(warmup))
        return

    import transformers

    size = args.size or ("small" if args.quick else "base")
    n = args.texts or (150 if args.quick else 600)
    clients_list = [int(c) for c in args.clients.split(",")]
    texts, source = read_texts(n)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "BENCH_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}  # fmt: skip
    common = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads, "size": size, "texts": n, "source": source}
    with tempfile.TemporaryDirectory(prefix="megabert-serve-bench-") as tmp:
        root = Path(tmp)
        folder = root / "model"
        build_model(folder, size)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        n_tokens = sum(len(ids) for ids in tokenizer(texts)["input_ids"])
        texts_file = root / "texts.json"
        texts_file.write_text(json.dumps(texts))
        (root / "texts.txt").write_text("\n".join(texts) + "\n")
        (root / "baseline.py").write_text(BASELINE_APP)
        warmup = min(32, n)

        results: dict[str, dict[int, dict]] = {"ours": {}, "baseline": {}}
        for name in ("ours", "baseline"):
            port = free_port()
            if name == "ours":
                cmd = [sys.executable, "-m", "megabert", "serve", str(folder), "--port", str(port), "--device", "cpu",
                       "--max-concurrent-requests", "1024"]  # fmt: skip
            else:
                cmd = [sys.executable, str(root / "baseline.py"), str(folder), str(port)]
            log = open(root / f"{name}.log", "w")  # noqa: SIM115
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            url = f"http://127.0.0.1:{port}"
            try:
                wait_health(url, proc)
                extra = {"normalize": False} if name == "ours" else {}
                for clients in clients_list:
                    results[name][clients] = summarize(run_load(url, texts_file, clients, extra, warmup), n, n_tokens)
                    print(f"# {name} at {clients} clients: {results[name][clients]}", file=sys.stderr, flush=True)
            finally:
                stop(proc)
                log.close()

        for clients in clients_list:
            ours, base = results["ours"][clients], results["baseline"][clients]
            print(json.dumps({
                "case": f"serve_{clients}_clients", "clients": clients, **common, "tokens": n_tokens,
                "ours": ours, "baseline": base,
                "throughput_ratio": round(ours["texts_per_s"] / base["texts_per_s"], 2),
                "p50_ratio": round(ours["p50_ms"] / base["p50_ms"], 2),
                "p99_ratio": round(ours["p99_ms"] / base["p99_ms"], 2),
            }), flush=True)  # fmt: skip

        # `megabert embed` over the same texts from a file, without its model load (one-line run subtracted).
        def embed_seconds(path: Path) -> float:
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "megabert", "embed", str(folder), "--input", str(path), "--format", "text",
                 "--output", str(root / "out.jsonl"), "--device", "cpu", "--quiet"],
                check=True, env=env, capture_output=True,
            )  # fmt: skip
            return time.perf_counter() - start

        (root / "one.txt").write_text(texts[0] + "\n")
        startup = min(embed_seconds(root / "one.txt") for _ in range(2))
        total = embed_seconds(root / "texts.txt")
        embed_rate = (n - 1) / max(total - startup, 1e-9)
        top = max(clients_list)
        print(json.dumps({
            "case": "megabert_embed_file", **common, "tokens": n_tokens,
            "embed_texts_per_s": round(embed_rate, 2), "embed_tokens_per_s": round(embed_rate * n_tokens / n, 1),
            "embed_wall_s": round(total, 2), "embed_startup_s": round(startup, 2),
            f"serve_{top}_clients_texts_per_s": results["ours"][top]["texts_per_s"],
            "serve_over_embed": round(results["ours"][top]["texts_per_s"] / embed_rate, 2),
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
