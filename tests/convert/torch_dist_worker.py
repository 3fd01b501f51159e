"""One rank of a tensor-parallel megatron-core BERT that saves itself as torch_dist (for test_torch_dist.py).

Run with ``python -m torch.distributed.run --nproc_per_node 2 torch_dist_worker.py OUT TIED``
(gloo, CPU). It builds megatron-core's BertModel split over the ranks, gives every weight
random values (tensor-parallel shards differ per rank, replicated weights agree), saves it with
``dist_checkpointing.save`` into OUT/iter_0000010 and writes OUT/expected.pt: the inputs and the
full (all-gathered) MLM and binary logits. CUDA-only pieces are stubbed as in test_torch_dist.py.
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import sys
import warnings
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


def main() -> None:
    out, tied = Path(sys.argv[1]), sys.argv[2] == "tied"
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

    parallel_state.initialize_model_parallel(world, 1)
    vocab, hidden, heads, layers, positions, eps = 96, 32, 4, 2, 40, 1e-6
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
    state = model.sharded_state_dict()
    state.update(args=args, iteration=10, checkpoint_version=3.0)
    folder = out / "iter_0000010"
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(state, str(folder))
    if rank == 0:
        (out / "latest_checkpointed_iteration.txt").write_text("10")
        inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
        torch.save({"inputs": inputs, "lm": lm, "binary": binary}, out / "expected.pt")
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
