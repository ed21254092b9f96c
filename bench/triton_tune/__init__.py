"""Check, time and tune the triton backend on a CUDA GPU; compile its kernels for a GPU on any machine.

    PYTHONPATH=$PWD python3 -m bench.triton_tune                 # checks, timings, breakdown + sweep (~3 min)
    PYTHONPATH=$PWD python3 -m bench.triton_tune --full-check    # every correctness case in bf16
    PYTHONPATH=$PWD python3 -m bench.triton_tune --sweep-only --json out/tune-h100.json
    PYTHONPATH=$PWD python3 -m bench.triton_tune --aot 90        # compile every kernel variant for sm_90, no GPU
    python3 bench/make_autotable.py --tune out/tune-h100.json    # the sweep's winners into lorakern/launchplans.json

One job per module: ``check`` (paths against the float64 oracle), ``timings`` (F.linear, the addmm
style and the triton backend at K = N = 4096), ``sweep`` (the kernel breakdown at M = 8192 and
candidate launch plans, forced through ``lorakern.triton.configs.planning``), ``aot`` (every
kernel variant through ``triton.compile`` for a target GPU), ``__main__`` (the command line).
Everything goes through the public op (``lorakern.lora_linear(..., backend="triton")``), the
one timing module (``lorakern.benchmark.timing``) and triton's public names.
"""
