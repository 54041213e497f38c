"""Adapter-only ``transformers.Trainer`` checkpoints for models patched by adaptkern.

A plain ``Trainer`` saves a patched model with ``save_pretrained``, which writes the whole base
model (adaptkern's ``save_pretrained`` guard leaves the adapters out of it, see
``patching.BaseOnlySave``). :class:`AdapterTrainer` writes, like PEFT's Trainer path, only the
adapters: each checkpoint directory holds ``adapter_config.json`` and
``adapter_model.safetensors`` (:func:`save_peft` output, loadable by ``PeftModel.from_pretrained``
and ``load_peft``) beside the optimizer, scheduler and trainer state, and
``train(resume_from_checkpoint=...)`` and ``load_best_model_at_end`` read them back into the
live adapter Parameters. A callback cannot do this: the Trainer reads a checkpoint's weights
before any callback runs. Other trainers (TRL's ``SFTTrainer``, ...) get the same behaviour with
``class MyTrainer(AdapterCheckpointMixin, SFTTrainer)``.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from .patching import adapter_modules
from .peft import peft_tensors, save_peft
from .peft_config import read_weights


def _lora_adapters(model: torch.nn.Module) -> list[str]:
    """The model's adapter names (model order); ValueError if it holds none or a non-LoRA one."""
    names = {}
    for n, m in adapter_modules(model).items():
        for a, adapter in m.adapters.items():
            if adapter.kind not in ("lora", "dora"):
                raise ValueError(f"adapter {a!r} on {n!r} is a {adapter.kind} adapter; adapter-only checkpoints "
                                 f"are PEFT LoRA directories (use the plain Trainer for bottleneck adapters)")
            names.setdefault(a, None)
    if not names:
        raise ValueError(f"{type(model).__name__} holds no adaptkern adapter; add_lora or load_peft first")
    return list(names)


def adapter_dir(root: str, name: str) -> str:
    """Where the checkpoint of adapter ``name`` lives: ``root`` for "default", ``root/<name>`` otherwise
    (PEFT's layout)."""
    return root if name == "default" else os.path.join(root, name)


def save_adapters(model: torch.nn.Module, root: str) -> list[str]:
    """Write every adapter of ``model`` with :func:`save_peft` (PEFT's layout, see :func:`adapter_dir`).

    Semantics: the files PEFT's ``PeftModel.save_pretrained(root)`` would write for these adapters.
    Returns the adapter names. Raises ValueError if the model holds no adapter or a bottleneck one.
    """
    names = _lora_adapters(model)
    for name in names:
        save_peft(model, adapter_dir(root, name), adapter_name=name)
    return names


def load_adapters(model: torch.nn.Module, root: str) -> None:
    """Copy the adapters saved by :func:`save_adapters` in ``root`` into ``model``'s live Parameters.

    Semantics: for every adapter of ``model``, each tensor save_peft writes (lora_A, lora_B, saved
    modules, trained biases) takes the file's value in place (the Parameters stay the same objects,
    so an optimizer's state still matches them). Raises, before changing anything,
    FileNotFoundError for a missing directory or file and ValueError for keys or shapes that
    differ from the model's (naming them) or a non-finite value.
    """
    plan = []
    for name in _lora_adapters(model):
        path = adapter_dir(root, name)
        weights, live = read_weights(path), peft_tensors(model, name)
        if set(weights) != set(live):
            missing, unexpected = sorted(set(live) - set(weights)), sorted(set(weights) - set(live))
            raise ValueError(f"{path}: adapter {name!r} keys do not match the model: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")
        for key, t in weights.items():
            if t.shape != live[key].shape:
                raise ValueError(f"{path}: {key}: checkpoint has {tuple(t.shape)}, the model {tuple(live[key].shape)}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{path}: {key} contains NaN or Inf")
            plan.append((live[key], t))
    with torch.no_grad():
        for param, t in plan:
            param.copy_(t)


class AdapterCheckpointMixin:
    """Mix into a ``transformers.Trainer`` (subclass) to checkpoint a patched model's adapters only.

    Semantics: ``save_model`` and every checkpoint write :func:`save_adapters` output (plus the
    processing class and training arguments, as the Trainer does) instead of the full model;
    resuming and ``load_best_model_at_end`` copy the saved adapters into the live Parameters
    (:func:`load_adapters`). Everything else is the Trainer's.
    """

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_adapters(self.accelerator.unwrap_model(self.model), output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_adapters(self.model if model is None else model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_adapters(self.model, self.state.best_model_checkpoint)


class AdapterTrainer(AdapterCheckpointMixin, Trainer):
    """``transformers.Trainer`` with adapter-only checkpoints for a model patched by adaptkern
    (``add_lora`` / ``load_peft``); see :class:`AdapterCheckpointMixin`.

    Semantics: trains exactly as ``Trainer``; ``checkpoint-N/`` holds ``adapter_config.json`` and
    ``adapter_model.safetensors`` (other adapters in ``checkpoint-N/<name>/``) instead of
    ``model.safetensors``; ``train(resume_from_checkpoint=...)`` resumes from them.
    """
