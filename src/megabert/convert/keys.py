"""Key tables: which Megatron tensor becomes which Hugging Face tensor, and how shards merge.

Each :class:`Rule` maps one Megatron key template to its Hugging Face key template(s):
``{layer}`` is the layer index (local to a pipeline stage on the Megatron side, global on
the HF side). A rule also says how tensor-parallel ranks split the tensor (:class:`Split`),
its full (merged) shape in config symbols, and a named transform (``copy`` or ``qkv``). A
rule whose target is ``None`` is a tensor Megatron saves that the HF layout does not keep.

Alias markers in the legacy templates cover the names Megatron-LM used over the years:

* ``{encoder}``: ``encoder`` (newer) or ``transformer`` (older);
* ``{attention}``: ``self_attention`` (newer) or ``attention`` (older);
* ``{input_norm}``, ``{post_norm}``, ``{final_norm}``: ``input_layernorm``,
  ``post_attention_layernorm``, ``final_layernorm`` (the names the HF converter knew) or the
  ``input_norm``/``post_attention_norm``/``final_norm`` of late legacy releases.

Reading accepts every spelling. Writing (:func:`legacy_names`) uses ``encoder`` and
``self_attention`` for checkpoint_version >= 3, ``transformer`` and ``attention`` below (the
NGC era), and always the ``*_layernorm`` names.
"""

from __future__ import annotations

import enum
import itertools
import re
from dataclasses import dataclass

__all__ = [
    "CORE_RULES",
    "LEGACY_NESTING",
    "LEGACY_RULES",
    "Rule",
    "Split",
    "expected_hf_keys",
    "legacy_names",
    "source_table",
    "template_of",
]


class Split(enum.Enum):
    """How tensor-parallel ranks hold a tensor."""

    REPLICATED = "replicated"  # every rank has the whole tensor
    ROWS = "rows"  # column-parallel Linear / vocab-parallel embedding: ranks hold slices of dim 0
    COLUMNS = "columns"  # row-parallel Linear: ranks hold slices of dim 1 (the input features)


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor and what it becomes.

    ``shape`` is the merged Megatron shape in symbols: ``V`` (padded vocabulary), ``H``
    (hidden), ``3H`` (fused QKV rows), ``F`` (MLP width), ``P`` (positions), ``T`` (token
    types), ``2`` (NSP classes). ``group`` says when the tensor exists: ``core`` always;
    ``tokentype`` in models trained with token types; ``binary`` (pooler, NSP) with the
    binary head; ``output_weight`` when the output layer has its own weight (untied) or,
    with several pipeline stages, the last stage's copy of the tied word embeddings.
    """

    source: str
    target: str | tuple[str, str, str] | None
    split: Split
    shape: tuple[str, ...]
    transform: str = "copy"  # "copy" or "qkv" (target is then (query, key, value))
    group: str = "core"

    @property
    def targets(self) -> tuple[str, ...]:
        if self.target is None:
            return ()
        return (self.target,) if isinstance(self.target, str) else self.target


_HF_LAYER = "bert.encoder.layer.{layer}."
_QKV_TARGETS = tuple(f"{_HF_LAYER}attention.self.{p}" for p in ("query", "key", "value"))

R, ROWS, COLS = Split.REPLICATED, Split.ROWS, Split.COLUMNS


def _qkv(source: str, suffix: str) -> Rule:
    shape = ("3H", "H") if suffix == "weight" else ("3H",)
    return Rule(source, tuple(f"{t}.{suffix}" for t in _QKV_TARGETS), ROWS, shape, transform="qkv")  # type: ignore[arg-type]


_LEGACY_LAYER = "language_model.{encoder}.layers.{layer}."
LEGACY_RULES: tuple[Rule, ...] = (
    Rule("language_model.embedding.word_embeddings.weight", "bert.embeddings.word_embeddings.weight", ROWS, ("V", "H")),
    Rule("language_model.embedding.position_embeddings.weight", "bert.embeddings.position_embeddings.weight", R, ("P", "H")),
    Rule("language_model.embedding.tokentype_embeddings.weight", "bert.embeddings.token_type_embeddings.weight", R, ("T", "H"), group="tokentype"),
    Rule(_LEGACY_LAYER + "{input_norm}.weight", _HF_LAYER + "attention.ln.weight", R, ("H",)),
    Rule(_LEGACY_LAYER + "{input_norm}.bias", _HF_LAYER + "attention.ln.bias", R, ("H",)),
    _qkv(_LEGACY_LAYER + "{attention}.query_key_value.weight", "weight"),
    _qkv(_LEGACY_LAYER + "{attention}.query_key_value.bias", "bias"),
    Rule(_LEGACY_LAYER + "{attention}.dense.weight", _HF_LAYER + "attention.output.dense.weight", COLS, ("H", "H")),
    Rule(_LEGACY_LAYER + "{attention}.dense.bias", _HF_LAYER + "attention.output.dense.bias", R, ("H",)),
    Rule(_LEGACY_LAYER + "{post_norm}.weight", _HF_LAYER + "ln.weight", R, ("H",)),
    Rule(_LEGACY_LAYER + "{post_norm}.bias", _HF_LAYER + "ln.bias", R, ("H",)),
    Rule(_LEGACY_LAYER + "mlp.dense_h_to_4h.weight", _HF_LAYER + "intermediate.dense.weight", ROWS, ("F", "H")),
    Rule(_LEGACY_LAYER + "mlp.dense_h_to_4h.bias", _HF_LAYER + "intermediate.dense.bias", ROWS, ("F",)),
    Rule(_LEGACY_LAYER + "mlp.dense_4h_to_h.weight", _HF_LAYER + "output.dense.weight", COLS, ("H", "F")),
    Rule(_LEGACY_LAYER + "mlp.dense_4h_to_h.bias", _HF_LAYER + "output.dense.bias", R, ("H",)),
    Rule("language_model.{encoder}.{final_norm}.weight", "bert.encoder.ln.weight", R, ("H",)),
    Rule("language_model.{encoder}.{final_norm}.bias", "bert.encoder.ln.bias", R, ("H",)),
    Rule("language_model.pooler.dense.weight", "bert.pooler.dense.weight", R, ("H", "H"), group="binary"),
    Rule("language_model.pooler.dense.bias", "bert.pooler.dense.bias", R, ("H",), group="binary"),
    Rule("lm_head.dense.weight", "cls.predictions.transform.dense.weight", R, ("H", "H")),
    Rule("lm_head.dense.bias", "cls.predictions.transform.dense.bias", R, ("H",)),
    Rule("lm_head.layernorm.weight", "cls.predictions.transform.LayerNorm.weight", R, ("H",)),
    Rule("lm_head.layernorm.bias", "cls.predictions.transform.LayerNorm.bias", R, ("H",)),
    Rule("lm_head.bias", "cls.predictions.bias", ROWS, ("V",)),
    Rule("binary_head.weight", "cls.seq_relationship.weight", R, ("2", "H"), group="binary"),
    Rule("binary_head.bias", "cls.seq_relationship.bias", R, ("2",), group="binary"),
    # With several pipeline stages the last one keeps its own copy of the word embeddings for
    # the LM head: dropped when equal to the embeddings (tied), else an untied output layer.
    Rule("word_embeddings_for_head.weight", "cls.predictions.decoder.weight", ROWS, ("V", "H"), group="output_weight"),
)

_CORE_LAYER = "encoder.layers.{layer}."
CORE_RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", "bert.embeddings.word_embeddings.weight", ROWS, ("V", "H")),
    Rule("embedding.position_embeddings.weight", "bert.embeddings.position_embeddings.weight", R, ("P", "H")),
    Rule("embedding.tokentype_embeddings.weight", "bert.embeddings.token_type_embeddings.weight", R, ("T", "H"), group="tokentype"),
    # The local layer spec has separate norms; the Transformer Engine spec fuses them into the
    # next Linear (`layer_norm_weight`). A checkpoint has one or the other.
    Rule(_CORE_LAYER + "input_layernorm.weight", _HF_LAYER + "attention.ln.weight", R, ("H",)),
    Rule(_CORE_LAYER + "input_layernorm.bias", _HF_LAYER + "attention.ln.bias", R, ("H",)),
    Rule(_CORE_LAYER + "self_attention.linear_qkv.layer_norm_weight", _HF_LAYER + "attention.ln.weight", R, ("H",)),
    Rule(_CORE_LAYER + "self_attention.linear_qkv.layer_norm_bias", _HF_LAYER + "attention.ln.bias", R, ("H",)),
    _qkv(_CORE_LAYER + "self_attention.linear_qkv.weight", "weight"),
    _qkv(_CORE_LAYER + "self_attention.linear_qkv.bias", "bias"),
    Rule(_CORE_LAYER + "self_attention.linear_proj.weight", _HF_LAYER + "attention.output.dense.weight", COLS, ("H", "H")),
    Rule(_CORE_LAYER + "self_attention.linear_proj.bias", _HF_LAYER + "attention.output.dense.bias", R, ("H",)),
    Rule(_CORE_LAYER + "pre_mlp_layernorm.weight", _HF_LAYER + "ln.weight", R, ("H",)),
    Rule(_CORE_LAYER + "pre_mlp_layernorm.bias", _HF_LAYER + "ln.bias", R, ("H",)),
    Rule(_CORE_LAYER + "mlp.linear_fc1.layer_norm_weight", _HF_LAYER + "ln.weight", R, ("H",)),
    Rule(_CORE_LAYER + "mlp.linear_fc1.layer_norm_bias", _HF_LAYER + "ln.bias", R, ("H",)),
    Rule(_CORE_LAYER + "mlp.linear_fc1.weight", _HF_LAYER + "intermediate.dense.weight", ROWS, ("F", "H")),
    Rule(_CORE_LAYER + "mlp.linear_fc1.bias", _HF_LAYER + "intermediate.dense.bias", ROWS, ("F",)),
    Rule(_CORE_LAYER + "mlp.linear_fc2.weight", _HF_LAYER + "output.dense.weight", COLS, ("H", "F")),
    Rule(_CORE_LAYER + "mlp.linear_fc2.bias", _HF_LAYER + "output.dense.bias", R, ("H",)),
    Rule("encoder.final_layernorm.weight", "bert.encoder.ln.weight", R, ("H",)),
    Rule("encoder.final_layernorm.bias", "bert.encoder.ln.bias", R, ("H",)),
    Rule("pooler.dense.weight", "bert.pooler.dense.weight", R, ("H", "H"), group="binary"),
    Rule("pooler.dense.bias", "bert.pooler.dense.bias", R, ("H",), group="binary"),
    Rule("lm_head.dense.weight", "cls.predictions.transform.dense.weight", R, ("H", "H")),
    Rule("lm_head.dense.bias", "cls.predictions.transform.dense.bias", R, ("H",)),
    Rule("lm_head.layer_norm.weight", "cls.predictions.transform.LayerNorm.weight", R, ("H",)),
    Rule("lm_head.layer_norm.bias", "cls.predictions.transform.LayerNorm.bias", R, ("H",)),
    Rule("output_layer.bias", "cls.predictions.bias", ROWS, ("V",)),
    # Present when the output layer is untied, and (a copy) on the last of several pipeline stages.
    Rule("output_layer.weight", "cls.predictions.decoder.weight", ROWS, ("V", "H"), group="output_weight"),
    Rule("binary_head.weight", "cls.seq_relationship.weight", R, ("2", "H"), group="binary"),
    Rule("binary_head.bias", "cls.seq_relationship.bias", R, ("2",), group="binary"),
)

# Alias markers of the legacy templates: the newer name first.
_ALIASES: dict[str, tuple[str, ...]] = {
    "encoder": ("encoder", "transformer"),
    "attention": ("self_attention", "attention"),
    "input_norm": ("input_layernorm", "input_norm"),
    "post_norm": ("post_attention_layernorm", "post_attention_norm"),
    "final_norm": ("final_layernorm", "final_norm"),
}
_MARKER = re.compile(r"\{(\w+)\}")

# Dict levels of a legacy `model` entry as Megatron-LM nests it (everything below is flat).
LEGACY_NESTING = (
    "language_model",
    "language_model.embedding",
    "language_model.embedding.word_embeddings",
    "language_model.embedding.position_embeddings",
    "language_model.embedding.tokentype_embeddings",
    "language_model.encoder",
    "language_model.transformer",
    "language_model.pooler",
    "lm_head",
    "binary_head",
    "word_embeddings_for_head",
)


def _expansions(template: str) -> list[str]:
    """Every concrete spelling of a template's alias markers (``{layer}`` stays)."""
    markers = [m for m in _MARKER.findall(template) if m in _ALIASES]
    if not markers:
        return [template]
    out = []
    for choice in itertools.product(*(_ALIASES[m] for m in markers)):
        values = dict(zip(markers, choice))
        out.append(_MARKER.sub(lambda m: values.get(m.group(1), m.group(0)), template))
    return out


def source_table(rules: tuple[Rule, ...]) -> dict[str, Rule]:
    """Megatron key template (with ``{layer}``, aliases spelled out) -> rule."""
    table: dict[str, Rule] = {}
    for rule in rules:
        for spelling in _expansions(rule.source):
            table[spelling] = rule
    return table


_LAYER_IN_KEY = re.compile(r"\.layers\.(\d+)\.")


def template_of(key: str) -> tuple[str, int | None]:
    """``'…layers.7.mlp…'`` -> (``'…layers.{layer}.mlp…'``, 7); keys outside layers -> (key, None)."""
    match = _LAYER_IN_KEY.search(key)
    if match is None:
        return key, None
    return key[: match.start()] + ".layers.{layer}." + key[match.end():], int(match.group(1))


def legacy_names(version: float) -> dict[str, str]:
    """The spellings of the alias markers to write for a legacy checkpoint of ``version``."""
    newer = version >= 3.0
    names = {marker: (spellings[0] if newer else spellings[-1]) for marker, spellings in _ALIASES.items()}
    # The `*_norm` spellings are from late releases; every version reads the `*_layernorm` ones.
    names.update(input_norm="input_layernorm", post_norm="post_attention_layernorm", final_norm="final_layernorm")
    return names


def expected_hf_keys(num_layers: int, binary_head: bool, untied: bool) -> list[str]:
    """The HF keys a converted model has (``MegatronBertForPreTraining``, or ``…ForMaskedLM``).

    Token-type embeddings are always there: a model trained without them gets a zero table
    from the converter, which adds nothing, as in Megatron.
    """
    keys: list[str] = []
    for rule in LEGACY_RULES:  # CORE_RULES produce the same targets
        if (rule.group == "binary" and not binary_head) or (rule.group == "output_weight" and not untied):
            continue
        for target in rule.targets:
            if "{layer}" in target:
                keys.extend(target.format(layer=layer) for layer in range(num_layers))
            else:
                keys.append(target)
    return keys
