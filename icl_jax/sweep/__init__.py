"""Sweeps: grids of runs trained together, resumably, and their report (see README, "Sweeps")."""
