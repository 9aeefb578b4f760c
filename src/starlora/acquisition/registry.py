"""The one registry of strategies: a name -> a factory that builds the strategy.

A family module registers its strategies where it defines them::

    @register_strategy("pe", "me")
    def _uncertainty(name: str, options: StrategyOptions) -> QueryStrategy:
        return Uncertainty(name)

`starlora.acquisition` imports every module of the package, so a strategy is known to
`make_strategy` and to configs (``active_learning.strategy``) as soon as its module exists; a
strategy in your own code is known once its module is imported, as `register_task` does for
tasks.

A diversity mode (``active_learning.diversity``) wraps whatever strategy was built; its module
registers it with `register_diversity` (``kmeans``: `starlora.acquisition.diversity`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlora.acquisition.base import (
    LAMBDA_END,
    LAMBDA_SCHEDULE,
    LAMBDA_START,
    LambdaSchedule,
    QueryStrategy,
)
from starlora.errors import ConfigError


@dataclass(frozen=True)
class StrategyOptions:
    """What a factory may read: the ``active_learning`` settings that shape a strategy.

    n_queries: the run's number of queries (sizes the λ schedule).
    lambda_schedule, lambda_start, lambda_end: the λ schedule (`LambdaSchedule`).
    normalize: how a strategy that mixes a base and an adapter term scales them
        (``"minmax"`` or ``"raw_full"``, the authors' released code; see `Dynamic`).
    diversity: ``"none"``, or a registered diversity mode that wraps the strategy
        (``"kmeans"``); diversity_pool: its pre-filter, in query sizes (m).
    """

    n_queries: int = 9
    lambda_schedule: str = LAMBDA_SCHEDULE
    lambda_start: float = LAMBDA_START
    lambda_end: float = LAMBDA_END
    normalize: str = "minmax"
    diversity: str = "none"
    diversity_pool: float = 10

    def schedule(self) -> LambdaSchedule:
        """λ(t) over the run's queries (checked here, so only strategies that mix check it)."""
        return LambdaSchedule(self.lambda_schedule, self.lambda_start, self.lambda_end,
                              self.n_queries)


#: builds the strategy of a registered name from the options
Factory = Callable[[str, StrategyOptions], QueryStrategy]
_FACTORIES: dict[str, Factory] = {}
#: every registered name, in registration order (a live view: later registrations show)
STRATEGIES = _FACTORIES.keys()
#: wraps a built strategy in a diversity mode (``active_learning.diversity``)
Wrapper = Callable[[QueryStrategy, StrategyOptions], QueryStrategy]
_DIVERSITY: dict[str, Wrapper] = {}


def register_strategy(*names: str) -> Callable[[Factory], Factory]:
    """Decorator: `names` build their strategy with the decorated factory, a function
    ``(name, options: StrategyOptions) -> QueryStrategy`` (a class is a TypeError saying so).
    A name registered twice is a ValueError (two modules would otherwise silently disagree on
    it), unless by a factory of the same module and name: the same code run again, as a
    notebook cell is, replaces its earlier registration."""

    def register(factory: Factory) -> Factory:
        if isinstance(factory, type):
            raise TypeError(f"register_strategy decorates a factory, not the class "
                            f"{factory.__name__}: @register_strategy({names[0]!r}) def "
                            f"make(name, options): return {factory.__name__}(...)")
        for name in names:
            if name in _FACTORIES and _same_code(_FACTORIES[name]) != _same_code(factory):
                raise ValueError(f"strategy {name!r} is registered twice")
            _FACTORIES[name] = factory
        return factory

    return register


def _same_code(factory: Factory) -> tuple[str, str]:
    """What makes two factories the same code: their module and qualified name."""
    return (getattr(factory, "__module__", ""), getattr(factory, "__qualname__", repr(factory)))


def register_diversity(*names: str) -> Callable[[Wrapper], Wrapper]:
    """Decorator: ``active_learning.diversity`` `names` wrap a strategy with the decorated
    function ``(strategy, options) -> strategy``."""

    def register(wrapper: Wrapper) -> Wrapper:
        for name in names:
            if name == "none" or (name in _DIVERSITY and _DIVERSITY[name] is not wrapper):
                raise ValueError(f"diversity mode {name!r} is registered twice")
            _DIVERSITY[name] = wrapper
        return wrapper

    return register


def make_strategy(name: str, options: StrategyOptions | None = None, **fields: Any) -> QueryStrategy:
    """Build a registered strategy by name (see `STRATEGIES`) from `options` (default: the
    defaults) with any `StrategyOptions` field overridden by name (``n_queries=6``...),
    wrapped in its diversity mode unless that is ``"none"``. An unknown name or mode is a
    ConfigError that lists the known ones."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ConfigError(
            f"active_learning.strategy: unknown strategy {name!r}; known: {', '.join(STRATEGIES)}"
        )
    options = dataclasses.replace(options or StrategyOptions(), **fields)
    strategy = factory(name, options)
    if options.diversity == "none":
        return strategy
    wrap = _DIVERSITY.get(options.diversity)
    if wrap is None:
        raise ConfigError(f"active_learning.diversity: unknown mode {options.diversity!r}; "
                          f"known: none, {', '.join(_DIVERSITY)}")
    return wrap(strategy, options)
