"""Numba pieces for running one compiled job on several threads (see ``cpu_threads``).

A job is an ``@njit`` function of one int64 array (``args``): buffer addresses and sizes, packed by
the caller, and a last slot that is the work counter (zero at the start of the call). Every thread
of the team calls the same job and takes work items with an atomic fetch-and-add on that counter, so the split adapts to a thread
that starts late or is interrupted (on the 2-core test machine this balanced load measured about
10% faster than fixed halves). Because the caller keeps ``args`` and every buffer alive for the whole
call, the addresses stay valid.

Only LLVM intrinsics are used (no ctypes function pointers), so the jobs can be cached by numba.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core.extending import intrinsic


@intrinsic
def address_to_pointer(typingctx, address):
    """int64 address -> void* (for ``numba.carray``)."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.voidptr))

    return types.voidptr(types.int64), codegen


@intrinsic
def fetch_add(typingctx, address, value):
    """Atomically add ``value`` to the int64 at ``address``; returns the previous value."""

    def codegen(context, builder, signature, args):
        pointer = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        return builder.atomic_rmw("add", pointer, args[1], "monotonic")

    return types.int64(types.int64, types.int64), codegen


@njit(nogil=True, inline="always")
def work_counter(args):
    """Address of the work counter: the last int64 of a job's argument array."""
    return args.ctypes.data + 8 * (args.size - 1)


@njit(nogil=True, inline="always")
def next_rows(counter, rows_per_item, count):
    """The next item's rows [r0, r1) of ``count``; r0 >= count when none is left."""
    r0 = fetch_add(counter, 1) * rows_per_item
    return r0, min(count, r0 + rows_per_item)


__all__ = ["address_to_pointer", "fetch_add", "next_rows", "work_counter"]
