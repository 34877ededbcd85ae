"""Writing the secrets file: it keeps what the reader needs, and is never redirected."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest

from bridge.secrets import (
    SECRET_FILE_NAME,
    SecretDestination,
    SecretDestinationError,
    read_secret_file,
    write_secret_file,
)
from bridge.signature import decode_secret
from tests.conftest import new_secret

UNPRIVILEGED = 65534  # nobody


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "secrets"
    directory.mkdir(mode=0o750)
    return directory


def test_a_new_file_is_the_owners_only(secrets_dir: Path) -> None:
    path = secrets_dir / SECRET_FILE_NAME
    write_secret_file(path, [new_secret()])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_a_replaced_file_keeps_its_mode_group_and_owner(secrets_dir: Path) -> None:
    path = secrets_dir / SECRET_FILE_NAME
    path.write_text(new_secret())
    os.chown(path, UNPRIVILEGED, UNPRIVILEGED)
    path.chmod(0o440)
    secret = new_secret()
    write_secret_file(path, [secret])
    status = path.stat()
    assert (status.st_uid, status.st_gid) == (UNPRIVILEGED, UNPRIVILEGED)
    assert stat.S_IMODE(status.st_mode) == 0o440
    assert read_secret_file(path) == (decode_secret(secret),)


def test_a_link_is_refused_not_followed(secrets_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    original = new_secret()
    elsewhere.write_text(original)
    link = secrets_dir / SECRET_FILE_NAME
    link.symlink_to(elsewhere)
    destination = SecretDestination.choose(None, str(secrets_dir))
    for keep_old in (False, True):
        with pytest.raises(SecretDestinationError, match="symbolic link"):
            destination.secrets_to_keep(keep_old=keep_old)
    with pytest.raises(SecretDestinationError, match="symbolic link"):
        write_secret_file(link, [new_secret()])
    assert link.is_symlink()
    assert elsewhere.read_text() == original


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o1777])
def test_a_directory_others_may_write_is_refused(secrets_dir: Path, mode: int) -> None:
    secrets_dir.chmod(mode)
    destination = SecretDestination.choose(None, str(secrets_dir))
    with pytest.raises(SecretDestinationError, match="chmod go-w"):
        destination.secrets_to_keep(keep_old=False)
    assert not list(secrets_dir.iterdir())


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a user who is not in the file's group")
def test_a_group_the_writer_cannot_give_is_refused_before_writing() -> None:
    # Not under tmp_path: its parents are root's own, which the unprivileged child cannot enter.
    with tempfile.TemporaryDirectory() as top:
        Path(top).chmod(0o755)
        secrets_dir = Path(top) / "secrets"
        secrets_dir.mkdir(mode=0o750)
        assert _rotation_as_nobody_is_refused_for_group(secrets_dir, 4242)


def _rotation_as_nobody_is_refused_for_group(secrets_dir: Path, group: int) -> bool:
    path = secrets_dir / SECRET_FILE_NAME
    path.write_text(new_secret())
    os.chown(path, UNPRIVILEGED, group)
    os.chown(secrets_dir, UNPRIVILEGED, UNPRIVILEGED)
    destination = SecretDestination.choose(None, str(secrets_dir))
    pid = os.fork()
    if pid == 0:  # the child drops root and tries what a rotation would
        try:
            os.setgroups([])
            os.setgid(UNPRIVILEGED)
            os.setuid(UNPRIVILEGED)
            destination.secrets_to_keep(keep_old=True)
        except SecretDestinationError as error:
            os._exit(0 if f"group {group}" in str(error) else 1)
        except BaseException:
            os._exit(2)
        os._exit(3)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0
