"""How a simulation splits ``data.source`` into sites, and each site's records
into training and validation: the partitioners (pure functions of sizes, labels or
values and a seed), a site's own records, the one validation split, and the
pre-flight check of a simulation's data. Training, the planner and the CLI's
checks all split here, so they agree record for record.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from fedtune.common.config import DataConfig, RunConfig
from fedtune.common.data import Record, label_ids, read_records, required_columns
from fedtune.common.errors import DataError


def iid_partition(n: int, *, num_parts: int, seed: int) -> list[list[int]]:
    """Shuffle ``range(n)`` and deal it into ``num_parts`` near-equal parts."""
    if n < num_parts:
        raise DataError(f"{n} records cannot fill {num_parts} sites; lower "
                        "federation.num_sites")
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    return [sorted(idx[i::num_parts]) for i in range(num_parts)]


def dirichlet_partition(labels: Sequence[int], *, num_parts: int, alpha: float,
                        seed: int, min_size: int = 2) -> list[list[int]]:
    """Label skew: each class is split over the parts by Dirichlet(alpha) shares.

    Redraws (up to 100 times) until every part has ``min_size`` records.
    """
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(num_parts)]
        for y in sorted(by_class):
            idx = rng.permutation(by_class[y]).tolist()
            shares = rng.dirichlet([alpha] * num_parts)
            cuts = (np.cumsum(shares)[:-1] * len(idx)).round().astype(int).tolist()
            for p, chunk in enumerate(np.split(np.array(idx, dtype=int), cuts)):
                parts[p].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise DataError(f"Dirichlet(alpha={alpha}) left a site with < {min_size} records "
                    "after 100 draws; raise data.dirichlet_alpha or lower num_sites")


def column_partition(values: Sequence[str], *, num_parts: int,
                     column: str = "the partition column") -> list[list[int]]:
    """Natural sites: whole groups of equal ``values`` go to one part.

    Groups are placed largest first on the part with the fewest records (ties by
    name), so the split is deterministic and every group stays on a single site.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, v in enumerate(values):
        groups[str(v)].append(i)
    if len(groups) < num_parts:
        raise DataError(f"{column} has only {len(groups)} distinct values to split "
                        f"into {num_parts} sites; set federation.num_sites="
                        f"{len(groups)} or use data.partition: iid or dirichlet")
    parts: list[list[int]] = [[] for _ in range(num_parts)]
    for _, idx in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        min(parts, key=len).extend(idx)
    return [sorted(p) for p in parts]


def partition(records: Sequence[Record], cfg: DataConfig, *, num_parts: int,
              seed: int, label_col_ids: Sequence[int] | None = None
              ) -> list[list[int]]:
    """Split records into ``num_parts`` sites as ``cfg.partition`` says."""
    if cfg.partition == "iid":
        return iid_partition(len(records), num_parts=num_parts, seed=seed)
    if cfg.partition == "dirichlet":
        if label_col_ids is None:
            raise DataError("dirichlet partitioning needs labels (classification) "
                            "or data.partition_column (causal LM)")
        return dirichlet_partition(label_col_ids, num_parts=num_parts,
                                   alpha=cfg.dirichlet_alpha, seed=seed)
    if cfg.partition_column not in records[0]:
        raise DataError(f"data.partition_column {cfg.partition_column!r} is not a "
                        f"column of the data; found {sorted(records[0])}")
    return column_partition([r[cfg.partition_column] for r in records],
                            num_parts=num_parts,
                            column=f"data.partition_column {cfg.partition_column!r}")


def partitions(records: Sequence[Record], cfg: DataConfig, *, task: str,
               num_parts: int, seed: int, source: str = "data") -> list[list[int]]:
    """Every simulated site's record indices into ``records`` (as
    :func:`site_records` splits them): compute once, then pass to each site."""
    recs = records[: cfg.max_records or None]
    ys = (label_ids(recs, column=cfg.label_column, labels=cfg.labels,
                    source=source) if task == "classification" else
          _column_ids(recs, cfg) if cfg.partition == "dirichlet" else None)
    return partition(recs, cfg, num_parts=num_parts, seed=seed, label_col_ids=ys)


def _column_ids(records: Sequence[Record], cfg: DataConfig) -> list[int]:
    """A causal LM's Dirichlet split skews over ``data.partition_column`` (its
    records carry no label): each record's value as an index of the sorted set."""
    if not records or cfg.partition_column not in records[0]:
        raise DataError(f"data.partition: dirichlet for a causal LM skews the sites "
                        f"over data.partition_column {cfg.partition_column!r}, which "
                        f"is not a column of the data; found "
                        f"{sorted(records[0]) if records else []}")
    values = sorted({str(r[cfg.partition_column]) for r in records})
    index = {v: i for i, v in enumerate(values)}
    return [index[str(r[cfg.partition_column])] for r in records]


def site_records(records: Sequence[Record], cfg: DataConfig, *, task: str,
                 part: int, num_parts: int, seed: int, source: str = "data",
                 parts: Sequence[Sequence[int]] | None = None
                 ) -> tuple[list[Record], str]:
    """A site's records and name: simulation partition ``part`` of ``num_parts``
    (``num_parts`` 0: all of them, a deployed site's own file), capped at
    ``cfg.max_samples_per_site``. ``parts``: :func:`partitions` of ``records``,
    computed once for all the sites (None: computed here)."""
    recs, name = records[: cfg.max_records or None], source
    if num_parts > 0:
        if parts is None:
            parts = partitions(records, cfg, task=task, num_parts=num_parts,
                               seed=seed, source=source)
        recs, name = [recs[i] for i in parts[part]], f"partition {part}/{num_parts}"
    else:
        recs = list(recs)
    if cfg.max_samples_per_site:
        recs = recs[: cfg.max_samples_per_site]
    return recs, name


def split_validation(indices: Sequence[int], *, fraction: float, seed: int
                     ) -> tuple[list[int], list[int]]:
    """Hold out ``fraction`` of a site's records (at least one when > 0)."""
    idx = list(indices)
    if fraction <= 0 or len(idx) < 4:
        return idx, []
    random.Random(seed).shuffle(idx)
    k = max(1, int(len(idx) * fraction))
    return sorted(idx[k:]), sorted(idx[:k])


def site_split(records: int, cfg: RunConfig, *, part: int
               ) -> tuple[list[int], list[int]]:
    """A site's (train, validation) indices into its ``records`` records: the one
    split every site makes and the planner predicts (``data.val_fraction``, seeded
    by ``train.seed`` + the site's partition number; 0 for a deployed site)."""
    return split_validation(range(records), fraction=cfg.data.val_fraction,
                            seed=cfg.train.seed + part)


def simulated_sites(cfg: RunConfig, records: Sequence[Record] | None = None
                    ) -> list[tuple[str, int]]:
    """(name, training records) of every simulated site, exactly as the sites will
    split ``data.source`` (``records``: the file, already read); a missing or
    malformed file raises the same DataError as training."""
    d, seed = cfg.data, cfg.train.seed
    recs = records if records is not None else read_records(
        d.source, required=required_columns(cfg.model.task, d))
    out, n = [], cfg.federation.num_sites
    parts = partitions(recs, d, task=cfg.model.task, num_parts=n, seed=seed,
                       source=d.source)  # once: per site it is O(sites x records)
    for part in range(n):
        site, name = site_records(recs, d, task=cfg.model.task, part=part,
                                  num_parts=n, seed=seed, source=d.source,
                                  parts=parts)
        train, _ = site_split(len(site), cfg, part=part)
        out.append((name, len(train)))
    return out


def check_simulation_data(cfg: RunConfig) -> list[str]:
    """Pre-flight of a simulation's data, before any engine starts: read
    ``data.source`` and split it exactly as the simulated sites will (the same
    readers and errors as training), and read the test set.

    Returns warnings (a site holding several values of the partition column).
    """
    d, task, sites = cfg.data, cfg.model.task, cfg.federation.num_sites
    required = required_columns(task, d)
    recs = read_records(d.source, required=required)
    out = []
    if d.partition == "column" and d.partition_column in recs[0]:
        values = len({str(r[d.partition_column]) for r in recs})
        if values > sites:
            out.append(f"data.partition_column {d.partition_column!r} has {values} "
                       f"values for {sites} sites: each site holds the records of "
                       f"several values (federation.num_sites={values} gives one "
                       "value per site)")
    for name, train in simulated_sites(cfg, recs):
        if not train:
            raise DataError(f"{d.source}: {name} gets no training records; lower "
                            "federation.num_sites or add records")
    if not d.test_source:
        out.append("data.test_source is not set: no held-out evaluation of the "
                   "global model (only the sites' own validation splits); set "
                   "data.test_source to held-out records in the format of "
                   "data.source")
    else:
        try:
            test = read_records(d.test_source, required=required,
                                key="data.test_source")
            if task == "classification":
                label_ids(test, column=d.label_column, labels=d.labels,
                          source=d.test_source)
        except DataError as err:
            raise DataError(f"{err} [this is data.test_source, the held-out test "
                            "set: point it at held-out records in the same format, "
                            "or set data.test_source='' to evaluate on the sites' "
                            "validation splits only]") from err
    if d.retention_source:
        try:
            read_records(d.retention_source, required=[d.retention_column])
        except DataError as err:
            raise DataError(f"{err} [this is data.retention_source, the general-text "
                            "retention set]") from err
    return out
