"""Reference estimators of in-context linear regression, run on every prefix of a batch of prompts at once.

Shapes are name suffixes: B prompts, N points, D dimensions, K iterates (or requested steps), T = N + 1
prefixes. Each algorithm returns its estimates ("weights") of every prefix: entry [b, k, t] is the k-th estimate
from the points 0..t-1 of prompt b, so t = 0 is the empty prefix (w = 0) and t = N the whole prompt.
`predict(ws, xs)` turns weights into the predictions x_t . w(points before t), [B, K, N], that are compared with
a model's; the weights themselves are the "induced weights" of SimW.

A prefix is the prompt with the points from t on weighted by 0: such a point adds nothing to X^T X or X^T y and
leaves the set of least-squares solutions unchanged, so this equals running on the shorter prompt ("mean"
gradients divide by t). Every iterative method minimises f(w) = 1/2 ||X w - y||^2 + ridge/2 ||w||^2 from
w_0 = 0 (S = X^T X + ridge I, b = X^T y). The dtype follows xs; every matrix product runs at HIGHEST precision,
so TF32 (GPU) or bf16 passes (TPU) never change the numbers. Options, step counts and `ridge` are static (each
value compiles once) and checked with a ValueError naming the argument; learning rates, preconditioners and
initial points are traced. Defaults follow Fu et al.'s released code where it differs from their paper.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from icl_jax.analysis.precision import highest_precision

NEWTON_ALPHAS = ("frobenius", "frobenius_2", "spectral")
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
    raise ValueError(
      f"steps={steps!r}; must be a non-empty tuple or list of non-negative ints (a static argument, so not a JAX array)"
    )
  for step in steps:
    _check_step_count("steps", step)
  return tuple(int(step) for step in steps)


def _prefix_mask(n: int, dtype) -> jax.Array:
  """[T, N]: weight 1 on the points that prefix t = 0..N sees (those before t), 0 elsewhere."""
  return (jnp.arange(n)[None, :] < jnp.arange(n + 1)[:, None]).astype(dtype)


def _check_ridge(ridge: float) -> None:
  if isinstance(ridge, bool) or not isinstance(ridge, (int, float, np.floating)) or not 0 <= ridge < np.inf:
    raise ValueError(f"ridge={ridge!r}; must be a finite number >= 0")


def _over_prefixes(estimate, xs_BxNxD: jax.Array, ys_BxN: jax.Array, ridge: float = 0.0) -> jax.Array:
  """Estimates of every prefix, [B, K, T, D], from estimate(S [B, D, D], b [B, D], t) -> [B, K, D], where
  S_t = X_t^T X_t + ridge I and b_t = X_t^T y_t.

  Prefixes lead in S and b so that vmapping over them keeps every batch dimension in front of the matrix
  dimensions; with prefixes second, XLA re-lays out S in every iteration of the scans (up to twice as slow).
  """
  mask_TxN = _prefix_mask(xs_BxNxD.shape[1], xs_BxNxD.dtype)
  s_TxBxDxD = jnp.einsum("tn,bni,bnj->tbij", mask_TxN, xs_BxNxD, xs_BxNxD)
  if ridge:
    s_TxBxDxD = s_TxBxDxD + ridge * jnp.eye(xs_BxNxD.shape[-1], dtype=xs_BxNxD.dtype)[None, None]
  b_TxBxD = jnp.einsum("tn,bni,bn->tbi", mask_TxN, xs_BxNxD, ys_BxN)
  return jax.vmap(estimate, out_axes=2)(s_TxBxDxD, b_TxBxD, jnp.arange(xs_BxNxD.shape[1] + 1))


@highest_precision
@jax.jit
def predict(ws: jax.Array, xs: jax.Array) -> jax.Array:
  """Prediction of prefix t's estimate for the query x_t, t = 0..N-1: [B, K, N] from weights [B, K, T, D], or
  [B, N] from [B, T, D] (the whole prompt's estimate, t = N, has no query and is dropped)."""
  return jnp.einsum("b...td,btd->b...t", ws[..., :-1, :], xs)


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


@highest_precision
@functools.partial(jax.jit, static_argnames=("ridge",))
def least_squares(xs: jax.Array, ys: jax.Array, ridge: float = 0.0) -> jax.Array:
  """Minimum-norm least squares X^+ y, or ridge (X^T X + ridge I)^{-1} X^T y when ridge > 0, of every prefix:
  [B, T, D]. The minimum-norm solution is the one every iterative method here converges to from w_0 = 0 when
  t < D or X is rank deficient."""
  _check_ridge(ridge)
  mask_TxN = _prefix_mask(xs.shape[1], xs.dtype)
  fit_prefix = lambda m_N: _least_squares(xs * m_N[None, :, None], ys * m_N[None, :], ridge)
  return jax.vmap(fit_prefix, out_axes=1)(mask_TxN)


# ---------------------------------------------------------------------------------------------------------------
# Iterative Newton (Newton-Schulz iteration for S^+, S = X^T X).


def _newton(s_BxDxD: jax.Array, b_BxD: jax.Array, num_steps: int, alpha: str) -> jax.Array:
  """Iterates M_k b of M_{k+1} = 2 M_k - M_k S M_k from M_0 = alpha S: [B, num_steps + 1, D]."""
  ss_BxDxD = s_BxDxD @ s_BxDxD  # S S^T, as S is symmetric.
  if alpha in ("frobenius", "frobenius_2"):
    numerator, norm_B = (1.0 if alpha == "frobenius" else 2.0), jnp.linalg.norm(ss_BxDxD, axis=(-2, -1))
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


@highest_precision
@functools.partial(jax.jit, static_argnames=("num_steps", "alpha", "ridge"))
def iterative_newton(
  xs: jax.Array, ys: jax.Array, num_steps: int, alpha: str = "frobenius", ridge: float = 0.0
) -> jax.Array:
  """Fu et al.'s Iterative Newton w_k = M_k X^T y on every prefix: [B, num_steps + 1, T, D], index k after k
  updates (k = 0: M_0 X^T y).

  M_0 = alpha S and M_{k+1} = 2 M_k - M_k S M_k, so I - M_k S = (I - alpha S^2)^(2^k) and w_k tends to the
  minimum-norm least-squares solution. alpha: "frobenius_2" for 2 / ||S S^T||_F (the code of Fu et al.'s
  transformers-icl-higher-order repository at 32b1021; on a rank-1 S, a one-point prefix, it is the spectral
  edge below and every iterate is 0), "frobenius" for 1 / ||S S^T||_F (<= 1 /
  lambda_max(S)^2, so it converges), "spectral" for 2 / ||S S^T||_2 (their paper; the edge of the convergent
  range: the top eigendirection is lost in exact arithmetic and restored or blown up by rounding after about
  log2(1 / eps) steps). On rank-deficient S rounding errors in its null space double every step: float32 stays
  accurate to ~30 steps (Fu et al.'s grid stops at 23), float64 past 60. With `ridge`, S = X^T X + ridge I
  (Fu et al.'s noisy setting).
  """
  _check_step_count("num_steps", num_steps)
  _check_option("alpha", alpha, NEWTON_ALPHAS)
  _check_ridge(ridge)
  return _over_prefixes(lambda s_BxDxD, b_BxD, _: _newton(s_BxDxD, b_BxD, num_steps, alpha), xs, ys, ridge)


# ---------------------------------------------------------------------------------------------------------------
# Gradient descent on 1/2 ||X w - y||^2 (or its mean), optionally preconditioned.
#
# With a fixed step every variant is the affine map w -> w - (H w - c), H = eta P S / scale and
# c = eta P b / scale, iterated from w_0 = 0.


def _gradient_map(
  s_BxDxD: jax.Array,
  b_BxD: jax.Array,
  num_points: jax.Array,
  learning_rate: jax.Array,
  gradient_scale: str,
  preconditioner: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
  """H [B, D, D] and c [B, D] of the affine gradient step; num_points is the prefix length t."""
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


def _affine_iterates_at(h_BxDxD: jax.Array, c_BxD: jax.Array, steps: tuple[int, ...]) -> jax.Array:
  """w_s of w <- w - (H w - c) from w_0 = 0 for each requested s: [B, K, D], in O(log max(steps)) products.

  Stepping one update at a time would cost max(steps) products per prefix and prompt (4096 for Fu et al.'s log
  grid); instead this squares the step map. With A = I - H, s updates are T^s(w) = A^s w + p_s, and T^s is the
  composition of T^(2^j) over the set bits j of s, in any order since they are powers of one map. One scan over
  bits j carries T^(2^j) and applies it to the requested steps whose bit j is set. It carries G_j = I - A^(2^j),
  not A^(2^j): A is within a small step size of I, and forming it would round away the small eigenvalues of H,
  i.e. the slow directions whose progress we want.
  """
  num_bits = max(max(steps).bit_length(), 1)
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


@functools.partial(jax.jit, static_argnames=("steps", "gradient_scale", "ridge"))
def _gradient_descent(xs, ys, steps, learning_rate, gradient_scale, preconditioner, ridge):
  _check_option("gradient_scale", gradient_scale, GRADIENT_SCALES)
  _check_ridge(ridge)
  if preconditioner is not None:
    b, _, d = xs.shape
    if preconditioner.shape not in ((d, d), (b, d, d)):
      raise ValueError(f"preconditioner.shape={preconditioner.shape}; must be {(d, d)} or {(b, d, d)}")

  def descend(s_BxDxD, b_BxD, num_points):
    h_BxDxD, c_BxD = _gradient_map(s_BxDxD, b_BxD, num_points, learning_rate, gradient_scale, preconditioner)
    return _affine_iterates_at(h_BxDxD, c_BxD, steps)

  return _over_prefixes(descend, xs, ys, ridge)


@highest_precision
def gradient_descent(
  xs: jax.Array,
  ys: jax.Array,
  steps,
  learning_rate: float,
  gradient_scale: str = "sum",
  preconditioner: jax.Array | None = None,
  ridge: float = 0.0,
) -> jax.Array:
  """Gradient descent w <- w - eta P grad from w_0 = 0 on every prefix, after each number of updates in `steps`:
  [B, len(steps), T, D]. Costs O(log max(steps)) matrix products, so grids up to thousands of steps are cheap.

  Args:
    xs: [B, N, D].
    ys: [B, N].
    steps: update counts, in any order (a tuple, list, range or 1-D integer numpy array; static).
    learning_rate: eta. It converges (to the minimum-norm least-squares solution) iff eta < 2 / lambda_max of
      the (preconditioned) Hessian, i.e. of P X^T X for "sum" and of P X^T X / t for "mean".
    gradient_scale: "sum" for the gradient X^T X w - X^T y (Fu et al.'s code, with eta = 0.01), or "mean" for
      that divided by the prefix length t (the gradient of ||X w - y||^2 / 2t).
    preconditioner: P, [D, D] (shared) or [B, D, D] (per prompt, the same for all its prefixes), or None for
      P = I. Ahn et al.'s linear-attention layers are steps of this form; with P = (X^T X / t)^{-1}, eta = 1
      and "mean" the first step lands on the least-squares solution.
    ridge: adds ridge/2 ||w||^2 to the loss (ridge w to the summed gradient; divided by t with "mean").
  """
  return _gradient_descent(xs, ys, _steps_tuple(steps), learning_rate, gradient_scale, preconditioner, ridge)


# ---------------------------------------------------------------------------------------------------------------
# Conjugate gradient, BFGS and L-BFGS with exact line search on the quadratic f(w) = 1/2 w^T S w - b^T w.
#
# From w_0 = 0 (and H_0 = I), all three minimise f over the Krylov space span{b, S b, ..., S^(k-1) b} at step k,
# i.e. they produce the same iterates in exact arithmetic (Nocedal & Wright, Thms. 5.3 and 6.4-6.5). Plain CG and
# L-BFGS with memory < k lose that property in floating point after about d / 2 steps on ill-conditioned S;
# CG's residuals are therefore reorthogonalised, which keeps it on the exact iterates, while L-BFGS is left as
# the two-loop recursion defines it. A step stops (alpha = 0) once the gradient is at rounding level or the
# direction has no curvature (a rank-deficient prefix), so converged iterates stay put instead of dividing noise.


def _dot(a_BxD: jax.Array, b_BxD: jax.Array) -> jax.Array:
  return jnp.einsum("bd,bd->b", a_BxD, b_BxD)


def _ratio(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """numerator / denominator where the denominator is > 0, else 0."""
  ok = denominator > 0
  return jnp.where(ok, numerator / jnp.where(ok, denominator, 1.0), 0.0)


class _Floors(NamedTuple):
  """Rounding levels of one problem, computed once before the iterations: a direction p has no curvature when
  p^T S p <= curvature_B * p^T p, and a gradient (or residual) g is converged when g^T g <= gradient_B."""

  curvature_B: jax.Array
  gradient_B: jax.Array


def _floors(s_BxDxD, b_BxD) -> _Floors:
  eps = 100 * jnp.finfo(b_BxD.dtype).eps
  return _Floors(eps * jnp.linalg.norm(s_BxDxD, axis=(-2, -1)), eps**2 * _dot(b_BxD, b_BxD))


def _line_search(s_BxDxD, floors: _Floors, g_BxD, p_BxD):
  """The exact step alpha along p from gradient g, [B] (0 at convergence or without curvature), and S p."""
  sp_BxD = jnp.einsum("bij,bj->bi", s_BxDxD, p_BxD)
  curvature_B = _dot(p_BxD, sp_BxD)
  live_B = (curvature_B > floors.curvature_B * _dot(p_BxD, p_BxD)) & (_dot(g_BxD, g_BxD) > floors.gradient_B)
  return jnp.where(live_B, _ratio(-_dot(g_BxD, p_BxD), curvature_B), 0.0), sp_BxD


def _iterates(step, init, num_steps: int, w0_BxD: jax.Array) -> jax.Array:
  """[B, num_steps + 1, D]: w_0 and the w that `step(carry, k) -> (carry, w)` returns at k = 0..num_steps-1."""
  _, ws_KxBxD = jax.lax.scan(step, init, jnp.arange(num_steps))
  return jnp.concatenate([w0_BxD[:, None], jnp.swapaxes(ws_KxBxD, 0, 1)], axis=1)


def _conjugate_gradient(s_BxDxD, b_BxD, num_steps: int) -> jax.Array:
  unit = lambda v_BxD: v_BxD * _ratio(1.0, jnp.sqrt(_dot(v_BxD, v_BxD)))[:, None]
  # Row k + 1 of the basis is residual k + 1, normalised; rows not yet written are 0 and remove nothing, and so
  # is a residual at rounding level (converged), whose direction is noise that would spoil the basis.
  floors = _floors(s_BxDxD, b_BxD)
  basis_BxKxD = jnp.zeros(b_BxD.shape[:1] + (num_steps + 1,) + b_BxD.shape[1:], b_BxD.dtype)
  basis_BxKxD = basis_BxKxD.at[:, 0].set(unit(b_BxD))

  def step(carry, k):
    w_BxD, r_BxD, p_BxD, basis_BxKxD = carry
    alpha_B, sp_BxD = _line_search(s_BxDxD, floors, -r_BxD, p_BxD)
    w_BxD = w_BxD + alpha_B[:, None] * p_BxD
    r_new_BxD = r_BxD - alpha_B[:, None] * sp_BxD
    for _ in range(2):  # Twice is enough (Giraud et al. 2005, "twice is enough" Gram-Schmidt).
      r_new_BxD = r_new_BxD - jnp.einsum("bkd,bk->bd", basis_BxKxD, jnp.einsum("bkd,bd->bk", basis_BxKxD, r_new_BxD))
    p_BxD = r_new_BxD + _ratio(_dot(r_new_BxD, r_new_BxD), _dot(r_BxD, r_BxD))[:, None] * p_BxD
    keep_B = _dot(r_new_BxD, r_new_BxD) > floors.gradient_B
    basis_BxKxD = jax.lax.dynamic_update_index_in_dim(
      basis_BxKxD, jnp.where(keep_B[:, None], unit(r_new_BxD), 0.0), k + 1, axis=1
    )
    return (w_BxD, r_new_BxD, p_BxD, basis_BxKxD), w_BxD

  w0_BxD = jnp.zeros_like(b_BxD)
  return _iterates(step, (w0_BxD, b_BxD, b_BxD, basis_BxKxD), num_steps, w0_BxD)


def _bfgs(s_BxDxD, b_BxD, num_steps: int) -> jax.Array:
  floors = _floors(s_BxDxD, b_BxD)
  eye_BxDxD = jnp.broadcast_to(jnp.eye(b_BxD.shape[-1], dtype=b_BxD.dtype), s_BxDxD.shape)
  outer = lambda u_BxD, v_BxD: jnp.einsum("bi,bj->bij", u_BxD, v_BxD)

  def step(carry, _):
    w_BxD, g_BxD, h_BxDxD = carry
    p_BxD = -jnp.einsum("bij,bj->bi", h_BxDxD, g_BxD)
    alpha_B, sp_BxD = _line_search(s_BxDxD, floors, g_BxD, p_BxD)
    s_BxD, y_BxD = alpha_B[:, None] * p_BxD, alpha_B[:, None] * sp_BxD
    rho_B = _ratio(1.0, _dot(y_BxD, s_BxD))  # 0 when the step is 0: H is kept.
    left_BxDxD = eye_BxDxD - rho_B[:, None, None] * outer(s_BxD, y_BxD)
    h_BxDxD = left_BxDxD @ h_BxDxD @ jnp.swapaxes(left_BxDxD, 1, 2) + rho_B[:, None, None] * outer(s_BxD, s_BxD)
    return (w_BxD + s_BxD, g_BxD + y_BxD, h_BxDxD), w_BxD + s_BxD

  w0_BxD = jnp.zeros_like(b_BxD)
  return _iterates(step, (w0_BxD, -b_BxD, eye_BxDxD), num_steps, w0_BxD)


def _lbfgs(s_BxDxD, b_BxD, num_steps: int, memory: int) -> jax.Array:
  floors = _floors(s_BxDxD, b_BxD)
  pairs_BxMxD = jnp.zeros(b_BxD.shape[:1] + (memory,) + b_BxD.shape[1:], b_BxD.dtype)

  def direction(g_BxD, ss_BxMxD, ys_BxMxD, rhos_BxM, gamma_B):
    """-H g by the two-loop recursion over the stored pairs (oldest first; empty ones have rho = 0)."""
    q_BxD, alphas = g_BxD, []
    for i in reversed(range(memory)):
      alphas.append(rhos_BxM[:, i] * _dot(ss_BxMxD[:, i], q_BxD))
      q_BxD = q_BxD - alphas[-1][:, None] * ys_BxMxD[:, i]
    r_BxD = gamma_B[:, None] * q_BxD
    for i, alpha_B in zip(range(memory), reversed(alphas)):
      r_BxD = r_BxD + (alpha_B - rhos_BxM[:, i] * _dot(ys_BxMxD[:, i], r_BxD))[:, None] * ss_BxMxD[:, i]
    return -r_BxD

  def step(carry, _):
    w_BxD, g_BxD, ss_BxMxD, ys_BxMxD, rhos_BxM, gamma_B = carry
    p_BxD = direction(g_BxD, ss_BxMxD, ys_BxMxD, rhos_BxM, gamma_B)
    alpha_B, sp_BxD = _line_search(s_BxDxD, floors, g_BxD, p_BxD)
    s_BxD, y_BxD = alpha_B[:, None] * p_BxD, alpha_B[:, None] * sp_BxD
    sy_B = _dot(y_BxD, s_BxD)
    # H_0 = gamma I with gamma = s^T y / y^T y of the newest pair (Nocedal & Wright eq. 7.20), 1 at first.
    gamma_B = jnp.where(sy_B > 0, _ratio(sy_B, _dot(y_BxD, y_BxD)), gamma_B)
    push = lambda stack, new: jnp.concatenate([stack[:, 1:], new[:, None]], axis=1)
    carry = (
      w_BxD + s_BxD,
      g_BxD + y_BxD,
      push(ss_BxMxD, s_BxD),
      push(ys_BxMxD, y_BxD),
      push(rhos_BxM, _ratio(1.0, sy_B)),
      gamma_B,
    )
    return carry, w_BxD + s_BxD

  w0_BxD = jnp.zeros_like(b_BxD)
  init = (
    w0_BxD,
    -b_BxD,
    pairs_BxMxD,
    pairs_BxMxD,
    jnp.zeros(pairs_BxMxD.shape[:2], b_BxD.dtype),
    jnp.ones(b_BxD.shape[:1], b_BxD.dtype),
  )
  return _iterates(step, init, num_steps, w0_BxD)


@highest_precision
@functools.partial(jax.jit, static_argnames=("num_steps", "ridge"))
def conjugate_gradient(xs: jax.Array, ys: jax.Array, num_steps: int, ridge: float = 0.0) -> jax.Array:
  """Conjugate gradient (exact line search, reorthogonalised residuals) on every prefix: [B, num_steps + 1, T, D],
  index k after k steps. Converges in at most rank(S) steps, to the minimum-norm (or ridge) solution."""
  _check_step_count("num_steps", num_steps)
  _check_ridge(ridge)
  return _over_prefixes(lambda s_BxDxD, b_BxD, _: _conjugate_gradient(s_BxDxD, b_BxD, num_steps), xs, ys, ridge)


@highest_precision
@functools.partial(jax.jit, static_argnames=("num_steps", "ridge"))
def bfgs(xs: jax.Array, ys: jax.Array, num_steps: int, ridge: float = 0.0) -> jax.Array:
  """BFGS with exact line search from H_0 = I on every prefix: [B, num_steps + 1, T, D], index k after k steps.
  H_{k+1} = (I - rho s y^T) H_k (I - rho y s^T) + rho s s^T with s = w_{k+1} - w_k, y = S s, rho = 1 / y^T s."""
  _check_step_count("num_steps", num_steps)
  _check_ridge(ridge)
  return _over_prefixes(lambda s_BxDxD, b_BxD, _: _bfgs(s_BxDxD, b_BxD, num_steps), xs, ys, ridge)


@highest_precision
@functools.partial(jax.jit, static_argnames=("num_steps", "memory", "ridge"))
def lbfgs(xs: jax.Array, ys: jax.Array, num_steps: int, memory: int, ridge: float = 0.0) -> jax.Array:
  """L-BFGS with the last `memory` pairs (s, y), H_0 = gamma I (Nocedal & Wright eq. 7.20) and exact line search
  on every prefix: [B, num_steps + 1, T, D], index k after k steps. With memory >= num_steps it is BFGS with a
  scaled H_0 (the same iterates on a quadratic)."""
  _check_step_count("num_steps", num_steps)
  if isinstance(memory, bool) or not isinstance(memory, (int, np.integer)) or memory < 1:
    raise ValueError(f"memory={memory!r}; must be an int >= 1")
  _check_ridge(ridge)
  return _over_prefixes(lambda s_BxDxD, b_BxD, _: _lbfgs(s_BxDxD, b_BxD, num_steps, memory), xs, ys, ridge)


# ---------------------------------------------------------------------------------------------------------------
# Online gradient descent.


@highest_precision
@jax.jit
def online_gradient_descent(
  xs: jax.Array, ys: jax.Array, learning_rate: jax.Array | None = None, w0: jax.Array | None = None
) -> jax.Array:
  """One pass over the points, step t on point t alone: [B, T, D], index t after the first t points (one pass
  visits every prefix).

  Without `learning_rate` the step is eta_t = 1 / ||x_t||^2, which projects w onto {w : x_t . w = y_t}, so each
  new point is fit exactly (Fu et al.'s paper); with it, the fixed step w <- w + eta (y_t - x_t . w) x_t of their
  code. w0: the start, [B, D] or [D] (their code: U[0, 1)^d), or None for 0.
  """

  def fit_point(w_BxD, point):
    x_BxD, y_B = point
    residual_B = y_B - jnp.einsum("bd,bd->b", x_BxD, w_BxD)
    if learning_rate is None:
      # A zero point (padding) says nothing about w; skip it rather than divide by 0.
      norm2_B = jnp.sum(x_BxD**2, axis=-1)
      gain_B = jnp.where(norm2_B > 0, residual_B / jnp.where(norm2_B > 0, norm2_B, 1.0), 0.0)
    else:
      gain_B = jnp.asarray(learning_rate, xs.dtype) * residual_B
    w_BxD = w_BxD + gain_B[:, None] * x_BxD
    return w_BxD, w_BxD

  w0_BxD = jnp.zeros_like(xs[:, 0]) if w0 is None else jnp.broadcast_to(w0, xs[:, 0].shape).astype(xs.dtype)
  _, ws_NxBxD = jax.lax.scan(fit_point, w0_BxD, (jnp.swapaxes(xs, 0, 1), ys.T))
  return jnp.concatenate([w0_BxD[:, None], jnp.swapaxes(ws_NxBxD, 0, 1)], axis=1)
