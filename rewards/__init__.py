"""Reward plugins for dualrl.

A reward sees a batch (images, masks, references, generated captions) and returns one score per caption.
The EMA mask-IoU reward is computed by `dualrl.workers.reward.RewardWorker`, which owns the EMA model; the
plugin registry (METEOR, LLM judge, user plugins) is the next piece of work on the tracker.
"""
