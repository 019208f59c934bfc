"""Train a small transformer classifier on long ListOps-style sequences, twice: with torch_nystrom's
Nyström attention and with exact attention (scaled_dot_product_attention), the model otherwise the same.

The task is generated here, in the manner of the Long Range Arena's ListOps (Tay et al., 2021): nested
expressions over the digits 0-9 with the operators MAX, MIN, MED (median, rounded down) and SM (sum
modulo 10), written as tokens ``[MAX 2 9 [MIN 4 7 ] 0 ]``; the label is the value, 10 classes. Every
sequence has a length drawn uniformly in [--min-len, --max-len] (default 1000-2000 tokens) and is
built to exactly that length.

Both models start from the same weights and train in lock step on the same batches (so a busy machine
slows both alike). Writes to --out:

    train_long_classifier.csv   one row per evaluation: attention, step, training loss (mean since the
                                previous row), held-out accuracy, median ms per training step so far,
                                seconds of training so far
    train_long_classifier.png   training loss and held-out accuracy against the step, and ms per step

    python examples/train_long_classifier.py                  # the default: a few minutes on a CPU
    python examples/train_long_classifier.py --steps 2000 --eval-every 200

It shows whether the approximation trains as exact attention does, and what a step of each costs; a
short run is far from what long training reaches (see the README).
"""
import argparse
import csv
import math
import os
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import torch_nystrom

# ------------------------------------------------------------------------------------------ the task

PAD, CLOSE = 0, 11
DIGITS = list(range(1, 11))  # token 1 + d is the digit d
OPS = {12: "MAX", 13: "MIN", 14: "MED", 15: "SM"}
VOCAB = 16
NUM_CLASSES = 10


def _apply(op, values):
    if op == "MAX":
        return max(values)
    if op == "MIN":
        return min(values)
    if op == "MED":
        return int(statistics.median(values))
    return sum(values) % 10


def _split(rng, inner, max_args):
    """Budgets of the children of an operator with `inner` tokens between its brackets: 1 (a digit) or
    >= 3 (an operator with at least one operand), 2..max_args of them where possible (1 where not),
    the subtrees of about equal size, so that the depth grows like the log of the length."""
    lo = 2
    while True:
        k = rng.randint(min(lo, inner), min(max_args, inner))
        if k == inner:
            return [1] * k
        most = min(k, (inner - k) // 2)  # a digit grows into a subtree with 2 more tokens
        if most < 1:
            lo = 1
            continue
        j = rng.randint((most + 1) // 2, most)
        total = inner - (k - j)  # the subtrees' tokens, >= 3 j
        weights = [rng.uniform(0.5, 1.5) for _ in range(j)]
        spare = total - 3 * j
        sizes = [3 + int(spare * w / sum(weights)) for w in weights]
        for i in range(total - sum(sizes)):
            sizes[i % j] += 1
        sizes += [1] * (k - j)
        rng.shuffle(sizes)
        return sizes


def expression(rng, length, max_args):
    """(tokens, value) of a random expression of exactly `length` tokens (1 or >= 3)."""
    out = []

    def node(budget):
        if budget == 1:
            d = rng.randrange(10)
            out.append(DIGITS[d])
            return d
        op_token = rng.choice(list(OPS))
        out.append(op_token)
        values = [node(size) for size in _split(rng, budget - 2, max_args)]
        out.append(CLOSE)
        return _apply(OPS[op_token], values)

    value = node(length)
    return out, value


def depth(tokens):
    """Nesting depth of an expression."""
    level = most = 0
    for t in tokens:
        level += t in OPS
        level -= t == CLOSE
        most = max(most, level)
    return most


def sample_lengths(rng, count, min_len, max_len):
    return [rng.randint(min_len, max_len) for _ in range(count)]


def make_batch(rng, batch_size, min_len, max_len, max_args):
    """(tokens (B, L) long, key padding mask (B, L) bool, True = padding, labels (B,))."""
    seqs, labels = [], []
    for n in sample_lengths(rng, batch_size, min_len, max_len):
        tokens, value = expression(rng, n, max_args)
        seqs.append(tokens)
        labels.append(value)
    width = max(len(s) for s in seqs)
    tokens = torch.full((batch_size, width), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
    return tokens, tokens == PAD, torch.tensor(labels)


# ----------------------------------------------------------------------------------------- the model


class ExactAttention(nn.Module):
    """Multi-head self-attention with scaled_dot_product_attention; the parameters (q/k/v/out projections)
    and the forward(x, key_padding_mask) of torch_nystrom.NystromAttention, so the same weights load."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, key_padding_mask=None):
        b, n, e = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(o.transpose(1, 2).reshape(b, n, e))


class Block(nn.Module):
    def __init__(self, dim, heads, attention, landmarks):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        if attention == "nystrom":
            self.attn = torch_nystrom.NystromAttention(dim, heads, num_landmarks=landmarks)
        else:
            self.attn = ExactAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, pad):
        x = x + self.attn(self.norm1(x), key_padding_mask=pad)
        return x + self.mlp(self.norm2(x))


class Classifier(nn.Module):
    """Token and learned position embeddings, pre-norm blocks, the mean over real tokens, a linear head."""

    def __init__(self, attention, dim, heads, layers, landmarks, max_len):
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, dim, padding_idx=PAD)
        self.positions = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, attention, landmarks) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, tokens, pad):
        x = self.tokens(tokens) + self.positions(torch.arange(tokens.size(1)))[None]
        for block in self.blocks:
            x = block(x, pad)
        real = (~pad).unsqueeze(-1).to(x.dtype)
        return self.head(self.norm((x * real).sum(1) / real.sum(1)))


# -------------------------------------------------------------------------------------- the training


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100, help="training steps per model")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--min-len", type=int, default=1000, help="shortest sequence (tokens)")
    p.add_argument("--max-len", type=int, default=2000, help="longest sequence (tokens)")
    p.add_argument("--max-args", type=int, default=10, help="most operands of one operator")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--landmarks", type=int, default=64, help="Nyström landmarks m")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-size", type=int, default=128, help="held-out sequences")
    p.add_argument("--eval-every", type=int, default=20, help="steps between evaluations")
    p.add_argument("--attention", nargs="+", default=["nystrom", "sdpa"], choices=["nystrom", "sdpa"])
    p.add_argument("--threads", type=int, help="intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "dim", "heads", "layers", "landmarks", "eval_size", "eval_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.min_len < 3 or args.max_len < args.min_len:
        p.error("need 3 <= --min-len <= --max-len")
    if args.max_args < 2:
        p.error("--max-args must be >= 2")
    if args.dim % args.heads:
        p.error("--dim must be a multiple of --heads")
    return args


def evaluate(model, batches):
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for tokens, pad, labels in batches:
            correct += (model(tokens, pad).argmax(-1) == labels).sum().item()
            total += labels.numel()
    model.train()
    return correct / total


def train(attentions, args, eval_batches, progress):
    """Train one model per attention in lock step: every step draws one batch and runs each model on it,
    so both see the same data and share whatever else the machine is doing. Rows for the CSV."""
    torch.manual_seed(args.seed)
    init = Classifier("sdpa", args.dim, args.heads, args.layers, args.landmarks, args.max_len).state_dict()
    runs = {}
    for attention in attentions:
        model = Classifier(attention, args.dim, args.heads, args.layers, args.landmarks, args.max_len)
        model.load_state_dict(init)  # the same start (the attention layers have the same parameters)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
        warmup = max(1, args.steps // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
        runs[attention] = dict(model=model, opt=opt, sched=sched, losses=[], ms=[], seconds=0.0)
    rng = random.Random(args.seed)
    rows = []
    bar = progress(range(1, args.steps + 1), desc="+".join(attentions), unit="step")
    for step in bar:
        tokens, pad, labels = make_batch(rng, args.batch_size, args.min_len, args.max_len, args.max_args)
        for attention, run in runs.items():
            t0 = time.perf_counter()
            loss = F.cross_entropy(run["model"](tokens, pad), labels)
            run["opt"].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(run["model"].parameters(), 1.0)
            run["opt"].step()
            run["sched"].step()
            elapsed = time.perf_counter() - t0
            run["ms"].append(1e3 * elapsed)
            run["seconds"] += elapsed
            run["losses"].append(loss.item())
            if not math.isfinite(run["losses"][-1]):
                sys.exit(f"{attention}: the loss is not finite at step {step}")
        if step % args.eval_every == 0 or step == args.steps:
            postfix = {}
            for attention, run in runs.items():
                acc = evaluate(run["model"], eval_batches)
                rows.append(dict(attention=attention, step=step, train_loss=statistics.fmean(run["losses"]),
                                 eval_accuracy=acc, ms_per_step=statistics.median(run["ms"]),
                                 seconds=run["seconds"]))
                run["losses"] = []
                postfix[attention] = f"loss {rows[-1]['train_loss']:.3f} acc {acc:.3f}"
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(postfix)
    return rows


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["attention"] for r in rows))
    label = {"nystrom": "torch_nystrom (Nyström)", "sdpa": "exact (SDPA)"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name in names:
        mine = [r for r in rows if r["attention"] == name]
        steps = [r["step"] for r in mine]
        axes[0].plot(steps, [r["train_loss"] for r in mine], marker="o", label=label[name])
        axes[1].plot(steps, [100 * r["eval_accuracy"] for r in mine], marker="o", label=label[name])
    ms = [[r for r in rows if r["attention"] == name][-1]["ms_per_step"] for name in names]
    axes[2].bar([label[n] for n in names], ms, color=["C0", "C1"][: len(names)])
    for ax, t in zip(axes, ("training loss", "held-out accuracy (%)", "median ms per training step")):
        ax.set_title(t, fontsize=10)
        ax.grid(True, alpha=0.3)
    for ax in axes[:2]:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_progress:
        def progress(it, **kw):
            return it
    else:
        from tqdm import tqdm as progress
    os.makedirs(args.out, exist_ok=True)
    eval_rng = random.Random(args.seed + 1_000_003)
    eval_batches = [make_batch(eval_rng, min(args.batch_size, args.eval_size - i), args.min_len, args.max_len,
                               args.max_args) for i in range(0, args.eval_size, args.batch_size)]
    labels = torch.cat([b[2] for b in eval_batches])
    majority = labels.bincount(minlength=NUM_CLASSES).max().item() / labels.numel()
    rows = train(args.attention, args, eval_batches, progress)

    csv_path = os.path.join(args.out, "train_long_classifier.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    png_path = os.path.join(args.out, "train_long_classifier.png")
    title = (f"ListOps-style, {args.min_len}-{args.max_len} tokens, {args.steps} steps of batch {args.batch_size}; "
             f"dim {args.dim}, {args.heads} heads, {args.layers} layers, m={args.landmarks}; "
             f"{torch.get_num_threads()} threads; held-out majority class {100 * majority:.1f}%")
    plot(rows, png_path, title)
    print(f"held-out majority class: {100 * majority:.1f}%")
    for attention in args.attention:
        last = [r for r in rows if r["attention"] == attention][-1]
        print(f"{attention:>8}: step {last['step']}, loss {last['train_loss']:.3f}, held-out accuracy "
              f"{100 * last['eval_accuracy']:.1f}%, {last['ms_per_step']:.0f} ms per step, {last['seconds']:.0f} s")
    print(f"wrote {csv_path}\nwrote {png_path}")


if __name__ == "__main__":
    main()
