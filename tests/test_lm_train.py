"""Language-model students end to end: real text (the World English Bible), a real BPE
tokenizer, a real (tiny) Llama, trained through the ``still`` command, exported, and
loaded again by plain transformers in a fresh process without still."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from _lm_fixtures import write_text_folder, write_tokenizer
from _teacher_fixtures import still_cli, still_in_process, summary_json

VOCAB = 512
TINY = ["student.family=llama", "student.width=32", "student.depth=2", "data.seq_len=32", "train.batch_size=8",
        "train.lr=0.003", "train.optimizer=adamw", "train.weight_decay=0.1", "train.seed=0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from still.text.bible import SWORD_MODULE_DIR

    if not (SWORD_MODULE_DIR / "nt.bzz").is_file():
        pytest.skip("Debian package sword-text-web is not installed (apt-get install sword-text-web)")
    root = tmp_path_factory.mktemp("lm")
    text = write_text_folder(root / "text")
    tokenizer = write_tokenizer(root / "tokenizer", [p.read_text() for p in sorted(text.glob("*.txt"))], VOCAB)
    return {"root": root, "text": text, "tokenizer": tokenizer, "env": {"STILL_CACHE_DIR": str(root / "cache")}}


@pytest.mark.timeout(600)
def test_cli_trains_a_tiny_llama_whose_export_loads_without_still(ray_cluster, corpus, tmp_path):
    out = summary_json(still_in_process(
        ["train", f"data.source={corpus['text']}", f"data.tokenizer={corpus['tokenizer']}", *TINY,
         "train.epochs=2", "train.warmup_steps=5", "train.lr_schedule=cosine", "train.grad_clip=1.0",
         "train.log_every=5", "scaling.num_workers=0", "train.name=tiny-lm", "--json"], tmp_path, env=corpus["env"]))
    uniform = math.log(VOCAB)
    history = out["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["val_ce"] < history[0]["val_ce"] < uniform  # it learns, and beats a uniform guess
    assert out["test_ce"] < uniform - 0.5 and out["test_ppl"] == pytest.approx(math.exp(out["test_ce"]), rel=1e-6)
    assert 0 < out["test_accuracy"] < 1 and out["student_params"] > 0 and out["tokens_per_s"] > 0

    # per-step metrics reached MLflow while training (train.log_every=5), at optimizer steps
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(out["run_id"], "train_loss")]
    assert len(steps) >= 3 and steps == sorted(steps) and steps[0] == 5
    assert [m.step for m in client.get_metric_history(out["run_id"], "val_ce")] == [h["step"] for h in history]

    # the export: a save_pretrained directory with the tokenizer, loaded by plain transformers in a
    # fresh, isolated interpreter elsewhere, gives the test loss still reported on the same blocks
    export = Path(out["checkpoint"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "still.json"} <= {p.name for p in export.iterdir()}
    blocks = Path(corpus["env"]["STILL_CACHE_DIR"]) / "blocks" / out["blocks_key"]
    script = textwrap.dedent(f"""
        import sys, json, glob
        assert not any(m == "still" or m.startswith("still") for m in sys.modules)
        import numpy as np, pyarrow.parquet as pq, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        table = pq.read_table(sorted(glob.glob({str(blocks)!r} + "/**/*.parquet", recursive=True)))
        keep = table["split"].to_numpy() == 2
        ids = np.stack(table["input_ids"].to_numpy(zero_copy_only=False)[keep]).astype(np.int64)
        model = AutoModelForCausalLM.from_pretrained({str(export)!r}).eval()
        AutoTokenizer.from_pretrained({str(export)!r})
        with torch.no_grad():
            x = torch.from_numpy(ids)
            logits = model(input_ids=x).logits[:, :-1]
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        print(json.dumps({{"ce": float(ce), "blocks": len(ids)}}))
    """)
    fresh = subprocess.run([sys.executable, "-I", "-c", script], cwd="/", capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    loaded = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert loaded["blocks"] == out["blocks"]["test"] and loaded["blocks"] > 0
    assert loaded["ce"] == pytest.approx(out["test_ce"], rel=1e-4)

    # still eval of the exported model on the same source scores what training reported
    evaluated = summary_json(still_in_process(["eval", f"model.uri={export}", f"data.source={corpus['text']}",
                                        "data.seq_len=32", "--json"], tmp_path, env=corpus["env"]))
    assert evaluated["val_ce"] == pytest.approx(out["val_ce"], rel=1e-4)
    assert evaluated["test_ce"] == pytest.approx(out["test_ce"], rel=1e-4)


@pytest.mark.timeout(300)
def test_accumulating_two_half_batches_is_one_full_batch(corpus, tmp_path, monkeypatch):
    from still.config import load_config
    from student_train.config import TrainConfig
    from student_train.driver import run_train

    monkeypatch.setenv("STILL_CACHE_DIR", corpus["env"]["STILL_CACHE_DIR"])
    runs = {}
    for name, batch, accum in (("full", 8, 1), ("halves", 4, 2)):
        cfg = load_config(TrainConfig, None, [f"data.source={corpus['text']}", f"data.tokenizer={corpus['tokenizer']}",
                                              *TINY, f"train.batch_size={batch}", f"train.grad_accum={accum}",
                                              "train.epochs=1", "train.grad_clip=0.5", "scaling.num_workers=0",
                                              "tracking.enabled=false", f"train.output_dir={tmp_path / name}",
                                              f"train.name={name}"])
        runs[name] = run_train(cfg)
    assert runs["halves"]["steps"] == runs["full"]["steps"]
    assert runs["halves"]["val_ce"] == pytest.approx(runs["full"]["val_ce"], rel=1e-5)
    assert runs["halves"]["test_ce"] == pytest.approx(runs["full"]["test_ce"], rel=1e-5)


@pytest.mark.timeout(120)
def test_bad_language_model_inputs_are_named(corpus, tmp_path):
    bad = still_cli(["train", f"data.source={corpus['text']}", f"data.tokenizer={corpus['tokenizer']}", *TINY,
                     "data.seq_len=4096", "scaling.num_workers=0"], tmp_path, timeout=100, env=corpus["env"])
    assert bad.returncode == 2 and "data.seq_len=4096" in bad.stderr and "student.max_positions" in bad.stderr

    from still.config import load_config
    from still.errors import StillError
    from student_train.config import TrainConfig
    from student_train.driver import run_train

    def train(*overrides):
        return run_train(load_config(TrainConfig, None, [f"data.source={corpus['text']}", *TINY, "train.epochs=1",
                                                         "scaling.num_workers=0", "tracking.enabled=false",
                                                         f"train.output_dir={tmp_path / 'bad'}", *overrides]))

    with pytest.raises(StillError, match="data.tokenizer is required"):
        train()
    empty = tmp_path / "no-tokenizer"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(StillError, match="lacks its tokenizer"):
        train(f"data.tokenizer={empty}")
    with pytest.raises(StillError, match="kd.hints applies to classifier students"):
        load_config(TrainConfig, None, [*TINY, "kd.hints=[features]"])


def test_schedule_decay_groups_and_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    from still.config import load_config
    from student_train.config import TrainConfig
    from student_train.lm_loop import causal_lm_loss, decay_groups, next_token_logits, scheduled_lr

    cfg = load_config(TrainConfig, None, ["train.lr=0.01", "train.warmup_steps=4", "train.lr_schedule=cosine"])
    assert [scheduled_lr(cfg, s, 104) for s in range(4)] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])
    assert scheduled_lr(cfg, 54, 104) == pytest.approx(0.005)  # half way through the cosine part
    assert scheduled_lr(cfg, 104, 104) == pytest.approx(0.0)

    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, tie_word_embeddings=True))
    decay, keep = decay_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" not in names[id(p)] and "embed" not in names[id(p)] for p in decay["params"])
    assert {names[id(p)] for p in keep["params"]} >= {"model.embed_tokens.weight", "model.norm.weight"}
    assert len(decay["params"]) + len(keep["params"]) == len(list(model.parameters()))  # tied: counted once
    assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0

    torch.manual_seed(0)
    logits, tokens = torch.randn(2, 5, 50) * 4, torch.randint(0, 50, (2, 5))
    log_p = torch.log_softmax(logits, dim=-1)
    expected = -sum(log_p[b, t, tokens[b, t + 1]] for b in range(2) for t in range(4)) / 8
    assert float(causal_lm_loss(logits[:, :-1], tokens)) == pytest.approx(float(expected), rel=1e-6)
    x = torch.randint(0, 50, (2, 7))
    torch.testing.assert_close(next_token_logits(model, x), model(input_ids=x).logits[:, :-1])
