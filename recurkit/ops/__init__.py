"""The op library: built-in recurrences with flash-linear-attention's call conventions.

Each op takes FLA's argument names and order plus ``backend=``; ``op.decl`` is its
declaration (usable with ``rk.compile``) and ``op.variants`` the declarations its options
switch to.
"""
from .delta import dplr_delta_rule, delta_rule, gated_delta_rule, gdn2, kda, kla
from .gated import gla, linear_attn, retention, simple_gla
from .vector import hgrn, min_gru
from .logic import group_sum, logic_layer
from .shift_add import shift_add

ALL = {f.__name__: f for f in (linear_attn, retention, simple_gla, gla, hgrn, min_gru,
                                delta_rule, gated_delta_rule, kda, gdn2, kla, dplr_delta_rule)}

# tiled declarations (not recurrences, so not in ALL)
TILED = {"logic_layer": logic_layer, "group_sum": group_sum, "shift_add": shift_add}

__all__ = [*ALL, "ALL", "TILED", "logic_layer", "group_sum", "shift_add"]
