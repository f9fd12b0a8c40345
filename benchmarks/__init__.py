"""evolq's benchmarks: ``python -m benchmarks SUITE [options]`` (``benchmarks.runner``); the
suites in ``benchmarks/suites/``; ``make_results.py`` writes docs/results.md from the results."""
