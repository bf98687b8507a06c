"""``densevlm app`` in a real headless Chromium driven by Playwright: the page loads, a typed class list and an
uploaded image give a segmentation image that decodes to the segmenter's own prediction for the same input, and
a server killed in the middle of a request starts again and answers.

Needs the ``playwright`` package (requirements-dev.txt) and Debian's Chromium (``apt-get install -y chromium``;
Playwright's own browser download cannot work offline). Set ``DENSEVLM_APP_SCREENSHOT=path.png`` to keep the
page's screenshot (docs/images/app_explorer.png was made so).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
INSTALL = ("install Chromium from Debian (`apt-get update && apt-get install -y chromium`, as .ci/run does) and the "
           "python package `playwright` (`pip install -r requirements-dev.txt`)")
CLASSES = ["sky", "water", "grass", "road", "sand", "car", "person", "cat"]
ROOT = Path(__file__).resolve().parents[1]

sync_api = pytest.importorskip("playwright.sync_api", reason=f"playwright is not installed: {INSTALL}")
pytest.importorskip("gradio", reason="gradio is not installed: pip install -r requirements.txt")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"{CHROMIUM} not found: {INSTALL}", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(out: Path, port: int, log: Path) -> subprocess.Popen:
    """The app as a user starts it (no model or world named), on ``port``; returns once the page answers."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "densevlm.cli", "app", "--set", f"output_dir={out}",
                             f"port={port}", "examples=2"], stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            env=env, cwd=ROOT)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"densevlm app exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"densevlm app did not answer within 180 s:\n{log.read_text()[-3000:]}")


def _expected_colours(image_path: Path) -> np.ndarray:
    """The toy student's segmentation of the image, computed here with the segmenter itself (not the app's code),
    in the palette the page draws classes with."""
    from densevlm.data.images import load_rgb
    from densevlm.data.transforms import to_tensor
    from densevlm.evaluation.semseg_figures import class_palette
    from densevlm.models import create_backbone
    from densevlm.segmenters.dense_clip import DenseCLIPSegmenter
    from densevlm.vocab import get_templates
    from densevlm.vocab.embeddings import build_text_embeddings
    from densevlm.vocab.vocabulary import ClassEntry, Vocabulary

    # Typed names are plain classes (no synonyms); the thing/stuff flag does not enter the text embeddings.
    vocabulary = Vocabulary("typed", tuple(ClassEntry(n) for n in CLASSES))
    model = create_backbone("toy-student").eval()
    text = build_text_embeddings(model, vocabulary, get_templates("short"), progress=False)
    image = load_rgb(image_path)  # 192 px: the app's image_size, so no resize on either side
    with torch.no_grad():
        logits = DenseCLIPSegmenter(model, text, vocabulary.names)(to_tensor(image, model.image_mean,
                                                                             model.image_std)[None])[0]
    return class_palette(len(CLASSES))[logits.argmax(0).numpy()]


def _segment(page, url: str, image: Path, timeout_ms: int = 90_000) -> np.ndarray:
    """Load the page, upload ``image``, type the classes, press Segment; the result image the page shows."""
    page.goto(url, wait_until="domcontentloaded")
    page.locator("#input-image input[type=file]").set_input_files(str(image))
    page.locator("#classes textarea").fill(", ".join(CLASSES))
    page.locator("#prob-class textarea").fill("sky")
    page.locator("#run").click()
    shown = page.locator("#segmentation img")
    shown.wait_for(state="visible", timeout=timeout_ms)
    body = page.request.get(shown.get_attribute("src")).body()
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))


def test_app_segments_in_chromium_and_restarts_after_a_kill(tmp_path):
    from densevlm.app.explorer import split_panels

    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    out, log = tmp_path / "app", tmp_path / "app.log"
    proc = _start(out, port, log)
    try:
        image = sorted((out / "toyworld" / "images" / "val").glob("*.jpg"))[0]
        expected = _expected_colours(image)
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.set_default_timeout(60_000)
            shown = _segment(page, url, image)
            panels = split_panels(shown, expected.shape[1])
            assert len(panels) == 2, f"two models side by side expected, the page shows {shown.shape}"
            # The base model's panel is the segmenter's prediction, pixel for pixel (PNG is lossless; a pixel may
            # differ only where two classes tie to float rounding across thread counts).
            agree = (panels[0] == expected).all(-1).mean()
            assert agree >= 0.999, f"the page's segmentation matches the segmenter's on {agree:.2%} of the pixels"
            assert "probability map of" in page.locator("#status").inner_text()
            assert page.locator("#probability img").is_visible()
            keep = os.environ.get("DENSEVLM_APP_SCREENSHOT")
            page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
            if keep:
                shutil.copy(tmp_path / "app.png", keep)

            # Kill the server in the middle of a request (a large upload: a few seconds of work), then start it
            # again on the same port: it must answer as before.
            big = tmp_path / "big.png"
            Image.open(image).resize((1600, 1600)).save(big)
            page.locator("#input-image input[type=file]").set_input_files(str(big))
            page.locator("#run").click()
            page.locator("#segmentation .pending, #status .pending, .progress-text, .eta-bar").first.wait_for(
                state="attached", timeout=30_000)
            assert proc.poll() is None, "the server stopped before it was killed"
            proc.kill()
            proc.wait(timeout=30)
            proc = _start(out, port, log)
            again = _segment(page, url, image)
            assert (split_panels(again, expected.shape[1])[0] == expected).all(-1).mean() >= 0.999
            browser.close()
    finally:
        proc.kill()
        proc.wait(timeout=30)
