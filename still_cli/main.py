"""The ``still`` command line: parse, dispatch to a stage, print a summary.

    still run configs/mnist.yaml --fast
    python -m still_cli infer --config configs/digits-infer.yaml --json

Each verb is a thin shim over an importable function that tests call directly; the
stages are imported when their verb runs, so ``still --help`` stays fast. With
``--json`` the last line of stdout is one JSON object; errors are one line on stderr
and a non-zero exit.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from still.errors import StillError
from still_cli.verbs import VERBS

EXAMPLES = """\
verbs, with an example each:
  infer    run the teacher once, write a soft-label store
           still infer data.source=builtin:mnist teacher.uri=teacher.pt store.mode=topk store.k=5
  train    train a student from a store (or supervised from data.source; a llama LM from text)
           still train store.uri=stores/<key> student.family=mlp student.width=800 kd.temperature=20
  tune     sweep temperature, KD weight and width over one store
           still tune store.uri=stores/<key> tune.num_samples=8 tune.searcher=optuna
  eval     a language model's held-out cross-entropy on a text source's token blocks
           still eval model.uri=builtin:smollm2-135m data.source=builtin:web-bible
  run      run a pipeline of stages (infer, train, tune, eval) from one YAML file
           still run configs/mnist.yaml --fast
  store    inspect or verify a store
           still store verify stores/<key>
  submit   submit any still command to a Ray cluster's job server
           still submit --address http://127.0.0.1:8265 --working-dir . -- still train --config c.yaml
  jobs     list, follow or stop submitted jobs
           still jobs list --address http://127.0.0.1:8265
  cluster  start or stop a multi-node Ray cluster on this machine
           still cluster local up --workers 1

Every config verb takes --config FILE.yaml, dotted key=value overrides, --json,
--print-config (show the resolved config, run nothing) and --verbose (Ray's own output);
`still VERB --help` lists the verb's config keys with their types, defaults and docs.
"""

class _Parser(argparse.ArgumentParser):
    """An argument parser whose help can end with text built only when help is shown.

    ``still VERB --help`` lists every config key of the verb; building that list
    imports the verb's config module, which ``still --help`` and every other command
    need not pay for.
    """

    def __init__(self, *args: Any, help_tail: Callable[[], str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._help_tail = help_tail

    def format_help(self) -> str:
        """Returns argparse's help plus the lazily built tail (the config keys)."""
        text = super().format_help()
        return f"{text}\n{self._help_tail()}" if self._help_tail else text


def _config_keys_help(config_class: type) -> Callable[[], str]:
    def build() -> str:
        from still_cli.config_help import format_keys

        return format_keys(config_class)

    return build


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of config keys")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides (keys listed below)")
    parser.add_argument("--address", default="", help="Ray cluster address (default: $RAY_ADDRESS, else local)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's internal console output (ray.verbose=true)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (YAML; JSON with --json) and exit without running")
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line")


def build_parser() -> argparse.ArgumentParser:
    """Returns the argument parser of the ``still`` command."""
    parser = argparse.ArgumentParser(
        prog="still",
        description="Offline knowledge distillation on Ray: one teacher pass, many students.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    verbs.required = True
    for verb in VERBS.values():
        sub = verbs.add_parser(verb.name, help=f"{verb.name} (see still --help)",
                               help_tail=_config_keys_help(verb.config_class))
        _add_config_args(sub)
        if verb.name == "tune":
            sub.add_argument("--retrain-best", action="store_true",
                             help="train the best config on train+val afterwards (tune.retrain_best=true)")

    run = verbs.add_parser("run", help="run a pipeline YAML (infer → train → tune)")
    run.add_argument("pipeline", help="pipeline YAML file")
    run.add_argument("overrides", nargs="*", metavar="stage.key=value", help="e.g. train.train.epochs=3")
    run.add_argument("--fast", action="store_true", help="use the pipeline's fast settings")
    run.add_argument("--address", default="")
    run.add_argument("--verbose", action="store_true",
                     help="show Ray's internal console output in every stage (ray.verbose=true)")
    run.add_argument("--json", action="store_true")

    store = verbs.add_parser("store", help="inspect or verify a soft-label store")
    store.add_argument("action", choices=["inspect", "verify"])
    store.add_argument("uri")
    store.add_argument("--json", action="store_true")

    submit = verbs.add_parser("submit", help="submit a still command as a Ray job")
    submit.add_argument("--address", default="", help="job server, e.g. http://HEAD:8265 (default $RAY_ADDRESS)")
    submit.add_argument("--working-dir", default="", help="directory uploaded as the job's working_dir")
    submit.add_argument("--env", action="append", default=[], metavar="K=V",
                        help="environment for the job (K alone: this shell's value); the only way to pass secrets")
    submit.add_argument("--pip", action="append", default=[], metavar="PKG", help="pip package for the job")
    submit.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="also leave PATTERN (gitignore style) out of the --working-dir upload")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return")
    submit.add_argument("--json", action="store_true")
    submit.add_argument("command", nargs=argparse.REMAINDER, help="-- still VERB ...")

    jobs = verbs.add_parser("jobs", help="list | status ID | logs ID | stop ID")
    jobs.add_argument("action", choices=["list", "status", "logs", "stop"])
    jobs.add_argument("job_id", nargs="?", default="")
    jobs.add_argument("--address", default="")
    jobs.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    jobs.add_argument("--json", action="store_true")

    cluster = verbs.add_parser("cluster", help="local up|down: a multi-node Ray cluster on this machine")
    cluster.add_argument("kind", choices=["local"])
    cluster.add_argument("action", choices=["up", "down", "status"])
    cluster.add_argument("--workers", type=int, default=1)
    cluster.add_argument("--cpus-per-node", type=int, default=0)
    cluster.add_argument("--state-dir", default="", help="where the cluster's pid file lives")
    cluster.add_argument("--port", type=int, default=None, help="GCS port (default 6390; taken: a free one is used)")
    cluster.add_argument("--dashboard-port", type=int, default=None, help="dashboard / job server port (default 8275)")
    cluster.add_argument("--json", action="store_true")
    return parser


def resolve_config(args: argparse.Namespace) -> Any:
    """Builds a config verb's config from ``--config``, the overrides and the flags.

    ``--address``, ``--verbose`` and ``--retrain-best`` are shorthands for the
    overrides ``ray.address=…``, ``ray.verbose=true`` and ``tune.retrain_best=true``.

    Args:
        args: Parsed arguments of ``still infer|train|tune``.

    Returns:
        The verb's frozen root config.

    Raises:
        StillError: A bad file, key or value (see :func:`still.config.load_config`).
    """
    from still.config import load_config

    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"ray.address={args.address}")
    if getattr(args, "verbose", False):
        overrides.append("ray.verbose=true")
    if getattr(args, "retrain_best", False):
        overrides.append("tune.retrain_best=true")
    return load_config(VERBS[args.verb].config_class, args.config, overrides)


def _run_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    from still_cli.pipeline import run_pipeline_cli

    return run_pipeline_cli(args)


def _store(args: argparse.Namespace) -> dict[str, Any]:
    from teacher_infer.store import cli_store

    return cli_store(args.action, args.uri)


def _submit(args: argparse.Namespace) -> dict[str, Any]:
    from cluster.submit import cli_submit

    return cli_submit(args)


def _jobs(args: argparse.Namespace) -> dict[str, Any]:
    from cluster.submit import cli_jobs

    return cli_jobs(args)


def _cluster(args: argparse.Namespace) -> dict[str, Any]:
    from cluster.local import cli_cluster

    return cli_cluster(args)


# The verbs that are not config-driven; each handler imports its stage when it runs.
_HANDLERS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "run": _run_pipeline, "store": _store, "submit": _submit, "jobs": _jobs, "cluster": _cluster,
}


def _dispatch(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.verb in VERBS:
        config = resolve_config(args)
        if getattr(args, "print_config", False):
            from still_cli.config_help import format_config

            print(format_config(config, as_json=args.json))
            return None
        verb = VERBS[args.verb]
        summary = verb.run(config)
        if verb.report is not None:
            print(verb.report(summary), flush=True)
        return summary
    return _HANDLERS[args.verb](args)


# Verbs that print a table of their results: without --json the CLI adds only where the results
# are (train), or nothing (run: the pipeline's closing table is its summary).
_SUMMARY_KEYS = {"train": ("checkpoint", "torchscript", "run_id", "model_uri", "tracking_lost"), "run": ()}


def _print_summary(summary: dict[str, Any], as_json: bool, verb: str) -> None:
    if as_json:
        print(json.dumps(summary, default=str))
        return
    keys = _SUMMARY_KEYS.get(verb)
    for key, value in summary.items():
        if isinstance(value, (dict, list)) or (keys is not None and (key not in keys or value is None)):
            continue
        print(f"{key}: {value}")


def console_main() -> NoReturn:
    """The ``still`` executable and ``python -m still_cli``: :func:`main`, then exit.

    The garbage collector is frozen first: the interpreter's last collections would walk
    every object torch, Ray and MLflow made, to free memory the process gives back as
    it ends anyway (0.75 s of a cold ``still infer`` on 2 CPUs, 2026-12-07). Exit
    handlers (Ray's shutdown) still run; tests call :func:`main`.
    """
    exit_code = main()
    gc.freeze()
    sys.exit(exit_code)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``still`` command; returns the process exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse fills a positional list once: ``a=1 --verbose b=2`` leaves ``b=2`` over.
    # Overrides after a flag are still overrides; anything else is an error as usual.
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "verbose", False):
        # transformers' and the Hub's per-file bars (loading, de-quantizing, saving a model); read at
        # their import, and inherited by the Ray workers this process starts
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        summary = _dispatch(args)
    except StillError as exc:
        print(f"still: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("still: interrupted", file=sys.stderr)
        return 130
    sys.stdout.flush()
    if summary is None:  # --print-config: the config is the whole output
        return 0
    exit_code = int(summary.pop("_exit_code", 0)) if isinstance(summary, dict) else 0
    _print_summary(summary, getattr(args, "json", False), args.verb)
    return exit_code
