"""The embedded reference model: a small LLaMA trained here on the embedded corpus.

``make reference-model`` runs :func:`build_reference`, which trains the byte-level BPE
tokenizer and the model from scratch (deterministic under its seed) and writes them,
with the training config and the measured dense perplexity, to ``modules/assets/reference``.
The checkpoint is committed, so the pipeline never trains by default.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from modules.data.corpus import build_corpus, python_minor
from modules.data.windows import windows
from modules.engine.names import REFERENCE_DIR
from modules.evaluation.perplexity import perplexity
from modules.process import building

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class ReferenceConfig:
    """Size and training schedule of the reference model."""

    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 352
    num_layers: int = 4
    num_heads: int = 8
    seqlen: int = 128
    steps: int = 3000
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.1
    seed: int = 0


def train_tokenizer(docs: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``docs`` and wrap it in the Hugging Face format."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS
    )


class _Windows(torch.utils.data.Dataset):
    """Random windows of a token stream, drawn once from a seeded generator."""

    def __init__(self, ids: torch.Tensor, seqlen: int, count: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.ids, self.seqlen = ids, seqlen
        self.starts = torch.randint(0, ids.numel() - seqlen, (count,), generator=gen)

    def __len__(self) -> int:
        return self.starts.numel()

    def __getitem__(self, i: int) -> torch.Tensor:
        s = int(self.starts[i])
        return self.ids[s : s + self.seqlen]


class CausalLMTraining(L.LightningModule):
    """Next-token training of a Hugging Face causal LM with AdamW and a one-cycle schedule."""

    def __init__(self, model: torch.nn.Module, cfg: ReferenceConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def training_step(self, batch: torch.Tensor, _: int) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2]
        rest = [p for n, p in self.model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
            lr=self.cfg.lr,
            betas=(0.9, 0.95),
        )
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.cfg.lr, total_steps=self.cfg.steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def model_config(cfg: ReferenceConfig, tok: PreTrainedTokenizerFast) -> LlamaConfig:
    """The LLaMA architecture of the reference model."""
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.seqlen,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def build_reference(out_dir: Path = REFERENCE_DIR, cfg: ReferenceConfig = ReferenceConfig()) -> dict:
    """Train tokenizer and model, measure dense validation perplexity, save everything."""
    L.seed_everything(cfg.seed, workers=True)
    corpus = build_corpus()
    tok = train_tokenizer(corpus.train, cfg.vocab_size)
    train_ids = torch.tensor(tok(corpus.text("train"))["input_ids"])
    val_ids = torch.tensor(tok(corpus.text("validation"))["input_ids"])
    model = LlamaForCausalLM(model_config(cfg, tok))
    data = torch.utils.data.DataLoader(
        _Windows(train_ids, cfg.seqlen, cfg.steps * cfg.batch_size, cfg.seed), batch_size=cfg.batch_size
    )
    trainer = L.Trainer(
        max_steps=cfg.steps,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        gradient_clip_val=1.0,
        log_every_n_steps=50,
    )
    start = time.time()
    trainer.fit(CausalLMTraining(model, cfg), data)
    model = model.cpu().eval()
    val = perplexity(model, windows(val_ids, cfg.seqlen), batch_size=32, progress=False)
    info = {
        "config": asdict(cfg),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens": train_ids.numel(),
        "validation_tokens": val_ids.numel(),
        "corpus_sha256": corpus.sha256(),
        "python": python_minor(),
        "train_seconds": round(time.time() - start, 1),
        "dense_validation_ppl": val["ppl"],
        "seqlen": cfg.seqlen,
    }
    with building(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


if __name__ == "__main__":
    print(json.dumps(build_reference(), indent=2))
