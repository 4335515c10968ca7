"""`python -m icl_jax.bench`: speed and memory benchmarks (README, "Speed")."""
