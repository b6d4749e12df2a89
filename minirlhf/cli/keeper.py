"""Saving a run at phase boundaries, and after a crash or a signal (`minirlhf train`).

Part of the run folder's machinery (`cli.run_folder`), above the checkpoints (`cli.checkpoint`).
`CheckpointKeeper` saves at phase boundaries, and after a crash or a signal saves the last
boundary if no weight has moved since; `stop_on_sigterm` makes SIGTERM take Ctrl-C's path, so a
job scheduler's stop keeps the phases already done. `stop_between_steps` does the same for
`minirlhf dpo`, whose steps are short: SIGTERM and Ctrl-C both wait for the step to end.
"""

import signal
import threading
from contextlib import contextmanager
from pathlib import Path

from minirlhf.cli.checkpoint import CheckpointError, save_checkpoint
from minirlhf.runtime import distributed


class CheckpointKeeper:
    """Saves the run at phase boundaries, and after a crash the last boundary it saw.

    Between boundaries the weights move (an optimiser step) while the random states run on,
    so the keeper remembers each boundary's random states and optimiser step count, and after a
    crash saves only when no optimiser step was taken since.
    """

    def __init__(self, trainer, out: Path, every: int, total_phases: int, extra: dict,
                 saved_phase: int | None):
        self.out, self.every, self.total_phases, self.extra = out, every, total_phases, extra
        self.saved_phase = saved_phase
        self.stop_signal: int | None = None  # a SIGTERM waiting for the phase to end
        self.mark_boundary(trainer)

    def mark_boundary(self, trainer):
        """Remember the trainer's state now, at a phase boundary."""
        self.phase, self.global_step = trainer.phase, trainer.global_step
        self.rng = trainer.streams.state_dict()

    def is_mid_update(self, trainer) -> bool:
        """Whether the trainer has moved past the last boundary (an optimiser step, a phase)."""
        return trainer.global_step != self.global_step or trainer.phase != self.phase

    def is_stop_asked(self) -> bool:
        """At a phase boundary: whether a SIGTERM arrived during the phase, in any process (all
        get the same answer, so all save this phase and stop together)."""
        distributed.wait_for_others(f"the end of phase {self.phase}")
        return distributed.any_process(self.stop_signal is not None)

    def stop(self):
        """Stop after the phase's save (SystemExit 143 for SIGTERM)."""
        raise SystemExit(128 + (self.stop_signal or signal.SIGTERM))

    def is_due(self, phase: int) -> bool:
        """Whether a checkpoint is due after `phase` phases (every `every`, and the last)."""
        return phase % self.every == 0 or phase == self.total_phases

    def save(self, trainer):
        state = trainer.state_dict(self.rng)  # every process: it gathers their random states
        if distributed.is_main():
            save_checkpoint(state, self.out, self.extra)
        self.saved_phase = trainer.phase

    def save_after_crash(self, trainer) -> str:
        """Save the last boundary if the weights still hold it; says what happened."""
        kept = (f"the checkpoint of phase {self.saved_phase} stands"
                if self.saved_phase is not None else "no checkpoint was saved")
        if self.is_mid_update(trainer):
            return f"[red]Stopped mid-update: {kept}."
        if self.stop_signal is not None and trainer.phase == self.saved_phase:  # `stop` saved it
            return f"[yellow]Stopped: saved phase {trainer.phase} to {self.out / 'checkpoint.pt'}."
        if distributed.get_world_size() > 1:  # saving gathers from processes that may be gone
            return f"[yellow]Stopped: {kept} (several processes save only at checkpoints)."
        if trainer.phase == 0 or trainer.phase == self.saved_phase:
            return f"[yellow]Stopped at phase {trainer.phase}: {kept}."
        try:
            self.save(trainer)
        except CheckpointError as error:
            return f"[red]Stopped, and could not save: {error}"
        return f"[yellow]Stopped: saved phase {trainer.phase} to {self.out / 'checkpoint.pt'}."


@contextmanager
def stop_on_sigterm(keeper: CheckpointKeeper, trainer):
    """While the block runs, SIGTERM (job schedulers, `docker stop`) stops the run as Ctrl-C
    does, raising SystemExit(143), so the completed phases are saved. Between updates it stops at
    once; during a learning phase it waits for the phase to end (`keeper.is_stop_asked`), so that
    phase is saved too. With several processes (torchrun sends each the signal) every process
    waits for the phase boundary, where they agree to save and stop together. A second SIGTERM
    stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        several = distributed.get_world_size() > 1  # a process alone cannot save
        if keeper.stop_signal is None and (several or keeper.is_mid_update(trainer)):
            keeper.stop_signal = signum
            return
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def stop_between_steps(signals=(signal.SIGTERM, signal.SIGINT)):
    """While the block runs, the first SIGTERM or Ctrl-C asks the run to stop after the step in
    progress (`minirlhf dpo`: `train_dpo(stop=...)` saves that step, then raises
    SystemExit(128 + signal)); a second one stops at once (KeyboardInterrupt). Yields `stop`:
    the signal number received, or None."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return

    def handler(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    previous = {signum: signal.signal(signum, handler) for signum in signals}
    try:
        yield lambda: received[0] if received else None
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
