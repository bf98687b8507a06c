"""bf16 training numerics on fp32 hardware: a dispatch mode that rounds what bf16 autocast computes in bf16.

Why: a recipe's bf16-vs-fp32 accuracy should be checked before paying for GPU hours, but CPUs without bf16 units
(AVX2 only, no AVX512-BF16 or AMX) run a bf16 matmul two orders of magnitude slower than an fp32 one. Autocast
computes its lower-precision ops (matmuls, convolutions, attention) as: inputs rounded to bf16, products
accumulated in fp32, output rounded to bf16. This mode does exactly that with fp32 kernels: every such op, in the
forward *and* the backward pass (the mode sits below autograd, so gradient matmuls are rounded too), gets its
floating inputs and outputs rounded to the nearest bf16 value (round-to-nearest-even, as ``.to(torch.bfloat16)``).

The fused attention kernel (the CPU flash kernel ``scaled_dot_product_attention`` runs) is emulated as its bf16
version computes: scores and softmax statistics in fp32, the unnormalised probabilities rounded to bf16 for the
product with V, the output rounded; its backward kernel runs in fp32 on rounded inputs, its gradients rounded.
Unfused attention (explicit ``softmax(q kᵀ) v``, the math backend) is two matmuls and is rounded like any other. Elementwise ops that native
autocast runs on bf16 tensors (bias gradients' sums, the ops between two bf16 matmuls) compute on rounded values in
fp32 here, one rounding less: on the toy student the emulation's per-step error is 0.67-0.72x native bf16's
(``tools/bench_bf16_parity.py`` measures and prints the ratio). ``tools/bench_bf16_parity.py`` uses this mode when
the CPU has no fast bf16 path.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

aten = torch.ops.aten

#: The ops CPU and CUDA autocast run in the lower precision, as they reach the dispatcher below autograd
#: (``linear`` and ``matmul`` decompose into these), and the kernels of their backward passes.
ROUNDED_OPS = {
    aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.addbmm,
    aten.convolution, aten.convolution_backward,
    aten._scaled_dot_product_flash_attention_for_cpu,
    aten._scaled_dot_product_flash_attention_for_cpu_backward,
}
_SDPA_FWD = aten._scaled_dot_product_flash_attention_for_cpu
_SDPA_BWD = aten._scaled_dot_product_flash_attention_for_cpu_backward


def round_bf16(x: Any) -> Any:
    """``x`` rounded to the nearest bf16 value, kept in its dtype; anything that is not an fp32 tensor unchanged."""
    if isinstance(x, torch.Tensor) and x.dtype == torch.float32:
        return x.to(torch.bfloat16).to(torch.float32)
    return x


@contextlib.contextmanager
def emulated_bf16() -> Iterator["EmulatedBF16"]:
    """bf16 autocast numerics on fp32 kernels; yields the mode, whose ``calls`` count the rounded ops."""
    mode = EmulatedBF16()
    # nn.MultiheadAttention's inference fast path is one fused kernel: off, so its projections and attention are
    # seen one by one (autocast runs that kernel in bf16 as a whole).
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with mode:
            yield mode
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


class EmulatedBF16(TorchDispatchMode):
    """Rounds autocast's bf16 ops to bf16 on fp32 kernels; ``emulated_bf16()`` is the entry point.

    ``mode.calls`` counts the rounded op calls per op name (forward and backward), so a caller can check the
    mode saw what it expected.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func.overloadpacket not in ROUNDED_OPS:
            return func(*args, **kwargs)
        name = func.overloadpacket.__name__
        self.calls[name] = self.calls.get(name, 0) + 1
        if func.overloadpacket is _SDPA_BWD:
            # The forward's logsumexp (argument 5) is fp32 under native autocast too: only the tensors are rounded.
            args = tuple(a if i == 5 else round_bf16(a) for i, a in enumerate(args))
        else:
            args = tree_map(round_bf16, args)
        kwargs = tree_map(round_bf16, kwargs)
        out = func(*args, **kwargs)
        if func.overloadpacket is _SDPA_FWD:
            # (output, logsumexp): the output is bf16 under autocast, the logsumexp fp32. The bf16 kernel also
            # rounds the unnormalised probabilities before multiplying them with V: redone here, written into the
            # kernel's own output so its layout is the one the backward kernel expects.
            output, lse = out[0], out[1]
            with torch.no_grad():
                output.copy_(_flash_output_bf16(*args, **kwargs))
            return (output, lse) + tuple(out[2:])
        return tree_map(round_bf16, out)


def _flash_output_bf16(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout_p: float = 0.0,
                       is_causal: bool = False, *, attn_mask: Any = None, scale: Any = None) -> torch.Tensor:
    """The bf16 flash kernel's output on bf16-valued q, k, v: fp32 scores and softmax statistics, the
    unnormalised probabilities rounded to bf16 for the product with V (a single key block: the toy and real
    sequence lengths here fit the kernel's block), the result rounded."""
    if dropout_p > 0:
        raise ValueError("emulated_bf16: attention dropout is not emulated (set the model's attn_drop to 0)")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = query @ key.transpose(-2, -1) * scale
    if is_causal:
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    peak = scores.amax(dim=-1, keepdim=True)
    unnormalised = (scores - peak).exp()
    return round_bf16((round_bf16(unnormalised) @ value) / unnormalised.sum(dim=-1, keepdim=True))
