"""What a user sees of a run: one-line errors, progress bars, log set-up.

Every CLI's `main` goes through `run_cli`: a `UserError` (a bad config value, a missing shard folder, a
checkpoint that does not fit the model, ...) is one line on stderr and exit status 2, printed once even
under `accelerate launch` with several processes; anything else keeps its traceback, because it is a bug.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable

EXIT_USER_ERROR = 2
USER_ERROR_GRACE_S = 5.0  # how long ranks > 0 wait before exiting on a user error


class UserError(Exception):
    """A problem with what the user gave (config, paths, files, options): reported as one line, exit 2.
    The message names the thing and, where there is one, what to do."""


def process_rank() -> int:
    """This process's global rank as the launcher set it (torchrun/accelerate: RANK; SLURM's srun:
    SLURM_PROCID), 0 when not launched as one of several processes."""
    for var in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def run_cli(prog: str, main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a CLI's main: UserError -> `prog: error: message` on stderr (rank 0 only), exit 2.

    As one of several processes (a launcher's WORLD_SIZE > 1) the exit code, once decided, is kept: when
    one rank exits first the launcher sends SIGTERM to the others, and at interpreter shutdown Python puts
    back the default action of the signals it handles, which would turn a decided 75 (checkpoint saved)
    or 2 (user error) into a kill. Every rank meets the same user error and rank 0 alone reports it, so
    the others wait a moment: a launcher that sees them fail first would stop rank 0 before it printed."""
    try:
        code = main(argv)
    except UserError as e:
        if process_rank() == 0:
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        code = EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        code = 130
    release_process_group()
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
        if code == EXIT_USER_ERROR and process_rank() > 0:
            time.sleep(USER_ERROR_GRACE_S)
    return code


def release_process_group() -> None:
    """Destroy a process group that an error path left open (a refusal raised after the Accelerator
    joined the ranks, before `Run.close` exists to end it). Left to interpreter shutdown, rank 0's store
    server thread can be torn down while another rank is still connected: "terminate called without an
    active exception", SIGABRT instead of the decided exit code (about 1 launch in 6 here)."""
    if "torch" not in sys.modules:  # the data tools never import torch
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class InputError(UserError, ValueError):
    """The input of a data-preparation tool (annotation file, label files, image source, options) is
    unusable: one clear message, exit code 2, nothing written."""


def progress_bar(enabled: bool, *fields: str):
    """A rich progress bar on stderr (description, bar, done/total, `fields` as extra text columns,
    elapsed, remaining); disabled when `enabled` is false or stderr is not a terminal (log files and
    SLURM output get the periodic log lines instead)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *(TextColumn(f) for f in fields),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not (enabled and sys.stderr.isatty()),
    )


def plain_formatter(rank: int = 0) -> logging.Formatter:
    """The plain log line of every non-terminal handler (SLURM output files, train.log)."""
    return logging.Formatter(f"%(asctime)s %(levelname)s [rank {rank}] %(message)s", "%H:%M:%S")


def setup_logging(main_process: bool, rank: int = 0) -> None:
    """Main process: rich on a terminal, plain lines otherwise (SLURM output files; train.log is added by
    monitor.DeferredLogFile once the run folder may be written).
    Other ranks: warnings only, tagged with their rank."""
    handlers: list[logging.Handler] = []
    plain = plain_formatter(rank)
    if main_process and sys.stderr.isatty():
        from rich.logging import RichHandler

        handlers.append(RichHandler(show_path=False))
    else:
        handlers.append(logging.StreamHandler(sys.stderr))
        handlers[-1].setFormatter(plain)
    logging.basicConfig(
        level=logging.INFO if main_process else logging.WARNING, handlers=handlers, force=True
    )
