"""Command-line arguments generated from the typed configs, so --help and the dataclasses never drift.

Every scalar field of a nested config becomes one option named after its path: RunConfig.hsft.train.lr
is `--hsft-lr` (the `train` level is dropped: it is the stage's optimisation block), RunConfig.mining.tau
is `--mining-tau`, top-level fields keep their name (`--output-dir`). Help text comes from each field's
metadata; a field's metadata "flag" overrides the generated name. Common options also get short
aliases (`--tau`, `--hard-quantile`, `--vlm` ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, get_type_hints

_SCALARS = (int, float, str, bool)


def _unwrap_optional(tp) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _optional(parse):
    def convert(text: str):
        return None if text.strip().lower() in ("none", "null", "") else parse(text)
    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def iter_fields(cls, path: tuple[str, ...] = ()):
    """(path, field, type) of every scalar field below `cls`, depth first."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, optional = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, path + (f.name,))
        elif tp in _SCALARS:
            yield path + (f.name,), f, tp, optional


# Short spellings of the main command's most used options (both spellings work).
RUN_ALIASES = {
    "model.vlm": ["--vlm"],
    "model.sam2": ["--sam2"],
    "model.preset": ["--preset"],
    "mining.tau": ["--tau"],
    "mining.hard_quantile": ["--hard-quantile"],
    "lora.mask_loss_weight": ["--mask-loss-weight"],
}


def option_name(path: tuple[str, ...]) -> str:
    parts = [p for p in path if p != "train"]
    return "--" + "-".join(parts).replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, cls, *, skip: set[str] = frozenset(),
                         aliases: dict[str, list[str]] | None = None,
                         recipes: dict[str, dict[str, object]] | None = None) -> dict[str, tuple[str, ...]]:
    """Add one option per scalar field of `cls`; returns {argparse dest: field path}. `recipes` (name ->
    {dotted field: value}) puts each recipe's value beside the default it changes ("64; tiny recipe: 8")."""
    aliases = aliases or {}
    recipes = recipes or {}
    defaults = cls()
    dests: dict[str, tuple[str, ...]] = {}
    groups: dict[str, argparse._ArgumentGroup] = {}
    for path, f, tp, optional in iter_fields(cls):
        dotted = ".".join(path)
        if dotted in skip:
            continue
        group_name = path[0] if len(path) > 1 else "run"
        group = groups.setdefault(group_name, parser.add_argument_group(f"{group_name} options"))
        default = defaults
        for part in path:
            default = getattr(default, part)
        parse = _bool if tp is bool else tp
        if optional:
            parse = _optional(parse)
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        names = [f.metadata.get("flag", option_name(path))] + aliases.get(dotted, [])
        dest = dotted.replace(".", "__")
        # A bare boolean flag means true (`--resume`); `--resume false` also works.
        extra = {"nargs": "?", "const": True} if tp is bool else {}
        shown = str(default) + "".join(f"; {name} recipe: {values[dotted]}" for name, values in recipes.items()
                                       if dotted in values and values[dotted] != default)
        group.add_argument(*names, dest=dest, type=parse, default=argparse.SUPPRESS, **extra,
                           metavar=tp.__name__.upper() if tp is not bool else "BOOL",
                           help=f"{help_text} (default: {shown.replace('%', '%%')})")
        dests[dest] = path
    return dests


def apply_arguments(cfg, namespace: argparse.Namespace, dests: dict[str, tuple[str, ...]]):
    """A copy of `cfg` with every option the user gave written into its field."""
    changes: dict[tuple[str, ...], Any] = {dests[k]: v for k, v in vars(namespace).items() if k in dests}
    return _replace(cfg, changes, ())


def _replace(obj, changes: dict[tuple[str, ...], Any], prefix: tuple[str, ...]):
    updates = {}
    for f in dataclasses.fields(obj):
        path = prefix + (f.name,)
        value = getattr(obj, f.name)
        if path in changes:
            updates[f.name] = changes[path]
        elif dataclasses.is_dataclass(value) and any(p[:len(path)] == path for p in changes):
            updates[f.name] = _replace(value, changes, path)
    return dataclasses.replace(obj, **updates)
