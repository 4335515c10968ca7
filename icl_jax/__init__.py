"""icl_jax: transformers trained on in-context linear regression, and which algorithm each layer follows.

Arrays are named by their shapes, one capital letter an axis joined by "x" (`xs_BxNxD`: prompts, points, dims).
The letters, the same in every module:

  B  prompts of a batch                  N  points of a prompt (context positions)
  D  dimension of x and w (d)            T  tokens (2N: x and y interleaved), or prefixes in the algorithms
  L  layers                              W  residual-stream width of a model
  H  attention heads                     V  width of one head
  Q  query points per prefix (SimW)      K  settings of an algorithm (the steps of its grid)
  S  bootstrap samples                   A  algorithms, or positions of a construction's block
  F  features of a probe (W + 1)         M  prompts x points a probe is fit on; L-BFGS's kept pairs
  I  input features of a matmul          O  output features of a matmul
  C  curves compared at once             P  learned positions of a model
  R  rows of a construction's state      E  d + 1, the token of Ahn et al.'s linear attention
  X  states of an LSTM step              J  bits of a step count
"""
