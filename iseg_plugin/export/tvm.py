"""TVM (Relax) back end for the integer-only ONNX graph: the optional extra ``iseg-plugin[tvm]``.

The graph of :func:`~iseg_plugin.export.export_onnx_int` is imported with Relax's ONNX frontend and
compiled for the host CPU with Relax's CPU pipeline (legalize, fuse), plus default schedules: TVM 0.27
has no Relay, and its PyTorch frontend mistypes integer floor division (ecosystem notes §5.2), so ONNX
is the way in. Every tensor stays integer-typed, as in onnxruntime, and the outputs are the same
integers (tested).

Schedules, without tuning: TVM ships CPU rules (``dlight.cpu``) only for GEMV and row reductions and
leaves every other kernel a single-threaded naive loop nest (67 s per ViT-S run here), while
meta-schedule tuning takes hours on two cores. So two small rules are written here: integer matmuls
get a register-tiled, vectorised, parallel loop nest, and every other kernel runs its outer spatial
loops in parallel. A schedule only reorders loops, so the integers cannot change.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

MATMUL_TILE = (4, 32)  # rows x columns per register tile; the best of a 1024x768x3072 sweep here


class TvmMissingError(ImportError):
    """apache-tvm is not installed."""


def _tvm():
    try:
        import tvm
        from tvm import relax
        from tvm.relax.frontend.onnx import from_onnx
    except ImportError as err:
        raise TvmMissingError(
            "apache-tvm is not installed; install the extra: pip install -e '.[tvm]' (apache-tvm 0.27)") from err
    return tvm, relax, from_onnx


def host_target():
    """The LLVM target for this CPU (plain ``llvm`` is generic x86-64: no AVX2)."""
    tvm, _, _ = _tvm()
    from tvm.target import codegen
    return tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})


def _divisor_at_most(extent, limit: int) -> int:
    """The largest divisor of a constant loop extent that is at most ``limit`` (1 for a symbolic one)."""
    if not isinstance(extent, int):
        return 1
    return max(d for d in range(1, min(extent, limit) + 1) if extent % d == 0)


def _schedule_rules():
    """The CPU schedule rules, tried in order on every kernel: ours, and dlight's row reductions (its
    GEMV rule is left out: it inlines fused element-wise chains, which can grow exponentially)."""
    from tvm import s_tir
    from tvm.s_tir import dlight
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import get_extent
    from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

    def parallel_outer(sch, block) -> None:
        """Run a block's leading spatial loops in parallel (fused into one loop)."""
        spatial = []
        for loop, var in zip(sch.get_loops(block), sch.get(block).iter_vars):
            if var.iter_type != var.DataPar:
                break
            spatial.append(loop)
        if spatial:
            sch.parallel(sch.fuse(*spatial) if len(spatial) > 1 else spatial[0])

    class Rule(CPUScheduleRule):
        """A rule that schedules a kernel's blocks (``schedule`` returns False where it does not apply)."""

        def apply(self, func, target, _):
            if not self.is_target_available(target):
                return None
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            return sch if infos is not None and self.schedule(sch, infos) else None

    class Matmul(Rule):
        """An integer matmul (any batch): tiles of rows x columns kept in a local accumulator, the
        reduction outside the tile, columns vectorised, row blocks in parallel; the element-wise steps
        fused with it run as their own parallel loop nests."""

        def schedule(self, sch, infos) -> bool:
            matmuls = [i for i in infos if sch.get(i.block_rv).name_hint == "matmul"]
            if len(matmuls) != 1 or not matmuls[0].dom_kind().endswith("SSR"):
                return False
            block = matmuls[0].block_rv
            accumulator = sch.cache_write(block, 0, "local")
            *batch, rows, cols, red = sch.get_loops(block)
            # rows may end in a partial tile (its unrolled rows are guarded); the vector of columns may
            # not, so it is the largest divisor of their number (25 of 1025 tokens, say)
            col_tile = _divisor_at_most(get_extent(sch, cols), MATMUL_TILE[1])
            row_out, row_in = sch.split(rows, [None, MATMUL_TILE[0]])
            col_out, col_in = sch.split(cols, [None, col_tile])
            sch.reorder(*batch, row_out, col_out, red, row_in, col_in)
            sch.parallel(sch.fuse(*batch, row_out) if batch else row_out)
            sch.reverse_compute_at(accumulator, col_out)
            sch.unroll(row_in)
            if col_tile > 1:
                sch.vectorize(col_in)
            sch.decompose_reduction(block, red)
            for info in infos:  # the casts and the epilogue: their own loop nests
                if info.block_rv is not block:
                    parallel_outer(sch, info.block_rv)
            return True

    class ParallelOuter(Rule):
        """Every other kernel: each loop nest's spatial part in parallel. Nothing is inlined: a fused chain
        of element-wise steps that reads each value several times (a clamp, a sign) grows exponentially
        when inlined."""

        def schedule(self, sch, infos) -> bool:
            for info in infos:
                parallel_outer(sch, info.block_rv)
            return True

    return dlight.ApplyDefaultSchedule(Matmul(), dlight.cpu.Reduction(), ParallelOuter())


class TvmModel:
    """A compiled integer-only graph: ``model(pixels)`` takes a (1, 3, H, W) uint8 array and
    returns the graph's outputs (INT16 logits, int64 class map) as numpy arrays. ``target`` is a TVM
    target (default: LLVM for this CPU); ``module`` is the scheduled Relax/TIR module that was built."""

    def __init__(self, proto: onnx.ModelProto | str | Path, target=None):
        tvm, relax, from_onnx = _tvm()
        from tvm.relax.backend.cpu_generic import pipeline as cpu

        proto = proto if isinstance(proto, onnx.ModelProto) else onnx.load(str(proto))
        self.input_shape = tuple(d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim)
        target = host_target() if target is None else tvm.target.Target(target)
        module = from_onnx(proto, keep_params_in_input=False)
        with target:
            module = tvm.transform.Sequential(
                cpu.library_dispatch_passes(target) + cpu.legalize_passes(target) + [_schedule_rules()])(module)
        self.module = module
        lowering = tvm.transform.Sequential(cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))
        self._device = tvm.cpu()
        self._vm = relax.VirtualMachine(tvm.compile(module, target=target, relax_pipeline=lowering), self._device)
        self._tensor = tvm.runtime.tensor

    def __call__(self, pixels: np.ndarray) -> list[np.ndarray]:
        if pixels.dtype != np.uint8 or pixels.shape != self.input_shape:
            raise ValueError(f"expected uint8 pixels of shape {self.input_shape}, got {pixels.dtype} {pixels.shape}")
        outputs = self._vm["main"](self._tensor(np.ascontiguousarray(pixels), self._device))
        return [out.numpy() for out in outputs]
