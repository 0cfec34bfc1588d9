"""Getting a model: the hub reranker, a local directory, or an offline synthetic twin.

Without hub access the benchmarks run on the synthetic twin of jina-reranker-v2: the same
architecture and sizes, seeded random weights, a tokenizer trained on data.SENTENCES; its
timings are valid, its scores meaningless. Every other reranker family has a twin too
(twins.py: `synthetic-<family>` and `synthetic-<family>-tiny`, FAMILY_TWINS lists them).
Jina checkpoints (remote code, other weight names) convert to transformers' native
XLM-RoBERTa, which the fast path compiles.

    python models.py build-synthetic full   # prints the cached twin's directory
    python models.py build-synthetic tiny --family bert
    python models.py convert SRC DST         # jina checkpoint -> native XLM-R directory
"""

import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder

import packing
from twins import FAMILY_TWINS, family_twin_dir, parse_twin_name, twin_names  # noqa: F401 (re-exported)

HUB_ID = "jinaai/jina-reranker-v2-base-multilingual"
# A machine without hub access may drop packets instead of refusing them, and the hub client
# has no timeout of its own: one short probe decides before any download starts.
HUB_PROBE_TIMEOUT_S = 2.0
HUB_IGNORE = ["onnx/*", "*.onnx", "*.gguf", "*.h5", "*.msgpack", "*.ot"]  # exports PyTorch does not read
SYNTHETIC_MARKER = "synthetic.json"  # written last: a twin without it is incomplete
CONVERTED_MARKER = "converted_from.json"  # written last by convert_jina_checkpoint
SYNTHETIC_FORMAT = 2  # bump when the twin's recipe changes, so cached twins rebuild
SIZES = {
    "full": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 vocab_size=250002, initializer_range=0.05),
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 vocab_size=1024, initializer_range=0.3),
}
# initializer_range: with the trained model's 0.02 every input gets nearly the same logit (std
# ~1e-5 tiny, ~0.02 full), so score comparisons between setups would prove nothing. These larger
# ranges give logits that vary across inputs (std ~0.75 tiny, ~0.26 full) while keeping bf16
# within ~5-15% of that spread (random networks amplify rounding); timings do not depend on them.
# A small vocabulary splits the lorem-ipsum words into pieces the way a large multilingual one
# does (~1.4 tokens per word, ~190 tokens per load_pairs pair): realistic sequence lengths.
TOKENIZER_VOCAB_SIZE = 300
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0-4, as XLM-R expects


class ModelNotFoundError(ValueError):
    pass


def cache_root() -> str:
    return os.path.expanduser(os.environ.get("FAST_RERANK_CACHE") or "~/.cache/fast-rerank")


def _read_json(directory, name: str) -> dict:
    try:
        with open(os.path.join(str(directory), name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


# ---- resolving a model name ----

def resolve_model(name: str = "auto") -> str:
    """"auto" | "synthetic[-<family>][-tiny]" | hub id | local dir -> a directory CrossEncoder loads."""
    if name in ("synthetic", "synthetic-tiny"):
        return synthetic_dir("full" if name == "synthetic" else "tiny")
    if name.startswith("synthetic-") and not os.path.isdir(name):
        try:
            family, size = parse_twin_name(name)
        except ValueError as e:
            raise ModelNotFoundError(str(e)) from None
        return family_twin_dir(family, size)
    if name == "auto":
        path, tried = _hub_snapshot(HUB_ID)
        if path is None:
            print(f"note: {HUB_ID} is not available ({'; '.join(tried)}); using its synthetic twin: "
                  "RANDOM weights, scores are meaningless, timings are valid", file=sys.stderr)
            path = synthetic_dir("full")
        return path
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelNotFoundError(f"{name}: not a model directory (no config.json in it)")
        return os.path.abspath(path)
    if (name.startswith((".", "/", "~")) or os.path.exists(path) or name.count("/") > 1
            or ("/" in name and os.path.isdir(name.split("/")[0]))):
        state = "is not a directory" if os.path.exists(path) else "does not exist"
        raise ModelNotFoundError(f"model directory {name} {state}")
    if "/" not in name:
        raise ModelNotFoundError(f"unknown model {name!r}: expected auto, a hub id (org/name), a local model "
                                 f"directory or a synthetic twin ({', '.join(twin_names())})")
    path, tried = _hub_snapshot(name)
    if path is None:
        raise ModelNotFoundError(f"model {name} not found: {'; '.join(tried)}. Without hub access use "
                                 "--model synthetic (random weights, valid timings) or a local directory")
    return path


def _hub_snapshot(repo_id: str) -> tuple[str | None, list[str]]:
    """(local snapshot dir or None, what was tried): the HF cache first, then the hub."""
    from huggingface_hub import HfApi, constants, snapshot_download

    tried = []
    try:
        path = snapshot_download(repo_id, local_files_only=True, ignore_patterns=HUB_IGNORE)
        if os.path.isfile(os.path.join(path, "config.json")):
            return path, tried
        tried.append(f"HF cache: {path} has no config.json")
    except Exception:  # not cached, or not a valid repo id
        tried.append("HF cache: not there")
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return None, tried + ["hub: not asked (HF_HUB_OFFLINE is set)"]
    try:
        files = [f.rfilename for f in HfApi().model_info(repo_id, timeout=HUB_PROBE_TIMEOUT_S).siblings or []]
        legacy = ["*.bin", "*.pt", "*.pth"] if any(f.endswith(".safetensors") for f in files) else []
        return snapshot_download(repo_id, ignore_patterns=HUB_IGNORE + legacy), tried
    except Exception as e:
        return None, tried + [f"hub: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"]


def is_synthetic(path) -> bool:
    return os.path.isfile(os.path.join(str(path), SYNTHETIC_MARKER))


def model_source(path) -> str:
    """One line for reports: where the weights came from."""
    path = str(path)
    if meta := _read_json(path, SYNTHETIC_MARKER):
        family = f"{meta['family']}, " if "family" in meta else ""  # the xlm-roberta twin's marker has none
        return f"random-weight synthetic twin ({family}{meta['size']}, seed {meta['seed']})"
    if meta := _read_json(path, CONVERTED_MARKER):
        return f"{model_source(meta['source'])}, converted to native XLM-R"
    if hub := re.search(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots", path):
        return f"hub weights: {hub[1]}/{hub[2]}"
    return f"local: {os.path.abspath(path)}" if os.path.isdir(path) else f"hub weights: {path}"


# ---- the synthetic twin ----

def _train_tokenizer():
    """XLM-R tokenizer (Unigram, Metaspace, <s> A </s></s> B </s>) trained offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import XLMRobertaTokenizer

    from data import SENTENCES

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence([  # what XLMRobertaTokenizer applies at inference
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")])
    tok.train_from_iterator(SENTENCES, trainer=trainers.UnigramTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, unk_token="<unk>", show_progress=False))
    vocab = [(piece, score) for piece, score in json.loads(tok.to_str())["model"]["vocab"]]
    assert [piece for piece, _ in vocab[:5]] == SPECIAL_TOKENS, vocab[:5]
    # The trainer works in hash-map order: scores wobble in the last bits, and the fallback
    # characters it appends below every trained piece get their 1e-4-spaced scores in random
    # order. Rounding, one score for all fallback characters and a sort: the same ids every build.
    floor = min(score for piece, score in vocab[5:] if len(piece) > 1)
    fallback = {piece: score for piece, score in vocab[5:] if len(piece) == 1 and score < floor}
    pieces = [(p, round(min(fallback.values()), 4) if p in fallback else round(s, 6)) for p, s in vocab[5:]]
    vocab = vocab[:5] + sorted(pieces, key=lambda ps: (-ps[1], ps[0]))
    return XLMRobertaTokenizer(vocab=vocab, model_max_length=512)


def build_synthetic(path, size: str = "full", seed: int = 0) -> str:
    """Write a twin of the reference model into `path`: native XLM-R config, seeded random
    weights (bf16 for "full", fp32 for "tiny"), trained tokenizer; the marker goes last."""
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    os.makedirs(path, exist_ok=True)
    tokenizer = _train_tokenizer()
    assert len(tokenizer) <= SIZES[size]["vocab_size"]
    tokenizer.save_pretrained(path)
    dtype = torch.bfloat16 if size == "full" else torch.float32
    config = XLMRobertaConfig(
        **SIZES[size], max_position_embeddings=1026, type_vocab_size=1, num_labels=1, layer_norm_eps=1e-5,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, hidden_act="gelu",
        architectures=["XLMRobertaForSequenceClassification"], dtype=dtype)
    with torch.random.fork_rng(devices=[]):  # seeded, without moving the caller's RNG
        torch.manual_seed(seed)
        model = XLMRobertaForSequenceClassification(config)  # init: normal(0, initializer_range)
    model.to(dtype).save_pretrained(path)
    with open(os.path.join(path, SYNTHETIC_MARKER), "w") as f:
        json.dump({"size": size, "seed": seed, "format": SYNTHETIC_FORMAT}, f)
    return str(path)


def _build_atomically(final: str, build, complete) -> str:
    """Build into a temporary sibling, then rename: readers never see a half-written directory."""
    if complete(final):
        return final
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(final)}-", dir=os.path.dirname(final))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if os.path.isdir(final) and not complete(final):
            shutil.rmtree(final)  # left over from an interrupted build
        os.rename(tmp, final)
    except OSError:
        if not complete(final):  # unless another process finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def synthetic_dir(size: str = "full", seed: int = 0) -> str:
    """The cached twin's directory under cache_root(), built on first use."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    final = os.path.join(cache_root(), f"synthetic-{size}-seed{seed}")

    def complete(path):
        return _read_json(path, SYNTHETIC_MARKER) == {"size": size, "seed": seed, "format": SYNTHETIC_FORMAT}

    if not complete(final):
        print(f"building the {size} synthetic twin in {final} (once)", file=sys.stderr)
    return _build_atomically(final, lambda tmp: build_synthetic(tmp, size, seed), complete)


# ---- jina checkpoints <-> native XLM-R ----

# jina module name -> native module name, "{}" standing for the layer index
_RENAMES = {
    "roberta.embeddings.word_embeddings": "roberta.embeddings.word_embeddings",
    "roberta.embeddings.position_embeddings": "roberta.embeddings.position_embeddings",
    "roberta.embeddings.token_type_embeddings": "roberta.embeddings.token_type_embeddings",
    "roberta.emb_ln": "roberta.embeddings.LayerNorm",
    "roberta.encoder.layers.{}.mixer.out_proj": "roberta.encoder.layer.{}.attention.output.dense",
    "roberta.encoder.layers.{}.norm1": "roberta.encoder.layer.{}.attention.output.LayerNorm",
    "roberta.encoder.layers.{}.mlp.fc1": "roberta.encoder.layer.{}.intermediate.dense",
    "roberta.encoder.layers.{}.mlp.fc2": "roberta.encoder.layer.{}.output.dense",
    "roberta.encoder.layers.{}.norm2": "roberta.encoder.layer.{}.output.LayerNorm",
    "classifier.dense": "classifier.dense",
    "classifier.out_proj": "classifier.out_proj",
}
_WQKV = "roberta.encoder.layers.{}.mixer.Wqkv"  # rows: query, key, value
_SELF = "roberta.encoder.layer.{}.attention.self"
# Safe to drop: position-id buffers are recomputed from input_ids, and the classifier reads
# token 0 itself, so a pooler (absent from the reranker) would never run.
_DROPPABLE = re.compile(r"roberta\.embeddings\.(position_ids|token_type_ids)|roberta\.pooler\..+")


def _split(key: str) -> tuple[str, list[str], str]:
    """"roberta.encoder.layers.3.norm1.weight" -> ("roberta.encoder.layers.{}.norm1", ["3"], "weight")"""
    module, _, kind = key.rpartition(".")
    return re.sub(r"\.\d+\.", ".{}.", module), re.findall(r"\.(\d+)\.", module), kind


def jina_to_native_state_dict(sd: dict) -> dict:
    """jina-reranker-v2 weight names -> transformers XLMRobertaForSequenceClassification names."""
    out, unknown = {}, []
    for key, value in sd.items():
        module, layer, kind = _split(key)
        if module == _WQKV:  # clone: safetensors refuses tensors that share storage
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"{_SELF.format(*layer)}.{name}.{kind}"] = part.clone()
        elif module in _RENAMES:
            out[f"{_RENAMES[module].format(*layer)}.{kind}"] = value
        elif not _DROPPABLE.fullmatch(key):
            unknown.append(key)
    if unknown:
        raise ValueError(f"unknown keys in jina checkpoint: {', '.join(unknown)}")
    return out


def native_to_jina_state_dict(sd: dict) -> dict:
    """The inverse of jina_to_native_state_dict (buffers and pooler are not restored)."""
    inverse = {native: jina for jina, native in _RENAMES.items()}
    out, unknown = {}, []
    for key, value in sd.items():
        module, layer, kind = _split(key)
        if module == f"{_SELF}.query":
            parts = [sd[f"{_SELF.format(*layer)}.{name}.{kind}"] for name in ("query", "key", "value")]
            out[f"{_WQKV.format(*layer)}.{kind}"] = torch.cat(parts, dim=0)
        elif module in inverse:
            out[f"{inverse[module].format(*layer)}.{kind}"] = value
        elif module not in (f"{_SELF}.key", f"{_SELF}.value") and not _DROPPABLE.fullmatch(key):
            unknown.append(key)
    if unknown:
        raise ValueError(f"unknown keys in native checkpoint: {', '.join(unknown)}")
    return out


def is_jina_checkpoint(path) -> bool:
    """True for a directory whose config loads jina's XLMRobertaFlash remote code."""
    auto_map = _read_json(path, "config.json").get("auto_map") or {}
    return any("XLMRobertaFlash" in str(v) for v in auto_map.values())


def _load_state_dict(path: str) -> dict:
    from safetensors.torch import load_file

    if files := sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        return {k: v for f in files for k, v in load_file(f).items()}
    if files := sorted(glob.glob(os.path.join(path, "pytorch_model*.bin"))):
        return {k: v for f in files for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}
    raise FileNotFoundError(f"{path}: no *.safetensors or pytorch_model*.bin weights")


def convert_jina_checkpoint(src, dst) -> str:
    """Write a native XLMRobertaForSequenceClassification directory (config, safetensors
    weights, tokenizer files) for the jina checkpoint in `src`."""
    from safetensors.torch import save_file
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    src, dst = str(src), str(dst)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: no such directory")
    if not is_jina_checkpoint(src):
        raise ValueError(f"{src}: not a jina checkpoint (config.json has no XLMRobertaFlash auto_map)")
    jina = _read_json(src, "config.json")
    sd = jina_to_native_state_dict(_load_state_dict(src))
    dims = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "type_vocab_size", "pad_token_id", "bos_token_id", "eos_token_id",
            "hidden_act", "classifier_dropout")
    config = XLMRobertaConfig(
        **{k: jina[k] for k in dims if jina.get(k) is not None}, num_labels=jina.get("num_labels", 1),
        layer_norm_eps=jina.get("layer_norm_eps", 1e-5), architectures=["XLMRobertaForSequenceClassification"],
        dtype=jina.get("dtype") or jina.get("torch_dtype") or str(next(iter(sd.values())).dtype)[len("torch."):])
    with torch.device("meta"):  # checks every name and shape without allocating weights
        XLMRobertaForSequenceClassification(config).load_state_dict(sd, strict=True, assign=True)
    os.makedirs(dst, exist_ok=True)
    config.save_pretrained(dst)
    save_file(sd, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    for pattern in ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "*.model"):
        for f in glob.glob(os.path.join(src, pattern)):
            shutil.copy(f, dst)
    with open(os.path.join(dst, CONVERTED_MARKER), "w") as f:
        json.dump({"source": os.path.abspath(src)}, f)
    return dst


def native_checkpoint(path) -> str:
    """A native XLM-R directory for `path`: jina checkpoints are converted once into the cache."""
    if not is_jina_checkpoint(path):
        return str(path)
    src = os.path.realpath(path)
    final = os.path.join(cache_root(), "converted",
                         f"{os.path.basename(src)}-{hashlib.sha256(src.encode()).hexdigest()[:16]}")
    return _build_atomically(final, lambda tmp: convert_jina_checkpoint(src, tmp),
                             lambda p: os.path.isfile(os.path.join(p, CONVERTED_MARKER)))


def checkpoint_dir(name: str, *, local_files_only: bool = False) -> str:
    """A local checkpoint directory for a directory or a hub id (fetched by huggingface_hub, as
    CrossEncoder would). jina-reranker-v2's layout loads into XLM-R with unmatched weights (random
    scores, silently), so it is converted to the native layout once and cached."""
    path = os.path.expanduser(name)
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(name, local_files_only=local_files_only)
        except Exception as e:  # not a repo id, not cached offline, no network, ...
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ValueError(f"model_name_or_path {name!r} is not a local directory and could not be fetched "
                             f"from the hub ({reason})") from None
    return native_checkpoint(path) if is_jina_checkpoint(path) else path


# ---- loading the baseline ----

def apply_transformers5_compat() -> None:
    """Let jina's remote code import on transformers 5, without editing downloaded files.

    It does `from transformers.models.xlm_roberta.modeling_xlm_roberta import
    create_position_ids_from_input_ids`, which transformers 5 moved onto XLMRobertaEmbeddings
    as a staticmethod. A module-level alias with the old signature restores the import.
    Idempotent; a no-op where the function still exists (transformers 4)."""
    from transformers.models.xlm_roberta import modeling_xlm_roberta as xlmr

    if hasattr(xlmr, "create_position_ids_from_input_ids"):
        return
    moved = xlmr.XLMRobertaEmbeddings.create_position_ids_from_input_ids

    def create_position_ids_from_input_ids(input_ids, padding_idx, past_key_values_length=0):
        return moved(input_ids, padding_idx, past_key_values_length)  # now named cache_length

    xlmr.create_position_ids_from_input_ids = create_position_ids_from_input_ids


def load_baseline(path, *, device, dtype, max_length) -> tuple["CrossEncoder", str]:
    """-> (CrossEncoder as users run it, attention name). dtype: a torch.dtype, or None for fp32
    on CPU and the config's dtype on CUDA. Jina checkpoints run their remote code."""
    from sentence_transformers import CrossEncoder

    path, on_cuda = str(path), packing.is_cuda(device)
    # flash-attn kernels take only fp16/bf16; None on CUDA means the config's bf16
    flash = packing.flash_attn_available() and on_cuda and dtype in (None, torch.float16, torch.bfloat16)
    model_kwargs = {"dtype": dtype if dtype is not None else ("auto" if on_cuda else torch.float32)}
    kwargs = dict(device=device, max_length=max_length, local_files_only=os.path.isdir(path))
    if is_jina_checkpoint(path):
        apply_transformers5_compat()
        model = CrossEncoder(path, trust_remote_code=True, config_kwargs={"use_flash_attn": flash},
                             model_kwargs=model_kwargs, **kwargs)
        why = ("flash-attn not installed" if not packing.flash_attn_available()
               else f"no flash-attn on {device}, {dtype}")
        return model, "jina remote code + flash-attn" if flash else f"jina remote code ({why}: torch attention)"
    attention = "flash_attention_2" if flash else "sdpa"
    model = CrossEncoder(path, model_kwargs={**model_kwargs, "attn_implementation": attention}, **kwargs)
    return model, attention


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Model utilities for the fast-rerank benchmarks.")
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="convert a jina-reranker-v2 checkpoint to native XLM-RoBERTa")
    convert.add_argument("src", help="directory of the jina checkpoint (config.json with auto_map, weights)")
    convert.add_argument("dst", help="directory to write the native checkpoint into")
    build = sub.add_parser("build-synthetic", help="build (once) and print a synthetic twin's directory")
    build.add_argument("size", choices=sorted(SIZES), help="full: the mirrored model's sizes; tiny: for tests")
    build.add_argument("--family", choices=list(FAMILY_TWINS), default="xlm-roberta",
                       help="model family to mirror (default xlm-roberta: jina-reranker-v2's twin)")
    build.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = parser.parse_args(argv)
    try:
        print(convert_jina_checkpoint(args.src, args.dst) if args.command == "convert"
              else family_twin_dir(args.family, args.size, args.seed))
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
