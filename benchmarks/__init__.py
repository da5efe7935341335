"""Benchmarks of bnll_lightning: each script prints a markdown table; ``--append`` adds it to docs/benchmarks.md.

    python benchmarks/objective_overhead.py   # optimizer-step time of each objective / NLL
    python benchmarks/memory.py               # peak memory, streamed / naive log p; longest sequence in a budget
    python benchmarks/throughput.py           # fit tokens/s / TRL SFTTrainer tokens/s (pip install trl)
    python benchmarks/whole_job.py            # a whole fit phase by phase, against TRL and a plain-loop floor
    python benchmarks/step_trace.py           # one optimizer step's package calls
    python benchmarks/noise_study.py          # the model-strong end under label noise (--validate: early stopping)
    python benchmarks/regret.py               # early stopping and each option's regret across the studies
    python benchmarks/streaming_backward.py   # log p forward + backward: full logits, streamed, checkpoint per chunk
    python benchmarks/gpu_mfu.py              # CUDA only: tokens/s and MFU of a 0.5-1.5B model, naive vs streamed
    python benchmarks/continuum_tasks.py      # each built-in task's base mean p and base accuracy (the zones)
    python benchmarks/continuum.py            # accuracy after fine-tuning per task x objective (the paper's X)

Every script has ``--quick`` (tiny sizes, seconds: checks the harness, not the timings) and a
``main(argv)`` that returns the table, which ``tests/test_benchmarks.py`` runs.
"""
