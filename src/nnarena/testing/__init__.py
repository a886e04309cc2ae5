"""Plain reference implementations that tests and benchmarks check the fast layers against."""
