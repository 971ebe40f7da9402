"""Rank 0 -> workers: each step's plan as two int64 tensors, then a stop.

Rank 0 alone schedules. Before every forward pass it broadcasts the step's
`StepPlan` (engine.step_inputs, built by `ModelRunner.execute_model`) and
every rank then runs the same pass. Nothing is pickled; a plan is

    header  [HEADER_LEN]  over the CPU group (gloo): kind, then the sizes of
                          the payload's parts (HEADER_FIELDS)
    payload [n]           over the device group (NCCL: GPU to GPU; gloo on CPUs):
        block copies src [C] | dst [C] | token_ids [T] | num_computed [S] |
        num_new [S] | samples [S] (0/1) | block_tables [S * W] (row-major) |
        decode_steps [S] (a multi-step decode only) | logits_rows[0] [R0] |
        logits_rows[1] [R1]

(S = 0: the plan has no forward pass.) The header travels on the host
because that is where a worker waits while the engine is idle: a blocking
socket read, with no GPU kernel spinning and no NCCL watchdog timing the
wait out. A STOP header ends a worker's loop; rank 0 and the workers then
meet once more (`stop_handshake`), each with its device idle, before they
tear the group down together.
"""

from __future__ import annotations

import datetime
import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from engine.distributed.parallel_state import get_tp_group
from engine.step_inputs import StepArrays, StepPlan

STOP, STEP = 0, 1
HEADER_FIELDS = ("kind", "num_block_copies", "num_tokens", "num_seqs", "block_table_width",
                 "multi_step", "num_logits_lists", "logits_rows_0", "logits_rows_1")
HEADER_LEN = len(HEADER_FIELDS)
#: the runner computes prompt-logprob rows and sampling rows, at most
MAX_LOGITS_LISTS = 2
#: how long a rank waits for the others at the stop handshake
STOP_HANDSHAKE_TIMEOUT = datetime.timedelta(seconds=10)


def encode_plan(plan: StepPlan) -> tuple[np.ndarray, np.ndarray]:
    """`(header [HEADER_LEN], payload [n])`, both int64, of `plan`."""
    if len(plan.logits_rows) > MAX_LOGITS_LISTS:
        raise ValueError(f"logits_rows: at most {MAX_LOGITS_LISTS} lists per step, "
                         f"got {len(plan.logits_rows)}")
    copies = np.asarray(plan.block_copies, np.int64).reshape(-1, 2)
    parts = [copies[:, 0], copies[:, 1]]
    num_tokens = num_seqs = width = multi_step = 0
    arrays = plan.arrays
    if arrays is not None:
        num_tokens = arrays.token_ids.shape[0]
        num_seqs, width = arrays.block_tables.shape
        parts += [arrays.token_ids, arrays.num_computed, arrays.num_new, arrays.samples,
                  arrays.block_tables.reshape(-1)]
        if arrays.decode_steps is not None:
            multi_step = 1
            parts.append(arrays.decode_steps)
    parts += plan.logits_rows
    lengths = [len(rows) for rows in plan.logits_rows]
    lengths += [0] * (MAX_LOGITS_LISTS - len(lengths))
    header = np.array([STEP, len(copies), num_tokens, num_seqs, width, multi_step,
                       len(plan.logits_rows), *lengths], np.int64)
    return header, np.concatenate(parts, dtype=np.int64)


def _fields(header: np.ndarray) -> dict[str, int]:
    return dict(zip(HEADER_FIELDS, header.tolist()))


def payload_size(header: np.ndarray) -> int:
    """Number of int64 in the payload that follows `header`."""
    f = _fields(header)
    return (2 * f["num_block_copies"] + f["num_tokens"]
            + f["num_seqs"] * (3 + f["block_table_width"] + f["multi_step"])
            + f["logits_rows_0"] + f["logits_rows_1"])


def decode_plan(header: np.ndarray, payload: np.ndarray) -> StepPlan:
    """The `StepPlan` that `encode_plan` turned into `header` and `payload`."""
    f = _fields(header)
    offset = 0

    def take(length: int) -> np.ndarray:
        nonlocal offset
        offset += length
        return payload[offset - length:offset]

    num_copies, num_seqs = f["num_block_copies"], f["num_seqs"]
    src, dst = take(num_copies), take(num_copies)
    plan = StepPlan(list(zip(src.tolist(), dst.tolist())))
    if num_seqs:
        token_ids, num_computed, num_new = (take(f["num_tokens"]), take(num_seqs),
                                            take(num_seqs))
        samples = take(num_seqs).astype(bool)
        block_tables = take(num_seqs * f["block_table_width"]).astype(np.int32).reshape(
            num_seqs, f["block_table_width"])
        decode_steps = take(num_seqs) if f["multi_step"] else None
        plan.arrays = StepArrays(token_ids, num_computed, num_new, block_tables, samples,
                                 decode_steps)
    plan.logits_rows = [take(f[f"logits_rows_{i}"]) for i in range(f["num_logits_lists"])]
    return plan


def send_step(plan: StepPlan) -> None:
    header, payload = encode_plan(plan)
    group = get_tp_group()
    dist.broadcast(torch.from_numpy(header), src=0, group=group.cpu_group)
    if payload.size:
        dist.broadcast(torch.from_numpy(payload).to(group.device), src=0,
                       group=group.device_group)


def send_stop() -> None:
    """Tell the workers to stop. A gloo send completes only once the receiver listens:
    raises RuntimeError if a worker is not listening within STOP_HANDSHAKE_TIMEOUT
    (stuck in a step rank 0 abandoned, or gone)."""
    header = np.zeros(HEADER_LEN, np.int64)
    header[0] = STOP
    work = dist.broadcast(torch.from_numpy(header), src=0, group=get_tp_group().cpu_group,
                          async_op=True)
    work.wait(timeout=STOP_HANDSHAKE_TIMEOUT)


def receive_step() -> Optional[StepPlan]:
    """The next plan from rank 0, or None once it stops the workers."""
    group = get_tp_group()
    header = torch.empty(HEADER_LEN, dtype=torch.int64)
    dist.broadcast(header, src=0, group=group.cpu_group)
    header = header.numpy()
    if header[0] == STOP:
        return None
    payload = torch.empty(payload_size(header), dtype=torch.int64, device=group.device)
    if payload.numel():
        dist.broadcast(payload, src=0, group=group.device_group)
    return decode_plan(header, payload.cpu().numpy())


def stop_handshake() -> None:
    """Every rank, after the stop: wait for this device's queued work, then meet the
    others (a gloo monitored barrier).

    Raises RuntimeError, within STOP_HANDSHAKE_TIMEOUT, on a rank whose device
    work does not finish (a collective of a step another rank abandoned: only
    an abort can end it) and on each rank that waited for a rank stuck or gone.
    """
    group = get_tp_group()
    _wait_device_idle(group.device)
    dist.monitored_barrier(group=group.cpu_group, timeout=STOP_HANDSHAKE_TIMEOUT,
                           wait_all_ranks=True)


def _wait_device_idle(device: torch.device) -> None:
    # Device collectives are asynchronous: a worker can be back waiting for
    # the next header while a collective it queued still waits for a peer.
    if device.type == "cpu":
        return
    stream = getattr(torch, device.type).current_stream(device)
    deadline = time.monotonic() + STOP_HANDSHAKE_TIMEOUT.total_seconds()
    while not stream.query():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{device}: work queued by an earlier step did not finish "
                               f"within {STOP_HANDSHAKE_TIMEOUT}")
        time.sleep(0.001)
