"""The bf16 emulation that checks a recipe's bf16 accuracy on CPUs without bf16 units (tools/bench_bf16_parity.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from densevlm.engine.emulated_bf16 import emulated_bf16, round_bf16


def _is_bf16_valued(t: torch.Tensor) -> bool:
    return torch.equal(t, t.to(torch.bfloat16).to(t.dtype))


def test_linear_layers_match_native_bf16_autocast_and_not_fp32():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 32))
    x = torch.randn(128, 64)
    fp32 = mlp(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        native = mlp(x).float()
    with emulated_bf16() as mode:
        emulated = mlp(x)
    assert emulated.dtype == torch.float32 and _is_bf16_valued(emulated)
    # Inputs rounded, products summed in fp32, output rounded: what autocast does, so ReLU between changes nothing.
    assert torch.allclose(emulated, native, atol=1e-6)
    assert (fp32 - native).abs().max() > 1e-3
    assert mode.calls == {"addmm": 2}


def test_backward_matmuls_are_rounded_too():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8, bias=False)
    x = torch.randn(32, 16, requires_grad=True)
    with emulated_bf16() as mode:
        layer(x).square().sum().backward()
    # The forward mm and the two gradient mms (input and weight) pass through the mode.
    assert mode.calls["mm"] == 3
    assert _is_bf16_valued(layer.weight.grad) and _is_bf16_valued(x.grad)
    layer.weight.grad = None
    layer(x).square().sum().backward()
    assert not _is_bf16_valued(layer.weight.grad)  # outside the mode: plain fp32


def test_fused_attention_tracks_native_bf16_far_closer_than_fp32():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 32) for _ in range(3))
    fp32 = F.scaled_dot_product_attention(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        native = F.scaled_dot_product_attention(q, k, v).float()
    with emulated_bf16() as mode:
        emulated = F.scaled_dot_product_attention(q, k, v)
    assert "_scaled_dot_product_flash_attention_for_cpu" in mode.calls
    assert (emulated - native).abs().mean() < 0.25 * (fp32 - native).abs().mean()


def test_mode_restores_the_attention_fast_path_and_leaves_other_dtypes_alone():
    before = torch.backends.mha.get_fastpath_enabled()
    with emulated_bf16():
        assert not torch.backends.mha.get_fastpath_enabled()
        ints = torch.arange(6).reshape(2, 3)
        assert torch.equal(ints @ ints.T, torch.tensor([[5, 14], [14, 50]]))
    assert torch.backends.mha.get_fastpath_enabled() == before
    x = torch.tensor([1.0 + 2**-10], dtype=torch.float64)
    assert round_bf16(x) is x  # only fp32 tensors are rounded
    assert round_bf16(torch.tensor([1.0 + 2**-10])).item() == 1.0
