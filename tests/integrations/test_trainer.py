"""A patched model under the transformers Trainer: adapter-only parameters, a few steps, CPU, no network."""

import pytest
import torch
from transformers import Trainer, TrainingArguments

from adaptkern.integrations import adapter_parameters, add_lora
from adaptkern.testing import assert_close

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


class _LossRecorder(Trainer):
    """Keeps each step's loss in the model's dtype (the Trainer's own log sums losses in float32,
    which would round a float64 oracle's curve)."""

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self.losses.append(loss.detach().double().cpu())
        return loss


def _peft_trainer_run(pm, out_dir, steps=4):
    # On a CUDA machine the model trains on the GPU, where the fused kernels run (CPU tensors there take
    # the reference path); on a CPU the interpreter runs them.
    args = TrainingArguments(output_dir=str(out_dir), per_device_train_batch_size=4, max_steps=steps,
                             learning_rate=2e-2, lr_scheduler_type="constant", logging_steps=1, save_strategy="steps",
                             save_steps=2, report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
                             dataloader_num_workers=0, seed=0)
    trainer = _LossRecorder(model=pm, args=args, train_dataset=Memorize())
    trainer.losses = []
    trainer.train()
    return torch.stack(trainer.losses)


def test_fused_peft_model_under_trainer(tmp_path):
    """fuse_peft keeps the Trainer's PEFT path: adapter-only checkpoints (PEFT's own files), the loss curve of
    PEFT (float64 oracle, PEFT float32 as the eager error), and the fused kernels running throughout."""
    import copy

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from adaptkern.integrations.peft_fuse import fuse_peft

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


def _adapter_trainer_run(model, out_dir, steps=4, resume=None):
    from adaptkern.integrations.trainer import AdapterTrainer

    args = TrainingArguments(output_dir=str(out_dir), per_device_train_batch_size=2, max_steps=steps,
                             learning_rate=2e-2, lr_scheduler_type="constant", logging_steps=1, save_strategy="steps",
                             save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
                             seed=0)
    trainer = AdapterTrainer(model=model, args=args, train_dataset=Memorize())
    trainer.train(resume_from_checkpoint=resume)
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def _dir_bytes(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


TARGETS = ["q_proj", "v_proj", "down_proj"]


def test_adapter_trainer_checkpoints_are_peft_sized_and_resume(tmp_path):
    """AdapterTrainer's checkpoints hold the adapters only (PEFT's files, about PEFT's size, no
    model.safetensors); PEFT loads them; resuming from checkpoint-2 ends where the uninterrupted run did."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import save_file

    from ..models import tiny_llama_seeded

    torch.manual_seed(1)
    model = add_lora(tiny_llama_seeded(), "default", r=4, alpha=8, target_modules=TARGETS)
    losses = _adapter_trainer_run(model, tmp_path / "ours")
    ckpt = tmp_path / "ours" / "checkpoint-2"
    files = {p.name for p in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= files
    assert not any(f.startswith("model") for f in files), files

    pm = get_peft_model(tiny_llama_seeded(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    Trainer(model=pm, args=TrainingArguments(output_dir=str(tmp_path / "peft"), max_steps=2, save_steps=2,
                                             save_strategy="steps", report_to=[], use_cpu=True, disable_tqdm=True,
                                             per_device_train_batch_size=2, seed=0),
            train_dataset=Memorize()).train()
    peft_ckpt = tmp_path / "peft" / "checkpoint-2"
    ours_size, peft_size = _dir_bytes(ckpt), _dir_bytes(peft_ckpt)
    whole = tmp_path / "whole.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_llama_seeded().state_dict().items()}, whole)
    assert 0.8 < ours_size / peft_size < 1.25 and ours_size < whole.stat().st_size, (ours_size, peft_size)
    adapter_file = "adapter_model.safetensors"
    assert (ckpt / adapter_file).stat().st_size == (peft_ckpt / adapter_file).stat().st_size

    final = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    back = PeftModel.from_pretrained(tiny_llama_seeded(), str(tmp_path / "ours" / "checkpoint-4"))
    ids = Memorize().ids
    with torch.no_grad():
        assert_close("logits (PEFT loads the checkpoint)", back.double()(input_ids=ids).logits,
                     model(input_ids=ids).logits, back.float()(input_ids=ids).logits)

    torch.manual_seed(2)  # different initial adapters: resuming must overwrite them
    fresh = add_lora(tiny_llama_seeded(), "default", r=4, alpha=8, target_modules=TARGETS)
    resumed = _adapter_trainer_run(fresh, tmp_path / "resumed", resume=str(ckpt))
    assert resumed == losses  # steps 1-2 come from the checkpoint's trainer state, 3-4 are recomputed
    for n, p in fresh.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, final[n]), n


def test_save_pretrained_of_a_patched_model_writes_the_base_only(tmp_path):
    """model.save_pretrained() of a patched model warns (pointing at save_peft / AdapterTrainer) and writes
    exactly the base checkpoint: from_pretrained of the plain class loads it with no missing or unexpected
    key and holds the base model's tensors (bit for bit; a merged layer's W unmerged, W + ΔW − ΔW)."""
    from transformers import LlamaForCausalLM

    from ..models import tiny_llama_seeded

    base = tiny_llama_seeded()
    model = add_lora(tiny_llama_seeded(), "default", r=4, alpha=8, target_modules=TARGETS)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.normal_()
    model.model.layers[0].self_attn.q_proj.merge("default")
    with pytest.warns(UserWarning, match=r"adapters \['default'\] are not in .*adaptkern.save_peft"):
        model.save_pretrained(tmp_path)
    loaded, info = LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    merged = "model.layers.0.self_attn.q_proj.weight"
    state, want = loaded.state_dict(), base.state_dict()
    assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want if k != merged)
    torch.testing.assert_close(state[merged], want[merged], rtol=0, atol=1e-6)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, want[merged])  # merged in the live model


def test_save_and_load_adapters_layout_and_errors(tmp_path):
    """Several adapters: "default" at the root, the others in <root>/<name> (PEFT's layout, which
    PeftModel.load_adapter reads); load_adapters copies into the live Parameters (same objects) and refuses
    a checkpoint that does not fit, changing nothing."""
    from peft import PeftModel

    from adaptkern.integrations.trainer import load_adapters, save_adapters

    from ..models import assert_unchanged, snapshot, tiny_llama_seeded

    model = add_lora(tiny_llama_seeded(), "default", r=4, alpha=8, target_modules=TARGETS)
    add_lora(model, "other", r=2, alpha=2, target_modules=["k_proj"])
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.normal_()
    assert save_adapters(model, str(tmp_path / "ckpt")) == ["default", "other"]
    assert (tmp_path / "ckpt" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "ckpt" / "other" / "adapter_model.safetensors").is_file()
    pm = PeftModel.from_pretrained(tiny_llama_seeded(), str(tmp_path / "ckpt"))
    pm.load_adapter(str(tmp_path / "ckpt" / "other"), "other")
    assert {n for n, _ in pm.named_parameters() if "lora_A.other" in n}

    fresh = add_lora(tiny_llama_seeded(), "default", r=4, alpha=8, target_modules=TARGETS)
    add_lora(fresh, "other", r=2, alpha=2, target_modules=["k_proj"])
    params = {id(p) for p in adapter_parameters(fresh)}
    load_adapters(fresh, str(tmp_path / "ckpt"))
    assert {id(p) for p in adapter_parameters(fresh)} == params
    assert all(torch.equal(a, b) for a, b in zip(adapter_parameters(fresh), adapter_parameters(model)))

    wrong = add_lora(tiny_llama_seeded(), "default", r=3, alpha=8, target_modules=TARGETS)
    add_lora(wrong, "other", r=2, alpha=2, target_modules=["k_proj"])
    snap = snapshot(wrong)
    with pytest.raises(ValueError, match=r"lora_A.weight: checkpoint has \(4, \d+\), the model \(3, \d+\)"):
        load_adapters(wrong, str(tmp_path / "ckpt"))
    assert_unchanged(wrong, snap)
    with pytest.raises(FileNotFoundError):
        load_adapters(fresh, str(tmp_path / "nowhere"))


def test_adapter_trainer_loads_the_best_checkpoint_at_end(tmp_path):
    """load_best_model_at_end: after training, the live adapters hold the best checkpoint's saved tensors
    (the "best" here is the higher eval loss, so checkpoint-2 and not the last state)."""
    from safetensors.torch import load_file

    from adaptkern.integrations.peft import peft_tensors
    from adaptkern.integrations.trainer import AdapterTrainer

    from ..models import tiny_llama_seeded

    torch.manual_seed(1)
    model = add_lora(tiny_llama_seeded(), "default", r=4, alpha=8, target_modules=TARGETS)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4, learning_rate=5e-2,
                             lr_scheduler_type="constant", eval_strategy="steps", eval_steps=2, save_strategy="steps",
                             save_steps=2, load_best_model_at_end=True, metric_for_best_model="loss",
                             greater_is_better=True, report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    trainer = AdapterTrainer(model=model, args=args, train_dataset=Memorize(), eval_dataset=Memorize(n=2))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best.endswith("checkpoint-2"), best
    saved, last = (load_file(f"{tmp_path}/checkpoint-{i}/adapter_model.safetensors") for i in (2, 4))
    live = peft_tensors(model)
    assert saved.keys() == live.keys() and all(torch.equal(saved[k], live[k].detach()) for k in saved)
    assert not all(torch.equal(saved[k], last[k]) for k in saved)
