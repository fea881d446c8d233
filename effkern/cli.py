"""The ``effkern`` command: ``effkern info``, ``effkern bench <name>`` and one subcommand per registered method
(:data:`effkern.methods.METHODS`), its flags built from the method's config: every field a flag with its help and
default (tuples as comma lists, pairs as ``a:b``, booleans with ``--no-<field>``), ``--quick`` / ``--smoke`` the
presets (flags given beside them override them), the whole config validated before any work starts."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import platform
import runpy
import sys
import types
import typing
from pathlib import Path

import torch

from effkern.methods import METHODS, Method
from effkern.methods.common import RunFileError
from effkern.ops import _backend

CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16", "amx_tile")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    have = set(line.split(":", 1)[-1].split())
    return [f for f in CPU_FLAGS if f in have]


def info() -> dict:
    """Versions, built extensions, usable backends per device, CPU features and GPUs."""
    ext = _backend.extension()
    out = {
        "effkern": _version("effkern"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "timm": _version("timm"),
        "transformers": _version("transformers"),
        "extension": "not built" if ext is None else ext.__file__,
        "cuda_kernels_built": bool(getattr(ext, "HAS_CUDA", False)),
        "cpu_kernel_isa": ext.cpu_isa() if ext is not None else None,
        "cpu": platform.processor() or platform.machine(),
        "cpu_flags": _cpu_flags(),
        "threads": torch.get_num_threads(),
        "backends_cpu": _backend.usable_backends(torch.device("cpu")),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
    }
    if out["gpus"]:
        out["backends_cuda"] = _backend.usable_backends(torch.device("cuda"))
    return out


def _bench(name: str, rest: list[str]) -> None:
    script = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    if not script.exists():
        raise SystemExit(f"no benchmark {script}: `effkern bench` needs a source checkout (bench/ is not installed)")
    sys.argv = [str(script), *rest]
    runpy.run_path(str(script), run_name="__main__")


def _parser_of(hint):
    """(parse one command-line value, metavar) for a config field's type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = next(a for a in args if a is not type(None))
        parse, metavar = _parser_of(inner)
        return (lambda text: None if text.lower() == "none" else parse(text)), f"{metavar}|none"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            item, metavar = _parser_of(args[0])
            return (lambda text: tuple(item(v) for v in text.split(",") if v)), f"{metavar},..."
        return (lambda text: tuple(a(v) for a, v in zip(args, text.split(":"), strict=True))), ":".join(
            a.__name__.upper() for a in args)
    return hint, hint.__name__.upper()


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(":".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value) or "(empty)"
    return str(value)


def _add_method(sub, name: str, method: Method, path: tuple[str, ...]) -> None:
    """``name``'s parser (its flags from ``method``'s config); ``path`` is where ``_run_method`` finds it."""
    config = method.load("config")
    p = sub.add_parser(name, help=method.help, description=config.__doc__, argument_default=argparse.SUPPRESS,
                       allow_abbrev=False)  # a mistyped flag is an error, not a prefix of another
    if config.QUICK or config.SMOKE:
        preset = p.add_mutually_exclusive_group()
        preset.add_argument("--quick", dest="_preset", action="store_const", const="quick",
                            help=f"the quick preset (minutes, for the demo): {_show_preset(config.QUICK)}")
        preset.add_argument("--smoke", dest="_preset", action="store_const", const="smoke",
                            help=f"the smoke preset (seconds, for tests): {_show_preset(config.SMOKE)}")
    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        extra = f" (one or more of {_show(choices)})" if choices and hints[f.name] is not str else ""
        if hints[f.name] is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                           help=f"{text} (default: {f.default})")
            continue
        parse, metavar = _parser_of(hints[f.name])
        p.add_argument(flag, dest=f.name, type=parse, metavar=metavar,
                       choices=choices if hints[f.name] is str else None,
                       help=f"{text}{extra} (default: {_show(f.default)})")
    p.set_defaults(_method=path)


def _show_preset(overrides: dict) -> str:
    return ", ".join(f"{k}={_show(v)}" for k, v in overrides.items()) or "the defaults"


def _run_method(parser: argparse.ArgumentParser, path: tuple[str, ...], given: dict) -> None:
    method = METHODS[path[0]]
    if len(path) > 1 and path[1] != method.command:
        method = dict(method.extra)[path[1]]
    name = " ".join(path)
    try:
        cfg = method.load("config").preset(given.pop("_preset", "default"), **given).check()
    except (TypeError, ValueError) as e:
        parser.exit(2, f"effkern {name}: error: {e}\n")
    try:
        method.load("run")(cfg)
    except RunFileError as e:
        parser.exit(1, f"effkern {name}: error: {e}\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="effkern", description="effkern kernels and method flows; "
                                     "`effkern <command> --help` for a command's options", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    sub.add_parser("info", help="versions, built kernels, usable backends, CPU/GPU")
    bench = sub.add_parser("bench", help="run bench/<name>.py from the source checkout, e.g. `effkern bench "
                           "gqa_decode --quick`")
    bench.add_argument("name")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own options")
    report = sub.add_parser("report", help="one table and plot from side-tuning runs, e.g. `effkern report "
                            "runs/last runs/dtl runs/miet`", allow_abbrev=False)
    report.add_argument("runs", nargs="+", help="run folders of last / dtl / miet")
    report.add_argument("--out", help="also write report.md, rows.json and accuracy.png here")
    for name, method in METHODS.items():
        if method.command is None:
            _add_method(sub, name, method, (name,))
            continue
        commands = sub.add_parser(name, help=method.help, allow_abbrev=False).add_subparsers(
            dest="_command", required=True, metavar="command")
        for command, part in ((method.command, method), *method.extra):
            _add_method(commands, command, part, (name, command))
    args = parser.parse_args(argv)
    if args.command == "info":
        for key, value in info().items():
            print(f"{key:>20}: {value}")
    elif args.command == "bench":
        _bench(args.name, args.args)
    elif args.command == "report":
        from effkern.methods.last.report import report

        try:
            print(report(args.runs, args.out))
        except (FileNotFoundError, ValueError, RunFileError) as e:
            parser.exit(1, f"effkern report: error: {e}\n")
    else:
        given = {k: v for k, v in vars(args).items() if k not in ("command", "_command", "_method")}
        _run_method(parser, args._method, given)


if __name__ == "__main__":
    main()
