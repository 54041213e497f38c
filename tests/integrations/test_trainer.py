"""A patched model under the transformers Trainer: adapter-only parameters, a few steps, CPU, no network."""

import pytest
import torch
from transformers import Trainer, TrainingArguments

from adaptkern.integrations import adapter_parameters, add_lora

from ..models import tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated and will be removed in v6:FutureWarning")


class Memorize(torch.utils.data.Dataset):
    """Four fixed random sequences; labels = input_ids (causal LM), so the loss can only fall by learning them."""

    def __init__(self, n=4, seq=8):
        self.ids = torch.randint(1, 64, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_trains_only_adapters(tmp_path):
    torch.manual_seed(0)
    model = add_lora(tiny_llama(), "default", r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    base = {n: p.detach().clone() for n, p in model.named_parameters() if ".adapters." not in n}
    adapters = {id(p): p.detach().clone() for p in adapter_parameters(model)}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6, learning_rate=2e-2,
                             lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=Memorize())
    trainer.train()
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == set(adapters)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.05, losses
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), f"base parameter {n} changed"
    assert all(not torch.equal(p.detach(), adapters[id(p)]) for p in adapter_parameters(model))


def _peft_trainer_run(pm, out_dir, steps=4):
    args = TrainingArguments(output_dir=str(out_dir), per_device_train_batch_size=4, max_steps=steps,
                             learning_rate=2e-2, lr_scheduler_type="constant", logging_steps=1, save_strategy="steps",
                             save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
                             seed=0)
    trainer = Trainer(model=pm, args=args, train_dataset=Memorize())
    trainer.train()
    return torch.tensor([log["loss"] for log in trainer.state.log_history if "loss" in log], dtype=torch.float64)


def test_fused_peft_model_under_trainer(tmp_path):
    """fuse_peft keeps the Trainer's PEFT path: adapter-only checkpoints (PEFT's own files), the loss curve of
    PEFT (float64 oracle, PEFT float32 as the eager error), and the fused kernels running throughout."""
    import copy

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from adaptkern.integrations.peft_fuse import fuse_peft
    from adaptkern.testing import assert_close

    from ..helpers import count_launches

    torch.manual_seed(0)
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 init_lora_weights=False))
    ref32, ref64 = copy.deepcopy(pm), copy.deepcopy(pm).double()
    fuse_peft(pm)
    with count_launches() as launches:
        fused = _peft_trainer_run(pm, tmp_path / "fused")
    assert launches["_adapter_linear_onepass_kernel"] + launches["_adapter_linear_split_kernel"] >= 4 * 6, launches
    curves = [_peft_trainer_run(m, tmp_path / d) for m, d in ((ref32, "p32"), (ref64, "p64"))]
    assert len(fused) == 4 and curves[1][-1] < curves[1][0]
    assert_close("Trainer loss curve", curves[1], fused, curves[0])
    files = sorted(p.name for p in (tmp_path / "fused" / "checkpoint-2").iterdir())
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert not any(f.startswith("model") for f in files), files  # no full-model weights
    saved = load_file(tmp_path / "fused" / "checkpoint-4" / "adapter_model.safetensors")
    expected = {n.replace(".default", "") for n, _ in pm.named_parameters() if "lora_" in n}
    assert set(saved) == expected
