"""Validation on several benchmarks (``eval_datasets``): name=source parsing, avg@k per benchmark through the
shared ``evaluate_benchmarks`` path, the macro average and the best step so far (and its checkpoint state).
The engine is a scripted stand-in that answers correctly on a known set of questions, so every number is
hand-countable; the real SGLang engine runs the same path in tests/integration (eval CLI, ergonomics e2e)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from megatron_papo.config import ConfigError, load_config
from megatron_papo.evaluate import Benchmark, Validator, evaluate_benchmarks, load_benchmarks, parse_benchmarks
from megatron_papo.rewards import build_reward_fn


class ScriptedEngine:
    """Answers sample k of the i-th question of a benchmark correctly iff ``right(i, k)``. Questions arrive in dataset
    order, benchmark after benchmark (as evaluate_benchmarks asks); ``order`` lists their (index, answer) pairs."""

    def __init__(self, order: list[tuple[int, str]], right) -> None:
        self.order, self.right, self.pos, self.calls = order, right, 0, []

    def generate(self, requests, *, n, sampling, seeds):
        self.calls.append((len(requests), n, dict(sampling)))
        out = []
        for _ in requests:
            i, answer = self.order[self.pos % len(self.order)]
            self.pos += 1
            out.append([SimpleNamespace(text=answer if self.right(i, k) else "purple") for k in range(n)])
        return out


def test_parse_benchmarks():
    assert parse_benchmarks([], "synthetic") == [Benchmark("test", "synthetic")]
    assert parse_benchmarks(["geo=/d/geo.parquet", "synthetic"], "x") == [Benchmark("geo", "/d/geo.parquet"),
                                                                         Benchmark("synthetic", "synthetic")]
    for bad, msg in ((["/d/geo.parquet"], "needs a name; write name=source"), (["a/b=x"], "is not name=source"),
                     (["geo=a", "geo=b"], "appears twice"), (["geo="], "is not name=source")):
        with pytest.raises(ConfigError, match=msg):
            parse_benchmarks(bad, "synthetic")
    assert parse_benchmarks(["/d/geo.parquet"], "x", bare_paths=True) == [Benchmark("/d/geo.parquet", "/d/geo.parquet")]
    with pytest.raises(ConfigError, match="eval_datasets: entry 'data/x.parquet' needs a name"):
        load_config(None, ["eval_datasets=data/x.parquet"])


def test_avg_at_k_macro_average_and_best_step(tiny_model_dir, tmp_path):
    from transformers import AutoProcessor

    from megatron_papo.data.synthetic import write_synthetic

    geo = write_synthetic(tmp_path / "geo", n_train=4, n_test=6, seed=5)["test"]
    cfg = load_config(None, ["data.format_prompt=short_answer", "data.reward=synthetic", "data.format_weight=0",
                             "data.synthetic_test_size=8", "data.reward_workers=0", "eval_n=4", "eval_temperature=1.0",
                             f"eval_datasets=syn=synthetic,geo={geo}", "rollout.max_new_tokens=3"])
    processor = AutoProcessor.from_pretrained(str(tiny_model_dir))
    reward_fn = build_reward_fn(cfg.data)
    val = Validator(cfg, processor, reward_fn)
    datasets = load_benchmarks(val.benchmarks, cfg.data, processor)
    assert {k: len(v) for k, v in datasets.items()} == {"syn": 8, "geo": 6}
    order = [(i, ds.encode(i).answer) for ds in datasets.values() for i in range(len(ds))]
    # question i: samples k = 0 .. i % 4 correct -> per-question accuracy (i % 4 + 1) / 4
    engine = ScriptedEngine(order, lambda i, k: k <= i % 4)
    res = evaluate_benchmarks(engine, datasets, reward_fn, n=4, sampling={"temperature": 1.0}, seed=0)
    syn = sum((i % 4 + 1) / 4 for i in range(8)) / 8   # (1+2+3+4)*2/4/8 = 0.625
    geo_acc = sum((i % 4 + 1) / 4 for i in range(6)) / 6  # (1+2+3+4+1+2)/4/6 = 0.54166..
    assert res["syn"]["accuracy"] == pytest.approx(syn) and res["geo"]["accuracy"] == pytest.approx(geo_acc)
    assert res["macro"]["accuracy"] == pytest.approx((syn + geo_acc) / 2) and res["macro"]["questions"] == 14
    assert res["syn"]["n"] == 4 and res["geo"]["questions"] == 6

    # in training: the Validator runs the same path with the eval sampling settings, and tracks the best step
    m5 = val(engine, step=5)
    assert engine.calls[-1][1] == 4 and engine.calls[-1][2]["temperature"] == 1.0
    assert m5["eval/syn/accuracy"] == pytest.approx(syn) and m5["eval/geo/questions"] == 6
    assert m5["eval/accuracy"] == pytest.approx((syn + geo_acc) / 2)
    assert (m5["eval/best_accuracy"], m5["eval/best_step"]) == (m5["eval/accuracy"], 5.0)
    engine.right = lambda i, k: False
    m10 = val(engine, step=10, final=True)
    assert m10["eval/accuracy"] == 0.0 and m10["eval/best_step"] == 5.0 and m10["eval/final"] == 1.0
    # the best so far survives a resume through the checkpoint's trainer state
    again = Validator(cfg, processor, reward_fn)
    again.load_state_dict(val.state_dict())
    engine.right = lambda i, k: True
    m15 = again(engine, step=15)
    assert (m15["eval/best_accuracy"], m15["eval/best_step"]) == (1.0, 15.0)
    with pytest.raises(ConfigError, match=r"benchmark 'typo': .*nope.parquet does not exist"):
        Validator(load_config(None, [f"eval_datasets=typo={tmp_path / 'nope.parquet'}"]), processor, reward_fn)
    assert again.record(20, {"test": {"accuracy": 0.5, "format": 1.0, "majority_baseline": 0.25, "questions": 2.0}})[
        "eval/best_step"] == 15.0
