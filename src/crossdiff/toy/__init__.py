"""The embedded default pair: a tiny Gemma 2 base model and its chat-tuned copy, built offline.

    from crossdiff.toy import build_pair
    metrics = build_pair("results/models/toy", {"seed": 0})   # the `toy:` params section
    web, chat = crossdiff.toy.corpus.generate(seed=0, n_web=100, n_chat=100)
"""

from .build import ToyConfig, build_pair

__all__ = ["ToyConfig", "build_pair"]
