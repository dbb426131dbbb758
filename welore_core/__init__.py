"""welore_core: WeLore low-rank compression, evaluation and fine-tuning as a plain library.

It imports torch, transformers, safetensors and numpy only: never a web, database or queue
library. Long operations report progress through a callback they are given (see progress.py)
and stop when a `should_stop` callback says so.
"""

__version__ = "0.1.0"
