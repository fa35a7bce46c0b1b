"""console.run_cli: the exit of every CLI."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from conftest import free_port

from modaseg.console import EXIT_USER_ERROR, UserError, run_cli


def refuse(argv):
    raise UserError("this run folder is in use by another training")


def interrupt(argv):
    raise KeyboardInterrupt


@pytest.mark.parametrize(("main", "code"), [(refuse, EXIT_USER_ERROR), (interrupt, 130)])
def test_an_error_raised_after_the_ranks_joined_releases_the_process_group(main, code, capsys):
    """A refusal raised once the Accelerator has joined the ranks (the busy run folder) used to leave
    the process group to interpreter shutdown, where rank 0 sometimes aborted (SIGABRT, 'terminate
    called without an active exception') instead of exiting 2: CI saw it under accelerate launch."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        assert run_cli("modaseg-train", main, []) == code
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert capsys.readouterr().err.startswith("modaseg-train: ")
