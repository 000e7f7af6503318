"""Packed text through the model and the trainer: documents stay apart, metrics, resume, tokenizer."""

import jax
import numpy as np
import pytest
from flax import nnx

from loopformer.config import load_config
from loopformer.config.load import TASK, part_of
from loopformer.data.sources import load_tokenizer
from loopformer.data.text import encode_document, pack_window
from loopformer.data.tokenizers import ByteTokenizer
from loopformer.errors import ConfigError, DataError
from loopformer.model.plan import make_plan
from loopformer.model.transformer import build_model
from loopformer.runs.restore import restore_params
from loopformer.runs.scalars import read_metrics
from loopformer.train.trainer import train
from tests.conftest import TASK_DEFAULTS, TINY


def test_packed_documents_do_not_see_each_other():
    cfg = load_config(None, TINY)
    model = build_model(cfg.model, 259, seed=0)
    tok = ByteTokenizer()
    first, second = encode_document(tok, "in the beginning"), encode_document(tok, "let there be light")
    ex = pack_window(np.concatenate([first, second]), seq_len=40, bos=tok.bos_id, eos=tok.eos_id)
    graphdef, state = nnx.split(model)
    plan = make_plan(["X", "Y"], {"X": 2, "Y": 3})
    forward = jax.jit(lambda s, tokens, pos, seg: nnx.merge(graphdef, s)(tokens, plan, positions_BT=pos,
                                                                        segment_ids_BT=seg)[0])
    packed = forward(state, ex["inputs"][None], ex["positions"][None], ex["segment_ids"][None])
    alone = forward(state, second[None, :-1], None, None)
    n = len(second) - 1
    np.testing.assert_allclose(packed[0, len(first) : len(first) + n], alone[0], atol=1e-5)


def text_args(tmp_path):
    text = "\n\n".join(f"chapter {i}: " + "and it was so. " * (3 + i % 5) for i in range(30))
    (tmp_path / "c.txt").write_text(text)
    return [*TINY, *TASK_DEFAULTS, "data.task=text", f"data.paths=[{tmp_path}/c.txt]", 'data.doc_separator="\\n\\n"',
            "data.seq_len=32", "data.val_fraction=0.2", "data.batch_size=4", "data.eval_examples=4",
            "data.eval_batch_size=4", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=2",
            "train.checkpoint_every=2", "eval.sweep_loops=[]", "eval.diagnostics=false", f"run.dir={tmp_path}/runs"]


def test_train_text_logs_bits_per_byte_at_several_loop_counts(tmp_path):
    args = [*text_args(tmp_path), "data.eval_loops=[1, 3]", "eval.sweep_loops=[1, 2]"]
    result = train(load_config(None, [*args, "run.name=a", "train.steps=2"]))
    assert set(result.eval) == {"val", "train"} and result.eval["val"]["bits_per_byte"] > 0
    rows = [r for r in read_metrics(result.run_dir) if "eval/val/bits_per_byte" in r]
    assert rows and {"eval/val/loops_1/bits_per_byte", "eval/train/loops_3/perplexity"} <= set(rows[-1])
    assert {(r["loops"], r["split"]) for r in result.sweep} == {(1, "val"), (1, "train"), (2, "val"), (2, "train")}
    assert all("bits_per_byte" in r for r in result.sweep)
    tok = load_tokenizer(result.run_dir)
    assert (result.run_dir / "tokenizer.json").is_file() and tok.decode(tok.encode("so.")) == "so."
    model, params, step = restore_params(load_config(None, [*args, "run.name=a"]))
    assert step == 2 and model.vocab_size == 259 and jax.tree.leaves(params)
    # a resume whose data cannot be read fails before writing anything: the run stays usable (#27.2)
    before = (result.run_dir / "config.yaml").read_bytes()
    with pytest.raises(DataError, match="nonexistent"):
        train(load_config(None, [*args, "run.name=a", "train.steps=4", "data.paths=[/nonexistent/corpus.txt]"]))
    assert (result.run_dir / "config.yaml").read_bytes() == before
    assert not (result.run_dir / "config_changes.jsonl").exists()
    # #27.11: a BPE run's vocabulary size is its task (a resume that changes it is refused, `part_of`); on this
    # byte-level run it is read by nothing, so it is refused as a setting (#27 pass 7)
    assert part_of("data.vocab_size") == TASK
    with pytest.raises(ConfigError, match=r"^data.vocab_size=2048 is read only by data.tokenizer=bpe"):
        load_config(None, [*args, "run.name=a", "train.steps=4", "data.vocab_size=2048"])


@pytest.mark.slow
def test_text_run_resumes_exactly(tmp_path):
    args = [*text_args(tmp_path), "data.tokenizer=bpe", "data.vocab_size=300"]
    straight = train(load_config(None, [*args, "run.name=a", "train.steps=4"]))
    train(load_config(None, [*args, "run.name=b", "train.steps=2"]))
    resumed = train(load_config(None, [*args, "run.name=b", "train.steps=4"]))
    assert straight.eval == resumed.eval
    losses = [{r["step"]: r["train/loss"] for r in read_metrics(run) if "train/loss" in r}
              for run in (straight.run_dir, resumed.run_dir)]
    assert [losses[0][s] for s in (3, 4)] == [losses[1][s] for s in (3, 4)]  # same batches after the resume
    assert load_tokenizer(straight.run_dir).to_str() == load_tokenizer(resumed.run_dir).to_str()


def test_stop_ids_past_the_vocabulary_are_refused_before_training(tmp_path):
    """#27 pass 33: data.stop_ids=[1000] on a byte run (vocabulary 259) trained, and `generate` refused the run after
    it ("not token ids of this model ... edit data.stop_ids in config.yaml"); training refuses it first and writes
    nothing."""
    cfg = load_config(None, [*text_args(tmp_path), "run.name=a", "train.steps=2", "data.stop_ids=[3, 1000]"])
    with pytest.raises(ConfigError, match=r"^data.stop_ids \[1000\] are not token ids of this model \(vocabulary 259\), "
                                          r"so `generate` could never stop at them; give ids below 259, or \[\]"):
        train(cfg)
    assert not (tmp_path / "runs" / "a").exists()


def test_a_sequence_whose_attention_cannot_fit_is_one_line(tmp_path, run):
    """data.seq_len=200000 ran out of memory with a traceback at the first step (training) or batch (every
    analysis command, e.g. a run imported with a huge seq_len): refused first, with how long a sequence fits."""
    from loopformer.errors import AnalysisError, ConfigError

    cfg = load_config("configs/text_bytes.yaml", [f"run.dir={tmp_path}", "data.seq_len=200000", "data.batch_size=4"])
    with pytest.raises(ConfigError, match=r"^data.seq_len=200000: attention over 200,000 tokens in batches of 4 needs "
                                          r"about [\d,]+ GiB, more than half of this machine's \d+ GiB \(at most [\d,]+ "
                                          r"tokens fit\); lower data.seq_len$"):  # a batch of 1 would not fit
        train(cfg)
    assert not (tmp_path / cfg.run.name / "config.yaml").exists()
    huge = {"hard": [{"inputs": np.zeros((2, 300_000), np.int32)}]}
    with pytest.raises(AnalysisError, match=r"^split hard: attention over 300,000 tokens in batches of 2 .*; evaluate "
                                            r"shorter sequences or smaller batches \(data.seq_len, data.eval_batch_size"):
        run.check_fits(huge)
    assert run.check_fits({"hard": []}) == {"hard": []}
