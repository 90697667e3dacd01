"""Which config fields a run reads, recorded by the tests (the production classes carry no hooks).

    reads = ConfigReads()
    cfg = reads.track(cfg)  # a copy whose sections record every field read
    with reads:
        Trainer(cfg).run()  # or anything else that takes a Config
    assert section_fields() - reads.fields == set()

Only reads inside `with reads:` made by code in the `gtpo_jax` package count, so building and validating the
copy, hashing it (a jit static argument), copying it with `dataclasses.replace` or validating the copy counts
for nothing.
A copy made from a tracked section (`dataclasses.replace(cfg.optim, ...)`) is tracked too.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

import gtpo_jax
from gtpo_jax.config import SECTIONS, Config

PACKAGE = os.path.dirname(gtpo_jax.__file__) + os.sep


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
            methods = {"__getattribute__": self._getter(cls.__name__)}
            if hasattr(cls, "__post_init__"):
                methods["__post_init__"] = self._quiet(cls.__post_init__)
            self._classes[cls] = type(cls.__name__, (cls,), methods)
        return self._classes[cls](**vars(section))

    def _quiet(self, method):
        """`method` with recording off: a section validating itself (a copy being built) reads every field."""
        reads = self

        def quiet(obj: Any) -> None:
            was, reads._on = reads._on, False
            try:
                method(obj)
            finally:
                reads._on = was

        return quiet

    def _getter(self, section_name: str):
        reads = self

        def __getattribute__(obj: Any, name: str) -> Any:  # noqa: N807
            # A read counts only when the package's own code makes it: hashing a section (a jit static
            # argument), comparing it or `dataclasses.replace` read every field, and prove nothing.
            if reads._on and not name.startswith("_") and sys._getframe(1).f_code.co_filename.startswith(PACKAGE):
                reads.fields.add(f"{section_name}.{name}")
            return object.__getattribute__(obj, name)

        return __getattribute__
