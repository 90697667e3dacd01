"""Train a policy with GRPO, DAPO, GTPO or GRPO-S.

    python -m gtpo_jax.train --config=configs/default.py
    python -m gtpo_jax.train --config=configs/default.py --config.loss.algorithm=grpo_s --config.train.run_dir=runs/s

`--config.X.Y=value` overrides any field; an unknown field is an error naming the closest one.
`--config.train.resume=auto` (the default) continues from the latest checkpoint in `run_dir`.
"""

from __future__ import annotations

import json

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.mark_flags_as_required(["config"])
# Multi-process runs outside TPU VMs (GPU nodes, CPU tests); TPU VM slices need none of these.
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's id, 0..num_processes-1.")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout_s", 100, "Fail when a peer process is silent this long.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; set fields with --config.section.field=value")
    import jax

    from gtpo_jax.config import from_config_dict
    from gtpo_jax.data.sources import DataError
    from gtpo_jax.errors import ConfigError
    from gtpo_jax.parallel.mesh import initialize
    from gtpo_jax.training.loop import Trainer

    initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _HEARTBEAT.value)
    if not flags.FLAGS["verbosity"].present:  # warnings only, unless the user asks (--verbosity=0: INFO)
        logging.set_verbosity(logging.WARNING)
    try:  # bad input: one line naming the field, file or record, no traceback
        cfg = from_config_dict(_CONFIG.value)
        trainer = Trainer(cfg)
    except (ConfigError, DataError) as e:
        raise SystemExit(f"error: {e}") from None
    try:
        result = trainer.run()
    finally:
        trainer.close()
    if jax.process_index() == 0:
        print(json.dumps({"result": result}))


if __name__ == "__main__":
    import sys

    from gtpo_jax.config import exit_on_unknown_overrides

    exit_on_unknown_overrides(sys.argv[1:])
    app.run(main)
