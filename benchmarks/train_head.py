"""Train an EAGLE-3 draft head (specdec.eagle) for a target model on a text corpus.

The head learns to predict what the target would say next from the target's own hidden
states, with the training-time test of EAGLE-3 (Li et al. 2025): besides the step that
reads the target's features, a few further steps are unrolled in which the head reads its
own outputs, as it does when it drafts, each attending to the real positions before it and
to its own earlier steps at the same position.

1. Corpus: the Python standard library's own files (the bundled pair's training split, see
   train_pair.py; its held-out files stay held out), or a text / JSONL file (--corpus),
   tokenized with the target's tokenizer and cut into sequences of --seq-len tokens.
2. Collect, once (resumable): for every sequence the target's hidden states entering the
   three layers the head reads (low, middle, high), its final normed hidden state (from which
   the target's distribution is recomputed as soft labels) and its greedy token, stored as
   float16 / int32 arrays in --work.
3. Draft vocabulary: the --draft-vocab tokens the target predicts most often on the corpus
   (all of them when the target's vocabulary is that small); d2t / t2d map it.
4. Train (resumable from the last checkpoint in --work): AdamW, warm-up then cosine decay;
   loss per unrolled step j: cross-entropy against the target's distribution over the draft
   vocabulary, weighted 0.8^j. The LM head starts from the target's rows, the final norm
   from the target's, fc from the identity on the high layer; embeddings are the target's.
5. Held-out: per unrolled step, how often the head's top token equals the target's, and the
   tokens per target forward that implies at K = --ttt-steps; then the head is saved in the
   published EAGLE-3 layout with a model card.

Run from the repository root, e.g.:
    python benchmarks/train_head.py --target bundled --out specdec/assets/default_pair/eagle
    python benchmarks/train_head.py --target smollm2-135m --out specdec/assets/heads/smollm2-135m-instruct \\
        --draft-vocab 6144 --tokens 160000
On a GPU add --device cuda (and --dtype bfloat16 for an 8B target); nothing else changes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_pair import collect_corpus, machine_description, stdlib_dir

from specdec.eagle import default_aux_layers, save_head, weight_fingerprint
from specdec.eagle_training import greedy_draft_ids, head_config, init_head, target_states, ttt_loss

# --------------------------------------------------------------------------- data


def corpus_texts(spec: str) -> tuple[list[str], list[str], str]:
    """(training texts, held-out texts, description) of --corpus."""
    if spec == "stdlib":
        train, heldout, _ = collect_corpus(stdlib_dir())
        return [f.text for f in train], [f.text for f in heldout], "Python standard library (.py files), train split"
    path = Path(spec)
    texts = []
    for line in path.read_text().splitlines():
        if path.suffix == ".jsonl":
            if line.strip():
                row = json.loads(line)
                texts.append(row.get("text") or row.get("prompt") or "")
        else:
            texts.append(line)
    if path.suffix != ".jsonl":
        texts = ["\n".join(texts)]
    cut = max(1, len(texts) // 25)
    return texts[cut:], texts[:cut], f"{path.name}"


def sequences(texts: list[str], tokenizer, seq_len: int, limit_tokens: int, seed: int) -> torch.Tensor:
    """[N, seq_len] token sequences: the texts (shuffled by seed) concatenated, cut to limit_tokens."""
    order = np.random.default_rng(seed).permutation(len(texts))
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    flat: list[int] = []
    for i in order:
        flat.extend(tokenizer(texts[i], add_special_tokens=True)["input_ids"])
        flat.append(eos)
        if len(flat) >= limit_tokens:
            break
    n = min(len(flat), limit_tokens) // seq_len
    return torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)


def generated_sequences(gen, texts: list[str], seq_len: int, prompt_len: int, count: int, batch: int, seed: int,
                        path: Path, log) -> torch.Tensor:
    """[count, seq_len] sequences the target wrote itself: a prompt of prompt_len tokens cut from
    the corpus, then the target's continuation (half greedy, half sampled at temperature 0.8),
    which is what a head drafts against at inference. Saved to `path` as batches complete, so an
    interrupted run goes on from there."""
    rng = np.random.default_rng(seed + 1)
    tokenizer = gen.tokenizer
    encoded = [ids for ids in tokenizer(texts, add_special_tokens=True)["input_ids"] if len(ids) > prompt_len + 8]
    prompts: list[list[int]] = []
    while encoded and len(prompts) < count:  # a prompt from every text in turn (shuffled), then again
        for i in rng.permutation(len(encoded)):
            ids = encoded[i]
            start = int(rng.integers(0, len(ids) - prompt_len))
            prompts.append(ids[start: start + prompt_len])
            if len(prompts) >= count:
                break
    done = torch.load(path, weights_only=True) if path.exists() else torch.zeros(0, seq_len, dtype=torch.long)
    t0 = time.perf_counter()
    first = len(done)
    while len(done) < len(prompts):
        part = prompts[len(done): len(done) + batch]
        sampled = (len(done) // batch) % 2 == 1
        options = dict(temperature=0.8, seed=[seed + len(done) + j for j in range(len(part))]) if sampled else {}
        out = gen.generate_ids(part, max_new_tokens=seq_len - prompt_len, ignore_eos=True, **options)
        rows = torch.tensor([p + r.token_ids for p, r in zip(part, out)], dtype=torch.long)
        done = torch.cat([done, rows])
        torch.save(done, path)
        rate = (len(done) - first) * (seq_len - prompt_len) / (time.perf_counter() - t0)
        log(f"generate {len(done)}/{len(prompts)} sequences, {rate:.0f} tokens/s", progress=True)
    return done


class Store:
    """Collected target outputs for a set of sequences, as memory-mapped arrays in a folder."""

    def __init__(self, folder: Path, n: int, seq_len: int, feat: int, hidden: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        mode = lambda name: "r+" if (folder / name).exists() else "w+"
        self.features = np.lib.format.open_memmap(folder / "features.npy", mode("features.npy"), np.float16, (n, seq_len, feat))
        self.final = np.lib.format.open_memmap(folder / "final.npy", mode("final.npy"), np.float16, (n, seq_len, hidden))
        self.greedy = np.lib.format.open_memmap(folder / "greedy.npy", mode("greedy.npy"), np.int32, (n, seq_len))
        self.progress = folder / "collected.json"

    @property
    def done(self) -> int:
        return json.loads(self.progress.read_text())["done"] if self.progress.exists() else 0

    def mark(self, done: int) -> None:
        for a in (self.features, self.final, self.greedy):
            a.flush()
        self.progress.write_text(json.dumps({"done": done}))


@torch.inference_mode()
def collect(target, seqs: torch.Tensor, store: Store, layers: tuple[int, ...], batch: int, device, log) -> None:
    """Fill `store` with the target's outputs over `seqs` (from where an earlier run stopped)."""
    start = store.done
    t0 = time.perf_counter()
    for i in range(start, len(seqs), batch):
        ids = seqs[i: i + batch].to(device)
        feats, final, greedy = target_states(target, ids, layers)
        store.features[i: i + len(ids)] = feats.float().cpu().numpy().astype(np.float16)
        store.final[i: i + len(ids)] = final.float().cpu().numpy().astype(np.float16)
        store.greedy[i: i + len(ids)] = greedy.cpu().numpy().astype(np.int32)
        store.mark(i + len(ids))
        done = i + len(ids) - start
        rate = done * seqs.shape[1] / (time.perf_counter() - t0)
        log(f"collect {i + len(ids)}/{len(seqs)} sequences, {rate:.0f} tokens/s", progress=True)


def batches_of(store: Store, index: np.ndarray, batch: int, draft_ids: torch.Tensor, target_head: torch.Tensor,
               seqs: torch.Tensor, dtype, device, in_draft: torch.Tensor):
    for i in range(0, len(index) - batch + 1, batch):
        rows = np.sort(index[i: i + batch])
        tokens = seqs[rows].to(device)
        feats = torch.from_numpy(np.asarray(store.features[rows])).to(device, dtype)
        final = torch.from_numpy(np.asarray(store.final[rows])).to(device, dtype)
        greedy = torch.from_numpy(np.asarray(store.greedy[rows])).long().to(device)
        with torch.no_grad():
            labels = torch.softmax((final @ target_head.T).float(), dim=-1)  # [B, L, Vd]
        yield tokens, feats, labels, in_draft[greedy]


# --------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="bundled", help="what SpeculativeGenerator.from_pretrained takes")
    p.add_argument("--out", required=True, help="folder the head is saved to (EAGLE-3 layout)")
    p.add_argument("--work", default=None, help="folder for collected states and checkpoints (default: OUT.work)")
    p.add_argument("--corpus", default="stdlib", help='"stdlib" or a .txt / .jsonl file')
    p.add_argument("--tokens", type=int, default=600_000, help="training tokens collected")
    p.add_argument("--heldout-tokens", type=int, default=20_000)
    p.add_argument("--generate-tokens", type=int, default=0,
                   help="also this many tokens of sequences the target continues itself (a corpus prompt, then its "
                        "own greedy or sampled continuation): what the head drafts against at inference")
    p.add_argument("--prompt-len", type=int, default=64, help="corpus tokens before a generated continuation")
    p.add_argument("--generate-batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--draft-vocab", type=int, default=0, help="draft vocabulary size (0: the target's)")
    p.add_argument("--intermediate", type=int, default=0, help="head MLP width (0: the target's)")
    p.add_argument("--greedy-vocab", type=int, default=0,
                   help="name this many greedy draft ids, the draft ids the target emits most often as its greedy "
                        "token (0: none; see benchmarks/greedy_vocab.py)")
    p.add_argument("--ttt-steps", type=int, default=4, help="unrolled steps of the training-time test")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--collect-batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="the target's dtype while collecting")
    p.add_argument("--save-dtype", default="float16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=50)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from specdec import SpeculativeGenerator

    out = Path(args.out)
    work = Path(args.work) if args.work else out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    logfile = open(work / "log.txt", "a")
    last_progress = [0.0]

    def log(msg: str, progress: bool = False) -> None:
        now = time.perf_counter()
        if progress and now - last_progress[0] < 10:
            return
        last_progress[0] = now
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        logfile.write(line + "\n")
        logfile.flush()

    device = torch.device(args.device)
    started = time.perf_counter()
    gen = SpeculativeGenerator.from_pretrained(args.target, device=device, dtype=args.dtype, head=None)
    target, tokenizer = gen.target_model, gen.tokenizer
    tconf = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
    hidden, layers_n = int(tconf.hidden_size), int(tconf.num_hidden_layers)
    vocab = int(target.get_input_embeddings().weight.shape[0])
    layers = default_aux_layers(layers_n)
    log(f"target {args.target}: hidden {hidden}, {layers_n} layers, vocabulary {vocab}; reading layers {layers}")

    train_texts, heldout_texts, corpus_desc = corpus_texts(args.corpus)
    train = sequences(train_texts, tokenizer, args.seq_len, args.tokens, args.seed)
    heldout = sequences(heldout_texts, tokenizer, args.seq_len, args.heldout_tokens, args.seed)
    log(f"corpus: {corpus_desc}; {len(train)} training and {len(heldout)} held-out sequences of {args.seq_len}")

    generated_n = args.generate_tokens // args.seq_len
    if generated_n:
        own = generated_sequences(gen, train_texts, args.seq_len, args.prompt_len, generated_n, args.generate_batch,
                                  args.seed, work / "generated.pt", log)
        train = torch.cat([train, own])
        log(f"{len(own)} sequences the target continued itself ({len(own) * (args.seq_len - args.prompt_len)} tokens)")
    stores = {}
    for name, seqs in (("train", train), ("heldout", heldout)):
        store = Store(work / name, len(seqs), args.seq_len, 3 * hidden, hidden)
        collect(target, seqs, store, layers, args.collect_batch, device, log)
        stores[name] = store
    collect_s = time.perf_counter() - started
    log(f"collected in {collect_s:.0f} s")

    counts = np.bincount(np.asarray(stores["train"].greedy).ravel(), minlength=vocab)
    size = vocab if args.draft_vocab in (0, vocab) else min(args.draft_vocab, vocab)
    draft_ids = torch.from_numpy(np.sort(np.argsort(-counts, kind="stable")[:size])).long()
    coverage = counts[draft_ids.numpy()].sum() / max(counts.sum(), 1)
    log(f"draft vocabulary: {size} tokens, {coverage:.4f} of the target's greedy tokens on the corpus")

    config = head_config(target, draft_vocab=size, intermediate=args.intermediate, layers=layers)
    head = init_head(config, target, draft_ids).to(device)
    embed = target.get_input_embeddings()
    embed.requires_grad_(False)
    target_head = target.get_output_embeddings().weight[draft_ids.to(device)].float().detach()
    in_draft = torch.zeros(vocab, dtype=torch.bool, device=device)
    in_draft[draft_ids.to(device)] = True
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    n_train = len(train)
    steps_per_epoch = n_train // args.batch
    total_steps = max(1, int(args.epochs * steps_per_epoch))
    step = 0
    ckpt = work / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        log(f"resumed from step {step}")
    log(f"head: {sum(p.numel() for p in params)} parameters; {total_steps} steps of {args.batch} sequences")
    float_dtype = torch.float32
    embed_f = lambda ids: embed(ids).to(float_dtype)
    t0 = time.perf_counter()
    first = step
    losses: list[float] = []
    head.train()
    while step < total_steps:
        epoch = step // steps_per_epoch
        order = np.random.default_rng(args.seed + epoch).permutation(n_train)
        skip = (step % steps_per_epoch) * args.batch
        for tokens, feats, labels, ok in batches_of(stores["train"], order[skip:], args.batch, draft_ids, target_head,
                                                    train, float_dtype, device, in_draft):
            lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss, agree, count = ttt_loss(head, embed_f, tokens, feats, labels, ok, args.ttt_steps)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            step += 1
            losses.append(float(loss.detach()))
            rate = (step - first) / (time.perf_counter() - t0)
            accs = " ".join(f"{a / max(c, 1):.3f}" for a, c in zip(agree, count))
            log(f"step {step}/{total_steps} loss {float(loss):.4f} top-1 by step {accs} lr {lr:.2e} "
                f"({rate:.2f} steps/s, {(total_steps - step) / max(rate, 1e-9) / 60:.1f} min left)",
                progress=step < total_steps)
            if step % args.checkpoint_every == 0 or step == total_steps:
                torch.save({"head": head.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, ckpt)
            if step >= total_steps:
                break
    train_s = time.perf_counter() - t0
    head.eval()
    agree_all = np.zeros(args.ttt_steps)
    count_all = np.zeros(args.ttt_steps)
    with torch.no_grad():
        for tokens, feats, labels, ok in batches_of(stores["heldout"], np.arange(len(heldout)), 1, draft_ids,
                                                    target_head, heldout, float_dtype, device, in_draft):
            _, agree, count = ttt_loss(head, embed_f, tokens, feats, labels, ok, args.ttt_steps)
            agree_all[: len(agree)] += agree
            count_all[: len(count)] += count
    by_step = (agree_all / np.maximum(count_all, 1)).tolist()
    expected = 1.0 + sum(float(np.prod(by_step[: j + 1])) for j in range(len(by_step)))
    log(f"held-out top-1 agreement by step {['%.3f' % a for a in by_step]}; "
        f"about {expected:.2f} tokens per target forward at K={len(by_step)} (greedy)")
    summary = {
        "command": "python benchmarks/train_head.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "target": args.target, "target_layers_read": list(layers), "corpus": corpus_desc,
        "train_sequences": n_train, "seq_len": args.seq_len, "train_tokens": n_train * args.seq_len,
        "generated_sequences": generated_n, "prompt_len": args.prompt_len if generated_n else None,
        "heldout_tokens": len(heldout) * args.seq_len, "draft_vocab": size, "draft_vocab_coverage": float(coverage),
        "head_parameters": sum(p.numel() for p in params), "steps": total_steps, "batch": args.batch,
        "ttt_steps": args.ttt_steps, "lr": args.lr, "epochs": args.epochs,
        "final_train_loss": float(np.mean(losses[-20:])) if losses else None,
        "heldout_top1_by_step": by_step, "heldout_expected_tokens_per_forward": expected,
        "collect_seconds": collect_s, "train_seconds": train_s,
        "machine": machine_description(args.threads), "device": str(device),
    }
    extra = {"target": args.target, "target_fingerprint": weight_fingerprint(target), "training": summary}
    if 0 < args.greedy_vocab < size:
        extra["greedy_draft_ids"], summary["greedy_vocab_coverage"] = greedy_draft_ids(
            torch.from_numpy(counts), head, args.greedy_vocab)
        summary["greedy_vocab"] = len(extra["greedy_draft_ids"])
    save_head(head, out, dtype=getattr(torch, args.save_dtype), extra=extra)
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_card(out, summary)
    log(f"saved to {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB)")
    return 0


def write_card(out: Path, s: dict) -> None:
    by_step = ", ".join(f"{a:.3f}" for a in s["heldout_top1_by_step"])
    text = f"""# EAGLE-3 head for {s['target']}

A one-layer EAGLE-3 draft head (drafter "eagle" in specdec) in the published EAGLE-3 layout
(config.json + model.safetensors, as vLLM's and SGLang's `llama_eagle3` loaders read it),
trained by `benchmarks/train_head.py`. It reads the target's hidden states entering layers
{s['target_layers_read']} and drafts over a {s['draft_vocab']}-token draft vocabulary (d2t / t2d
map it to the target's ids; it covers {s['draft_vocab_coverage']:.2%} of the target's greedy
tokens on the training corpus). Its config records the target's weight fingerprint: beside
any other target it is refused.

- Data: {s['corpus']}; {s['train_tokens']} training tokens in {s['train_sequences']} sequences of
  {s['seq_len']}, of which {s['generated_sequences']} are a {s['prompt_len']}-token corpus prompt continued by the
  target itself (half greedy, half sampled at temperature 0.8); the target's hidden states collected
  once; {s['heldout_tokens']} held-out tokens of held-out corpus text.
- Training: {s['steps']} steps of {s['batch']} sequences ({s['epochs']} epochs), AdamW at lr {s['lr']},
  training-time test over {s['ttt_steps']} unrolled steps, soft labels from the target's
  distribution; {s['head_parameters']} trainable parameters (embeddings shared with the target).
  Final training loss {s['final_train_loss']:.4f}.
- Held-out top-1 agreement with the target by drafted position: {by_step}; about
  {s['heldout_expected_tokens_per_forward']:.2f} tokens per target forward at K = {len(s['heldout_top1_by_step'])}
  (greedy, teacher-forced estimate; the benchmark measures the real figure).
- Time: {s['collect_seconds']:.0f} s collecting, {s['train_seconds']:.0f} s training on {s['machine']}
  ({s['device']}).
- Command: `{s['command']}`
"""
    (out / "MODEL_CARD.md").write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
