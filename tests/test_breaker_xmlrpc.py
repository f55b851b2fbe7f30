"""Attacks on managers with ``serializer='xmlrpclib'``: XML bombs past the DOCTYPE check, and clients
of the other serializer."""

from __future__ import annotations

import socket

import pytest

from gilfree.managers import RemoteError, SyncManager, _client
from gilfree.managers._protocol import OP_CALL, R_REMOTE

T = 10.0


def raw_request(m: SyncManager, data: bytes):
    """Send ``data`` as one frame on an authenticated XML-RPC connection; the reply, as the client reads it."""
    link = _client._get_link(m.address, bytes(m._authkey), None, "xmlrpclib")
    chan = link.channel()
    chan.send_bytes(data)
    return chan.loads(chan.recv_frame())


def call_doc(ident: str, value_xml: str) -> str:
    """An OP_CALL of ``append`` on object ``ident`` with one argument, as XML-RPC."""
    return (
        "<methodResponse><params><param><value><array><data>"
        f"<value><int>{OP_CALL}</int></value><value><string>{ident}</string></value>"
        "<value><string>append</string></value>"
        f"<value><array><data><value>{value_xml}</value></data></array></value>"
        "<value><nil/></value>"
        "</data></array></value></param></params></methodResponse>"
    )


@pytest.fixture
def xml_manager():
    m = SyncManager(serializer="xmlrpclib")
    m.start()
    try:
        yield m
    finally:
        m.shutdown()


def test_an_entity_bomb_in_utf16_is_refused_like_one_in_utf8(xml_manager):
    # The DOCTYPE check searched the raw bytes for b"<!DOCTYPE": a UTF-16 document (which expat reads
    # as well) passed it, and 20 KB of XML became a 1 MB string in the server (expat's own limit on
    # amplification is 100x: a large frame still becomes gigabytes).
    lst = xml_manager.list()
    dtd = ('<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE x [<!ENTITY a "' + "A" * 10000 + '">'
           '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]>')
    for encoding in ("utf-8", "utf-16"):
        doc = dtd.replace("UTF-16", encoding.upper()) + call_doc(lst._id, "<string>&c;</string>")
        kind, text = raw_request(xml_manager, doc.encode(encoding))
        assert kind == R_REMOTE and "DOCTYPE" in text, (encoding, kind, text)
    assert len(lst) == 0, "nothing was built from a document with a DTD"
    lst.append(1)  # the server serves on
    assert len(lst) == 1 and lst[0] == 1


@pytest.mark.parametrize("server, client", [("xmlrpclib", "pickle"), ("pickle", "xmlrpclib")])
def test_a_client_of_the_other_serializer_is_told_so(server, client):
    # It got "EOFError: manager at ... closed the connection", which says nothing of the cause.
    m = SyncManager(serializer=server)
    m.start()
    try:
        c = SyncManager(address=m.address, authkey=bytes(m._authkey), serializer=client)
        with pytest.raises(RemoteError) as info:
            c.connect()
            c.list()
        text = str(info.value)
        assert "serializer" in text and repr(server) in text and repr(client) in text, text
        lst = m.list()  # the server serves its own kind on
        lst.append(2)
        assert len(lst) == 1 and lst[0] == 2
    finally:
        m.shutdown()


@pytest.mark.parametrize("name", ["SystemExit", "KeyboardInterrupt", "GeneratorExit", "BaseExceptionGroup"])
def test_an_xml_error_reply_cannot_make_the_client_raise_a_base_exception(name):
    # Error replies were rebuilt for every builtin BaseException: a server (trusted with the authkey,
    # not with pickle) could make a proxy call raise SystemExit or KeyboardInterrupt in the client,
    # past every `except Exception`.  No server sends one (it catches Exception only).
    from gilfree.managers._protocol import R_ERR, _xml_dumps, _XmlChannel

    a, b = socket.socketpair()
    try:
        chan = _XmlChannel(a, "test")  # the client's end
        args = [0] if name != "BaseExceptionGroup" else ["x", [0]]
        kind, exc = chan.loads(_xml_dumps((R_ERR, ["builtins", name, args])))
        assert kind == R_ERR
        assert isinstance(exc, Exception), type(exc)
        assert isinstance(exc, RemoteError) and name in str(exc)
        kind, exc = chan.loads(_xml_dumps((R_ERR, ["builtins", "ValueError", ["bad"]])))
        assert type(exc) is ValueError and exc.args == ("bad",)
    finally:
        a.close()
        b.close()
