#!/usr/bin/env python
"""Make the OV-COCO annotation files (48 base / 17 novel categories) from COCO 2017's instances jsons.

The split of the OV detection literature (OVR-CNN's ``instances_train2017_seen_2.json`` /
``instances_val2017_all_2.json``; ViLD, Detic, F-ViT): 65 of COCO's 80 categories. The training file keeps the base
categories' annotations only (every image stays; novel objects in it are unlabelled), the validation file keeps all
65. Both are written atomically into ``<coco>/annotations/``, where ``configs/det/fvit_ovcoco_eva02_b16.yaml``
expects them:

    python tools/make_ovcoco_annotations.py --coco datasets/coco
    # -> annotations/instances_train2017_ovcoco_base.json, annotations/instances_val2017_ovcoco_all.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from densevlm.integrations.detectron2.datasets import OVCOCO_TRAIN_JSON, OVCOCO_VAL_JSON, make_ovcoco_annotations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coco", default="datasets/coco", help="COCO root holding annotations/instances_*2017.json")
    parser.add_argument("--out", default=None, help="output folder (default: <coco>/annotations)")
    args = parser.parse_args()
    ann = Path(args.coco) / "annotations"
    out = Path(args.out) if args.out else ann
    report = {}
    for src, dst, base_only in (("instances_train2017.json", OVCOCO_TRAIN_JSON, True),
                                ("instances_val2017.json", OVCOCO_VAL_JSON, False)):
        report[dst] = make_ovcoco_annotations(ann / src, out / dst, base_only=base_only)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
