"""The ``algo`` config section: names match the algorithm registries; bad values fail naming the field."""

import pytest

from megatron_papo.algos.advantages import ADVANTAGES
from megatron_papo.algos.aggregate import AGGREGATIONS
from megatron_papo.algos.kl import KL_ESTIMATORS
from megatron_papo.config import ConfigError, from_dict
from megatron_papo.config import algo as algo_cfg
from megatron_papo.config.algo import AlgoConfig


def test_config_names_match_registries():
    assert list(algo_cfg.ADV_ESTIMATORS) == ADVANTAGES.names()
    assert list(algo_cfg.KL_ESTIMATORS) == KL_ESTIMATORS.names()
    assert list(algo_cfg.LOSS_AGG_MODES) == AGGREGATIONS.names()


def test_defaults_are_papo_g():
    c = AlgoConfig()
    assert (c.clip_ratio_low, c.clip_ratio_high, c.clip_ratio_dual, c.kl_coef, c.kl_prcp_coef) == (0.2, 0.3, 3.0, 0.01, 0.02)
    assert c.kl_prcp_estimator == "k3_sampled" and c.aug_mode == "detached" and c.overlong_buffer == 0


@pytest.mark.parametrize("data,match", [
    ({"adv_estimator": "ppo"}, r"algo.adv_estimator: got 'ppo', expected one of dapo, drgrpo, grpo, rloo"),
    ({"loss_agg_mode": "token"}, r"algo.loss_agg_mode: got 'token'"),
    ({"kl_estimator": "low_var_kl"}, r"algo.kl_estimator"),
    ({"clip_ratio_dual": 1.0}, r"algo.clip_ratio_dual: got 1.0"),
    ({"kl_prcp_top_p": 1.0}, r"algo.kl_prcp_top_p"),
    ({"dynamic_sampling_low": 0.5, "dynamic_sampling_high": 0.4}, r"algo.dynamic_sampling_low/high"),
    ({"kl_prcp_coef": -0.1}, r"algo.kl_prcp_coef: got -0.1"),
    ({"kl_prcp_anneal_ratio": 0.0}, r"algo.kl_prcp_anneal_ratio"),
])
def test_bad_values_fail_naming_the_field(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(AlgoConfig, data)
