"""Which output tile a GEMM program computes: Triton's grouped ordering, shared by the project's GEMM kernels.

Programs run GROUP_M tile-rows at a time down each column band, so the B tiles they read stay in L2 (the ordering of
Triton's matmul tutorial).
"""
import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` over a cdiv(M, BM) x cdiv(N, BN) grid of tiles."""
    n_m, n_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    pid_n = (pid % (GROUP_M * n_n)) // size_m
    return pid_m, pid_n
