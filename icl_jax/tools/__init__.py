"""Tools around the library: benchmarks and the converter of Garg et al.'s PyTorch checkpoint."""
