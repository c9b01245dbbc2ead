"""``megatron-papo`` command line: train | make-tiny | config | compare-logprobs | convert | eval | report.

Every subcommand exits non-zero with one line naming the problem and the fix on bad input: config, data and
checkpoint errors exit 2, a diverged run (non-finite steps, ``optim.max_skipped_steps``) exits 3, a preempted
run exits 128+signal after saving. ``--debug`` anywhere on the line (or ``MEGATRON_PAPO_DEBUG=1``) prints the
traceback too.
"""

from __future__ import annotations

import argparse
import importlib
import os
import runpy
import sys
import traceback
from pathlib import Path
from typing import Callable, Optional, Sequence

from megatron_papo.config.base import ConfigError
from megatron_papo.errors import CheckpointError, DataError, DivergedError

REPO_ROOT = Path(__file__).resolve().parents[1]


def _cmd_train(args: argparse.Namespace) -> int:
    from megatron_papo.train import main as train_main

    return train_main(args.config, args.overrides)


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from megatron_papo.config import Config, load_config, to_dict
    from megatron_papo.config.base import describe

    if args.describe:
        print("\n".join(describe(Config)))
        return 0
    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return 0


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from megatron_papo.fixtures.tiny import make_tiny

    overrides = {k: v for k, v in vars(args).items() if k in _TINY_OPTS and v is not None}
    out = make_tiny(args.out, **overrides)
    print(out)
    return 0


_TINY_OPTS = {
    "seed": int, "vocab_size": int, "hidden_size": int, "intermediate_size": int, "num_layers": int, "num_heads": int,
    "num_kv_heads": int, "vision_depth": int, "vision_hidden_size": int, "vision_heads": int,
    "vision_intermediate_size": int, "dtype": str,
}


def _delegate(target: str) -> Callable[[argparse.Namespace], int]:
    """Run a tool with its own parser: ``tools/x.py`` (by path, as __main__) or ``package.module`` (its main)."""

    def run(args: argparse.Namespace) -> int:
        if target.endswith(".py"):
            path = REPO_ROOT / target
            if not path.is_file():
                raise ConfigError(f"'{args.command}' needs {path}, which this checkout does not have")
            sys.argv = [str(path), *args.rest]
            try:
                runpy.run_path(str(path), run_name="__main__")
            except SystemExit as e:
                return int(e.code or 0) if not isinstance(e.code, str) else 1
            return 0
        mod = importlib.import_module(target)
        return int(mod.main(args.rest) or 0)

    return run


_DELEGATED = {
    "compare-logprobs": ("tools/compare_logprobs.py", "log-prob parity of the mcore model vs transformers"),
    "convert": ("tools/convert_checkpoint.py", "convert mcore dist-checkpoints <-> HF directories"),
    "eval": ("megatron_papo.evaluate", "avg@k evaluation of an HF checkpoint through the rollout engine"),
    "check-weight-sync": ("tools/check_weight_sync.py", "engine vs actor log-probs after a weight sync"),
    "report": ("megatron_papo.report", "PNG plots (runs overlaid) and a Markdown summary of run directories"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-papo", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run RL training (PAPO / GRPO / DAPO) from a recipe")
    t.add_argument("--config", default="tiny_cpu", help="recipe name in launch/configs/ or a YAML path")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    t.set_defaults(fn=_cmd_train)

    c = sub.add_parser("config", help="print the resolved config of a recipe (or --describe every knob)")
    c.add_argument("--config", default=None, help="recipe name or YAML path")
    c.add_argument("--describe", action="store_true", help="list every config field with type, default and help")
    c.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    c.set_defaults(fn=_cmd_config)

    m = sub.add_parser("make-tiny", help="write an offline tiny Qwen2.5-VL HF checkpoint")
    m.add_argument("out", help="output directory")
    for name, tp in _TINY_OPTS.items():
        m.add_argument(f"--{name.replace('_', '-')}", dest=name, type=tp, default=None)
    m.add_argument("--untied", dest="tie_word_embeddings", action="store_false", default=None,
                   help="separate LM head (7B layout)")
    _TINY_OPTS["tie_word_embeddings"] = bool
    m.set_defaults(fn=_cmd_make_tiny)

    for name, (module, helptext) in _DELEGATED.items():
        d = sub.add_parser(name, help=helptext, add_help=False)
        d.add_argument("rest", nargs=argparse.REMAINDER)
        d.set_defaults(fn=_delegate(module))
    return p


#: exception type -> (what the one line calls it, exit code)
ONE_LINE_ERRORS: tuple[tuple[type, str, int], ...] = (
    (ConfigError, "config error", 2), (DataError, "data error", 2), (CheckpointError, "checkpoint error", 2),
    (DivergedError, "training stopped", 3),
)


def one_line(e: BaseException) -> str:
    """The exception's message on one line (inner newlines folded)."""
    return " | ".join(part.strip() for part in str(e).splitlines() if part.strip()) or type(e).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MEGATRON_PAPO_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if argv and argv[0] in _DELEGATED:  # argparse.REMAINDER rejects an option-like first token ("eval --model X")
        args = argparse.Namespace(command=argv[0], rest=argv[1:], fn=_delegate(_DELEGATED[argv[0]][0]))
    else:
        args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except tuple(t for t, _, _ in ONE_LINE_ERRORS) as e:
        kind, code = next((k, c) for t, k, c in ONE_LINE_ERRORS if isinstance(e, t))
        if debug:
            traceback.print_exc()
        print(f"megatron-papo: {kind}: {one_line(e)}", file=sys.stderr)
        return code
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("megatron_papo"):
            print(f"megatron-papo: '{args.command}' is not available in this build ({e.name} missing)", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
