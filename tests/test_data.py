"""Data: the embedded corpus and tokenizer, packing without padding, exact resume, per-process
shares, clear errors for bad input, and the real tokenizer + parquet layout (assets)."""

import collections
import dataclasses
import json
import os
import re
import time

import numpy as np
import pytest

from jaxllm import data
from jaxllm.config import LLMConfig
from jaxllm.data import DataConfig, PackedBatches, iter_documents, load_tokenizer
from jaxllm.recipes import encode_prompt

WORDS = "the a small model reads every token of this text once per epoch and learns".split()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jaxllm-cache")


@pytest.fixture(scope="module")
def tokenizer(cache_dir):
    return load_tokenizer(None, cache_dir=cache_dir)


def write_jsonl(path, texts, column="text"):
    path.write_text("".join(json.dumps({column: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def make_texts(n, seed=0):
    """n documents of 1 to 50 words (some longer than a row), and one empty document."""
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 50)))) + f" doc{i}." for i in range(n)]
    texts[3] = ""
    return texts


@pytest.fixture
def small_jsonl(tmp_path):
    return write_jsonl(tmp_path / "docs.jsonl", make_texts(24))


def expected_stream(cfg, tok, epochs, **share):
    """The token stream packing must produce, built independently: every non-empty document of
    `iter_documents`, tokenized by the tokenizer itself (a special token's text as text), followed
    by EOS."""
    out = []
    for epoch in range(epochs):
        for text in iter_documents(cfg, epoch=epoch, **share):
            if text.strip():
                out += tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [tok.eos_token_id]
    return np.asarray(out, np.int32)


def take(batches, n):
    out, states = [], []
    for _ in range(n):
        out.append(next(batches))
        states.append(batches.state_dict())
    return out, states


# ---- the embedded default ---------------------------------------------------------------------
def test_embedded_corpus_is_python_reference_text_and_deterministic():
    docs = data.embedded_corpus()
    assert docs == data.embedded_corpus()
    assert len(docs) > 100 and sum(map(len, docs)) > 400_000
    assert all(isinstance(d, str) and d.strip() for d in docs)
    assert any('The "if" statement' in d for d in docs)


def test_embedded_tokenizer_training_is_deterministic():
    a, b = data.train_embedded_tokenizer(), data.train_embedded_tokenizer()
    ma, mb = json.loads(a.to_str())["model"], json.loads(b.to_str())["model"]
    assert ma["vocab"] == mb["vocab"] and ma["merges"] == mb["merges"]
    assert a.get_vocab_size() == 4096 and a.token_to_id(data.EOS_TOKEN) == 0


def test_embedded_tokenizer_is_cached_and_equals_fresh_training(tmp_path, monkeypatch):
    first = load_tokenizer(None, cache_dir=tmp_path)
    cached = tmp_path / f"tokenizer-{data.embedded_tokenizer_key()}" / "tokenizer.json"
    assert cached.is_file()

    def no_training(*a, **k):
        raise AssertionError("trained again although the tokenizer is cached")

    monkeypatch.setattr(data, "train_embedded_tokenizer", no_training)
    again = load_tokenizer("embedded", cache_dir=tmp_path)
    monkeypatch.undo()
    fresh = json.loads(data.train_embedded_tokenizer().to_str())["model"]
    for tok in (first, again):
        model = json.loads(tok.backend_tokenizer.to_str())["model"]
        assert model["vocab"] == fresh["vocab"] and model["merges"] == fresh["merges"]
        assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id, len(tok)) == (0, 0, 0, 4096)
    text = "def f(x):\n    return x ** 2  # squares"
    assert again.decode(again(text)["input_ids"]) == text  # byte-level: lossless


def test_embedded_tokenizer_source_round_trips(tmp_path):
    source = data.tokenizer_source(None)
    assert source == f"embedded:{data.embedded_tokenizer_key()}"
    assert len(load_tokenizer(source, cache_dir=tmp_path)) == 4096
    with pytest.raises(ValueError, match="differs from the embedded tokenizer"):
        load_tokenizer("embedded:0123456789abcdef", cache_dir=tmp_path)


def test_embedded_tokenizer_vocab_size_follows_the_preset(tmp_path):
    tiny = LLMConfig.from_preset("tiny")
    tok = load_tokenizer(None, cache_dir=tmp_path, vocab_size=tiny.vocab_size)
    assert len(tok) == tiny.vocab_size and tok.eos_token_id == 0
    data.check_vocab(tok, tiny)
    # Every caller that knows the model (training in both frameworks, export, generation) loads it
    # at that size, also when the run named it ("embedded") or a checkpoint recorded it.
    recorded = data.tokenizer_source(None, vocab_size=data.embedded_vocab_size(tiny))
    for spec in (None, "embedded", recorded):
        assert len(data.model_tokenizer(spec, tiny, cache_dir=tmp_path)) == tiny.vocab_size
    with pytest.raises(ValueError, match="differs from the embedded tokenizer"):
        data.model_tokenizer(data.tokenizer_source(None), tiny, cache_dir=tmp_path)


def test_a_damaged_tokenizer_copy_falls_back_to_the_recorded_one(tmp_path, capsys):
    """Tokenizer files with a cut tokenizer.json: the error names the saved tokenizer, never the
    temporary directory it was loaded from; a directory copy (a Trainer checkpoint's) gives a
    warning (from the run's first process only: not when `quiet`) and the tokenizer the run
    recorded, or, with none recorded, the error."""
    from jaxllm.recipes import RunConfig

    tiny = LLMConfig.from_preset("tiny")
    tok = data.model_tokenizer(None, tiny)
    recorded = data.tokenizer_source(None, vocab_size=data.embedded_vocab_size(tiny))
    files = data.tokenizer_files(tok)
    files["tokenizer.json"] = files["tokenizer.json"][: len(files["tokenizer.json"]) // 2]
    with pytest.raises(ValueError, match="cannot load the saved tokenizer: ") as e:
        data.tokenizer_from_files(files)
    assert "jaxllm-tokenizer-" not in str(e.value)
    copy = tmp_path / "checkpoint-4"
    copy.mkdir()
    for name, text in files.items():
        (copy / name).write_text(text)
    used, spec = data.run_tokenizer(RunConfig(), tiny, (recorded, str(copy)), origin=str(copy))
    assert spec == recorded and used("Once upon a time")["input_ids"] == tok("Once upon a time")["input_ids"]
    assert f"warning: the tokenizer saved in {copy} cannot be read" in capsys.readouterr().err
    assert data.run_tokenizer(RunConfig(), tiny, (recorded, str(copy)), origin=str(copy), quiet=True)[1] == recorded
    assert capsys.readouterr().err == ""  # (a run's other processes)
    with pytest.raises(ValueError, match=f"cannot load tokenizer directory {re.escape(str(copy))}: "):
        data.run_tokenizer(RunConfig(), tiny, (None, str(copy)), origin=str(copy))


def test_a_run_from_a_checkpoint_naming_no_tokenizer_notes_the_embedded_one(capsys):
    """Training on from a checkpoint or Hugging Face directory that names and holds no tokenizer
    takes the embedded one (its vocabulary fits): one note on stderr says so, from the run's first
    process only (`quiet` in the others). None for a new run (the embedded tokenizer by design), a
    checkpoint that names or holds its own, or --tokenizer."""
    from jaxllm.recipes import RunConfig

    tiny = LLMConfig.from_preset("tiny")
    tok, spec = data.run_tokenizer(RunConfig(), tiny, (None, None), origin="/runs/start")
    assert spec is None and len(tok) == tiny.vocab_size
    assert capsys.readouterr().err == ("note: /runs/start holds no tokenizer; using the embedded tokenizer (512 tokens; "
                                       "pass --tokenizer to choose another)\n")
    recorded = data.tokenizer_source(None, vocab_size=data.embedded_vocab_size(tiny))
    for rc, inherited, origin, quiet in [
            (RunConfig(), (None, None), "/runs/start", True),  # another process of the run
            (RunConfig(), (None, None), None, False),  # a new run
            (RunConfig(), (recorded, None), "/runs/start", False),
            (RunConfig(), (None, data.tokenizer_files(tok)), "/runs/start", False),
            (RunConfig(tokenizer="embedded"), (None, None), "/runs/start", False)]:
        assert len(data.run_tokenizer(rc, tiny, inherited, origin=origin, quiet=quiet)[0]) == tiny.vocab_size
        assert capsys.readouterr().err == "", (inherited, origin, quiet)


# ---- packing ------------------------------------------------------------------------------------
def test_rows_are_full_documents_end_with_eos_and_epochs_continue(small_jsonl, tokenizer):
    cfg = DataConfig(dataset=str(small_jsonl), seq_len=32)
    stream = expected_stream(cfg, tokenizer, epochs=3)
    eos = tokenizer.eos_token_id
    assert np.count_nonzero(stream == eos) == 3 * 23  # one EOS after each non-empty document
    n = len(stream) // (3 * 32)
    with PackedBatches(cfg, tokenizer, rows=3) as batches:
        got, states = take(batches, n)
    assert all(b.shape == (3, 32) and b.dtype == np.int32 for b in got)
    np.testing.assert_array_equal(np.concatenate(got).ravel(), stream[: n * 3 * 32])  # no padding anywhere
    assert states[-1]["epoch"] == 2  # the stream went on into the second and third epochs


def test_embedded_corpus_packs_through_the_same_path_and_reshuffles_each_epoch(tokenizer):
    cfg = DataConfig(seq_len=128)
    first, second = list(iter_documents(cfg, epoch=0)), list(iter_documents(cfg, epoch=1))
    assert first != second and sorted(first) == sorted(second) == sorted(data.embedded_corpus())
    other_seed = list(iter_documents(dataclasses.replace(cfg, seed=1), epoch=0))  # --seed orders it too
    assert other_seed != first and sorted(other_seed) == sorted(first)
    stream = expected_stream(cfg, tokenizer, epochs=1)
    with PackedBatches(cfg, tokenizer, rows=4) as batches:
        got, _ = take(batches, 6)
    np.testing.assert_array_equal(np.concatenate(got).ravel(), stream[: 6 * 4 * 128])


@pytest.mark.parametrize("which", ["embedded", "smollm2"])
def test_a_special_token_written_in_a_document_is_text_not_a_document_boundary(tmp_path, tokenizer, request, which):
    """EOS separates documents and nothing else: a document that quotes "<|endoftext|>" (or another
    special token) gets the tokens of that text, as ordinary text, not the special token's id."""
    if which == "smollm2":  # the real vocabulary, whose <|im_start|> is special too
        tokenizer = load_tokenizer(str(request.getfixturevalue("assets") / "smollm2-tokenizer" / "tokenizer.json"))
    texts = ["GPT-2 ends its documents with <|endoftext|> and chat turns with <|im_start|>.", "next"]
    path = write_jsonl(tmp_path / "quotes.jsonl", texts)
    with PackedBatches(DataConfig(dataset=str(path), seq_len=8), tokenizer, rows=1) as batches:
        stream = np.concatenate([next(batches) for _ in range(12)]).ravel()
    first = stream[: list(stream).index(tokenizer.eos_token_id) + 1]
    specials = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    assert not specials & set(first[:-1].tolist()), first
    assert tokenizer.decode(first[:-1]) == texts[0]
    # Prompts (generate.py, the samples after training, both frameworks) are encoded the same way.
    assert encode_prompt(tokenizer, texts[0]) == first[:-1].tolist()


def test_txt_documents_are_paragraphs(tmp_path, tokenizer):
    path = tmp_path / "notes.txt"
    path.write_text("first paragraph\nstill the first\n\nsecond one\n\n\nthird\n")
    cfg = DataConfig(dataset=str(path), seq_len=4)
    assert [d.strip() for d in iter_documents(cfg)] == ["first paragraph\nstill the first", "second one", "third"]
    lines = DataConfig(dataset=str(path), seq_len=4, sample_by="line")
    assert [d for d in iter_documents(lines) if d] == ["first paragraph", "still the first", "second one", "third"]


# ---- exact resume ------------------------------------------------------------------------------
def test_resume_from_state_dict_continues_with_exactly_the_same_batches(small_jsonl, tokenizer):
    cfg = DataConfig(dataset=str(small_jsonl), seq_len=16)
    with PackedBatches(cfg, tokenizer, rows=2, prefetch=4) as batches:
        reference, states = take(batches, 80)
    assert states[-1]["epoch"] >= 2
    crossing = next(k for k, s in enumerate(states) if s["epoch"] == 1)   # first batch state in epoch 1
    boundary = next((k for k, s in enumerate(states) if s["offset"] == 0 and s["documents"] > 0), None)
    positions = sorted({0, 7, 23, crossing - 1, crossing, *([boundary] if boundary else [])})
    for k in positions:
        state = json.loads(json.dumps(states[k]))       # as a checkpoint stores it
        with PackedBatches(cfg, tokenizer, rows=2, state=state) as resumed:
            for expected in reference[k + 1 : k + 6]:
                np.testing.assert_array_equal(next(resumed), expected, err_msg=f"resumed after batch {k}")


def test_a_resume_inside_a_document_cuts_that_document_only(tmp_path, tokenizer):
    """Documents are read 64 at a time: a position inside a document skips that document's first
    tokens, and the first documents of the later reads lose none (the test above has 24 documents,
    one read)."""
    path = write_jsonl(tmp_path / "many.jsonl", make_texts(150, seed=1))
    cfg = DataConfig(dataset=str(path), seq_len=16)
    with PackedBatches(cfg, tokenizer, rows=2) as batches:
        reference, states = take(batches, 400)
    end = next(k for k, s in enumerate(states) if s["epoch"] == 1)  # the first epoch read whole
    k = next(k for k, s in enumerate(states) if s["offset"] > 0)
    with PackedBatches(cfg, tokenizer, rows=2, state=states[k]) as resumed:
        for j, expected in enumerate(reference[k + 1 : end + 2], k + 1):
            np.testing.assert_array_equal(next(resumed), expected, err_msg=f"batch {j} (resumed after {k})")


def test_a_batch_that_ends_exactly_at_a_document_end_resumes_at_the_next_document(tmp_path):
    """Each document is `seq_len` tokens with its EOS, so every batch ends at a document's end
    (the `pending` deque is empty): the saved position is the next document, offset 0. The test
    above meets no such batch with its data; a position of (that document, 0) would repeat it."""
    import itertools

    from helpers import word_tokenizer

    texts = [" ".join(w) for w in itertools.product(("the", "a"), repeat=3)]  # 8 distinct: 3 words + EOS
    with open(tmp_path / "d.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    cfg = DataConfig(dataset=str(tmp_path / "d.jsonl"), seq_len=4)
    tok = word_tokenizer()
    with PackedBatches(cfg, tok, rows=1) as batches:
        ref, states = take(batches, 11)
    assert (states[0]["documents"], states[0]["offset"]) == (1, 0), states[0]
    with PackedBatches(cfg, tok, rows=1, state=states[0]) as resumed:
        for want in ref[1:4]:
            np.testing.assert_array_equal(next(resumed), want)
    # After the epoch's last document: the position is past it, and a resume goes on to the next epoch.
    assert (states[7]["epoch"], states[7]["documents"], states[7]["offset"]) == (0, 8, 0), states[7]
    with PackedBatches(cfg, tok, rows=1, state=states[7]) as resumed:
        for want in ref[8:]:
            np.testing.assert_array_equal(next(resumed), want)


def test_state_is_the_position_after_the_last_returned_batch_not_the_prefetched_one(small_jsonl, tokenizer):
    cfg = DataConfig(dataset=str(small_jsonl), seq_len=16)
    with PackedBatches(cfg, tokenizer, rows=2, prefetch=3) as batches:
        first = next(batches)
        deadline = time.time() + 30
        while not batches._queue.full() and time.time() < deadline:  # let the thread run ahead
            time.sleep(0.01)
        assert batches._queue.full()
        state = batches.state_dict()
        following = [next(batches) for _ in range(4)]
    with PackedBatches(cfg, tokenizer, rows=2, state=state) as resumed:
        np.testing.assert_array_equal(np.stack([next(resumed) for _ in range(4)]), np.stack(following))
    assert first.shape == (2, 16)


def test_resume_position_does_not_depend_on_the_batch_shape(small_jsonl, tokenizer):
    """The state is a token position: resuming with other rows continues the same token stream."""
    cfg = DataConfig(dataset=str(small_jsonl), seq_len=16)
    with PackedBatches(cfg, tokenizer, rows=3) as batches:
        head, states = take(batches, 5)
        tail = [next(batches) for _ in range(4)]        # 4 x 3 rows = 6 x 2 rows
    with PackedBatches(cfg, tokenizer, rows=2, state=states[-1]) as resumed:
        other = [next(resumed) for _ in range(6)]
    np.testing.assert_array_equal(np.concatenate(other), np.concatenate(tail))


def test_state_from_another_process_count_is_refused(small_jsonl, tokenizer):
    cfg = DataConfig(dataset=str(small_jsonl), seq_len=16)
    with PackedBatches(cfg, tokenizer, rows=2) as batches:
        next(batches)
        state = batches.state_dict()
    with pytest.raises(ValueError, match="same process count"):
        PackedBatches(cfg, tokenizer, rows=2, process_index=0, process_count=2, state=state)
    with PackedBatches(cfg, tokenizer, rows=2, process_index=0, process_count=2) as batches:
        next(batches)
        state = batches.state_dict()
    with pytest.raises(ValueError, match="belongs to process 0 of 2, not 1 of 2"):  # another process's position
        PackedBatches(cfg, tokenizer, rows=2, process_index=1, process_count=2, state=state)


def test_a_shuffle_buffer_gives_each_epoch_its_own_order_and_resumes_exactly(tmp_path, tokenizer):
    """`shuffle_buffer` reads a dataset's files in a shuffled order and its documents through a
    buffer: every epoch a permutation of the stored documents, its own for each epoch and seed, the
    same when read again; a resume from any state continues with exactly the same batches."""
    texts = make_texts(30)
    for k in range(3):
        write_jsonl(tmp_path / f"part-{k}.jsonl", texts[10 * k : 10 * k + 10])
    cfg = DataConfig(dataset=str(tmp_path), seq_len=16, shuffle_buffer=8)
    orders = [list(iter_documents(cfg, epoch=e)) for e in (0, 1, 0)]
    other_seed = list(iter_documents(dataclasses.replace(cfg, seed=1)))
    assert orders[0] == orders[2] and sorted(orders[0]) == sorted(orders[1]) == sorted(texts)
    assert len({tuple(texts), tuple(orders[0]), tuple(orders[1]), tuple(other_seed)}) == 4
    assert list(iter_documents(dataclasses.replace(cfg, shuffle_buffer=0))) == texts  # stored order
    with PackedBatches(cfg, tokenizer, rows=2, prefetch=4) as batches:
        reference, states = take(batches, 70)
    stream = expected_stream(cfg, tokenizer, epochs=2)
    np.testing.assert_array_equal(np.concatenate(reference).ravel()[: stream.size], stream[: 70 * 32])
    crossing = next(k for k, s in enumerate(states) if s["epoch"] == 1)
    for k in sorted({5, crossing - 1, crossing, crossing + 9}):
        with PackedBatches(cfg, tokenizer, rows=2, state=json.loads(json.dumps(states[k]))) as resumed:
            for expected in reference[k + 1 : k + 4]:
                np.testing.assert_array_equal(next(resumed), expected, err_msg=f"resumed after batch {k}")


@pytest.mark.parametrize("shuffle_buffer, message", [
    (-1, "--shuffle-buffer must be non-negative, got -1"),
    (8, "--shuffle-buffer 8: the embedded corpus is shuffled whole every epoch"),
])
def test_a_shuffle_buffer_that_cannot_be_used_is_refused(shuffle_buffer, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        DataConfig(shuffle_buffer=shuffle_buffer)


def test_a_shuffle_buffer_is_part_of_the_stream_and_older_checkpoints_had_none(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", make_texts(4))

    def source(**kw):
        return data.stream_source(DataConfig(dataset=str(tmp_path / "a.jsonl"), **kw), "embedded:k")

    recorded = json.loads(json.dumps(source(shuffle_buffer=16)))
    assert recorded["shuffle_buffer"] == 16
    data.check_same_stream(recorded, source(shuffle_buffer=16), "ck")
    with pytest.raises(ValueError, match="--shuffle-buffer 0 differs from the 16 that ck was trained with"):
        data.check_same_stream(recorded, source(), "ck")
    older = {k: v for k, v in source().items() if k != "shuffle_buffer"}  # written before the key was recorded
    data.check_same_stream(older, source(), "ck")
    with pytest.raises(ValueError, match="--shuffle-buffer 16 differs from the 0 that ck was trained with"):
        data.check_same_stream(older, source(shuffle_buffer=16), "ck")


# ---- per-process shares ------------------------------------------------------------------------
def assert_shares_partition(cfg, tokenizer, n_batches=4, rows=2):
    whole = list(iter_documents(cfg))
    shares = [list(iter_documents(cfg, process_index=i, process_count=2)) for i in range(2)]
    assert shares[0] and shares[1]
    assert not (collections.Counter(shares[0]) & collections.Counter(shares[1]))     # no overlap
    assert collections.Counter(shares[0]) + collections.Counter(shares[1]) == collections.Counter(whole)
    for i in range(2):  # each process packs exactly its own documents
        stream = expected_stream(cfg, tokenizer, epochs=1, process_index=i, process_count=2)
        with PackedBatches(cfg, tokenizer, rows=rows, process_index=i, process_count=2) as batches:
            got = np.concatenate([next(batches) for _ in range(n_batches)]).ravel()
        np.testing.assert_array_equal(got, stream[: got.size])
    return shares


def test_two_processes_split_the_embedded_corpus(tokenizer):
    assert_shares_partition(DataConfig(seq_len=64), tokenizer)


def test_two_processes_split_two_files_by_file(tmp_path, tokenizer):
    texts = make_texts(20)
    write_jsonl(tmp_path / "part-0.jsonl", texts[:12])
    write_jsonl(tmp_path / "part-1.jsonl", texts[12:])
    shares = assert_shares_partition(DataConfig(dataset=str(tmp_path / "*.jsonl"), seq_len=16), tokenizer)
    assert shares == [texts[:12], texts[12:]]


@pytest.mark.parametrize("files", [2, 3])
def test_two_processes_split_a_shuffled_dataset(tmp_path, tokenizer, files):
    """Through a shuffle buffer, by file (2 files) or every other document (3 files): the processes
    agree on the files' order, so their shares still partition the documents."""
    texts = make_texts(24)
    for k in range(files):
        write_jsonl(tmp_path / f"part-{k}.jsonl", texts[k::files])
    cfg = DataConfig(dataset=str(tmp_path / "*.jsonl"), seq_len=16, shuffle_buffer=4)
    shares = assert_shares_partition(cfg, tokenizer)
    assert shares != assert_shares_partition(dataclasses.replace(cfg, shuffle_buffer=0), tokenizer)


# ---- bad input: one clear ValueError each -----------------------------------------------------
def test_missing_text_column_names_it_and_lists_the_columns(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "docs.jsonl", ["a b c", "d e"], column="content")
    with pytest.raises(ValueError, match=r"no text column 'text'.*content, id"):
        PackedBatches(DataConfig(dataset=str(path)), tokenizer, rows=1)


def test_missing_text_column_of_a_parquet_file(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["some text"], "n": [1]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match=r"no text column 'text'.*body, n"):
        PackedBatches(DataConfig(dataset=str(tmp_path / "x.parquet")), tokenizer, rows=1)


def test_empty_dataset(tmp_path, tokenizer):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        PackedBatches(DataConfig(dataset=str(tmp_path / "empty.jsonl")), tokenizer, rows=1)


def test_dataset_without_any_text(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "blank.jsonl", ["", "  \n", ""])
    with pytest.raises(ValueError, match="has no text"):  # at construction: before a caller writes anything
        PackedBatches(DataConfig(dataset=str(path)), tokenizer, rows=1)


def test_fewer_documents_than_processes(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "one.jsonl", ["only one document"])
    with pytest.raises(ValueError, match="no documents for process 1 of 2"):
        PackedBatches(DataConfig(dataset=str(path)), tokenizer, rows=1, process_index=1, process_count=2)


@pytest.mark.parametrize("name, content, message", [
    ("broken.parquet", b"this is not a parquet file" * 10, "Parquet magic bytes not found"),
    ("broken.jsonl", b'{"text": "fine"}\n{broken\n', "JSON parse error"),
    ("number.jsonl", b'{"text": "fine"}\n{"text": 3}\n', "number.jsonl line 2: column 'text' holds 3, not text"),
    ("array.json", b'[{"text": "fine"}, [1, 2]]', r"array.json element 1: \[1, 2\] where a record \(a JSON object\)"),
    ("latin1.jsonl", b'{"text": "caf\xe9"}\n', "latin1.jsonl is not UTF-8 text: 'utf-8' codec can't decode byte 0xe9"),
    ("latin1.txt", b"fine\n\ncaf\xe9\n", r"latin1.txt is not UTF-8 text \(byte 0xe9 at offset 9\)$"),
    ("pretty.json", b'{\n  "text": "fine"\n}\n', r"pretty.json line 1: Expecting property name .* \(a JSON dataset is one "
                                                  r"record per line, or one array of records\)$"),
])
def test_unreadable_file(tmp_path, tokenizer, caplog, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=f"cannot read dataset .*{name}: .*{message}"):
        with PackedBatches(DataConfig(dataset=str(tmp_path / name), seq_len=4), tokenizer, rows=1) as batches:
            next(batches)
    assert not logged_by_datasets(caplog)  # said once, by the error


def test_text_files_that_are_not_utf8_are_named_among_several(tmp_path, tokenizer):
    """`datasets`' text reader says neither which file it could not decode nor where (its position
    is within a chunk): the error names every such file with the offset of its first bad byte (here
    when the stream reaches them after another file's batches; one cut in a character that spans
    two of the 1 MiB chunks read, one past the first chunk)."""
    (tmp_path / "a.txt").write_text("\n\n".join(make_texts(200)))
    (tmp_path / "b.txt").write_bytes(b"fine\n\ncaf\xe9\n")
    (tmp_path / "c.txt").write_bytes(b"x" * ((1 << 20) - 1) + "\u00e9".encode() + b"\n\n\xff")
    (tmp_path / "d.txt").write_bytes(b"y" * ((1 << 20) + 5) + b"\xe2\x82")  # a character cut at the end
    taken = 0
    with pytest.raises(ValueError) as e:
        with PackedBatches(DataConfig(dataset=str(tmp_path), seq_len=8), tokenizer, rows=2) as batches:
            for taken in range(1, 10_000):
                next(batches)
    assert str(e.value) == (f"cannot read dataset {tmp_path}: {tmp_path / 'b.txt'} is not UTF-8 text (byte 0xe9 at "
                            f"offset 9); {tmp_path / 'c.txt'} is not UTF-8 text (byte 0xff at offset {(1 << 20) + 3}); "
                            f"{tmp_path / 'd.txt'} is not UTF-8 text (byte 0xe2 at offset {(1 << 20) + 5})")
    assert taken > 10  # (the batches of a.txt came first)


def test_a_parquet_file_whose_name_is_not_utf8_is_named(tmp_path, tokenizer):
    """pyarrow opens a parquet file by its name as UTF-8 text: a name in another encoding is said,
    with the file, not as a bare codec error."""
    import shutil

    write_parquet(tmp_path / "a.parquet", text=make_texts(5))
    shutil.copy(tmp_path / "a.parquet", os.path.join(str(tmp_path), os.fsdecode(b"x\xe9.parquet")))
    with pytest.raises(ValueError, match=r"^cannot read dataset \S+: the name of '\S+/x\\udce9\.parquet' is not UTF-8 "
                                         r"text, which pyarrow needs to open a parquet file; rename it$"):
        PackedBatches(DataConfig(dataset=str(tmp_path)), tokenizer, rows=1)


def test_the_run_s_own_checkpoints_in_its_dataset_directory_are_not_data(tmp_path, tokenizer):
    """A dataset directory (or recursive glob) holding the run's --ckpt-dir: what the run saves
    there (both trainers' checkpoint files, metrics.jsonl) is not read as data, so the same command
    resumes with the same files (it failed: "mixes file types", or a checkpoint's config.json read
    as a record). Without the run's --ckpt-dir, they are data as any other files."""
    from jaxllm.recipes import RunConfig

    texts = make_texts(6)
    write_jsonl(tmp_path / "a.jsonl", texts)
    config = LLMConfig.from_preset("tiny")
    rc = RunConfig(dataset=str(tmp_path), ckpt_dir=str(tmp_path / "ck"))
    first = data.run_stream(rc, config, None)[1]  # the first start: nothing saved yet
    for name, text in (("metrics.jsonl", '{"step": 1}\n'), ("2/commit_success.txt", "ok"),
                       ("checkpoint-2/config.json", "{}")):
        (tmp_path / "ck" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "ck" / name).write_text(text)
    for dataset in (str(tmp_path), str(tmp_path / "**" / "*.json*")):
        cfg, source = data.run_stream(dataclasses.replace(rc, dataset=dataset), config, None)
        assert source["files"] == first["files"] == [["a.jsonl", (tmp_path / "a.jsonl").stat().st_size]]
        assert list(iter_documents(cfg)) == texts
    with pytest.raises(ValueError, match="mixes file types .json, .jsonl, .txt"):
        PackedBatches(DataConfig(dataset=str(tmp_path)), tokenizer, rows=1)
    with pytest.raises(ValueError, match=r"^dataset directory \S+ck holds no \S+ file outside --ckpt-dir \S+ck$"):
        PackedBatches(DataConfig(dataset=str(tmp_path / "ck"), skip_dir=str(tmp_path / "ck")), tokenizer, rows=1)
    # data inside the run's directory (`--ckpt-dir runs --dataset runs/data`) is read whole
    (tmp_path / "ck" / "data").mkdir()
    write_jsonl(tmp_path / "ck" / "data" / "b.jsonl", texts[:3])
    for dataset in ("data", "data/*.jsonl", "data/**/*.json*"):
        cfg = DataConfig(dataset=str(tmp_path / "ck" / dataset), skip_dir=str(tmp_path / "ck"))
        assert list(iter_documents(cfg)) == texts[:3]


def logged_by_datasets(caplog):
    """What `datasets` logged (on stderr, in a command line, besides the error's own line)."""
    return [r.getMessage() for r in caplog.records if r.name.startswith("datasets") and r.levelno >= 30]


def write_parquet(path, **columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def test_an_empty_parquet_file_holds_no_documents(tmp_path, tokenizer):
    """A parquet file of no rows (a schema only) is an empty file: alone, an empty dataset; among
    others, no documents. `datasets` by itself fails on it (a batch size of its 0 rows)."""
    import pyarrow as pa

    (tmp_path / "d").mkdir()
    write_parquet(tmp_path / "d" / "a.parquet", text=pa.array([], pa.string()))
    with pytest.raises(ValueError, match=r"^dataset \S+a\.parquet is empty: it has no documents$"):
        PackedBatches(DataConfig(dataset=str(tmp_path / "d" / "a.parquet")), tokenizer, rows=1)
    texts = make_texts(10)
    write_parquet(tmp_path / "d" / "b.parquet", text=texts)
    cfg = DataConfig(dataset=str(tmp_path / "d"), seq_len=8)
    assert list(iter_documents(cfg)) == texts
    with PackedBatches(cfg, tokenizer, rows=2) as batches:
        got = np.concatenate([next(batches) for _ in range(3)]).ravel()
    np.testing.assert_array_equal(got, expected_stream(cfg, tokenizer, epochs=1)[: got.size])


@pytest.mark.parametrize("bad, message", [
    (b"not a parquet file" * 10, r"cannot read dataset \S+: \S+b\.parquet: Parquet magic bytes not found"),
    ({"content": ["a b c"] * 3}, r"has no text column 'text' \(in \S+b\.parquet\); its columns: content"),
    ({"text": [1, 2, 3]}, r"column 'text' of dataset \S+ holds int64 values, not text \(in \S+b\.parquet\)"),
])
def test_a_bad_parquet_file_among_several_is_named_before_the_first_batch(tmp_path, tokenizer, caplog, bad, message):
    """Every parquet file's footer is checked when the data is opened: a bad shard after good ones
    fails then, in one line naming it, not when the stream reaches it hours into a run."""
    write_parquet(tmp_path / "a.parquet", text=make_texts(300))
    if isinstance(bad, bytes):
        (tmp_path / "b.parquet").write_bytes(bad)
    else:
        write_parquet(tmp_path / "b.parquet", **bad)
    with pytest.raises(ValueError, match=message) as e:
        PackedBatches(DataConfig(dataset=str(tmp_path), seq_len=4), tokenizer, rows=1)
    assert "\n" not in str(e.value)
    assert not logged_by_datasets(caplog)


def test_parquet_files_may_differ_in_their_other_columns(tmp_path, tokenizer):
    """Only the text column is read: shards whose other columns differ (added, dropped, retyped)
    make one stream."""
    write_parquet(tmp_path / "a.parquet", text=["first file, first document", "first file, second"], n=[1, 2])
    write_parquet(tmp_path / "b.parquet", text=["second file"], n=["x"], extra=[0.5])
    write_parquet(tmp_path / "c.parquet", text=["third file"])
    cfg = DataConfig(dataset=str(tmp_path), seq_len=4)
    assert list(iter_documents(cfg)) == ["first file, first document", "first file, second", "second file", "third file"]


def test_paths_with_glob_characters_in_their_names_are_read_as_they_are(tmp_path):
    """A file or directory that exists is that file or directory, even where its name could be a
    pattern (`corpus[v2].jsonl` would match `corpus2.jsonl`), and `datasets` reads each listed file
    itself."""
    write_jsonl(tmp_path / "corpus[v2].jsonl", ["bracketed file"])
    write_jsonl(tmp_path / "corpus2.jsonl", ["the file the pattern matches"])
    (tmp_path / "dir[1]").mkdir()
    write_jsonl(tmp_path / "dir[1]" / "a.jsonl", ["in a bracketed directory"])
    write_jsonl(tmp_path / "dir[1]" / "only[x].jsonl", ["bracketed file in a bracketed directory"])

    def docs(spec):
        return list(iter_documents(DataConfig(dataset=str(spec))))

    assert docs(tmp_path / "corpus[v2].jsonl") == ["bracketed file"]
    assert docs(tmp_path / "dir[1]") == ["in a bracketed directory", "bracketed file in a bracketed directory"]
    assert docs(tmp_path / "corpus?.jsonl") == ["the file the pattern matches"]  # no such file: a pattern
    # a glob's leading folder that exists is that folder (`dir[1]` would match `dir1`, read in its place)
    (tmp_path / "dir1").mkdir()
    write_jsonl(tmp_path / "dir1" / "old.jsonl", ["in the folder the pattern matches"])
    assert docs(tmp_path / "dir[1]" / "a*.jsonl") == ["in a bracketed directory"]
    assert docs(tmp_path / "dir[1]" / "**" / "*.jsonl") == ["in a bracketed directory",
                                                            "bracketed file in a bracketed directory"]
    assert docs(tmp_path / "dir[!x]" / "*.jsonl") == ["in the folder the pattern matches"]  # no such folder: a pattern


def test_json_records_may_differ_in_their_other_keys(tmp_path, monkeypatch):
    """Only the text column of a JSON record is read: records and files whose other keys differ
    (added, dropped, retyped: `datasets`' json builder refused a key its first 10 MB had not shown)
    make one stream; a null text is an empty document; a `.json` file may be one array."""
    lines = [{"text": "plain"}, {"text": "with a url", "url": "http://x"}, {"text": None, "n": 1},
             {"n": "retyped", "text": "keys in another order"}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + "\n")
    (tmp_path / "b.json").write_text(json.dumps([{"text": "from an array", "meta": {"k": [1, 2]}}]))
    # an indented array (after a blank line), and records after a byte-order mark (Windows tools write one)
    (tmp_path / "c.json").write_text("\n  " + json.dumps([{"text": "indented"}], indent=1))
    (tmp_path / "d.jsonl").write_text("\ufeff" + json.dumps({"text": "after a BOM"}) + "\n", encoding="utf-8")
    monkeypatch.setattr(data, "JSON_CHECKED_CHARS", 10)  # past the check: what training reads
    docs = list(iter_documents(DataConfig(dataset=str(tmp_path / "*.json*"), seq_len=4)))
    assert docs == ["plain", "with a url", "", "keys in another order", "from an array", "indented", "after a BOM"]


def test_a_json_record_without_the_text_column_is_named_in_one_line(tmp_path, tokenizer):
    """In the first file, when the data is opened (its first 10 MiB are checked); in a later one,
    where reading reaches it (here at once: packing reads ahead): the file, the line and the
    record's keys."""
    write_jsonl(tmp_path / "a.jsonl", ["some text", "more text"])
    write_jsonl(tmp_path / "b.jsonl", ["other text"], column="body")
    message = (r"cannot read dataset \S+: \S+b\.jsonl line 1 has no text column 'text'; its keys: body, id "
               r"\(choose one with --text-column\)")
    with pytest.raises(ValueError, match=message):
        PackedBatches(DataConfig(dataset=str(tmp_path / "b.jsonl"), seq_len=4), tokenizer, rows=1)
    with pytest.raises(ValueError, match=message) as e:
        with PackedBatches(DataConfig(dataset=str(tmp_path), seq_len=4), tokenizer, rows=1) as batches:
            for _ in range(50):
                next(batches)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec, message", [
    ("{tmp}/missing.parquet", "no such file"),
    ("{tmp}/*.jsonl", "no file matches"),
    ("{tmp}", "holds no .parquet/.jsonl/.json/.txt file"),
    ("{tmp}/data.csv", "unsupported file type .csv"),
])
def test_bad_local_paths(tmp_path, tokenizer, spec, message):
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=message):
        PackedBatches(DataConfig(dataset=spec.format(tmp=tmp_path)), tokenizer, rows=1)


def test_a_pipe_is_not_called_missing(tmp_path, tokenizer):
    """A named pipe (what a shell's `<(zcat data.jsonl.gz)` gives) was "no such file or directory":
    it exists, but the data is read again every epoch and on a resume."""
    pipe = tmp_path / "data.jsonl"
    os.mkfifo(pipe)
    with pytest.raises(ValueError, match=rf"^dataset {re.escape(str(pipe))} is neither a file nor a directory "
                                         r"\(a pipe\?\): the data is read again every epoch"):
        PackedBatches(DataConfig(dataset=str(pipe)), tokenizer, rows=1)


def test_a_missing_local_path_is_not_taken_for_a_hub_id(tmp_path, tokenizer, monkeypatch):
    """A Hub id is "name" or "owner/name": "dir/" (and "./x", "../x", "/x") are local paths."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    for spec in ("missing_dir/", "./missing", "../missing", str(tmp_path / "missing"), "owner/missing/"):
        with pytest.raises(ValueError, match=f"dataset {re.escape(spec)}: no such file or directory"):
            PackedBatches(DataConfig(dataset=spec), tokenizer, rows=1)
        with pytest.raises(ValueError, match=f"tokenizer {re.escape(spec)}: no such file or directory"):
            load_tokenizer(spec)


def test_hub_dataset_while_offline_says_so_and_suggests_a_local_path(tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = DataConfig(dataset="HuggingFaceTB/smollm-corpus", dataset_config="cosmopedia-v2")
    t0 = time.time()
    with pytest.raises(ValueError, match=r"Hub cannot be reached.*offline.*local path"):
        PackedBatches(cfg, tokenizer, rows=1)
    assert time.time() - t0 < 5


def test_hub_tokenizer_while_offline_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(ValueError, match=r"Hub cannot be reached.*offline.*local path"):
        load_tokenizer("jaxllm-tests/not-in-any-cache")
    assert time.time() - t0 < 10


def test_bad_tokenizer_paths(tmp_path):
    with pytest.raises(ValueError, match="no such file or directory"):
        load_tokenizer(str(tmp_path / "nope" / "tokenizer.json"))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read tokenizer file"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))
    # the directory's other JSON file, passed by mistake: named as such (not as a syntax error)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "backend": "tokenizers"}))
    with pytest.raises(ValueError, match=r'is JSON but not a tokenizer.json \(no "model"; it holds backend, eos_token\)'):
        load_tokenizer(str(tmp_path / "tokenizer_config.json"))


def test_vocabulary_larger_than_the_model_names_both_numbers(tokenizer):
    with pytest.raises(ValueError, match=r"4096 tokens.*vocab_size is 512"):
        data.check_vocab(tokenizer, LLMConfig.from_preset("tiny"))
    data.check_vocab(tokenizer, LLMConfig.from_preset("small"))


def test_a_tokenizer_whose_eos_is_not_the_models_is_refused_naming_both_ids(tokenizer):
    """Training would end documents with the tokenizer's EOS and generation stop at the config's
    (a Llama-style `</s>` = 2 against the presets' 0): the model would never stop."""
    with pytest.raises(ValueError, match=r"EOS token '<\|endoftext\|>' is id 0 but the model's eos_token_id is 2"):
        data.check_vocab(tokenizer, LLMConfig.from_preset("small", eos_token_id=2))


# ---- the real tokenizer and parquet layout (../shared/assets) -----------------------------
def test_real_tokenizer_from_a_file_and_a_directory(assets):
    for spec in (assets / "smollm2-tokenizer" / "tokenizer.json", assets / "smollm2-tokenizer"):
        tok = load_tokenizer(str(spec))
        assert len(tok) == 49152 and tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
        data.check_vocab(tok, LLMConfig.from_preset("seed-973m"))
        with pytest.raises(ValueError, match="49152 tokens.*vocab_size is 4096"):
            data.check_vocab(tok, LLMConfig.from_preset("small"))
    assert data.tokenizer_source(str(spec)) == str(spec)


def test_a_tokenizer_directory_is_exactly_its_tokenizer_json(assets, tmp_path):
    """cosmo2's tokenizer_config.json names GPT2Tokenizer, whose transformers-5 class would replace
    the file's pre-tokenizer; the loaded tokenizer must keep SmolLM2's digit splitting."""
    (tmp_path / "tokenizer.json").symlink_to(assets / "smollm2-tokenizer" / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}))
    tok = load_tokenizer(str(tmp_path))
    pre = json.loads(tok.backend_tokenizer.to_str())["pre_tokenizer"]
    assert pre == json.loads((assets / "smollm2-tokenizer" / "tokenizer.json").read_text())["pre_tokenizer"]
    assert "Digits" in json.dumps(pre) and (tok.bos_token_id, tok.eos_token_id) == (0, 0)


def test_real_parquet_layout_packs_and_splits_by_shard(assets):
    tok = load_tokenizer(str(assets / "smollm2-tokenizer" / "tokenizer.json"))
    cfg = DataConfig(dataset=str(assets / "cosmopedia-v2-format" / "*.parquet"), seq_len=256)
    shares = assert_shares_partition(cfg, tok, n_batches=3, rows=4)
    assert len(shares[0]) + len(shares[1]) == 2491
    with PackedBatches(cfg, tok, rows=4) as batches:
        reference, states = take(batches, 6)
    with PackedBatches(cfg, tok, rows=4, state=states[2]) as resumed:
        np.testing.assert_array_equal(next(resumed), reference[3])
    with pytest.raises(ValueError, match=r"no text column 'story'.*prompt, text, token_length"):
        PackedBatches(DataConfig(dataset=cfg.dataset, text_column="story"), tok, rows=1)


def test_a_resume_accepts_the_same_files_moved_and_refuses_other_files(tmp_path, capsys):
    """The stream source records a local dataset's files (relative paths and sizes): the same files
    under another path (a run moved to another machine) resume; other files under another path,
    other seeds or tokenizers are refused, naming the flag; other files under the same path (data
    that grew) resume with a warning (from the first process only: not when `quiet`)."""
    import shutil

    for name, n in (("a.jsonl", 4), ("sub/b.jsonl", 5)):
        (tmp_path / "here" / name).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(tmp_path / "here" / name, make_texts(n))
    shutil.copytree(tmp_path / "here", tmp_path / "there")

    def source(where, **kw):
        return data.stream_source(DataConfig(dataset=str(tmp_path / where), **kw), "embedded:k")

    recorded = json.loads(json.dumps(source("here")))  # as a checkpoint stores it
    assert recorded["files"] == [["a.jsonl", (tmp_path / "here" / "a.jsonl").stat().st_size],
                                 ["sub/b.jsonl", (tmp_path / "here" / "sub" / "b.jsonl").stat().st_size]]
    data.check_same_stream(recorded, source("there"), "ck")
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="--seed"):
        data.check_same_stream(recorded, source("there", seed=1), "ck")
    with pytest.raises(ValueError, match="--tokenizer"):
        data.check_same_stream(recorded, data.stream_source(DataConfig(dataset=str(tmp_path / "here")), "other"), "ck")
    write_jsonl(tmp_path / "there" / "sub" / "b.jsonl", make_texts(5, seed=1))  # other text, another size
    with pytest.raises(ValueError, match="--dataset"):
        data.check_same_stream(recorded, source("there"), "ck")
    write_jsonl(tmp_path / "here" / "c.jsonl", make_texts(4))  # the data grew where it was
    data.check_same_stream(recorded, source("here"), "ck")
    assert "differ from those ck was trained on" in capsys.readouterr().err
    data.check_same_stream(recorded, source("here"), "ck", quiet=True)  # a run's other processes
    assert capsys.readouterr().err == ""
    # Hub datasets have no file list: another id is another stream.
    hub = json.loads(json.dumps(data.stream_source(DataConfig(dataset="org/one"), "embedded:k")))
    assert hub["files"] is None
    data.check_same_stream(hub, data.stream_source(DataConfig(dataset="org/one"), "embedded:k"), "ck")
    with pytest.raises(ValueError, match="--dataset 'org/two' differs from the 'org/one'"):
        data.check_same_stream(hub, data.stream_source(DataConfig(dataset="org/two"), "embedded:k"), "ck")


def test_a_resume_takes_the_same_tokenizer_named_otherwise_and_refuses_another(tmp_path):
    """The same command from another directory names the run's tokenizer by another path (a
    relative `--tokenizer tok.json`), and a local copy of a Hub tokenizer names it by a path: when
    it tokenizes as the checkpoint's saved copy, the run goes on with that copy and the recorded
    name (the stream check passes); another tokenizer keeps its own name (the check refuses)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from jaxllm.recipes import RunConfig

    def word_tokenizer(path, words):
        t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<|endoftext|>", "[UNK]", *words])},
                                       unk_token="[UNK]"))
        t.pre_tokenizer = pre_tokenizers.Whitespace()
        path.parent.mkdir(parents=True, exist_ok=True)
        t.save(str(path))

    for where, words in (("here", ["the", "cat"]), ("there", ["the", "cat"]), ("other", ["the", "dog"])):
        word_tokenizer(tmp_path / where / "tok.json", words)
    config = LLMConfig.from_preset("tiny")
    copy = data.tokenizer_files(data.model_tokenizer(str(tmp_path / "here" / "tok.json"), config))
    for recorded in (data.tokenizer_source(str(tmp_path / "here" / "tok.json")), "org/hub-tokenizer"):
        tok, spec = data.run_tokenizer(RunConfig(tokenizer=str(tmp_path / "there" / "tok.json")), config,
                                       (recorded, copy), origin="ck")
        assert spec == recorded and tok("the cat")["input_ids"] == [2, 3]
        tok, spec = data.run_tokenizer(RunConfig(tokenizer=str(tmp_path / "other" / "tok.json")), config,
                                       (recorded, copy), origin="ck")
        assert spec == str(tmp_path / "other" / "tok.json") and tok("the dog")["input_ids"] == [2, 3]


def test_a_run_s_tokenizer_is_tidied_for_saving_and_generation(tmp_path):
    """A bare tokenizer.json (as cosmo2's file alone): the model's BOS named, padding on the left,
    and none of the loading options in what it saves; its token ids unchanged."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "the": 1, "cat": 2, "[UNK]": 3}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.save(str(tmp_path / "tokenizer.json"))
    config = LLMConfig.from_preset("tiny")
    plain = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert plain.bos_token is None
    tok = data.model_tokenizer(str(tmp_path / "tokenizer.json"), config)
    assert tok("the cat")["input_ids"] == plain("the cat")["input_ids"] == [1, 2]
    assert tok.bos_token_id == config.bos_token_id and tok.padding_side == "left"
    again = data.tokenizer_from_files(data.tokenizer_files(tok), config)  # as a checkpoint keeps it
    assert again.bos_token_id == config.bos_token_id and again.padding_side == "left"
    saved = json.loads(data.tokenizer_files(again)["tokenizer_config.json"])
    assert "is_local" not in saved and "local_files_only" not in saved, saved
    # as long as the model's positions, not "no limit known" (1e30): `truncation=True` then cuts
    # a text to what the model takes (the PyTorch trainer's checkpoints said 1e30, exports 128)
    assert plain.model_max_length > 1e29
    assert tok.model_max_length == again.model_max_length == saved["model_max_length"] == config.max_position_embeddings
    assert len(again("the " * 200, truncation=True)["input_ids"]) == config.max_position_embeddings
    # a BOS id that is an ordinary word is not named: saved as a special token, it would no longer
    # be split out of longer words ("the" in "theory") after a reload
    word_bos = LLMConfig.from_preset("tiny", bos_token_id=1)
    assert data.model_tokenizer(str(tmp_path / "tokenizer.json"), word_bos).bos_token is None


def test_a_recorded_hub_config_means_nothing_for_local_files_on_resume(tmp_path, capsys):
    """Runs with a recipe and local files once recorded the recipe's Hub config (`cosmopedia-v2`),
    which their data never read: such a run resumes, and a Hub dataset's config is still checked."""
    write_jsonl(tmp_path / "a.jsonl", make_texts(4))
    local = data.stream_source(DataConfig(dataset=str(tmp_path / "a.jsonl")), "embedded:k")
    data.check_same_stream({**local, "dataset_config": "cosmopedia-v2"}, local, "ck")
    hub = data.stream_source(DataConfig(dataset="org/ds", dataset_config="a"), "embedded:k")
    with pytest.raises(ValueError, match="--dataset-config 'b' differs from the 'a'"):
        data.check_same_stream(hub, {**hub, "dataset_config": "b"}, "ck")


def test_a_changed_embedded_corpus_is_warned_about_on_resume(monkeypatch, capsys):
    """The embedded corpus comes with Python (`pydoc_data`) and differs between versions: a run
    resumed under another Python points its saved position into another document list, and says so."""
    recorded = json.loads(json.dumps(data.stream_source(DataConfig(), "embedded:k")))
    data.check_same_stream(recorded, data.stream_source(DataConfig(), "embedded:k"), "ck")
    assert capsys.readouterr().err == ""
    corpus = data.embedded_corpus()
    monkeypatch.setattr(data, "embedded_corpus", lambda: corpus[:-1] + [corpus[-1] + " (a newer Python)"])
    data.check_same_stream(recorded, data.stream_source(DataConfig(), "embedded:k"), "ck")
    err = capsys.readouterr().err
    assert "warning: the embedded corpus (Python " in err and "differs from the one ck was trained on" in err, err
