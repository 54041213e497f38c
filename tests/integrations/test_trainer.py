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
