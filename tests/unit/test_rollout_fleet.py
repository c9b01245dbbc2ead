"""The fleet's placement and work-split rules, against hand-derived layouts (no process group, no engine)."""

from __future__ import annotations

import pytest

from megatron_papo.config import ConfigError, load_config
from megatron_papo.rollout.fleet import EngineSlot, plan_fleet, split_blocks


def _rollout(*overrides: str):
    return load_config(None, list(overrides)).rollout


@pytest.mark.parametrize("items,engines,want", [
    (16, 1, [(0, 16)]),
    (16, 2, [(0, 8), (8, 16)]),
    (10, 4, [(0, 3), (3, 5), (5, 8), (8, 10)]),  # floor(i*4/10): 0,0,0,1,1,2,2,2,3,3
    (3, 4, [(0, 1), (1, 2), (2, 3), (3, 3)]),  # more engines than prompts: the last one idles
    (0, 2, [(0, 0), (0, 0)]),
])
def test_split_blocks_is_floor_i_times_e_over_p(items, engines, want):
    blocks = split_blocks(items, engines)
    assert blocks == want
    owner = [k for k, (a, b) in enumerate(blocks) for _ in range(a, b)]
    assert owner == [i * engines // items for i in range(items)]  # the documented rule, item by item


def test_colocated_one_engine_per_engine_tp_ranks_on_their_own_gpus():
    slots = plan_fleet(_rollout("rollout.engine_tp=2"), world_size=16, local_world_size=8, device_type="cuda")
    assert [s.owner for s in slots] == [0, 2, 4, 6, 8, 10, 12, 14]
    assert [s.base_gpu_id for s in slots] == [0, 2, 4, 6, 0, 2, 4, 6]  # local device of the owner, per node
    cpu = plan_fleet(_rollout(), world_size=2, local_world_size=2, device_type="cpu")
    assert cpu == [EngineSlot(0, 0, -1, 1), EngineSlot(1, 1, -1, 1)]


def test_colocated_engine_tp_must_fit_a_node():
    with pytest.raises(ConfigError, match="engine_tp=3 must divide"):
        plan_fleet(_rollout("rollout.engine_tp=3"), world_size=8, local_world_size=8, device_type="cuda")


def test_separate_engines_follow_engine_base_gpu_and_external_servers_join():
    r = _rollout("rollout.placement=separate", "rollout.mode=server", "rollout.transport=distributed",
                 "rollout.num_engines=2", "rollout.engine_tp=2", "rollout.engine_base_gpu=4",
                 "rollout.server_urls=[http://node1:30000]")
    slots = plan_fleet(r, world_size=4, local_world_size=4, device_type="cuda")
    assert [(s.index, s.owner, s.base_gpu_id, s.url) for s in slots] == [
        (0, 0, 4, None), (1, 0, 6, None), (2, 0, -1, "http://node1:30000")]


def test_config_rejects_fleet_misuse_in_one_line():
    with pytest.raises(ConfigError, match="rollout.num_engines=2: colocated"):
        load_config(None, ["rollout.num_engines=2"])
    with pytest.raises(ConfigError, match="rollout.server_urls"):
        load_config(None, ["rollout.server_urls=[http://x:1]"])
