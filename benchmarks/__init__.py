"""cisslib's benchmarks: ``python -m benchmarks`` measures everything in one process and appends a
dated table to ``benchmarks/RESULTS.md``; ``benchmarks/gpu_check.sh`` is the one-call GPU check."""
