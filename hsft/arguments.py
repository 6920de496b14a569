"""Command-line arguments generated from the typed configs, so --help and the dataclasses never drift.

Every scalar field of a nested config has a dotted *key*, its path (`hsft.train.lr`, `mining.tau`,
`output_dir`); recipes, study overrides and `--set KEY=VALUE` all name fields by that key. A field a
command shows as an option is named after its path: RunConfig.hsft.train.lr is `--hsft-lr` (the
`train` level is dropped: it is the stage's optimisation block), RunConfig.mining.tau is `--mining-tau`,
top-level fields keep their name (`--output-dir`). Help text comes from each field's metadata ("brief"
if set, else "help"); a field's metadata "flag" overrides the generated name. Common options also get
short aliases (`--tau`, `--vlm` ...).

A command may show only some fields as options (`options=`): the rest stay settable with
`--set KEY=VALUE` and are listed, with their help, by `--help-all`. A *shared* setting (`Shared`) is one
key that writes the same value into several fields, e.g. `train.weight_decay` into every training
stage's weight decay; a field's own option or key, given too, wins over the shared one.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from typing import Any, get_type_hints

__all__ = ["Shared", "iter_fields", "option_name", "add_config_arguments", "apply_arguments", "settable_keys",
           "resolve_key", "RUN_ALIASES", "SET_DEST"]

_SCALARS = (int, float, str, bool)
# The argparse destination of --set: a list of (field paths, value).
SET_DEST = "settings"


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


def _converter(tp, optional: bool):
    parse = _bool if tp is bool else tp
    return _optional(parse) if optional else parse


def iter_fields(cls, path: tuple[str, ...] = ()):
    """(path, field, type, optional) of every scalar field below `cls`, depth first."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, optional = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, path + (f.name,))
        elif tp in _SCALARS:
            yield path + (f.name,), f, tp, optional


@dataclasses.dataclass(frozen=True)
class Shared:
    """One setting written into several fields: `key` (e.g. "train.weight_decay", also its option
    --train-weight-decay) sets every field in `fields` (dotted keys) to the same value."""

    key: str
    fields: tuple[str, ...]
    help: str

    @property
    def option(self) -> str:
        return "--" + self.key.replace(".", "-").replace("_", "-")


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


@dataclasses.dataclass(frozen=True)
class _Field:
    path: tuple[str, ...]
    field: dataclasses.Field
    type: type
    optional: bool

    @property
    def key(self) -> str:
        return ".".join(self.path)

    @property
    def option(self) -> str:
        return self.field.metadata.get("flag", option_name(self.path))


def _fields(cls) -> dict[str, _Field]:
    return {".".join(path): _Field(path, f, tp, optional) for path, f, tp, optional in iter_fields(cls)}


def settable_keys(cls, shared: tuple[Shared, ...] = ()) -> list[str]:
    """Every key `--set` accepts for `cls`: each scalar field's dotted path, then the shared settings."""
    return list(_fields(cls)) + [s.key for s in shared]


def resolve_key(cls, key: str, shared: tuple[Shared, ...] = ()) -> tuple[tuple[str, ...], Any]:
    """(the field paths `key` sets, the value parser) for a --set key; raises ValueError naming the closest key.
    A stage's training field may be named without its `train` level, as errors name it (`hsft.lr`)."""
    fields = _fields(cls)
    by_key = {s.key: s for s in shared}
    if key in by_key:
        targets = [fields[name] for name in by_key[key].fields]
        return tuple(t.path for t in targets), _converter(targets[0].type, targets[0].optional)
    head, _, rest = key.partition(".")
    for name in (key, f"{head}.train.{rest}" if rest else None):
        if name in fields:
            target = fields[name]
            return (target.path,), _converter(target.type, target.optional)
    near = difflib.get_close_matches(key, list(fields) + list(by_key), n=1, cutoff=0.5)
    raise ValueError(f"unknown key {key!r}" + (f"; did you mean {near[0]}?" if near else "; --help-all lists the keys"))


def _default(defaults, path: tuple[str, ...]):
    value = defaults
    for part in path:
        value = getattr(value, part)
    return value


def _shown_default(defaults, recipes: dict[str, dict[str, object]], key: str, path: tuple[str, ...]) -> str:
    default = _default(defaults, path)
    return str(default) + "".join(f"; {name} recipe: {values[key]}" for name, values in recipes.items()
                                  if key in values and values[key] != default)


def _shared_default(defaults, recipes, setting: Shared) -> str:
    shown = {name: _shown_default(defaults, recipes, name, tuple(name.split("."))) for name in setting.fields}
    if len(set(shown.values())) == 1:
        return next(iter(shown.values()))
    return ", ".join(f"{name.split('.')[0]} {value.replace('; ', ' (').replace(' recipe:', ':')}"
                     + (")" if "; " in value else "") for name, value in shown.items())


def _help_all(cls, shared: tuple[Shared, ...], recipes: dict[str, dict[str, object]], options: dict[str, str]) -> str:
    """Every key with its default and help; a key that is also an option of the command names it."""
    defaults = cls()
    lines = ["Every setting, as --set KEY=VALUE; recipes and the study's tables name fields by the same keys. "
             "[--x]: also the option --x.", ""]
    for key, target in _fields(cls).items():
        option = f" [{options[key]}]" if key in options else ""
        lines.append(f"  {key} = {_shown_default(defaults, recipes, key, target.path)}{option}  : "
                     + target.field.metadata.get("help", ""))
    for setting in shared:
        option = f" [{setting.option}]" if setting.key in options else ""
        lines.append(f"  {setting.key} = {_shared_default(defaults, recipes, setting)}{option}  : {setting.help} "
                     f"(sets {', '.join(setting.fields)})")
    return "\n".join(lines) + "\n"


class _HelpAll(argparse.Action):
    def __init__(self, option_strings, dest, text, **kwargs):
        self.text = text
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser._print_message(self.text, sys.stdout)
        parser.exit()


def add_config_arguments(parser: argparse.ArgumentParser, cls, *, skip: set[str] = frozenset(),
                         aliases: dict[str, list[str]] | None = None,
                         recipes: dict[str, dict[str, object]] | None = None,
                         options: tuple[str, ...] | None = None, shared: tuple[Shared, ...] = (),
                         groups: dict[str, str] | None = None) -> dict[str, object]:
    """Add the options of `cls`'s fields; returns {argparse dest: field path or Shared} for apply_arguments.

    `options` (dotted keys, in order; None: every scalar field) are the fields and shared settings shown as
    options; with it, `--set KEY=VALUE` reaches every other field and `--help-all` lists them all, and an old
    per-field option name gives one line naming its --set form (Parser.error). `recipes` (name -> {key: value})
    puts each recipe's value beside the default it changes ("64; tiny recipe: 8"). `groups` titles the option
    groups by the key's first part (e.g. {"hsft": "HSFT (stage 3) ..."}), in that order."""
    aliases = aliases or {}
    recipes = recipes or {}
    defaults = cls()
    fields = {k: v for k, v in _fields(cls).items() if k not in skip}
    by_key = {s.key: s for s in shared}
    wanted = list(fields) if options is None else [k for k in options if k not in skip]
    unknown = [k for k in wanted if k not in fields and k not in by_key]
    if unknown:
        raise ValueError(f"add_config_arguments: no field or shared setting {unknown}")

    def group_name(key: str) -> str:
        return key.split(".")[0] if "." in key else "run"

    titles = groups or {}
    used = list(dict.fromkeys(group_name(k) for k in wanted))
    order = [n for n in titles if n in used] + [n for n in used if n not in titles]
    made = {n: parser.add_argument_group(titles.get(n, f"{n} options")) for n in order}

    dests: dict[str, object] = {}
    for key in wanted:
        group = made[group_name(key)]
        if key in by_key:
            setting = by_key[key]
            first = fields[setting.fields[0]]
            help_text = f"{setting.help} (default: {_shared_default(defaults, recipes, setting)})"
            dest = "shared__" + key.replace(".", "__")
            group.add_argument(setting.option, dest=dest, type=_converter(first.type, first.optional),
                               default=argparse.SUPPRESS, metavar=first.type.__name__.upper(),
                               help=help_text.replace("%", "%%"))
            dests[dest] = setting
            continue
        target = fields[key]
        metadata = target.field.metadata
        help_text = metadata.get("brief", metadata.get("help", ""))
        names = [target.option] + aliases.get(key, [])
        dest = key.replace(".", "__")
        # A bare boolean flag means true (`--resume`); `--resume false` also works.
        extra = {"nargs": "?", "const": True} if target.type is bool else {}
        shown = _shown_default(defaults, recipes, key, target.path)
        group.add_argument(*names, dest=dest, type=_converter(target.type, target.optional),
                           default=argparse.SUPPRESS, **extra,
                           metavar=target.type.__name__.upper() if target.type is not bool else "BOOL",
                           help=f"{help_text} (default: {shown})".replace("%", "%%"))
        dests[dest] = target.path
    if options is not None:
        _add_set(made.get("run", parser), parser, cls, fields, shared, recipes, shown=set(wanted))
    return dests


def _add_set(group, parser, cls, fields: dict[str, _Field], shared: tuple[Shared, ...], recipes,
             shown: set[str]) -> None:
    """--set and --help-all, in `group`; records on `parser` the option names that became --set keys."""
    def setting(text: str):
        key, sep, value = text.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
        try:
            paths, parse = resolve_key(cls, key.strip(), shared)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        try:
            return paths, parse(value.strip())
        except (ValueError, argparse.ArgumentTypeError) as error:
            raise argparse.ArgumentTypeError(f"{key.strip()}: {error}") from None

    setting.__name__ = "KEY=VALUE"
    group.add_argument("--set", dest=SET_DEST, action="append", type=setting, default=argparse.SUPPRESS,
                       metavar="KEY=VALUE",
                       help="set any config field by its dotted key (e.g. base.referring=true); repeatable")
    options = {key: f.option for key, f in fields.items() if key in shown}
    options.update({s.key: s.option for s in shared if s.key in shown})
    group.add_argument("--help-all", action=_HelpAll, text=_help_all(cls, shared, recipes, options),
                       help="list every key --set accepts, with its default and help, and exit")
    # An option name a field would have had, but is no option here: Parser.error names its --set form.
    moved = {f.option: key for key, f in fields.items() if key not in shown}
    moved.update({s.option: s.key for s in shared if s.key not in shown})
    parser.moved_options = {**getattr(parser, "moved_options", {}), **moved}


def apply_arguments(cfg, namespace: argparse.Namespace, dests: dict[str, object]):
    """A copy of `cfg` with every option the user gave written into its field: shared settings first, then
    each field's own option, then the --set values in the order given."""
    given = vars(namespace)
    changes: dict[tuple[str, ...], Any] = {}
    for dest, target in dests.items():
        if dest in given and isinstance(target, Shared):
            for key in target.fields:
                changes[tuple(key.split("."))] = given[dest]
    for dest, target in dests.items():
        if dest in given and not isinstance(target, Shared):
            changes[target] = given[dest]
    for paths, value in given.get(SET_DEST) or ():
        for path in paths:
            changes[path] = value
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
