"""Fault isolation: a request whose processing raises fails alone; the batch goes on.

A step computes a whole batch, so an error raised for one request's sake (its
sampling parameters break the sampler, its tokens break the detokenizer) would
fail every request in the batch. `execute_isolating` re-runs a failed forward
+ sample one request at a time: requests that fail alone are reported with
their error, the others get their tokens. Re-running is safe: nothing was
committed (computed-token counts advance only after the step), the block copies
are made once more before any forward, and each request rewrites the same KV
slots from the same inputs. An error that is not any single request's (the
block copies fail) is raised as before.

The engine drops the failed requests and ends its step with a
`RequestFailedError`, which carries the step's outputs of the others; a caller
that does not handle it stops as it did when a step raised.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

from engine.model_runner import ModelRunnerOutput
from engine.outputs import RequestOutput
from engine.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)

#: runs one scheduler output through the model runner
ExecuteModel = Callable[[SchedulerOutput], ModelRunnerOutput]


class RequestFailedError(RuntimeError):
    """Requests failed in a step and were dropped; the others advanced.

    `failures`: request_id -> the error it raised; `outputs`: the step's outputs
    of the requests that did not fail.
    """

    def __init__(self, failures: dict[str, Exception], outputs: list[RequestOutput]):
        details = "; ".join(f"{rid}: {type(err).__name__}: {err}"
                            for rid, err in failures.items())
        super().__init__(f"{len(failures)} request(s) failed: {details}")
        self.failures = failures
        self.outputs = outputs


def execute_isolating(execute: ExecuteModel, scheduler_output: SchedulerOutput
                      ) -> tuple[ModelRunnerOutput, dict[str, Exception]]:
    """`execute(scheduler_output)`; if that raises, each scheduled request alone.

    Returns the merged output of the requests that ran and request_id -> error
    of those that failed on their own.
    """
    try:
        return execute(scheduler_output), {}
    except Exception as batch_error:
        requests = scheduler_output.scheduled_requests
        if not requests:
            raise
        logger.warning("a step of %d requests failed (%s: %s); re-running them one by one",
                       len(requests), type(batch_error).__name__, batch_error)
        try:
            execute(SchedulerOutput(block_copies=scheduler_output.block_copies))
        except Exception:
            raise batch_error from None
    merged, failures = ModelRunnerOutput(), {}
    for request in requests:
        request_id = request.request_id
        num_tokens = scheduler_output.num_scheduled_tokens[request_id]
        single = SchedulerOutput(
            scheduled_requests=[request], num_scheduled_tokens={request_id: num_tokens},
            decode_steps=num_tokens if scheduler_output.decode_steps > 1 else 1)
        try:
            part = execute(single)
        except Exception as err:
            logger.error("request %s failed: %s: %s", request_id, type(err).__name__, err)
            failures[request_id] = err
            continue
        for output_field in dataclasses.fields(ModelRunnerOutput):
            getattr(merged, output_field.name).update(getattr(part, output_field.name))
    return merged, failures
