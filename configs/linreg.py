"""In-context linear regression with GPT-2, as trained by Garg et al. 2022 and probed by Fu et al. 2023.

  python -m icl_jax.main --config=configs/linreg.py --workdir=runs/paper     # the paper's run
  python -m icl_jax.main --config=configs/linreg.py:quick --workdir=runs/q   # laptop size, minutes

Every field below can be overridden on the command line, e.g. `--config.model.num_layers=4`.
"""

from ml_collections import config_dict


def get_config(variant: str = "paper") -> config_dict.ConfigDict:
  """Returns the paper's configuration, or a named variant of it ("paper", "large", "medium", "quick")."""
  config = config_dict.ConfigDict()
  # Seeds parameter initialisation and the data stream: the batch at step s on device i is a pure function of
  # (seed, s, i), so a resumed run sees exactly the data an uninterrupted one would have.
  config.seed = 0

  config.task = task = config_dict.ConfigDict()
  task.n_dims = 20  # d: dimension of x and w (Garg et al.: 20).
  task.n_points = 41  # (x, y) pairs per prompt; the prediction for x_i uses the i-1 pairs before it (Garg: 41).
  # Condition number of Cov(x); 1 is isotropic x ~ N(0, I) (the main setting of all three papers).
  task.kappa = 1.0
  task.noise_std = 0.0  # sigma in y = w.x + sigma * eps (Fu et al.'s noisy variant uses 0.1).
  # Eigenvalues of Cov(x) when kappa > 1: "two_level" puts half at kappa*c and half at c (Fu et al. §4.3);
  # "log_spaced" spreads d values geometrically from c to kappa*c.
  task.spectrum = "two_level"
  # Rescale the eigenvalues so that trace(Cov) = d, as Fu et al.'s code does: E|x|^2 stays d for every kappa,
  # so the model's input scale and the zero predictor's error do not change with kappa.
  task.normalize_trace = True
  # Random eigenbasis of Cov(x): "per_prompt" as the paper describes it, or "per_batch" (one rotation shared
  # by the global batch of a step) as Fu et al.'s code does it. Per prompt is the stated data distribution.
  task.rotation = "per_prompt"
  # (Ahn et al.'s setting, configs/lsa.py, also uses spectrum="explicit" with task.eigenvalues, and
  # rotation="per_run" with task.rotation_seed: one eigenbasis for the whole run.)
  # Distribution of w: "identity" N(0, I) (Garg et al., Fu et al.) or "inverse_covariance" N(0, Cov(x)^-1)
  # (Ahn et al.'s Theorem 3 and §4.3).
  task.w_distribution = "identity"
  # A fresh batch every resample_every steps: the batch of step s is made from the key of step
  # s // resample_every (Ahn et al.: 100). 1 is a new batch every step.
  task.resample_every = 1

  # Garg et al.'s curriculum: at step s the prompts have
  #   dims(s)   = min(dims_start   + dims_increment   * (s // dims_interval),   n_dims)
  #   points(s) = min(points_start + points_increment * (s // points_interval), n_points)
  # Dimensions beyond dims(s) are zeroed; positions beyond points(s) are left out of the loss (with causal
  # attention this equals training on the shorter prompt, and keeps one compiled shape for the whole run).
  task.curriculum = curriculum = config_dict.ConfigDict()
  curriculum.enabled = True  # False: d = n_dims and n_points from step 0.
  curriculum.dims_start = 5
  curriculum.dims_increment = 1
  curriculum.dims_interval = 2000
  curriculum.points_start = 11
  curriculum.points_increment = 2
  curriculum.points_interval = 2000

  config.model = model = config_dict.ConfigDict()
  model.family = "gpt2"  # A name in icl_jax.models.REGISTRY.
  model.num_layers = 12  # Transformer blocks (Garg's "standard": 12).
  model.num_heads = 8  # Attention heads; must divide width.
  model.width = 256  # Residual-stream width D (n_embd).
  model.mlp_ratio = 4  # MLP hidden width = mlp_ratio * width (GPT-2: 4).
  # Learned position embeddings. Garg et al.'s GPT2Config has n_positions = 2 * 101 = 202; keeping it gives
  # their 9.53M parameters and lets their released checkpoint load unchanged. Must be >= 2 * n_points.
  model.n_positions = 202
  model.layer_norm_epsilon = 1e-5  # GPT-2's value.
  model.init_std = 0.02  # GPT-2's initialiser scale (output projections are scaled by 1/sqrt(2 * num_layers)).
  # Activations and matmul inputs: "float32" or "bfloat16" (mixed precision for GPUs and TPUs; parameters,
  # optimiser state, softmax, LayerNorm, read-out and loss stay float32, and so do checkpoints). GPT-2 only.
  model.dtype = "float32"

  config.train = train = config_dict.ConfigDict()
  train.num_steps = 500_000  # Garg et al.: 500k steps.
  train.batch_size = 64  # Global batch (prompts per step), split over all devices of all hosts.
  train.learning_rate = 1e-4  # Adam's peak learning rate (Garg et al.: 1e-4, constant).
  # "constant", "cosine" (to 0 at num_steps), "linear" (to 0 at num_steps) or "step_decay" (see decay_every).
  train.schedule = "constant"
  train.warmup_steps = 0  # Linear warm-up from 0 before the schedule.
  train.grad_clip_norm = 0.0  # Clip the global gradient norm to this; 0 disables clipping.
  # Clip each parameter array's gradient to this Frobenius norm (Ahn et al.: 0.01 per matrix); 0 disables it.
  train.clip_per_matrix = 0.0
  # With schedule="step_decay": the learning rate is multiplied by decay_factor every decay_every steps.
  train.decay_every = 2000
  train.decay_factor = 0.5
  # Positions in the loss: "all" (Garg et al.: mean squared error over every position) or "last" (Ahn et al.:
  # only the prediction from all n_points - 1 pairs before the last point).
  train.loss_positions = "all"
  train.weight_decay = 0.0  # Decoupled weight decay (AdamW) when > 0; Garg et al. use plain Adam.
  train.adam_b1 = 0.9  # torch.optim.Adam defaults, as in Garg et al.
  train.adam_b2 = 0.999
  train.adam_eps = 1e-8
  train.log_every = 100  # Steps between metrics.jsonl / TensorBoard records.
  train.checkpoint_every = 1000  # Steps between checkpoints (Garg et al.: save_every_steps 1000).
  train.keep_checkpoints = 3  # Most recent checkpoints kept.
  train.keep_period = 100_000  # Checkpoints at multiples of this are never deleted (Garg: keep_every_steps); 0: none.
  # Seconds a checkpoint save may take, plus its size at 1 MB/s; past that the run stops with one error and keeps
  # the checkpoints already committed, instead of waiting forever for storage that no longer answers.
  train.checkpoint_timeout_s = 600.0
  # Training steps run inside one compiled call (a loop on device), so that small models are not bound by
  # Python dispatch. Results do not depend on it.
  train.steps_per_dispatch = 50
  # Precision of float32 matmuls in training (jax.default_matmul_precision): "default" lets TPUs and recent
  # NVIDIA GPUs use bfloat16 / TF32 passes for speed, "high" 3 bfloat16 passes, "highest" true float32. CPUs
  # compute float32 in every case. The evaluation always uses "highest".
  train.matmul_precision = "default"

  # Evaluation (`--mode=eval`, and error/d at the end of training): which algorithm each layer follows.
  config.eval = evaluation = config_dict.ConfigDict()
  evaluation.num_prompts = 1280  # Fresh full-size prompts for every curve and SimE (Garg et al.: 20 x 64).
  # Prompts per model call and device (memory and speed, not results): small calls keep the activations in
  # the CPU's caches.
  evaluation.batch_size = 16
  evaluation.after_training = False  # Also run the full evaluation when training finishes.
  evaluation.bootstrap_samples = 1000  # Resamples of the prompts for the intervals (Garg et al.: 1000).
  evaluation.confidence = 0.9  # Width of the bootstrap intervals (Garg et al.: 90%).
  # Per-layer read-out (icl_jax/analysis/probes.py): "least_squares" (closed-form minimiser of Fu et al.'s probe loss),
  # "trained" (Fu et al.'s Adam-trained probes) or "model" (the model's own read-out on every layer).
  evaluation.readout = "least_squares"
  evaluation.probe_prompts = 256  # Fresh prompts the least-squares probes are fit on (256 x 41 >> width + 1).
  evaluation.probe_ridge = 1e-6  # Ridge of the least-squares probes, relative to the mean feature energy.
  evaluation.probe_steps = 2000  # Adam steps of "trained" probes (Fu et al. ran up to 500k; unknown).
  evaluation.probe_batch_size = 64  # Prompts per step of "trained" probes (Fu et al.: 64).
  evaluation.probe_learning_rate = 1e-4  # Adam's rate for "trained" probes (Fu et al.: 1e-4).
  # Start of "trained" probes: "read_out" (the pretrained read-out, what Fu et al.'s code ends up doing) or
  # "normal" (N(0, 0.01^2) kernel, zero bias, what it intends).
  evaluation.probe_init = "read_out"
  evaluation.newton_steps = 23  # Newton iterations compared: 1..newton_steps (Fu et al.: 23).
  # Newton's M_0 = alpha S: "frobenius" alpha = 1/||SS^T||_F, "frobenius_2" 2/||SS^T||_F (Fu et al.'s code in
  # their transformers-icl-higher-order repository) or "spectral" 2/||SS^T||_2 (their paper; on the edge of
  # convergence, see icl_jax/analysis/algorithms.py).
  evaluation.newton_alpha = "frobenius"
  evaluation.gd_learning_rate = 0.01  # GD's step size (Fu et al.'s code: 0.01).
  # GD's gradient: "sum" X^T(Xw - y) (Fu et al.'s code) or "mean" (divided by the number of points).
  evaluation.gd_gradient_scale = "sum"
  evaluation.gd_steps = (1,) + tuple(range(50, 1301, 50))  # Fu et al.'s GD grid {1, 50, ..., 1300}.
  evaluation.gd_log_steps = tuple(2**k for k in range(13))  # Fu et al.'s log grid {2^0, ..., 2^12}.
  # Conjugate gradient, BFGS (H_0 = I) and L-BFGS, each with exact line search on 1/2 ||Xw - y||^2 from w = 0
  # (Fu et al. App. A.2.3; their definitions are not released): compared at 1..steps steps. All three reach
  # least squares within d steps; L-BFGS keeps the last lbfgs_memory pairs (scipy's default, 10).
  evaluation.cg_steps = 23
  evaluation.bfgs_steps = 23
  evaluation.lbfgs_steps = 23
  evaluation.lbfgs_memory = 10
  # Online GD: "projection" (their paper: step 1/||x_t||^2 from w = 0, each new point fit exactly) or
  # "fixed_step" (their code: step online_gd_learning_rate from w_0 ~ U[0, 1)^d, one draw per prompt).
  evaluation.online_gd = "projection"
  evaluation.online_gd_learning_rate = 0.01  # Only for "fixed_step" (their code's grid: 0.01-0.05).
  # Ridge lambda of the reference algorithms: Newton on X^T X + lambda I, GD on the loss + lambda/2 ||w||^2 and
  # ridge least squares (Fu et al.'s noisy setting, whose lambda they do not give). 0: plain least squares.
  evaluation.ridge = 0.0
  evaluation.sim_e_include_first = True  # SimE counts position 0 (Fu et al.'s code) or not (their paper).
  # SimW: induced weights fit by least squares to predictions on sim_w_queries fresh queries per prefix, on
  # sim_w_prompts prompts. The model's predictions are near-linear in the query (Fu et al. Fig. 27), so ~3d
  # queries pin the fit down; each query is a model token at every prefix, the evaluation's largest cost.
  evaluation.sim_w_prompts = 16
  evaluation.sim_w_queries = 64
  # Layers (1-based, inclusive) over which best-matching steps are fit against the layer index. None: from
  # layer L // 5 + 1 to ceil(3L / 4), i.e. 3-9 of 12, the linear stretch of Fu et al. §4.2, for any depth.
  evaluation.fit_layers = config_dict.placeholder(tuple)
  # Prompts from JAX's PRNG may change between JAX versions; for numbers to publish, evaluate on a frozen set
  # (`python -m icl_jax.datasets.build --data_dir=DIR`): the first num_prompts prompts of setting
  # dataset_setting ("isotropic", "kappa100" or "noisy"; d and n must be the task's) in dataset_dir. ""
  # evaluates on fresh prompts. The probe-fitting and SimW prompts are fresh either way.
  evaluation.dataset_dir = ""
  evaluation.dataset_setting = "isotropic"

  if variant == "quick":
    _make_quick(config)
  elif variant == "medium":
    _make_medium(config)
  elif variant == "large":
    _make_large(config)
  elif variant != "paper":
    raise ValueError(f"configs/linreg.py: unknown variant {variant!r}; allowed: 'paper', 'large', 'medium', 'quick'.")
  return config


def _make_quick(config: config_dict.ConfigDict) -> None:
  """Laptop size: d = 5, 11 points, a 4-layer width-64 model; learns to well under 0.1x the zero predictor's
  error in a few minutes on a 2-core CPU."""
  config.task.n_dims = 5
  config.task.n_points = 11
  config.task.curriculum.enabled = False
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.width = 64
  config.model.n_positions = 22
  config.train.num_steps = 6000
  config.train.batch_size = 128  # Less gradient noise per step than 64, for the same wall time.
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 500
  config.train.schedule = "cosine"
  config.train.log_every = 200
  config.train.checkpoint_every = 1000
  config.train.keep_period = 0
  config.train.steps_per_dispatch = 100
  config.eval.fit_layers = (1, 4)
  config.eval.after_training = True  # The first command of README trains, evaluates and draws.


def _make_medium(config: config_dict.ConfigDict) -> None:
  """The paper's depth at CPU size: a 12-layer GPT-2 of width 64 at d = 8, 17 points (n = 2d + 1), trained for
  about 20 minutes on a 2-core CPU with a fast curriculum; chosen by measurement (docs/medium_search.md)."""
  config.task.n_dims = 8
  config.task.n_points = 17
  curriculum = config.task.curriculum
  curriculum.enabled = True  # Without it the 12-layer model stays on the initial plateau (docs/medium_search.md).
  curriculum.dims_start = 2
  curriculum.dims_increment = 1
  curriculum.dims_interval = 400
  curriculum.points_start = 5
  curriculum.points_increment = 2
  curriculum.points_interval = 400
  config.model.num_layers = 12
  config.model.num_heads = 4
  config.model.width = 64
  config.model.n_positions = 34
  config.train.num_steps = 11000
  config.train.batch_size = 64
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 500
  config.train.schedule = "cosine"
  config.train.log_every = 200
  config.train.checkpoint_every = 1000
  config.train.keep_period = 0
  config.train.steps_per_dispatch = 100


def _make_large(config: config_dict.ConfigDict) -> None:
  """The papers' task at CPU size: d = 20 and 41 points (Garg et al.), the medium rung's 12-layer width-64 model
  and curriculum (d = 2 and 5 points, one increment every 400 steps: d = 20 from step 7200), 25000 steps; about
  2 hours per seed on a 2-core CPU with --jax_num_cpu_devices=2. Chosen by measurement, including how often
  its seeds leave the initial plateau (docs/large_search.md)."""
  _make_medium(config)
  config.task.n_dims = 20
  config.task.n_points = 41
  config.model.n_positions = 82
  config.train.num_steps = 25000
  config.train.log_every = 100
  config.train.checkpoint_every = 500
