import random

import numpy as np
from datasketch import MinHash

from tasks.ingest.dedup import (
    _BLOCK,
    batch_ngrams,
    batch_signatures,
    batch_token_hashes,
    deduplicate,
    doc_signature,
    lsh_bands,
    minhash_permutations,
    ngram_hashes,
    signature,
    token_hashes,
)


def test_token_hashes_are_positional_free_and_case_folded():
    a = token_hashes("Hello, world! hello_there wörld 42 Hello")
    b = token_hashes("x HELLO")
    assert len(a) == 6 and a[0] == a[5] == b[1]
    assert len(set(a.tolist())) == 5  # hello, world, hello_there, wörld, 42
    assert token_hashes("").size == 0 and token_hashes("... !!!").size == 0


def test_ngram_hashes():
    tok = token_hashes("a b c a b c")
    g = ngram_hashes(tok, 3)
    assert len(g) == 4 and g[0] == g[3] and g[0] != g[1]
    assert ngram_hashes(tok, 7).size == 0


def test_signature_equals_datasketch_update_batch():
    rng = np.random.default_rng(0)
    shingles = rng.integers(0, 2**63, size=5000, dtype=np.uint64)
    perms = minhash_permutations(64, 7)
    ref = MinHash(num_perm=64, seed=7, scheme="affine32", hashfunc=int)
    ref.update_batch([int(x) for x in shingles.astype(np.uint32)])
    assert np.array_equal(signature(shingles, perms), ref.hashvalues)
    assert np.array_equal(np.array(perms), ref.permutations)  # written out, not imported


def test_lsh_bands_equal_datasketchs_choice():
    """The Gauss-Legendre band choice against datasketch's scipy integrals, over the thresholds
    and permutation counts a user may set (the default 0.8, 128 included)."""
    from datasketch.lsh import _optimal_param

    cases = [(t / 20, n) for n in (8, 16, 64, 100, 128, 256) for t in range(1, 20)]
    ours = [lsh_bands(t, n) for t, n in cases]
    assert ours == [_optimal_param(t, n, 0.5, 0.5) for t, n in cases]
    assert lsh_bands(0.8, 128) == (9, 13) and len(set(ours)) > 40


def test_batches_equal_one_text_at_a_time():
    """Ingest hashes, n-grams and signs documents in batches: every text gets exactly what it gets
    alone, at the batch's edges too (empty, shorter than n, non-ASCII, words at the very start and
    end, a text with more shingles than a block, and a batch too large for one pass)."""
    rng = random.Random(3)
    words = ["alpha", "Beta", "wörld", "x_1", "42", "naïve", "z"]
    texts = [
        "",
        "one",
        "two words",
        "!!",
        "ends with word",
        " starts with space",
        "日本語 テキスト",
    ]
    texts += [" ".join(rng.choice(words) for _ in range(rng.randint(3, 400))) for _ in range(40)]
    texts.append(" ".join(f"w{i}" for i in range(_BLOCK + 500)))  # spans two signature blocks
    perms = minhash_permutations(128, 1)
    for batch in (texts, texts[:3], ["x" * 600_000, *texts[:9], "y z " * 150_000]):
        tok, bounds = batch_token_hashes([t.encode() for t in batch])
        assert len(bounds) == len(batch) + 1
        sigs = batch_signatures(tok, bounds, 5, perms)
        grams, owner = batch_ngrams(tok, bounds, 13)
        for i, text in enumerate(batch):
            alone = token_hashes(text)
            assert np.array_equal(tok[bounds[i] : bounds[i + 1]], alone), i
            assert np.array_equal(sigs[i], doc_signature(alone, 5, perms)), i
            assert np.array_equal(grams[owner == i], ngram_hashes(alone, 13)), i


def _doc(rng, n=300):
    return " ".join(
        rng.choice(
            [
                "alpha",
                "beta",
                "gamma",
                "delta",
                "eps",
                "zeta",
                "eta",
                "theta",
                "iota",
                "kappa",
                "lam",
                "mu",
                "nu",
                "xi",
                "omicron",
                "pi",
                "rho",
                "sigma",
            ]
        )
        + str(rng.randint(0, 50))
        for _ in range(n)
    )


def test_known_exact_and_near_duplicates_exact_counts():
    rng = random.Random(1)
    base = [_doc(rng) for _ in range(20)]
    docs = list(base)
    docs += [base[0], base[5]]  # 2 exact
    for i in (1, 2, 3):  # 3 near: one word changed
        w = base[i].split()
        w[100] = "CHANGED"
        docs.append(" ".join(w))
    perms = minhash_permutations(128, 1)
    sigs = [doc_signature(token_hashes(d), 5, perms) for d in docs]
    import hashlib

    shas = [hashlib.sha256(d.encode()).hexdigest() for d in docs]
    res = deduplicate(shas, sigs, threshold=0.8, num_perm=128)
    assert res.n_exact == 2 and res.n_near == 3
    assert res.exact_of == {20: 0, 21: 5}
    assert res.near_of == {22: 1, 23: 2, 24: 3}
    assert sum(res.keep) == 20 and all(res.keep[:20])


def in_memory_reference(shas, sigs, threshold, num_perm, seed):
    """The in-memory path: datasketch's MinHashLSH, documents inserted in order, a document dropped
    when its query returns a kept one at the threshold (the first such, by index)."""
    from datasketch import LeanMinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    seen, kept, exact, near = {}, {}, {}, {}
    for i, (digest, sig) in enumerate(zip(shas, sigs, strict=True)):
        if digest in seen:
            exact[i] = seen[digest]
            continue
        seen[digest] = i
        mh = LeanMinHash(seed=seed, hashvalues=sig, scheme="affine32")
        match = next((j for j in sorted(lsh.query(mh)) if kept[j].jaccard(mh) >= threshold), None)
        if match is not None:
            near[i] = match
            continue
        lsh.insert(i, mh)
        kept[i] = mh
    return exact, near


def test_banded_lsh_on_a_task_runner_equals_in_memory_lsh(prefect_server):
    """Families of near duplicates, chains (A~B, B~C, A!~C) and exact copies, shuffled: the band
    steps, run as Prefect tasks on a process pool, keep and drop what datasketch's in-memory index
    does, document for document."""
    from prefect import flow

    from tasks.common.infra import InfraConfig
    from tasks.common.runners import task_map, task_runner

    rng = random.Random(11)
    docs = [_doc(rng, 300) for _ in range(40)]
    for base in list(docs[:15]):
        w = base.split()
        for k in range(rng.randint(1, 4)):  # a family: each member a few words from the base
            v = list(w)
            for pos in rng.sample(range(len(v)), 3 + 2 * k):
                v[pos] = f"edit{rng.randint(0, 10**6)}"
            docs.append(" ".join(v))
    chain = docs[20].split()
    for step in range(5):  # each link close to the previous one, far from the first
        for pos in rng.sample(range(len(chain)), 12):
            chain[pos] = f"drift{step}{pos}"
        docs.append(" ".join(chain))
    docs += [docs[3], docs[41]]
    rng.shuffle(docs)
    perms = minhash_permutations(128, 1)
    sigs = [doc_signature(token_hashes(d), 5, perms) for d in docs]
    import hashlib

    shas = [hashlib.sha256(d.encode()).hexdigest() for d in docs]
    exact, near = in_memory_reference(shas, sigs, 0.8, 128, 1)
    assert len(near) > 15 and len(exact) == 2

    @flow
    def on_a_pool():
        with task_runner(InfraConfig(), 2) as runner:
            return deduplicate(shas, sigs, 0.8, 128, task_map(runner, print))

    res = on_a_pool()
    assert res.exact_of == exact and res.near_of == near
    assert res.keep == [i not in exact and i not in near for i in range(len(docs))]
    assert deduplicate(shas, sigs, 0.8, 128).near_of == near  # serially, the same


def test_a_huge_bucket_costs_linear_comparisons_and_matches_in_memory_lsh():
    """1,500 copies of one document, each with one word changed, share their buckets. Pairs per
    bucket would be 1.1 million per band; comparing each document only with the kept earlier
    members of its buckets costs about one comparison per document, and keeps and drops exactly
    what datasketch's in-memory index does."""
    import hashlib

    rng = random.Random(5)
    base = _doc(rng, 300).split()
    docs = []
    for k in range(1500):
        v = list(base)
        v[rng.randrange(len(v))] = f"word{k}"
        docs.append(" ".join(v))
    docs += [_doc(rng, 300) for _ in range(20)]  # unrelated documents stay
    perms = minhash_permutations(128, 1)
    sigs = [doc_signature(token_hashes(d), 5, perms) for d in docs]
    shas = [hashlib.sha256(d.encode()).hexdigest() for d in docs]
    res = deduplicate(shas, sigs, 0.8, 128)
    exact, near = in_memory_reference(shas, sigs, 0.8, 128, 1)
    assert res.exact_of == exact and res.near_of == near
    assert res.n_near >= 1490 and all(res.keep[1500:])
    assert res.comparisons < 3 * len(docs), res.comparisons


def test_token_hashes_of_a_long_text_equal_one_pass_over_it():
    """Texts over 1 MB are hashed in pieces cut between words, one word longer than a piece
    included: every hash equals the single pass over the whole text."""
    import numpy as np

    from tasks.ingest.dedup import span_hashes, text_bytes, word_spans

    rng = random.Random(3)
    words = [rng.choice(["alpha", "Beta_2", "γάμμα", "x", "delta99"]) for _ in range(400_000)]
    text = " ".join(words[:200_000]) + " " + "z" * 1_500_000 + "\n" + " ".join(words[200_000:])
    b = text_bytes(text)
    whole = span_hashes(b, *word_spans(b))
    assert len(b) > 3_000_000 and len(whole) == 400_001
    assert np.array_equal(token_hashes(text), whole)


def test_working_buffers_are_reused_and_never_leak_between_batches():
    """The per-batch working arrays are one buffer per thread, reused: a small batch after a
    large one (whose values stay in the buffer past the small one's end) hashes and signs exactly
    as in a fresh thread, and a thread never shares another's buffer."""
    import threading

    from tasks.ingest.dedup import _scratch

    perms = minhash_permutations(128, 1)
    small = [b"the quick brown fox jumps over the lazy dog " * 3, b"tiny", b""]
    large = [(" ".join(f"w{i}" for i in range(50_000))).encode()]

    def run(batches):
        out = []
        for batch in batches:
            tok, bounds = batch_token_hashes(batch)
            out.append((tok, batch_signatures(tok, bounds, 5, perms)))
        return out[-1]

    fresh: list = []
    thread = threading.Thread(
        target=lambda: fresh.append((run([small]), _scratch("prefix", (8,), np.uint64)))
    )
    thread.start()
    thread.join()
    (tok_fresh, sig_fresh), other_thread_buf = fresh[0]
    tok, sig = run([large, small])
    assert np.array_equal(tok, tok_fresh) and np.array_equal(sig, sig_fresh)
    buf = _scratch("prefix", (8,), np.uint64)
    assert np.shares_memory(buf, _scratch("prefix", (100,), np.uint64))  # reused, not re-made
    assert not np.shares_memory(buf, other_thread_buf)
