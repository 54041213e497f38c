"""Reading adapter checkpoint files (a JSON config, a safetensors or legacy .bin state dict) with clear errors.

Shared by the PEFT and AdapterHub loaders. Nothing here executes code from a file: a ``.bin``
is read only through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor


def read_json_object(file: str) -> dict:
    """The JSON object stored in ``file`` (UTF-8).

    Raises FileNotFoundError ("no <name> in <directory>") if ``file`` is not a file, and
    ValueError if it is not valid UTF-8 JSON ("not valid JSON") or holds something other
    than a JSON object ("expected a JSON object").
    """
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no {os.path.basename(file)} in {os.path.dirname(file)!r}")
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def read_state_dict(directory: str, safetensors_name: str, bin_name: str) -> tuple[str, dict[str, Tensor]]:
    """(the file read, its state dict on the CPU) from ``directory``: ``safetensors_name`` if it
    exists, else ``bin_name`` read with ``torch.load(weights_only=True)`` only.

    Raises FileNotFoundError if neither file exists, and ValueError for a truncated or
    corrupt safetensors file, a .bin that ``torch.load(weights_only=True)`` refuses or
    cannot read (a pickle that would run code, non-tensor objects, a damaged archive),
    or a .bin that does not hold a dict of str -> Tensor.
    """
    safe, binary = os.path.join(directory, safetensors_name), os.path.join(directory, bin_name)
    if os.path.isfile(safe):
        try:
            return safe, load_file(safe, device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"{safe}: not a valid safetensors file: truncated or corrupt safetensors data "
                             f"({type(e).__name__}: {e})") from e
    if os.path.isfile(binary):
        try:
            state = torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError (refused or corrupt pickle), EOFError, RuntimeError (bad zip), ...
            raise ValueError(f"{binary}: cannot be read with torch.load(weights_only=True) "
                             f"({type(e).__name__}: {e})") from e
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                  for k, v in state.items()):
            raise ValueError(f"{binary}: expected a dict of str -> Tensor")
        return binary, state
    raise FileNotFoundError(f"{directory!r} holds neither weights file: no {safetensors_name} or {bin_name}")
