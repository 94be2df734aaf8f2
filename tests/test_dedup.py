import random

import numpy as np
from datasketch import MinHash

from tasks.dedup import (
    deduplicate,
    doc_signature,
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
    res = deduplicate(shas, sigs, threshold=0.8, num_perm=128, seed=1)
    assert res.n_exact == 2 and res.n_near == 3
    assert res.exact_of == {20: 0, 21: 5}
    assert res.near_of == {22: 1, 23: 2, 24: 3}
    assert sum(res.keep) == 20 and all(res.keep[:20])
