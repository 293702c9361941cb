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
	"time"
	"unicode/utf8"

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
// then costs about a third as much.
func (s *server) handleWebSocket(w http.ResponseWriter, r *http.Request) {
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
	rw := bufio.NewReadWriter(buf.Reader, bufio.NewWriterSize(conn, 1024))
	if buf.Reader.Buffered() == 0 { // else keep it: it holds the client's first bytes
		rw.Reader = bufio.NewReaderSize(conn, 512)
	}
	go func() {
		defer s.streams.done()
		ws := websocket.Server{Handshake: s.checkOrigin, Handler: s.serveWebSocket}
		ws.ServeHTTP(&hijacked{conn, rw}, r)
	}()
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

// checkOrigin applies the -origins policy to a WebSocket handshake. A
// client that sends no Origin (not a browser: a CLI tool, a server) is
// accepted: the policy protects browser users from other pages.
func (s *server) checkOrigin(cfg *websocket.Config, r *http.Request) error {
	origin := r.Header.Get("Origin")
	if origin != "" {
		u, err := url.Parse(origin)
		if err != nil {
			return fmt.Errorf("bad Origin %q", origin)
		}
		cfg.Origin = u
	}
	if origin == "" || s.origins == nil || s.origins[origin] {
		return nil
	}
	return fmt.Errorf("origin %q not allowed", origin)
}

// wsConn is one WebSocket client. The reader (the connection's goroutine)
// answers messages; replies and events leave, in the order they were
// queued, from one coalescing queue, so a slow client skips intermediate
// revisions of a key as a slow event stream does. A writer goroutine runs
// only while there is something to send: an idle connection has just its
// parked reader.
type wsConn struct {
	s    *server
	ws   *websocket.Conn
	q    *coalescer
	subs map[string]*subscription // by path as the client spelled it; only the reader touches it

	mu      sync.Mutex
	writing bool // a flush goroutine runs; guarded by mu
	closed  bool // no more flushes may start; guarded by mu
	flushes sync.WaitGroup
}

func newWSConn(s *server, ws *websocket.Conn) *wsConn {
	c := &wsConn{s: s, ws: ws, subs: make(map[string]*subscription)}
	c.q = &coalescer{notify: c.wake}
	return c
}

// serveWebSocket runs one connection until the client leaves, a write
// fails or stalls for -write-timeout, or the server shuts down.
func (s *server) serveWebSocket(ws *websocket.Conn) {
	// The envelope, the key and an id need room beside the largest value.
	ws.MaxPayloadBytes = int(s.cfg.maxValueBytes) + s.cfg.maxKeyBytes + 4096
	// The HTTP server's ReadTimeout set a deadline for the request; a
	// WebSocket lives as long as its client wants.
	ws.SetReadDeadline(time.Time{})
	if !s.streams.track(ws) {
		return // shutting down
	}
	defer s.streams.untrack(ws)
	c := newWSConn(s, ws)
	defer c.close()
	for {
		var msg []byte
		err := websocket.Message.Receive(ws, &msg)
		switch {
		case errors.Is(err, websocket.ErrFrameTooLarge):
			c.reply(nil, "error", appendJSONString(nil, fmt.Sprintf("message larger than %d bytes", ws.MaxPayloadBytes)))
			continue
		case err != nil:
			return
		}
		c.handle(msg)
	}
}

// close ends the connection: no more events, no more flushes, and it
// returns when the last flush has.
func (c *wsConn) close() {
	for _, sub := range c.subs {
		c.s.store.Unsubscribe(sub)
	}
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	c.ws.Close() // ends a flush stuck in a write
	c.flushes.Wait()
}

// wake starts a flush unless one is running. The queue calls it after
// every push, so it must not block.
func (c *wsConn) wake() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.writing || c.closed {
		return
	}
	c.writing = true
	c.flushes.Add(1)
	go c.flush()
}

// flush sends what is queued until the queue is empty, then ends. On a
// failed or stalled write it closes the connection, which ends the reader.
func (c *wsConn) flush() {
	defer c.flushes.Done()
	for {
		batch := c.q.drain()
		if len(batch) == 0 {
			c.mu.Lock()
			// A push after drain saw writing set and started nothing:
			// look again before leaving.
			if c.q.Len() == 0 {
				c.writing = false
				c.mu.Unlock()
				return
			}
			c.mu.Unlock()
			continue
		}
		err := c.send(batch)
		c.q.recycle(batch)
		if err != nil {
			c.ws.Close() // writing stays set: this connection is done
			return
		}
	}
}

// send writes a batch, one frame per message.
func (c *wsConn) send(batch []event) error {
	buf := getBuffer()
	defer putBuffer(buf)
	c.ws.SetWriteDeadline(time.Now().Add(c.s.cfg.writeTimeout))
	for i := range batch {
		ev := &batch[i]
		msg := ev.raw
		switch ev.kind {
		case evGone, evHeartbeat:
			continue
		case evReply:
		default:
			buf.Reset()
			buf.Write(appendWSEvent(buf.AvailableBuffer(), ev))
			msg = buf.Bytes()
		}
		if _, err := c.ws.Write(msg); err != nil {
			return err
		}
	}
	return nil
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

// wsMessage is a client's message. Fields stay raw until the type says
// what they must be, so that a value is never decoded.
type wsMessage struct {
	Type    string          `json:"type"`
	Payload json.RawMessage `json:"payload"`
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

// handle answers one message.
func (c *wsConn) handle(data []byte) {
	msg, p, err := decodeMessage(data)
	if err != nil {
		c.reply(msg.ID, "error", appendJSONString(nil, err.Error()))
		return
	}
	fail := func(err error) { c.reply(msg.ID, "error", appendJSONString(nil, err.Error())) }
	s := c.s
	// Replies name keys as the message spelled them ("foo" or "/foo").
	switch msg.Type {
	case "get":
		key, spelled, err := c.key(p.Key)
		if err != nil {
			fail(err)
			return
		}
		if e := s.store.Get(key); e != nil {
			c.reply(msg.ID, "value", appendItem(nil, item{spelled, e}, s.store.now()))
		} else {
			c.reply(msg.ID, "no-value", appendKeyPayload(nil, spelled))
		}
	case "set", "update":
		key, spelled, value, ttl, err := c.write(p)
		if err != nil {
			fail(err)
			return
		}
		var e *entry
		if msg.Type == "set" {
			e, err = s.store.Set(key, value, ttl)
		} else if p.Revision == nil {
			fail(errors.New(`update: missing "revision": the revision the write will have (0 to create)`))
			return
		} else {
			e, err = s.store.CompareAndSwap(key, value, *p.Revision, ttl)
		}
		c.answerWrite(msg.ID, spelled, err, msg.Type == "update", func() []byte { return appendRevisionPayload(nil, spelled, e.revision) })
	case "delete":
		key, spelled, err := c.key(p.Key)
		if err != nil {
			fail(err)
			return
		}
		rev := int64(-1)
		if p.Revision != nil {
			rev = *p.Revision
		}
		_, err = s.store.Delete(key, rev)
		c.answerWrite(msg.ID, spelled, err, false, func() []byte { return appendKeyPayload(nil, spelled) })
	case "subscribe", "unsubscribe":
		if p.Key == nil {
			fail(fmt.Errorf(`%s: missing "key": a key, a prefix ending with "/", or "/"`, msg.Type))
			return
		}
		spelled := *p.Key
		path, kvserver, err := checkSpelled(spelled, s.cfg.maxKeyBytes, false)
		if err != nil {
			fail(err)
			return
		}
		// The reply is queued before any event, so it arrives first.
		if msg.ID != nil {
			c.reply(msg.ID, "ok", appendKeyPayload(nil, spelled))
		}
		sub := c.subs[spelled]
		if msg.Type == "subscribe" {
			if sub != nil {
				s.store.Unsubscribe(sub) // subscribing again starts afresh
			}
			sub = &subscription{path: path, q: c.q, kvserver: kvserver}
			c.subs[spelled] = sub
			s.store.Subscribe(sub, subscribeFrom(p))
		} else if sub != nil {
			delete(c.subs, spelled)
			s.store.Unsubscribe(sub)
		}
	case "list":
		prefix := "/"
		if p.Prefix != nil {
			prefix = *p.Prefix
		}
		if !strings.HasSuffix(prefix, "/") {
			prefix += "/"
		}
		path, kvserver, err := checkSpelled(prefix, s.cfg.maxKeyBytes, false)
		if err != nil {
			fail(err)
			return
		}
		c.reply(msg.ID, "values", s.appendList(nil, path, kvserver))
	default:
		fail(fmt.Errorf("unknown message type %q: want get, set, update, delete, subscribe, unsubscribe or list", msg.Type))
	}
}

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

// decodeMessage parses a message and its payload. On error the message
// holds whatever id could be read, so the error can echo it.
func decodeMessage(data []byte) (wsMessage, wsPayload, error) {
	var msg wsMessage
	var p wsPayload
	if !utf8.Valid(data) {
		// A text frame must be UTF-8 (RFC 6455), and encoding/json would
		// quietly turn the bad bytes of a key into U+FFFD: another key.
		return msg, p, errors.New("invalid message: not valid UTF-8")
	}
	if err := json.Unmarshal(data, &msg); err != nil {
		var typeErr *json.UnmarshalTypeError
		if errors.As(err, &typeErr) && typeErr.Field != "" {
			return msg, p, fmt.Errorf("invalid message: %q must be %s", typeErr.Field, wantType(typeErr.Field))
		}
		if errors.As(err, &typeErr) {
			return msg, p, errors.New(`invalid message: want a JSON object {"type": …, "payload": …}`)
		}
		return msg, p, fmt.Errorf("invalid message: not JSON: %v", err)
	}
	if msg.Type == "" {
		return msg, p, errors.New(`invalid message: missing "type"`)
	}
	if len(msg.Payload) == 0 || string(msg.Payload) == "null" {
		return msg, p, fmt.Errorf(`%s: missing "payload"`, msg.Type)
	}
	if err := json.Unmarshal(msg.Payload, &p); err != nil {
		var typeErr *json.UnmarshalTypeError
		if errors.As(err, &typeErr) && typeErr.Field != "" {
			return msg, p, fmt.Errorf("%s: %q must be %s", msg.Type, typeErr.Field, wantType(typeErr.Field))
		}
		return msg, p, fmt.Errorf(`%s: "payload" must be an object`, msg.Type)
	}
	return msg, p, nil
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

// key checks a payload's key, and returns the store key and the key as
// the client spelled it.
func (c *wsConn) key(k *string) (key, spelled string, err error) {
	if k == nil {
		return "", "", errors.New(`missing "key"`)
	}
	key, _, err = checkSpelled(*k, c.s.cfg.maxKeyBytes, true)
	return key, *k, err
}

// write checks the key, value and TTL of a set or update.
func (c *wsConn) write(p wsPayload) (key, spelled, value string, ttl time.Duration, err error) {
	if key, spelled, err = c.key(p.Key); err != nil {
		return "", "", "", 0, err
	}
	value, ttl, err = c.s.valueAndTTL(p.Value, p.TTL)
	return key, spelled, value, ttl, err
}

// answerWrite replies to a write of key that ended with err: conflict
// with the current state, or error, or ok with the payload ok makes, sent
// if always or if the message had an id (KvServer's writes are silent).
func (c *wsConn) answerWrite(id json.RawMessage, key string, err error, always bool, ok func() []byte) {
	var conflict *conflictError
	switch {
	case errors.As(err, &conflict):
		c.replyConflict(id, key, conflict.cur)
	case err != nil:
		c.reply(id, "error", appendJSONString(nil, c.s.writeErrorMessage(err)))
	case always || id != nil:
		c.reply(id, "ok", ok())
	}
}

// reply queues {"type": typ, "payload": payload[, "id": id]}.
func (c *wsConn) reply(id json.RawMessage, typ string, payload []byte) {
	b := make([]byte, 0, len(payload)+len(typ)+len(id)+32)
	b = append(b, `{"type":"`...)
	b = append(b, typ...)
	b = append(b, `","payload":`...)
	b = append(b, payload...)
	if id != nil {
		b = append(b, `,"id":`...)
		var compact bytes.Buffer
		json.Compact(&compact, id) // id came from a message that parsed
		b = append(b, compact.Bytes()...)
	}
	c.q.push(event{kind: evReply, raw: append(b, '}')})
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
