"""``still train`` of a causal language model (``student.family=llama``) on a text source.

Reads top to bottom like the classifier job (``student_train.driver``), which hands a
language-model config here: :func:`prepare_lm_job` checks what can be checked (tracking,
tokenizer, ``data.seq_len`` against the student's positions, the student's sizes) and
tokenizes and packs the text once (``still.text.packing``: cached, keyed), or, with
``store.uri``, opens a language-model store and the very blocks its teacher read
(``student_train.data.resolve_lm_store_source``) → the MLflow
run opens → ``student_train.driver.fit`` trains (Ray Train on N workers, or in process,
with :mod:`student_train.lm_loop`) → the student is exported as a ``save_pretrained``
directory with its tokenizer (``student_train.lm_export``) and logged to MLflow as a
transformers model → the summary.

    still train data.source=builtin:web-bible data.tokenizer=builtin:smollm2-135m \\
        student.family=llama student.width=128 student.depth=4 data.seq_len=256 --json
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

from still.errors import StillError
from still.models import build_model, count_parameters
from still.tracking import check_reachable, open_run, tracking_uri
from student_train.config import TrainConfig
from student_train.data import Source, resolve_block_source, resolve_lm_store_source

SUMMARY_METRICS = ("test_ce", "test_ppl", "test_accuracy", "student_params")  # the rest are logged per epoch


def prepare_lm_job(cfg: TrainConfig, run_name: str, options: Any) -> Any:
    """Checks a language-model job and makes its token blocks; returns the ``student_train.driver.Job``.

    Raises:
        StillError: Unreachable tracking, a store that is not a language-model store or
            does not match its blocks, no ``data.tokenizer`` (without a store),
            ``data.seq_len`` beyond ``student.max_positions``, a student width the llama
            rules refuse, a bad text source or tokenizer.
    """
    from still.lm_models import special_token_ids
    from still.text.tokenizer import load_tokenizer
    from student_train.driver import Job, check_divergence, check_temperature_on_grid, choose_ingest

    if cfg.tracking.enabled:
        check_reachable(tracking_uri(cfg.tracking))
    if not cfg.data.tokenizer and not cfg.store.uri:
        raise StillError("data.tokenizer is required to train a language model without a teacher: a model directory, "
                         "a .gguf file or builtin:smollm2-135m (its tokenizer makes the token ids)")
    if cfg.data.seq_len > cfg.student.max_positions:
        raise StillError(f"data.seq_len={cfg.data.seq_len} exceeds student.max_positions={cfg.student.max_positions}: "
                         "the student has no position for the tokens beyond; lower data.seq_len or raise "
                         "student.max_positions")
    if len(cfg.store.uri) > 1:
        raise StillError(f"store.uri names {len(cfg.store.uri)} stores: a language-model student distils from one "
                         "store (ensembles are for classifier stores)")
    if cfg.store.uri:
        source = resolve_lm_store_source(cfg.store.uri[0], cfg.data)
        check_temperature_on_grid(cfg.kd.temperature, cfg.kd.weight, source)
        check_divergence(cfg.kd.divergence, cfg.kd.weight, source)
        tokenizer = load_tokenizer(source.blocks.tokenizer_uri)
    else:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        source = None
    model_args = {"width": cfg.student.width, "depth": cfg.student.depth,
                  "vocab_size": source.num_classes if source else tokenizer.vocab_size,
                  "max_positions": cfg.student.max_positions, "special_ids": special_token_ids(tokenizer.hf)}
    build_model(cfg.student.family, **dict(model_args))  # sizes the llama rules refuse fail here, before any work
    source = source or resolve_block_source(cfg.data, cfg.data.tokenizer)
    if not source.split_rows["train"]:
        raise StillError(f"data.source={cfg.data.source!r} gives no training block of data.seq_len={cfg.data.seq_len} "
                         "tokens: too little text, or a seq_len too long for it")
    in_process = cfg.scaling.in_process if options.in_process is None else options.in_process
    workers = 1 if in_process else cfg.scaling.max_workers
    output_dir = Path(cfg.train.output_dir or Path("runs") / run_name).resolve()
    return Job(cfg, run_name, options, source, model_args, None, None, (), {}, None, output_dir, in_process,
               choose_ingest(cfg, source, workers))


def run_lm_job(job: Any, started: float) -> dict[str, Any]:
    """Trains, exports and logs a checked language-model job; returns its summary."""
    from still.text.tokenizer import load_tokenizer
    from student_train.driver import DEFAULT_EXPERIMENT, fit, is_number
    from student_train.lm_export import export_causal_lm, log_lm_to_mlflow

    cfg, options = job.cfg, job.options
    with open_run(cfg, cfg.tracking, default_experiment=DEFAULT_EXPERIMENT, run_name=job.run_name,
                  parent_run_id=options.parent_run_id, tags=lm_tags(job.source, cfg)) as tracker:
        final, state = fit(job, tracker.address)
        student = build_model(cfg.student.family, **dict(job.model_args))
        student.load_state_dict(state["net"])
        summary = summarise_lm(job, student, final, list(state["history"]))
        directory = export_causal_lm(student, load_tokenizer(job.source.blocks.tokenizer_uri).hf, job.output_dir / "model",
                                     training={k: v for k, v in summary.items() if k != "history"})
        summary["checkpoint"] = str(directory)
        tracker.log_metrics({k: summary[k] for k in SUMMARY_METRICS if is_number(summary.get(k))},
                            step=int(final.get("step", 0)))
        tracker.log_dict({k: v for k, v in summary.items() if k != "history"}, "summary.json")
        logged = {"model_uri": None, "registered_version": None}
        if options.log_model:
            logged = tracker.attempt("log_model", log_lm_to_mlflow, tracker, directory, cfg.register.name,
                                     cfg.register.alias) or logged
        summary.update(run_id=tracker.run_id or None, model_uri=logged["model_uri"],
                       registered_version=logged["registered_version"], tracking_uri=tracker.tracking_uri or None,
                       tracking_lost=tracker.lost or None, ingest=job.ingest)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    (job.output_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def summarise_lm(job: Any, student: Any, final: Mapping[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    """A language-model job's summary: held-out cross-entropy (nats/token), perplexity, accuracy, size, speed."""
    blocks = job.source.blocks
    last = history[-1] if history else {}
    return {
        "run_id": None,
        "checkpoint": None,
        "task": "causal_lm",
        "val_ce": last.get("val_ce"),
        "val_ppl": last.get("val_ppl"),
        "val_accuracy": last.get("val_accuracy"),
        "test_ce": final.get("test_ce"),
        "test_ppl": final.get("test_ppl"),
        "test_accuracy": final.get("test_accuracy"),
        "test_tokens": final.get("test_tokens"),
        "student_params": count_parameters(student),
        "tokens_per_s": last.get("tokens_per_s"),
        "epochs": last.get("epoch"),
        "steps": last.get("step"),
        "resumed_from": final.get("resumed_from", 0),
        "seq_len": blocks.seq_len,
        "vocab_size": blocks.vocab_size,
        "blocks_key": blocks.key,
        "blocks": dict(blocks.rows),
        "tokenizer": blocks.tokenizer_uri,
        **(store_summary(job.source, job.cfg, last) if job.source.kind == "lm_store" else {}),
        "output_dir": str(job.output_dir),
        "run_name": job.run_name,
        "history": history,
    }


def store_summary(source: Source, cfg: TrainConfig, last: Mapping[str, Any]) -> dict[str, Any]:
    """What a distilled language model's summary adds: its store, the teacher's held-out numbers, agreement."""
    m = source.primary.manifest
    teacher_val = m["teacher_metrics"].get("val", {})
    return {"store": source.primary.uri, "store_key": m["key"], "store_mode": m["storage"]["mode"],
            "bytes_per_token": m["bytes_per_token"], "teacher_uri": m["teacher"]["uri"],
            "teacher_val_ce": teacher_val.get("ce"), "teacher_val_ppl": teacher_val.get("ppl"),
            "teacher_val_accuracy": teacher_val.get("accuracy"), "val_agreement": last.get("val_agreement"),
            "kd_temperature": cfg.kd.temperature, "kd_weight": cfg.kd.weight, "kd_tail": cfg.kd.tail,
            "kd_divergence": cfg.kd.divergence}


def lm_tags(source: Source, cfg: TrainConfig) -> dict[str, str]:
    """The MLflow tags of a language-model run."""
    blocks = source.blocks
    tags = {"still.verb": "train", "still.source": cfg.data.source, "still.mode": "causal_lm",
            "blocks.key": blocks.key, "tokenizer.fingerprint": blocks.tokenizer_fingerprint}
    if source.kind == "lm_store":
        tags.update({"store.key": source.primary.manifest["key"], "still.mode": "causal_lm_kd"})
    return tags


def format_lm_table(summary: Mapping[str, Any]) -> str:
    """The table printed at the end of a language-model ``still train``."""

    def f(value: Any, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    rows = [("held-out cross-entropy (nats/token)", f(summary.get("val_ce"), ".4f"), f(summary.get("test_ce"), ".4f")),
            ("perplexity", f(summary.get("val_ppl"), ".2f"), f(summary.get("test_ppl"), ".2f")),
            ("next-token accuracy", f(summary.get("val_accuracy"), ".4f"), f(summary.get("test_accuracy"), ".4f"))]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':<{width}}  {'val':>10}  {'test':>10}"]
    lines += [f"{name:<{width}}  {v:>10}  {t:>10}" for name, v, t in rows]
    if summary.get("store"):
        lines.append(f"teacher {summary.get('teacher_uri')}: held-out cross-entropy {f(summary.get('teacher_val_ce'), '.4f')}; "
                     f"student top-1 agreement with it {f(summary.get('val_agreement'), '.4f')} (val); "
                     f"store {summary.get('store_mode')}, {f(summary.get('bytes_per_token'), '.1f')} bytes/token")
    lines.append(f"parameters {f(summary.get('student_params'), ',')}; "
                 f"{f(summary.get('tokens_per_s'), ',.0f')} tokens/s training")
    return "\n".join(lines)
