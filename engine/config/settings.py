"""qrelay's own named settings: every limit qmail lacks, each with a safe default.

They live in `ROOT/qrelay.toml` (optional; a missing file means all defaults):

    [smtp]
    max_line_length = 4096

An unknown section or key, a value of the wrong type, or one out of its
range (`RANGES`) is a SettingsError naming the file, the section and the
key — the CLI prints it as a one-line error:

    /var/qrelay/qrelay.toml: [smtp] max_line_length = 0 is out of range: at least 512 (RFC 5321 4.5.3.1.4)
Each section is a frozen dataclass so a snapshot can be swapped whole on reload.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

SETTINGS_FILE = "qrelay.toml"


class SettingsError(Exception):
    """qrelay.toml is unreadable or names an unknown or mistyped setting."""


@dataclass(slots=True, frozen=True)
class SmtpSettings:
    # RFC 5321 4.5.3.1.4 allows 512 for a command line; extensions (and
    # qmail's leniency) make a little more friendly. Memory per connection
    # is bounded by this, whatever the client sends.
    max_line_length: int = 4096
    # Largest message kept when control/databytes is 0 (unlimited in qmail):
    # without it one client could make a receiver hold any amount of memory.
    max_message_bytes: int = 64 * 1024 * 1024
    # Message bytes all the sessions of one receiver may hold in memory at once
    # (qmail streams DATA to disk; here 500 clients x 64 MiB would not fit).
    # Past it a message is still read to its end but answered 452 (#4.3.1),
    # unless it is the only one held.
    max_buffered_bytes: int = 256 * 1024 * 1024
    # RFC 5321 4.5.3.1.8 requires accepting at least 100.
    max_recipients: int = 1000
    # A message with this many hops (Received:/Delivered-To: lines) or more is
    # refused as looping (qmail's MAXHOPS, 100).
    max_hops: int = 100
    # tcpserver -c: simultaneous connections; control/concurrencyincoming overrides.
    max_connections: int = 500
    # Per client IP; 0 = off, as tcpserver has no such limit.
    max_connections_per_ip: int = 0
    # Seconds to let transactions in flight finish on SIGTERM.
    shutdown_grace: float = 8.0
    # tcpserver -H: no reverse lookup of clients unless asked for.
    reverse_dns: bool = False
    # tcpserver -p: a PTR name counts (=host rules, the Received line) only when its
    # own A/AAAA records hold the client's address; anyone can write any PTR for theirs.
    reverse_dns_paranoid: bool = True
    # A CR not followed by LF inside DATA: qmail keeps it, but a relay that passes
    # it on lets a client smuggle a second message past a next hop that ends DATA
    # at <CR>.<CR>; refused with a 554 unless turned off.
    refuse_bare_cr: bool = True
    # rblsmtpd -t: seconds before a client blocked by RBLSMTPD is dropped.
    rblsmtpd_timeout: int = 60
    # Seconds between checks of the control files' mtimes (reload without SIGHUP,
    # once a change has held from one check to the next).
    reload_poll_seconds: float = 5.0
    # A recipient in a local domain with no mailbox, alias or catch-all gets a
    # 550 at RCPT (qmail accepts it and bounces later: backscatter).
    reject_unknown_mailboxes: bool = True
    # Each receiver accepts on its own socket (SO_REUSEPORT; the kernel spreads
    # new connections by address hash) instead of all sharing one. Shared,
    # every loop is woken and the first to run takes the connection: on a VM a
    # busy receiver wins against one whose CPU sleeps, so it hoards while the
    # other idles (POP3 logins split up to 4/96 on 2 CPUs). The cost: the
    # connections hashed to a receiver that died wait for its restart, and
    # another process of the same user may bind the same port and share it.
    reuse_port: bool = False


@dataclass(slots=True, frozen=True)
class SpoolSettings:
    # Seconds before a message file with no committed index record is removed.
    orphan_grace: int = 129600
    # A writer starts a new segment file past this size, so a finished
    # segment (all its messages gone) can be deleted whole.
    segment_bytes: int = 64 * 1024 * 1024
    # ...or past this age (seconds), so one long-deferred message never pins
    # an ever-growing segment. Must stay below orphan_grace.
    segment_max_age: int = 3600
    # Group commit: most messages / bytes made durable by one fsync.
    max_batch_messages: int = 512
    max_batch_bytes: int = 32 * 1024 * 1024
    # Address space reserved for the LMDB index (the file grows as used);
    # a full map makes enqueue fail with a 451, never corrupt anything.
    index_map_bytes: int = 16 * 1024 * 1024 * 1024
    # Message ids are taken from the index counter in blocks of this many,
    # so the id allocation costs one commit per block, not per message.
    id_block: int = 1024
    # Segment files a process keeps open for reading.
    max_open_segments: int = 32
    # Segment syncs running at once (1-64; a thread and a descriptor each): a
    # batch starts its fdatasync as soon as it is written instead of waiting
    # for the previous one (1 = one at a time).
    sync_depth: int = 8
    # Answer a client only once its message is in the index too, not as soon
    # as its segment sync is done (one more sync on its path; the segment
    # already holds the envelope, so nothing acknowledged depends on it).
    ack_after_index: bool = False
    # Sync LMDB's meta page at every index commit too (two syncs per commit
    # instead of one). Off, a machine crash can undo the index's last
    # commit and the spool re-indexes those messages from their segments
    # on the next start (engine/queue/__init__.py, C12).
    index_metasync: bool = False
    # Largest request frame the single spool writer accepts from a receiver
    # (a message plus its envelope); above smtp.max_message_bytes on purpose.
    max_frame_bytes: int = 80 * 1024 * 1024
    # Free bytes the spool's filesystem keeps: below it (and below 1.5 x a MAIL's
    # SIZE= on top), MAIL gets 452, so a full disk never stops deliveries (which
    # free space) from being recorded, nor the index from growing (Postfix's
    # queue_minfree). 0: off.
    min_free_bytes: int = 256 * 1024 * 1024
    # Seconds a receiver waits for the spool writer's answer to a message before
    # it gives the client 451 (a writer stuck on a dying disk, or stopped).
    writer_reply_timeout: float = 120.0
    # Request bytes queue/inject.sock holds at once, over all its connections
    # (local users: PHP's mail(), cron); past it a sender waits. One request
    # alone always fits.
    inject_buffered_bytes: int = 256 * 1024 * 1024
    # Connections queue/inject.sock holds at once (and never more than the
    # writer's open-files limit leaves room for, engine.openfiles): past it a
    # connection is closed at once, so local users cannot take the descriptors
    # the writer needs for the receivers' connections and its segment files.
    inject_max_connections: int = 256
    # Receivers enqueue through one writer process (QUEUE/writer.sock) that
    # group-commits for all of them (measured faster than each receiver
    # taking LMDB's writer lock; see engine/queue/__init__.py). While no
    # writer answers, a receiver commits directly (safe, just slower).
    single_writer: bool = True
    # Queue surgery (qrelay hold/release/delete/requeue) changes at most this
    # many messages per index transaction (one sync each), so the spool writer
    # and the scheduler never wait long for LMDB's writer lock (a 2,000-message
    # delete holds it ~12 ms of CPU and one sync; 500: 4x the syncs).
    surgery_batch: int = 2000
    # ...and pause this long (seconds) between those transactions: LMDB's
    # writer lock is not fair, and a bulk delete that took it back at once
    # would hold the spool writer's index commits (so ingest) waiting; the
    # pause also leaves the receivers CPU. Delete time and ingest beside it
    # trade against each other through it (2 CPUs, 100,000 messages, 49
    # pauses; README, queue tools benchmark): 80 ms: 6-10 s at load 4-9.
    surgery_pause: float = 0.08
    # import-qmail moves this many messages per spool commit (three syncs each),
    # fewer once they hold max_batch_bytes (a batch is in memory until then).
    import_batch: int = 2000
    # ...and removes the moved files with this many threads (unlinks of files
    # on disk wait for it; several at once overlap).
    import_unlink_threads: int = 16


@dataclass(slots=True, frozen=True)
class DeliverySettings:
    # DNS servers for remote delivery, "host:port" (port optional); empty =
    # the system's resolv.conf. Tests point this at a fake DNS server.
    dns_servers: tuple = ()
    # Seconds of a DNS query's first try (c-ares doubles it on each next
    # try: 5 s and 2 tries wait 15 s), and tries per server, before a #4.1.2
    # deferral.
    dns_timeout: float = 5.0
    dns_tries: int = 2
    # Longest time (seconds) an NXDOMAIN / no-records answer is cached.
    dns_negative_ttl: int = 300
    # Port used for MX (and A-fallback) deliveries; smtproutes give their own.
    mx_port: int = 25
    # One connection carries at most this many messages, then QUIT.
    max_messages_per_connection: int = 100
    # Connections open at once to one destination (ip, port).
    max_connections_per_host: int = 20
    # Addresses one delivery tries at most, best first (the MX hosts' after
    # ipme, or a relay's): each may cost a timeoutconnect, and the domain's
    # DNS decides how many there are (RFC 5321 5.1). qmail tries them all.
    max_addresses_per_delivery: int = 30
    # Of those, how many may take the connection and fail the greeting (a 421,
    # a hang-up, a tarpit that waits out timeoutremote) before the delivery
    # defers with the last one's text. qmail defers at the first; Postfix's
    # smtp_mx_session_limit is 2. Bounds what a domain's MX list of tarpits
    # holds a delivery slot for: this many timeoutremote.
    max_greeting_failures: int = 2
    # Seconds an unused connection is kept for the next message (0 = never reuse).
    idle_timeout: float = 30.0
    # More of our own addresses for qmail's ipme rule (an MX at or after our
    # own preference is never tried: a mail loop), e.g. a public address NAT
    # maps to this host. 0.0.0.0 is always ours, and with mx_port 25 every
    # interface's address (and 127.0.0.1) too, as qmail finds them.
    my_addresses: tuple = ()
    # Also resolve and try AAAA addresses (after the A addresses).
    ipv6: bool = True
    # qmail's tcpto: an address whose connect() timed out twice (>= 120 s
    # apart) is skipped for this many seconds; 0 = never skip.
    timeout_skip_seconds: int = 3840
    # Delivery worker processes (qmail-remote's role), each with its own event
    # loop, connection pool and DNS cache; jobs of one domain go to one worker.
    # 0 = deliver inside the scheduler process: on a 2-core box that is the
    # fastest (no extra hop, one pool reuses every connection); more workers
    # pay off when one core cannot drive all the SMTP/TLS traffic.
    worker_procs: int = 0
    # Local deliveries running at once in one delivery process; the rest of
    # the concurrencylocal jobs sent to it wait their turn (a |program's run
    # or an mbox lock wait does not count, so slow programs still run side by
    # side). 0 = no limit: all of them. A limit was worth 10-15 % of a
    # worker's CPU on 2 cores (4 against 10 threads handing Python's GIL
    # around) until a delivery's small reads kept the GIL (engine._fileio);
    # since, 1 to 6 cost what no limit costs. Where a sync takes
    # milliseconds, a limit caps the rate at local_active per sync time.
    local_active: int = 0
    # Seconds one `|program` line of a .qmail file may run (qmail: no limit);
    # then it is killed and the delivery defers (`Program timed out. (#4.3.0)`).
    program_timeout: float = 1200.0
    # Outbound TLS (control/tlsdestinations says where it is required): the
    # oldest protocol accepted, "TLSv1.2" or "TLSv1.3" (never lower).
    tls_min_version: str = "TLSv1.2"
    # CA bundle (PEM) for verified destinations that name none; empty = the
    # system's CAs.
    tls_ca_file: str = ""
    # Seconds for a TLS handshake before the attempt counts as failed
    # (opportunistic: retried in clear; required: deferred).
    tls_handshake_timeout: float = 60.0

@dataclass(slots=True, frozen=True)
class SchedulerSettings:
    # false: `qrelay run` only receives (mail stays queued; no delivery process).
    enabled: bool = True
    # Concurrent deliveries to one recipient domain (concurrencyremote bounds the total).
    per_destination_concurrency: int = 20
    # Recipients of one message to one domain sent in one SMTP transaction.
    max_recipients_per_delivery: int = 100
    # Due recipients read from the spool per pass: bounds the scheduler's memory
    # however much mail waits on a throttled or dead destination.
    scan_batch: int = 2000
    # New messages classified local/remote per pass.
    todo_batch: int = 500
    # Seconds between looks at the spool for newly queued mail when idle.
    poll_interval: float = 0.05
    # Message ids remembered per destination so a recovered destination gets its
    # deferred mail at once; past this many, mail waits for its retry time.
    recovered_index_max: int = 100000
    # A destination's deferred mail is pulled forward at most once per this many seconds.
    recovery_interval: float = 60.0
    # Delivery results are recorded in one durable spool transaction per batch:
    # at most this many seconds after the first of the batch, or this many results.
    mark_delay: float = 0.01
    mark_batch: int = 500
    # Due recipients of destinations already at their limit, remembered by key
    # (~100 bytes each) so reading the due table passes over them; past this
    # many they are simply left in the spool until their destination drains.
    skip_max: int = 200000
    # qmail's retry formula constants (spec §6.2): next = birth + (isqrt(age) + C)^2.
    retry_skip_remote: int = 20
    retry_skip_local: int = 10
    # Originals larger than this are returned in a bounce as their header only.
    bounce_copy_max_bytes: int = 1048576
    # Seconds to let running deliveries finish on SIGTERM.
    stop_grace: float = 8.0


@dataclass(slots=True, frozen=True)
class AccountsSettings:
    # Keep each password's cleartext in vpasswd's eighth field (vpopmail's
    # --enable-clear-passwd): CRAM-MD5 and APOP need it; off, only hashes are kept.
    keep_cleartext: bool = False
    # The domain of a POP3 or SMTP AUTH login given without one ("joe"), as
    # vchkpw's default domain; "" = the first line of ~vpopmail/etc/defaultdomain
    # when the box has one, else such logins fail.
    default_domain: str = ""


@dataclass(slots=True, frozen=True)
class TlsSettings:
    # Oldest protocol a client may use: "TLSv1.2" or "TLSv1.3" (never lower).
    min_version: str = "TLSv1.2"
    # OpenSSL cipher string for TLS 1.2; empty = control/tlsserverciphers,
    # else the ssl module's secure default (TLS 1.3 suites are OpenSSL's).
    ciphers: str = ""
    # Seconds a client has to finish the handshake (STARTTLS, implicit TLS).
    handshake_timeout: float = 30.0
    # Threads per receiver that run the signing step of STARTTLS handshakes
    # (an RSA signature is a millisecond of CPU), niced below the event loop.
    handshake_threads: int = 1
    # Session tickets are encrypted with a key all receivers share (a client
    # resumes whichever receiver it lands on, and across certificate reloads),
    # replaced every this many seconds (engine.tls_tickets); 0 = each
    # receiver's context keeps OpenSSL's own random keys.
    ticket_key_seconds: float = 3600.0


@dataclass(slots=True, frozen=True)
class AuthSettings:
    # Offer and accept AUTH LOGIN / PLAIN before TLS (passwords in clear):
    # only for old clients on trusted networks. CRAM-MD5 is always allowed.
    allow_plaintext: bool = False
    # MAIL FROM of an authenticated session must be the user's address or
    # an alias of it (beyond qmail; off = any sender, as the patches do).
    sender_must_match: bool = False
    # Threads per receiver that check passwords (a $6$ check costs
    # milliseconds of CPU), niced below the event loop: checks beyond this
    # wait their turn, the event loop never hashes.
    hash_threads: int = 1
    # Seconds a verified login is remembered (an HMAC of the password, per
    # process), so a client that logs in for every message is hashed once
    # per period; 0 = hash every login. Wrong passwords are never remembered.
    cache_seconds: float = 300.0
    # Logins remembered at most (the oldest are forgotten first).
    cache_entries: int = 10000
    # Seconds before the failure reply of a wrong login when no login
    # throttle is in use (in-process servers; `qrelay run` always has one,
    # whose [login] delays then apply). The patches sleep 5 s.
    failure_delay: float = 1.0
    # Longest password (UTF-8 bytes) checked at login and set by the account
    # commands: a $6$ check costs time in proportion (1.6 ms for 8 bytes, 48
    # for 3,000), so long guesses would starve the hashing threads; a longer
    # one is a wrong password, answered without hashing. vchkpw reads 155
    # bytes for login, password and challenge together.
    max_password_bytes: int = 128


@dataclass(slots=True, frozen=True)
class RelaySettings:
    # Where the POP-before-SMTP table and the login-failure counters live:
    # "" = an LMDB file under ROOT/relay/ shared by every process of this box;
    # "redis://HOST:PORT/DB" (or rediss://, unix://) = shared by every node
    # using that Redis (its own key expiry does the clean-up). Read at start.
    store: str = ""
    # Seconds a successful POP3/IMAP login lets the client's IP relay
    # (vpopmail's clearopensmtp ran every 3 hours).
    pop_before_smtp_ttl: int = 10800
    # Longest a relay check or counter update waits for Redis; past it the
    # answer is "not allowed" (fail closed) and the session goes on.
    timeout: float = 0.25
    # After Redis failed, it is not asked again for this many seconds: checks
    # answer False at once meanwhile (one log line per outage).
    retry_seconds: float = 1.0
    # Prefix of every Redis key (several qrelay clusters on one Redis).
    key_prefix: str = "qrelay:"
    # Address space reserved for the embedded table (the file grows as used;
    # 100,000 entries take a few MB).
    map_bytes: int = 256 * 1024 * 1024
    # Expired embedded entries removed per write (a grant, a failure): the
    # table cleans itself without a cron job and without a long pause.
    sweep_batch: int = 1000
    # The embedded table's writes reach the disk at most this many seconds
    # later (a sync in a thread): a grant costs no fsync on the login path;
    # a machine crash may forget the last second of grants, never more.
    sync_seconds: float = 1.0
    # Longest a login's write to the embedded table (a grant, a failure
    # counted), or a process's first open of it, waits for LMDB's writer lock,
    # held by another process that does not let go (stopped, stuck on a dying
    # disk); past it, as with Redis down: no relay from it, not counted, no
    # grant, and writes fail at once until it is free.
    write_timeout: float = 5.0


@dataclass(slots=True, frozen=True)
class LoginSettings:
    # Password guessing (SMTP AUTH and POP3), per client IP, counted in the
    # relay table's store so several nodes share the counts. Each failure in
    # the window delays the reply by failure_delay x failures so far (at most
    # max_delay); the max_failures-th failure locks the IP out (421 / -ERR
    # and close) for lockout_seconds.
    failure_delay: float = 1.0
    max_delay: float = 8.0
    max_failures: int = 10
    window: int = 600
    lockout_seconds: int = 900


@dataclass(slots=True, frozen=True)
class Pop3Settings:
    # Bytes in one command line (RFC 2449 allows 255; room for long passwords).
    # qmail-popup reads lines of any length.
    max_line_length: int = 1024
    # Seconds without a command, or without the client reading, before the
    # connection is closed (qmail-popup's and qmail-pop3d's 1200).
    timeout: int = 1200
    # tcpserver -c of qmail-popup's service: POP3 connections at once, counted
    # apart from SMTP's; past it, -ERR [SYS/TEMP] and close.
    max_connections: int = 500
    # Per client IP; 0 = off (a whole office can share one address).
    max_connections_per_ip: int = 0
    # Messages listed in one session, oldest first (memory per connection);
    # the rest are listed once these are deleted.
    max_messages: int = 100000
    # Bytes read from a message file at a time for RETR and TOP (a sending
    # connection holds about three times this). 64 KB cost 9-10 ms of CPU per
    # 10 MB in per-chunk overhead and small writes, 256 KB 6-7 ms.
    chunk_bytes: int = 262144
    # Accept USER/PASS before STLS (the password in clear), as qmail-popup
    # does: only for old clients on trusted networks. A connection from this
    # host to itself (the peer's address is the server's, as Dovecot judges
    # it) and APOP are allowed either way.
    allow_plaintext: bool = False
    # Clients whose POP3 logins are a webmail's (vchkpw's webmailips, WEBMAIL
    # protocol): NO_WEBMAIL refuses them, NO_POP does not. A cluster adds its
    # webmail servers' addresses.
    webmail_addresses: tuple = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


@dataclass(slots=True, frozen=True)
class LogSettings:
    # multilog's s and n for ROOT/log: rotate `current` near this size, keep
    # at most max_files - 1 rotated files.
    max_bytes: int = 99999
    max_files: int = 10
    # "qmail": multilog-stamped qmail-send/tcpserver lines; "json": the same
    # events, one JSON object per line (for log shippers).
    format: str = "qmail"


@dataclass(slots=True, frozen=True)
class DoctorSettings:
    # `qrelay doctor DOMAIN`: seconds for each connect, greeting and EHLO (the guide's telnet).
    connect_timeout: float = 5.0
    # Destinations listed with their deferred count and last error.
    top_destinations: int = 10
    # A destination holding at least this many deferred recipients is a finding.
    deferred_warn: int = 100
    # Mail not yet preprocessed for longer than this (seconds): the scheduler is not keeping up.
    todo_max_age: float = 300.0
    # Free space on the spool's filesystem below either bound is a finding.
    disk_min_free_percent: float = 5.0
    disk_min_free_bytes: int = 1024 * 1024 * 1024
    # The spool index's tables taking more than this share of [spool] index_map_bytes
    # is a finding (when the map is full every message gets 451).
    index_max_percent: float = 75.0
    # Relay table entries older than this (seconds; vpopmail's clearopensmtp: 180 min)
    # mean nothing expires them.
    relay_max_age: int = 10800
    # Mailboxes whose directories are checked per run (a bound on the walk).
    max_mailboxes: int = 100000
    # Findings of one kind listed one by one; past this, one summary line.
    max_findings_per_kind: int = 10
    # A TLS certificate (servercert.pem, clientcert.pem) expiring within this many days is a finding.
    cert_expiry_warn_days: int = 14


@dataclass(slots=True, frozen=True)
class StatusSettings:
    # `--listen http://HOST:PORT` (engine.status: /metrics, the status page):
    # refused on an address that is not loopback unless this is true — the
    # page shows addresses and remote servers' replies, and has no login.
    allow_remote: bool = False
    # Destinations shown in the queue shape and the deferred table, and
    # exported as qrelay_queue_deferred_recipients{destination=...}.
    top_destinations: int = 20
    # The spool is read for the page and /metrics at most this often; a
    # summary that took T seconds to compute is reused for at least 10 T.
    cache_seconds: float = 1.0
    recent_deliveries: int = 30
    # Simultaneous HTTP connections; a request must arrive within request_timeout.
    max_connections: int = 32
    request_timeout: float = 10.0


@dataclass(slots=True, frozen=True)
class RunSettings:
    # Started as root, `qrelay run` binds its ports and then runs everything
    # that reads the network (receivers, spool writer, scheduler, remote
    # workers) as this user, who owns ROOT/queue and ROOT/log (engine/privilege.py).
    # "" keeps root (not recommended). Read at start only.
    user: str = "qrelay"


@dataclass(slots=True, frozen=True)
class Settings:
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    spool: SpoolSettings = field(default_factory=SpoolSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    log: LogSettings = field(default_factory=LogSettings)
    accounts: AccountsSettings = field(default_factory=AccountsSettings)
    doctor: DoctorSettings = field(default_factory=DoctorSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    relay: RelaySettings = field(default_factory=RelaySettings)
    login: LoginSettings = field(default_factory=LoginSettings)
    pop3: Pop3Settings = field(default_factory=Pop3Settings)
    status: StatusSettings = field(default_factory=StatusSettings)
    run: RunSettings = field(default_factory=RunSettings)


# (section, key) -> (minimum, maximum or None, why): a value outside is refused
# at load (a start, or a reload that then keeps the previous snapshot). Only
# values that cannot work are refused; a merely unusual one is the operator's.
RANGES: dict[tuple[str, str], tuple[float, float | None, str]] = {
    ("smtp", "max_line_length"): (512, None, "RFC 5321 4.5.3.1.4"),
    ("smtp", "max_message_bytes"): (1024, None, "room for a header"),
    ("smtp", "max_buffered_bytes"): (1024 * 1024, None, "room for the messages coming in"),
    ("smtp", "max_recipients"): (1, None, "a message needs a recipient"),
    ("smtp", "max_hops"): (2, None, "1 would refuse every relayed message"),
    ("smtp", "max_connections"): (1, None, "0 would refuse every client"),
    ("smtp", "reload_poll_seconds"): (0.05, None, "a busy loop otherwise"),
    ("spool", "orphan_grace"): (600, None, "a segment being created must not look abandoned"),
    ("spool", "max_batch_messages"): (1, None, "a batch holds a message"),
    ("spool", "max_batch_bytes"): (1, None, "a batch holds a message"),
    ("spool", "id_block"): (1, None, "ids come in blocks of at least one"),
    ("spool", "max_open_segments"): (1, None, "a segment must be read"),
    ("spool", "sync_depth"): (1, 64, "a thread and a descriptor each"),
    ("spool", "max_frame_bytes"): (1024, None, "a frame holds a message"),
    ("spool", "writer_reply_timeout"): (1, None, "a commit takes time"),
    ("spool", "index_map_bytes"): (4096, 1 << 44, "LMDB maps it whole: address space"),
    ("spool", "inject_buffered_bytes"): (1024 * 1024, None, "room for local users' mail"),
    ("spool", "inject_max_connections"): (1, None, "0 would refuse every local user"),
    ("spool", "surgery_batch"): (1, 100000, "messages per surgery transaction"),
    ("spool", "surgery_pause"): (0, 10, "seconds between surgery transactions"),
    ("spool", "import_batch"): (1, 100000, "messages per import commit"),
    ("spool", "import_unlink_threads"): (1, 256, "threads removing moved files"),
    ("delivery", "dns_timeout"): (0.01, None, "every lookup would time out"),
    ("delivery", "dns_tries"): (1, None, "no lookup would be made"),
    ("delivery", "mx_port"): (1, 65535, "a TCP port"),
    ("delivery", "local_active"): (0, 1024, "0 = no limit"),
    ("delivery", "program_timeout"): (1, None, "no program would finish"),
    ("delivery", "max_messages_per_connection"): (1, None, "a connection carries a message"),
    ("delivery", "max_connections_per_host"): (1, None, "0 would never connect"),
    ("delivery", "max_addresses_per_delivery"): (1, None, "0 would never connect"),
    ("delivery", "max_greeting_failures"): (1, None, "0 would never try a second address"),
    ("delivery", "tls_handshake_timeout"): (0.1, None, "no handshake would finish"),
    ("scheduler", "per_destination_concurrency"): (1, None, "0 would never deliver"),
    ("scheduler", "max_recipients_per_delivery"): (1, None, "a delivery has a recipient"),
    ("scheduler", "scan_batch"): (1, None, "a pass reads a recipient"),
    ("scheduler", "todo_batch"): (1, None, "a pass reads a message"),
    ("scheduler", "poll_interval"): (0.001, None, "a busy loop otherwise"),
    ("scheduler", "mark_batch"): (1, None, "a batch holds a result"),
    ("scheduler", "retry_skip_remote"): (1, None, "0 makes every deferral due at once, in a loop"),
    ("scheduler", "retry_skip_local"): (1, None, "0 makes every deferral due at once, in a loop"),
    ("relay", "pop_before_smtp_ttl"): (1, 100 * 365 * 86400, "seconds a grant lasts: "
                                       "a century at most, engine.relay.MAX_TTL"),
    ("relay", "timeout"): (0.001, 10, "a relay check must not hold a session"),
    ("relay", "retry_seconds"): (0.01, None, "a busy loop otherwise"),
    ("relay", "map_bytes"): (1024 * 1024, 1 << 44, "room for the table, in address space"),
    ("relay", "sweep_batch"): (1, None, "expired entries must go"),
    ("relay", "sync_seconds"): (0.01, None, "a busy loop otherwise"),
    ("relay", "write_timeout"): (0.01, 60, "a login must not wait long for a write"),
    ("login", "max_failures"): (1, None, "0 would lock out every client"),
    ("login", "window"): (1, None, "failures are counted over a window"),
    ("login", "lockout_seconds"): (1, None, "a lockout must last"),
    ("pop3", "max_line_length"): (255, None, "RFC 2449 4: 255 octets"),
    ("pop3", "timeout"): (1, None, "0 would drop every client at once"),
    ("pop3", "max_messages"): (1, None, "a session lists a message"),
    ("pop3", "max_connections"): (1, None, "0 would refuse every client"),
    ("pop3", "chunk_bytes"): (4096, 16 * 1024 * 1024, "memory per connection"),
    ("log", "max_bytes"): (4096, None, "multilog's smallest s"),
    ("doctor", "connect_timeout"): (0.01, None, "every connect would time out"),
    ("doctor", "disk_min_free_percent"): (0, 100, "a percentage"),
    ("doctor", "index_max_percent"): (0, 100, "a percentage"),
    ("tls", "handshake_timeout"): (0.1, None, "no handshake would finish"),
    ("tls", "handshake_threads"): (1, 64, "a thread runs handshakes"),
    ("tls", "ticket_key_seconds"): (0, None, "0 = no shared key"),
    ("auth", "hash_threads"): (1, 64, "a thread checks passwords"),
    ("auth", "max_password_bytes"): (16, 4096, "room for a passphrase"),
    ("auth", "cache_entries"): (1, None, "a login is remembered"),
    ("log", "max_files"): (2, None, "multilog's smallest n"),
    ("status", "top_destinations"): (1, 1000, "one row each on the page, one series each"),
    ("status", "cache_seconds"): (0.1, None, "the spool read in a busy loop otherwise"),
    ("status", "recent_deliveries"): (1, 1000, "rows on the page"),
    ("status", "max_connections"): (1, None, "0 would refuse every request"),
    ("status", "request_timeout"): (0.1, None, "every request would time out"),
}


# (section, key) -> the words a string setting may be.
CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("log", "format"): ("qmail", "json"),
    ("delivery", "tls_min_version"): ("TLSv1.2", "TLSv1.3"),
}


def _check_range(section: str, key: str, value: float) -> str | None:
    bounds = RANGES.get((section, key))
    if bounds is None:
        return None
    low, high, why = bounds
    if value < low:
        return f"at least {_number(low)} ({why})"
    if high is not None and value > high:
        return f"at most {_number(high)} ({why})"
    return None


def _number(bound: float) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"   # 1.75922e+13 is no bound


def _build(cls, values: dict, where: str):
    # `where` is "FILE: [section]" (or "FILE" at the top); messages name both.
    if not isinstance(values, dict):
        raise SettingsError(f"{where}: expected a table")
    known = {f.name for f in dataclasses.fields(cls)}
    defaults = cls()
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise SettingsError(f"{where} unknown setting {key!r}")
        default = getattr(defaults, key)
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise SettingsError(f"{where}: [{key}] must be a table, not {_toml_type(value)}")
            kwargs[key] = _build(type(default), value, f"{where}: [{key}]")
            continue
        expected = type(default)
        if expected is tuple and isinstance(value, list):
            # TOML arrays are lists; tuple settings hold strings.
            if not all(isinstance(v, str) for v in value):
                raise SettingsError(f"{where} {key}: expected an array of strings")
            value = tuple(value)
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            # TOML's words: integer, float, boolean, string, array, table.
            raise SettingsError(
                f"{where} {key}: expected {_TOML_NAMES.get(expected, expected.__name__)},"
                f" got {_toml_type(value)}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise SettingsError(f"{where} {key} = {value}: must be a finite number")
            if isinstance(value, int) and not -2**63 <= value < 2**63:
                # TOML's integers are 64-bit (tomllib reads any size).
                raise SettingsError(f"{where} {key} = {value}: too large for a 64-bit integer")
            if value < 0:
                raise SettingsError(f"{where} {key} = {value}: must not be negative")
            section = where.rpartition("[")[2].rstrip("]")
            why = _check_range(section, key, value)
            if why is not None:
                raise SettingsError(f"{where} {key} = {value} is out of range: {why}")
        if (where.rpartition("[")[2].rstrip("]"), key) in ADDRESS_LISTS:
            value = _addresses(where, key, value)
        if isinstance(value, str):
            choices = CHOICES.get((where.rpartition("[")[2].rstrip("]"), key))
            if choices is not None and value not in choices:
                raise SettingsError(f"{where} {key} = {value!r}: expected one of "
                                    + ", ".join(f'"{c}"' for c in choices))
        kwargs[key] = value
    return cls(**kwargs)


# Settings that are lists of IP addresses, compared with addresses as the
# socket and the resolver spell them: checked, and spelled that way.
ADDRESS_LISTS = {("delivery", "my_addresses"), ("pop3", "webmail_addresses")}


def _addresses(where: str, key: str, values: tuple) -> tuple:
    import ipaddress
    out = []
    for text in values:
        try:
            out.append(str(ipaddress.ip_address(text.strip())))
        except ValueError:
            raise SettingsError(f"{where} {key}: {text!r} is not an IP address") from None
    return tuple(out)


def load_settings(root: Path | str) -> Settings:
    """Read ROOT/qrelay.toml into a Settings snapshot (defaults if absent)."""
    path = Path(root) / SETTINGS_FILE
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return Settings()
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: {exc}") from exc
    except ValueError as exc:
        # An integer of thousands of digits (Python's int() limit); the rest
        # of the text is advice for programmers.
        raise SettingsError(f"{path}: {str(exc).split(';')[0]}") from exc
    top = {f.name for f in dataclasses.fields(Settings)}
    for key in data:
        if key not in top:
            raise SettingsError(f"{path}: unknown section [{key}]")
    settings = _build(Settings, data, str(path))
    store = settings.relay.store
    if store and not store.startswith(RELAY_STORE_SCHEMES):
        raise SettingsError(f"{path}: [relay] store = {store!r}: expected \"\" (embedded) "
                            f"or a redis://HOST:PORT/DB address")
    if store:
        _check_relay_store(path, store)
    return settings


def _check_relay_store(path: Path, store: str) -> None:
    """A Redis address redis-py reads as meant: it reads it only at a
    receiver's first check, and takes a /DB that is no number for db 0."""
    from urllib.parse import unquote, urlsplit

    from redis.asyncio.connection import parse_url
    try:
        parsed = parse_url(store)
        db = unquote(urlsplit(store).path).replace("/", "")
    except ValueError as exc:
        raise SettingsError(f"{path}: [relay] store: {exc}") from None
    if store.startswith("unix://"):
        if not parsed.get("path"):
            raise SettingsError(f"{path}: [relay] store: expected unix:///PATH/TO/redis.sock")
    elif db and not (db.isascii() and db.isdigit()):
        raise SettingsError(f"{path}: [relay] store: database {db!r} is not a number "
                            f"(redis://HOST:PORT/DB)")


# [relay] store: "" (embedded) or one of these (redis-py's URL schemes).
RELAY_STORE_SCHEMES = ("redis://", "rediss://", "unix://")


_TOML_NAMES = {int: "an integer", float: "a float", bool: "a boolean", str: "a string",
               tuple: "an array", list: "an array", dict: "a table"}


def _toml_type(value: object) -> str:
    for python, name in ((bool, "a boolean"), (int, "an integer"), (float, "a float"),
                         (str, "a string"), (list, "an array"), (dict, "a table")):
        if isinstance(value, python):
            return name
    return type(value).__name__
