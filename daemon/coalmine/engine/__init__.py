"""The pure decision engine. It never reads a clock and never does I/O (STYLE.md 1-2)."""

from coalmine.engine.core import Engine, Outcome
from coalmine.engine.lifecycle import TRANSITIONS, Event, RolloutPhase, transition
from coalmine.engine.model import Command, Decision, Deployment, Observation, Options
from coalmine.engine.state import RolloutState, RuleStatus, RuleTrack
from coalmine.engine.windows import inside_window

__all__ = [
    "TRANSITIONS",
    "Command",
    "Decision",
    "Deployment",
    "Engine",
    "Event",
    "Observation",
    "Options",
    "Outcome",
    "RolloutPhase",
    "RolloutState",
    "RuleStatus",
    "RuleTrack",
    "inside_window",
    "transition",
]
