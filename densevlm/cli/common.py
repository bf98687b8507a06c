"""What every command shares: the help prose, the ``--config`` / ``--set`` arguments, a sub-parser factory."""

from __future__ import annotations

import argparse
import textwrap

# What `densevlm --help` and each command's --help tell a user (module docstrings are for developers).
USAGE = """Region-language alignment of CLIP-family models for open-vocabulary dense prediction (DenseVLM, CLIPSelf,
Talk2DINO): generate the toy world, pre-train a CLIP, tune its dense features, evaluate region classification and
training-free semantic segmentation, train an open-vocabulary detection head (detectron2), build class text
embeddings, export models for other code bases, and use or re-make the model zoo of toy CLIPs; `densevlm demo`
runs the toy pipeline from the zoo. The commands that train or evaluate read a YAML recipe (--config, see
configs/) refined by --set KEY=VALUE."""

EXIT_CODES = """exit codes: 0 done; 1 bad input (missing/unreadable file, bad data, bad checkpoint; the message names it);
2 bad config or command line (the message names the key); 75 training preempted by SIGTERM/SIGUSR1 after
writing a checkpoint (rerun the same command with --resume); 130 interrupted (Ctrl-C)."""

TRAINING = """The run directory (output_dir) gets config.yaml, weights.safetensors, metrics.json, TensorBoard logs and
checkpoints/ (every loop.checkpoint_every epochs and, with loop.checkpoint_every_steps=N, every N steps; the last
loop.keep_checkpoints kept, each with its sha256 in checkpoints/latest.json). On SIGTERM or SIGUSR1 the run finishes
its step, checkpoints and exits with 75; --resume continues it exactly (bit-identical on CPU). A non-finite loss or
gradient stops it naming the step, the batch's images and the last good checkpoint (loop.on_nonfinite=skip skips
and counts such steps)."""


def describe(text: str) -> str:
    """Paragraphs wrapped for the terminal; example lines kept whole so they can be copied."""
    # break_on_hyphens=False: names such as toy-teacher-clipself or --from-scratch stay whole (and searchable)
    return "\n".join(par if par.startswith("example") else textwrap.fill(par, 116, break_on_hyphens=False)
                     for par in text.split("\n"))


def new_parser(sub: argparse._SubParsersAction, name: str, help_text: str,
               description: str | None = None) -> argparse.ArgumentParser:
    """A command's (or a command's task's) parser with the shared epilog (exit codes) and formatting."""
    return sub.add_parser(name, help=help_text, description=describe(description or help_text), epilog=EXIT_CODES,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def add_config_args(p: argparse.ArgumentParser, default_help: str,
                    example: str = "loop.epochs=2 optim.lr=1e-5") -> None:
    p.add_argument("--config", "-c", metavar="FILE", default=None,
                   help=f"YAML config file (default: {default_help})")
    p.add_argument("--set", "-s", dest="overrides", metavar="KEY=VALUE", action="append", default=[], nargs="+",
                   help=f"override a config value, e.g. --set {example} (repeatable; an unknown key is an error "
                        "naming the closest valid one)")


def overrides(args: argparse.Namespace) -> list[str]:
    return [item for group in args.overrides for item in group]


def add_train_args(p: argparse.ArgumentParser, default: str) -> None:
    add_config_args(p, default)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in output_dir exactly where its newest good checkpoint left it (also "
                        "inside an epoch; a corrupted checkpoint is refused and the previous one used); the same "
                        "config is required")
    p.add_argument("--overwrite", action="store_true", help="delete an existing output_dir and start over")
