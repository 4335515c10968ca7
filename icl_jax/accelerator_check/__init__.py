"""`python -m icl_jax.accelerator_check`: the checks a GPU or TPU run needs before a long job."""
