"""Writing a checkpoint as safetensors shards while it is being produced, resumably.

The output is planned before anything is written: each *unit* (a decoder layer, or "other":
embeddings, final norm, LM head) has a known byte size, and consecutive units are grouped into
shards of at most `shard_bytes` (a unit bigger than that gets a shard of its own). Each unit is
spilled to a file of its own as it arrives; once a shard's last unit is in, its unit files are
concatenated into the shard (bytes copied in chunks) and renamed into place, so the writer holds
no tensors: memory stays one layer, independent of depth and of the shard size.

The work happens in a stable directory beside the output (`.<out>.partial/`), with
`progress.json` naming the recipe fingerprint and the shards already written: a killed run
started again with the same recipe keeps those shards and skips their units (`done`), a run
with another recipe starts afresh. `finish()` writes `model.safetensors.index.json`
(HF layout: `metadata.total_size`, `weight_map`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from ..outputs import check_output

INDEX = "model.safetensors.index.json"
PROGRESS = "progress.json"
SHARD_BYTES = 1 << 30  # 1 GiB


def merge_factors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A layer's tensors with each LRC's factors X.A, X.B replaced by the dense Ŵ = B·A (X.weight)."""
    out = {}
    for k, v in tensors.items():
        if k.endswith(".A"):
            module = k[:-2]
            out[f"{module}.weight"] = tensors[f"{module}.B"] @ v
        elif not k.endswith(".B"):
            out[k] = v
    return out


def partial_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}.partial")


def plan_shards(units: list[tuple[str, int]], shard_bytes: int = SHARD_BYTES) -> list[list[str]]:
    """Group consecutive (unit, bytes) into shards of at most `shard_bytes`."""
    shards: list[list[str]] = []
    size = 0
    for unit, nbytes in units:
        if shards and size + nbytes <= shard_bytes:
            shards[-1].append(unit)
            size += nbytes
        else:
            shards.append([unit])
            size = nbytes
    return shards


class ShardWriter:
    """A resumable output: a journal of small records, then shards written as their units arrive.

    `ShardWriter(out, fingerprint)` opens (or starts afresh) the partial directory; `plan(units)`
    fixes the shards (kept from an earlier run when the plan is the same); `add(unit, tensors)`."""

    def __init__(self, out: Path, fingerprint: str):
        self.out = Path(out)
        self.dir = partial_dir(self.out)
        state = self._read_state()
        if state is None or state.get("fingerprint") != fingerprint:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir(parents=True)
            state = {"fingerprint": fingerprint, "files": [], "written": {}, "extra": {}}
            self._write_state(state)
        self.state = state
        self.resumed = bool(state["written"] or state["extra"])
        self.shards: list[list[str]] = []
        self.files: list[str] = []
        self.shard_of: dict[str, int] = {}
        self._arrived: dict[int, set[str]] = {}

    def plan(self, units: list[tuple[str, int]], shard_bytes: int = SHARD_BYTES) -> None:
        self.shards = plan_shards(units, shard_bytes)
        n = len(self.shards)
        self.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.shard_of = {u: i for i, units_ in enumerate(self.shards) for u in units_}
        if self.state.get("files") != self.files or self.state.get("shards") != self.shards:
            for f in self.state["written"]:
                (self.dir / f).unlink(missing_ok=True)
            self.state.update(files=self.files, shards=self.shards, written={})
        self.written: dict[str, dict] = self.state["written"]  # file → {"units": [...], "tensors": {name: bytes}}
        for f in list(self.written):
            if not (self.dir / f).is_file():
                del self.written[f]
        self._write_state(self.state)

    @property
    def resumed_units(self) -> set[str]:
        return {u for rec in self.written.values() for u in rec["units"]}

    def done(self, unit: str) -> bool:
        return self.files[self.shard_of[unit]] in self.written

    def _read_state(self) -> Optional[dict]:
        try:
            return json.loads((self.dir / PROGRESS).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def _write_state(self, state: dict) -> None:
        tmp = self.dir / f".{PROGRESS}.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.dir / PROGRESS)

    def extra(self, key: str, value=None):
        """Small JSON records kept with the progress (allocation, per-layer reports): get, or set."""
        if value is not None:
            self.state["extra"][key] = value
            self._write_state(self.state)
        return self.state["extra"].get(key)

    def _unit_file(self, unit: str) -> Path:
        return self.dir / f".unit.{unit}.safetensors"

    def add(self, unit: str, tensors: dict[str, torch.Tensor]) -> None:
        """Spill the unit to a file of its own (nothing stays in memory); write its shard once complete."""
        i = self.shard_of[unit]
        if self.files[i] in self.written:
            return
        tmp = self.dir / f".unit.{unit}.tmp"
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self._unit_file(unit))
        self._arrived.setdefault(i, set()).add(unit)
        if self._arrived[i] == set(self.shards[i]):
            self._flush(i)

    def _flush(self, i: int) -> None:
        """Concatenate the shard's unit files into one safetensors file, copying bytes in chunks."""
        file = self.files[i]
        parts, header, offset = [], {}, 0
        for unit in self.shards[i]:
            path = self._unit_file(unit)
            with open(path, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                head = json.loads(fh.read(size))
            head.pop("__metadata__", None)
            for name, info in sorted(head.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                start, end = info["data_offsets"]
                header[name] = {"dtype": info["dtype"], "shape": info["shape"],
                                "data_offsets": [offset, offset + end - start]}
                parts.append((path, 8 + size + start, end - start))
                offset += end - start
        header["__metadata__"] = {"format": "pt"}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        tmp = self.dir / f".{file}.tmp"
        with open(tmp, "wb") as out:
            out.write(len(text).to_bytes(8, "little"))
            out.write(text)
            for path, start, n in parts:
                with open(path, "rb") as fh:
                    fh.seek(start)
                    while n > 0:
                        chunk = fh.read(min(n, 64 << 20))
                        out.write(chunk)
                        n -= len(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.dir / file)
        for unit in self.shards[i]:
            self._unit_file(unit).unlink(missing_ok=True)
        self.written[file] = {"units": self.shards[i],
                              "tensors": {k: v["data_offsets"][1] - v["data_offsets"][0]
                                          for k, v in header.items() if k != "__metadata__"}}
        self._write_state(self.state)

    def finish(self, fill=None, overwrite: bool = False) -> Path:
        """Write the index (and `fill(dir)`: config, tokenizer, welore.json), then move into place."""
        missing = [f for f in self.files if f not in self.written]
        if missing:
            raise RuntimeError(f"shards never completed: {missing[:3]} (units "
                               f"{[u for f in missing for u in self.shards[self.files.index(f)]][:5]})")
        weight_map = {k: f for f in self.files for k in self.written[f]["tensors"]}
        total = sum(n for f in self.files for n in self.written[f]["tensors"].values())
        (self.dir / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                  "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        if fill is not None:
            fill(self.dir)
        (self.dir / PROGRESS).unlink(missing_ok=True)
        check_output(self.out, overwrite)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.{os.getpid()}.old")
            os.replace(self.out, old)
            os.replace(self.dir, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.dir, self.out)
        return self.out
