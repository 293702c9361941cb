package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/net/websocket"
)

// The WebSocket API is KvServer's protocol, extended: text frames holding
// one JSON message each, {"type": T, "payload": P} plus an optional "id"
// that the direct reply echoes. docs/websocket.md lists every message.

// isWebSocket reports whether r asks to upgrade to a WebSocket.
func isWebSocket(r *http.Request) bool {
	return strings.EqualFold(r.Header.Get("Upgrade"), "websocket") &&
		headerHasToken(r.Header, "Connection", "upgrade")
}

// headerHasToken reports whether a comma-separated header lists token.
func headerHasToken(h http.Header, name, token string) bool {
	for _, v := range h.Values(name) {
		for t := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

// handleWebSocket answers GET / with Upgrade: websocket.
//
// websocket.Server would run the connection on net/http's goroutine for
// it, which keeps that goroutine's deep stack, its 4 KB read and write
// buffers and the request's state alive as long as the socket lives. So
// the handler hijacks the connection itself, hands it to websocket.Server
// on a fresh goroutine with small buffers, and returns. An idle WebSocket
// then costs about a third as much. x/net does the handshake; the frames
// after it are wsframe.go's.
func (s *server) handleWebSocket(w http.ResponseWriter, r *http.Request) {
	who := s.identify(r)
	if err := s.access.connect(who.caller); err != nil {
		serveError(w, err.code, err.msg)
		return
	}
	if !s.admit(w) {
		return
	}
	conn, buf, err := http.NewResponseController(w).Hijack()
	if err != nil {
		s.streams.done()
		serveError(w, http.StatusHTTPVersionNotSupported, "WebSocket needs HTTP/1.1")
		return
	}
	out := &wsOut{conn: conn, direct: true}
	in := &wsInput{conn: conn, silence: s.cfg.heartbeat, answer: s.cfg.writeTimeout, gone: &s.metrics.wsSilent}
	if n := buf.Reader.Buffered(); n > 0 {
		in.early, _ = buf.Reader.Peek(n) // the client's first frames; buf.Reader is not read again
	}
	rw := bufio.NewReadWriter(bufio.NewReaderSize(in, 512), bufio.NewWriterSize(out, 64))
	go func() {
		defer s.streams.done()
		serve := func(*websocket.Conn) { s.serveWebSocket(conn, rw.Reader, in, out, who) }
		ws := websocket.Server{Handshake: s.checkOrigin, Handler: serve}
		ws.ServeHTTP(&hijacked{conn, rw}, r)
	}()
}

// wsOut is where a WebSocket's bytes go besides its queue's: x/net's
// handshake, straight to the connection; then the control frames that
// the reader answers with (pong, close, ping), into a batch that the
// stream writers send first.
type wsOut struct {
	conn  net.Conn
	ready func() // queues the stream for a writer

	mu      sync.Mutex
	direct  bool
	buf     []byte
	closing bool // buf ends with a close frame: nothing may follow it
}

func (o *wsOut) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if !o.direct {
		return 0, net.ErrClosed
	}
	return o.conn.Write(p)
}

// control queues a control frame, at once: a writer sends it before
// anything else pending. After a close, nothing more is queued.
func (o *wsOut) control(op byte, p []byte) {
	o.mu.Lock()
	if o.closing {
		o.mu.Unlock()
		return
	}
	o.buf = appendFrame(o.buf, op, p)
	o.mu.Unlock()
	o.ready() // a no-op while a writer has the stream: it takes this itself
}

// close queues the close frame that answers err; the stream ends once a
// writer has sent it.
func (o *wsOut) close(err *wsCloseError) {
	o.mu.Lock()
	if o.closing {
		o.mu.Unlock()
		return
	}
	o.buf = appendClose(o.buf, err)
	o.closing = true
	o.mu.Unlock()
	o.ready()
}

// take appends the queued control frames to b, and reports whether they
// end with a close.
func (o *wsOut) take(b []byte) (_ []byte, closing bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	b = append(b, o.buf...)
	o.buf = o.buf[:0]
	return b, o.closing
}

func (o *wsOut) len() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return len(o.buf)
}

// endHandshake sends what comes from now on through the queue.
func (o *wsOut) endHandshake() {
	o.mu.Lock()
	o.direct = false
	o.mu.Unlock()
}

// hijacked is the http.ResponseWriter websocket.Server gets: a connection
// already hijacked, which its Hijack hands over. Everything it writes goes
// through the ReadWriter.
type hijacked struct {
	conn net.Conn
	rw   *bufio.ReadWriter
}

func (h *hijacked) Header() http.Header                          { return http.Header{} }
func (h *hijacked) Write([]byte) (int, error)                    { return 0, http.ErrHijacked }
func (h *hijacked) WriteHeader(int)                              {}
func (h *hijacked) Hijack() (net.Conn, *bufio.ReadWriter, error) { return h.conn, h.rw, nil }

// checkOrigin gives x/net/websocket the handshake's Origin. Whether that
// origin may connect at all is decided before any route runs, for every
// kind of request alike (cors, in routes.go).
func (s *server) checkOrigin(cfg *websocket.Config, r *http.Request) error {
	if origin := r.Header.Get("Origin"); origin != "" {
		u, err := url.Parse(origin)
		if err != nil {
			return fmt.Errorf("bad Origin %q", origin)
		}
		cfg.Origin = u
	}
	return nil
}

// wsConn is the protocol of one WebSocket client. Its goroutine reads
// and answers messages; replies and events leave, in the order they were
// queued, from the stream's one coalescing queue, written by the stream
// writers, so a slow client skips intermediate revisions of a key as a
// slow event stream does. An idle connection costs just its parked
// reader.
//
// A client that sends requests without reading the replies could make
// the server hold any amount of them. So everything queued for it is
// weighed (replies, events, states still to read: the queue's size), and
// past a bound the reader stops reading until the writers have sent
// enough: the client's sends then block in TCP, and a client that reads
// nothing is closed after -write-timeout like any stream.
type wsConn struct {
	s    *server
	in   wsReader
	st   *stream
	out  *wsOut
	subs map[string]*subscription // by path as the client spelled it; only the reader touches it

	bound  int64 // of the queue's size, past which the reader waits
	closed bool  // the batch being written ends with a close frame; the writer's
	// resumeAt is the highest seq the connection has sent, which an event
	// inside a transaction carries; only the writer touches it.
	resumeAt int64
	drained  chan struct{}   // a token when the queue's size falls to the bound
	done     chan struct{}   // closed when the stream closes
	ctx      context.Context // ends when the reader returns: for what a message waits for (a node's round trip to etcd)
}

// wsBound is the least a connection may have queued before its reader
// stops reading: replies, events and states in progress (SPEC 10). A
// test may raise it, to show what it holds back.
var wsBound int64 = 4 << 20

// serveWebSocket runs one connection until the client leaves or stops
// answering, a write fails or stalls for -write-timeout, the reader finds
// a frame the RFC forbids, or the server shuts down.
func (s *server) serveWebSocket(conn net.Conn, r *bufio.Reader, in *wsInput, out *wsOut, who identity) {
	c := &wsConn{
		s: s, out: out,
		subs: make(map[string]*subscription),
		// A write's message is held whole, as a request body is.
		in:      wsReader{r: r, max: int(s.readLimit())},
		drained: make(chan struct{}, 1),
		done:    make(chan struct{}),
	}
	c.bound = max(wsBound, int64(c.in.max))
	var cancel context.CancelFunc
	c.ctx, cancel = context.WithCancel(context.Background())
	defer cancel()
	c.in.pong = func(p []byte) { out.control(opPong, p) }
	in.ping = func() { out.control(opPing, nil) }
	c.st = s.writers.newStream(conn)
	c.st.who = who
	s.metrics.ws.Add(1)
	defer s.metrics.ws.Add(-1)
	c.st.proto = c
	out.ready = c.st.ready
	out.endHandshake()
	s.writers.start(c.st)
	defer func() {
		for _, sub := range c.subs {
			s.store.Unsubscribe(sub)
		}
		c.st.Close()
	}()
	var msg []byte // read into, again and again: handle keeps no part of it
	for {
		if cap(msg) > 64<<10 {
			msg = nil // a large message went by: let the GC have its array
		}
		for c.st.q.size.Load() > c.bound {
			select {
			case <-c.drained:
			case <-c.done:
				return
			}
		}
		var op byte
		var err error
		op, msg, err = c.in.next(msg)
		var closing *wsCloseError
		switch {
		case errors.As(err, &closing):
			c.out.close(closing)
			// The writer that sends the close frame ends the stream; it
			// has -write-timeout for it, as for any write.
			<-c.done
			return
		case errors.Is(err, errNotUTF8):
			// encoding/json would quietly turn the bad bytes of a key
			// into U+FFFD: another key.
			c.fail(nil, err)
		case err != nil:
			return
		case op == opBinary:
			c.reply(nil, "error", appendJSONString(nil, "binary message: the protocol is JSON text"))
		default:
			c.handle(msg)
		}
	}
}

// close ends the connection: the reader stops waiting. The reader
// unsubscribes once it has returned.
func (c *wsConn) close() { close(c.done) }

func (c *wsConn) more() bool { return c.out.len() > 0 }

// sent wakes the reader if the batch just written took the queue down
// to the bound; or, once a close frame is out, ends the stream.
func (c *wsConn) sent() {
	if c.closed {
		c.st.Close()
		return
	}
	if c.st.q.size.Load() <= c.bound {
		select {
		case c.drained <- struct{}{}:
		default:
		}
	}
}

// heartbeat does nothing: the reader pings a silent peer itself (see
// wsInput), as soon as it has been silent for -heartbeat.
func (c *wsConn) heartbeat() {}

// appendBatch appends the control frames queued meanwhile, then a frame
// for each event and reply of a batch; after a close frame, nothing.
func (c *wsConn) appendBatch(b []byte, batch []event, upTo int64) []byte {
	b, c.closed = c.out.take(b)
	if c.closed {
		return b
	}
	for i := range batch {
		ev := &batch[i]
		if ev.kind == evGone || ev.kind == evHeartbeat {
			continue
		}
		if ev.kind == evReply {
			c.resumeAt = max(c.resumeAt, ev.reply.start)
			if ev.reply.empty() {
				continue
			}
		}
		var start int
		b, start = beginFrame(b)
		if ev.kind != evReply {
			b = appendWSEvent(b, ev, &c.resumeAt)
			b = endFrame(b, start, opText)
			continue
		}
		b = ev.reply.append(b)
		switch ev.reply.frame {
		case fragWhole:
			b = endFrame(b, start, opText)
		case fragFirst:
			b = endFragment(b, start, opText, false)
		default:
			b = endFragment(b, start, opContinuation, ev.reply.frame == fragLast)
		}
	}
	return b
}

// appendWSEvent appends an event of a subscription as a WebSocket message,
// naming keys as the subscription's client spells them:
//
//   - a change: value {key, value, revision, seq}, or no-value {key,
//     reason, seq} for a delete or expiry;
//   - a state: the same, and a missing key's no-value has no reason;
//   - synced {key, seq} and reset {key}, whose key is the subscription's
//     path.
//
// Until the subscription is synced, seq is its floor (see Subscribe). An
// event that another of its transaction follows carries the highest seq
// the connection has sent, *resumeAt, and "more": true: no resume point
// falls inside a transaction (SPEC 11).
func appendWSEvent(b []byte, ev *event, resumeAt *int64) []byte {
	sub := ev.sub
	switch ev.kind {
	case evSynced:
		sub.syncing = false
		*resumeAt = max(*resumeAt, ev.seq)
		b = append(b, `{"type":"synced","payload":{"key":`...)
		b = appendKey(b, spell(sub.path, sub.kvserver))
		b = append(b, `,"seq":`...)
		b = strconv.AppendInt(b, ev.seq, 10)
		return append(b, "}}"...)
	case evReset:
		b = append(b, `{"type":"reset","payload":{"key":`...)
		b = appendKey(b, spell(sub.path, sub.kvserver))
		return append(b, "}}"...)
	}
	tag := ev.seq
	switch {
	case sub.syncing:
		tag = sub.floor
	case ev.joined:
		tag = *resumeAt
	}
	*resumeAt = max(*resumeAt, tag)
	key := spell(ev.key, sub.kvserver)
	if ev.e == nil {
		b = append(b, `{"type":"no-value","payload":{"key":`...)
		b = appendKey(b, key)
		if ev.kind == evChange {
			b = append(b, `,"reason":"`...)
			b = append(b, ev.why.String()...)
			b = append(b, '"')
		}
	} else {
		b = appendVersion(append(b, `{"type":"value","payload":{`...), key, ev.e)
	}
	b = append(b, `,"seq":`...)
	b = strconv.AppendInt(b, tag, 10)
	if ev.joined && !sub.syncing {
		b = append(b, `,"more":true`...)
	}
	return append(b, "}}"...)
}
