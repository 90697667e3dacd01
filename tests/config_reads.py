"""Which config fields a run reads, recorded by the tests (the production classes carry no hooks).

    reads = ConfigReads()
    cfg = reads.track(cfg)  # a copy whose sections record every field read
    with reads:
        Trainer(cfg).run()  # or anything else that takes a Config
    assert section_fields() - reads.fields == set()

Only reads inside `with reads:` count, so building and validating the copy counts for nothing.
A copy made from a tracked section (`dataclasses.replace(cfg.optim, ...)`) is tracked too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gtpo_jax.config import SECTIONS, Config


class ConfigReads:
    def __init__(self) -> None:
        self.fields: set[str] = set()  # "Section.field" names read
        self._on = False
        self._classes: dict[type, type] = {}

    def __enter__(self) -> ConfigReads:
        self._on = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._on = False

    def track(self, cfg: Config) -> Config:
        """`cfg` with every section (the loss section has its own tests) replaced by a recording copy."""
        was, self._on = self._on, False
        try:
            sections = {name: self._recording(getattr(cfg, name)) for name in SECTIONS}
            return dataclasses.replace(cfg, **sections)
        finally:
            self._on = was

    def _recording(self, section: Any) -> Any:
        cls = type(section)
        if cls not in self._classes:
            self._classes[cls] = type(cls.__name__, (cls,), {"__getattribute__": self._getter(cls.__name__)})
        return self._classes[cls](**vars(section))

    def _getter(self, section_name: str):
        reads = self

        def __getattribute__(obj: Any, name: str) -> Any:  # noqa: N807
            if reads._on and not name.startswith("_"):
                reads.fields.add(f"{section_name}.{name}")
            return object.__getattribute__(obj, name)

        return __getattribute__
