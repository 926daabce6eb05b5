"""Orbax checkpoints of (train state, data iterator position), saved asynchronously and atomically.

Orbax writes each step into a temporary folder and renames it when complete, so a run killed
mid-save leaves the previous checkpoint as the latest readable one. `latest_step` only ever
reports finished checkpoints.
"""

import pathlib

import jax
import orbax.checkpoint as ocp

from train.config import CheckpointConfig


class CheckpointMismatch(ValueError):
    """A checkpoint whose tree does not match the state the config builds."""


class Checkpointer:
    def __init__(self, run_dir: pathlib.Path, config: CheckpointConfig):
        options = ocp.CheckpointManagerOptions(max_to_keep=config.keep, create=True,
                                               enable_async_checkpointing=config.async_save)
        self.directory = (pathlib.Path(run_dir) / "checkpoints").absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, *, wait: bool = False) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=ocp.args.JsonSave(data_state)), force=True)
        if wait:
            self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state):
        """(state shaped like `abstract_state`, data iterator state) of checkpoint `step`."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                          data=ocp.args.JsonRestore()))
        except ValueError as e:
            raise CheckpointMismatch(f"checkpoint {self.directory / str(step)} does not fit this config (model or "
                                     f"optimizer changed since it was saved): {str(e).splitlines()[0][:200]}") from None
        return restored["state"], restored["data"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
