"""Task families of the experiment launcher, one module each (``python experiments/run.py``).

Each module defines a ``Config`` dataclass (its ``task:`` schema) and ``build(cfg, dtype)``
returning a :class:`curvopt.launcher.Task`; :data:`experiments.run.TASK_MODULES` names them.
"""
