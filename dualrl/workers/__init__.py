"""The three roles of a dual-loop step, as plain classes. The runtime decides where they live."""

from dualrl.workers.learner import Learner
from dualrl.workers.reward import RewardWorker
from dualrl.workers.rollout import RolloutWorker

__all__ = ["Learner", "RewardWorker", "RolloutWorker"]
