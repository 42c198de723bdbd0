"""The first collective of a sharded call: every rank checks its own input, then one all-gather
of what each rank has (its options, its facts and its error, as JSON) lets every rank make the
same decision from the same table: go on together, or raise the same error everywhere, naming
the rank that failed or the ranks that disagree. No rank is left waiting in a later collective.
"""

from __future__ import annotations

import json

import torch

from .comm import Comm

BYTES = 4096  # per rank: the JSON of its options, facts and error (the error's text is cut to fit)
_KINDS = {"ValueError": ValueError, "TypeError": TypeError}


def agree(comm: Comm, options: dict, facts: dict, error: BaseException | None, what: str = "select_sharded") -> list:
    """Every rank's `facts` (a list in rank order), once no rank has an `error` and every rank has
    the same `options`. Otherwise the same exception on every rank: the failing rank's own (its
    type and text, prefixed with its rank), or a ValueError naming the ranks that disagree and on
    what. Options and facts must be JSON values (floats round-trip exactly)."""
    mine: dict = {"options": options, "facts": facts}
    if error is not None:
        mine["error"] = {"kind": type(error).__name__, "message": str(error)}
    table = [_decode(row) for row in comm.all_gather(_encode(mine), "the agreement")]
    failed = [r for r, d in enumerate(table) if "error" in d]
    if failed:
        r = failed[0]
        more = f" (ranks {failed} failed)" if len(failed) > 1 else ""
        kind = _KINDS.get(table[r]["error"]["kind"], RuntimeError)
        message = f"{what}: rank {r} of {comm.world}: {table[r]['error']['message']}{more}"
        if error is not None and r == comm.rank and type(error) in _KINDS.values():
            raise type(error)(message) from error
        raise kind(message)
    for key in options:
        values = [d["options"].get(key) for d in table]
        if any(v != values[0] for v in values):
            raise ValueError(
                f"{what}: the ranks disagree on {key}: {_by_value(key, values)}; every rank must pass the same {key}"
            )
    return [d["facts"] for d in table]


def _by_value(key: str, values: list) -> str:
    """'k=3 on rank 0, k=5 on ranks [1, 2]'."""
    groups: dict[str, list[int]] = {}
    for r, v in enumerate(values):
        groups.setdefault(json.dumps(v), []).append(r)
    parts = [
        f"{key}={json.loads(v)!r} on {'rank ' + str(rs[0]) if len(rs) == 1 else 'ranks ' + str(rs)}"
        for v, rs in groups.items()
    ]
    return ", ".join(parts)


def _encode(mine: dict) -> torch.Tensor:
    data = json.dumps(mine).encode()
    if len(data) > BYTES and "error" in mine:  # cut the error's text, never the options
        cut = len(data) - BYTES + 16
        mine["error"]["message"] = mine["error"]["message"][: max(0, len(mine["error"]["message"]) - cut)] + " [...]"
        data = json.dumps(mine).encode()
    if len(data) > BYTES:
        raise ValueError(f"the options of a sharded call take {len(data)} bytes, more than {BYTES}")
    return torch.frombuffer(bytearray(data.ljust(BYTES)), dtype=torch.uint8)


def _decode(row: torch.Tensor) -> dict:
    return json.loads(bytes(row.tolist()).decode())
