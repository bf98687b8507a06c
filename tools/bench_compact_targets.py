#!/usr/bin/env python
"""Compact versus exact teacher targets: bytes per image (from the stored shapes) and the DenseVLM loss difference
on random teacher features of real size (issue 23). Prints one JSON object.

Bytes per image are the tensor bytes each image adds to a store: exact = cells x D x 2 (fp16 features); compact =
cells x (k x (id bytes + 4) + 4) (int16 ids, fp32 probabilities, fp32 tail mass). Shard headers (image keys,
identity) add a few hundred bytes per shard, i.e. about one byte per image at 256 images a shard (the measured
EVA02-L exact cache is 474,769 bytes per image against 474,624 of tensor bytes).

The loss bench draws ``--images`` images x ``--boxes`` regions (the recipe's 36 boxes per image) of unit-norm
teacher features f = normalize(s * text[c] + noise) around a random class c of a random unit-norm vocabulary of
``--classes`` (coco_ade_316: 316) x ``--dim`` (EVA02-L: 768), and student logits from a noisier copy; ``s``
sets how sharp the teacher is (``sharp``, ``medium`` and ``flat`` regimes). For each k it reports DenseVLM's loss
(``loss_from_logits``, T = 0.01, threshold 0.3) on full and on compact targets, the absolute and relative
difference, the per-region bound of methods.compact_targets, whether every region's keep decision and label
agree, the L1 error of the gradient w.r.t. the student logits, and the tail mass.

    python tools/bench_compact_targets.py                     # EVA02-L shapes, coco_ade 316 classes
    python tools/bench_compact_targets.py --ks 1 5 316 --images 16
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from densevlm.data.grid_boxes import cell_offsets, grid_choices  # noqa: E402
from densevlm.methods.compact_targets import compact_distribution, compact_logits, id_dtype  # noqa: E402
from densevlm.methods.densevlm import DenseVLMObjective  # noqa: E402

def bytes_per_image(cells: int, dim: int, classes: int, k: int) -> dict[str, int]:
    exact = cells * dim * 2
    ids = torch.empty(0, dtype=id_dtype(classes)).element_size()
    compact = cells * (k * (ids + 4) + 4)
    return {"exact": exact, "compact": compact, "ratio": round(exact / compact, 1)}


def toy_shapes() -> tuple[int, int]:
    """The toy teacher's feature width and the toy world's seen-class count (the demo's training vocabulary)."""
    from densevlm.config.toyworld import ToyWorldConfig
    from densevlm.toyworld.categories import categories

    model = json.loads((Path(__file__).resolve().parents[1] / "densevlm/models/model_configs/ToyCLIP-ViT-T-16.json")
                       .read_text())
    return int(model["embed_dim"]), sum(not c["novel"] for c in categories(ToyWorldConfig()))


def region_bound(t_logits: torch.Tensor, s_logits: torch.Tensor, k: int) -> torch.Tensor:
    """Per region tau * (log(V - k) + max_tail S - min_tail S) (methods.compact_targets), over all columns."""
    v = t_logits.shape[-1]
    if k == v:
        return torch.zeros(len(t_logits))
    dist = compact_distribution(t_logits, k)
    tail = torch.ones_like(s_logits, dtype=torch.bool).scatter(-1, dist.ids.long(), False)
    s_max = s_logits.masked_fill(~tail, -math.inf).amax(-1)
    s_min = s_logits.masked_fill(~tail, math.inf).amin(-1)
    return dist.tail * (math.log(v - k) + s_max - s_min)


def loss_bench(regime: str, scale: float, args: argparse.Namespace) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    v, d, r = args.classes, args.dim, args.images * args.boxes
    text = F.normalize(torch.randn(v, d, generator=g), dim=-1)
    thing = torch.arange(v) < int(v * args.thing_fraction)  # coco_ade: 204 things of 316
    cls = torch.randint(0, v, (r,), generator=g)
    t_feat = F.normalize(scale * text[cls] + F.normalize(torch.randn(r, d, generator=g), dim=-1), dim=-1)
    s_feat = F.normalize(t_feat + 1.5 * F.normalize(torch.randn(r, d, generator=g), dim=-1), dim=-1)
    obj = DenseVLMObjective(None, text, text, thing, temperature=0.01, threshold=0.3)
    t_logits = t_feat @ text.t() / 0.01
    s_logits = (s_feat @ text.t() / 0.01).requires_grad_(True)
    full, m_full = obj.loss_from_logits(t_logits, s_logits)
    (g_full,) = torch.autograd.grad(full, s_logits)
    p = t_logits.softmax(-1)
    out = {"scale": scale, "regions": r, "teacher_top1_mean": round(float(p.max(-1).values.mean()), 4),
           "kept_fraction": m_full["kept_fraction"], "loss_full": float(full), "by_k": {}}
    for k in args.ks:
        if k > v:
            continue
        dist = compact_distribution(t_logits, k)
        c_logits = compact_logits(dist, v)
        comp, m_comp = obj.loss_from_logits(c_logits, s_logits)
        (g_comp,) = torch.autograd.grad(comp, s_logits)
        same_keep = (c_logits.softmax(-1).max(-1).values > 0.3).eq(p.max(-1).values > 0.3).all()
        same_label = c_logits.argmax(-1).eq(t_logits.argmax(-1)).all()
        out["by_k"][str(k)] = {
            "loss_compact": float(comp), "abs_difference": float((comp - full).abs()),
            "relative_difference": float((comp - full).abs() / full.abs().clamp_min(1e-12)),
            "bound_mean_per_region_all_columns": float(region_bound(t_logits, s_logits.detach(), k).mean()),
            "same_keep_and_label": bool(same_keep and same_label),
            # the gradient of the batch-mean loss, times the regions: the per-region gradient error's L1 norm, mean
            "grad_l1_error_per_region": float((g_comp - g_full).abs().sum()),
            "tail_mass_max": float(dist.tail.max()), "tail_mass_mean": float(dist.tail.mean()),
            "kept_fraction_compact": m_comp["kept_fraction"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 5, 10, 20, 50, 316])
    ap.add_argument("--classes", type=int, default=316)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--boxes", type=int, default=36)
    ap.add_argument("--thing-fraction", type=float, default=204 / 316)
    ap.add_argument("--scales", type=float, nargs=3, default=[0.3, 0.05, 0.02], metavar=("SHARP", "MEDIUM", "FLAT"),
                    help="s of the teacher features per regime (0.3: top-1 ~1; 0.02: top-1 ~0.4)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    cells = cell_offsets(grid_choices(6, "densevlm"))[-1]
    toy_dim, toy_classes = toy_shapes()
    sizes = {"cells_per_image": cells, "EVA02-L-14-336 (768-d, coco_ade_316)": {},
             f"toy teacher ({toy_dim}-d, {toy_classes} seen toy classes)": {}}
    for k in args.ks:
        sizes["EVA02-L-14-336 (768-d, coco_ade_316)"][str(k)] = bytes_per_image(cells, 768, 316, min(k, 316))
        if k <= toy_classes:
            sizes[f"toy teacher ({toy_dim}-d, {toy_classes} seen toy classes)"][str(k)] = bytes_per_image(
                cells, toy_dim, toy_classes, k)
    print(json.dumps({"bytes_per_image": sizes,
                      "loss": {regime: loss_bench(regime, scale, args)
                               for regime, scale in zip(("sharp", "medium", "flat"), args.scales)},
                      "setup": {"classes": args.classes, "dim": args.dim, "regions": args.images * args.boxes,
                                "temperature": 0.01, "threshold": 0.3, "seed": args.seed}}, indent=2))


if __name__ == "__main__":
    main()
