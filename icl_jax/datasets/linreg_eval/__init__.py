"""The `linreg_eval` dataset: frozen evaluation prompts for in-context linear regression."""
