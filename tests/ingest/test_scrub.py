from tasks.ingest.config import DataConfig
from tasks.ingest.scrub import scrub

CFG = DataConfig()


def test_emails_replaced_but_decorators_kept():
    text, n = scrub("@property\ndef f(): return 'jane.doe+x@mail.example.com'\n", CFG)
    assert "<EMAIL>" in text and "jane.doe" not in text and "@property" in text
    assert n["email"] == 1


def test_public_ips_replaced_private_kept():
    text, n = scrub(
        "a = '8.8.4.4'; b = '127.0.0.1'; c = '10.1.2.3'; v = '1.2.3.4.5'; bad = '999.1.1.1'", CFG
    )
    assert "<IP_ADDRESS>" in text and "8.8.4.4" not in text
    assert (
        "127.0.0.1" in text and "10.1.2.3" in text and "1.2.3.4.5" in text and "999.1.1.1" in text
    )
    assert n["ip_address"] == 1


def test_secrets_in_code():
    key = "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nAAAA\n-----END RSA PRIVATE KEY-----"
    src = (
        f"AWS_KEY = 'AKIAIOSFODNN7EXAMPLE'\naws_secret_access_key = 'wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY'\n"
        f"url = 'https://bob:hunter2@db.internal/x'\nq = 'https://api.x/v1?access_token=abcdef123456&x=1'\n"
        f"gh = 'ghp_{'a' * 36}'\n{key}\n"
    )
    text, n = scrub(src, CFG)
    for secret in (
        "AKIAIOSFODNN7EXAMPLE",
        "wJalrXUtnFEMI",
        "hunter2",
        "abcdef123456",
        "ghp_aaa",
        "MIIEow",
    ):
        assert secret not in text
    assert n == {
        "aws_access_key": 1,
        "aws_secret_key": 1,
        "url_credentials": 1,
        "url_token": 1,
        "github_token": 1,
        "private_key": 1,
    }
    assert "&x=1" in text and "db.internal/x" in text


def test_scrubbing_can_be_switched_off():
    cfg = DataConfig(scrub_emails=False, scrub_ips=False, scrub_secrets=False)
    src = "me@example.com 8.8.8.8 AKIAIOSFODNN7EXAMPLE"
    assert scrub(src, cfg) == (src, {})


def _ungated(text: str) -> tuple[str, dict]:
    """Every pattern applied, no literal test first: what the tests in front must never change."""
    from tasks.common.redaction import PATTERNS

    counts = {}
    for kind, _, pattern, repl in PATTERNS:
        text, n = pattern.subn(repl, text)
        if n:
            counts[kind] = n
    return text, counts


def test_literal_tests_never_skip_a_match():
    """The substring tests in front of the patterns (and of the e-mail pattern) skip only texts
    the patterns would leave alone: one example of each kind, in upper case, and with the
    non-ASCII letters an ignore-case pattern takes for i, s and k (dotless i, long s, dotted
    capital I, Kelvin sign), each alone and among other lines."""
    from tasks.common.redaction import replace_patterns
    from tasks.ingest.scrub import EMAIL, _emails

    examples = [
        "-----BEGIN EC PRIVATE KEY-----\nMHcC\n-----END EC PRIVATE KEY-----",
        "k = 'ASIAIOSFODNN7EXAMPLE'",
        "AWS_SECRET_ACCESS_KEY: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        f"t = 'gho_{'b' * 40}'",
        "s = 'xoxb-1234567890-abcdef'",
        f"g = 'AIza{'c' * 35}'",
        f"h = 'hf_{'d' * 32}'",
        f"o = 'sk-proj-{'e' * 24}'",
        "u = 'postgres://admin:s3cret@10.0.0.1/db'",
        "q = '/cb?code=1&Token=abcdefgh'",
        "form = 'a=1&auth=abcdefgh'",
        "q = 'https://x.example/p?X-Amz-Signature=0123456789abcdef'",
        "q = 'https://x.example/p?API_KEY=0123456789'",
        "aws_secret_access_key = 'wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY'",
        "q = 'https://x.example/p?api_key=0123456789&password=hunter22&sig=abcdefgh'",
    ]
    variants = []
    for e in examples:
        variants += [e, e.upper(), e.replace("i", "\u0131"), e.replace("s", "\u017f")]
        variants += [e.replace("I", "\u0130"), e.replace("k", "\u212a"), f"x = 1\n{e}\ny = 2\n"]
    for text in variants:
        assert replace_patterns(text) == _ungated(text), text
    assert sum(bool(_ungated(t)[1]) for t in variants) >= len(examples) * 3  # they do match
    mails = [
        "to: a.b@c.example.org",
        "jo.7@c.example.org, x+1@y.io",
        "@dataclass\nx = y@z.com",
        "m = u@h.i.jp\n@property",
        "@x.y",
    ]
    for text in mails:
        assert _emails(text) == (EMAIL.sub("<EMAIL>", text), len(EMAIL.findall(text))), text
