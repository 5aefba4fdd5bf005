"""A progress line with steps/s and ETA that also works in CI logs.

On a terminal it rewrites one line every step; otherwise (pipes, CI) it
prints a new line every `log_every` steps, so logs stay short.

The first update of a phase comes after its first device loop, which
includes tracing: the rate is measured from there on, and until a second
update can measure it the line says "measuring" instead of a rate. The ETA
covers this phase and the phases after it (`later_steps`, given in steps of
this phase by their cost), and includes the evaluations run between loops.
"""

import sys
import time
from typing import Dict


def _duration(seconds: float) -> str:
  seconds = int(max(0, seconds))
  minutes, seconds = divmod(seconds, 60)
  hours, minutes = divmod(minutes, 60)
  if hours:
    return f'{hours}h{minutes:02d}m{seconds:02d}s'
  return f'{minutes}m{seconds:02d}s'


class Progress:

  def __init__(self, label: str, total: int, log_every: int, stream=None,
               start_step: int = 0, later_steps: float = 0.0):
    self.label, self.total, self.log_every = label, total, log_every
    self.stream = stream or sys.stdout
    self.interactive = self.stream.isatty()
    self.start = time.time()
    self.start_step = start_step
    self.later_steps = later_steps
    self._first_step_time = None
    self._first_step = None

  def update(self, step: int, scalars: Dict[str, float]) -> None:
    now = time.time()
    if self._first_step_time is None:
      # The first update includes tracing; rates are measured after it.
      self._first_step_time, self._first_step = now, step
    if not (self.interactive or step % self.log_every == 0
            or step == self.start_step + 1 or step == self.total):
      return
    measured = step - self._first_step
    if measured and now > self._first_step_time:
      rate = measured / (now - self._first_step_time)
      remaining = (self.total - step) / rate
      timing = f'{rate:.2f} steps/s | ETA {_duration(remaining)}'
      if self.later_steps:
        everything = remaining + self.later_steps / rate
        timing += f' (all phases {_duration(everything)})'
    else:
      timing = 'measuring steps/s'
    values = ' '.join(f'{k.split("/")[-1]}={v:.4g}' for k, v in scalars.items())
    line = f'{self.label} {step}/{self.total} | {timing} | {values}'
    if self.interactive:
      self.stream.write('\r' + line[:200] + '\x1b[K')
    else:
      self.stream.write(line + '\n')
    self.stream.flush()

  def close(self) -> None:
    elapsed = time.time() - self.start
    self.stream.write(('\n' if self.interactive else '') +
                      f'{self.label}: steps {self.start_step}-{self.total} in '
                      f'{_duration(elapsed)}\n')
    self.stream.flush()
