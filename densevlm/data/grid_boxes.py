"""Grid boxes: the regions DenseVLM and CLIPSelf align, drawn as the reference draws them.

Per image one (rows, cols) split is drawn uniformly from a fixed list; the cells are computed on the ORIGINAL
image, shuffled, the first ``max_boxes`` kept, mapped into the padded square canvas and normalised to [0, 1].
"""

from __future__ import annotations

import random

import torch


def grid_choices(max_split: int = 6, style: str = "densevlm") -> list[tuple[int, int]]:
    """(rows, cols) choices.

    DenseVLM: rows in [2, M], cols in [(rows+1)//2 + 1, min(2 rows, M)] -> 17 choices for M = 6.
    CLIPSelf: rows in [1, M], cols in [(rows+1)//2, min(2 rows, M)] -> 24 choices for M = 6.
    """
    if style == "densevlm":
        return [(m, n) for m in range(2, max_split + 1) for n in range((m + 1) // 2 + 1, min(2 * m, max_split) + 1)]
    if style == "clipself":
        return [(m, n) for m in range(1, max_split + 1) for n in range((m + 1) // 2, min(2 * m, max_split) + 1)]
    raise ValueError(f"grid style: expected 'densevlm' or 'clipself', got {style!r}")


def cell_offsets(choices: list[tuple[int, int]]) -> list[int]:
    """Index of each choice's first cell in the global cell order (choice by choice, cells row-major).

    With the 17 DenseVLM choices there are 309 cells in all; a cell's global index names it exactly for any image,
    which is what the teacher-target cache stores features by.
    """
    out, total = [], 0
    for rows, cols in choices:
        out.append(total)
        total += rows * cols
    return out + [total]


def _cells(width: int, height: int, rows: int, cols: int) -> list[tuple[float, float, float, float]]:
    return [(c * width / cols, r * height / rows, (c + 1) * width / cols, (r + 1) * height / rows)
            for r in range(rows) for c in range(cols)]


def all_grid_cells(width: int, height: int, canvas_scale: float, canvas_size: int,
                   choices: list[tuple[int, int]]) -> torch.Tensor:
    """Every cell of every choice, (sum rows*cols, 4) normalised on the canvas, in the global cell order.

    Computed with the same arithmetic as :func:`grid_boxes`, so a cell's box here is bit-identical to the box
    :func:`grid_boxes` draws for it.
    """
    cells = [cell for rows, cols in choices for cell in _cells(width, height, rows, cols)]
    return (torch.tensor(cells, dtype=torch.float32) * (canvas_scale / canvas_size)).clamp_(0.0, 1.0)


def grid_boxes_with_cells(width: int, height: int, canvas_scale: float, canvas_size: int, rng: random.Random,
                          choices: list[tuple[int, int]], max_boxes: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`grid_boxes` plus ``cells`` (max_boxes,) int64: each box's global cell index, -1 for padding."""
    k = rng.randrange(len(choices))
    rows, cols = choices[k]
    cells = _cells(width, height, rows, cols)
    # Shuffling the cell ids draws the same permutation as shuffling the cells (random.shuffle looks only at the
    # length), so the boxes are those of the reference's draw and each keeps its name.
    order = list(range(len(cells)))
    rng.shuffle(order)
    order = order[:max_boxes]
    pixel = torch.zeros(max_boxes, 4)
    valid = torch.zeros(max_boxes, dtype=torch.bool)
    ids = torch.full((max_boxes,), -1, dtype=torch.long)
    if order:
        pixel[: len(order)] = torch.tensor([cells[i] for i in order], dtype=torch.float32)
        valid[: len(order)] = True
        ids[: len(order)] = torch.tensor(order, dtype=torch.long) + cell_offsets(choices)[k]
    boxes = pixel * (canvas_scale / canvas_size)
    return boxes.clamp_(0.0, 1.0), valid, pixel, ids


def grid_boxes(width: int, height: int, canvas_scale: float, canvas_size: int, rng: random.Random,
               choices: list[tuple[int, int]], max_boxes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random grid cells of one image.

    Args:
        width, height: the original image size in pixels.
        canvas_scale: the resize factor from the original image to the padded canvas (resize-longest).
        canvas_size: side of the square canvas.

    Returns:
        ``boxes`` (max_boxes, 4) normalised ``[x0, y0, x1, y1]`` on the canvas, ``valid`` (max_boxes,) bool, and
        ``pixel_boxes`` (max_boxes, 4) in original-image pixels (for crops), padded rows zero.
    """
    boxes, valid, pixel, _ = grid_boxes_with_cells(width, height, canvas_scale, canvas_size, rng, choices, max_boxes)
    return boxes, valid, pixel
