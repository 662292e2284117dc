"""Reward plugins for dualrl.

A reward scores each generated caption of a step: a float, or `None` for "not applicable". The contract is
in `rewards.base` (`RewardInput`, `RewardOutput`), the loader and runner in `rewards.registry`. Built-ins:

- `mask_iou`  the EMA segmenter's mask' against the region's mask (`rewards.mask_iou`), run by the
              RewardWorker, which owns the EMA weights;
- `meteor`    nltk METEOR against the region's references with real WordNet (`rewards.meteor`,
              `rewards.wordnet`), scored in a process pool;
- `llm_judge` an OpenAI-compatible chat-completions endpoint rates the caption against the references
              (`rewards.llm_judge`);
- `length`, `repetition`  small shaping penalties (`rewards.shaping`).

`rewards.examples.attribute_recall` is an example of a user plugin loaded from its file path.
"""
