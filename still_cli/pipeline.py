"""``still run PIPELINE.yaml``: stages of infer, train and tune chained in one job.

A pipeline file names its stages in order; each is a verb and a block of that verb's
config keys. A value may refer to an earlier stage's summary with ``${stage.field}``
(``teacher.uri: ${teacher.checkpoint}``), which is how a trained teacher feeds
``still infer`` and a store feeds the students. ``defaults`` is merged under every
stage's block; ``fast`` holds per-stage dotted overrides applied with ``--fast``.
A ``summary`` block picks figures out of the stage summaries for the final table,
and an optional ``reference`` block prints published numbers beside them::

    name: mnist
    defaults: {data: {source: builtin:mnist}}
    stages:
      - {name: teacher, verb: train, config: {student: {width: 1200}}}
      - {name: store, verb: infer, config: {teacher: {uri: "${teacher.checkpoint}"}}}
    summary: {teacher_errors: teacher.test_errors}
    reference: {title: "Hinton et al. 2015", teacher_errors: 67}

Every stage runs in this process against one Ray instance, and records its own
MLflow run; the pipeline adds one run holding the summary table.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from still.config import RayConfig, TrackingConfig, build_dataclass, read_yaml_mapping
from still.errors import StillError
from still_cli.verbs import VERBS

_REFERENCE = re.compile(r"\$\{([A-Za-z0-9_\-]+)\.([A-Za-z0-9_.\-]+)\}")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of a pipeline."""

    name: str
    """Unique name; later stages refer to its summary as ``${name.field}``."""
    verb: str
    """``infer``, ``train`` or ``tune``."""
    config: dict
    """The verb's config keys (nested mapping), before references are filled in."""


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """A parsed pipeline file."""

    name: str
    stages: tuple[Stage, ...]
    summary: dict
    reference: dict
    tracking: TrackingConfig
    ray: RayConfig


def _deep_merge(base: dict, top: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def parse_pipeline(path: str, overrides: list[str] = (), fast: bool = False) -> Pipeline:
    """Reads a pipeline file and applies ``--fast`` and ``stage.key=value`` overrides.

    Raises:
        StillError: Unknown top-level keys, stages without a known verb, duplicate
            stage names, or overrides that name no stage.
    """
    import yaml

    raw = read_yaml_mapping(path)
    allowed = {"name", "defaults", "stages", "fast", "summary", "reference", "tracking", "ray"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise StillError(f"pipeline {path!r}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(allowed))}")
    defaults = raw.get("defaults") or {}
    stages: list[Stage] = []
    for index, entry in enumerate(raw.get("stages") or []):
        if not isinstance(entry, dict) or entry.get("verb") not in VERBS:
            raise StillError(
                f"pipeline {path!r}: stage {index} needs verb: one of {', '.join(VERBS)} (got {entry!r})"
            )
        name = str(entry.get("name") or entry["verb"])
        if any(stage.name == name for stage in stages):
            raise StillError(f"pipeline {path!r}: two stages are named {name!r}")
        extra = sorted(set(entry) - {"name", "verb", "config"})
        if extra:
            raise StillError(f"pipeline {path!r}: stage {name!r} has unknown key {extra[0]!r}")
        stages.append(Stage(name, entry["verb"], _deep_merge(defaults, entry.get("config") or {})))
    if not stages:
        raise StillError(f"pipeline {path!r} has no stages")

    by_name = {stage.name: stage for stage in stages}
    changes: list[tuple[str, str, Any]] = []
    if fast:
        for stage_name, block in (raw.get("fast") or {}).items():
            for key, value in (block or {}).items():
                changes.append((stage_name, key, value))
    for item in overrides:
        key, sep, text = item.partition("=")
        stage_name, dot, rest = key.partition(".")
        if not sep or not dot:
            raise StillError(f"override {item!r} must look like stage.section.key=value")
        changes.append((stage_name, rest, yaml.safe_load(text) if text.strip() else ""))
    for stage_name, key, value in changes:
        if stage_name not in by_name:
            raise StillError(f"override names stage {stage_name!r}; stages: {', '.join(by_name)}")
        _set_dotted(by_name[stage_name].config, key, value)

    return Pipeline(
        name=str(raw.get("name") or Path(path).stem),
        stages=tuple(stages),
        summary=dict(raw.get("summary") or {}),
        reference=dict(raw.get("reference") or {}),
        tracking=build_dataclass(TrackingConfig, raw.get("tracking"), "tracking."),
        ray=build_dataclass(RayConfig, raw.get("ray"), "ray."),
    )


def _lookup(results: dict[str, dict], stage: str, dotted: str, where: str) -> Any:
    if stage not in results:
        raise StillError(f"{where}: ${{{stage}.{dotted}}} refers to a stage that has not run")
    node: Any = results[stage]
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise StillError(f"{where}: stage {stage!r} has no output {dotted!r}")
        node = node[part]
    return node


def _fill_references(value: Any, results: dict[str, dict], where: str) -> Any:
    if isinstance(value, dict):
        return {k: _fill_references(v, results, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill_references(v, results, where) for v in value]
    if isinstance(value, str):
        whole = _REFERENCE.fullmatch(value)
        if whole:
            return _lookup(results, whole.group(1), whole.group(2), where)
        return _REFERENCE.sub(lambda m: str(_lookup(results, m.group(1), m.group(2), where)), value)
    return value


def check_pipeline(pipeline: Pipeline) -> list[Any]:
    """Builds every stage's config with references stubbed out, so a typo in the last
    stage fails before the first one spends minutes; returns those configs."""
    return [_build_stage_config(stage, _stub_references(stage.config)) for stage in pipeline.stages]


def _build_stage_config(stage: Stage, block: dict) -> Any:
    try:
        return build_dataclass(VERBS[stage.verb].config_class, block, prefix="")
    except StillError as exc:
        raise StillError(f"pipeline stage {stage.name!r}: {exc}") from None


def _stub_references(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _stub_references(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_stub_references(v) for v in value]
    if isinstance(value, str):
        return _REFERENCE.sub("from-an-earlier-stage", value)
    return value


def stage_config(pipeline: Pipeline, stage: Stage, results: dict[str, dict]) -> Any:
    """Builds a stage's config: its block with ``${stage.field}`` filled in from ``results``
    (the summaries of the stages run so far) and the pipeline's ``tracking`` and ``ray``
    settings under it.

    Raises:
        StillError: A reference to a stage that has not run or to a field it lacks, or
            a bad key or value in the block (naming the stage).
    """
    block = _fill_references(stage.config, results, where=f"stage {stage.name!r}")
    block.setdefault("tracking", {})
    for field in ("experiment", "uri"):
        if getattr(pipeline.tracking, field):
            block["tracking"].setdefault(field, getattr(pipeline.tracking, field))
    block.setdefault("ray", {})
    if pipeline.ray.address:
        block["ray"].setdefault("address", pipeline.ray.address)
    if pipeline.ray.verbose:
        block["ray"].setdefault("verbose", True)
    return _build_stage_config(stage, block)


def run_pipeline(pipeline: Pipeline, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the stages in order and returns ``{stage: summary}`` plus the summary figures.

    Returns:
        A dict with one object per stage (its verb's summary plus ``seconds``), the
        ``summary`` figures named in the pipeline, and ``seconds`` per stage.
    """
    check_pipeline(pipeline)
    results: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    for stage in pipeline.stages:
        config = stage_config(pipeline, stage, results)
        progress(f"== stage {stage.name} ({stage.verb}) ==")
        start = time.perf_counter()
        summary = VERBS[stage.verb].run(config)
        seconds[stage.name] = round(time.perf_counter() - start, 1)
        summary.pop("_exit_code", None)
        results[stage.name] = dict(summary, seconds=seconds[stage.name])
        progress(f"== stage {stage.name} done in {seconds[stage.name]:.1f} s ==")
    figures = {
        name: _lookup(results, *dotted.split(".", 1), where="summary") for name, dotted in pipeline.summary.items()
    }
    return {**results, **figures, "seconds": seconds}


FAST_NOTE = ("--fast is a smoke run (a short version of every stage) that checks the pipeline works: its "
             "numbers mean nothing, and a distilled student worse than the baseline here says nothing about "
             "distillation. Run without --fast for the comparison.")


def format_report(pipeline: Pipeline, outcome: dict[str, Any], tracking_uri: str, fast: bool = False) -> str:
    """Returns the closing table: each summary figure beside its reference value (and, for ``--fast``, why
    its numbers mean nothing)."""
    from still.tracking import ui_command

    lines = [f"pipeline {pipeline.name}" + (" (--fast: a smoke run)" if fast else "")]
    title = pipeline.reference.get("title", "reference")
    rows = [(name, outcome[name], pipeline.reference.get(name, "")) for name in pipeline.summary]
    width = max([len(r[0]) for r in rows] + [len("stage seconds")])
    lines.append(f"  {'figure'.ljust(width)}  {'still':>10}  {title}")
    for name, value, reference in rows:
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"  {name.ljust(width)}  {shown:>10}  {reference}")
    lines.append("  wall time per stage:")
    for stage, secs in outcome["seconds"].items():
        lines.append(f"    {stage.ljust(width - 2)}  {secs:>8.1f} s")
    lines.append(f"  total {sum(outcome['seconds'].values()):.1f} s")
    lines.append(f"  MLflow UI: {ui_command(tracking_uri)}")
    if fast:
        lines.append(f"  {FAST_NOTE}")
    return "\n".join(lines)


def pipeline_from_args(args: Any) -> Pipeline:
    """The pipeline ``still run`` runs: the file with ``--fast`` and the overrides applied,
    and ``--address`` / ``--verbose`` over its ``ray`` section."""
    pipeline = parse_pipeline(args.pipeline, list(args.overrides), fast=args.fast)
    if args.address:
        pipeline = dataclasses.replace(pipeline, ray=RayConfig(address=args.address))
    if getattr(args, "verbose", False):
        pipeline = dataclasses.replace(pipeline, ray=dataclasses.replace(pipeline.ray, verbose=True))
    return pipeline


def run_pipeline_cli(args: Any) -> dict[str, Any]:
    """The ``still run`` verb: parse, run, print the table, return the JSON summary."""
    from still.tracking import open_run, tracking_uri
    from still_cli.startup import start_ray_while_importing

    pipeline = pipeline_from_args(args)
    configs = check_pipeline(pipeline)
    # One Ray instance for every stage (each stage's init_ray joins it), started while the
    # first stage's verb imports.
    dashboard = any(VERBS[stage.verb].dashboard(config) for stage, config in zip(pipeline.stages, configs))
    start_ray_while_importing(pipeline.ray, VERBS[pipeline.stages[0].verb].load, dashboard=dashboard)
    outcome = run_pipeline(pipeline)
    uri = tracking_uri(pipeline.tracking)
    report = format_report(pipeline, outcome, uri, fast=args.fast)
    if args.fast:
        outcome["smoke_run"] = FAST_NOTE
    print(report)
    with open_run(
        {"pipeline": pipeline.name, "fast": args.fast, "stages": [s.name for s in pipeline.stages]},
        pipeline.tracking,
        default_experiment=f"still-{pipeline.name}",
        run_name=f"pipeline-{pipeline.name}{'-fast' if args.fast else ''}",
    ) as tracker:
        numbers = {k: v for k, v in outcome.items() if k in pipeline.summary and isinstance(v, (int, float))}
        tracker.log_metrics(numbers | {f"seconds.{k}": v for k, v in outcome["seconds"].items()})
        tracker.log_dict({"report": report, "outcome": outcome}, "pipeline_summary.json")
        tracker.set_tags({f"stage_run.{s}": outcome[s].get("run_id", "") for s in outcome if isinstance(outcome[s], dict) and s != "seconds"})
    return outcome
