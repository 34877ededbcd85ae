"""The webhook secrets file: where the secrets come from, reloading it, writing it.

``BRIDGE_WEBHOOK_SECRET`` read from a file in ``BRIDGE_SECRETS_DIR`` can change while the
bridge runs: the file is polled and re-read on SIGHUP, and a new list that decodes takes
effect for the next request. A list that does not decode is refused and the last good one
stays in force. A secret given in the environment or as a flag is fixed for the process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from secrets import token_bytes

from bridge.signature import (
    SECRET_PREFIX,
    InvalidSecretError,
    SignatureVerifier,
    decode_secret_list,
)

logger = logging.getLogger(__name__)

SECRET_FILE_NAME = "BRIDGE_WEBHOOK_SECRET"  # noqa: S105  # a file name, not a secret
FILE_READ_TIMEOUT = 5.0
MAX_SECRET_FILE_BYTES = 64 * 1024
SETTLE_SECONDS = 0.1
SETTLE_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class SecretSource:
    """Where the webhook secrets of this process were read from."""

    description: str
    path: Path | None = None  # set only when the secrets come from a file that can change


STANDARD_INPUT = "-"


def locate_secret_source(
    secrets_dir: Path, environment: Mapping[str, str], *, flag_file: str | None = None
) -> SecretSource:
    """Mirror the settings' precedence: ``--webhook-secret-file``, then the environment,
    then the secrets file. A file, named either way, can change; standard input cannot."""
    if flag_file == STANDARD_INPUT:
        return SecretSource("standard input (--webhook-secret-file -)")
    if flag_file is not None:
        return SecretSource(f"the file {flag_file} (--webhook-secret-file)", Path(flag_file))
    if any(name.upper() == SECRET_FILE_NAME for name in environment):
        return SecretSource(f"the {SECRET_FILE_NAME} environment variable")
    path = find_secret_file(secrets_dir)
    if path is None:
        return SecretSource("nowhere")
    return SecretSource(f"the file {path}", path)


def find_secret_file(secrets_dir: Path) -> Path | None:
    """The secrets file in ``secrets_dir``, its name matched without case like the settings."""
    with contextlib.suppress(OSError):
        for entry in secrets_dir.iterdir():
            if entry.name.lower() == SECRET_FILE_NAME.lower() and entry.is_file():
                return entry
    return None


class SecretReloadError(Exception):
    """The secrets file cannot be used; the reason names no secret."""


def read_secret_file(path: Path) -> tuple[bytes, ...]:
    """Read and decode the comma-separated secrets in ``path``."""
    return decode_secret_text(_first_bytes(path))[1]


def read_secret_text(path: Path) -> str:
    """The comma-separated secrets in ``path``, checked to decode, as text."""
    return decode_secret_text(_first_bytes(path))[0]


def _first_bytes(path: Path | str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise SecretReloadError(f"cannot read it: {reason}") from None


def decode_secret_text(raw: bytes) -> tuple[str, tuple[bytes, ...]]:
    """The comma-separated secrets in ``raw`` (a file's first bytes), as text and decoded."""
    if len(raw) > MAX_SECRET_FILE_BYTES:
        raise SecretReloadError(f"it is larger than {MAX_SECRET_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SecretReloadError("it is not UTF-8 text") from None
    try:
        return text, decode_secret_list(text)
    except InvalidSecretError as error:
        raise SecretReloadError(str(error)) from None


def read_secrets_argument(given: str) -> str:
    """The secrets ``--webhook-secret-file`` names (a file, or ``-`` for standard input), as
    the comma-separated text the settings take. Raises :class:`SecretReloadError`."""
    raw = sys.stdin.buffer.read(MAX_SECRET_FILE_BYTES + 1) if given == STANDARD_INPUT else None
    return decode_secret_text(_first_bytes(given) if raw is None else raw)[0]


class SecretReloader:
    """Re-reads the secrets file and hands each new usable list to ``apply``.

    ``current`` is the verifier in force; ``apply`` swaps it (one attribute assignment, so
    the request path pays nothing for reloading). ``counted`` sees ``applied`` or
    ``refused`` once per change of the file's content, or per SIGHUP.
    """

    def __init__(
        self,
        path: Path,
        *,
        current: Callable[[], SignatureVerifier],
        apply: Callable[[SignatureVerifier], None],
        counted: Callable[[str], None],
        initial_keys: Sequence[bytes],
        conflict: Callable[[tuple[bytes, ...]], str | None] = lambda _keys: None,
    ) -> None:
        """``conflict`` says why a list that decodes may still not be used, or ``None``."""
        self.path = path
        self._conflict = conflict
        self._current = current
        self._apply = apply
        self._counted = counted
        self._keys = tuple(initial_keys)
        self._last_refusal: str | None = None
        self._checking = asyncio.Lock()
        self._requested: set[asyncio.Task[None]] = set()

    async def check(self, *, requested: bool = False) -> None:
        """Read the file once; ``requested`` (SIGHUP) reports even an unchanged refusal."""
        async with self._checking:
            keys = await self._read_settled()
            if not isinstance(keys, str):
                keys = self._conflict(keys) or keys
            if isinstance(keys, str):
                self._refuse(keys, requested=requested)
                return
            self._last_refusal = None
            if keys == self._keys:
                if requested:
                    logger.info("webhook secrets in %s unchanged", self.path)
                return
            previous = len(self._keys)
            self._apply(self._current().with_keys(keys))
            self._keys = keys
            self._counted("applied")
            logger.info(
                "webhook secrets reloaded from %s: %d in force (was %d)",
                self.path,
                len(keys),
                previous,
            )

    async def _read(self) -> tuple[bytes, ...] | str:
        """The secrets in the file, or why they cannot be used."""
        try:
            async with asyncio.timeout(FILE_READ_TIMEOUT):
                return await asyncio.to_thread(read_secret_file, self.path)
        except TimeoutError:
            return f"reading it took over {FILE_READ_TIMEOUT:g} s"
        except SecretReloadError as error:
            return str(error)

    async def _read_settled(self) -> tuple[bytes, ...] | str:
        """A file rewritten in place can be read half-written (an editor truncates, then
        writes): a change counts once two reads a moment apart agree on it."""
        found = await self._read()
        for _ in range(SETTLE_ATTEMPTS):
            if found in (self._keys, self._last_refusal):
                return found
            await asyncio.sleep(SETTLE_SECONDS)
            again = await self._read()
            if again == found:
                return found
            found = again
        return found

    def _refuse(self, reason: str, *, requested: bool) -> None:
        if reason == self._last_refusal and not requested:
            return
        self._last_refusal = reason
        self._counted("refused")
        logger.error(
            "refused the webhook secrets in %s: %s; the %d secret%s in force stay%s",
            self.path,
            reason,
            len(self._keys),
            "" if len(self._keys) == 1 else "s",
            "s" if len(self._keys) == 1 else "",
        )

    def request(self) -> None:
        """Schedule a check from a signal handler."""
        task = asyncio.get_running_loop().create_task(self.check(requested=True))
        self._requested.add(task)
        task.add_done_callback(self._requested.discard)

    async def watch(self, interval: float) -> AsyncIterator[None]:
        """Poll every ``interval`` seconds while the caller runs (0: only on request)."""

        async def poll() -> None:
            while True:
                try:
                    await self.check()
                except Exception:  # one failed check must not end the watch
                    logger.exception("checking the webhook secrets in %s failed", self.path)
                await asyncio.sleep(interval)

        # The first check also covers a change made before the signal handler was installed.
        poller = asyncio.create_task(poll() if interval > 0 else self.check())
        try:
            yield
        finally:
            for task in (poller, *self._requested):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


GENERATED_SECRET_BYTES = 32


def generate_secret() -> str:
    """A new random ``whsec_`` secret of 32 bytes, as OpenAI's are."""
    return SECRET_PREFIX + base64.b64encode(token_bytes(GENERATED_SECRET_BYTES)).decode()


def write_secret_file(path: Path, secrets: Sequence[str]) -> None:
    """Replace ``path`` atomically with ``secrets``, comma-separated.

    The new content is written to a temporary file in the same directory, flushed to disk
    and renamed over ``path``, so a reader sees the old list or the new one, never a part.
    A file that exists keeps its mode, group and (when root writes) owner, so that a
    rotation run as another user never locks the bridge out; a new one is the owner's only.
    """
    kept = _existing_file(path)
    directory = path.parent
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            if kept is None:
                os.fchmod(file.fileno(), 0o600)
            else:
                os.fchown(file.fileno(), kept.st_uid if os.geteuid() == 0 else -1, kept.st_gid)
                os.fchmod(file.fileno(), stat.S_IMODE(kept.st_mode))
            file.write(",".join(secrets) + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    directory_descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_descriptor)
    finally:
        os.close(directory_descriptor)


def _existing_file(path: Path) -> os.stat_result | None:
    """The status of the file to be replaced, if any; a link is refused rather than
    replaced by a file (or followed to somewhere the caller did not name)."""
    try:
        status = path.lstat()
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(status.st_mode):
        raise SecretDestinationError(
            f"{path} is a symbolic link: name the file it points to with --secret-file"
        )
    if not stat.S_ISREG(status.st_mode):
        raise SecretDestinationError(f"{path} is not a regular file")
    return status


def read_current_secrets(path: Path) -> list[str]:
    """The usable secrets now in ``path`` (none if it does not exist), to keep after a new one.

    Raises :class:`SecretReloadError` if the file exists but does not decode: writing it
    back after a new secret would make the whole list unusable.
    """
    if _existing_file(path) is None:
        return []
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as error:
        raise SecretReloadError(f"cannot read it: {error.strerror}") from None
    with os.fdopen(descriptor, "rb") as file:
        text, _keys = decode_secret_text(file.read(MAX_SECRET_FILE_BYTES + 1))
    return [secret.strip() for secret in text.split(",")]


class SecretDestinationError(Exception):
    """A new signing secret cannot be written where it should go."""


def _may_keep_group(group: int) -> bool:
    return os.geteuid() == 0 or group == os.getegid() or group in os.getgroups()


class SecretNotWritten(SecretDestinationError):
    """OpenAI issued a secret that could not be written: it is lost, and must be reissued."""


@dataclass(frozen=True, slots=True)
class SecretDestination:
    """The file a new signing secret goes to: ``--secret-file``, or the secrets directory's."""

    path: Path

    @classmethod
    def choose(cls, secret_file: Path | None, secrets_dir: str | None) -> SecretDestination:
        if secret_file is not None:
            return cls(secret_file)
        if not secrets_dir:
            raise SecretDestinationError(
                "OpenAI shows a signing secret only once, so it must be written to a file: "
                f"set BRIDGE_SECRETS_DIR (writes its {SECRET_FILE_NAME} file) or give "
                "--secret-file PATH"
            )
        directory = Path(secrets_dir)
        return cls(find_secret_file(directory) or directory / SECRET_FILE_NAME)

    def secrets_to_keep(self, *, keep_old: bool) -> list[str]:
        """Check the file can be written, before OpenAI makes a secret that would be lost;
        the secrets now in it that should stay after the new one."""
        directory = self.path.parent
        if not directory.is_dir():
            raise SecretDestinationError(f"{directory} is not a directory")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise SecretDestinationError(f"cannot write to {directory}")
        if directory.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise SecretDestinationError(
                f"{directory} is writable by its group or others, who could replace the "
                f"secrets: chmod go-w {directory}"
            )
        existing = _existing_file(self.path)
        if existing is not None and not _may_keep_group(existing.st_gid):
            raise SecretDestinationError(
                f"{self.path} belongs to group {existing.st_gid}, which this user cannot give "
                "a new file: run as its owner, root, or a member of that group"
            )
        if not keep_old:
            return []
        try:
            return read_current_secrets(self.path)
        except SecretReloadError as error:
            raise SecretDestinationError(
                f"the secrets now in {self.path} cannot be kept: {error}"
            ) from None

    def install(self, new_secret: str, kept: Sequence[str]) -> int:
        """Write the new secret first and ``kept`` after it; the number of secrets written."""
        secrets = [new_secret, *(secret for secret in kept if secret != new_secret)]
        write_secret_file(self.path, secrets)
        return len(secrets)
