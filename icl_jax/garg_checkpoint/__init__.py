"""`python -m icl_jax.garg_checkpoint`: Garg et al.'s PyTorch checkpoint converted to a workdir icl_jax evaluates."""
