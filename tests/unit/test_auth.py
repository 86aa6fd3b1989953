"""API keys: hashed at rest, compared in constant time, ids (never keys) out."""

import pytest

from mistral_ray.config import parse_service
from mistral_ray.server.auth import ApiKeys


def test_identify():
    keys = ApiKeys(["team-a:sk-aaa", "team-b: sk-bbb "])
    assert keys.identify("Bearer sk-aaa") == "team-a"
    assert keys.identify("bearer sk-bbb") == "team-b"
    for header in [None, "", "Bearer", "Bearer ", "Basic sk-aaa", "Bearer sk-aa", "Bearer sk-aaaa", "sk-aaa"]:
        assert keys.identify(header) is None, header


def test_keys_are_not_kept_in_clear():
    keys = ApiKeys(["team-a:sk-secret-value"])
    assert "sk-secret-value" not in repr(vars(keys))


@pytest.mark.parametrize("entries", [[], ["no-separator"], [":key"], ["id:"]])
def test_bad_entries_fail_without_showing_them(entries):
    with pytest.raises(ValueError) as err:
        ApiKeys(entries)
    assert "key" in str(err.value) and "no-separator" not in str(err.value)


def test_config_reads_file_and_env(tmp_path, monkeypatch):
    path = tmp_path / "keys"
    path.write_text("# comment\nteam-a:sk-1\n\n")
    monkeypatch.setenv("MY_KEYS", "team-b:sk-2,team-c:sk-3")
    cfg = parse_service({"router": {"api_keys": {"enabled": True, "file": str(path), "env": "MY_KEYS"}}})
    assert cfg.router.api_keys.read_entries() == ["team-a:sk-1", "team-b:sk-2", "team-c:sk-3"]
    assert parse_service({}).router.api_keys.enabled is False  # off in the local default
