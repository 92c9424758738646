"""The rollout lifecycle as a transition table.

Rules this module keeps:

- A rollout is in exactly one :class:`RolloutPhase`; it moves only by an :class:`Event` that
  ``TRANSITIONS`` allows from that phase. Anything else is a bug and raises
  :class:`~coalmine.errors.IllegalTransition`; operator commands are checked against the table
  *before* they are applied, so a refused command is a ``warn`` decision, never an exception.
- ``STOOD_DOWN`` is where a rollout goes when the live deployment drifts from what coalmine last
  set: it keeps evaluating, never changes traffic, and leaves only on an operator's ``resume``
  (which adopts the live split) or ``rollback``.
"""

from __future__ import annotations

from enum import StrEnum

from coalmine.errors import IllegalTransition


class RolloutPhase(StrEnum):
    """Where a Worker script's rollout stands."""

    IDLE = "idle"  # one version serves 100%
    CANARY = "canary"  # a canary version at one of the policy's steps
    PAUSED = "paused"  # a canary an operator paused: no advancing, rollbacks still act
    STOOD_DOWN = "stood_down"  # the live deployment drifted; coalmine watches, does not act
    PROMOTED = "promoted"  # canary at 100%, post-promotion watch
    ROLLED_BACK = "rolled_back"  # stable back at 100%


class Event(StrEnum):
    """What moves a rollout between phases."""

    START = "start"  # a split appeared (adopted) or an operator started one
    ADVANCE = "advance"  # to the next step below 100
    PROMOTE = "promote"  # to 100%
    PAUSE = "pause"
    RESUME = "resume"
    DRIFT = "drift"
    ADOPT_SPLIT = "adopt_split"  # resume after drift, live is a split of the same versions
    ADOPT_PROMOTED = "adopt_promoted"  # resume after drift, live is the canary at 100%
    ROLLBACK = "rollback"
    FINISH = "finish"  # post-promotion watch over, or the rollout ended by hand
    REDEPLOY = "redeploy"  # one version at 100% that is not the one we knew


P, E = RolloutPhase, Event
_ACTIVE = (P.CANARY, P.PAUSED, P.PROMOTED)

TRANSITIONS: dict[tuple[RolloutPhase, Event], RolloutPhase] = {
    (P.IDLE, E.START): P.CANARY,
    (P.IDLE, E.REDEPLOY): P.IDLE,
    (P.ROLLED_BACK, E.START): P.CANARY,
    (P.ROLLED_BACK, E.REDEPLOY): P.IDLE,
    (P.CANARY, E.ADVANCE): P.CANARY,
    (P.CANARY, E.PROMOTE): P.PROMOTED,
    (P.CANARY, E.PAUSE): P.PAUSED,
    (P.PAUSED, E.RESUME): P.CANARY,
    **{(phase, E.ROLLBACK): P.ROLLED_BACK for phase in (*_ACTIVE, P.STOOD_DOWN)},
    **{(phase, E.DRIFT): P.STOOD_DOWN for phase in _ACTIVE},
    (P.STOOD_DOWN, E.ADOPT_SPLIT): P.CANARY,
    (P.STOOD_DOWN, E.ADOPT_PROMOTED): P.PROMOTED,
    (P.STOOD_DOWN, E.FINISH): P.IDLE,
    (P.PROMOTED, E.FINISH): P.IDLE,
}


def allowed(phase: RolloutPhase, event: Event) -> bool:
    """Whether ``event`` may happen in ``phase``."""
    return (phase, event) in TRANSITIONS


def transition(phase: RolloutPhase, event: Event) -> RolloutPhase:
    """The phase after ``event``; raise :class:`IllegalTransition` if the table forbids it."""
    try:
        return TRANSITIONS[(phase, event)]
    except KeyError:
        raise IllegalTransition(f"{event.value} is not allowed in phase {phase.value}") from None
