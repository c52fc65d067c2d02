"""Benchmarks: the session end to end (``lipforcing bench``), the kernels and the host-side face path.

    session.py        the session bench with the fast path's ablation (``lipforcing bench``)
    report.py         the bench JSON schema, field definitions and the regression gate (``--compare``)
    commands.py       registers ``lipforcing bench`` in the command line
    bench_kernels.py  Triton kernels vs the PyTorch paths they replace (CUDA)
    bench_host.py     alignment, warps and paste-back throughput
    gpu_suite.sh      everything that needs a GPU, in one call

Imports: the application layer (``engine.app``) and everything below it.
"""
