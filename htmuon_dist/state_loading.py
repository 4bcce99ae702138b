"""What HTMuon adds to torch's ``load_state_dict``: the loaded state's shapes checked against
the parameters (naming the parameter), and the state that stays float32 whatever the
parameter's dtype (NorMuon's v, a method's state) kept float32, on the parameter's device."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .distributed.matrix_set import METHOD_STATE, NORMUON_STATE, local as _local

# State that stays float32 whatever the parameter's dtype (torch's load casts to it).
FLOAT32_STATE = (NORMUON_STATE, METHOD_STATE)
# State shaped like the parameter (checked at load_state_dict).
SHAPED_STATE = ("momentum_buffer", "exp_avg", "exp_avg_sq", METHOD_STATE)


def _saved_ids(state_dict: dict) -> list:
    return [i for g in state_dict["param_groups"] for i in g["params"]]


def check_shapes(state_dict: dict, params: Sequence[torch.Tensor], name_of: Callable[[int], str]) -> None:
    """Refuses a state tensor shaped unlike its parameter (torch's mapping: the j-th saved id
    is the j-th parameter over all groups); ``name_of(j)`` names parameter j."""
    for j, saved in enumerate(_saved_ids(state_dict)[: len(params)]):
        st = state_dict["state"].get(saved, {})
        p = params[j]
        for key in SHAPED_STATE:
            value = st.get(key)
            if isinstance(value, torch.Tensor) and value.numel() != p.numel():
                raise ValueError(
                    f"{name_of(j)}: the state {key!r} being loaded has shape {tuple(value.shape)}, "
                    f"the parameter {tuple(p.shape)}; was the checkpoint saved from another "
                    f"model or partitioning?"
                )


def float32_entries(state_dict: dict, params: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, str, torch.Tensor]]:
    """(parameter, key, saved value) of every float32-only state entry, taken before torch's
    load casts them to the parameter's dtype."""
    return [
        (params[j], key, st[key])
        for j, saved in enumerate(_saved_ids(state_dict)) if j < len(params)
        for st in [state_dict["state"].get(saved, {})] for key in FLOAT32_STATE if key in st
    ]


def restore_after_load(state: dict, kept: Sequence[tuple[torch.Tensor, str, torch.Tensor]]) -> None:
    """After torch's load: the float32 entries put back as float32 copies, and every ``"step"``
    counter moved to its parameter's device as float32 (the step adds a device flag to it)."""
    for p, key, value in kept:
        state[p][key] = value.detach().to(device=_local(p).device, dtype=torch.float32).clone()
    for p, st in state.items():
        if isinstance(st.get("step"), torch.Tensor):
            st["step"] = st["step"].to(device=_local(p).device, dtype=torch.float32)

