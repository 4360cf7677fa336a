"""Faulty and malicious sites for simulations: a Flower mod around the real ClientApp.

``python -m tests.integration.faulty RUN.yaml RUN_DIR FAULTS [--resume]`` runs
``fedtune.simulations.driver.simulate`` with the mod; ``FAULTS`` maps partition ids
to what that site does to its (real, trained) reply, e.g. ``0:nan,1:shape,2:norm``:

- ``nan``: one value of the first tensor becomes NaN;
- ``shape``: the first tensor loses a row;
- ``norm``: the update is multiplied by 1e4;
- ``error``: the site answers with an error instead (a failed site);
- ``scale``: a poisoned update, ``global - 20 * (update - global)``;
- ``slow``: the site sleeps 60 s before it answers.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedtune.common import config, records
from fedtune.simulations.driver import simulate


def parse(spec: str) -> dict[int, str]:
    return {int(k): v for k, v in (p.split(":") for p in spec.split(",") if p)}


def make_mod(faults: dict[int, str]):  # noqa: ANN201 - a Flower mod
    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        kind = faults.get(int(context.node_config.get("partition-id", -1)))
        if msg.metadata.message_type != "train" or kind is None:
            return call_next(msg, context)
        if kind == "error":
            raise RuntimeError("faulty site")
        if kind == "slow":
            time.sleep(60)
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        base = {k: v.numpy() for k, v in msg.content[records.ARRAYS].items()}
        got = {k: np.array(v.numpy()) for k, v in
               reply.content[records.ARRAYS].items()}
        first = sorted(got)[0]
        if kind == "nan":
            got[first].flat[0] = np.nan
        elif kind == "shape":
            got[first] = got[first][:-1]
        elif kind == "norm":
            got = {k: v * 1e4 for k, v in got.items()}
        elif kind == "scale":
            got = {k: base[k] - 20.0 * (v - base[k]) for k, v in got.items()}
        reply.content[records.ARRAYS] = ArrayRecord(
            {k: Array(np.ascontiguousarray(v)) for k, v in got.items()})
        return reply

    return mod


def main(argv: list[str]) -> int:
    cfg_path, run_dir, spec = argv[:3]
    resume = "--resume" in argv
    cfg = config.load(Path(run_dir) / "config.yaml" if resume else cfg_path)
    simulate(cfg, run_dir=Path(run_dir), resume=resume,
             client_mods=[make_mod(parse(spec))])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
