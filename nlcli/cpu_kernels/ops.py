"""The C kernels on torch tensors: argument checks, output allocation, the ctypes calls.

Every call passes torch's current thread count, so the kernels follow `--num-threads` like torch's
own ops. Inputs must be CPU float32 and contiguous; the wrappers make them so where it is cheap
and refuse what the kernels do not cover (callers use torch there). A weight's descriptor
(`matrix`) holds raw pointers into its blocks: whoever keeps the descriptor keeps the blocks.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import Optional, Union

import torch

from nlcli.cpu_kernels import build
from nlcli.cpu_kernels.blocks import Q4Blocks, Q8Blocks

logger = logging.getLogger(__name__)

# nl_matrix.kind (csrc/kernels.h)
Q4, Q8 = 0, 1
# What the attention and the decode step read and write K/V in.
KV_DTYPES = (torch.float32, torch.bfloat16)

_P, _I64, _F32, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int


class Matrix(ctypes.Structure):
    """csrc/kernels.h's nl_matrix."""
    _fields_ = [("kind", _I64), ("codes", _P), ("scales", _P), ("bias", _P), ("N", _I64),
                ("K", _I64)]


_SIGNATURES = {
    "nl_gemm": [ctypes.POINTER(Matrix), _P, _I64, _P, _INT],
    "nl_decode_attention": [_P, _P, _P, _INT, _P, _I64, _P, _P, _I64, _I64, _I64, _I64, _F32, _P,
                            _INT],
    "nl_decode_step": [_P, _P, _P, _P, _P, _I64, _P, _P, _I64, _P, _INT],
}


@functools.lru_cache(maxsize=None)
def _library() -> tuple[Optional[ctypes.CDLL], str]:
    try:
        lib = build.load()
    except (OSError, RuntimeError) as e:
        logger.warning("nl CPU kernels unavailable, torch's kernels run instead: %s", e)
        return None, str(e)
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None
    return lib, ""


def available() -> bool:
    return _library()[0] is not None


def unavailable_reason() -> str:
    return _library()[1]


def lib() -> ctypes.CDLL:
    loaded, why = _library()
    if loaded is None:
        raise RuntimeError(f"nl CPU kernels unavailable: {why}")
    return loaded


def matrix(w: Union[Q4Blocks, Q8Blocks], kind: int, bias: Optional[torch.Tensor] = None) -> Matrix:
    if (kind == Q4) != isinstance(w, Q4Blocks):
        raise ValueError(f"kind {kind} does not match {type(w).__name__}")
    scales = w.dm if isinstance(w, Q4Blocks) else w.d
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        raise ValueError("bias must be contiguous float32")
    return Matrix(kind, w.codes.data_ptr(), scales.data_ptr(),
                  None if bias is None else bias.data_ptr(), w.out_features, w.in_features)


def gemm(x: torch.Tensor, m: Matrix) -> torch.Tensor:
    """x [..., K] @ w.T -> [..., N] float32, for the weight `m` describes."""
    if x.shape[-1] != m.K:
        raise ValueError(f"input has {x.shape[-1]} features, the weight {m.K}")
    x2 = x.reshape(-1, m.K)
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.to(torch.float32).contiguous()
    y = torch.empty(x2.shape[0], m.N)
    lib().nl_gemm(ctypes.byref(m), x2.data_ptr(), x2.shape[0], y.data_ptr(),
                  torch.get_num_threads())
    return y.view(*x.shape[:-1], m.N)


def q4_mm(x: torch.Tensor, w: Q4Blocks) -> torch.Tensor:
    """x [..., K] @ w.T, x rounded to int16 per block of 32 inside the kernel."""
    return gemm(x, matrix(w, Q4))


def q8_mm(x: torch.Tensor, w: Q8Blocks) -> torch.Tensor:
    """x [..., K] @ w.T, x rounded to int16 per block of 32 inside the kernel."""
    return gemm(x, matrix(w, Q8))


def decode_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                     req_to_token: torch.Tensor, rows: torch.Tensor, seq_lens: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """q [B, H, D]; k_buf, v_buf [S, Hkv, D] float32 or bfloat16 pools; request b attends over
    req_to_token[rows[b], :seq_lens[b]] (int64). -> [B, H, D] float32."""
    B, H, D = q.shape
    Hkv = k_buf.shape[1]
    if k_buf.dtype not in KV_DTYPES or v_buf.dtype != k_buf.dtype:
        raise ValueError(f"decode_attention reads float32 or bfloat16 pools, not {k_buf.dtype}")
    if not (k_buf.is_contiguous() and v_buf.is_contiguous()):
        raise ValueError("decode_attention reads contiguous K/V pools")
    if req_to_token.dtype != torch.int64 or not req_to_token.is_contiguous():
        raise ValueError("req_to_token must be contiguous int64")
    q = q.to(torch.float32).contiguous()
    rows = rows.to(torch.int64).contiguous()
    seq_lens = seq_lens.to(torch.int64).contiguous()
    out = torch.empty(B, H, D)
    lib().nl_decode_attention(q.data_ptr(), k_buf.data_ptr(), v_buf.data_ptr(),
                              int(k_buf.dtype == torch.bfloat16), req_to_token.data_ptr(),
                              req_to_token.shape[1], rows.data_ptr(), seq_lens.data_ptr(), B, H,
                              Hkv, D, scale, out.data_ptr(), torch.get_num_threads())
    return out
