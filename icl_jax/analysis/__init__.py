"""The analysis of trained models: which algorithm their predictions follow (see README, "Design")."""
