"""icl_jax: transformers trained on in-context linear regression, and which algorithm each layer follows."""
