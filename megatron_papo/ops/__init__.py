"""Custom ops: vocab-parallel per-token statistics (log-prob, entropy, two-view KL)."""

from megatron_papo.ops.vocab_parallel import IGNORE_INDEX, TokenStats, token_stats

__all__ = ["IGNORE_INDEX", "TokenStats", "token_stats"]
