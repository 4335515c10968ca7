"""The papers' claims reproduced and graded at a scale: experiments, claims, pipeline and report
(`python -m icl_jax.reproduce`, README "Reproducing the papers' claims")."""
