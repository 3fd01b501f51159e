"""One rank of a tensor- or pipeline-parallel megatron-core BERT that saves itself as torch_dist (for test_torch_dist.py).

Run with ``python -m torch.distributed.run --nproc_per_node 2 torch_dist_worker.py OUT TIED [tp|pp]``
(gloo, CPU).

``tp`` (default): megatron-core's BertModel split over the ranks by tensor parallelism, every
weight random (tensor-parallel shards differ per rank, replicated weights agree), saved with
``dist_checkpointing.save`` into OUT/iter_0000010, and OUT/expected.pt: the inputs and the full
(all-gathered) MLM and binary logits.

``pp``: the model split over the ranks by pipeline parallelism (4 layers, 2 per stage; the
first stage holds the embeddings, the last the heads), every weight set by
:func:`fill_by_key` from its global checkpoint key and layer, so a TP=1 model filled the same
way (the test builds one) is the same model; saved the same way, no expected.pt (a pipelined
forward would need the p2p schedule; the test compares with the TP=1 model instead).

CUDA-only pieces are stubbed as in test_torch_dist.py; at PP > 1 also ``Tensor.cuda`` while the
model is built (megatron-core moves the last stage's copy of the tied word embeddings to the
GPU to all-reduce it with the first stage's).
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import sys
import warnings
import zlib
from pathlib import Path

import torch


def stub_cpu_save(set_attr) -> None:
    """Let megatron-core's torch_dist save run on the CPU in one process (test_torch_dist.py's docstring says why).

    ``set_attr(obj, name, value)``: ``setattr`` here, ``monkeypatch.setattr`` in the tests.
    The per-bucket writes that megatron-core forks out run in this process, with plain queues.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    writer = filesystem_async.FileSystemWriterAsync

    def write_inline(transform_list, use_msc, rank, write_buckets, global_results_queue):
        results, local, count = {}, queue.Queue(), queue.Queue()
        for index, bucket in enumerate(write_buckets):
            count.put(index)
            writer.write_preloaded_data(transform_list, index, bucket, local, count, False)
            got_index, got = local.get()
            if isinstance(got, Exception):
                raise got
            results[got_index] = got
        global_results_queue.put(results)

    set_attr(writer, "write_preloaded_data_multiproc", staticmethod(write_inline))
    set_attr(filesystem_async, "_results_queue", queue.Queue())
    set_attr(filesystem_async, "_process_memory", lambda: 0)


def fill_by_key(model) -> None:
    """Give every weight of a megatron-core model values set by its checkpoint key and global offset.

    The key and offset are what ``sharded_state_dict()`` saves (the layer's global index, the
    tensor-parallel slice), not the module's local name, so the same model split over any
    pipeline layout gets the same values as on one rank. LayerNorm weights are near 1.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    with torch.no_grad():
        for sharded in model.sharded_state_dict().values():
            if not isinstance(sharded, ShardedTensor) or sharded.data is None:
                continue
            seed = zlib.crc32(f"{sharded.key}@{sharded.global_offset}".encode())
            noise = torch.randn(sharded.data.shape, generator=torch.Generator().manual_seed(seed)) * 0.2
            sharded.data.copy_(1.0 + noise if "norm" in sharded.key and "weight" in sharded.key else noise)


def main() -> None:
    out, tied = Path(sys.argv[1]), sys.argv[2] == "tied"
    mode = sys.argv[3] if len(sys.argv) > 3 else "tp"
    warnings.simplefilter("ignore")
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
    from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
    from megatron.core.models.bert.bert_model import BertModel
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.utils import GlobalMemoryBuffer

    # CPU stubs: see test_torch_dist.py's module docstring.
    GlobalMemoryBuffer.get_tensor = lambda self, shape, dtype, name, mem_alloc_context=None: torch.empty(shape, dtype=dtype)
    tracker = type(tensor_parallel.get_cuda_rng_tracker())
    tracker.fork = lambda self, name=None: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"
    stub_cpu_save(setattr)

    tp, pp = (world, 1) if mode == "tp" else (1, world)
    parallel_state.initialize_model_parallel(tp, pp)
    vocab, hidden, heads, layers, positions, eps = 96, 32, 4, 2 if mode == "tp" else 4, 40, 1e-6
    if mode == "pp":
        model = pipeline_stage(tied, layers, rank, world)
        fill_by_key(model)
        args = argparse.Namespace(
            num_layers=layers, hidden_size=hidden, ffn_hidden_size=4 * hidden, num_attention_heads=heads,
            max_position_embeddings=positions, padded_vocab_size=vocab, layernorm_epsilon=eps,
            tokenizer_type="BertWordPieceLowerCase", tensor_model_parallel_size=1, pipeline_model_parallel_size=world,
            untie_embeddings_and_output_weights=not tied, bert_binary_head=True, params_dtype=torch.float32,
        )  # fmt: skip
        save(model, args, out, rank)
        return
    config = TransformerConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, layernorm_epsilon=eps, tensor_model_parallel_size=world,
    )  # fmt: skip
    torch.manual_seed(3)
    model = BertModel(
        config, num_tokentypes=2, transformer_layer_spec=bert_layer_local_spec, vocab_size=vocab,
        max_sequence_length=positions, share_embeddings_and_output_weights=tied, add_binary_head=True,
    )  # fmt: skip
    shared = torch.Generator().manual_seed(4)
    own = torch.Generator().manual_seed(100 + rank)
    with torch.no_grad():
        for name, param in model.named_parameters():
            generator = own if getattr(param, "tensor_model_parallel", False) else shared
            noise = torch.randn(param.shape, generator=generator) * 0.2
            param.copy_(1.0 + noise if "norm" in name and name.endswith("weight") else noise)
    model.eval()

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        lm, binary = model(ids, mask, tokentype_ids=types)
    parts = [torch.empty_like(lm) for _ in range(world)]
    dist.all_gather(parts, lm.contiguous())
    lm = torch.cat(parts, dim=-1)

    args = argparse.Namespace(
        num_layers=layers, hidden_size=hidden, ffn_hidden_size=4 * hidden, num_attention_heads=heads,
        max_position_embeddings=positions, padded_vocab_size=vocab, layernorm_epsilon=eps,
        tokenizer_type="BertWordPieceLowerCase", tensor_model_parallel_size=world, pipeline_model_parallel_size=1,
        untie_embeddings_and_output_weights=not tied, bert_binary_head=True, params_dtype=torch.float32,
    )  # fmt: skip
    save(model, args, out, rank)
    if rank == 0:
        inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
        torch.save({"inputs": inputs, "lm": lm, "binary": binary}, out / "expected.pt")
    dist.barrier()


def pipeline_stage(tied: bool, layers: int, rank: int, world: int):
    """This rank's pipeline stage of the BERT (local spec): embeddings on the first, heads on the last."""
    from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
    from megatron.core.models.bert.bert_model import BertModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=layers, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, layernorm_epsilon=1e-6, pipeline_model_parallel_size=world,
        pipeline_dtype=torch.float32,
    )  # fmt: skip
    to_cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self  # the tied-embedding all-reduce at construction
    try:
        return BertModel(
            config, num_tokentypes=2, transformer_layer_spec=bert_layer_local_spec, vocab_size=96,
            max_sequence_length=40, share_embeddings_and_output_weights=tied, add_binary_head=True,
            pre_process=rank == 0, post_process=rank == world - 1,
        ).eval()  # fmt: skip
    finally:
        torch.Tensor.cuda = to_cuda


def save(model, args, out: Path, rank: int) -> None:
    """Megatron-LM's torch_dist save of this rank's part into out/iter_0000010, and the tracker file."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    state = model.sharded_state_dict()
    state.update(args=args, iteration=10, checkpoint_version=3.0)
    folder = out / "iter_0000010"
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(state, str(folder))
    if rank == 0:
        (out / "latest_checkpointed_iteration.txt").write_text("10")
    dist.barrier()


if __name__ == "__main__":
    main()
    from megatron.core import parallel_state
    import torch.distributed as dist

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
