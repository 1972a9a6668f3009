"""The dataset interface: what ``data.name`` selects.

A dataset declares its settings (:attr:`Dataset.Options`, at ``data.<name>`` in params), the two
modalities it holds when they are fixed, and its source: an in-memory :class:`GeneratedSource` (the
synthetic set, npz files) or a :class:`~fedcmi.data.cache.RecordSource` decoded file by file into the
prepared cache. ``fedcmi prepare`` turns either into the prepared folder every other step reads, so nothing
after ``prepare`` knows which dataset it came from.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel

from fedcmi.config import Config
from fedcmi.data.base import DatasetSpec, Split
from fedcmi.data.cache import RecordSource


class GeneratedSource(Protocol):
    """A dataset held in memory whole: its splits and its spec."""

    def generate(self) -> dict[str, Split]: ...

    def spec(self) -> DatasetSpec: ...


class Dataset(ABC):
    """One dataset: its settings, its modalities, its source."""

    #: ``data.name`` of this dataset.
    name: ClassVar[str] = ""
    #: Its settings (a pydantic model) at ``data.<name>``; None when it has none.
    Options: ClassVar[type[BaseModel] | None] = None
    #: The two modalities it holds (``data.modalities`` must name them), or None when they are the user's.
    modalities: ClassVar[tuple[str, str] | None] = None

    @classmethod
    def check(cls, cfg: Config) -> None:
        """Raise ValueError (naming the field) when ``cfg`` cannot use this dataset."""
        mods = tuple(cfg.data.modalities)
        if cls.modalities is not None and mods != cls.modalities:
            raise ValueError(f"data.modalities must be {list(cls.modalities)} for data.name {cls.name!r}, "
                             f"got {list(mods)}")

    @classmethod
    def unused_settings(cls, cfg: Config) -> set[str]:
        """Dotted keys of its section that this run does not read (left out of what a run logs)."""
        return set()

    @classmethod
    @abstractmethod
    def source(cls, cfg: Config) -> GeneratedSource | RecordSource:
        """The source ``fedcmi prepare`` reads."""

    @classmethod
    def describe(cls, cfg: Config) -> dict[str, Any]:
        """What the prepared folder's meta.json records of where the data came from."""
        return {"path": str(cfg.data.path)}

    @classmethod
    def split_card(cls, cfg: Config) -> str:
        """The train/test split in words, for the data card (:func:`fedcmi.protocols.data_card`)."""
        return f"{cls.name}'s own train/test split"
