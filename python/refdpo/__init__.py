"""refdpo's cache from Python: stage one's reference log-probs, read as TRL reads a dataset.

    import refdpo
    ds = refdpo.load_cache("data/cache", split="train_prefs")   # a datasets.Dataset
    fp = refdpo.read_fingerprint("data/cache", "train_prefs")   # what made it: model, tokenizer, ...
"""

from .cache import CacheError, cache_files, fingerprint_of, load_cache, read_fingerprint

__all__ = ["CacheError", "cache_files", "fingerprint_of", "load_cache", "read_fingerprint"]
