"""POP3: qmail-popup + qmail-pop3d (+ vchkpw's checks) inside the receivers.

Served by the receiver processes on `--listen pop3://HOST:PORT` and
`pop3s://HOST:PORT` (TLS from the first byte), in the same event loops as SMTP.

- `session` — one connection's dialogue (AUTHORIZATION, TRANSACTION, STLS)
- `login`   — the login name, the vpasswd lookup, PASS / APOP checks, NO_POP
- `maildir` — the Maildir as a session sees it: scan, lock, commit at QUIT
- `stream`  — RETR/TOP from the file in bounded memory (encoding in the Cython core)
- `service` — what the sessions of one process share (accounts, password threads, TLS)
"""
