#!/usr/bin/env python3
"""PyTorch + PEFT LoRA training baseline (CPU), the reference for `persona bench --train`.

    python scripts/train_baseline.py [--model PATH] [--data FILE] [--threads 2] [--steps 4] [--batch 8] [--rank 16]

Times the step `persona bench --train` times: LoRA rank r (alpha 2r, rsLoRA, no dropout) on
q, k, v, o, gate, up, down; batches of `--batch` rows in file order; loss on the answer tokens;
global gradient-norm clip 1.0; AdamW lr 1e-4, weight decay 0.01. One untimed warm-up step, then
`--steps` timed steps. Prints one JSON line: seconds per step, training tokens (prompt + answer)
per second, the losses (warm-up step first) and the torch version.

--model: SmolLM2-135M-Instruct (or another Llama-family chat model) as a Hugging Face folder or a
GGUF file. A GGUF is dequantised once with transformers' GGUF loader into
$XDG_CACHE_HOME/persona/hf/<name>/ (~/.cache/... without XDG_CACHE_HOME) and read from there
afterwards. Default: the model `persona fetch` caches, $XDG_CACHE_HOME/persona/SmolLM2-135M-Instruct.Q4_1.gguf.

--data: JSONL rows with "question" and "answer" (the extraction files under vectors/); rows
whose "label" is not "pos" are skipped. Each row is the chat-templated question (generation
prompt on) followed by `answer + "<|im_end|>"`, tokenised separately.

Needs: pip install torch transformers peft gguf
"""
import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cache_dir():
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "persona" if xdg else Path.home() / ".cache" / "persona"


def gguf_to_hf(gguf, log):
    """The HF folder for a GGUF file, converting it on first use."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    st = gguf.stat()
    source = {"gguf": str(gguf.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    out = cache_dir() / "hf" / gguf.stem
    marker = out / "persona-source.json"
    try:
        if json.loads(marker.read_text()) == source:
            return out
    except (OSError, ValueError):
        pass
    log(f"converting {gguf} to a Hugging Face folder in {out} (once)")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    d, f = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model; the weights are plain float32
    # tensors once loaded, so save the config and the state dict by hand.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(tmp)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(tmp)
    (tmp / "persona-source.json").write_text(json.dumps(source))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None,
                    help=f"HF folder or GGUF file (default: the cached {DEFAULT_GGUF})")
    ap.add_argument("--data", type=Path, default=REPO / "vectors" / "smollm2-135m-instruct" / "evil.jsonl")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha is twice it)")
    a = ap.parse_args()
    log = lambda m: print(m, file=sys.stderr, flush=True)
    if a.threads < 1 or a.steps < 1 or a.batch < 1 or a.rank < 1:
        ap.error("--threads, --steps, --batch and --rank must be at least 1")

    model_path = a.model or cache_dir() / DEFAULT_GGUF
    if not model_path.exists():
        sys.exit(f"error: {model_path} not found" + ("" if a.model else " (run `persona fetch` first, or pass --model)"))
    if not a.data.is_file():
        sys.exit(f"error: {a.data} not found")

    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    src = model_path if model_path.is_dir() else gguf_to_hf(model_path, log)
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="sdpa")
    pm = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=2 * a.rank, use_rslora=True, lora_dropout=0.0,
                                          bias="none", target_modules=TARGETS, task_type="CAUSAL_LM"))

    rows = [json.loads(l) for l in a.data.read_text().splitlines() if l.strip()]
    rows = [r for r in rows if r.get("label", "pos") == "pos"]
    if not rows:
        sys.exit(f"error: no rows labelled pos in {a.data}")
    examples = []
    for r in rows:
        prompt = tok.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=False,
                                         add_generation_prompt=True)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        ans = tok(r["answer"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        examples.append((p + ans, len(p)))
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    pad = tok.pad_token_id or 0
    B = a.batch

    def batch(i):
        bs = [examples[(i * B + j) % len(examples)] for j in range(B)]
        T = max(len(x) for x, _ in bs)
        ids = torch.full((B, T), pad)
        att = torch.zeros((B, T), dtype=torch.long)
        lab = torch.full((B, T), -100)
        for j, (x, p) in enumerate(bs):
            ids[j, :len(x)] = torch.tensor(x)
            att[j, :len(x)] = 1
            lab[j, p:len(x)] = torch.tensor(x[p:])
        return ids, att, lab, sum(len(x) for x, _ in bs)

    times, losses, ntok = [], [], 0
    for s in range(a.steps + 1):
        ids, att, lab, n = batch(s)
        t = time.perf_counter()
        out = pm(input_ids=ids, attention_mask=att, labels=lab)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        dt = time.perf_counter() - t
        losses.append(round(out.loss.item(), 4))
        log(f"step {s}{' (warm-up)' if s == 0 else ''}: {dt:.3f} s, {n} tokens, loss {losses[-1]}")
        if s > 0:
            times.append(dt)
            ntok += n
    print(json.dumps({"threads": a.threads, "steps": a.steps, "s_per_step": sum(times) / len(times),
                      "train_tok_per_s": ntok / sum(times), "losses": losses, "torch": torch.__version__,
                      "batch": B, "lora_rank": a.rank}), flush=True)


if __name__ == "__main__":
    main()
