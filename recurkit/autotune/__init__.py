"""Autotuning: per-device search over verified candidates, with a persistent cache."""
from .cache import TuneCache, fingerprint
from .search import EFFORT, TuneResult, tune
from .space import Candidate, config_space, default_candidate, prune_static

__all__ = ["Candidate", "EFFORT", "TuneCache", "TuneResult", "config_space",
           "default_candidate", "fingerprint", "prune_static", "tune"]
