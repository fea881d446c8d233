"""Every Triton kernel in triton_kernels/ compiles for real GPUs (sm_80, sm_90) in fp32/fp16/bf16, without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget(...))`` runs the whole NVIDIA pipeline (TTIR -> TTGIR -> LLVM
-> PTX -> cubin via the bundled ptxas); the bundled cuobjdump then reads registers and stack (spills) from the
cubin. The compile runs in subprocesses with TRITON_INTERPRET removed: under the interpreter ``@triton.jit``
yields interpreter functions, and the test session sets it before triton is imported.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ARCHS = (80, 90)
DTYPES = ("fp32", "fp16", "bf16")
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # max shared memory per block (A100, H100)

# Runs in the child: compiles every (kernel variant, dtype) for one arch and prints one JSON line each.
COMPILE_SCRIPT = r"""
import json, re, subprocess, sys, tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

arch = int(sys.argv[1])
from effkern.triton_kernels import gqa_decode as gqa
from effkern.triton_kernels import kv_append as kv
from effkern.triton_kernels import low_rank_attention as lra
from effkern.triton_kernels import low_rank_embedding as lre
from effkern.triton_kernels import low_rank_linear as lrl
from effkern.triton_kernels import residual_layer_norm as rln
bs, rows = gqa.block_size, gqa.chunk_rows

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DATA_PTRS = {"q_ptr", "k_ptr", "v_ptr", "out_ptr", "k_cache_ptr", "v_cache_ptr", "qkv_ptr", "dout_ptr",
             "dqkv_ptr", "u_ptr", "z_ptr", "h_ptr", "x_ptr", "dh_ptr", "dx_ptr", "du_ptr", "b1_ptr", "v_ptr",
             "b2_ptr", "y_ptr", "g_ptr", "a_ptr", "dt_ptr", "table_ptr", "mu_ptr"}  # in the model's dtype
INT_PTRS = {"seq_lens_ptr", "kv_start_ptr", "slots_ptr", "err_ptr"}  # err_ptr: the index-error word
INT64_PTRS = {"ids_ptr", "off_ptr"}
FLOATS = {"scale", "softcap", "eps"}


def arg_type(name, dtype):
    if name in DATA_PTRS:
        return "*" + dtype
    if name in INT_PTRS:
        return "*i32"
    if name in INT64_PTRS:
        return "*i64"
    if name.endswith("_ptr"):
        return "*fp32"  # RoPE tables, projections, fp32 scratch
    return "fp32" if name in FLOATS else "i32"  # strides and counts


def variants(dtype):
    # (kernel, name, constexprs, strides divisible by 16, launch options) as the launchers choose them
    dec = dict(num_warps=gqa.NUM_WARPS, num_stages=gqa.DECODE_STAGES)
    plain = dict(num_warps=gqa.NUM_WARPS)
    t = DTYPES[dtype]
    yield gqa._rotate_project_q_kernel, "rope", dict(
        HEAD_D=128, HEAD_DK=128, ROT_DIM=64, ROPE_STYLE=0, HAS_PROJ=False, BLOCK_DK=128, BLOCK_C=rows(128, 128)
    ), True, plain
    yield gqa._rotate_project_q_kernel, "rope+proj", dict(
        HEAD_D=96, HEAD_DK=80, ROT_DIM=96, ROPE_STYLE=1, HAS_PROJ=True, BLOCK_DK=bs(80), BLOCK_C=rows(96, bs(80))
    ), True, plain
    yield gqa._decode_split_kernel, "g8-d128", gqa.decode_constexprs(t, 8, 128, 128, 1, False, False), True, dec
    yield gqa._decode_split_kernel, "g5-dk80-dv96-split-softcap-start", gqa.decode_constexprs(
        t, 5, 80, 96, 8, True, False, True), True, dec
    yield gqa._decode_split_kernel, "g32-d256-split", gqa.decode_constexprs(t, 32, 256, 256, 4, False, False), True, dec
    # a contiguous Dk = 72 cache: key stride 72 is not a multiple of 16, so no vector loads
    yield gqa._decode_split_kernel, "g1-d72-unaligned", gqa.decode_constexprs(t, 1, 72, 72, 1, False, False), False, dec
    yield gqa._combine_splits_kernel, "split8-dv96", dict(
        NUM_SPLITS=8, HEAD_DV=96, BLOCK_S=8, BLOCK_DV=bs(96)), True, plain
    yield kv._kv_append_kernel, "rope", dict(
        GROUP=1, HEAD_D=128, HEAD_DK=128, HEAD_DV=128, ROT_DIM=128, ROPE_STYLE=0, HAS_PROJ=False,
        BLOCK_DK=128, BLOCK_DV=128, BLOCK_C=rows(128, 128)), True, plain
    yield kv._kv_append_kernel, "rope+proj", dict(
        GROUP=2, HEAD_D=64, HEAD_DK=96, HEAD_DV=80, ROT_DIM=32, ROPE_STYLE=1, HAS_PROJ=True,
        BLOCK_DK=bs(96), BLOCK_DV=bs(80), BLOCK_C=rows(128, bs(96))), True, plain
    # low-rank attention (LAST side networks): 2 heads of 8 dims (r = 16) and one head of 64
    for heads, dh in ((2, 8), (1, 64)):
        c = lra.kernel_constexprs(t, heads, dh, False)
        for fn in (lra._fwd_kernel, lra._bwd_dkdv_kernel, lra._bwd_dq_kernel):
            yield fn, f"h{heads}-dh{dh}", c, True, dict(num_warps=lra.NUM_WARPS)
    # residual + LayerNorm rows of a ViT-B side stream (d 768)
    _, meta = rln._grid(4096, 768)
    launch = dict(num_warps=meta.pop("num_warps"))
    for fn in (rln._rln_fwd_kernel, rln._rln_bwd_kernel):
        yield fn, "d768", meta, True, launch
    # fused low-rank linear of a CTR MLP (400 -> rank 64 -> 400, ReLU inside and out; GELU at rank 20)
    for rank, act in ((64, 1), (20, 2)):
        c = lrl.kernel_constexprs(t, rank, act, True, False)
        yield (lrl._lrl_fwd_kernel, f"r{rank}-act{act}", dict(c, HAS_B2=True, RELU_OUT=rank == 64), True,
               dict(num_warps=lrl.NUM_WARPS))
        c = lrl.kernel_constexprs(t, rank, act, True, False, backward=True)
        yield lrl._lrl_bwd_kernel, f"r{rank}-act{act}", c, True, dict(num_warps=lrl.NUM_WARPS)
    # compressed embedding lookup: k 4 -> d 16 (bags averaged), k 16 -> d 64
    for k, d, mean in ((4, 16, True), (16, 64, False)):
        c = dict(MEAN=mean, BLOCK_B=lre.BLOCK_B, BLOCK_K=k, BLOCK_D=d)
        for fn in (lre._lre_fwd_kernel, lre._lre_de_kernel):
            yield fn, f"k{k}-d{d}", c, True, dict(num_warps=lre.NUM_WARPS)


def resources(cubin):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        dump = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    return {key: int(n) for key, n in re.findall(r"\b(REG|STACK):(\d+)", dump)}


target = GPUTarget("cuda", arch, 32)
for dtype in DTYPES:
    for fn, variant, constexprs, aligned, options in variants(dtype):
        signature = {n: "constexpr" if n in constexprs else arg_type(n, dtype) for n in fn.arg_names}
        # the JIT's specialisation of typical arguments: 16-byte aligned pointers, strides divisible by 16
        attrs = {(i,): [["tt.divisibility", 16]] for i, (n, ty) in enumerate(signature.items())
                 if ty.startswith("*") or (aligned and n.startswith("stride"))}
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=target, options=options)
        ptx = compiled.asm["ptx"]
        print(json.dumps(dict(
            kernel=fn.__name__, variant=variant, dtype=dtype, aligned=aligned, cubin_bytes=len(compiled.asm["cubin"]),
            ptx_target=re.search(r"^\.target (\w+)", ptx, re.M).group(1), mma="mma" in ptx,
            shared=compiled.metadata.shared, **resources(compiled.asm["cubin"]))))
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[int, list[dict]]:
    """Per arch, one record per compiled kernel variant; the archs compile in parallel child processes, run from
    an empty folder so ``python -c`` cannot pick up a source checkout's effkern/ instead of the installed one."""
    cwd = tmp_path_factory.mktemp("triton_compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {arch: subprocess.Popen([sys.executable, "-c", COMPILE_SCRIPT, str(arch)], env=env, cwd=cwd,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for arch in ARCHS}
    results = {}
    for arch, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"sm_{arch} compile failed:\n{err[-4000:]}"
        results[arch] = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return results


@pytest.mark.parametrize("arch", ARCHS)
def test_triton_kernels_compile_for_gpu(compiled, arch):
    records = compiled[arch]
    assert len(records) == len(DTYPES) * 25  # every dtype x variant compiled
    for r in records:
        where = f"{r['kernel']}[{r['variant']}, {r['dtype']}] on sm_{arch}"
        assert r["cubin_bytes"] > 0, where
        assert r["ptx_target"] == ("sm_90a" if arch == 90 else "sm_80"), where
        assert r["shared"] <= SHARED_LIMIT[arch], (where, r["shared"])
        if r["aligned"]:
            assert r["STACK"] == 0, f"{where} spills registers: {r}"
        if r["kernel"] in ("_decode_split_kernel", "_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel",
                           "_lrl_fwd_kernel", "_lrl_bwd_kernel") \
                and r["dtype"] != "fp32":
            assert r["mma"], f"{where}: 16-bit caches must reach the tensor cores"
