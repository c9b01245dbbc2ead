"""Config checks of the knobs wired in issue 12 item 11: one line naming the field, the value and the fix."""

from __future__ import annotations

import pytest

from megatron_papo.config import ConfigError, load_config


@pytest.mark.parametrize("overrides, fragment", [
    (["rollout.max_new_tokens=16", "algo.overlong_buffer=17"],
     "algo.overlong_buffer=17 exceeds rollout.max_new_tokens=16"),
    (["model.logits_chunk_size=-1"], "model.logits_chunk_size=-1 must be >= 0"),
    (["algo.dynamic_sampling_key=overlong"], "algo.dynamic_sampling_key: got 'overlong'"),
])
def test_bad_knob_values_fail_with_one_line(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        load_config("tiny_cpu", overrides)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_knob_defaults():
    cfg = load_config("papo_d_7b")
    assert cfg.algo.dynamic_sampling and cfg.algo.dynamic_sampling_key == "accuracy"  # PAPO's DAPO scripts
    assert cfg.algo.overlong_buffer == 0  # PAPO's DAPO runs have no overlong shaping (papo_spec §6.2)
    assert cfg.model.logits_chunk_size == 2048
    load_config("tiny_cpu", ["rollout.max_new_tokens=16", "algo.overlong_buffer=16", "model.logits_chunk_size=0"])
