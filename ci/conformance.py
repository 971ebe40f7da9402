"""Run attention backends over the conformance matrix against the float64 oracle.

    python -m ci.conformance [--platform P] [--backend B] [--quick] [--device D]

For each case (`ci.matrix`) a fresh poisoned paged batch (`ci.batches`) is
built, the cached context is written into NaN-filled caches, the backend's
`forward` runs on the device (writing the new tokens' K/V itself), and
  - its output is compared with the CPU reference backend computing in
    float64 on float64 copies of the same inputs, and
  - its caches are compared, bit for bit (poison included), with caches
    that hold exactly the context and the new tokens.

Error metric ("rel err"): for each (token, head) row, max |out - ref| over
the head dimension divided by max |ref| of that row; the case's rel err is
the worst row. Normalizing per row keeps long-context rows (whose outputs
average many values and so are small) as strictly checked as short ones,
and avoids the blow-up of per-element relative error near zero. A NaN
anywhere fails. Tolerances by dtype are in `ci.matrix.TOLERANCES`. The
"ms" column is the whole case's wall time, the oracle's included.

Exit status: 0 all run cases passed, 1 some failed, 2 an explicitly asked
platform or backend could not be run at all.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

import platforms
from ci.batches import PagedBatch, build_batch, poisoned_caches
from ci.matrix import Case, cases as matrix_cases
from platforms.cpu.reference import ReferenceBackend, write_kv_nhd
from platforms.interface import AttentionBackend

PASS, FAIL, SKIP, ERROR = "pass", "FAIL", "skip", "ERROR"


@dataclass
class Result:
    case: Case
    backend: str
    status: str
    max_abs_err: float = float("nan")
    rel_err: float = float("nan")
    cache_ok: Optional[bool] = None
    detail: str = ""
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status in (FAIL, ERROR)


def run_cases(platform_name: str, backend_name: Optional[str], cases: Sequence[Case],
              device: Optional[str | torch.device] = None) -> list[Result]:
    """Run `cases` on a registered backend (device: the platform's by default)."""
    platform = platforms.get(platform_name)
    backend = platform.attention_backend(backend_name)
    return run_backend(backend, cases, torch.device(device or platform.torch_device()))


def run_backend(backend: AttentionBackend, cases: Sequence[Case],
                device: torch.device) -> list[Result]:
    """Run `cases` on any backend instance (also unregistered ones)."""
    return list(iter_results(backend, cases, device))


def iter_results(backend: AttentionBackend, cases: Sequence[Case],
                 device: torch.device) -> Iterator[Result]:
    for case in cases:
        started = time.perf_counter()
        result = check_case(backend, case, device)
        result.seconds = time.perf_counter() - started
        yield result


def check_case(backend: AttentionBackend, case: Case, device: torch.device) -> Result:
    """One case: the output against the oracle and the caches against expectation."""
    skip = _skip_reason(backend, case)
    if skip:
        return Result(case, backend.name, SKIP, detail=skip)
    batch = build_batch(case)
    try:
        out, key_cache, value_cache, expected_caches = _run_forward(backend, case, batch, device)
    except Exception as error:  # a crashing kernel is a failed case, not a dead run
        return Result(case, backend.name, ERROR, detail=f"{type(error).__name__}: {error}")
    expected = oracle_output(batch)
    if out.shape != expected.shape or out.dtype != case.dtype:
        return Result(case, backend.name, FAIL,
                      detail=f"out is {tuple(out.shape)} {out.dtype}, expected "
                             f"{tuple(expected.shape)} {case.dtype}")
    max_abs_err, rel_err = compare(out, expected)
    cache_ok = (_same_bits(key_cache, expected_caches[0])
                and _same_bits(value_cache, expected_caches[1]))
    passed = rel_err <= case.tolerance and cache_ok  # False for NaN
    detail = "" if cache_ok else "cache after forward differs from the written K/V"
    return Result(case, backend.name, PASS if passed else FAIL, max_abs_err, rel_err,
                  cache_ok, detail)


def _skip_reason(backend: AttentionBackend, case: Case) -> str:
    if case.dtype not in backend.supported_dtypes:
        return f"{case.dtype} not in supported_dtypes"
    sizes = backend.supported_head_sizes
    if sizes is not None and case.head_size not in sizes:
        return f"head_size {case.head_size} not in supported_head_sizes"
    block_sizes = backend.supported_block_sizes
    if block_sizes is not None and case.block_size not in block_sizes:
        return f"block_size {case.block_size} not in supported_block_sizes"
    return ""


def _run_forward(backend: AttentionBackend, case: Case, batch: PagedBatch,
                 device: torch.device):
    """Poisoned caches with the context, then `forward`; also the expected caches.

    The caches are built with the oracle's NHD writer when the backend uses
    the NHD layout (so its own `write_kv` is checked too); a backend with
    another layout is trusted to write its context with its `write_kv`, and
    its `forward` must then leave the caches as its `write_kv` would.
    """
    shape = tuple(backend.kv_cache_shape(batch.num_blocks, case.block_size,
                                         case.num_kv_heads, case.head_size))
    # Comparing shapes cannot tell NHD from HND when num_kv_heads == block_size.
    uses_nhd = type(backend).kv_cache_shape is AttentionBackend.kv_cache_shape
    writer = write_kv_nhd if uses_nhd else backend.write_kv
    key_cache, value_cache = poisoned_caches(batch, shape, case.dtype, device, writer,
                                             with_new_tokens=False)
    expected_caches = poisoned_caches(batch, shape, case.dtype, device, writer,
                                      with_new_tokens=True)
    hints = (batch.max_seq_len, batch.max_query_len) if case.batch.hints else (None, None)
    out = backend.forward(
        batch.query.to(device), batch.key.to(device), batch.value.to(device),
        key_cache, value_cache, batch.slot_mapping.to(device),
        batch.block_tables.to(device), batch.seq_lens.to(device),
        batch.query_start_loc.to(device), batch.scale,
        max_seq_len=hints[0], max_query_len=hints[1])
    return out.cpu(), key_cache.cpu(), value_cache.cpu(), tuple(c.cpu() for c in expected_caches)


def oracle_output(batch: PagedBatch) -> torch.Tensor:
    """The reference backend in float64 on float64 copies: out [tokens, heads, head]."""
    oracle = ReferenceBackend(compute_dtype=torch.float64)
    cpu = torch.device("cpu")
    nhd = (batch.num_blocks, batch.block_size, *batch.key.shape[1:])
    key_cache, value_cache = poisoned_caches(batch, nhd, torch.float64, cpu, write_kv_nhd,
                                             with_new_tokens=False)
    return oracle.forward(batch.query.double(), batch.key.double(), batch.value.double(),
                          key_cache, value_cache, batch.slot_mapping, batch.block_tables,
                          batch.seq_lens, batch.query_start_loc, batch.scale)


def compare(out: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max abs err, worst per-(token, head) normalized err); NaN if out has any NaN."""
    if out.numel() == 0:
        return 0.0, 0.0
    err = (out.double() - expected).abs()
    row_scale = expected.abs().amax(dim=-1).clamp_min(torch.finfo(torch.float64).tiny)
    rel = err.amax(dim=-1) / row_scale
    if not bool(torch.isfinite(err).all()):
        return float("nan"), float("nan")
    return float(err.max()), float(rel.max())


def _same_bits(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Bit-for-bit equal (so the NaN poison must be exactly where it was)."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return False
    as_int = _INT_OF_SIZE[actual.element_size()]
    return torch.equal(actual.view(as_int), expected.view(as_int))


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    device = torch.device(args.device) if args.device else None
    summary: list[str] = []
    any_failed = nothing_ran_for_asked = False
    for name in [args.platform] if args.platform else platforms.names():
        platform, run_device, reason = _load_platform(name, device)
        backend_names = _backend_names(platform, args.backend) if platform else []
        if platform and not backend_names:
            reason = f"no backend {args.backend!r} (known: {', '.join(platform.backend_names())})"
        if reason:
            summary.append(f"{name:<16} not run: {reason}")
            print(f"== {name}: not run: {reason}", flush=True)
            nothing_ran_for_asked |= bool(args.platform)
            continue
        for backend_name in backend_names:
            line, failed = _run_and_print(platform, backend_name, run_device, args.quick)
            summary.append(line)
            any_failed |= failed
    print("\n== summary ==")
    print("\n".join(summary))
    return 1 if any_failed else 2 if nothing_ran_for_asked else 0


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ci.conformance",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--platform", help="one platform (default: every registered one); "
                        f"known: {', '.join(platforms.names())}")
    parser.add_argument("--backend", help="one backend (default: every backend of the platform)")
    parser.add_argument("--quick", action="store_true",
                        help="the platform's quick subset instead of the full matrix")
    parser.add_argument("--device", help="torch device to run on (default: the platform's; "
                        "lets a kernel run where its platform is absent, e.g. Triton "
                        "in the interpreter on cpu)")
    args = parser.parse_args(argv)
    if args.platform and args.platform not in platforms.names():
        parser.error(f"unknown platform {args.platform!r}; known platforms: "
                     f"{', '.join(platforms.names())}")
    return args


def _load_platform(name: str, device: Optional[torch.device]):
    """(platform, device to run on, why it cannot run or "")."""
    try:
        platform = platforms.get(name)
        if device is not None:
            return platform, device, ""
        if platform.is_available():
            return platform, platform.torch_device(), ""
        return platform, None, (f"{platform.unavailable_reason()} "
                                "(--device runs its kernels elsewhere)")
    except Exception as error:  # a missing vendor module or stack must not stop the others
        return None, None, f"cannot load platform {name!r}: {type(error).__name__}: {error}"


def _backend_names(platform: platforms.Platform, asked: Optional[str]) -> list[str]:
    names = platform.backend_names()
    if asked is None:
        return names
    return [asked] if asked in names else []


def _run_and_print(platform: platforms.Platform, backend_name: str, device: torch.device,
                   quick: bool) -> tuple[str, bool]:
    """Run one backend's rows, printing each as it finishes; (summary line, failed)."""
    label = f"{platform.name}/{backend_name}"
    try:
        backend = platform.attention_backend(backend_name)
    except Exception as error:
        return f"{label:<16} ERROR: cannot build backend: {type(error).__name__}: {error}", True
    cases = matrix_cases(platform.name, quick=quick)
    print(f"\n== {label} on {device}: {len(cases)} cases ({'quick' if quick else 'full'})")
    print(_HEADER, flush=True)
    counts = {PASS: 0, FAIL: 0, ERROR: 0, SKIP: 0}
    for result in iter_results(backend, cases, device):
        counts[result.status] += 1
        print(format_row(result), flush=True)
    line = (f"{label:<16} {counts[PASS]} passed, {counts[FAIL] + counts[ERROR]} failed, "
            f"{counts[SKIP]} skipped")
    print(line)
    return line, counts[FAIL] + counts[ERROR] > 0


_HEADER = (f"{'case':<34} {'max abs err':>11} {'rel err':>9} {'tolerance':>9} "
           f"{'cache':>5} {'result':>6} {'ms':>7}")


def format_row(result: Result) -> str:
    cache = {None: "-", True: "ok", False: "BAD"}[result.cache_ok]
    row = (f"{result.case.id:<34} {result.max_abs_err:>11.2e} {result.rel_err:>9.2e} "
           f"{result.case.tolerance:>9.1e} {cache:>5} {result.status:>6} "
           f"{result.seconds * 1e3:>7.0f}")
    return f"{row}  {result.detail}" if result.detail else row


if __name__ == "__main__":
    sys.exit(main())
