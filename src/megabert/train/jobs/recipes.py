"""Pretraining recipes: named sets of the settings that decide how much a run learns in its budget.

``megabert pretrain --recipe NAME`` takes each setting from the recipe unless the command line
gives it; the demo uses a recipe too. ``default`` is the classic BERT setup (the option defaults
as they have always been); ``short-budget`` is what measured best for a run of minutes to an
hour on a CPU (docs/pretraining.md, "Time to accuracy", has the table of what each lever did).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from megabert.errors import UserError


@dataclass(frozen=True)
class PretrainRecipe:
    """The settings a recipe decides (each one an option of ``megabert pretrain``)."""

    name: str
    summary: str
    seq_length: int = 128
    batch_size: int = 32
    binary_task: str = "nsp"  # nsp | sop | none
    masked_lm_prob: float = 0.15
    lr: float = 1e-4
    warmup_steps: int = 0
    schedule: str = "linear"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    clip_grad: float = 1.0  # 0: no clipping
    # fp32 | bf16 | auto: bf16 autocast where this machine's bf16 products are not slower than
    # fp32 ones (a GPU, a CPU with AMX or AVX512-BF16 like Zen 4), else fp32.
    precision: str = "fp32"


RECIPES: dict[str, PretrainRecipe] = {
    recipe.name: recipe
    for recipe in (
        PretrainRecipe("default", "BERT's settings: MLM 15% + NSP, lr 1e-4, linear decay, fp32"),
        PretrainRecipe(
            "short-budget",
            "for minutes to hours of compute: MLM only (no sentence task), lr 5e-4 warmed up over 100 "
            "steps and decayed to 0 when --max-minutes / --max-steps ends, bf16 where this machine is fast at it",
            binary_task="none", lr=5e-4, warmup_steps=100, schedule="linear", min_lr_ratio=0.0, precision="auto",
        ),  # fmt: skip
    )
}
# The settings a recipe holds (the option names of `megabert pretrain`, with - for _).
SETTINGS: tuple[str, ...] = tuple(f.name for f in fields(PretrainRecipe) if f.name not in ("name", "summary"))


def get_recipe(name: str) -> PretrainRecipe:
    """The recipe called ``name`` (a UserError listing the recipes otherwise)."""
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


def resolve_precision(precision: str, device_type: str) -> str:
    """``auto`` -> ``bf16`` where this device's bf16 products are not slower than fp32 ones, else ``fp32``."""
    if precision != "auto":
        return precision
    if device_type == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    import torch

    from megabert.fast_paths.half_matmul import upcast_is_faster

    return "fp32" if upcast_is_faster(torch.bfloat16, "auto") else "bf16"
