"""Train the bundled default model pair (target + draft) on the Python standard library.

The pair ships as package data in specdec/assets/default_pair/{target,draft} so that
`specdec bench` works on a fresh machine without a download. Everything here is
deterministic for a given Python version, machine and thread count:

1. Corpus: the standard library's own .py files (found with sysconfig, never a fixed
   path), test folders and data-table packages left out, sorted by relative path. A
   file is held out when the SHA-256 of its relative path falls in a fixed bucket, so
   the split does not depend on which other files exist.
2. Tokenizer: byte-level BPE (tokenizers library) trained on the training files only,
   with <|pad|>, <|bos|>, <|eos|>; every encoding starts with <|bos|>.
3. Target: a deep, narrow LlamaForCausalLM trained with next-token cross-entropy.
4. Draft: one Llama layer of the same width, initialised from the target's embedding,
   first layer and final norm, then distilled from the target (forward KL on the full
   vocabulary plus a little cross-entropy), because a speculative draft is only as
   useful as its agreement with the target.
5. Both are saved with save_pretrained (safetensors). Weights are stored in float16 to
   keep the package small; config.json names float32 as the dtype, so a plain
   `from_pretrained` loads them as float32 (the stored values upcast exactly).
6. Held-out prompts (code prefixes cut at line boundaries) go to
   specdec/assets/prompts/stdlib_heldout.jsonl, and a model card with the data, the
   command, parameter counts, losses, training time and machine goes beside the models.

Run from the repository root:  python benchmarks/train_pair.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "specdec" / "assets" / "default_pair"
DEFAULT_PROMPTS_OUT = REPO_ROOT / "specdec" / "assets" / "prompts" / "stdlib_heldout.jsonl"

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
# Folders of the stdlib that are not ordinary library code: test suites, third-party
# installs, and packages that are mostly data tables (codec maps, pydoc topic text).
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings", "pydoc_data"}
HELDOUT_BUCKETS = 25  # one file in 25 (by path hash) is held out


# --------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class SourceFile:
    relpath: str  # POSIX path relative to the stdlib folder
    text: str


def stdlib_dir() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(relpath: str) -> bool:
    """Held-out membership by path hash: stable whatever other files exist."""
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % HELDOUT_BUCKETS == 0


def collect_corpus(root: Path) -> tuple[list[SourceFile], list[SourceFile], int]:
    """(train files, held-out files, files skipped as non-UTF-8), each list sorted by path."""
    train, heldout, skipped = [], [], 0
    paths = sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix())
    for path in paths:
        rel = path.relative_to(root)
        if any(part in EXCLUDED_DIRS for part in rel.parts[:-1]):
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            skipped += 1
            continue
        if not text.strip():
            continue
        item = SourceFile(rel.as_posix(), text)
        (heldout if is_heldout(item.relpath) else train).append(item)
    return train, heldout, skipped


# ------------------------------------------------------------------------ tokenizer


def train_tokenizer(files: list[SourceFile], vocab_size: int):
    """Byte-level BPE trained on `files`, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((f.text for f in files), trainer=trainer, length=len(files))
    bos_id = tok.token_to_id(BOS)
    # Training sequences start with <|bos|>, so every encoded prompt does too.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=1024
    )


def token_stream(files: list[SourceFile], tokenizer) -> torch.Tensor:
    """All files as one [N] int64 stream: <|bos|> file <|eos|> <|bos|> file <|eos|> ..."""
    enc = tokenizer([f.text for f in files], add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    flat: list[int] = []
    for ids in enc:
        flat.extend(ids)
        flat.append(eos)
    return torch.tensor(flat, dtype=torch.int64)


# ---------------------------------------------------------------------------- models


def llama_config(tokenizer, *, hidden: int, layers: int, intermediate: int, heads: int, max_positions: int):
    """A LlamaConfig for the shared tokenizer."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def count_params(model) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_optimizer(model, lr: float, weight_decay: float):
    # No decay on norms (1-D weights); decay on matrices and the tied embedding.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )


def sample_batch(stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """[batch, seq_len] windows at random offsets of the training stream."""
    starts = torch.randint(0, stream.numel() - seq_len, (batch,), generator=gen)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def autocast(enabled: bool):
    """bfloat16 autocast on CPU: about twice the training speed on CPUs with bf16 units."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def train_target(model, stream, *, steps, batch, seq_len, lr, warmup, seed, amp, log) -> list[float]:
    """Next-token cross-entropy training; returns the per-step losses."""
    gen = torch.Generator().manual_seed(seed)
    opt = make_optimizer(model, lr, weight_decay=0.1)
    model.train()
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        x = sample_batch(stream, batch, seq_len, gen)
        with autocast(amp):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            log(f"target step {step + 1}/{steps} loss {sum(losses[-25:]) / len(losses[-25:]):.4f}")
    model.eval()
    return losses


def init_draft_from_target(draft, target) -> None:
    """Copy the embedding, the first decoder layer and the final norm of the target."""
    draft.model.embed_tokens.load_state_dict(target.model.embed_tokens.state_dict())
    draft.model.layers[0].load_state_dict(target.model.layers[0].state_dict())
    draft.model.norm.load_state_dict(target.model.norm.state_dict())


def train_draft(draft, target, stream, *, steps, batch, seq_len, lr, warmup, seed, kd_weight, amp, log) -> list[float]:
    """Distil the target into the draft: kd_weight * KL(p_target || q_draft) + (1 - kd_weight) * CE."""
    gen = torch.Generator().manual_seed(seed)
    opt = make_optimizer(draft, lr, weight_decay=0.1)
    draft.train()
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        x = sample_batch(stream, batch, seq_len, gen)
        with torch.no_grad(), autocast(amp):
            p_log = F.log_softmax(target(input_ids=x).logits[:, :-1].float(), dim=-1)  # [B, T-1, V]
        with autocast(amp):
            q_logits = draft(input_ids=x).logits[:, :-1].float()  # [B, T-1, V]
        q_log = F.log_softmax(q_logits, dim=-1)
        kl = (p_log.exp() * (p_log - q_log)).sum(-1).mean()
        ce = F.cross_entropy(q_logits.reshape(-1, q_logits.size(-1)), x[:, 1:].reshape(-1))
        loss = kd_weight * kl + (1.0 - kd_weight) * ce
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(ce.item())
        if step % 25 == 0 or step == steps - 1:
            log(f"draft step {step + 1}/{steps} kl {kl.item():.4f} ce {sum(losses[-25:]) / len(losses[-25:]):.4f}")
    draft.eval()
    return losses


@torch.no_grad()
def evaluate(target, draft, stream: torch.Tensor, seq_len: int, max_windows: int) -> dict[str, float]:
    """Held-out cross-entropy of both models and their greedy (top-1) agreement."""
    n = min(max_windows, (stream.numel() - 1) // seq_len)
    t_loss = d_loss = agree = 0.0
    count = 0
    for i in range(n):
        x = stream[i * seq_len : (i + 1) * seq_len + 1].unsqueeze(0)  # [1, seq_len+1]
        inp, lab = x[:, :-1], x[:, 1:]
        t_logits = target(input_ids=inp).logits.float()
        d_logits = draft(input_ids=inp).logits.float()
        t_loss += F.cross_entropy(t_logits[0], lab[0], reduction="sum").item()
        d_loss += F.cross_entropy(d_logits[0], lab[0], reduction="sum").item()
        agree += (t_logits.argmax(-1) == d_logits.argmax(-1)).sum().item()
        count += lab.numel()
    return {"target_loss": t_loss / count, "draft_loss": d_loss / count, "top1_agreement": agree / count,
            "tokens": count}


def round_to_float16(model) -> None:
    """Round weights to float16 values (kept in float32) to measure what storage costs."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.float16).to(p.dtype))


def save_model(model, path: Path) -> None:
    """save_pretrained with float16 storage and float32 as the declared load dtype."""
    path.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(path, safe_serialization=True)
    model.to(torch.float32)
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    # Stored as float16 to halve the package; loads as float32 (tiny models on CPU
    # run faster and more accurately in float32, and the upcast is exact).
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- prompts


def heldout_prompts(files: list[SourceFile], *, per_file: int, max_chars: int, min_chars: int, seed: int):
    """Code prefixes from held-out files, each ending at a line boundary.

    For each file, `per_file` cut points are drawn (seeded) among lines in the middle
    80% of the file whose next line is code, so there is something to complete. The
    prompt is the text before the cut, trimmed from the left at a line boundary to at
    most `max_chars` characters.
    """
    rng = random.Random(seed)
    prompts = []
    for f in files:
        lines = f.text.splitlines(keepends=True)
        lo, hi = int(len(lines) * 0.1), int(len(lines) * 0.9)
        candidates = [i for i in range(max(lo, 1), hi) if lines[i].strip() and not lines[i].lstrip().startswith("#")]
        if not candidates:
            continue
        cuts = sorted(rng.sample(candidates, min(per_file, len(candidates))))
        for j, cut in enumerate(cuts):
            start = cut
            while start > 0 and sum(len(l) for l in lines[start - 1 : cut]) <= max_chars:
                start -= 1
            while start < cut and not lines[start].strip():  # no leading blank lines
                start += 1
            text = "".join(lines[start:cut])
            if len(text) < min_chars:
                continue
            prompts.append({"id": f"{f.relpath}#{j}", "prompt": text, "source": f.relpath, "line": cut})
    return prompts


# ------------------------------------------------------------------------------ card


def machine_description(threads: int) -> str:
    """CPU model, core count, OS, Python and torch versions, torch threads."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.machine()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, torch threads {threads}")


def write_card(out: Path, info: dict) -> None:
    """MODEL_CARD.md beside the models."""
    t, d = info["target"], info["draft"]
    ev = info["eval"]
    text = f"""# specdec default model pair

A target and a draft causal LM for `specdec bench` on a machine without a download:
code completion of Python source, a typical speculative-decoding workload.
Toy models, trained for minutes on a CPU; they are a benchmark fixture, not useful code assistants.

## Data
- Corpus: the `.py` files of the Python {info['python']} standard library of the training machine
  (`sysconfig.get_paths()["stdlib"]`), without the folders {', '.join(sorted(EXCLUDED_DIRS))};
  files that are not UTF-8 skipped ({info['skipped']}). Python Software Foundation License.
- Split: a file is held out when SHA-256(relative path) mod {HELDOUT_BUCKETS} == 0:
  {info['n_train']} training files ({info['train_tokens']:,} tokens), {info['n_heldout']} held-out files
  ({info['heldout_tokens']:,} tokens). Held-out prompts for the benchmark
  (`specdec/assets/prompts/stdlib_heldout.jsonl`, {info['n_prompts']} prompts) come from the held-out files only.
- Tokenizer: byte-level BPE (tokenizers library), vocabulary {info['vocab_size']}, special tokens
  `{PAD}` (id {info['pad_id']}), `{BOS}` (id {info['bos_id']}, prepended to every encoding), `{EOS}` (id {info['eos_id']}).

## Models (LlamaForCausalLM, tied input/output embeddings, shared tokenizer)
| | layers | hidden | MLP | heads | parameters | trained steps | tokens seen |
|---|---|---|---|---|---|---|---|
| target | {t['layers']} | {t['hidden']} | {t['intermediate']} | {t['heads']} | {t['params']:,} | {t['steps']} | {t['tokens']:,} |
| draft | {d['layers']} | {d['hidden']} | {d['intermediate']} | {d['heads']} | {d['params']:,} | {d['steps']} | {d['tokens']:,} |

- Target: next-token cross-entropy, AdamW (betas 0.9/0.95, weight decay 0.1), peak lr {t['lr']},
  {info['warmup']} warm-up steps then cosine to 10%, batch {info['batch']} x {info['seq_len']} tokens, grad clip 1.0,
  {'bfloat16 autocast (float32 master weights)' if info['amp'] else 'float32'}.
- Draft: initialised from the target's embedding, first layer and final norm; distilled from the
  target with {info['kd_weight']} x KL(target || draft) + {1 - info['kd_weight']:.1f} x cross-entropy, peak lr {d['lr']}.
- Weights stored as float16 (safetensors); `config.json` declares float32, so `from_pretrained` loads float32.

## Results (held-out files, {ev['tokens']:,} tokens, weights rounded to float16 as shipped)
| | final train loss (mean of last 25 steps) | held-out loss (nats/token) |
|---|---|---|
| target | {t['final_train_loss']:.4f} | {ev['target_loss']:.4f} |
| draft | {d['final_train_loss']:.4f} | {ev['draft_loss']:.4f} |

Greedy top-1 agreement of draft and target on held-out text: {ev['top1_agreement']:.3f}.
Held-out loss before float16 rounding: target {info['eval_fp32']['target_loss']:.4f}, draft {info['eval_fp32']['draft_loss']:.4f}.

## Limitations
- Quality: about {ev['target_loss']:.1f} nats/token on held-out code is far from a useful code model; the
  training budget is {t['tokens']:,} tokens. Greedy continuations fall into repetition loops after a line or
  two; sampled ones (temperature 0.8) have the shape of Python without its sense. Repetition makes greedy drafts
  easier to accept than they would be with a strong model, so greedy speedups on this pair are optimistic;
  the sampled rows of `specdec bench` are the more realistic reading.
- At this budget the draft is almost as good as the target on held-out text: depth buys little quality here.
  The pair exists for its cost ratio (a {t['layers']}-layer target, a {d['layers']}-layer draft) and the
  draft's agreement with the target, which is what speculative decoding needs.

## Training
- Command (from the repository root): `{info['command']}`
- Seed {info['seed']}; training time {info['train_seconds'] / 60:.1f} min in all
  (tokenizer {info['tokenizer_seconds']:.0f} s, target {t['seconds']:.0f} s, draft {d['seconds']:.0f} s).
- Machine: {info['machine']}.
- Reproducible for the same Python version, torch version, machine and thread count; a different
  Python version has a different standard library and so gives a different pair.
"""
    (out / "MODEL_CARD.md").write_text(text)


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for target/, draft/ and MODEL_CARD.md")
    p.add_argument("--prompts-out", type=Path, default=DEFAULT_PROMPTS_OUT, help="held-out prompts (jsonl)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--target-layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=128, help="width of target and draft (the draft copies target weights)")
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--draft-layers", type=int, default=1)
    p.add_argument("--target-steps", type=int, default=400)
    p.add_argument("--draft-steps", type=int, default=300)
    p.add_argument("--target-lr", type=float, default=3e-3)
    p.add_argument("--draft-lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--kd-weight", type=float, default=0.9)
    p.add_argument("--no-bf16-autocast", dest="amp", action="store_false",
                   help="train in float32 instead of bfloat16 autocast")
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows of --seq-len tokens to evaluate")
    p.add_argument("--card-only", action="store_true",
                   help="only rewrite MODEL_CARD.md from --out/training_summary.json (no training)")
    args = p.parse_args(argv)
    if args.draft_layers > args.target_layers:
        p.error(f"--draft-layers ({args.draft_layers}) must not exceed --target-layers ({args.target_layers})")
    return args


def main(argv: list[str] | None = None) -> int:
    """Train and save the pair, the held-out prompts and the model card."""
    args = parse_args(argv)
    if args.card_only:
        # Rewrite MODEL_CARD.md from the numbers the last training run saved.
        write_card(args.out, json.loads((args.out / "training_summary.json").read_text()))
        return 0
    from transformers import LlamaForCausalLM

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    root = stdlib_dir()
    train_files, heldout_files, skipped = collect_corpus(root)
    log(f"corpus: {len(train_files)} training files, {len(heldout_files)} held-out, {skipped} skipped (not UTF-8)")

    t0 = time.perf_counter()
    tokenizer = train_tokenizer(train_files, args.vocab_size)
    tokenizer_seconds = time.perf_counter() - t0
    train_stream = token_stream(train_files, tokenizer)
    heldout_stream = token_stream(heldout_files, tokenizer)
    log(f"tokenizer: vocab {len(tokenizer)}; {train_stream.numel():,} training tokens, "
        f"{heldout_stream.numel():,} held-out tokens ({tokenizer_seconds:.1f}s)")

    shape = dict(hidden=args.hidden, intermediate=args.intermediate, heads=args.heads, max_positions=1024)
    torch.manual_seed(args.seed)
    target = LlamaForCausalLM(llama_config(tokenizer, layers=args.target_layers, **shape))
    draft = LlamaForCausalLM(llama_config(tokenizer, layers=args.draft_layers, **shape))
    log(f"target {count_params(target):,} parameters, draft {count_params(draft):,} parameters")

    common = dict(batch=args.batch_size, seq_len=args.seq_len, warmup=args.warmup, amp=args.amp, log=log)
    t0 = time.perf_counter()
    t_losses = train_target(target, train_stream, steps=args.target_steps, lr=args.target_lr, seed=args.seed, **common)
    target_seconds = time.perf_counter() - t0

    init_draft_from_target(draft, target)
    t0 = time.perf_counter()
    d_losses = train_draft(draft, target, train_stream, steps=args.draft_steps, lr=args.draft_lr,
                           seed=args.seed + 1, kd_weight=args.kd_weight, **common)
    draft_seconds = time.perf_counter() - t0
    train_seconds = time.perf_counter() - t_start

    eval_fp32 = evaluate(target, draft, heldout_stream, args.seq_len, args.eval_windows)
    round_to_float16(target)
    round_to_float16(draft)
    eval_fp16 = evaluate(target, draft, heldout_stream, args.seq_len, args.eval_windows)
    log(f"held-out: float32 {eval_fp32}; float16-rounded {eval_fp16}")

    out: Path = args.out
    for name, model in (("target", target), ("draft", draft)):
        save_model(model, out / name)
        tokenizer.save_pretrained(out / name)

    prompts = heldout_prompts(heldout_files, per_file=2, max_chars=500, min_chars=160, seed=args.seed)
    args.prompts_out.parent.mkdir(parents=True, exist_ok=True)
    with args.prompts_out.open("w") as fh:
        for item in prompts:
            fh.write(json.dumps(item, sort_keys=True) + "\n")

    tail = lambda xs: sum(xs[-25:]) / len(xs[-25:])  # noqa: E731
    defaults = parse_args([])
    changed = [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
               if getattr(defaults, k) != v and k not in ("out", "prompts_out", "amp", "card_only")]
    if not args.amp:
        changed.append("--no-bf16-autocast")
    info = {
        "python": platform.python_version(),
        "skipped": skipped,
        "n_train": len(train_files),
        "n_heldout": len(heldout_files),
        "train_tokens": train_stream.numel(),
        "heldout_tokens": heldout_stream.numel(),
        "n_prompts": len(prompts),
        "vocab_size": len(tokenizer),
        "pad_id": tokenizer.pad_token_id,
        "bos_id": tokenizer.bos_token_id,
        "eos_id": tokenizer.eos_token_id,
        "batch": args.batch_size,
        "seq_len": args.seq_len,
        "warmup": args.warmup,
        "kd_weight": args.kd_weight,
        "amp": args.amp,
        "seed": args.seed,
        "target": dict(layers=args.target_layers, hidden=args.hidden, intermediate=args.intermediate, heads=args.heads,
                       params=count_params(target), steps=args.target_steps,
                       tokens=args.target_steps * args.batch_size * args.seq_len, lr=args.target_lr,
                       final_train_loss=tail(t_losses), seconds=target_seconds),
        "draft": dict(layers=args.draft_layers, hidden=args.hidden, intermediate=args.intermediate, heads=args.heads,
                      params=count_params(draft), steps=args.draft_steps,
                      tokens=args.draft_steps * args.batch_size * args.seq_len, lr=args.draft_lr,
                      final_train_loss=tail(d_losses), seconds=draft_seconds),
        "eval": eval_fp16,
        "eval_fp32": eval_fp32,
        "train_seconds": train_seconds,
        "tokenizer_seconds": tokenizer_seconds,
        "machine": machine_description(args.threads),
        "command": " ".join(["python benchmarks/train_pair.py", *changed]),
    }
    write_card(out, info)
    (out / "training_summary.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    log(f"saved to {out} and {args.prompts_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
