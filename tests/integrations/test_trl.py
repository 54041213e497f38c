"""TRL's SFTTrainer with a LoRA ``peft_config``: fuse_peft on the PeftModel the trainer builds keeps TRL's
whole path (its fused LM-head loss, gradient checkpointing, adapter-only saving) and PEFT's loss curve.

Skipped where trl is not installed. Nothing downloads: a tiny Llama, a word-level tokenizer and a few
sentences, built in memory.
"""

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from adaptkern.integrations.peft_fuse import fuse_peft, fused_layer_names  # noqa: E402
from adaptkern.testing import assert_close  # noqa: E402

from ..helpers import count_launches  # noqa: E402
from ..models import tiny_llama_seeded, tiny_word_tokenizer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated and will be removed in v6:FutureWarning")

FORWARD_KERNELS = ("_adapter_linear_onepass_kernel", "_adapter_linear_split_kernel")
TARGETS = ["q_proj", "v_proj", "down_proj"]  # 6 LoRA layers in the 2-layer model
STEPS = 3
TEXTS = ["the cat sees the dog", "a big red bird sleeps on the old tree", "the dog chases the cat",
         "a small fish eats", "the young dog runs fast near the river today", "the happy cat likes the mat"]


class RecordingSFTTrainer(trl.SFTTrainer):
    """SFTTrainer that keeps each step's loss tensor as computed (the Trainer's own log sums them into a
    float32 accumulator, which would round the float64 run's losses)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.losses = []

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self.losses.append(loss)
        return loss


class Float64SFTTrainer(RecordingSFTTrainer):
    """The oracle's loss: TRL's SFT loss, L = −Σ_t log softmax(z_t)[y_{t+1}] / n over the labelled positions
    (n: the batch's label count, as TRL divides), from the model's full float64 logits z. TRL's own fused
    LM-head loss keeps its softmax statistics in float32 whatever the model's dtype, which would make a
    float64 run a float32 one at the loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"][:, 1:]
        logits = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).logits[:, :-1]
        mask = labels != -100
        log_p = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        n = mask.sum() if num_items_in_batch is None else num_items_in_batch
        return -(log_p * mask).sum() / torch.as_tensor(n).clamp(min=1)


def lora_config():
    """Random non-zero B (``init_lora_weights=False``): step 1 already runs an adapter."""
    return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")


def sft_trainer(model, out_dir, device, cls=RecordingSFTTrainer, *, peft_config=True, checkpoint=False):
    """An SFTTrainer over ``model`` (with ``lora_config()`` as its peft_config if ``peft_config``) on ``device``
    (CPU tensors reach the kernels only in the interpreter): batch 2, AdamW at a constant learning rate, seed 0,
    a checkpoint after the last step if ``checkpoint``, TRL's defaults otherwise (gradient checkpointing on)
    except bf16, off: the runs compare float32 with float64."""
    args = trl.SFTConfig(output_dir=str(out_dir), max_steps=STEPS, per_device_train_batch_size=2, learning_rate=2e-2,
                         lr_scheduler_type="constant", logging_steps=1, report_to="none", use_cpu=device == "cpu",
                         bf16=False, save_strategy="steps" if checkpoint else "no", save_steps=STEPS,
                         disable_tqdm=True, dataloader_num_workers=0, seed=0)
    return cls(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": TEXTS}),
               processing_class=tiny_word_tokenizer(), peft_config=lora_config() if peft_config else None)


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_lora_state(model, state):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(state[n])


def train_fused(trainer):
    """Train; the fused layers stay fused and run forward (and, under gradient checkpointing, again for the
    backward) and backward kernels on every step."""
    layers = fused_layer_names(trainer.model)
    assert len(layers) == 2 * len(TARGETS)
    with count_launches() as launches:
        trainer.train()
    assert fused_layer_names(trainer.model) == layers
    assert sum(launches[k] for k in FORWARD_KERNELS) >= STEPS * 2 * len(layers), launches
    assert sum(v for k, v in launches.items() if k not in FORWARD_KERNELS) > 0, launches


def test_sft_trainer_with_fused_peft(tmp_path, device):
    """Three SFT steps: PEFT in float32; fused, either fuse_peft on the PeftModel SFTTrainer built from its
    peft_config, or a fused PeftModel passed to it; PEFT in float64 (the oracle), all from the same adapter
    weights. Loss curves and trained adapters fused vs the oracle at most twice PEFT float32's error; the
    checkpoint and trainer.save_model hold PEFT's adapter files only, and PeftModel.from_pretrained of the saved
    adapter gives the fused model's logits."""
    peft32 = sft_trainer(tiny_llama_seeded(), tmp_path / "peft32", device)
    init = lora_state(peft32.model)
    peft32.train()

    from_config = sft_trainer(tiny_llama_seeded(), tmp_path / "fused", device, checkpoint=True)
    assert all(torch.equal(p, init[n]) for n, p in lora_state(from_config.model).items())  # same seed, same adapters
    fuse_peft(from_config.model)
    train_fused(from_config)

    prebuilt = fuse_peft(get_peft_model(tiny_llama_seeded(), lora_config()))
    load_lora_state(prebuilt, init)
    passed = sft_trainer(prebuilt, tmp_path / "prebuilt", device, peft_config=False)
    assert passed.model is prebuilt
    train_fused(passed)

    oracle = sft_trainer(tiny_llama_seeded().double(), tmp_path / "peft64", device, Float64SFTTrainer)
    load_lora_state(oracle.model, init)
    oracle.train()

    ref, eager = (torch.stack(t.losses) for t in (oracle, peft32))
    assert ref.dtype == torch.float64 and len(ref) == STEPS
    # the oracle computes TRL's loss: PEFT float32 differs from it by float32 rounding only (a different
    # normalization or label shift would be off by orders of magnitude more), and it does differ (float64 ran)
    assert assert_close("PEFT float32 loss curve", ref, eager, atol=1e-5).error > 0
    trained = {t: lora_state(t.model) for t in (from_config, passed, peft32, oracle)}
    for n in init:
        assert (trained[oracle][n] - init[n]).abs().max() > 1e-3, f"{n} did not train"
    for fused in (from_config, passed):
        assert_close("SFT loss curve", ref, torch.stack(fused.losses), eager)
        assert trained[fused].keys() == init.keys()
        for n in init:
            assert_close(n, trained[oracle][n], trained[fused][n], trained[peft32][n])

    checkpoint = sorted(p.name for p in (tmp_path / "fused" / f"checkpoint-{STEPS}").iterdir())
    assert "adapter_model.safetensors" in checkpoint and not any(f.startswith("model") for f in checkpoint), checkpoint
    for trainer in (from_config, peft32):
        trainer.save_model(str(trainer.args.output_dir))
    files = [load_file(tmp_path / d / "adapter_model.safetensors") for d in ("fused", "peft32")]
    assert files[0].keys() == files[1].keys() and len(files[0]) == len(init)
    loaded = PeftModel.from_pretrained(tiny_llama_seeded(), str(tmp_path / "fused")).to(device).eval()
    ids = torch.tensor(tiny_word_tokenizer()(TEXTS[:2], padding=True)["input_ids"], device=device)
    with torch.no_grad():
        out = from_config.model.eval()(input_ids=ids).logits
        assert_close("logits of the saved adapter", loaded.double()(input_ids=ids).logits, out,
                     loaded.float()(input_ids=ids).logits)
