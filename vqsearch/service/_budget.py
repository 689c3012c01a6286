"""Memory all requests hold at once, as a budget: each request takes what it will hold (its
body, the arrays parsed from it, its answer) before it holds it, and gives it all back when it
ends. A request that would overrun the budget is answered 503 with Retry-After at once, instead
of growing the process until the kernel kills it; one that alone exceeds it is a 413.

Estimates, not measurements: they count the large buffers (a JSON body's Python objects, an
answer's arrays and its encoded text), which is where the memory goes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import HTTPException, Request

LEASE = "vqsearch.lease"  # the request's Lease, in the ASGI scope
JSON_OBJECT_BYTES = 8  # a JSON body's numbers as Python objects and lists, per body byte
JSON_NUMBER_BYTES = 22  # a float32 as JSON text, ", " included (ids take their digits)
JSON_HOLD = 4  # a JSON answer is held as arrays, Python objects, str and bytes at once


class Budget:
    """The process's pool. One event loop takes and gives: no lock needed."""

    def __init__(self, total: int) -> None:
        self.total, self.held = total, 0

    def lease(self) -> Lease:
        return Lease(self)


@dataclass
class Lease:
    budget: Budget
    held: int = field(default=0)

    def take(self, nbytes: int, what: str) -> None:
        b = self.budget
        if nbytes > b.total:
            raise HTTPException(
                413,
                f"{what} needs about {nbytes} bytes, more than VQSEARCH_MEMORY_BUDGET={b.total}",
            )
        if b.held + nbytes > b.total:
            raise HTTPException(
                503,
                f"{what} needs about {nbytes} bytes and other requests hold {b.held} of "
                f"VQSEARCH_MEMORY_BUDGET={b.total}; retry later",
                headers={"Retry-After": "1"},
            )
        b.held += nbytes
        self.held += nbytes

    def release(self) -> None:
        self.budget.held -= self.held
        self.held = 0


def take(request: Request, nbytes: int, what: str) -> None:
    """Take `nbytes` from the request's lease (none outside the admission middleware)."""
    lease = request.scope.get(LEASE)
    if lease is not None:
        lease.take(int(nbytes), what)
