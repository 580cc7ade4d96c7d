"""The still command line: help, errors and exit codes, through the real console script."""

from __future__ import annotations

import subprocess


def still(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(["still", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_help_lists_every_verb_with_an_example():
    result = still("--help")
    assert result.returncode == 0
    for verb in ("infer", "train", "tune", "run", "store", "submit", "jobs", "cluster"):
        assert f"\n  {verb} " in result.stdout
    assert "still infer data.source=builtin:mnist" in result.stdout
    assert "still run configs/mnist.yaml" in result.stdout


def test_unknown_config_key_is_a_one_line_error(tmp_path):
    result = still("infer", "store.mdoe=dense", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("still: error: unknown config key 'store.mdoe'")
    assert "store.mode" in result.stderr


def test_missing_config_file(tmp_path):
    result = still("train", "--config", "nope.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "config file 'nope.yaml' does not exist" in result.stderr
