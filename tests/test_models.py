"""models.py: the synthetic twin, resolving model names, jina <-> native conversion, the
transformers 5 fix for jina's remote code, and loading the baseline CrossEncoder."""

import json
import os
import shutil
import socket
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sentence_transformers import CrossEncoder
from transformers import AutoTokenizer, XLMRobertaForSequenceClassification
from transformers.models.xlm_roberta import modeling_xlm_roberta as xlmr

import data
import models
import packing

PAIRS = [
    ["Lorem ipsum dolor sit amet.", "Consectetur adipiscing elit sed do eiusmod tempor."],
    ["Quis nostrud ullamco laboris.", "Nisi aliquip ex ea commodo consequat duis aute irure."],
    ["Excepteur sint occaecat.", "Cupidatat non proident sunt in culpa qui officia."],
] + data.load_pairs(5, seed=3)


def fp32_logits(path) -> np.ndarray:
    ce = CrossEncoder(str(path), device="cpu", local_files_only=True, activation_fn=torch.nn.Identity(),
                      model_kwargs={"dtype": torch.float32})
    return ce.predict(PAIRS)


def native_tokenize(path):
    return AutoTokenizer.from_pretrained(path)([a for a, _ in PAIRS], [b for _, b in PAIRS],
                                               padding=True, return_tensors="pt")


# ---- the synthetic twin ----------------------------------------------------------------

def test_tiny_twin_loads_offline_and_scores_vary(tiny_model_dir, tiny_cross_encoder):
    config = json.load(open(os.path.join(tiny_model_dir, "config.json")))
    assert config["architectures"] == ["XLMRobertaForSequenceClassification"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["max_position_embeddings"]) == (2, 32, 1026)
    assert config["layer_norm_eps"] == 1e-5 and len(config["id2label"]) == 1  # num_labels 1
    assert tiny_cross_encoder.num_labels == 1
    scores = tiny_cross_encoder.predict(PAIRS)
    assert scores.shape == (len(PAIRS),) and np.all((scores > 0) & (scores < 1))
    logits = fp32_logits(tiny_model_dir)
    assert len(set(logits.tolist())) == len(PAIRS) and np.ptp(logits) > 1e-6, "inputs must score apart"
    assert models.is_synthetic(tiny_model_dir)
    assert models.model_source(tiny_model_dir) == "random-weight synthetic twin (tiny, seed 0)"


def test_tokenizer_special_ids_and_pair_template(tiny_cross_encoder):
    tok = tiny_cross_encoder.tokenizer
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    a, b = "Lorem ipsum dolor.", "Sit amet elit."
    ids = tok(a, b)["input_ids"]
    ids_a = tok(a, add_special_tokens=False)["input_ids"]
    ids_b = tok(b, add_special_tokens=False)["input_ids"]
    assert ids == [0, *ids_a, 2, 2, *ids_b, 2]  # <s> A </s></s> B </s>
    assert 3 not in ids_a + ids_b, "corpus words must not fall back to <unk>"
    assert tok.model_max_length == 512


def test_max_length_512_truncates_and_runs(tiny_cross_encoder):
    long = " ".join(data.SENTENCES[:200])
    features = tiny_cross_encoder.tokenizer([long], [long], truncation=True, max_length=512)
    assert len(features["input_ids"][0]) == 512
    assert np.isfinite(tiny_cross_encoder.predict([[long, long]])).all()


def test_twin_rebuilds_when_marker_missing(tiny_model_dir):
    path = models.synthetic_dir("tiny", seed=7)
    weights = load_file(os.path.join(path, "model.safetensors"))
    os.remove(os.path.join(path, models.SYNTHETIC_MARKER))
    open(os.path.join(path, "partial.bin"), "w").close()  # what an interrupted build leaves
    assert models.synthetic_dir("tiny", seed=7) == path
    assert models.is_synthetic(path) and not os.path.exists(os.path.join(path, "partial.bin"))
    rebuilt = load_file(os.path.join(path, "model.safetensors"))
    assert all(torch.equal(weights[k], rebuilt[k]) for k in weights), "same seed, same weights"
    assert open(os.path.join(path, "tokenizer.json")).read() == \
        open(os.path.join(tiny_model_dir, "tokenizer.json")).read(), "every build, the same token ids"
    seed0 = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert not torch.equal(seed0["classifier.dense.weight"], rebuilt["classifier.dense.weight"])


@pytest.mark.skipif(not os.environ.get("FAST_RERANK_FULL_TWIN_TEST"),
                    reason="builds the 532 MB full twin (~15 s); set FAST_RERANK_FULL_TWIN_TEST=1")
def test_full_twin_has_the_reference_shape(tmp_path):
    path = models.build_synthetic(tmp_path / "full", size="full")
    weights = load_file(os.path.join(path, "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    assert weights["roberta.embeddings.word_embeddings.weight"].shape == (250002, 768)
    assert 277e6 < sum(w.numel() for w in weights.values()) < 279e6
    config = json.load(open(os.path.join(path, "config.json")))
    assert (config["num_hidden_layers"], config["intermediate_size"], config["dtype"]) == (12, 3072, "bfloat16")


def test_cli_build_synthetic_prints_cached_path(tiny_model_dir, capsys):
    models.main(["build-synthetic", "tiny"])
    assert capsys.readouterr().out.strip() == tiny_model_dir


# ---- resolving model names -------------------------------------------------------------

def test_resolve_synthetic_tiny_and_local_dir(tiny_model_dir):
    assert models.resolve_model("synthetic-tiny") == tiny_model_dir
    assert models.resolve_model(tiny_model_dir) == tiny_model_dir
    assert models.model_source("jinaai/some-model") == "hub weights: jinaai/some-model"


@pytest.mark.parametrize("name, message", [
    ("./no-such-model", "model directory ./no-such-model does not exist"),
    ("/no/such/dir", "does not exist"),
    ("~/no-such-fast-rerank-model", "does not exist"),
    ("not-a-model", "unknown model 'not-a-model'"),
])
def test_resolve_bad_names(name, message):
    with pytest.raises(models.ModelNotFoundError, match=message):
        models.resolve_model(name)


def test_resolve_dir_without_config(tmp_path):
    with pytest.raises(models.ModelNotFoundError, match="no config.json"):
        models.resolve_model(str(tmp_path))


def test_resolve_unknown_hub_id_offline_never_asks_the_hub(monkeypatch):
    """HF_HUB_OFFLINE (set for these tests, and on machines without hub access): only the local
    cache is read, so a wrong name fails at once with a message naming the way out."""
    import huggingface_hub

    real_snapshot_download = huggingface_hub.snapshot_download

    def cache_only(*args, **kwargs):
        assert kwargs.get("local_files_only"), "snapshot_download asked the hub"
        return real_snapshot_download(*args, **kwargs)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", cache_only)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda *a, **k: pytest.fail("the hub was asked"))
    with pytest.raises(models.ModelNotFoundError) as error:
        models.resolve_model("nobody-here/no-such-reranker")
    message = str(error.value)
    assert "nobody-here/no-such-reranker" in message and "--model synthetic" in message
    assert "hub: not asked (HF_HUB_OFFLINE is set)" in message


def test_hub_probe_does_not_hang_on_a_silent_hub(monkeypatch):
    """A hub that accepts connections and never answers (dropped traffic) costs a few seconds."""
    from huggingface_hub import constants

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    monkeypatch.setattr(models, "HUB_PROBE_TIMEOUT_S", 0.3)
    start = time.perf_counter()
    with pytest.raises(models.ModelNotFoundError, match="--model synthetic"):
        models.resolve_model("nobody-here/no-such-reranker")
    silent.close()
    assert time.perf_counter() - start < 10


def test_hub_download_skips_exports_and_duplicate_weights(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.hf_api import ModelInfo

    calls = []

    def snapshot_download(repo_id, local_files_only=False, ignore_patterns=None):
        calls.append((repo_id, local_files_only, ignore_patterns))
        if local_files_only:
            raise FileNotFoundError("not cached")
        return "/hub/snapshot"

    files = ["config.json", "model.safetensors", "pytorch_model.bin", "onnx/model.onnx", "modeling.py"]
    info = ModelInfo(id="org/name", siblings=[{"rfilename": f} for f in files])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, timeout: info)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert models.resolve_model("org/name") == "/hub/snapshot"
    (_, _, ignored), = [c for c in calls if not c[1]]
    assert {"onnx/*", "*.bin"} <= set(ignored) and "*.safetensors" not in ignored


def test_auto_falls_back_to_twin_with_one_line_notice(monkeypatch, capsys):
    monkeypatch.setattr(models, "_hub_snapshot", lambda repo: (None, ["HF cache: not there"]))
    monkeypatch.setattr(models, "synthetic_dir", lambda size="full", seed=0: f"<twin {size}>")
    assert models.resolve_model() == "<twin full>"
    notice = capsys.readouterr().err
    assert notice.count("\n") == 1 and "RANDOM weights" in notice and models.HUB_ID in notice

    monkeypatch.setattr(models, "_hub_snapshot", lambda repo: ("/hub/snapshot", []))
    assert models.resolve_model("auto") == "/hub/snapshot"


# ---- jina <-> native conversion --------------------------------------------------------

def test_state_dict_round_trip_gives_identical_logits(tiny_model_dir):
    native = XLMRobertaForSequenceClassification.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    sd = native.state_dict()
    jina = models.native_to_jina_state_dict(sd)
    assert jina["roberta.encoder.layers.1.mixer.Wqkv.weight"].shape == (96, 32)
    assert not any(".layer." in k or "attention" in k for k in jina)
    back = models.jina_to_native_state_dict(jina)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)

    reloaded = XLMRobertaForSequenceClassification(native.config).eval()
    reloaded.load_state_dict(back, strict=True)
    features = native_tokenize(tiny_model_dir)
    with torch.no_grad():
        assert torch.equal(native(**features).logits, reloaded(**features).logits)



def test_wqkv_rows_are_query_key_value():
    h = 4
    wqkv = torch.arange(3 * h * h, dtype=torch.float32).reshape(3 * h, h)
    out = models.jina_to_native_state_dict({"roberta.encoder.layers.0.mixer.Wqkv.weight": wqkv})
    assert torch.equal(out["roberta.encoder.layer.0.attention.self.query.weight"], wqkv[:h])
    assert torch.equal(out["roberta.encoder.layer.0.attention.self.value.weight"], wqkv[2 * h:])


def test_unknown_jina_key_is_named_and_buffers_are_dropped(tiny_model_dir):
    jina = models.native_to_jina_state_dict(load_file(os.path.join(tiny_model_dir, "model.safetensors")))
    extra = {"roberta.embeddings.position_ids": torch.arange(8)[None],
             "roberta.pooler.dense.weight": torch.zeros(32, 32)}
    assert models.jina_to_native_state_dict({**jina, **extra}).keys() == \
        models.jina_to_native_state_dict(jina).keys()
    with pytest.raises(ValueError, match=r"roberta\.encoder\.layers\.0\.mixer\.rotary_emb\.inv_freq"):
        models.jina_to_native_state_dict({**jina, "roberta.encoder.layers.0.mixer.rotary_emb.inv_freq": torch.ones(2)})


# A miniature of jina's remote code: the same module names and weight names, post-norm
# blocks, and the transformers 4 import that transformers 5 no longer provides.
JINA_CONFIG_PY = '''
from transformers import PretrainedConfig


class XLMRobertaFlashConfig(PretrainedConfig):
    def __init__(self, vocab_size=1024, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=1026, type_vocab_size=1,
                 layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                 use_flash_attn=True, **kwargs):
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, **kwargs)
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.intermediate_size, self.max_position_embeddings = intermediate_size, max_position_embeddings
        self.type_vocab_size, self.layer_norm_eps = type_vocab_size, layer_norm_eps
        self.use_flash_attn = use_flash_attn
'''

JINA_MODELING_PY = '''
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.xlm_roberta.modeling_xlm_roberta import create_position_ids_from_input_ids

from .configuration_jina import XLMRobertaFlashConfig


class Embeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)

    def forward(self, input_ids):
        pos = create_position_ids_from_input_ids(input_ids, padding_idx=self.word_embeddings.padding_idx)
        types = self.token_type_embeddings(torch.zeros_like(input_ids))
        return self.word_embeddings(input_ids) + self.position_embeddings(pos) + types


class MHA(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.heads = c.num_attention_heads
        self.Wqkv = nn.Linear(c.hidden_size, 3 * c.hidden_size)
        self.out_proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x, keep):
        b, s, d = x.shape
        q, k, v = self.Wqkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        return self.out_proj(o.transpose(1, 2).reshape(b, s, d))


class Mlp(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.mixer, self.mlp = MHA(c), Mlp(c)
        self.norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x, keep):
        x = self.norm1(x + self.mixer(x, keep))
        return self.norm2(x + self.mlp(x))


class Encoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layers = nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers))


class Roberta(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embeddings = Embeddings(c)
        self.emb_ln = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.encoder = Encoder(c)


class Head(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.out_proj = nn.Linear(c.hidden_size, c.num_labels)


class XLMRobertaForSequenceClassification(PreTrainedModel):
    config_class = XLMRobertaFlashConfig
    base_model_prefix = "roberta"

    def __init__(self, config):
        super().__init__(config)
        self.roberta, self.classifier = Roberta(config), Head(config)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        x = self.roberta.emb_ln(self.roberta.embeddings(input_ids))
        for layer in self.roberta.encoder.layers:
            x = layer(x, keep)
        logits = self.classifier.out_proj(torch.tanh(self.classifier.dense(x[:, 0])))
        return SequenceClassifierOutput(logits=logits)
'''


def write_jina_checkpoint(native_dir, dst) -> str:
    """A jina-format checkpoint (remote code, jina weight names) with the tiny twin's weights."""
    os.makedirs(dst)
    native = json.load(open(os.path.join(native_dir, "config.json")))
    config = {k: native[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                     "intermediate_size", "max_position_embeddings", "type_vocab_size",
                                     "pad_token_id", "bos_token_id", "eos_token_id", "hidden_act")}
    config.update(  # like the hub config: no model_type, classes from auto_map
        architectures=["XLMRobertaForSequenceClassification"], num_labels=1, layer_norm_eps=1e-5,
        use_flash_attn=True, torch_dtype="float32",
        auto_map={"AutoConfig": "configuration_jina.XLMRobertaFlashConfig",
                  "AutoModelForSequenceClassification": "modeling_jina.XLMRobertaForSequenceClassification"})
    json.dump(config, open(os.path.join(dst, "config.json"), "w"))
    open(os.path.join(dst, "configuration_jina.py"), "w").write(JINA_CONFIG_PY)
    open(os.path.join(dst, "modeling_jina.py"), "w").write(JINA_MODELING_PY)
    sd = models.native_to_jina_state_dict(load_file(os.path.join(native_dir, "model.safetensors")))
    save_file(sd, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(native_dir, name), dst)
    return str(dst)


def test_convert_jina_checkpoint(tiny_model_dir, tmp_path):
    jina_dir = write_jina_checkpoint(tiny_model_dir, tmp_path / "jina")
    assert models.is_jina_checkpoint(jina_dir) and not models.is_jina_checkpoint(tiny_model_dir)
    out = models.convert_jina_checkpoint(jina_dir, tmp_path / "native")
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model_type"] == "xlm-roberta" and config["layer_norm_eps"] == 1e-5
    assert config["architectures"] == ["XLMRobertaForSequenceClassification"] and "auto_map" not in config
    np.testing.assert_array_equal(fp32_logits(out), fp32_logits(tiny_model_dir))
    assert models.model_source(out).endswith("converted to native XLM-R")

    cached = models.native_checkpoint(jina_dir)
    assert cached.startswith(os.environ["FAST_RERANK_CACHE"]) and models.native_checkpoint(jina_dir) == cached
    assert models.native_checkpoint(tiny_model_dir) == tiny_model_dir


def test_dynamic_cross_encoder_converts_jina_checkpoints(tiny_model_dir, tiny_cross_encoder, tmp_path):
    from dynamic_cross_encoder import DynamicCrossEncoder

    jina_dir = write_jina_checkpoint(tiny_model_dir, tmp_path / "jina")
    for packed in (False, True):
        model = DynamicCrossEncoder(jina_dir, device="cpu", compile=False, packed=packed,
                                    model_kwargs={"dtype": torch.float32})
        assert model.model.config.model_type == "xlm-roberta" and model.packed is packed
        # fp32, same weights under other names: only summation order differs
        np.testing.assert_allclose(model.predict(PAIRS), tiny_cross_encoder.predict(PAIRS), atol=1e-6)
    # a directory or a hub id only: the scripts resolve names like "synthetic-tiny" (models.resolve_model)
    with pytest.raises(ValueError, match="nobody/no-such-model"):
        DynamicCrossEncoder("nobody/no-such-model", device="cpu", compile=False)


def test_convert_rejects_native_dir_with_exit_code_2(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        models.main(["convert", tiny_model_dir, str(tmp_path / "out")])
    assert exit_.value.code == 2 and "not a jina checkpoint" in capsys.readouterr().err


# ---- the transformers 5 fix for jina's remote code -------------------------------------

def test_compat_alias_matches_the_staticmethod():
    models.apply_transformers5_compat()
    models.apply_transformers5_compat()  # idempotent
    alias = xlmr.create_position_ids_from_input_ids
    ids = torch.tensor([[0, 7, 8, 2, 1, 1], [0, 9, 2, 2, 10, 2]])
    expected = torch.tensor([[2, 3, 4, 5, 1, 1], [2, 3, 4, 5, 6, 7]])  # pads keep padding_idx
    assert torch.equal(alias(ids, 1), expected)
    assert torch.equal(alias(ids, padding_idx=1), expected)
    moved = xlmr.XLMRobertaEmbeddings.create_position_ids_from_input_ids
    assert torch.equal(alias(ids, 1, past_key_values_length=3), moved(ids, 1, 3))


def test_remote_code_loads_only_with_the_compat_fix(tiny_model_dir, tiny_cross_encoder, tmp_path, monkeypatch):
    if not hasattr(xlmr.XLMRobertaEmbeddings, "create_position_ids_from_input_ids"):
        pytest.skip("transformers 4: the module-level function still exists")
    jina_dir = write_jina_checkpoint(tiny_model_dir, tmp_path / "jina")
    monkeypatch.delattr(xlmr, "create_position_ids_from_input_ids", raising=False)
    with pytest.raises(ImportError, match="create_position_ids_from_input_ids"):
        CrossEncoder(jina_dir, device="cpu", trust_remote_code=True, local_files_only=True)

    model, attention = models.load_baseline(jina_dir, device="cpu", dtype=None, max_length=512)
    assert attention.startswith("jina remote code (") and "torch attention" in attention
    assert type(model.model).__module__.endswith("modeling_jina")
    assert model.model.dtype == torch.float32 and model.max_seq_length == 512
    np.testing.assert_allclose(model.predict(PAIRS), tiny_cross_encoder.predict(PAIRS), atol=1e-6)


def test_load_baseline_native(tiny_model_dir, tiny_cross_encoder, monkeypatch):
    monkeypatch.setattr(packing, "flash_attn_available", lambda: True)  # flash-attn kernels are CUDA-only
    model, attention = models.load_baseline(tiny_model_dir, device="cpu", dtype=torch.bfloat16, max_length=128)
    assert attention == "sdpa" and model.model.dtype == torch.bfloat16 and model.max_seq_length == 128
    logits = model.predict(PAIRS, activation_fn=torch.nn.Identity())
    model32_128, _ = models.load_baseline(tiny_model_dir, device="cpu", dtype=torch.float32, max_length=128)
    ref = model32_128.predict(PAIRS, activation_fn=torch.nn.Identity())
    # Relative to the fp32 reference at the same truncation: the twin keeps bf16 within ~5-15% of
    # its logits' spread (models.SIZES; ~7% seen here).
    assert np.abs(logits - ref).max() <= 0.15 * ref.std()
    # and the bf16 model is exactly the fp32 one rounded to bf16: the same logits to the bit
    model32_128.model.to(torch.bfloat16)
    np.testing.assert_array_equal(logits, model32_128.predict(PAIRS, activation_fn=torch.nn.Identity()))
    model32, _ = models.load_baseline(tiny_model_dir, device="cpu", dtype=None, max_length=512)
    assert model32.model.dtype == torch.float32
