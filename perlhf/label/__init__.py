"""`perlhf label`: sample response pairs, collect human preferences in a web page, export reward-model pairs.

Kept import-light on purpose: the web server and the store need neither torch nor transformers; only
`perlhf.label.generate` loads a model.
"""

from perlhf.label.store import CHOICES, LabelStore, StoreError

__all__ = ["CHOICES", "LabelStore", "StoreError"]
