"""Secrets never leak: back up with a key and with a SAS (with failures, --debug, --log-file and
--json), then search every byte of the state directory and every output for them.
"""

from __future__ import annotations

import os
import stat
from datetime import timedelta

from azurite import KEY
from helpers import JsonRun, account_sas_url, assert_nothing_leaks, env_for, many_files, secret_forms

from sitebackup.blob.errors import redact


def test_key_and_sas_never_appear_in_state_or_output(azurite, tmp_path, container_name):
    src = tmp_path / "site"
    many_files(src, 30)
    with open(os.path.join(os.fsencode(src), b"bad\xff.txt"), "wb") as fh:  # a per-file failure
        fh.write(b"x")
    state, log = tmp_path / "state", tmp_path / "backup.log"
    sas_url, sas = account_sas_url(azurite.port, timedelta(hours=1))
    conn = azurite.connection_string
    secrets = secret_forms(KEY, conn, sas, sas_url)
    texts: list[str] = []

    def run(args: list[str], env: dict[str, str], expect: int) -> None:
        r = JsonRun(args, env)
        code, _, err = r.finish()
        texts.extend([*(str(e) for e in r.events), err])
        assert code == expect, err

    common = ["--debug", "--log-file", str(log)]
    # a key in the environment and on the command line; one file fails
    run([str(src), "-c", container_name, *common], env_for(conn, state), 1)
    run([str(src), "-c", container_name, "--force", "--connection-string", conn, *common], env_for(None, state), 1)
    # a SAS in the account URL, then the same from the environment
    run([str(src), "-c", container_name, "--force", "--account-url", sas_url, *common], env_for(None, state), 1)
    run([str(src), "-c", container_name, "--force", *common],
        env_for(None, state, AZURE_STORAGE_ACCOUNT_URL=sas_url), 1)
    # destination failures: a SAS that may not write, a key the service refuses
    read_only_url, read_only_sas = account_sas_url(azurite.port, timedelta(hours=1), write=False)
    secrets += secret_forms(read_only_url, read_only_sas)
    run([str(src), "-c", container_name, "--force", "--account-url", read_only_url, *common], env_for(None, state), 3)
    run([str(src), "-c", "another-container", *common], env_for(None, state, AZURE_STORAGE_ACCOUNT_URL=read_only_url), 3)
    run(["list", "--debug"], env_for(conn, state), 0)
    assert log.exists() and (state / "state.db").exists()
    assert any("FAILED" in t or "not valid UTF-8" in t for t in texts)
    assert_nothing_leaks(secrets, texts, [state, log.parent])


def test_redact_blanks_keys_signatures_and_tokens():
    text = ("AccountKey=abc/def+ghi==;x SharedAccessSignature=sv=1&sig=zzz "
            "http://h/c?sv=2020&sig=abc%2Bdef%3D&se=1 Authorization: Bearer eyJhbGciOi.abc.def")
    out = redact(text)
    for secret in ("abc/def+ghi==", "zzz", "abc%2Bdef%3D", "eyJhbGciOi.abc.def"):
        assert secret not in out
    assert "AccountKey=***" in out and "sig=***" in out and "Bearer ***" in out


def test_state_directory_and_socket_are_owner_only(azurite, tmp_path, short_tmp, container_name):
    src = tmp_path / "site"
    many_files(src, 300)
    state = short_tmp / "state"
    run = JsonRun([str(src), "-c", container_name, "--concurrency", "1"], env_for(azurite.connection_string, state))
    try:
        run.until(lambda e: e["event"] == "progress")
        sockets = [p for p in state.rglob("*") if stat.S_ISSOCK(p.lstat().st_mode)]
        assert sockets, "the backend's unix socket should live in the state directory"
        for sock in sockets:
            assert stat.S_IMODE(sock.lstat().st_mode) == 0o600
            assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
        code, _, err = run.finish()
    finally:
        run.kill()
    assert code == 0, err
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for path in state.rglob("*"):
        if path.is_dir():
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
