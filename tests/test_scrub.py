from tasks.config import DataConfig
from tasks.scrub import scrub

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
