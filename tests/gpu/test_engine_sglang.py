"""The SGLang GPU engine (issue 12, GPU suite, engine part): CUDA-IPC tensor transport after a perturbed sync,
the disk transport as reference, and colocated memory release/resume measured with ``torch.cuda.mem_get_info``.

Skipped without CUDA (``pytest.mark.gpu``). One GPU, no network: a random-weight tiny Qwen2.5-VL built locally
with head_dim 64 (text hidden 256, 4 heads; vision hidden 128, 2 heads), which SGLang's GPU attention kernels
accept. transformers in float32 is the independent reference. NOT run by CI (no GPU there); written against
SGLang 0.5.23's sources, never executed yet -- read the printed numbers on the first GPU run.

bf16 tolerance (``TOL_BF16``): the engine runs in bf16 (8 significant bits: relative rounding 2^-9 ~ 0.002) while
the reference runs in fp32 on the same bf16-rounded weights. Weights, activations and logits are rounded in each of
the 2 layers; with |logit| < 4 (asserted, random init std 0.02) each logit is off by at most a few bf16 ulps
(~0.01), and a log-softmax value by at most twice the largest logit error: 0.05 nats bounds it with margin. Every
check that uses it also asserts that the perturbation moved the reference log-probs by far more (> 4 x TOL_BF16),
so a sync that did nothing cannot pass.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.engine,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (SGLang GPU engine)")]

TOL_BF16 = 0.05
MAX_NEW = 8
GPU_TINY = {"hidden_size": 256, "intermediate_size": 512, "num_heads": 4, "num_kv_heads": 2,
            "vision_hidden_size": 128, "vision_heads": 2, "vision_intermediate_size": 256}
TEST_KWARGS = {"disable_cuda_graph": True, "max_running_requests": 16}  # fast start; memory saver etc. stay default


@pytest.fixture(scope="module")
def gpu_tiny_dir(tmp_path_factory):
    from megatron_papo.fixtures.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("gpu_tiny") / "model", **GPU_TINY)


@pytest.fixture(scope="module")
def processor(gpu_tiny_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(gpu_tiny_dir))


@pytest.fixture(scope="module")
def prompts(processor):
    from tests.integration.sglang_reference import QUESTIONS, encode, make_image

    items = [(QUESTIONS[0], [make_image(0)]), (QUESTIONS[1], [make_image(1, 84)]), (QUESTIONS[2], [])]
    return [(ims, encode(processor, q, ims)) for q, ims in items]


@pytest.fixture(scope="module")
def engine(gpu_tiny_dir):
    """A colocated GPU engine with the shipped defaults (memory saver, weights CPU backup, mem_fraction_static)."""
    from megatron_papo.rollout.sglang_engine import SGLangEngine

    torch.cuda.init()  # this process measures device memory; its own context exists before the engine starts
    with SGLangEngine(str(gpu_tiny_dir), device="cuda", dtype="bfloat16", engine_kwargs=TEST_KWARGS, timeout_s=300) as eng:
        assert eng.engine_kwargs["enable_memory_saver"] and eng.engine_kwargs["enable_weights_cpu_backup"]
        yield eng


def _ckpt_model(tensors: dict[str, torch.Tensor], base_dir, out_dir) -> torch.nn.Module:
    """The reference: save ``tensors`` (bf16-rounded) as a checkpoint next to ``base_dir``'s config and load it."""
    import shutil

    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    out_dir.mkdir(parents=True, exist_ok=True)
    for f in base_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, out_dir / f.name)
    save_file({k: v.detach().to(torch.bfloat16).float().cpu().contiguous() for k, v in tensors.items()},
              str(out_dir / "model.safetensors"))
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out_dir), dtype=torch.float32).cuda().eval()


def _perturbed(base_dir, seed: int, scale: float = 0.05, only: str | None = None) -> dict[str, torch.Tensor]:
    """The base checkpoint's tensors with seeded noise (checkpoint names, fp32, CPU)."""
    from safetensors.torch import load_file

    base = {}
    for f in sorted(base_dir.glob("*.safetensors")):
        base.update(load_file(str(f)))
    g = torch.Generator().manual_seed(seed)
    return {k: (v + torch.randn(v.shape, generator=g) * scale if only is None or only in k else v.clone())
            for k, v in base.items()}


def _ref_logprobs(model, prompts, responses, banned) -> list[list[float]]:
    out = []
    for (_, enc), resp in zip(prompts, responses):
        enc = {k: v.cuda() if torch.is_tensor(v) else v for k, v in enc.items()}
        out.append(_hf_logprobs_cuda(model, enc, resp, banned) if resp else [])
    return out


def _hf_logprobs_cuda(model, enc, response, banned) -> list[float]:
    """Teacher-forced log_softmax(masked logits) (T=1) of each response token, on the GPU (the reference rule of
    ``rollout/hf_reference.py``, device-aware)."""
    ids = torch.cat([enc["input_ids"], torch.tensor([response], device="cuda")], 1)
    kw = {k: enc[k] for k in ("pixel_values", "image_grid_thw") if k in enc}
    if "mm_token_type_ids" in enc:
        tt = enc["mm_token_type_ids"]
        kw["mm_token_type_ids"] = torch.cat([tt, torch.zeros((1, len(response)), dtype=tt.dtype, device="cuda")], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kw).logits[0].double()
    P = enc["input_ids"].shape[1]
    lg = logits[P - 1:P - 1 + len(response)]
    assert float(lg.abs().max()) < 4.0, "logits larger than the bf16 tolerance was derived for"
    lg[:, banned] = float("-inf")
    lp = torch.log_softmax(lg, -1)
    return lp.gather(1, torch.tensor(response, device="cuda")[:, None])[:, 0].tolist()


def _greedy(engine, prompts):
    res = engine.generate([(enc["input_ids"][0].tolist(), ims) for ims, enc in prompts], n=1,
                          sampling={"temperature": 0.0, "max_new_tokens": MAX_NEW})
    return [r.token_ids for (r,) in res], [r.logprobs for (r,) in res]


def _max_gap(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def test_tensor_transport_after_perturbed_sync_matches_reference_and_disk(engine, prompts, gpu_tiny_dir, tmp_path):
    """CUDA-IPC buckets (tensors on this process's GPU) -> engine; engine log-probs vs transformers within TOL_BF16;
    the same weights through the disk transport give the same tokens and log-probs."""
    base = _perturbed(gpu_tiny_dir, seed=0, scale=0.0)
    new = _perturbed(gpu_tiny_dir, seed=31, scale=0.05)
    ref_old, ref_new = _ckpt_model(base, gpu_tiny_dir, tmp_path / "old"), _ckpt_model(new, gpu_tiny_dir, tmp_path / "new")
    stats = engine.update_weights([(k, v.cuda()) for k, v in sorted(new.items())], transport="tensor", bucket_mb=1)
    assert stats["tensors"] == len(new)
    toks, lps = _greedy(engine, prompts)
    gap = _max_gap(lps, _ref_logprobs(ref_new, prompts, toks, engine.banned_ids))
    moved = _max_gap(_ref_logprobs(ref_old, prompts, toks, engine.banned_ids),
                     _ref_logprobs(ref_new, prompts, toks, engine.banned_ids))
    print(f"tensor (CUDA IPC) sync: engine-vs-transformers max |dlogprob| {gap:.4f} (tol {TOL_BF16}); "
          f"the perturbation moved the reference by {moved:.4f}")
    assert moved > 4 * TOL_BF16, "perturbation too small for the check to mean anything"
    assert gap < TOL_BF16
    engine.update_weights(sorted(base.items()), transport="disk")  # away and back: the disk transport is the reference
    engine.update_weights(sorted(new.items()), transport="disk")
    toks_d, lps_d = _greedy(engine, prompts)
    assert toks_d == toks, "disk and tensor transports must load identical weights"
    assert _max_gap(lps_d, lps) < 1e-3
    print(f"disk sync: tokens equal to the tensor sync, max |dlogprob| {_max_gap(lps_d, lps):.2e}")


def _free() -> int:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


def test_release_resume_frees_memory_and_keeps_output(engine, prompts, gpu_tiny_dir):
    """Release frees the engine's weights and KV pool (printed); after resume -> sync -> generate the output is
    the output before."""
    new = _perturbed(gpu_tiny_dir, seed=41)
    engine.update_weights([(k, v.cuda()) for k, v in sorted(new.items())], transport="tensor")
    toks0, lps0 = _greedy(engine, prompts)
    before = _free()
    engine.release_memory()
    freed = _free() - before
    print(f"release_memory freed {freed / 2**30:.2f} GiB (mem_fraction_static "
          f"{engine.engine_kwargs['mem_fraction_static']})")
    assert freed > 1 << 30, f"release freed only {freed} bytes: is enable_memory_saver on?"
    engine.resume_memory()
    print(f"resume_memory took back {(before - _free()) / 2**30:.2f} GiB")
    engine.update_weights([(k, v.cuda()) for k, v in sorted(new.items())], transport="tensor")
    toks1, lps1 = _greedy(engine, prompts)
    assert toks1 == toks0 and _max_gap(lps1, lps0) < 1e-3


def test_frozen_vision_tower_survives_release_with_skip_frozen(engine, prompts, gpu_tiny_dir, tmp_path):
    """skip_frozen: the vision tower is pushed once, then only the text weights. After release/resume the engine's
    vision weights come from its CPU backup (``enable_weights_cpu_backup``): an image prompt must still match the
    reference holding the once-pushed vision tower and the newest text weights."""
    first = _perturbed(gpu_tiny_dir, seed=51)
    engine.update_weights([(k, v.cuda()) for k, v in sorted(first.items())], transport="tensor")  # first sync: all
    engine.release_memory()
    engine.resume_memory()
    text = _perturbed(gpu_tiny_dir, seed=52, only="model.")  # later syncs: trainable (text) weights only
    pushed = {k: v for k, v in text.items() if not k.startswith("visual.")}
    engine.update_weights([(k, v.cuda()) for k, v in sorted(pushed.items())], transport="tensor")
    expect = {**{k: v for k, v in first.items() if k.startswith("visual.")}, **pushed}
    ref = _ckpt_model(expect, gpu_tiny_dir, tmp_path / "expect")
    image_prompts = prompts[:2]
    toks, lps = _greedy(engine, image_prompts)
    gap = _max_gap(lps, _ref_logprobs(ref, image_prompts, toks, engine.banned_ids))
    print(f"frozen vision tower after release/resume: max |dlogprob| {gap:.4f} (tol {TOL_BF16})")
    assert gap < TOL_BF16


def test_without_memory_saver_release_frees_nothing(gpu_tiny_dir):
    """The control for the measurement above (gpu_audit check 4): SGLang's no-op adapter frees ~0."""
    from megatron_papo.rollout.sglang_engine import SGLangEngine

    kw = {**TEST_KWARGS, "enable_memory_saver": False, "enable_weights_cpu_backup": False, "mem_fraction_static": 0.2}
    with SGLangEngine(str(gpu_tiny_dir), device="cuda", dtype="bfloat16", engine_kwargs=kw, timeout_s=300) as eng:
        before = _free()
        eng.release_memory()
        freed = _free() - before
        eng.resume_memory()
        print(f"without enable_memory_saver release freed {freed / 2**20:.0f} MiB")
        assert freed < 256 << 20
