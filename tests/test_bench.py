"""Smoke test of bench/bench_train.py: its measuring functions run for one step on tiny models.

Not a timing test: it only checks that the vitune and transformers paths build, train, decode
and report, so the benchmark does not rot between runs.
"""

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

from vitune.presets import tiny

pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_train.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def specs(bench):
    cfg = tiny().model
    cfg = bench.llava_like(dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, vocab_size=bench.VOCAB)))
    return [bench.Spec("vitune", "vitune", cfg, text_len=8), bench.Spec("hf-36", "hf", cfg, text_len=8)]


def test_same_parameter_count(bench, specs):
    vitune, hf = (bench.n_params(bench.build(s)) for s in specs)
    clip_post_layernorm = 2 * specs[0].cfg.vision.width  # HF builds it; LLaVA never uses it
    assert hf - vitune == clip_post_layernorm


def test_training_and_decoding_run(bench, specs):
    train = bench.time_training(specs, "bf16", batch=2, warmup=0, reps=1)
    decode = bench.time_decoding(specs, "fp32", batch=2, warmup=0, reps=1, new_tokens=2)
    bench.add_ratios(train, "samples_per_s")
    bench.add_ratios(decode, "tokens_per_s")
    assert [r["T"] for r in train] == [specs[0].image_tokens + 8] * 2
    assert all(r["s"] > 0 and r["n"] == 1 for r in train)
    assert train[1]["vs_hf"] == 1.0 and decode[1]["vs_hf"] == 1.0
    assert "vitune" in bench.table(train, bench.TRAIN_COLS) and "hf-36" in bench.table(decode, bench.DECODE_COLS)


def test_memory_probe_in_process(bench, specs):
    row = bench.memory_probe(specs[0], "fp32", batch=2, steps=1, with_transformers=False)
    assert row["peak_rss_mb"] >= row["rss_after_import_mb"] > 0
    assert row["saved_for_backward_mb"] > 0
