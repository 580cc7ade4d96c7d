"""Pipeline files: stages, references between them, --fast and overrides."""

from __future__ import annotations

import textwrap

import pytest

from still.errors import StillError
from still.pipeline import _fill_references, parse_pipeline


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


def test_references_are_filled_from_earlier_stage_summaries():
    results = {"teacher": {"checkpoint": "/runs/t.pt", "nested": {"n": 3}}}
    filled = _fill_references({"a": "${teacher.checkpoint}", "b": ["x-${teacher.nested.n}"]}, results, "s")
    assert filled == {"a": "/runs/t.pt", "b": ["x-3"]}
    with pytest.raises(StillError, match="has no output 'missing'"):
        _fill_references("${teacher.missing}", results, "s")
    with pytest.raises(StillError, match="has not run"):
        _fill_references("${later.x}", results, "s")


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
