"""Orbax checkpoints of (train state, data iterator position), saved asynchronously and atomically.

Orbax writes each step into a temporary folder and renames it when complete, so a run killed
mid-save leaves the previous checkpoint as the latest readable one. `latest_step` only ever
reports finished checkpoints.
"""

import collections
import pathlib

import jax
import orbax.checkpoint as ocp

from hybrax.train.config import CheckpointConfig


class CheckpointMismatch(ValueError):
    """A checkpoint whose tree does not match the state the config builds."""


class Checkpointer:
    def __init__(self, run_dir: pathlib.Path, config: CheckpointConfig):
        options = ocp.CheckpointManagerOptions(max_to_keep=config.keep, create=True,
                                               enable_async_checkpointing=config.async_save)
        self.directory = (pathlib.Path(run_dir) / "checkpoints").absolute()
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"),
                                             item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, *, wait: bool = False) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=ocp.args.JsonSave(data_state)), force=True)
        if wait:
            self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state):
        """(state shaped like `abstract_state`, data iterator state) of checkpoint `step`."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)  # keeps given shardings
        self._check_fits(step, target)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                          data=ocp.args.JsonRestore()))
        except ValueError as e:
            raise CheckpointMismatch(f"checkpoint {self.directory / str(step)} does not fit this config (model or "
                                     f"optimizer changed since it was saved): {str(e).splitlines()[0][:200]}") from None
        return restored["state"], restored["data"]

    def _check_fits(self, step: int, target) -> None:
        """Compare the stored array shapes with the target's before orbax starts reading."""
        stored = self.manager.item_metadata(step)["state"]
        shape_of = lambda x: (tuple(x.shape), str(x.dtype))  # noqa: E731
        have = collections.Counter(shape_of(x) for x in jax.tree.leaves(stored))
        want = collections.Counter(shape_of(x) for x in jax.tree.leaves(target))
        if have != want:
            extra, missing = sorted(have - want), sorted(want - have)
            raise CheckpointMismatch(
                f"checkpoint {self.directory / str(step)} does not fit this config (model or optimizer changed since "
                f"it was saved): it stores {extra[:1] or 'no'} arrays (shape, dtype) that the config does not build, "
                f"and lacks {missing[:1] or 'none'}")

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
