"""refdpo.trl.CachedReferenceDPOTrainer against TRL 1.16's own `precompute_ref_log_probs` on real
UltraFeedback rows (../shared/realdata) with a seeded tiny Llama on SmolLM2's tokenizer: the same
batches, first loss (ln 2), rewards and every parameter's gradient; no reference forward in the
cached trainer (asserted: its reference pass raises); a cache of another max_length, tokenizer or
model refused by name.

    REFDPO_BIN=target/debug/refdpo PYTHONPATH=python python -m pytest python/tests
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

import refdpo  # noqa: E402
from refdpo.trl import COLUMNS, CacheMismatch, CachedReferenceDPOTrainer  # noqa: E402

BIN = os.environ.get("REFDPO_BIN", "refdpo")
REALDATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "realdata"
MAX_LENGTH = 256


def need_realdata():
    if not REALDATA.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{REALDATA} is absent: under CI=true the real-data sample is required")
        pytest.skip(f"skipped: needs {REALDATA}")


def tiny_llama(out, seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, pad_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(REALDATA / "tokenizers" / "smollm2-135m" / f, Path(out) / f)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    need_realdata()
    d = tmp_path_factory.mktemp("trl")
    model_dir = d / "model"
    tiny_llama(model_dir, seed=0)
    cfg = d / "pipeline.toml"
    cfg.write_text(f"""
[dataset]
id = "{REALDATA / 'ultrafeedback_binarized_sample'}"
limit = 24
[model]
id = "{model_dir}"
dtype = "f32"
[tokenize]
max_length = {MAX_LENGTH}
[precompute]
batch_size = 8
out = "{d / 'cache'}"
""")
    subprocess.run([BIN, "precompute", "--config", str(cfg), "--quiet"], check=True)
    return d, model_dir, d / "cache"


def config(out, **kw):
    return DPOConfig(
        output_dir=str(out), precompute_ref_log_probs=True, max_length=MAX_LENGTH, per_device_train_batch_size=4,
        report_to=[], use_cpu=True, seed=0, beta=0.1, bf16=False, **kw,
    )


def load(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), AutoTokenizer.from_pretrained(model_dir)


def step(trainer, rows):
    """The collated batch of `rows`, its loss, the logged metrics and every parameter's gradient."""
    batch = trainer.data_collator([{c: r[c] for c in COLUMNS} for r in rows])
    trainer.model.train()  # metrics go to _metrics["train"]; TRL disabled dropout
    trainer.model.zero_grad()
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return batch, loss.item(), metrics, grads


def test_trl_from_the_cache_equals_trls_own_precompute(setup, monkeypatch):
    from datasets import load_dataset

    d, model_dir, cache = setup
    raw = load_dataset(
        "parquet",
        data_files=str(REALDATA / "ultrafeedback_binarized_sample/data/train_prefs-00000-of-00001.parquet"),
        split="train",
    ).select(range(24)).remove_columns(["prompt", "messages"])  # the prompt is the turns before the answer
    model, tok = load(model_dir)
    own = DPOTrainer(model=model, args=config(d / "own"), train_dataset=raw, processing_class=tok)

    def no_reference(*_a, **_k):
        raise AssertionError("the cached trainer ran a reference forward")

    monkeypatch.setattr(CachedReferenceDPOTrainer, "compute_ref_log_probs", no_reference)
    model, tok = load(model_dir)
    cached = CachedReferenceDPOTrainer(
        model=model, args=config(d / "cached"), train_dataset=refdpo.load_cache(cache), processing_class=tok
    )
    assert cached.ref_model is None

    theirs = {r["prompt_id"]: r for r in own.train_dataset}
    mine = [r for r in cached.train_dataset if r["prompt_id"] in theirs][:8]
    assert len(mine) == 8, "fewer than 8 common rows"
    a = step(own, [theirs[r["prompt_id"]] for r in mine])
    b = step(cached, mine)
    for key in ["input_ids", "completion_mask", "attention_mask"]:
        assert torch.equal(a[0][key], b[0][key]), key
    for key in ["ref_chosen_logps", "ref_rejected_logps"]:
        rel = ((a[0][key] - b[0][key]).abs() / a[0][key].abs()).max().item()
        assert rel < 1e-5, f"{key}: {rel}"
    # step 0: the policy is the reference, in both (TRL's forward against refdpo's cached pass)
    assert abs(a[1] - math.log(2)) < 1e-5 and abs(b[1] - math.log(2)) < 1e-5, (a[1], b[1])
    # a policy that has moved (the same seeded change in both), so rewards and accuracies mean something
    for t in (own, cached):
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            for p in t.model.parameters():
                p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g))
    a = step(own, [theirs[r["prompt_id"]] for r in mine])
    b = step(cached, mine)
    assert abs(a[1] - math.log(2)) > 1e-3, "the change moved the loss"
    assert abs(a[1] - b[1]) / a[1] < 1e-5, (a[1], b[1])
    assert set(a[2]) == set(b[2]) and "rewards/chosen" in a[2]
    for k in a[2]:
        assert abs(a[2][k] - b[2][k]) <= 1e-5 * max(1.0, abs(a[2][k])), (k, a[2][k], b[2][k])
    assert set(a[3]) == set(b[3]) and len(a[3]) > 0
    # The gradients differ only through the reference log-probs, two f32 implementations' sums of
    # ~250 tokens at ~-10.8 nats each (a random model) that agree to ~1e-7 relative, i.e. ~3e-4
    # nats; the DPO weight sigma(.) passes that on times beta. Measured: 1.6e-5 at worst (one
    # tensor's largest element, 2026-12-05), the loss and every metric within 1e-5 above.
    for n in a[3]:
        rel = (a[3][n] - b[3][n]).abs().max().item() / a[3][n].abs().max().item()
        assert rel < 5e-5, f"{n}: {rel}"


def test_a_cache_of_other_inputs_is_refused_by_name(setup, tmp_path):
    d, model_dir, cache = setup
    train = refdpo.load_cache(cache)
    model, tok = load(model_dir)
    with pytest.raises(CacheMismatch, match="`max_length` is 256 but the trainer's is 128"):
        args = config(tmp_path / "a")
        args.max_length = 128
        CachedReferenceDPOTrainer(model=model, args=args, train_dataset=train, processing_class=tok)
    # another tokenizer file (the same vocabulary, other bytes)
    other_tok = tmp_path / "tok"
    shutil.copytree(model_dir, other_tok)
    (other_tok / "tokenizer.json").write_text((model_dir / "tokenizer.json").read_text() + "\n")
    with pytest.raises(CacheMismatch, match="tokenizer_sha256"):
        CachedReferenceDPOTrainer(
            model=model, args=config(tmp_path / "b"), train_dataset=train,
            processing_class=AutoTokenizer.from_pretrained(other_tok),
        )
    # other weights
    other = tmp_path / "other"
    tiny_llama(other, seed=1)
    with pytest.raises(CacheMismatch, match="weights_sha256"):
        CachedReferenceDPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(other), args=config(tmp_path / "c"), train_dataset=train,
            processing_class=tok,
        )
    # the same weights under another config.json (refdpo's reference would score otherwise)
    edited = tmp_path / "edited"
    shutil.copytree(model_dir, edited)
    cfg = json.loads((edited / "config.json").read_text())
    cfg["rms_norm_eps"] = 0.5
    (edited / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CacheMismatch, match="model_config_sha256"):
        CachedReferenceDPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(edited), args=config(tmp_path / "e"), train_dataset=train,
            processing_class=tok,
        )
    # another tokenizer_config.json (the EOS appended to plain answers, the BOS added)
    settings = tmp_path / "settings"
    shutil.copytree(model_dir, settings)
    (settings / "tokenizer_config.json").write_text((model_dir / "tokenizer_config.json").read_text() + "\n")
    with pytest.raises(CacheMismatch, match="tokenizer_config_sha256"):
        CachedReferenceDPOTrainer(
            model=model, args=config(tmp_path / "f"), train_dataset=train,
            processing_class=AutoTokenizer.from_pretrained(settings),
        )
    # not a cache at all
    with pytest.raises(ValueError, match="not a refdpo cache"):
        CachedReferenceDPOTrainer(
            model=model, args=config(tmp_path / "d"), train_dataset=train.remove_columns(["ref_chosen_logps"]),
            processing_class=tok,
        )


def test_what_the_cache_cannot_stand_for_is_refused_and_evaluation_runs_after_training(setup, tmp_path):
    """LD-DPO's weighted reference, a model whose weights in memory are not its files', a train
    cache judged by an eval cache's fingerprint, caches of other inputs joined: each refused by
    name. Splits of one cache joined train, and `evaluate` takes a cache after training."""
    from datasets import concatenate_datasets
    from transformers import AutoConfig

    d, model_dir, cache = setup
    train, test = refdpo.load_cache(cache), refdpo.load_cache(cache, "test_prefs")
    model, tok = load(model_dir)
    with pytest.raises(ValueError, match="ld_alpha=0.5"):
        CachedReferenceDPOTrainer(model=model, args=config(tmp_path / "a", ld_alpha=0.5), train_dataset=train,
                                  processing_class=tok)
    # transformers keeps the path in a from_config model's config: its random weights are not the files'
    torch.manual_seed(5)
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    assert fresh.config._name_or_path == str(model_dir)
    with pytest.raises(CacheMismatch, match="in memory is not the one in"):
        CachedReferenceDPOTrainer(model=fresh, args=config(tmp_path / "b"), train_dataset=train,
                                  processing_class=tok)
    # a train cache of other weights, beside an eval cache named "train"
    other = train.select(range(len(train)))
    fp = refdpo.fingerprint_of(train)
    other._info.description = refdpo.cache.FINGERPRINT_INFO + json.dumps(dict(fp, weights_sha256="0" * 64))
    with pytest.raises(CacheMismatch, match="weights_sha256"):
        CachedReferenceDPOTrainer(model=model, args=config(tmp_path / "c"), train_dataset=other,
                                  eval_dataset={"train": test}, processing_class=tok)
    with pytest.raises(refdpo.CacheError, match="weights_sha256"):
        refdpo.fingerprint_of(concatenate_datasets([train, other]))
    # train and test of one cache, joined, train; evaluation after a step reads the cache
    both = concatenate_datasets([train, test])
    assert refdpo.fingerprint_of(both)["split"] == "train_prefs+test_prefs"
    trainer = CachedReferenceDPOTrainer(model=model, args=config(tmp_path / "d", max_steps=1), train_dataset=both,
                                        processing_class=tok)
    trainer.train()
    assert trainer.state.global_step == 1
    metrics = trainer.evaluate(eval_dataset=test)
    assert math.isfinite(metrics["eval_loss"]), metrics


def test_two_accelerate_processes_train_as_one_on_a_sharded_cache(setup, tmp_path):
    """`accelerate launch --num_processes 2` on the CPU (gloo) over a cache written by two `--shard i/2`
    processes: the single process's loss curve at the same global batch (4 × 2 processes against
    4 × 2 accumulation steps)."""
    d, model_dir, _ = setup
    sharded = tmp_path / "sharded"
    cfg = (d / "pipeline.toml").read_text().replace(f'out = "{d / "cache"}"', f'out = "{sharded}"')
    (tmp_path / "pipeline.toml").write_text(cfg)
    for i in range(2):
        subprocess.run(
            [BIN, "precompute", "--config", str(tmp_path / "pipeline.toml"), "--quiet", "--shard", f"{i}/2"],
            check=True,
        )
    assert len(refdpo.cache_files(sharded)) == 2
    script = str(Path(__file__).with_name("trl_run.py"))
    env = {**os.environ, "TQDM_DISABLE": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, script, str(sharded), str(model_dir), str(one), "4", "2", "4"], check=True, env=env)
    subprocess.run(
        # torchrun through accelerate's multi-process launcher; the run itself is on the CPU
        # (DPOConfig(use_cpu=True), gloo): accelerate's `--cpu` launcher runs several processes only
        # through mpirun
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", script,
         str(sharded), str(model_dir), str(two), "4", "1", "4"],
        check=True, env=env,
    )
    a = json.loads((one / "losses.json").read_text())
    b = json.loads((two / "losses.json").read_text())
    assert len(a) == len(b) == 4, (a, b)
    assert abs(a[0] - math.log(2)) < 1e-4, a
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-4 * abs(x), (a, b)
    assert a[-1] != a[0], "the run trained"
