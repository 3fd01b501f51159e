"""The fused QKV layouts, checked against hand-written row orders (2 heads, head size 2)."""

from __future__ import annotations

import pytest
import torch

from megabert.convert.qkv import fuse_qkv, split_qkv
from megabert.errors import UserError

# Rows named by (projection, head, index in head): q/k/v rows of a 2-head, head-size-2 model.
Q = torch.tensor([[100.0], [101.0], [110.0], [111.0]])  # q[h=0,i=0], q[0,1], q[1,0], q[1,1]
K = Q + 100
V = Q + 200
EXPECTED_ROWS = {
    # [3, heads, head_dim]: all Q, then all K, then all V
    0.0: [100, 101, 110, 111, 200, 201, 210, 211, 300, 301, 310, 311],
    # [heads, head_dim, 3]: per row of a head, its q, k, v
    1.0: [100, 200, 300, 101, 201, 301, 110, 210, 310, 111, 211, 311],
    # [heads, 3, head_dim]: per head, its q rows, k rows, v rows
    2.0: [100, 101, 200, 201, 300, 301, 110, 111, 210, 211, 310, 311],
    3.0: [100, 101, 200, 201, 300, 301, 110, 111, 210, 211, 310, 311],
}


@pytest.mark.parametrize("version", sorted(EXPECTED_ROWS))
def test_layouts_match_hand_written_rows(version):
    fused = fuse_qkv(Q, K, V, num_heads=2, version=version)
    assert fused[:, 0].tolist() == EXPECTED_ROWS[version]
    q, k, v = split_qkv(fused, num_heads=2, version=version)
    assert torch.equal(q, Q) and torch.equal(k, K) and torch.equal(v, V)


@pytest.mark.parametrize("version", sorted(EXPECTED_ROWS))
def test_bias_and_weight_round_trip(version):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3 * 4 * 8, 32, generator=g)
    bias = torch.randn(3 * 4 * 8, generator=g)
    for fused in (weight, bias):
        parts = split_qkv(fused, num_heads=4, version=version)
        assert torch.equal(fuse_qkv(*parts, num_heads=4, version=version), fused)
        # the parts own their memory (safetensors refuses tensors that share it)
        assert len({p.untyped_storage().data_ptr() for p in parts}) == 3


def test_unknown_version():
    with pytest.raises(UserError, match=r"unknown checkpoint_version 1\.5 \(known: 0, 1, 2, 3\)"):
        split_qkv(torch.zeros(12, 2), num_heads=2, version=1.5)


def test_rows_not_divisible_by_heads():
    with pytest.raises(UserError, match=r"fused QKV tensor has 10 rows, which is not 3 x 2 heads x head_dim"):
        split_qkv(torch.zeros(10, 2), num_heads=2, version=3.0)
