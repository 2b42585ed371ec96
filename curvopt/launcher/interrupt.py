"""Ctrl-C during a run: the first stops it cleanly after the current step, the second at once.

Python runs a signal handler only between two bytecodes of the main thread, so a ``SIGINT``
that arrives during a long compiled call (or a compilation) would wait for it to return. Here
the handler is a no-op and the signal is read instead from :func:`signal.set_wakeup_fd` by a
watcher thread, which reacts at once: the first Ctrl-C sets a flag that the runner polls between
two compiled calls (it then saves a checkpoint and returns), the second exits the process
immediately with status 130, as an uncaught ``SIGINT`` would, after printing how to resume from
the last checkpoint.
"""

import os
import signal
import socket
import sys
import threading
from typing import Any, TextIO

EXIT_STATUS = 130  # 128 + SIGINT, what a shell reports for a process stopped by Ctrl-C

NOTICE = (
  "\nCtrl-C: stopping after the current step and saving a checkpoint "
  "(press Ctrl-C again to quit at once)."
)


class StopOnInterrupt:
  """A context manager under which Ctrl-C asks the run to stop instead of raising.

  ``stop()`` (calling the object) is ``True`` once Ctrl-C was pressed. Outside the main thread,
  where signals cannot be caught, it does nothing and ``stop()`` stays ``False``.

  Attributes:
    exit_message: printed when a second Ctrl-C exits the process (e.g. the ``--resume``
      command); may be set while the context is active.
  """

  def __init__(self, stream: TextIO | None = None):
    self.exit_message = ""
    self._stream = stream
    self._requested = threading.Event()
    self._active = False

  def __call__(self) -> bool:
    return self._requested.is_set()

  def __enter__(self) -> "StopOnInterrupt":
    self._active = threading.current_thread() is threading.main_thread()
    if not self._active:
      return self
    self._read, self._write = socket.socketpair()
    self._write.setblocking(False)
    self._old_fd = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
    self._old_handler = signal.signal(signal.SIGINT, _ignore)
    self._thread = threading.Thread(target=self._watch, name="curvopt-sigint", daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc: Any) -> None:
    if not self._active:
      return
    signal.signal(signal.SIGINT, self._old_handler)
    signal.set_wakeup_fd(self._old_fd)
    self._write.close()  # the watcher reads end-of-file and returns
    self._thread.join()
    self._read.close()

  def _watch(self) -> None:
    presses = 0
    while data := self._read.recv(64):
      presses += data.count(signal.SIGINT)
      if presses == 1 and not self._requested.is_set():
        self._say(NOTICE)
        self._requested.set()
      elif presses >= 2:
        self._say("\nCtrl-C again: exiting now. " + self.exit_message)
        os._exit(EXIT_STATUS)

  def _say(self, text: str) -> None:
    stream = self._stream or sys.stderr
    print(text, file=stream, flush=True)


def _ignore(signum: int, frame: Any) -> None:
  """The Python-level handler: the watcher thread does the work."""
  del signum, frame
