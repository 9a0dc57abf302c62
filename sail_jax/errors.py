"""The errors a person can fix, and the stop a signal asks for.

``UserError`` covers config, data, paths, checkpoints and workdirs: the CLI prints its message
(what, where, the fix) and exits 2 without a traceback (``--debug`` shows it). Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user gave the run; the message names where it is and how to fix it."""


class Stopped(Exception):
    """A run stopped by SIGTERM/SIGINT after saving a checkpoint: rerunning the command resumes it."""

    def __init__(self, signum: int, step: int, checkpoint_dir: str):
        import signal

        self.signum, self.step = signum, step
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved in "
                         f"{checkpoint_dir}. Run the same command again to resume.")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention for "ended by this signal"
