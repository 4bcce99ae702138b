"""Text sources, tokenizers and the per-rank token streams.

Every source goes through ``datasets``: C4 streams from the Hub, local json/text/parquet files
load with the matching builder, and the offline corpus (the docstrings of the Python standard
library plus the ``pydoc_data`` help topics: real English prose on any machine with Python) is
written once as JSON Lines into the cache and then loaded like any local file.

Which rank does what: every rank reads only its own shard (``split_dataset_by_node``) and
yields micro-batches of ``(micro_batch, seq_len)`` int64 ``input_ids`` and ``labels`` (-100
where masked). A stream's position (epoch, documents consumed, leftover tokens) is a small
dict, saved per rank in checkpoints so that a resumed run sees exactly the same batches.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import socket
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from .config import ConfigError, DataArguments, cache_dir

CORPUS_VERSION = "v2"
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo"}
# Every VALIDATION_EVERY-th document of a single-split source is held out for evaluation.
VALIDATION_EVERY = 20


# --- the offline corpus ---------------------------------------------------------------------

def _stdlib_documents() -> Iterator[str]:
    """Docstrings (module, class, function; > 40 chars) and pydoc help topics, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
                continue  # a few stdlib files are templates or not UTF-8; they are not needed
            if path.parent.name == "pydoc_data" and name == "topics.py":
                # The help() topics: a dict of long reference-manual texts.
                for node in ast.walk(tree):
                    if isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) > 200:
                        yield node.value.strip()
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > 40:
                        yield doc


def _atomic_dir(final: Path, build) -> Path:
    """Builds into a temp dir next to ``final`` and renames it: readers never see half a cache."""
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process won the race: theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def offline_corpus(data: DataArguments) -> Path:
    """Writes (once) and returns the directory with ``train.jsonl`` and ``validation.jsonl``."""
    tag = f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}-{CORPUS_VERSION}"

    def build(tmp: Path) -> None:
        with open(tmp / "train.jsonl", "w") as train, open(tmp / "validation.jsonl", "w") as val:
            for i, doc in enumerate(_stdlib_documents()):
                (val if i % VALIDATION_EVERY == VALIDATION_EVERY - 1 else train).write(json.dumps({"text": doc}) + "\n")

    return _atomic_dir(cache_dir(data) / "corpus" / tag, build)


def _corpus_texts(path: Path) -> Iterator[str]:
    with open(path) as f:
        for line in f:
            yield json.loads(line)["text"]


# --- tokenizers -------------------------------------------------------------------------------

EOS, PAD = "<|endoftext|>", "<|pad|>"


def _hub_reachable(timeout: float = 5.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("//")[-1].split("/")[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_tokenizer(data: DataArguments):
    """``offline``/``bytes``: byte-level BPE trained on the offline corpus (cached; ``bytes`` has
    no merges). Anything else goes to ``AutoTokenizer`` (a local path or a Hub name).

    Call it on the local main process first (it may build the cache), then on the others.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if data.tokenizer in ("offline", "bytes"):
        vocab = 256 + 2 if data.tokenizer == "bytes" else data.tokenizer_vocab_size
        if vocab < 258:
            raise ConfigError(f"--tokenizer_vocab_size must be >= 258 (256 bytes + EOS + PAD), got {vocab}")
        corpus = offline_corpus(data)
        final = cache_dir(data) / "tokenizers" / f"{corpus.name}-bpe{vocab}"

        def build(tmp: Path) -> None:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

            tok = Tokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(
                vocab_size=vocab, special_tokens=[EOS, PAD], show_progress=False,
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            )
            tok.train_from_iterator(_corpus_texts(corpus / "train.jsonl"), trainer)
            PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD).save_pretrained(str(tmp))

        return AutoTokenizer.from_pretrained(str(_atomic_dir(final, build)))
    if not Path(data.tokenizer).exists() and not _hub_reachable():
        raise ConfigError(
            f"--tokenizer {data.tokenizer!r} is neither a local directory nor reachable on the Hugging Face "
            f"Hub (no network or HF_HUB_OFFLINE=1). Download it once with network "
            f"(`python -c \"from transformers import AutoTokenizer; AutoTokenizer.from_pretrained('{data.tokenizer}').save_pretrained('tok')\"`) "
            f"and pass --tokenizer tok, or use --tokenizer offline"
        )
    tok = AutoTokenizer.from_pretrained(data.tokenizer)
    if tok.pad_token is None:  # packing never pads; the reference mode masks pads anyway
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


# --- raw documents ----------------------------------------------------------------------------

def _files(spec: str) -> list[str]:
    import glob

    out: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        matches = sorted(glob.glob(part))
        if not matches:
            raise ConfigError(f"--data_files: {part!r} matches no file")
        out.extend(matches)
    return out


def load_documents(data: DataArguments, split: str, rank: int, world_size: int, seed: int):
    """This rank's shard of a split as a ``datasets`` (Iterable)Dataset of examples.

    Args:
        split: "train" or "validation".
    Raises:
        ConfigError: no network for C4, or the text column is missing.
    """
    import datasets
    from datasets.distributed import split_dataset_by_node

    if data.dataset == "c4":
        if not _hub_reachable():
            raise ConfigError(
                "--dataset c4 streams allenai/c4 from the Hugging Face Hub, which is not reachable from "
                "this machine (no network or HF_HUB_OFFLINE=1). Use --dataset offline, or download C4 "
                "shards and pass --dataset json --data_files 'c4/en/c4-train.*.json.gz'"
            )
        ds = datasets.load_dataset("allenai/c4", "en", split=split, streaming=True)
    else:
        if data.dataset == "offline":
            corpus = offline_corpus(data)
            builder, files = "json", [str(corpus / f"{split}.jsonl")]
        else:
            builder = data.dataset
            files = _files(data.validation_files if (split == "validation" and data.validation_files) else data.data_files)
        try:
            ds = datasets.load_dataset(builder, data_files={"data": files}, split="data")
        except Exception as e:  # datasets wraps parse errors in its own, version-dependent types
            cause = e.__cause__ or e.__context__ or e
            raise ConfigError(
                f"--dataset {builder} cannot read {', '.join(files[:3])}{' ...' if len(files) > 3 else ''} "
                f"({type(cause).__name__}: {str(cause).strip().splitlines()[0][:200] if str(cause).strip() else ''}); "
                f"check that the files are {builder} and UTF-8"
            ) from None
        if data.dataset != "offline" and split in ("train", "validation") and not data.validation_files:
            # One file list for both: hold out every VALIDATION_EVERY-th document.
            keep = (lambda i: i % VALIDATION_EVERY == VALIDATION_EVERY - 1) if split == "validation" else (
                lambda i: i % VALIDATION_EVERY != VALIDATION_EVERY - 1)
            ds = ds.select([i for i in range(len(ds)) if keep(i)])
    if getattr(ds, "column_names", None) is not None:
        columns = ds.column_names
    else:
        first = next(iter(ds), None)
        if first is None:
            raise ConfigError(f"the {data.dataset} {split} data holds no documents; pass files with text in them")
        columns = list(first.keys())
    if data.text_field not in columns:
        raise ConfigError(
            f"the {data.dataset} data has no column {data.text_field!r} (columns: {sorted(columns)}); "
            f"pass --text_field with the column that holds the text"
        )
    ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    return ds


# --- token streams -------------------------------------------------------------------------

def _check_ids(ids: list[int], vocab_size: int, where: str) -> None:
    if ids and max(ids) >= vocab_size:
        raise ConfigError(
            f"the tokenizer produced id {max(ids)} but the model's vocab_size is {vocab_size} ({where}); "
            f'raise vocab_size with --model_overrides \'{{"vocab_size": {max(ids) + 1}}}\' or use a smaller tokenizer'
        )


class TokenStream:
    """Infinite micro-batches for one rank, resumable from :meth:`state_dict`.

    Packing: documents + EOS are concatenated and cut into ``seq_len`` windows (labels =
    inputs; the model shifts them). Reference mode (``packing=False``): one document per
    sequence, truncated or padded to ``seq_len``, padding masked (-100) in the labels.
    Each epoch reshuffles the documents with ``seed + epoch``.
    """

    def __init__(self, docs, tokenizer, data: DataArguments, micro_batch: int, vocab_size: int, seed: int,
                 shuffle: bool = True, loop: bool = True) -> None:
        self.docs, self.tok, self.data = docs, tokenizer, data
        self.micro_batch, self.vocab_size, self.seed = micro_batch, vocab_size, seed
        self.shuffle, self.loop = shuffle, loop
        self.epoch, self.consumed, self.buffer = 0, 0, []  # position: see state_dict
        self._pending: list[list[int]] = []  # whole sequences ready to batch (position includes them)
        # Tokens (packing) or sequences (reference mode) of the current pass over the data; a
        # pass read from its start that cannot fill one sequence is a configuration error.
        self._pass_yield, self._pass_from_start = 0, False

    def state_dict(self) -> dict[str, Any]:
        """Where the next batch starts: epoch, documents consumed this epoch, tokens and
        sequences read but not yet emitted."""
        return {"epoch": self.epoch, "consumed": self.consumed, "buffer": list(self.buffer),
                "pending": [list(s) for s in self._pending]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self.buffer, self._pending = list(state["buffer"]), [list(s) for s in state["pending"]]

    def _epoch_docs(self):
        import datasets

        ds = self.docs
        streaming = isinstance(ds, datasets.IterableDataset)
        if self.shuffle:
            if streaming:
                ds = ds.shuffle(seed=self.seed + self.epoch, buffer_size=self.data.shuffle_buffer)
            else:
                ds = ds.shuffle(seed=self.seed + self.epoch)
        if self.consumed:
            # skip() on a stream still reads the skipped documents but does not tokenize them.
            ds = ds.skip(self.consumed) if streaming else ds.select(range(self.consumed, len(ds)))
        return ds

    def _texts(self, chunk: int = 64) -> Iterator[list[str]]:
        """Lists of up to ``chunk`` texts; ``self.consumed`` counts them once they are read."""
        self._pass_yield, self._pass_from_start = 0, self.consumed == 0
        while True:
            batch: list[str] = []
            n_read = 0
            for example in self._epoch_docs():
                text = example[self.data.text_field]
                n_read += 1
                if text:
                    batch.append(text)
                if n_read == chunk:
                    # Counted before the yield: the consumer turns the whole chunk into buffer and
                    # pending sequences before anyone can observe the state.
                    self.consumed += n_read
                    yield batch
                    batch, n_read = [], 0
            if n_read:
                self.consumed += n_read
                yield batch
            if not self.loop:
                return
            if self.consumed == 0:
                raise ConfigError("this rank's data shard is empty; use fewer processes or more data")
            if self._pass_from_start and self._pass_yield < (self.data.seq_len if self.data.packing else 1):
                raise ConfigError(
                    f"this rank's share of the training data makes {self._pass_yield} "
                    f"{'tokens' if self.data.packing else 'sequences'} per pass, fewer than one sequence of "
                    f"--seq_len {self.data.seq_len}; pass more data, use fewer processes or a smaller --seq_len"
                )
            self.epoch, self.consumed = self.epoch + 1, 0
            self._pass_yield, self._pass_from_start = 0, True

    def _sequences(self) -> Iterator[list[int]]:
        L = self.data.seq_len
        if self._pending:
            yield from self._drain()
        for texts in self._texts():
            if self.data.packing:
                ids = self.tok(texts, add_special_tokens=False)["input_ids"]
                eos = self.tok.eos_token_id
                for seq in ids:
                    self.buffer.extend(seq)
                    self._pass_yield += len(seq) + (eos is not None)
                    if eos is not None:
                        self.buffer.append(eos)
                _check_ids(self.buffer, self.vocab_size, "training data")
                while len(self.buffer) >= L:
                    self._pending.append(self.buffer[:L])
                    self.buffer = self.buffer[L:]
            else:
                ids = self.tok(texts, add_special_tokens=True, truncation=True, max_length=L)["input_ids"]
                for seq in ids:
                    _check_ids(seq, self.vocab_size, "training data")
                    if len(seq) >= 2:
                        self._pending.append(seq)
                        self._pass_yield += 1
            yield from self._drain()

    def _drain(self) -> Iterator[list[int]]:
        while self._pending:
            # Popped before the yield: once a batch is emitted, none of its sequences is pending.
            yield self._pending.pop(0)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        batch: list[list[int]] = []
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        L = self.data.seq_len
        for seq in self._sequences():
            batch.append(seq)
            if len(batch) == self.micro_batch:
                yield collate(batch, L, pad)
                batch = []
        if batch and not self.loop:
            yield collate(batch, L, pad)


def collate(seqs: list[list[int]], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """(b, seq_len) int64 ``input_ids``, ``labels`` (-100 on padding) and ``attention_mask``."""
    ids = torch.full((len(seqs), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), seq_len), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), seq_len), dtype=torch.long)
    for i, s in enumerate(seqs):
        n = min(len(s), seq_len)
        ids[i, :n] = torch.tensor(s[:n])
        labels[i, :n] = ids[i, :n]
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def eval_batches(docs, tokenizer, data: DataArguments, micro_batch: int, vocab_size: int,
                 tokens_per_rank: int) -> list[dict[str, torch.Tensor]]:
    """The first ``tokens_per_rank`` target tokens of this rank's validation shard, batched.

    The same batches are reused at every evaluation, so eval losses are comparable over time.
    """
    stream = TokenStream(docs, tokenizer, data, micro_batch, vocab_size, seed=0, shuffle=False, loop=False)
    out, tokens = [], 0
    for batch in stream:
        out.append(batch)
        tokens += int((batch["labels"][:, 1:] != -100).sum())
        if tokens >= tokens_per_rank:
            break
    return out
