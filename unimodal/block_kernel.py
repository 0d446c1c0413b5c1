"""The fused CPU kernel of the block attention path (`csrc/block_attention.cpp`: AVX-512 / AVX512-BF16,
or AVX2 + FMA through `csrc/avx512_on_avx2.h`).

Built on first use with the system C++ compiler (`-march=native`, plus `-mno-avx512f` on CPUs without
AVX512-BF16: the AVX2 build) into `<cache>/kernels/`, keyed by the sources' hash and the compiler flags,
and loaded with ctypes. Where it cannot be built (no compiler, a CPU without AVX2 and FMA) or
`UNIMODAL_BLOCK_KERNEL=0` is set, `available()` is False and the block path uses ATen's fused SDPA
kernels instead. On CPUs with AMX-TILE and AMX-BF16 (which `-march=native` then targets), the bf16
products run on AMX tiles (`amx()`; `UNIMODAL_AMX=0` keeps them on the vector units);
`build(emulate_amx=True)` runs that path on tiles emulated in software (`csrc/amx_emulated.h`), for
testing it on other CPUs.

`forward(q, k, v, out, groups)` and `backward(...)` take (B, H, L, D) tensors (fp32 or bf16, last axis
contiguous, D a multiple of 32) and the query groups `takes` accepts. The forward can keep the
attention probabilities (`probs`, `probs_numel(B, H, groups, dtype)` elements in the inputs' dtype: the
allowed pairs only, and a normaliser per query) for the backward, which then skips recomputing Q K^T and
the exponentials.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor
from torch.profiler import record_function

from .assets import cache_dir

SOURCE = Path(__file__).resolve().parent / "csrc" / "block_attention.cpp"
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp"]
NATIVE = {"avx512f", "avx512bw", "avx512_bf16"}  # the CPU flags of the AVX-512 build; else AVX2 + FMA
AMX = {"amx_tile", "amx_bf16"}  # where -march=native targets AMX too
_AMX_REFUSED = {-1: "the compiler did not target AMX", -2: "CPUID reports no AMX-TILE and AMX-BF16",
                -3: "the OS refused the tile data state (Linux grants it from 5.16 on, unless a thread's "
                    "sigaltstack is too small for AMX's signal frame)",
                -4: "a product on the tiles did not match the vector units' (or faulted)"}
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
ALIGN = 16  # query counts and key range lengths the packed layouts take: multiples of this
FORWARD_EVENT, BACKWARD_EVENT = "unimodal::block_attention_forward", "unimodal::block_attention_backward"

_lib: ctypes.CDLL | None = None
_state = {"tried": False, "error": None}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def build(emulate_amx: bool = False, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compiles (once per source hash and flags) and loads the kernel; emulate_amx: with AMX tiles emulated
    in software (the AVX-512 build only). extra_flags are passed to the compiler after the usual ones."""
    cxx = os.environ.get("CXX", "g++")
    native = NATIVE <= _cpu_flags()
    if emulate_amx and not native:
        raise RuntimeError(f"the emulated AMX path needs the AVX-512 build: this CPU lacks "
                           f"{sorted(NATIVE - _cpu_flags())}")
    flags = FLAGS + ([] if native else ["-mno-avx512f"]) + (["-DUNIMODAL_AMX_EMULATE"] if emulate_amx else [])
    flags += list(extra_flags)
    src = SOURCE.read_bytes() + b"".join(p.read_bytes() for p in sorted(SOURCE.parent.glob("*.h")))  # and its headers
    tag = hashlib.sha256(src + " ".join([cxx] + flags).encode()).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"block_attention-{tag}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            res = subprocess.run([cxx, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"{cxx} failed on {SOURCE.name}:\n{res.stderr[-2000:]}")
            os.replace(tmp, out)  # atomic: concurrent builders (DDP ranks) never load a partial file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(out))
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    n = ctypes.c_int64
    lib.block_attention_forward.argtypes = [i, i, i, i, i, i, p, p, p, p, p, p, p, n, p, i, f, i]
    lib.block_attention_backward.argtypes = [i, i, i, i, i, p, p, p, p, p, p, p, p, n, p, p, p, i, p, i, f, i]
    lib.block_attention_forward.restype = lib.block_attention_backward.restype = i
    lib.block_attention_amx.argtypes, lib.block_attention_amx.restype = [i], i
    rc = lib.block_attention_amx(int(os.environ.get("UNIMODAL_AMX", "1") != "0"))
    lib.amx = rc == 1
    if rc < 0 and AMX <= _cpu_flags() and not emulate_amx:
        warnings.warn(f"block attention kernel: bf16 products on the vector units, not on this CPU's AMX tiles: "
                      f"{_AMX_REFUSED[rc]}")
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None where it is unavailable (the reason in `unavailable_reason()`)."""
    global _lib
    if not _state["tried"]:
        _state["tried"] = True
        if os.environ.get("UNIMODAL_BLOCK_KERNEL", "1") == "0":
            _state["error"] = "disabled by UNIMODAL_BLOCK_KERNEL=0"
        elif not (NATIVE <= _cpu_flags() or {"avx2", "fma"} <= _cpu_flags()):
            _state["error"] = "the CPU lacks AVX2 and FMA (and AVX-512 with BF16)"
        else:
            try:
                _lib = build()
            except (OSError, RuntimeError) as e:
                _state["error"] = f"could not build {SOURCE.name}: {e}"
                warnings.warn(f"block attention kernel unavailable, using ATen's SDPA kernels ({_state['error']})")
    return _lib


def available() -> bool:
    return library() is not None


def amx() -> bool:
    """Whether the kernel's bf16 products run on AMX tiles (the CPU has AMX-TILE and AMX-BF16, the OS grants
    the tile state, and UNIMODAL_AMX is not 0)."""
    lib = library()
    return bool(lib is not None and lib.amx)


def target() -> str:
    """What the kernel runs on here: "AVX-512 + AMX tiles", "AVX-512", "AVX2" or "unavailable"."""
    if not available():
        return "unavailable"
    return ("AVX-512" if NATIVE <= _cpu_flags() else "AVX2") + (" + AMX tiles" if amx() else "")


def unavailable_reason() -> str | None:
    library()
    return _state["error"]


def supports(q: Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype in DTYPES and q.shape[-1] % 32 == 0 and available()


def takes(group) -> bool:
    """Whether the kernel takes this query group: every pair allowed, and the packed layouts' alignment
    (query count and range lengths multiples of 16, even starts)."""
    return (group.mask is None and bool(group.k_ranges) and (group.q1 - group.q0) % ALIGN == 0 and group.q0 % 2 == 0
            and all((e - s) % ALIGN == 0 and s % 2 == 0 for s, e in group.k_ranges))


_PER_LIST: dict = {}  # (what, id(groups)) -> (groups, value)


def per_list(what: str, groups, compute):
    """compute(groups), kept per group list (`masks.query_groups` keeps its lists, so a layout's groups
    are the same object from call to call); the list itself is held with the value, so its id stays its own."""
    key = (what, id(groups))
    hit = _PER_LIST.get(key)
    if hit is None or hit[0] is not groups:
        if len(_PER_LIST) > 1024:
            _PER_LIST.clear()
        hit = _PER_LIST[key] = (groups, compute(groups))
    return hit[1]


def encode(groups) -> ctypes.Array:
    """Query groups -> the kernel's int32 description (q0, q1, n_ranges, ranges...), kept per group list."""
    return per_list("encode", groups, _encode)


def _encode(groups) -> ctypes.Array:
    flat = []
    for g in groups:
        flat += [g.q0, g.q1, len(g.k_ranges)] + [x for r in g.k_ranges for x in r]
    return (ctypes.c_int32 * len(flat))(*flat)


def readable(t: Tensor) -> Tensor:
    """t itself when the kernel can read it in place (last axis contiguous; bf16 rows an even number
    of elements apart), else a contiguous copy."""
    if t.stride(-1) != 1 or (t.dtype == torch.bfloat16 and any(s % 2 for s in t.stride()[:3])):
        return t.contiguous()
    return t


def _strides(*ts: Tensor) -> ctypes.Array:
    """The tensors' strides, 4 each (batch, head, position, last), as the kernel takes them."""
    flat = [s for t in ts for s in t.stride()]
    return (ctypes.c_int64 * len(flat))(*flat)


def probs_numel(B: int, H: int, groups, dtype: torch.dtype) -> int:
    """Elements (of dtype) of the kept probabilities of these groups: one per allowed (query, key) pair,
    and an fp32 normaliser per query (the counts kept per group list)."""
    pairs, queries = per_list("pairs", groups, lambda gs: (
        sum((g.q1 - g.q0) * sum(e - s for s, e in g.k_ranges) for g in gs), sum(g.q1 - g.q0 for g in gs)))
    return B * H * (pairs + queries * (32 // torch.finfo(dtype).bits))  # a normaliser: 32 bits


def forward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, groups, probs: Tensor | None = None) -> Tensor:
    """Writes softmax(q k^T / sqrt(D)) v of every group's queries into out (B, H, L, D); returns the
    log-sum-exp (B, H, L) fp32 (rows of other queries left unset). k, v: (B, H, Lk, D), Lk may differ
    from L (a cached pass: the queries against the committed cache). probs: None, or a contiguous
    tensor of `probs_numel` elements in q's dtype that receives the probabilities for `backward`
    (Lk == L only). Inputs the kernel cannot read in place are copied (`readable`)."""
    B, H, L, D = q.shape
    Lk = k.shape[2]
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != D or out.shape != q.shape:
        raise ValueError(f"block kernel: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"out {tuple(out.shape)}: want (B, H, L, D), (B, H, Lk, D) twice and q's shape")
    if probs is not None and Lk != L:
        raise ValueError(f"block kernel: probabilities are kept for self-attention only (keys {Lk}, queries {L})")
    if out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"block kernel: out is written in place: {q.dtype} with its last axis contiguous")
    _check_probs(probs, q)
    lse = torch.empty(B, H, L, dtype=torch.float32)
    fn, pp = library().block_attention_forward, probs.data_ptr() if probs is not None else None
    pn = probs.numel() if probs is not None else 0
    enc, scale, nt = encode(groups), 1.0 / math.sqrt(D), torch.get_num_threads()
    for _ in range(2):  # a second time with copies of inputs it could not read in place
        rc = _call(FORWARD_EVENT, fn, DTYPES[q.dtype], B, H, L, Lk, D, q.data_ptr(), k.data_ptr(), v.data_ptr(),
                   out.data_ptr(), _strides(q, k, v, out), lse.data_ptr(), pp, pn, enc, len(groups), scale, nt)
        if rc != -3:
            break
        q, k, v = readable(q), readable(k), readable(v)
    _raise_on(rc, q, groups, probs)
    return lse


def backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor, groups,
             grad_dtype: torch.dtype, probs: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv (contiguous (B, H, L, D), in grad_dtype: fp32 or the inputs' dtype) of the groups'
    attention; zero where no group reaches. probs: what `forward` kept for the same groups, or None
    (the probabilities are recomputed)."""
    B, H, L, D = q.shape
    if grad_dtype not in (torch.float32, q.dtype):
        raise ValueError(f"block kernel: gradients in fp32 or {q.dtype}, not {grad_dtype}")
    _check_probs(probs, q)
    dq, dk, dv = (torch.empty(B, H, L, D, dtype=grad_dtype) for _ in range(3))
    fn, pp = library().block_attention_backward, probs.data_ptr() if probs is not None else None
    pn = probs.numel() if probs is not None else 0
    enc, scale, nt = encode(groups), 1.0 / math.sqrt(D), torch.get_num_threads()
    for _ in range(2):  # a second time with copies of inputs it could not read in place
        rc = _call(BACKWARD_EVENT, fn, DTYPES[q.dtype], B, H, L, D, q.data_ptr(), k.data_ptr(), v.data_ptr(),
                   out.data_ptr(), dout.data_ptr(), _strides(q, k, v, out, dout), lse.data_ptr(), pp, pn,
                   dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), DTYPES[grad_dtype], enc, len(groups), scale, nt)
        if rc != -3:
            break
        q, k, v, out, dout = (readable(t) for t in (q, k, v, out, dout))
    _raise_on(rc, q, groups, probs)
    return dq, dk, dv


def _call(event: str, fn, *args) -> int:
    """fn(*args), under a profiler event of that name when a profiler is running (the event costs
    about 0.2 ms per call when the interpreter's caches are cold, as they are after other work)."""
    if not _profiling():
        return fn(*args)
    with record_function(event):
        return fn(*args)


_profiling = getattr(torch._C._autograd, "_profiler_enabled", lambda: True)


def _check_probs(probs: Tensor | None, q: Tensor) -> None:
    """What the Python side checks of the kept probabilities (the kernel checks their size and alignment)."""
    if probs is not None and (probs.dtype != q.dtype or not probs.is_contiguous()):
        raise ValueError(f"block kernel: probs must be a contiguous {q.dtype} tensor, not {probs.dtype} "
                         f"with strides {probs.stride()}")


def _raise_on(rc: int, q: Tensor, groups, probs: Tensor | None) -> None:
    if rc == -2:
        bad = next(g for g in groups if not takes(g))
        raise ValueError(f"block kernel rejected query group {bad}: it needs query counts and range lengths "
                         f"that are multiples of 16 and even starts (see `takes`)")
    if rc == -3:
        raise ValueError("block kernel: out must have its last axis contiguous (and, in bf16, even strides)")
    if rc == -4:
        want = probs_numel(q.shape[0], q.shape[1], groups, q.dtype)
        raise ValueError(f"block kernel: probs must hold {want} elements (probs_numel) and start on a 64-byte "
                         f"boundary (they are written with streaming stores), not {probs.numel()} at "
                         f"{probs.data_ptr():#x}")
    if rc != 0:
        raise ValueError(f"block kernel rejected q {tuple(q.shape)} {q.dtype} strides {q.stride()} or its groups "
                         f"(head dim a multiple of 32, groups inside [0, L))")
