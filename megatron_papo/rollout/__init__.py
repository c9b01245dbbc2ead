"""Rollout engines (SGLang default, vLLM for GPU clusters) and the Megatron→HF weight sync.

Public entry points: :class:`~megatron_papo.rollout.sglang_engine.SGLangEngine`,
:func:`~megatron_papo.rollout.tokens.banned_token_ids`, :func:`~megatron_papo.rollout.tokens.to_engine_prompt_ids`
and the request/result types in :mod:`megatron_papo.rollout.base`. Importing this package is cheap:
SGLang is imported only inside the engine's own process.
"""
