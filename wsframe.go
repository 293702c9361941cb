// WebSocket frames (RFC 6455 section 5), the part of the protocol that
// x/net/websocket cannot do for a server: it reads one frame at a time,
// so a fragmented message, or a ping between fragments, reached the
// handler as separate messages. x/net keeps the handshake; reading frames
// into messages, and framing what the server sends, is here.

package main

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"sync/atomic"
	"time"
	"unicode/utf8"
)

// Opcodes.
const (
	opContinuation = 0x0
	opText         = 0x1
	opBinary       = 0x2
	opClose        = 0x8
	opPing         = 0x9
	opPong         = 0xa
)

// Close codes (RFC 6455 section 7.4.1).
const (
	closeNormal       = 1000
	closeProtocol     = 1002
	closeNoStatus     = 1005 // never sent: a close frame without a code
	closeInvalidData  = 1007
	closeTooBig       = 1009
	closeInternal     = 1011 // the server cannot go on with the connection
	maxControlPayload = 125
)

// wsCloseError is why a connection must end with a close frame: the
// code and reason to send. A peer's close is echoed with its own code.
type wsCloseError struct {
	code   int // 0: the peer's close had no code, so the echo has none
	reason string
}

func (e *wsCloseError) Error() string {
	return fmt.Sprintf("websocket close %d: %s", e.code, e.reason)
}

func protocolError(reason string) error { return &wsCloseError{closeProtocol, reason} }

// wsReader reads a client's messages. A message may come in several
// frames, with control frames between them; pings are answered through
// pong, pongs ignored, and a close, or any frame the RFC forbids, ends
// the reading with a *wsCloseError. Each rule of the RFC is one check.
type wsReader struct {
	r    *bufio.Reader
	max  int               // the largest message, counted across its fragments
	pong func(data []byte) // queues a pong holding data
	ctl  [maxControlPayload]byte
}

// next reads the next data message into buf's array, growing it as
// needed, and returns its opcode (text or binary) and the message; a
// text message that is not UTF-8 with errNotUTF8.
func (r *wsReader) next(buf []byte) (op byte, msg []byte, err error) {
	buf = buf[:0]
	for {
		fin, code, n, mask, err := r.header()
		if err != nil {
			return 0, buf, err
		}
		if code >= opClose {
			if err := r.control(code, n, mask); err != nil {
				return 0, buf, err
			}
			continue
		}
		switch {
		case code == opContinuation && op == 0:
			return 0, buf, protocolError("continuation frame without a message to continue")
		case code == opText || code == opBinary:
			if op != 0 {
				return 0, buf, protocolError("new message before the last one ended")
			}
			op = code
		case code != opContinuation:
			return 0, buf, protocolError(fmt.Sprintf("reserved opcode %#x", code))
		}
		if n > uint64(r.max-len(buf)) {
			return 0, buf, &wsCloseError{closeTooBig, fmt.Sprintf("message larger than %d bytes", r.max)}
		}
		start := len(buf)
		buf = slices.Grow(buf, int(n))[:start+int(n)]
		if _, err := io.ReadFull(r.r, buf[start:]); err != nil {
			return 0, buf, err
		}
		unmask(buf[start:], mask)
		if fin {
			if op == opText && !utf8.Valid(buf) {
				return op, buf, errNotUTF8
			}
			return op, buf, nil
		}
	}
}

// header reads a frame header and checks what can be checked in it: no
// reserved bit, masked (every client frame is), a control frame short
// and whole, a length that fits in 63 bits.
func (r *wsReader) header() (fin bool, op byte, n uint64, mask [4]byte, err error) {
	var h [2]byte
	if _, err = io.ReadFull(r.r, h[:]); err != nil {
		return
	}
	fin, op, n = h[0]&0x80 != 0, h[0]&0x0f, uint64(h[1]&0x7f)
	switch {
	case h[0]&0x70 != 0:
		return fin, op, n, mask, protocolError("reserved bits set")
	case h[1]&0x80 == 0:
		return fin, op, n, mask, protocolError("unmasked client frame")
	case op >= opClose && !fin:
		return fin, op, n, mask, protocolError("fragmented control frame")
	case op >= opClose && n > maxControlPayload:
		return fin, op, n, mask, protocolError("control frame over 125 bytes")
	}
	var ext [8]byte
	switch n {
	case 126:
		if _, err = io.ReadFull(r.r, ext[:2]); err != nil {
			return
		}
		n = uint64(binary.BigEndian.Uint16(ext[:2]))
	case 127:
		if _, err = io.ReadFull(r.r, ext[:]); err != nil {
			return
		}
		if n = binary.BigEndian.Uint64(ext[:]); n>>63 != 0 {
			return fin, op, n, mask, protocolError("frame length over 63 bits")
		}
	}
	_, err = io.ReadFull(r.r, mask[:])
	return
}

// control handles a control frame of n bytes: answers a ping, ignores a
// pong, and turns a close into the *wsCloseError that echoes it.
func (r *wsReader) control(op byte, n uint64, mask [4]byte) error {
	p := r.ctl[:n]
	if _, err := io.ReadFull(r.r, p); err != nil {
		return err
	}
	unmask(p, mask)
	switch op {
	case opPing:
		r.pong(p)
		return nil
	case opPong:
		return nil
	case opClose:
		return peerClose(p)
	}
	return protocolError(fmt.Sprintf("reserved opcode %#x", op))
}

// peerClose reads a close frame's payload: a code and a reason, or
// nothing. A well-formed one is echoed with its code (section 5.5.1).
func peerClose(p []byte) error {
	switch {
	case len(p) == 0:
		return &wsCloseError{0, "closed by the client"}
	case len(p) == 1:
		return protocolError("close frame with a one-byte payload")
	case !utf8.Valid(p[2:]):
		return &wsCloseError{closeInvalidData, "close reason not valid UTF-8"}
	}
	code := int(binary.BigEndian.Uint16(p))
	if !validCloseCode(code) {
		return protocolError(fmt.Sprintf("close code %d", code))
	}
	return &wsCloseError{code, "closed by the client"}
}

// validCloseCode reports whether a peer may send code (section 7.4).
func validCloseCode(code int) bool {
	switch {
	case code >= 3000 && code <= 4999:
		return true
	case code < 1000 || code > 1014:
		return false
	}
	return code != 1004 && code != closeNoStatus && code != 1006
}

// unmask applies a client frame's masking key (section 5.3).
func unmask(p []byte, mask [4]byte) {
	if mask == [4]byte{} {
		return
	}
	m := uint64(binary.LittleEndian.Uint32(mask[:]))
	m |= m << 32
	i := 0
	for ; i+8 <= len(p); i += 8 {
		binary.LittleEndian.PutUint64(p[i:], binary.LittleEndian.Uint64(p[i:])^m)
	}
	for ; i < len(p); i++ {
		p[i] ^= mask[i&3]
	}
}

// frameRoom is the longest header of a server frame: unmasked, with a
// 64-bit length.
const frameRoom = 10

// beginFrame appends room for a frame's header; the payload goes after it
// and endFrame puts the header in.
func beginFrame(b []byte) (_ []byte, start int) {
	return append(b, make([]byte, frameRoom)...), len(b)
}

// endFrame turns what was appended since beginFrame into one final frame
// of opcode op, moving the payload up against its header.
func endFrame(b []byte, start int, op byte) []byte { return endFragment(b, start, op, true) }

// endFragment is endFrame for a frame of a message in fragments (RFC 6455
// 5.4): the first has the message's opcode, the others opContinuation;
// only the last is final (fin).
func endFragment(b []byte, start int, op byte, fin bool) []byte {
	payload := len(b) - start - frameRoom
	var h [frameRoom]byte
	h[0] = op
	if fin {
		h[0] |= 0x80
	}
	n := 2
	switch {
	case payload < 126:
		h[1] = byte(payload)
	case payload <= 0xffff:
		h[1] = 126
		binary.BigEndian.PutUint16(h[2:], uint16(payload))
		n = 4
	default:
		h[1] = 127
		binary.BigEndian.PutUint64(h[2:], uint64(payload))
		n = frameRoom
	}
	copy(b[start:], h[:n])
	copy(b[start+n:], b[start+frameRoom:])
	return b[:start+n+payload]
}

// appendFrame appends one final frame holding payload.
func appendFrame(b []byte, op byte, payload []byte) []byte {
	b, start := beginFrame(b)
	return endFrame(append(b, payload...), start, op)
}

// appendClose appends the close frame that answers err: its code and
// reason, cut to fit a control frame; or, echoing a close without a code,
// an empty one.
func appendClose(b []byte, e *wsCloseError) []byte {
	if e.code == 0 {
		return appendFrame(b, opClose, nil)
	}
	p := binary.BigEndian.AppendUint16(make([]byte, 0, maxControlPayload), uint16(e.code))
	reason := e.reason
	for len(p)+len(reason) > maxControlPayload {
		_, size := utf8.DecodeLastRuneInString(reason)
		reason = reason[:len(reason)-size]
	}
	return appendFrame(b, opClose, append(p, reason...))
}

// wsInput is what a WebSocket's reader reads from: the connection, with a
// read deadline that finds a peer that vanished without a FIN (SPEC 5).
// After -heartbeat of silence it has a ping sent; if nothing at all comes
// within -write-timeout after it, the read fails with errPeerSilent.
type wsInput struct {
	conn    net.Conn
	early   []byte        // bytes the HTTP server read past the request
	silence time.Duration // -heartbeat
	answer  time.Duration // -write-timeout
	ping    func()        // queues a ping
	gone    *atomic.Int64 // counts the connections closed for not answering
}

var errPeerSilent = errors.New("websocket: no answer to a ping")

// errNotUTF8 is a whole text message that is not valid UTF-8. The
// message has been read, so the connection can go on: it gets an error,
// as any bad message does (SPEC 5 allows 1007 or an error).
var errNotUTF8 = errors.New("invalid message: not valid UTF-8")

func (in *wsInput) Read(p []byte) (int, error) {
	if len(in.early) > 0 {
		n := copy(p, in.early)
		in.early = in.early[n:]
		return n, nil
	}
	wait, pinged := in.silence, false
	for {
		in.conn.SetReadDeadline(time.Now().Add(wait))
		n, err := in.conn.Read(p)
		if n > 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
			return n, err
		}
		if pinged {
			in.gone.Add(1)
			return 0, errPeerSilent
		}
		in.ping()
		wait, pinged = in.answer, true
	}
}
