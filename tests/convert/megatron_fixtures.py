"""Build synthetic Megatron-LM checkpoints from a reference `transformers` model, independently of megabert.

Everything here is written from the layout definitions (issue 4), not from megabert's
converter: the fused QKV rows are assembled one row at a time, shards are cut by hand, and the
nesting follows Megatron-LM's ``state_dict_for_save_checkpoint``. A converter bug therefore
cannot cancel out against the same bug here.
"""

from __future__ import annotations

import argparse
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

TINY_MEGATRON = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=40,
    type_vocab_size=2,
    layer_norm_eps=1e-5,
    hidden_act="gelu",
)


def reference_model(binary_head: bool = True, seed: int = 0, **overrides) -> torch.nn.Module:
    """A `transformers` MegatronBERT with every weight random (LayerNorms included), in eval mode."""
    config = transformers.MegatronBertConfig(**{**TINY_MEGATRON, **overrides})
    cls = transformers.MegatronBertForPreTraining if binary_head else transformers.MegatronBertForMaskedLM
    torch.manual_seed(seed)
    model = cls(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.2
            param.copy_(1.0 + noise if name.endswith(("ln.weight", "LayerNorm.weight")) else noise)
        if not binary_head:
            # Megatron trained without the binary head has no token types: they add nothing.
            model.bert.embeddings.token_type_embeddings.weight.zero_()
    return model.eval()


def fuse_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, version: float) -> torch.Tensor:
    """One rank's fused QKV, row by row: 0 -> [3, heads, d]; 1.0 -> [heads, d, 3]; >=2 -> [heads, 3, d]."""
    d = q.shape[0] // heads
    parts = (q, k, v)
    rows = []
    if version == 0:
        for part in parts:
            for h in range(heads):
                for i in range(d):
                    rows.append(part[h * d + i])
    elif version == 1.0:
        for h in range(heads):
            for i in range(d):
                for part in parts:
                    rows.append(part[h * d + i])
    else:
        for h in range(heads):
            for part in parts:
                for i in range(d):
                    rows.append(part[h * d + i])
    return torch.stack(rows).clone()


@dataclass
class Layout:
    """Which Megatron flavour to write."""

    core: bool = False  # Megatron Core names instead of language_model.*
    version: float | None = 3.0  # None: no checkpoint_version entry (NGC)
    old_names: bool = False  # transformer/attention instead of encoder/self_attention
    late_norm_names: bool = False  # input_norm / post_attention_norm / final_norm
    te_norms: bool = False  # Megatron Core with Transformer Engine: norms fused into linear_qkv / linear_fc1
    untied: bool = False  # Megatron Core: output_layer.weight of its own
    virtual: int = 1  # virtual pipeline chunks per pipeline rank
    args: bool = True
    extra_args: dict = field(default_factory=dict)


def _chunk(t: torch.Tensor, ranks: int, rank: int, dim: int) -> torch.Tensor:
    size = t.shape[dim] // ranks
    return t.narrow(dim, rank * size, size).clone()


def _legacy_names(layout: Layout) -> dict[str, str]:
    return {
        "enc": "transformer" if layout.old_names else "encoder",
        "att": "attention" if layout.old_names else "self_attention",
        "ln1": "input_norm" if layout.late_norm_names else "input_layernorm",
        "ln2": "post_attention_norm" if layout.late_norm_names else "post_attention_layernorm",
        "lnf": "final_norm" if layout.late_norm_names else "final_layernorm",
    }


def _nest_legacy(flat: dict[str, torch.Tensor], names: dict[str, str]) -> dict:
    """Nest like Megatron-LM's BertModel.state_dict_for_save_checkpoint."""
    model: dict = {}
    lm: dict = {}
    for key, value in flat.items():
        if key.startswith("language_model.embedding."):
            sub = key[len("language_model.embedding."):]  # e.g. word_embeddings.weight
            module, param = sub.split(".", 1)
            lm.setdefault("embedding", {}).setdefault(module, {})[param] = value
        elif key.startswith(f"language_model.{names['enc']}."):
            lm.setdefault(names["enc"], {})[key[len(f"language_model.{names['enc']}."):]] = value
        elif key.startswith("language_model.pooler."):
            lm.setdefault("pooler", {})[key[len("language_model.pooler."):]] = value
        else:
            top, rest = key.split(".", 1)
            model.setdefault(top, {})[rest] = value
    if lm:
        model["language_model"] = lm
    return model


def megatron_shards(
    hf: torch.nn.Module, layout: Layout, tp: int = 1, pp: int = 1, binary_head: bool = True
) -> dict[tuple[int, int], dict]:
    """(pipeline rank, tensor rank) -> that rank's checkpoint dict, from the reference model's weights."""
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    cfg = hf.config
    heads = cfg.num_attention_heads
    layers = cfg.num_hidden_layers
    stages = pp * layout.virtual
    per_stage = layers // stages
    version = 0 if layout.version is None else layout.version
    n = _legacy_names(layout)

    def layer_keys(i: int, rank: int) -> dict[str, torch.Tensor]:
        p = f"bert.encoder.layer.{i}."
        hd = cfg.hidden_size // heads
        rows = heads // tp * hd
        sl = slice(rank * rows, (rank + 1) * rows)
        qkv_w = fuse_rows(*(sd[f"{p}attention.self.{x}.weight"][sl] for x in ("query", "key", "value")), heads // tp, version)
        qkv_b = fuse_rows(*(sd[f"{p}attention.self.{x}.bias"][sl] for x in ("query", "key", "value")), heads // tp, version)
        values = {
            "ln1.weight": sd[f"{p}attention.ln.weight"], "ln1.bias": sd[f"{p}attention.ln.bias"],
            "qkv.weight": qkv_w, "qkv.bias": qkv_b,
            "proj.weight": _chunk(sd[f"{p}attention.output.dense.weight"], tp, rank, 1),
            "proj.bias": sd[f"{p}attention.output.dense.bias"],
            "ln2.weight": sd[f"{p}ln.weight"], "ln2.bias": sd[f"{p}ln.bias"],
            "fc1.weight": _chunk(sd[f"{p}intermediate.dense.weight"], tp, rank, 0),
            "fc1.bias": _chunk(sd[f"{p}intermediate.dense.bias"], tp, rank, 0),
            "fc2.weight": _chunk(sd[f"{p}output.dense.weight"], tp, rank, 1),
            "fc2.bias": sd[f"{p}output.dense.bias"],
        }  # fmt: skip
        if layout.core:
            ln1 = "self_attention.linear_qkv.layer_norm_" if layout.te_norms else "input_layernorm."
            ln2 = "mlp.linear_fc1.layer_norm_" if layout.te_norms else "pre_mlp_layernorm."
            names = {
                "ln1.weight": ln1 + "weight", "ln1.bias": ln1 + "bias",
                "qkv.weight": "self_attention.linear_qkv.weight", "qkv.bias": "self_attention.linear_qkv.bias",
                "proj.weight": "self_attention.linear_proj.weight", "proj.bias": "self_attention.linear_proj.bias",
                "ln2.weight": ln2 + "weight", "ln2.bias": ln2 + "bias",
                "fc1.weight": "mlp.linear_fc1.weight", "fc1.bias": "mlp.linear_fc1.bias",
                "fc2.weight": "mlp.linear_fc2.weight", "fc2.bias": "mlp.linear_fc2.bias",
            }  # fmt: skip
        else:
            names = {
                "ln1.weight": f"{n['ln1']}.weight", "ln1.bias": f"{n['ln1']}.bias",
                "qkv.weight": f"{n['att']}.query_key_value.weight", "qkv.bias": f"{n['att']}.query_key_value.bias",
                "proj.weight": f"{n['att']}.dense.weight", "proj.bias": f"{n['att']}.dense.bias",
                "ln2.weight": f"{n['ln2']}.weight", "ln2.bias": f"{n['ln2']}.bias",
                "fc1.weight": "mlp.dense_h_to_4h.weight", "fc1.bias": "mlp.dense_h_to_4h.bias",
                "fc2.weight": "mlp.dense_4h_to_h.weight", "fc2.bias": "mlp.dense_4h_to_h.bias",
            }  # fmt: skip
        return {names[k]: v for k, v in values.items()}

    def stage_dict(stage: int, rank: int) -> dict:
        flat: dict[str, torch.Tensor] = {}
        first, last = stage == 0, stage == stages - 1
        word = _chunk(sd["bert.embeddings.word_embeddings.weight"], tp, rank, 0)
        lm = "" if layout.core else "language_model."
        enc = "encoder" if layout.core else f"language_model.{n['enc']}"
        if first:
            emb = "embedding" if layout.core else "language_model.embedding"
            flat[f"{emb}.word_embeddings.weight"] = word
            flat[f"{emb}.position_embeddings.weight"] = sd["bert.embeddings.position_embeddings.weight"]
            if binary_head:
                flat[f"{emb}.tokentype_embeddings.weight"] = sd["bert.embeddings.token_type_embeddings.weight"]
        for local in range(per_stage):
            for name, value in layer_keys(stage * per_stage + local, rank).items():
                flat[f"{enc}.layers.{local}.{name}"] = value
            if layout.core:
                for sub in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"):
                    flat[f"{enc}.layers.{local}.{sub}._extra_state"] = None
        if last:
            final = "final_layernorm" if layout.core else n["lnf"]
            flat[f"{enc}.{final}.weight"] = sd["bert.encoder.ln.weight"]
            flat[f"{enc}.{final}.bias"] = sd["bert.encoder.ln.bias"]
            if binary_head:
                flat[f"{lm}pooler.dense.weight"] = sd["bert.pooler.dense.weight"]
                flat[f"{lm}pooler.dense.bias"] = sd["bert.pooler.dense.bias"]
                flat["binary_head.weight"] = sd["cls.seq_relationship.weight"]
                flat["binary_head.bias"] = sd["cls.seq_relationship.bias"]
            flat["lm_head.dense.weight"] = sd["cls.predictions.transform.dense.weight"]
            flat["lm_head.dense.bias"] = sd["cls.predictions.transform.dense.bias"]
            ln = "layer_norm" if layout.core else "layernorm"
            flat[f"lm_head.{ln}.weight"] = sd["cls.predictions.transform.LayerNorm.weight"]
            flat[f"lm_head.{ln}.bias"] = sd["cls.predictions.transform.LayerNorm.bias"]
            bias = _chunk(sd["cls.predictions.bias"], tp, rank, 0)
            if layout.core:
                flat["output_layer.bias"] = bias
                flat["output_layer._extra_state"] = None
                if layout.untied:
                    flat["output_layer.weight"] = _chunk(sd["cls.predictions.decoder.weight"], tp, rank, 0)
                elif stages > 1:
                    flat["output_layer.weight"] = word.clone()  # the last stage's copy of the tied weight
            else:
                flat["lm_head.bias"] = bias
                if stages > 1:
                    flat["word_embeddings_for_head.weight"] = word.clone()
        return flat if layout.core else _nest_legacy(flat, n)

    args = None
    if layout.args:
        args = argparse.Namespace(
            num_layers=layers, hidden_size=cfg.hidden_size, num_attention_heads=heads,
            ffn_hidden_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
            padded_vocab_size=cfg.vocab_size, layernorm_epsilon=cfg.layer_norm_eps,
            tokenizer_type="BertWordPieceLowerCase", tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp, params_dtype=torch.float32, bert_binary_head=binary_head,
            untie_embeddings_and_output_weights=layout.untied, openai_gelu=cfg.hidden_act == "gelu_new",
            **layout.extra_args,
        )  # fmt: skip
    out: dict[tuple[int, int], dict] = {}
    for p in range(pp):
        for rank in range(tp):
            ckpt: dict = {"iteration": 7}
            if layout.version is not None:
                ckpt["checkpoint_version"] = layout.version
            if args is not None:
                ckpt["args"] = args
            if layout.virtual == 1:
                ckpt["model"] = stage_dict(p, rank)
            else:
                for v in range(layout.virtual):
                    ckpt[f"model{v}"] = stage_dict(v * pp + p, rank)
            out[(p, rank)] = ckpt
    return out


def write_save_folder(
    root: Path, shards: dict[tuple[int, int], dict], tracker: str = "release", legacy_format: bool = False
) -> Path:
    """Megatron-LM's folder layout: tracker file, release/ or iter_N/, mp_rank_XX[_YYY]/model_optim_rng.pt."""
    pp = 1 + max(p for p, _ in shards)
    folder = root / ("release" if tracker == "release" else f"iter_{int(tracker):07d}")
    for (p, rank), ckpt in shards.items():
        name = f"mp_rank_{rank:02d}" if pp == 1 else f"mp_rank_{rank:02d}_{p:03d}"
        path = folder / name / "model_optim_rng.pt"
        path.parent.mkdir(parents=True)
        torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy_format)
    (root / "latest_checkpointed_iteration.txt").write_text(tracker)
    return root


def write_ngc_zip(path: Path, ckpt: dict, scratch: Path) -> Path:
    """An NGC-style zip: release/mp_rank_00/model_optim_rng.pt, saved in torch's legacy (pre-1.6) format."""
    inner = scratch / "model_optim_rng.pt"
    torch.save(ckpt, inner, _use_new_zipfile_serialization=False)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.write(inner, "release/mp_rank_00/model_optim_rng.pt")
    inner.unlink()
    return path


def batch(vocab: int = 96, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs with padding and both token types."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 4:] = 0
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    return dict(input_ids=ids.masked_fill(mask == 0, 0), attention_mask=mask, token_type_ids=types)
