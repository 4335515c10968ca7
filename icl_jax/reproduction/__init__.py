"""The papers' claims reproduced and graded at a scale: experiments, claims, pipeline, report (`python -m icl_jax.reproduce`)."""
