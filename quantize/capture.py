"""Running a module only as far as the tensor a calibration step needs: one way to stop a forward early.

A forward pre-hook on the module whose input is wanted records it and raises :class:`StopForward`; the
caller catches it around the forward. Everything after that module (the rest of a layer, the rest of the
model) is never computed.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch


class StopForward(Exception):
    """Raised by a capture hook once the wanted input is recorded."""


@contextmanager
def stop_at(target: torch.nn.Module, keep: Callable[[tuple, dict], None],
            stop: Callable[[], bool] = lambda: True) -> Iterator[None]:
    """Within the block, a call of ``target`` hands its ``(args, kwargs)`` to ``keep`` and, when ``stop()``
    says so, ends the forward that called it; the block itself swallows that stop."""
    def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        keep(args, kwargs)
        if stop():
            raise StopForward

    handle = target.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    except StopForward:
        pass
    finally:
        handle.remove()


def input_of(target: torch.nn.Module, run: Callable[[], Any]) -> torch.Tensor:
    """The first positional input ``target`` receives while ``run()`` (a forward that calls it) runs."""
    caught: list[torch.Tensor] = []
    with stop_at(target, lambda args, kwargs: caught.append(args[0] if args else kwargs["hidden_states"])):
        run()
    if not caught:
        raise RuntimeError(f"the forward never called {type(target).__name__}")
    return caught[0]
