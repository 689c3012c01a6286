"""`vqsearch tokenize`: every `.npy` in a directory of latents (and each array of an `.npz`)
becomes a file of the same name holding the nearest code of each vector, shape kept without
the channel axis, in the narrowest of int16 / int32 / int64 that holds the bank's ids.

`manifest.json` in the output directory names the bank and the version that made the codes
and each finished file; it is written after the file, so a file it names is whole, and a rerun
skips those (an interrupted run resumes). Codes come from the bank in a data dir (in this
process, or on a Ray cluster: `vqsearch.ray`) or from a server.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

MANIFEST = "manifest.json"
CHUNK = 1 << 16  # vectors per search: bounds the memory a file of any size takes


class TokenizeError(Exception):
    """The output directory holds codes of another bank, version or layout."""


class Coder(Protocol):
    """Nearest codes at one version of one bank."""

    version: str
    d: int
    max_id: int | None

    def __call__(self, z: np.ndarray) -> np.ndarray:
        """z (n, d) -> codes (n,) int64: the exact nearest code of each row."""
        ...

    def close(self) -> None: ...


class BankCoder:
    """The bank in `data_dir/banks/name`, opened read-only in this process."""

    def __init__(self, data_dir: Path, name: str) -> None:
        from vqsearch.index import Bank

        self.bank = Bank.open(Path(data_dir) / "banks" / name, writable=False)
        self.version, self.d = self.bank.version, self.bank.d
        ids = self.bank.ids()
        self.max_id = int(ids.max()) if len(ids) else None

    def __call__(self, z: np.ndarray) -> np.ndarray:
        return self.bank.search(z, 1)[1][:, 0]

    def close(self) -> None:
        pass


class ServerCoder:
    """A server's bank, every request pinned to the version it had when the run began."""

    def __init__(self, url: str, name: str, api_key: str | None = None) -> None:
        from vqsearch.client import Client

        self.client, self.name = Client(url, api_key=api_key), name
        try:
            info = self.client.get_bank(name)
        except BaseException:
            self.client.close()
            raise
        self.version, self.d, self.max_id = info.version, info.d, info.max_id

    def __call__(self, z: np.ndarray) -> np.ndarray:
        return self.client.nearest(self.name, z, version=self.version).codes

    def close(self) -> None:
        self.client.close()


def codes_dtype(max_id: int | None) -> np.dtype:
    for t in (np.int16, np.int32):
        if max_id is None or max_id <= np.iinfo(t).max:
            return np.dtype(t)
    return np.dtype(np.int64)


@dataclass(frozen=True)
class Plan:
    """What a run writes: `files` (paths relative to `src`) into `dst`, by `bank` at `version`."""

    src: Path
    dst: Path
    bank: str
    version: str
    dtype: str
    channel_axis: int | None
    files: tuple[str, ...]

    def header(self) -> dict[str, Any]:
        """What the manifest says made the codes; a rerun must match it."""
        return {
            "bank": self.bank,
            "version": self.version,
            "dtype": self.dtype,
            "channel_axis": self.channel_axis,
        }


def inputs(src: Path, dst: Path) -> list[str]:
    """Every .npy and .npz under src, relative to it, sorted; none under dst (an output
    directory inside the input one holds codes, not latents)."""
    found = [
        p
        for p in src.rglob("*")
        if p.suffix in (".npy", ".npz") and p.is_file() and not p.is_relative_to(dst)
    ]
    return sorted(str(p.relative_to(src)) for p in found)


def plan(src: Path, dst: Path, bank: str, coder: Coder, channel_axis: int | None) -> Plan:
    """The files still to do; TokenizeError when dst holds codes made another way."""
    dtype = codes_dtype(coder.max_id).name
    p = Plan(src, dst, bank, coder.version, dtype, channel_axis, ())
    want, done = p.header(), read_manifest(dst)
    if done is not None:
        have = {key: done.get(key) for key in want}
        if have != want:
            raise TokenizeError(
                f"{dst} holds codes made with {have}, not {want}: use another --output, "
                "or remove it to start again"
            )
    finished = set(done["files"]) if done else set()
    todo = [f for f in inputs(src, dst) if f not in finished or not (dst / f).is_file()]
    return replace(p, files=tuple(todo))


def read_manifest(dst: Path) -> dict[str, Any] | None:
    try:
        doc: dict[str, Any] = json.loads((dst / MANIFEST).read_bytes())
    except FileNotFoundError:
        return None
    return doc


def tokenize_file(p: Plan, rel: str, coder: Coder) -> dict[str, Any]:
    """Write the codes of src/rel to dst/rel (whole or not at all) -> its manifest entry:
    {"vectors": n, "shapes": {member: shape}} (member "" for an .npy)."""
    src, dst = p.src / rel, p.dst / rel
    if src.suffix == ".npz":
        with np.load(src, allow_pickle=False) as z:
            arrays: dict[str, Any] = {
                m: codes_of(z[m], coder, p.channel_axis, p.dtype) for m in z.files
            }
    else:
        arrays = {"": codes_of(np.load(src, mmap_mode="r"), coder, p.channel_axis, p.dtype)}
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = dst.with_name(dst.name + ".part")
    with open(part, "wb") as f:
        if src.suffix == ".npz":
            np.savez(f, **arrays)
        else:
            np.save(f, arrays[""], allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, dst)
    return {
        "vectors": sum(a.size for a in arrays.values()),
        "shapes": {m: list(a.shape) for m, a in arrays.items()},
    }


def codes_of(z: np.ndarray, coder: Coder, channel_axis: int | None, dtype: str) -> np.ndarray:
    """z (..., d), or with channel_axis c the d channels on axis c -> codes (z's shape less
    that axis), searched in slabs of the first axis of about CHUNK vectors: only a slab is
    ever copied out of a memory-mapped file."""
    if z.ndim == 0:
        raise ValueError("a 0-d array holds no vectors")
    axis = z.ndim - 1 if channel_axis is None else channel_axis
    if not -z.ndim <= axis < z.ndim:
        raise ValueError(f"channel axis {channel_axis} is out of range for shape {z.shape}")
    z = np.moveaxis(z, axis, -1)  # a view
    if z.shape[-1] != coder.d:
        raise ValueError(f"shape {z.shape}: {z.shape[-1]} channels, the bank has d = {coder.d}")
    if z.ndim == 1:
        return coder(np.ascontiguousarray(z[None]))[0].astype(dtype).reshape(())
    out = np.empty(z.shape[:-1], dtype)
    per = max(1, CHUNK // max(1, math.prod(z.shape[1:-1])))
    for i in range(0, len(z), per):
        slab = np.ascontiguousarray(z[i : i + per])
        out[i : i + per] = coder(slab.reshape(-1, coder.d)).reshape(slab.shape[:-1])
    return out


class Manifest:
    """The output's manifest, rewritten (atomically) as each file finishes."""

    def __init__(self, p: Plan) -> None:
        self.path = p.dst / MANIFEST
        old = read_manifest(p.dst)
        self.doc = p.header() | {"files": old["files"] if old else {}}
        p.dst.mkdir(parents=True, exist_ok=True)
        self._write()

    def finished(self, rel: str, entry: dict[str, Any]) -> None:
        self.doc["files"][rel] = entry
        self._write()

    def _write(self) -> None:
        from vqsearch.index import atomic_write

        atomic_write(self.path, json.dumps(self.doc, indent=1, sort_keys=True).encode())


Outcome = tuple[str, dict[str, Any] | None, str | None]  # (file, manifest entry, error)


def run_local(p: Plan, coder: Coder) -> Iterator[Outcome]:
    """Each file in this process; a file that fails is reported and the rest go on."""
    for rel in p.files:
        try:
            yield rel, tokenize_file(p, rel, coder), None
        except Exception as exc:
            yield rel, None, f"{type(exc).__name__}: {exc}"


def finish(p: Plan, outcomes: Iterable[Outcome], out: Callable[[str], None]) -> int:
    """Record each outcome in the manifest and show progress -> the exit status."""
    manifest, failed, vectors, t0 = Manifest(p), [], 0, time.monotonic()
    for i, (rel, entry, error) in enumerate(outcomes, 1):
        if entry is not None:
            manifest.finished(rel, entry)
            vectors += entry["vectors"]
        else:
            failed.append(f"{rel}: {error}")
        rate = vectors / max(time.monotonic() - t0, 1e-9)
        state = "ok" if error is None else "FAILED"
        out(f"[{i}/{len(p.files)}] {rel} {state} ({rate:,.0f} vectors/s)")
    for line in failed:
        out(f"failed: {line}")
    done = len(manifest.doc["files"])
    out(f"{done} files hold codes of {p.bank!r} at version {p.version} in {p.dst}")
    return 1 if failed else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bank", required=True, help="the codebook's bank name")
    parser.add_argument("--input", required=True, type=Path, help="directory of .npy / .npz")
    parser.add_argument("--output", required=True, type=Path, help="directory for the codes")
    parser.add_argument(
        "--channel-axis", type=int, default=None, help="the axis of the d channels (default: last)"
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--ray", metavar="HOST:PORT", help="run on a Ray cluster (Ray Data)")
    where.add_argument("--server", metavar="URL", help="ask a vqsearch server for the codes")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("VQSEARCH_DATA_DIR", "./data")),
        help="the data dir holding the bank (default: VQSEARCH_DATA_DIR or ./data)",
    )
    parser.add_argument("--api-key", default=os.environ.get("VQSEARCH_API_KEY"))


def run(args: argparse.Namespace) -> int:
    def out(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    from vqsearch.client import VQSearchClientError
    from vqsearch.index import VQSearchError

    coder: Coder | None = None
    try:
        src, dst = args.input.resolve(), args.output.resolve()  # as every node names them
        if not src.is_dir():
            raise TokenizeError(f"--input {src} is not a directory")
        if args.server is not None:
            coder = ServerCoder(args.server, args.bank, args.api_key)
        else:
            coder = BankCoder(args.data_dir, args.bank)
        p = plan(src, dst, args.bank, coder, args.channel_axis)
        out(f"{len(p.files)} files to tokenize with {p.bank!r} at version {p.version}")
        if args.ray is not None:
            from vqsearch.ray import tokenize_on_ray

            return finish(p, tokenize_on_ray(args.ray, p, args.data_dir), out)
        return finish(p, run_local(p, coder), out)
    except (TokenizeError, VQSearchError, VQSearchClientError, OSError) as exc:
        out(f"vqsearch tokenize: {type(exc).__name__}: {exc}")
        return 1
    finally:
        if coder is not None:
            coder.close()
