"""Reference estimators for in-context linear regression, to compare with a Transformer's per-layer predictions.

Conventions:
  * Shapes are name suffixes: B prompts, N points per prompt, D dimensions, K iterates or requested steps,
    T prefixes (T = N), R = min(N, D). A batch of prompts is xs [B, N, D] and ys [B, N]; X is one prompt's xs.
  * Iterative algorithms return their iterates stacked on axis 1, all from one `lax.scan`: index k is the
    estimate after k updates, so index 0 is the initial estimate (w_0 = 0 for gradient descent, M_0 X^T y for
    Newton's method).
  * Prefix evaluation comes in two forms with the same arguments. `prefix_*_weights` returns the estimates:
    entry [b, k, t] is w_k(points 0..t-1 of prompt b), [B, K, T, D] (K before T, and no K axis for least
    squares and online gradient descent), i.e. the estimate sees only the points before position t, and
    position 0 (no points) has w = 0. These are the "induced weights" that Fu et al. 2024 (eqs. 7-8) compare
    with a Transformer's. `prefix_*` returns the predictions x_t . w_k(points 0..t-1), [B, K, T], computed from
    the weights by `_predict_at_prefixes`, so position 0 predicts 0. Prefixes are formed by weighting points
    >= t by 0 and vmapping over t. A zero-weighted point adds nothing to X^T X or X^T y and leaves the set of
    least-squares solutions unchanged, so this equals running the algorithm on the shorter prompt; "mean"
    gradients divide by the prefix length t.
  * The dtype follows xs: float32 by default, float64 under `jax_enable_x64`.
  * Public functions are jitted. String options, step counts and `ridge` are static (each value compiles once)
    and are checked with a ValueError naming the argument; learning rates and preconditioners are traced.
    `steps` (the `*_at` functions) may be a tuple, list or 1-D integer numpy array: a thin unjitted wrapper
    turns it into the hashable tuple of ints that a static argument must be.
  * Defaults follow Fu et al.'s released code (github.com/DeqingFu/transformers-icl-second-order) where it
    differs from their paper (Fu et al. 2024, §3.1): Newton starts from alpha = 1 / ||S S^T||_F and gradient
    descent uses the unnormalised gradient X^T X w - X^T y (their step size is 0.01).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

NEWTON_ALPHAS = ("frobenius", "spectral")
GRADIENT_SCALES = ("sum", "mean")


def _check_option(name: str, value: str, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ValueError(f"{name}={value!r}; allowed: {allowed}")


def _check_step_count(name: str, value: int) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise ValueError(f"{name}={value!r}; must be a non-negative int")


def _steps_tuple(steps) -> tuple[int, ...]:
  """`steps` as a tuple of Python ints (hashable, so usable as a static argument), checked."""
  if isinstance(steps, np.ndarray) and steps.ndim == 1:
    steps = steps.tolist()  # Python ints for an integer array; floats, which the check rejects, otherwise.
  if not isinstance(steps, (tuple, list, range)) or not steps:
    raise ValueError(f"steps={steps!r}; must be a non-empty tuple or list of non-negative ints (a static "
                     "argument, so not a JAX array)")
  for step in steps:
    _check_step_count("steps", step)
  return tuple(int(step) for step in steps)


def _jit_with_steps(fn):
  """jax.jit with `steps` and `gradient_scale` static, behind a thin unjitted wrapper that passes `steps` (the
  third argument) through `_steps_tuple`, since jit rejects unhashable static arguments such as lists."""
  jitted = jax.jit(fn, static_argnames=("steps", "gradient_scale"))

  @functools.wraps(fn)
  def with_steps_tuple(xs, ys, steps, *args, **kwargs):
    return jitted(xs, ys, _steps_tuple(steps), *args, **kwargs)

  return with_steps_tuple


def _moments(xs_BxNxD: jax.Array, ys_BxN: jax.Array) -> tuple[jax.Array, jax.Array]:
  """S = X^T X [B, D, D] and b = X^T y [B, D]."""
  s_BxDxD = jnp.einsum("bni,bnj->bij", xs_BxNxD, xs_BxNxD)
  b_BxD = jnp.einsum("bni,bn->bi", xs_BxNxD, ys_BxN)
  return s_BxDxD, b_BxD


def _prefix_mask(n: int, dtype) -> jax.Array:
  """[T, N]: weight 1 on the points a prefix of length t sees (those before t), 0 elsewhere."""
  return (jnp.arange(n)[None, :] < jnp.arange(n)[:, None]).astype(dtype)


def _prefix_moments(xs_BxNxD: jax.Array, ys_BxN: jax.Array) -> tuple[jax.Array, jax.Array]:
  """S_t and b_t of every prefix t = 0..N-1: [T, B, D, D] and [T, B, D].

  Prefixes lead so that vmapping over them keeps every batch dimension in front of the matrix dimensions;
  with prefixes second, XLA re-lays out S in every iteration of the scans (up to twice as slow).
  """
  mask_TxN = _prefix_mask(xs_BxNxD.shape[1], xs_BxNxD.dtype)
  s_TxBxDxD = jnp.einsum("tn,bni,bnj->tbij", mask_TxN, xs_BxNxD, xs_BxNxD)
  b_TxBxD = jnp.einsum("tn,bni,bn->tbi", mask_TxN, xs_BxNxD, ys_BxN)
  return s_TxBxDxD, b_TxBxD


def _over_prefixes(estimate, xs_BxNxD: jax.Array, ys_BxN: jax.Array) -> jax.Array:
  """Iterates of every prefix, [B, K, T, D], from estimate(S [B, D, D], b [B, D], t) -> [B, K, D]."""
  s_TxBxDxD, b_TxBxD = _prefix_moments(xs_BxNxD, ys_BxN)
  return jax.vmap(estimate, out_axes=2)(s_TxBxDxD, b_TxBxD, jnp.arange(xs_BxNxD.shape[1]))


def _predict_at_prefixes(ws_BxKxTxD: jax.Array, xs_BxNxD: jax.Array) -> jax.Array:
  """Prediction of prefix t's (k-th) estimate for the query x_t: [B, K, T], or [B, T] for weights [B, T, D]."""
  return jnp.einsum("b...td,btd->b...t", ws_BxKxTxD, xs_BxNxD)


# ---------------------------------------------------------------------------------------------------------------
# Least squares.


def _least_squares(xs_BxNxD: jax.Array, ys_BxN: jax.Array, ridge: float) -> jax.Array:
  # The SVD of X rather than a solve with X^T X: the latter squares the condition number, which float32
  # cannot afford for ill-conditioned prompts.
  u_BxNxR, s_BxR, vh_BxRxD = jnp.linalg.svd(xs_BxNxD, full_matrices=False)
  if ridge > 0:
    inv_s_BxR = s_BxR / (s_BxR**2 + jnp.asarray(ridge, s_BxR.dtype))
  else:
    # numpy.linalg.lstsq's default cutoff; singular values below it are rank deficiency, not signal, and
    # dropping them gives the minimum-norm solution. An all-zero X (an empty prefix) gives w = 0.
    cutoff_Bx1 = jnp.finfo(xs_BxNxD.dtype).eps * max(xs_BxNxD.shape[1:]) * jnp.max(s_BxR, -1, keepdims=True)
    kept_BxR = s_BxR > cutoff_Bx1
    inv_s_BxR = jnp.where(kept_BxR, 1.0 / jnp.where(kept_BxR, s_BxR, 1.0), 0.0)
  return jnp.einsum("brd,br,bnr,bn->bd", vh_BxRxD, inv_s_BxR, u_BxNxR, ys_BxN)


@functools.partial(jax.jit, static_argnames=("ridge",))
def least_squares(xs: jax.Array, ys: jax.Array, ridge: float = 0.0) -> jax.Array:
  """Minimum-norm least squares X^+ y, or ridge (X^T X + ridge I)^{-1} X^T y when ridge > 0: [B, D].

  The minimum-norm solution is the one gradient descent from 0 and Newton's method converge to when N < D or
  X is rank deficient.
  """
  if not ridge >= 0:
    raise ValueError(f"ridge={ridge!r}; must be >= 0")
  return _least_squares(xs, ys, ridge)


@functools.partial(jax.jit, static_argnames=("ridge",))
def prefix_least_squares_weights(xs: jax.Array, ys: jax.Array, ridge: float = 0.0) -> jax.Array:
  """`least_squares` fit to the points before t, for every t: [B, N, D] (0 at t = 0)."""
  if not ridge >= 0:
    raise ValueError(f"ridge={ridge!r}; must be >= 0")
  mask_TxN = _prefix_mask(xs.shape[1], xs.dtype)
  fit_prefix = lambda m_N: _least_squares(xs * m_N[None, :, None], ys * m_N[None, :], ridge)
  return jax.vmap(fit_prefix, out_axes=1)(mask_TxN)


@functools.partial(jax.jit, static_argnames=("ridge",))
def prefix_least_squares(xs: jax.Array, ys: jax.Array, ridge: float = 0.0) -> jax.Array:
  """Prediction for x_t of least squares fit to the points before t, for every t: [B, N] (0 at t = 0)."""
  return _predict_at_prefixes(prefix_least_squares_weights(xs, ys, ridge), xs)


# ---------------------------------------------------------------------------------------------------------------
# Iterative Newton (Newton-Schulz iteration for S^+, S = X^T X).


def _newton(s_BxDxD: jax.Array, b_BxD: jax.Array, num_steps: int, alpha: str) -> jax.Array:
  """Iterates M_k b of M_{k+1} = 2 M_k - M_k S M_k from M_0 = alpha S: [B, num_steps + 1, D]."""
  ss_BxDxD = s_BxDxD @ s_BxDxD  # S S^T, as S is symmetric.
  if alpha == "frobenius":
    numerator, norm_B = 1.0, jnp.linalg.norm(ss_BxDxD, axis=(-2, -1))
  else:
    # ||S S^T||_2 = lambda_max(S)^2 for symmetric positive semi-definite S.
    numerator, norm_B = 2.0, jnp.linalg.eigvalsh(s_BxDxD)[:, -1] ** 2
  # S = 0 (an empty prefix, or all-zero xs) leaves no direction to invert; M_0 = 0 keeps every iterate 0.
  alpha_B = jnp.where(norm_B > 0, numerator / jnp.where(norm_B > 0, norm_B, 1.0), 0.0)
  m0_BxDxD = alpha_B[:, None, None] * s_BxDxD

  def newton_step(m_BxDxD, _):
    m_BxDxD = 2 * m_BxDxD - m_BxDxD @ s_BxDxD @ m_BxDxD
    return m_BxDxD, jnp.einsum("bij,bj->bi", m_BxDxD, b_BxD)

  _, ws_KxBxD = jax.lax.scan(newton_step, m0_BxDxD, length=num_steps)
  w0_BxD = jnp.einsum("bij,bj->bi", m0_BxDxD, b_BxD)
  return jnp.concatenate([w0_BxD[:, None], jnp.swapaxes(ws_KxBxD, 0, 1)], axis=1)


def _check_newton_args(num_steps: int, alpha: str) -> None:
  _check_step_count("num_steps", num_steps)
  _check_option("alpha", alpha, NEWTON_ALPHAS)


@functools.partial(jax.jit, static_argnames=("num_steps", "alpha"))
def iterative_newton(xs: jax.Array, ys: jax.Array, num_steps: int, alpha: str = "frobenius") -> jax.Array:
  """Iterative Newton's method of Fu et al.: w_k = M_k X^T y, [B, num_steps + 1, D].

  M_0 = alpha S with S = X^T X and M_{k+1} = 2 M_k - M_k S M_k, so I - M_k S = (I - alpha S^2)^(2^k): the
  error in each eigendirection of S squares at every step and M_k S tends to the projector onto S's range,
  i.e. w_k tends to the minimum-norm least-squares solution.

  Args:
    xs: [B, N, D].
    ys: [B, N].
    num_steps: number of updates; index k of the result is after k updates.
    alpha: "frobenius" for alpha = 1 / ||S S^T||_F (Fu et al.'s code; converges since it is
      <= 1 / lambda_max(S)^2), or "spectral" for alpha = 2 / ||S S^T||_2 (their paper). The latter is the edge
      of the convergent range: S's top eigendirection has 1 - alpha lambda_max^2 = -1, so in exact arithmetic
      that direction's component of w_k is 0 for every k >= 1, and in floating point it is restored or blows up
      after about log2(1 / eps) steps depending on rounding.

  When S is rank deficient (N < D, or a prefix with t < D points) M_k maps S's null space by m -> 2 m, so
  rounding errors there double every step: in float32 the iterates are accurate up to ~30 steps and then drift,
  eventually to inf (Fu et al.'s grid stops at 23); float64 stays accurate past 60. Exactly zero coordinates
  (zero-padded dimensions) are unaffected.
  """
  _check_newton_args(num_steps, alpha)
  return _newton(*_moments(xs, ys), num_steps, alpha)


@functools.partial(jax.jit, static_argnames=("num_steps", "alpha"))
def prefix_iterative_newton_weights(xs: jax.Array, ys: jax.Array, num_steps: int,
                                    alpha: str = "frobenius") -> jax.Array:
  """`iterative_newton` on every prefix: iterates [B, num_steps + 1, N, D] (see the module docstring)."""
  _check_newton_args(num_steps, alpha)
  return _over_prefixes(lambda s_BxDxD, b_BxD, _: _newton(s_BxDxD, b_BxD, num_steps, alpha), xs, ys)


@functools.partial(jax.jit, static_argnames=("num_steps", "alpha"))
def prefix_iterative_newton(xs: jax.Array, ys: jax.Array, num_steps: int, alpha: str = "frobenius") -> jax.Array:
  """`iterative_newton` on every prefix: predictions [B, num_steps + 1, N] (see the module docstring)."""
  return _predict_at_prefixes(prefix_iterative_newton_weights(xs, ys, num_steps, alpha), xs)


# ---------------------------------------------------------------------------------------------------------------
# Gradient descent on 1/2 ||X w - y||^2 (or its mean), optionally preconditioned.
#
# With a fixed step every variant is the affine map w -> w - (H w - c), H = eta P S / scale and
# c = eta P b / scale, iterated from w_0 = 0.


def _gradient_map(s_BxDxD: jax.Array, b_BxD: jax.Array, num_points: jax.Array, learning_rate: jax.Array,
                  gradient_scale: str, preconditioner: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """H [B, D, D] and c [B, D] of the affine gradient step; num_points is N (or the prefix length t)."""
  # Casts keep a float64 learning rate or preconditioner (numpy's default) from promoting float32 data.
  step_size = jnp.asarray(learning_rate, s_BxDxD.dtype)
  if gradient_scale == "mean":
    # An empty prefix has S = 0 and b = 0, so any positive divisor leaves it at w = 0.
    step_size = step_size / jnp.maximum(num_points, 1).astype(s_BxDxD.dtype)
  h_BxDxD, c_BxD = step_size * s_BxDxD, step_size * b_BxD
  if preconditioner is not None:
    preconditioner_BxDxD = jnp.broadcast_to(preconditioner, s_BxDxD.shape).astype(s_BxDxD.dtype)
    h_BxDxD, c_BxD = preconditioner_BxDxD @ h_BxDxD, jnp.einsum("bij,bj->bi", preconditioner_BxDxD, c_BxD)
  return h_BxDxD, c_BxD


def _affine_iterates(h_BxDxD: jax.Array, c_BxD: jax.Array, num_steps: int) -> jax.Array:
  """w_0 = 0, ..., w_num_steps of w <- w - (H w - c): [B, num_steps + 1, D]."""

  def gradient_step(w_BxD, _):
    w_BxD = w_BxD - (jnp.einsum("bij,bj->bi", h_BxDxD, w_BxD) - c_BxD)
    return w_BxD, w_BxD

  w0_BxD = jnp.zeros_like(c_BxD)
  _, ws_KxBxD = jax.lax.scan(gradient_step, w0_BxD, length=num_steps)
  return jnp.concatenate([w0_BxD[:, None], jnp.swapaxes(ws_KxBxD, 0, 1)], axis=1)


def _affine_iterates_at(h_BxDxD: jax.Array, c_BxD: jax.Array, steps: tuple[int, ...]) -> jax.Array:
  """w_s of w <- w - (H w - c) from w_0 = 0 for each requested s: [B, K, D], in O(log max(steps)) products.

  Stepping one update at a time costs max(steps) matrix-vector products per prefix and prompt (4096 for Fu et
  al.'s log grid); instead this squares the step map. With A = I - H, s updates are T^s(w) = A^s w + p_s, and
  T^s is the composition of T^(2^j) over the set bits j of s, in any order since they are powers of one map.
  One scan over bits j carries T^(2^j) and applies it to the requested steps whose bit j is set. It carries
  G_j = I - A^(2^j), not A^(2^j): A is within a small step size of I, and forming it would round away the
  small eigenvalues of H, i.e. the slow directions whose progress we want.
  """
  num_bits = max(steps).bit_length()
  bits_JxK = ((np.asarray(steps)[None, :] >> np.arange(num_bits)[:, None]) & 1).astype(bool)

  def apply_power(carry, bits_K):
    g_BxDxD, p_BxD, ws_BxKxD = carry
    jumped_BxKxD = ws_BxKxD - jnp.einsum("bij,bkj->bki", g_BxDxD, ws_BxKxD) + p_BxD[:, None]
    ws_BxKxD = jnp.where(bits_K[None, :, None], jumped_BxKxD, ws_BxKxD)
    # T^(2m) = T^m o T^m: p_2m = A^m p_m + p_m and I - A^(2m) = 2 G_m - G_m^2.
    p_BxD = 2 * p_BxD - jnp.einsum("bij,bj->bi", g_BxDxD, p_BxD)
    g_BxDxD = 2 * g_BxDxD - g_BxDxD @ g_BxDxD
    return (g_BxDxD, p_BxD, ws_BxKxD), None

  ws_BxKxD = jnp.zeros(c_BxD.shape[:1] + (len(steps),) + c_BxD.shape[1:], c_BxD.dtype)
  (_, _, ws_BxKxD), _ = jax.lax.scan(apply_power, (h_BxDxD, c_BxD, ws_BxKxD), bits_JxK)
  return ws_BxKxD


def _check_gradient_args(num_steps: int, gradient_scale: str) -> None:
  _check_step_count("num_steps", num_steps)
  _check_option("gradient_scale", gradient_scale, GRADIENT_SCALES)


def _check_preconditioner(preconditioner: jax.Array, xs: jax.Array) -> None:
  b, _, d = xs.shape
  if preconditioner.shape not in ((d, d), (b, d, d)):
    raise ValueError(f"preconditioner.shape={preconditioner.shape}; must be {(d, d)} or {(b, d, d)}")


@functools.partial(jax.jit, static_argnames=("num_steps", "gradient_scale"))
def gradient_descent(xs: jax.Array, ys: jax.Array, num_steps: int, learning_rate: float,
                     gradient_scale: str = "sum") -> jax.Array:
  """Gradient descent on least squares from w_0 = 0: [B, num_steps + 1, D], index k after k steps.

  Args:
    xs: [B, N, D].
    ys: [B, N].
    num_steps: number of updates.
    learning_rate: eta in w <- w - eta * gradient. It converges (to the minimum-norm least-squares solution)
      iff eta < 2 / lambda_max of the Hessian, i.e. of X^T X for "sum" and of X^T X / N for "mean".
    gradient_scale: "sum" for the gradient X^T X w - X^T y (Fu et al.'s code, with eta = 0.01), or "mean" for
      that divided by N (the gradient of Fu et al.'s stated loss ||X w - y||^2 / 2N).
  """
  _check_gradient_args(num_steps, gradient_scale)
  s_BxDxD, b_BxD = _moments(xs, ys)
  return _affine_iterates(*_gradient_map(s_BxDxD, b_BxD, xs.shape[1], learning_rate, gradient_scale, None),
                          num_steps)


@functools.partial(jax.jit, static_argnames=("num_steps", "gradient_scale"))
def prefix_gradient_descent_weights(xs: jax.Array, ys: jax.Array, num_steps: int, learning_rate: float,
                                    gradient_scale: str = "sum") -> jax.Array:
  """`gradient_descent` on every prefix: iterates [B, num_steps + 1, N, D]. For long runs see
  `prefix_gradient_descent_at_weights`."""
  _check_gradient_args(num_steps, gradient_scale)

  def descend(s_BxDxD, b_BxD, num_points):
    return _affine_iterates(*_gradient_map(s_BxDxD, b_BxD, num_points, learning_rate, gradient_scale, None),
                            num_steps)

  return _over_prefixes(descend, xs, ys)


@functools.partial(jax.jit, static_argnames=("num_steps", "gradient_scale"))
def prefix_gradient_descent(xs: jax.Array, ys: jax.Array, num_steps: int, learning_rate: float,
                            gradient_scale: str = "sum") -> jax.Array:
  """`gradient_descent` on every prefix: predictions [B, num_steps + 1, N]. For long runs see
  `prefix_gradient_descent_at`."""
  return _predict_at_prefixes(
      prefix_gradient_descent_weights(xs, ys, num_steps, learning_rate, gradient_scale), xs)


@_jit_with_steps
def gradient_descent_at(xs: jax.Array, ys: jax.Array, steps: tuple[int, ...], learning_rate: float,
                        gradient_scale: str = "sum") -> jax.Array:
  """`gradient_descent` iterates after each number of updates in `steps` (a tuple or list of ints, in any order):
  [B, len(steps), D]. Costs O(log max(steps)) matrix products, so grids up to thousands of steps are cheap."""
  _check_option("gradient_scale", gradient_scale, GRADIENT_SCALES)
  s_BxDxD, b_BxD = _moments(xs, ys)
  return _affine_iterates_at(*_gradient_map(s_BxDxD, b_BxD, xs.shape[1], learning_rate, gradient_scale, None),
                             steps)


@_jit_with_steps
def prefix_gradient_descent_at_weights(xs: jax.Array, ys: jax.Array, steps: tuple[int, ...], learning_rate: float,
                                       gradient_scale: str = "sum") -> jax.Array:
  """`gradient_descent_at` on every prefix: iterates [B, len(steps), N, D]."""
  _check_option("gradient_scale", gradient_scale, GRADIENT_SCALES)

  def descend(s_BxDxD, b_BxD, num_points):
    return _affine_iterates_at(*_gradient_map(s_BxDxD, b_BxD, num_points, learning_rate, gradient_scale, None),
                               steps)

  return _over_prefixes(descend, xs, ys)


@_jit_with_steps
def prefix_gradient_descent_at(xs: jax.Array, ys: jax.Array, steps: tuple[int, ...], learning_rate: float,
                               gradient_scale: str = "sum") -> jax.Array:
  """`gradient_descent_at` on every prefix: predictions [B, len(steps), N]."""
  return _predict_at_prefixes(
      prefix_gradient_descent_at_weights(xs, ys, steps, learning_rate, gradient_scale), xs)


@functools.partial(jax.jit, static_argnames=("num_steps", "gradient_scale"))
def preconditioned_gradient_descent(xs: jax.Array, ys: jax.Array, num_steps: int, preconditioner: jax.Array,
                                    learning_rate: float = 1.0, gradient_scale: str = "mean") -> jax.Array:
  """w_{k+1} = w_k - eta P gradient from w_0 = 0 (Ahn et al.'s linear-attention layers): [B, num_steps + 1, D].

  P is [D, D] (shared) or [B, D, D] (per prompt). With P = (X^T X / N)^{-1}, eta = 1 and "mean" scaling the
  first step lands on the least-squares solution.
  """
  _check_gradient_args(num_steps, gradient_scale)
  _check_preconditioner(preconditioner, xs)
  s_BxDxD, b_BxD = _moments(xs, ys)
  return _affine_iterates(
      *_gradient_map(s_BxDxD, b_BxD, xs.shape[1], learning_rate, gradient_scale, preconditioner), num_steps)


@functools.partial(jax.jit, static_argnames=("num_steps", "gradient_scale"))
def prefix_preconditioned_gradient_descent_weights(xs: jax.Array, ys: jax.Array, num_steps: int,
                                                   preconditioner: jax.Array, learning_rate: float = 1.0,
                                                   gradient_scale: str = "mean") -> jax.Array:
  """`preconditioned_gradient_descent` on every prefix, with the same P for all prefixes of a prompt:
  iterates [B, num_steps + 1, N, D]."""
  _check_gradient_args(num_steps, gradient_scale)
  _check_preconditioner(preconditioner, xs)

  def descend(s_BxDxD, b_BxD, num_points):
    return _affine_iterates(
        *_gradient_map(s_BxDxD, b_BxD, num_points, learning_rate, gradient_scale, preconditioner), num_steps)

  return _over_prefixes(descend, xs, ys)


@functools.partial(jax.jit, static_argnames=("num_steps", "gradient_scale"))
def prefix_preconditioned_gradient_descent(xs: jax.Array, ys: jax.Array, num_steps: int,
                                           preconditioner: jax.Array, learning_rate: float = 1.0,
                                           gradient_scale: str = "mean") -> jax.Array:
  """`preconditioned_gradient_descent` on every prefix, with the same P for all prefixes of a prompt:
  predictions [B, num_steps + 1, N]."""
  return _predict_at_prefixes(prefix_preconditioned_gradient_descent_weights(
      xs, ys, num_steps, preconditioner, learning_rate, gradient_scale), xs)


# ---------------------------------------------------------------------------------------------------------------
# Online gradient descent.


@jax.jit
def online_gradient_descent(xs: jax.Array, ys: jax.Array) -> jax.Array:
  """One pass over the points from w_0 = 0, step t on point t alone with eta_t = 1 / ||x_t||^2:
  [B, N + 1, D], index t after t points.

  That step size projects w onto {w : x_t . w = y_t}, so each new point is fit exactly (Fu et al.'s paper; their
  code's variant starts from a random w_0 instead).
  """

  def fit_point(w_BxD, point):
    x_BxD, y_B = point
    norm2_B = jnp.sum(x_BxD**2, axis=-1)
    # A zero point (padding) says nothing about w; skip it rather than divide by 0.
    residual_B = y_B - jnp.einsum("bd,bd->b", x_BxD, w_BxD)
    gain_B = jnp.where(norm2_B > 0, residual_B / jnp.where(norm2_B > 0, norm2_B, 1.0), 0.0)
    w_BxD = w_BxD + gain_B[:, None] * x_BxD
    return w_BxD, w_BxD

  w0_BxD = jnp.zeros_like(xs[:, 0])
  _, ws_NxBxD = jax.lax.scan(fit_point, w0_BxD, (jnp.swapaxes(xs, 0, 1), ys.T))
  return jnp.concatenate([w0_BxD[:, None], jnp.swapaxes(ws_NxBxD, 0, 1)], axis=1)


@jax.jit
def prefix_online_gradient_descent_weights(xs: jax.Array, ys: jax.Array) -> jax.Array:
  """Online gradient descent after the points before t, for every t: [B, N, D] (0 at t = 0). One pass already
  visits every prefix, so no vmap is needed."""
  return online_gradient_descent(xs, ys)[:, :-1]


@jax.jit
def prefix_online_gradient_descent(xs: jax.Array, ys: jax.Array) -> jax.Array:
  """Prediction for x_t of online gradient descent after the points before t: [B, N] (0 at t = 0)."""
  return _predict_at_prefixes(prefix_online_gradient_descent_weights(xs, ys), xs)
