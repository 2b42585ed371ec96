"""kfac-jax on the digits autoencoder: the peer row of ``benchmarks/kfac.py --only peer``.

Runs in its own virtual environment (kfac-jax 0.0.8 needs JAX 0.8: on JAX 0.10 its
``tag_graph_matcher.eval_jaxpr_eqn`` unpacks ``subfuns, params = get_bind_params(...)``,
which JAX 0.10 returns as the params alone, and fails with "too many values to unpack"):

  python -m venv /work/venvs/kfacjax
  /work/venvs/kfacjax/bin/pip install kfac-jax==0.0.8 jax==0.8.2 jaxlib==0.8.2

Usage: /work/venvs/kfacjax/bin/python benchmarks/kfac_jax_peer.py PROBLEM.npz SECONDS OUT.json
``PROBLEM.npz`` (written by ``benchmarks/kfac.py``) holds the training images and the initial
parameters of the launcher's autoencoder for seed 0; the model and loss below are the task's
(sigmoid encoder 64-128-64-32-6 with a linear code, mirrored decoder, logistic outputs, summed
binary cross-entropy averaged over the batch). kfac-jax runs with its automatic learning
rate, momentum and damping on the full batch; the training MSE is recorded every 10 steps,
the evaluation time excluded from the clock.
"""

import json
import sys
import time

import jax
import jax.numpy as jnp
import kfac_jax
import numpy as np


def main(problem_path, seconds, out_path):
  problem = np.load(problem_path)
  x = jnp.asarray(problem["x"])
  num_layers = sum(1 for k in problem.files if k.startswith("w"))
  params = [
    {"w": jnp.asarray(problem[f"w{i}"]), "b": jnp.asarray(problem[f"b{i}"])}
    for i in range(num_layers)
  ]
  code_layer = int(problem["code_layer"])

  def model(params, x):
    h = x
    for i, layer in enumerate(params):
      h = h @ layer["w"] + layer["b"]
      if i not in (code_layer, len(params) - 1):
        h = jax.nn.sigmoid(h)
    return h

  def loss_fn(params, batch):
    logits = model(params, batch)
    kfac_jax.register_sigmoid_cross_entropy_loss(logits, batch)
    return jnp.mean(jnp.sum(jax.nn.softplus(logits) - logits * batch, -1))

  train_mse = jax.jit(lambda p: jnp.mean(jnp.sum((jax.nn.sigmoid(model(p, x)) - x) ** 2, -1)))
  optimizer = kfac_jax.Optimizer(
    value_and_grad_func=jax.value_and_grad(loss_fn),
    l2_reg=0.0,
    use_adaptive_learning_rate=True,
    use_adaptive_momentum=True,
    use_adaptive_damping=True,
    initial_damping=1.0,
    multi_device=False,
    num_burnin_steps=0,
  )
  rng = jax.random.key(0)
  state = optimizer.init(params, rng, x)
  records, wall, step = (
    [{"step": 0, "wall_time": 0.0, "train_mse": float(train_mse(params))}],
    0.0,
    0,
  )
  tic = time.perf_counter()
  params, state, _ = optimizer.step(params, state, rng, batch=x, global_step_int=0)
  compile_time = time.perf_counter() - tic
  step = 1
  while wall < seconds:
    tic = time.perf_counter()
    for _ in range(10):
      rng, key = jax.random.split(rng)
      params, state, _ = optimizer.step(params, state, key, batch=x, global_step_int=step)
      step += 1
    jax.block_until_ready(params)
    wall += time.perf_counter() - tic
    records.append({"step": step, "wall_time": wall, "train_mse": float(train_mse(params))})
  with open(out_path, "w") as f:
    json.dump({"compile_time": compile_time, "jax": jax.__version__, "records": records}, f)


if __name__ == "__main__":
  main(sys.argv[1], float(sys.argv[2]), sys.argv[3])
