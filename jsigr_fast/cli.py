"""``jsigr-fast <command> ...`` (also ``python -m jsigr_fast``).

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
only the module of the command being run is imported, so ``jsigr-fast train`` does not pay for
matplotlib and ``jsigr-fast demo`` does not pay for TensorBoard.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": ("jsigr_fast.demo", "standard vs J-SIGR on the embedded digits data: accuracy, PGD, pictures, timings"),
    "train": ("jsigr_fast.train.cli", "train a classifier with any of the defences (also under torchrun)"),
    "eval": ("jsigr_fast.evaluate", "robustness tables: clean / FGSM / PGD / transfer accuracy, Jacobian norms, rho_adv"),
    "visualize": ("jsigr_fast.visualize", "figures (.png, .pdf, .svg, ...) of input gradients, saliency, masks"),
    "check": ("jsigr_fast.selfcheck", "check this install: the fused kernels against the reference on this machine's "
                                      "CPU and GPU"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jsigr-fast", description="Gradient-based robustness regularization.")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or name == only:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if only == name:
                    raise
                p.set_defaults(_unavailable=str(exc))
                continue
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    only = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
