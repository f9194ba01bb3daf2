"""Name the greedy draft ids of an EAGLE-3 head: the draft ids its target emits most often.

A head's greedy drafts are chosen among the ids its config names under
specdec.greedy_draft_ids (specdec.eagle: an LM head of N rows instead of the draft
vocabulary's; each logit is the full head's, so the draft is the same wherever the full
head's choice is among them). This counts the target's greedy next token over the training
split of a corpus, keeps the `--size` most frequent draft ids, reports how much of the
target's greedy tokens they cover there and on the held-out split, and writes them into the
head's config.json.

    python -P benchmarks/greedy_vocab.py --target bundled --head specdec/assets/default_pair/eagle --size 512
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_head import corpus_texts, sequences
from train_pair import machine_description

from specdec.eagle import load_head
from specdec.eagle_training import greedy_draft_ids, target_states


def greedy_counts(target, seqs: torch.Tensor, layers, batch: int) -> torch.Tensor:
    vocab = target.get_input_embeddings().weight.shape[0]
    counts = torch.zeros(vocab, dtype=torch.long)
    with torch.inference_mode():
        for i in range(0, len(seqs), batch):
            _, _, greedy = target_states(target, seqs[i: i + batch], layers)
            counts += torch.bincount(greedy.flatten().cpu(), minlength=vocab)
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="bundled", help="what SpeculativeGenerator.from_pretrained takes")
    p.add_argument("--head", required=True, help="the head's folder (EAGLE-3 layout); its config.json is rewritten")
    p.add_argument("--corpus", default="stdlib", help='"stdlib" or a .txt / .jsonl file (as train_head.py)')
    p.add_argument("--size", type=int, default=512, help="greedy draft ids to name")
    p.add_argument("--tokens", type=int, default=200_000, help="training-split tokens to count over")
    p.add_argument("--heldout-tokens", type=int, default=20_000)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from specdec import SpeculativeGenerator

    start = time.perf_counter()
    gen = SpeculativeGenerator.from_pretrained(args.target, head=None)
    target, tokenizer = gen.target_model, gen.tokenizer
    folder = Path(args.head)
    head = load_head(folder)
    train_texts, heldout_texts, corpus = corpus_texts(args.corpus)
    layers = head.aux_layers
    train = greedy_counts(target, sequences(train_texts, tokenizer, args.seq_len, args.tokens, 0), layers, args.batch)
    heldout = greedy_counts(target, sequences(heldout_texts, tokenizer, args.seq_len, args.heldout_tokens, 0), layers,
                            args.batch)
    ids, coverage = greedy_draft_ids(train, head, args.size)
    chosen = head.draft_to_target()[torch.tensor(ids)]
    heldout_coverage = float(heldout[chosen].sum() / heldout.sum().clamp(min=1))
    record = {"size": len(ids), "of_draft_vocab": head.draft_vocab_size, "corpus": corpus,
              "train_tokens": int(train.sum()), "train_coverage": coverage, "heldout_tokens": int(heldout.sum()),
              "heldout_coverage": heldout_coverage, "distinct_greedy_tokens_train": int((train > 0).sum()),
              "seconds": round(time.perf_counter() - start, 1), "machine": machine_description(args.threads),
              "command": "python -P benchmarks/greedy_vocab.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    config = json.loads((folder / "config.json").read_text())
    config.setdefault("specdec", {})["greedy_draft_ids"] = ids
    config["specdec"]["greedy_vocab"] = record
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
