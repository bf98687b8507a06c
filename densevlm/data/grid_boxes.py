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
    rows, cols = choices[rng.randrange(len(choices))]
    cells = []
    for r in range(rows):
        for c in range(cols):
            cells.append((c * width / cols, r * height / rows, (c + 1) * width / cols, (r + 1) * height / rows))
    rng.shuffle(cells)
    cells = cells[:max_boxes]
    pixel = torch.zeros(max_boxes, 4)
    valid = torch.zeros(max_boxes, dtype=torch.bool)
    if cells:
        pixel[: len(cells)] = torch.tensor(cells, dtype=torch.float32)
        valid[: len(cells)] = True
    boxes = pixel * (canvas_scale / canvas_size)
    return boxes.clamp_(0.0, 1.0), valid, pixel
