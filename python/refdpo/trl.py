"""TRL's `DPOTrainer`, trained from a refdpo cache: the reference model is never loaded or run.

    from trl import DPOConfig
    import refdpo
    from refdpo.trl import CachedReferenceDPOTrainer

    train = refdpo.load_cache("data/cache/x", "train_prefs")
    trainer = CachedReferenceDPOTrainer(
        model=model, processing_class=tokenizer, train_dataset=train,
        args=DPOConfig(output_dir="out", precompute_ref_log_probs=True, max_length=1024, ...))
    trainer.train()

TRL 1.16 cannot take such a dataset as it stands: its `_prepare_dataset` tokenizes `prompt` /
`chosen` / `rejected` text (the cache holds ids), and with `precompute_ref_log_probs=True` its
`_precompute_ref_logps` runs the reference again (or reads its own fingerprinted file) and then
fails in `concatenate_datasets` on the columns the cache already has. This subclass overrides
those two steps (and `evaluate`, which TRL refuses for a new dataset once training has begun):

- `_prepare_dataset` takes the cache's rows as they are: `prompt_ids`, `chosen_ids`,
  `rejected_ids` are TRL's tokenization (refdpo's stage one tokenizes as TRL 1.16 does);
- `_precompute_ref_logps` checks the cache against the trainer and returns it: the
  `ref_chosen_logps` / `ref_rejected_logps` columns are the reference's log-probs, which TRL's
  collator batches as f32 tensors.

The check is the guard refdpo's own stage two has: a cache made from other model weights, another
tokenizer or chat template, or under another `max_length` or truncation mode is refused, naming
the field (`CacheMismatch`).
"""

import hashlib
import json
import os

from trl import DPOTrainer

from .cache import fingerprint_of

COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps"]


class CacheMismatch(ValueError):
    """A cache made from other inputs than the trainer's, naming the field."""


def _sha256(files):
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _local_dir(name_or_path, patterns):
    """A model or tokenizer directory: the path itself, or the hub snapshot transformers loaded."""
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download

    return snapshot_download(name_or_path, allow_patterns=patterns)


def weights_sha256(name_or_path):
    """refdpo's `weights_sha256`: SHA-256 over the safetensors files' bytes, in order
    (`model.safetensors`, else the index's files sorted)."""
    d = _local_dir(name_or_path, ["*.safetensors", "model.safetensors.index.json"])
    single = os.path.join(d, "model.safetensors")
    if os.path.exists(single):
        return _sha256([single])
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    return _sha256([os.path.join(d, x) for x in files])


def tokenizer_sha256(name_or_path):
    """refdpo's `tokenizer_sha256`: SHA-256 of `tokenizer.json`."""
    d = _local_dir(name_or_path, ["tokenizer.json"])
    return _sha256([os.path.join(d, "tokenizer.json")])


def model_config_sha256(name_or_path):
    """refdpo's `model_config_sha256`: SHA-256 of the model's `config.json`."""
    d = _local_dir(name_or_path, ["config.json"])
    return _sha256([os.path.join(d, "config.json")])


SETTINGS_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def tokenizer_config_sha256(name_or_path):
    """refdpo's `tokenizer_config_sha256`: SHA-256 over `tokenizer_config.json` and
    `special_tokens_map.json` (those present, each as its name, a NUL byte and its bytes)."""
    d = _local_dir(name_or_path, list(SETTINGS_FILES))
    h = hashlib.sha256()
    for name in SETTINGS_FILES:
        path = os.path.join(d, name)
        if os.path.isfile(path):
            h.update(name.encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def _model_path(model):
    config = getattr(model, "config", None)
    path = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not path:
        raise CacheMismatch(
            "cannot tell which weights the model was loaded from (no config._name_or_path): load it "
            "with from_pretrained(path) so its weights can be checked against the cache"
        )
    return path


def _unwrapped_name(name):
    """A parameter's name as the checkpoint has it: PEFT's `base_model.model.` prefix and its
    `base_layer` wrapper taken off."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    return name.replace(".base_layer.", ".")


def check_weights_in_memory(model, path):
    """Raises `CacheMismatch` where the model in memory does not hold the weights of `path`'s
    safetensors, which the fingerprint's hash covers: a model made with `from_config` (transformers
    keeps the path in its config) or changed after loading. Compares the first and last tensors
    of the checkpoint that the model holds, each rounded to the model's dtype; parameters that
    hold no values here (sharded by DeepSpeed ZeRO-3, quantized) are not compared."""
    import torch
    from safetensors import safe_open

    d = _local_dir(path, ["*.safetensors", "model.safetensors.index.json"])
    single = os.path.join(d, "model.safetensors")
    if os.path.exists(single):
        with safe_open(single, "pt") as f:
            where = {k: single for k in f.keys()}
    else:
        with open(os.path.join(d, "model.safetensors.index.json")) as f:
            where = {k: os.path.join(d, v) for k, v in json.load(f)["weight_map"].items()}
    params = {_unwrapped_name(n): p for n, p in model.named_parameters()}
    names = [n for n in sorted(where) if n in params]
    for name in {names[0], names[-1]} if names else ():
        p = params[name]
        if not p.is_floating_point() or p.numel() == 0:
            continue
        with safe_open(where[name], "pt") as f:
            saved = f.get_tensor(name)
        if saved.shape != p.shape:
            continue
        if not torch.equal(saved.to(dtype=p.dtype), p.detach().to("cpu")):
            raise CacheMismatch(
                f"the model's `{name}` in memory is not the one in {where[name]}, whose weights the "
                "cache's `weights_sha256` covers: a model made with from_config (transformers keeps "
                "the path in its config) or changed after loading. Load the reference with "
                "from_pretrained(path), as the cache was made from"
            )


def check(fingerprint, model, tokenizer, args, name="train", in_memory=True):
    """Raises `CacheMismatch` naming the first field where the cache's fingerprint differs from
    the trainer's model (weights and `config.json`), tokenizer (and its settings files), chat
    template, `max_length` or `truncation_mode`; with `in_memory`, also where the model's weights
    in memory are not its files' (`check_weights_in_memory`)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    ours = {
        "max_length": args.max_length,
        "truncation": args.truncation_mode,
        "tokenizer_sha256": lambda: tokenizer_sha256(tokenizer.name_or_path),
        "chat_template_sha256": lambda: hashlib.sha256(template.encode()).hexdigest(),
        "weights_sha256": lambda: weights_sha256(_model_path(model)),
        "model_config_sha256": lambda: model_config_sha256(_model_path(model)),
        "tokenizer_config_sha256": lambda: tokenizer_config_sha256(tokenizer.name_or_path),
    }
    for field, value in ours.items():
        value = value() if callable(value) else value
        if fingerprint.get(field) != value:
            raise CacheMismatch(
                f"the cache given as {name!r}: its `{field}` is {fingerprint.get(field)!r} but the trainer's is "
                f"{value!r}: the cache was made by `refdpo precompute` from other inputs (model "
                f"{fingerprint.get('model_id')!r}); precompute a cache for this model, tokenizer and "
                f"DPOConfig, or train with the ones the cache names"
            )
    if in_memory:
        check_weights_in_memory(model, _model_path(model))


class CachedReferenceDPOTrainer(DPOTrainer):
    """`DPOTrainer` over datasets from `refdpo.load_cache`: no reference model, no reference pass.
    Needs `DPOConfig(precompute_ref_log_probs=True)` and no `ref_model`."""

    def __init__(self, model=None, ref_model=None, args=None, train_dataset=None, eval_dataset=None, **kwargs):
        if args is None or not args.precompute_ref_log_probs:
            raise ValueError(
                "CachedReferenceDPOTrainer reads the reference's log-probs from the cache: pass "
                "DPOConfig(precompute_ref_log_probs=True, ...)"
            )
        if ref_model is not None:
            raise ValueError("CachedReferenceDPOTrainer runs no reference model: pass ref_model=None")
        if getattr(args, "ld_alpha", None) is not None:
            raise ValueError(
                f"DPOConfig(ld_alpha={args.ld_alpha}): LD-DPO weighs each answer's tokens past the "
                "length it shares with the other answer, in the reference's log-probs too; the cache "
                "holds whole sums, as refdpo's stage one makes them. Train without ld_alpha, or "
                "with TRL's own reference pass"
            )
        super().__init__(
            model=model, ref_model=None, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, **kwargs
        )

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        missing = [c for c in COLUMNS if c not in dataset.column_names]
        if fingerprint_of(dataset) is None or missing:
            raise ValueError(
                f"the {dataset_name} dataset is not a refdpo cache (read it with "
                f"refdpo.load_cache(path, split)); missing: {missing or 'its fingerprint'}"
            )
        return dataset

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # the dataset's own fingerprint (the one `_prepare_dataset` returned: its info kept); the
        # weights in memory are the reference's only until training moves them
        untrained = getattr(getattr(self, "state", None), "global_step", 0) == 0
        check(fingerprint_of(dataset), self.model, self.processing_class, self.args, name, in_memory=untrained)
        return dataset

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """TRL's `evaluate`, and for a cache passed here also after training has begun: its
        reference log-probs are in the cache, so TRL's refusal there (it would need the reference
        model, which full fine-tuning no longer holds) does not apply."""
        if eval_dataset is None or isinstance(eval_dataset, str):
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        from transformers import Trainer

        named = eval_dataset if isinstance(eval_dataset, dict) else {None: eval_dataset}
        metrics = {}
        for key, dataset in named.items():
            name = "eval" if key is None else key
            dataset = self._precompute_ref_logps(
                self._prepare_dataset(dataset, self.processing_class, self.args, name), name, 0
            )
            prefix = metric_key_prefix if key is None else f"{metric_key_prefix}_{key}"
            metrics.update(
                Trainer.evaluate(self, eval_dataset=dataset, ignore_keys=ignore_keys, metric_key_prefix=prefix)
            )
        return metrics
