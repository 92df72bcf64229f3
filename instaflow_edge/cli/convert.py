"""``instaflow-edge convert TARGET MODEL -o OUT [options]``: one subcommand per registered target.

A target's command line is its options dataclass (``convert.config.options_class``): each field is an
option (``--field-name``, or the spelling its metadata gives), an enum field takes that enum's values
(refused with the package's one-line message, which lists them), a list field is repeatable, a dict field
takes ``NAME=VALUE`` pairs, a bool field is a flag; the help text is the field's. The options every target
shares (``SHARED``: ConvertConfig's) come first. So a new target's options reach the command line with no
edit here. ``convert MODEL --target T ...`` (the older spelling) is the same command; an option that
another target takes but T does not is refused by name.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from pathlib import Path

import typer

from ..convert.config import ConvertConfig, options_class, target_name, target_names
from ..errors import InputError
from ..validators import choice

# the options every target shares: (flag, ConvertConfig field, type, help)
SHARED = (
    ("--force", "force", bool, "Overwrite OUTPUT if it exists."),
    ("--fused", "fused", bool, "Also export the whole one-step generator (token ids + noise → image) as one model "
                               "(ONNX; Core ML with --layout native)."),
    ("--height", "height", int, "Image height (default: the model's)."),
    ("--width", "width", int, "Image width (default: the model's)."),
    ("--min-psnr", "min_psnr", float, "Parity gate in dB vs the PyTorch fp32 reference (default: the scheme's, see the manifest)."),
    ("--allow-pickle", "allow_pickle", bool, "Allow pickle (.bin) weights; only for sources you trust."),
)
HELP = ("Export the one-step generator (text encoder, UNet+Euler step, VAE decoder) with parity gates: "
        "`convert TARGET MODEL -o OUT` (or `convert MODEL --target TARGET -o OUT`); `convert TARGET --help` lists "
        "the target's options.")


@dataclasses.dataclass(frozen=True)
class Opt:
    flag: str
    field: str
    kind: type             # bool, int, float, str, list, dict, or an Enum class
    help: str
    default: object = None
    shared: bool = False


def _base(tp):
    """``X | None`` → X; ``list[str]`` → list; ``dict | None`` → dict."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if type(None) in typing.get_args(tp) and len(args) == 1:
        tp = args[0]
    return typing.get_origin(tp) or tp


def options_of(target: str) -> list[Opt]:
    """The command-line options of ``convert TARGET``: the shared ones, then the options dataclass's fields."""
    cls = options_class(target)
    hints = typing.get_type_hints(cls)
    out = [Opt(flag, field, kind, h, None if kind is not bool else False, True) for flag, field, kind, h in SHARED]
    for f in dataclasses.fields(cls):
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        out.append(Opt(flag, f.name, _base(hints[f.name]), f.metadata.get("help", ""), f.default))
    return out


def _value(o: Opt, raw: str):
    if isinstance(o.kind, type) and issubclass(o.kind, enum.Enum):
        return choice(o.flag[2:].replace("-", "_"), raw, o.kind)
    if o.kind in (int, float):
        try:
            return o.kind(raw)
        except ValueError:
            raise InputError(f"{o.flag} {raw!r} is not {'an integer' if o.kind is int else 'a number'}",
                             f"pass {o.flag} N") from None
    if o.kind is dict:
        k, sep, v = raw.partition("=")
        if not sep or not k.strip():
            raise InputError(f"{o.flag} {raw!r} is not NAME=VALUE", f"pass e.g. {o.flag} group_size=32")
        return (k.strip(), v.strip())
    return raw


def parse(target: str, args: list[str]) -> tuple[str, str, dict, dict]:
    """``MODEL -o OUT [options]`` of ``convert TARGET`` → (model, output, shared fields, options fields)."""
    opts = {o.flag: o for o in options_of(target)}
    model = output = None
    shared, own = {}, {}
    i = 0
    while i < len(args):
        a = args[i]
        flag, eq, inline = a.partition("=") if a.startswith("--") else (a, "", "")
        if flag in ("-o", "--output"):
            if not (eq or i + 1 < len(args)):
                raise InputError(f"{flag} needs a folder", f"pass {flag} OUT")
            output, i = (inline, i + 1) if eq else (args[i + 1], i + 2)
            continue
        if flag.startswith("-"):
            o = opts.get(flag)
            if o is None:
                others = [t for t in target_names() if t != target and any(p.flag == flag for p in options_of(t))]
                if others:
                    raise InputError(f"{flag} does not apply to --target {target}", "drop the option or change --target")
                raise InputError(f"no such option {flag} for convert {target}", f"see `instaflow-edge convert {target} --help`")
            into = shared if o.shared else own
            if o.kind is bool:
                into[o.field], i = True, i + 1
                continue
            if not eq and i + 1 >= len(args):
                raise InputError(f"{flag} needs a value", f"see `instaflow-edge convert {target} --help`")
            raw, i = (inline, i + 1) if eq else (args[i + 1], i + 2)
            v = _value(o, raw)
            if o.kind is list:
                into.setdefault(o.field, []).append(v)
            elif o.kind is dict:
                into.setdefault(o.field, {})[v[0]] = v[1]
            else:
                into[o.field] = v
            continue
        if model is not None:
            raise InputError(f"unexpected argument {a!r}", f"convert {target} takes one MODEL")
        model, i = a, i + 1
    if model is None:
        raise InputError(f"convert {target}: no MODEL given", "pass a pipeline folder or hub id")
    if output is None:
        raise InputError(f"convert {target}: no output folder given", "pass -o OUT")
    return model, output, shared, own


def help_text(target: str | None) -> str:
    if target is None:
        lines = [HELP, "", "Targets:"]
        for t in target_names():
            doc = " ".join(ln.strip() for ln in (options_class(t).__doc__ or "").strip().split("\n\n")[0].splitlines())
            lines.append(f"  {t:<10} {doc}")
        return "\n".join(lines)
    cls = options_class(target)
    doc = " ".join(ln.strip() for ln in (cls.__doc__ or "").strip().splitlines())
    lines = [f"Usage: instaflow-edge convert {target} MODEL -o OUT [OPTIONS]", "", doc.replace("``", "`"), "",
             "  -o, --output OUT".ljust(30) + "Output folder (required)."]
    for o in options_of(target):
        if isinstance(o.kind, type) and issubclass(o.kind, enum.Enum):
            arg = "[" + "|".join(m.value for m in o.kind) + "]"
        else:
            arg = {bool: "", int: "N", float: "X", list: "NAME", dict: "NAME=VALUE"}.get(o.kind, "TEXT")
        default = o.default.value if isinstance(o.default, enum.Enum) else o.default
        tail = f" (default: {default})" if default not in (None, False) else ""
        head = f"  {o.flag} {arg}".rstrip()
        lines += [head.ljust(30) + f"{o.help}{tail}"] if len(head) < 30 else [head, " " * 30 + f"{o.help}{tail}"]
    return "\n".join(lines)


def run(target: str, model: str, output: str, shared: dict, own: dict) -> None:
    """Build the config, export, print the parity table (stdout) and notes (stderr)."""
    from ..convert import export
    from ..parity import PsnrError, format_table

    cls = options_class(target)
    cfg = ConvertConfig(model=model, output=output, options=cls(**own), **shared)
    try:
        manifest = export(cfg)
    except PsnrError as e:
        if e.rows and not getattr(cls, "own_report", False):  # the whole table, then the one-line error naming every miss
            typer.echo(format_table(e.rows, e.gates))
        raise
    if getattr(cls, "own_report", False):  # Core ML's report: per package, with sizes
        from ..convert.coreml_check import format_report

        typer.echo(format_report(manifest["report"], manifest["gate"]["min_psnr"]), err=True)
        typer.echo(format_table([], None, manifest["conditioning"]).splitlines()[-1], err=True)
        return
    typer.echo(format_table(manifest["parity"], manifest["gates"], manifest.get("conditioning")))
    note = getattr(cls, "after", None)  # what to do with the output, where the target says (web: serve it)
    if note:
        typer.echo(note.format(output=output), err=True)


def legacy_argv(argv: list[str]) -> list[str]:
    """``convert MODEL [--target T] ...`` → ``convert T MODEL ...`` (T defaults to onnx); other argv
    unchanged."""
    if len(argv) < 2 or argv[0] != "convert" or argv[1] in target_names() or argv[1] in ("-h", "--help"):
        return argv
    rest, target = [], "onnx"
    i = 1
    while i < len(argv):
        a = argv[i]
        if a in ("--target", "-t") and i + 1 < len(argv):
            target, i = argv[i + 1], i + 2
            continue
        if a.startswith("--target="):
            target, i = a.split("=", 1)[1], i + 1
            continue
        rest.append(a)
        i += 1
    target_name(target)  # an unknown target lists the known ones
    return ["convert", target, *rest]


def convert_command(ctx: typer.Context) -> None:
    """Export the one-step generator with parity gates: `convert TARGET MODEL -o OUT` (`convert TARGET --help`)."""
    args = list(ctx.args)
    if not args or args[0] in ("-h", "--help"):
        typer.echo(help_text(None))
        return
    target = args[0]
    target_name(target)  # unknown: one line listing the targets
    if any(a in ("-h", "--help") for a in args[1:]):
        typer.echo(help_text(target))
        return
    model, output, shared, own = parse(target, args[1:])
    run(target, model, str(Path(output)), shared, own)


CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}
