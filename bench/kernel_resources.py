"""Registers, spills and shared memory of the attention kernels, compiled for a GPU that is not here.

    TRITON_INTERPRET=0 python bench/kernel_resources.py [--arch 90] [--shape 8,8,4096,32]
        [--metric l2] [--mask none|bool|float] [--causal] [--dropout] [--config KEY]

Triton compiles for a target given by name (here sm_90, the H100) without a device, and ptxas
reports what each kernel uses, so a change that makes a kernel spill registers, or makes ptxas
serialize its wgmma products (advisory C7515), shows on a CPU-only machine before any device time
is spent. Speed still has to be measured on the device. With --sass, KR_SASS_DIR=<dir> also writes
each kernel's SASS there (<kernel name>.sass), to read or to count a loop's instructions.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fusion_backend.kernels import attention as tc  # noqa: E402

_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
        torch.bool: "*i1", torch.uint8: "*u8", torch.int64: "*i64"}


def _signature(fn, args: dict):
    """Triton signature and constexprs for `fn` from example argument values."""
    sig, consts = {}, {}
    for name in fn.arg_names:
        v = args[name]
        if name in fn.constexprs_names if hasattr(fn, "constexprs_names") else False:
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = _PTR[v.dtype]
        elif isinstance(v, bool) or isinstance(v, str):
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, int):
            sig[name] = "i32"
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{name}: {type(v)}")
    return sig, consts


def compile_report(fn, args: dict, constexprs: dict, num_warps: int, num_stages: int, arch: int) -> dict:
    """Compile `fn` for sm_<arch> and return ptxas's resource usage."""
    params = {p.name: p for p in fn.params}
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if params[name].is_constexpr:
            sig[name], consts[name] = "constexpr", constexprs[name]
            continue
        v = args[name]
        # What the launcher would specialize on: ints equal to 1 become constants, and pointers
        # (torch allocations are 16-byte aligned) and ints divisible by 16 carry that divisibility.
        if isinstance(v, int) and v == 1 and not params[name].do_not_specialize:
            sig[name], consts[name] = "constexpr", 1
            continue
        sig[name] = _PTR[v.dtype] if isinstance(v, torch.Tensor) else ("fp32" if isinstance(v, float) else "i32")
        if isinstance(v, torch.Tensor) or (isinstance(v, int) and v % 16 == 0 and not params[name].do_not_specialize):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        # Newer Triton (3.9) writes PTX that only its second, newer ptxas reads.
        for ptxas in ("ptxas", "ptxas-blackwell"):
            out = subprocess.run([os.path.join(bin_dir, ptxas), "-v", f"--gpu-name=sm_{arch}a", ptx, "-o",
                                  os.path.join(d, "k.cubin")], capture_output=True, text=True).stderr
            if "Unsupported .version" not in out:
                break
        sass = ""
        if SASS:
            cuobjdump = os.path.join(bin_dir, "cuobjdump")
            sass = subprocess.run([cuobjdump, "-sass", os.path.join(d, "k.cubin")], capture_output=True,
                                  text=True).stdout
            if os.environ.get("KR_SASS_DIR"):
                with open(os.path.join(os.environ["KR_SASS_DIR"], fn.__name__ + ".sass"), "w") as f:
                    f.write(sass)
    regs = re.search(r"Used (\d+) registers", out)
    spill_st = re.search(r"(\d+) bytes spill stores", out)
    spill_ld = re.search(r"(\d+) bytes spill loads", out)
    return dict(registers=int(regs.group(1)) if regs else None,
                spill_store_bytes=int(spill_st.group(1)) if spill_st else 0,
                spill_load_bytes=int(spill_ld.group(1)) if spill_ld else 0,
                # ptxas's advisory C7515: it waits on every wgmma at once, so no product overlaps
                wgmma_serialized="C7515" in out,
                shared_bytes=kernel.metadata.shared, opcodes=_opcode_counts(sass))


SASS = False  # --sass: also count the SASS instructions by opcode


def _opcode_counts(sass: str) -> dict:
    """Static count of each SASS opcode (the part before the first dot: FFMA, MUFU, HMMA, ...)."""
    counts = {}
    for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass):
        counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts


def attention_reports(B, H, N, D, metric, mask_kind, causal, dropout, config_key, arch, run_if=0, drop_bits=16,
                      softcap=False, skip=False):
    """Resource usage of the forward, dK/dV and dQ kernels for one call's specialization (with a
    learnable scale, or soft-capped dot logits and a constant scale when softcap; skip: the mask's
    kept ranges read, as for a mask of over 1M entries)."""
    dt = torch.bfloat16
    cfg = tc.parse_config_key(config_key) if config_key else tc.default_attention_config(metric, D, dt, "cuda")
    tile_kv, tile_q = tc.backward_tiles(cfg)
    t = torch.empty(1, dtype=dt)
    f32 = torch.empty(1, dtype=torch.float32)
    flags = torch.empty(1, dtype=torch.int32)
    mask = torch.empty(1, dtype=torch.bool if mask_kind == 1 else torch.float32)
    dpad = tc._pad_dim(D)
    common = dict(HEAD_DIM=D, HEAD_DIM_V=D, D_PAD=dpad, DV_PAD=dpad, METRIC=tc.METRIC_IDS[metric],
                  MASK_KIND=mask_kind, CAUSAL=causal, DROPOUT=dropout, DOT_PREC="tf32", RUN_IF=run_if, DROP_BITS=drop_bits,
                  SOFTCAP=softcap, SKIP=skip)
    # Integer arguments as a contiguous call passes them: Triton specializes an int equal to 1 or
    # divisible by 16, and the loads vectorize only where the row strides are known to be.
    ints = {n: 64 for n in ("sqb", "sqh", "sqm", "skb", "skh", "skn", "svb", "svh", "svn", "sob", "soh", "som",
                            "sdob", "sdoh", "sdom", "smb", "smh", "smm", "sgb", "sgh", "sgm", "threshold")}
    ints.update({n: 1 for n in ("sqd", "skd", "svd", "sod", "sdod", "smn", "sgn")})
    ints.update(H=H, HKV=H, N_Q=N, N_K=N, GROUP=1)
    ptrs = {n: t for n in ("Q", "K", "V", "OUT", "DO", "DQ", "DK", "DV")}
    ptrs.update({n: f32 for n in ("SCALE", "KVEC", "QVEC", "STATS_M", "STATS_L", "RBAR", "DELTA", "DSCALE", "DMASK", "SINKS")})
    ptrs.update(MASK=mask, MASK_FLAGS=flags, SEED=torch.empty(1, dtype=torch.int64), RANGES=flags)
    args = dict(ints, **ptrs, dropout_p=0.1, cap=1.0, rgb=64, rgh=64, rg_plane=64)
    out = {}
    key_parts = metric == "l2" and tc._key_parts_pay(cfg, "cuda")  # the forward's KEXT form, as the launcher picks it
    for name, fn, tile, extra in (  # a learnable scale: the forward's stats and the scale gradient
        ("fwd", tc._attn_fwd_kernel, dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
                                          num_stages=cfg["num_stages"]), dict(STATS=not softcap, KEXT=key_parts)),
        ("dkdv", tc._attn_bwd_dkdv_kernel, tile_kv, dict(SCAN_ROWS=tc.QUERY_SCAN_ROWS, SCALE_AFTER=True)),  # GROUP 1
        ("dq", tc._attn_bwd_dq_kernel, tile_q, dict(MASK_GRAD=False, SCALE_GRAD=not softcap)),
    ):
        cx = dict(common, **extra, EVEN_M=N % tile["BLOCK_M"] == 0, EVEN_N=N % tile["BLOCK_N"] == 0,
                  BLOCK_M=tile["BLOCK_M"], BLOCK_N=tile["BLOCK_N"])
        cx.update({k: v for k, v in _kernel_constexpr_defaults(fn).items() if k not in cx})
        kernel_args = dict(args, KVEC=t) if cx.get("KEXT") else args  # the parts are bf16
        out[name] = compile_report(fn, kernel_args, cx, tile["num_warps"], tile["num_stages"], arch)
    return cfg, out


def _kernel_constexpr_defaults(fn) -> dict:
    """Constexprs this script does not set explicitly (new flags default to 0)."""
    return {p.name: 0 for p in fn.params if p.is_constexpr}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--shape", default="8,8,4096,32", help="B,H,N,D")
    ap.add_argument("--metric", default="l2", choices=tc.METRICS_TC)
    ap.add_argument("--mask", default="none", choices=("none", "bool", "float"))
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--dropout", action="store_true")
    ap.add_argument("--config", help="a config key (default: the op's default for the shape)")
    ap.add_argument("--drop-bits", type=int, default=16, choices=(8, 16))
    ap.add_argument("--sass", action="store_true", help="also count SASS instructions by opcode (static)")
    ap.add_argument("--run-if", type=int, default=0, choices=(0, 1, 2), help="the RUN_IF launch (mask_launches)")
    ap.add_argument("--softcap", action="store_true", help="soft-capped dot logits (constant scale)")
    ap.add_argument("--skip", action="store_true", help="read the mask's kept ranges (block skipping)")
    a = ap.parse_args()
    global SASS
    SASS = a.sass
    B, H, N, D = (int(x) for x in a.shape.split(","))
    kind = {"none": 0, "bool": 1, "float": 2}[a.mask]
    cfg, reports = attention_reports(B, H, N, D, a.metric, kind, a.causal, a.dropout, a.config, a.arch, a.run_if, a.drop_bits,
                                      a.softcap, a.skip)
    print(f"{a.metric} D={D} mask={a.mask} causal={a.causal} dropout={a.dropout} softcap={a.softcap} skip={a.skip} "
          f"config={tc.config_key(cfg)}")
    for name, r in reports.items():
        print(f"  {name:5s} registers {r['registers']}, spills {r['spill_store_bytes']} B stored / "
              f"{r['spill_load_bytes']} B loaded, shared {r['shared_bytes']} B"
              + (", wgmma serialized by ptxas" if r["wgmma_serialized"] else ""))
        if a.sass:
            top = sorted(r["opcodes"].items(), key=lambda kv: -kv[1])
            print("        " + " ".join(f"{k}:{v}" for k, v in top[:16]) + f"  total {sum(r['opcodes'].values())}")


if __name__ == "__main__":
    main()
