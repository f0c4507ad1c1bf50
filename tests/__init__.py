"""hf_tuning's test suite, laid out like the package: engine/ (the core), llm/, vision/, diffusion/, and
benchmarks/ (the benchmark scripts' arithmetic). Shared fixtures and builders live in tests.helpers."""
