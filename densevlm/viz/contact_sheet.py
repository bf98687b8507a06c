"""The review contact sheet of ``densevlm labels propose``: one self-contained HTML file (thumbnails as data URIs,
plain JS, no server) with each image's regions coloured by their proposed label and a table sortable by
confidence."""

from __future__ import annotations

import base64
import colorsys
import html
import io
import json
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw


def class_colour(index: int) -> tuple[int, int, int]:
    """A distinct, stable colour per class index (golden-ratio hues)."""
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.75, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def thumbnail(image: Image.Image, regions: Sequence[dict[str, Any]], masks: Any, size: int) -> bytes:
    """JPEG bytes of ``image`` (longest side ``size``) with each region coloured by its label: a translucent fill of
    its mask (``masks`` (K, H, W) bool, or None for box regions) and its box outline."""
    scale = size / max(image.size)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    base = image.convert("RGB").resize((w, h), Image.BILINEAR)
    if masks is not None and len(regions):
        over = np.asarray(base, dtype=np.float32).copy()
        for region, mask in zip(regions, masks):
            small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127
            over[small] = 0.55 * over[small] + 0.45 * np.asarray(class_colour(region["class_index"]), np.float32)
        base = Image.fromarray(over.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(base)
    for region in regions:
        x, y, bw, bh = region["bbox"]
        draw.rectangle([x * scale, y * scale, (x + bw) * scale - 1, (y + bh) * scale - 1],
                       outline=class_colour(region["class_index"]), width=1 if masks is None else 2)
    buf = io.BytesIO()
    base.save(buf, format="JPEG", quality=88)  # a tenth of a PNG's size: a sheet of 200 images stays a few MB
    return buf.getvalue()


_SCRIPT = """
function sortCards(key) {
  const box = document.getElementById('cards');
  const cards = Array.from(box.children);
  cards.sort((a, b) => key === 'image' ? a.dataset.order - b.dataset.order : a.dataset[key] - b.dataset[key]);
  cards.forEach(c => box.appendChild(c));
}
function sortTable(th) {
  const table = th.closest('table'), col = th.cellIndex, body = table.tBodies[0];
  const asc = th.dataset.asc !== '1'; th.dataset.asc = asc ? '1' : '0';
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    const x = a.cells[col].dataset.v ?? a.cells[col].textContent, y = b.cells[col].dataset.v ?? b.cells[col].textContent;
    const nx = parseFloat(x), ny = parseFloat(y);
    const c = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
    return asc ? c : -c;
  });
  rows.forEach(r => body.appendChild(r));
}
"""

_STYLE = """
body { font: 13px sans-serif; margin: 1em; } .card { display: inline-block; vertical-align: top; margin: 6px;
padding: 6px; border: 1px solid #ccc; } table { border-collapse: collapse; } td, th { padding: 1px 5px; }
th { cursor: pointer; background: #eee; } .low { color: #999; } .sw { display: inline-block; width: 10px;
height: 10px; margin-right: 3px; }
"""


def contact_sheet_html(title: str, cards: Sequence[dict[str, Any]], summary: dict[str, Any]) -> str:
    """The sheet's HTML. ``cards``: per image ``name``, ``jpeg`` (bytes) and ``regions`` (the proposal records:
    ``slot``, ``label``, ``class_index``, ``score``, ``route``, ``passes``, ``top``)."""
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
           f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>",
           f"<h2>{html.escape(title)}</h2><pre>{html.escape(json.dumps(summary, indent=1))}</pre>",
           "<p>Sort images by: <button onclick=\"sortCards('image')\">image</button> "
           "<button onclick=\"sortCards('minconf')\">lowest confidence first</button> "
           "<button onclick=\"sortCards('meanconf')\">mean confidence</button>; click a column to sort regions.</p>",
           "<div id='cards'>"]
    for order, card in enumerate(cards):
        scores = [r["score"] for r in card["regions"]] or [1.0]
        uri = "data:image/jpeg;base64," + base64.b64encode(card["jpeg"]).decode("ascii")
        out.append(f"<div class='card' data-order='{order}' data-minconf='{min(scores):.6f}' "
                   f"data-meanconf='{float(np.mean(scores)):.6f}'><div>{html.escape(card['name'])}</div>"
                   f"<img src='{uri}' alt='{html.escape(card['name'])}'><table><thead><tr>"
                   "<th onclick='sortTable(this)'>region</th><th onclick='sortTable(this)'>label</th>"
                   "<th onclick='sortTable(this)'>confidence</th><th onclick='sortTable(this)'>route</th>"
                   "<th>top-k</th></tr></thead><tbody>")
        for r in card["regions"]:
            colour = "#%02x%02x%02x" % class_colour(r["class_index"])
            top = ", ".join(f"{html.escape(n)} {p:.2f}" for n, p in r["top"])
            cls = "" if r["passes"] else " class='low'"
            out.append(f"<tr{cls}><td data-v='{r['slot']}'>{r['slot']}</td><td><span class='sw' "
                       f"style='background:{colour}'></span>{html.escape(r['label'])}</td>"
                       f"<td data-v='{r['score']:.6f}'>{r['score']:.3f}</td><td>{r['route']}"
                       f"{'' if r['passes'] else ' (below threshold)'}</td><td>{top}</td></tr>")
        out.append("</tbody></table></div>")
    out.append("</div></body></html>")
    return "\n".join(out)
