"""Llama-family import: a tiny random model saved by `transformers` (Llama, Qwen2, and Mistral with a sliding
window shorter than the test sequences) gives the same logits (within 1e-4) and the same greedy continuation
here (`loopformer import` + `loopformer generate --json`), and `loopformer export` gives it back.

Needs the test extra ``hf`` (transformers with CPU torch; .ci/run installs it); skipped without it."""

import json
from pathlib import Path

import numpy as np
import pytest

from loopformer.cli import main
from loopformer.surgery.hf import import_folder, model_config

torch = pytest.importorskip("torch", reason="the HF import test needs the test extra: pip install -e '.[hf]'")
transformers = pytest.importorskip("transformers", reason="the HF import test needs the test extra: pip install -e '.[hf]'")

TEXT = Path(__file__).resolve().parents[2] / "loopformer" / "assets" / "kjv_genesis_exodus.txt"


def make_tokenizer(path: Path, vocab: int = 300, bos: bool = False) -> int:
    """A byte-level BPE with <s> and </s> written as a tokenizer.json; with ``bos`` its post-processor puts
    <s> before every text, as Llama 3's puts <|begin_of_text|> (Qwen2's adds nothing). Returns its vocab size."""
    import tokenizers as hf

    tok = hf.Tokenizer(hf.models.BPE())
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                     initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT.read_text()[:20000]], trainer)
    if bos:
        tok.post_processor = hf.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(path))
    return tok.get_vocab_size()


def save_tiny(folder: Path, kind: str, seed: int = 0, rope_scaling: dict | None = None, window: int | None = None) -> object:
    """A random tiny ``kind`` model (grouped-query attention, non-default eps and theta) saved with its
    tokenizer; weights ~ N(0, 0.2) so greedy choices are clear-cut. Llama and Mistral folders' tokenizers add a
    BOS; ``window`` is Mistral's sliding_window."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(folder / "tokenizer.json", bos=kind in ("llama", "mistral"))
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=50000.0, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if rope_scaling:
        common["rope_scaling"] = {"rope_theta": 50000.0} | rope_scaling
    if kind == "llama":
        config = transformers.LlamaConfig(**common, tie_word_embeddings=False)
        model_cls = transformers.LlamaForCausalLM
    elif kind == "mistral":
        config = transformers.MistralConfig(**common, tie_word_embeddings=False, sliding_window=window)
        model_cls = transformers.MistralForCausalLM
    else:
        config = transformers.Qwen2Config(**common, tie_word_embeddings=True)
        model_cls = transformers.Qwen2ForCausalLM
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    return model


WINDOW = 8  # the Mistral's sliding_window: shorter than every test sequence, so the window matters


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def hf_model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / request.param
    return folder, save_tiny(folder, request.param, window=WINDOW if request.param == "mistral" else None)


def test_config_is_read_with_its_eps_theta_and_heads(hf_model):
    folder, model = hf_model
    cfg = model_config(json.loads((folder / "config.json").read_text()))
    assert (cfg.prelude, cfg.coda, cfg.stages, cfg.d_model, cfg.heads, cfg.kv_head_count) == (3, 0, [], 32, 4, 2)
    assert (cfg.norm_eps, cfg.rope_base, cfg.mlp, cfg.mlp_hidden) == (1e-5, 50000.0, "swiglu", 72)
    assert cfg.qkv_bias == (model.config.model_type == "qwen2")
    assert cfg.tie_embeddings == (model.config.model_type == "qwen2")
    assert cfg.window == (WINDOW if model.config.model_type == "mistral" else 0)


def test_logits_match_transformers(hf_model):
    import jax.numpy as jnp
    from flax import nnx

    from loopformer.model.plan import make_plan
    from loopformer.model.transformer import build_model

    folder, model = hf_model
    cfg, params, _ = import_folder(folder)
    ours = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: build_model(cfg, cfg.vocab_size, 0))),
                     nnx.State(params) if not isinstance(params, nnx.State) else params)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40))
    logits = np.asarray(ours(jnp.asarray(tokens), make_plan([], {}))[0])
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    assert np.abs(logits - ref).max() < 1e-4
    if model.config.model_type == "mistral":  # the sliding window matters: full attention gives other logits
        full = transformers.MistralForCausalLM(transformers.MistralConfig(
            **(model.config.to_dict() | {"sliding_window": None}))).eval()
        full.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert np.abs(full(torch.tensor(tokens)).logits.numpy() - ref).max() > 1e-2


@pytest.mark.slow  # end to end with transformers (import, generate, eval, rys, convert): CI runs it with the slow tests
def test_imported_run_generates_what_transformers_generates(hf_model, tmp_path, capsys):
    folder, model = hf_model
    out = tmp_path / "imported"
    assert main(["import", "--hf", str(folder), "--out", str(out)]) == 0
    capsys.readouterr()
    prompt = "And God said, Let there be"
    assert main(["generate", "--run", str(out), "--prompt", prompt, "--max-new-tokens", "12", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    ids = doc["prompt_tokens"]
    # the prompt is encoded as transformers' tokenizer encodes it (#26): <s> first where the tokenizer's
    # post-processor adds it (the llama and mistral folders'), nothing added where it adds nothing (qwen2's);
    # the prompt and its continuation run past the Mistral's window, in the cache too
    assert ids == transformers.AutoTokenizer.from_pretrained(folder)(prompt)["input_ids"]
    assert (ids[0] == 1) == (model.config.model_type in ("llama", "mistral")) and len(ids) > WINDOW
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=2,
                             pad_token_id=0)[0, len(ids):].tolist()
    ref = ref[: ref.index(2)] if 2 in ref else ref
    assert doc["generations"][0]["tokens"] == ref
    assert main(["eval", "--run", str(out), "--json", "--examples", "4"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert all(np.isfinite(r["bits_per_byte"]) for r in rows)
    # rys and convert work on the imported run: 6 ranges of 3 layers; the conversion is exact at 1 loop
    assert main(["rys", "--run", str(out), "--json", "--examples", "4"]) == 0
    scan = json.loads(capsys.readouterr().out)
    assert len(scan["rows"]) == 6 * len(rows) and scan["compiles"] <= 1
    assert main(["convert", "--run", str(out), "--core", "1:3", "--out", "converted"]) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(tmp_path / "converted"), "--json", "--examples", "4"]) == 0
    conv = json.loads(capsys.readouterr().out)["rows"]
    for a, b in zip(rows, conv, strict=True):
        assert a["split"] == b["split"] and abs(a["loss"] - b["loss"]) < 1e-4




# head_dim 8: wavelengths 2 pi x (1, 15, 224, 3344); with original_max 16, high 4 and low 1 they fall in
# llama3's kept, blended and divided bands
SCALINGS = {"llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 16},
            "linear": {"rope_type": "linear", "factor": 2.0}}


@pytest.mark.slow  # end to end with transformers: CI runs it with the slow tests
@pytest.mark.parametrize("kind", SCALINGS)
def test_rope_scaling_matches_transformers(kind, tmp_path, capsys):
    """Issue #26: Llama 3.x's rope_scaling (and linear) import, give transformers' logits, and (llama3) the same
    greedy continuation through cached decoding."""
    import jax.numpy as jnp
    from flax import nnx

    from loopformer.model.plan import make_plan
    from loopformer.model.transformer import build_model

    folder = tmp_path / kind
    model = save_tiny(folder, "llama", rope_scaling=SCALINGS[kind])
    cfg, params, _ = import_folder(folder)
    assert cfg.rope_scaling["kind"] == kind and cfg.rope_base == 50000.0
    ours = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: build_model(cfg, cfg.vocab_size, 0))), params)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40))
    logits = np.asarray(ours(jnp.asarray(tokens), make_plan([], {}))[0])
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
        plain = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{
            k: v for k, v in model.config.to_dict().items() if k in ("vocab_size", "hidden_size", "intermediate_size",
                                                                   "num_hidden_layers", "num_attention_heads",
                                                                   "num_key_value_heads", "rms_norm_eps")},
            rope_theta=50000.0, tie_word_embeddings=False)).eval()
        plain.load_state_dict(model.state_dict())
        unscaled = plain(torch.tensor(tokens)).logits.numpy()
    assert np.abs(logits - ref).max() < 1e-4 and np.abs(unscaled - ref).max() > 1e-2  # the scaling matters
    if kind == "llama3":
        out = tmp_path / "run"
        assert main(["import", "--hf", str(folder), "--out", str(out)]) == 0
        capsys.readouterr()
        assert main(["generate", "--run", str(out), "--prompt", "And God said, Let there be light", "--max-new-tokens",
                     "24", "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        ids = doc["prompt_tokens"]
        with torch.no_grad():
            want = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=2,
                                  pad_token_id=0)[0, len(ids):].tolist()
        assert doc["generations"][0]["tokens"] == (want[: want.index(2)] if 2 in want else want)


def test_dynamic_rope_scaling_is_refused_in_one_line(tmp_path):
    from loopformer.errors import CheckpointError

    spec = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 72, "num_hidden_layers": 1,
            "num_attention_heads": 4, "vocab_size": 300, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}
    with pytest.raises(CheckpointError, match=r"rope scaling 'dynamic' is not supported: its frequencies change with "
                                              r"the sequence length"):
        model_config(spec)


@pytest.mark.slow  # end to end with transformers: CI runs it with the slow tests
def test_export_gives_transformers_the_same_logits(hf_model, tmp_path, capsys):
    """Issue #26: `loopformer export` writes a folder AutoModelForCausalLM loads with no remote code, whose logits
    equal loopformer's: for the imported model, and for its conversion unrolled at 3 loops (7 layers). The
    Mistral, with its sliding window, exports as a Mistral (the others as what they were)."""
    from loopformer.evaluation.run import load_run
    from loopformer.inference.generate import logits_fn
    from loopformer.runs.read import read_run

    folder, model = hf_model
    kind = model.config.model_type
    run_dir = tmp_path / "imported"
    assert main(["import", "--hf", str(folder), "--out", str(run_dir)]) == 0
    assert main(["convert", "--run", str(run_dir), "--core", "1:3", "--out", "looped"]) == 0
    tokens = np.random.default_rng(1).integers(0, 250, (2, 24))
    for run, loops, layers in ((run_dir, {}, 3), (tmp_path / "looped", {"X": 3}, 7)):
        out = tmp_path / f"export_{run.name}"
        argv = ["export", "--run", str(run), "--out", str(out), "--json"] + [f"--loops={c}={n}" for c, n in loops.items()]
        capsys.readouterr()
        assert main(argv) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["layers"] == layers and {"config.json", "model.safetensors", "tokenizer.json"} <= set(doc["files"])
        hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert doc["model_type"] == hf.config.model_type == kind
        assert getattr(hf.config, "sliding_window", None) == (WINDOW if kind == "mistral" else None)
        with torch.no_grad():
            ref = hf(torch.tensor(tokens)).logits.numpy()
        loaded = load_run(read_run(run))
        ours = np.asarray(logits_fn(loaded.model)(loaded.params, np.asarray(tokens), loaded.info.full_loops(loops)))
        assert np.abs(ours - ref).max() < 1e-4, run
    assert main(["export", "--run", str(run_dir), "--out", str(out)]) == 2  # not empty: nothing overwritten
    assert "already exists and is not empty" in capsys.readouterr().err

