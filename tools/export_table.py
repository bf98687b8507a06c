#!/usr/bin/env python
"""Layout x model family: the round-trip max difference of every export, and its consumer's own check.

For each family (random-init models of the real architectures, small configs; and the golden reference checkpoint)
and each layout, the model is exported, read back through the layout's reader and compared (dense map at the native
size and at 1.5x, image and text embeddings: the max abs difference is reported), or the refusal is reported. The
consumer checks are run where the consumer's loading code is available offline:

* ``open_clip``: ``open_clip.add_model_config(<export>.json)`` + ``create_model(name, pretrained=file)`` (strict);
* ``local-dir``: ``open_clip.create_model("local-dir:<dir>")``;
* ``openai``: OpenAI CLIP's ``build_model`` (PyPI clip-anytorch, strict), on fp16-exact weights;
* ``eva_reference``: the golden reference file written back bit for bit (the reference code is not on PyPI).

Prints one JSON object.

    python tools/export_table.py
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import open_clip
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from densevlm.models import ModelSpec, create_backbone, export_model  # noqa: E402
from densevlm.models.export_check import verify_export  # noqa: E402
from densevlm.models.layouts import LAYOUTS, writable_layouts  # noqa: E402

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
GOLDEN_ROW = "EVA02 golden reference checkpoint (CLIPSelf/DenseVLM format)"
QUICKGELU_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "head_width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 16, "width": 64, "heads": 1, "layers": 2},
}


def _families() -> dict[str, Any]:
    torch.manual_seed(0)
    fams = {
        "open_clip ViT, GELU (ToyCLIP-ViT-T-16)": create_backbone("ToyCLIP-ViT-T-16"),
        "OpenAI ViT, QuickGELU (ViT-B-16-quickgelu, small)": create_backbone(
            ModelSpec(name="ViT-B-16-quickgelu", model_overrides=QUICKGELU_VIT)),
        "EVA02 (EVA02-Ti-16-golden, random)": create_backbone("EVA02-Ti-16-golden"),
    }
    if GOLDEN.is_dir():
        fams[GOLDEN_ROW] = create_backbone(ModelSpec(
            name=str(GOLDEN / "EVA02-CLIP-tiny-16.json"), pretrained=str(GOLDEN / "densevlm_fork_tiny_eva.pt")))
    return fams


def _consumer(model, layout: str, out: Path) -> dict[str, Any]:
    images = torch.randn(1, 3, model.native_image_size, model.native_image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.clip.encode_image(images)
        if layout == "open_clip":
            open_clip.add_model_config(out.with_suffix(".json"))
            theirs = open_clip.create_model(out.stem, pretrained=str(out)).eval().encode_image(images)
            return {"check": "open_clip create_model(name, pretrained=file), strict", "max_abs_diff": (theirs - ours).abs().max().item()}
        if layout == "local-dir":
            theirs = open_clip.create_model(f"local-dir:{out}").eval().encode_image(images)
            return {"check": "open_clip create_model('local-dir:...')", "max_abs_diff": (theirs - ours).abs().max().item()}
        if layout == "openai":
            spec = importlib.util.find_spec("clip")
            if spec is None:
                return {"check": "OpenAI build_model", "skipped": "clip-anytorch not installed"}
            path = Path(list(spec.submodule_search_locations)[0]) / "model.py"
            mspec = importlib.util.spec_from_file_location("openai_clip_model", path)
            module = importlib.util.module_from_spec(mspec)
            mspec.loader.exec_module(module)
            theirs = module.build_model(torch.load(out, weights_only=True)).float().eval().encode_image(images)
            return {"check": "OpenAI build_model (clip-anytorch), strict; its fp16 cast rounds the weights",
                    "max_abs_diff": (theirs - ours).abs().max().item()}
    return {"check": "reference layout: see the golden bit-for-bit row"}


def main() -> None:
    torch.set_num_threads(2)
    result: dict[str, Any] = {"torch": torch.__version__, "open_clip": open_clip.__version__, "table": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for family, model in _families().items():
            row: dict[str, Any] = {}
            for layout in LAYOUTS:
                out = Path(tmp) / f"{abs(hash(family))}_{layout.replace('-', '_')}{'' if layout == 'local-dir' else '.pt'}"
                if layout not in writable_layouts(model):
                    row[layout] = {"refused": True}
                    continue
                export_model(model, layout, out)
                cell = {"round_trip_max_abs_diff": max(verify_export(model, layout, out).values())}
                if family != GOLDEN_ROW:
                    cell["consumer"] = _consumer(model, layout, out)
                elif layout == "eva_reference":
                    ref = torch.load(GOLDEN / "densevlm_fork_tiny_eva.pt", weights_only=True)["state_dict"]
                    ours = torch.load(out, weights_only=True)["state_dict"]
                    ref = {k[len("module."):]: v for k, v in ref.items()}
                    cell["consumer"] = {"check": "golden reference file written back",
                                        "bit_for_bit": list(ref) == list(ours) and all(torch.equal(ref[k], ours[k]) for k in ref)}
                row[layout] = cell
            result["table"][family] = row
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
