"""What every entry point shares: error reporting, config preparation, instantiation of lists, timings.

Run folders and records are :mod:`experiments.runs`.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from hydra.errors import (
    ConfigCompositionException,
    InstantiationException,
    MissingConfigException,
    OverrideParseException,
)
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from experiments.runs import pin_references
from gating.errors import UserError

log = logging.getLogger(__name__)


def user_facing(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Run ``task`` on the prepared config; a mistake the user can fix ends with one line on stderr and
    exit status 2.

    The config is prepared first (:func:`experiments.runs.pin_references`: renamed targets upgraded,
    run references pinned to the run or checkpoint they stand for). A wandb run is closed whatever
    happens, so a crashed sweep job does not hang the next one.
    """

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> Any:
        try:
            return task(pin_references(cfg))
        except (UserError, InstantiationException, FileNotFoundError) as e:
            msg = explain(e)
            if msg is None:
                raise
            log.error(msg)
            print(f"error: {msg}", file=sys.stderr, flush=True)
            sys.exit(2)
        finally:
            if "wandb" in sys.modules:
                import wandb

                if wandb.run is not None:
                    wandb.finish()

    return wrapped


def run_hydra(main: Callable[[], Any]) -> None:
    """Call a ``hydra.main`` entry point so that a config mistake ends in one line and exit status 2.

    Hydra prints composition errors over many lines (search path, hints); here the cause and the
    valid choices go on one line. ``HYDRA_FULL_ERROR=1`` still gives the full traceback.
    """
    user_wants_trace = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let Hydra's exceptions reach us instead of printing them
    try:
        main()
    except (MissingConfigException, ConfigCompositionException, OverrideParseException) as e:
        if user_wants_trace:
            raise
        print(f"error: {config_error_line(e)}", file=sys.stderr, flush=True)
        sys.exit(2)


def config_error_line(e: Exception) -> str:
    """One line for a Hydra composition error: what is wrong and what to do."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, MissingConfigException) and e.options:
        return f"{first}; choose one of: {', '.join(sorted(e.options))}"
    cause = e.__cause__
    if cause is not None and "not in struct" in str(cause):
        return (f"{first.rstrip('.')}: no such key ({str(cause).splitlines()[0]}); check its spelling with "
                f"--cfg job, or add a new key with a leading +")
    return " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())


def explain(e: BaseException) -> str | None:
    """The one-line message for a user error, or None where it is a bug (then the traceback shows)."""
    cause: BaseException | None = e
    while cause is not None:  # instantiate() wraps what the builder raised
        if isinstance(cause, UserError):
            return str(cause)
        cause = cause.__cause__
    if isinstance(e, InstantiationException):
        text = str(e).splitlines()[0] if str(e) else repr(e)
        if "unexpected keyword argument" in text or "missing" in text or "Error locating target" in text:
            return f"{text} — check the keys of that node in the config (python -m experiments.train --cfg job)"
        return None
    if isinstance(e, FileNotFoundError):
        return f"{e}; check the path in the config"
    return None


def extras(cfg: DictConfig) -> None:
    """Optional conveniences before a run: silence warnings, print the resolved config."""
    if cfg.get("extras", {}).get("ignore_warnings"):
        warnings.filterwarnings("ignore")
        logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    if cfg.get("extras", {}).get("print_config"):
        log.info("resolved config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))


def instantiate_list(node: DictConfig | None) -> list[Any]:
    """Instantiate every child of ``node`` that has a ``_target_`` (callbacks, loggers)."""
    if not node:
        return []
    return [instantiate(c) for c in node.values() if isinstance(c, DictConfig) and "_target_" in c]


def metrics_dict(*sources: dict[str, Any]) -> dict[str, float]:
    """Merge metric dicts into plain floats."""
    out: dict[str, float] = {}
    for src in sources:
        for k, v in src.items():
            out[k] = float(v.item() if isinstance(v, torch.Tensor) else v)
    return out


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Stopwatch:
    """Named wall-clock timings in seconds: ``with watch("fit_s"): ...``."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = round(time.perf_counter() - t0, 3)
