"""Outgoing e-mail: an SMTP mailer, and the development sink that keeps what it receives as .eml files.

`SmtpMailer` sends through the server of `SMTP_URL`. Without it (development, test), the runtime
starts the embedded sink, a real SMTP server (aiosmtpd) running as a detached process that is
reused while it runs, like the embedded Redis:

    python -m workers.mail sink --dir <data_dir>/mail --port 2525
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import itertools
import logging
import os
import signal
import smtplib
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, unquote, urlsplit

from jobs.errors import PermanentError, TransientError
from workers.embedded import free_port
from workers.settings import Settings, SettingsError

log = logging.getLogger(__name__)

# What an SMTP server refuses of one message while the session stays usable for the next.
_REFUSALS: Final = (smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused, smtplib.SMTPDataError)

CONNECT_TIMEOUT: Final = 10.0
SINK_HOST: Final = "127.0.0.1"
# The sink's greeting names it, so a reused port file is trusted only when our sink answers on it.
SINK_IDENT: Final = "Renova mail sink"
SINK_START_TIMEOUT: Final = 10.0
# Header the sink adds to each stored message: the number of the connection that brought it.
CONNECTION_HEADER: Final = "X-Sink-Connection"
_TRUE: Final = {"1", "true", "yes", "on"}


class MailError(RuntimeError):
    """The embedded mail sink could not be started."""


# --- sending -----------------------------------------------------------------------------------


class SmtpMailer:
    """Sends messages over SMTP: `send` opens a connection for one message, `connection()` one for a
    batch. Holds no connection itself, so one mailer serves every thread of a process.

    URL: `smtp://[user:password@]host[:port][?starttls=1]` or `smtps://…` (TLS from the start).
    Default ports: 25 for smtp (587 with starttls), 465 for smtps.
    """

    def __init__(self, url: str, *, timeout: float = CONNECT_TIMEOUT) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps"):
            raise ValueError(f"unsupported mail URL scheme {parts.scheme!r}; use smtp:// or smtps://")
        if not parts.hostname:
            raise ValueError("the mail URL has no host")
        query = parse_qs(parts.query)
        self.use_tls = parts.scheme == "smtps"
        self.starttls = query.get("starttls", ["0"])[-1].lower() in _TRUE
        if self.use_tls and self.starttls:
            raise ValueError("smtps:// is already encrypted; starttls applies to smtp:// only")
        self.host = parts.hostname
        self.port = parts.port or (465 if self.use_tls else 587 if self.starttls else 25)
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        self.timeout = timeout

    @property
    def url(self) -> str:
        """The URL without the password, for logs and the console."""
        user = f"{self.username}@" if self.username else ""
        scheme = "smtps" if self.use_tls else "smtp"
        return f"{scheme}://{user}{self.host}:{self.port}" + ("?starttls=1" if self.starttls else "")

    def __repr__(self) -> str:
        return f"SmtpMailer({self.url!r})"

    def _connect(self) -> smtplib.SMTP:
        if self.use_tls:
            return smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout, context=ssl.create_default_context())
        return smtplib.SMTP(self.host, self.port, timeout=self.timeout)

    def _open(self) -> smtplib.SMTP:
        """A connected, authenticated session; raises OSError or smtplib.SMTPException."""
        smtp = self._connect()
        try:
            if self.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if self.username:
                smtp.login(self.username, self.password or "")
        except BaseException:
            _close_quietly(smtp)
            raise
        return smtp

    def send(self, message: EmailMessage) -> None:
        """Send one message over a connection of its own; raises as `SmtpConnection.send`."""
        with self.connection() as connection:
            connection.send(message)

    @contextlib.contextmanager
    def connection(self) -> Iterator[SmtpConnection]:
        """One SMTP connection for several messages (opened at the first send, closed on exit)."""
        connection = SmtpConnection(self)
        try:
            yield connection
        finally:
            connection.close()


class SmtpConnection:
    """Several messages over one SMTP session, each accepted or refused on its own.

    The session opens at the first `send`. A message refused while the session stays usable (a
    recipient, the sender or the data refused and reset by the server) does not disturb the next
    one. When the session is lost mid-message, the next message opens a new one; when the server
    cannot be reached at all, every later `send` fails at once with the same error, so that a batch
    does not wait out a connect timeout per message. Not for use by several threads at once.
    """

    def __init__(self, mailer: SmtpMailer) -> None:
        self.mailer = mailer
        self.opened = 0  # sessions opened, for logs and tests
        self._smtp: smtplib.SMTP | None = None
        self._unreachable: BaseException | None = None

    def send(self, message: EmailMessage) -> None:
        """Raises `jobs.errors.PermanentError` when every recipient was refused with a permanent
        (5xx) code, and `jobs.errors.TransientError` when the message was not accepted for any other
        reason a server or a network gives (smtplib's errors and OSError), each `from` the original."""
        try:
            self._send(message)
        except smtplib.SMTPRecipientsRefused as exc:
            # smtplib raises this only when every recipient was refused; 5xx means retrying cannot help.
            if all(code >= 500 for code, _ in exc.recipients.values()):
                raise PermanentError(f"every recipient refused: {exc}") from exc
            raise TransientError(f"recipients refused for now: {exc}") from exc
        except (OSError, smtplib.SMTPException) as exc:
            raise TransientError(f"mail server unavailable: {exc!r}") from exc

    def _send(self, message: EmailMessage) -> None:
        """Raises OSError or smtplib.SMTPException when the message was not accepted."""
        reused = self._smtp is not None
        try:
            refused = self._send_once(message)
        except smtplib.SMTPSenderRefused as exc:
            if not (reused and self._smtp is None):
                raise
            # The server closed a session it had served before (e.g. 421 at MAIL FROM after its limit
            # of messages per connection): nothing of this message was accepted, so a new one may take it.
            log.info("SMTP session closed by the server (%s); opening another", exc.smtp_code)
            refused = self._send_once(message)
        if refused:
            # Some recipients were refused while others accepted it: the message went out, so it
            # is not sent again; the refusals are worth a look.
            log.warning("recipients refused for %s: %s", message.get("Message-ID"), refused)

    def _send_once(self, message: EmailMessage) -> dict[str, tuple[int, bytes]]:
        smtp = self._session()
        try:
            return smtp.send_message(message)
        except (OSError, smtplib.SMTPException) as exc:
            # smtplib resets the session after refusing the sender, the recipients or the data (it
            # stays usable) and closes it on a 421; anything else leaves it lost or in an unknown state.
            if smtp.sock is None or not isinstance(exc, _REFUSALS):
                _close_quietly(smtp)
                self._smtp = None
            raise

    def _session(self) -> smtplib.SMTP:
        if self._unreachable is not None:
            raise self._unreachable
        if self._smtp is None:
            try:
                self._smtp = self.mailer._open()
            except (OSError, smtplib.SMTPException) as exc:
                self._unreachable = exc
                raise
            self.opened += 1
        return self._smtp

    def close(self) -> None:
        if self._smtp is not None:
            with contextlib.suppress(OSError, smtplib.SMTPException):
                self._smtp.quit()
            _close_quietly(self._smtp)
            self._smtp = None


def _close_quietly(smtp: smtplib.SMTP) -> None:
    with contextlib.suppress(OSError, smtplib.SMTPException):
        smtp.close()


# --- the sink ----------------------------------------------------------------------------------


def write_eml(directory: Path, data: bytes) -> Path:
    """Store one message atomically: a reader never sees half a file under the .eml name."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"{time.time_ns()}-{uuid.uuid4().hex[:12]}.eml"
    partial = directory / f".{name}.part"
    with partial.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    final = directory / name
    partial.replace(final)
    return final


class EmlWriter:
    """aiosmtpd handler: every accepted message becomes a file, with its envelope as headers, and
    the number of the SMTP connection that brought it (`X-Sink-Connection`: 1, 2 … per sink), which
    shows what a batch shared."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._connections = itertools.count(1)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content = envelope.original_content or envelope.content
        if isinstance(content, str):
            content = content.encode("utf-8")
        # aiosmtpd makes one Session per connection: numbered at its first message.
        if getattr(session, "renova_connection", None) is None:
            session.renova_connection = next(self._connections)
        # Bcc recipients exist only in the envelope; keeping it shows who the server was asked to reach.
        envelope_headers = (
            f"X-Envelope-From: {envelope.mail_from}\r\nX-Envelope-To: {', '.join(envelope.rcpt_tos)}\r\n"
            f"{CONNECTION_HEADER}: {session.renova_connection}\r\n"
        ).encode()
        await asyncio.to_thread(write_eml, self.directory, envelope_headers + content)
        return "250 Message accepted for delivery"


class MailSink:
    """A real SMTP server (aiosmtpd) in this process, storing messages under `directory`."""

    def __init__(self, directory: Path, *, host: str = SINK_HOST, port: int | None = None) -> None:
        self.directory = Path(directory)
        self.host = host
        self.port = port or free_port(host)
        self._controller: Any = None

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    def start(self) -> MailSink:
        from aiosmtpd.controller import Controller

        self.directory.mkdir(parents=True, exist_ok=True)
        self._controller = Controller(
            EmlWriter(self.directory),
            hostname=self.host,
            port=self.port,
            ident=SINK_IDENT,
            enable_SMTPUTF8=True,
            ready_timeout=SINK_START_TIMEOUT,
        )
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> MailSink:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def paths(self) -> list[Path]:
        return sorted(self.directory.glob("*.eml"))

    def messages(self) -> list[EmailMessage]:
        return read_messages(self.directory)


def read_messages(directory: Path) -> list[EmailMessage]:
    """The stored messages, oldest first."""
    return [
        message_from_bytes(path.read_bytes(), policy=policy.default) for path in sorted(Path(directory).glob("*.eml"))
    ]


# --- the detached sink of the embedded stack ---------------------------------------------------


def _control_dir(data_dir: Path) -> Path:
    return Path(data_dir).resolve() / "smtp"


def mail_dir(data_dir: Path) -> Path:
    return Path(data_dir).resolve() / "mail"


def sink_answers(port: int, host: str = SINK_HOST) -> bool:
    """True when our sink (not just anything) is listening on `port`."""
    client = smtplib.SMTP(local_hostname="localhost", timeout=1.0)
    try:
        code, banner = client.connect(host, port)
        return code == 220 and SINK_IDENT.encode() in banner
    except (OSError, smtplib.SMTPException):
        return False
    finally:
        with contextlib.suppress(OSError, smtplib.SMTPException):
            client.close()


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _running_port(data_dir: Path) -> int | None:
    port = _read_int(_control_dir(data_dir) / "port")
    return port if port is not None and sink_answers(port) else None


@contextlib.contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    # Two processes starting the stack at once must end up sharing one sink, not orphaning one.
    control = _control_dir(data_dir)
    control.mkdir(parents=True, exist_ok=True)
    with (control / "lock").open("w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


# Children started by this process, kept so they can be reaped (no zombie) when stopped from here.
_children: dict[int, subprocess.Popen[bytes]] = {}


def _spawn_sink(data_dir: Path) -> int:
    control = _control_dir(data_dir)
    port = free_port(SINK_HOST)
    project_root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(project_root), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "workers.mail", "sink", "--dir", str(mail_dir(data_dir)), "--port", str(port)]
    with (control / "sink.log").open("ab") as log_file:
        child = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=env, start_new_session=True
        )
    _children[child.pid] = child
    deadline = time.monotonic() + SINK_START_TIMEOUT
    while not sink_answers(port):
        if child.poll() is not None or time.monotonic() > deadline:
            _terminate(child)
            raise MailError(f"the mail sink did not start; see {control / 'sink.log'}")
        time.sleep(0.05)
    (control / "pid").write_text(str(child.pid))
    (control / "port").write_text(str(port))
    return port


def _terminate(child: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        child.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=5)
    _children.pop(child.pid, None)


def ensure_mail_sink(data_dir: Path) -> str:
    """Start (or reuse) the embedded sink under `data_dir` and return its `smtp://` URL."""
    with _locked(data_dir):
        port = _running_port(data_dir) or _spawn_sink(data_dir)
    return f"smtp://{SINK_HOST}:{port}"


def stop_mail_sink(data_dir: Path) -> bool:
    """Stop the embedded sink; False when none was running. The stored .eml files stay."""
    control = _control_dir(data_dir)
    with _locked(data_dir):
        port = _running_port(data_dir)
        pid = _read_int(control / "pid")
        stopped = port is not None and pid is not None
        if stopped:
            _stop_process(pid, port)
        for name in ("port", "pid"):
            (control / name).unlink(missing_ok=True)
    _forget_sink_url(Path(data_dir))
    return stopped


def _stop_process(pid: int, port: int) -> None:
    child = _children.get(pid)
    if child is not None:
        _terminate(child)
        return
    # Started by another process: only the pid file links us to it, and the port check above
    # proved our sink is the one listening.
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while sink_answers(port) and time.monotonic() < deadline:
        time.sleep(0.05)


# --- wiring ------------------------------------------------------------------------------------

_sink_urls: dict[Path, str] = {}
_sink_urls_lock = threading.Lock()


def _sink_url(data_dir: Path) -> str:
    key = Path(data_dir).resolve()
    with _sink_urls_lock:
        if key not in _sink_urls:
            _sink_urls[key] = ensure_mail_sink(key)
        return _sink_urls[key]


def _forget_sink_url(data_dir: Path) -> None:
    with _sink_urls_lock:
        _sink_urls.pop(Path(data_dir).resolve(), None)


class EmbeddedSinkMailer(SmtpMailer):
    """The mailer of the embedded sink. The sink's address is looked up at every connection, so a
    mailer kept for the life of a process follows a sink that was stopped and started again; a
    refused connection means the sink was stopped, so the next attempt (the message is retried)
    starts it again instead of knocking on a dead port."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(_sink_url(data_dir))
        self.data_dir = Path(data_dir)

    def _connect(self) -> smtplib.SMTP:
        parts = urlsplit(_sink_url(self.data_dir))
        try:
            return smtplib.SMTP(parts.hostname, parts.port or 25, timeout=self.timeout)
        except ConnectionRefusedError:
            _forget_sink_url(self.data_dir)
            raise


def mailer_from_settings(settings: Settings) -> SmtpMailer:
    """SMTP_URL's server, else the embedded sink (started on first use, then reused)."""
    if settings.smtp_url:
        return SmtpMailer(settings.smtp_url)
    if settings.renova_env == "production":
        # In production the sink would swallow every notice into a local folder, silently.
        raise SettingsError("SMTP_URL is required in production")
    return EmbeddedSinkMailer(settings.data_dir)


# --- entry point -------------------------------------------------------------------------------


def run_sink(directory: Path, port: int, host: str = SINK_HOST) -> None:
    """Serve until SIGTERM or SIGINT."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with MailSink(directory, host=host, port=port):
        print(f"mail sink listening on smtp://{host}:{port}, writing to {directory}", flush=True)
        while not stop.wait(1.0):
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.mail", description="Renova mail tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    sink = commands.add_parser("sink", help="run an SMTP server that stores every message as a .eml file")
    sink.add_argument("--dir", type=Path, required=True, help="folder for the .eml files")
    sink.add_argument("--port", type=int, required=True)
    sink.add_argument("--host", default=SINK_HOST)
    args = parser.parse_args(argv)
    run_sink(args.dir, args.port, args.host)
    return 0


if __name__ == "__main__":
    sys.exit(main())
