"""Random-case GPU check of the attention and feed-forward ops: shapes, dtypes, masks, scales,
activations, memory schemes and launch configs drawn at random, each against a float64 reference
on fresh inputs (outputs and every gradient), through the `check` functions and tolerances of
`attention_gpu.py` and `feedforward_gpu.py`.

Those two scripts check fixed lists of cases with the default launch configs. The tuner may pick
any member of `attention_config_space` / `feedforward_config_space`, and the interpreter on CPU
does not run the GPU's code paths (tf32 products, tile shapes, the split forward, block skipping,
cuBLAS epilogues), so this draws both.

Usage:  TRITON_INTERPRET=0 python bench/fuzz_gpu.py --op attention --seed 1 --minutes 4 [--part i]
(each part draws its own cases from the seed: run parts in parallel processes to compile in parallel)
Writes $OUT/fuzz_<op>_<seed>_<part>.json; a failing case prints BAD with the arguments that rerun
it. Exit status 1 if any case failed.
"""
import argparse
import json
import os
import random
import sys
import time
import warnings

os.environ.setdefault("TRITON_INTERPRET", "0")
sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402

import attention_gpu as ag  # noqa: E402
from fusion_backend.kernels.attention import config_key  # noqa: E402
from fusion_backend.ops.attention import attention_config_space  # noqa: E402
from fusion_backend.ops.fallback import FusionFallbackWarning, reset_fallback_warnings  # noqa: E402
from fusion_backend.ops.feedforward import ACTIVATIONS, IMPLS, feedforward_config_space  # noqa: E402

HEAD_DIMS = (16, 24, 32, 40, 48, 64, 72, 80, 96, 112, 128, 160, 192, 256)
MASKS = (None, None, "float", "bool", "tril", "pad_min", "docs", "band", "band_dead")


def draw_attention(rng: random.Random) -> dict:
    metric = rng.choice(("dot", "l2", "cosine", "l1"))
    dtype = rng.choice((torch.bfloat16, torch.float16, torch.float32))
    Hkv = rng.choice((1, 2, 4))
    H = Hkv * rng.choice((1, 1, 2, 4))
    B = rng.choice((1, 2))
    # mostly short, sometimes a decode-like few rows, sometimes long enough for block skipping
    Nq = rng.choice((1, 2, rng.randint(1, 8), rng.randint(1, 200), rng.randint(200, 1200)))
    Nk = rng.choice((Nq, rng.randint(1, 200), rng.randint(200, 1500)))
    D = rng.choice(HEAD_DIMS)
    Dv = D if metric == "l1" or rng.random() < 0.7 else rng.choice(HEAD_DIMS)
    mask = rng.choice(MASKS)
    if mask in ("pad_min", "band_dead") and Nk < 4:
        mask = None
    scale = rng.choice(("tensor", "constant", "number", None))
    smax = rng.choice((0.2, 1.0, 1.0, 10.0)) if metric != "cosine" else rng.choice((1.0, 10.0, 100.0))
    if metric in ("l2", "l1") and dtype != torch.float32:
        # distance logits at larger temperatures make peaked rows, whose relative gradient errors
        # in half precision say little (attention_gpu.check_peaked)
        smax = min(smax, 1.0)
    case = dict(metric=metric, dtype=dtype, B=B, H=H, Hkv=Hkv, Nq=Nq, Nk=Nk, D=D, Dv=Dv,
                causal=rng.random() < 0.35, mask=mask, scale=scale, smax=smax)
    if metric == "dot" and scale == "number" and rng.random() < 0.3:
        case["softcap"] = rng.choice((5.0, 30.0, 50.0))
    if metric == "l2" and dtype == torch.float32 and rng.random() < 0.3:
        case["offset"] = 40.0
    space = attention_config_space(metric, D, dtype, "cuda")
    # the key string: the form a tuned plan's cache records
    case["config"] = None if rng.random() < 0.25 else config_key(rng.choice(space))
    return case


def run_attention(case: dict) -> bool:
    kw = dict(case)
    pos = [kw.pop(k) for k in ("metric", "dtype", "B", "H", "Hkv", "Nq", "Nk", "D", "Dv")]
    return ag.check(*pos, **kw)


def draw_feedforward(rng: random.Random) -> dict:
    gated = rng.random() < 0.4
    dropout = rng.random() < 0.5
    impl = rng.choice(IMPLS)
    case = dict(dtype=rng.choice((torch.bfloat16, torch.float16, torch.float32)),
                T=rng.choice((1, rng.randint(1, 64), rng.randint(64, 3000), rng.randint(64, 3000))),
                d=rng.choice((16, 24, 40, 64, 72, 128, 200, 256, 512, 1024)),
                h=rng.choice((16, 40, 72, 130, 256, 1000, 1024, 2048, 4096)),
                act=rng.choice(ACTIVATIONS), gated=gated,
                p_h=rng.choice((0.1, 0.3)) if dropout and rng.random() < 0.7 else 0.0,
                p_o=rng.choice((0.1, 0.2)) if dropout and rng.random() < 0.7 else 0.0,
                residual=rng.random() < 0.6, bias=rng.random() < 0.6, impl=impl)
    case["config"] = None if rng.random() < 0.3 else rng.choice(feedforward_config_space(impl, gated=gated))["key"]
    # the memory schemes: backward in row blocks, the pre-activation saved or recomputed
    case["rows"] = rng.choice((None, None, 100, 1000))
    case["save_pre"] = rng.choice((None, True, False))
    return case


def run_feedforward(case: dict) -> bool:
    import feedforward_gpu as fg  # only here: it turns on tf32 for torch's matmuls, as its checks expect

    kw = dict(case)
    rows, save_pre, config = kw.pop("rows"), kw.pop("save_pre"), kw.pop("config")
    pos = [kw.pop(k) for k in ("dtype", "T", "d", "h", "act", "gated", "p_h", "p_o", "residual", "bias", "impl")]
    FF = fg.FF
    before = FF._backward_rows, FF.SAVE_PRE_ACTIVATION
    FF._backward_rows, FF.SAVE_PRE_ACTIVATION = rows, save_pre
    try:
        return fg.check(*pos, config=config)
    finally:
        FF._backward_rows, FF.SAVE_PRE_ACTIVATION = before


OPS = {"attention": (draw_attention, run_attention), "feedforward": (draw_feedforward, run_feedforward)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--op", choices=sorted(OPS), default="attention")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--part", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed * 1000 + args.part)
    torch.manual_seed(args.seed * 1000 + args.part)
    t_end = time.time() + 60 * args.minutes
    draw, run = OPS[args.op]
    # a fallback to the PyTorch reference would pass the numerics while hiding a broken kernel
    warnings.simplefilter("error", FusionFallbackWarning)
    done, failed, errors, infeasible = 0, [], [], []
    while time.time() < t_end:
        case = draw(rng)
        shown = {k: (str(v).split(".")[-1] if isinstance(v, torch.dtype) else v) for k, v in case.items()}
        reset_fallback_warnings()  # every case's fallback raises, not only the first of its reason
        try:
            ok = run(case)
        except FusionFallbackWarning as e:
            # A config of the space that does not fit this GPU at these shapes falls back to the
            # reference, and the tuner never chooses it (site_timing.FusedOptionFellBack); the
            # default config (None) must always run.
            ok = case["config"] is not None and "OutOfResources" in str(e)
            (infeasible if ok else errors).append(dict(case=shown, error=str(e)[:500]))
            print(f"{'INFEASIBLE' if ok else 'ERR'} {shown}: {e}"[:600], flush=True)
        except Exception as e:  # a crash is a failure too, recorded with its case
            ok = False
            errors.append(dict(case=shown, error=f"{type(e).__name__}: {e}"[:500]))
            print(f"ERR {shown}: {type(e).__name__}: {e}"[:600], flush=True)
        done += 1
        if not ok:
            failed.append(shown)
            print(f"BAD case {shown}", flush=True)
    out = os.environ.get("OUT", "/tmp")
    checks = ag.RES["check"] if args.op == "attention" else sys.modules["feedforward_gpu"].results["correctness"]
    json.dump(dict(op=args.op, seed=args.seed, part=args.part, cases=done, failed=failed, errors=errors,
                   infeasible=infeasible, checks=checks, env=ag.RES["env"]),
              open(os.path.join(out, f"fuzz_{args.op}_{args.seed}_{args.part}.json"), "w"), indent=1, default=str)
    print(f"== fuzz {args.op} seed {args.seed} part {args.part}: {done} cases, {len(failed)} failed, "
          f"{len(infeasible)} configs that do not fit", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
