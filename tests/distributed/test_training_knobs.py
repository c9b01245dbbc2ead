"""Config knobs reach the code they name (issue 12 item 11): the loss kernel's chunk size, DAPO's filter key and
soft overlong punishment, and a frozen vision tower with the weight sync that skips it."""

from __future__ import annotations

import pytest

from tests.harness import run_distributed

pytestmark = [pytest.mark.distributed]


def test_logits_chunk_size_reaches_the_kernel_and_changes_nothing_else(tiny_model_dir):
    chunk = 8
    (r,) = run_distributed("tests.distributed.knob_workers:chunked_kernel_equals_unchunked", 1,
                           {"hf_dir": str(tiny_model_dir), "chunk": chunk})
    # unchunked: one block per kernel pass (the tiny vocabulary stays under the CPU cache cap); chunked: blocks of 8
    assert r["unchunked_blocks"] and all(rows == n for n, rows in r["unchunked_blocks"]), r["unchunked_blocks"]
    assert r["chunked_blocks"] and all(rows == chunk for _, rows in r["chunked_blocks"]), r["chunked_blocks"]
    assert all(n > chunk for n, _ in r["chunked_blocks"])  # so every pass really ran in several blocks
    assert len(r["chunked_blocks"]) == len(r["unchunked_blocks"])  # the same passes (forward, backward)
    assert r["logprob_diff"] <= 1e-6 and r["entropy_max"] > 0.1 and r["entropy_diff"] <= 1e-6, r
    (la, lb), (ga, gb) = r["loss"], r["grad_norm"]
    assert abs(la - lb) <= 1e-6 * max(1.0, abs(la)) and ga > 0 and abs(ga - gb) <= 1e-6 * ga, r
    assert r["grad_max"] > 0 and r["grad_diff"] <= 1e-6 * r["grad_max"], r


def _hand_scores(keep: list[int]) -> list[float]:
    """Scores of the kept scripted groups after the soft overlong punishment (L_max 4, buffer 2, factor 0.5: lengths
    1, 2 free; 3 -> (2 - 3) / 2 * 0.5 = -0.25; 4 -> -0.5), two draws per step."""
    from tests.distributed.knob_workers import DRAW_PLAN

    pen = [0.0, 0.0, -0.25, -0.5]
    one = [0.9 * a + 0.1 * f + p for g in keep for a, f, p in zip(*DRAW_PLAN[g], pen)]
    return one + one


def test_dapo_filter_key_overlong_punishment_and_frozen_vision_tower(tiny_model_dir, tmp_path):
    """Two RL steps of the real Trainer (scripted engine and rewards): the filter reads algo.dynamic_sampling_key,
    the scores get DAPO's soft overlong punishment before the advantages, the vision tower stays bit-identical while
    the language model trains, and the weight sync pushes the tower once."""
    overrides = ["data.synthetic_train_size=64", "rollout.n=4", "rollout.max_new_tokens=4", "optim.rollout_batch_size=4",
                 "optim.global_batch_size=4", "optim.micro_batch_size=16", "algo.use_ref=false", "algo.kl_coef=0",
                 "algo.kl_prcp_coef=0", "algo.dynamic_sampling=true", "algo.dynamic_sampling_key=format",
                 "algo.dynamic_sampling_max_tries=4", "algo.overlong_buffer=2", "algo.overlong_penalty=0.5",
                 "model.freeze_vision_tower=true", "rollout.skip_frozen=true", "eval_at_end=false",
                 "checkpoint.save_every=0", "logging.progress=false"]
    (r,) = run_distributed("tests.distributed.knob_workers:trainer_knobs", 1,
                           {"hf_dir": str(tiny_model_dir), "run_dir": str(tmp_path / "run"), "overrides": overrides},
                           timeout=900)
    # filter on format: groups 0 and 3 of each draw (by accuracy it would be 1 and 3); 2 draws fill a step
    expected = _hand_scores([0, 3])
    assert len(r["scores"]) == 2
    for got in r["scores"]:
        assert len(got) == len(expected) and max(abs(a - b) for a, b in zip(got, expected)) <= 1e-6, (got, expected)
    for m in r["metrics"]:
        assert (m["dapo/tries"], m["dapo/kept_frac"], m["reward/overlong_frac"]) == (2, 0.5, 0.5), m
        assert m["update_skipped"] == 0.0 and m["grad_norm"] > 0, m
    # frozen tower: bit-identical after two updates, not trainable, yet it would get gradients if it were
    assert r["vision_params"] > 0 and r["vision_requires_grad"] == [False]
    assert r["vision_changed"] == [], r["vision_changed"]
    assert r["vision_grad_if_trainable"] > 0
    assert r["lm_params"] > 0 and r["lm_unchanged"] == [], r["lm_unchanged"]
    # weight sync (rollout.skip_frozen): the tower goes to the engine with the first sync only
    first, second = r["updates"]
    assert any(n.startswith("visual.") for n in first) and not any(n.startswith("visual.") for n in second)
    assert sorted(second) == sorted(n for n in first if not n.startswith("visual."))
