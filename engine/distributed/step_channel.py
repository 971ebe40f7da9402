"""Rank 0 -> workers: each step's plan, then a stop.

Rank 0 alone schedules. Before every forward pass it broadcasts the step's
plan (a picklable object the model runner builds, see
`ModelRunner.execute_plan`) over the CPU group; every rank then runs the
same forward pass. `None` tells the workers to exit.
"""

from __future__ import annotations

from typing import Any, Optional

from engine.distributed.communication import broadcast_object


def send_step(plan: Any) -> None:
    broadcast_object(plan)


def send_stop() -> None:
    broadcast_object(None)


def receive_step() -> Optional[Any]:
    """The next plan from rank 0, or None once it stops the workers."""
    return broadcast_object()
