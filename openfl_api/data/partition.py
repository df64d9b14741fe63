"""The :class:`Partition` wrapper: a checked, read-only split of a dataset among clients."""

from __future__ import annotations

import numbers
from os import PathLike
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Union, overload

import numpy as np
from torch.utils.data import Dataset, Subset

from openfl_api.data import report
from openfl_api.data._checks import _check_indices, _check_int
from openfl_api.data.functional import label_counts
from openfl_api.errors import ConfigurationError

__all__ = ["Partition"]


class Partition(Sequence[np.ndarray]):
    """Index arrays, one per client, that hold every sample index exactly once.

    Wrap what a partitioner returns to check it, report it, and cut a dataset with it:

    .. code-block:: python

       part = Partition(data.dirichlet(labels, num_clients=args.world_size - 1, alpha=0.5, seed=0))
       print(part.table(labels))
       loader = DataLoader(part.subset(train_set, client=args.rank - 1), shuffle=True)

    ``part[j]`` is client ``j``'s read-only ``int64`` index array; ``len(part)`` is the number of
    clients.
    """

    def __init__(self, indices: Iterable[Any], num_samples: Optional[int] = None) -> None:
        """Checks ``indices`` and keeps a read-only copy.

        Args:
            indices: one integer index array per client.
            num_samples: size of the dataset; defaults to the total of the parts' sizes.

        Raises:
            ConfigurationError: no client, an array that is not 1-D integers, or the arrays do not
                hold every index of ``range(num_samples)`` exactly once.
        """
        parts = list(indices)
        if not parts:
            raise ConfigurationError("a partition needs at least one client; got no index arrays")
        total = sum(np.asarray(part).size for part in parts)
        if num_samples is None:
            num_samples = total
        num_samples = _check_int("num_samples", num_samples, 1)
        arrays = _check_indices(parts, num_samples)
        seen = np.bincount(np.concatenate(arrays), minlength=num_samples)
        if total != num_samples or not np.all(seen == 1):
            missing = int(np.count_nonzero(seen == 0))
            repeated = int(np.count_nonzero(seen > 1))
            raise ConfigurationError(
                f"the index arrays must hold every index of range({num_samples}) exactly once; "
                f"{missing} indices are missing and {repeated} appear more than once (build them "
                f"with a partitioner of openfl_api.data, or pass the dataset's size as num_samples)"
            )
        self._indices = tuple(_frozen(array) for array in arrays)
        self._num_samples = num_samples

    @property
    def num_clients(self) -> int:
        """Number of clients (parts)."""
        return len(self._indices)

    @property
    def num_samples(self) -> int:
        """Number of samples of the partitioned dataset."""
        return self._num_samples

    @property
    def indices(self) -> List[np.ndarray]:
        """The clients' index arrays (a new list of the same read-only arrays)."""
        return list(self._indices)

    @property
    def sizes(self) -> np.ndarray:
        """Number of samples of each client, ``int64`` of shape ``(num_clients,)``."""
        return np.array([part.size for part in self._indices], dtype=np.int64)

    def owners(self) -> np.ndarray:
        """Returns the client of each sample, ``int64`` of shape ``(num_samples,)``."""
        owner = np.empty(self._num_samples, dtype=np.int64)
        for client, part in enumerate(self._indices):
            owner[part] = client
        return owner

    def label_counts(self, labels: Any, num_classes: Optional[int] = None) -> np.ndarray:
        """Returns each client's samples per label, ``int64`` of shape ``(num_clients, num_classes)``.

        See :func:`~openfl_api.data.label_counts`; ``labels`` must have one label per sample.
        """
        return label_counts(self._indices, self._check_labels(labels), num_classes)

    def subset(self, dataset: Dataset, client: int) -> Subset:
        """Returns client ``client``'s part of ``dataset`` as a :class:`torch.utils.data.Subset`.

        Raises:
            ConfigurationError: ``client`` is out of range, or ``dataset`` has a length other than
                :attr:`num_samples`.
        """
        if isinstance(client, bool) or not isinstance(client, numbers.Integral) or not 0 <= client < self.num_clients:
            raise ConfigurationError(
                f"client must be an int in range({self.num_clients}); got {client!r} (frontend "
                f"rank r usually takes client r - 1)"
            )
        self._check_length(dataset)
        return Subset(dataset, self._indices[int(client)].tolist())

    def subsets(self, dataset: Dataset) -> List[Subset]:
        """Returns every client's part of ``dataset``, in client order (see :meth:`subset`)."""
        self._check_length(dataset)
        return [Subset(dataset, part.tolist()) for part in self._indices]

    def table(self, labels: Any, num_classes: Optional[int] = None, class_names: Optional[Sequence[str]] = None) -> str:
        """Renders the per-client label table; see :func:`~openfl_api.data.label_table`."""
        return report.label_table(self._indices, self._check_labels(labels), num_classes, class_names)

    def plot(
        self,
        labels: Any,
        path: Union[str, PathLike],
        num_classes: Optional[int] = None,
        class_names: Optional[Sequence[str]] = None,
        **kwargs: Any,
    ) -> Path:
        """Writes the label-distribution PNG; see :func:`~openfl_api.data.plot_label_distribution`."""
        return report.plot_label_distribution(
            self._indices, self._check_labels(labels), path, num_classes, class_names, **kwargs
        )

    def __len__(self) -> int:
        return len(self._indices)

    @overload
    def __getitem__(self, client: int) -> np.ndarray: ...

    @overload
    def __getitem__(self, client: slice) -> List[np.ndarray]: ...

    def __getitem__(self, client: Union[int, slice]) -> Union[np.ndarray, List[np.ndarray]]:
        if isinstance(client, slice):
            return list(self._indices[client])
        return self._indices[client]

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self._indices)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Partition):
            return NotImplemented
        return self._num_samples == other._num_samples and len(self) == len(other) and all(
            np.array_equal(a, b) for a, b in zip(self._indices, other._indices)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        sizes = self.sizes
        return (
            f"Partition(num_clients={self.num_clients}, num_samples={self._num_samples}, "
            f"sizes min/median/max={sizes.min()}/{int(np.median(sizes))}/{sizes.max()})"
        )

    def _check_labels(self, labels: Any) -> Any:
        size = len(labels) if hasattr(labels, "__len__") else None
        if size is not None and size != self._num_samples:
            raise ConfigurationError(
                f"labels must have one label per sample, {self._num_samples}; got {size} (pass "
                f"the labels of the dataset this partition was built from)"
            )
        return labels

    def _check_length(self, dataset: Dataset) -> None:
        try:
            size = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            return
        if size != self._num_samples:
            raise ConfigurationError(
                f"the partition covers {self._num_samples} samples but the dataset has {size} "
                f"(cut the dataset whose labels were partitioned)"
            )


def _frozen(array: np.ndarray) -> np.ndarray:
    copy = np.array(array, dtype=np.int64)
    copy.setflags(write=False)
    return copy
