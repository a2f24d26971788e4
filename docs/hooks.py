"""mkdocs hooks: reference pages generated from the code at build time.

A page holds a marker line ``<!-- generated: NAME -->`` where the generated
markdown goes, so the hand-written prose around it stays in the page:

- ``cli``: the ``--help`` of every ``smartscope`` command (the typer app,
  formatted without rich, as plain click help);
- ``experiment``: every section of the experiment file, from the pydantic
  models of `smartscope.experiment` (key, type, default, description);
- ``include PATH``: a file of the repository (a demo experiment, a config)
  as a code block, or a markdown file (the model card) as it is;
- ``segmenters`` / ``policies``: the parameters of every built-in segmenter and
  policy, from their pydantic models (descriptions from ``Field(description=)``
  or the class docstring's numpy ``Parameters`` section).

``reference/experiment.schema.json`` (``Experiment.model_json_schema()``) is
added to the site as a file, for editors that validate YAML, and
``demos/gui_screenshot.png`` as ``images/gui_screenshot.png``.
"""

from __future__ import annotations

import json
import re
import types
import typing
import warnings
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File

MARKER = re.compile(r"^<!-- generated: ([a-z-]+)(?: (\S+))? -->$", re.MULTILINE)
ROOT = Path(__file__).resolve().parents[1]
SCHEMA_URI = "reference/experiment.schema.json"
IMAGES = {"images/gui_screenshot.png": "demos/gui_screenshot.png"}


# ---------------------------------------------------------------------- hooks
def on_files(files: Any, config: Any) -> Any:
    """Add the experiment's JSON schema and pictures kept outside docs/."""
    from smartscope.experiment import Experiment

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # defaults JSON cannot hold (inf)
        schema = Experiment.model_json_schema()
    files.append(
        File.generated(config, SCHEMA_URI, content=json.dumps(schema, indent=2))
    )
    for uri, source in IMAGES.items():  # pictures kept elsewhere in the repository
        files.append(File.generated(config, uri, abs_src_path=str(ROOT / source)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace each ``<!-- generated: NAME [ARG] -->`` line of a page."""

    def replace(m: re.Match[str]) -> str:
        name, arg = m.group(1), m.group(2)
        if name == "include":  # a file of the repository, as a code block
            path = ROOT / arg
            if not path.is_file():
                raise ValueError(f"{page.file.src_uri}: no file {arg} to include")
            text = path.read_text(encoding="utf-8").rstrip()
            if path.suffix == ".md":  # a page kept beside the code it describes
                return text
            lang = {".yaml": "yaml", ".cfg": "text", ".py": "python"}[path.suffix]
            return f'```{lang} title="{arg}"\n{text}\n```'
        if name not in GENERATORS:
            raise ValueError(f"{page.file.src_uri}: unknown generated section {name!r}")
        return GENERATORS[name]()

    return MARKER.sub(replace, markdown)


# ------------------------------------------------------------------------ CLI
def cli_reference() -> str:
    """Every command's plain ``--help``, one section per command."""
    import typer
    import typer._click as click

    from smartscope.cli import app

    out: list[str] = []

    def walk(cmd: Any, path: list[str]) -> None:
        cmd.rich_markup_mode = None  # plain click help, markup kept verbatim
        ctx = click.Context(
            cmd, info_name=" ".join(path), terminal_width=88, max_content_width=88
        )
        title = " ".join(path)
        level = "#" * min(len(path) + 1, 4)
        out.append(f"{level} `{title}`\n\n```text\n{cmd.get_help(ctx).rstrip()}\n```\n")
        if hasattr(cmd, "list_commands"):
            for name in cmd.list_commands(ctx):
                walk(cmd.get_command(ctx, name), [*path, name])

    walk(typer.main.get_command(app), ["smartscope"])
    return "\n".join(out)


# ----------------------------------------------------------------- experiment
def _named_types() -> dict[Any, str]:
    """Aliases shown by name (explained under "Value types")."""
    from smartscope.policies._features import Criterion

    return {Criterion: "Criterion"}


def _type_name(annotation: Any) -> str:
    """A readable type: ``float | None``, ``"plan" | "nearest"``, ``list[...]``."""
    for alias, name in _named_types().items():
        if annotation == alias:
            return name
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is type(None):
        return "None"
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type_name(a) for a in args)}]"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _default(info: Any) -> str:
    from pydantic_core import PydanticUndefined

    if info.default_factory is not None:
        try:
            value = info.default_factory()
        except TypeError:  # a factory that takes the validated data
            return ""
    elif info.default is PydanticUndefined:
        return "*required*"
    else:
        value = info.default
    value = _plain(value)
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "`inf`" if value > 0 else "`-inf`"
    text = json.dumps(value, default=str, ensure_ascii=False)
    text = re.sub(r'"(\w+)": ', r"\1: ", text)  # YAML-ish keys
    return f"`{text}`"


def _plain(value: Any) -> Any:
    """Models as the mappings a YAML file would hold (set values only)."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json", exclude_defaults=True)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _constraints(info: Any) -> str:
    words = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    parts = []
    for meta in info.metadata:
        for attr, sign in words.items():
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sign} {value}")
    return ", ".join(parts)


def _param_docs(cls: type) -> dict[str, str]:
    """Descriptions of a numpy docstring's ``Parameters`` / ``Attributes``."""
    from griffe import Docstring, DocstringSectionKind

    text = cls.__doc__ or ""
    if not text:
        return {}
    import inspect

    parsed = Docstring(inspect.cleandoc(text)).parse("numpy", warn_unknown_params=False)
    out: dict[str, str] = {}
    for section in parsed:
        if section.kind in (
            DocstringSectionKind.parameters,
            DocstringSectionKind.attributes,
        ):
            for item in section.value:
                out[item.name] = " ".join(item.description.split())
    return out


def _escape(text: str) -> str:
    """Angle brackets outside code spans, which markdown would read as HTML."""
    parts = text.split("`")
    for k in range(0, len(parts), 2):
        parts[k] = parts[k].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _cell(text: str) -> str:
    return _escape(text.replace("|", "\\|").replace("\n", " "))


#: Descriptions of top-level experiment keys the models leave undescribed
#: (a key missing from the model is an error: these cannot outlive it).
EXPERIMENT_KEYS = {
    "name": "Name of the run (the default run directory is runs/<name>-<time>).",
    "description": "Free text, kept with the run.",
    "channel_group": "The config group whose presets are the channels.",
    "sequence": "The base plan: a useq-schema [`MDASequence`]"
    "(https://pymmcore-plus.github.io/useq-schema/) (positions or a well plate "
    "plan, grid, time plan, channels, Z plan).",
    "segmenter": "See [`segmenter:`](#key-segmenter) and [Segmenters](#segmenters).",
    "policies": "See [`policies:`](#key-policies) and [Policies](#policies).",
    "analysis": "See [`analysis:`](#key-analysis).",
    "scheduler": "See [`scheduler:`](#key-scheduler).",
    "output": "See [`output:`](#key-output).",
    "hardware": "See [`hardware:`](#key-hardware).",
    "limits": "See [`limits:`](#key-limits).",
    "seed": "Seed of everything random in the run (simulated specimens too).",
}


def field_table(
    model: type, skip: tuple[str, ...] = (), extra: dict[str, str] | None = None
) -> str:
    """A markdown table of a pydantic model's fields."""
    docs = {**_param_docs(model), **(extra or {})}
    unknown = set(extra or {}) - set(model.model_fields)
    if unknown:
        raise ValueError(f"{model.__name__} has no field {sorted(unknown)}")
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, info in model.model_fields.items():
        if name in skip or info.exclude:
            continue
        description = info.description or docs.get(name, "")
        limits = _constraints(info)
        if limits:
            description = f"{description} ({limits})" if description else f"({limits})"
        rows.append(
            f"| `{name}` | `{_cell(_type_name(info.annotation))}` "
            f"| {_cell(_default(info))} | {_cell(description)} |"
        )
    return "\n".join(rows)


def _doc(cls: type) -> str:
    """The docstring's summary and body up to its first numpy section."""
    import inspect

    text = inspect.cleandoc(cls.__doc__ or "")
    text = re.split(r"\n\S[^\n]*\n-{3,}\n", "\n" + text + "\n")[0].strip()
    return _escape(text)


def experiment_reference() -> str:
    """Every section of the experiment file, one table each."""
    from smartscope import experiment as ex

    out = [
        "## Top level\n",
        _doc(ex.Experiment),
        "",
        field_table(ex.Experiment, extra=EXPERIMENT_KEYS),
    ]
    sections = [
        ("segmenter", ex.SegmenterSpec),
        ("policies", ex.PolicySpec),
        ("analysis", ex.AnalysisSettings),
        ("scheduler", ex.SchedulerSettings),
        ("output", ex.OutputSettings),
        ("hardware", ex.HardwareSettings),
        ("limits", ex.LimitsSettings),
    ]
    for key, model in sections:
        out += [f"\n## `{key}:` {{#key-{key}}}\n", _doc(model), ""]
        if key == "segmenter":
            out.append(
                "`name` (default `threshold`) picks the segmenter; every other key "
                "is one of its parameters: see [Segmenters](#segmenters).\n"
            )
            continue
        if key == "policies":
            out.append(
                "A list; each item's `name` picks the policy, `on_error` (`disable`, "
                "`skip` or `stop`; default `disable`) says what a fault of it does, "
                "and every other key is one of its parameters: see "
                "[Policies](#policies).\n"
            )
            continue
        out.append(field_table(model))
    return "\n".join(out)


def segmenter_reference() -> str:
    """The parameters of the built-in segmenters."""
    from smartscope.segment import ThresholdSegmenter, UNetSegmenter

    out = []
    builtins = (
        ("threshold", ThresholdSegmenter, "smartscope.segment.ThresholdSegmenter"),
        ("unet", UNetSegmenter, "smartscope.segment._dl.UNetSegmenter"),
    )
    for name, cls, ref in builtins:
        out += [
            f"### `{name}`\n",
            f"[`{cls.__name__}`][{ref}]: " + _doc(cls).split("\n\n")[0],
            "",
            field_table(cls),
            "",
        ]
    return "\n".join(out)


def policy_reference() -> str:
    """The parameters of the built-in policies, in the registry's order."""
    from smartscope.policies import policy_class
    from smartscope.policies._registry import _BUILTINS

    out = []
    for name in _BUILTINS:
        cls = policy_class(name)
        out += [
            f"### `{name}`\n",
            f"[`{cls.__name__}`][smartscope.policies.{cls.__name__}]\n",
            _doc(cls),
            "",
            field_table(cls, skip=("name",)),
            "",
        ]
    return "\n".join(out)


def types_reference() -> str:
    """The value types the policies' parameters use."""
    import typing as t

    from smartscope.policies import Bounds, ObjectFilter
    from smartscope.policies._features import Feature

    features = ", ".join(f"`{f}`" for f in t.get_args(Feature))
    return "\n".join(
        [
            "### `ObjectFilter` {#objectfilter}\n",
            _doc(ObjectFilter),
            "",
            field_table(ObjectFilter),
            "",
            "### `Bounds` and `Criterion` {#criterion}\n",
            f"`Bounds`: {_doc(Bounds)} Keys: `min`, `max` (numbers).",
            "",
            "A `Criterion` maps object features to `Bounds`; an object passes when "
            "every feature named is inside its bounds (a list of criteria: any one "
            f"of them). Features: {features} (see "
            "[`object_features`][smartscope.policies.object_features]).",
        ]
    )


#: API pages (reference/api/NAME.md) of the modules the top level re-exports from
API_PAGES = {
    "smartscope.experiment": "experiment",
    "smartscope.runner": "runner",
    "smartscope.microscope": "microscope",
    "smartscope.policies": "policies",
    "smartscope.scheduler": "scheduler",
    "smartscope.segment": "segment",
}


def exports_reference() -> str:
    """The top-level names documented on their module's page, linked there."""
    import smartscope

    rows = ["| name | documented in |", "|---|---|"]
    for name in smartscope.__all__:
        module = smartscope._LAZY.get(name)
        if module not in API_PAGES:
            continue  # rendered on the top-level page itself
        if name == "Action":  # a type alias: the union of the action classes
            rows.append(
                f"| `Action` | [`{module}`]({API_PAGES[module]}.md): the union "
                "of the action classes |"
            )
            continue
        rows.append(
            f"| [`{name}`][{module}.{name}] | [`{module}`]({API_PAGES[module]}.md) |"
        )
    return "\n".join(rows)


GENERATORS = {
    "exports": exports_reference,
    "types": types_reference,
    "cli": cli_reference,
    "experiment": experiment_reference,
    "segmenters": segmenter_reference,
    "policies": policy_reference,
}
