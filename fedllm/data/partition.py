"""Client partitions through flwr-datasets partitioners: IID, Dirichlet over a label, by task.

"task" deals whole families to clients round-robin (family j to client j mod n), so every
family lives on exactly one client; with fewer families than clients, the clients that share a
family split its examples. flwr-datasets has no partitioner that guarantees this coverage
(PathologicalPartitioner's deterministic mode gives client i families i..i+k-1 and leaves the
rest unused), so `TaskPartitioner` implements it on flwr-datasets' Partitioner base.
"""

from __future__ import annotations

import functools

from flwr_datasets.partitioner import Partitioner

from fedllm.config import DataConfig
from fedllm.errors import ConfigError, DataError


class TaskPartitioner(Partitioner):
    """Whole label values (task families) per partition, dealt round-robin over sorted labels."""

    def __init__(self, num_partitions: int, partition_by: str) -> None:
        super().__init__()
        self._num_partitions = num_partitions
        self._partition_by = partition_by

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    def load_partition(self, partition_id: int):
        if getattr(self, "_column_of", None) is not self.dataset:  # read the column once per dataset
            self._column_of, self._column = self.dataset, self.dataset.data.column(self._partition_by).to_pylist()
        column = self._column
        labels = sorted(set(column))
        n = self._num_partitions
        if len(labels) >= n:
            mine = {label for j, label in enumerate(labels) if j % n == partition_id}
            return self.dataset.select([i for i, v in enumerate(column) if v in mine])
        family = partition_id % len(labels)
        sharers = [p for p in range(n) if p % len(labels) == family]
        rows = [i for i, v in enumerate(column) if v == labels[family]]
        return self.dataset.select(rows[sharers.index(partition_id)::len(sharers)])


def make_partitioner(cfg: DataConfig, num_partitions: int) -> Partitioner:
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if cfg.partition == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if cfg.partition == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="family",
            alpha=cfg.alpha,
            min_partition_size=1,
            self_balancing=True,
            seed=cfg.seed,
        )
    return TaskPartitioner(num_partitions=num_partitions, partition_by="family")


def partition(
    examples: list[dict[str, str]], cfg: DataConfig, num_partitions: int, partition_id: int
) -> list[dict[str, str]]:
    """The examples of client `partition_id` out of `num_partitions`.

    Raises:
        ConfigError: for a partition id outside 0..num_partitions-1.
        DataError: naming data.partition and the counts, when the examples cannot give this client
            any (more clients than examples, or a family shared by more clients than it has examples).
    """
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id: {partition_id} is outside 0..{num_partitions - 1}")
    if num_partitions == 1:
        return list(examples)
    labels = tuple(str(e.get("family", "")) for e in examples)
    rows = assignment(labels, cfg.partition, cfg.alpha, cfg.seed, num_partitions)[partition_id]
    mine = [examples[i] for i in rows]
    if not mine:
        raise DataError(f"data.partition={cfg.partition}: partition {partition_id} of {num_partitions} gets none of "
                        f"the {len(examples)} training examples ({len(set(labels))} label values); use fewer clients, "
                        "more data or data.partition=iid")
    return mine


def too_few(n: int, scheme: str, alpha: float, num_partitions: int) -> str:
    """Why `n` examples cannot be split `num_partitions` ways under `scheme` ('' when they can):
    every scheme needs one example a client, and flwr-datasets' Dirichlet partitioner more
    examples than clients."""
    need = num_partitions + 1 if scheme == "dirichlet" else num_partitions
    if n >= need:
        return ""
    fits = max(n - (need - num_partitions), 1)
    return (f"data: {n} training examples cannot give {num_partitions} clients one each (data.partition={scheme} "
            f"needs at least {need}); use at most {fits} clients (--num-clients), or more data (data.source, "
            "data.train-per-family)")


@functools.lru_cache(maxsize=4)
def assignment(labels: tuple[str, ...], scheme: str, alpha: float, seed: int,
               num_partitions: int) -> tuple[tuple[int, ...], ...]:
    """Every partition's example indices, computed once per process for a dataset's labels
    (what the partitioners read) and the partitioning: a client of 1000 builds the split once,
    not once per partition it asks for.

    Raises:
        DataError: naming the data keys, where the examples are too few for the split (the
            partitioners would index past the data, or give up after their draws).
    """
    from datasets import Dataset

    if why := too_few(len(labels), scheme, alpha, num_partitions):
        raise DataError(why)
    cfg = DataConfig(partition=scheme, alpha=alpha, seed=seed)
    partitioner = make_partitioner(cfg, num_partitions)
    partitioner.dataset = Dataset.from_dict({"family": list(labels), "_row": list(range(len(labels)))})
    try:
        return tuple(tuple(partitioner.load_partition(p)["_row"]) for p in range(num_partitions))
    except (ValueError, IndexError) as err:  # Dirichlet gives up after 10 draws that leave a client empty
        raise DataError(f"data.partition={scheme}: cannot split {len(labels)} training examples {num_partitions} "
                        f"ways (data.alpha={alpha}): {err}; use fewer clients, a larger data.alpha, more data or "
                        "data.partition=iid") from None
