"""Sparse CPU kernels that beat a dense matmul, and the inference layer built on them.

Layouts. A weight ``W`` (out, in) is stored as CSR (``crow``: out + 1 row starts, ``col``: the
column of each stored entry, ``values`` in row-major order) or as BSR (the same over (R, C) blocks,
``values`` of shape (blocks, R, C)). The batch ``X`` (batch, in) is transposed once to ``X^T``
(in, batch), so each stored entry ``W[i, j]`` adds ``W[i, j] * X^T[j, :]`` to row ``i`` of ``Y^T``:
a contiguous AXPY over the batch, which vectorises. A 128-wide tile of that row stays in registers
while the entries stream by; threads share out (batch tile, 16 output rows) tasks, and each task
writes its block into ``Y`` (batch, out) through 16 x 16 register transposes, bias added, so there
is no separate transpose back. At high sparsity the kernel is bound by reading ``X^T`` rows from L2.

Kernels:

- `spmm`: ``Y = X W^T + b`` from ``X^T``. With the CSR of ``W^T`` and ``perm`` (its entries' places
  in ``W``'s ``values``) the same kernel gives ``dX = dY W`` without copying values.
- `sddmm`: ``dY^T[i, :] . X^T[j, :]`` at the stored entries (i, j) only: the weight gradient of
  SparseProp, four entries at a time so four FMA chains share each load of ``dY^T[i, :]``.
- `transpose`: ``X -> X^T`` through 16 x 16 register tiles, in parallel (torch's copy is serial).

The C++ source below has no torch headers: it is compiled on first use (``g++ -O3 -march=native
-fopenmp``, under a second), cached under ``$TORCH_EXTENSIONS_DIR/nnarena_sparse`` (default
``~/.cache/torch_extensions``) by a hash of source, flags and CPU, and called through ctypes with
torch's thread count (it links the ``libgomp`` torch already loaded). Where it cannot be built (no
compiler, another OS; one warning) or ``NNARENA_NO_CPP_KERNELS=1``, and for tensors it does not
take (not CPU float32/float64), torch's sparse ops give the same results, more slowly.
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn

from nnarena.errors import ConfigError

__all__ = [
    "Backend",
    "Layout",
    "SparseLinear",
    "check_backend",
    "check_weight",
    "cpp_kernels_available",
    "sddmm",
    "spmm",
    "to_sparse_inference",
    "transpose",
]

Backend = Literal["auto", "cpp", "torch"]
Layout = Literal["csr", "bsr"]

DISABLE_ENV = "NNARENA_NO_CPP_KERNELS"
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC")
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}

_SOURCE = r"""
#include <algorithm>
#include <cstdint>
#include <vector>

namespace {
// 64-byte vectors: one AVX-512 register (two AVX2 or four SSE registers elsewhere).
template <typename T>
using Vec __attribute__((vector_size(64), aligned(sizeof(T)))) = T;
template <typename T>
constexpr int64_t kLanes = 64 / sizeof(T);
constexpr int kVecs = 8;       // vectors per batch tile: eight independent FMA chains
constexpr int64_t kLine = 16;  // output rows per task, at least: a 64-byte line of y per batch row
template <typename T>
constexpr int64_t kTile = kVecs * kLanes<T>;

// dst[c * ldd + r] = src[r * lds + c] + (add ? add[r] : 0) for r < rows, c < cols, through
// L x L tiles held in registers (L lanes of a 64-byte vector); leftovers one by one.
template <typename T>
inline void transpose_block(const T* src, int64_t lds, T* dst, int64_t ldd, int64_t rows,
                            int64_t cols, const T* add) {
  using V = Vec<T>;
  constexpr int64_t L = kLanes<T>;
  int64_t r0 = 0;
  for (; r0 + L <= rows; r0 += L) {
    V shift{};
    for (int64_t r = 0; add && r < L; ++r) shift[r] = add[r0 + r];
    int64_t c0 = 0;
    for (; c0 + L <= cols; c0 += L) {
      V in[L];
      for (int64_t r = 0; r < L; ++r)
        in[r] = *reinterpret_cast<const V*>(src + (r0 + r) * lds + c0);
      for (int64_t c = 0; c < L; ++c) {
        V out;
        for (int64_t r = 0; r < L; ++r) out[r] = in[r][c];
        *reinterpret_cast<V*>(dst + (c0 + c) * ldd + r0) = out + shift;
      }
    }
    for (int64_t c = c0; c < cols; ++c)
      for (int64_t r = r0; r < r0 + L; ++r) dst[c * ldd + r] = src[r * lds + c] + shift[r - r0];
  }
  for (int64_t r = r0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c] + (add ? add[r] : T(0));
}

// out[t] = sum over blocks k of block row q, block columns c, of
//          val[k, r, c] * xt[col[k] * bc + c, t]  for t < w (xt already offset to the tile).
// CSR is the case br = bc = 1; perm (if not null) maps entry e to its place in val.
template <typename T>
inline void block_row(const int64_t* rowptr, const int64_t* col, const T* val, const int64_t* perm,
                      int64_t q, int64_t r, int64_t br, int64_t bc, const T* xt, int64_t ldx,
                      int64_t w, T* out) {
  using V = Vec<T>;
  if (w == kTile<T>) {
    V acc[kVecs];
    for (int u = 0; u < kVecs; ++u) acc[u] = V{};
    for (int64_t k = rowptr[q]; k < rowptr[q + 1]; ++k)
      for (int64_t c = 0; c < bc; ++c) {
        const int64_t e = (k * br + r) * bc + c;
        const T v = val[perm ? perm[e] : e];
        const V* x = reinterpret_cast<const V*>(xt + (col[k] * bc + c) * ldx);
#pragma GCC unroll 8
        for (int u = 0; u < kVecs; ++u) acc[u] += v * x[u];
      }
    for (int u = 0; u < kVecs; ++u) reinterpret_cast<V*>(out)[u] = acc[u];
    return;
  }
  for (int64_t t = 0; t < w; ++t) out[t] = 0;
  for (int64_t k = rowptr[q]; k < rowptr[q + 1]; ++k)
    for (int64_t c = 0; c < bc; ++c) {
      const int64_t e = (k * br + r) * bc + c;
      const T v = val[perm ? perm[e] : e];
      const T* x = xt + (col[k] * bc + c) * ldx;
#pragma omp simd
      for (int64_t t = 0; t < w; ++t) out[t] += v * x[t];
    }
}

// y[b, i] = bias[i] + (W xt)[i, b] for W with mb block rows of (br, bc) blocks.
template <typename T>
void spmm(int64_t mb, int64_t br, int64_t bc, int64_t batch, const int64_t* rowptr,
          const int64_t* col, const T* val, const int64_t* perm, const T* xt, const T* bias, T* y,
          int nthreads) {
  constexpr int64_t tile = kTile<T>;
  const int64_t m = mb * br, group = std::max<int64_t>(1, kLine / br);
  const int64_t ngroups = (mb + group - 1) / group, ntiles = (batch + tile - 1) / tile;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<T> acc(group * br * tile);
    // Tiles outermost: the rows of xt being read (in x tile) stay in cache across groups.
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t tb = 0; tb < ntiles; ++tb)
      for (int64_t g = 0; g < ngroups; ++g) {
        const int64_t q0 = g * group, q1 = std::min(mb, q0 + group);
        const int64_t i0 = q0 * br, rows = (q1 - q0) * br;
        const int64_t b0 = tb * tile, w = std::min(tile, batch - b0);
        for (int64_t q = q0; q < q1; ++q)
          for (int64_t r = 0; r < br; ++r)
            block_row<T>(rowptr, col, val, perm, q, r, br, bc, xt + b0, batch, w,
                         acc.data() + ((q - q0) * br + r) * tile);
        transpose_block<T>(acc.data(), tile, y + b0 * m + i0, m, rows, w,
                           bias ? bias + i0 : nullptr);
      }
  }
}

// out[k] = gt[i, :] . xt[col[k], :] for every entry k = (i, col[k]) of a CSR with m rows.
template <typename T>
void sddmm(int64_t m, int64_t batch, const int64_t* rowptr, const int64_t* col, const T* gt,
           const T* xt, T* out, int nthreads) {
  using V = Vec<T>;
  constexpr int64_t L = kLanes<T>;
  constexpr int Q = 4;  // entries at once: Q FMA chains share each load of gt's row
  const int64_t nv = batch / L;
#pragma omp parallel for schedule(dynamic, 8) num_threads(nthreads)
  for (int64_t i = 0; i < m; ++i) {
    const T* g = gt + i * batch;
    const V* gv = reinterpret_cast<const V*>(g);
    const int64_t k1 = rowptr[i + 1];
    for (int64_t k = rowptr[i]; k < k1; k += Q) {
      const int64_t n = std::min<int64_t>(Q, k1 - k);
      const T* x[Q];
      for (int q = 0; q < Q; ++q) x[q] = xt + col[k + std::min<int64_t>(q, n - 1)] * batch;
      V a[Q];
      for (int q = 0; q < Q; ++q) a[q] = V{};
      for (int64_t u = 0; u < nv; ++u) {
        const V gu = gv[u];
#pragma GCC unroll 4
        for (int q = 0; q < Q; ++q) a[q] += gu * reinterpret_cast<const V*>(x[q])[u];
      }
      for (int64_t q = 0; q < n; ++q) {
        T s = 0;
        for (int64_t l = 0; l < L; ++l) s += a[q][l];
        for (int64_t t = nv * L; t < batch; ++t) s += g[t] * x[q][t];
        out[k + q] = s;
      }
    }
  }
}
// dst (cols, rows) = src (rows, cols)^T, threads taking L rows of src at a time.
template <typename T>
void transpose(int64_t rows, int64_t cols, const T* src, T* dst, int nthreads) {
  constexpr int64_t L = kLanes<T>;
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t r0 = 0; r0 < rows; r0 += L)
    transpose_block<T>(src + r0 * cols, cols, dst + r0, rows, std::min(L, rows - r0), cols,
                       nullptr);
}
}  // namespace

#define NNARENA_EXPORT(T, S)                                                                   \
  extern "C" void spmm_##S(int64_t mb, int64_t br, int64_t bc, int64_t batch,                  \
                           const int64_t* rowptr, const int64_t* col, const T* val,            \
                           const int64_t* perm, const T* xt, const T* bias, T* y, int nth) {   \
    spmm<T>(mb, br, bc, batch, rowptr, col, val, perm, xt, bias, y, nth);                      \
  }                                                                                            \
  extern "C" void sddmm_##S(int64_t m, int64_t batch, const int64_t* rowptr, const int64_t* col, \
                            const T* gt, const T* xt, T* out, int nth) {                       \
    sddmm<T>(m, batch, rowptr, col, gt, xt, out, nth);                                         \
  }                                                                                            \
  extern "C" void transpose_##S(int64_t rows, int64_t cols, const T* src, T* dst, int nth) {   \
    transpose<T>(rows, cols, src, dst, nth);                                                   \
  }
NNARENA_EXPORT(float, f32)
NNARENA_EXPORT(double, f64)
"""

_lock = threading.Lock()
_state: dict[str, ctypes.CDLL | None] = {}


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU model and flags (Linux), else the platform."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    lines = {line.split(":")[0].strip(): line for line in info}  # the last processor's lines
    return platform.machine() + platform.processor() + lines.get("model name", "") + lines.get(
        "flags", "")


def _build() -> ctypes.CDLL:
    """Compile the source (once per source, flags, compiler and CPU) and load it."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    key = "\0".join([_SOURCE, *_FLAGS, cxx, _cpu_signature()]).encode()
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    lib_path = Path(root) / "nnarena_sparse" / f"kernels_{hashlib.sha256(key).hexdigest()[:16]}.so"
    if not lib_path.exists():
        lib_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
            src, out = Path(tmp) / "kernels.cpp", Path(tmp) / "kernels.so"
            src.write_text(_SOURCE)
            done = subprocess.run([cxx, *_FLAGS, str(src), "-o", str(out)], capture_output=True,
                                  text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{cxx} failed: {' '.join(done.stderr.split())[-300:]}")
            os.replace(out, lib_path)  # atomic: concurrent builders never load a partial file
    lib = ctypes.CDLL(str(lib_path))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for suffix in _SUFFIX.values():
        getattr(lib, f"spmm_{suffix}").argtypes = [i64] * 4 + [ptr] * 7 + [ctypes.c_int]
        getattr(lib, f"sddmm_{suffix}").argtypes = [i64] * 2 + [ptr] * 5 + [ctypes.c_int]
        getattr(lib, f"transpose_{suffix}").argtypes = [i64] * 2 + [ptr] * 2 + [ctypes.c_int]
    return lib


def _library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first call; ``None`` if disabled or the build failed."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return None
    with _lock:
        if "lib" not in _state:
            try:
                _state["lib"] = _build()
            except Exception as err:  # any build or load failure: torch's ops take over
                _state["lib"] = None
                warnings.warn(f"nnarena C++ sparse kernels unavailable, using torch's sparse ops "
                              f"(slower): {err}", RuntimeWarning, stacklevel=3)
    return _state["lib"]


def cpp_kernels_available() -> bool:
    """Whether the C++ kernels are built and enabled (builds them on first call)."""
    return _library() is not None


def check_backend(backend: str) -> None:
    """Raise `ConfigError` unless ``backend`` is one of `Backend`."""
    if backend not in get_args(Backend):
        raise ConfigError(f"unknown sparse backend {backend!r}; choose one of "
                          f"{', '.join(get_args(Backend))}")


def _kernels(backend: Backend, *tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The C++ library if ``backend`` allows it and it takes ``tensors``, else ``None``."""
    check_backend(backend)
    if backend == "torch":
        return None
    lib = _library()
    fits = all(t.device.type == "cpu" and t.dtype in _SUFFIX and t.dtype == tensors[0].dtype
               for t in tensors)
    if backend == "cpp" and (lib is None or not fits):
        why = "not built or disabled" if lib is None else "need CPU float32/float64 tensors"
        raise RuntimeError(f"backend='cpp' but the C++ sparse kernels cannot run here ({why})")
    return lib if fits else None


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
         shape: tuple[int, int]) -> torch.Tensor:
    """A torch CSR tensor, without torch's once-per-process "beta" warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _ptr(t: torch.Tensor | None, index: bool = False) -> int | None:
    """The address the C++ kernels read: ``t`` must be contiguous, and int64 if an ``index``."""
    if t is None:
        return None
    if index and t.dtype != torch.int64:
        raise TypeError(f"sparse index tensors must be int64, got {t.dtype}")
    return t.data_ptr()


def transpose(x: torch.Tensor, *, backend: Backend = "auto") -> torch.Tensor:
    """``x.T`` as a contiguous (cols, rows) tensor, for 2-D ``x`` (in parallel, on C++)."""
    x = x.contiguous()
    lib = _kernels(backend, x)
    if lib is None:
        return x.t().contiguous()
    out = x.new_empty(x.shape[1], x.shape[0])
    getattr(lib, f"transpose_{_SUFFIX[x.dtype]}")(
        x.shape[0], x.shape[1], _ptr(x), _ptr(out), torch.get_num_threads())
    return out


def spmm(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, xt: torch.Tensor,
         bias: torch.Tensor | None = None, *, perm: torch.Tensor | None = None,
         blocksize: tuple[int, int] = (1, 1), backend: Backend = "auto") -> torch.Tensor:
    """``(W @ xt).T + bias`` for ``W`` in CSR (``blocksize`` (1, 1)) or BSR, ``xt`` (in, batch).

    ``values`` holds CSR values (nnz,) or BSR blocks (blocks, R, C); with ``perm`` (CSR only) the
    value of entry ``e`` is ``values[perm[e]]``. Returns (batch, out), contiguous. Shapes are
    checked; the indices themselves are trusted (as ``check_invariants=False`` in torch).
    """
    br, bc = blocksize
    shape = ((crow.numel() - 1) * br, xt.shape[0])
    stored = values if perm is None else perm
    if xt.dim() != 2 or shape[1] % bc or stored.numel() != col.numel() * br * bc:
        raise ValueError(f"spmm: inconsistent shapes: crow {tuple(crow.shape)}, col "
                         f"{tuple(col.shape)}, values {tuple(values.shape)}, xt {tuple(xt.shape)}")
    crow, col, xt, values = (t.contiguous() for t in (crow, col, xt, values))
    perm = None if perm is None else perm.contiguous()
    bias = None if bias is None else bias.contiguous()
    lib = _kernels(backend, values, xt, *([] if bias is None else [bias]))
    if lib is None:
        if blocksize == (1, 1):
            vals = values if perm is None else values[perm]
            y = (_csr(crow, col, vals, shape) @ xt).t()
        else:  # block products, summed per block row (torch's BSR matmul needs square blocks)
            block_rows = torch.repeat_interleave(crow.diff())
            parts = values @ xt.view(shape[1] // bc, bc, xt.shape[1])[col]
            y = xt.new_zeros(crow.numel() - 1, br, xt.shape[1]).index_add_(0, block_rows, parts)
            y = y.view(shape[0], -1).t()
        return (y if bias is None else y + bias).contiguous()
    y = xt.new_empty(xt.shape[1], shape[0])
    getattr(lib, f"spmm_{_SUFFIX[xt.dtype]}")(
        crow.numel() - 1, br, bc, xt.shape[1], _ptr(crow, True), _ptr(col, True), _ptr(values),
        _ptr(perm, True), _ptr(xt), _ptr(bias), _ptr(y), torch.get_num_threads())
    return y


def sddmm(crow: torch.Tensor, col: torch.Tensor, gt: torch.Tensor, xt: torch.Tensor, *,
          backend: Backend = "auto") -> torch.Tensor:
    """``(gt @ xt.T)`` at the entries of a CSR pattern, in its order: (nnz,).

    ``gt`` is (out, batch), ``xt`` (in, batch); the indices are trusted, as in `spmm`.
    """
    if gt.dim() != 2 or xt.dim() != 2 or gt.shape != (crow.numel() - 1, xt.shape[1]):
        raise ValueError(f"sddmm: inconsistent shapes: crow {tuple(crow.shape)}, gt "
                         f"{tuple(gt.shape)}, xt {tuple(xt.shape)}")
    crow, col, gt, xt = (t.contiguous() for t in (crow, col, gt, xt))
    lib = _kernels(backend, gt, xt)
    if lib is None:
        pattern = _csr(crow, col, gt.new_zeros(col.numel()), (gt.shape[0], xt.shape[0]))
        return torch.sparse.sampled_addmm(pattern, gt, xt.t(), beta=0.0).values()
    out = gt.new_empty(col.numel())
    getattr(lib, f"sddmm_{_SUFFIX[gt.dtype]}")(
        gt.shape[0], gt.shape[1], _ptr(crow, True), _ptr(col, True), _ptr(gt), _ptr(xt), _ptr(out),
        torch.get_num_threads())
    return out


def _blocksize(layout: str, blocksize: int | tuple[int, int]) -> tuple[int, int]:
    if layout not in get_args(Layout):
        raise ConfigError(f"unknown sparse layout {layout!r}; choose one of "
                          f"{', '.join(get_args(Layout))}")
    if layout == "csr":
        return (1, 1)
    br, bc = (blocksize, blocksize) if isinstance(blocksize, int) else tuple(blocksize)
    if br < 1 or bc < 1:
        raise ConfigError(f"blocksize must be positive, got {blocksize!r}")
    return br, bc


def check_weight(weight: torch.Tensor) -> None:
    """Raise `ConfigError` unless ``weight`` is a 2-D floating-point tensor (out, in)."""
    if weight.dim() != 2:
        raise ConfigError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ConfigError(f"weight must be floating point, got {weight.dtype}")


class SparseLinear(nn.Module):
    """Inference-only ``nn.Linear`` whose weight's zeros are not stored (CSR or BSR).

    Args:
        weight: (out, in) dense weight; its zeros define the sparsity (BSR keeps every (R, C)
            block holding a nonzero, so out and in must be multiples of R and C).
        bias: (out,) or ``None``.
        layout: ``"csr"`` (unstructured) or ``"bsr"`` (block-sparse weights).
        blocksize: BSR block (R, C), or one int for square blocks.
        backend: ``"auto"`` (C++ kernels where they run, else torch), ``"cpp"`` or ``"torch"``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 layout: Layout = "csr", blocksize: int | tuple[int, int] = 16,
                 backend: Backend = "auto") -> None:
        super().__init__()
        check_weight(weight)
        check_backend(backend)
        self.blocksize = _blocksize(layout, blocksize)
        self.out_features, self.in_features = weight.shape
        if self.out_features % self.blocksize[0] or self.in_features % self.blocksize[1]:
            raise ConfigError(f"bsr blocksize {self.blocksize} does not divide the weight shape "
                              f"{tuple(weight.shape)}; pick a blocksize that does, or 'csr'")
        self.layout, self.backend = layout, backend
        w = weight.detach()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
            s = w.to_sparse_csr() if layout == "csr" else w.to_sparse_bsr(self.blocksize)
        self.register_buffer("crow", s.crow_indices().to(torch.int64).contiguous())
        self.register_buffer("col", s.col_indices().to(torch.int64).contiguous())
        self.register_buffer("values", s.values().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_dense(cls, linear: nn.Linear, layout: Layout = "csr",
                   blocksize: int | tuple[int, int] = 16, backend: Backend = "auto"
                   ) -> SparseLinear:
        """From ``linear``'s effective weight (a parametrized mask is applied) and bias."""
        return cls(linear.weight, linear.bias, layout=layout, blocksize=blocksize,
                   backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features or x.dtype != self.values.dtype:
            raise ValueError(f"expected input (..., {self.in_features}) of {self.values.dtype}, "
                             f"got {tuple(x.shape)} of {x.dtype}")
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("SparseLinear is inference-only and passes no gradient; run it "
                               "under torch.no_grad() or train a SparsePropLinear")
        xt = transpose(x.reshape(-1, self.in_features), backend=self.backend)
        y = spmm(self.crow, self.col, self.values, xt, self.bias, blocksize=self.blocksize,
                 backend=self.backend)
        return y.reshape(*x.shape[:-1], self.out_features)

    def to_dense(self) -> torch.Tensor:
        """The dense (out, in) weight."""
        shape = (self.out_features, self.in_features)
        if self.layout == "csr":
            return _csr(self.crow, self.col, self.values, shape).to_dense()
        return torch.sparse_bsr_tensor(self.crow, self.col, self.values, shape,
                                       check_invariants=False).to_dense()

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, for code that reads ``.weight`` (built on each access)."""
        return self.to_dense()

    def extra_repr(self) -> str:
        density = self.values.numel() / (self.out_features * self.in_features)
        block = f", blocksize={self.blocksize}" if self.layout == "bsr" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, layout={self.layout}{block}, "
                f"stored={density:.3f}, backend={self.backend}")


def _convertible(module: nn.Module, min_sparsity: float, blocksize: tuple[int, int]) -> bool:
    """An ``nn.Linear`` (or a subclass keeping its forward; parametrized ones too) with no hooks,
    a materialised float32/float64 weight that ``blocksize`` tiles and ``min_sparsity`` zeros."""
    if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
        return False
    if module._forward_hooks or module._forward_pre_hooks:
        return False
    w = module.weight
    if isinstance(w, nn.parameter.UninitializedParameter) or w.dtype not in _SUFFIX:
        return False
    if w.shape[0] % blocksize[0] or w.shape[1] % blocksize[1]:
        return False
    return w.numel() > 0 and (w == 0).sum().item() >= min_sparsity * w.numel()


def to_sparse_inference(model: nn.Module, min_sparsity: float = 0.7, *, layout: Layout = "csr",
                        blocksize: int | tuple[int, int] = 16, backend: Backend = "auto"
                        ) -> nn.Module:
    """A deep copy of ``model`` in eval mode with sparse enough Linear layers as `SparseLinear`.

    Replaced: every ``nn.Linear`` (subclasses that keep ``Linear.forward``, parametrized ones
    included) with at least ``min_sparsity`` of its effective weight zero (default 0.7: on two
    cores the kernels beat dense from about 70% zeros, see benchmarks/sparse_kernels.py),
    float32/float64, a shape the BSR blocks tile, no hooks, not inside
    ``nn.MultiheadAttention`` (which reads ``out_proj.weight`` directly); a layer used twice
    stays shared. Everything else is left as it is, so the outputs equal ``model``'s; the
    copy's parameters do not require grad.
    """
    if not 0.0 <= min_sparsity <= 1.0:
        raise ConfigError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    block = _blocksize(layout, blocksize)
    check_backend(backend)
    model = copy.deepcopy(model).eval().requires_grad_(False)

    def convert(linear: nn.Module) -> SparseLinear:
        return SparseLinear.from_dense(linear, layout=layout, blocksize=block, backend=backend)

    if _convertible(model, min_sparsity, block):
        return convert(model)
    done: dict[int, SparseLinear] = {}
    for parent in list(model.modules()):
        if isinstance(parent, nn.MultiheadAttention):
            continue
        for name, child in list(parent.named_children()):
            if id(child) not in done and _convertible(child, min_sparsity, block):
                done[id(child)] = convert(child)
            if id(child) in done:
                setattr(parent, name, done[id(child)])
    return model
