"""``densevlm labels propose|apply``: the teacher's region labels for review, and the reviewer's corrections."""

from __future__ import annotations

import argparse
import json

from densevlm.cli.common import add_config_args, new_parser, overrides

NAME = "labels"
HELP = ("the teacher's labels of every region for review (propose: COCO with scores, distributions, an HTML "
        "contact sheet), and a labelling tool's corrected export turned into training corrections (apply)")
PROPOSE = ("propose the teacher's top-k categories for every region of a data source (grid cells, boxes or masks "
           "from data.regions), with the thing/stuff route and the confidence check; writes proposals.coco.json "
           "(import it into CVAT, Label Studio, FiftyOne), distributions.json and contact_sheet.html into "
           "output_dir. Default: 100 images of the toy world at data/toyworld with the zoo teacher")
APPLY = ("read a labelling tool's corrected COCO export of proposals.coco.json (relabelled, deleted and added "
         "regions) and optional class rules (YAML: merge, never, synonyms); write a corrections file for "
         "`train --set teacher_targets.corrections=FILE`")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = new_parser(sub, NAME, HELP)
    tasks = p.add_subparsers(dest="labels_task", metavar="TASK", required=True)
    propose = new_parser(tasks, "propose", PROPOSE)
    add_config_args(propose, "the toy world with the zoo teacher", example="data.regions.kind=boxes "
                    "data.regions.path=props.json top_k=3")
    propose.set_defaults(fn=run_propose)
    apply = new_parser(tasks, "apply", APPLY)
    apply.add_argument("--proposals", required=True, metavar="DIR",
                       help="the folder `labels propose` wrote (its distributions.json)")
    apply.add_argument("--corrected", required=True, metavar="FILE",
                       help="the corrected COCO json exported by the labelling tool")
    apply.add_argument("--rules", metavar="FILE", default=None,
                       help="class rules YAML: merge: {X: Y}, never: [Z], synonyms: {name: class}")
    apply.add_argument("--out", required=True, metavar="FILE", help="the corrections file to write")
    apply.set_defaults(fn=run_apply)


def run_propose(args: argparse.Namespace) -> int:
    from densevlm.config import load_config
    from densevlm.config.labels import LabelsProposeConfig
    from densevlm.tasks.labels import run_propose as propose

    cfg = load_config(LabelsProposeConfig, args.config, overrides(args))
    print(json.dumps(propose(cfg), indent=2))
    return 0


def run_apply(args: argparse.Namespace) -> int:
    from densevlm.tasks.corrections import run_apply as apply

    print(json.dumps(apply(args.proposals, args.corrected, args.out, rules=args.rules), indent=2))
    return 0
