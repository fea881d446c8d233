"""The GPU check: one command for the day a GPU is lent. On a bare GPU machine holding a copy of this tree (the
device tool's machine: torch, triton, nvcc, pytest already installed, no network), it

1. probes the machine (card, compute capability, torch / triton / CUDA / nvcc versions, nvidia-smi);
2. builds effkern._C with the CUDA kernels for the card present (``pip install --no-build-isolation --no-deps -e .``
   with EFFKERN_BUILD_CUDA=1, TORCH_CUDA_ARCH_LIST = the card's capability, MAX_JOBS = the cores; if pip itself
   fails for a reason other than a compile error, ``setup.py build_ext --inplace`` in a scratch folder);
3. runs every GPU test (``pytest -m cuda tests`` with TRITON_INTERPRET=0, so the Triton kernels are compiled for the
   card instead of interpreted; tests/conftest.py marks every test that skips without a CUDA GPU);
4. runs the GPU rows of the op benchmarks (``--device cuda --quick``);

and leaves in OUT (a folder) 5 files: ``summary.json`` (rewritten after every stage, so a kill leaves what was
done: card, versions, build time, test counts per file, failed test ids, files that did not collect, skip
reasons, every bench row), ``env.txt``, ``build.log``, ``tests.log`` (the full pytest output), ``bench.log``; a
digest is printed last. Every stage has a time limit and the whole run a budget (``--budget``, default 480 s:
~8 minutes; the stages' limits scale with it); a stage that fails or times out is recorded and the next one still
runs; SIGTERM / SIGINT kill the running stage and still write the summary. Exit status 0 only when every stage
passed.

Without a GPU the build and the benchmarks report "skipped: no GPU" and the test stage still runs ``pytest -m
cuda`` (every selected test skips), so the script runs end to end on a CPU machine (exit status 0 with
``--dry-run``, which also skips the build and the benchmarks on a GPU):

    python bench/gpu_check.py /tmp/gpucheck --dry-run
    make gpu-check OUT=/tmp/gpucheck GPU_CHECK_ARGS=--dry-run

``--force-build`` (in a copy of the tree with a throwaway environment: it installs effkern editable) and
``--bench-device cpu`` run those two stages on a CPU machine too. On a lent machine (the device tool's ``run``,
timeout_s 540, nothing to carry: the machine's own python3 with its torch / triton is used):

    PYTHONUNBUFFERED=1 python3 bench/gpu_check.py $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCHES = ["gqa_decode", "low_rank_attention", "residual_layer_norm", "low_rank_linear"]
# seconds at the default budget of 480 s: the most each stage (each benchmark) may take, scaled with --budget;
# every stage also stops at the run's deadline
LIMITS = {"probe": 60, "build": 270, "tests": 180, "bench": 75}
DEFAULT_BUDGET = 480
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")

PROBE = r"""
import json, platform, sys
info = {"python": sys.version.split()[0], "platform": platform.platform()}
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, gpu=torch.cuda.is_available())
    if info["gpu"]:
        p = torch.cuda.get_device_properties(0)
        info.update(card=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                    sm_count=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                    device_count=torch.cuda.device_count())
except Exception as e:
    info.update(gpu=False, torch_error=repr(e))
try:
    import triton
    info["triton"] = triton.__version__
except Exception as e:
    info["triton"] = None
    info["triton_error"] = repr(e)
for name in ("pytest", "setuptools", "xdist", "pytest_timeout"):
    try:
        module = __import__(name)
        info[name] = getattr(module, "__version__", "installed")
    except Exception:
        info[name] = None
print("PROBE " + json.dumps(info))
"""

VERIFY = ("import effkern, effkern._C as c, effkern.triton_kernels; "
          "print('effkern._C', c.__file__, 'HAS_CUDA', getattr(c, 'HAS_CUDA', False))")


class Check:
    """The run's state: the output folder, the deadline, and the summary rewritten after every stage."""

    def __init__(self, out: Path, budget: float, dry_run: bool, force_build: bool = False,
                 bench_device: str = "cuda"):
        self.out, self.dry_run, self.force_build, self.bench_device = out, dry_run, force_build, bench_device
        self.start = time.monotonic()
        self.deadline = self.start + budget
        self.scale = budget / DEFAULT_BUDGET
        self.summary: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "budget_s": budget,
                              "dry_run": dry_run, "repo": str(REPO), "git_head": git_head(), "stages": {}}

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def limit(self, stage: str, spent: float = 0.0) -> float:
        return max(0.0, min(LIMITS[stage] * self.scale - spent, self.remaining() - 5))

    def stage(self, name: str, status: str, seconds: float = 0.0, **detail) -> None:
        self.summary["stages"][name] = dict(status=status, seconds=round(seconds, 1), **detail)
        self.write()
        print(f"[gpu-check {time.monotonic() - self.start:6.1f} s] {name}: {status}"
              + (f" ({seconds:.1f} s)" if seconds else ""), flush=True)

    def write(self) -> None:
        self.summary["elapsed_s"] = round(time.monotonic() - self.start, 1)
        tmp = self.out / "summary.json.tmp"
        tmp.write_text(json.dumps(self.summary, indent=1, default=str))
        tmp.replace(self.out / "summary.json")


def git_head() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


CHILD_GROUPS: set[int] = set()  # process groups of the running stage, killed if this script is stopped


def stop(signum, frame) -> None:
    """SIGTERM / SIGINT (the device tool's limit, Ctrl-C): kill the stage's process group, then leave through the
    ``finally`` that writes the summary."""
    for group in list(CHILD_GROUPS):
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    raise SystemExit(128 + signum)


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict | None = None, cwd: Path = REPO,
               append: bool = True, label: str | None = None) -> tuple[str, int | None, float]:
    """Run ``cmd`` with stdout + stderr appended to ``log``, in its own process group (killed whole at the
    timeout: nvcc jobs, pytest workers; in this session, so whatever stops the session stops it too). Returns
    (status, exit code or None, seconds); status is "ok", "failed" or "timeout"."""
    start = time.monotonic()
    with open(log, "a" if append else "w") as f:
        f.write(f"\n$ {label or ' '.join(cmd)}   (cwd {cwd}, limit {timeout:.0f} s)\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                preexec_fn=os.setpgrp)
        CHILD_GROUPS.add(proc.pid)
        try:
            code = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            f.write(f"\n[gpu-check] killed after {timeout:.0f} s\n")
            return "timeout", None, time.monotonic() - start
        finally:
            CHILD_GROUPS.discard(proc.pid)
    return ("ok" if code == 0 else "failed"), code, time.monotonic() - start


def child_env(**extra: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_ROOT_USER_ACTION="ignore",
               HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.pop("EFFKERN_BACKEND", None)
    env.update(extra)
    return env


# ---- stages -----------------------------------------------------------------------------------------------------


def probe(check: Check) -> dict:
    env_txt = check.out / "env.txt"
    status, code, secs = run_logged([sys.executable, "-c", PROBE], env_txt, check.limit("probe"), child_env(),
                                    append=False, label=f"{sys.executable} -c PROBE (bench/gpu_check.py)")
    text = env_txt.read_text()
    line = next((x for x in text.splitlines() if x.startswith("PROBE ")), None)
    info = json.loads(line[6:]) if line else {"gpu": False}
    for cmd in (["nvidia-smi"], ["nvcc", "--version"]):
        if shutil.which(cmd[0]):
            run_logged(cmd, env_txt, 20, child_env())
    nvcc = re.search(r"release ([\d.]+)", env_txt.read_text())
    info["nvcc"] = nvcc.group(1) if nvcc else None
    driver = re.search(r"Driver Version:\s*([\d.]+)", env_txt.read_text())
    info["driver"] = driver.group(1) if driver else None
    check.summary["machine"] = info
    check.stage("probe", status if line else "failed", secs)
    return info


def build(check: Check, info: dict) -> bool:
    if (not info.get("gpu") or check.dry_run) and not check.force_build:
        check.stage("build", "skipped: " + ("no GPU" if not info.get("gpu") else "--dry-run"),
                    command="pip install --no-build-isolation --no-deps --no-index -v -e .  (EFFKERN_BUILD_CUDA=1)")
        return False
    if info.get("capability"):
        major, minor = info["capability"]
        arch = f"{major}.{minor}"
    else:  # --force-build without a GPU
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0")
    jobs = str(os.cpu_count() or 4)
    env = child_env(EFFKERN_BUILD_CUDA="1", TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS=jobs)
    headers = cuda_library_headers()
    if headers:  # setup.py adds only its own purelib's nvidia/cu13/include
        env["CPATH"] = os.pathsep.join(headers + [p for p in [env.get("CPATH")] if p])
    log = check.out / "build.log"
    log.write_text("")
    status, code, secs = run_logged([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
                                     "--no-index", "-v", "-e", "."], log, check.limit("build"), env)
    how = "pip install -e"
    if status == "failed" and "ninja: build stopped" not in log.read_text():  # pip failed, not the compiler
        how = "setup.py build_ext --inplace (pip install failed)"
        status, code, more = build_in_scratch(log, check.limit("build", spent=secs), env)
        secs += more
    if status == "ok":
        try:
            verify = subprocess.run([sys.executable, "-c", VERIFY], cwd=REPO, env=env, capture_output=True,
                                    text=True, timeout=120)
            said = verify.stdout + verify.stderr
        except subprocess.TimeoutExpired:
            said = "timed out"
        with open(log, "a") as f:
            f.write(f"\n$ python -c {VERIFY!r}\n{said}")
        if not re.search(r"HAS_CUDA True", said):
            status = "failed: effkern._C does not import with its CUDA kernels (build.log)"
    check.summary["build"] = dict(seconds=round(secs, 1), arch=arch, max_jobs=jobs, how=how, exit_code=code,
                                  extra_include=headers)
    check.stage("build", status, secs, arch=arch, how=how)
    return status == "ok"


def cuda_library_headers() -> list[str]:
    """Folders holding cuSPARSE's / cuBLAS's headers (ATen's CUDAContextLight.h includes them; cpp_extension does not
    add them): the nvidia wheels' include folders on sys.path, and the toolkit's own."""
    found = []
    roots = [Path(p) for p in sys.path if p and Path(p, "nvidia").is_dir()]
    for root in roots:
        for header in ("cusparse.h", "cublas_v2.h", "cublasLt.h", "cusolverDn.h"):
            found += [str(h.parent) for h in sorted(root.glob(f"nvidia/*/include/{header}"))]
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and Path(home, "include", "cusparse.h").exists():
            found.append(str(Path(home, "include")))
    return list(dict.fromkeys(found))


def build_in_scratch(log: Path, timeout: float, env: dict) -> tuple[str, int | None, float]:
    """``setup.py build_ext --inplace`` in a scratch copy of setup.py + csrc (no pyproject metadata for an old
    setuptools to reject, nothing written to site-packages); the module is copied into effkern/, and effkern/
    triton_kernels links to triton_kernels/ (the editable install's mapping) until the run ends."""
    scratch = Path(tempfile.mkdtemp(prefix="effkern-build-"))
    shutil.copy2(REPO / "setup.py", scratch)
    shutil.copytree(REPO / "csrc", scratch / "csrc")
    (scratch / "effkern").mkdir()  # build_ext --inplace puts effkern._C there
    status, code, secs = run_logged([sys.executable, "setup.py", "build_ext", "--inplace"], log, timeout, env,
                                    cwd=scratch)
    if status == "ok":
        for so in (scratch / "effkern").glob("_C*" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")):
            shutil.copy2(so, REPO / "effkern" / so.name)
        link = REPO / "effkern" / "triton_kernels"
        if not link.exists():
            link.symlink_to("../triton_kernels")
            LINKS.append(link)
    return status, code, secs


LINKS: list[Path] = []

VERDICT = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
NODE = re.compile(r"(tests/[\w/.-]+\.py)::(\S+)")
SKIP_REASON = re.compile(r"^SKIPPED \[(\d+)\] ([\w/.-]+\.py):\d+: (.*)$")
COLLECT_ERROR = re.compile(r"^_+ ERROR collecting (\S+) _+$")


def parse_pytest_log(text: str) -> dict:
    """Per-file outcome counts from a ``pytest -v -rs`` log (plain or pytest-xdist lines; a test's last verdict
    wins, so a teardown error after a pass counts as an error), the failed ids, and the skip reasons. Works on a
    log cut short by a kill: what finished is counted."""
    verdicts: dict[str, str] = {}
    skip_reasons: dict[str, int] = {}
    collection_errors = []
    for line in text.splitlines():
        m = COLLECT_ERROR.match(line.strip())
        if m:
            collection_errors.append(m.group(1))
            continue
        m = SKIP_REASON.match(line.strip())
        if m:
            skip_reasons[m.group(3)] = skip_reasons.get(m.group(3), 0) + int(m.group(1))
            continue
        node, verdict = NODE.search(line), VERDICT.search(line)
        if node and verdict:
            verdicts[f"{node.group(1)}::{node.group(2)}"] = verdict.group(1)
    names = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped", "XFAIL": "xfailed",
             "XPASS": "xpassed"}
    per_file: dict[str, dict[str, int]] = {}
    for nodeid, verdict in verdicts.items():
        counts = per_file.setdefault(nodeid.split("::")[0], {})
        counts[names[verdict]] = counts.get(names[verdict], 0) + 1
    totals = {k: sum(c.get(k, 0) for c in per_file.values()) for k in OUTCOMES}
    failed = [n for n, v in verdicts.items() if v in ("FAILED", "ERROR")]
    # "collected 971 items / 777 deselected / 194 selected", "collected 12 items", or xdist's "8 workers [194 items]"
    counts = [re.search(p, text) for p in (r"collected \d+ items?.* (\d+) selected", r"collected (\d+) items?",
                                           r"workers \[(\d+) items?\]")]
    collected = next((int(m.group(1)) for m in counts if m), None)
    last = re.findall(r"^=+ (.*\bin [\d.]+s.*?) =+$", text, re.M)  # pytest's closing line; absent if killed
    return dict(per_file=per_file, totals=totals, failed_ids=failed[:100], failed_count=len(failed),
                collection_errors=collection_errors, skip_reasons=skip_reasons, selected=collected,
                pytest_result=last[-1] if last else None)


def tests(check: Check, info: dict) -> None:
    limit = check.limit("tests")
    if limit < 10:
        check.stage("tests", "skipped: out of time")
        return
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "tests", "-v", "-rs", "-p", "no:cacheprovider",
           "--continue-on-collection-errors"]
    if info.get("xdist") and info.get("gpu"):  # Triton's JIT compiles on the CPU: spread it over the cores
        cmd += ["-n", str(min(8, max(2, (os.cpu_count() or 2) // 2)))]
    if info.get("pytest_timeout"):
        cmd += ["--timeout", "120"]
    log = check.out / "tests.log"
    log.write_text("")
    status, code, secs = run_logged(cmd, log, limit, child_env(TRITON_INTERPRET="0"))
    result = parse_pytest_log(log.read_text())
    result.update(exit_code=code, seconds=round(secs, 1), command=" ".join(cmd[1:]))
    check.summary["tests"] = result
    t = result["totals"]
    if status == "ok" and not info.get("gpu"):
        status = "ok (no GPU: every selected test skipped)" if t["passed"] == 0 else "ok"
    elif code == 5:
        status = "failed: no GPU test collected"
    elif status == "failed":
        status = (f"failed: {t['failed']} failed, {t['error']} errors, {len(result['collection_errors'])} test files "
                  f"not collected (tests.log)")
    check.stage("tests", status, secs, **{k: t[k] for k in ("passed", "failed", "error", "skipped")})


def benches(check: Check, info: dict) -> None:
    check.summary["benches"] = {}
    device = check.bench_device
    if device == "cuda" and (not info.get("gpu") or check.dry_run):
        why = "no GPU" if not info.get("gpu") else "--dry-run"
        for name in BENCHES:
            check.summary["benches"][name] = dict(status=f"skipped: {why}",
                                                  command=f"bench/{name}.py --device cuda --quick")
        check.stage("bench", f"skipped: {why}")
        return
    log = check.out / "bench.log"
    log.write_text("")
    scratch = Path(tempfile.mkdtemp(prefix="effkern-bench-"))
    total, statuses = 0.0, []
    for name in BENCHES:
        limit = check.limit("bench")
        if limit < 10:
            check.summary["benches"][name] = dict(status="skipped: out of time")
            statuses.append("skipped")
            continue
        rows_path = scratch / f"{name}.json"
        status, code, secs = run_logged([sys.executable, str(REPO / "bench" / f"{name}.py"), "--device", device,
                                         "--quick", "--json", str(rows_path)], log, limit, child_env())
        rows = json.loads(rows_path.read_text()) if rows_path.exists() else []
        check.summary["benches"][name] = dict(status=status, exit_code=code, seconds=round(secs, 1), rows=rows)
        check.write()
        total += secs
        statuses.append(status)
        print(f"[gpu-check] bench {name}: {status} ({secs:.1f} s, {len(rows)} rows)", flush=True)
    check.stage("bench", "ok" if all(s == "ok" for s in statuses) else "failed: " + ", ".join(
        f"{n} {s}" for n, s in zip(BENCHES, statuses, strict=True) if s != "ok"), total)


def print_digest(summary: dict) -> None:
    """The short table the device tool's reply shows (the end of the output)."""
    m = summary.get("machine", {})
    print(f"\n== gpu-check: {m.get('card', 'no GPU')} | torch {m.get('torch')} (CUDA {m.get('torch_cuda')}) | "
          f"triton {m.get('triton')} | nvcc {m.get('nvcc')} | driver {m.get('driver')}")
    for name, s in summary["stages"].items():
        print(f"   {name:7s} {s['status']}  {s['seconds']} s")
    t = summary.get("tests")
    if t:
        for path, c in sorted(t["per_file"].items()):
            print(f"   {path}: " + ", ".join(f"{c[k]} {k}" for k in OUTCOMES if c.get(k)))
        for nodeid in t["failed_ids"][:15]:
            print(f"   FAILED {nodeid}")
        for path in t["collection_errors"]:
            print(f"   NOT COLLECTED {path}")
        for reason, n in list(t["skip_reasons"].items())[:5]:
            print(f"   skipped {n}: {reason}")
    for name, b in summary.get("benches", {}).items():
        for r in b.get("rows", []):
            extra = "".join(f" {k}={r[k]:.3g}" for k in ("read_fraction", "copy_fraction", "speedup_vs_reference",
                                                        "speedup_vs_torch", "fwd_speedup") if k in r)
            ms = r.get("time_ms", r.get("fwd_ms"))
            print(f"   {name} {r.get('backend')} {r.get('dtype', '')} "
                  + (f"{ms:.4g} ms" if isinstance(ms, float) else "") + extra)
    print(f"   summary: {summary['elapsed_s']} s, files in {summary.get('out')}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder for summary.json and the logs (created; the device tool's $OUT)")
    p.add_argument("--dry-run", action="store_true",
                   help="no build and no benchmarks even on a GPU; the test stage still runs `pytest -m cuda`")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                   help=f"seconds for the whole run (default {DEFAULT_BUDGET}); the stages' limits scale with it")
    p.add_argument("--force-build", action="store_true",
                   help="build even without a GPU (arch: TORCH_CUDA_ARCH_LIST, default 9.0), to check the build stage "
                        "on a CPU machine; it installs effkern editable from this tree, so use a copy of the tree "
                        "and a throwaway environment")
    p.add_argument("--bench-device", default="cuda", choices=["cuda", "cpu"],
                   help="the benchmarks' --device (cpu: check the bench stage on a CPU machine; slow)")
    args = p.parse_args(argv)
    if not args.out:
        p.error("OUT is empty: pass a folder (make gpu-check OUT=DIR)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.budget, args.dry_run, args.force_build, args.bench_device)
    check.summary["out"] = str(out.resolve())
    info: dict = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    try:
        info = probe(check)
        if not info.get("gpu"):
            print("[gpu-check] no CUDA GPU here: the GPU tests will skip, the build and the GPU benchmarks are "
                  "skipped unless --force-build / --bench-device cpu", flush=True)
        for name, stage in (("build", build), ("tests", tests), ("bench", benches)):
            try:
                stage(check, info)
            except Exception as e:  # a bug here must not cost the stages after it
                check.stage(name, f"failed: gpu_check.py raised {e!r}")
    except SystemExit as e:
        check.summary["stopped"] = f"by signal {e.code - 128} after {time.monotonic() - check.start:.0f} s"
        raise
    finally:
        for link in LINKS:
            link.unlink(missing_ok=True)
        check.write()
    print_digest(check.summary)
    if not info.get("gpu") and not args.dry_run:
        print("[gpu-check] FAILED: no CUDA GPU found (env.txt); use --dry-run to check the script without one")
        return 1
    skipped_ok = ("skipped: no GPU", "skipped: --dry-run")
    return 0 if all(s["status"].startswith(("ok", *skipped_ok)) for s in check.summary["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
