"""Diagnostics of region classification: per-class tables, the foreground-bias figure, dense probability maps.

*Foreground bias* (DenseVLM's motivation): under mask pooling, a background (stuff) region tends to be named
after a foreground (thing) class that co-occurs with it, "sky" as "building". Per stuff class we show the mean
probability of the correct class, ``softmax(cos / 0.01)`` over the whole vocabulary (DenseVLM's teacher
temperature), beside the mean probability of the thing class that takes the most of it. Every function here
accepts several results so models (base / CLIPSelf / DenseVLM) can be compared side by side.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from densevlm.data.transforms import resize_longest_pad, to_tensor
from densevlm.evaluation.protocol import POOLINGS, TEACHER_TEMPERATURE, TOPK
from densevlm.utils.io import atomic_write_text
from densevlm.viz.figures import plt, save_figure
from densevlm.vocab.vocabulary import Vocabulary

Result = Mapping[str, Any]


def _named(results: Union[Result, Mapping[str, Result]]) -> dict[str, Result]:
    """One result (it has ``per_class``) as ``{"": result}``, or a name -> result mapping as it is."""
    if "per_class" in results:
        return {"": results}
    return dict(results)


# ---------------------------------------------------------------------- per-class table


def per_class_table(result: Result) -> tuple[list[str], list[list[Any]]]:
    """(header, rows) of the per-class table: class, kind, split, then per pooling regions / top-1 / top-5 and,
    for mask pooling, p(correct) and the most-confused thing class with its probability."""
    header = ["index", "class", "kind", "split"]
    poolings = [p for p in POOLINGS if any(f"{p}.regions" in r for r in result["per_class"])]
    for p in poolings:
        header += [f"{p}.regions"] + [f"{p}.acc{k}" for k in TOPK]
    if "maskpool" in poolings:
        header += ["maskpool.p_correct", "maskpool.confused_thing", "maskpool.p_confused_thing"]
    rows = []
    for r in result["per_class"]:
        kind, split = ("thing" if r["isthing"] else "stuff"), ("novel" if r["novel"] else "seen")
        row: list[Any] = [r["index"], r["name"], kind, split]
        for p in poolings:
            row += [r.get(f"{p}.regions")] + [r.get(f"{p}.acc{k}") for k in TOPK]
        if "maskpool" in poolings:
            row += [r.get("maskpool.p_correct"), r.get("maskpool.confused_thing"), r.get("maskpool.p_confused_thing")]
        rows.append(row)
    return header, rows


def _fmt(value: Any, column: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):  # probabilities in [0, 1] need more digits than percentages
        return f"{value:.3f}" if ".p_" in column else f"{value:.1f}"
    return str(value)


def per_class_markdown(result: Result) -> str:
    header, rows = per_class_table(result)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v, c) for v, c in zip(row, header)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def per_class_csv(result: Result) -> str:
    header, rows = per_class_table(result)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return buf.getvalue()


def write_per_class_table(
    result: Result, output_dir: str | Path, *, stem: str = "regions_per_class"
) -> dict[str, Path]:
    """Write ``<stem>.md`` and ``<stem>.csv`` (atomically) into ``output_dir``."""
    out = Path(output_dir)
    paths = {"markdown": out / f"{stem}.md", "csv": out / f"{stem}.csv"}
    atomic_write_text(paths["markdown"], per_class_markdown(result))
    atomic_write_text(paths["csv"], per_class_csv(result))
    return paths


# ---------------------------------------------------------------------- foreground bias


def foreground_bias(result: Result, *, pooling: str = "maskpool") -> list[dict[str, Any]]:
    """Per stuff class with regions: mean p(correct), the most-confused thing and its mean probability."""
    out = []
    for r in result["per_class"]:
        if r["isthing"] or not r.get(f"{pooling}.regions"):
            continue
        out.append({
            "index": r["index"],
            "class": r["name"],
            "novel": r["novel"],
            "regions": r[f"{pooling}.regions"],
            "p_correct": r[f"{pooling}.p_correct"],
            "thing": r[f"{pooling}.confused_thing"],
            "p_thing": r[f"{pooling}.p_confused_thing"],
            "acc1": r[f"{pooling}.acc1"],
        })
    return out


def format_foreground_bias(
    results: Union[Result, Mapping[str, Result]], *, classes: Optional[Sequence[str]] = None,
    pooling: str = "maskpool",
) -> str:
    """Markdown table, one row per stuff class: per model ``p(correct)`` and ``p(thing) thing``."""
    named = _named(results)
    tables = {name: {row["class"]: row for row in foreground_bias(r, pooling=pooling)} for name, r in named.items()}
    shown = list(classes) if classes is not None else list(next(iter(tables.values())))
    head = ["stuff class"] + [f"{name or 'model'}: p(correct) / most-confused thing" for name in tables]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in shown:
        cells = [c]
        for table in tables.values():
            row = table.get(c)
            cells.append(f"{row['p_correct']:.2f} / {row['p_thing']:.2f} {row['thing']}" if row else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_foreground_bias(
    results: Union[Result, Mapping[str, Result]],
    path: str | Path,
    *,
    classes: Optional[Sequence[str]] = None,
    max_classes: int = 20,
    pooling: str = "maskpool",
) -> Path:
    """Bars of mean p(correct) vs mean p(most-confused thing) per stuff class, one panel per model.

    ``results``: one result or name -> result (panels left to right in that order). ``classes``: stuff class
    names to show (default: the ``max_classes`` most biased under the first model, i.e. highest p(thing)).
    """
    named = _named(results)
    tables = {name: {row["class"]: row for row in foreground_bias(r, pooling=pooling)} for name, r in named.items()}
    first = next(iter(tables.values()))
    if classes is None:
        shown = sorted(first, key=lambda c: -first[c]["p_thing"])[:max_classes]
    else:
        missing = [c for c in classes if not any(c in t for t in tables.values())]
        if missing:
            raise ValueError(f"foreground bias: no stuff regions of class(es) {missing} in any result")
        shown = list(classes)
    if not shown:
        raise ValueError("foreground bias: the results hold no stuff regions under mask pooling")
    n = len(shown)
    fig, axes = plt.subplots(1, len(named), figsize=(4.6 * len(named) + 1.0, 0.42 * n + 1.6), sharey=True,
                             squeeze=False)
    y = np.arange(n)
    for ax, (name, table) in zip(axes[0], tables.items()):
        p_ok = [table[c]["p_correct"] if c in table else 0.0 for c in shown]
        p_th = [table[c]["p_thing"] if c in table else 0.0 for c in shown]
        ax.barh(y - 0.2, p_ok, height=0.38, color="#3a923a", label="p(correct)")
        ax.barh(y + 0.2, p_th, height=0.38, color="#d0493b", label="p(most-confused thing)")
        for yi, c, v in zip(y, shown, p_th):
            if c in table:
                ax.text(min(v, 1.0) + 0.01, yi + 0.2, table[c]["thing"], va="center", fontsize=7, color="#8a1f14")
        ax.set_xlim(0, 1.25)
        ax.set_xlabel(f"mean probability (softmax of cos / {named[name].get('temperature', TEACHER_TEMPERATURE):g})")
        macc = named[name].get("metrics", {}).get(f"{pooling}.stuff.macc1")
        label = name or named[name].get("model", {}).get("name", "")
        ax.set_title(f"{label}\nstuff macc1 {macc:.1f}%" if isinstance(macc, float) else label, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    novel = {c for t in tables.values() for c, row in t.items() if row["novel"]}
    axes[0][0].set_yticks(y, [c + (" *" if c in novel else "") for c in shown], fontsize=8)
    axes[0][0].invert_yaxis()
    axes[0][-1].legend(loc="lower right", fontsize=7)
    fig.suptitle("foreground bias: stuff regions under mask pooling" + (" (* novel)" if novel else ""), fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


# ---------------------------------------------------------------------- dense probability maps


@torch.no_grad()
def dense_probabilities(
    model: Any,
    image: Image.Image,
    text_embeddings: torch.Tensor,
    *,
    image_size: int = 512,
    temperature: float = TEACHER_TEMPERATURE,
) -> tuple[torch.Tensor, np.ndarray]:
    """Per-token class probabilities of one image: ``softmax(cos(token, class) / temperature)``.

    The image is resized-longest and padded to ``image_size`` as in evaluation. Returns the (N, gh, gw)
    probabilities over the tokens that see image content (padding rows/columns cut off) and the matching
    (gh·p, gw·p, 3) uint8 crop of the canvas, so maps and image align token for token.
    """
    canvas, scale = resize_longest_pad(image, image_size)
    p = model.patch_size
    new_w, new_h = max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale))
    first = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    device = first.device if first is not None else torch.device("cpu")
    x = to_tensor(canvas, model.image_mean, model.image_std).unsqueeze(0).to(device)
    was_training = bool(getattr(model, "training", False))
    if isinstance(model, torch.nn.Module):
        model.eval()  # no dropout in a figure meant to show what the model has learned
    try:
        dense = model.encode_dense(x)[0].float()  # (D, g, g)
    finally:
        if isinstance(model, torch.nn.Module):
            model.train(was_training)
    text = F.normalize(text_embeddings.float().to(dense.device), dim=-1)
    logits = torch.einsum("dhw,nd->nhw", F.normalize(dense, dim=0), text)
    probs = torch.softmax(logits / temperature, dim=0).cpu()
    gh, gw = min(-(-new_h // p), probs.shape[1]), min(-(-new_w // p), probs.shape[2])
    crop = np.asarray(canvas)[: gh * p, : gw * p]
    return probs[:, :gh, :gw], crop


def _class_index(vocabulary: Vocabulary, target: Union[int, str]) -> int:
    if isinstance(target, int):
        if not 0 <= target < len(vocabulary):
            raise ValueError(
                f"class index {target} is outside vocabulary {vocabulary.name!r} (0..{len(vocabulary) - 1})"
            )
        return target
    for i, c in enumerate(vocabulary.classes):
        if target in c.all_names:
            return i
    raise ValueError(f"class {target!r} is not in vocabulary {vocabulary.name!r}")


def plot_probability_maps(
    image: np.ndarray,
    maps: Mapping[str, torch.Tensor],
    vocabulary: Vocabulary,
    target: Union[int, str],
    path: str | Path,
    *,
    max_legend: int = 12,
    title: Optional[str] = None,
) -> Path:
    """One row per model: the image, the per-token argmax class map (legend) and p(``target``) per token.

    ``maps``: name -> (N, gh, gw) probabilities from :func:`dense_probabilities` (all for the same image);
    ``image``: the aligned crop it returned. Class colours are shared across rows, so before/after compare.
    """
    if not maps:
        raise ValueError("plot_probability_maps: no probability maps given")
    t = _class_index(vocabulary, target)
    argmax = {name: m.argmax(0).numpy() for name, m in maps.items()}
    area = np.bincount(np.concatenate([a.ravel() for a in argmax.values()]), minlength=len(vocabulary))
    present = [int(i) for i in np.argsort(-area, kind="stable") if area[i] > 0]
    legend_classes = present[:max_legend]
    palette = plt.get_cmap("tab20")
    colours = np.full((len(vocabulary), 3), 0.6)  # classes beyond the legend are grey ("other")
    for k, c in enumerate(legend_classes):
        colours[c] = palette(k % 20)[:3]
    rows = len(maps)
    h, w = image.shape[:2]
    fig, axes = plt.subplots(rows, 3, figsize=(11.5, (3.3 * h / w + 0.6) * rows + 0.6), squeeze=False)
    for r, (name, probs) in enumerate(maps.items()):
        a0, a1, a2 = axes[r]
        a0.imshow(image)
        a0.set_title(name or "image", fontsize=9)
        a1.imshow(colours[argmax[name]], extent=(0, w, h, 0), interpolation="nearest")
        a1.set_title("argmax class per token", fontsize=9)
        im = a2.imshow(probs[t].numpy(), extent=(0, w, h, 0), vmin=0, vmax=1, cmap="magma", interpolation="nearest")
        a2.set_title(f"p({vocabulary.classes[t].name}) per token", fontsize=9)
        fig.colorbar(im, ax=a2, fraction=0.046)
        for ax in (a0, a1, a2):
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[c]) for c in legend_classes]
    labels = [vocabulary.classes[c].name + (" *" if vocabulary.classes[c].novel else "") for c in legend_classes]
    if len(present) > len(legend_classes):
        handles.append(plt.Rectangle((0, 0), 1, 1, color=(0.6, 0.6, 0.6)))
        labels.append("other")
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    # leave room for the suptitle so it does not run into the first row's titles
    fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(labels) // 6), 1, 0.97 if title else 1))
    return save_figure(fig, path)


# ---------------------------------------------------------------------- all of it


def write_diagnostics(result: Result, output_dir: str | Path) -> dict[str, Path]:
    """Per-class table (``regions_per_class.md`` / ``.csv``) and, with stuff regions, the foreground bias as a
    figure (``foreground_bias.png``) and a table (``foreground_bias.md``)."""
    out = Path(output_dir)
    paths = write_per_class_table(result, out)
    if foreground_bias(result):
        paths["foreground_bias"] = plot_foreground_bias(result, out / "foreground_bias.png")
        paths["foreground_bias_table"] = out / "foreground_bias.md"
        atomic_write_text(paths["foreground_bias_table"], format_foreground_bias(result))
    return paths
