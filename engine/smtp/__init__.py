"""SMTP in: the receiver (session.py, server.py) and the relay policy it applies
(policy.py: badmailfrom, rcpthosts; received.py: the Received lines qmail writes).
"""
