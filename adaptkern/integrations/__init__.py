"""Integrations: Hugging Face model patching, the PEFT and AdapterHub checkpoint formats, and
the serving engines' plug-ins (``adaptkern.integrations.vllm``, ``adaptkern.integrations.sglang``).

Nothing is imported eagerly: ``adaptkern.integrations.vllm`` needs neither transformers nor
peft, and the Hugging Face modules load on first use of one of their names.
"""

import importlib

_NAMES = {
    "Conv1DAdapter": "patching", "adapter_parameters": "patching", "add_bottleneck": "bottleneck_config",
    "add_lora": "patching", "patch": "patching", "set_adapter": "patching", "target_module_names": "patching",
    "load_adapterhub": "adapterhub", "save_adapterhub": "adapterhub_save", "adapterhub_config": "bottleneck_config",
    "from_peft_model": "peft", "load_peft": "peft", "save_peft": "peft", "peft_tensors": "peft",
    "fuse_peft": "peft_fuse", "unfuse_peft": "peft_fuse", "merge_and_unload": "patching",
    "disable_adapters": "patching", "delete_adapter": "patching", "trainable_summary": "patching",
    "AdapterTrainer": "trainer", "AdapterCheckpointMixin": "trainer", "save_adapters": "trainer",
    "load_adapters": "trainer",
}
__all__ = sorted(_NAMES)


def __dir__():
    return sorted(set(globals()) | set(__all__))


def __getattr__(name):
    if name in _NAMES:
        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'adaptkern.integrations' has no attribute {name!r}")
