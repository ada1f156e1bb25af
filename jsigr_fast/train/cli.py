"""``jsigr-fast train`` (also ``python -m jsigr_fast train`` and ``torchrun ... -m jsigr_fast train``).

Every key of :class:`~jsigr_fast.train.config.TrainConfig` is a flag ``--key-name VALUE`` and a
key of the ``--config`` file; flags override the file. Booleans take a value (``--channels-last
true``; a bare ``--channels-last`` means true), lists take several values or one comma-separated
string, ``--model-arg KEY=VALUE`` (repeatable) fills ``model_args``. See docs/TRAINING.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings

from .config import _GROUPS, FIELDS, build_config, load_config_file, resolve, to_dict
from .errors import ConfigError, TrainError

__all__ = ["add_arguments", "run"]

_METAVAR = {"int": "N", "float": "X", "bool": "BOOL", "str": "S", "list_int": "N", "list_float": "X"}
_PATHS = {"out": "DIR", "data_root": "DIR", "init_from": "CKPT", "teacher": "CKPT"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of config keys (flags override it)")
    p.add_argument("--resume", nargs="?", const="last", metavar="CKPT",
                   help="continue a run exactly: a checkpoint, a run folder, nothing (<out>/last.pt) or 'auto' "
                        "(resume if <out>/last.pt exists, else start)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out folder that holds a run (its last.pt is replaced, its logs cleared); "
                        "without it (or --resume) such a folder is refused. With --resume CKPT --out DIR: let the "
                        "resumed run replace the other run DIR holds")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    groups = {g: p.add_argument_group(g) for g in _GROUPS}
    for name, f in FIELDS.items():
        meta = f.metadata
        flag = "--" + name.replace("_", "-")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = meta["help"]
        if meta["choices"] and not all(c in help_text for c in meta["choices"]):
            help_text += f" [{' | '.join(meta['choices'])}]"
        help_text += f" (default: {default})" if default not in (None, {}, []) else ""
        g = groups[meta["group"]]
        if meta["kind"] == "dict":
            g.add_argument("--model-arg", dest=name, action="append", metavar="KEY=VALUE", default=argparse.SUPPRESS,
                           help=meta["help"] + " (repeatable; VALUE is read as YAML)")
        elif meta["kind"] == "bool":
            g.add_argument(flag, dest=name, nargs="?", const="true", metavar="BOOL", default=argparse.SUPPRESS,
                           help=help_text)
        elif meta["kind"].startswith("list"):
            g.add_argument(flag, dest=name, nargs="+", metavar=_METAVAR[meta["kind"]], default=argparse.SUPPRESS,
                           help=help_text)
        else:
            g.add_argument(flag, dest=name, metavar=_PATHS.get(name, _METAVAR[meta["kind"]]),
                           default=argparse.SUPPRESS, help=help_text)


def _model_args(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--model-arg takes KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--model-arg {item!r}: cannot read the value: {exc}") from None
    return out


def parse(args: argparse.Namespace):
    """``(config, explicitly set keys)`` from parsed arguments and the --config file."""
    file_values = load_config_file(args.config) if args.config else {}
    flags = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    if "model_args" in flags:
        flags["model_args"] = _model_args(flags["model_args"])
    return build_config(file_values, flags, file_source=args.config or "config file")


def _rank_tag() -> str:
    """``"[rank N] "`` on a torchrun rank other than 0, else ``""``.

    Under torchrun every rank runs this CLI and prints its own errors, so the same line appears
    once per rank. Rank 0's line stays as it would be in a single process; the others are tagged
    rather than dropped: before the process group is joined a rank cannot know whether rank 0 failed
    the same way (each node reads its own config file, checkpoint, data), and dropping a line that
    differs would hide the one failure that matters. Read from torchrun's environment (as
    :func:`jsigr_fast.train.distributed.setup` does), since the error may come before the group
    exists or after it was torn down."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:  # not torchrun's values: print plain lines rather than fail while reporting
        return ""
    return f"[rank {rank}] " if world > 1 and rank != 0 else ""


def run(args: argparse.Namespace) -> int:
    from .trainer import train

    tag = _rank_tag()

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{tag}jsigr-fast train: warning: {message}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        try:
            cfg, explicit = parse(args)
            if args.print_config:
                import yaml

                print(yaml.safe_dump(to_dict(resolve(cfg)), sort_keys=False), end="")
                return 0
            return train(cfg, resume=args.resume, overwrite=args.overwrite, explicit=explicit)
        except TrainError as exc:
            print(f"{tag}jsigr-fast train: error: {exc}", file=sys.stderr, flush=True)
            return exc.exit_code  # the same on every rank, tagged or not
