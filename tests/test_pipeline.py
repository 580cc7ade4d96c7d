"""Pipeline files: stages, references between them, --fast and overrides."""

from __future__ import annotations

import textwrap

import pytest

from still.errors import StillError
from still_cli.pipeline import parse_pipeline, stage_config


def write(tmp_path, text: str):
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


PIPELINE = """
name: demo
defaults: {data: {source: builtin:digits}}
stages:
  - {name: teacher, verb: train, config: {train: {epochs: 5}}}
  - {name: store, verb: infer, config: {teacher: {uri: "${teacher.checkpoint}"}}}
fast:
  teacher: {train.epochs: 1}
summary: {teacher_errors: teacher.test_errors}
"""


def test_defaults_fast_and_overrides(tmp_path):
    pipeline = parse_pipeline(write(tmp_path, PIPELINE), ["store.store.k=3"], fast=True)
    teacher, store = pipeline.stages
    assert teacher.config == {"data": {"source": "builtin:digits"}, "train": {"epochs": 1}}
    assert store.config["store"] == {"k": 3}
    assert store.config["data"]["source"] == "builtin:digits"
    assert parse_pipeline(write(tmp_path, PIPELINE)).stages[0].config["train"]["epochs"] == 5


def test_references_are_filled_from_earlier_stage_summaries(tmp_path):
    pipeline = parse_pipeline(write(tmp_path, """
        stages:
          - {name: teacher, verb: train}
          - {name: store, verb: infer, config: {teacher: {uri: "${teacher.checkpoint}"},
                                                store: {root: "stores-${teacher.nested.n}"}}}
          - {name: later, verb: infer, config: {teacher: {uri: "${teacher.missing}"}}}
          - {name: early, verb: infer, config: {teacher: {uri: "${store.key}"}}}
    """))
    _, store, later, early = pipeline.stages
    results = {"teacher": {"checkpoint": "/runs/t.pt", "nested": {"n": 3}}}
    config = stage_config(pipeline, store, results)
    assert (config.teacher.uri, config.store.root) == ("/runs/t.pt", "stores-3")
    with pytest.raises(StillError, match="has no output 'missing'"):
        stage_config(pipeline, later, results)
    with pytest.raises(StillError, match="has not run"):
        stage_config(pipeline, early, results)


def test_pipeline_ray_settings_reach_every_stage(tmp_path):
    import dataclasses

    from still.config import RayConfig

    pipeline = parse_pipeline(write(tmp_path, """
        stages:
          - {name: a, verb: train}
          - {name: b, verb: tune, config: {store: {uri: s}, ray: {address: "ray://mine:10001"}}}
    """))
    loud = dataclasses.replace(pipeline, ray=RayConfig(address="ray://head:10001", verbose=True))
    a, b = (stage_config(loud, stage, {}) for stage in loud.stages)
    assert (a.ray.verbose, a.ray.address) == (True, "ray://head:10001")
    assert (b.ray.verbose, b.ray.address) == (True, "ray://mine:10001")  # a stage's own setting wins
    assert stage_config(pipeline, pipeline.stages[0], {}).ray.verbose is False


@pytest.mark.parametrize(
    "text, message",
    [
        ("stages: [{verb: fit}]", "needs verb"),
        ("stages: []", "has no stages"),
        ("stagez: []", "unknown key 'stagez'"),
        ("stages: [{verb: train}, {verb: train}]", "two stages are named 'train'"),
    ],
)
def test_bad_pipelines_are_named(tmp_path, text, message):
    with pytest.raises(StillError, match=message):
        parse_pipeline(write(tmp_path, text))


def test_override_of_unknown_stage(tmp_path):
    with pytest.raises(StillError, match="stage 'nope'"):
        parse_pipeline(write(tmp_path, PIPELINE), ["nope.train.epochs=1"])
