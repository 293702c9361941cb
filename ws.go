package main

import (
	"bufio"
	"bytes"
	"encoding/json"
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
// that the direct reply echoes. See README.md for every message.

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
	if !s.streams.reserve() {
		serveError(w, http.StatusServiceUnavailable, "too many subscribers (-max-subscribers): try again later")
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

	bound   int64         // of the queue's size, past which the reader waits
	closed  bool          // the batch being written ends with a close frame; the writer's
	drained chan struct{} // a token when the queue's size falls to the bound
	done    chan struct{} // closed when the stream closes
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
		// The envelope, the key and an id need room beside the largest value.
		in:      wsReader{r: r, max: int(s.cfg.maxValueBytes) + s.cfg.maxKeyBytes + 4096},
		drained: make(chan struct{}, 1),
		done:    make(chan struct{}),
	}
	c.bound = max(wsBound, int64(c.in.max))
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
		var start int
		b, start = beginFrame(b)
		if ev.kind == evReply {
			b = ev.reply.append(b)
		} else {
			b = appendWSEvent(b, ev)
		}
		b = endFrame(b, start, opText)
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
// Until the subscription is synced, seq is its floor (see Subscribe).
func appendWSEvent(b []byte, ev *event) []byte {
	sub := ev.sub
	switch ev.kind {
	case evSynced:
		sub.syncing = false
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
	if sub.syncing {
		tag = sub.floor
	}
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
		b = append(b, `{"type":"value","payload":{"key":`...)
		b = appendKey(b, key)
		b = append(b, `,"value":`...)
		b = append(b, ev.e.value...)
		b = append(b, `,"revision":`...)
		b = strconv.AppendInt(b, ev.e.revision, 10)
	}
	b = append(b, `,"seq":`...)
	b = strconv.AppendInt(b, tag, 10)
	return append(b, "}}"...)
}

// wsMessage is a client's message. A value stays raw, never decoded.
type wsMessage struct {
	Type    string          `json:"type"`
	Payload *wsPayload      `json:"payload"`
	ID      json.RawMessage `json:"id"`
}

// wsPayload holds every payload field of every message type.
type wsPayload struct {
	Key      *string         `json:"key"`
	Prefix   *string         `json:"prefix"`
	Value    json.RawMessage `json:"value"`
	Revision *int64          `json:"revision"`
	TTL      json.RawMessage `json:"ttl"`
	Initial  bool            `json:"initial"`
	Since    json.RawMessage `json:"since"`
}

// wsOp is one message type of the WebSocket API: what its payload names
// and the permission that needs, and the method that answers it. handle
// checks both, in one place, before the method runs.
type wsOp struct {
	names  wsTarget
	perm   perm
	answer func(c *wsConn, r wsRequest)
}

// wsTarget is what a message's payload names.
type wsTarget uint8

const (
	namesKey    wsTarget = iota // "key": a key
	namesPath                   // "key": a key, a prefix ending with "/", or "/"
	namesPrefix                 // "prefix": a prefix ("/" if absent; the "/" at its end may be left out)
)

// wsOps is every message type a client may send.
var wsOps = map[string]wsOp{
	"get":         {namesKey, permRead, (*wsConn).get},
	"set":         {namesKey, permWrite, (*wsConn).set},
	"update":      {namesKey, permWrite, (*wsConn).update},
	"delete":      {namesKey, permWrite, (*wsConn).delete},
	"subscribe":   {namesPath, permRead, (*wsConn).subscribe},
	"unsubscribe": {namesPath, permNone, (*wsConn).unsubscribe},
	"list":        {namesPrefix, permRead, (*wsConn).list},
}

// wsRequest is a message being answered, with what it names checked:
// the store's key or path, and as the client spelled it, which replies
// repeat ("foo" or "/foo").
type wsRequest struct {
	typ      string
	id       json.RawMessage
	p        wsPayload
	key      string
	spelled  string
	kvserver bool
}

// handle answers one message: it finds its op, checks what the payload
// names and that the connection may do the op on it, and runs the op. A
// write refused here counts in the metrics as any write does.
func (c *wsConn) handle(data []byte) {
	msg, p, err := decodeMessage(data)
	if err != nil {
		c.fail(msg.ID, err)
		return
	}
	op, ok := wsOps[msg.Type]
	if !ok {
		c.fail(msg.ID, fmt.Errorf("unknown message type %q: want get, set, update, delete, subscribe, unsubscribe or list", msg.Type))
		return
	}
	r := wsRequest{typ: msg.Type, id: msg.ID, p: p}
	if err := c.target(op, &r); err != nil && op.perm == permWrite {
		c.failWrite(r.id, err)
		return
	} else if err != nil {
		c.fail(r.id, err)
		return
	}
	op.answer(c, r)
}

// target reads and checks what r's payload names for op, and whether the
// connection may do op on it.
func (c *wsConn) target(op wsOp, r *wsRequest) error {
	switch {
	case op.names == namesPrefix:
		r.spelled = "/"
		if r.p.Prefix != nil {
			r.spelled = *r.p.Prefix
		}
		if !strings.HasSuffix(r.spelled, "/") {
			r.spelled += "/"
		}
	case r.p.Key == nil && op.names == namesPath:
		return fmt.Errorf(`%s: missing "key": a key, a prefix ending with "/", or "/"`, r.typ)
	case r.p.Key == nil:
		return fmt.Errorf(`%s: missing "key"`, r.typ)
	default:
		r.spelled = *r.p.Key
	}
	var err error
	if r.key, r.kvserver, err = checkSpelled(r.spelled, c.s.cfg.maxKeyBytes, op.names == namesKey); err != nil {
		return err
	}
	return c.allow(r.key, op.perm)
}

// fail replies with an error, in the words of every interface.
func (c *wsConn) fail(id json.RawMessage, err error) {
	c.reply(id, outcomeTable[outcomeOf(err)].ws, appendJSONString(nil, c.s.errorMessage(err)))
}

// failWrite replies with an error to a write, and counts it.
func (c *wsConn) failWrite(id json.RawMessage, err error) {
	c.s.metrics.wrote(err)
	c.fail(id, err)
}

func (c *wsConn) get(r wsRequest) {
	if e := c.s.store.Get(r.key); e != nil {
		c.replyValue(r.id, r.spelled, e)
	} else {
		c.reply(r.id, "no-value", appendKeyPayload(nil, r.spelled))
	}
}

func (c *wsConn) set(r wsRequest) {
	value, ttl, err := c.s.valueAndTTL(r.p.Value, r.p.TTL)
	if err != nil {
		c.failWrite(r.id, err)
		return
	}
	e, err := c.s.store.Set(r.key, value, ttl)
	c.answerWrite(r.id, r.spelled, err, false, func() []byte { return appendRevisionPayload(nil, r.spelled, e.revision) })
}

func (c *wsConn) update(r wsRequest) {
	value, ttl, err := c.s.valueAndTTL(r.p.Value, r.p.TTL)
	if err == nil && r.p.Revision == nil {
		err = errors.New(`update: missing "revision": the revision the write will have (0 to create)`)
	}
	if err != nil {
		c.failWrite(r.id, err)
		return
	}
	e, err := c.s.store.CompareAndSwap(r.key, value, *r.p.Revision, ttl)
	c.answerWrite(r.id, r.spelled, err, true, func() []byte { return appendRevisionPayload(nil, r.spelled, e.revision) })
}

func (c *wsConn) delete(r wsRequest) {
	rev := int64(-1)
	if r.p.Revision != nil {
		rev = *r.p.Revision
	}
	_, err := c.s.store.Delete(r.key, rev)
	c.answerWrite(r.id, r.spelled, err, false, func() []byte { return appendKeyPayload(nil, r.spelled) })
}

// subscribe registers a subscription under the path as the client spelled
// it. Its ok is queued before any of its events, so it arrives first.
// Subscribing again under the same spelling keeps the subscription, and
// queues only the state it asks for, if any: no second registration, no
// second copy of anything. A new spelling past -max-subscriptions is
// refused.
func (c *wsConn) subscribe(r wsRequest) {
	sub := c.subs[r.spelled]
	if sub == nil && len(c.subs) >= c.s.cfg.maxWSSubs {
		c.fail(r.id, fmt.Errorf("subscribe %s: this connection has %d subscriptions, the most it may (-max-subscriptions): unsubscribe first", quoteKey(r.spelled), len(c.subs)))
		return
	}
	if r.id != nil {
		c.reply(r.id, "ok", appendKeyPayload(nil, r.spelled))
	}
	if sub == nil {
		sub = &subscription{path: r.key, q: &c.st.q, kvserver: r.kvserver}
		c.subs[r.spelled] = sub
	}
	c.s.store.Subscribe(sub, subscribeFrom(r.p))
}

// unsubscribe's ok is queued after the subscription is gone, so no event
// of it follows the ok.
func (c *wsConn) unsubscribe(r wsRequest) {
	if sub := c.subs[r.spelled]; sub != nil {
		delete(c.subs, r.spelled)
		c.s.store.Unsubscribe(sub)
	}
	if r.id != nil {
		c.reply(r.id, "ok", appendKeyPayload(nil, r.spelled))
	}
}

func (c *wsConn) list(r wsRequest) { c.replyList(r.id, r.key, r.kvserver) }

// subscribeFrom says where a subscribe message starts: after since, a
// change number, if given (a since that is not a positive integer cannot
// be resumed from: it resets); else from scratch if initial; else now.
func subscribeFrom(p wsPayload) int64 {
	if p.Since != nil && string(p.Since) != "null" {
		return resumePoint(strings.Trim(string(p.Since), `"`))
	}
	if p.Initial {
		return fromScratch
	}
	return fromNow
}

// decodeMessage parses a message and its payload, in one pass. On error
// the message holds whatever id could be read, so the error can echo it.
// The message is valid UTF-8 (wsReader checks it, as RFC 6455 asks), so
// encoding/json cannot quietly turn bad bytes of a key into U+FFFD.
func decodeMessage(data []byte) (wsMessage, wsPayload, error) {
	var msg wsMessage
	err := json.Unmarshal(data, &msg)
	// Unmarshal goes on past a member of the wrong type, so the type and
	// id are read whatever their place in the message.
	var typeErr *json.UnmarshalTypeError
	switch {
	case err == nil:
	case !errors.As(err, &typeErr):
		return msg, wsPayload{}, fmt.Errorf("invalid message: not JSON: %v", err)
	case typeErr.Field == "":
		return msg, wsPayload{}, errors.New(`invalid message: want a JSON object {"type": …, "payload": …}`)
	case typeErr.Field == "payload":
		return msg, wsPayload{}, fmt.Errorf(`%s: "payload" must be an object`, msg.Type)
	case strings.HasPrefix(typeErr.Field, "payload."):
		field := strings.TrimPrefix(typeErr.Field, "payload.")
		return msg, wsPayload{}, fmt.Errorf("%s: %q must be %s", msg.Type, field, wantType(field))
	default:
		return msg, wsPayload{}, fmt.Errorf("invalid message: %q must be %s", typeErr.Field, wantType(typeErr.Field))
	}
	if msg.Type == "" {
		return msg, wsPayload{}, errors.New(`invalid message: missing "type"`)
	}
	if msg.Payload == nil {
		return msg, wsPayload{}, fmt.Errorf(`%s: missing "payload"`, msg.Type)
	}
	return msg, *msg.Payload, nil
}

func wantType(field string) string {
	switch field {
	case "revision":
		return "an integer"
	case "initial":
		return "true or false"
	}
	return "a string"
}

// allow returns nil if the connection's token lets it do p on path.
func (c *wsConn) allow(path string, p perm) error {
	if err := c.s.access.allow(c.st.who.caller, path, p); err != nil {
		return err
	}
	return nil // not the nil *accessError, which is a non-nil error
}

// answerWrite replies to a write of key that ended with err: conflict
// with the current state, or error, or ok with the payload ok makes, sent
// if always or if the message had an id (KvServer's writes are silent).
func (c *wsConn) answerWrite(id json.RawMessage, key string, err error, always bool, ok func() []byte) {
	c.s.metrics.wrote(err)
	var conflict *conflictError
	switch {
	case errors.As(err, &conflict):
		c.replyConflict(id, key, conflict.cur)
	case err != nil:
		c.fail(id, err)
	case always || id != nil:
		c.reply(id, "ok", ok())
	}
}

// wsReply is a reply to a WebSocket client: its message; or for a get or
// a list, what to build it from when it is written, so that a queued
// reply shares the stored values rather than copying them.
type wsReply struct {
	head     []byte // the message, or what comes before the values
	e        *entry // a get's value
	items    []item // a list's keys and values
	kvserver bool   // the list's keys are named without the leading "/"
	now      int64  // when the list was taken, for its TTLs
	tail     []byte // what comes after the values
	size     int64  // of the message, about: counted against the bound
}

// append appends the reply's message.
func (r *wsReply) append(b []byte) []byte {
	b = append(b, r.head...)
	if r.e != nil {
		b = append(b, r.e.value...)
	}
	for i, it := range r.items {
		if i > 0 {
			b = append(b, ',')
		}
		it.key = spell(it.key, r.kvserver)
		b = appendItem(b, it, r.now)
	}
	return append(b, r.tail...)
}

// push queues a reply. Its bytes count against the bound from now until
// a writer has sent them.
func (c *wsConn) push(r *wsReply) {
	c.st.q.push(event{kind: evReply, reply: r})
}

// reply queues {"type": typ, "payload": payload[, "id": id]}.
func (c *wsConn) reply(id json.RawMessage, typ string, payload []byte) {
	b := make([]byte, 0, len(payload)+len(typ)+len(id)+32)
	b = append(b, `{"type":"`...)
	b = append(b, typ...)
	b = append(b, `","payload":`...)
	b = append(b, payload...)
	b = appendID(b, id)
	b = append(b, '}')
	c.push(&wsReply{head: b, size: int64(len(b))})
}

// appendID appends the "id" member of a reply to a message with id, if
// it had one.
func appendID(b []byte, id json.RawMessage) []byte {
	if id == nil {
		return b
	}
	b = append(b, `,"id":`...)
	if !bytes.ContainsAny(id, " \t\r\n") {
		return append(b, id...) // as it came: compact already
	}
	var compact bytes.Buffer
	json.Compact(&compact, id) // id came from a message that parsed
	return append(b, compact.Bytes()...)
}

// replyValue queues value {key, value, revision[, ttl]}, sharing e's value.
func (c *wsConn) replyValue(id json.RawMessage, key string, e *entry) {
	r := &wsReply{e: e}
	r.head = append(append([]byte(`{"type":"value","payload":{"key":`), appendKey(nil, key)...), `,"value":`...)
	r.tail = append(r.tail, `,"revision":`...)
	r.tail = strconv.AppendInt(r.tail, e.revision, 10)
	if ms, ok := e.ttlLeft(c.s.store.now()); ok {
		r.tail = append(r.tail, `,"ttl":`...)
		r.tail = strconv.AppendInt(r.tail, ms, 10)
	}
	r.tail = append(appendID(append(r.tail, '}'), id), '}')
	r.size = int64(len(r.head) + len(e.value) + len(r.tail))
	c.push(r)
}

// replyList queues values [{key, value, revision[, ttl]}...] of the keys
// under prefix, sharing their values.
func (c *wsConn) replyList(id json.RawMessage, prefix string, kvserver bool) {
	r := &wsReply{items: c.s.store.List(prefix), kvserver: kvserver, now: c.s.store.now()}
	r.head = []byte(`{"type":"values","payload":[`)
	r.tail = append(appendID([]byte{']'}, id), '}')
	r.size = int64(len(r.head) + len(r.tail))
	for _, it := range r.items {
		r.size += int64(len(it.key)+len(it.value)) + 48 // the members around them, about
	}
	c.push(r)
}

// replyConflict queues conflict {key, value, revision}: the current state.
func (c *wsConn) replyConflict(id json.RawMessage, key string, cur *entry) {
	b := append(append([]byte(`{"key":`), appendKey(nil, key)...), `,"value":`...)
	rev := int64(noRevision)
	if cur != nil {
		b = append(b, cur.value...)
		rev = cur.revision
	} else {
		b = append(b, "null"...)
	}
	b = append(b, `,"revision":`...)
	b = strconv.AppendInt(b, rev, 10)
	c.reply(id, "conflict", append(b, '}'))
}

func appendKeyPayload(b []byte, key string) []byte {
	b = append(b, `{"key":`...)
	b = appendKey(b, key)
	return append(b, '}')
}

func appendRevisionPayload(b []byte, key string, rev int64) []byte {
	b = append(b, `{"key":`...)
	b = appendKey(b, key)
	b = append(b, `,"revision":`...)
	b = strconv.AppendInt(b, rev, 10)
	return append(b, '}')
}

func appendJSONString(b []byte, s string) []byte {
	q, _ := json.Marshal(s)
	return append(b, q...)
}
