"""What a finished language-model student becomes: a directory any Hugging Face tool loads.

``export_causal_lm`` writes a ``save_pretrained`` directory: ``config.json``,
``generation_config.json``, ``model.safetensors``, the tokenizer's files, and
``still.json`` (``{"format": "still-lm/v1", "still_version", "family", "training"}``).
Nothing in it needs still: ``AutoModelForCausalLM.from_pretrained(dir)`` and
``AutoTokenizer.from_pretrained(dir)`` load it, and it is a teacher like any other
(``teacher_infer.lm_teacher.load_lm_teacher(dir)``; ``still.json`` comes back as ``meta``).

``log_lm_to_mlflow`` logs that directory as the run's MLflow model ``model`` with MLflow's
``transformers`` flavor (task ``text-generation``), so a user loads it with
``mlflow.transformers.load_model("runs:/<run>/model", return_type="components")`` (model +
tokenizer) or ``mlflow.pyfunc.load_model(...)`` (text in, text out), and can register it.
The flavor asks the Hugging Face Hub for a model card and a license of a model that came
from the hub; here both are answered locally (a card from ``still.json``; the model is
loaded from the directory's absolute path, which the hub client refuses as a repository
id before any request), so logging works offline. MLflow's own path for local
checkpoints (``transformers_model=<dir>``) fails on transformers 5 in MLflow 3.17.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import still
from still.lm_models import STILL_JSON, check_vocab
from still.models import family_of

FORMAT = "still-lm/v1"


def export_causal_lm(model: Any, tokenizer: Any, directory: str | Path,
                     training: Mapping[str, Any] | None = None) -> Path:
    """Writes a language model, its tokenizer and ``still.json`` as a ``save_pretrained`` directory.

    The directory is written beside its destination and renamed into place, so an
    existing export is replaced whole or not at all.

    Args:
        model: A transformers causal LM (a ``llama`` student, say).
        tokenizer: The tokenizer its ids come from (the teacher's).
        directory: The destination (a local directory; replaced if it exists).
        training: A JSON-serialisable summary of how it was trained (run id, store key,
            final metrics…), kept in ``still.json``.

    Returns:
        The directory's absolute path.

    Raises:
        StillError: The tokenizer makes ids beyond the model's vocabulary.
    """
    check_vocab(int(model.config.vocab_size), len(tokenizer))
    target = Path(directory).expanduser().absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    info = {"format": FORMAT, "still_version": still.__version__, "family": family_of(model),
            "training": dict(training or {})}
    (staging / STILL_JSON).write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
    _replace_directory(staging, target)
    return target


def _replace_directory(staging: Path, target: Path) -> None:
    """Renames ``staging`` to ``target``; an existing ``target`` is removed only once replaced."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def log_lm_to_mlflow(tracker: Any, directory: str | Path, register_name: str = "", alias: str = "") -> dict[str, Any]:
    """Logs an exported language model as the run's MLflow model ``model``; registers it when asked.

    Args:
        tracker: The run's ``still.tracking.Tracker`` (a ``NullTracker`` logs nothing).
        directory: What :func:`export_causal_lm` wrote.
        register_name: A registered model name to add a version to (empty: none).
        alias: An alias for that version (``champion``…).

    Returns:
        ``{"model_uri", "registered_version"}`` (None values when nothing was logged or registered).
    """
    if not getattr(tracker, "run_id", ""):
        return {"model_uri": None, "registered_version": None}
    import mlflow
    import mlflow.transformers
    import torch
    import transformers
    from huggingface_hub import ModelCard

    from still.lm_models import load_causal_lm

    lm = load_causal_lm(str(Path(directory).absolute()))
    info = lm.meta or {}
    card = ModelCard(f"---\nlibrary_name: transformers\npipeline_tag: text-generation\n---\n"
                     f"# A still student\n\n```json\n{json.dumps(info, indent=2, default=str)}\n```\n")
    requirements = [f"transformers=={transformers.__version__}", f"torch=={torch.__version__.split('+')[0]}",
                    "safetensors"]
    mlflow.set_tracking_uri(tracker.tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=tracker.tracking_uri)
    # A model logged with run_id= and no active run lands in the default experiment (and, on a
    # sqlite store, its artifacts under ./mlruns): create it in the run's experiment first.
    experiment_id = client.get_run(tracker.run_id).info.experiment_id
    model_id = client.create_logged_model(experiment_id, name="model", source_run_id=tracker.run_id).model_id
    with _quiet("mlflow.transformers"):
        logged = mlflow.transformers.log_model(
            transformers_model={"model": lm.model, "tokenizer": lm.tokenizer}, task="text-generation",
            name="model", run_id=tracker.run_id, model_id=model_id, model_card=card,
            pip_requirements=requirements, metadata={"still": info}, registered_model_name=register_name or None,
        )
    version = getattr(logged, "registered_model_version", None)
    if register_name and alias and version is not None:
        client.set_registered_model_alias(register_name, alias, str(version))
    return {"model_uri": logged.model_uri, "registered_version": version}


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Errors only from one logger for a block (the flavor warns that a local model has no hub license)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
