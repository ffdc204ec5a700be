"""Train the demo model: a small LLaDA2.0 (llada2_moe) that answers the tasks of
`tide_local.demo_tasks`, from scratch, with torch on the CPU.

    python scripts/train_demo.py OUT_DIR [--minutes 50] [--seed 0]

Writes OUT_DIR/hf (the Hugging Face layout `tide convert` takes: config.json, tokenizer,
model.safetensors in F32), OUT_DIR/loss.png and OUT_DIR/train_log.json (arguments, commit,
loss per step, expert load). Then:

    tide convert OUT_DIR/hf -o demo.gguf --type q8_0

The model is the LLaDA2.0 architecture at a small scale: a dense first layer, then MoE layers
with group-limited sigmoid routing, a selection-only expert bias, routed scaling and a shared
expert; partial NeoX RoPE, QK norm, an untied LM head. The objective is LLaDA2's block
diffusion: blocks of 32 tokens aligned at position 0, block-causal attention, a clean prefix
and one noisy block whose answer positions are masked with probability t ~ U(0, 1), cross-
entropy on the masked positions. Experts are balanced without an auxiliary loss: after every
optimizer step each layer's expert bias moves by `--bias-rate` towards even load
(DeepSeek-V3's rule, which LLaDA2 inherits). torch is needed here only.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tide_local.converters.testmodel import CHAT_TEMPLATE, bpe_tokenizer_json, build_config, write_metadata
from tide_local.demo_tasks import TASKS, WORDS, column_addition, column_subtraction, evaluation_set, example
from tide_local.tokenizer import Tokenizer

BLOCK = 32

def demo_tokenizer():
    """Byte-level BPE with the LLaDA2 split regex and special tokens, trained on the tasks' text:
    every word of the reverse task is one token (with and without its leading space), digits are
    single tokens (the split regex's rule), anything else falls back to bytes."""
    from tokenizers import Tokenizer

    lines = [f"{w} {w} {w}\n" for w in WORDS for _ in range(3)]
    lines += ["What is 12 + 34?\n", "What is 56 - 78?\n", "Sort: 9 1 5\n", "Reverse: pear fig\n",
              column_addition(12, 34) + "\n", column_subtraction(56, 78) + "\n",
              "SYSTEM HUMAN ASSISTANT OBSERVATION detailed thinking off\n"] * 8
    tok = Tokenizer.from_str(bpe_tokenizer_json(lines, vocab_size=4096, min_frequency=2))
    for w in WORDS:
        for form in (w, " " + w):
            if len(tok.encode(form, add_special_tokens=False).ids) != 1:
                raise RuntimeError(f"{form!r} is not one token")
    return tok


TOKENIZER = demo_tokenizer()

# The demo shape: the tiny test preset (hidden 256, 4 heads of 64 over 2 KV heads, dense FFN 512,
# expert FFN 64, top-4 of 2 groups out of 4, a shared expert) with 5 layers and 32 experts.
DEMO_SHAPE = {
    "vocab_size": -(-TOKENIZER.get_vocab_size() // 64) * 64,
    "pad_token_id": TOKENIZER.token_to_id("<|endoftext|>"),
    "num_hidden_layers": 5,
    "num_experts": 32,
}


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


# Earlier turns before the question (0, 1 or 2), so that a chat can go on.
HISTORY_TURNS, HISTORY_WEIGHTS = (0, 1, 2), (0.8, 0.15, 0.05)


class Data:
    """Tokenized training samples: the chat prompt (the question, after 0-2 earlier turns of
    the same tasks), the answer, <|role_end|>, then end-of-text up to the end of the block
    (what the decoder produces), cut after one noisy block."""

    def __init__(self, seed: int, mix: dict[str, float]):
        self.tok = Tokenizer(TOKENIZER.to_str(), CHAT_TEMPLATE, source="the demo tokenizer")
        raw = TOKENIZER
        self.mask_id = raw.token_to_id("<|mask|>")
        self.eos_id = raw.token_to_id("<|endoftext|>")
        self.role_end_id = raw.token_to_id("<|role_end|>")
        self.rng = random.Random(seed)
        self.tasks, self.weights = list(mix), list(mix.values())
        self.held_out = {item.question for item in evaluation_set(200)}

    def example(self):
        while True:
            item = example(self.rng.choices(self.tasks, self.weights)[0], self.rng)
            if item.question not in self.held_out:
                return item

    def encode(self, history, item) -> tuple[list[int], list[int]]:
        messages = []
        for earlier in history:
            messages += [*earlier.messages(), {"role": "assistant", "content": earlier.answer}]
        text = self.tok.apply_chat_template(messages + item.messages(), add_generation_prompt=True)
        return self.tok.encode(text), self.tok.encode(item.answer) + [self.role_end_id]

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """(input ids, target ids or -100) of one noisy block over its clean prefix."""
        turns = self.rng.choices(HISTORY_TURNS, HISTORY_WEIGHTS)[0]
        history = [self.example() for _ in range(turns)]
        prompt, answer = self.encode(history, self.example())
        ids = prompt + answer
        P, n_blocks = len(prompt), -(-(len(ids) + 1) // BLOCK)
        ids = np.array(ids + [self.eos_id] * (n_blocks * BLOCK - len(ids)), dtype=np.int64)
        b = self.rng.randint(P // BLOCK, n_blocks - 1)
        ids = ids[: (b + 1) * BLOCK]
        start = max(P, b * BLOCK)
        t = self.rng.random()
        masked = np.array([self.rng.random() < t for _ in range(start, len(ids))])
        if not masked.any():
            masked[self.rng.randrange(masked.size)] = True
        target = np.full(ids.size, -100, dtype=np.int64)
        where = start + np.flatnonzero(masked)
        target[where] = ids[where]
        inputs = ids.copy()
        inputs[where] = self.mask_id
        return inputs, target

    def batch(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """About `tokens` tokens of samples of one length (a length bucket keeps padding out)."""
        first = self.sample()
        length = first[0].size
        rows = [first]
        while len(rows) * length < tokens:
            s = self.sample()
            if s[0].size == length:
                rows.append(s)
        return torch.from_numpy(np.stack([r[0] for r in rows])), torch.from_numpy(np.stack([r[1] for r in rows]))


# ---------------------------------------------------------------------------------------------
# Model (HF parameter names, so saving is a rename-free dump)
# ---------------------------------------------------------------------------------------------


def rms_norm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


class LLaDA2(torch.nn.Module):
    def __init__(self, c: dict, seed: int):
        super().__init__()
        self.c = c
        g = torch.Generator().manual_seed(seed)
        H, V, L = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
        nh, nkv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        E, m, F_ = c["num_experts"], c["moe_intermediate_size"], c["intermediate_size"]
        std, out_std = 0.02, 0.02 / math.sqrt(2 * L)
        self.params = torch.nn.ParameterDict()

        def p(name, shape, scale=std, ones=False):
            value = torch.ones(shape) if ones else torch.randn(shape, generator=g) * scale
            self.params[name.replace(".", "__")] = torch.nn.Parameter(value)

        p("model.word_embeddings.weight", (V, H))
        p("model.norm.weight", (H,), ones=True)
        p("lm_head.weight", (V, H))
        for i in range(L):
            pre = f"model.layers.{i}."
            p(pre + "input_layernorm.weight", (H,), ones=True)
            p(pre + "post_attention_layernorm.weight", (H,), ones=True)
            p(pre + "attention.query_key_value.weight", ((nh + 2 * nkv) * hd, H))
            p(pre + "attention.query_layernorm.weight", (hd,), ones=True)
            p(pre + "attention.key_layernorm.weight", (hd,), ones=True)
            p(pre + "attention.dense.weight", (H, nh * hd), out_std)
            if i < c["first_k_dense_replace"]:
                p(pre + "mlp.gate_proj.weight", (F_, H))
                p(pre + "mlp.up_proj.weight", (F_, H))
                p(pre + "mlp.down_proj.weight", (H, F_), out_std)
            else:
                p(pre + "mlp.gate.weight", (E, H))
                p(pre + "mlp.experts.gate", (E, m, H))  # stacked; saved per expert
                p(pre + "mlp.experts.up", (E, m, H))
                p(pre + "mlp.experts.down", (E, H, m), out_std)
                p(pre + "mlp.shared_experts.gate_proj.weight", (m, H))
                p(pre + "mlp.shared_experts.up_proj.weight", (m, H))
                p(pre + "mlp.shared_experts.down_proj.weight", (H, m), out_std)
                self.register_buffer(f"bias{i}", torch.zeros(E))
        r = int(hd * c["partial_rotary_factor"])
        self.inv_freq = 1.0 / (c["rope_theta"] ** (torch.arange(0, r, 2).float() / r))
        self.loads: dict[int, torch.Tensor] = {}

    def w(self, name):
        return self.params[name.replace(".", "__")]

    def rope(self, x, pos):
        r = self.inv_freq.numel() * 2
        ang = pos.float()[:, None] * self.inv_freq[None, :]
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        rot, rest = x[..., :r], x[..., r:]
        half = torch.cat([-rot[..., r // 2:], rot[..., : r // 2]], -1)
        return torch.cat([rot * cos + half * sin, rest], -1)

    def attention(self, i, x, pos, allowed):
        c, pre = self.c, f"model.layers.{i}.attention."
        nh, nkv, hd, eps = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["rms_norm_eps"]
        Bt, T, _ = x.shape
        qkv = F.linear(x, self.w(pre + "query_key_value.weight")).view(Bt, T, nh + 2 * nkv, hd)
        q = rms_norm(qkv[:, :, :nh], self.w(pre + "query_layernorm.weight"), eps)
        k = rms_norm(qkv[:, :, nh: nh + nkv], self.w(pre + "key_layernorm.weight"), eps)
        v = qkv[:, :, nh + nkv:]
        q, k = self.rope(q.transpose(1, 2), pos), self.rope(k.transpose(1, 2), pos)
        out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=allowed, enable_gqa=True)
        return F.linear(out.transpose(1, 2).reshape(Bt, T, nh * hd), self.w(pre + "dense.weight"))

    def moe(self, i, x):
        c, pre = self.c, f"model.layers.{i}.mlp."
        E, K, G, TG = c["num_experts"], c["num_experts_per_tok"], c["n_group"], c["topk_group"]
        N = x.shape[0]
        scores = torch.sigmoid(F.linear(x, self.w(pre + "gate.weight")))
        with torch.no_grad():
            choice = (scores + getattr(self, f"bias{i}")).view(N, G, E // G)
            kept = choice.topk(2, -1).values.sum(-1).topk(TG, -1).indices
            keep = torch.zeros(N, G, dtype=torch.bool).scatter_(1, kept, True)
            choice = choice.masked_fill(~keep[:, :, None], float("-inf")).view(N, E)
            idx = choice.topk(K, -1).indices  # [N, K]
        weights = scores.gather(1, idx)
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20) * c["routed_scaling_factor"]
        flat = idx.reshape(-1)
        counts = torch.bincount(flat, minlength=E)
        self.loads[i] = counts
        # rows grouped by expert, one matmul per expert: no padding to the busiest expert's load
        # (an unbalanced router early in training made a padded batched matmul 5x the work)
        order = torch.argsort(flat, stable=True)
        token = order // K
        gate, up, down = self.w(pre + "experts.gate"), self.w(pre + "experts.up"), self.w(pre + "experts.down")
        parts = []
        for e, rows in enumerate(torch.split(x[token], counts.tolist())):
            if rows.shape[0]:
                parts.append(F.linear(F.silu(F.linear(rows, gate[e])) * F.linear(rows, up[e]), down[e]))
        y = torch.cat(parts) * weights.reshape(-1)[order, None]
        out = torch.zeros_like(x).index_add_(0, token, y)
        s = pre + "shared_experts."
        shared = F.linear(F.silu(F.linear(x, self.w(s + "gate_proj.weight"))) * F.linear(x, self.w(s + "up_proj.weight")),
                          self.w(s + "down_proj.weight"))
        return out + shared

    def forward(self, ids, rows=None):
        c, eps = self.c, self.c["rms_norm_eps"]
        Bt, T = ids.shape
        pos = torch.arange(T)
        blk = pos // BLOCK
        allowed = blk[None, :] <= blk[:, None]
        h = self.w("model.word_embeddings.weight")[ids]
        for i in range(c["num_hidden_layers"]):
            pre = f"model.layers.{i}."
            h = h + self.attention(i, rms_norm(h, self.w(pre + "input_layernorm.weight"), eps), pos, allowed)
            x = rms_norm(h, self.w(pre + "post_attention_layernorm.weight"), eps)
            if i < c["first_k_dense_replace"]:
                m = pre + "mlp."
                ffn = F.linear(F.silu(F.linear(x, self.w(m + "gate_proj.weight"))) * F.linear(x, self.w(m + "up_proj.weight")),
                               self.w(m + "down_proj.weight"))
            else:
                ffn = self.moe(i, x.reshape(Bt * T, -1)).view(Bt, T, -1)
            h = h + ffn
        h = rms_norm(h, self.w("model.norm.weight"), eps)
        if rows is not None:
            h = h[rows]
        return F.linear(h, self.w("lm_head.weight"))

    @torch.no_grad()
    def balance(self, rate: float) -> None:
        """The aux-loss-free update: move each expert's bias towards even load."""
        for i, counts in self.loads.items():
            bias = getattr(self, f"bias{i}")
            bias += rate * torch.sign(counts.float().mean() - counts.float())

    def hf_state(self) -> dict[str, np.ndarray]:
        """The weights under their Hugging Face names, float32, experts unstacked."""
        out = {}
        for key, value in self.params.items():
            name, value = key.replace("__", "."), value.detach().float()
            if ".mlp.experts." in name:
                pre, proj = name.rsplit(".", 1)
                for e in range(value.shape[0]):
                    out[f"{pre}.{e}.{proj}_proj.weight"] = value[e].contiguous().numpy()
            else:
                out[name] = value.contiguous().numpy()
        for i in range(self.c["first_k_dense_replace"], self.c["num_hidden_layers"]):
            out[f"model.layers.{i}.mlp.gate.expert_bias"] = getattr(self, f"bias{i}").float().numpy().copy()
        return out


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


# Arithmetic and sorting take far more examples to learn than reversing words.
DEFAULT_MIX = "add=0.3,sub=0.3,sort=0.25,reverse=0.15"


def task_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        task, _, share = part.partition("=")
        if task not in TASKS:
            raise argparse.ArgumentTypeError(f"unknown task {task!r} (one of {', '.join(TASKS)})")
        mix[task] = float(share)
    return mix


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def plot(path: Path, losses: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    smooth = np.convolve(losses, np.ones(25) / 25, mode="valid") if len(losses) > 50 else losses
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(losses, alpha=0.3, label="per step")
    ax.plot(np.arange(len(smooth)) + (len(losses) - len(smooth)), smooth, label="mean of 25")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("masked-token cross-entropy")
    ax.set_yscale("log")
    ax.set_title("demo model: block-diffusion training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=3000, help="optimizer steps (default 3000)")
    ap.add_argument("--minutes", type=float, default=55.0,
                    help="stop after this many minutes even if steps remain; the learning rate's cosine "
                         "follows whichever of steps and minutes runs out first (default 55)")
    ap.add_argument("--batch-tokens", type=int, default=3072, help="tokens per optimizer step (default 3072)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--bias-rate", type=float, default=1e-3, help="expert-bias update per step (default 1e-3)")
    ap.add_argument("--mix", type=task_mix, default=task_mix(DEFAULT_MIX),
                    help=f"share of each task in the samples (default {DEFAULT_MIX})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    from tqdm import tqdm

    config = build_config("tiny", DEMO_SHAPE)
    data = Data(args.seed, args.mix)
    model = LLaDA2(config, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f} M parameters; {args.steps} steps of ~{args.batch_tokens} tokens, "
          f"at most {args.minutes:g} min", file=sys.stderr)
    decay = [p for n, p in model.params.items() if p.dim() >= 2]
    rest = [p for n, p in model.params.items() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 30)

    def progress(step):
        # whichever budget binds first, steps or minutes, so a slower machine still anneals fully
        return max((step - warmup) / max(1, args.steps - warmup), (time.monotonic() - started) / (args.minutes * 60))

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress(step)))))

    losses, accs = [], []
    started = time.monotonic()
    bar = tqdm(range(args.steps), desc="training", unit="step", file=sys.stderr)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        inputs, target = data.batch(args.batch_tokens)
        rows = target >= 0
        logits = model(inputs, rows)
        labels = target[rows]
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.balance(args.bias_rate)
        losses.append(float(loss.detach()))
        accs.append(float((logits.argmax(-1) == labels).float().mean()))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", acc=f"{np.mean(accs[-20:]):.3f}",
                            lr=f"{lr_at(step):.1e}")
        if progress(step) >= 1:
            print(f"time budget reached after {step + 1} steps", file=sys.stderr)
            break
    bar.close()
    minutes = (time.monotonic() - started) / 60

    args.out.mkdir(parents=True, exist_ok=True)
    hf = args.out / "hf"
    hf.mkdir(exist_ok=True)
    write_metadata(hf, config, TOKENIZER)
    from safetensors.numpy import save_file

    save_file(model.hf_state(), str(hf / "model.safetensors"), metadata={"format": "pt"})
    loads = {i: (c.float() / c.sum()).tolist() for i, c in model.loads.items()}
    (args.out / "train_log.json").write_text(json.dumps({
        "command": "python scripts/train_demo.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "commit": commit(), "torch": torch.__version__, "parameters": n_params, "steps": len(losses),
        "minutes": round(minutes, 2), "args": {k: str(v) for k, v in vars(args).items()},
        "loss": losses, "masked_token_accuracy": accs, "last_batch_expert_share": loads,
    }, indent=1))
    plot(args.out / "loss.png", losses)
    print(f"trained {len(losses)} steps in {minutes:.1f} min; final loss {np.mean(losses[-50:]):.4f}; wrote {hf}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
