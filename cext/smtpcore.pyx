# cython: language_level=3
"""Byte-level SMTP core of qrelay: command lines, MAIL/RCPT paths, ESMTP
parameters and the DATA stream, parsed in C over whole buffers.

This module owns only the *syntax* of what a client sends. It never decides
policy (bare LF refused or not, databytes, hop limit, relaying): it reports
what it saw and the receiver applies qmail's rules. Everything here must stay
bounded in memory whatever a client sends, and must never call back into
Python once per line of a message.

API (contract A in /work/notes/contracts.md; the names are fixed)
-----------------------------------------------------------------

``TOO_LONG``
    Sentinel object (not bytes) returned by ``LineReader.next_line``.

``LineReader(max_line=4096)``
    Command reader. ``feed(data)`` appends a chunk (bytes-like, split
    anywhere). ``next_line()`` returns the next complete line WITHOUT its
    terminator, ``None`` if no complete line is buffered, or ``TOO_LONG`` once
    for each line longer than ``max_line`` bytes (terminator not counted),
    when that line's LF arrives. A line ends at LF; one CR right before the
    LF is dropped (qmail accepts bare-LF command lines). Bytes of an
    over-long line are discarded as they arrive, so ``buffered`` (bytes held)
    stays <= max_line + 2 + one chunk whatever the client sends.
    ``unterminated`` is the length so far of the line that has no LF yet,
    dropped bytes included (0 right after a LF): a caller can refuse an
    over-long line, or drop its client, before the LF arrives.
    ``take_buffer()`` removes and returns every byte not yet returned as a
    line (switching to DATA mode, or discarding pipelined plaintext at
    STARTTLS); of an over-long unfinished line only its kept head is there.
    ``take_body()`` is take_buffer() with that line whole when all of its
    dropped bytes came in the last feed (until ``next_line()`` next returns
    None): a message body sent in the same chunk as DATA, whose first line
    need not fit a command line.

        >>> r = LineReader(max_line=10)
        >>> r.feed(b"HELO x\\r\\nNOOP\\nMAIL FR")
        >>> r.next_line(), r.next_line(), r.next_line()
        (b'HELO x', b'NOOP', None)
        >>> r.feed(b"OM:<a@b> SIZE=1\\r\\nDATA\\r\\n")
        >>> r.next_line() is TOO_LONG, r.next_line()
        (True, b'DATA')

``parse_command(line) -> (VERB, argument)``
    VERB = text before the first space, ASCII upper-cased; argument = the
    rest after skipping spaces (trailing spaces kept).

        >>> parse_command(b"rcpt   TO:<a@b> ")
        (b'RCPT', b'TO:<a@b> ')

``parse_path(arg) -> (address, rest) | None``
    qmail's addrparse (qmail-behaviour.md section 1.4) for the argument of
    MAIL/RCPT. With a '<': the address starts after the first '<' and ends
    at the first '>' that is neither quoted nor backslash-escaped. Without
    '<': it starts after the first ':' (spaces skipped) and ends at a space;
    with neither '<' nor ':' the address is empty. A source route (the
    address starts with '@') is dropped up to and including the first ':'.
    Backslashes and double quotes are KEPT (unlike qmail, which strips
    them), so quoted local parts stay intact. A missing terminator is not an
    error. rest = text after the terminator, leading spaces stripped (the
    ESMTP parameters). None if the address is longer than ``MAX_ADDRESS``
    (900) bytes: the caller replies ``555 syntax error (#5.5.4)``.

        >>> parse_path(b"FROM:<a@b> SIZE=10")
        (b'a@b', b'SIZE=10')
        >>> parse_path(b"TO: u@c"), parse_path(b"FROM x"), parse_path(b"FROM:<>")
        ((b'u@c', b''), (b'', b''), (b'', b''))
        >>> parse_path(b'TO:<@a,@b:"x>y"@c>')
        (b'"x>y"@c', b'')

``parse_rcpt(line) -> (address, rest) | None``
    Fast combined entry for a whole MAIL or RCPT line: exactly
    ``parse_path(parse_command(line)[1])`` without the intermediate objects.
    It does not look at the verb.

        >>> parse_rcpt(b"RCPT TO:<user@example.com>")
        (b'user@example.com', b'')

``split_address(addr) -> (local, domain | None)``
    Split at the last '@' that is not inside double quotes and not
    backslash-escaped; domain None when there is no such '@'.

        >>> split_address(b'"user@foreign"@local'), split_address(b"postmaster")
        ((b'"user@foreign"', b'local'), (b'postmaster', None))

``parse_params(rest) -> [(KEY, value | None), ...] | None``
    ESMTP parameters ``KEY[=VALUE]`` separated by spaces. KEY is upper-cased
    and must match RFC 5321's esmtp-keyword ([A-Za-z0-9][A-Za-z0-9-]*);
    VALUE must be non-empty bytes 33..126 except '=' (bytes >= 128 are
    allowed for SMTPUTF8). Any malformed token -> None.

        >>> parse_params(b"size=100 BODY=8BITMIME SMTPUTF8")
        [(b'SIZE', b'100'), (b'BODY', b'8BITMIME'), (b'SMTPUTF8', None)]
        >>> parse_params(b"=x") is None
        True

``DataScanner(max_bytes=0)``
    DATA phase: a byte automaton (qmail's ``blast()``) run over whole chunks
    with memchr. ``feed(data) -> consumed``: consumed = len(data) unless the
    end marker completes inside data; then it ends right after the marker
    and the rest is the next pipelined command (a scanner that is ``done``
    consumes nothing). The stream starts at the beginning of a line, so
    ``.\\r\\n`` right after DATA ends an empty message. Only CRLF "." CRLF ends
    the message; smuggling variants (``\\n.\\n``, ``\\r.\\r\\n`` ...) do not.
    Attributes after (or during) the scan:

    - ``done``: end marker seen.
    - ``message``: bytes as received, CRLF kept, one leading dot of each
      line removed (as qmail: not when the dot is followed by CR), end marker
      excluded (the CRLF before "." belongs to the message). ``b""`` once
      ``too_big``.
    - ``size``: bytes as qmail's databytes counts them: message length with
      each CRLF counted as 1.
    - ``too_big``: size exceeded max_bytes (when max_bytes > 0); from then on
      the body is not kept (memory bound) but the scan goes on to the marker.
    - ``hops``: header lines (before the first empty line) whose first bytes
      are ``received`` / ``delivered`` (ASCII case-insensitive), counted on
      the raw bytes exactly as qmail does.
    - ``bare_lf`` / ``bare_cr`` / ``has_nul``: an LF not preceded by CR, a CR
      not followed by LF, a NUL byte were seen (qmail's policy for bare LF is
      a 451 and hang-up; that is the receiver's job).
    - ``buffered``: bytes of message held in memory (0 once too_big).
    - ``reset()``: reuse for the next message.

        >>> s = DataScanner()
        >>> s.feed(b"Received: x\\r\\n\\r\\n..hi\\r\\n.\\r\\nQUIT\\r\\n")
        24
        >>> s.done, s.message, s.size, s.hops
        (True, b'Received: x\\r\\n\\r\\n.hi\\r\\n', 17, 1)
"""
cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdlib cimport free, realloc
from libc.string cimport memchr, memcpy, memmove

cdef extern from *:
    """
    #include <stddef.h>
    #if defined(__SSE2__)
    #include <emmintrin.h>
    #endif
    /* Copies p[0:n] to w up to the first LF (not copied) and returns its
       index, or n when there is none: the MessageEncoder's inner loop, one
       pass that scans and copies 16 bytes at a time where memchr + memcpy
       made two library calls for every line. A 16-byte store may run up to
       15 bytes past the LF, never past w + n; the caller writes over them. */
    static inline size_t qr_copy_to_lf(const unsigned char *p, size_t n, unsigned char *w) {
        size_t i = 0;
    #if defined(__SSE2__)
        const __m128i lf = _mm_set1_epi8('\\n');
        while (i + 16 <= n) {
            __m128i v = _mm_loadu_si128((const __m128i *)(p + i));
            int m = _mm_movemask_epi8(_mm_cmpeq_epi8(v, lf));
            _mm_storeu_si128((__m128i *)(w + i), v);
            if (m)
                return i + (size_t)__builtin_ctz((unsigned)m);
            i += 16;
        }
    #endif
        while (i < n && p[i] != '\\n') {
            w[i] = p[i];
            i++;
        }
        return i;
    }
    """
    size_t qr_copy_to_lf(const unsigned char *p, size_t n, unsigned char *w) noexcept nogil

# qmail-smtpd's addrparse limit; the caller answers 555 when it is exceeded.
MAX_ADDRESS = 900
cdef Py_ssize_t C_MAX_ADDRESS = 900

# A reader keeps at most this much capacity between lines / messages; more is
# given back so an idle connection does not pin the memory of its largest read.
cdef Py_ssize_t KEEP_CAPACITY = 256 * 1024


cdef class _TooLong:
    """Type of the TOO_LONG sentinel (a single immutable instance)."""

    def __repr__(self):
        return "TOO_LONG"

    def __reduce__(self):
        return "TOO_LONG"


TOO_LONG = _TooLong()


# ---------------------------------------------------------------------------
# growable C byte buffer


cdef struct ByteBuf:
    unsigned char *data
    Py_ssize_t len
    Py_ssize_t cap


cdef int buf_reserve(ByteBuf *b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t need = b.len + extra
    cdef Py_ssize_t cap
    cdef unsigned char *p
    if need <= b.cap:
        return 0
    cap = b.cap * 2 if b.cap else 1024
    while cap < need:
        cap *= 2
    p = <unsigned char *>realloc(b.data, cap)
    if p == NULL:
        raise MemoryError()
    b.data = p
    b.cap = cap
    return 0


cdef inline int buf_append(ByteBuf *b, const unsigned char *p, Py_ssize_t n) except -1:
    if n <= 0:
        return 0
    if b.len + n > b.cap:
        buf_reserve(b, n)
    memcpy(b.data + b.len, p, n)
    b.len += n
    return 0


cdef void buf_free(ByteBuf *b) noexcept:
    free(b.data)
    b.data = NULL
    b.len = 0
    b.cap = 0


cdef void buf_shrink(ByteBuf *b) noexcept:
    """Give back capacity above KEEP_CAPACITY when the buffer is empty."""
    if b.len == 0 and b.cap > KEEP_CAPACITY:
        buf_free(b)


# ---------------------------------------------------------------------------
# command reader


@cython.final
cdef class LineReader:
    """Splits a client's byte stream into command lines; see the module docstring."""

    cdef ByteBuf buf
    cdef Py_ssize_t start       # first byte not yet returned as a line
    cdef Py_ssize_t line_start  # start of the unterminated last line (after the last LF)
    cdef Py_ssize_t max_line
    cdef bint discarding        # unterminated line is over-long: drop bytes until LF
    cdef Py_ssize_t dropped     # bytes of the unterminated line dropped so far
    cdef object cut             # those bytes, when all of them came in the last feed (take_body)

    def __init__(self, Py_ssize_t max_line=4096):
        if max_line < 0:
            raise ValueError("max_line must be >= 0")
        self.max_line = max_line

    def __dealloc__(self):
        buf_free(&self.buf)

    @property
    def buffered(self):
        return self.buf.len - self.start

    @property
    def unterminated(self):
        # Bytes received of the last line so far (no LF yet), dropped ones
        # included: lets the caller refuse an over-long line before its LF.
        return self.buf.len - self.line_start + self.dropped

    def feed(self, data):
        cdef Py_buffer view
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            self._feed(<const unsigned char *>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    cdef int _feed(self, const unsigned char *p, Py_ssize_t n) except -1:
        cdef const unsigned char *q
        cdef Py_ssize_t k, last_lf, room, keep
        if n <= 0:
            return 0
        self.cut = None             # from now on the dropped bytes, if any, span feeds
        if self.discarding:
            q = <const unsigned char *>memchr(p, 10, n)
            if q == NULL:
                self.dropped += n
                return 0            # still inside the over-long line
            k = q - p
            p += k                  # keep its LF: it terminates the kept head
            n -= k
            self.discarding = False
        self._compact()
        last_lf = n - 1
        while last_lf >= 0 and p[last_lf] != 10:
            last_lf -= 1
        if last_lf >= 0:
            buf_append(&self.buf, p, last_lf + 1)
            self.line_start = self.buf.len
            self.dropped = 0
            p += last_lf + 1
            n -= last_lf + 1
        # The unterminated tail: keep at most max_line + 2 bytes of it (one
        # extra byte proves it too long, one more may be the CR before LF).
        room = self.max_line + 2 - (self.buf.len - self.line_start)
        keep = n if n <= room else (room if room > 0 else 0)
        buf_append(&self.buf, p, keep)
        if keep < n:
            self.cut = PyBytes_FromStringAndSize(<const char *>p + keep, n - keep)
            self.discarding = True
            self.dropped += n - keep
        return 0

    cdef void _compact(self) noexcept:
        cdef Py_ssize_t held = self.buf.len - self.start
        if self.start == 0:
            return
        if held:
            memmove(self.buf.data, self.buf.data + self.start, held)
        self.line_start -= self.start
        self.buf.len = held
        self.start = 0

    def next_line(self):
        cdef const unsigned char *base
        cdef const unsigned char *q
        cdef Py_ssize_t end, stop, length
        if self.line_start <= self.start:
            self.cut = None         # every line taken: nobody will want it now
            return None
        base = self.buf.data
        q = <const unsigned char *>memchr(base + self.start, 10, self.line_start - self.start)
        # line_start is right after an LF, so one is always found
        end = q - base
        stop = end
        if stop > self.start and base[stop - 1] == 13:
            stop -= 1
        length = stop - self.start
        if length > self.max_line:
            line = TOO_LONG
        else:
            line = PyBytes_FromStringAndSize(<const char *>base + self.start, length)
        self.start = end + 1
        if self.start == self.buf.len:
            self.start = self.line_start = self.buf.len = 0
            buf_shrink(&self.buf)
        return line

    def take_buffer(self):
        cdef bytes rest = PyBytes_FromStringAndSize(
            <const char *>self.buf.data + self.start, self.buf.len - self.start)
        self.start = self.line_start = self.buf.len = 0
        self.discarding = False
        self.dropped = 0
        self.cut = None
        buf_shrink(&self.buf)
        return rest

    def take_body(self):
        cut = self.cut
        rest = self.take_buffer()
        return rest if cut is None else rest + cut


# ---------------------------------------------------------------------------
# command, path and parameter parsing


# The verbs qrelay answers, shared instead of allocated per command line.
cdef tuple KNOWN_VERBS = (b"HELO", b"EHLO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"NOOP",
                          b"QUIT", b"VRFY", b"HELP", b"AUTH", b"EXPN", b"ETRN", b"BDAT")


cdef inline unsigned char ascii_upper(unsigned char c) noexcept:
    return c - 32 if 97 <= c <= 122 else c


cdef object upper_verb(const unsigned char *p, Py_ssize_t i):
    cdef Py_ssize_t k
    cdef bytes verb
    cdef const unsigned char *known
    cdef unsigned char *v
    if i == 4:
        for verb in KNOWN_VERBS:
            known = <const unsigned char *>PyBytes_AS_STRING(verb)
            if (ascii_upper(p[0]) == known[0] and ascii_upper(p[1]) == known[1]
                    and ascii_upper(p[2]) == known[2] and ascii_upper(p[3]) == known[3]):
                return verb
    verb = PyBytes_FromStringAndSize(NULL, i)
    v = <unsigned char *>PyBytes_AS_STRING(verb)
    for k in range(i):
        v[k] = ascii_upper(p[k])
    return verb


@cython.always_allow_keywords(False)
def parse_command(bytes line not None):
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(line)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(line)
    cdef const unsigned char *q = <const unsigned char *>memchr(p, 32, n)
    cdef Py_ssize_t i = (q - p) if q != NULL else n
    cdef Py_ssize_t j = i
    verb = upper_verb(p, i)
    while j < n and p[j] == 32:
        j += 1
    if j == 0:
        return verb, line
    return verb, PyBytes_FromStringAndSize(<const char *>p + j, n - j)


cdef object path_of(const unsigned char *p, Py_ssize_t n):
    """qmail's addrparse over p[0:n], quotes and escapes kept."""
    cdef unsigned char term = 62  # '>'
    cdef const unsigned char *q = <const unsigned char *>memchr(p, 60, n)
    cdef Py_ssize_t i, k, r
    cdef unsigned char c
    cdef bint quoted = False
    if q != NULL:
        i = q - p + 1
    else:
        term = 32
        q = <const unsigned char *>memchr(p, 58, n)
        if q == NULL:
            return b"", b""
        i = q - p + 1
        while i < n and p[i] == 32:
            i += 1
    if i < n and p[i] == 64:  # '@': source route, dropped through the first ':'
        while i < n:
            c = p[i]
            i += 1
            if c == 58:
                break
    k = i
    while k < n:
        c = p[k]
        if c == 92:           # backslash: next byte is literal
            k += 2
            continue
        if c == 34:
            quoted = not quoted
        elif c == term and not quoted:
            break
        k += 1
    if k > n:                 # trailing backslash
        k = n
    if k - i > C_MAX_ADDRESS:
        return None
    r = k + 1
    while r < n and p[r] == 32:
        r += 1
    if r > n:
        r = n
    return (PyBytes_FromStringAndSize(<const char *>p + i, k - i),
            PyBytes_FromStringAndSize(<const char *>p + r, n - r))


@cython.always_allow_keywords(False)
def parse_path(bytes arg not None):
    return path_of(<const unsigned char *>PyBytes_AS_STRING(arg), PyBytes_GET_SIZE(arg))


@cython.always_allow_keywords(False)
def parse_rcpt(bytes line not None):
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(line)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(line)
    cdef const unsigned char *q = <const unsigned char *>memchr(p, 32, n)
    cdef Py_ssize_t j = (q - p) if q != NULL else n
    while j < n and p[j] == 32:
        j += 1
    return path_of(p + j, n - j)


@cython.always_allow_keywords(False)
def split_address(bytes addr not None):
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(addr)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(addr)
    cdef Py_ssize_t k = 0, at = -1
    cdef bint quoted = False
    cdef unsigned char c
    while k < n:
        c = p[k]
        if c == 92:
            k += 2
            continue
        if c == 34:
            quoted = not quoted
        elif c == 64 and not quoted:
            at = k
        k += 1
    if at < 0:
        return addr, None
    return (PyBytes_FromStringAndSize(<const char *>p, at),
            PyBytes_FromStringAndSize(<const char *>p + at + 1, n - at - 1))


cdef inline bint is_keychar(unsigned char c) noexcept:
    return (48 <= c <= 57) or (65 <= c <= 90) or (97 <= c <= 122) or c == 45


@cython.always_allow_keywords(False)
def parse_params(bytes rest not None):
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(rest)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(rest)
    cdef Py_ssize_t i = 0, ks, ke, vs, k
    cdef unsigned char c
    cdef bytes key
    cdef unsigned char *kp
    cdef list out = []
    while True:
        while i < n and p[i] == 32:
            i += 1
        if i >= n:
            return out
        ks = i
        while i < n and p[i] != 32 and p[i] != 61:
            if not is_keychar(p[i]):
                return None
            i += 1
        ke = i
        if ke == ks or p[ks] == 45:
            return None
        key = PyBytes_FromStringAndSize(NULL, ke - ks)
        kp = <unsigned char *>PyBytes_AS_STRING(key)
        for k in range(ke - ks):
            c = p[ks + k]
            kp[k] = c - 32 if 97 <= c <= 122 else c
        if i < n and p[i] == 61:
            i += 1
            vs = i
            while i < n and p[i] != 32:
                c = p[i]
                if c < 33 or c == 61 or c == 127:
                    return None
                i += 1
            if i == vs:
                return None
            out.append((key, PyBytes_FromStringAndSize(<const char *>p + vs, i - vs)))
        else:
            out.append((key, None))


# ---------------------------------------------------------------------------
# DATA scanner

# Automaton states (qmail's blast() numbering in brackets).
cdef enum:
    ST_BOL = 0      # [1] at the start of a line (after CRLF, or right after DATA)
    ST_MID = 1      # [0] inside a line
    ST_CR = 2       # [4] a CR was the last byte, inside a line
    ST_DOT = 3      # [2] "." at the start of a line, dropped
    ST_DOTCR = 4    # [3] ".\r" at the start of a line, held back


cdef const char *DELIVERED = b"delivered"
cdef const char *RECEIVED = b"received"
cdef const char *CRLF = b"\r\n"


cdef bint has_bare_cr(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    """Any CR in p[0:n-1] not followed by LF (the last byte is the caller's)."""
    cdef Py_ssize_t k, blk, j
    cdef int bad
    k = 0
    # Branch-free blocks so the compiler vectorises; stop at the first hit.
    while k + 1 < n:
        blk = n - 1 - k
        if blk > 4096:
            blk = 4096
        bad = 0
        for j in range(k, k + blk):
            bad |= (p[j] == 13) & (p[j + 1] != 10)
        if bad:
            return True
        k += blk
    return False


@cython.final
cdef class DataScanner:
    """DATA-phase automaton; see the module docstring."""

    cdef ByteBuf out
    cdef Py_ssize_t max_bytes
    cdef Py_ssize_t out_total     # bytes of the message emitted (kept or not)
    cdef Py_ssize_t crlf          # CRLF pairs inside the emitted message
    cdef int state
    cdef bint _done, _too_big, _dropped, _bare_lf, _bare_cr, _has_nul
    # qmail's header tracking (raw bytes, lines end at any LF)
    cdef bint in_header, maybe_recv, maybe_deliv, maybe_empty
    cdef int hpos
    cdef Py_ssize_t _hops

    def __init__(self, Py_ssize_t max_bytes=0):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self.reset()

    def __dealloc__(self):
        buf_free(&self.out)

    def reset(self):
        self.out.len = 0
        buf_shrink(&self.out)
        self.out_total = 0
        self.crlf = 0
        self.state = ST_BOL
        self._done = self._too_big = self._dropped = False
        self._bare_lf = self._bare_cr = self._has_nul = False
        self.in_header = True
        self.hpos = 0
        self.maybe_recv = self.maybe_deliv = self.maybe_empty = True
        self._hops = 0

    @property
    def done(self):
        return self._done

    @property
    def message(self):
        if self._too_big or self._dropped:
            return b""
        return PyBytes_FromStringAndSize(<const char *>self.out.data, self.out.len)

    def take_message(self, bytes prefix=b""):
        """prefix + the message in one new bytes object, the scanner's own
        copy freed at once (b"" once too_big or dropped): a receiver ending
        DATA holds the message twice at most, not three times (`message`,
        then a join with the Received lines)."""
        cdef bytes out
        cdef char *dst
        cdef Py_ssize_t n = len(prefix)
        if self._too_big or self._dropped:
            return b""
        out = PyBytes_FromStringAndSize(NULL, n + self.out.len)
        dst = PyBytes_AS_STRING(out)
        memcpy(dst, PyBytes_AS_STRING(prefix), n)
        if self.out.len:
            memcpy(dst + n, self.out.data, self.out.len)
        buf_free(&self.out)
        return out

    @property
    def size(self):
        return self.out_total - self.crlf

    @property
    def buffered(self):
        """Bytes of message currently held (0 once too_big or dropped)."""
        return self.out.len

    @property
    def too_big(self):
        return self._too_big

    def drop(self):
        """Hold no more of this message but scan on to its end marker (the
        receiver's memory for messages is spent: the session answers 452)."""
        self._dropped = True
        self.out.len = 0
        buf_free(&self.out)

    @property
    def dropped(self):
        return self._dropped

    @property
    def hops(self):
        return self._hops

    @property
    def bare_lf(self):
        return self._bare_lf

    @property
    def bare_cr(self):
        return self._bare_cr

    @property
    def has_nul(self):
        return self._has_nul

    def feed(self, data):
        cdef Py_buffer view
        cdef Py_ssize_t consumed
        if self._done:
            return 0
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            consumed = self._scan(<const unsigned char *>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        return consumed

    cdef inline int _emit(self, const unsigned char *p, Py_ssize_t n) except -1:
        if n <= 0:
            return 0
        self.out_total += n
        if not self._too_big and not self._dropped:
            buf_append(&self.out, p, n)
        return 0

    cdef inline void _header_byte(self, unsigned char c) noexcept:
        # qmail-smtpd.c blast(): match "delivered"/"received" case-insensitively
        # in the first bytes of each raw line; a line starting "\r\n" ends the header.
        cdef int pos = self.hpos
        cdef unsigned char low
        if pos < 9:
            low = c | 32 if 65 <= c <= 90 else c
            if low != DELIVERED[pos]:
                self.maybe_deliv = False
            if self.maybe_deliv and pos == 8:
                self._hops += 1
            if pos < 8:
                if low != RECEIVED[pos]:
                    self.maybe_recv = False
                if self.maybe_recv and pos == 7:
                    self._hops += 1
            if pos < 2:
                if c != CRLF[pos]:
                    self.maybe_empty = False
                if self.maybe_empty and pos == 1:
                    self.in_header = False
            self.hpos = pos + 1
        if c == 10:
            self.hpos = 0
            self.maybe_recv = self.maybe_deliv = self.maybe_empty = True

    cdef inline void _header_line(self, const unsigned char *q) noexcept:
        # The same checks as _header_byte over the first 9 bytes of a raw
        # line known to hold no LF there, in one go; the rest of the line is
        # then skipped by memchr until its LF resets hpos.
        cdef int k
        cdef bint recv = True, deliv = True
        for k in range(9):
            if (q[k] | 32 if 65 <= q[k] <= 90 else q[k]) != DELIVERED[k]:
                deliv = False
            if k < 8 and (q[k] | 32 if 65 <= q[k] <= 90 else q[k]) != RECEIVED[k]:
                recv = False
        self._hops += recv + deliv
        self.hpos = 9

    cdef Py_ssize_t _scan(self, const unsigned char *p, Py_ssize_t n) except -1:
        cdef Py_ssize_t i = 0, seg = 0, j, crlf = 0
        cdef const unsigned char *q
        cdef int st = self.state
        cdef unsigned char c
        cdef bint bare_lf = False, bare_cr = False
        while i < n:
            if self.in_header and self.hpos == 0 and n - i >= 9 \
                    and memchr(p + i, 10, 9) == NULL:
                self._header_line(p + i)
            if st == ST_MID and (self.hpos >= 9 or not self.in_header):
                # Fast path: jump to the end of the line.
                q = <const unsigned char *>memchr(p + i, 10, n - i)
                if q == NULL:
                    st = ST_CR if p[n - 1] == 13 else ST_MID
                    i = n
                    break
                j = q - p
                if j > i and p[j - 1] == 13:
                    crlf += 1
                    st = ST_BOL
                else:
                    bare_lf = True
                if self.in_header:
                    self.hpos = 0
                    self.maybe_recv = self.maybe_deliv = self.maybe_empty = True
                i = j + 1
                continue
            c = p[i]
            if self.in_header:
                self._header_byte(c)
            if st == ST_MID:
                if c == 13:
                    st = ST_CR
                elif c == 10:
                    bare_lf = True
            elif st == ST_BOL:
                if c == 46:
                    self._emit(p + seg, i - seg)   # drop the dot
                    seg = i + 1
                    st = ST_DOT
                elif c == 13:
                    st = ST_CR
                elif c == 10:
                    bare_lf = True
                    st = ST_MID
                else:
                    st = ST_MID
            elif st == ST_CR:
                if c == 10:
                    crlf += 1
                    st = ST_BOL
                elif c != 13:
                    bare_cr = True
                    st = ST_MID
                else:
                    bare_cr = True
            elif st == ST_DOT:
                if c == 13:
                    seg = i + 1                    # hold ".\r" back
                    st = ST_DOTCR
                elif c == 10:
                    bare_lf = True
                    st = ST_MID
                else:
                    st = ST_MID
            else:  # ST_DOTCR
                if c == 10:
                    # CRLF "." CRLF: the message ends before the dot.
                    self._done = True
                    i += 1
                    seg = i
                    break
                # qmail puts the dot and CR back when no LF follows.
                self._emit(<const unsigned char *>b".\r", 2)
                bare_cr = True
                st = ST_CR if c == 13 else ST_MID
            i += 1
        self._emit(p + seg, i - seg)           # when done, seg == i
        self.state = st
        self.crlf += crlf
        if bare_lf:
            self._bare_lf = True
        if bare_cr or (not self._bare_cr and has_bare_cr(p, i)):
            self._bare_cr = True
        if not self._has_nul and memchr(p, 0, i) != NULL:
            self._has_nul = True
        if self.max_bytes and not self._too_big and self.out_total - self.crlf > self.max_bytes:
            self._too_big = True
            self.out.len = 0
            buf_free(&self.out)
        return i


# ---------------------------------------------------------------------------
# POP3 message output (qmail-pop3d's blast())


@cython.final
cdef class MessageEncoder:
    """A Maildir file as qmail-pop3d sends it for RETR and TOP, over chunks.

    ``MessageEncoder(body_lines=-1)``: -1 sends the whole message; k >= 0
    sends the header, the empty line ending it, and k body lines (TOP i k).
    ``feed(data) -> bytes`` takes the file's bytes split anywhere and returns
    what to send for them; the state (start of line, in the header, lines
    left) carries across chunks, so memory is one chunk whatever the size of
    the message. ``done`` is True once TOP's lines are all out (feed then
    returns b"" and the caller stops reading). ``feed_into(data, out) -> n``
    does the same into a writable buffer the caller reuses (at least
    2 * len(data) + 2 bytes), with no bytes object per chunk. ``finish() -> bytes`` ends the
    reply: CRLF after a last line without LF, then CRLF "." CRLF — every
    message gets an extra empty line, as qmail-pop3d.8 says.

    Each LF becomes CRLF (a CR already before it stays: ``abc\\r\\n`` is sent
    as ``abc\\r\\r\\n``), a line starting with "." gets a second one, and
    the header ends at the first line that is empty once its LF is removed.

        >>> e = MessageEncoder()
        >>> e.feed(b"Subject: x\\n\\n.dot\\nla"), e.feed(b"st"), e.finish()
        (b'Subject: x\\r\\n\\r\\n..dot\\r\\nla', b'st', b'\\r\\n\\r\\n.\\r\\n')
        >>> e = MessageEncoder(0)
        >>> e.feed(b"S: x\\n\\nbody\\n"), e.done, e.finish()
        (b'S: x\\r\\n\\r\\n', True, b'\\r\\n.\\r\\n')
    """

    cdef ByteBuf out             # capacity kept between chunks
    cdef Py_ssize_t limit        # qmail's: 0 = no limit, else body lines + 1
    cdef bint bol, inheaders, _done

    def __init__(self, Py_ssize_t body_lines=-1):
        self.limit = body_lines + 1 if body_lines >= 0 else 0
        self.bol = True
        self.inheaders = True
        self._done = False

    @property
    def done(self):
        return self._done

    def __dealloc__(self):
        buf_free(&self.out)

    def feed(self, data):
        cdef Py_buffer view
        cdef Py_ssize_t size
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            if self._done or view.len <= 0:
                return b""
            # Into a buffer kept for the next chunk, sized for the worst case
            # (every byte a LF, or "." + LF lines: twice the input), then one
            # copy into the bytes returned: a fresh worst-case bytes object
            # per chunk would cost a page fault for every page it touches.
            buf_reserve(&self.out, 2 * view.len + 2)
            size = self._encode(<const unsigned char *>view.buf, view.len, self.out.data)
            return PyBytes_FromStringAndSize(<const char *>self.out.data, size)
        finally:
            PyBuffer_Release(&view)

    def feed_into(self, data, out):
        """feed() into the writable buffer `out` (at least 2 * len(data) + 2
        bytes, reused by the caller); returns how many bytes it wrote there."""
        cdef Py_buffer view, dest
        cdef Py_ssize_t size = 0
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            PyObject_GetBuffer(out, &dest, PyBUF_WRITABLE)
            try:
                if dest.len < 2 * view.len + 2:
                    raise ValueError("feed_into: the buffer needs 2 * len(data) + 2 bytes")
                if not self._done and view.len > 0:
                    size = self._encode(<const unsigned char *>view.buf, view.len,
                                        <unsigned char *>dest.buf)
            finally:
                PyBuffer_Release(&dest)
        finally:
            PyBuffer_Release(&view)
        return size

    cdef Py_ssize_t _encode(self, const unsigned char *p, Py_ssize_t n, unsigned char *out) noexcept:
        cdef Py_ssize_t i = 0
        cdef size_t k
        cdef unsigned char *w = out
        while i < n:
            if self.bol:
                if self.limit and not self.inheaders:
                    self.limit -= 1
                    if self.limit == 0:
                        self._done = True
                        break
                if p[i] == 10:
                    self.inheaders = False
                    w[0] = 13
                    w[1] = 10
                    w += 2
                    i += 1
                    continue
                if p[i] == 46:
                    w[0] = 46
                    w += 1
                self.bol = False
            # The line's bytes up to its LF, or the rest of the chunk. The
            # buffer holds 2n + 2: a store running ahead of the LF stays in it
            # (at most 2i + 1 bytes are out before byte i, n - i are left).
            k = qr_copy_to_lf(p + i, n - i, w)
            w += k
            i += k
            if i == n:
                break
            w[0] = 13
            w[1] = 10
            w += 2
            i += 1
            self.bol = True
        return w - out

    def finish(self):
        if not self.bol:
            self.bol = True
            return b"\r\n\r\n.\r\n"
        return b"\r\n.\r\n"
