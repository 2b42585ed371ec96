"""Data-parallel scaling of Newton-CG and DP-SGD steps, and the collectives XLA inserts.

Run: ``python benchmarks/scaling.py`` (``--quick`` for fewer repeats, ``--devices 1,2,4``).

On a CPU-only machine the script asks XLA for 4 fake host devices
(``--xla_force_host_platform_device_count``) that share the same cores: the times then show
the *overhead* of partitioning and of the collectives, not a speed-up. On a machine with
several GPUs the same command measures real scaling over the first 1, 2, 4, ... of them.

The model is an MLP 784-256-256-10 with softmax cross-entropy at a global batch of 256 in
float32 (the batch split over a ``"data"`` mesh axis, parameters and optimiser state
replicated), and the steps are

* ``sgd``: one gradient and an SGD update (the reference cost of a data-parallel step);
* ``newton_cg(ggn)``: :func:`curvopt.newton_cg.newton_cg` with the Gauss-Newton curvature and
  exactly 10 CG iterations (tolerances off), so every device count does the same work;
* ``dp_sgd(ghost)``: ghost-clipped sum (:func:`curvopt.clipped_sum_fn`) then
  :func:`curvopt.dp_sgd` with noise.

Table 1 gives the median step time per device count and its ratio to one device. Table 2
counts the collectives in the compiled HLO of one Newton-CG step (``jit(step).lower(...)
.compile().as_text()``): in the whole program, inside the CG ``while`` loop (executed once per
CG iteration), the resulting number executed per step, and the bytes all-reduced per CG
iteration. A last row shards the two hidden layers over a ``"model"`` axis of a 2 x 2 mesh.
"""

import argparse
import os
import re
import sys

MAX_FAKE_DEVICES = 4
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  # Only affects the CPU platform; must be set before JAX initialises.
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={MAX_FAKE_DEVICES}"
  )

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _timing import median_seconds, print_table  # noqa: E402

import curvopt  # noqa: E402
from curvopt import (  # noqa: E402
  clipped_sum_fn,
  dp_sgd,
  sharding,  # noqa: E402
)
from curvopt.optimizers.newton_cg import newton_cg  # noqa: E402

SIZES = (784, 256, 256, 10)
BATCH = 256
CG_STEPS = 10
COLLECTIVES = (
  "all-reduce",
  "all-gather",
  "reduce-scatter",
  "collective-permute",
  "all-to-all",
)


# ------------------------------------------------------------------------------- problem


def make_problem(key):
  keys = jax.random.split(key, len(SIZES) + 1)
  params = [
    {"w": jax.random.normal(k, (m, n), jnp.float32) / m**0.5, "b": jnp.zeros(n, jnp.float32)}
    for k, m, n in zip(keys[:-2], SIZES[:-1], SIZES[1:], strict=True)
  ]
  x = jax.random.normal(keys[-2], (BATCH, SIZES[0]), jnp.float32)
  y = jax.nn.one_hot(jax.random.randint(keys[-1], (BATCH,), 0, SIZES[-1]), SIZES[-1])
  return params, x, y.astype(jnp.float32)


def model_fn(params, x):
  for layer in params[:-1]:
    x = jnp.tanh(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def loss_fn(logits, y):
  return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(logits), axis=-1))


def value_fn(params, x, y):
  return loss_fn(model_fn(params, x), y)


def example_loss(params, example):
  x, y = example
  return -jnp.sum(y * jax.nn.log_softmax(model_fn(params, x)))


def make_steps():
  """``{name: (optimizer, step)}`` with ``step(params, state, x, y) -> (params, state)``."""
  sgd = optax.sgd(0.1)

  def sgd_step(params, state, x, y):
    grads = jax.grad(value_fn)(params, x, y)
    updates, state = sgd.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  newton = newton_cg(
    model_fn=model_fn,
    loss_fn=loss_fn,
    damping=1.0,
    solver=curvopt.CG(max_steps=CG_STEPS, tol=0.0, progress_tol=None),
  )

  def newton_step(params, state, x, y):
    grads = jax.grad(value_fn)(params, x, y)
    updates, state = newton.update(grads, state, params, x=x, y=y)
    return optax.apply_updates(params, updates), state

  dp = dp_sgd(0.1, l2_norm_clip=1.0, noise_multiplier=1.0, key=jax.random.key(0))
  clipped_sum = clipped_sum_fn(example_loss, 1.0, method="ghost")

  def dp_step(params, state, x, y):
    updates, state = dp.update(clipped_sum(params, (x, y)), state, params)
    return optax.apply_updates(params, updates), state

  return {
    "sgd": (sgd, sgd_step),
    "newton_cg(ggn)": (newton, newton_step),
    "dp_sgd(ghost)": (dp, dp_step),
  }


# ------------------------------------------------------------------------- HLO analysis


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_CALLEES = re.compile(r"(?:body|condition|to_apply|calls|branch_computations)=\{?([%\w.\-, ]+)")
_SHAPE = re.compile(r"([a-z]+\d*)\[([\d,]*)\]")
_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2}


def _computations(hlo):
  """``{name: [instruction lines]}`` of an HLO module's text."""
  comps, name = {}, None
  for line in hlo.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      name = m.group(1)
      comps[name] = []
    elif line.startswith("}"):
      name = None
    elif name is not None:
      comps[name].append(line)
  return comps


def _reachable(comps, roots):
  seen, todo = set(), list(roots)
  while todo:
    name = todo.pop()
    if name in seen or name not in comps:
      continue
    seen.add(name)
    for line in comps[name]:
      for group in _CALLEES.findall(line):
        todo.extend(n.strip().lstrip("%") for n in group.split(","))
  return seen


def _collective(line):
  """The collective an instruction line starts (async ``-start`` counted once), or None."""
  for op in COLLECTIVES:
    if f" {op}(" in line or f" {op}-start(" in line:
      return op
  return None


def _payload_bytes(line):
  lhs = line.split("=", 1)[1].split(" all-reduce", 1)[0]
  total = 0
  for dtype, dims in _SHAPE.findall(lhs):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _BYTES.get(dtype, 4)
  return total


def collective_counts(hlo):
  """Collectives in the whole program and inside ``while`` bodies, and loop all-reduce bytes."""
  comps = _computations(hlo)
  bodies = [
    m for lines in comps.values() for line in lines for m in re.findall(r"body=%?([\w.\-]+)", line)
  ]
  in_loop = _reachable(comps, bodies)
  total, loop, loop_bytes = {}, {}, 0
  for name, lines in comps.items():
    for line in lines:
      op = _collective(line)
      if op is None:
        continue
      total[op] = total.get(op, 0) + 1
      if name in in_loop:
        loop[op] = loop.get(op, 0) + 1
        if op == "all-reduce":
          loop_bytes += _payload_bytes(line)
  return total, loop, loop_bytes


# --------------------------------------------------------------------------------- main


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="fewer timing repeats")
  parser.add_argument("--devices", default=None, help="comma-separated device counts")
  args = parser.parse_args()
  available = jax.device_count()
  counts = [n for n in (1, 2, 4, 8) if n <= available]
  if args.devices:
    counts = [int(n) for n in args.devices.split(",")]
  repeats = 3 if args.quick else 10
  params, x, y = make_problem(jax.random.PRNGKey(0))
  steps = make_steps()
  print(f"backend: {jax.default_backend()}, {available} devices ({jax.devices()[0].device_kind})")

  layouts = [(f"{n}", sharding.data_mesh(n), None) for n in counts]
  if available >= 4:
    mesh2 = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    hidden = [
      {"w": P(None, "model"), "b": P("model")},
      {"w": P("model", None), "b": P()},
      {"w": P(), "b": P()},
    ]
    layouts.append(("2 data x 2 model", mesh2, hidden))

  times, rows2 = {}, []
  for label, mesh, specs in layouts:
    if specs is None:
      p = sharding.replicate(params, mesh)
    else:
      p = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    xb, yb = sharding.shard_batch((x, y), mesh)
    for name, (opt, step) in steps.items():
      state = sharding.place_state(opt.init(p), mesh)
      jitted = jax.jit(step)
      times[label, name] = median_seconds(
        lambda jitted=jitted, state=state: jitted(p, state, xb, yb), repeats=repeats
      )
      if name == "newton_cg(ggn)":
        hlo = jitted.lower(p, state, xb, yb).compile().as_text()
        total, loop, loop_bytes = collective_counts(hlo)
        out_loop = {k: total[k] - loop.get(k, 0) for k in total}
        per_step = sum(out_loop.values()) + CG_STEPS * sum(loop.values())
        fmt = lambda d: ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"
        rows2.append([label, fmt(total), fmt(loop), per_step, loop_bytes])

  base = {name: times[layouts[0][0], name] for name in steps}
  rows1 = []
  for label, _, _ in layouts:
    row = [label]
    for name in steps:
      row += [1e3 * times[label, name], times[label, name] / base[name]]
    row.append(times[label, "newton_cg(ggn)"] / times[label, "sgd"])
    rows1.append(row)
  header1 = ["devices"]
  for name in steps:
    header1 += [f"{name} ms", f"{name} / 1 dev"]
  header1.append("newton / sgd")
  print_table(
    f"Step time vs device count (batch {BATCH}, MLP {'-'.join(map(str, SIZES))}, "
    f"{jax.default_backend()})",
    header1,
    rows1,
  )
  print_table(
    f"Collectives in one compiled Newton-CG (GGN) step, {CG_STEPS} CG iterations",
    ["devices", "in program", "inside CG loop", "executed per step", "all-reduce bytes / CG it"],
    rows2,
  )


if __name__ == "__main__":
  main()
