"""The benchmark suites, one module each; ``benchmarks.runner.suites()`` imports every module
here, and each registers its ``Suite`` (see ``benchmarks/README.md``: adding a suite)."""
