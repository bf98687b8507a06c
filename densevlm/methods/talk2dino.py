"""Talk2DINO's ψ and its objective: CLIP text embeddings mapped into a frozen ViT's patch space.

ψ is ``Linear(T→D) → tanh → Linear(D→D)`` (the released ``ProjectionLayer`` with ``act: tanh``,
``hidden_layer: True``; T = 512 for CLIP ViT-B/16 text, D = 768 for DINOv2 ViT-B, 1024 for ViT-L). Its
parameter names are the released ones (``linear_layer.*``, ``hidden_layers.0.*``), so released checkpoints load
as they are; the legacy ``linear_layer2.*`` names are mapped by :func:`remap_legacy_keys`.

The objective (:class:`Talk2DINOObjective`): each caption picks the head of its own image whose attention-pooled
embedding is most similar to ψ(caption) (``max_score``), and a symmetric InfoNCE with a fixed temperature (0.07)
aligns captions with those head embeddings over the batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from densevlm.methods.base import ObjectiveOutput
from densevlm.methods.contrastive import _gather_with_grad
from densevlm.vocab.embeddings import encode_texts

#: released key names -> ours (``ProjectionLayer.load_state_dict`` of the reference does the same).
LEGACY_KEYS = {"linear_layer2.": "hidden_layers.0."}


class Talk2DINOProjection(nn.Module):
    """ψ: ``Linear(in_dim→out_dim) → tanh → Linear(out_dim→out_dim)``; no output activation, norm or residual."""

    def __init__(self, in_dim: int = 512, out_dim: int = 768) -> None:
        super().__init__()
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        self.linear_layer = nn.Linear(self.in_dim, self.out_dim)
        self.hidden_layers = nn.ModuleList([nn.Linear(self.out_dim, self.out_dim)])

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        x = self.linear_layer(text)
        for layer in self.hidden_layers:  # the activation comes before each hidden layer, as released
            x = layer(torch.tanh(x))
        return x

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        return super().load_state_dict(remap_legacy_keys(state_dict), strict=strict, assign=assign)


def remap_legacy_keys(state: Mapping[str, Any]) -> dict[str, Any]:
    """Released ψ state dicts: ``linear_layer2.*`` -> ``hidden_layers.0.*``; a ``module.`` prefix dropped."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        for old, new in LEGACY_KEYS.items():
            if key.startswith(old):
                key = new + key[len(old):]
        out[key] = value
    return out


def read_projection(path: str | Path) -> Talk2DINOProjection:
    """ψ from a released ``.pth`` (tensors saved on ``cuda:0`` are mapped to the CPU), a ``.safetensors`` file or
    a run directory of ``densevlm talk2dino train``; the sizes come from the weights' shapes."""
    path = Path(path)
    if path.is_dir():
        path = path / "weights.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"Talk2DINO projection weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a ψ state dict, got {type(state).__name__}")
    state = remap_legacy_keys(state)
    need = ("linear_layer.weight", "linear_layer.bias", "hidden_layers.0.weight", "hidden_layers.0.bias")
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f"{path}: not a Talk2DINO ψ checkpoint with a hidden layer; missing {missing} "
                         f"(keys found: {sorted(state)[:6]})")
    out_dim, in_dim = state["linear_layer.weight"].shape
    psi = Talk2DINOProjection(in_dim, out_dim)
    try:
        psi.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: ψ weights do not fit Linear({in_dim}→{out_dim}) → tanh → "
                         f"Linear({out_dim}→{out_dim}): {' '.join(str(err).split())[:300]}") from None
    return psi.float().eval()


def select_best_heads(text: torch.Tensor, heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per caption, the head of its own image most similar to it (``max_score``).

    Args:
        text: (B, D) unit-norm projected captions; heads: (B, H, D) unit-norm per-head embeddings of their images.

    Returns:
        ((B, D) the chosen head embeddings, (B,) their indices).
    """
    scores = torch.einsum("bd,bhd->bh", text, heads)
    index = scores.argmax(dim=1)  # argmax of softmax(scores) in the reference: the same head
    return heads[torch.arange(heads.shape[0], device=heads.device), index], index


def symmetric_infonce(text: torch.Tensor, image: torch.Tensor, temperature: float,
                      offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(CE(S/τ, diag) + CE(Sᵀ/τ, diag)) / 2`` with ``S = text · imageᵀ``; returns (loss, S).

    ``image`` may hold more rows than ``text`` (other processes' pairs as extra negatives); caption i's positive
    is row ``offset + i``.
    """
    logits = text @ image.t() / temperature
    labels = torch.arange(text.shape[0], device=text.device) + offset
    loss_t2i = F.cross_entropy(logits, labels)
    loss_i2t = F.cross_entropy(logits[:, offset:offset + text.shape[0]].t(), torch.arange(text.shape[0],
                                                                                        device=text.device))
    return 0.5 * (loss_t2i + loss_i2t), logits


def _project(model: nn.Module, text: torch.Tensor) -> torch.Tensor:
    return model(text)


class Talk2DINOObjective:
    """Best-head symmetric InfoNCE on cached features; ``batch = {"text": (B, T), "heads": (B, H, D)}``.

    Text goes through ψ inside ``step_model`` (so DDP syncs ψ's gradients); the head embeddings are constants from
    the cache. Under several processes the chosen heads of every process are negatives (as CLIP's global batch).
    The reference also divides the loss by B²; that only rescales gradients, which Adam undoes, so it is not done.
    """

    def __init__(self, temperature: float = 0.07) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature: expected > 0, got {temperature}")
        self.temperature = float(temperature)

    def prepare(self, device: torch.device) -> None:
        return None

    def __call__(self, step_model: nn.Module, batch: dict[str, Any]) -> ObjectiveOutput:
        text = F.normalize(step_model(_project, batch["text"].float()), dim=-1)
        heads = F.normalize(batch["heads"].float(), dim=-1)
        chosen, index = select_best_heads(text, heads)
        all_chosen = _gather_with_grad(chosen)
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        loss, logits = symmetric_infonce(text, all_chosen, self.temperature, offset=rank * chosen.shape[0])
        with torch.no_grad():
            labels = torch.arange(text.shape[0], device=text.device) + rank * chosen.shape[0]
            acc = (logits.argmax(-1) == labels).float().mean().item()
            usage = torch.bincount(index, minlength=heads.shape[1]).float() / index.numel()
            head_entropy = float(-(usage[usage > 0] * usage[usage > 0].log()).sum())
        return ObjectiveOutput(loss, {"t2i_acc": acc, "head_entropy": head_entropy})


@torch.no_grad()
def encode_captions(text_model: Any, captions: list[str], batch_size: int = 256,
                    progress: bool = True) -> torch.Tensor:
    """(C, T) CLIP text embeddings (``encode_text``: EOT token after the text projection), not normalised."""
    return encode_texts(text_model, captions, batch_size=batch_size, progress=progress, normalize=False,
                        desc="caption embeddings")
