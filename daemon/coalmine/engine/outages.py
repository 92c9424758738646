"""One page per source outage: when several rules of one source are inconclusive at once (the
source is down, or answers nothing), one inconclusive page names them all.

The page goes out under the first rule's dedup key (``…/{rule}/inconclusive``); while it is
open, the other rules of that source do not page; a rule still inconclusive after that page
resolves pages on its own. Pure functions of the state, used by :mod:`coalmine.engine.core`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from coalmine.engine.judge import CompiledRule
from coalmine.engine.state import RolloutState


def outage_paged(sources: Mapping[str, str], s: RolloutState, rule: str) -> bool:
    """Whether another rule of ``rule``'s source has an inconclusive page open."""
    source = sources[rule]
    return any(
        name != rule
        and sources.get(name) == source
        and track.inconclusive_paged
        and track.inconclusive_since is not None
        for name, track in s.rules.items()
    )


def also_inconclusive(
    sources: Mapping[str, str], s: RolloutState, rule: str, active: Iterable[CompiledRule]
) -> list[str]:
    """The other gating rules of ``rule``'s source that are inconclusive too."""
    source = sources[rule]
    return [
        other.name
        for other in active
        if other.name != rule
        and other.gating
        and sources[other.name] == source
        and (track := s.rules.get(other.name)) is not None
        and track.inconclusive_since is not None
    ]
